//! A Xen qube's disks served by our own blkif backend (`QUBES_XEN_DISKS=blkif`):
//!
//! ```text
//!   hv.start (xl create -p, no disk lines) -> domid
//!   attach: per volume add_device (backend/qubes-vbd/DOMID/DEVID) + BlkifDevice::start (2)
//!           one pump thread per qube feeds the xenstore watches to the devices
//!   hv.unpause -> blkfront connects (4), the device's ring thread serves the volume
//!   detach (shutdown/kill/reap): stop the pump, each device 5 -> 6, remove the nodes
//! ```
//!
//! Each qube has its own xenstore handle, so its watch queue holds only its devices'
//! events. Generic over the store and the connector so the sequencing is tested against
//! blkback's `MemStore` without Xen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blkback::blkif::xenbus::{
    self, BlkifDevice, Connector, DeviceInfo, DevicePaths, Outcome, XenStore,
};

/// The backend domain: the daemon runs in dom0.
const BACKEND_DOMID: u32 = 0;

/// One disk to attach.
pub struct Disk<C> {
    /// `xvda`, `xvdb`, ...
    pub vdev: String,
    pub read_only: bool,
    /// Shown in the backend's `params` node (which volume this is).
    pub params: String,
    pub info: DeviceInfo,
    pub connector: C,
}

/// The xenbus device id of `xvdX` (`(202 << 8) | (disk << 4)`, as libxl computes it).
pub fn xvd_devid(vdev: &str) -> Option<u32> {
    let rest = vdev.strip_prefix("xvd")?;
    let mut c = rest.chars();
    let (Some(l @ 'a'..='p'), None) = (c.next(), c.next()) else {
        return None;
    };
    Some((202 << 8) | ((l as u32 - 'a' as u32) << 4))
}

type Devices<X, C> = Vec<Option<BlkifDevice<Arc<X>, C>>>;

/// The served disks of one domain.
pub struct XenDisks<X: XenStore + 'static, C: Connector + 'static> {
    xs: Arc<X>,
    pub domid: u32,
    paths: Vec<DevicePaths>,
    watches: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
    pump: Option<JoinHandle<Devices<X, C>>>,
}

