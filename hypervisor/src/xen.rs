//! The Xen backend: an xl domain config per qube in its run dir, driven by `xl`.
//!
//! ```text
//!   run_dir/xl.cfg  --xl create-->  libxl domain
//!     disk = [ 'format=raw,vdev=xvda,access=ro,backendtype=qdisk,
//!               target=nbd:unix:SOCKET:exportname=EXPORT', ... ]
//!   QEMU's qdisk backend (dom0) --NBD--> controller's per-qube socket
//! ```
//!
//! - The config is parsed by libxlutil exactly as `xl create` parses it; the tests in
//!   `tests/xen_config.rs` feed every generated config through libxlutil (bindgen) and
//!   check what it reads back, so quoting mistakes fail a test, not a boot.
//! - `target=` comes last in a disk spec: libxlutil takes the rest of the spec as the
//!   target, so socket paths and export names may hold commas. The target uses QEMU's
//!   `nbd:unix:PATH:exportname=NAME` filename syntax, which qdisk hands to QEMU's
//!   block layer (libxl does not stat targets of qdisk disks).
//! - Caveat: upstream QEMU's xen-block (4.0+) opens qdisk targets with the `file`
//!   driver after a stat(), so it needs a QEMU that accepts protocol filenames there
//!   (as the legacy xen_disk did); see the crate report.
//! - `cmdline` is written as `cmdline =` (xl.cfg(5): preferred over root/extra, which
//!   it overrides). PV and PVH get `console=hvc0` unless the command line names one.
//! - [`XenDiskMode::Blkif`] (the default): `xl create -p` with no disk lines; the
//!   controller serves the disks with its own userspace blkif backend straight from the
//!   pool (no NBD hop, no kernel blkback, no QEMU), then unpauses.
//! - [`XenDiskMode::KernelNbd`] (the fallback, `QUBES_XEN_DISKS=nbd`): dom0's kernel NBD
//!   client attaches each export to a `/dev/nbdN` (`qemu-nbd --connect`, recorded in
//!   `run_dir/nbd-devices`) and the domain gets `backendtype=phy` disks served by the
//!   kernel's blkback; the devices are detached after shutdown/kill.
//! - [`XenDiskMode::Qdisk`] (`QUBES_XEN_DISKS=qdisk`): see the caveat above.
//! - [`XenDiskMode::Phy`] (`QUBES_XEN_DISKS=phy`): volumes that are kernel block devices
//!   (an `lvm_thin` pool's LVs, [`crate::DiskSpec::block_device`]) go to dom0's blkback
//!   as `backendtype=phy` disks, as Qubes gives its LVM volumes; no NBD, no userspace
//!   backend in the I/O path (the guest's flushes reach dm-thin directly).
//! - The variable is read by the process that starts the domain: the daemon, so it
//!   takes effect for a daemon started with it (`qubes-ctl daemon stop` first).
//! - on_poweroff/on_reboot/on_crash = destroy: a guest that stops is gone, so
//!   `xl list` failing with "invalid domain" means Halted.
//! - Network: a client's one vif has its netvm as backend (see [`vif_spec_string`]); a
//!   netvm without a netvm of its own (sys-net) gets an uplink instead, standing in for
//!   the physical NIC Qubes passes through to it (as the QEMU backend's user-mode NIC
//!   does): a vif served by dom0, on dom0's bridge `xenbr0` (Xen's own `vif-bridge`
//!   hotplug; `QUBES_XEN_UPLINK_BRIDGE` names another, `none` turns it off), with the
//!   netvm's MAC, so its guest integration configures it by DHCP from that network.
//!   dom0 without that bridge: the netvm starts without an uplink (logged).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::qemu::with_console;
use crate::util::{find_tool, io_err, run_with_timeout};
use crate::{DiskSpec, DomainSpec, DomainState, HvError, Hypervisor, VirtMode};

const XL_FIX: &str =
    "the xen backend needs a Xen dom0 with xen-utils installed; elsewhere use the qemu backend";
/// `xl create` loads the kernel and runs a hotplug script per disk: under a nested
/// (TCG) Xen that took over 120 s, so the bound is generous; a hang still ends.
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
const XL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a domain's disks reach its NBD exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenDiskMode {
    /// `backendtype=qdisk,target=nbd:unix:...`: QEMU's qdisk backend as the client.
    Qdisk,
    /// dom0's kernel NBD client: each export is attached to a free `/dev/nbdN`
    /// (`qemu-nbd --connect`) and given to the domain as `backendtype=phy`, served
    /// by the kernel's blkback. Needs the `nbd` module in dom0.
    KernelNbd,
    /// The controller's own userspace blkif backend (blkback's `blkif`) serves the disks
    /// straight from the pool. The domain is created paused (`xl create -p`) with no disk
    /// lines; the controller writes the vbd nodes for [`Xen::domid`], starts serving,
    /// then unpauses it. The default.
    Blkif,
    /// Each volume's own kernel block device ([`crate::DiskSpec::block_device`], an LV of
    /// an `lvm_thin` pool) as a `backendtype=phy` disk for dom0's blkback, as Qubes
    /// gives its LVM volumes to domains. Only for pools whose volumes have one.
    Phy,
}

impl XenDiskMode {
    /// The mode `QUBES_XEN_DISKS` names (unset or empty: [`XenDiskMode::Blkif`]).
    pub fn from_env_value(v: Option<&str>) -> Result<XenDiskMode, String> {
        match v.map(str::trim) {
            None | Some("") | Some("blkif") => Ok(XenDiskMode::Blkif),
            Some("nbd") | Some("kernel-nbd") => Ok(XenDiskMode::KernelNbd),
            Some("qdisk") => Ok(XenDiskMode::Qdisk),
            Some("phy") => Ok(XenDiskMode::Phy),
            Some(other) => Err(format!(
                "QUBES_XEN_DISKS={other:?} is not a disk path: use blkif (the default), nbd, phy (lvm_thin pools) or qdisk"
            )),
        }
    }
}

pub struct Xen {
    xl: String,
    /// `xenstore-read`, for a netvm's readiness (see [`NET_BACKEND_READY_KEY`]).
    xenstore_read: String,
    /// How long a client's start waits for its netvm to serve vifs.
    net_ready_timeout: Duration,
    qemu_nbd: String,
    disk_mode: XenDiskMode,
    /// Where the kernel lists block devices (`/sys/block`); tests point it elsewhere.
    sys_block: PathBuf,
    /// How long a domain that has shut down may stay listed (xl's monitor is still
    /// destroying it: hotplug scripts run) before we destroy it ourselves.
    linger: Duration,
    /// dom0's bridge for a netvm's uplink (`None`: no uplink).
    uplink_bridge: Option<String>,
    /// Where the kernel lists network interfaces (`/sys/class/net`); tests point it elsewhere.
    sys_net: PathBuf,
}

