//! Hypervisor backends: how the controller turns a qube into a running domain.
//!
//! ```text
//!   qubes-ctl (daemon) --DomainSpec--> dyn Hypervisor
//!        |                               |-- qemu: qemu-system-x86_64 (KVM if it really works, else TCG),
//!        |                               |         direct kernel boot, virtio-blk on NBD, QMP control
//!        |                               |-- xen:  xl config in run_dir, `xl create/shutdown/destroy`,
//!        |                               |         disks through QEMU's qdisk pointed at the NBD socket
//!        |                               `-- none: no domain; state kept in run_dir (tests, debugging)
//!        `-- serves the NBD exports named in DiskSpec (blkback), one unix socket per qube
//! ```
//!
//! Contract every backend keeps:
//! - All per-domain state lives in the spec's `run_dir` (pidfile, QMP socket, config,
//!   console log), so a restarted controller finds its domains again from the run dir.
//! - `start` refuses a domain that is already running; `shutdown` and `kill` of a halted
//!   domain succeed (idempotent, so a controller can retry after a crash).
//! - `state` notices a guest that powered itself off: backends run domains with
//!   "poweroff/reboot/crash = destroy", so a guest that stops is gone, not lingering.
//! - Disks are attached in the order given (root, private, volatile): the guest sees
//!   them as vda, vdb, vdc on QEMU and as the given `vdev` (xvda..) on Xen.
//! - Errors name the qube and say what to do.
//!
//! Using it from the controller:
//!
//! ```no_run
//! use std::time::Duration;
//! use hypervisor::{by_name, DiskSpec, DomainSpec, DomainState, VirtMode};
//!
//! let hv = by_name("qemu")?; // or hypervisor::default_hypervisor()
//! let spec = DomainSpec {
//!     name: "work".into(),
//!     memory_mib: 400,
//!     maxmem_mib: 4000,
//!     vcpus: 2,
//!     virt_mode: VirtMode::Pvh,
//!     kernel: Some("/var/lib/qubes/vm-kernels/6.1/vmlinuz".into()),
//!     initrd: Some("/var/lib/qubes/vm-kernels/6.1/initramfs".into()),
//!     cmdline: "root=/dev/vda ro".into(), // QEMU: vda..; Xen: the vdev names
//!     disks: vec![DiskSpec {
//!         vdev: "xvda".into(),
//!         nbd_socket: "/run/qubes/work/nbd.sock".into(),
//!         export: "work/root".into(),
//!         read_only: false,
//!         block_device: None,
//!     }],
//!     netvm: None,
//!     net: Default::default(),
//!     label: "blue".into(),
//!     run_dir: "/run/qubes/work".into(),
//!     user: None,
//! };
//! hv.start(&spec)?;
//! if hv.state("work", &spec.run_dir)? == DomainState::Running {
//!     hv.shutdown("work", &spec.run_dir, Duration::from_secs(60))?;
//! }
//! # Ok::<(), hypervisor::HvError>(())
//! ```

pub mod initramfs;
pub mod none;
pub mod qemu;
mod qmp;
mod util;
pub mod xen;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use none::NoneHv;
pub use qemu::{Accel, KvmVerdict, Qemu};
pub use xen::{Xen, XenDiskMode};

/// How a Xen domain is virtualised. QEMU ignores it (always a full PC with KVM or TCG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtMode {
    Pv,
    Pvh,
    Hvm,
}

impl VirtMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VirtMode::Pv => "pv",
            VirtMode::Pvh => "pvh",
            VirtMode::Hvm => "hvm",
        }
    }
}

impl fmt::Display for VirtMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VirtMode {
    type Err = HvError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pv" => Ok(VirtMode::Pv),
            "pvh" => Ok(VirtMode::Pvh),
            "hvm" => Ok(VirtMode::Hvm),
            _ => Err(HvError::UnknownVirtMode(s.to_string())),
        }
    }
}

/// One disk of a domain: an NBD export on a unix socket served by the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Xen virtual device name (`xvda`, `xvdb`, ...). QEMU uses it as the virtio serial.
    pub vdev: String,
    pub nbd_socket: PathBuf,
    pub export: String,
    pub read_only: bool,
    /// The volume as a kernel block device of this host, when its pool has one (an
    /// `lvm_thin` LV): Xen's [`XenDiskMode::Phy`] hands it to dom0's blkback as Qubes
    /// does. Other paths ignore it.
    #[serde(default)]
    pub block_device: Option<PathBuf>,
}

