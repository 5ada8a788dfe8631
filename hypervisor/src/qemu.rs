//! The QEMU backend: one detached `qemu-system-x86_64` per qube, run as the qube's own
//! unprivileged user when the spec names one ([`DomainSpec::user`]).
//!
//! ```text
//!   run_dir/       QEMU's working directory (owned by the qube's user, if any)
//!     qemu.args    the command line, one argument per line (for debugging)
//!     qemu.log     QEMU's stdout and stderr
//!     qemu.pid     written by QEMU (-pidfile); the domain exists while this pid lives
//!                  with the run dir as its working directory
//!     qmp.sock     QMP: query-status, system_powerdown, quit
//!     console.log  the guest's serial console (previous boot: console.log.1)
//!     console.sock the serial console itself (0600): `qubes-ctl qube console` attaches here
//!     agent.sock   the virtio-serial port of the guest agent (0600): `qubes-ctl qube run`
//! ```
//!
//! - Direct kernel boot (`-kernel/-initrd/-append`), or, for a qube without a kernel,
//!   the firmware (SeaBIOS) boots the root disk's own bootloader; disks are `-blockdev driver=nbd`
//!   on the controller's unix sockets with `reconnect-delay` (a restarted NBD server
//!   does not kill the guest), attached as virtio-blk in spec order (vda, vdb, vdc).
//!   Read-only disks are read-only nodes, so the guest sees a read-only device.
//! - `-no-reboot` without `-no-shutdown`: a guest that powers off or reboots ends
//!   the QEMU process, so `state` reads Halted from the pidfile alone.
//! - Acceleration: KVM only when a real boot under KVM finishes (some hosts expose a
//!   /dev/kvm that hangs guests), otherwise TCG. The verdict is cached per host kernel
//!   and QEMU version in `kvm-probe.json` in the parent of the run dir.
//! - Network as in Qubes: a qube with a netvm gets one virtio NIC whose other end is a
//!   virtio NIC hot-plugged into the netvm's QEMU (`-netdev stream` over a unix socket
//!   the netvm listens on, one per client, [`Hypervisor::attach_client`]); a netvm
//!   (provides_network) without a netvm of its own gets the uplink, a user-mode (slirp)
//!   NIC standing in for sys-net's physical one, and PCIe root ports for its clients; a
//!   qube without a netvm gets no NIC.
//! - Least privilege: QEMU is exec'd already as the spec's user (supplementary groups
//!   cleared, umask 0177, its own session), so it never holds root, not even while it
//!   parses its options; its seccomp sandbox then denies privilege elevation and
//!   spawning (`-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
//!   resourcecontrol=deny`). QEMU's own `-run-with user=` is not used: QEMU 10.0 drops
//!   the uid after installing the sandbox, and `elevateprivileges=deny` then kills it
//!   with SIGSYS on its own setgid/setuid. As that user QEMU reaches only what it is
//!   given: its run dir (its working directory, so every path on its command line is
//!   relative to it and no parent directory needs opening up), the NBD socket there
//!   (which the controller makes that user's, mode 0600), a netvm link at
//!   `../NETVM/vif-NAME.sock`, and the kernel and initrd, which the backend opens and
//!   passes as inherited descriptors (`/proc/self/fd/N`; the files must be world-readable
//!   as distribution kernels are, their directories need not be).
//! - No `-daemonize` (it forks, which `spawn=deny` forbids): QEMU is started detached
//!   (setsid, stdio to qemu.log) and counts as started once QMP answers; a thread of the
//!   starting process reaps it when it exits.
//! - memory/maxmem as on Xen: the guest boots with `memory`; with `maxmem > memory` a
//!   virtio-mem device holds the difference (in whole 128 MiB sections), plugged on demand by
//!   [`Hypervisor::set_memory`] (QMP `qom-set requested-size`), which is what a memory
//!   balancer calls, as qmemman does with Xen's balloon. Hot-added memory is onlined by
//!   the kernel (`memhp_default_state=online_movable` is added to the command line).

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::initramfs::{busybox_initramfs, host_kernel};
use crate::qmp::Qmp;
use crate::util::{find_tool, io_err, pid_alive_with, read_pidfile, run_with_timeout, tail};
use crate::{DomainSpec, DomainState, HvError, Hypervisor};

const QEMU_FIX: &str = "run scripts/install-deps.sh (package qemu-system-x86)";
/// sun_path is 108 bytes including the terminating NUL.
const MAX_UNIX_PATH: usize = 107;
/// How long QEMU may take from exec to answering QMP.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const QMP_TIMEOUT: Duration = Duration::from_secs(3);
const PROBE_MARKER: &str = "QUBES-KVM-PROBE-OK";
/// The virtio-serial port name the guest agent opens (guest-agent's `PORT_NAME`).
pub const AGENT_PORT: &str = "org.qubes-ctl.agent.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// The outcome of [`probe_kvm`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvmVerdict {
    pub usable: bool,
    /// Why: "booted in 1.2s", "no /dev/kvm", "no marker within 10s", ...
    pub detail: String,
    /// What the verdict is valid for: host kernel release and QEMU version.
    pub key: String,
    /// True when read from the cache file instead of probed now.
    #[serde(skip)]
    pub cached: bool,
}

/// Paths of the files a QEMU domain keeps in its run dir.
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub pidfile: PathBuf,
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub console_sock: PathBuf,
    pub agent_sock: PathBuf,
    pub log: PathBuf,
    pub args: PathBuf,
}

impl RunFiles {
    pub fn new(run_dir: &Path) -> Self {
        RunFiles {
            pidfile: run_dir.join("qemu.pid"),
            qmp: run_dir.join("qmp.sock"),
            console: run_dir.join("console.log"),
            console_sock: run_dir.join("console.sock"),
            agent_sock: run_dir.join("agent.sock"),
            log: run_dir.join("qemu.log"),
            args: run_dir.join("qemu.args"),
        }
    }
}

pub struct Qemu {
    binary: String,
    /// Forced accelerator; `None` means probe (once per process, cached on disk).
    forced: Option<Accel>,
    resolved: Mutex<Option<Accel>>,
    probe_timeout: Duration,
}

