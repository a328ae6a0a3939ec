//! The guest list from the vdd server: `GET /api/v1/guests` (HTTP/1.1, RFC 9112: status
//! line, Content-Length or chunked framing, or read-to-close) returning a JSON array of
//! `{name, label, display, description}`.
//!
//! A hand-written GET instead of a client crate: one request to an IP literal, no TLS, no
//! redirects; this keeps the static PID 1 small and every failure mode visible here.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Deserialize;

/// Bodies larger than this are refused: a guest list is a few KiB, and PID 1 must not be
/// made to allocate without bound by a broken server.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("HTTP exchange with {0} failed")]
    Io(SocketAddr, #[source] std::io::Error),
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
    #[error("server answered {0}")]
    Status(String),
    /// The server refused with a reason meant for the user.
    #[error("{1} (HTTP {0})")]
    Refused(u16, String),
    #[error("guest list is not valid JSON")]
    Json(#[source] serde_json::Error),
}

/// One entry of the menu as the server describes it. Unknown fields are allowed: a newer
/// server may add some, and an older client must still boot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Guest {
    pub name: String,
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub display: String,
    #[serde(default)]
    pub description: String,
}

impl Guest {
    /// What the menu shows: the label, or the name when the server gave none.
    pub fn title(&self) -> &str {
        if self.label.is_empty() {
            &self.name
        } else {
            &self.label
        }
    }
}

pub fn parse_list(body: &[u8]) -> Result<Vec<Guest>, Error> {
    serde_json::from_slice(body).map_err(Error::Json)
}

/// Fetches and parses the guest list.
pub fn fetch(server: SocketAddr, timeout: Duration) -> Result<Vec<Guest>, Error> {
    let body = get(server, "/api/v1/guests", timeout)?;
    parse_list(&body)
}

/// One GET; returns the body of a 2xx answer.
pub fn get(server: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>, Error> {
    request(server, "GET", path, None, timeout)
}

/// One request with an optional JSON body; returns the body of a 2xx answer. A non-2xx
/// answer whose body is `{"error": MESSAGE}` (the vdd API's refusals) becomes
/// [`Error::Refused`] with that message, which the menu shows as it is.
pub fn request(
    server: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    request_with_key(server, method, path, body, None, timeout)
}

/// [`request`], showing a session's key in `X-Vdd-Session-Key` when there is one.
pub fn request_with_key(
    server: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    key: Option<&str>,
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    let io = |e| Error::Io(server, e);
    let mut s =
        TcpStream::connect_timeout(&server, timeout).map_err(|e| Error::Connect(server, e))?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {server}\r\nUser-Agent: vdd-boot-menu\r\nAccept: application/json\r\nConnection: close\r\n"
    )
    .into_bytes();
    if let Some(k) = key {
        req.extend_from_slice(format!("X-Vdd-Session-Key: {k}\r\n").as_bytes());
    }
    if let Some(b) = body {
        req.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
            .as_bytes(),
        );
    }
    req.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        req.extend_from_slice(b);
    }
    s.write_all(&req).map_err(io)?;
    // Read until the response is complete by its own framing, not only until the server
    // closes: a server that keeps the connection open despite `Connection: close` must
    // not cost us the read timeout.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX_BODY + 64 * 1024 {
            return Err(Error::Malformed("response too large"));
        }
        if complete(&raw) {
            break;
        }
    }
    parse_response(&raw)
}

