//! The URL space of the HTTP service and the answer to a file request, as pure functions
//! (RFC 9110: 9.3.1 GET, 9.3.2 HEAD, 13.1.1 If-Match family, 13.1.5 If-Range, 14 ranges,
//! 15.5.6 405 with `Allow`). The driver does the I/O these decisions ask for.
//!
//! Routes are one enum so the session API (`/api/v1/...`) joins as new variants next to
//! the boot ones, with the same shape: parse in [`route`], answer in the driver.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::boot::BootPart;
use crate::config::Mac;

use super::codec::{self, ResponseHead};
use super::range::{self, RangeDecision};

/// Methods our resources support (all of them are read-only for now).
pub const ALLOW: &str = "GET, HEAD";

/// What a request target names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/boot.ipxe?mac=..`: the client's iPXE script. A missing or malformed MAC means
    /// the defaults (iPXE may have sent `${net0/mac}` unexpanded).
    BootScript { mac: Option<Mac> },
    /// `/boot/kernel`, `/boot/initrd`, `/boot/<mac>/kernel`, `/boot/<mac>/initrd`.
    BootFile { mac: Option<Mac>, part: BootPart },
    /// `/files/<name>`: a file beneath `[http] root`; `name` is percent-decoded.
    File { name: String },
    /// Anything else.
    NotFound,
}

/// Whether the method is one we serve, and whether it carries a body in the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

impl Method {
    pub fn parse(m: &str) -> Option<Method> {
        // Methods are case-sensitive (RFC 9110 9.1).
        match m {
            "GET" => Some(Method::Get),
            "HEAD" => Some(Method::Head),
            _ => None,
        }
    }
}

/// Maps a request target (origin-form) to a route.
pub fn route(target: &str) -> Route {
    // RFC 9112 3.2.2: a server must accept the absolute-form too; the authority is ours.
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/boot.ipxe" {
        let mac = codec::query_param(query, "mac").and_then(|m| m.parse().ok());
        return Route::BootScript { mac };
    }
    if let Some(rest) = path.strip_prefix("/boot/") {
        let part = |s: &str| match s {
            "kernel" => Some(BootPart::Kernel),
            "initrd" => Some(BootPart::Initrd),
            _ => None,
        };
        let r = match rest.split_once('/') {
            None => part(rest).map(|part| Route::BootFile { mac: None, part }),
            Some((m, p)) => {
                let mac = codec::percent_decode(m).and_then(|m| m.parse::<Mac>().ok());
                match (mac, part(p)) {
                    (Some(mac), Some(part)) => Some(Route::BootFile {
                        mac: Some(mac),
                        part,
                    }),
                    _ => None,
                }
            }
        };
        return r.unwrap_or(Route::NotFound);
    }
    if let Some(rest) = path.strip_prefix("/files/") {
        // A name that does not decode cannot name a file of ours.
        return codec::percent_decode(rest).map_or(Route::NotFound, |name| Route::File { name });
    }
    Route::NotFound
}

/// Length and modification time of a file: all the answer depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub len: u64,
    pub mtime: SystemTime,
}

impl FileInfo {
    /// A strong validator from length and nanosecond mtime: it changes whenever an admin
    /// replaces the file, and costs no read of the content.
    pub fn etag(&self) -> String {
        let ns = self
            .mtime
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("\"{:x}-{:x}\"", self.len, ns)
    }
}

/// The answer to a file request: a head, and which bytes of the file follow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileAnswer {
    pub head: ResponseHead,
    /// `(offset, length)` to send after the head; `None` for HEAD, 304 and 416.
    pub body: Option<(u64, u64)>,
}