impl Default for Qemu {
    fn default() -> Self {
        Self::new()
    }
}

impl Qemu {
    /// `QUBES_QEMU` overrides the binary, `QUBES_QEMU_ACCEL=kvm|tcg` skips the probe.
    pub fn new() -> Self {
        let forced = match std::env::var("QUBES_QEMU_ACCEL").ok().as_deref() {
            Some("kvm") => Some(Accel::Kvm),
            Some("tcg") => Some(Accel::Tcg),
            _ => None,
        };
        Qemu {
            binary: std::env::var("QUBES_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
            forced,
            resolved: Mutex::new(None),
            probe_timeout: Duration::from_secs(10),
        }
    }

    /// A binary name looked up on PATH, or a path.
    pub fn with_binary(mut self, binary: impl Into<String>) -> Self {
        self.binary = binary.into();
        self
    }

    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.forced = Some(accel);
        self
    }

    pub fn with_probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The accelerator this backend will use, probing KVM if needed. The cache lives
    /// in `cache_dir` (the controller's run dir root).
    pub fn accel(&self, cache_dir: &Path) -> Accel {
        if let Some(a) = self.forced {
            return a;
        }
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = *resolved {
            return a;
        }
        let accel = match find_tool(&self.binary, QEMU_FIX)
            .and_then(|bin| probe_kvm(&bin, cache_dir, self.probe_timeout))
        {
            Ok(v) if v.usable => Accel::Kvm,
            Ok(v) => {
                tracing::info!("KVM not usable ({}), using TCG", v.detail);
                Accel::Tcg
            }
            Err(e) => {
                tracing::warn!("KVM probe could not run ({e}), using TCG");
                Accel::Tcg
            }
        };
        *resolved = Some(accel);
        accel
    }

