//! A small QMP client (QEMU Machine Protocol, docs/interop/qmp-spec): greeting,
//! `qmp_capabilities`, then one command at a time, skipping asynchronous events.
//!
//! Hand-written rather than the `qapi` crate: we send five commands (set_password,
//! expire_password, system_powerdown, quit, query-status), and qapi's generated schema
//! for every QEMU command costs minutes of compile time on a 2-core build machine for
//! types we never use. JSON values in, JSON values out.

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
        let greeting = q.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Json(greeting.to_string()));
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_message(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.rd.read_line(&mut line))
            .await
            .map_err(|_| Error::Timeout(self.timeout))??;
        if n == 0 {
            return Err(Error::Closed);
        }
        serde_json::from_str(&line).map_err(|_| Error::Json(line.trim_end().to_string()))
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
            let m = self.read_message().await?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(Error::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            // Anything else is an asynchronous event (SHUTDOWN, RTC_CHANGE, ...).
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// The client against a scripted peer that speaks QMP's framing, including an event
    /// between a command and its answer and an error reply.
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
}