/// Everything a backend needs to start one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSpec {
    pub name: String,
    pub memory_mib: u64,
    pub maxmem_mib: u64,
    pub vcpus: u32,
    pub virt_mode: VirtMode,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Backends add a `console=` for their console device when
    /// the command line has none.
    pub cmdline: String,
    /// In the order root, private, volatile.
    pub disks: Vec<DiskSpec>,
    pub netvm: Option<String>,
    /// How the domain's network is wired (see [`NetSpec`]).
    #[serde(default)]
    pub net: NetSpec,
    pub label: String,
    /// Per-qube directory for logs, QMP socket, pidfile, generated config.
    pub run_dir: PathBuf,
    /// The unprivileged user the domain's device model runs as (QEMU), so a compromised
    /// QEMU holds no more than its own qube's files; `None`: the backend's own identity.
    #[serde(default)]
    pub user: Option<DomainUser>,
}

/// A numeric uid and gid, not necessarily in /etc/passwd (the kernel needs only numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainUser {
    pub uid: u32,
    pub gid: u32,
}

/// Qubes' network topology for one domain: a qube reaches the network only through its
/// netvm; a netvm (provides_network) without a netvm of its own has the uplink.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetSpec {
    /// Other qubes use this one as their netvm (Qubes' `provides_network`).
    pub provides_network: bool,
    /// With a netvm, on QEMU: the unix socket the netvm's domain listens on for this
    /// qube's link ([`Hypervisor::attach_client`] creates it). Xen's vif needs none.
    pub netvm_socket: Option<PathBuf>,
    /// MAC of the qube's NIC (empty: the backend's default).
    pub mac: String,
    /// The qube's address on the qubes network (empty: none). On Xen it goes into the
    /// vif (`ip=`), so libxl writes it to the backend's xenstore directory in the netvm,
    /// where the netvm's vif hotplug reads which client the link serves.
    pub ip: String,
    /// Xen, a netvm without a netvm of its own: the dom0 bridge its uplink vif joins
    /// (standing in for sys-net's physical NIC, as QEMU's user-mode NIC does). The
    /// controller leaves it empty; the Xen backend fills it at start when dom0 has that
    /// bridge (`xen::UPLINK_BRIDGE_ENV`).
    pub uplink_bridge: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainState {
    Running,
    Paused,
    Halted,
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Halted => "halted",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("{tool} not found: {fix}")]
    ToolMissing { tool: String, fix: &'static str },
    #[error("qube {name}: invalid domain spec: {reason}")]
    InvalidSpec { name: String, reason: String },
    #[error("qube {name}: already running (state {state}); shut it down first")]
    AlreadyRunning { name: String, state: DomainState },
    #[error("qube {name}: {op}: {source}")]
    Io {
        name: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qube {name}: `{cmd}` failed ({status}): {detail}")]
    Command {
        name: String,
        cmd: String,
        status: String,
        detail: String,
    },
    #[error("qube {name}: `{cmd}` did not finish within {timeout:?}; {fix}")]
    CommandTimeout {
        name: String,
        cmd: String,
        timeout: Duration,
        fix: &'static str,
    },
    #[error("qube {name}: QMP {op} failed: {reason}")]
    Qmp {
        name: String,
        op: String,
        reason: String,
    },
    #[error("qube {name}: still running after kill; check process {pid} by hand")]
    KillFailed { name: String, pid: i32 },
    #[error("unknown hypervisor {0:?}: expected \"xen\", \"qemu\" or \"none\"")]
    UnknownBackend(String),
    #[error("unknown virt_mode {0:?}: expected \"pv\", \"pvh\" or \"hvm\"")]
    UnknownVirtMode(String),
    #[error("qube {name}: cannot {op}: {reason}")]
    NotRunning {
        name: String,
        op: &'static str,
        reason: String,
    },
    #[error("qube {name}: cannot set memory to {mib} MiB: {reason}")]
    Memory {
        name: String,
        mib: u64,
        reason: String,
    },
    #[error("KVM probe failed to run: {0}")]
    Probe(String),
}

/// One hypervisor backend. Methods take the qube name and its run dir rather than a
/// handle, so a controller restarted while domains run can still manage them.
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    /// Starts the domain; returns once the domain exists (not once the guest booted).
    fn start(&self, spec: &DomainSpec) -> Result<(), HvError>;
    /// Asks the guest to power off, waits up to `timeout`, then kills it.
    fn shutdown(&self, name: &str, run_dir: &Path, timeout: Duration) -> Result<(), HvError>;
    /// Ends the domain at once. Succeeds on a halted domain.
    fn kill(&self, name: &str, run_dir: &Path) -> Result<(), HvError>;
    fn state(&self, name: &str, run_dir: &Path) -> Result<DomainState, HvError>;
    /// Freezes the guest's vCPUs (`qvm-pause`); memory and devices stay.
    fn pause(&self, name: &str, run_dir: &Path) -> Result<(), HvError>;
    /// Resumes a paused guest.
    fn unpause(&self, name: &str, run_dir: &Path) -> Result<(), HvError>;
    /// Connects `client`'s NIC to this running netvm domain: on QEMU a virtio-net device
    /// hot-plugged into the netvm, backed by a stream socket at `socket` that the
    /// client's QEMU connects to (`NetSpec::netvm_socket`). Xen: the client's
    /// `vif = [backend=NETVM]` makes the toolstack create the backend, which the netvm's
    /// kernel must be able to serve at once (libxl gives it 10 s): this waits until the
    /// netvm says it can.
    fn attach_client(
        &self,
        _netvm: &str,
        _netvm_run_dir: &Path,
        _client: &str,
        _socket: &Path,
        _mac: &str,
    ) -> Result<(), HvError> {
        Ok(())
    }
    /// Removes what [`Hypervisor::attach_client`] added (the client stopped).
    fn detach_client(
        &self,
        _netvm: &str,
        _netvm_run_dir: &Path,
        _client: &str,
    ) -> Result<(), HvError> {
        Ok(())
    }
    /// Sets the memory a running guest may use, between its `memory` and `maxmem`:
    /// what a memory balancer (Qubes' qmemman) adjusts while qubes run.
    fn set_memory(&self, name: &str, run_dir: &Path, mib: u64) -> Result<(), HvError>;
    /// Where the domain's console output is (or will be) logged.
    fn console_log(&self, run_dir: &Path) -> PathBuf;
    /// A unix socket that is the domain's interactive console (one client at a time),
    /// where the backend has one (QEMU). Xen: `xl console`.
    fn console_socket(&self, _run_dir: &Path) -> Option<PathBuf> {
        None
    }
    /// A unix socket that reaches the guest agent (`qube run`), where the backend has
    /// one (QEMU: a virtio-serial port).
    fn agent_socket(&self, _run_dir: &Path) -> Option<PathBuf> {
        None
    }
}