    /// The full QEMU command line (without the binary) for `spec`. QEMU runs in the
    /// run dir: the files there, and a netvm's link next to it, are named relative to it.
    pub fn command_line(&self, spec: &DomainSpec, accel: Accel) -> Result<Vec<String>, HvError> {
        validate(spec)?;
        let files = RunFiles::new(&spec.run_dir);
        let bad = |reason: String| HvError::InvalidSpec {
            name: spec.name.clone(),
            reason,
        };
        let utf8 = |p: &Path, what: &str| -> Result<String, HvError> {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{what} path {p:?} is not UTF-8")))
        };
        let here = |p: &Path| from_run_dir(&spec.run_dir, p);
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&[
            "-name",
            &format!("guest={},debug-threads=on", opt_escape(&spec.name)),
        ]);
        push(&["-machine", "q35"]);
        match accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        match hotplug_mib(spec) {
            0 => push(&["-m", &format!("{}M", spec.memory_mib)]),
            extra => {
                push(&[
                    "-m",
                    &format!("{}M,maxmem={}M", spec.memory_mib, spec.memory_mib + extra),
                ]);
                push(&[
                    "-object",
                    &format!("memory-backend-ram,id={HOTPLUG_MEM},size={extra}M"),
                ]);
                push(&[
                    "-device",
                    &format!(
                        "virtio-mem-pci,id={HOTPLUG_DEV},memdev={HOTPLUG_MEM},requested-size=0"
                    ),
                ]);
            }
        }
        push(&["-smp", &spec.vcpus.to_string()]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        // Without a kernel the firmware (SeaBIOS) boots the first disk: images that
        // bring their own bootloader, as Qubes' "kernel none" qubes do.
        if let Some(kernel) = &spec.kernel {
            push(&["-kernel", &utf8(kernel, "kernel")?]);
            if let Some(initrd) = &spec.initrd {
                push(&["-initrd", &utf8(initrd, "initrd")?]);
            }
            let mut cmdline = with_console(&spec.cmdline, "ttyS0");
            if hotplug_mib(spec) > 0 && !cmdline.contains("memhp_default_state=") {
                cmdline.push_str(" memhp_default_state=online_movable");
            }
            push(&["-append", &cmdline]);
        }
        // The serial console is a socket one client at a time can attach to; `logfile`
        // keeps everything the guest writes in console.log, attached or not.
        push(&[
            "-chardev",
            &format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=off",
                opt_escape(&utf8(&here(&files.console_sock), "console socket")?),
                opt_escape(&utf8(&here(&files.console), "console log")?)
            ),
        ]);
        push(&["-serial", "chardev:console"]);
        // The guest agent's port (`qube run`): /dev/virtio-ports/<PORT_NAME> in the guest.
        push(&["-device", "virtio-serial-pci,id=vser0"]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt_escape(&utf8(&here(&files.agent_sock), "agent socket")?)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT}"),
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qmp,path={},server=on,wait=off",
                opt_escape(&utf8(&here(&files.qmp), "QMP socket")?)
            ),
        ]);
        push(&["-mon", "chardev=qmp,mode=control"]);
        for (i, d) in spec.disks.iter().enumerate() {
            let node = format!("disk{i}");
            // JSON syntax: no comma escaping to get wrong, whatever the paths hold.
            let blockdev = json!({
                "driver": "nbd",
                "node-name": node,
                "server": { "type": "unix", "path": utf8(&here(&d.nbd_socket), "NBD socket")? },
                "export": d.export,
                "reconnect-delay": 5,
                "read-only": d.read_only,
                "discard": "unmap",
            });
            // virtio-blk serials hold at most 20 bytes.
            let serial: String = d.vdev.chars().take(20).collect();
            let mut device = json!({
                "driver": "virtio-blk-pci",
                "id": format!("vd{i}"),
                "drive": node,
                "serial": serial,
            });
            if i == 0 && spec.kernel.is_none() {
                device["bootindex"] = json!(0);
            }
            push(&["-blockdev", &blockdev.to_string()]);
            push(&["-device", &device.to_string()]);
        }
        let mac = if spec.net.mac.is_empty() {
            String::new()
        } else {
            format!(",mac={}", spec.net.mac)
        };
        match (&spec.netvm, &spec.net.netvm_socket) {
            (Some(_), Some(sock)) => {
                push(&[
                    "-netdev",
                    &format!(
                        "stream,id=net0,server=off,reconnect-ms=500,addr.type=unix,addr.path={}",
                        opt_escape(&utf8(&here(sock), "netvm link socket")?)
                    ),
                ]);
                push(&["-device", &format!("virtio-net-pci,netdev=net0{mac}")]);
            }
            (Some(n), None) => {
                return Err(bad(format!(
                    "netvm {n} is set but no link to it was prepared (NetSpec::netvm_socket)"
                )))
            }
            (None, _) if spec.net.provides_network => {
                push(&["-nic", &format!("user,model=virtio-net-pci{mac}")]);
            }
            (None, _) => push(&["-nic", "none"]),
        }
        if spec.net.provides_network {
            // Hot-plug slots for the clients' NICs (q35's root bus has none).
            for i in 0..VIF_PORTS {
                push(&[
                    "-device",
                    &format!("pcie-root-port,id=vifport{i},chassis={}", i + 1),
                ]);
            }
        }
        push(&["-device", "virtio-rng-pci"]);
        push(&["-sandbox", SANDBOX]);
        push(&["-pidfile", &utf8(&here(&files.pidfile), "pidfile")?]);
        Ok(a)
    }

    /// One QMP command without arguments on a running domain.
    fn qmp_simple(
        &self,
        name: &str,
        run_dir: &Path,
        op: &'static str,
        cmd: &str,
    ) -> Result<(), HvError> {
        if self.live_pid(run_dir).is_none() {
            return Err(HvError::NotRunning {
                name: name.to_string(),
                op,
                reason: "the qube is not running".into(),
            });
        }
        Qmp::connect(&RunFiles::new(run_dir).qmp, QMP_TIMEOUT)
            .and_then(|mut q| q.execute(cmd, None))
            .map(|_| ())
            .map_err(|reason| HvError::Qmp {
                name: name.to_string(),
                op: cmd.to_string(),
                reason,
            })
    }

    /// The pid in the pidfile if that process lives and works in this run dir (its
    /// command line names files relative to it, so the working directory is what tells
    /// our QEMU from a process that got the pid since).
    fn live_pid(&self, run_dir: &Path) -> Option<i32> {
        let files = RunFiles::new(run_dir);
        let pid = read_pidfile(&files.pidfile)?;
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        (pid_alive_with(pid, std::ffi::OsStr::new("")) && fs::canonicalize(run_dir).ok()? == cwd)
            .then_some(pid)
    }

    fn cleanup(&self, run_dir: &Path) {
        let files = RunFiles::new(run_dir);
        let _ = fs::remove_file(files.pidfile);
        let _ = fs::remove_file(files.qmp);
        let _ = fs::remove_file(files.console_sock);
        let _ = fs::remove_file(files.agent_sock);
    }

    fn wait_gone(&self, run_dir: &Path, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.live_pid(run_dir).is_none() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, spec: &DomainSpec) -> Result<(), HvError> {
        let bin = find_tool(&self.binary, QEMU_FIX)?;
        validate(spec)?;
        let state = self.state(&spec.name, &spec.run_dir)?;
        if state != DomainState::Halted {
            return Err(HvError::AlreadyRunning {
                name: spec.name.clone(),
                state,
            });
        }
        check_files(spec)?;
        let files = RunFiles::new(&spec.run_dir);
        fs::create_dir_all(&spec.run_dir).map_err(io_err(&spec.name, "creating run dir"))?;
        if let Some(u) = spec.user {
            // QEMU creates its sockets, pidfile and console log in its run dir.
            std::os::unix::fs::lchown(&spec.run_dir, Some(u.uid), Some(u.gid))
                .map_err(io_err(&spec.name, "giving the run dir to the qube's user"))?;
        }
        self.cleanup(&spec.run_dir);
        if files.console.exists() {
            let _ = fs::rename(&files.console, spec.run_dir.join("console.log.1"));
        }
        let cache_dir = spec
            .run_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(&spec.run_dir);
        let accel = self.accel(cache_dir);
        let mut args = self.command_line(spec, accel)?;
        // Files of ours in a directory QEMU's user owns: never follow what it left there.
        let create = |p: &Path, what: &str| {
            let _ = fs::remove_file(p);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(io_err(&spec.name, format!("creating {what}")))
        };
        {
            use std::io::Write;
            create(&files.args, "qemu.args")?
                .write_all((args.join("\n") + "\n").as_bytes())
                .map_err(io_err(&spec.name, "writing qemu.args"))?;
        }
        // The kernel and initrd are opened here and inherited: QEMU's user need not
        // reach the directories holding them.
        let mut boot_files = Vec::new();
        for (flag, path) in [("-kernel", &spec.kernel), ("-initrd", &spec.initrd)] {
            let Some(path) = path else { continue };
            let f = fs::File::open(path)
                .map_err(io_err(&spec.name, format!("opening {}", path.display())))?;
            let fd = f.as_raw_fd();
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = format!("/proc/self/fd/{fd}");
            }
            boot_files.push(f);
        }
        let inherit: Vec<i32> = boot_files.iter().map(|f| f.as_raw_fd()).collect();
        let log = create(&files.log, "qemu.log")?;
        let log2 = log
            .try_clone()
            .map_err(io_err(&spec.name, "creating qemu.log"))?;
        let user = spec.user;
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .current_dir(&spec.run_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe calls (setsid, umask, fcntl, setgroups, setres[ug]id) on
        // values copied in beforehand; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: no signal for the starter's terminal or process
                // group reaches it, as with -daemonize.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Its sockets and logs are 0600 from the start: only its user (and root)
                // may attach to the console or QMP.
                libc::umask(0o177);
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(u) = user {
                    // Groups first: after setresuid there is no right left to drop them.
                    if libc::setgroups(0, std::ptr::null()) < 0
                        || libc::setresgid(u.gid, u.gid, u.gid) < 0
                        || libc::setresuid(u.uid, u.uid, u.uid) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(io_err(&spec.name, format!("running {}", bin.display())))?;
        drop(boot_files);
        let cmd = format!("{} ... -name guest={}", bin.display(), spec.name);
        let deadline = Instant::now() + START_TIMEOUT;
        let exited = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(e) => return Err(io_err(&spec.name, "waiting for qemu")(e)),
            }
            // QMP answers once QEMU's main loop runs: the machine is built and running.
            if Qmp::connect(&files.qmp, Duration::from_secs(1)).is_ok() {
                break None;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HvError::CommandTimeout {
                    name: spec.name.clone(),
                    cmd,
                    timeout: START_TIMEOUT,
                    fix: "see qemu.log in the qube's run dir",
                });
            }
            thread::sleep(Duration::from_millis(20));
        };
        match exited {
            // A guest that powered off at once still counts as started when QEMU got as
            // far as opening its console.
            Some(st) if !(st.success() && files.console.exists()) => {
                return Err(HvError::Command {
                    name: spec.name.clone(),
                    cmd,
                    status: if st.success() {
                        "exited right after start".into()
                    } else {
                        st.to_string()
                    },
                    detail: tail(&files.log, 5),
                });
            }
            Some(_) => {}
            None => {
                // Reaped here when it ends, so no zombie lingers in a long-lived daemon;
                // a short-lived starter leaves it to init.
                let reaper = thread::Builder::new()
                    .name("qemu-reaper".into())
                    .stack_size(64 << 10)
                    .spawn(move || {
                        let _ = child.wait();
                    });
                if let Err(e) = reaper {
                    tracing::warn!(qube = %spec.name, "no thread to reap qemu: {e}");
                }
            }
        }
        tracing::info!(qube = %spec.name, ?accel, user = ?spec.user, "qemu domain started");
        Ok(())
    }

    fn shutdown(&self, name: &str, run_dir: &Path, timeout: Duration) -> Result<(), HvError> {
        if self.live_pid(run_dir).is_none() {
            self.cleanup(run_dir);
            return Ok(());
        }
        let files = RunFiles::new(run_dir);
        let asked = Qmp::connect(&files.qmp, QMP_TIMEOUT)
            .and_then(|mut q| q.execute("system_powerdown", None));
        if let Err(e) = asked {
            tracing::warn!(
                qube = name,
                "system_powerdown failed: {e}; will kill at timeout"
            );
        }
        if self.wait_gone(run_dir, timeout) {
            self.cleanup(run_dir);
            return Ok(());
        }
        tracing::warn!(qube = name, ?timeout, "guest did not power off, killing it");
        self.kill(name, run_dir)
    }

    fn kill(&self, name: &str, run_dir: &Path) -> Result<(), HvError> {
        let Some(pid) = self.live_pid(run_dir) else {
            self.cleanup(run_dir);
            return Ok(());
        };
        let files = RunFiles::new(run_dir);
        // `quit` lets QEMU flush its block layer; SIGKILL is for a QEMU that is wedged.
        let quit = Qmp::connect(&files.qmp, Duration::from_secs(1))
            .and_then(|mut q| q.execute("quit", None));
        if quit.is_err() || !self.wait_gone(run_dir, Duration::from_secs(3)) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::Kill);
            }
            if !self.wait_gone(run_dir, Duration::from_secs(5)) {
                return Err(HvError::KillFailed {
                    name: name.to_string(),
                    pid,
                });
            }
        }
        self.cleanup(run_dir);
        Ok(())
    }

    fn state(&self, _name: &str, run_dir: &Path) -> Result<DomainState, HvError> {
        if self.live_pid(run_dir).is_none() {
            return Ok(DomainState::Halted);
        }
        let files = RunFiles::new(run_dir);
        let status =
            Qmp::connect(&files.qmp, QMP_TIMEOUT).and_then(|mut q| q.execute("query-status", None));
        Ok(match status {
            Ok(v) => status_to_state(v.get("status").and_then(|s| s.as_str()).unwrap_or("")),
            // The process lives; QMP may just be busy with another client.
            Err(_) => DomainState::Running,
        })
    }

    fn pause(&self, name: &str, run_dir: &Path) -> Result<(), HvError> {
        self.qmp_simple(name, run_dir, "pause", "stop")
    }

    fn unpause(&self, name: &str, run_dir: &Path) -> Result<(), HvError> {
        self.qmp_simple(name, run_dir, "unpause", "cont")
    }

    fn attach_client(
        &self,
        netvm: &str,
        run_dir: &Path,
        client: &str,
        socket: &Path,
        mac: &str,
    ) -> Result<(), HvError> {
        if self.live_pid(run_dir).is_none() {
            return Err(HvError::NotRunning {
                name: netvm.to_string(),
                op: "connect a client to it",
                reason: "the netvm is not running".into(),
            });
        }
        let id = vif_id(client);
        let qmp_err = |op: &str| {
            let op = op.to_string();
            move |reason: String| HvError::Qmp {
                name: netvm.to_string(),
                op,
                reason,
            }
        };
        let mut q =
            Qmp::connect(&RunFiles::new(run_dir).qmp, QMP_TIMEOUT).map_err(qmp_err("connect"))?;
        // A link left by an earlier run of the same client goes first.
        remove_vif(&mut q, &id);
        let _ = fs::remove_file(socket);
        // Named from the netvm QEMU's working directory, its run dir.
        let rel = from_run_dir(run_dir, socket);
        let path = rel
            .to_str()
            .ok_or_else(|| qmp_err("netdev_add")(format!("socket path {socket:?} is not UTF-8")))?;
        q.execute(
            "netdev_add",
            Some(json!({
                "type": "stream", "id": id, "server": true,
                "addr": {"type": "unix", "path": path},
            })),
        )
        .map_err(qmp_err("netdev_add"))?;
        let mut last = String::new();
        for port in 0..VIF_PORTS {
            let mut dev = json!({
                "driver": "virtio-net-pci", "id": id, "netdev": id,
                "bus": format!("vifport{port}"),
            });
            if !mac.is_empty() {
                dev["mac"] = json!(mac);
            }
            match q.execute("device_add", Some(dev)) {
                Ok(_) => return Ok(()),
                // Port taken by another client's NIC: try the next.
                Err(e) => last = e,
            }
        }
        let _ = q.execute("netdev_del", Some(json!({ "id": id })));
        Err(qmp_err("device_add")(format!(
            "no free port among {VIF_PORTS} for {client} ({last}); is {netvm} a netvm (provides_network)?"
        )))
    }

    fn detach_client(&self, netvm: &str, run_dir: &Path, client: &str) -> Result<(), HvError> {
        if self.live_pid(run_dir).is_none() {
            return Ok(());
        }
        let mut q = Qmp::connect(&RunFiles::new(run_dir).qmp, QMP_TIMEOUT).map_err(|reason| {
            HvError::Qmp {
                name: netvm.to_string(),
                op: "connect".into(),
                reason,
            }
        })?;
        remove_vif(&mut q, &vif_id(client));
        Ok(())
    }

    /// Plugs or unplugs virtio-mem blocks so the guest has `mib` in all: `memory` is
    /// the floor (boot memory cannot be taken back), `maxmem` the ceiling.
    fn set_memory(&self, name: &str, run_dir: &Path, mib: u64) -> Result<(), HvError> {
        let fail = |reason: String| HvError::Memory {
            name: name.to_string(),
            mib,
            reason,
        };
        if self.live_pid(run_dir).is_none() {
            return Err(fail("the qube is not running".into()));
        }
        let files = RunFiles::new(run_dir);
        let qmp_err = |op: &str| {
            let op = op.to_string();
            move |reason: String| HvError::Qmp {
                name: name.to_string(),
                op,
                reason,
            }
        };
        let mut q = Qmp::connect(&files.qmp, QMP_TIMEOUT).map_err(qmp_err("connect"))?;
        let summary = q
            .execute("query-memory-size-summary", None)
            .map_err(qmp_err("query-memory-size-summary"))?;
        let base = summary["base-memory"].as_u64().unwrap_or(0) >> 20;
        let devices = q
            .execute("query-memory-devices", None)
            .map_err(qmp_err("query-memory-devices"))?;
        let hotplug = devices.as_array().and_then(|ds| {
            ds.iter()
                .find(|d| d["type"] == "virtio-mem" && d["data"]["id"] == HOTPLUG_DEV)
        });
        let max_extra = hotplug
            .and_then(|d| d["data"]["max-size"].as_u64())
            .unwrap_or(0)
            >> 20;
        if mib < base || mib > base + max_extra {
            return Err(fail(format!(
                "out of range: the qube started with memory {base} MiB and maxmem {} MiB; \
                 change the prefs and restart it for more",
                base + max_extra
            )));
        }
        let extra = mib - base;
        let extra = extra - extra % HOTPLUG_BLOCK_MIB;
        if hotplug.is_none() {
            return Ok(());
        }
        q.execute(
            "qom-set",
            Some(json!({
                "path": format!("/machine/peripheral/{HOTPLUG_DEV}"),
                "property": "requested-size",
                "value": extra << 20,
            })),
        )
        .map_err(qmp_err("qom-set requested-size"))?;
        Ok(())
    }

    fn console_log(&self, run_dir: &Path) -> PathBuf {
        RunFiles::new(run_dir).console
    }

    fn console_socket(&self, run_dir: &Path) -> Option<PathBuf> {
        Some(RunFiles::new(run_dir).console_sock)
    }

    fn agent_socket(&self, run_dir: &Path) -> Option<PathBuf> {
        Some(RunFiles::new(run_dir).agent_sock)
    }
}

