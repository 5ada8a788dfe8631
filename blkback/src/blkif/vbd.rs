//! One connected virtual block device: its ring, the guest's memory (grant copy) and the
//! volume. Requests run in ring order, one at a time, on the device's own thread:
//! completing a request before taking the next gives write barriers for free and the
//! in-order semantics of flush (every write answered before a FLUSH is in the commit).
//!
//! Data moves by grant copy (as QEMU's xen-block does), not by mapping the guest's
//! pages: a copy is a snapshot, so the guest cannot change a write's data between our
//! checks and the volume write, there is no map/unmap (and TLB shootdown) per request,
//! and no mapping can leak if we die. The cost is one memcpy per request in Xen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use storage::BlockDevice;
use xen_sys::GrantSeg;

use super::abi::*;
use super::ring::{BackRing, RingError};

/// The guest's granted pages, as the backend sees them.
pub trait GuestMemory: Send {
    /// Fills `buf` from the segments, in order (their lengths sum to `buf.len()`).
    fn copy_from_guest(&self, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), String>;
    /// Copies `buf` into the segments, in order.
    fn copy_to_guest(&self, segs: &[GrantSeg], buf: &[u8]) -> Result<(), String>;
}

/// The event channel to the frontend.
pub trait EventChannel: Send {
    fn notify(&self) -> std::io::Result<()>;
    /// Waits up to `timeout` for a kick from the frontend; true if one came.
    fn wait(&self, timeout: Duration) -> std::io::Result<bool>;
}

/// What the device serves and offers.
#[derive(Debug, Clone, Copy)]
pub struct VbdParams {
    pub limits: Limits,
}

