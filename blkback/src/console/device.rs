//! The xenstore side of a secondary PV console (a Linux guest's `hvc_xen` frontend,
//! `device/console/N`, N >= 1: the guest's /dev/hvcN), written by us as a toolstack
//! would and served by our own backend, like the blkif disks.
//!
//! ```text
//!  add_console (domain paused): backend/qubes-console/<domid>/<n>/{frontend,frontend-id,state=1}
//!                               <domain>/device/console/<n>/{backend,backend-id,state=1}
//!  start():               state 2 (InitWait)
//!  frontend 3 (hvc_xen writes ring-ref + port, then Initialised): map + bind -> 4
//!  frontend 5/6, gone:    disconnect -> 5/6;  backend node gone: Gone
//! ```

use super::super::blkif::xenbus::{
    Connector, FrontendParams, Outcome, State, XenStore, XenbusError, XS_PERM_NONE, XS_PERM_READ,
};
use std::io;

/// Our backend type directory: not `console`, which QEMU device models and
/// xenconsoled's setups use.
pub const BACKEND_KIND: &str = "qubes-console";

/// Where a console device's nodes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsolePaths {
    pub backend: String,
    pub frontend: String,
}

pub fn console_paths(backend_domid: u32, domid: u32, devid: u32) -> ConsolePaths {
    ConsolePaths {
        backend: format!("/local/domain/{backend_domid}/backend/{BACKEND_KIND}/{domid}/{devid}"),
        frontend: format!("/local/domain/{domid}/device/console/{devid}"),
    }
}

