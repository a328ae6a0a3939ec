//! The recent events the panel shows: a bounded ring of what the log says about seats and
//! sessions. A `tracing` layer beside the log's own writer keeps every event at `info` or
//! above that names a seat or a session in vdd's fixed fields (`mac`, `ip`, `peer`,
//! `session`, `guest`); so the panel shows exactly the lines the journal has, and no
//! service calls anything of the panel's to be seen there.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Events kept; the oldest go first.
pub const CAPACITY: usize = 2000;
/// The longest message and field value kept.
const MAX_TEXT: usize = 300;

/// One log event about a seat or a session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogEvent {
    /// A number that grows by one per event: the panel asks for what came after it.
    pub seq: u64,
    pub at_ms: u64,
    pub level: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The address of `ip` or `peer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// The event's other fields, `key=value` (bytes, file, error, ...).
    pub fields: String,
}

/// The ring.
#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<(u64, VecDeque<LogEvent>)>,
}

impl Events {
    pub fn push(&self, mut e: LogEvent) {
        let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        r.0 += 1;
        e.seq = r.0;
        if r.1.len() >= CAPACITY {
            r.1.pop_front();
        }
        r.1.push_back(e);
    }

    /// The newest `limit` events that `keep` accepts, oldest first.
    pub fn recent(&self, limit: usize, keep: impl Fn(&LogEvent) -> bool) -> Vec<LogEvent> {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<LogEvent> =
            r.1.iter()
                .rev()
                .filter(|e| keep(e))
                .take(limit)
                .cloned()
                .collect();
        v.reverse();
        v
    }

    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `tracing` layer that fills [`Events`]; add it to the subscriber with a level
/// filter of `info` (`layer.with_filter(LevelFilter::INFO)`).
pub struct EventLayer(pub Arc<Events>);

impl<S: Subscriber> Layer<S> for EventLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut v = Visitor::default();
        event.record(&mut v);
        let e = v.0;
        if e.mac.is_none() && e.ip.is_none() && e.session.is_none() {
            return;
        }
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        self.0.push(LogEvent {
            level,
            at_ms: super::now_ms(),
            ..e
        });
    }
}

#[derive(Default)]
struct Visitor(LogEvent);

impl Visitor {
    fn field(&mut self, name: &str, value: String) {
        let value = clip(value);
        let e = &mut self.0;
        match name {
            "message" => e.message = value,
            "mac" => e.mac = Some(value),
            "session" => e.session = Some(value),
            "guest" => e.guest = Some(value),
            "ip" | "peer" => {
                let ip = value
                    .parse::<IpAddr>()
                    .ok()
                    .or_else(|| value.parse::<SocketAddr>().ok().map(|a| a.ip()));
                if e.ip.is_none() {
                    e.ip = ip.map(|i| i.to_canonical());
                }
                if name == "peer" || ip.is_none() {
                    let _ = write!(e.fields, "{name}={value} ");
                }
            }
            _ => {
                if e.fields.len() < MAX_TEXT {
                    let _ = write!(e.fields, "{name}={value} ");
                }
            }
        }
    }
}

impl Visit for Visitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.field(field.name(), format!("{value:?}"));
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn the_log_about_seats_and_sessions_fills_the_ring() {
        let ev = Arc::new(Events::default());
        let sub = tracing_subscriber::registry().with(EventLayer(ev.clone()));
        tracing::subscriber::with_default(sub, || {
            let mac = "52:54:00:e2:e0:01";
            tracing::info!(%mac, ip = %std::net::Ipv4Addr::new(10, 77, 0, 50), xid = 7, "ack");
            tracing::info!("vdd serving");
            tracing::warn!(peer = %SocketAddr::from(([10, 77, 0, 51], 4000)), file = "x", "refused file");
            tracing::info!(session = "ab12", guest = "demo", "session ended");
        });
        let all = ev.recent(10, |_| true);
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(all[0].message, "ack");
        assert_eq!(all[0].mac.as_deref(), Some("52:54:00:e2:e0:01"));
        assert_eq!(all[0].ip, Some("10.77.0.50".parse().unwrap()));
        assert_eq!(all[0].fields, "xid=7 ");
        assert_eq!(
            (all[1].level, all[1].ip),
            ("warn", Some("10.77.0.51".parse().unwrap()))
        );
        assert!(all[1].fields.contains("file=x"), "{:?}", all[1].fields);
        assert_eq!(all[2].session.as_deref(), Some("ab12"));
        assert!(all[0].seq < all[1].seq && all[1].seq < all[2].seq);
        for i in 0..CAPACITY + 10 {
            ev.push(LogEvent {
                message: i.to_string(),
                ..LogEvent::default()
            });
        }
        assert_eq!(ev.len(), CAPACITY);
        let last = ev.recent(1, |_| true);
        assert_eq!(last[0].message, (CAPACITY + 9).to_string());
    }
}
