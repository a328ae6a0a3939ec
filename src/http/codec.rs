//! HTTP/1.1 message syntax (RFC 9112): request heads in, response heads out; plus the
//! IMF-fixdate of RFC 9110 section 5.6.7 and the percent-decoding of RFC 3986 section
//! 2.1. No sockets here.

use std::time::{SystemTime, UNIX_EPOCH};

/// The most header bytes we accept; a boot client's request head is a few hundred.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A request head that we can route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent (origin-form `/path?query`).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<(String, String)>,
}

/// Why a request head cannot be served; each maps to one status in the driver.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head is not HTTP/1.x syntax (400).
    #[error("malformed request head: {0}")]
    Malformed(String),
    /// The head is larger than [`MAX_HEAD`] or has too many fields (431).
    #[error("request head too large")]
    TooLarge,
}

impl Request {
    /// The first value of header `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// RFC 9112 9.3: 1.1 is persistent unless "close"; 1.0 we always close.
    pub fn keep_alive(&self) -> bool {
        if self.minor == 0 {
            return false;
        }
        !self
            .header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// True when a body follows the head (RFC 9112 6.3). We never read request bodies
    /// yet, so such a connection is closed after the answer instead of being parsed out
    /// of step.
    pub fn has_body(&self) -> bool {
        self.header("transfer-encoding").is_some()
            || self
                .header("content-length")
                .is_some_and(|v| v.parse::<u64>() != Ok(0))
    }
}

/// Parses a complete head from the start of `buf`. `Ok(None)`: more bytes are needed.
/// On success also returns the head's length; what follows belongs to the next request.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hdrs);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            }
        }
        Ok(httparse::Status::Complete(n)) => {
            if n > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            let headers = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            Ok(Some((
                Request {
                    method: req.method.unwrap_or_default().to_string(),
                    target: req.path.unwrap_or_default().to_string(),
                    minor: req.version.unwrap_or(1),
                    headers,
                },
                n,
            )))
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// A response head: status and fields; the driver sends the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
}

impl ResponseHead {
    pub fn new(status: u16) -> ResponseHead {
        ResponseHead {
            status,
            headers: Vec::new(),
        }
    }

    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> ResponseHead {
        self.headers.push((name, value.into()));
        self
    }

    /// The head as bytes, with `Date` and `Server` added and `Connection: close` when
    /// the connection ends after this response.
    pub fn encode(&self, now: SystemTime, close: bool) -> Vec<u8> {
        let mut s = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        s.push_str(&format!("Date: {}\r\nServer: vdd\r\n", http_date(now)));
        for (n, v) in &self.headers {
            s.push_str(n);
            s.push_str(": ");
            s.push_str(v);
            s.push_str("\r\n");
        }
        if close {
            s.push_str("Connection: close\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 5.6.7).
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    // 1970-01-01 was a Thursday.
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let (y, m, d) = civil_from_days(days as i64);
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day): H. Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Decodes `%XX` escapes. `None` for a bad escape or bytes that are not UTF-8, which we
/// refuse rather than guess at.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits `/path?query` and returns the decoded value of `key` in the query.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(&v.replace('+', " ")))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_a_curl_request() {
        let raw = b"GET /files/a%20b?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/7.88.1\r\nRange: bytes=0-9\r\n\r\nGET /next";
        let (r, n) = parse_request(raw).unwrap().unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/files/a%20b?x=1");
        assert_eq!(r.minor, 1);
        assert_eq!(r.header("range"), Some("bytes=0-9"));
        assert_eq!(&raw[n..], b"GET /next");
        assert!(r.keep_alive());
        assert!(!r.has_body());
    }

    #[test]
    fn partial_garbage_and_oversize() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(),
            None
        );
        assert!(matches!(
            parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert_eq!(parse_request(&big), Err(HeadError::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(parse_request(&many), Err(HeadError::TooLarge));
    }

    #[test]
    fn connection_rules() {
        let r = |s: &str| parse_request(s.as_bytes()).unwrap().unwrap().0;
        assert!(!r("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(!r("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").keep_alive());
        assert!(r("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").has_body());
        assert!(r("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").has_body());
        assert!(!r("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").has_body());
    }

    #[test]
    fn dates() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }

    #[test]
    fn head_encoding() {
        let h = ResponseHead::new(206).with("Content-Length", "10");
        let s = String::from_utf8(h.encode(UNIX_EPOCH, true)).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 206 Partial Content\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\nServer: vdd\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb%2e").as_deref(), Some("a/b."));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(
            query_param("x=1&mac=52%3A54%3A00%3A00%3A00%3A01", "mac").as_deref(),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(query_param("mac", "mac").as_deref(), Some(""));
        assert_eq!(query_param("x=1", "mac"), None);
    }
}