/// Xen where this is a Xen dom0 (`/proc/xen` exists), QEMU otherwise.
pub fn default_hypervisor() -> Box<dyn Hypervisor> {
    if Path::new("/proc/xen").exists() {
        Box::new(Xen::new())
    } else {
        Box::new(Qemu::new())
    }
}

/// `"xen" | "qemu" | "none"`.
pub fn by_name(name: &str) -> Result<Box<dyn Hypervisor>, HvError> {
    match name {
        "xen" => Ok(Box::new(Xen::new())),
        "qemu" => Ok(Box::new(Qemu::new())),
        "none" => Ok(Box::new(NoneHv::new())),
        other => Err(HvError::UnknownBackend(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virt_mode_parses_and_prints() {
        for (s, m) in [
            ("pv", VirtMode::Pv),
            ("PVH", VirtMode::Pvh),
            ("hvm", VirtMode::Hvm),
        ] {
            let parsed: VirtMode = s.parse().unwrap();
            assert_eq!(parsed, m);
            assert_eq!(parsed.to_string(), s.to_ascii_lowercase());
        }
        assert!(matches!(
            "kvm".parse::<VirtMode>(),
            Err(HvError::UnknownVirtMode(_))
        ));
        assert_eq!(serde_json::to_string(&VirtMode::Pvh).unwrap(), "\"pvh\"");
        let back: VirtMode = serde_json::from_str("\"hvm\"").unwrap();
        assert_eq!(back, VirtMode::Hvm);
    }

    #[test]
    fn by_name_knows_the_three_backends() {
        assert_eq!(by_name("xen").unwrap().name(), "xen");
        assert_eq!(by_name("qemu").unwrap().name(), "qemu");
        assert_eq!(by_name("none").unwrap().name(), "none");
        let err = by_name("vmware").err().unwrap();
        assert!(err.to_string().contains("expected"));
    }

    #[test]
    fn default_is_xen_only_on_a_xen_host() {
        let want = if Path::new("/proc/xen").exists() {
            "xen"
        } else {
            "qemu"
        };
        assert_eq!(default_hypervisor().name(), want);
    }
}