/// Names dom0's bridge for the uplink of a netvm without a netvm (default
/// [`DEFAULT_UPLINK_BRIDGE`]; empty or `none`: no uplink).
pub const UPLINK_BRIDGE_ENV: &str = "QUBES_XEN_UPLINK_BRIDGE";
/// The bridge name Xen's own tools default to.
pub const DEFAULT_UPLINK_BRIDGE: &str = "xenbr0";

/// The uplink bridge `QUBES_XEN_UPLINK_BRIDGE` names (unset: [`DEFAULT_UPLINK_BRIDGE`];
/// empty or `none`: `None`).
pub fn uplink_bridge_from_env_value(v: Option<&str>) -> Result<Option<String>, String> {
    match v.map(str::trim) {
        None => Ok(Some(DEFAULT_UPLINK_BRIDGE.into())),
        Some("") | Some("none") => Ok(None),
        Some(b) if is_ifname(b) => Ok(Some(b.into())),
        Some(b) => Err(format!(
            "{UPLINK_BRIDGE_ENV}={b:?} is not an interface name (1-15 of A-Za-z0-9_.-); \
             name dom0's bridge, or `none` for no uplink"
        )),
    }
}

/// A Linux interface name that can also sit in a VIFSPEC (no separators).
fn is_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s != "."
        && s != ".."
}

/// See [`Xen::with_linger`]: a loaded dom0 runs the block hotplug scripts slowly.
const LINGER: Duration = Duration::from_secs(60);

/// Where a netvm says, in its own xenstore directory (`/local/domain/DOMID/`, `data/` is
/// the guest's to write), that its kernel serves vif backends (xen-netback loaded): the
/// guest integration writes `ready` there. libxl builds a client's vif in the netvm and
/// gives its backend 10 s to reach InitWait, so a client domain made before that fails;
/// Qubes likewise starts a client only once its netvm has started.
pub const NET_BACKEND_READY_KEY: &str = "data/qubes-net-backend";
/// A netvm boots in seconds on real hardware but minutes under nested TCG.
const NET_READY_TIMEOUT: Duration = Duration::from_secs(900);
const XENSTORE_FIX: &str =
    "the xen backend needs xenstore-read (Debian package xenstore-utils) in dom0";

/// One line per attached `/dev/nbdN`, detached when the domain is gone.
const NBD_DEVICES: &str = "nbd-devices";
/// How long a failing `qemu-nbd --disconnect` is retried.
const DETACH_TIMEOUT: Duration = Duration::from_secs(60);
const QEMU_NBD_FIX: &str = "run scripts/install-deps.sh (package qemu-utils)";

impl Default for Xen {
    fn default() -> Self {
        Self::new()
    }
}

impl Xen {
    /// `QUBES_XL` overrides the `xl` binary (tests use a stand-in script).
    /// Disks default to [`XenDiskMode::Blkif`]; `QUBES_XEN_DISKS=nbd` selects the
    /// kernel-NBD fallback, `qdisk` QEMU's qdisk (for a QEMU that accepts NBD targets).
    pub fn new() -> Self {
        let disk_mode =
            XenDiskMode::from_env_value(std::env::var("QUBES_XEN_DISKS").ok().as_deref())
                .unwrap_or_else(|e| {
                    tracing::warn!("{e}; using blkif");
                    XenDiskMode::Blkif
                });
        let uplink_bridge =
            uplink_bridge_from_env_value(std::env::var(UPLINK_BRIDGE_ENV).ok().as_deref())
                .unwrap_or_else(|e| {
                    tracing::warn!("{e}; netvms get no uplink");
                    None
                });
        Xen {
            xl: std::env::var("QUBES_XL").unwrap_or_else(|_| "xl".into()),
            xenstore_read: std::env::var("QUBES_XENSTORE_READ")
                .unwrap_or_else(|_| "xenstore-read".into()),
            net_ready_timeout: NET_READY_TIMEOUT,
            qemu_nbd: "qemu-nbd".into(),
            disk_mode,
            sys_block: "/sys/block".into(),
            linger: LINGER,
            uplink_bridge,
            sys_net: "/sys/class/net".into(),
        }
    }

    /// dom0's bridge for a netvm's uplink (`None`: none) and where its interfaces are
    /// listed (`/sys/class/net`; tests use a stand-in directory).
    pub fn with_uplink_bridge(mut self, bridge: Option<&str>, sys_net: impl Into<PathBuf>) -> Self {
        self.uplink_bridge = bridge.map(str::to_string);
        self.sys_net = sys_net.into();
        self
    }

    /// `spec` with its uplink bridge filled in: only a netvm without a netvm of its own
    /// has one, and only when dom0 has the bridge (a missing one is logged: the netvm
    /// still starts, as a Qubes sys-net without its NIC does).
    fn with_uplink(&self, spec: &DomainSpec) -> DomainSpec {
        let mut spec = spec.clone();
        spec.net.uplink_bridge = None;
        if !spec.net.provides_network || spec.netvm.is_some() {
            return spec;
        }
        let Some(bridge) = &self.uplink_bridge else {
            return spec;
        };
        if self.sys_net.join(bridge).join("bridge").is_dir() {
            spec.net.uplink_bridge = Some(bridge.clone());
        } else {
            tracing::warn!(
                qube = spec.name,
                "netvm {} starts without an uplink: dom0 has no bridge {bridge} (create it, \
                 with dom0's uplink NIC in it, or name another with {UPLINK_BRIDGE_ENV}; \
                 `none` for no uplink)",
                spec.name
            );
        }
        spec
    }

    pub fn with_xl(xl: impl Into<String>) -> Self {
        Xen {
            xl: xl.into(),
            ..Self::new()
        }
    }

    /// How long a shut-down domain may stay in `xl list` before it is destroyed
    /// (default one minute; tests shorten it).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// The `xenstore-read` binary and how long a client's start waits for its netvm
    /// (default 15 min; tests use a stand-in and a short wait).
    pub fn with_netvm_wait(mut self, xenstore_read: impl Into<String>, timeout: Duration) -> Self {
        self.xenstore_read = xenstore_read.into();
        self.net_ready_timeout = timeout;
        self
    }

