//! The guest agent's channel on Xen (`qubes-ctl qube run`): a second PV console that the
//! daemon itself serves (blkback's `console` module), bridged to `RUN/agent.sock`, the
//! same socket and protocol as QEMU's virtio-serial port.
//!
//! ```text
//!  xl create -p -> add_console (device/console/1, backend/qubes-console/DOMID/1) -> InitWait
//!  unpause -> the guest's hvc_xen maps nothing, grants its ring page, writes ring-ref/port
//!          -> we map + bind -> Connected; the guest's /dev/hvc1 carries the agent
//!  qube run: connect(RUN/agent.sock) <-> bridge thread <-> ring <-> hvc1 <-> agent
//! ```
//!
//! One xenstore handle and one watch thread per qube, as for the blkif disks; generic
//! over the store and connector so the sequence is tested in-process.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blkback::blkif::xenbus::{Connector, Outcome, XenStore};
use blkback::console::device::{self, ConsoleDevice, ConsolePaths};

const BACKEND_DOMID: u32 = 0;
/// The guest's /dev/hvc1: hvc_xen numbers the xenbus consoles after the primary one.
pub const AGENT_DEVID: u32 = 1;
/// The agent socket in the qube's run dir (the name QEMU's backend uses too).
pub const SOCKET: &str = "agent.sock";

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET)
}