/// Maps QMP `query-status` run states onto the three the controller knows.
pub fn status_to_state(status: &str) -> DomainState {
    match status {
        "running" => DomainState::Running,
        "shutdown" | "guest-panicked" | "internal-error" => DomainState::Halted,
        _ => DomainState::Paused,
    }
}

/// The seccomp filter: no obsolete syscalls, no setuid/setgid/setsid & co, no
/// fork/exec, no scheduler or CPU affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// `p` as QEMU reaches it from its working directory, the run dir: a file in the run
/// dir by its name, one in a sibling run dir (a netvm's link) through `..`, anything
/// else as given.
fn from_run_dir(run_dir: &Path, p: &Path) -> PathBuf {
    if let Ok(rel) = p.strip_prefix(run_dir) {
        if !rel.as_os_str().is_empty() {
            return rel.to_path_buf();
        }
    }
    if let Some(rel) = run_dir
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .and_then(|d| p.strip_prefix(d).ok())
        .filter(|r| !r.as_os_str().is_empty())
    {
        return Path::new("..").join(rel);
    }
    p.to_path_buf()
}

/// QEMU's option syntax escapes a comma by doubling it.
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Appends `console=DEV` unless the command line picks a console itself.
pub(crate) fn with_console(cmdline: &str, dev: &str) -> String {
    if cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console="))
    {
        cmdline.to_string()
    } else if cmdline.trim().is_empty() {
        format!("console={dev}")
    } else {
        format!("{} console={dev}", cmdline.trim())
    }
}

