//! QEMU thin clients for end-to-end boots and the demo: started (optionally inside a lab
//! namespace, on a tap), their serial console kept in a file, markers awaited with a
//! timeout, a QMP socket for screenshots, and the process killed by its pid on Drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The accelerator to use: KVM only where it really runs a guest (the probe in
/// `qemu_ctl::accel`, at most 5 s, asked once).
pub fn accel() -> &'static str {
    let a = qemu_ctl::accel::detect("qemu-system-x86_64", Duration::from_secs(5));
    static SAID: std::sync::Once = std::sync::Once::new();
    if a == qemu_ctl::accel::Accel::Tcg {
        SAID.call_once(|| {
            eprintln!("xtask: /dev/kvm does not run guests here; using TCG (slower)")
        });
    }
    a.as_str()
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
        // The thin client's monitor: a 1920x1080 LCD, as its EDID tells boot-menu and X.
        cmd.args(["-accel", accel(), "-M", "pc", "-no-reboot", "-vga", "none"])
            .args(["-device", "VGA,edid=on,xres=1920,yres=1080"])
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

    /// True while QEMU has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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

    /// Runs one QMP command on the thin client's QMP socket and returns its `return`.
    pub fn qmp(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        qemu_ctl::qmp::execute_once(&self.qmp, command, arguments, Duration::from_secs(30))
            .with_context(|| format!("QMP {command}"))
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
            self.qmp(
                "send-key",
                Some(serde_json::json!({"keys": [{"type": "qcode", "data": key}]})),
            )?;
            // A key press per 50 ms: a guest under TCG must not miss one.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Saves a screenshot of the VGA screen (PPM, or PNG where QEMU supports it).
    pub fn screendump(&self, path: &Path) -> Result<()> {
        let mut args = serde_json::json!({ "filename": path });
        // PNG when the name says so (QEMU 7.1+), PPM otherwise.
        if path.extension().is_some_and(|e| e == "png") {
            args["format"] = "png".into();
        }
        self.qmp("screendump", Some(args))?;
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
