//! The xenstore side of a blkif device: the backend's half of the XenBus state machine
//! in `xen/io/blkif.h`, written against a [`XenStore`] trait so it runs on the
//! in-memory [`MemStore`] in tests and on libxenstore in dom0.
//!
//! ```text
//!  toolstack: backend/<type>/<fe-domid>/<devid>/{frontend,frontend-id,state=1,...}
//!  start():            publish features + device properties, state 2 (InitWait)
//!  frontend 3 or 4:    read ring-ref(s)/ring-page-order, event-channel, protocol;
//!                      map ring + bind event channel (Connector) -> state 4
//!  frontend 5:         disconnect -> state 5;   frontend 6: disconnect -> state 6
//!  frontend 1 after 6: state 2 again (the guest reloaded its driver)
//!  frontend gone (domain died), backend node gone (toolstack), shutdown(): -> 5, 6
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::abi::{MAX_INDIRECT_SEGMENTS, MAX_RING_PAGE_ORDER, SECTOR_SIZE, VDISK_READONLY};

/// The xenstore operations a backend uses. Paths are absolute.
pub trait XenStore: Send + Sync {
    fn read(&self, path: &str) -> io::Result<Option<String>>;
    fn write(&self, path: &str, value: &str) -> io::Result<()>;
    /// Removes `path` and its children; missing is fine.
    fn rm(&self, path: &str) -> io::Result<()>;
    /// Children names of `path` (empty if it does not exist).
    fn directory(&self, path: &str) -> io::Result<Vec<String>>;
    /// Writes all nodes in one transaction (retried on conflict), so the frontend sees
    /// every feature at once with the state change that ends the list.
    fn write_all(&self, nodes: &[(String, String)]) -> io::Result<()>;
    /// Sets `path`'s permissions: `(domid, XS_PERM_*)`, the first entry being the owner
    /// and the default for everyone else (as `xenstore-chmod`).
    fn set_permissions(&self, path: &str, perms: &[(u32, u32)]) -> io::Result<()>;
    fn watch(&self, path: &str, token: &str) -> io::Result<()>;
    fn unwatch(&self, path: &str, token: &str) -> io::Result<()>;
    /// The next watch event `(path, token)`, waiting at most `timeout`.
    fn next_watch(&self, timeout: Duration) -> io::Result<Option<(String, String)>>;
}

/// XenBus states (`xen/io/xenbus.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl State {
    pub fn parse(s: &str) -> State {
        match s.trim().parse::<u32>() {
            Ok(1) => State::Initialising,
            Ok(2) => State::InitWait,
            Ok(3) => State::Initialised,
            Ok(4) => State::Connected,
            Ok(5) => State::Closing,
            Ok(6) => State::Closed,
            Ok(7) => State::Reconfiguring,
            Ok(8) => State::Reconfigured,
            _ => State::Unknown,
        }
    }
    pub fn as_str(self) -> String {
        (self as u32).to_string()
    }
}

/// In-memory xenstore with watches (tests; fires like xenstored: once at registration,
/// then for every write or removal of the watched node, a node below it, or a parent).
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
    cv: Condvar,
}

#[derive(Default)]
struct MemInner {
    nodes: BTreeMap<String, String>,
    perms: BTreeMap<String, Vec<(u32, u32)>>,
    watches: Vec<(String, String)>,
    events: VecDeque<(String, String)>,
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

impl MemInner {
    fn fire(&mut self, path: &str) {
        for (w, tok) in &self.watches {
            if under(path, w) || under(w, path) {
                self.events.push_back((path.to_string(), tok.clone()));
            }
        }
    }
    fn write(&mut self, path: &str, value: &str) {
        // Parents exist implicitly, as xenstored creates them.
        let mut p = path;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if p.is_empty() {
                break;
            }
            self.nodes.entry(p.to_string()).or_default();
        }
        self.nodes.insert(path.to_string(), value.to_string());
        self.fire(path);
    }
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
    /// The permissions set on `path`, if any were.
    pub fn permissions(&self, path: &str) -> Option<Vec<(u32, u32)>> {
        self.inner.lock().unwrap().perms.get(path).cloned()
    }
    /// A snapshot of every node (for assertions).
    pub fn dump(&self) -> BTreeMap<String, String> {
        self.inner.lock().unwrap().nodes.clone()
    }
}

