//! The real Xen side of the traits: libxenstore for [`XenStore`], grant copy through
//! gntdev for [`GuestMemory`], evtchn for [`EventChannel`], and [`XenConnector`] which
//! maps a frontend's ring and serves it on a thread. Only usable in dom0 (or a driver
//! domain) with /dev/xen/{gntdev,evtchn} and xenstored.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use storage::BlockDevice;
use xen_sys::{EvtChn, GntTab, GrantSeg};

use super::persistent::{MappedPage, PersistentGrants};
use super::ring::BackRing;
use super::vbd::{serve, EventChannel, GuestMemory, ServeError, Vbd, VbdParams};
use super::xenbus::{Connector, FrontendParams, XenStore};

impl XenStore for xen_sys::XenStore {
    fn read(&self, path: &str) -> io::Result<Option<String>> {
        Ok(xen_sys::XenStore::read(self, Self::NO_TXN, path)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        xen_sys::XenStore::write(self, Self::NO_TXN, path, value.as_bytes())
    }
    fn rm(&self, path: &str) -> io::Result<()> {
        xen_sys::XenStore::rm(self, Self::NO_TXN, path)
    }
    fn directory(&self, path: &str) -> io::Result<Vec<String>> {
        Ok(xen_sys::XenStore::directory(self, Self::NO_TXN, path)?.unwrap_or_default())
    }
    fn write_all(&self, nodes: &[(String, String)]) -> io::Result<()> {
        for _ in 0..100 {
            let t = self.transaction_start()?;
            for (p, v) in nodes {
                if let Err(e) = xen_sys::XenStore::write(self, t, p, v.as_bytes()) {
                    let _ = self.transaction_end(t, true);
                    return Err(e);
                }
            }
            if self.transaction_end(t, false)? {
                return Ok(());
            }
        }
        Err(io::Error::other(
            "xenstore transaction kept conflicting (100 tries)",
        ))
    }
    fn set_permissions(&self, path: &str, perms: &[(u32, u32)]) -> io::Result<()> {
        xen_sys::XenStore::set_permissions(self, Self::NO_TXN, path, perms)
    }
    fn watch(&self, path: &str, token: &str) -> io::Result<()> {
        xen_sys::XenStore::watch(self, path, token)
    }
    fn unwatch(&self, path: &str, token: &str) -> io::Result<()> {
        xen_sys::XenStore::unwatch(self, path, token)
    }
    fn next_watch(&self, timeout: Duration) -> io::Result<Option<(String, String)>> {
        self.wait_watch(timeout)
    }
}

/// A guest's pages through grant copy.
pub struct XenGuest {
    pub gnttab: GntTab,
    pub domid: u16,
}

impl GuestMemory for XenGuest {
    fn copy_from_guest(&self, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), String> {
        self.gnttab
            .copy_from_guest(self.domid, segs, buf)
            .map_err(|e| e.to_string())
    }
    fn copy_to_guest(&self, segs: &[GrantSeg], buf: &[u8]) -> Result<(), String> {
        self.gnttab
            .copy_to_guest(self.domid, segs, buf)
            .map_err(|e| e.to_string())
    }
    fn map_page(&self, gref: u32) -> Result<MappedPage, String> {
        let mem = self
            .gnttab
            .map_pages(u32::from(self.domid), &[gref])
            .map_err(|e| format!("mapping gref {gref}: {e}"))?;
        Ok(MappedPage {
            mem: Arc::new(mem),
            base: 0,
        })
    }
    fn map_pages(&self, grefs: &[u32]) -> Result<Vec<MappedPage>, String> {
        let mem = Arc::new(
            self.gnttab
                .map_pages(u32::from(self.domid), grefs)
                .map_err(|e| format!("mapping {} grefs: {e}", grefs.len()))?,
        );
        Ok((0..grefs.len())
            .map(|i| MappedPage {
                mem: mem.clone(),
                base: i * xen_sys::PAGE_SIZE,
            })
            .collect())
    }
}

/// A bound interdomain event channel (its own evtchn handle, so `pending` is ours).
pub struct XenChannel {
    evtchn: EvtChn,
    local: u32,
}

impl XenChannel {
    pub fn bind(domid: u32, remote: u32) -> io::Result<XenChannel> {
        let evtchn = EvtChn::open()?;
        let local = evtchn.bind_interdomain(domid, remote)?;
        Ok(XenChannel { evtchn, local })
    }
}

impl Drop for XenChannel {
    fn drop(&mut self) {
        let _ = self.evtchn.unbind(self.local);
    }
}

impl EventChannel for XenChannel {
    fn notify(&self) -> io::Result<()> {
        self.evtchn.notify(self.local)
    }
    fn wait(&self, timeout: Duration) -> io::Result<bool> {
        Ok(self.evtchn.wait(timeout)?.is_some())
    }
}

/// The calling thread's CPU time so far, user and system, in milliseconds (0 if the
/// kernel will not say).
fn thread_cpu_ms() -> (u64, u64) {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid out pointer to a rusage we own.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return (0, 0);
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    (ms(ru.ru_utime), ms(ru.ru_stime))
}

/// Connects frontends of one volume: maps the ring, binds the channel, serves.
pub struct XenConnector {
    pub gnttab: GntTab,
    pub device: Arc<dyn BlockDevice>,
    pub params: VbdParams,
}

pub struct XenRunning {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), ServeError>>,
}

