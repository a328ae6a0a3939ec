//! QEMU thin clients for end-to-end boots and the demo: started (optionally inside a lab
//! namespace, on a tap), their serial console kept in a file, markers awaited with a
//! timeout, a QMP socket for screenshots, and the process killed by its pid on Drop.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The accelerator to use: KVM only where it really runs a guest. Here `/dev/kvm` exists
/// but a vCPU never runs, so the probe boots SeaBIOS under KVM and waits at most 5 s for
/// its banner on the serial port.
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return "tcg";
        }
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "kvm",
                "-M",
                "pc",
                "-m",
                "32",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-serial", "stdio", "-no-reboot"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { return "tcg" };
        let mut out = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut seen = Vec::new();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(7).any(|w| w == b"SeaBIOS") {
                    let _ = tx.send(());
                    break;
                }
            }
        });
        let works = rx.recv_timeout(Duration::from_secs(5)).is_ok();
        let _ = child.kill();
        let _ = child.wait();
        if works {
            "kvm"
        } else {
            eprintln!("xtask: /dev/kvm does not run guests here; using TCG (slower)");
            "tcg"
        }
    })
}

/// How to start one thin client.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    /// Run inside this network namespace (the lab's server namespace, where the tap is).
    pub netns: Option<String>,
    /// Tap device for the NIC; `None` gives QEMU user networking.
    pub tap: Option<String>,
    pub mac: Option<String>,
    /// NIC model, e1000 by default (an old PC's NIC, with QEMU's iPXE ROM).
    pub nic: Option<String>,
    pub memory_mib: u32,
    /// Direct kernel boot instead of PXE.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Firmware image instead of SeaBIOS (e.g. OVMF for UEFI).
    pub firmware: Option<PathBuf>,
    /// Where the serial log and QMP socket go.
    pub dir: PathBuf,
    /// Serial console on this terminal (keys reach the guest; Ctrl-A X quits QEMU)
    /// instead of a log file.
    pub interactive: bool,
    /// QEMU's display: "none" (default), or e.g. "gtk" to watch the thin client's screen.
    pub display: Option<String>,
}

pub struct Qemu {
    child: Child,
    pub serial_log: PathBuf,
    pub qmp: PathBuf,
    started: Instant,
}