impl XenStore for MemStore {
    fn read(&self, path: &str) -> io::Result<Option<String>> {
        Ok(self.inner.lock().unwrap().nodes.get(path).cloned())
    }
    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        self.inner.lock().unwrap().write(path, value);
        self.cv.notify_all();
        Ok(())
    }
    fn rm(&self, path: &str) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        let doomed: Vec<String> = g.nodes.keys().filter(|k| under(k, path)).cloned().collect();
        if !doomed.is_empty() {
            for k in doomed {
                g.nodes.remove(&k);
            }
            g.fire(path);
        }
        drop(g);
        self.cv.notify_all();
        Ok(())
    }
    fn directory(&self, path: &str) -> io::Result<Vec<String>> {
        let g = self.inner.lock().unwrap();
        Ok(g.nodes
            .keys()
            .filter_map(|k| k.strip_prefix(path)?.strip_prefix('/'))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_string)
            .collect())
    }
    fn write_all(&self, nodes: &[(String, String)]) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        for (p, v) in nodes {
            g.write(p, v);
        }
        drop(g);
        self.cv.notify_all();
        Ok(())
    }
    fn set_permissions(&self, path: &str, perms: &[(u32, u32)]) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        if !g.nodes.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        g.perms.insert(path.to_string(), perms.to_vec());
        Ok(())
    }
    fn watch(&self, path: &str, token: &str) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        g.watches.push((path.to_string(), token.to_string()));
        g.events.push_back((path.to_string(), token.to_string()));
        drop(g);
        self.cv.notify_all();
        Ok(())
    }
    fn unwatch(&self, path: &str, token: &str) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        g.watches.retain(|(p, t)| !(p == path && t == token));
        g.events.retain(|(_, t)| t != token);
        Ok(())
    }
    fn next_watch(&self, timeout: Duration) -> io::Result<Option<(String, String)>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.inner.lock().unwrap();
        loop {
            if let Some(e) = g.events.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }
}

/// What the frontend published for the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendParams {
    pub domid: u32,
    /// One grant per ring page, in page order (2^ring-page-order of them).
    pub ring_refs: Vec<u32>,
    pub event_channel: u32,
    /// Both ends offered `feature-persistent`: the frontend keeps its data grants for
    /// the connection, so the backend may map them once (see `blkif::persistent`).
    pub persistent: bool,
}

/// Maps the ring and binds the event channel; the running connection is dropped (its
/// thread stopped, ring unmapped, port unbound) by [`Connector::disconnect`].
pub trait Connector: Send {
    type Running: Send;
    fn connect(&mut self, fe: &FrontendParams) -> Result<Self::Running, String>;
    fn disconnect(&mut self, running: Self::Running);
}

/// What the backend advertises for one device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub size: u64,
    pub read_only: bool,
    /// Discard frees whole pool chunks: advertise the chunk size so the guest's
    /// discards line up with them.
    pub discard_granularity: u32,
    /// Offer `feature-persistent` (grants mapped once and kept; see `blkif::persistent`).
    pub persistent: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum XenbusError {
    #[error("xenstore {op} {path}: {source}")]
    Store {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    #[error(
        "backend {path} is missing node {node}; the toolstack writes it when it creates the device"
    )]
    MissingNode { path: String, node: &'static str },
    #[error("backend {path}: node {node} = {value:?} is not valid")]
    BadNode {
        path: String,
        node: &'static str,
        value: String,
    },
}

/// What the device did after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still alive (waiting, or connected).
    Alive,
    /// Closed for good: the frontend or the backend node went away. Drop the device.
    Gone,
}

pub struct BlkifDevice<X: XenStore, C: Connector> {
    xs: X,
    pub backend: String,
    pub frontend: String,
    pub frontend_id: u32,
    info: DeviceInfo,
    connector: C,
    running: Option<C::Running>,
    state: State,
}

fn store_err<'a>(op: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> XenbusError + 'a {
    move |source| XenbusError::Store {
        op,
        path: path.to_string(),
        source,
    }
}