/// Decides status, fields and byte range for GET/HEAD of a file.
pub fn file_answer(
    method: Method,
    range_hdr: Option<&str>,
    if_range: Option<&str>,
    if_none_match: Option<&str>,
    content_type: &'static str,
    f: FileInfo,
) -> FileAnswer {
    let etag = f.etag();
    let modified = codec::http_date(f.mtime);
    let base = |status| {
        ResponseHead::new(status)
            .with("Accept-Ranges", "bytes")
            .with("ETag", etag.clone())
            .with("Last-Modified", modified.clone())
    };
    // 13.1.2: If-None-Match on GET/HEAD that matches gives 304 (weak comparison).
    if let Some(inm) = if_none_match {
        let hit = inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag);
        if hit {
            return FileAnswer {
                head: base(304),
                body: None,
            };
        }
    }
    // 14.2: Range is defined for GET only. 13.1.5: If-Range that does not match the
    // current validator (strong ETag or the exact date) means "send it all".
    let range_hdr = match (method, if_range) {
        (Method::Head, _) => None,
        (Method::Get, Some(v)) if v != etag && v != modified => None,
        (Method::Get, _) => range_hdr,
    };
    let d = range::decide(range_hdr, f.len);
    let cr = range::content_range(d, f.len);
    let (head, body) = match d {
        RangeDecision::Full => (
            base(200)
                .with("Content-Type", content_type)
                .with("Content-Length", f.len.to_string()),
            (0, f.len),
        ),
        RangeDecision::Partial { first, last } => (
            base(206)
                .with("Content-Type", content_type)
                .with("Content-Range", cr.unwrap_or_default())
                .with("Content-Length", (last - first + 1).to_string()),
            (first, last - first + 1),
        ),
        RangeDecision::Unsatisfiable => {
            return FileAnswer {
                head: base(416)
                    .with("Content-Range", cr.unwrap_or_default())
                    .with("Content-Length", "0"),
                body: None,
            }
        }
    };
    FileAnswer {
        head,
        body: (method == Method::Get).then_some(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mac(s: &str) -> Option<Mac> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn routes() {
        assert_eq!(
            route("/boot.ipxe?mac=52:54:00:00:00:01"),
            Route::BootScript {
                mac: mac("52:54:00:00:00:01")
            }
        );
        assert_eq!(
            route("/boot.ipxe?mac=52%3a54%3a00%3a00%3a00%3a01"),
            Route::BootScript {
                mac: mac("52:54:00:00:00:01")
            }
        );
        for t in [
            "/boot.ipxe",
            "/boot.ipxe?mac=${net0/mac}",
            "/boot.ipxe?mac=zz",
        ] {
            assert_eq!(route(t), Route::BootScript { mac: None }, "{t}");
        }
        assert_eq!(
            route("/boot/kernel"),
            Route::BootFile {
                mac: None,
                part: BootPart::Kernel
            }
        );
        assert_eq!(
            route("/boot/52:54:00:00:00:01/initrd"),
            Route::BootFile {
                mac: mac("52:54:00:00:00:01"),
                part: BootPart::Initrd
            }
        );
        for t in [
            "/boot/vmlinuz",
            "/boot/xx/kernel",
            "/boot/52:54:00:00:00:01/config",
            "/boot/",
            "/",
            "/files",
            "/filesx/a",
            "/files/%zz",
        ] {
            assert_eq!(route(t), Route::NotFound, "{t}");
        }
        assert_eq!(
            route("http://10.77.0.1:8080/boot/kernel"),
            Route::BootFile {
                mac: None,
                part: BootPart::Kernel
            }
        );
        assert_eq!(route("http://10.77.0.1"), Route::NotFound);
        assert_eq!(
            route("/files/a%20b/c?x"),
            Route::File {
                name: "a b/c".into()
            }
        );
    }

    fn info() -> FileInfo {
        FileInfo {
            len: 1000,
            mtime: UNIX_EPOCH + Duration::from_secs(784_111_777),
        }
    }

    fn field<'a>(a: &'a FileAnswer, n: &str) -> Option<&'a str> {
        a.head
            .headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    }

    const OCTETS: &str = "application/octet-stream";

    #[test]
    fn full_partial_head() {
        let a = file_answer(Method::Get, None, None, None, OCTETS, info());
        assert_eq!(a.head.status, 200);
        assert_eq!(field(&a, "Content-Length"), Some("1000"));
        assert_eq!(field(&a, "Accept-Ranges"), Some("bytes"));
        assert_eq!(
            field(&a, "Last-Modified"),
            Some("Sun, 06 Nov 1994 08:49:37 GMT")
        );
        assert_eq!(a.body, Some((0, 1000)));

        let a = file_answer(Method::Get, Some("bytes=-100"), None, None, OCTETS, info());
        assert_eq!(a.head.status, 206);
        assert_eq!(field(&a, "Content-Range"), Some("bytes 900-999/1000"));
        assert_eq!(field(&a, "Content-Length"), Some("100"));
        assert_eq!(a.body, Some((900, 100)));

        // HEAD: same fields as GET, no body; Range is not defined for HEAD.
        let a = file_answer(Method::Head, Some("bytes=0-1"), None, None, OCTETS, info());
        assert_eq!(a.head.status, 200);
        assert_eq!(field(&a, "Content-Length"), Some("1000"));
        assert_eq!(a.body, None);

        let a = file_answer(Method::Get, Some("bytes=1000-"), None, None, OCTETS, info());
        assert_eq!(a.head.status, 416);
        assert_eq!(field(&a, "Content-Range"), Some("bytes */1000"));
        assert_eq!(a.body, None);
    }

    #[test]
    fn validators() {
        let etag = info().etag();
        let a = file_answer(
            Method::Get,
            Some("bytes=0-9"),
            Some(&etag),
            None,
            OCTETS,
            info(),
        );
        assert_eq!(a.head.status, 206);
        let a = file_answer(
            Method::Get,
            Some("bytes=0-9"),
            Some("\"other\""),
            None,
            OCTETS,
            info(),
        );
        assert_eq!(a.head.status, 200);
        let a = file_answer(
            Method::Get,
            Some("bytes=0-9"),
            Some("Sun, 06 Nov 1994 08:49:37 GMT"),
            None,
            OCTETS,
            info(),
        );
        assert_eq!(a.head.status, 206);
        let a = file_answer(Method::Get, None, None, Some(&etag), OCTETS, info());
        assert_eq!(a.head.status, 304);
        assert_eq!(a.body, None);
        let a = file_answer(Method::Get, None, None, Some("\"x\", *"), OCTETS, info());
        assert_eq!(a.head.status, 304);
        let a = file_answer(Method::Get, None, None, Some("\"x\""), OCTETS, info());
        assert_eq!(a.head.status, 200);
    }
}
