//! The menu of guests: a pure model (keys in, selection / pick out), the decoding of
//! terminal bytes into keys (ECMA-48 cursor keys, both CSI `ESC [ A` and SS3 `ESC O A`
//! forms), and the text drawn on the consoles.

use crate::guests::Guest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    Enter,
    Digit(u8),
    /// Fetch the guest list again.
    Refresh,
    Reboot,
    /// End the selected guest's running session.
    End,
    /// Throw the selected guest's session away and start it afresh.
    Reset,
    Other,
}

/// Decodes whatever one `read()` from a terminal in raw mode returned.
pub fn decode(bytes: &[u8]) -> Vec<Key> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0x1b && i + 2 < bytes.len() && matches!(bytes[i + 1], b'[' | b'O') {
            out.push(match bytes[i + 2] {
                b'A' => Key::Up,
                b'B' => Key::Down,
                _ => Key::Other,
            });
            i += 3;
            continue;
        }
        out.push(match b {
            b'\r' | b'\n' => Key::Enter,
            b'0'..=b'9' => Key::Digit(b - b'0'),
            b'k' => Key::Up,
            b'j' => Key::Down,
            b'r' | b'R' => Key::Refresh,
            b'b' | b'B' => Key::Reboot,
            b'e' | b'E' => Key::End,
            b'x' | b'X' => Key::Reset,
            _ => Key::Other,
        });
        i += 1;
    }
    out
}

/// What a key did to the menu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Redraw: the selection or the typed number changed.
    Moved,
    Pick(String),
    /// End the running session of this guest.
    End(String),
    /// Reset the running session of this guest (a clean desktop).
    Reset(String),
    Refresh,
    Reboot,
    Nothing,
}

#[derive(Debug, Clone)]
pub struct Menu {
    pub guests: Vec<Guest>,
    pub selected: usize,
    /// Guests (by name) this seat has a running session of.
    pub running: Vec<String>,
    /// Digits typed so far, for lists longer than nine entries.
    typed: u32,
}

impl Menu {
    pub fn new(guests: Vec<Guest>) -> Menu {
        Menu {
            guests,
            selected: 0,
            running: Vec::new(),
            typed: 0,
        }
    }

    /// The entry named `name`.
    pub fn guest(&self, name: &str) -> Option<&Guest> {
        self.guests.iter().find(|g| g.name == name)
    }

