//! The real Xen side of a console: the frontend's ring page mapped through gntdev, its
//! port bound through /dev/xen/evtchn, and a thread running [`bridge`] on it.

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use xen_sys::{EvtChn, GntTab};

use super::bridge::{bridge, BridgeError, Doorbell};
use super::ring::ConsRing;
use crate::blkif::xenbus::{Connector, FrontendParams};

/// A bound interdomain port with its own evtchn handle (so every pending event on it
/// is this console's).
pub struct XenBell {
    evtchn: EvtChn,
    local: u32,
}

impl XenBell {
    pub fn bind(domid: u32, remote: u32) -> io::Result<XenBell> {
        let evtchn = EvtChn::open()?;
        let local = evtchn.bind_interdomain(domid, remote)?;
        Ok(XenBell { evtchn, local })
    }
}

impl Drop for XenBell {
    fn drop(&mut self) {
        let _ = self.evtchn.unbind(self.local);
    }
}

impl Doorbell for XenBell {
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the evtchn handle's fd stays open as long as the handle, which `self`
        // owns and the returned borrow cannot outlive.
        unsafe { BorrowedFd::borrow_raw(self.evtchn.fd()) }
    }
    fn ack(&self) -> io::Result<()> {
        let port = self.evtchn.pending()?;
        self.evtchn.unmask(port)
    }
    fn notify(&self) -> io::Result<()> {
        self.evtchn.notify(self.local)
    }
}

/// Connects a console frontend to the clients of `listener`.
pub struct XenConsoleConnector {
    pub gnttab: GntTab,
    pub listener: Arc<UnixListener>,
}

pub struct XenConsoleRunning {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), BridgeError>>,
}

impl Connector for XenConsoleConnector {
    type Running = XenConsoleRunning;

    fn connect(&mut self, fe: &FrontendParams) -> Result<XenConsoleRunning, String> {
        let mem = self
            .gnttab
            .map_pages(fe.domid, &fe.ring_refs)
            .map_err(|e| format!("mapping console ring ref {:?}: {e}", fe.ring_refs))?;
        let mut ring = ConsRing::attach(Arc::new(mem)).map_err(|e| e.to_string())?;
        let bell = XenBell::bind(fe.domid, fe.event_channel)
            .map_err(|e| format!("binding event channel {}: {e}", fe.event_channel))?;
        let listener = self.listener.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let domid = fe.domid;
        let thread = std::thread::Builder::new()
            .name(format!("console-{domid}"))
            .spawn(move || {
                // The guest may have output waiting from before we bound the port.
                let _ = bell.notify();
                let r = bridge(&mut ring, &bell, &listener, &s);
                if let Err(e) = &r {
                    tracing::warn!(domid, "agent console closed: {e}");
                }
                r
            })
            .map_err(|e| format!("starting the console thread: {e}"))?;
        Ok(XenConsoleRunning { stop, thread })
    }

    fn disconnect(&mut self, r: XenConsoleRunning) {
        r.stop.store(true, Ordering::Release);
        let _ = r.thread.join();
    }
}