/// True once `raw` holds a whole response by Content-Length or chunked framing.
fn complete(raw: &[u8]) -> bool {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if head.contains("transfer-encoding:") && head.contains("chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

/// Splits a whole response (the server closed the connection) into status and body.
pub fn parse_response(raw: &[u8]) -> Result<Vec<u8>, Error> {
    let end = find(raw, b"\r\n\r\n").ok_or(Error::Malformed("no end of headers"))?;
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|_| Error::Malformed("headers not UTF-8"))?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut sp = status.splitn(3, ' ');
    let (ver, code) = (sp.next().unwrap_or(""), sp.next().unwrap_or(""));
    if !ver.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(Error::Malformed("bad status line"));
    }
    if !code.starts_with('2') {
        // The vdd API explains a refusal in {"error": "..."}; anything else is shown raw.
        #[derive(Deserialize)]
        struct Refusal {
            error: String,
        }
        let n: u16 = code.parse().unwrap_or(0);
        if let Some(r) = find(raw, b"\r\n\r\n")
            .and_then(|e| serde_json::from_slice::<Refusal>(raw[e + 4..].trim_ascii()).ok())
        {
            return Err(Error::Refused(n, r.error));
        }
        return Err(Error::Status(status.to_string()));
    }
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(Error::Malformed("header without colon"));
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| Error::Malformed("bad Content-Length"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v
                .to_ascii_lowercase()
                .split(',')
                .any(|t| t.trim() == "chunked");
        }
    }
    // RFC 9112 6.3: chunked wins over Content-Length.
    if chunked {
        return dechunk(rest);
    }
    match length {
        Some(n) if n > MAX_BODY => Err(Error::Malformed("body too large")),
        Some(n) if rest.len() < n => Err(Error::Malformed("body shorter than Content-Length")),
        Some(n) => Ok(rest[..n].to_vec()),
        None if rest.len() > MAX_BODY => Err(Error::Malformed("body too large")),
        None => Ok(rest.to_vec()),
    }
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").ok_or(Error::Malformed("chunk size line"))?;
        let line = std::str::from_utf8(&b[..eol]).map_err(|_| Error::Malformed("chunk size"))?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(hex, 16).map_err(|_| Error::Malformed("chunk size"))?;
        b = &b[eol + 2..];
        if n == 0 {
            return Ok(out);
        }
        if n > MAX_BODY || out.len() + n > MAX_BODY {
            return Err(Error::Malformed("body too large"));
        }
        if b.len() < n + 2 || &b[n..n + 2] != b"\r\n" {
            return Err(Error::Malformed("truncated chunk"));
        }
        out.extend_from_slice(&b[..n]);
        b = &b[n + 2..];
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const LIST: &str = r#"[{"name":"debian","label":"Debian 12","display":"x11","description":"desktop","extra":1},{"name":"dos"}]"#;

    /// A one-shot server on 127.0.0.1:0 that answers with `resp` and checks the request.
    fn serve(resp: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&req, b"\r\n\r\n").is_none() {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(&resp).unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, h)
    }

    #[test]
    fn fetches_with_content_length() {
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{LIST}",
            LIST.len()
        );
        let (addr, h) = serve(resp.into_bytes());
        let g = fetch(addr, Duration::from_secs(10)).unwrap();
        let req = h.join().unwrap();
        assert!(req.starts_with("GET /api/v1/guests HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {addr}\r\n")));
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].title(), "Debian 12");
        assert_eq!(g[0].display, "x11");
        assert_eq!(g[1].title(), "dos");
        assert_eq!(g[1].description, "");
    }

    #[test]
    fn fetches_chunked_and_close_delimited() {
        let (a, b) = LIST.split_at(10);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:X};ext=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        let (addr, _h) = serve(resp.into_bytes());
        assert_eq!(fetch(addr, Duration::from_secs(10)).unwrap().len(), 2);
        let (addr, _h) = serve(format!("HTTP/1.0 200 OK\r\n\r\n{LIST}").into_bytes());
        assert_eq!(fetch(addr, Duration::from_secs(10)).unwrap().len(), 2);
    }

    #[test]
    fn refusals_are_errors_not_panics() {
        let (addr, _h) = serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec());
        assert!(
            matches!(fetch(addr, Duration::from_secs(10)), Err(Error::Status(s)) if s.contains("404"))
        );
        for bad in [
            &b"garbage"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n[]",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n[]",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"SSH-2.0 hello\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n[]",
        ] {
            assert!(
                matches!(parse_response(bad), Err(Error::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(parse_list(b"{\"name\":1}"), Err(Error::Json(_))));
        assert!(matches!(
            parse_list(b"[{\"label\":\"no name\"}]"),
            Err(Error::Json(_))
        ));
    }

    /// A server that keeps the connection open after a complete answer.
    #[test]
    fn does_not_wait_for_close_when_length_is_known() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{LIST}",
                LIST.len()
            );
            s.write_all(resp.as_bytes()).unwrap();
            // Hold the connection until the client is done.
            let _ = rx.recv_timeout(Duration::from_secs(60));
        });
        // A read timeout far longer than the test's patience would show as a hang; the
        // framing ends the read instead.
        let g = fetch(addr, Duration::from_secs(30)).unwrap();
        assert_eq!(g.len(), 2);
        tx.send(()).unwrap();
        h.join().unwrap();
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"
        ));
    }

    #[test]
    fn connection_refused_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert!(matches!(
            fetch(addr, Duration::from_secs(5)),
            Err(Error::Connect(..))
        ));
    }
}