/// Binds the agent socket (a stale one from an earlier daemon is replaced), mode 0600.
pub fn bind_socket(run_dir: &Path) -> Result<Arc<UnixListener>> {
    let path = socket_path(run_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let l = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(Arc::new(l))
}

type Dev<X, C> = ConsoleDevice<Arc<X>, C>;

/// The agent console of one domain.
pub struct AgentChannel<X: XenStore + 'static, C: Connector + 'static> {
    xs: Arc<X>,
    pub paths: ConsolePaths,
    watches: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
    pump: Option<JoinHandle<Option<Dev<X, C>>>>,
    /// Remove the nodes on detach (not after a failed resume: not ours then).
    owned: bool,
}

impl<X: XenStore + 'static, C: Connector + 'static> AgentChannel<X, C>
where
    C::Running: 'static,
{
    /// Writes the console's nodes for the paused domain `domid` and waits for its
    /// frontend (unpause the domain after this).
    pub fn attach(xs: Arc<X>, domid: u32, connector: C) -> Result<Self> {
        let paths = device::add_console(&*xs, BACKEND_DOMID, domid, AGENT_DEVID, "qubes-agent")
            .with_context(|| {
                format!("writing the agent console's xenstore nodes (domain {domid})")
            })?;
        Self::open(xs, domid, paths, connector, false)
    }

    /// Serves again the agent console an earlier daemon served (daemon restart); `None`
    /// if the domain has none (started before this backend existed).
    pub fn reattach(xs: Arc<X>, domid: u32, connector: C) -> Result<Option<Self>> {
        let paths = device::console_paths(BACKEND_DOMID, domid, AGENT_DEVID);
        if xs.read(&format!("{}/state", paths.backend))?.is_none() {
            return Ok(None);
        }
        Self::open(xs, domid, paths, connector, true).map(Some)
    }

    fn open(
        xs: Arc<X>,
        domid: u32,
        paths: ConsolePaths,
        connector: C,
        resume: bool,
    ) -> Result<Self> {
        let mut this = AgentChannel {
            xs: xs.clone(),
            paths: paths.clone(),
            watches: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            pump: None,
            owned: !resume,
        };
        let mut dev = ConsoleDevice::new(xs.clone(), paths, domid, connector);
        let token = format!("qubes-console/{domid}");
        let r = (|| -> Result<()> {
            for p in dev.watch_paths() {
                xs.watch(&p, &token)
                    .with_context(|| format!("watching {p}"))?;
                this.watches.push((p, token.clone()));
            }
            if resume {
                dev.resume()?;
            } else {
                dev.start()?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            drop(dev);
            let _ = this.close();
            return Err(e.context(format!("opening the agent console of domain {domid}")));
        }
        let stop = this.stop.clone();
        this.pump = Some(
            std::thread::Builder::new()
                .name(format!("console-pump-{domid}"))
                .spawn(move || pump(xs, dev, stop))
                .context("starting the agent console's watch thread")?,
        );
        Ok(this)
    }

    /// Stops serving: Closing, Closed, then the nodes go.
    pub fn detach(mut self) -> Result<()> {
        if let Some(mut dev) = self.stop_pump() {
            if let Err(e) = dev.shutdown() {
                tracing::warn!(
                    backend = dev.paths.backend,
                    "closing the agent console: {e}"
                );
            }
        }
        self.owned = true;
        self.close()
    }

    fn stop_pump(&mut self) -> Option<Dev<X, C>> {
        self.stop.store(true, Ordering::Release);
        self.pump.take().and_then(|p| p.join().ok()).flatten()
    }

    fn close(&mut self) -> Result<()> {
        for (p, t) in std::mem::take(&mut self.watches) {
            let _ = self.xs.unwatch(&p, &t);
        }
        if self.owned {
            self.owned = false;
            device::remove_console(&*self.xs, &self.paths)
                .with_context(|| format!("removing xenstore nodes {}", self.paths.backend))?;
        }
        Ok(())
    }
}

impl<X: XenStore + 'static, C: Connector + 'static> Drop for AgentChannel<X, C> {
    /// Without [`Self::detach`] (daemon exit): the bridge stops, xenstore stays as it is
    /// for the next daemon's [`Self::reattach`].
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
    }
}

fn pump<X: XenStore, C: Connector>(
    xs: Arc<X>,
    mut dev: Dev<X, C>,
    stop: Arc<AtomicBool>,
) -> Option<Dev<X, C>> {
    while !stop.load(Ordering::Acquire) {
        match xs.next_watch(Duration::from_millis(200)) {
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("reading xenstore watches: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        match dev.on_change() {
            Ok(Outcome::Alive) => {}
            Ok(Outcome::Gone) => {
                tracing::info!(backend = dev.paths.backend, "agent console closed");
                return None;
            }
            Err(e) => tracing::warn!(backend = dev.paths.backend, "agent console: {e}"),
        }
    }
    Some(dev)
}

pub type RealAgent = AgentChannel<xen_sys::XenStore, blkback::console::xen::XenConsoleConnector>;

fn real_parts(
    run_dir: &Path,
) -> Result<(
    Arc<xen_sys::XenStore>,
    blkback::console::xen::XenConsoleConnector,
)> {
    let xs = Arc::new(xen_sys::XenStore::open().context("opening xenstore for the agent console")?);
    let gnttab = xen_sys::GntTab::open()
        .context("opening /dev/xen/gntdev for the agent console (`modprobe xen-gntdev`)")?;
    let listener = bind_socket(run_dir)?;
    Ok((
        xs,
        blkback::console::xen::XenConsoleConnector { gnttab, listener },
    ))
}

/// The agent console of the paused domain `domid`, on `run_dir`/agent.sock.
pub fn attach_real(domid: u32, run_dir: &Path) -> Result<RealAgent> {
    let (xs, c) = real_parts(run_dir)?;
    AgentChannel::attach(xs, domid, c)
}

/// After a daemon restart: the agent console of the running domain `domid`, if it has one.
pub fn reattach_real(domid: u32, run_dir: &Path) -> Result<Option<RealAgent>> {
    let (xs, c) = real_parts(run_dir)?;
    let r = AgentChannel::reattach(xs, domid, c)?;
    if r.is_none() {
        let _ = std::fs::remove_file(socket_path(run_dir));
    }
    Ok(r)
}

/// `qube run`'s check before it waits for an agent: a Xen domain without our console.
pub fn ensure_socket(name: &str, run_dir: &Path) -> Result<PathBuf> {
    let p = socket_path(run_dir);
    if !p.exists() {
        bail!(
            "{name} has no agent channel ({} is missing): it was started by an older qubes-ctl \
             or with QUBES_XEN_DISKS=nbd; restart it with `qubes-ctl qube shutdown {name}` and \
             `qube start`",
            p.display()
        );
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkback::blkif::xenbus::{FrontendParams, MemStore};
    use blkback::console::bridge::{bridge, BridgeError, Doorbell, PipeBell};
    use blkback::console::ring::{ConsRing, GuestEnd};
    use guest_agent::host::{self, Outcome};
    use guest_agent::proto::Exec;
    use std::collections::HashMap;
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use std::time::Instant;
    use xen_sys::SharedMem;

    /// What the in-process "guest" granted: ring pages by ref, channel ends by port.
    #[derive(Default)]
    struct Grants {
        pages: Mutex<HashMap<u32, Arc<SharedMem>>>,
        ports: Mutex<HashMap<u32, PipeBell>>,
    }

    struct TestConnector {
        grants: Arc<Grants>,
        listener: Arc<UnixListener>,
    }

    struct Running {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Result<(), BridgeError>>,
    }

    impl Connector for TestConnector {
        type Running = Running;
        fn connect(&mut self, fe: &FrontendParams) -> Result<Running, String> {
            let mem = self
                .grants
                .pages
                .lock()
                .unwrap()
                .get(&fe.ring_refs[0])
                .cloned()
                .ok_or("bad ring-ref")?;
            let bell = self
                .grants
                .ports
                .lock()
                .unwrap()
                .remove(&fe.event_channel)
                .ok_or("bad port")?;
            let mut ring = ConsRing::attach(mem).map_err(|e| e.to_string())?;
            let listener = self.listener.clone();
            let stop = Arc::new(AtomicBool::new(false));
            let s = stop.clone();
            let thread = std::thread::spawn(move || bridge(&mut ring, &bell, &listener, &s));
            Ok(Running { stop, thread })
        }
        fn disconnect(&mut self, r: Running) {
            r.stop.store(true, Ordering::Release);
            r.thread.join().unwrap().unwrap();
        }
    }

    fn wait_node(xs: &MemStore, path: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while xs.read(path).unwrap().as_deref() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "{path} never {want}: {:?}",
                xs.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// hvc_xen's part: grant a zeroed page and an unbound port, publish them,
    /// Initialised, then Connected once the backend is; then carry bytes between the
    /// ring and `tty` (the agent's end).
    fn guest_frontend(xs: &MemStore, grants: &Grants, domid: u32, tty: UnixStream) {
        let fe = format!("/local/domain/{domid}/device/console/1");
        let be = xs.read(&format!("{fe}/backend")).unwrap().unwrap();
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        grants.pages.lock().unwrap().insert(8, mem.clone());
        let (back, front) = PipeBell::pair().unwrap();
        grants.ports.lock().unwrap().insert(5, back);
        xs.write(&format!("{fe}/ring-ref"), "8").unwrap();
        xs.write(&format!("{fe}/port"), "5").unwrap();
        xs.write(&format!("{fe}/state"), "3").unwrap();
        wait_node(xs, &format!("{be}/state"), "4");
        xs.write(&format!("{fe}/state"), "4").unwrap();
        std::thread::spawn(move || {
            let g = GuestEnd { mem };
            tty.set_nonblocking(true).unwrap();
            let mut pending: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                if pending.is_empty() {
                    match (&tty).read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                let n = g.write_out(&pending);
                pending.drain(..n);
                let input = g.read_in();
                if n > 0 || !input.is_empty() {
                    front.notify().unwrap();
                }
                if (&tty).write_all(&input).is_err() {
                    return;
                }
                front.ack().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }

    fn run(sock: &Path, argv: &[&str], stdin: Option<&std::fs::File>) -> (Outcome, Vec<u8>) {
        use std::os::fd::AsFd;
        let conn = UnixStream::connect(sock).unwrap();
        let exec = Exec {
            user: String::new(),
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            pass_io: stdin.is_some(),
            no_wait: false,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let o = host::run(
            &conn,
            &exec,
            stdin.map(|f| f.as_fd()),
            &mut out,
            &mut err,
            Instant::now() + Duration::from_secs(60),
        )
        .unwrap();
        (o, out)
    }

    /// The whole Xen path but Xen: nodes written for the paused domain, hvc_xen's
    /// handshake, the ring, the bridge on agent.sock, the real agent behind the ring,
    /// and `qube run`'s host side: output, exit status, stdin; a second session on the
    /// same ring; detach closes 5 -> 6 and removes the nodes and nothing is left.
    #[test]
    fn qube_run_sessions_over_the_console_ring() {
        let dir = tempfile::tempdir().unwrap();
        let xs = Arc::new(MemStore::new());
        let grants = Arc::new(Grants::default());
        let listener = bind_socket(dir.path()).unwrap();
        let sock = socket_path(dir.path());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
        let ch = AgentChannel::attach(
            xs.clone(),
            12,
            TestConnector {
                grants: grants.clone(),
                listener,
            },
        )
        .unwrap();
        let be = "/local/domain/0/backend/qubes-console/12/1";
        wait_node(&xs, &format!("{be}/state"), "2");
        let (agent_end, tty) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let rd = std::fs::File::from(std::os::fd::OwnedFd::from(agent_end));
            let wr = rd.try_clone().unwrap();
            let link = guest_agent::agent::Link::new(rd, wr, true).unwrap();
            let _ = guest_agent::agent::serve(link);
        });
        guest_frontend(&xs, &grants, 12, tty);
        let (o, out) = run(&sock, &["sh", "-c", "echo work; exit 3"], None);
        assert_eq!((o, out), (Outcome::Exited(3), b"work\n".to_vec()));
        let input = dir.path().join("in");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 256) as u8).collect();
        std::fs::write(&input, &data).unwrap();
        let (o, out) = run(&sock, &["cat"], Some(&std::fs::File::open(&input).unwrap()));
        assert_eq!(o, Outcome::Exited(0));
        assert!(out == data, "{} bytes back of {}", out.len(), data.len());
        ch.detach().unwrap();
        assert!(
            xs.dump()
                .keys()
                .all(|k| !k.contains("console/1") && !k.contains("qubes-console/12")),
            "{:?}",
            xs.dump()
        );
    }

    #[test]
    fn reattach_without_our_console_is_none_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let xs = Arc::new(MemStore::new());
        let c = TestConnector {
            grants: Arc::default(),
            listener: bind_socket(dir.path()).unwrap(),
        };
        assert!(AgentChannel::reattach(xs.clone(), 4, c).unwrap().is_none());
        assert!(xs.dump().is_empty());
    }

    #[test]
    fn ensure_socket_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = ensure_socket("work", dir.path()).unwrap_err();
        assert!(format!("{e}").contains("qube shutdown work"), "{e}");
    }
}
