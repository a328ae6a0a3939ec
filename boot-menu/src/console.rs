//! The consoles of PID 1: the serial port and the screen, raw keys in, `vdd-boot-menu:`
//! lines out (also to the kernel log, where end-to-end tests and `dmesg` find them).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use boot_menu::menu::Key;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The stable prefix end-to-end tests match on the serial console.
pub const PREFIX: &str = "vdd-boot-menu:";

/// The consoles: every terminal we draw on and read keys from, plus the kernel log.
pub struct Console {
    ttys: Vec<File>,
    kmsg: Option<File>,
}

impl Console {
    pub fn open() -> Console {
        let mut ttys = Vec::new();
        for p in ["/dev/ttyS0", "/dev/tty1"] {
            // O_NOCTTY: PID 1 must not acquire a controlling terminal by accident; a
            // serial port without hardware fails open() with EIO and is skipped.
            if let Ok(f) = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc_o_noctty())
                .open(p)
            {
                raw_mode(&f);
                ttys.push(f);
            }
        }
        let kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
        Console { ttys, kmsg }
    }

    /// The consoles for writing only (no raw mode change), for background threads.
    pub fn open_output() -> Console {
        let ttys = ["/dev/ttyS0", "/dev/tty1"]
            .iter()
            .filter_map(|p| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc_o_noctty())
                    .open(p)
                    .ok()
            })
            .collect();
        let kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
        Console { ttys, kmsg }
    }

    pub fn say(&mut self, msg: &str) {
        let line = format!("{PREFIX} {msg}\r\n");
        self.draw(&line);
        if let Some(k) = &mut self.kmsg {
            // Level 7 (debug): kept in dmesg but not echoed by the kernel to the console,
            // which already shows the line once.
            let _ = k.write_all(format!("<7>{PREFIX} {msg}\n").as_bytes());
        }
    }

    pub fn draw(&mut self, text: &str) {
        if self.ttys.is_empty() {
            print!("{}", text);
            let _ = std::io::stdout().flush();
        }
        for t in &mut self.ttys {
            let _ = t.write_all(text.as_bytes());
        }
    }

    /// Keys from any console, waiting at most `timeout`; empty on timeout.
    pub fn keys(&mut self, timeout: Duration) -> Vec<Key> {
        if self.ttys.is_empty() {
            std::thread::sleep(timeout);
            return Vec::new();
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds: Vec<PollFd> = self
            .ttys
            .iter()
            .map(|t| PollFd::new(t.as_fd(), PollFlags::POLLIN))
            .collect();
        let ready = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
        let readable: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
            .collect();
        drop(fds);
        if !matches!(ready, Ok(n) if n > 0) {
            return Vec::new();
        }
        let mut keys = Vec::new();
        for (t, r) in self.ttys.iter_mut().zip(readable) {
            if r {
                let mut buf = [0u8; 64];
                if let Ok(n) = t.read(&mut buf) {
                    keys.extend(boot_menu::menu::decode(&buf[..n]));
                }
            }
        }
        keys
    }
}

fn libc_o_noctty() -> i32 {
    nix::fcntl::OFlag::O_NOCTTY.bits()
}

/// Raw input (keys arrive one by one, no echo) but with output processing left on.
fn raw_mode(f: &File) {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, OutputFlags, SetArg};
    if let Ok(mut t) = tcgetattr(f) {
        cfmakeraw(&mut t);
        t.output_flags |= OutputFlags::OPOST;
        let _ = tcsetattr(f, SetArg::TCSANOW, &t);
    }
}

pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
