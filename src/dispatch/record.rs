//! A session's record on disk (`STATE_DIR/sessions/ID/session.json`): what a restarted
//! vdd needs to find and adopt the session's VM; replaced atomically.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{random, Error, ScreenSize};
use crate::config::Mac;

/// A session key: 128 random bits, hex.
pub(super) fn new_key() -> String {
    random::<16>().iter().map(|b| format!("{b:02x}")).collect()
}

/// What is written to disk for each session, for adoption after a crash.
/// `S` is the backend's own way to find its VM again ([`super::backend::Backend::Saved`]),
/// flattened in: for QEMU, `"pid"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Record<S> {
    pub(super) id: String,
    pub(super) seat: Mac,
    pub(super) guest: String,
    pub(super) port: u16,
    #[serde(flatten)]
    pub(super) vm: S,
    pub(super) started: u64,
    pub(super) overlay: PathBuf,
    pub(super) persist: bool,
    pub(super) memory_mib: u64,
    /// The session's key (see [`super::SessionInfo::key`]); empty in records of older vdds,
    /// whose sessions only the admin can reach.
    #[serde(default)]
    pub(super) key: String,
    /// The LAN side of an X11 guest; absent for VNC guests (and in records of older vdds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) x11: Option<X11Rec>,
    /// A warm VM: booted ahead of the picks, nobody's yet (`warm.rs`; `seat` is zero).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) warm: bool,
    /// The [`fingerprint`](super::saved::fingerprint) digest of what the VM was started
    /// for: a warm VM of another one is out of date.
    #[serde(default)]
    pub(super) fingerprint: String,
    /// The guest's screen size, when the seat reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) screen: Option<ScreenSize>,
    /// The saved state (its folder) the VM resumed from: its overlay sits on that
    /// state's frozen disk, so the state is kept while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) saved: Option<PathBuf>,
    #[serde(default)]
    pub(super) how: How,
}

/// How a session's VM started.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum How {
    #[default]
    Boot,
    Saved,
    /// Handed out of the warm pool.
    Warm,
}

impl How {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            How::Boot => "boot",
            How::Saved => "saved",
            How::Warm => "warm",
        }
    }
}

/// An X11 guest's NIC, kept so a restarted vdd restores its DHCP binding and knows its tap.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct X11Rec {
    pub(super) mac: Mac,
    pub(super) ip: Ipv4Addr,
    pub(super) tap: String,
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("bad MAC {s:?}")))
    }
}

pub(super) fn write_record<S: Serialize>(
    folder: &std::path::Path,
    rec: &Record<S>,
) -> Result<(), Error> {
    // Written to a temporary name, synced, then renamed: a crash leaves the old record
    // or the new one, never half of one.
    let tmp = folder.join("session.json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).expect("a record serializes");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // 0600: the record holds the session's key.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, folder.join("session.json"))?;
        std::fs::File::open(folder)?.sync_all()
    };
    write().map_err(|e| Error::State(folder.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let rec = Record {
            id: "0a1b2c3d4e5f".into(),
            seat: "52:54:00:00:00:01".parse().unwrap(),
            guest: "demo".into(),
            port: 5910,
            vm: super::super::qemu::Saved { pid: 42 },
            started: 1,
            overlay: "/var/lib/vdd/sessions/x/overlay.qcow2".into(),
            persist: false,
            memory_mib: 256,
            key: "00".into(),
            x11: None,
            warm: false,
            fingerprint: String::new(),
            screen: None,
            saved: None,
            how: How::Boot,
        };
        let j = serde_json::to_string(&rec).unwrap();
        assert!(j.contains("\"seat\":\"52:54:00:00:00:01\""), "{j}");
        assert!(j.contains("\"pid\":42"), "{j}");
        assert!(!j.contains("warm"), "{j}");
        let back: Record<super::super::qemu::Saved> = serde_json::from_str(&j).unwrap();
        assert_eq!((back.seat, back.vm.pid), (rec.seat, 42));
        // A record of an older vdd: a cold-booted session, no warm VM.
        let old = j.replace(",\"fingerprint\":\"\",\"how\":\"boot\"", "");
        assert!(!old.contains("how"), "{old}");
        let back: Record<super::super::qemu::Saved> = serde_json::from_str(&old).unwrap();
        assert_eq!((back.warm, back.how), (false, How::Boot));
    }
}