impl Qemu {
    pub fn start(o: &Opts) -> Result<Qemu> {
        std::fs::create_dir_all(&o.dir)?;
        let serial_log = o.dir.join("serial.log");
        let qmp = o.dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp);
        let mut cmd = match &o.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args(["-accel", accel(), "-M", "pc", "-no-reboot", "-vga", "std"])
            .args(["-display", o.display.as_deref().unwrap_or("none")])
            .args(["-m", &o.memory_mib.max(256).to_string()])
            .arg("-serial")
            .arg(if o.interactive {
                "mon:stdio".to_string()
            } else {
                format!("file:{}", serial_log.display())
            })
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        match &o.firmware {
            Some(fw) => {
                cmd.arg("-bios").arg(fw);
            }
            None => {
                // SeaBIOS mirrors the VGA text console (its own and the iPXE ROM's) to
                // the serial port named in fw_cfg "etc/sercon-port", as with -nographic,
                // so the serial log shows the PXE ROM while VGA stays for screenshots.
                let port = o.dir.join("sercon-port");
                std::fs::write(&port, 0x3f8u16.to_le_bytes())?;
                cmd.arg("-fw_cfg")
                    .arg(format!("name=etc/sercon-port,file={}", port.display()));
            }
        }
        let nic = o.nic.as_deref().unwrap_or("e1000");
        let mac = o
            .mac
            .as_deref()
            .map(|m| format!(",mac={m}"))
            .unwrap_or_default();
        match &o.tap {
            Some(tap) => cmd
                .arg("-netdev")
                .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no")),
            None => cmd.args(["-netdev", "user,id=n0"]),
        };
        // `mac` goes before any `romfile=` the model string may carry; both are properties.
        cmd.arg("-device").arg(format!("{nic},netdev=n0{mac}"));
        match &o.kernel {
            Some(k) => {
                cmd.arg("-kernel").arg(k);
                if let Some(i) = &o.initrd {
                    cmd.arg("-initrd").arg(i);
                }
                if let Some(a) = &o.append {
                    cmd.arg("-append").arg(a);
                }
            }
            None => {
                cmd.args(["-boot", "n"]);
            }
        }
        let stderr = std::fs::File::create(o.dir.join("qemu.stderr"))?;
        if o.interactive {
            cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit());
        } else {
            cmd.stdin(Stdio::null()).stdout(Stdio::null());
        }
        let child = cmd
            .stderr(stderr)
            .spawn()
            .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86 ipxe-qemu)")?;
        Ok(Qemu {
            child,
            serial_log,
            qmp,
            started: Instant::now(),
        })
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until QEMU exits (the interactive demo: the user quits with Ctrl-A X).
    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.child.wait()?)
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `marker` appears on the serial console; returns the time since start.
    /// Fails when QEMU exits or `timeout` passes, quoting the console's tail.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial().contains(marker) {
                return Ok(self.started.elapsed());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "QEMU exited ({st}) before {marker:?}; console tail:\n{}",
                    tail(&self.serial(), 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {marker:?} on the serial console after {timeout:?}; console tail:\n{}",
                    tail(&self.serial(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Prints the serial console to stdout as it grows, until `marker` or `timeout`.
    pub fn follow(&mut self, until: Option<&str>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut shown = 0usize;
        loop {
            let s = self.serial();
            if s.len() > shown {
                print!("{}", &s[shown..]);
                shown = s.len();
            }
            if until.is_some_and(|m| s.contains(m)) {
                return Ok(());
            }
            if self.child.try_wait()?.is_some() || Instant::now() > deadline {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one QMP command (after the capabilities handshake) and returns its reply line.
    pub fn qmp(&self, command: &str) -> Result<String> {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let s = UnixStream::connect(&self.qmp).context("connecting to QMP")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?; // greeting
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        line.clear();
        r.read_line(&mut line)?;
        w.write_all(command.as_bytes())?;
        w.write_all(b"\n")?;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("QMP closed");
            }
            // Skip asynchronous events; the reply has "return" or "error".
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return Ok(line);
            }
        }
    }

    /// Types `text` on the VM's keyboard (QMP send-key): lower-case letters, digits,
    /// space and `\n` (Return).
    pub fn type_text(&self, text: &str) -> Result<()> {
        for c in text.chars() {
            let key = match c {
                'a'..='z' | '0'..='9' => c.to_string(),
                ' ' => "spc".into(),
                '\n' => "ret".into(),
                other => bail!("cannot type {other:?}"),
            };
            let reply = self.qmp(&format!(
                "{{\"execute\":\"send-key\",\"arguments\":{{\"keys\":[{{\"type\":\"qcode\",\"data\":\"{key}\"}}]}}}}"
            ))?;
            if reply.contains("\"error\"") {
                bail!("send-key {key}: {reply}");
            }
            // A key press per 50 ms: a guest under TCG must not miss one.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Saves a screenshot of the VGA screen (PPM, or PNG where QEMU supports it).
    pub fn screendump(&self, path: &Path) -> Result<()> {
        // PNG when the name says so (QEMU 7.1+), PPM otherwise.
        let format = if path.extension().is_some_and(|e| e == "png") {
            ",\"format\":\"png\""
        } else {
            ""
        };
        let reply = self.qmp(&format!(
            "{{\"execute\":\"screendump\",\"arguments\":{{\"filename\":\"{}\"{format}}}}}",
            path.display()
        ))?;
        if reply.contains("\"error\"") {
            bail!("screendump failed: {reply}");
        }
        Ok(())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
