//! The libvirt backend's calls to a host: each on a blocking thread with a time limit,
//! and a session's start there (its overlay volume, then its domain).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::domxml::{self, Meta, Screen};
use super::hosts::Host;
use super::{Libvirt, Saved, Vm};
use crate::config::AccelChoice;
use crate::dispatch::backend::OneTime;
use crate::dispatch::qemu::{VmDisplay, VmSpec};
use crate::dispatch::Error;

/// Runs `f` on `host`'s connection on a blocking thread, for at most `limit`.
pub(super) async fn call<T: Send + 'static>(
    host: &Arc<Host>,
    what: &str,
    limit: Duration,
    f: impl FnOnce(&virt::connect::Connect) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let h = host.clone();
    let name = host.cfg.name.clone();
    let what2 = what.to_string();
    let job = tokio::task::spawn_blocking(move || {
        let c = h.conn().map_err(|source| Error::Host {
            host: h.cfg.name.clone(),
            what: format!("connecting to {}", h.cfg.uri),
            source,
        })?;
        f(&c.0)
    });
    match tokio::time::timeout(limit, job).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(Error::HostDown {
            host: name,
            what: format!("{what2}: {e}"),
        }),
        Err(_) => Err(Error::HostDown {
            host: name,
            what: format!("{what2}: no answer within {} s", limit.as_secs()),
        }),
    }
}

/// Maps a libvirt error of `host` to the dispatcher's.
pub(super) fn on(host: &Host, what: &str) -> impl FnOnce(virt::error::Error) -> Error {
    let host = host.cfg.name.clone();
    let what = what.to_string();
    move |source| Error::Host { host, what, source }
}

impl Libvirt {
    /// Creates the overlay (unless a kept one is there) and the domain on host `i`.
    pub(super) async fn create(
        &self,
        i: usize,
        spec: &VmSpec,
        volume: &str,
        kvm: bool,
        password: Option<OneTime>,
    ) -> Result<(Vm, Saved), Error> {
        let host = &self.hosts[i];
        let cfg = host.cfg.clone();
        let base_file = spec
            .guest
            .image
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = match self.accel {
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "qemu",
            AccelChoice::Auto if kvm => "kvm",
            AccelChoice::Auto => "qemu",
        };
        let screen = match &spec.display {
            VmDisplay::Vnc { port, .. } => Screen::Vnc {
                listen: cfg.address,
                port: *port,
                valid_to: domxml::valid_to(
                    SystemTime::now(),
                    password
                        .as_ref()
                        .map_or(1, |p| p.valid_for.as_secs().max(1)),
                ),
                password: password.map(|p| p.password).unwrap_or_default(),
                nat: spec.guest.nat,
            },
            VmDisplay::Lan { mac, .. } => Screen::Lan {
                bridge: cfg.bridge.clone().unwrap_or_default(),
                mac: *mac,
                tap: crate::lan::tap_name(&spec.session),
                nwfilter: cfg.nwfilter.clone(),
            },
        };
        let meta = Meta {
            id: spec.session.clone(),
            owner: self.owner.clone(),
            guest: spec.guest.name.clone(),
        };
        let name = format!("vdd-{}", spec.session);
        let keep = spec.guest.persist;
        let (memory_mib, cpus) = (spec.guest.memory_mib, spec.guest.cpus);
        let guest = spec.guest.name.clone();
        let vol = volume.to_string();
        let h = host.clone();
        let (domain, uuid) = call(
            host,
            "starting the VM",
            Duration::from_secs(120),
            move |c| {
                let pool = StoragePool::lookup_by_name(c, &cfg.pool)
                    .map_err(on(&h, &format!("storage pool {:?}", cfg.pool)))?;
                // Base images copied into the pool's folder since libvirt last looked.
                let _ = pool.refresh(0);
                let base = StorageVol::lookup_by_name(&pool, &base_file).map_err(|_| {
                    Error::MissingImage {
                        guest: guest.clone(),
                        path: PathBuf::from(format!("{}:{}/{base_file}", cfg.name, cfg.pool)),
                    }
                })?;
                let xml = base
                    .get_xml_desc(0)
                    .map_err(on(&h, "reading the base image's volume"))?;
                let (base_path, format) =
                    domxml::volume_target(&xml).ok_or_else(|| Error::ToolFailed {
                        tool: format!("libvirt on {}", cfg.name),
                        said: format!("no path or format in the volume XML of {base_file}"),
                    })?;
                let volume = vol;
                let made = match StorageVol::lookup_by_name(&pool, &volume) {
                    Ok(_) if keep => false,
                    found => {
                        if let Ok(old) = found {
                            // A leftover of a session that had this id: never reuse its disk.
                            let _ = old.delete(0);
                        }
                        StorageVol::create_xml(
                            &pool,
                            &domxml::overlay_volume(&volume, &base_path, &format),
                            0,
                        )
                        .map_err(on(&h, "creating the session's overlay"))?;
                        true
                    }
                };
                let xml = domxml::domain(&domxml::Domain {
                    name: &name,
                    meta: &meta,
                    kind,
                    memory_mib,
                    cpus,
                    pool: &cfg.pool,
                    volume: &volume,
                    screen: &screen,
                });
                match Domain::create_xml(c, &xml, 0) {
                    Ok(d) => {
                        let uuid = d
                            .get_uuid_string()
                            .map_err(on(&h, "reading the VM's UUID"))?;
                        Ok((name, uuid))
                    }
                    Err(e) => {
                        if made {
                            if let Ok(v) = StorageVol::lookup_by_name(&pool, &volume) {
                                let _ = v.delete(0);
                            }
                        }
                        Err(on(&h, "starting the VM")(e))
                    }
                }
            },
        )
        .await?;
        let saved = Saved {
            host: host.cfg.name.clone(),
            domain: domain.clone(),
            uuid: uuid.clone(),
            volume: volume.to_string(),
        };
        let vm = Vm {
            host: i,
            domain,
            uuid,
            since: Instant::now(),
        };
        Ok((vm, saved))
    }
}
