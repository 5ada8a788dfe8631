//! The `thin` pool driver: a userspace thin-provisioning copy-on-write pool (dm-thin and
//! qcow2 subclusters, in userspace). On-disk format: ARCHITECTURE.md, "The `thin` driver".
//!
//! ```text
//!  BlockDevice::write_at ──gate (shared)──► Meta mutex: plan ──► unlock ──► data pwrite
//!        (ThinVolume)                        shadow path, allocate,      (Punch, Copy, Write)
//!                                            mark chunk in flight         └► unmark, notify
//!  Pool::commit/snapshot/remove ──gate (exclusive: no data I/O in flight)──► Meta mutex
//!        commit: fdatasync data, write fresh pages, fdatasync meta, superblock, fdatasync
//! ```
//!
//! Contract: every [`Pool`] operation and every write takes effect in memory at once and
//! becomes durable, all together, at [`Pool::commit`] (or [`BlockDevice::flush`], which
//! is a pool commit). After a crash the pool opens at the last commit, except that data
//! written *in place* since then (into a chunk exclusive to one volume now and at the last
//! commit, as dm-thin does) may show the old or the new bytes per written block. A chunk
//! freed by discard or remove is not reused before the freeing commit is durable, and no
//! data I/O can be in flight across a commit (the gate), so a racing guest cannot reach
//! another volume's bytes; a reused chunk is hole-punched before it is mapped readable.

mod format;
#[doc(hidden)]
pub mod fuzzing;
mod import;
mod meta;
mod verify;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use thiserror::Error;

pub use format::{Chunk, FormatError, PageKind, PageNo};
use format::{MapEntry, PageRef, Superblock, TreeRoot, PAGE_SIZE};
use meta::{CatalogueDoc, Geometry, Meta};

use crate::io::{BlockFile, RealFile};
use crate::pool::{
    validate_volume_key, BlockDevice, BlockError, BlockErrorKind, Extent, ImportOptions,
    ImportStats, Pool, PoolError, PoolInfo, VerifyReport, VolumeInfo,
};

/// Errors inside the driver; mapped to [`PoolError`] / [`BlockError`] at the boundary.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("metadata inconsistent: {0}")]
    Inconsistent(String),
    #[error("no free data chunk left")]
    NoSpace,
    #[error("the pool stopped after a failed metadata update ({0}); reopen it")]
    Poisoned(String),
}

impl Error {
    fn into_pool(self, chunk_size: u64) -> PoolError {
        match self {
            Error::Io { op, source } if is_host_full(&source) => {
                PoolError::HostFull { op: op.to_string() }
            }
            Error::Io { op, source } => PoolError::io(op, source),
            Error::NoSpace => PoolError::NoSpace {
                needed: chunk_size,
                free: 0,
            },
            Error::Poisoned(why) => PoolError::io(
                "thin pool",
                std::io::Error::other(format!(
                    "pool stopped after a failed metadata update ({why}); reopen it"
                )),
            ),
            e @ (Error::Format(_) | Error::Inconsistent(_)) => PoolError::Corrupt(e.to_string()),
        }
    }

    fn kind(&self) -> BlockErrorKind {
        match self {
            Error::NoSpace => BlockErrorKind::NoSpace,
            Error::Io { source, .. } if is_host_full(source) => BlockErrorKind::NoSpace,
            _ => BlockErrorKind::Io,
        }
    }
}

/// Pool creation parameters.
#[derive(Debug, Clone, Copy)]
pub struct ThinOptions {
    /// Data chunk size: a power of two from 4 KiB to 1 MiB.
    pub chunk_size: u64,
    /// Data capacity in bytes (rounded down to whole chunks).
    pub capacity: u64,
}

impl Default for ThinOptions {
    fn default() -> Self {
        ThinOptions {
            chunk_size: 64 << 10,
            capacity: 0,
        }
    }
}

const META_FILE: &str = "pool.meta";
const DATA_FILE: &str = "pool.data";
const LOCK_FILE: &str = "lock";

/// The data file, noting whether anything was written since the last commit.
struct DirtyTracking {
    inner: Arc<dyn BlockFile>,
    dirty: Arc<std::sync::atomic::AtomicBool>,
}

impl DirtyTracking {
    fn mark(&self) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl BlockFile for DirtyTracking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mark();
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mark();
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.mark();
        self.inner.punch_hole(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.reserve(offset, len)
    }
    fn host_free(&self) -> std::io::Result<Option<u64>> {
        self.inner.host_free()
    }
}

/// A guest sees a commit that found the host full as ENOSPC, anything else as EIO.
fn commit_err_kind(e: &PoolError) -> BlockErrorKind {
    match e {
        PoolError::HostFull { .. } => BlockErrorKind::NoSpace,
        _ => BlockErrorKind::Io,
    }
}

/// The host filesystem is out of space (or quota): the guest sees ENOSPC, as for a full
/// pool, and the pool keeps working once space is freed.
fn is_host_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// An open thin pool. Share it as `Arc<ThinPool>`; volumes keep it alive.
pub struct ThinPool {
    path: PathBuf,
    _lock: File,
    /// Set when open fell back to the older superblock slot: `info` reports it.
    fallback: Option<String>,
    data: Arc<dyn BlockFile>,
    /// `data` without the dirty tracking.
    data_raw: Arc<dyn BlockFile>,
    meta_file: Arc<dyn BlockFile>,
    geo: Geometry,
    /// Data I/O holds this shared from planning to completion; commit, snapshot, remove
    /// and resize hold it exclusively.
    gate: RwLock<()>,
    /// Set by every write to the data file (through `DirtyTracking`), taken by commit.
    data_dirty: Arc<std::sync::atomic::AtomicBool>,
    /// `Pool::batch`: taken by every commit before the gate, so a guest's FLUSH waits
    /// while the volume model stages a multi-step transaction.
    batch: parking_lot::ReentrantMutex<()>,
    state: Mutex<Meta>,
    /// Signalled when in-flight chunks complete.
    cv: Condvar,
    me: std::sync::Weak<ThinPool>,
}

fn lock_dir(dir: &Path) -> Result<File, PoolError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| PoolError::io(format!("opening {}", path.display()), e))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            let pid = std::process::id().to_string();
            f.set_len(0)
                .and_then(|_| f.rewind())
                .and_then(|_| f.write_all(pid.as_bytes()))
                .map_err(|e| PoolError::io("writing the lock file", e))?;
            Ok(f)
        }
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            Err(PoolError::Locked {
                path: dir.display().to_string(),
                pid: s.trim().parse().ok(),
            })
        }
        Err(e) => Err(PoolError::io("locking the pool", e.into())),
    }
}