    /// Waits until the running netvm `netvm` serves vif backends (it wrote `ready` to
    /// its [`NET_BACKEND_READY_KEY`]); fails at once when the netvm is not running.
    fn wait_net_backend(&self, netvm: &str, client: &str) -> Result<(), HvError> {
        let bin = find_tool(&self.xenstore_read, XENSTORE_FIX)?;
        let deadline = std::time::Instant::now() + self.net_ready_timeout;
        let mut last: String;
        loop {
            if !self.listed(netvm)? {
                return Err(HvError::NotRunning {
                    name: netvm.to_string(),
                    op: "serve the network of its client",
                    reason: format!("its domain is gone, so {client} cannot start"),
                });
            }
            let domid = self.domid(netvm)?;
            let key = format!("/local/domain/{domid}/{NET_BACKEND_READY_KEY}");
            match run_with_timeout(Command::new(&bin).arg(&key), XL_TIMEOUT) {
                Ok(Some(o)) if o.status.success() && o.stdout.trim() == "ready" => return Ok(()),
                Ok(Some(o)) => last = format!("{key}: {}", (o.stdout + &o.stderr).trim()),
                Ok(None) => last = format!("xenstore-read {key} timed out"),
                Err(e) => last = format!("xenstore-read {key}: {e}"),
            }
            if std::time::Instant::now() >= deadline {
                return Err(HvError::NotRunning {
                    name: netvm.to_string(),
                    op: "serve the network of its client",
                    reason: format!(
                        "it did not say it serves vif backends within {:?} ({last}); its guest \
                         integration loads xen-netback and writes {NET_BACKEND_READY_KEY} at boot: \
                         check its console (`qubes-ctl qube log {netvm}`), then start {client} again",
                        self.net_ready_timeout
                    ),
                });
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    pub fn with_disk_mode(mut self, mode: XenDiskMode) -> Self {
        self.disk_mode = mode;
        self
    }

    pub fn disk_mode(&self) -> XenDiskMode {
        self.disk_mode
    }

    /// The domain id of the running domain `name` (`xl domid`), for the backend nodes of
    /// [`XenDiskMode::Blkif`].
    pub fn domid(&self, name: &str) -> Result<u32, HvError> {
        match self.xl(name, &["domid", name], XL_TIMEOUT)? {
            Xl::Ok(out) => out.trim().parse().map_err(|_| HvError::Command {
                name: name.to_string(),
                cmd: format!("xl domid {name}"),
                status: "0".into(),
                detail: format!("printed {:?}, not a domain id", out.trim()),
            }),
            other => Err(other.into_error(name, "check that xenstored runs")),
        }
    }

    /// The `qemu-nbd` binary and the sysfs block directory used by
    /// [`XenDiskMode::KernelNbd`] (tests use stand-ins for both).
    pub fn with_kernel_nbd_tools(
        mut self,
        qemu_nbd: impl Into<String>,
        sys_block: impl Into<PathBuf>,
    ) -> Self {
        self.qemu_nbd = qemu_nbd.into();
        self.sys_block = sys_block.into();
        self
    }

    /// Attaches every disk of `spec` to a free `/dev/nbdN`, recording each in the run
    /// dir as it goes so a failure half way can be undone.
    fn attach_kernel_nbd(&self, spec: &DomainSpec) -> Result<Vec<PathBuf>, HvError> {
        let name = &spec.name;
        let bin = find_tool(&self.qemu_nbd, QEMU_NBD_FIX)?;
        let mut free = free_nbd_devices(&self.sys_block).into_iter();
        let record = spec.run_dir.join(NBD_DEVICES);
        let mut devices = Vec::new();
        for d in &spec.disks {
            let Some(dev) = free.next() else {
                return Err(HvError::InvalidSpec {
                    name: name.clone(),
                    reason: format!(
                        "no free /dev/nbdN for {} (is the nbd module loaded? `modprobe nbd nbds_max=128`)",
                        d.vdev
                    ),
                });
            };
            let uri = format!(
                "nbd+unix:///{}?socket={}",
                uri_escape(&d.export),
                uri_escape(&d.nbd_socket.to_string_lossy())
            );
            let mut cmd = Command::new(&bin);
            cmd.arg(format!("--connect={}", dev.display()))
                .args(["--format=raw", "--cache=none"]);
            if d.read_only {
                cmd.arg("--read-only");
            }
            cmd.arg(&uri);
            let shown = format!("qemu-nbd --connect={} {uri}", dev.display());
            match run_with_timeout(&mut cmd, XL_TIMEOUT)
                .map_err(io_err(name, format!("running {shown}")))?
            {
                Some(o) if o.status.success() => {}
                Some(o) => {
                    return Err(HvError::Command {
                        name: name.clone(),
                        cmd: shown,
                        status: o.status.to_string(),
                        detail: o.stderr.trim().to_string(),
                    })
                }
                None => {
                    return Err(HvError::CommandTimeout {
                        name: name.clone(),
                        cmd: shown,
                        timeout: XL_TIMEOUT,
                        fix: "check that the qube's NBD socket is served",
                    })
                }
            }
            devices.push(dev);
            let lines: String = devices
                .iter()
                .map(|d| format!("{}\n", d.display()))
                .collect();
            fs::write(&record, lines).map_err(io_err(name, "recording nbd devices"))?;
        }
        Ok(devices)
    }

    /// Detaches the `/dev/nbdN` recorded for this run dir (no-op when none).
    fn detach_kernel_nbd(&self, name: &str, run_dir: &Path) -> Result<(), HvError> {
        let record = run_dir.join(NBD_DEVICES);
        let Ok(text) = fs::read_to_string(&record) else {
            return Ok(());
        };
        let bin = find_tool(&self.qemu_nbd, QEMU_NBD_FIX)?;
        let mut failed = Vec::new();
        for dev in text.lines().filter(|l| !l.trim().is_empty()) {
            // `--disconnect` takes no argument: the device follows it (real qemu-nbd
            // refuses `--disconnect=DEV`, which a stand-in accepted; found on real Xen).
            // A disconnect that fails (a device still busy) is retried for a while.
            let deadline = std::time::Instant::now() + DETACH_TIMEOUT;
            let mut last: String;
            loop {
                match run_with_timeout(Command::new(&bin).arg("--disconnect").arg(dev), XL_TIMEOUT)
                {
                    Ok(Some(o)) if o.status.success() => break,
                    Ok(Some(o)) => last = format!("{} {}", o.status, o.stderr.trim()),
                    Ok(None) => last = "timed out".into(),
                    Err(e) => last = e.to_string(),
                }
                if std::time::Instant::now() >= deadline {
                    failed.push(format!("{dev} ({last})"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        if failed.is_empty() {
            let _ = fs::remove_file(&record);
            Ok(())
        } else {
            Err(HvError::Command {
                name: name.to_string(),
                cmd: "qemu-nbd --disconnect".into(),
                status: "failed".into(),
                detail: format!("still attached: {}", failed.join(", ")),
            })
        }
    }

    pub fn config_path(run_dir: &Path) -> PathBuf {
        run_dir.join("xl.cfg")
    }

    /// Writes the config (attaching kernel NBD devices first if that mode is on) and
    /// runs `xl create`.
    fn create(&self, spec: &DomainSpec) -> Result<(), HvError> {
        let spec = &self.with_uplink(spec);
        let text = match self.disk_mode {
            XenDiskMode::Qdisk => config_text(spec)?,
            XenDiskMode::KernelNbd => {
                let devices = self.attach_kernel_nbd(spec)?;
                config_text_phy(spec, &devices)?
            }
            XenDiskMode::Blkif => config_text_no_disks(spec)?,
            XenDiskMode::Phy => config_text_phy(spec, &own_block_devices(spec)?)?,
        };
        let cfg = Self::config_path(&spec.run_dir);
        let tmp = spec.run_dir.join("xl.cfg.tmp");
        fs::write(&tmp, text).map_err(io_err(&spec.name, "writing xl.cfg"))?;
        fs::rename(&tmp, &cfg).map_err(io_err(&spec.name, "writing xl.cfg"))?;
        fs::write(spec.run_dir.join("domain.name"), &spec.name)
            .map_err(io_err(&spec.name, "writing domain.name"))?;
        let cfg_s = cfg.to_string_lossy().into_owned();
        // Paused: the disks must be served before the guest's blkfront looks for them.
        let args: &[&str] = match self.disk_mode {
            XenDiskMode::Blkif => &["create", "-p", &cfg_s],
            _ => &["create", &cfg_s],
        };
        match self.xl(&spec.name, args, CREATE_TIMEOUT)? {
            Xl::Ok(_) => Ok(()),
            Xl::Failed {
                cmd,
                status,
                stderr,
            } => Err(HvError::Command {
                name: spec.name.clone(),
                cmd,
                status,
                detail: format!("{stderr} (config: {cfg_s})"),
            }),
            Xl::TimedOut(cmd) => Err(HvError::CommandTimeout {
                name: spec.name.clone(),
                cmd,
                timeout: CREATE_TIMEOUT,
                fix: "check `xl dmesg` and /var/log/xen; then `xl destroy` the qube",
            }),
        }
    }

    fn shutdown_domain(
        &self,
        name: &str,
        run_dir: &Path,
        timeout: Duration,
    ) -> Result<(), HvError> {
        if self.state(name, run_dir)? == DomainState::Halted {
            return Ok(());
        }
        // -F: an HVM guest without PV drivers gets an ACPI power button press instead.
        match self.xl(name, &["shutdown", "-F", "-w", name], timeout)? {
            Xl::Ok(_) => self.reap_shut_down(name),
            Xl::Failed { stderr, .. } => {
                // The wait can fail while the domain is already going (seen on a loaded
                // nested Xen); destroying it then races xl's own teardown, whose
                // hotplug scripts find their nodes gone and fail the destroy.
                if self.state(name, run_dir)? == DomainState::Halted {
                    tracing::warn!(
                        qube = name,
                        "xl shutdown failed ({stderr}) but the domain is going"
                    );
                    return self.reap_shut_down(name);
                }
                tracing::warn!(qube = name, "xl shutdown failed ({stderr}), destroying");
                self.destroy_domain(name, run_dir)
            }
            Xl::TimedOut(_) => {
                tracing::warn!(qube = name, ?timeout, "guest did not shut down, destroying");
                self.destroy_domain(name, run_dir)
            }
        }
    }

    /// After `xl shutdown -w` the domain can linger in the shutdown state until xl's
    /// monitor destroys it (found on real Xen: still in `xl list` when the shutdown
    /// returned), and a start of the same name would then fail. Wait for it to go, then
    /// destroy what is left: it has already shut down.
    fn reap_shut_down(&self, name: &str) -> Result<(), HvError> {
        if self.gone_within(name, self.linger)? {
            return Ok(());
        }
        tracing::info!(
            qube = name,
            "domain still listed {:?} after its shutdown; destroying it",
            self.linger
        );
        self.destroy_listed(name)
    }

    /// Whether `name` leaves `xl list` within `wait`.
    fn gone_within(&self, name: &str, wait: Duration) -> Result<bool, HvError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if !self.listed(name)? {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn listed(&self, name: &str) -> Result<bool, HvError> {
        Ok(matches!(self.xl(name, &["list", name], XL_TIMEOUT)?,
            Xl::Ok(out) if parse_xl_list(&out, name).is_some()))
    }

    /// `xl destroy NAME`, and success when the domain is gone even though xl said it
    /// failed: a destroy that races the one xl's monitor is doing (the domain died on
    /// its own meanwhile) fails in libxl ("unable to find domain info", the block
    /// hotplug script finding its device gone) after the domain went away. Found on
    /// real Xen under load.
    fn destroy_listed(&self, name: &str) -> Result<(), HvError> {
        match self.xl(name, &["destroy", name], XL_TIMEOUT)? {
            Xl::Ok(_) => Ok(()),
            Xl::Failed { stderr, .. } if stderr.contains("invalid domain identifier") => Ok(()),
            failed => {
                if self.gone_within(name, Duration::from_secs(5))? {
                    tracing::warn!(
                        qube = name,
                        "xl destroy reported a failure but the domain is gone"
                    );
                    return Ok(());
                }
                Err(failed.into_error(name, "check `xl list` and xenstored"))
            }
        }
    }

    /// `xl ARGS` that either works or fails with `on_fail(stderr)`; a hang is a timeout.
    fn xl_run(
        &self,
        name: &str,
        args: &[&str],
        on_fail: impl FnOnce(String) -> HvError,
    ) -> Result<(), HvError> {
        match self.xl(name, args, XL_TIMEOUT)? {
            Xl::Ok(_) => Ok(()),
            Xl::Failed { stderr, .. } => Err(on_fail(stderr)),
            Xl::TimedOut(cmd) => Err(HvError::CommandTimeout {
                name: name.to_string(),
                cmd,
                timeout: XL_TIMEOUT,
                fix: "check that xenstored runs",
            }),
        }
    }

    /// `xl OP NAME` for pause/unpause.
    fn xl_simple(&self, name: &str, op: &'static str) -> Result<(), HvError> {
        self.xl_run(name, &[op, name], |reason| HvError::NotRunning {
            name: name.to_string(),
            op,
            reason,
        })
    }

    fn destroy_domain(&self, name: &str, run_dir: &Path) -> Result<(), HvError> {
        if self.state(name, run_dir)? == DomainState::Halted {
            return Ok(());
        }
        self.destroy_listed(name)
    }

    fn xl(&self, name: &str, args: &[&str], timeout: Duration) -> Result<Xl, HvError> {
        let bin = find_tool(&self.xl, XL_FIX)?;
        let cmd = format!("xl {}", args.join(" "));
        let out = run_with_timeout(Command::new(&bin).args(args), timeout)
            .map_err(io_err(name, format!("running {cmd}")))?;
        match out {
            None => Ok(Xl::TimedOut(cmd)),
            Some(o) if o.status.success() => Ok(Xl::Ok(o.stdout)),
            Some(o) => Ok(Xl::Failed {
                cmd,
                status: o.status.to_string(),
                stderr: o.stderr.trim().to_string(),
            }),
        }
    }
}

enum Xl {
    Ok(String),
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    TimedOut(String),
}

impl Xl {
    /// The error for a failed or hung `xl` call (not for `Ok`, which callers handle).
    fn into_error(self, name: &str, fix: &'static str) -> HvError {
        match self {
            Xl::Ok(out) => HvError::Command {
                name: name.to_string(),
                cmd: "xl".into(),
                status: "0".into(),
                detail: out,
            },
            Xl::Failed {
                cmd,
                status,
                stderr,
            } => HvError::Command {
                name: name.to_string(),
                cmd,
                status,
                detail: stderr,
            },
            Xl::TimedOut(cmd) => HvError::CommandTimeout {
                name: name.to_string(),
                cmd,
                timeout: XL_TIMEOUT,
                fix,
            },
        }
    }
}

impl Hypervisor for Xen {
    fn name(&self) -> &'static str {
        "xen"
    }

    fn start(&self, spec: &DomainSpec) -> Result<(), HvError> {
        config_text(spec)?;
        let state = self.state(&spec.name, &spec.run_dir)?;
        if state != DomainState::Halted {
            return Err(HvError::AlreadyRunning {
                name: spec.name.clone(),
                state,
            });
        }
        fs::create_dir_all(&spec.run_dir).map_err(io_err(&spec.name, "creating run dir"))?;
        // Devices left attached by a run that ended without us (controller crash).
        self.detach_kernel_nbd(&spec.name, &spec.run_dir)?;
        let result = self.create(spec);
        if result.is_err() {
            // Leave no /dev/nbdN attached for a domain that does not exist.
            let _ = self.detach_kernel_nbd(&spec.name, &spec.run_dir);
        }
        result
    }

    fn shutdown(&self, name: &str, run_dir: &Path, timeout: Duration) -> Result<(), HvError> {
        self.shutdown_domain(name, run_dir, timeout)?;
        self.detach_kernel_nbd(name, run_dir)
    }

    fn pause(&self, name: &str, _run_dir: &Path) -> Result<(), HvError> {
        self.xl_simple(name, "pause")
    }

    /// The vif itself comes with the client's config; its backend must be servable now.
    fn attach_client(
        &self,
        netvm: &str,
        _netvm_run_dir: &Path,
        client: &str,
        _socket: &Path,
        _mac: &str,
    ) -> Result<(), HvError> {
        self.wait_net_backend(netvm, client)
    }

    fn unpause(&self, name: &str, _run_dir: &Path) -> Result<(), HvError> {
        self.xl_simple(name, "unpause")
    }

    /// `xl mem-set`: the guest's balloon driver follows, up to the config's maxmem.
    fn set_memory(&self, name: &str, _run_dir: &Path, mib: u64) -> Result<(), HvError> {
        self.xl_run(name, &["mem-set", name, &format!("{mib}m")], |reason| {
            HvError::Memory {
                name: name.to_string(),
                mib,
                reason,
            }
        })
    }

    fn kill(&self, name: &str, run_dir: &Path) -> Result<(), HvError> {
        self.destroy_domain(name, run_dir)?;
        self.detach_kernel_nbd(name, run_dir)
    }
    fn state(&self, name: &str, _run_dir: &Path) -> Result<DomainState, HvError> {
        match self.xl(name, &["list", name], XL_TIMEOUT)? {
            Xl::Ok(out) => Ok(parse_xl_list(&out, name).unwrap_or(DomainState::Halted)),
            Xl::Failed { stderr, .. } if stderr.contains("invalid domain identifier") => {
                Ok(DomainState::Halted)
            }
            other => Err(other.into_error(name, "check that xenstored runs")),
        }
    }

    /// xenconsoled's per-guest log (needs `XENCONSOLED_TRACE=guest`).
    fn console_log(&self, run_dir: &Path) -> PathBuf {
        let name = fs::read_to_string(run_dir.join("domain.name"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| {
                run_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        PathBuf::from(format!("/var/log/xen/console/guest-{name}.log"))
    }
}

/// The state of `name` from `xl list NAME` output, `None` when it is not listed.
/// State flags (xl(1)): r running, b blocked, p paused, s shutdown, c crashed, d dying.
pub fn parse_xl_list(stdout: &str, name: &str) -> Option<DomainState> {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    let flags = line.split_whitespace().nth(4)?;
    Some(if flags.contains(['s', 'c', 'd']) {
        DomainState::Halted
    } else if flags.contains('p') {
        DomainState::Paused
    } else {
        DomainState::Running
    })
}

/// A double-quoted xl config string. libxlutil understands the C escapes used here;
/// other control characters have no business in a domain config.
pub fn quote(name: &str, what: &str, value: &str) -> Result<String, HvError> {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('"');
    for c in value.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => {
                return Err(HvError::InvalidSpec {
                    name: name.to_string(),
                    reason: format!("{what} holds control character {c:?}"),
                })
            }
            c => s.push(c),
        }
    }
    s.push('"');
    Ok(s)
}

/// The xl DISKSPEC for one disk (before config-string quoting).
pub fn disk_spec_string(d: &DiskSpec) -> String {
    let socket = d.nbd_socket.to_string_lossy();
    // libxlutil takes everything after `target=` verbatim (checked against libxlutil
    // 4.17 in tests/xen_config.rs: backslashes are not unescaped there), so only the
    // config-string quoting around the whole spec escapes anything.
    let target = format!("nbd:unix:{socket}:exportname={}", d.export);
    format!(
        "format=raw,vdev={},access={},backendtype=qdisk,target={target}",
        d.vdev,
        if d.read_only { "ro" } else { "rw" }
    )
}

fn check_spec(spec: &DomainSpec) -> Result<(), HvError> {
    let bad = |reason: String| {
        Err(HvError::InvalidSpec {
            name: spec.name.clone(),
            reason,
        })
    };
    let simple = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !simple(&spec.name) {
        return bad(format!("bad qube name {:?}", spec.name));
    }
    if spec.memory_mib == 0 || spec.vcpus == 0 {
        return bad("memory and vcpus must be non-zero".into());
    }
    if spec.maxmem_mib != 0 && spec.maxmem_mib < spec.memory_mib {
        return bad(format!(
            "maxmem {} MiB is below memory {} MiB",
            spec.maxmem_mib, spec.memory_mib
        ));
    }
    if spec.virt_mode != VirtMode::Hvm && spec.kernel.is_none() {
        return bad(format!(
            "virt_mode {} needs a kernel; set the qube's kernel or use hvm",
            spec.virt_mode
        ));
    }
    for d in &spec.disks {
        // vdev is not the last field, so it must not contain the spec separators.
        if !simple(&d.vdev) {
            return bad(format!("bad disk vdev {:?}", d.vdev));
        }
        // libxlutil drops a trailing comma or blank from the target (found by the
        // property test in tests/xen_config.rs), so such an export could not round-trip.
        if d.export.ends_with(|c: char| c == ',' || c.is_whitespace()) {
            return bad(format!(
                "export name {:?} ends with a comma or blank, which xl's disk syntax drops",
                d.export
            ));
        }
    }
    if let Some(n) = &spec.netvm {
        if !simple(n) {
            return bad(format!("bad netvm name {n:?}"));
        }
    }
    if let Some(b) = &spec.net.uplink_bridge {
        if !is_ifname(b) {
            return bad(format!("bad uplink bridge name {b:?}"));
        }
        if !spec.net.provides_network || spec.netvm.is_some() {
            return bad(format!(
                "an uplink (bridge {b}) is only for a netvm without a netvm of its own"
            ));
        }
    }
    if !spec.net.ip.is_empty() && spec.net.ip.parse::<std::net::Ipv4Addr>().is_err() {
        return bad(format!(
            "bad IP address {:?}: a dotted IPv4 address",
            spec.net.ip
        ));
    }
    // Part of the VIFSPEC, so no separator may hide in it.
    let octets: Vec<&str> = spec.net.mac.split(':').collect();
    if !spec.net.mac.is_empty()
        && (octets.len() != 6
            || !octets
                .iter()
                .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit())))
    {
        return bad(format!(
            "bad MAC {:?}: six hex octets joined by ':'",
            spec.net.mac
        ));
    }
    Ok(())
}

/// The DISKSPEC of a disk attached in dom0 as block device `dev` (kernel NBD and phy modes).
pub fn phy_disk_spec_string(d: &DiskSpec, dev: &Path) -> String {
    format!(
        "format=raw,vdev={},access={},backendtype=phy,target={}",
        d.vdev,
        if d.read_only { "ro" } else { "rw" },
        dev.display()
    )
}

/// The xl VIFSPEC of the qube's one NIC, served by its netvm. The MAC is the one the
/// controller put on the guest's command line (`qubes.mac=`): the guest integration
/// finds its NIC by it, and libxl would otherwise pick a random one. `ip=` is the
/// qube's address: libxl writes it to the backend's directory in the netvm, whose vif
/// hotplug routes it to this link (as Qubes' vif-route-qubes does).
pub fn vif_spec_string(spec: &DomainSpec, netvm: &str) -> String {
    let mut s = format!("backend={netvm}");
    if !spec.net.mac.is_empty() {
        s.push_str(&format!(",mac={}", spec.net.mac));
    }
    if !spec.net.ip.is_empty() {
        s.push_str(&format!(",ip={}", spec.net.ip));
    }
    s
}

/// The xl VIFSPEC of a netvm's uplink: backend dom0 (the default), on dom0's `bridge`
/// (Xen's `vif-bridge` script, libxl's default), with the netvm's MAC, which its guest
/// integration configures by DHCP.
pub fn uplink_vif_spec_string(spec: &DomainSpec, bridge: &str) -> String {
    let mut s = format!("bridge={bridge}");
    if !spec.net.mac.is_empty() {
        s.push_str(&format!(",mac={}", spec.net.mac));
    }
    s
}

/// `/dev/nbdN` devices with no client attached, in N order. The kernel shows an
/// attached device by a `pid` file in its sysfs directory.
pub fn free_nbd_devices(sys_block: &Path) -> Vec<PathBuf> {
    let mut found: Vec<u32> = fs::read_dir(sys_block)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n: u32 = name.strip_prefix("nbd")?.parse().ok()?;
                    (!e.path().join("pid").exists()).then_some(n)
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_unstable();
    found
        .into_iter()
        .map(|n| PathBuf::from(format!("/dev/nbd{n}")))
        .collect()
}

/// Percent-encodes what an NBD URI's path or query value may not hold verbatim.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The xl config for `spec` (what `start` writes to `run_dir/xl.cfg`), disks through
/// QEMU's qdisk backend.
pub fn config_text(spec: &DomainSpec) -> Result<String, HvError> {
    check_spec(spec)?;
    let disks: Vec<String> = spec.disks.iter().map(disk_spec_string).collect();
    render(spec, &disks)
}

/// Every disk's own block device ([`XenDiskMode::Phy`]), or an error naming the first
/// disk without one and the way out.
pub fn own_block_devices(spec: &DomainSpec) -> Result<Vec<PathBuf>, HvError> {
    spec.disks
        .iter()
        .map(|d| {
            d.block_device.clone().ok_or_else(|| HvError::InvalidSpec {
                name: spec.name.clone(),
                reason: format!(
                    "QUBES_XEN_DISKS=phy gives domains their volumes' own block devices, and {} ({}) has none: only lvm_thin pools have them; start the daemon without QUBES_XEN_DISKS (blkif) for this pool",
                    d.vdev, d.export
                ),
            })
        })
        .collect()
}

/// The xl config for `spec` with disk `i` attached in dom0 as `devices[i]`
/// ([`XenDiskMode::KernelNbd`]).
pub fn config_text_phy(spec: &DomainSpec, devices: &[PathBuf]) -> Result<String, HvError> {
    check_spec(spec)?;
    if devices.len() != spec.disks.len() {
        return Err(HvError::InvalidSpec {
            name: spec.name.clone(),
            reason: format!("{} disks but {} devices", spec.disks.len(), devices.len()),
        });
    }
    let disks: Vec<String> = spec
        .disks
        .iter()
        .zip(devices)
        .map(|(d, dev)| phy_disk_spec_string(d, dev))
        .collect();
    render(spec, &disks)
}

/// The xl config for `spec` with no disk lines ([`XenDiskMode::Blkif`]: the controller
/// adds the disks itself, under its own backend type directory).
pub fn config_text_no_disks(spec: &DomainSpec) -> Result<String, HvError> {
    check_spec(spec)?;
    render(spec, &[])
}

fn render(spec: &DomainSpec, disk_specs: &[String]) -> Result<String, HvError> {
    let n = &spec.name;
    let q = |what: &str, v: &str| quote(n, what, v);
    let mut c = String::new();
    c.push_str(&format!(
        "# generated by qubes-ctl for qube {n} (label {}); regenerated at every start\n",
        spec.label.replace(['\n', '\r'], " ")
    ));
    c.push_str(&format!("name = {}\n", q("name", n)?));
    c.push_str(&format!("type = \"{}\"\n", spec.virt_mode.as_str()));
    c.push_str(&format!("memory = {}\n", spec.memory_mib));
    c.push_str(&format!(
        "maxmem = {}\n",
        spec.maxmem_mib.max(spec.memory_mib)
    ));
    c.push_str(&format!("vcpus = {}\n", spec.vcpus));
    if let Some(k) = &spec.kernel {
        c.push_str(&format!(
            "kernel = {}\n",
            q("kernel", &k.to_string_lossy())?
        ));
    }
    if let Some(i) = &spec.initrd {
        c.push_str(&format!(
            "ramdisk = {}\n",
            q("initrd", &i.to_string_lossy())?
        ));
    }
    let cmdline = match spec.virt_mode {
        VirtMode::Pv | VirtMode::Pvh => with_console(&spec.cmdline, "hvc0"),
        VirtMode::Hvm => spec.cmdline.trim().to_string(),
    };
    if spec.kernel.is_some() && !cmdline.is_empty() {
        c.push_str(&format!("cmdline = {}\n", q("cmdline", &cmdline)?));
    }
    let disks = disk_specs
        .iter()
        .map(|d| q("disk", d))
        .collect::<Result<Vec<_>, _>>()?;
    c.push_str(&format!("disk = [ {} ]\n", disks.join(", ")));
    match (&spec.netvm, &spec.net.uplink_bridge) {
        (Some(netvm), _) => c.push_str(&format!(
            "vif = [ {} ]\n",
            q("vif", &vif_spec_string(spec, netvm))?
        )),
        (None, Some(bridge)) => c.push_str(&format!(
            "vif = [ {} ]\n",
            q("vif", &uplink_vif_spec_string(spec, bridge))?
        )),
        (None, None) => c.push_str("vif = [ ]\n"),
    }
    c.push_str("on_poweroff = \"destroy\"\n");
    c.push_str("on_reboot = \"destroy\"\n");
    c.push_str("on_crash = \"destroy\"\n");
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: VirtMode) -> DomainSpec {
        DomainSpec {
            name: "work".into(),
            memory_mib: 400,
            maxmem_mib: 4000,
            vcpus: 2,
            virt_mode: mode,
            kernel: Some("/var/lib/qubes/vm-kernels/6.1/vmlinuz".into()),
            initrd: Some("/var/lib/qubes/vm-kernels/6.1/initramfs".into()),
            cmdline: "root=/dev/xvda ro".into(),
            disks: vec![DiskSpec {
                vdev: "xvda".into(),
                nbd_socket: "/run/qubes/work/nbd.sock".into(),
                export: "work/root".into(),
                read_only: true,
                block_device: None,
            }],
            netvm: Some("sys-firewall".into()),
            net: Default::default(),
            label: "blue".into(),
            run_dir: "/run/qubes/work".into(),
            user: None,
        }
    }

    #[test]
    fn phy_mode_gives_each_volume_its_own_block_device_or_names_the_one_without() {
        assert_eq!(
            XenDiskMode::from_env_value(Some("phy")),
            Ok(XenDiskMode::Phy)
        );
        let mut s = spec(VirtMode::Pv);
        let e = own_block_devices(&s).unwrap_err().to_string();
        assert!(
            e.contains("xvda (work/root)") && e.contains("lvm_thin"),
            "{e}"
        );
        s.disks[0].block_device = Some("/dev/qubes_dom0/vm-work-root-snap".into());
        let c = config_text_phy(&s, &own_block_devices(&s).unwrap()).unwrap();
        assert!(
            c.contains("disk = [ \"format=raw,vdev=xvda,access=ro,backendtype=phy,target=/dev/qubes_dom0/vm-work-root-snap\" ]"),
            "{c}"
        );
    }

    #[test]
    fn config_has_the_expected_lines() {
        let c = config_text(&spec(VirtMode::Pvh)).unwrap();
        assert!(c.contains("name = \"work\"\n"), "{c}");
        assert!(c.contains("type = \"pvh\"\n"));
        assert!(c.contains("memory = 400\nmaxmem = 4000\nvcpus = 2\n"));
        assert!(c.contains("cmdline = \"root=/dev/xvda ro console=hvc0\"\n"));
        assert!(c.contains(
            "disk = [ \"format=raw,vdev=xvda,access=ro,backendtype=qdisk,\
             target=nbd:unix:/run/qubes/work/nbd.sock:exportname=work/root\" ]"
        ));
        assert!(c.contains("vif = [ \"backend=sys-firewall\" ]"));
        assert!(c.contains("on_poweroff = \"destroy\""));
    }

    #[test]
    fn the_vif_carries_the_mac_the_guest_looks_for() {
        let mut s = spec(VirtMode::Pvh);
        s.net.mac = "00:16:3e:5e:6c:05".into();
        let c = config_text(&s).unwrap();
        assert!(
            c.contains("vif = [ \"backend=sys-firewall,mac=00:16:3e:5e:6c:05\" ]"),
            "{c}"
        );
        // The netvm's vif hotplug reads the client's address from the backend (`ip`).
        s.net.ip = "10.137.0.5".into();
        let c = config_text(&s).unwrap();
        assert!(
            c.contains("vif = [ \"backend=sys-firewall,mac=00:16:3e:5e:6c:05,ip=10.137.0.5\" ]"),
            "{c}"
        );
        for bad in ["10.137.0", "10.137.0.5,mac=x", "10.137.0.500"] {
            s.net.ip = bad.into();
            assert!(config_text(&s).is_err(), "ip {bad} accepted");
        }
        s.net.ip = String::new();
        for bad in [
            "00:16:3e:5e:6c",
            "00:16:3e:5e:6c:05,ip=1.2.3.4",
            "zz:16:3e:5e:6c:05",
        ] {
            s.net.mac = bad.into();
            assert!(config_text(&s).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_netvm_without_a_netvm_gets_its_uplink_on_dom0s_bridge() {
        let tmp = tempfile::tempdir().unwrap();
        let sys_net = tmp.path();
        let mut s = spec(VirtMode::Pv);
        s.netvm = None;
        s.net.provides_network = true;
        s.net.mac = "00:16:3e:5e:6c:02".into();
        let xen = Xen::with_xl("xl").with_uplink_bridge(Some("xenbr0"), sys_net);
        // dom0 without the bridge: no uplink (the netvm still starts).
        assert_eq!(xen.with_uplink(&s).net.uplink_bridge, None);
        fs::create_dir_all(sys_net.join("xenbr0")).unwrap();
        assert_eq!(
            xen.with_uplink(&s).net.uplink_bridge,
            None,
            "an interface that is not a bridge"
        );
        fs::create_dir_all(sys_net.join("xenbr0/bridge")).unwrap();
        let up = xen.with_uplink(&s);
        assert_eq!(up.net.uplink_bridge.as_deref(), Some("xenbr0"));
        let c = config_text(&up).unwrap();
        assert!(
            c.contains("vif = [ \"bridge=xenbr0,mac=00:16:3e:5e:6c:02\" ]"),
            "{c}"
        );
        // Only a netvm without a netvm of its own has an uplink.
        let mut client = s.clone();
        client.net.provides_network = false;
        assert_eq!(xen.with_uplink(&client).net.uplink_bridge, None);
        let mut chained = s.clone();
        chained.netvm = Some("sys-net".into());
        let c = config_text(&xen.with_uplink(&chained)).unwrap();
        assert!(c.contains("vif = [ \"backend=sys-net,mac="), "{c}");
        client.net.uplink_bridge = Some("xenbr0".into());
        assert!(config_text(&client).is_err());
        // Turned off, or another bridge.
        let off = Xen::with_xl("xl").with_uplink_bridge(None, sys_net);
        assert_eq!(off.with_uplink(&s).net.uplink_bridge, None);
        let mut bad = up.clone();
        bad.net.uplink_bridge = Some("br0,script=/bin/evil".into());
        assert!(config_text(&bad).is_err());
    }

    #[test]
    fn the_uplink_bridge_comes_from_the_environment() {
        assert_eq!(
            uplink_bridge_from_env_value(None),
            Ok(Some("xenbr0".into()))
        );
        assert_eq!(uplink_bridge_from_env_value(Some("none")), Ok(None));
        assert_eq!(uplink_bridge_from_env_value(Some("")), Ok(None));
        assert_eq!(
            uplink_bridge_from_env_value(Some("br-lan")),
            Ok(Some("br-lan".into()))
        );
        for bad in ["a,b", "sixteen-chars-xx", "..", "a b"] {
            let e = uplink_bridge_from_env_value(Some(bad)).unwrap_err();
            assert!(e.contains("none"), "{e}");
        }
    }

    #[test]
    fn blkif_config_has_no_disks_but_everything_else() {
        let s = spec(VirtMode::Pv);
        let c = config_text_no_disks(&s).unwrap();
        let disk_line = c.lines().find(|l| l.starts_with("disk =")).unwrap();
        assert_eq!(disk_line.replace(' ', ""), "disk=[]", "{c}");
        assert!(!c.contains("nbd"), "{c}");
        let full = config_text(&s).unwrap();
        let strip = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("disk ="))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&c), strip(&full));
        // The spec is still checked.
        let mut bad = spec(VirtMode::Pv);
        bad.name = "a b".into();
        assert!(config_text_no_disks(&bad).is_err());
        assert_eq!(
            Xen::with_xl("xl")
                .with_disk_mode(XenDiskMode::Blkif)
                .disk_mode(),
            XenDiskMode::Blkif
        );
    }

    #[test]
    fn blkif_is_the_default_disk_path_and_nbd_the_fallback() {
        assert_eq!(XenDiskMode::from_env_value(None), Ok(XenDiskMode::Blkif));
        assert_eq!(
            XenDiskMode::from_env_value(Some("")),
            Ok(XenDiskMode::Blkif)
        );
        assert_eq!(
            XenDiskMode::from_env_value(Some("blkif")),
            Ok(XenDiskMode::Blkif)
        );
        assert_eq!(
            XenDiskMode::from_env_value(Some("nbd")),
            Ok(XenDiskMode::KernelNbd)
        );
        assert_eq!(
            XenDiskMode::from_env_value(Some("kernel-nbd")),
            Ok(XenDiskMode::KernelNbd)
        );
        assert_eq!(
            XenDiskMode::from_env_value(Some("qdisk")),
            Ok(XenDiskMode::Qdisk)
        );
        let e = XenDiskMode::from_env_value(Some("tap")).unwrap_err();
        assert!(e.contains("nbd"), "{e}");
    }

    #[test]
    fn hvm_without_kernel_has_no_boot_lines() {
        let mut s = spec(VirtMode::Hvm);
        s.kernel = None;
        s.initrd = None;
        s.netvm = None;
        let c = config_text(&s).unwrap();
        assert!(!c.contains("kernel"));
        assert!(!c.contains("cmdline"));
        assert!(c.contains("vif = [ ]"));
        let mut s = spec(VirtMode::Pv);
        s.kernel = None;
        assert!(config_text(&s).is_err());
    }

    #[test]
    fn quoting_escapes_and_refuses_control_characters() {
        assert_eq!(quote("q", "x", r#"a"b\c"#).unwrap(), r#""a\"b\\c""#);
        assert!(quote("q", "cmdline", "a\nb").is_err());
        let mut s = spec(VirtMode::Pv);
        s.name = "work\"; evil = 1".into();
        assert!(config_text(&s).is_err());
        let mut s = spec(VirtMode::Pv);
        s.disks[0].export = "work/root,".into();
        let e = config_text(&s).unwrap_err().to_string();
        assert!(e.contains("drops"), "{e}");
    }

    #[test]
    fn xl_list_flags_map_to_states() {
        let out = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                   work                                         3   400     2     -b----       1.2\n";
        assert_eq!(parse_xl_list(out, "work"), Some(DomainState::Running));
        let paused = out.replace("-b----", "--p---");
        assert_eq!(parse_xl_list(&paused, "work"), Some(DomainState::Paused));
        let dying = out.replace("-b----", "-----d");
        assert_eq!(parse_xl_list(&dying, "work"), Some(DomainState::Halted));
        assert_eq!(parse_xl_list(out, "other"), None);
    }
}