/// Checks what QEMU would otherwise reject with a less helpful message.
/// PCIe root ports a netvm gets for its clients' NICs (one client each).
const VIF_PORTS: usize = 16;

/// The QEMU id of a client's NIC (and its netdev) in the netvm. Qube names are
/// `[A-Za-z0-9_.-]`, all valid in QEMU ids.
fn vif_id(client: &str) -> String {
    format!("vif-{client}")
}

/// Unplugs a client's NIC (the guest acknowledges the unplug; it is gone once QEMU
/// says so, within a few seconds) and closes its link.
fn remove_vif(q: &mut Qmp, id: &str) {
    let present = |q: &mut Qmp| {
        q.execute("qom-list", Some(json!({"path": "/machine/peripheral"})))
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == id))
    };
    if present(q) {
        let _ = q.execute("device_del", Some(json!({ "id": id })));
        let deadline = Instant::now() + Duration::from_secs(5);
        while present(q) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = q.execute("netdev_del", Some(json!({ "id": id })));
}

const HOTPLUG_MEM: &str = "mem-hotplug";
const HOTPLUG_DEV: &str = "mem-hotplug-dev";
/// virtio-mem plugs memory in blocks of this size (x86's default).
const HOTPLUG_BLOCK_MIB: u64 = 2;
/// Linux onlines hot-added memory in sections of this size (x86-64); a device region
/// that ends mid-section leaves its tail unusable, so the region is whole sections.
const HOTPLUG_REGION_ALIGN_MIB: u64 = 128;