fn open_file(path: &Path, create: bool) -> Result<Arc<dyn BlockFile>, PoolError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true);
    }
    let f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PoolError::NotAPool {
                path: path.display().to_string(),
                reason: "no such file".into(),
            }
        } else {
            PoolError::io(format!("opening {}", path.display()), e)
        }
    })?;
    Ok(Arc::new(RealFile::new(f)))
}

impl ThinPool {
    /// Creates a pool in `dir` (created if missing); refuses a directory holding a pool.
    pub fn create(dir: &Path, opts: ThinOptions) -> Result<Arc<ThinPool>, PoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let lock = lock_dir(dir)?;
        if dir.join(META_FILE).exists() {
            return Err(PoolError::Invalid(format!(
                "a pool already exists at {}",
                dir.display()
            )));
        }
        let meta = open_file(&dir.join(META_FILE), true)?;
        let data = open_file(&dir.join(DATA_FILE), true)?;
        Self::create_locked(dir, lock, opts, meta, data)
    }

    /// Opens the pool in `dir`.
    pub fn open(dir: &Path) -> Result<Arc<ThinPool>, PoolError> {
        if !dir.join(META_FILE).exists() {
            return Err(PoolError::NotAPool {
                path: dir.display().to_string(),
                reason: format!("no {META_FILE}"),
            });
        }
        let lock = lock_dir(dir)?;
        let meta = open_file(&dir.join(META_FILE), false)?;
        let data = open_file(&dir.join(DATA_FILE), false)?;
        Self::open_locked(dir, lock, meta, data)
    }

    /// [`ThinPool::create`] on caller-supplied files (tests inject faults this way); `dir`
    /// only holds the lock.
    pub fn create_with_io(
        dir: &Path,
        opts: ThinOptions,
        meta: Box<dyn BlockFile>,
        data: Box<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let lock = lock_dir(dir)?;
        Self::create_locked(dir, lock, opts, Arc::from(meta), Arc::from(data))
    }

    /// [`ThinPool::open`] on caller-supplied files.
    pub fn open_with_io(
        dir: &Path,
        meta: Box<dyn BlockFile>,
        data: Box<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let lock = lock_dir(dir)?;
        Self::open_locked(dir, lock, Arc::from(meta), Arc::from(data))
    }

    fn create_locked(
        dir: &Path,
        lock: File,
        opts: ThinOptions,
        meta_file: Arc<dyn BlockFile>,
        data: Arc<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        let cs = opts.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(PoolError::Invalid(format!(
                "chunk size {cs} is not a power of two from 4 KiB to 1 MiB"
            )));
        }
        let chunks = opts.capacity / cs;
        if chunks == 0 {
            return Err(PoolError::Invalid(format!(
                "capacity {} is less than one chunk",
                opts.capacity
            )));
        }
        if !meta_file
            .is_empty()
            .map_err(|e| PoolError::io("sizing pool.meta", e))?
        {
            return Err(PoolError::Invalid(format!(
                "a pool already exists at {}",
                dir.display()
            )));
        }
        data.set_len((chunks + 1) * cs)
            .map_err(|e| PoolError::io("sizing pool.data", e))?;
        let empty = TreeRoot {
            page: PageRef::NULL,
            height: 1,
        };
        let sb = Superblock {
            generation: 0,
            chunk_size: cs,
            data_chunks: chunks,
            meta_hw: 2,
            data_hw: 0,
            data_used: 0,
            meta_used: 0,
            meta_rc: empty,
            data_rc: empty,
            roots: empty,
            catalogue: PageRef::NULL,
            catalogue_len: 0,
            needs_check: false,
        };
        let mut m = Meta::new(
            meta_file.clone(),
            sb,
            CatalogueDoc {
                next_id: 1,
                ..Default::default()
            },
            Vec::new(),
        );
        m.init_superblock_pages().map_err(|e| e.into_pool(cs))?;
        data.sync()
            .map_err(|e| PoolError::io("syncing pool.data", e))?;
        // Two commits: both superblock slots hold a valid pool from the start.
        m.commit().map_err(|e| e.into_pool(cs))?;
        m.commit().map_err(|e| e.into_pool(cs))?;
        Ok(Self::assemble(dir, lock, meta_file, data, m, None))
    }

    fn open_locked(
        dir: &Path,
        lock: File,
        meta_file: Arc<dyn BlockFile>,
        data: Arc<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        let not_a_pool = |reason: String| PoolError::NotAPool {
            path: dir.display().to_string(),
            reason,
        };
        let len = meta_file
            .len()
            .map_err(|e| PoolError::io("sizing pool.meta", e))?;
        if len < 2 * PAGE_SIZE as u64 {
            return Err(not_a_pool(format!(
                "{META_FILE} is {len} bytes, too short for the superblocks"
            )));
        }
        let mut valid: Vec<Superblock> = Vec::new();
        let mut problems = Vec::new();
        let mut old_format = None;
        for slot in [PageNo(0), PageNo(1)] {
            let buf = meta::read_page(&*meta_file, slot).map_err(|e| e.into_pool(4096))?;
            match Superblock::unpack(slot, &buf[..]) {
                Ok(sb) => valid.push(sb),
                Err(FormatError::OldFormat { found }) => old_format = Some(found),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if let (Some(found), true) = (old_format, valid.is_empty()) {
            // No in-place conversion: every pointer in the pool grows (generation and
            // checksum), so every page would be rewritten; the old build still reads it.
            return Err(PoolError::OldFormat {
                path: dir.display().to_string(),
                reason: format!(
                    "has metadata format {found}; this build reads format {} (lost-write \
                     detection) and does not convert pools. With the qubes-ctl that wrote the pool, \
                     `qubes-ctl volume export VOLUME FILE` each volume (templates: `template export`), \
                     then move the pool directory away, `qubes-ctl pool init` a new one and import them",
                    format::FORMAT_VERSION
                ),
            });
        }
        valid.sort_by_key(|sb| sb.generation);
        let best = valid.pop();
        // The previous commit, kept readable (its pages are not reused) until our first commit.
        let older = valid
            .pop()
            .filter(|o| best.is_some_and(|b| o.generation < b.generation));
        let Some(sb) = best else {
            // `pool verify` cannot open such a pool either: say what can be done.
            return Err(PoolError::Corrupt(format!(
                "no valid superblock: {}; the pool at {} cannot be opened (nor verified). \
                 Restore {META_FILE} from a backup, or move the pool directory away and create a \
                 new pool with `qubes-ctl pool init` (its data cannot be reached without a superblock)",
                problems.join("; "),
                dir.display()
            )));
        };
        let fallback = (!problems.is_empty()).then(|| {
            format!(
                "a superblock slot of {META_FILE} is damaged ({}); opened the other one, generation {} \
                 (the commit after it may be lost); the next commit rewrites the damaged slot",
                problems.join("; "),
                sb.generation
            )
        });
        if let Some(f) = &fallback {
            tracing::warn!(pool = %dir.display(), "{f}");
        }
        let cs = sb.chunk_size;
        if sb.needs_check {
            // The pool stopped after a failed metadata update: check before trusting it.
            let (report, _) = verify::verify(&*meta_file, &sb);
            if !report.errors.is_empty() {
                return Err(PoolError::Corrupt(format!(
                    "the pool stopped after a failed metadata update (needs_check is set) and its metadata is damaged: {}",
                    report.errors.join("; ")
                )));
            }
            tracing::warn!(pool = %dir.display(), leaks = report.leaks.len(), "the pool stopped after a failed metadata update; its metadata verified clean, the flag is cleared at the next commit");
        }
        let (cat, pages) = verify::read_catalogue(&*meta_file, &sb).map_err(|e| e.into_pool(cs))?;
        // Chunks past the committed high-water mark may hold data of a transaction that
        // never committed: hole-punch them so they read zeros when allocated.
        let want = (sb.data_chunks + 1) * cs;
        let dlen = data
            .len()
            .map_err(|e| PoolError::io("sizing pool.data", e))?;
        if dlen < want {
            data.set_len(want)
                .map_err(|e| PoolError::io("sizing pool.data", e))?;
        }
        let tail = (sb.data_hw + 1) * cs;
        data.punch_hole(tail, dlen.max(want) - tail)
            .map_err(|e| PoolError::io("punching unused chunks", e))?;
        data.sync()
            .map_err(|e| PoolError::io("syncing pool.data", e))?;
        let mut m = Meta::new(meta_file.clone(), sb, cat, pages);
        m.keep_older(older);
        Ok(Self::assemble(dir, lock, meta_file, data, m, fallback))
    }

    fn assemble(
        dir: &Path,
        lock: File,
        meta_file: Arc<dyn BlockFile>,
        data: Arc<dyn BlockFile>,
        m: Meta,
        fallback: Option<String>,
    ) -> Arc<ThinPool> {
        let data_dirty = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let data_raw = data.clone();
        let data: Arc<dyn BlockFile> = Arc::new(DirtyTracking {
            inner: data,
            dirty: data_dirty.clone(),
        });
        Arc::new_cyclic(|me| ThinPool {
            me: me.clone(),
            path: dir.to_path_buf(),
            _lock: lock,
            fallback,
            data,
            data_raw,
            data_dirty,
            meta_file,
            geo: m.geo,
            gate: RwLock::new(()),
            batch: parking_lot::ReentrantMutex::new(()),
            state: Mutex::new(m),
            cv: Condvar::new(),
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.geo.chunk_size
    }

    /// The superblock on disk says the pool stopped after a failed metadata update
    /// (set when it stops, cleared by the first commit after a clean open).
    pub fn needs_check(&self) -> bool {
        self.state.lock().sb.needs_check
    }

    fn perr(&self, e: Error) -> PoolError {
        e.into_pool(self.geo.chunk_size)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Meta>, PoolError> {
        let m = self.state.lock();
        m.check_poison().map_err(|e| self.perr(e))?;
        Ok(m)
    }

    /// Runs a metadata mutation; any failure but "no space" leaves the in-memory state
    /// unknown, so it stops the pool until reopened.
    fn mutate<T>(
        &self,
        m: &mut Meta,
        f: impl FnOnce(&mut Meta) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let r = f(m);
        if let Err(e) = &r {
            if !matches!(e, Error::NoSpace) {
                m.poison(e.to_string());
            }
        }
        r
    }

    /// Chunks freed since the last commit exist (a commit would make them reusable).
    fn has_deferred_chunks(&self) -> bool {
        self.state.lock().deferred_chunks() > 0
    }

    fn id(&self, m: &Meta, key: &str) -> Result<u64, PoolError> {
        m.id_of(key)
            .ok_or_else(|| PoolError::NoSuchVolume(key.to_string()))
    }

    fn commit_locked(&self, m: &mut Meta) -> Result<(), PoolError> {
        m.check_poison().map_err(|e| self.perr(e))?;
        // Every sync costs milliseconds on a real disk (a start or stop is a few metadata
        // updates; a guest flushes often): sync the data file only when something was
        // written to it, and skip the commit when nothing at all changed. The gate is held
        // exclusively, so no data write is in flight while the flag is taken.
        let data_dirty = self
            .data_dirty
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        if !data_dirty && m.is_clean() {
            return Ok(());
        }
        if let Err(e) = m.reserve_for_commit() {
            // Nothing changed yet: the pool stays usable and a later commit retries.
            if data_dirty {
                self.mark_data_dirty();
            }
            return Err(self.perr(e));
        }
        let synced = if data_dirty {
            self.data.sync().map_err(|source| Error::Io {
                op: "syncing pool.data",
                source,
            })
        } else {
            Ok(())
        };
        let r = synced.and_then(|_| m.commit());
        if let Err(e) = r {
            m.poison(e.to_string());
            return Err(self.perr(e));
        }
        self.punch_freed(m);
        Ok(())
    }

    fn mark_data_dirty(&self) {
        self.data_dirty
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Gives the space of chunks the commit just freed back to the host filesystem (a
    /// guest's TRIM reaches the host). Their content no longer matters: a chunk is
    /// punched again when reused, so a failure here only delays the space.
    fn punch_freed(&self, m: &mut Meta) {
        let mut freed = std::mem::take(&mut m.freed_chunks_committed);
        if freed.is_empty() {
            return;
        }
        freed.sort_unstable();
        let cs = self.geo.chunk_size;
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            let (off, len) = (Chunk(freed[i]).offset(cs), (j - i) as u64 * cs);
            // Through the raw file: a punch of a free chunk needs no data sync.
            if let Err(e) = self.data_raw.punch_hole(off, len) {
                tracing::warn!(pool = %self.path.display(), "punching freed chunks: {e}");
            }
            i = j;
        }
    }

    /// Referenced metadata pages of the last commit and their kinds (for tools and damage tests).
    pub fn metadata_pages(&self) -> Result<Vec<(PageNo, PageKind)>, PoolError> {
        let pin = self.pin();
        let (_, pages) = verify::verify(&*self.meta_file, &pin.sb);
        Ok(pages.into_iter().map(|(p, k)| (PageNo(p), k)).collect())
    }

    /// Pins the last commit for a walk without the metadata lock: guest I/O and
    /// commits go on meanwhile.
    fn pin(&self) -> Pinned<'_> {
        let sb = self.state.lock().pin();
        Pinned { pool: self, sb }
    }

    // ---- data path -------------------------------------------------------------------

    /// Plans under the metadata lock, waiting while a chunk the request touches has I/O
    /// in flight.
    fn plan<T>(
        &self,
        mut f: impl FnMut(&mut Meta) -> Result<Option<T>, Error>,
    ) -> Result<T, Error> {
        let mut m = self.state.lock();
        loop {
            m.check_poison()?;
            if let Some(t) = f(&mut m)? {
                return Ok(t);
            }
            self.cv.wait(&mut m);
        }
    }

    fn read_locked(&self, id: u64, buf: &mut [u8], off: u64) -> Result<(), Error> {
        let geo = self.geo;
        let segs = self.plan(|m| plan_read(m, geo, id, off, buf.len()))?;
        for s in segs {
            match s {
                ReadSeg::Zero { buf_off, len } => buf[buf_off..buf_off + len].fill(0),
                ReadSeg::File { off, buf_off, len } => self
                    .data
                    .read_at(&mut buf[buf_off..buf_off + len], off)
                    .map_err(|source| Error::Io {
                        op: "reading pool.data",
                        source,
                    })?,
            }
        }
        Ok(())
    }

    /// Writes as dm-thin does: data first, then the mapping. The plan allocates fresh
    /// chunks and marks the virtual chunks busy; the mapping changes only after every
    /// data write succeeded, so a failed write leaves the volume's mapped bytes as they
    /// were (its fresh chunks are freed) and the next commit cannot make zeros durable
    /// over bytes the guest never wrote.
    fn write_locked(&self, id: u64, buf: &[u8], off: u64) -> Result<(), Error> {
        let geo = self.geo;
        let plan = self.plan(|m| {
            if !targets_idle(m, id, geo, off, buf.len() as u64)? {
                return Ok(None);
            }
            let mut plan = WritePlan::default();
            let r = self.mutate(m, |m| plan_write(m, geo, id, off, buf.len(), &mut plan));
            if let Err(e) = r {
                if !matches!(e, Error::NoSpace) {
                    return Err(e);
                }
                plan.err = Some(e);
            }
            for c in &plan.inflight {
                m.inflight.insert(*c);
            }
            for i in &plan.installs {
                m.inflight_vcs.insert((id, i.vc));
            }
            Ok(Some(plan))
        })?;
        let r = self.execute(&plan, buf);
        if !plan.inflight.is_empty() || !plan.installs.is_empty() {
            let mut m = self.state.lock();
            for c in &plan.inflight {
                m.inflight.remove(c);
            }
            for i in &plan.installs {
                m.inflight_vcs.remove(&(id, i.vc));
            }
            let done = match &r {
                Ok(()) => self.mutate(&mut m, |m| install(m, id, &plan.installs)),
                Err(_) => self.mutate(&mut m, |m| {
                    plan.fresh.iter().try_for_each(|c| m.chunk_dec(*c))
                }),
            };
            self.cv.notify_all();
            done?;
        }
        r?;
        match plan.err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn execute(&self, plan: &WritePlan, buf: &[u8]) -> Result<(), Error> {
        let io = |op: &'static str| move |source| Error::Io { op, source };
        for op in &plan.ops {
            if let WOp::Punch { off, len } = op {
                self.data
                    .punch_hole(*off, *len)
                    .map_err(io("punching a reused chunk"))?;
            }
        }
        let mut tmp = Vec::new();
        for op in &plan.ops {
            if let WOp::Copy {
                src,
                dst,
                len,
                overlay,
            } = op
            {
                tmp.resize(*len as usize, 0);
                self.data
                    .read_at(&mut tmp, *src)
                    .map_err(io("reading a shared chunk"))?;
                if let Some((bo, at, n)) = overlay {
                    tmp[*at..at + n].copy_from_slice(&buf[*bo..bo + n]);
                }
                self.data
                    .write_at(&tmp, *dst)
                    .map_err(io("copying a shared sub-block"))?;
            }
        }
        for op in &plan.ops {
            if let WOp::Write { dst, buf_off, len } = op {
                self.data
                    .write_at(&buf[*buf_off..buf_off + len], *dst)
                    .map_err(io("writing pool.data"))?;
            }
        }
        Ok(())
    }

    fn volume_size(&self, id: u64) -> Result<u64, BlockErrorKind> {
        let m = self.state.lock();
        m.vol(id).map(|v| v.size).ok_or(BlockErrorKind::Gone)
    }
}

/// A pinned commit; unpinned on drop.
struct Pinned<'a> {
    pool: &'a ThinPool,
    sb: Superblock,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.pool.state.lock().unpin();
    }
}

// ---- plans -----------------------------------------------------------------------------

enum ReadSeg {
    Zero {
        buf_off: usize,
        len: usize,
    },
    File {
        off: u64,
        buf_off: usize,
        len: usize,
    },
}

fn push_read(segs: &mut Vec<ReadSeg>, s: ReadSeg) {
    match (segs.last_mut(), &s) {
        (Some(ReadSeg::Zero { buf_off, len }), ReadSeg::Zero { buf_off: b, len: l })
            if *buf_off + *len == *b =>
        {
            *len += l;
        }
        (
            Some(ReadSeg::File { off, buf_off, len }),
            ReadSeg::File {
                off: o,
                buf_off: b,
                len: l,
            },
        ) if *buf_off + *len == *b && *off + *len as u64 == *o => {
            *len += l;
        }
        _ => segs.push(s),
    }
}

fn plan_read(
    m: &mut Meta,
    geo: Geometry,
    id: u64,
    off: u64,
    len: usize,
) -> Result<Option<Vec<ReadSeg>>, Error> {
    let cs = geo.chunk_size;
    let end = off + len as u64;
    let mut segs = Vec::new();
    let mut pos = off;
    while pos < end {
        let vc = pos / cs;
        let a = pos - vc * cs;
        let b = (end - vc * cs).min(cs);
        let bo = (pos - off) as usize;
        let e = m.lookup(id, vc)?;
        if e.is_mapped() && m.inflight.contains(&e.chunk.0) {
            return Ok(None);
        }
        if !e.is_mapped() {
            push_read(
                &mut segs,
                ReadSeg::Zero {
                    buf_off: bo,
                    len: (b - a) as usize,
                },
            );
        } else if e.backing.is_none() {
            push_read(
                &mut segs,
                ReadSeg::File {
                    off: e.chunk.offset(cs) + a,
                    buf_off: bo,
                    len: (b - a) as usize,
                },
            );
        } else {
            let mut p = a;
            while p < b {
                let s = p / geo.sub_size;
                let q = ((s + 1) * geo.sub_size).min(b);
                let src = if e.valid & (1 << s) != 0 {
                    e.chunk
                } else {
                    e.backing
                };
                push_read(
                    &mut segs,
                    ReadSeg::File {
                        off: src.offset(cs) + p,
                        buf_off: bo + (p - a) as usize,
                        len: (q - p) as usize,
                    },
                );
                p = q;
            }
        }
        pos = vc * cs + b;
    }
    Ok(Some(segs))
}

enum WOp {
    /// Hole-punch a reused chunk before anything else touches it.
    Punch { off: u64, len: u64 },
    /// Copy one sub-block, overlaying `(buf_off, at, len)` of the request first.
    Copy {
        src: u64,
        dst: u64,
        len: u64,
        overlay: Option<(usize, usize, usize)>,
    },
    Write {
        dst: u64,
        buf_off: usize,
        len: usize,
    },
}

/// A mapping change made once the data of a write is on disk.
struct Install {
    vc: u64,
    entry: MapEntry,
    /// The virtual chunk was unmapped (the volume's mapped count grows).
    newly_mapped: bool,
    /// References the old entry held and the new one drops.
    drops: Vec<Chunk>,
}

#[derive(Default)]
struct WritePlan {
    ops: Vec<WOp>,
    /// Physical chunks readers and writers must not touch until the write completes.
    inflight: Vec<u64>,
    /// Chunks allocated for this write: freed again if it fails.
    fresh: Vec<Chunk>,
    installs: Vec<Install>,
    err: Option<Error>,
}

impl WritePlan {
    fn write(&mut self, dst: u64, buf_off: usize, len: usize) {
        if let Some(WOp::Write {
            dst: d,
            buf_off: b,
            len: l,
        }) = self.ops.last_mut()
        {
            if *d + *l as u64 == dst && *b + *l == buf_off {
                *l += len;
                return;
            }
        }
        self.ops.push(WOp::Write { dst, buf_off, len });
    }

    fn new_chunk(&mut self, m: &mut Meta, geo: Geometry) -> Result<Chunk, Error> {
        let (c, reused) = m.alloc_chunk()?;
        if reused {
            self.ops.push(WOp::Punch {
                off: c.offset(geo.chunk_size),
                len: geo.chunk_size,
            });
        }
        self.inflight.push(c.0);
        self.fresh.push(c);
        Ok(c)
    }
}

/// Installs the mappings of a write whose data is on disk.
fn install(m: &mut Meta, id: u64, installs: &[Install]) -> Result<(), Error> {
    let mut newly = 0;
    for i in installs {
        let leaf = m.shadow_path(id, i.vc)?;
        let slot = (i.vc % format::MAP_LEAF_ENTRIES as u64) as usize;
        m.leaf_mut(leaf)?[slot] = i.entry;
        for c in &i.drops {
            m.chunk_dec(*c)?;
        }
        newly += u64::from(i.newly_mapped);
    }
    if newly > 0 {
        let mut r = m.root(id)?;
        r.mapped = r.mapped.checked_add(newly).ok_or_else(|| {
            Error::Inconsistent(format!("volume id {id}: mapped chunk count overflow"))
        })?;
        m.set_root(id, r)?;
    }
    Ok(())
}

/// False if a chunk the write would touch has I/O in flight.
fn targets_idle(m: &mut Meta, id: u64, geo: Geometry, off: u64, len: u64) -> Result<bool, Error> {
    if len == 0 || (m.inflight.is_empty() && m.inflight_vcs.is_empty()) {
        return Ok(true);
    }
    let (lo, hi) = (off / geo.chunk_size, (off + len - 1) / geo.chunk_size);
    if vcs_busy(m, id, lo, hi + 1) {
        return Ok(false);
    }
    if m.inflight.is_empty() {
        return Ok(true);
    }
    for vc in lo..=hi {
        let e = m.lookup(id, vc)?;
        if e.is_mapped() && m.inflight.contains(&e.chunk.0) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a write to virtual chunks `[lo, hi)` of `id` is in flight.
fn vcs_busy(m: &Meta, id: u64, lo: u64, hi: u64) -> bool {
    m.inflight_vcs
        .iter()
        .any(|&(v, c)| v == id && (lo..hi).contains(&c))
}

fn plan_write(
    m: &mut Meta,
    geo: Geometry,
    id: u64,
    off: u64,
    len: usize,
    plan: &mut WritePlan,
) -> Result<(), Error> {
    m.touch(id);
    let cs = geo.chunk_size;
    let end = off + len as u64;
    let mut pos = off;
    while pos < end {
        let vc = pos / cs;
        let a = pos - vc * cs;
        let b = (end - vc * cs).min(cs);
        let bo = (pos - off) as usize;
        plan_chunk(m, geo, id, vc, a, b, bo, plan)?;
        pos = vc * cs + b;
    }
    Ok(())
}

/// Plans writing bytes `[a, b)` of virtual chunk `vc` from request offset `bo`.
#[allow(clippy::too_many_arguments)]
fn plan_chunk(
    m: &mut Meta,
    geo: Geometry,
    id: u64,
    vc: u64,
    a: u64,
    b: u64,
    bo: usize,
    plan: &mut WritePlan,
) -> Result<(), Error> {
    let cs = geo.chunk_size;
    let sub = geo.sub_size;
    // Shadowing the path first makes chunk refcounts count this volume's own reference
    // (a snapshot shares map pages, not chunks): only then is "exclusive" meaningful.
    // It changes no mapping, so a failed data write leaves nothing to undo.
    let leaf = m.shadow_path(id, vc)?;
    let mut e = m.leaf_mut(leaf)?[(vc % format::MAP_LEAF_ENTRIES as u64) as usize];
    let exclusive = |m: &mut Meta, c: Chunk| -> Result<bool, Error> {
        Ok(m.data_rc(c.0)? == 1 && !m.dropped_chunks.contains(&c.0))
    };
    if !e.is_mapped() {
        let c = plan.new_chunk(m, geo)?;
        plan.write(c.offset(cs) + a, bo, (b - a) as usize);
        plan.installs.push(Install {
            vc,
            entry: MapEntry {
                chunk: c,
                backing: Chunk::NONE,
                valid: 0,
            },
            newly_mapped: true,
            drops: Vec::new(),
        });
        return Ok(());
    }
    let mut copied = 0u64;
    let mut drops = Vec::new();
    if e.backing.is_none() {
        if exclusive(m, e.chunk)? {
            // In place: the mapping does not change; a failed write changes only bytes
            // the guest asked to overwrite.
            plan.write(e.chunk.offset(cs) + a, bo, (b - a) as usize);
            return Ok(());
        }
        let n = plan.new_chunk(m, geo)?;
        e = MapEntry {
            chunk: n,
            backing: e.chunk,
            valid: 0,
        };
    } else if !exclusive(m, e.chunk)? {
        // The overlay chunk itself is shared: its valid sub-blocks move to a new chunk.
        let n = plan.new_chunk(m, geo)?;
        for s in 0..geo.subs as u64 {
            let covered = a <= s * sub && b >= (s + 1) * sub;
            if e.valid & (1 << s) != 0 && !covered {
                plan.ops.push(WOp::Copy {
                    src: e.chunk.offset(cs) + s * sub,
                    dst: n.offset(cs) + s * sub,
                    len: sub,
                    overlay: None,
                });
                copied |= 1 << s;
            }
        }
        drops.push(e.chunk);
        e.chunk = n;
    } else {
        plan.inflight.push(e.chunk.0);
    }
    for s in a / sub..b.div_ceil(sub) {
        let sa = a.max(s * sub);
        let sb = b.min((s + 1) * sub);
        let dst = e.chunk.offset(cs) + sa;
        let full = sa == s * sub && sb == (s + 1) * sub;
        if full || e.valid & (1 << s) != 0 || copied & (1 << s) != 0 {
            plan.write(dst, bo + (sa - a) as usize, (sb - sa) as usize);
        } else {
            plan.ops.push(WOp::Copy {
                src: e.backing.offset(cs) + s * sub,
                dst: e.chunk.offset(cs) + s * sub,
                len: sub,
                overlay: Some((
                    bo + (sa - a) as usize,
                    (sa - s * sub) as usize,
                    (sb - sa) as usize,
                )),
            });
        }
        e.valid |= 1 << s;
    }
    if e.valid == geo.full_mask() {
        drops.push(e.backing);
        e.backing = Chunk::NONE;
        e.valid = 0;
    }
    plan.installs.push(Install {
        vc,
        entry: e,
        newly_mapped: false,
        drops,
    });
    Ok(())
}

// ---- volumes ---------------------------------------------------------------------------

/// An open volume: a [`BlockDevice`] that follows renames (it names the volume by id).
pub struct ThinVolume {
    pool: Arc<ThinPool>,
    id: u64,
    name: String,
    read_only: bool,
}

impl Drop for ThinVolume {
    fn drop(&mut self) {
        crate::pool::bookkeeping::release_handle(&mut self.pool.state.lock().handles, self.id);
    }
}

impl ThinVolume {
    fn err(
        &self,
        kind: BlockErrorKind,
        op: &'static str,
        offset: u64,
        length: u64,
        detail: impl Into<String>,
    ) -> BlockError {
        BlockError::new(kind, op, &self.name, offset, length, detail)
    }

    fn check(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<u64, BlockError> {
        if write && self.read_only {
            return Err(self.err(
                BlockErrorKind::ReadOnly,
                op,
                offset,
                length,
                "read-only handle",
            ));
        }
        let size = self
            .pool
            .volume_size(self.id)
            .map_err(|k| self.err(k, op, offset, length, "volume is gone"))?;
        if offset.checked_add(length).is_none_or(|e| e > size) {
            return Err(self.err(
                BlockErrorKind::OutOfRange,
                op,
                offset,
                length,
                format!("volume size is {size}"),
            ));
        }
        Ok(size)
    }

    fn map_err(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
    ) -> impl Fn(Error) -> BlockError + '_ {
        move |e| {
            let hint = match &e {
                Error::Format(FormatError::Stale { .. }) => {
                    "; `qubes-ctl pool verify` lists every volume the lost write damaged"
                }
                _ => "",
            };
            self.err(e.kind(), op, offset, length, format!("{e}{hint}"))
        }
    }

    /// Whole chunks inside `[off, off+len)`; the volume's last partial chunk counts as
    /// whole when the range reaches the end.
    fn whole_chunks(&self, off: u64, len: u64, size: u64) -> (u64, u64) {
        let cs = self.pool.geo.chunk_size;
        let end = off + len;
        let hi = if end == size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        (off.div_ceil(cs), hi)
    }

    /// Runs a data operation under the shared gate. Chunks freed since the last commit
    /// become reusable only at the next one, so a guest that overwrites and discards
    /// without flushing can find the pool "full" while half of it waits for a commit:
    /// then commit (whole-pool, after any staged volume-model transaction, as a guest
    /// FLUSH would) and try once more, as dm-thin's `alloc_data_block` does.
    fn reclaiming_on_nospace<T>(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        f: impl Fn() -> Result<T, BlockError>,
    ) -> Result<T, BlockError> {
        let first = {
            let _g = self.pool.gate.read();
            f()
        };
        match first {
            Err(e) if e.kind == BlockErrorKind::NoSpace && self.pool.has_deferred_chunks() => {
                self.pool.commit().map_err(|c| {
                    self.err(commit_err_kind(&c), op, offset, length, c.to_string())
                })?;
                let _g = self.pool.gate.read();
                f()
            }
            r => r,
        }
    }

    fn write_zeroes_gated(
        &self,
        offset: u64,
        length: u64,
        may_unmap: bool,
    ) -> Result<(), BlockError> {
        let size = self.check("write_zeroes", offset, length, true)?;
        if !may_unmap {
            return self.zero_fill("write_zeroes", offset, length, false);
        }
        let cs = self.pool.geo.chunk_size;
        let (lo, hi) = self.unmap("write_zeroes", offset, length, size)?;
        let end = offset + length;
        if lo >= hi {
            return self.zero_fill("write_zeroes", offset, length, true);
        }
        if offset < lo * cs {
            self.zero_fill("write_zeroes", offset, lo * cs - offset, true)?;
        }
        if hi * cs < end {
            self.zero_fill("write_zeroes", hi * cs, end - hi * cs, true)?;
        }
        Ok(())
    }

    fn unmap(
        &self,
        op: &'static str,
        off: u64,
        len: u64,
        size: u64,
    ) -> Result<(u64, u64), BlockError> {
        let (lo, hi) = self.whole_chunks(off, len, size);
        if lo < hi {
            let id = self.id;
            // A write in flight installs its mapping when its data is on disk: let it
            // finish first, or its install would resurrect what this unmaps.
            self.pool
                .plan(|m| {
                    if vcs_busy(m, id, lo, hi) {
                        return Ok(None);
                    }
                    let n = self.pool.mutate(m, |m| m.unmap_range(id, lo, hi))?;
                    if n > 0 {
                        m.touch(id);
                    }
                    Ok(Some(()))
                })
                .map_err(self.map_err(op, off, len))?;
        }
        Ok((lo, hi))
    }

    fn zero_fill(
        &self,
        op: &'static str,
        off: u64,
        len: u64,
        only_mapped: bool,
    ) -> Result<(), BlockError> {
        let cs = self.pool.geo.chunk_size;
        let piece = (4 << 20).max(cs);
        let zeros = vec![0u8; piece.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(piece);
            if only_mapped {
                let mut m = self
                    .pool
                    .lock()
                    .map_err(|e| self.err(BlockErrorKind::Io, op, off, len, e.to_string()))?;
                let mapped = m
                    .mapped_in(self.id, pos / cs, (pos + n).div_ceil(cs))
                    .map_err(self.map_err(op, off, len))?;
                if mapped.is_empty() {
                    pos += n;
                    continue;
                }
            }
            self.pool
                .write_locked(self.id, &zeros[..n as usize], pos)
                .map_err(self.map_err(op, off, len))?;
            pos += n;
        }
        Ok(())
    }
}

impl BlockDevice for ThinVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.pool.volume_size(self.id).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let _g = self.pool.gate.read();
        self.check("read", offset, buf.len() as u64, false)?;
        let len = buf.len() as u64;
        self.pool
            .read_locked(self.id, buf, offset)
            .map_err(self.map_err("read", offset, len))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.reclaiming_on_nospace("write", offset, buf.len() as u64, || {
            self.check("write", offset, buf.len() as u64, true)?;
            self.pool
                .write_locked(self.id, buf, offset)
                .map_err(self.map_err("write", offset, buf.len() as u64))
        })
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.pool
            .commit()
            .map_err(|e| self.err(commit_err_kind(&e), "flush", 0, 0, e.to_string()))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        let _g = self.pool.gate.read();
        let size = self.check("discard", offset, length, true)?;
        self.unmap("discard", offset, length, size).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.reclaiming_on_nospace("write_zeroes", offset, length, || {
            self.write_zeroes_gated(offset, length, may_unmap)
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        let _g = self.pool.gate.read();
        self.check("block_status", offset, length, false)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let cs = self.pool.geo.chunk_size;
        // Look at no more than 64 Ki chunks per call; NBD lets replies stop early.
        let end = (offset + length).min((offset / cs + 65536) * cs);
        let (lo, hi) = (offset / cs, end.div_ceil(cs));
        let mapped = {
            let mut m = self.pool.lock().map_err(|e| {
                self.err(
                    BlockErrorKind::Io,
                    "block_status",
                    offset,
                    length,
                    e.to_string(),
                )
            })?;
            m.mapped_in(self.id, lo, hi)
                .map_err(self.map_err("block_status", offset, length))?
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |start: u64, stop: u64, hole: bool| {
            let (s, t) = (start.max(offset), stop.min(end));
            if s >= t {
                return;
            }
            if let Some(last) = out.last_mut() {
                if last.hole == hole && last.offset + last.length == s {
                    last.length += t - s;
                    return;
                }
            }
            out.push(Extent {
                offset: s,
                length: t - s,
                hole,
                zero: hole,
            });
        };
        let mut vc = lo;
        for (c, _) in mapped {
            push(vc * cs, c * cs, true);
            push(c * cs, (c + 1) * cs, false);
            vc = c + 1;
        }
        push(vc * cs, hi * cs, true);
        Ok(out)
    }
}

// ---- Pool ------------------------------------------------------------------------------

impl Pool for ThinPool {
    fn driver(&self) -> &'static str {
        "thin"
    }

    fn info(&self) -> Result<PoolInfo, PoolError> {
        let m = self.lock()?;
        Ok(PoolInfo {
            driver: "thin".into(),
            path: self.path.display().to_string(),
            chunk_size: self.geo.chunk_size,
            capacity: self.geo.data_chunks * self.geo.chunk_size,
            data_used: m.data_used * self.geo.chunk_size,
            metadata_used: m.meta_used * PAGE_SIZE as u64,
            volumes: m.cat.volumes.len() as u64,
            generation: m.sb.generation,
            host_free: self
                .data
                .host_free()
                .map_err(|e| PoolError::io("statvfs of pool.data", e))?,
            warnings: self.fallback.iter().cloned().collect(),
        })
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        let keys: Vec<String> = self.lock()?.by_key.keys().cloned().collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            match self.volume(&k) {
                Ok(v) => out.push(v),
                Err(PoolError::NoSuchVolume(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError> {
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        let r = m.root(id).map_err(|e| self.perr(e))?;
        let v = m
            .vol(id)
            .ok_or_else(|| PoolError::NoSuchVolume(key.into()))?;
        Ok(VolumeInfo {
            key: v.key.clone(),
            size: v.size,
            mapped: r.mapped * self.geo.chunk_size,
            attrs: v.attrs.clone(),
        })
    }

    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError> {
        validate_volume_key(key)?;
        let mut m = self.lock()?;
        if m.id_of(key).is_some() {
            return Err(PoolError::VolumeExists(key.into()));
        }
        let h = meta::map_height(size.div_ceil(self.geo.chunk_size));
        self.mutate(&mut m, |m| {
            m.add_volume(
                key,
                size,
                format::RootEntry {
                    height: h,
                    ..Default::default()
                },
            )
        })
        .map(|_| ())
        .map_err(|e| self.perr(e))
    }

    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError> {
        validate_volume_key(target)?;
        let _g = self.gate.write();
        let mut m = self.lock()?;
        let src = self.id(&m, source)?;
        if m.id_of(target).is_some() {
            return Err(PoolError::VolumeExists(target.into()));
        }
        self.mutate(&mut m, |m| m.snapshot(src, target))
            .map(|_| ())
            .map_err(|e| self.perr(e))
    }

    fn remove_volume(&self, key: &str) -> Result<(), PoolError> {
        let _g = self.gate.write();
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        if let Some(&users) = m.handles.get(&id) {
            return Err(PoolError::Busy {
                volume: key.into(),
                users,
            });
        }
        self.mutate(&mut m, |m| m.remove_volume(id))
            .map_err(|e| self.perr(e))
    }

    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError> {
        validate_volume_key(to)?;
        let mut m = self.lock()?;
        let id = self.id(&m, from)?;
        if m.id_of(to).is_some() {
            return Err(PoolError::VolumeExists(to.into()));
        }
        m.by_key.remove(from);
        m.by_key.insert(to.to_string(), id);
        if let Some(v) = m.vol_mut(id) {
            v.key = to.to_string();
        }
        m.cat_dirty = true;
        Ok(())
    }

    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError> {
        let _g = self.gate.write();
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        let old = m.vol(id).map(|v| v.size).unwrap_or(0);
        let cs = self.geo.chunk_size;
        if size < old {
            if !allow_shrink {
                return Err(PoolError::ShrinkRefused {
                    volume: key.into(),
                    from: old,
                    to: size,
                });
            }
            // Bytes past the new end of the last chunk must read zero if it grows again.
            if !size.is_multiple_of(cs)
                && m.lookup(id, size / cs)
                    .map_err(|e| self.perr(e))?
                    .is_mapped()
            {
                drop(m);
                let tail = (size.div_ceil(cs) * cs).min(old) - size;
                self.write_locked(id, &vec![0u8; tail as usize], size)
                    .map_err(|e| self.perr(e))?;
                m = self.lock()?;
            }
            let (lo, hi) = (size.div_ceil(cs), old.div_ceil(cs));
            self.mutate(&mut m, |m| m.unmap_range(id, lo, hi))
                .map_err(|e| self.perr(e))?;
        } else {
            self.mutate(&mut m, |m| m.grow_map(id, size.div_ceil(cs)))
                .map_err(|e| self.perr(e))?;
        }
        m.touch(id);
        if let Some(v) = m.vol_mut(id) {
            v.size = size;
        }
        m.cat_dirty = true;
        Ok(())
    }

    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError> {
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        if let Some(v) = m.vol_mut(id) {
            match value {
                Some(val) => v.attrs.insert(attr.to_string(), val.to_string()),
                None => v.attrs.remove(attr),
            };
        }
        m.cat_dirty = true;
        Ok(())
    }

    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError> {
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        *m.handles.entry(id).or_insert(0) += 1;
        drop(m);
        let pool = self.self_arc()?;
        Ok(Arc::new(ThinVolume {
            pool,
            id,
            name: key.to_string(),
            read_only,
        }))
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError> {
        Ok(self.lock()?.cat.meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError> {
        let mut m = self.lock()?;
        crate::pool::bookkeeping::set_meta(&mut m.cat.meta, key, value);
        m.cat_dirty = true;
        Ok(())
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError> {
        Ok(crate::pool::bookkeeping::meta_keys(
            &self.lock()?.cat.meta,
            prefix,
        ))
    }

    fn batch(&self) -> crate::pool::BatchGuard<'_> {
        crate::pool::BatchGuard(Some(self.batch.lock()))
    }

    fn commit(&self) -> Result<(), PoolError> {
        let _b = self.batch.lock();
        let _g = self.gate.write();
        let mut m = self.state.lock();
        self.commit_locked(&mut m)
    }

    fn verify(&self) -> Result<VerifyReport, PoolError> {
        let pin = self.pin();
        let mut report = verify::verify(&*self.meta_file, &pin.sb).0;
        // A damaged slot is found at open (which uses the other); report it here too.
        for slot in [PageNo(0), PageNo(1)] {
            let problem = match meta::read_page(&*self.meta_file, slot) {
                Ok(buf) => Superblock::unpack(slot, &buf[..])
                    .err()
                    .map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(p) = problem {
                report.warnings.push(format!(
                    "superblock slot {} is damaged ({p}); the pool runs on the other slot (generation {}) and the next commit rewrites it",
                    slot.0, pin.sb.generation
                ));
            }
        }
        Ok(report)
    }

    fn import_volume(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        self.import(key, image, size, opts)
    }

    fn fingerprint(&self, key: &str) -> Result<String, PoolError> {
        let (id, size, epoch) = {
            let m = self.lock()?;
            let id = self.id(&m, key)?;
            let v = m
                .vol(id)
                .ok_or_else(|| PoolError::NoSuchVolume(key.into()))?;
            if let Some(fp) = &v.fingerprint {
                return Ok(fp.clone());
            }
            (id, v.size, m.epoch(id))
        };
        let piece = 16u64 << 20;
        let mut buf = vec![0u8; piece.min(size) as usize];
        let mut h = blake3::Hasher::new();
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(piece) as usize;
            {
                let _g = self.gate.read();
                self.read_locked(id, &mut buf[..n], pos)
                    .map_err(|e| self.perr(e))?;
            }
            h.update_rayon(&buf[..n]);
            pos += n as u64;
        }
        let fp = h.finalize().to_hex().to_string();
        let mut m = self.lock()?;
        if m.epoch(id) == epoch {
            if let Some(v) = m.vol_mut(id) {
                v.fingerprint = Some(fp.clone());
                m.cat_dirty = true;
            }
        }
        Ok(fp)
    }
}

impl ThinPool {
    /// The `Arc` this pool lives in (volumes hold one).
    fn self_arc(&self) -> Result<Arc<ThinPool>, PoolError> {
        self.me
            .upgrade()
            .ok_or_else(|| PoolError::Invalid("pool is shutting down".into()))
    }
}
