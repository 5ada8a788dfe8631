//! The QEMU backend: one daemonized `qemu-system-x86_64` per qube.
//!
//! ```text
//!   run_dir/
//!     qemu.args    the command line, one argument per line (for debugging)
//!     qemu.log     QEMU's own stderr while it starts
//!     qemu-runtime.log  QEMU's stderr once daemonized (-D keeps it off /dev/null)
//!     qemu.pid     written by QEMU (-pidfile); the domain exists while this pid lives
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
//! - QEMU runs under its seccomp sandbox (`-sandbox on,obsolete=deny,resourcecontrol=deny`).
//! - memory/maxmem as on Xen: the guest boots with `memory`; with `maxmem > memory` a
//!   virtio-mem device holds the difference (in whole 128 MiB sections), plugged on demand by
//!   [`Hypervisor::set_memory`] (QMP `qom-set requested-size`), which is what a memory
//!   balancer calls, as qmemman does with Xen's balloon. Hot-added memory is onlined by
//!   the kernel (`memhp_default_state=online_movable` is added to the command line).

use std::fs;
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
/// How long `qemu -daemonize` may take to hand over to its daemon child.
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
    pub runtime_log: PathBuf,
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
            runtime_log: run_dir.join("qemu-runtime.log"),
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

    /// The full QEMU command line (without the binary) for `spec`.
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
                opt_escape(&utf8(&files.console_sock, "console socket")?),
                opt_escape(&utf8(&files.console, "console log")?)
            ),
        ]);
        push(&["-serial", "chardev:console"]);
        // The guest agent's port (`qube run`): /dev/virtio-ports/<PORT_NAME> in the guest.
        push(&["-device", "virtio-serial-pci,id=vser0"]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt_escape(&utf8(&files.agent_sock, "agent socket")?)
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
                opt_escape(&utf8(&files.qmp, "QMP socket")?)
            ),
        ]);
        push(&["-mon", "chardev=qmp,mode=control"]);
        for (i, d) in spec.disks.iter().enumerate() {
            let node = format!("disk{i}");
            // JSON syntax: no comma escaping to get wrong, whatever the paths hold.
            let blockdev = json!({
                "driver": "nbd",
                "node-name": node,
                "server": { "type": "unix", "path": utf8(&d.nbd_socket, "NBD socket")? },
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
                        opt_escape(&utf8(sock, "netvm link socket")?)
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
        // seccomp: elevateprivileges=deny and spawn=deny would also be wanted, but
        // QEMU 10 then fails to -daemonize (checked by hand), so they stay off.
        push(&["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
        // With a -D log, the daemonized QEMU keeps stderr there (NBD reconnects,
        // block errors) instead of sending it to /dev/null.
        push(&["-D", &utf8(&files.runtime_log, "runtime log")?]);
        push(&["-pidfile", &utf8(&files.pidfile, "pidfile")?, "-daemonize"]);
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

    fn live_pid(&self, run_dir: &Path) -> Option<i32> {
        let files = RunFiles::new(run_dir);
        let pid = read_pidfile(&files.pidfile)?;
        pid_alive_with(pid, files.pidfile.as_os_str()).then_some(pid)
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
        self.cleanup(&spec.run_dir);
        if files.console.exists() {
            let _ = fs::rename(&files.console, spec.run_dir.join("console.log.1"));
        }
        let _ = fs::remove_file(&files.runtime_log);
        let cache_dir = spec
            .run_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(&spec.run_dir);
        let accel = self.accel(cache_dir);
        let args = self.command_line(spec, accel)?;
        fs::write(&files.args, args.join("\n") + "\n")
            .map_err(io_err(&spec.name, "writing qemu.args"))?;
        let log = fs::File::create(&files.log).map_err(io_err(&spec.name, "creating qemu.log"))?;
        let log2 = log
            .try_clone()
            .map_err(io_err(&spec.name, "creating qemu.log"))?;
        let mut child = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err(&spec.name, format!("running {}", bin.display())))?;
        let cmd = format!("{} ... -name guest={}", bin.display(), spec.name);
        let status = crate::util::wait_deadline(&mut child, START_TIMEOUT)
            .map_err(io_err(&spec.name, "waiting for qemu"))?;
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HvError::CommandTimeout {
                name: spec.name.clone(),
                cmd,
                timeout: START_TIMEOUT,
                fix: "see qemu.log in the qube's run dir",
            });
        };
        // With -D, QEMU's own error messages land in the runtime log, not on stderr.
        let detail = || {
            [tail(&files.log, 5), tail(&files.runtime_log, 5)]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" | ")
        };
        if !status.success() {
            return Err(HvError::Command {
                name: spec.name.clone(),
                cmd,
                status: status.to_string(),
                detail: detail(),
            });
        }
        // The daemon child may already be gone if the guest powered off at once; that
        // still counts as started when it got as far as opening its console.
        if self.live_pid(&spec.run_dir).is_none() && !files.console.exists() {
            return Err(HvError::Command {
                name: spec.name.clone(),
                cmd,
                status: "exited right after start".into(),
                detail: detail(),
            });
        }
        // QEMU creates its sockets with the umask's mode; only the owner may attach to
        // the console or run commands in the guest.
        for sock in [&files.console_sock, &files.agent_sock] {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = fs::set_permissions(sock, fs::Permissions::from_mode(0o600)) {
                tracing::warn!(qube = %spec.name, "chmod 0600 {}: {e}", sock.display());
            }
        }
        tracing::info!(qube = %spec.name, ?accel, "qemu domain started");
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
        let path = socket
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
                })
                .collect(),
            netvm: None,
            net: Default::default(),
            label: "blue".into(),
            run_dir: "/run/qubes/work".into(),
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
            ["stream,id=net0,server=off,reconnect-ms=500,addr.type=unix,addr.path=/run/qubes/sys-net/vif-work.sock"]
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
            assert_eq!(b["server"]["path"], "/run/qubes/work/nbd.sock");
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
        assert_eq!(after(&args, "-pidfile"), ["/run/qubes/work/qemu.pid"]);
        assert_eq!(after(&args, "-D"), ["/run/qubes/work/qemu-runtime.log"]);
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(args.iter().any(|a| a == "-daemonize"));
        assert!(!args.iter().any(|a| a == "-no-shutdown"));
        assert_eq!(after(&args, "-nic"), ["none"]);
        assert_eq!(
            after(&args, "-sandbox"),
            ["on,obsolete=deny,resourcecontrol=deny"]
        );
        let kvm = Qemu::new().command_line(&spec(), Accel::Kvm).unwrap();
        assert_eq!(after(&kvm, "-cpu"), ["host"]);
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
            &"socket,id=console,path=/run/qubes/work/console.sock,server=on,wait=off,\
              logfile=/run/qubes/work/console.log,logappend=off"
        ));
        assert_eq!(after(&args, "-serial"), ["chardev:console"]);
        assert!(chardevs
            .contains(&"socket,id=agent,path=/run/qubes/work/agent.sock,server=on,wait=off"));
        let devices = after(&args, "-device");
        assert!(devices.contains(&"virtio-serial-pci,id=vser0"));
        assert!(devices
            .contains(&"virtserialport,bus=vser0.0,chardev=agent,name=org.qubes-ctl.agent.0"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec();
        s.run_dir = "/run/a,b".into();
        let args = Qemu::new().command_line(&s, Accel::Tcg).unwrap();
        assert!(args
            .iter()
            .any(|a| a == "socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off"));
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
