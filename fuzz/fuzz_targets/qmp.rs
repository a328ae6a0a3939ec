//! QEMU's QMP lines, as `qemu_ctl::qmp::parse_message` decodes them for vdd's dispatcher
//! and xtask (QMP spec, "Server responses").
//!
//! Invariants: a line is accepted exactly when it is one JSON object; a `return` is the
//! object's own `return` value; an error carries its class and description when they are
//! strings; the greeting is only the object with `QMP`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qemu_ctl::qmp::{parse_message, Message};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let json: Option<serde_json::Map<String, Value>> = match serde_json::from_str(line) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    };
    let got = parse_message(line);
    let Some(m) = json else {
        assert!(got.is_err(), "{got:?} from a line that is no JSON object");
        return;
    };
    match got.expect("a JSON object is a message") {
        Message::Return(v) => assert_eq!(Some(&v), m.get("return")),
        Message::Error { class, desc } => {
            assert!(!m.contains_key("return"));
            let e = &m["error"];
            for (k, got) in [("class", class), ("desc", desc)] {
                match e.get(k).and_then(Value::as_str) {
                    Some(s) => assert_eq!(s, got),
                    None => assert_eq!(got, "?"),
                }
            }
        }
        Message::Greeting => {
            assert!(m.contains_key("QMP") && !m.contains_key("return") && !m.contains_key("error"))
        }
        Message::Event => assert!(!m.contains_key("QMP") && !m.contains_key("return")),
    }
});
