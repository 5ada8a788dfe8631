//! A qube's life: start (volumes, NBD exports, netvm, domain), shutdown, and what the
//! daemon does for running qubes (serve them again after a restart, reap halted guests,
//! detach at exit).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use storage::qubes::{QubeClass, StartedVolume};

use super::domain::xen_cmdline;
use super::pool::{fs_free_bytes, HOST_FREE_START_MARGIN};
use super::{export_name, now_secs, Controller, Served};
use crate::catalogue::{QubePrefs, RuntimeRecord};
use crate::results::{QubeHalted, QubeStarted, QubeState, ServedVolume};

impl Controller {
    pub(super) fn qube_start(&self, name: &str, hypervisor: Option<String>) -> Result<QubeStarted> {
        let r = self.start_qube(name, hypervisor);
        if let Err(e) = &r {
            // A failed start leaves nothing behind in run/qubes/NAME (sockets, pid files,
            // a half-written qemu.args), unless the qube runs after all (it was running
            // before, or a domain answers) or QEMU timed out: its log there is the
            // diagnosis the error points to.
            let keep = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<hypervisor::HvError>(),
                    Some(
                        hypervisor::HvError::CommandTimeout { .. }
                            | hypervisor::HvError::AlreadyRunning { .. }
                    )
                )
            });
            if !keep && !self.is_served(name) && matches!(self.vols.is_running(name), Ok(false)) {
                let _ = fs::remove_dir_all(self.paths.qube_run_dir(name));
            }
        }
        r
    }

    /// A qube's start, step by step: checks, its netvm, its volumes (the volume model's
    /// start, with the runtime record in the same commit), their NBD exports, then its
    /// domain. From the volumes on, a step that fails undoes the ones before it
    /// ([`StartUndo`]).
    pub(super) fn start_qube(&self, name: &str, hypervisor: Option<String>) -> Result<QubeStarted> {
        let q = self.vols.qube(name)?;
        self.check_startable(name)?;
        let prefs = self.catalogue().prefs(name)?;
        let hv_name = hypervisor
            .or_else(|| Some(prefs.hypervisor.clone()).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| hypervisor::default_hypervisor().name().to_string());
        let hv = hypervisor::by_name(&hv_name)?;
        let run_dir = self.make_run_dir(name)?;
        self.start_netvm(name, &prefs, &hv_name)?;

        let (started, qemu_user) = self.start_volumes(name, &hv_name)?;
        let mut undo = StartUndo {
            ctl: self,
            name,
            server: None,
            netvm_link: None,
            armed: true,
        };
        if let Some(u) = qemu_user {
            self.open_run_dir_to(name, &run_dir, &prefs)?;
            tracing::debug!(qube = %name, uid = u.uid, "qemu user");
        }
        let socket = {
            let server = self.serve(name, &started)?;
            let socket = server.path().to_path_buf();
            undo.server = Some(server);
            give_socket(&socket, qemu_user)?;
            socket
        };

        let mut xen_disks = None;
        if hv_name != "none" {
            let spec = self.domain_spec(&q, &prefs, &started, &socket, &run_dir)?;
            let spec = hypervisor::DomainSpec {
                user: qemu_user,
                ..spec
            };
            let mut spec = self.wire_network(name, &prefs, hv.as_ref(), spec)?;
            if hv_name == "xen" {
                spec.cmdline = xen_cmdline(&spec.cmdline);
                // Only QUBES_XEN_DISKS=phy uses them: other paths skip the pool lookups
                // (an rbd pool's is a network round trip).
                if hypervisor::Xen::new().disk_mode() == hypervisor::XenDiskMode::Phy {
                    for (disk, s) in spec.disks.iter_mut().zip(&started) {
                        disk.block_device = self.pool().kernel_block_device(&s.key)?;
                    }
                }
            }
            undo.netvm_link = prefs.netvm.as_deref().map(|n| (hv.as_ref(), n));
            hv.start(&spec)
                .map_err(|e| anyhow!(e).context(format!("starting {name} on {hv_name}")))?;
            xen_disks = self.xen_blkif_disks(name, &hv_name, &spec, &started)?;
        }
        self.served().insert(
            name.to_string(),
            Served {
                server: undo.done(),
                hypervisor: hv_name.clone(),
                xen_disks,
            },
        );
        tracing::info!(qube = %name, hypervisor = %hv_name, socket = %socket.display(), "qube started");
        let volumes = started
            .iter()
            .map(|s| ServedVolume {
                volume: s.name.clone(),
                key: s.key.clone(),
                read_only: s.read_only,
                size: s.size,
                nbd_uri: blkback::nbd_uri(&socket, &export_name(name, &s.name)),
            })
            .collect();
        Ok(QubeStarted {
            name: name.to_string(),
            state: QubeState::Running,
            hypervisor: hv_name,
            console: hv.console_log(&run_dir),
            volumes,
        })
    }

    /// What must hold before a start changes anything: not served yet (nor marked
    /// running, outside the daemon), and room on the host filesystem.
    fn check_startable(&self, name: &str) -> Result<()> {
        if self.is_served(name) {
            bail!("{name} is already running");
        }
        if self.vols.is_running(name)? && !self.in_daemon {
            bail!("{name} is marked running; start the daemon (`qubes-ctl daemon`) to pick it up");
        }
        let free = fs_free_bytes(&self.paths.pool_dir())?;
        if free < HOST_FREE_START_MARGIN {
            bail!(
                "cannot start {name}: the filesystem holding the pool ({}) has only {} free, less than the {} safety margin; \
                 its guest would get write errors. Free space there (remove files, or qubes/revisions with \
                 `qubes-ctl qube remove` / `qubes-ctl volume config Q:private revisions_to_keep 0`), then start it again",
                self.paths.pool_dir().display(),
                crate::units::human_size(free),
                crate::units::human_size(HOST_FREE_START_MARGIN)
            );
        }
        Ok(())
    }

    /// The qube's sockets and logs: ours alone, whatever the umask.
    fn make_run_dir(&self, name: &str) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let run_dir = self.paths.qube_run_dir(name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        Ok(run_dir)
    }

    /// As in Qubes, a qube's netvm is started first (with the same hypervisor).
    fn start_netvm(&self, name: &str, prefs: &QubePrefs, hv_name: &str) -> Result<()> {
        let (Some(n), true) = (&prefs.netvm, hv_name != "none") else {
            return Ok(());
        };
        self.check_network_prefs(name, prefs)?;
        {
            let _netvm = self.lock_qubes(&[n]);
            if !self.vols.is_running(n)? {
                self.qube_start(n, Some(hv_name.to_string()))
                    .with_context(|| format!("starting {name}'s netvm {n}"))?;
            }
        }
        let nhv = self.served_hypervisor(n).unwrap_or_default();
        if nhv != hv_name {
            bail!("{name}'s netvm {n} runs on {nhv:?}, not {hv_name}: both must use the same hypervisor");
        }
        Ok(())
    }

    /// The volume model's start, committed with the qube's runtime record (its
    /// hypervisor and QEMU user); nothing is left staged if it fails.
    fn start_volumes(
        &self,
        name: &str,
        hv_name: &str,
    ) -> Result<(Vec<StartedVolume>, Option<hypervisor::DomainUser>)> {
        let _txn = self.txn();
        // Under the catalogue lock, so two qubes starting at once get distinct ids.
        // Only root can hand QEMU another uid; a user's own qubes run as that user.
        let qemu_uid = match hv_name {
            "qemu" if rustix::process::geteuid().is_root() => Some(self.free_qemu_uid()?),
            _ => None,
        };
        self.catalogue().set_runtime(
            name,
            Some(&RuntimeRecord {
                hypervisor: hv_name.to_string(),
                started_at: now_secs(),
                qemu_uid,
            }),
        )?;
        match self.vols.start(name) {
            Ok(s) => Ok((
                s,
                qemu_uid.map(|id| hypervisor::DomainUser { uid: id, gid: id }),
            )),
            Err(e) => {
                self.catalogue().set_runtime(name, None)?;
                Err(e.into())
            }
        }
    }

    /// The lowest QEMU uid no running qube holds (see [`QEMU_UID_BASE`]). The caller
    /// holds the catalogue lock and records the uid before releasing it.
    pub(super) fn free_qemu_uid(&self) -> Result<u32> {
        let mut taken = std::collections::BTreeSet::new();
        for q in self.vols.running_qubes()? {
            if let Some(id) = self.catalogue().runtime(&q)?.and_then(|r| r.qemu_uid) {
                taken.insert(id);
            }
        }
        // Another root's daemon on this host allocates from the same range: an id some
        // process runs as (its /proc directory is that uid's) is taken too.
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            use std::os::unix::fs::MetadataExt;
            if let Ok(md) = e.metadata() {
                if (QEMU_UID_BASE..QEMU_UID_BASE + QEMU_UIDS).contains(&md.uid()) {
                    taken.insert(md.uid());
                }
            }
        }
        (QEMU_UID_BASE..QEMU_UID_BASE + QEMU_UIDS)
            .find(|id| !taken.contains(id))
            .ok_or_else(|| anyhow!("{QEMU_UIDS} qubes already run under QEMU; shut one down first"))
    }

    /// A QEMU qube's run dir becomes its QEMU's working directory (the backend gives it
    /// to the qube's user). A client's QEMU reaches its netvm's link socket through
    /// `../NETVM/`, so `qubes/` and a netvm's run dir let others through (0711, no
    /// listing); what lies in them is the owner's alone (0600).
    pub(super) fn open_run_dir_to(
        &self,
        name: &str,
        run_dir: &Path,
        prefs: &QubePrefs,
    ) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| {
            fs::set_permissions(p, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting {} to mode {mode:o} for {name}", p.display()))
        };
        if let Some(qubes) = run_dir.parent() {
            set(qubes, 0o711)?;
        }
        set(run_dir, if prefs.provides_network { 0o711 } else { 0o700 })
    }

    pub(super) fn serve(
        &self,
        name: &str,
        started: &[StartedVolume],
    ) -> Result<blkback::NbdServer> {
        let mut exports = Vec::new();
        for s in started {
            let device = self.pool().open_volume(&s.key, s.read_only)?;
            exports.push(blkback::Export {
                name: export_name(name, &s.name),
                description: format!("{name}:{} ({})", s.name, s.key),
                device,
            });
        }
        let socket = self.paths.nbd_socket(name);
        blkback::NbdServer::bind_unix(&socket, exports)
            .with_context(|| format!("serving {name}'s volumes on {}", socket.display()))
    }

    pub(super) fn qube_shutdown(
        &self,
        name: &str,
        timeout_secs: u64,
        kill: bool,
    ) -> Result<QubeHalted> {
        self.vols.qube(name)?;
        let timeout = Duration::from_secs(timeout_secs);
        let run_dir = self.paths.qube_run_dir(name);
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv_name = self.served_hypervisor(name).unwrap_or(rt.hypervisor);
        if !self.vols.is_running(name)? && !self.is_served(name) {
            bail!("{name} is not running");
        }
        if !kill && self.catalogue().prefs(name)?.provides_network {
            let mut clients = Vec::new();
            for q in self.vols.list_qubes()? {
                if q.qube != name
                    && self.vols.is_running(&q.qube)?
                    && self.catalogue().prefs(&q.qube)?.netvm.as_deref() == Some(name)
                {
                    clients.push(q.qube);
                }
            }
            if !clients.is_empty() {
                bail!(
                    "{name} provides network to running qubes {}; shut them down first (or --kill)",
                    clients.join(", ")
                );
            }
        }
        if !hv_name.is_empty() && hv_name != "none" {
            let hv = hypervisor::by_name(&hv_name)?;
            if kill {
                hv.kill(name, &run_dir)?;
            } else {
                hv.shutdown(name, &run_dir, timeout)
                    .with_context(|| format!("shutting down {name}"))?;
            }
        }
        self.stop_storage(name, timeout)?;
        Ok(QubeHalted {
            name: name.to_string(),
            state: QubeState::Halted,
        })
    }

    /// Waits for the NBD clients to flush and go, then commits the volumes (stop).
    pub(super) fn stop_storage(&self, name: &str, grace: Duration) -> Result<()> {
        let hv_name = match self.served_hypervisor(name) {
            Some(h) => h,
            None => {
                self.catalogue()
                    .runtime(name)?
                    .unwrap_or_default()
                    .hypervisor
            }
        };
        let netvm = self.catalogue().prefs(name)?.netvm;
        if let (Some(n), false) = (netvm, hv_name.is_empty() || hv_name == "none") {
            let nrun = self.paths.qube_run_dir(&n);
            if let Err(e) =
                hypervisor::by_name(&hv_name).and_then(|hv| hv.detach_client(&n, &nrun, name))
            {
                tracing::warn!(qube = name, netvm = %n, "unplugging the link from the netvm: {e}");
            }
            let _ = fs::remove_file(nrun.join(format!("vif-{name}.sock")));
        }
        let removed = self.served().remove(name);
        if let Some(s) = removed {
            if let Some(d) = s.xen_disks {
                if let Err(e) = d.detach() {
                    tracing::warn!(qube = name, "closing the blkif disks: {e:#}");
                }
            }
            s.server
                .shutdown(grace)
                .with_context(|| format!("closing {name}'s exports"))?;
        }
        let _txn = self.txn();
        self.catalogue().set_runtime(name, None)?;
        self.vols.stop(name)?;
        // A DispVM leaves nothing behind: not its domain config, console or sockets
        // either (its volumes went with the stop).
        if self.vols.qube(name)?.class == QubeClass::DispVM {
            let run_dir = self.paths.qube_run_dir(name);
            if let Err(e) = fs::remove_dir_all(&run_dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(qube = name, "removing {}: {e}", run_dir.display());
                }
            }
        }
        tracing::info!(qube = %name, "qube stopped: private committed, snapshots dropped");
        Ok(())
    }

    /// Serves again the qubes the pool still marks running (after a daemon crash), at the
    /// same socket paths, so clients that reconnect carry on.
    /// A qube that cannot be served is returned with the reason, and the others are
    /// served all the same.
    pub fn resume_running(&self) -> (Vec<String>, Vec<(String, anyhow::Error)>) {
        let mut resumed = Vec::new();
        let mut broken = Vec::new();
        let names = match self.vols.running_qubes() {
            Ok(n) => n,
            Err(e) => {
                broken.push(("(pool)".to_string(), anyhow!(e)));
                return (resumed, broken);
            }
        };
        for name in names {
            let started = match self.running_volumes(&name) {
                Ok(s) => s,
                Err(e) => {
                    broken.push((name, e));
                    continue;
                }
            };
            let server = match self.serve(&name, &started) {
                Ok(s) => s,
                Err(e) => {
                    broken.push((name, e));
                    continue;
                }
            };
            let rt = self
                .catalogue()
                .runtime(&name)
                .ok()
                .flatten()
                .unwrap_or_default();
            let user = rt
                .qemu_uid
                .map(|id| hypervisor::DomainUser { uid: id, gid: id });
            if let Err(e) = give_socket(server.path(), user) {
                broken.push((name, e));
                continue;
            }
            let hv = if rt.hypervisor.is_empty() {
                "none".to_string()
            } else {
                rt.hypervisor
            };
            let xen_disks = if hv == "xen" {
                match self.xen_blkif_resume(&name, &started) {
                    Ok(d) => d,
                    Err(e) => {
                        // Served over NBD all the same, so `qube shutdown` can stop it.
                        tracing::warn!(qube = %name, "{e:#}");
                        None
                    }
                }
            } else {
                None
            };
            self.served().insert(
                name.clone(),
                Served {
                    server,
                    hypervisor: hv,
                    xen_disks,
                },
            );
            resumed.push(name);
        }
        (resumed, broken)
    }

    /// The volumes a qube marked running has in the pool now (after a daemon crash), in
    /// start order, without changing anything: save_on_stop volumes are served from their
    /// running snapshot, the others from the snapshot / fresh volume made at start.
    pub(super) fn running_volumes(&self, name: &str) -> Result<Vec<StartedVolume>> {
        let q = self.vols.qube(name)?;
        let mut out = Vec::new();
        for v in &q.volumes {
            let key = if v.save_on_stop {
                storage::qubes::run_key(name, &v.name)
            } else {
                storage::qubes::head_key(name, &v.name)
            };
            let info = self.pool().volume(&key).with_context(|| {
                format!("{name} is marked running but its volume {key} is missing; stop it with `qubes-ctl qube shutdown {name} --kill`")
            })?;
            out.push(StartedVolume {
                name: v.name.clone(),
                key,
                read_only: !v.rw,
                size: info.size,
            });
        }
        Ok(out)
    }

    /// Stops the storage of qubes whose domain has gone away (the guest powered off).
    /// A qube a request is working on is left for the next round (that request may be
    /// its shutdown, or a start still bringing its guest up).
    pub fn reap_halted(&self) -> Vec<(String, Result<()>)> {
        let served: Vec<(String, String)> = self
            .served()
            .iter()
            .filter(|(_, s)| s.hypervisor != "none")
            .map(|(n, s)| (n.clone(), s.hypervisor.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, hv_name) in served {
            let Some(_locked) = self.qube_locks.try_lock(&[&name]) else {
                continue;
            };
            let Ok(hv) = hypervisor::by_name(&hv_name) else {
                continue;
            };
            if !self.is_served(&name) {
                continue;
            }
            if let Ok(hypervisor::DomainState::Halted) =
                hv.state(&name, &self.paths.qube_run_dir(&name))
            {
                // What `qube shutdown` does once the domain is gone: the backend releases
                // what it holds for it in dom0 (Xen: the /dev/nbdN of the kernel-NBD
                // fallback, whose clients must leave before the exports close; the blkif
                // disks close in stop_storage) before the volumes stop.
                if let Err(e) = hv.kill(&name, &self.paths.qube_run_dir(&name)) {
                    tracing::warn!(qube = %name, "releasing its devices after it halted: {e}");
                }
                let r = self.stop_storage(&name, Duration::from_secs(10));
                out.push((name, r));
            }
        }
        out
    }

    pub fn served_qubes(&self) -> Vec<String> {
        self.served().keys().cloned().collect()
    }

    /// Closes exports without stopping the qubes (daemon exit): they stay marked
    /// running and a restarted daemon serves them again.
    pub fn detach_all(&self) {
        let served = std::mem::take(&mut *self.served());
        for (_, s) in served {
            let _ = s.server.shutdown(Duration::from_secs(2));
        }
        let _ = self.pool().commit();
    }
}

