//! An in-process frontend for tests and fuzzing: a fake grant table over anonymous
//! shared memory, a pair of event channels on a condvar, and a [`Frontend`] that drives
//! the ring as a guest's blkfront would. Nothing here talks to Xen.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use xen_sys::{GrantSeg, SharedMem, PAGE_SIZE};

use super::abi::*;
use super::persistent::{MappedPage, PersistentGrants};
use super::ring::FrontRing;
use super::vbd::{EventChannel, GuestMemory};
use super::xenbus::{Connector, FrontendParams};

struct Grant {
    mem: Arc<SharedMem>,
    page: usize,
    writable: bool,
}

/// One guest's grant table: refs to pages of its shared memory. Copies through a ref
/// it never granted (or granted read-only, for writes into it) fail, as in Xen.
#[derive(Default)]
pub struct FakeGrants {
    table: Mutex<HashMap<u32, Grant>>,
    next: Mutex<u32>,
}

impl FakeGrants {
    pub fn new() -> Arc<FakeGrants> {
        Arc::new(FakeGrants {
            table: Mutex::default(),
            // Ref 0..8 are reserved in Xen; start where a guest's would.
            next: Mutex::new(8),
        })
    }

    pub fn grant(&self, mem: &Arc<SharedMem>, page: usize, writable: bool) -> u32 {
        let mut n = self.next.lock().unwrap();
        let r = *n;
        *n += 1;
        self.table.lock().unwrap().insert(
            r,
            Grant {
                mem: mem.clone(),
                page,
                writable,
            },
        );
        r
    }

    pub fn revoke(&self, gref: u32) {
        self.table.lock().unwrap().remove(&gref);
    }

    /// The ring a backend maps from `refs`: here, the pages must be exactly one
    /// shared-memory object granted page by page in order (the test frontend does so).
    pub fn map_ring(&self, refs: &[u32]) -> Result<Arc<SharedMem>, String> {
        let t = self.table.lock().unwrap();
        let first = t
            .get(refs.first().ok_or("no ring ref")?)
            .ok_or("bad ring ref")?;
        if first.mem.len() != refs.len() * PAGE_SIZE {
            return Err("ring refs do not cover the ring".into());
        }
        for (i, r) in refs.iter().enumerate() {
            let g = t.get(r).ok_or("bad ring ref")?;
            if !Arc::ptr_eq(&g.mem, &first.mem) || g.page != i || !g.writable {
                return Err("ring refs out of order".into());
            }
        }
        Ok(first.mem.clone())
    }
}

impl GuestMemory for Arc<FakeGrants> {
    fn copy_from_guest(&self, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), String> {
        let t = self.table.lock().unwrap();
        let mut pos = 0;
        for s in segs {
            let g = t
                .get(&s.gref)
                .ok_or_else(|| format!("bad gref {}", s.gref))?;
            let end = pos + s.len as usize;
            if s.offset as usize + s.len as usize > PAGE_SIZE || end > buf.len() {
                return Err("segment out of bounds".into());
            }
            g.mem
                .read(g.page * PAGE_SIZE + s.offset as usize, &mut buf[pos..end]);
            pos = end;
        }
        Ok(())
    }

    fn copy_to_guest(&self, segs: &[GrantSeg], buf: &[u8]) -> Result<(), String> {
        let t = self.table.lock().unwrap();
        let mut pos = 0;
        for s in segs {
            let g = t
                .get(&s.gref)
                .ok_or_else(|| format!("bad gref {}", s.gref))?;
            if !g.writable {
                return Err(format!("gref {} is read-only", s.gref));
            }
            let end = pos + s.len as usize;
            if s.offset as usize + s.len as usize > PAGE_SIZE || end > buf.len() {
                return Err("segment out of bounds".into());
            }
            g.mem
                .write(g.page * PAGE_SIZE + s.offset as usize, &buf[pos..end]);
            pos = end;
        }
        Ok(())
    }

    fn map_page(&self, gref: u32) -> Result<MappedPage, String> {
        let t = self.table.lock().unwrap();
        let g = t.get(&gref).ok_or_else(|| format!("bad gref {gref}"))?;
        if !g.writable {
            return Err(format!("gref {gref} is read-only"));
        }
        Ok(MappedPage {
            mem: g.mem.clone(),
            base: g.page * PAGE_SIZE,
        })
    }
}