/// Writes the nodes of console `devid` (>= 1: hvc_xen leaves device 0 to the primary
/// console) of the paused domain `domid`: the backend directory owned by the backend
/// and readable by the guest (its xenbus refuses a backend it cannot read), the
/// frontend directory owned by the guest (it writes ring-ref, port, state) and readable
/// by the backend.
pub fn add_console<X: XenStore>(
    xs: &X,
    backend_domid: u32,
    domid: u32,
    devid: u32,
    name: &str,
) -> io::Result<ConsolePaths> {
    let ConsolePaths { backend, frontend } = console_paths(backend_domid, domid, devid);
    let init = State::Initialising.as_str();
    let mut nodes: Vec<(String, String)> = [
        ("frontend", frontend.clone()),
        ("frontend-id", domid.to_string()),
        ("online", "1".into()),
        ("state", init.clone()),
        ("protocol", "vt100".into()),
        ("name", name.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{backend}/{k}"), v))
    .collect();
    nodes.extend(
        [
            ("backend", backend.clone()),
            ("backend-id", backend_domid.to_string()),
            ("state", init),
            ("name", name.to_string()),
            ("type", BACKEND_KIND.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{frontend}/{k}"), v)),
    );
    xs.rm(&backend)?;
    xs.rm(&frontend)?;
    xs.write_all(&nodes)?;
    for (p, _) in &nodes {
        if p.starts_with(&backend) {
            xs.set_permissions(p, &[(backend_domid, XS_PERM_NONE), (domid, XS_PERM_READ)])?;
        } else {
            xs.set_permissions(p, &[(domid, XS_PERM_NONE), (backend_domid, XS_PERM_READ)])?;
        }
    }
    xs.set_permissions(
        &backend,
        &[(backend_domid, XS_PERM_NONE), (domid, XS_PERM_READ)],
    )?;
    xs.set_permissions(
        &frontend,
        &[(domid, XS_PERM_NONE), (backend_domid, XS_PERM_READ)],
    )?;
    Ok(ConsolePaths { backend, frontend })
}

/// Removes what [`add_console`] wrote.
pub fn remove_console<X: XenStore>(xs: &X, paths: &ConsolePaths) -> io::Result<()> {
    xs.rm(&paths.backend)?;
    xs.rm(&paths.frontend)?;
    if let Some((dom_dir, _)) = paths.backend.rsplit_once('/') {
        if xs.directory(dom_dir)?.is_empty() {
            xs.rm(dom_dir)?;
        }
    }
    Ok(())
}

fn store_err<'a>(op: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> XenbusError + 'a {
    move |source| XenbusError::Store {
        op,
        path: path.to_string(),
        source,
    }
}

/// The backend's half of one console's XenBus state machine.
pub struct ConsoleDevice<X: XenStore, C: Connector> {
    xs: X,
    pub paths: ConsolePaths,
    pub frontend_id: u32,
    connector: C,
    running: Option<C::Running>,
    state: State,
}

impl<X: XenStore, C: Connector> ConsoleDevice<X, C> {
    pub fn new(xs: X, paths: ConsolePaths, frontend_id: u32, connector: C) -> Self {
        ConsoleDevice {
            xs,
            paths,
            frontend_id,
            connector,
            running: None,
            state: State::Initialising,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_connected(&self) -> bool {
        self.running.is_some()
    }

    /// Paths whose changes the caller feeds to [`Self::on_change`].
    pub fn watch_paths(&self) -> [String; 2] {
        [
            format!("{}/state", self.paths.frontend),
            self.paths.backend.clone(),
        ]
    }

    fn set_state(&mut self, s: State) -> Result<(), XenbusError> {
        let p = format!("{}/state", self.paths.backend);
        self.xs
            .write(&p, &s.as_str())
            .map_err(store_err("write", &p))?;
        tracing::info!(
            backend = self.paths.backend,
            state = s as u32,
            "console backend state"
        );
        self.state = s;
        Ok(())
    }

    /// Ready for the frontend: InitWait.
    pub fn start(&mut self) -> Result<(), XenbusError> {
        self.set_state(State::InitWait)
    }

    /// Takes over a console an earlier daemon served (see `BlkifDevice::resume`): a
    /// Connected one is mapped and bound again at once.
    pub fn resume(&mut self) -> Result<(), XenbusError> {
        let p = format!("{}/state", self.paths.backend);
        let be =
            self.xs
                .read(&p)
                .map_err(store_err("read", &p))?
                .ok_or(XenbusError::MissingNode {
                    path: self.paths.backend.clone(),
                    node: "state",
                })?;
        match State::parse(&be) {
            State::Connected => {
                self.state = State::Connected;
                let fe = self.frontend_state()?;
                if matches!(fe, Some(State::Initialised | State::Connected)) {
                    self.connect(State::Connected)?;
                }
            }
            State::Initialising | State::Unknown => self.start()?,
            s => self.state = s,
        }
        Ok(())
    }

    fn frontend_state(&self) -> Result<Option<State>, XenbusError> {
        let p = format!("{}/state", self.paths.frontend);
        Ok(self
            .xs
            .read(&p)
            .map_err(store_err("read", &p))?
            .map(|s| State::parse(&s)))
    }

    /// What hvc_xen published: one grant (`ring-ref`) and an unbound port (`port`).
    fn frontend_params(&self) -> Result<FrontendParams, String> {
        let num = |n: &str| -> Result<u32, String> {
            let p = format!("{}/{n}", self.paths.frontend);
            let v = self
                .xs
                .read(&p)
                .map_err(|e| format!("reading {p}: {e}"))?
                .ok_or_else(|| format!("frontend did not write {n}"))?;
            v.trim()
                .parse()
                .map_err(|_| format!("frontend {n} = {v:?} is not a number"))
        };
        Ok(FrontendParams {
            domid: self.frontend_id,
            ring_refs: vec![num("ring-ref")?],
            event_channel: num("port")?,
            // A console ring has no data grants to keep.
            persistent: false,
        })
    }

    fn connect(&mut self, then: State) -> Result<(), XenbusError> {
        match self
            .frontend_params()
            .and_then(|p| self.connector.connect(&p))
        {
            Ok(r) => {
                self.running = Some(r);
                if self.state != then {
                    self.set_state(then)?;
                }
            }
            Err(e) => {
                tracing::warn!(backend = self.paths.backend, "console connect failed: {e}");
                let p = format!("{}/error", self.paths.backend);
                self.xs.write(&p, &e).map_err(store_err("write", &p))?;
                self.set_state(State::Closing)?;
            }
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        if let Some(r) = self.running.take() {
            self.connector.disconnect(r);
        }
    }

    /// Reacts to the frontend's state and to the backend node vanishing.
    pub fn on_change(&mut self) -> Result<Outcome, XenbusError> {
        let p = format!("{}/state", self.paths.backend);
        if self.xs.read(&p).map_err(store_err("read", &p))?.is_none() {
            self.disconnect();
            self.state = State::Closed;
            return Ok(Outcome::Gone);
        }
        let Some(fe) = self.frontend_state()? else {
            self.disconnect();
            if self.state != State::Closed {
                self.set_state(State::Closed)?;
            }
            return Ok(Outcome::Gone);
        };
        match fe {
            State::Initialising if self.state == State::Closed => self.start()?,
            State::Initialised | State::Connected if self.state == State::InitWait => {
                self.connect(State::Connected)?
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

    /// Backend shutdown: stop serving, then 5 and 6.
    pub fn shutdown(&mut self) -> Result<(), XenbusError> {
        if self.state != State::Closed {
            self.set_state(State::Closing)?;
            self.disconnect();
            self.set_state(State::Closed)?;
        }
        Ok(())
    }
}

impl<X: XenStore, C: Connector> Drop for ConsoleDevice<X, C> {
    fn drop(&mut self) {
        self.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkif::xenbus::MemStore;
    use std::sync::{Arc, Mutex};

    struct Probe(Arc<Mutex<Vec<String>>>);
    impl Connector for Probe {
        type Running = ();
        fn connect(&mut self, fe: &FrontendParams) -> Result<(), String> {
            self.0.lock().unwrap().push(format!(
                "connect {} {:?} {}",
                fe.domid, fe.ring_refs, fe.event_channel
            ));
            Ok(())
        }
        fn disconnect(&mut self, _: ()) {
            self.0.lock().unwrap().push("disconnect".into());
        }
    }

    #[test]
    fn nodes_permissions_and_the_handshake_hvc_xen_does() {
        let xs = Arc::new(MemStore::new());
        let paths = add_console(&*xs, 0, 7, 1, "qubes-agent").unwrap();
        assert_eq!(paths.frontend, "/local/domain/7/device/console/1");
        assert_eq!(
            xs.read(&format!("{}/backend", paths.frontend))
                .unwrap()
                .as_deref(),
            Some(paths.backend.as_str())
        );
        assert_eq!(
            xs.permissions(&paths.frontend),
            Some(vec![(7, XS_PERM_NONE), (0, XS_PERM_READ)])
        );
        assert_eq!(
            xs.permissions(&paths.backend),
            Some(vec![(0, XS_PERM_NONE), (7, XS_PERM_READ)])
        );
        assert_eq!(
            xs.permissions(&format!("{}/state", paths.frontend)),
            Some(vec![(7, XS_PERM_NONE), (0, XS_PERM_READ)])
        );
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut dev = ConsoleDevice::new(xs.clone(), paths.clone(), 7, Probe(log.clone()));
        dev.start().unwrap();
        assert_eq!(dev.state(), State::InitWait);
        // A frontend that is not ready yet changes nothing.
        dev.on_change().unwrap();
        assert!(log.lock().unwrap().is_empty());
        let fe = &paths.frontend;
        xs.write(&format!("{fe}/ring-ref"), "8").unwrap();
        xs.write(&format!("{fe}/port"), "5").unwrap();
        xs.write(&format!("{fe}/state"), "3").unwrap();
        assert_eq!(dev.on_change().unwrap(), Outcome::Alive);
        assert_eq!(dev.state(), State::Connected);
        assert_eq!(*log.lock().unwrap(), vec!["connect 7 [8] 5".to_string()]);
        assert_eq!(
            xs.read(&format!("{}/state", paths.backend))
                .unwrap()
                .as_deref(),
            Some("4")
        );
        dev.shutdown().unwrap();
        assert_eq!(log.lock().unwrap().last().unwrap(), "disconnect");
        drop(dev);
        remove_console(&*xs, &paths).unwrap();
        assert!(
            xs.dump()
                .keys()
                .all(|k| !k.contains("qubes-console/7") && !k.contains("console/1")),
            "{:?}",
            xs.dump()
        );
    }

    #[test]
    fn a_garbage_port_closes_with_an_error_node() {
        let xs = Arc::new(MemStore::new());
        let paths = add_console(&*xs, 0, 3, 1, "a").unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut dev = ConsoleDevice::new(xs.clone(), paths.clone(), 3, Probe(log.clone()));
        dev.start().unwrap();
        let fe = &paths.frontend;
        xs.write(&format!("{fe}/ring-ref"), "8").unwrap();
        xs.write(&format!("{fe}/port"), "-1; rm").unwrap();
        xs.write(&format!("{fe}/state"), "3").unwrap();
        dev.on_change().unwrap();
        assert_eq!(dev.state(), State::Closing);
        assert!(log.lock().unwrap().is_empty());
        let err = xs
            .read(&format!("{}/error", paths.backend))
            .unwrap()
            .unwrap();
        assert!(err.contains("port"), "{err}");
        // The domain dies: its directory goes.
        xs.rm("/local/domain/3").unwrap();
        assert_eq!(dev.on_change().unwrap(), Outcome::Gone);
    }

    #[test]
    fn a_restarted_backend_reconnects_a_connected_console() {
        let xs = Arc::new(MemStore::new());
        let paths = add_console(&*xs, 0, 4, 1, "a").unwrap();
        let fe = &paths.frontend;
        xs.write(&format!("{fe}/ring-ref"), "9").unwrap();
        xs.write(&format!("{fe}/port"), "2").unwrap();
        xs.write(&format!("{fe}/state"), "4").unwrap();
        xs.write(&format!("{}/state", paths.backend), "4").unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut dev = ConsoleDevice::new(xs.clone(), paths, 4, Probe(log.clone()));
        dev.resume().unwrap();
        assert!(dev.is_connected());
        assert_eq!(*log.lock().unwrap(), vec!["connect 4 [9] 2".to_string()]);
    }
}
