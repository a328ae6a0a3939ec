//! The libvirt backend: each session's VM is a transient libvirt domain on one of the
//! `[[dispatch.host]]` hypervisor hosts, from XML vdd writes (`domxml.rs`): the guest's
//! base image (a volume of the host's storage pool, by file name) under a qcow2 overlay
//! volume of the session; VNC on the host's LAN address behind a one-time password that
//! expires (`passwd`, `passwdValidTo`, replaced with `virDomainUpdateDeviceFlags`), or for
//! an X11 guest a NIC on the host's LAN bridge with the MAC vdd reserved in its DHCP.
//! vdd's session id and owner id are in the domain's `<metadata>`, so a restarted vdd
//! adopts its domains on every host and sweeps what it has no session for (`hosts.rs`).
//!
//! Placement (`placement.rs`) picks the host; the hosts' watchers tell when one stopped
//! answering, and then its sessions fail with that reason ([`Backend::lost`]).
//! A seat's kept disk (`persist = true`) lives on the host where it was made; the host's
//! name is kept beside the session's overlay path (`OVERLAY.host`), and the seat's later
//! sessions go to that host.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

mod connect;
mod create;
mod domxml;
mod hosts;
mod place;

use super::backend::{HostStatus, OneTime};
use super::placement::{self, HostView, Want};
use super::qemu::{VmDisplay, VmSpec};
use super::{Backend, Error};
use crate::config::{AccelChoice, Mac, Placement};
use create::{call, on};
use hosts::Host;
use place::marker;

/// The libvirt backend over `[[dispatch.host]]`.
pub struct Libvirt {
    hosts: Vec<Arc<Host>>,
    owner: String,
    policy: Placement,
    accel: AccelChoice,
    /// VMs placed but not yet seen in their host's answers: they count at once.
    starting: Mutex<Vec<Starting>>,
    /// Overlays being deleted (host, volume): a start that reuses the name waits.
    deleting: Arc<Mutex<Vec<(usize, String)>>>,
}

struct Starting {
    host: usize,
    domain: String,
    mib: u64,
    cpus: u32,
    /// When its start returned (`None`: still starting).
    done: Option<Instant>,
}

/// A running VM: its host and domain.
#[derive(Debug)]
pub struct Vm {
    host: usize,
    domain: String,
    uuid: String,
    /// When vdd started or adopted it: only a host's answer after this says it is gone.
    since: Instant,
}

/// What talks to a VM without the dispatcher's lock.
#[derive(Clone)]
pub struct Control {
    host: Arc<Host>,
    domain: String,
}

/// What a session's record keeps: the host (by name), the domain and its overlay volume.
/// Flattened into the record, so the names differ from the record's own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Saved {
    pub host: String,
    pub domain: String,
    pub uuid: String,
    pub volume: String,
}

impl Libvirt {
    fn host_index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.cfg.name == name)
    }
}

impl Backend for Libvirt {
    type Vm = Vm;
    type Control = Control;
    type Saved = Saved;

    fn describe(&self) -> String {
        let names: Vec<&str> = self.hosts.iter().map(|h| h.cfg.name.as_str()).collect();
        format!("libvirt on {}", names.join(", "))
    }

