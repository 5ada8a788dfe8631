//! One connected virtual block device: its ring, the guest's memory (grant copy) and the
//! volume. Requests run in ring order on the device's own thread: completing a request
//! before taking the next gives write barriers for free and the in-order semantics of
//! flush (every write answered before a FLUSH is in the commit).
//!
//! Every request is validated on its own; then a run of reads (or of writes) the guest
//! queued back to back at contiguous sectors is served as one: one volume I/O and one
//! grant copy for the run instead of one each per request (blkfront splits a 1 MiB
//! transfer into 128 KiB requests; in dom0 every syscall costs a trip through Xen). A
//! run that fails is redone request by request, so each gets its own status.
//!
//! With grant copy (as QEMU's xen-block does: no map/unmap per request, one hypercall
//! per run) data moves through the device's own buffer. When the frontend keeps
//! persistent grants (`blkif::persistent`: pages mapped once per connection) and the
//! volume does I/O in place ([`BlockDevice::writes_in_place`], `reads_in_place`: the
//! thin pool), a transfer goes between the volume and the guest's pages directly, one
//! `pwritev` / `preadv` per data-file run, where a bounce copy would cost as much CPU
//! as the I/O itself.
//!
//! Writing from pages the guest can change during the write is safe, as with the
//! kernel's blkback (which hands the guest's page to the disk): what we check of a
//! request (operation, sectors, segments, grants) we copied off the ring first, and
//! the data bytes decide nothing; the volume's plan (which chunks, copy-on-write,
//! allocation) depends on the offset and length alone, and the pool keeps no checksum
//! or dedup of written data. A guest that changes a page mid-write gets some mix of old
//! and new bytes in the sectors it asked to write, in its own volume: its own doing,
//! what a real disk gives for a buffer changed during DMA.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use storage::BlockDevice;
use xen_sys::GrantSeg;

use super::abi::*;
pub use super::persistent::{GuestPages, MappedPage};
use super::ring::{BackRing, RingError};

/// The guest's granted pages, as the backend sees them.
pub trait GuestMemory: Send {
    /// Fills `buf` from the segments, in order (their lengths sum to `buf.len()`).
    fn copy_from_guest(&self, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), String>;
    /// Copies `buf` into the segments, in order.
    fn copy_to_guest(&self, segs: &[GrantSeg], buf: &[u8]) -> Result<(), String>;
    /// Maps the granted page `gref` read-write for as long as the result lives (for
    /// persistent grants); an error if the grant cannot be mapped so.
    fn map_page(&self, gref: u32) -> Result<MappedPage, String> {
        Err(format!("gref {gref}: this guest memory cannot map pages"))
    }
    /// Maps several granted pages at once (Xen: one gntdev call and one mmap for all),
    /// all or nothing, in the order of `grefs`. The default maps them one by one.
    fn map_pages(&self, grefs: &[u32]) -> Result<Vec<MappedPage>, String> {
        grefs.iter().map(|&g| self.map_page(g)).collect()
    }
    /// The segments' bytes in place in mapped pages, if every one of them is mapped
    /// (persistent grants), for a write with no copy; `None` sends the write by copy.
    fn direct(&self, _segs: &[GrantSeg]) -> Option<GuestPages> {
        None
    }
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
    /// How many times [`serve`] looks at the ring again after a pass before it asks
    /// for a kick and sleeps (0: sleep at once); see [`serve`].
    pub spin: u32,
}

/// [`VbdParams::spin`]'s default: `QUBES_BLKIF_SPIN` (a count, 0 turns it off), else
/// [`DEFAULT_SPIN`].
pub fn spin_from_env() -> u32 {
    std::env::var("QUBES_BLKIF_SPIN")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_SPIN)
}

/// Ring looks after a pass: a few thousand `pause`s, tens of microseconds natively;
/// bounded in time as well by [`MAX_SPIN`].
pub const DEFAULT_SPIN: u32 = 4096;
/// The longest a spin lasts, whatever the count.
pub const MAX_SPIN: Duration = Duration::from_micros(200);