impl Connector for XenConnector {
    type Running = XenRunning;

    fn connect(&mut self, fe: &FrontendParams) -> Result<XenRunning, String> {
        let domid = u16::try_from(fe.domid).map_err(|_| format!("bad domid {}", fe.domid))?;
        let mem = self
            .gnttab
            .map_pages(fe.domid, &fe.ring_refs)
            .map_err(|e| format!("mapping ring refs {:?}: {e}", fe.ring_refs))?;
        let ring = BackRing::attach(Arc::new(mem)).map_err(|e| e.to_string())?;
        let chan = XenChannel::bind(fe.domid, fe.event_channel)
            .map_err(|e| format!("binding event channel {}: {e}", fe.event_channel))?;
        let guest = PersistentGrants::new(
            XenGuest {
                gnttab: self.gnttab.clone(),
                domid,
            },
            fe.persistent,
        );
        let mut params = self.params;
        if fe.domid == 0 {
            // dom0 as its own frontend (tests, benchmarks): its next request comes from
            // a thread that may need the very vCPU a spin would hold.
            params.spin = 0;
        }
        let mut vbd = Vbd::new(ring, guest, self.device.clone(), params);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let name = format!("blkif-{}", fe.domid);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let r = serve(&mut vbd, &chan, &s);
                if let Err(e) = &r {
                    tracing::warn!("blkif device closed: {e}");
                }
                let g = vbd.guest();
                let p = g.stats();
                let st = vbd.stats;
                let (user_ms, sys_ms) = thread_cpu_ms();
                tracing::info!(
                    persistent = g.enabled(),
                    requests = st.requests,
                    merged = st.merged,
                    errors = st.errors,
                    passes = st.passes,
                    wakeups = st.wakeups,
                    spin_hits = st.spin_hits,
                    notifies = st.notifies,
                    volume_reads = st.volume_reads,
                    volume_writes = st.volume_writes,
                    read_bytes = st.read_bytes,
                    write_bytes = st.write_bytes,
                    direct_writes = st.direct_writes,
                    direct_reads = st.direct_reads,
                    flushes = st.flushes,
                    user_ms,
                    sys_ms,
                    grants_mapped = p.mapped,
                    map_calls = p.map_calls,
                    segments_by_memcpy = p.hits,
                    segments_by_grant_copy = p.copied,
                    segments_direct = p.direct,
                    "blkif device thread done"
                );
                r
            })
            .map_err(|e| format!("starting the device thread: {e}"))?;
        Ok(XenRunning { stop, thread })
    }

    fn disconnect(&mut self, r: XenRunning) {
        // The thread wakes at least every 200 ms to see the flag.
        r.stop.store(true, Ordering::Release);
        let _ = r.thread.join();
        // Whatever was acknowledged is committed before the ring goes away.
        if let Err(e) = self.device.flush() {
            tracing::warn!("flushing {} at disconnect: {e}", self.device.name());
        }
    }
}