/// MiB the guest may be given on top of `memory` (Qubes' maxmem), in whole sections.
fn hotplug_mib(spec: &DomainSpec) -> u64 {
    let extra = spec.maxmem_mib.saturating_sub(spec.memory_mib);
    extra - extra % HOTPLUG_REGION_ALIGN_MIB
}

fn validate(spec: &DomainSpec) -> Result<(), HvError> {
    let bad = |reason: String| {
        Err(HvError::InvalidSpec {
            name: spec.name.clone(),
            reason,
        })
    };
    if spec.name.is_empty() || spec.name.chars().any(|c| c.is_control() || c == '/') {
        return bad(format!("bad qube name {:?}", spec.name));
    }
    if spec.memory_mib < 16 {
        return bad(format!("memory {} MiB is below 16 MiB", spec.memory_mib));
    }
    if spec.vcpus == 0 {
        return bad("vcpus is 0".into());
    }
    if spec.disks.len() > 26 {
        return bad(format!("{} disks; at most 26", spec.disks.len()));
    }
    let files = RunFiles::new(&spec.run_dir);
    for p in [files.qmp, files.console_sock, files.agent_sock]
        .iter()
        .chain(spec.disks.iter().map(|d| &d.nbd_socket))
    {
        if p.as_os_str().len() > MAX_UNIX_PATH {
            return bad(format!(
                "unix socket path {p:?} is longer than {MAX_UNIX_PATH} bytes; use a shorter run dir"
            ));
        }
    }
    if spec.kernel.is_none() && spec.disks.is_empty() {
        return bad("nothing to boot: no kernel and no disks".into());
    }
    if spec.kernel.is_none() && spec.initrd.is_some() {
        return bad("an initrd without a kernel; set the qube's kernel too".into());
    }
    Ok(())
}

/// Checks the files the domain needs exist, so the error names the missing piece.
fn check_files(spec: &DomainSpec) -> Result<(), HvError> {
    let bad = |reason: String| {
        Err(HvError::InvalidSpec {
            name: spec.name.clone(),
            reason,
        })
    };
    for (what, p) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if let Some(p) = p {
            if !p.is_file() {
                return bad(format!("{what} {} does not exist", p.display()));
            }
        }
    }
    for d in &spec.disks {
        if !d.nbd_socket.exists() {
            return bad(format!(
                "NBD socket {} for {} is missing: is the daemon serving this qube's volumes?",
                d.nbd_socket.display(),
                d.vdev
            ));
        }
    }
    Ok(())
}

fn cache_key(qemu: &Path) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = run_with_timeout(Command::new(qemu).arg("--version"), Duration::from_secs(10))
        .ok()
        .flatten()
        .map(|o| o.stdout.lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    format!("{} / {}", kernel.trim(), version.trim())
}

/// Decides whether KVM works by booting the host kernel with a busybox initramfs
/// under `-accel kvm` and waiting up to `timeout` for its marker line. The verdict
/// is cached in `cache_dir/kvm-probe.json` for this host kernel and QEMU version.
pub fn probe_kvm(qemu: &Path, cache_dir: &Path, timeout: Duration) -> Result<KvmVerdict, HvError> {
    let key = cache_key(qemu);
    let cache = cache_dir.join("kvm-probe.json");
    if let Ok(text) = fs::read_to_string(&cache) {
        if let Ok(mut v) = serde_json::from_str::<KvmVerdict>(&text) {
            if v.key == key {
                v.cached = true;
                return Ok(v);
            }
        }
    }
    let verdict = if !Path::new("/dev/kvm").exists() {
        KvmVerdict {
            usable: false,
            detail: "no /dev/kvm".into(),
            key,
            cached: false,
        }
    } else {
        boot_probe(qemu, cache_dir, timeout, key)?
    };
    let tmp = cache_dir.join("kvm-probe.json.tmp");
    let text = serde_json::to_string_pretty(&verdict).unwrap_or_default();
    // A cache we cannot write only costs a probe next time.
    if fs::create_dir_all(cache_dir).is_ok() && fs::write(&tmp, text).is_ok() {
        let _ = fs::rename(&tmp, &cache);
    }
    Ok(verdict)
}