impl<X: XenStore, C: Connector> BlkifDevice<X, C> {
    /// Reads the toolstack's nodes under `backend` (`frontend`, `frontend-id`).
    pub fn new(xs: X, backend: &str, info: DeviceInfo, connector: C) -> Result<Self, XenbusError> {
        let need = |node: &'static str| -> Result<String, XenbusError> {
            let p = format!("{backend}/{node}");
            xs.read(&p)
                .map_err(store_err("read", &p))?
                .ok_or(XenbusError::MissingNode {
                    path: backend.to_string(),
                    node,
                })
        };
        let frontend = need("frontend")?;
        let fid = need("frontend-id")?;
        let frontend_id = fid.trim().parse().map_err(|_| XenbusError::BadNode {
            path: backend.to_string(),
            node: "frontend-id",
            value: fid.clone(),
        })?;
        if !frontend.starts_with('/') {
            return Err(XenbusError::BadNode {
                path: backend.to_string(),
                node: "frontend",
                value: frontend,
            });
        }
        Ok(BlkifDevice {
            xs,
            backend: backend.to_string(),
            frontend,
            frontend_id,
            info,
            connector,
            running: None,
            state: State::Initialising,
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_connected(&self) -> bool {
        self.running.is_some()
    }

    pub fn running(&self) -> Option<&C::Running> {
        self.running.as_ref()
    }

    /// The xenstore the device talks to.
    pub fn store(&self) -> &X {
        &self.xs
    }

    fn set_state(&mut self, s: State) -> Result<(), XenbusError> {
        let p = format!("{}/state", self.backend);
        self.xs
            .write(&p, &s.as_str())
            .map_err(store_err("write", &p))?;
        // One line per transition: the daemon's log shows how each device opened/closed.
        tracing::info!(
            backend = self.backend,
            state = s as u32,
            "blkif backend state"
        );
        self.state = s;
        Ok(())
    }

    /// Takes over a device an earlier backend process published (daemon restart): the
    /// nodes, the features and the frontend's ring stay in xenstore and in the guest, so
    /// a device that was Connected is connected again at once (ring mapped anew, event
    /// channel bound again: the old process's end was closed when it died, which leaves
    /// the guest's port unbound and bindable), and the requests it had not answered are
    /// served from the ring (`BackRing::attach` starts at the published responses).
    /// Other states carry on through [`Self::on_change`] as for a fresh device.
    pub fn resume(&mut self) -> Result<(), XenbusError> {
        let bstate = format!("{}/state", self.backend);
        let be = self
            .xs
            .read(&bstate)
            .map_err(store_err("read", &bstate))?
            .ok_or(XenbusError::MissingNode {
                path: self.backend.clone(),
                node: "state",
            })?;
        match State::parse(&be) {
            State::Connected => {
                let fpath = format!("{}/state", self.frontend);
                let fe = self.xs.read(&fpath).map_err(store_err("read", &fpath))?;
                let fe = fe.map(|f| State::parse(&f));
                if !matches!(fe, Some(State::Initialised | State::Connected)) {
                    // The frontend left while no backend watched: let on_change close.
                    self.state = State::Connected;
                    return Ok(());
                }
                match self
                    .frontend_params()
                    .and_then(|p| self.connector.connect(&p))
                {
                    Ok(r) => {
                        tracing::info!(backend = self.backend, "blkif ring connected again");
                        self.running = Some(r);
                        self.state = State::Connected;
                    }
                    Err(e) => {
                        tracing::warn!(backend = self.backend, "blkif reconnect failed: {e}");
                        let p = format!("{}/error", self.backend);
                        self.xs.write(&p, &e).map_err(store_err("write", &p))?;
                        self.set_state(State::Closing)?;
                    }
                }
            }
            State::Initialising | State::Unknown => self.start()?,
            s => self.state = s,
        }
        Ok(())
    }

    /// Publishes features and device properties, then InitWait, in one transaction.
    pub fn start(&mut self) -> Result<(), XenbusError> {
        let b = &self.backend;
        let sectors = self.info.size / SECTOR_SIZE;
        let info = if self.info.read_only {
            VDISK_READONLY
        } else {
            0
        };
        let mut nodes: Vec<(String, String)> = [
            ("feature-flush-cache", "1".to_string()),
            ("feature-barrier", "0".to_string()),
            (
                "feature-persistent",
                u8::from(self.info.persistent).to_string(),
            ),
            (
                "feature-max-indirect-segments",
                MAX_INDIRECT_SEGMENTS.to_string(),
            ),
            ("max-ring-page-order", MAX_RING_PAGE_ORDER.to_string()),
            ("sectors", sectors.to_string()),
            ("sector-size", SECTOR_SIZE.to_string()),
            ("info", info.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{b}/{k}"), v))
        .collect();
        if !self.info.read_only {
            nodes.push((format!("{b}/feature-discard"), "1".into()));
            nodes.push((
                format!("{b}/discard-granularity"),
                self.info.discard_granularity.to_string(),
            ));
            nodes.push((format!("{b}/discard-alignment"), "0".into()));
            nodes.push((format!("{b}/discard-secure"), "0".into()));
        }
        nodes.push((format!("{b}/state"), State::InitWait.as_str()));
        self.xs
            .write_all(&nodes)
            .map_err(store_err("write", &self.backend))?;
        self.state = State::InitWait;
        Ok(())
    }

    /// Paths whose changes the caller must feed to [`Self::on_change`].
    pub fn watch_paths(&self) -> [String; 2] {
        [format!("{}/state", self.frontend), self.backend.clone()]
    }

    fn frontend_params(&self) -> Result<FrontendParams, String> {
        let read = |n: &str| -> Result<Option<String>, String> {
            self.xs
                .read(&format!("{}/{n}", self.frontend))
                .map_err(|e| format!("reading {}/{n}: {e}", self.frontend))
        };
        let num = |n: &str| -> Result<u32, String> {
            let v = read(n)?.ok_or_else(|| format!("frontend did not write {n}"))?;
            v.trim()
                .parse()
                .map_err(|_| format!("frontend {n} = {v:?} is not a number"))
        };
        match read("protocol")?.as_deref() {
            None | Some("x86_64-abi") => {}
            Some(p) => {
                return Err(format!(
                    "ring protocol {p:?} is not supported (x86_64-abi only)"
                ))
            }
        }
        if read("multi-queue-num-queues")?.is_some_and(|q| q.trim() != "1") {
            return Err("multiple queues were not offered".into());
        }
        let ring_refs = match read("ring-page-order")? {
            Some(_) => {
                let order = num("ring-page-order")?;
                if order > MAX_RING_PAGE_ORDER {
                    return Err(format!("ring-page-order {order} > {MAX_RING_PAGE_ORDER}"));
                }
                (0..1u32 << order)
                    .map(|i| num(&format!("ring-ref{i}")))
                    .collect::<Result<_, _>>()?
            }
            None => vec![num("ring-ref")?],
        };
        let persistent =
            self.info.persistent && read("feature-persistent")?.is_some_and(|v| v.trim() == "1");
        Ok(FrontendParams {
            domid: self.frontend_id,
            ring_refs,
            event_channel: num("event-channel")?,
            persistent,
        })
    }

    fn disconnect(&mut self) {
        if let Some(r) = self.running.take() {
            self.connector.disconnect(r);
        }
    }

    /// Reacts to the frontend's state (and to the backend node vanishing).
    pub fn on_change(&mut self) -> Result<Outcome, XenbusError> {
        let bstate = format!("{}/state", self.backend);
        if self
            .xs
            .read(&bstate)
            .map_err(store_err("read", &bstate))?
            .is_none()
        {
            // The toolstack removed the device.
            self.disconnect();
            self.state = State::Closed;
            return Ok(Outcome::Gone);
        }
        let fpath = format!("{}/state", self.frontend);
        let fe = self.xs.read(&fpath).map_err(store_err("read", &fpath))?;
        let Some(fe) = fe else {
            // The frontend's directory is gone: the domain died or was destroyed.
            self.disconnect();
            if self.state != State::Closed {
                self.set_state(State::Closed)?;
            }
            return Ok(Outcome::Gone);
        };
        match State::parse(&fe) {
            State::Initialising if self.state == State::Closed => self.start()?,
            State::Initialised | State::Connected if self.state == State::InitWait => {
                match self
                    .frontend_params()
                    .and_then(|p| self.connector.connect(&p))
                {
                    Ok(r) => {
                        self.running = Some(r);
                        self.set_state(State::Connected)?;
                    }
                    Err(e) => {
                        tracing::warn!(backend = self.backend, "blkif connect failed: {e}");
                        let p = format!("{}/error", self.backend);
                        self.xs.write(&p, &e).map_err(store_err("write", &p))?;
                        self.set_state(State::Closing)?;
                    }
                }
            }
            State::Closing if self.state < State::Closing => {
                self.disconnect();
                self.set_state(State::Closing)?;
            }
            State::Closed | State::Unknown if self.state < State::Closed => {
                self.disconnect();
                self.set_state(State::Closed)?;
            }
            _ => {}
        }
        Ok(Outcome::Alive)
    }

    /// Backend shutdown (qube shutdown, daemon stop): stop serving, then 5 and 6.
    pub fn shutdown(&mut self) -> Result<(), XenbusError> {
        if self.state != State::Closed {
            self.set_state(State::Closing)?;
            self.disconnect();
            self.set_state(State::Closed)?;
        }
        Ok(())
    }
}

impl<X: XenStore, C: Connector> Drop for BlkifDevice<X, C> {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl<T: XenStore + ?Sized> XenStore for std::sync::Arc<T> {
    fn read(&self, path: &str) -> io::Result<Option<String>> {
        (**self).read(path)
    }
    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        (**self).write(path, value)
    }
    fn rm(&self, path: &str) -> io::Result<()> {
        (**self).rm(path)
    }
    fn directory(&self, path: &str) -> io::Result<Vec<String>> {
        (**self).directory(path)
    }
    fn write_all(&self, nodes: &[(String, String)]) -> io::Result<()> {
        (**self).write_all(nodes)
    }
    fn set_permissions(&self, path: &str, perms: &[(u32, u32)]) -> io::Result<()> {
        (**self).set_permissions(path, perms)
    }
    fn watch(&self, path: &str, token: &str) -> io::Result<()> {
        (**self).watch(path, token)
    }
    fn unwatch(&self, path: &str, token: &str) -> io::Result<()> {
        (**self).unwatch(path, token)
    }
    fn next_watch(&self, timeout: Duration) -> io::Result<Option<(String, String)>> {
        (**self).next_watch(timeout)
    }
}

/// xenstore permission bits (`xenstore_lib.h`).
pub const XS_PERM_NONE: u32 = 0;
pub const XS_PERM_READ: u32 = 1;

/// Where a device's nodes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePaths {
    pub backend: String,
    pub frontend: String,
}

/// The type directory of our backend (`/local/domain/0/backend/<KIND>/...`): not `vbd`,
/// which a loaded kernel xen-blkback takes, nor `vbd3`/`qdisk` (tapdisk3, QEMU).
pub const BACKEND_KIND: &str = "qubes-vbd";

/// Where [`add_device`] puts the nodes of device `devid` of domain `domid`.
pub fn device_paths(backend_domid: u32, domid: u32, devid: u32) -> DevicePaths {
    DevicePaths {
        backend: format!("/local/domain/{backend_domid}/backend/{BACKEND_KIND}/{domid}/{devid}"),
        frontend: format!("/local/domain/{domid}/device/vbd/{devid}"),
    }
}

/// Writes the nodes a toolstack writes for a vbd (what libxl's device add does), for a
/// domain created paused (`xl create -p`) whose disk our daemon serves: backend
/// directory owned by the backend domain and readable by the guest, frontend directory
/// owned by the guest and readable by the backend; then the caller creates the
/// [`BlkifDevice`] on `backend` and unpauses the domain.
#[allow(clippy::too_many_arguments)]
pub fn add_device<X: XenStore>(
    xs: &X,
    backend_domid: u32,
    domid: u32,
    devid: u32,
    vdev: &str,
    read_only: bool,
    params: &str,
) -> io::Result<DevicePaths> {
    let DevicePaths { backend, frontend } = device_paths(backend_domid, domid, devid);
    let mode = if read_only { "r" } else { "w" };
    let mut nodes: Vec<(String, String)> = [
        ("frontend", frontend.clone()),
        ("frontend-id", domid.to_string()),
        ("online", "1".into()),
        ("removable", "0".into()),
        ("bootable", "1".into()),
        ("state", State::Initialising.as_str()),
        ("dev", vdev.to_string()),
        ("type", "phy".into()),
        ("mode", mode.into()),
        ("device-type", "disk".into()),
        ("params", params.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{backend}/{k}"), v))
    .collect();
    nodes.extend(
        [
            ("backend", backend.clone()),
            ("backend-id", backend_domid.to_string()),
            ("state", State::Initialising.as_str()),
            ("virtual-device", devid.to_string()),
            ("device-type", "disk".into()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{frontend}/{k}"), v)),
    );
    xs.rm(&backend)?;
    xs.rm(&frontend)?;
    xs.write_all(&nodes)?;
    // Children inherit nothing once created, so set every node (xenstored checks each).
    for (p, _) in &nodes {
        if p.starts_with(&backend) {
            xs.set_permissions(p, &[(backend_domid, XS_PERM_NONE), (domid, XS_PERM_READ)])?;
        } else {
            xs.set_permissions(p, &[(domid, XS_PERM_NONE), (backend_domid, XS_PERM_READ)])?;
        }
    }
    for (dir, owner, reader) in [
        (&backend, backend_domid, domid),
        (&frontend, domid, backend_domid),
    ] {
        xs.set_permissions(dir, &[(owner, XS_PERM_NONE), (reader, XS_PERM_READ)])?;
    }
    Ok(DevicePaths { backend, frontend })
}

/// Removes what [`add_device`] wrote (after the device closed, or the domain died).
pub fn remove_device<X: XenStore>(xs: &X, paths: &DevicePaths) -> io::Result<()> {
    xs.rm(&paths.backend)?;
    xs.rm(&paths.frontend)?;
    // The per-domain directory under our type directory, once its last device is gone.
    if let Some((dom_dir, _)) = paths.backend.rsplit_once('/') {
        if xs.directory(dom_dir)?.is_empty() {
            xs.rm(dom_dir)?;
        }
    }
    Ok(())
}