    async fn start(&self, spec: VmSpec, password: Option<OneTime>) -> Result<(Vm, Saved), Error> {
        // No saved states here (the config refuses `start = "saved"` with hosts): a
        // restore is refused the way a state that does not load is, and the dispatcher
        // boots the guest instead.
        if let Some(r) = &spec.restore {
            return Err(Error::Restore(
                r.state.clone(),
                "the libvirt backend keeps no saved states".into(),
            ));
        }
        let want = Want {
            label: &spec.guest.label,
            mib: spec.guest.memory_mib,
            cpus: spec.guest.cpus,
            bridge: matches!(spec.display, VmDisplay::Lan { .. }),
        };
        let pinned = if spec.guest.persist {
            self.kept_on(&spec.overlay)?
        } else {
            None
        };
        let domain = format!("vdd-{}", spec.session);
        let (i, kvm) = {
            let mut starting = self.starting.lock().expect("starting lock");
            let views = self.views(&mut starting);
            let only: Vec<HostView<'_>>;
            let (pool, offset): (&[HostView<'_>], usize) = match pinned {
                Some(p) => {
                    only = vec![views[p].0.clone()];
                    (&only, p)
                }
                None => {
                    only = views.iter().map(|v| v.0.clone()).collect();
                    (&only, 0)
                }
            };
            let i = match placement::place(pool, &want, self.policy) {
                Ok(i) => i + offset,
                Err(why) if pinned.is_some() => {
                    return Err(Error::Full(format!(
                        "this seat's kept disk is on one host, and {why}"
                    )))
                }
                Err(why) => return Err(Error::Full(why)),
            };
            starting.push(Starting {
                host: i,
                domain: domain.clone(),
                mib: want.mib,
                cpus: want.cpus,
                done: None,
            });
            (i, views[i].1)
        };
        let volume = if spec.guest.persist {
            let stem = spec
                .overlay
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.hosts[i].volume_name(&format!("{}-{stem}", spec.guest.name), true)
        } else {
            self.hosts[i].volume_name(&spec.session, false)
        };
        self.wait_deleted(i, &volume).await;
        let r = self.create(i, &spec, &volume, kvm, password).await;
        {
            let mut starting = self.starting.lock().expect("starting lock");
            match &r {
                Ok(_) => {
                    for s in starting.iter_mut().filter(|s| s.domain == domain) {
                        s.done = Some(Instant::now());
                    }
                }
                Err(_) => starting.retain(|s| s.domain != domain),
            }
        }
        if r.is_ok() && spec.guest.persist && pinned.is_none() {
            let m = marker(&spec.overlay);
            if let Some(d) = m.parent() {
                super::qemu::private_dir(d)?;
            }
            std::fs::write(&m, format!("{}\n", self.hosts[i].cfg.name))
                .map_err(|e| Error::State(m.clone(), e))?;
        }
        if r.is_ok() {
            info!(session = %spec.session, host = %self.hosts[i].cfg.name, guest = %spec.guest.name, volume = %volume, "VM placed on hypervisor host");
        }
        r
    }

    fn adopt(&self, _dir: &Path, session: &str, saved: &Saved) -> Option<Vm> {
        let i = self.host_index(&saved.host)?;
        let snap = self.hosts[i].snapshot();
        let d = snap.domains.get(&saved.domain)?;
        let ours = d
            .meta
            .as_ref()
            .is_some_and(|m| m.id == session && m.owner == self.owner);
        (ours && d.uuid == saved.uuid).then(|| Vm {
            host: i,
            domain: saved.domain.clone(),
            uuid: saved.uuid.clone(),
            since: Instant::now(),
        })
    }

    async fn stop_strays(&self, _dir: &Path, session: &str) -> usize {
        let mut n = 0;
        for h in &self.hosts {
            if !h.snapshot().up(Instant::now()) {
                continue;
            }
            let name = format!("vdd-{session}");
            let owner = self.owner.clone();
            let volume = h.volume_name(session, false);
            let pool = h.cfg.pool.clone();
            let r = call(
                h,
                "stopping a VM without a record",
                Duration::from_secs(30),
                move |c| {
                    let mut stopped = 0;
                    if let Ok(d) = Domain::lookup_by_name(c, &name) {
                        let meta = hosts::meta_of(&d);
                        if meta.is_some_and(|m| m.owner == owner) && d.destroy().is_ok() {
                            stopped += 1;
                        }
                    }
                    if let Ok(p) = StoragePool::lookup_by_name(c, &pool) {
                        if let Ok(v) = StorageVol::lookup_by_name(&p, &volume) {
                            let _ = v.delete(0);
                        }
                    }
                    Ok(stopped)
                },
            )
            .await;
            n += r.unwrap_or(0);
        }
        n
    }

    /// ACPI shutdown, then after `grace` destroy (QEMU's `quit`; a transient domain is
    /// gone with it).
    async fn stop(&self, vm: &mut Vm, grace: Duration) {
        let host = &self.hosts[vm.host];
        let uuid = vm.uuid.clone();
        let h = host.clone();
        let r = call(
            host,
            "stopping the VM",
            grace + Duration::from_secs(15),
            move |c| {
                let Ok(d) = Domain::lookup_by_uuid_string(c, &uuid) else {
                    return Ok(());
                };
                let _ = d.shutdown();
                let end = Instant::now() + grace;
                while Instant::now() < end {
                    if !d.is_active().unwrap_or(false) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                match d.destroy() {
                    Ok(()) => Ok(()),
                    Err(_) if !d.is_active().unwrap_or(false) => Ok(()),
                    Err(e) => Err(on(&h, "destroying the VM")(e)),
                }
            },
        )
        .await;
        match r {
            // Gone now: its memory and vCPUs are free for the next placement at once.
            Ok(()) => {
                host.forget(&vm.domain);
                self.starting
                    .lock()
                    .expect("starting lock")
                    .retain(|s| s.domain != vm.domain);
            }
            Err(e) => {
                warn!(host = %host.cfg.name, domain = %vm.domain, "{}; the host's next answer sweeps it", super::report(&e))
            }
        }
    }

    fn control(&self, vm: &Vm) -> Control {
        Control {
            host: self.hosts[vm.host].clone(),
            domain: vm.domain.clone(),
        }
    }

    async fn set_password(&self, vm: Control, password: OneTime) -> Result<(), Error> {
        on_domain(
            vm,
            "setting the VNC password",
            Duration::from_secs(15),
            move |d, vm| {
                let xml = d
                    .get_xml_desc(0)
                    .map_err(on(&vm.host, "reading the VM's XML"))?;
                let (listen, port) =
                    domxml::vnc_display(&xml).ok_or_else(|| Error::ToolFailed {
                        tool: format!("libvirt on {}", vm.host.cfg.name),
                        said: "the VM has no VNC display".into(),
                    })?;
                let valid_to =
                    domxml::valid_to(SystemTime::now(), password.valid_for.as_secs().max(1));
                let g = domxml::vnc_password(listen, port, &password.password, &valid_to);
                d.update_device_flags(&g, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
                    .map_err(on(&vm.host, "setting the VNC password"))?;
                Ok(())
            },
        )
        .await
    }

    /// QEMU's `query-vnc` through libvirt (libvirt marks the domain "custom-monitor"
    /// tainted for it; the query changes nothing): libvirt has no call that counts a
    /// display's clients, and its graphics events would miss those connected before a
    /// restart of vdd.
    async fn has_viewer(&self, vm: Control) -> bool {
        on_domain(
            vm,
            "asking for VNC viewers",
            Duration::from_secs(5),
            move |d, vm| {
                let out = d
                    .qemu_monitor_command(r#"{"execute":"query-vnc"}"#, 0)
                    .map_err(on(&vm.host, "query-vnc"))?;
                let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                Ok(v["return"]["clients"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty()))
            },
        )
        .await
        .unwrap_or(false)
    }

    fn exited(&self, vm: &mut Vm) -> bool {
        let s = self.hosts[vm.host].snapshot();
        s.at.is_some_and(|t| t > vm.since) && !s.domains.contains_key(&vm.domain)
    }

    async fn prepare_lan(&self, _adopted: &[(String, Mac)]) -> Result<(), Error> {
        // X11 guests' NICs are on the hosts' bridges: nothing on vdd's machine.
        Ok(())
    }

    fn release_lan(&self, _tap: &str, _mac: Mac) -> Result<(), Error> {
        Ok(())
    }

    fn display_addr(&self, saved: &Saved) -> Option<std::net::Ipv4Addr> {
        self.host_index(&saved.host)
            .map(|i| self.hosts[i].cfg.address)
    }

    fn lost(&self, vm: &Vm) -> Option<String> {
        let h = &self.hosts[vm.host];
        h.snapshot().down(Instant::now()).map(|why| {
            format!(
                "hypervisor host {} ({}) stopped answering ({why}); the VM there is out of reach",
                h.cfg.name, h.cfg.uri
            )
        })
    }

    /// Deletes the overlay volume on its host, in the background (the dispatcher may hold
    /// its lock); a start that reuses the name waits for it. A host that does not answer
    /// keeps it until its next answer's sweep (a kept disk: until the admin deletes it).
    fn remove_overlay(&self, saved: &Saved, overlay: &Path) {
        let _ = std::fs::remove_file(marker(overlay));
        let Some(i) = self.host_index(&saved.host) else {
            return;
        };
        let host = self.hosts[i].clone();
        let volume = saved.volume.clone();
        self.deleting
            .lock()
            .expect("deleting lock")
            .push((i, volume.clone()));
        let deleting = self.deleting.clone();
        let job = move || {
            let r = host.conn().and_then(|c| {
                let pool = StoragePool::lookup_by_name(&c.0, &host.cfg.pool)?;
                match StorageVol::lookup_by_name(&pool, &volume) {
                    Ok(v) => v.delete(0),
                    Err(_) => Ok(()),
                }
            });
            if let Err(e) = r {
                warn!(host = %host.cfg.name, volume = %volume, "deleting the session's overlay: {e}");
            }
            deleting
                .lock()
                .expect("deleting lock")
                .retain(|(h, v)| !(*h == i && *v == volume));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(job);
            }
            Err(_) => job(),
        }
    }

    fn capacity_mib(&self) -> Option<u64> {
        Some(self.hosts.iter().map(|h| h.cfg.memory_mib).sum())
    }

    fn hosts(&self) -> Vec<HostStatus> {
        let now = Instant::now();
        self.hosts
            .iter()
            .map(|h| {
                let s = h.snapshot();
                let ours: Vec<_> = s
                    .domains
                    .values()
                    .filter(|d| d.meta.as_ref().is_some_and(|m| m.owner == self.owner))
                    .collect();
                HostStatus {
                    name: h.cfg.name.clone(),
                    up: s.up(now),
                    error: s
                        .down(now)
                        .or_else(|| s.failing.as_ref().map(|f| f.1.clone())),
                    vms: ours.len(),
                    memory_mib: ours.iter().map(|d| d.mib).sum(),
                    memory_limit_mib: h.cfg.memory_mib,
                    cpu_busy: (s.cpu_busy * 100.0).round() / 100.0,
                }
            })
            .collect()
    }
}

/// [`call`] on a session's domain, found by its name on its host.
async fn on_domain<T: Send + 'static>(
    vm: Control,
    what: &str,
    limit: Duration,
    f: impl FnOnce(&Domain, &Control) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let host = vm.host.clone();
    call(&host, what, limit, move |c| {
        let d = Domain::lookup_by_name(c, &vm.domain).map_err(on(&vm.host, "finding the VM"))?;
        f(&d, &vm)
    })
    .await
}
