//! A real browser for the panel's tests: Debian's headless Chromium behind its WebDriver
//! (`chromedriver`), both inside a lab namespace so they reach the lab's vdd, driven
//! with `fantoccini` from a thread that entered the same namespace.
//!
//! chromedriver runs in a process group of its own; Drop ends the group (chromedriver and
//! every Chromium process it started) by that group's id, and removes the profile.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// The Chromium Debian installs, and its WebDriver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "chromedriver";

/// chromedriver in a lab namespace.
pub struct Driver {
    child: Child,
    pub port: u16,
    profile: PathBuf,
}

impl Driver {
    /// Starts chromedriver in namespace `ns` on a free port; Chromium's profile (a
    /// fresh `--user-data-dir`) goes under `work`.
    pub fn start(ns: &str, work: &Path) -> Result<Driver> {
        use std::os::unix::process::CommandExt;
        let port = 9515 + (std::process::id() % 400) as u16;
        let profile = work.join("chromium-profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let log = std::fs::File::create(work.join("chromedriver.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, CHROMEDRIVER])
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting chromedriver (Debian's chromium-driver)")?;
        let d = Driver {
            child,
            port,
            profile,
        };
        // Up when its port answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("ip")
                .args(["netns", "exec", ns, "curl", "-sf", "-m", "2"])
                .arg(format!("http://127.0.0.1:{port}/status"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!(
                    "chromedriver did not answer on port {port}: {}",
                    std::fs::read_to_string(work.join("chromedriver.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A new browser session: headless Chromium with the flags a test machine needs (no
    /// sandbox as root, no GPU, nothing fetched from anywhere by itself).
    pub async fn connect(&self, width: u32, height: u32) -> Result<Client> {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", self.profile.display()),
                ],
            },
        });
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object"),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let c = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .context("a WebDriver session with Chromium")?;
        Ok(c)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium processes it started.
        let pg = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Waits until `f` gives `Some`, polling every `every`, for at most `limit`.
pub async fn until<T, F, Fut>(what: &str, limit: Duration, every: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs `script` in the page (a function body; `arguments` are `args`) and returns its
/// value.
pub async fn js(
    c: &Client,
    script: &str,
    args: Vec<serde_json::Value>,
) -> Result<serde_json::Value> {
    c.execute(script, args)
        .await
        .with_context(|| format!("running in the page: {script}"))
}

/// Runs an asynchronous `script` (it calls `arguments[arguments.length - 1](value)`).
pub async fn js_async(c: &Client, script: &str) -> Result<serde_json::Value> {
    c.execute_async(script, vec![])
        .await
        .with_context(|| format!("running in the page: {script}"))
}

/// Whether an element matching `css` exists now.
pub async fn exists(c: &Client, css: &str) -> Result<bool> {
    Ok(!c.find_all(Locator::Css(css)).await?.is_empty())
}

/// A PNG of the page as the browser shows it, saved at `path`.
pub async fn screenshot(c: &Client, path: &Path) -> Result<()> {
    let png = c.screenshot().await.context("a screenshot of the page")?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}