impl Default for VbdParams {
    fn default() -> Self {
        VbdParams {
            limits: Limits {
                max_indirect_segments: MAX_INDIRECT_SEGMENTS,
                discard: true,
            },
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VbdStats {
    pub requests: u64,
    pub errors: u64,
}

pub struct Vbd<G: GuestMemory> {
    ring: BackRing,
    guest: G,
    device: Arc<dyn BlockDevice>,
    sectors: u64,
    params: VbdParams,
    buf: Vec<u8>,
    indirect: Vec<u8>,
    pub stats: VbdStats,
}

impl<G: GuestMemory> Vbd<G> {
    pub fn new(ring: BackRing, guest: G, device: Arc<dyn BlockDevice>, params: VbdParams) -> Self {
        let sectors = device.size() / SECTOR_SIZE;
        Vbd {
            ring,
            guest,
            device,
            sectors,
            params,
            buf: Vec::new(),
            indirect: Vec::new(),
            stats: VbdStats::default(),
        }
    }

    /// Serves every request on the ring; true if the frontend must be notified. An
    /// error means the frontend broke the ring protocol: close the device.
    pub fn process(&mut self) -> Result<bool, RingError> {
        let mut notify = false;
        loop {
            while let Some(raw) = self.ring.next_request()? {
                let rsp = self.handle(&raw);
                self.stats.requests += 1;
                if rsp.status != RSP_OKAY {
                    self.stats.errors += 1;
                }
                self.ring.put_response(&rsp);
                // Publish each answer at once: the guest's next request may wait on it.
                notify |= self.ring.push_responses();
            }
            if !self.ring.final_check_for_requests()? {
                return Ok(notify);
            }
        }
    }

    /// One request to its response; never panics on guest input.
    pub fn handle(&mut self, raw: &[u8; REQUEST_SIZE]) -> Response {
        let req = match parse_request(raw, &self.params.limits) {
            Ok(r) => r,
            Err(bad) => {
                tracing::debug!(id = bad.id, reason = bad.reason, "bad blkif request");
                return Response {
                    id: bad.id,
                    operation: bad.operation,
                    status: bad.status,
                };
            }
        };
        let (id, operation, status) = match req {
            Request::Rw {
                id,
                dir,
                sector,
                segs,
            } => {
                let op = if dir == Direction::Read {
                    OP_READ
                } else {
                    OP_WRITE
                };
                (id, op, self.rw(dir, sector, &segs))
            }
            Request::Indirect {
                id,
                dir,
                sector,
                nr_segments,
                pages,
            } => {
                let op = if dir == Direction::Read {
                    OP_READ
                } else {
                    OP_WRITE
                };
                let status = match self.indirect_segments(nr_segments, &pages) {
                    Ok(segs) => self.rw(dir, sector, &segs),
                    Err(()) => RSP_ERROR,
                };
                (id, op, status)
            }
            Request::Flush { id } => (id, OP_FLUSH_DISKCACHE, self.flush()),
            // Every earlier request has completed (in-order service), so a barrier is
            // a flush.
            Request::Barrier { id } => (id, OP_WRITE_BARRIER, self.flush()),
            Request::Discard {
                id,
                secure,
                sector,
                nr_sectors,
            } => (id, OP_DISCARD, self.discard(secure, sector, nr_sectors)),
        };
        Response {
            id,
            operation,
            status,
        }
    }

    fn indirect_segments(&mut self, n: u16, pages: &[u32]) -> Result<Vec<Segment>, ()> {
        let n = n as usize;
        let mut segs = Vec::with_capacity(pages.len());
        let mut left = n * SEGMENT_SIZE;
        for &gref in pages {
            let len = left.min(PAGE_SIZE);
            segs.push(GrantSeg {
                gref,
                offset: 0,
                len: len as u16,
            });
            left -= len;
        }
        self.indirect.resize(n * SEGMENT_SIZE, 0);
        if let Err(e) = self.guest.copy_from_guest(&segs, &mut self.indirect) {
            tracing::debug!("copying indirect segment pages: {e}");
            return Err(());
        }
        Ok(parse_indirect_segments(&self.indirect, n))
    }

    fn rw(&mut self, dir: Direction, sector: u64, segs: &[Segment]) -> i16 {
        let plan = match plan_io(sector, segs, self.sectors) {
            Ok(p) => p,
            Err(reason) => {
                tracing::debug!(sector, reason, "bad blkif transfer");
                return RSP_ERROR;
            }
        };
        if dir == Direction::Write && self.device.read_only() {
            return RSP_ERROR;
        }
        self.buf.resize(plan.len, 0);
        let buf = &mut self.buf[..plan.len];
        let r = match dir {
            Direction::Read => self
                .device
                .read_at(buf, plan.offset)
                .map_err(|e| e.to_string())
                .and_then(|()| self.guest.copy_to_guest(&plan.segs, buf)),
            Direction::Write => self.guest.copy_from_guest(&plan.segs, buf).and_then(|()| {
                self.device
                    .write_at(buf, plan.offset)
                    .map_err(|e| e.to_string())
            }),
        };
        match r {
            Ok(()) => RSP_OKAY,
            Err(e) => {
                tracing::warn!(volume = self.device.name(), "blkif {dir:?} failed: {e}");
                RSP_ERROR
            }
        }
    }

    /// FLUSH = the volume's flush = a pool commit, as NBD_CMD_FLUSH.
    fn flush(&self) -> i16 {
        match self.device.flush() {
            Ok(()) => RSP_OKAY,
            Err(e) => {
                tracing::warn!("blkif flush failed: {e}");
                RSP_ERROR
            }
        }
    }

    fn discard(&self, secure: bool, sector: u64, nr_sectors: u64) -> i16 {
        if secure {
            // discard-secure is not offered: freed chunks are not scrubbed.
            return RSP_EOPNOTSUPP;
        }
        if self.device.read_only() {
            return RSP_ERROR;
        }
        match check_discard(sector, nr_sectors, self.sectors) {
            Ok((_, 0)) => RSP_OKAY,
            Ok((off, len)) => match self.device.discard(off, len) {
                Ok(()) => RSP_OKAY,
                Err(e) => {
                    tracing::warn!("blkif discard failed: {e}");
                    RSP_ERROR
                }
            },
            Err(_) => RSP_ERROR,
        }
    }
}

/// How a device thread ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("event channel: {0}")]
    EventChannel(std::io::Error),
}

/// Serves `vbd` until `stop` is set (then returns Ok) or the frontend breaks the ring.
pub fn serve<G: GuestMemory, E: EventChannel>(
    vbd: &mut Vbd<G>,
    chan: &E,
    stop: &AtomicBool,
) -> Result<(), ServeError> {
    while !stop.load(Ordering::Acquire) {
        if vbd.process()? {
            chan.notify().map_err(ServeError::EventChannel)?;
        }
        chan.wait(Duration::from_millis(200))
            .map_err(ServeError::EventChannel)?;
    }
    Ok(())
}