impl Default for VbdParams {
    fn default() -> Self {
        VbdParams {
            limits: Limits {
                max_indirect_segments: MAX_INDIRECT_SEGMENTS,
                discard: true,
            },
            spin: spin_from_env(),
        }
    }
}

/// Counters of one device (logged when its thread ends; the benchmark prints them):
/// what each request cost in wake-ups, notifications and volume calls.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VbdStats {
    pub requests: u64,
    pub errors: u64,
    /// Requests served as part of a merged run (one volume I/O and grant copy for it).
    pub merged: u64,
    /// Passes over the ring that found at least one request.
    pub passes: u64,
    /// Times the thread slept on the event channel and was woken by a kick.
    pub wakeups: u64,
    /// Times a spin after a pass found new requests (no kick asked, no sleep).
    pub spin_hits: u64,
    /// Notifications sent to the frontend.
    pub notifies: u64,
    /// Volume reads and writes (a merged run is one) and the bytes they moved.
    pub volume_reads: u64,
    pub volume_writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Volume writes made straight from the guest's mapped pages (no copy of ours).
    pub direct_writes: u64,
    /// Volume reads made straight into the guest's mapped pages.
    pub direct_reads: u64,
    pub flushes: u64,
}

/// Requests taken off the ring before they are served (a 1 MiB transfer is 8 of them).
const MAX_BATCH: usize = 64;
/// Bytes one merged run may move (bounds the staging buffer).
const MAX_RUN_BYTES: usize = 4 << 20;

/// A validated read or write, waiting for the rest of its run.
struct Transfer {
    id: u64,
    op: u8,
    dir: Direction,
    plan: IoPlan,
}

