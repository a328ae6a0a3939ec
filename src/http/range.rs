//! The `Range` request header for byte ranges (RFC 9110 section 14: 14.1.2 byte ranges,
//! 14.2 `Range`, 14.4 `Content-Range`, 15.3.7 206, 15.5.17 416). Pure: header text and
//! file length in, decision out.

/// What to send for a request's `Range` header against a representation of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeDecision {
    /// No usable `Range`: 200 with the whole file. Covers an absent header, another unit,
    /// a syntax error, and several ranges (RFC 9110 14.2: a server MAY ignore `Range`;
    /// boot clients never ask for multipart/byteranges, so we do not build it).
    Full,
    /// 206 with `Content-Range: bytes first-last/len`; `last` is inclusive.
    Partial { first: u64, last: u64 },
    /// 416 with `Content-Range: bytes */len`: a valid byte range that misses the file.
    Unsatisfiable,
}

/// Applies `header` (the field value, or `None`) to a file of `len` bytes.
pub fn decide(header: Option<&str>, len: u64) -> RangeDecision {
    let Some(h) = header else {
        return RangeDecision::Full;
    };
    let Some(set) = strip_unit(h.trim()) else {
        return RangeDecision::Full;
    };
    let specs: Vec<&str> = set
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let [spec] = specs.as_slice() else {
        // Zero ranges is a syntax error; several we choose to ignore (see `Full`).
        return RangeDecision::Full;
    };
    match parse_spec(spec) {
        None => RangeDecision::Full,
        Some(Spec::From(first, last)) => {
            if first >= len {
                // 14.1.2: "first-pos ... greater than or equal to the current length" is
                // unsatisfiable (this also makes every range of an empty file so).
                return RangeDecision::Unsatisfiable;
            }
            let last = last.map_or(len - 1, |l| l.min(len - 1));
            RangeDecision::Partial { first, last }
        }
        Some(Spec::Suffix(n)) => {
            if n == 0 || len == 0 {
                return RangeDecision::Unsatisfiable;
            }
            RangeDecision::Partial {
                first: len.saturating_sub(n),
                last: len - 1,
            }
        }
    }
}

/// The `Content-Range` value of a decision (none for `Full`).
pub fn content_range(d: RangeDecision, len: u64) -> Option<String> {
    match d {
        RangeDecision::Full => None,
        RangeDecision::Partial { first, last } => Some(format!("bytes {first}-{last}/{len}")),
        RangeDecision::Unsatisfiable => Some(format!("bytes */{len}")),
    }
}

enum Spec {
    /// `first-` or `first-last`.
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// The range unit is case-insensitive (14.1), and only `bytes` is ours.
fn strip_unit(h: &str) -> Option<&str> {
    let (unit, rest) = h.split_once('=')?;
    unit.trim().eq_ignore_ascii_case("bytes").then_some(rest)
}

fn parse_spec(s: &str) -> Option<Spec> {
    let (a, b) = s.split_once('-')?;
    let num = |x: &str| -> Option<u64> {
        // 1*DIGIT only: no sign, no spaces inside, no overflow.
        if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        x.parse().ok()
    };
    if a.is_empty() {
        return Some(Spec::Suffix(num(b)?));
    }
    let first = num(a)?;
    if b.is_empty() {
        return Some(Spec::From(first, None));
    }
    let last = num(b)?;
    // 14.1.1: last-pos below first-pos makes the range invalid, so the header is ignored.
    (last >= first).then_some(Spec::From(first, Some(last)))
}

#[cfg(test)]
mod tests {
    use super::RangeDecision::*;
    use super::*;

    fn p(first: u64, last: u64) -> RangeDecision {
        Partial { first, last }
    }

    #[test]
    fn single_ranges() {
        assert_eq!(decide(None, 100), Full);
        assert_eq!(decide(Some("bytes=0-9"), 100), p(0, 9));
        assert_eq!(decide(Some("bytes=90-"), 100), p(90, 99));
        assert_eq!(decide(Some("bytes=90-1000"), 100), p(90, 99));
        assert_eq!(decide(Some("bytes=99-99"), 100), p(99, 99));
        assert_eq!(decide(Some("BYTES = 5-6"), 100), p(5, 6));
        assert_eq!(decide(Some("bytes=0-"), 1), p(0, 0));
    }

    #[test]
    fn suffix_ranges() {
        assert_eq!(decide(Some("bytes=-10"), 100), p(90, 99));
        assert_eq!(decide(Some("bytes=-100"), 100), p(0, 99));
        assert_eq!(decide(Some("bytes=-500"), 100), p(0, 99));
        assert_eq!(decide(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(decide(Some("bytes=-5"), 0), Unsatisfiable);
    }

    #[test]
    fn unsatisfiable() {
        assert_eq!(decide(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(decide(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(decide(Some("bytes=0-0"), 0), Unsatisfiable);
        assert_eq!(
            content_range(Unsatisfiable, 100).as_deref(),
            Some("bytes */100")
        );
        assert_eq!(
            content_range(p(0, 9), 100).as_deref(),
            Some("bytes 0-9/100")
        );
        assert_eq!(content_range(Full, 100), None);
    }

    #[test]
    fn ignored_headers() {
        for h in [
            "bytes=",
            "bytes=,",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=+1-2",
            "bytes=1 -2",
            "items=0-9",
            "0-9",
            "bytes=0-9,20-29",
            "bytes=99999999999999999999999-",
            "",
        ] {
            assert_eq!(decide(Some(h), 100), Full, "{h:?}");
        }
    }
}