impl<X: XenStore + 'static, C: Connector + 'static> XenDisks<X, C>
where
    C::Running: 'static,
{
    /// Writes the vbd nodes of every disk, puts each backend in InitWait and starts the
    /// pump. The domain must exist (paused); unpause it after this returns. On error,
    /// whatever was written is removed again.
    pub fn attach(xs: Arc<X>, domid: u32, disks: Vec<Disk<C>>) -> Result<Self> {
        Self::open(xs, domid, disks, false)
    }

    /// Takes over the disks of a running domain that an earlier daemon served (it was
    /// killed or stopped): the backend nodes it wrote are still there, each device
    /// resumes from its published state ([`BlkifDevice::resume`]: a connected ring is
    /// mapped again and its unanswered requests served). Nothing is rewritten; on error
    /// the nodes are left for the domain's shutdown to remove.
    pub fn reattach(xs: Arc<X>, domid: u32, disks: Vec<Disk<C>>) -> Result<Self> {
        Self::open(xs, domid, disks, true)
    }

    fn open(xs: Arc<X>, domid: u32, disks: Vec<Disk<C>>, resume: bool) -> Result<Self> {
        let mut this = XenDisks {
            xs: xs.clone(),
            domid,
            paths: Vec::new(),
            watches: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            pump: None,
        };
        let mut devices = Vec::new();
        if let Err(e) = this.add_all(disks, &mut devices, resume) {
            if resume {
                // Not ours to remove: the guest may still use them once a daemon can.
                this.paths.clear();
            }
            let _ = this.close(devices, !resume);
            return Err(e);
        }
        let stop = this.stop.clone();
        let pump = std::thread::Builder::new()
            .name(format!("blkif-pump-{domid}"))
            .spawn(move || pump(xs, domid, devices, stop))
            .context("starting the xenstore watch thread")?;
        this.pump = Some(pump);
        Ok(this)
    }

    fn add_all(
        &mut self,
        disks: Vec<Disk<C>>,
        devices: &mut Devices<X, C>,
        resume: bool,
    ) -> Result<()> {
        let (xs, domid) = (self.xs.clone(), self.domid);
        for (i, d) in disks.into_iter().enumerate() {
            let devid = xvd_devid(&d.vdev)
                .ok_or_else(|| anyhow!("disk {:?} is not an xvd[a-p] name", d.vdev))?;
            let paths = if resume {
                let paths = xenbus::device_paths(BACKEND_DOMID, domid, devid);
                if xs.read(&format!("{}/state", paths.backend))?.is_none() {
                    bail!(
                        "domain {domid} has no blkif backend {} for {}: it was not started with the blkif disks (QUBES_XEN_DISKS=nbd?); shut it down and start it again",
                        paths.backend,
                        d.vdev
                    );
                }
                paths
            } else {
                xenbus::add_device(
                    &*xs,
                    BACKEND_DOMID,
                    domid,
                    devid,
                    &d.vdev,
                    d.read_only,
                    &d.params,
                )
                .with_context(|| {
                    format!("writing the xenstore nodes of {} (domain {domid})", d.vdev)
                })?
            };
            self.paths.push(paths.clone());
            let mut dev = BlkifDevice::new(xs.clone(), &paths.backend, d.info, d.connector)
                .with_context(|| format!("opening backend {}", paths.backend))?;
            let token = format!("qubes-blkif/{domid}/{i}");
            for p in dev.watch_paths() {
                xs.watch(&p, &token)
                    .with_context(|| format!("watching {p}"))?;
                self.watches.push((p, token.clone()));
            }
            if resume {
                dev.resume()
                    .with_context(|| format!("resuming backend {}", paths.backend))?;
            } else {
                dev.start()
                    .with_context(|| format!("starting backend {}", paths.backend))?;
            }
            devices.push(Some(dev));
        }
        Ok(())
    }

    /// Stops serving: each device still open goes Closing then Closed (its ring thread
    /// stopped and the volume flushed in between), then its nodes are removed.
    pub fn detach(mut self) -> Result<()> {
        let devices = self.stop_pump();
        self.close(devices, true)
    }

    fn close(&mut self, devices: Devices<X, C>, shut: bool) -> Result<()> {
        let mut first_err = None;
        for mut dev in devices.into_iter().flatten() {
            if !shut {
                continue;
            }
            if let Err(e) = dev.shutdown() {
                // The domain's nodes may be gone already; the nodes are removed anyway.
                tracing::warn!(backend = dev.backend, "closing blkif device: {e}");
            }
        }
        for (p, t) in std::mem::take(&mut self.watches) {
            let _ = self.xs.unwatch(&p, &t);
        }
        for paths in std::mem::take(&mut self.paths) {
            if let Err(e) = xenbus::remove_device(&*self.xs, &paths) {
                first_err.get_or_insert(
                    anyhow!(e).context(format!("removing xenstore nodes {}", paths.backend)),
                );
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn stop_pump(&mut self) -> Devices<X, C> {
        self.stop.store(true, Ordering::Release);
        match self.pump.take().map(|p| p.join()) {
            Some(Ok(devices)) => devices,
            _ => Vec::new(),
        }
    }
}

impl<X: XenStore + 'static, C: Connector + 'static> Drop for XenDisks<X, C> {
    /// Without [`Self::detach`] (daemon exit, a failed start): the ring threads stop and
    /// the volumes are flushed (the devices' own drop), the nodes are left as they are.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
    }
}

/// Feeds every watch event to its device until `stop`; returns the devices still open.
fn pump<X: XenStore, C: Connector>(
    xs: Arc<X>,
    domid: u32,
    mut devices: Devices<X, C>,
    stop: Arc<AtomicBool>,
) -> Devices<X, C> {
    let prefix = format!("qubes-blkif/{domid}/");
    while !stop.load(Ordering::Acquire) {
        let (_, token) = match xs.next_watch(Duration::from_millis(200)) {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(domid, "reading xenstore watches: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let Some(i) = token
            .strip_prefix(&prefix)
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(slot) = devices.get_mut(i) else {
            continue;
        };
        let Some(dev) = slot.as_mut() else { continue };
        match dev.on_change() {
            Ok(Outcome::Alive) => {}
            Ok(Outcome::Gone) => {
                tracing::info!(backend = dev.backend, "blkif device closed");
                *slot = None;
            }
            Err(e) => tracing::warn!(backend = dev.backend, "blkif device: {e}"),
        }
    }
    devices
}

/// The real thing: libxenstore, gntdev and the pool volumes; with the guest agent's
/// console ([`crate::xen_agent`]), which shares the disks' life (written while the
/// domain is paused, closed with them).
pub struct RealXenDisks {
    disks: XenDisks<xen_sys::XenStore, blkback::blkif::xen::XenConnector>,
    agent: Option<crate::xen_agent::RealAgent>,
    run_dir: std::path::PathBuf,
}

impl RealXenDisks {
    /// Closes the agent console and the disks, and removes their nodes.
    pub fn detach(self) -> Result<()> {
        let RealXenDisks {
            disks,
            agent,
            run_dir,
        } = self;
        if let Some(a) = agent {
            if let Err(e) = a.detach() {
                tracing::warn!(domid = disks.domid, "closing the agent console: {e:#}");
            }
        }
        let _ = std::fs::remove_file(crate::xen_agent::socket_path(&run_dir));
        disks.detach()
    }
}

/// One volume to serve: vdev, read-only, params, device.
pub type RealVolume = (String, bool, String, Arc<dyn storage::BlockDevice>);

/// Serves `volumes` to domain `domid` from dom0, and the agent console on
/// `run_dir`/agent.sock (without it the qube runs, `qube run` says why it cannot).
pub fn attach_real(
    domid: u32,
    chunk_size: u64,
    volumes: Vec<RealVolume>,
    run_dir: &std::path::Path,
) -> Result<RealXenDisks> {
    let (xs, disks) = real_disks(chunk_size, volumes)?;
    let disks = XenDisks::attach(xs, domid, disks)?;
    let agent = crate::xen_agent::attach_real(domid, run_dir)
        .inspect_err(|e| tracing::warn!(domid, "no agent console (`qube run`): {e:#}"))
        .ok();
    Ok(RealXenDisks {
        disks,
        agent,
        run_dir: run_dir.to_path_buf(),
    })
}

/// Serves again the disks an earlier daemon served to the running domain `domid`
/// ([`XenDisks::reattach`]), and its agent console if it has one.
pub fn reattach_real(
    domid: u32,
    chunk_size: u64,
    volumes: Vec<RealVolume>,
    run_dir: &std::path::Path,
) -> Result<RealXenDisks> {
    let (xs, disks) = real_disks(chunk_size, volumes)?;
    let disks = XenDisks::reattach(xs, domid, disks)?;
    let agent = crate::xen_agent::reattach_real(domid, run_dir)
        .inspect_err(|e| tracing::warn!(domid, "agent console not served again: {e:#}"))
        .ok()
        .flatten();
    Ok(RealXenDisks {
        disks,
        agent,
        run_dir: run_dir.to_path_buf(),
    })
}

/// Whether domain `domid` has disks of our backend type in xenstore.
pub fn has_blkif_disks(domid: u32) -> Result<bool> {
    let xs = xen_sys::XenStore::open().context("opening xenstore")?;
    let dir = format!(
        "/local/domain/{BACKEND_DOMID}/backend/{}/{domid}",
        xenbus::BACKEND_KIND
    );
    Ok(!XenStore::directory(&xs, &dir)?.is_empty())
}

type RealDisks = (
    Arc<xen_sys::XenStore>,
    Vec<Disk<blkback::blkif::xen::XenConnector>>,
);

fn real_disks(chunk_size: u64, volumes: Vec<RealVolume>) -> Result<RealDisks> {
    let xs = Arc::new(
        xen_sys::XenStore::open()
            .context("opening xenstore for the blkif backend (is xenstored running in dom0?)")?,
    );
    let gnttab = xen_sys::GntTab::open()
        .context("opening /dev/xen/gntdev for the blkif backend (`modprobe xen-gntdev`)")?;
    let disks = volumes
        .into_iter()
        .map(|(vdev, read_only, params, device)| Disk {
            vdev,
            read_only,
            params,
            info: DeviceInfo {
                size: device.size(),
                read_only,
                discard_granularity: u32::try_from(chunk_size).unwrap_or(4096).max(4096),
                persistent: blkback::blkif::persistent::offered(),
            },
            connector: blkback::blkif::xen::XenConnector {
                gnttab: gnttab.clone(),
                device,
                params: blkback::blkif::VbdParams::default(),
            },
        })
        .collect();
    Ok((xs, disks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkback::blkif::xenbus::{FrontendParams, MemStore};
    use std::sync::Mutex;
    use std::time::Instant;

    /// Records connects, and the backend's state at each disconnect.
    struct Probe {
        xs: Arc<MemStore>,
        backend: String,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Connector for Probe {
        type Running = FrontendParams;
        fn connect(&mut self, fe: &FrontendParams) -> Result<FrontendParams, String> {
            self.log
                .lock()
                .unwrap()
                .push(format!("connect {:?}", fe.ring_refs));
            Ok(fe.clone())
        }
        fn disconnect(&mut self, _: FrontendParams) {
            let st = self
                .xs
                .read(&format!("{}/state", self.backend))
                .unwrap()
                .unwrap_or_default();
            self.log
                .lock()
                .unwrap()
                .push(format!("disconnect at state {st}"));
        }
    }

    fn wait_for(xs: &MemStore, path: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if xs.read(path).unwrap().as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never became {want}: {:?}",
                xs.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What a blkfront writes to connect (ring, event channel, then its state).
    fn frontend_connects(xs: &MemStore, fe: &str, ring: &str, evtchn: &str, state: &str) {
        xs.write(&format!("{fe}/ring-ref"), ring).unwrap();
        xs.write(&format!("{fe}/event-channel"), evtchn).unwrap();
        xs.write(&format!("{fe}/state"), state).unwrap();
    }

    /// No backend node of ours is left (nor, with `frontends`, any vbd node at all).
    fn assert_nothing_left(xs: &MemStore, frontends: bool) {
        let left: Vec<String> = xs
            .dump()
            .into_keys()
            .filter(|k| {
                k.starts_with("/local/domain/0/backend/qubes-vbd/")
                    || (frontends && k.contains("/vbd/"))
            })
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    fn disks(xs: &Arc<MemStore>, domid: u32, log: &Arc<Mutex<Vec<String>>>) -> Vec<Disk<Probe>> {
        ["xvda", "xvdb"]
            .iter()
            .map(|v| Disk {
                vdev: v.to_string(),
                read_only: *v == "xvda",
                params: format!("work:{v}"),
                info: DeviceInfo {
                    size: 1 << 20,
                    read_only: *v == "xvda",
                    discard_granularity: 65536,
                    persistent: true,
                },
                connector: Probe {
                    xs: xs.clone(),
                    backend: format!(
                        "/local/domain/0/backend/qubes-vbd/{domid}/{}",
                        xvd_devid(v).unwrap()
                    ),
                    log: log.clone(),
                },
            })
            .collect()
    }

    #[test]
    fn devids_are_libxls() {
        assert_eq!(xvd_devid("xvda"), Some(51712));
        assert_eq!(xvd_devid("xvdb"), Some(51728));
        assert_eq!(xvd_devid("xvdp"), Some(51952));
        assert_eq!(xvd_devid("xvdq"), None);
        assert_eq!(xvd_devid("xvdaa"), None);
        assert_eq!(xvd_devid("sda"), None);
    }

    #[test]
    fn attach_connect_detach_sequence() {
        let xs = Arc::new(MemStore::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let d = XenDisks::attach(xs.clone(), 7, disks(&xs, 7, &log)).unwrap();
        let be = "/local/domain/0/backend/qubes-vbd/7/51712";
        let fe = "/local/domain/7/device/vbd/51712";
        // Both backends wait for their frontends, with the features published.
        wait_for(&xs, &format!("{be}/state"), "2");
        wait_for(&xs, "/local/domain/0/backend/qubes-vbd/7/51728/state", "2");
        assert_eq!(
            xs.read(&format!("{be}/mode")).unwrap().as_deref(),
            Some("r")
        );
        assert_eq!(
            xs.read(&format!("{fe}/backend")).unwrap().as_deref(),
            Some(be)
        );
        // The guest's blkfront connects xvda only.
        frontend_connects(&xs, fe, "8", "3", "3");
        wait_for(&xs, &format!("{be}/state"), "4");
        assert_eq!(*log.lock().unwrap(), vec!["connect [8]".to_string()]);
        d.detach().unwrap();
        // The ring was stopped while the backend said Closing, and nothing is left.
        assert_eq!(
            *log.lock().unwrap(),
            vec!["connect [8]".to_string(), "disconnect at state 5".into()]
        );
        assert_nothing_left(&xs, true);
    }

    #[test]
    fn a_dead_domain_closes_the_device_and_detach_still_cleans_up() {
        let xs = Arc::new(MemStore::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let d = XenDisks::attach(xs.clone(), 9, disks(&xs, 9, &log)).unwrap();
        let be = "/local/domain/0/backend/qubes-vbd/9/51712";
        let fe = "/local/domain/9/device/vbd/51712";
        frontend_connects(&xs, fe, "1", "2", "4");
        wait_for(&xs, &format!("{be}/state"), "4");
        // The toolstack destroys the domain: its whole directory goes.
        xs.rm("/local/domain/9").unwrap();
        wait_for(&xs, &format!("{be}/state"), "6");
        assert_eq!(log.lock().unwrap().len(), 2, "{:?}", log.lock().unwrap());
        d.detach().unwrap();
        assert_nothing_left(&xs, false);
    }

    #[test]
    fn a_restarted_daemon_reattaches_the_connected_rings() {
        let xs = Arc::new(MemStore::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let d = XenDisks::attach(xs.clone(), 7, disks(&xs, 7, &log)).unwrap();
        let be = "/local/domain/0/backend/qubes-vbd/7/51712";
        let fe = "/local/domain/7/device/vbd/51712";
        frontend_connects(&xs, fe, "8", "3", "4");
        wait_for(&xs, &format!("{be}/state"), "4");
        // The daemon goes (exit or kill): the rings stop, xenstore stays as it was.
        drop(d);
        assert_eq!(
            xs.read(&format!("{be}/state")).unwrap().as_deref(),
            Some("4")
        );
        log.lock().unwrap().clear();
        let before = xs.dump();
        let d = XenDisks::reattach(xs.clone(), 7, disks(&xs, 7, &log)).unwrap();
        // xvda is connected again at once, xvdb (never connected) still waits; no
        // node was rewritten.
        assert_eq!(*log.lock().unwrap(), vec!["connect [8]".to_string()]);
        assert_eq!(xs.dump(), before);
        // The pump serves the reattached devices: xvdb's frontend connects now.
        let fe_b = "/local/domain/7/device/vbd/51728";
        frontend_connects(&xs, fe_b, "9", "4", "3");
        wait_for(&xs, "/local/domain/0/backend/qubes-vbd/7/51728/state", "4");
        d.detach().unwrap();
        assert_nothing_left(&xs, true);
    }

    #[test]
    fn reattaching_a_domain_without_our_nodes_names_the_fallback_and_writes_nothing() {
        let xs = Arc::new(MemStore::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let e = XenDisks::reattach(xs.clone(), 3, disks(&xs, 3, &log))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("QUBES_XEN_DISKS=nbd"), "{e:#}");
        assert!(xs.dump().is_empty(), "{:?}", xs.dump());
    }

    #[test]
    fn a_bad_vdev_leaves_no_nodes() {
        let xs = Arc::new(MemStore::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut ds = disks(&xs, 5, &log);
        ds[1].vdev = "hda".into();
        let e = XenDisks::attach(xs.clone(), 5, ds).err().unwrap();
        assert!(format!("{e:#}").contains("hda"), "{e:#}");
        assert_nothing_left(&xs, true);
    }
}