pub struct Vbd<G: GuestMemory> {
    ring: BackRing,
    guest: G,
    device: Arc<dyn BlockDevice>,
    sectors: u64,
    params: VbdParams,
    buf: Vec<u8>,
    indirect: Vec<u8>,
    batch: Vec<[u8; REQUEST_SIZE]>,
    run: Vec<Transfer>,
    run_segs: Vec<GrantSeg>,
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
            batch: Vec::with_capacity(MAX_BATCH),
            run: Vec::new(),
            run_segs: Vec::new(),
            stats: VbdStats::default(),
        }
    }

    /// The guest's memory as this device moves data through it.
    pub fn guest(&self) -> &G {
        &self.guest
    }

    /// Serves every request on the ring; true if the frontend must be notified. An
    /// error means the frontend broke the ring protocol: close the device.
    pub fn process(&mut self) -> Result<bool, RingError> {
        let mut notify = false;
        loop {
            notify |= self.drain()?;
            if !self.ring.final_check_for_requests()? {
                return Ok(notify);
            }
        }
    }

    /// Serves what the frontend has published, without asking it for a kick; true if
    /// the frontend must be notified.
    pub fn drain(&mut self) -> Result<bool, RingError> {
        let mut notify = false;
        let mut any = false;
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            batch.clear();
            while batch.len() < MAX_BATCH {
                match self.ring.next_request()? {
                    Some(raw) => batch.push(raw),
                    None => break,
                }
            }
            let taken = batch.len();
            any |= taken > 0;
            for raw in &batch {
                self.take(raw);
            }
            self.batch = batch;
            self.finish_run();
            // Publish the batch's answers at once: the guest may wait on them.
            notify |= self.ring.push_responses();
            if taken < MAX_BATCH {
                break;
            }
        }
        if any {
            self.stats.passes += 1;
        }
        Ok(notify)
    }

    /// Looks at the ring up to `spins` times (a `pause` between looks, at most
    /// [`MAX_SPIN`] in all) for requests published since the last pass; true if some
    /// came. The frontend is not asked for a kick meanwhile.
    pub fn spin(&mut self, spins: u32) -> Result<bool, RingError> {
        if spins == 0 {
            return Ok(false);
        }
        let start = std::time::Instant::now();
        for i in 1..=spins {
            if self.ring.has_requests()? {
                self.stats.spin_hits += 1;
                return Ok(true);
            }
            std::hint::spin_loop();
            // The clock may be a system call in a PV dom0: read it rarely.
            if i % 512 == 0 && start.elapsed() >= MAX_SPIN {
                break;
            }
        }
        Ok(false)
    }

    fn respond(&mut self, rsp: Response) {
        self.stats.requests += 1;
        if rsp.status != RSP_OKAY {
            self.stats.errors += 1;
        }
        self.ring.put_response(&rsp);
    }

    /// Adds one request to the current run, or ends the run and serves the request.
    fn take(&mut self, raw: &[u8; REQUEST_SIZE]) {
        let t = match self.prepare(raw) {
            Ok(t) => t,
            Err(Some(rsp)) => {
                self.finish_run();
                self.respond(rsp);
                return;
            }
            Err(None) => {
                // Not a transfer: everything before it completes first (flush order).
                self.finish_run();
                let rsp = self.handle(raw);
                self.respond(rsp);
                return;
            }
        };
        let extends = self.run.last().is_some_and(|last| {
            let len: usize = self.run.iter().map(|t| t.plan.len).sum();
            last.dir == t.dir
                && last.plan.offset + last.plan.len as u64 == t.plan.offset
                && len + t.plan.len <= MAX_RUN_BYTES
        });
        if !extends {
            self.finish_run();
        }
        self.run.push(t);
    }

    /// A read or write, validated and planned (`Ok`); an answer for a bad one
    /// (`Err(Some)`); `Err(None)` for the other operations, served by [`Self::handle`].
    fn prepare(&mut self, raw: &[u8; REQUEST_SIZE]) -> Result<Transfer, Option<Response>> {
        let (id, dir, sector, segs) = match parse_request(raw, &self.params.limits) {
            Ok(Request::Rw {
                id,
                dir,
                sector,
                segs,
            }) => (id, dir, sector, segs),
            Ok(Request::Indirect {
                id,
                dir,
                sector,
                nr_segments,
                pages,
            }) => match self.indirect_segments(nr_segments, &pages) {
                Ok(segs) => (id, dir, sector, segs),
                Err(()) => {
                    return Err(Some(Response {
                        id,
                        operation: op_of(dir),
                        status: RSP_ERROR,
                    }))
                }
            },
            _ => return Err(None),
        };
        let bad = |status| {
            Err(Some(Response {
                id,
                operation: op_of(dir),
                status,
            }))
        };
        let plan = match plan_io(sector, &segs, self.sectors) {
            Ok(p) => p,
            Err(reason) => {
                tracing::debug!(sector, reason, "bad blkif transfer");
                return bad(RSP_ERROR);
            }
        };
        if dir == Direction::Write && self.device.read_only() {
            return bad(RSP_ERROR);
        }
        Ok(Transfer {
            id,
            op: op_of(dir),
            dir,
            plan,
        })
    }

    /// Serves the pending run: one volume I/O and one grant copy for all of it; if that
    /// fails, each request again on its own (reads and writes are idempotent), so the
    /// failing one alone gets the error.
    fn finish_run(&mut self) {
        let mut run = std::mem::take(&mut self.run);
        let merged_ok = run.len() > 1 && {
            let mut segs = std::mem::take(&mut self.run_segs);
            segs.clear();
            for t in &run {
                segs.extend_from_slice(&t.plan.segs);
            }
            let plan = IoPlan {
                offset: run[0].plan.offset,
                len: run.iter().map(|t| t.plan.len).sum(),
                segs,
            };
            let ok = self.io(run[0].dir, &plan).is_ok();
            self.run_segs = plan.segs;
            ok
        };
        if merged_ok {
            self.stats.merged += run.len() as u64;
        }
        for t in run.drain(..) {
            let status = if merged_ok {
                RSP_OKAY
            } else {
                match self.io(t.dir, &t.plan) {
                    Ok(()) => RSP_OKAY,
                    Err(e) => {
                        tracing::warn!(
                            volume = self.device.name(),
                            "blkif {:?} failed: {e}",
                            t.dir
                        );
                        RSP_ERROR
                    }
                }
            };
            self.respond(Response {
                id: t.id,
                operation: t.op,
                status,
            });
        }
        self.run = run;
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
        match self.io(dir, &plan) {
            Ok(()) => RSP_OKAY,
            Err(e) => {
                tracing::warn!(volume = self.device.name(), "blkif {dir:?} failed: {e}");
                RSP_ERROR
            }
        }
    }

    /// Moves a checked transfer between the guest's pages and the volume.
    fn io(&mut self, dir: Direction, plan: &IoPlan) -> Result<(), String> {
        match dir {
            Direction::Read => {
                self.stats.volume_reads += 1;
                self.stats.read_bytes += plan.len as u64;
                if self.device.reads_in_place() {
                    if let Some(dst) = self.guest.direct(&plan.segs) {
                        self.stats.direct_reads += 1;
                        return self
                            .device
                            .read_into(&dst, plan.offset)
                            .map_err(|e| e.to_string());
                    }
                }
                self.buf.resize(plan.len, 0);
                let buf = &mut self.buf[..plan.len];
                self.device
                    .read_at(buf, plan.offset)
                    .map_err(|e| e.to_string())
                    .and_then(|()| self.guest.copy_to_guest(&plan.segs, buf))
            }
            Direction::Write => {
                self.stats.volume_writes += 1;
                self.stats.write_bytes += plan.len as u64;
                if self.device.writes_in_place() {
                    if let Some(src) = self.guest.direct(&plan.segs) {
                        self.stats.direct_writes += 1;
                        return self
                            .device
                            .write_from(&src, plan.offset)
                            .map_err(|e| e.to_string());
                    }
                }
                self.buf.resize(plan.len, 0);
                let buf = &mut self.buf[..plan.len];
                self.guest.copy_from_guest(&plan.segs, buf).and_then(|()| {
                    self.device
                        .write_at(buf, plan.offset)
                        .map_err(|e| e.to_string())
                })
            }
        }
    }

    /// FLUSH = the volume's flush = a pool commit, as NBD_CMD_FLUSH.
    fn flush(&mut self) -> i16 {
        self.stats.flushes += 1;
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

fn op_of(dir: Direction) -> u8 {
    match dir {
        Direction::Read => OP_READ,
        Direction::Write => OP_WRITE,
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
///
/// After each pass (responses pushed, the frontend notified) the thread looks at the ring
/// a little longer (`spin`) before it asks the frontend for a kick and sleeps: a guest
/// with I/O in flight usually queues its next request within microseconds of our
/// answer, and taking it from the ring then costs no kick (a hypercall in the guest,
/// an interrupt in dom0), no wake-up and none of the event channel's system calls
/// (poll, read, unmask: each a trip through Xen in a PV dom0).
pub fn serve<G: GuestMemory, E: EventChannel>(
    vbd: &mut Vbd<G>,
    chan: &E,
    stop: &AtomicBool,
) -> Result<(), ServeError> {
    let spins = vbd.params.spin;
    while !stop.load(Ordering::Acquire) {
        if vbd.drain()? {
            vbd.stats.notifies += 1;
            chan.notify().map_err(ServeError::EventChannel)?;
        }
        if vbd.spin(spins)? {
            continue;
        }
        // RING_FINAL_CHECK_FOR_REQUESTS: ask for a kick, then look once more.
        if vbd.ring.final_check_for_requests()? {
            continue;
        }
        if chan
            .wait(Duration::from_millis(200))
            .map_err(ServeError::EventChannel)?
        {
            vbd.stats.wakeups += 1;
        }
    }
    Ok(())
}