/// Gives a socket to a qube's QEMU user (its mode stays 0600: that user's alone).
/// `lchown`: the socket lies in a directory that user owns, so never follow a link.
pub(super) fn give_socket(socket: &Path, user: Option<hypervisor::DomainUser>) -> Result<()> {
    let Some(u) = user else { return Ok(()) };
    std::os::unix::fs::lchown(socket, Some(u.uid), Some(u.gid)).with_context(|| {
        format!(
            "giving {} to the qube's QEMU user (uid {})",
            socket.display(),
            u.uid
        )
    })
}

/// The first uid (and gid) of the range each running QEMU gets one of.
///
/// Each running qube's QEMU runs as a user of its own, so a compromised QEMU cannot
/// reach another qube's disks (its NBD socket is 0600, owned by that user), files or
/// processes. The ids are allocated when the qube starts (the lowest one no running
/// qube holds, kept in its runtime record until it stops) rather than fixed per qube:
/// two running qubes can never share one, and nothing is left to reclaim when a qube
/// is removed. They need no /etc/passwd entry, as the kernel only knows numbers; the
/// range, 0x70000000 up, lies above the ranges systemd hands out (regular and dynamic
/// users below 65536, containers' up to 0x6FFFFFFF) and below 2^31, so no login user,
/// DynamicUser= service or container shares one.
pub const QEMU_UID_BASE: u32 = 0x7000_0000;