/// One direction of an event channel: a counter of kicks on a condvar.
#[derive(Default)]
pub struct Kick {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Kick {
    pub fn kick(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }
    /// Waits for (and consumes) a kick.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = self.count.lock().unwrap();
        while *c == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self.cv.wait_timeout(c, left).unwrap().0;
        }
        *c = 0;
        true
    }
}

/// The backend's end of a test event channel.
pub struct TestChannel {
    pub to_front: Arc<Kick>,
    pub to_back: Arc<Kick>,
}

impl EventChannel for TestChannel {
    fn notify(&self) -> std::io::Result<()> {
        self.to_front.kick();
        Ok(())
    }
    fn wait(&self, timeout: Duration) -> std::io::Result<bool> {
        Ok(self.to_back.wait(timeout))
    }
}

/// A guest's blkfront, in-process: owns the ring, data pages and grants.
pub struct Frontend {
    pub grants: Arc<FakeGrants>,
    pub ring: FrontRing,
    pub ring_refs: Vec<u32>,
    pub to_front: Arc<Kick>,
    pub to_back: Arc<Kick>,
    /// Offer `feature-persistent` in [`Self::nodes`] (Linux's blkfront does).
    pub persistent: bool,
    next_id: u64,
}

/// A buffer of guest pages, granted to the backend.
pub struct GuestBuf {
    pub mem: Arc<SharedMem>,
    pub refs: Vec<u32>,
}

impl GuestBuf {
    pub fn read(&self) -> Vec<u8> {
        let mut v = vec![0; self.mem.len()];
        self.mem.read(0, &mut v);
        v
    }
}

impl Frontend {
    /// A frontend with a ring of `2^order` pages.
    pub fn new(order: u32) -> Frontend {
        let grants = FakeGrants::new();
        let pages = 1usize << order;
        let mem = Arc::new(SharedMem::anonymous(pages).expect("anonymous memory"));
        let ring_refs = (0..pages).map(|p| grants.grant(&mem, p, true)).collect();
        Frontend {
            ring: FrontRing::init(mem),
            grants,
            ring_refs,
            to_front: Arc::new(Kick::default()),
            to_back: Arc::new(Kick::default()),
            persistent: true,
            next_id: 1,
        }
    }

    /// A fresh ring of `2^order` pages in the same grant table (a driver reload).
    pub fn reinit(&mut self, order: u32) {
        for r in self.ring_refs.drain(..) {
            self.grants.revoke(r);
        }
        let pages = 1usize << order;
        let mem = Arc::new(SharedMem::anonymous(pages).expect("anonymous memory"));
        self.ring_refs = (0..pages)
            .map(|p| self.grants.grant(&mem, p, true))
            .collect();
        self.ring = FrontRing::init(mem);
    }

    /// The xenstore nodes a blkfront writes before switching to Initialised.
    pub fn nodes(&self, fe_path: &str, event_channel: u32) -> Vec<(String, String)> {
        let mut v = vec![
            (
                format!("{fe_path}/event-channel"),
                event_channel.to_string(),
            ),
            (format!("{fe_path}/protocol"), "x86_64-abi".to_string()),
            (
                format!("{fe_path}/feature-persistent"),
                u8::from(self.persistent).to_string(),
            ),
        ];
        if self.ring_refs.len() == 1 {
            v.push((format!("{fe_path}/ring-ref"), self.ring_refs[0].to_string()));
        } else {
            let order = self.ring_refs.len().trailing_zeros();
            v.push((format!("{fe_path}/ring-page-order"), order.to_string()));
            for (i, r) in self.ring_refs.iter().enumerate() {
                v.push((format!("{fe_path}/ring-ref{i}"), r.to_string()));
            }
        }
        v
    }

    /// The backend's end of the event channel.
    pub fn channel(&self) -> TestChannel {
        TestChannel {
            to_front: self.to_front.clone(),
            to_back: self.to_back.clone(),
        }
    }

