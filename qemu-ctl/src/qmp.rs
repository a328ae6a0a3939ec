//! A small QMP client (QEMU Machine Protocol, docs/interop/qmp-spec): greeting,
//! `qmp_capabilities`, then one command at a time, skipping asynchronous events.
//!
//! Hand-written rather than the `qapi` crate: we send a handful of commands (set_password,
//! expire_password, system_powerdown, quit, query-status, query-vnc, screendump, send-key),
//! and qapi's generated schema for every QEMU command costs minutes of compile time on a
//! 2-core build machine for types we never use. JSON values in, JSON values out.
//!
//! [`parse_message`] is the one decoder of what QEMU sends (and the fuzz target's entry).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to QMP socket {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("QMP I/O")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON: {0:?}")]
    Json(String),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("no QMP answer within {0:?}")]
    Timeout(Duration),
    /// QEMU answered with an error object.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// One message from QEMU, as QMP's spec (docs/interop/qmp-spec, "Server responses") sorts
/// them.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`, sent once on connect.
    Greeting,
    /// `{"return": ...}`: the answer to the command in flight.
    Return(Value),
    /// `{"error": {"class", "desc"}}`: the command in flight was refused.
    Error { class: String, desc: String },
    /// Anything else, an asynchronous event (SHUTDOWN, RTC_CHANGE, ...): skipped.
    Event,
}

/// Decodes one line from QEMU. A line that is not a JSON object is an error; fields of
/// the wrong type read as `"?"` rather than failing, as they only feed the admin's log.
pub fn parse_message(line: &str) -> Result<Message, Error> {
    let bad = || Error::Json(line.trim_end().chars().take(200).collect());
    let v: Value = serde_json::from_str(line).map_err(|_| bad())?;
    let Value::Object(mut m) = v else {
        return Err(bad());
    };
    if let Some(r) = m.remove("return") {
        return Ok(Message::Return(r));
    }
    if let Some(e) = m.get("error") {
        let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        return Ok(Message::Error {
            class: field("class"),
            desc: field("desc"),
        });
    }
    if m.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    Ok(Message::Event)
}

/// Connects to `path`, runs one command and disconnects: for callers without a runtime of
/// their own (xtask's thin clients). Runs a current-thread runtime for the call.
pub fn execute_once(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async {
        let mut q = Qmp::connect(path, timeout).await?;
        q.execute(command, arguments).await
    })
}

/// One QMP connection in command mode.
pub struct Qmp {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    timeout: Duration,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let s = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(|e| Error::Connect(path.display().to_string(), e))?;
        let (rd, wr) = s.into_split();
        let mut q = Qmp {
            rd: BufReader::new(rd),
            wr,
            timeout,
        };
        // An event can come before the greeting: QEMU serves a socket monitor from its
        // monitor thread and emits events from the main thread, and a monitor left in
        // command mode by the previous client sends an event (VNC_DISCONNECTED, say) the
        // moment the new connection is up, before its OPENED handler writes the greeting.
        // Such an event belongs to nobody; anything else first is a protocol error.
        loop {
            match q.read_message().await? {
                Message::Greeting => break,
                Message::Event => {}
                other => return Err(Error::Json(format!("not a QMP greeting: {other:?}"))),
            }
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_message(&mut self) -> Result<Message, Error> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.rd.read_line(&mut line))
            .await
            .map_err(|_| Error::Timeout(self.timeout))??;
        if n == 0 {
            return Err(Error::Closed);
        }
        parse_message(&line)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, Error> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.wr.write_all(&bytes).await?;
        loop {
            match self.read_message().await? {
                Message::Return(r) => return Ok(r),
                Message::Error { class, desc } => {
                    return Err(Error::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                // A second greeting cannot come; an event is skipped.
                Message::Greeting | Message::Event => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// The client against a scripted peer that speaks QMP's framing, including an event
    /// before the greeting, an event between a command and its answer and an error reply.
    #[tokio::test]
    async fn greeting_capabilities_events_and_errors() {
        let dir = std::env::temp_dir().join(format!("vdd-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            // A stray event of the previous client's time first, then the greeting.
            wr.write_all(b"{\"event\": \"VNC_DISCONNECTED\", \"data\": {}}\r\n")
                .await
                .unwrap();
            wr.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let mut line = String::new();
            rd.read_line(&mut line).await.unwrap();
            assert_eq!(line.trim(), r#"{"execute":"qmp_capabilities"}"#);
            wr.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            line.clear();
            rd.read_line(&mut line).await.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["execute"], "set_password");
            assert_eq!(v["arguments"]["password"], "abc");
            wr.write_all(b"{\"event\": \"RTC_CHANGE\", \"data\": {}}\r\n{\"return\": {}}\r\n")
                .await
                .unwrap();
            line.clear();
            rd.read_line(&mut line).await.unwrap();
            wr.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\r\n")
                .await
                .unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        q.execute(
            "set_password",
            Some(json!({"protocol": "vnc", "password": "abc"})),
        )
        .await
        .unwrap();
        let e = q.execute("bogus", None).await.unwrap_err();
        assert_eq!(e.to_string(), "QEMU refused bogus: GenericError: nope");
        peer.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn messages_are_sorted_by_their_key() {
        let m = |s: &str| parse_message(s).unwrap();
        assert_eq!(
            m(r#"{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}}"#),
            Message::Greeting
        );
        assert_eq!(m(r#"{"return": {}}"#), Message::Return(json!({})));
        assert_eq!(
            m(r#"{"error": {"class": 3, "desc": "x"}}"#),
            Message::Error {
                class: "?".into(),
                desc: "x".into()
            }
        );
        assert_eq!(
            m(r#"{"event": "SHUTDOWN", "data": {"guest": true}}"#),
            Message::Event
        );
        assert!(parse_message("[1]").is_err());
        assert!(parse_message("{\"return\"").is_err());
    }
}