    /// The guest `vdd.autopick` names, by name, as the server spells it.
    pub fn autopick(&self, name: &str) -> Option<String> {
        self.guests
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.name.clone())
    }

    pub fn key(&mut self, k: Key) -> Action {
        let n = self.guests.len();
        if !matches!(k, Key::Digit(_)) {
            self.typed = 0;
        }
        match k {
            Key::Up if n > 0 => {
                self.selected = (self.selected + n - 1) % n;
                Action::Moved
            }
            Key::Down if n > 0 => {
                self.selected = (self.selected + 1) % n;
                Action::Moved
            }
            Key::Enter if n > 0 => Action::Pick(self.guests[self.selected].name.clone()),
            // Entries are numbered from 1. A number is picked as soon as no longer number
            // could start with it ("1" waits in a list of 12, "3" does not); otherwise it
            // is selected and Enter (or the next digit) decides.
            Key::Digit(d) => {
                let v = self.typed * 10 + d as u32;
                if v == 0 || v as usize > n {
                    self.typed = 0;
                    return Action::Nothing;
                }
                self.selected = v as usize - 1;
                if (v * 10) as usize > n {
                    self.typed = 0;
                    Action::Pick(self.guests[self.selected].name.clone())
                } else {
                    self.typed = v;
                    Action::Moved
                }
            }
            Key::Refresh => Action::Refresh,
            Key::Reboot => Action::Reboot,
            // End and reset apply to a running session only.
            Key::End | Key::Reset if n > 0 => {
                let name = self.guests[self.selected].name.clone();
                match (k, self.running.contains(&name)) {
                    (_, false) => Action::Nothing,
                    (Key::End, true) => Action::End(name),
                    _ => Action::Reset(name),
                }
            }
            _ => Action::Nothing,
        }
    }

    /// The whole screen as text with CRLF line ends (raw mode does no newline translation).
    pub fn render(&self, server: &str) -> String {
        let mut s = String::from("\x1b[2J\x1b[H");
        s.push_str(&format!(
            "  vdd - choose a system   (server {server})\r\n\r\n"
        ));
        if self.guests.is_empty() {
            s.push_str("  The server offers no guests.\r\n");
        }
        for (i, g) in self.guests.iter().enumerate() {
            let mark = if i == self.selected { ">" } else { " " };
            s.push_str(&format!("{mark} {:>2}. {}", i + 1, g.title()));
            if self.running.contains(&g.name) {
                s.push_str("  [running]");
            }
            if !g.description.is_empty() {
                s.push_str(&format!("  - {}", g.description));
            }
            s.push_str("\r\n");
        }
        s.push_str("\r\n  Up/Down + Enter, or a number.  r: refresh  b: reboot\r\n");
        if !self.running.is_empty() {
            s.push_str(
                "  [running]: Enter returns to it, e ends it, x resets it to a clean desktop\r\n",
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn menu(n: usize) -> Menu {
        Menu::new(
            (1..=n)
                .map(|i| Guest {
                    name: format!("g{i}"),
                    label: format!("Guest {i}"),
                    display: String::new(),
                    description: String::new(),
                })
                .collect(),
        )
    }

    #[test]
    fn running_sessions_are_marked_and_can_be_ended_or_reset() {
        let mut m = menu(3);
        // Nothing runs: e and x do nothing.
        assert_eq!(m.key(Key::End), Action::Nothing);
        assert_eq!(m.key(Key::Reset), Action::Nothing);
        m.running = vec!["g2".into()];
        let screen = m.render("s");
        assert!(screen.contains("2. Guest 2  [running]"), "{screen}");
        assert!(!screen.contains("1. Guest 1  [running]"));
        assert!(screen.contains("e ends it"));
        assert_eq!(
            m.key(Key::End),
            Action::Nothing,
            "g1 is selected and not running"
        );
        assert_eq!(m.key(Key::Down), Action::Moved);
        assert_eq!(m.key(Key::End), Action::End("g2".into()));
        assert_eq!(m.key(Key::Reset), Action::Reset("g2".into()));
        assert_eq!(m.key(Key::Enter), Action::Pick("g2".into()));
        assert_eq!(decode(b"eE"), [Key::End, Key::End]);
    }

    #[test]
    fn decodes_terminal_bytes() {
        assert_eq!(
            decode(b"\x1b[A\x1b[B\x1bOA\r\n7jkrbx\x1b[C"),
            [
                Key::Up,
                Key::Down,
                Key::Up,
                Key::Enter,
                Key::Enter,
                Key::Digit(7),
                Key::Down,
                Key::Up,
                Key::Refresh,
                Key::Reboot,
                Key::Reset,
                Key::Other
            ]
        );
        // A lone ESC (or one cut off at the end of a read) is not a cursor key.
        assert_eq!(decode(b"\x1b"), [Key::Other]);
        assert_eq!(decode(b"\x1b["), [Key::Other, Key::Other]);
    }

    #[test]
    fn arrows_wrap_and_enter_picks() {
        let mut m = menu(3);
        assert_eq!(m.key(Key::Up), Action::Moved);
        assert_eq!(m.selected, 2);
        assert_eq!(m.key(Key::Down), Action::Moved);
        assert_eq!(m.key(Key::Down), Action::Moved);
        assert_eq!(m.key(Key::Enter), Action::Pick("g2".into()));
    }

    #[test]
    fn digits_pick_directly_when_unambiguous() {
        let mut m = menu(3);
        assert_eq!(m.key(Key::Digit(3)), Action::Pick("g3".into()));
        assert_eq!(m.key(Key::Digit(4)), Action::Nothing);
        assert_eq!(m.key(Key::Digit(0)), Action::Nothing);
        let mut m = menu(12);
        assert_eq!(m.key(Key::Digit(1)), Action::Moved);
        assert_eq!(m.selected, 0);
        assert_eq!(m.key(Key::Digit(2)), Action::Pick("g12".into()));
        assert_eq!(m.key(Key::Digit(1)), Action::Moved);
        assert_eq!(m.key(Key::Enter), Action::Pick("g1".into()));
        assert_eq!(m.key(Key::Digit(5)), Action::Pick("g5".into()));
        // "1" then "9" is 19, past the end: nothing, and the buffer starts over.
        m.key(Key::Digit(1));
        assert_eq!(m.key(Key::Digit(9)), Action::Nothing);
        assert_eq!(m.key(Key::Digit(9)), Action::Pick("g9".into()));
    }

    #[test]
    fn empty_menu_and_autopick() {
        let mut m = menu(0);
        for k in [Key::Up, Key::Down, Key::Enter, Key::Digit(1)] {
            assert_eq!(m.key(k), Action::Nothing);
        }
        assert!(m.render("s").contains("no guests"));
        let m = menu(2);
        assert_eq!(m.autopick("g2"), Some("g2".into()));
        assert_eq!(m.autopick("Guest 2"), None);
        assert_eq!(menu(2).key(Key::Refresh), Action::Refresh);
        assert_eq!(menu(2).key(Key::Reboot), Action::Reboot);
    }

    #[test]
    fn render_marks_selection() {
        let mut m = menu(2);
        m.key(Key::Down);
        let s = m.render("10.0.2.2:8080");
        assert!(s.contains(">  2. Guest 2\r\n"), "{s:?}");
        assert!(s.contains("   1. Guest 1\r\n"));
        assert!(s.contains("10.0.2.2:8080"));
    }
}