    pub fn alloc(&self, pages: usize, data: Option<&[u8]>) -> GuestBuf {
        let mem = Arc::new(SharedMem::anonymous(pages).expect("anonymous memory"));
        if let Some(d) = data {
            mem.write(0, d);
        }
        let refs = (0..pages)
            .map(|p| self.grants.grant(&mem, p, true))
            .collect();
        GuestBuf { mem, refs }
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Publishes queued requests and kicks the backend if it asked for it.
    pub fn push(&mut self) {
        if self.ring.push_requests() {
            self.to_back.kick();
        }
    }

    /// Sends one raw request and waits for its response.
    pub fn call(&mut self, raw: &[u8; REQUEST_SIZE]) -> Response {
        self.ring.put_request(raw);
        self.push();
        self.wait_response()
    }

    pub fn wait_response(&mut self) -> Response {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(r) = self.ring.next_response() {
                return r;
            }
            assert!(Instant::now() < deadline, "no blkif response in 60 s");
            self.to_front.wait(Duration::from_millis(100));
        }
    }

    /// Whole-page segments over `buf` (sector-aligned transfers of whole pages).
    pub fn page_segments(buf: &GuestBuf) -> Vec<Segment> {
        buf.refs
            .iter()
            .map(|&gref| Segment {
                gref,
                first_sect: 0,
                last_sect: SECTORS_PER_PAGE - 1,
            })
            .collect()
    }

    /// Reads `pages` pages at `sector` with a direct (<= 11 segments) or an indirect
    /// request; returns the status and the data.
    pub fn read(&mut self, sector: u64, pages: usize) -> (i16, Vec<u8>) {
        let buf = self.alloc(pages, None);
        let st = self.rw(OP_READ, sector, &buf);
        (st, buf.read())
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> i16 {
        assert_eq!(data.len() % PAGE_SIZE, 0);
        let buf = self.alloc(data.len() / PAGE_SIZE, Some(data));
        self.rw(OP_WRITE, sector, &buf)
    }

    pub fn rw(&mut self, op: u8, sector: u64, buf: &GuestBuf) -> i16 {
        let segs = Self::page_segments(buf);
        let id = self.id();
        let raw = if segs.len() <= MAX_SEGMENTS_PER_REQUEST {
            encode::rw(op, id, sector, &segs)
        } else {
            let n = segs.len();
            let bytes: Vec<u8> = segs.iter().flat_map(|s| s.encode()).collect();
            let ipages = n.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
            let ind = self.alloc(ipages, Some(&bytes));
            encode::indirect(op, id, sector, n as u16, &ind.refs)
        };
        let r = self.call(&raw);
        assert_eq!(r.id, id, "response for another request");
        assert_eq!(r.operation, op, "response operation");
        r.status
    }
}

/// A [`Connector`] for tests: maps rings from one test frontend's grant table and
/// serves them on a thread, as the Xen connector does with gntdev and evtchn.
pub struct TestConnector {
    pub grants: Arc<FakeGrants>,
    pub to_front: Arc<Kick>,
    pub to_back: Arc<Kick>,
    pub device: Arc<dyn storage::BlockDevice>,
    pub params: super::VbdParams,
}

pub struct TestRunning {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), super::ServeError>>,
    to_back: Arc<Kick>,
    pub params: FrontendParams,
}

impl TestConnector {
    pub fn for_frontend(front: &Frontend, device: Arc<dyn storage::BlockDevice>) -> Self {
        TestConnector {
            grants: front.grants.clone(),
            to_front: front.to_front.clone(),
            to_back: front.to_back.clone(),
            device,
            params: super::VbdParams::default(),
        }
    }
}

impl Connector for TestConnector {
    type Running = TestRunning;
    fn connect(&mut self, fe: &FrontendParams) -> Result<TestRunning, String> {
        let mem = self.grants.map_ring(&fe.ring_refs)?;
        let ring = super::ring::BackRing::attach(mem).map_err(|e| e.to_string())?;
        let guest = PersistentGrants::new(self.grants.clone(), fe.persistent);
        let mut vbd = super::Vbd::new(ring, guest, self.device.clone(), self.params);
        let chan = TestChannel {
            to_front: self.to_front.clone(),
            to_back: self.to_back.clone(),
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || super::serve(&mut vbd, &chan, &s));
        Ok(TestRunning {
            stop,
            thread,
            to_back: self.to_back.clone(),
            params: fe.clone(),
        })
    }
    fn disconnect(&mut self, r: TestRunning) {
        r.stop.store(true, std::sync::atomic::Ordering::Release);
        r.to_back.kick();
        let _ = r.thread.join();
    }
}