fn boot_probe(
    qemu: &Path,
    cache_dir: &Path,
    timeout: Duration,
    key: String,
) -> Result<KvmVerdict, HvError> {
    let kernel = host_kernel().ok_or_else(|| {
        HvError::Probe("no /boot/vmlinuz-*: run scripts/install-deps.sh (linux-image-amd64)".into())
    })?;
    let dir = cache_dir.join("kvm-probe.d");
    fs::create_dir_all(&dir).map_err(|e| HvError::Probe(format!("{}: {e}", dir.display())))?;
    let initrd = dir.join("initramfs.cpio");
    let log = dir.join("console.log");
    let image = busybox_initramfs(&format!("echo {PROBE_MARKER}\npoweroff -f\n"), &[])
        .map_err(|e| HvError::Probe(e.to_string()))?;
    fs::write(&initrd, image).map_err(|e| HvError::Probe(format!("{}: {e}", initrd.display())))?;
    let _ = fs::remove_file(&log);
    let path_str = |p: &Path| p.to_string_lossy().replace(',', ",,");
    let mut child = Command::new(qemu)
        .args([
            "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "128",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", path_str(&log)))
        .args(["-serial", "chardev:console"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| HvError::Probe(format!("running {}: {e}", qemu.display())))?;
    let started = Instant::now();
    let seen = |log: &Path| {
        fs::read_to_string(log)
            .map(|s| s.contains(PROBE_MARKER))
            .unwrap_or(false)
    };
    let detail = loop {
        if seen(&log) {
            break format!(
                "booted under KVM in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        if let Ok(Some(st)) = child.try_wait() {
            if seen(&log) {
                continue;
            }
            break format!("qemu -accel kvm exited ({st}) without the marker");
        }
        if started.elapsed() >= timeout {
            break format!("no marker within {timeout:?} under KVM (guest hangs)");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    // A QEMU stuck in the kernel (the failure being probed for) may not die at once;
    // do not let the probe hang on it.
    if !matches!(
        crate::util::wait_deadline(&mut child, Duration::from_secs(5)),
        Ok(Some(_))
    ) {
        tracing::warn!(
            pid = child.id(),
            "KVM probe QEMU did not exit after SIGKILL"
        );
    }
    let usable = seen(&log);
    Ok(KvmVerdict {
        usable,
        detail,
        key,
        cached: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskSpec, VirtMode};

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "work".into(),
            memory_mib: 400,
            maxmem_mib: 4000,
            vcpus: 2,
            virt_mode: VirtMode::Pvh,
            kernel: Some("/var/lib/qubes/vm-kernels/6.1/vmlinuz".into()),
            initrd: Some("/var/lib/qubes/vm-kernels/6.1/initramfs".into()),
            cmdline: "root=/dev/xvda ro".into(),
            disks: ["root", "private", "volatile"]
                .iter()
                .enumerate()
                .map(|(i, v)| DiskSpec {
                    vdev: format!("xvd{}", (b'a' + i as u8) as char),
                    nbd_socket: "/run/qubes/work/nbd.sock".into(),
                    export: format!("work/{v}"),
                    read_only: i == 0,
                    block_device: None,
                })
                .collect(),
            netvm: None,
            net: Default::default(),
            label: "blue".into(),
            run_dir: "/run/qubes/work".into(),
            user: None,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn command_line_wires_the_network_as_qubes_does() {
        let q = Qemu::new();
        // No netvm: no NIC at all.
        let args = q.command_line(&spec(), Accel::Tcg).unwrap();
        assert_eq!(after(&args, "-nic"), ["none"]);
        // A netvm (provides_network) without a netvm of its own: the uplink and ports.
        let mut netvm = spec();
        netvm.net.provides_network = true;
        let args = q.command_line(&netvm, Accel::Tcg).unwrap();
        assert_eq!(after(&args, "-nic"), ["user,model=virtio-net-pci"]);
        let ports = after(&args, "-device")
            .into_iter()
            .filter(|d| d.starts_with("pcie-root-port,id=vifport"))
            .count();
        assert_eq!(ports, VIF_PORTS);
        // A client: its only NIC is the link to its netvm.
        let mut client = spec();
        client.netvm = Some("sys-net".into());
        client.net.netvm_socket = Some("/run/qubes/sys-net/vif-work.sock".into());
        client.net.mac = "00:16:3e:5e:6c:05".into();
        let args = q.command_line(&client, Accel::Tcg).unwrap();
        assert!(after(&args, "-nic").is_empty());
        assert_eq!(
            after(&args, "-netdev"),
            ["stream,id=net0,server=off,reconnect-ms=500,addr.type=unix,addr.path=../sys-net/vif-work.sock"]
        );
        assert!(
            after(&args, "-device").contains(&"virtio-net-pci,netdev=net0,mac=00:16:3e:5e:6c:05")
        );
        client.net.netvm_socket = None;
        let e = q.command_line(&client, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("netvm sys-net"), "{e}");
    }

    #[test]
    fn command_line_has_disks_in_order_with_read_only_root() {
        let args = Qemu::new().command_line(&spec(), Accel::Tcg).unwrap();
        let blockdevs: Vec<serde_json::Value> = after(&args, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(blockdevs.len(), 3);
        for (i, (b, ro)) in blockdevs.iter().zip([true, false, false]).enumerate() {
            assert_eq!(b["driver"], "nbd");
            assert_eq!(b["node-name"], format!("disk{i}"));
            assert_eq!(b["server"]["type"], "unix");
            // Relative: QEMU works in the run dir, which holds the socket.
            assert_eq!(b["server"]["path"], "nbd.sock");
            assert_eq!(b["read-only"], ro);
            assert_eq!(b["reconnect-delay"], 5);
        }
        assert_eq!(blockdevs[1]["export"], "work/private");
        let devices: Vec<serde_json::Value> = after(&args, "-device")
            .iter()
            .filter(|s| s.starts_with('{'))
            .map(|s| serde_json::from_str(s).unwrap())
            .filter(|v: &serde_json::Value| v["driver"] == "virtio-blk-pci")
            .collect();
        assert_eq!(devices[2]["drive"], "disk2");
        assert_eq!(devices[2]["serial"], "xvdc");
    }

    #[test]
    fn command_line_boots_kernel_and_ends_on_poweroff() {
        let args = Qemu::new().command_line(&spec(), Accel::Tcg).unwrap();
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-cpu"), ["max"]);
        // maxmem 4000: boot memory plus a virtio-mem device for the rest.
        // 3600 MiB rounded down to whole 128 MiB sections.
        assert_eq!(after(&args, "-m"), ["400M,maxmem=3984M"]);
        assert_eq!(
            after(&args, "-object"),
            ["memory-backend-ram,id=mem-hotplug,size=3584M"]
        );
        assert!(after(&args, "-device")
            .contains(&"virtio-mem-pci,id=mem-hotplug-dev,memdev=mem-hotplug,requested-size=0"));
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(
            after(&args, "-append"),
            ["root=/dev/xvda ro console=ttyS0 memhp_default_state=online_movable"]
        );
        let mut fixed = spec();
        fixed.maxmem_mib = fixed.memory_mib;
        let args = Qemu::new().command_line(&fixed, Accel::Tcg).unwrap();
        assert_eq!(after(&args, "-m"), ["400M"]);
        assert!(after(&args, "-object").is_empty());
        assert_eq!(after(&args, "-append"), ["root=/dev/xvda ro console=ttyS0"]);
        assert_eq!(
            after(&args, "-kernel"),
            ["/var/lib/qubes/vm-kernels/6.1/vmlinuz"]
        );
        assert_eq!(after(&args, "-pidfile"), ["qemu.pid"]);
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(!args.iter().any(|a| a == "-no-shutdown"));
        assert_eq!(after(&args, "-nic"), ["none"]);
        let kvm = Qemu::new().command_line(&spec(), Accel::Kvm).unwrap();
        assert_eq!(after(&kvm, "-cpu"), ["host"]);
    }

    #[test]
    fn qemu_may_neither_regain_privileges_nor_fork() {
        let args = Qemu::new().command_line(&spec(), Accel::Tcg).unwrap();
        let sandbox = after(&args, "-sandbox");
        assert_eq!(sandbox.len(), 1);
        let opts: Vec<&str> = sandbox[0].split(',').collect();
        for want in [
            "on",
            "obsolete=deny",
            "elevateprivileges=deny",
            "spawn=deny",
            "resourcecontrol=deny",
        ] {
            assert!(opts.contains(&want), "{want} missing from {opts:?}");
        }
        // -daemonize forks (spawn=deny forbids it) and -run-with user= calls setuid
        // after the sandbox is in place (elevateprivileges=deny kills QEMU for it):
        // the backend starts QEMU detached and as the qube's user itself.
        for flag in ["-daemonize", "-run-with", "-runas", "-chroot"] {
            assert!(!args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
        let mut s = spec();
        s.user = Some(crate::DomainUser {
            uid: 1_879_048_193,
            gid: 1_879_048_193,
        });
        assert_eq!(Qemu::new().command_line(&s, Accel::Tcg).unwrap(), args);
    }

    #[test]
    fn paths_are_relative_to_the_run_dir_qemu_works_in() {
        let d = Path::new("/r/qubes/work");
        assert_eq!(from_run_dir(d, &d.join("nbd.sock")), Path::new("nbd.sock"));
        assert_eq!(
            from_run_dir(d, Path::new("/r/qubes/sys-net/vif-work.sock")),
            Path::new("../sys-net/vif-work.sock")
        );
        assert_eq!(
            from_run_dir(d, Path::new("/elsewhere/x.sock")),
            Path::new("/elsewhere/x.sock")
        );
        let mut client = spec();
        client.netvm = Some("sys-net".into());
        client.net.netvm_socket = Some("/run/qubes/sys-net/vif-work.sock".into());
        let args = Qemu::new().command_line(&client, Accel::Tcg).unwrap();
        assert_eq!(
            after(&args, "-netdev"),
            ["stream,id=net0,server=off,reconnect-ms=500,addr.type=unix,addr.path=../sys-net/vif-work.sock"]
        );
    }

    #[test]
    fn without_a_kernel_the_firmware_boots_the_root_disk() {
        let mut s = spec();
        s.kernel = None;
        s.initrd = None;
        let args = Qemu::new().command_line(&s, Accel::Tcg).unwrap();
        assert!(after(&args, "-kernel").is_empty());
        assert!(after(&args, "-append").is_empty());
        let first: serde_json::Value = serde_json::from_str(
            after(&args, "-device")
                .into_iter()
                .find(|d| d.contains("\"vd0\""))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(first["bootindex"], 0);
    }

    #[test]
    fn the_console_is_a_logged_socket_and_the_agent_a_virtio_serial_port() {
        let args = Qemu::new().command_line(&spec(), Accel::Tcg).unwrap();
        let chardevs = after(&args, "-chardev");
        assert!(chardevs.contains(
            &"socket,id=console,path=console.sock,server=on,wait=off,\
              logfile=console.log,logappend=off"
        ));
        assert_eq!(after(&args, "-serial"), ["chardev:console"]);
        assert!(chardevs.contains(&"socket,id=agent,path=agent.sock,server=on,wait=off"));
        let devices = after(&args, "-device");
        assert!(devices.contains(&"virtio-serial-pci,id=vser0"));
        assert!(devices
            .contains(&"virtserialport,bus=vser0.0,chardev=agent,name=org.qubes-ctl.agent.0"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec();
        s.netvm = Some("sys-net".into());
        s.net.netvm_socket = Some("/run/a,b/vif-work.sock".into());
        let args = Qemu::new().command_line(&s, Accel::Tcg).unwrap();
        assert!(args.iter().any(|a| a
            == "stream,id=net0,server=off,reconnect-ms=500,addr.type=unix,addr.path=/run/a,,b/vif-work.sock"));
    }

    #[test]
    fn specs_qemu_cannot_run_are_refused_with_the_qube_named() {
        let mut s = spec();
        s.kernel = None;
        let e = Qemu::new().command_line(&s, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("qube work"), "{e}");
        assert!(e.to_string().contains("initrd without a kernel"), "{e}");
        s.initrd = None;
        s.disks.clear();
        let e = Qemu::new().command_line(&s, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("nothing to boot"), "{e}");
        let mut s = spec();
        s.run_dir = PathBuf::from("/").join("x".repeat(120));
        let e = Qemu::new().command_line(&s, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("shorter run dir"), "{e}");
        let mut s = spec();
        s.vcpus = 0;
        assert!(Qemu::new().command_line(&s, Accel::Tcg).is_err());
    }

    #[test]
    fn console_is_added_only_when_missing() {
        assert_eq!(with_console("quiet", "ttyS0"), "quiet console=ttyS0");
        assert_eq!(with_console("", "hvc0"), "console=hvc0");
        assert_eq!(
            with_console("console=tty0 quiet", "ttyS0"),
            "console=tty0 quiet"
        );
    }

    #[test]
    fn qmp_status_maps_to_states() {
        assert_eq!(status_to_state("running"), DomainState::Running);
        assert_eq!(status_to_state("paused"), DomainState::Paused);
        assert_eq!(status_to_state("shutdown"), DomainState::Halted);
    }

    #[test]
    fn state_of_a_never_started_qube_is_halted() {
        let dir = tempfile::tempdir().unwrap();
        let q = Qemu::new();
        assert_eq!(q.state("x", dir.path()).unwrap(), DomainState::Halted);
        q.shutdown("x", dir.path(), Duration::from_secs(1)).unwrap();
        q.kill("x", dir.path()).unwrap();
        // A stale pidfile naming a process that is not our QEMU is not trusted.
        fs::write(dir.path().join("qemu.pid"), std::process::id().to_string()).unwrap();
        assert_eq!(q.state("x", dir.path()).unwrap(), DomainState::Halted);
    }
}