/// How many qubes may run under QEMU at once.
const QEMU_UIDS: u32 = 1 << 16;

/// Undoes a start whose volumes started, unless [`StartUndo::done`]: unplugs the link
/// from the netvm (once the domain was being made), closes the exports, and stops the
/// volumes with the runtime record in one commit.
struct StartUndo<'a> {
    ctl: &'a Controller,
    name: &'a str,
    server: Option<blkback::NbdServer>,
    netvm_link: Option<(&'a dyn hypervisor::Hypervisor, &'a str)>,
    armed: bool,
}

impl StartUndo<'_> {
    /// The start went through: nothing to undo; the exports are the caller's.
    fn done(mut self) -> blkback::NbdServer {
        self.armed = false;
        self.server
            .take()
            .expect("a start is done only once its exports are up")
    }
}

impl Drop for StartUndo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let ctl = self.ctl;
        if let Some((hv, n)) = self.netvm_link {
            let _ = hv.detach_client(n, &ctl.paths.qube_run_dir(n), self.name);
        }
        if let Some(s) = self.server.take() {
            let _ = s.shutdown(Duration::from_secs(1));
        }
        let _txn = ctl.txn();
        let _ = ctl.catalogue().set_runtime(self.name, None);
        let _ = ctl.vols.stop(self.name);
    }
}
