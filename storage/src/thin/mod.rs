//! The `thin` pool driver: a userspace thin-provisioning copy-on-write pool (dm-thin and
//! qcow2 subclusters, in userspace). On-disk format: ARCHITECTURE.md, "The `thin` driver".
//!
//! ```text
//!  BlockDevice::write_at ──gate (shared)──► Meta mutex: plan ──► unlock ──► data pwrite(v)
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
mod open;
mod ops;
mod plan;
mod units;
mod verify;
mod volume;

pub use volume::ThinVolume;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use thiserror::Error;

pub use format::{Chunk, FormatError, PageKind, PageNo};
use format::{MapEntry, PageRef, Superblock, TreeRoot, PAGE_SIZE};
use meta::{CatalogueDoc, Geometry, Meta};
use units::{DataOffset, VolOffset};

use crate::io::{BlockFile, RealFile};
use crate::pool::{
    validate_volume_key, BlockDevice, BlockError, BlockErrorKind, Extent, ImportOptions,
    ImportStats, Pool, PoolError, PoolInfo, ReadTarget, VerifyReport, VolumeInfo, WriteSource,
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
    fn read_into(
        &self,
        dst: &dyn ReadTarget,
        dst_off: usize,
        len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        self.inner.read_into(dst, dst_off, len, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mark();
        self.inner.write_at(buf, offset)
    }
    fn write_from(
        &self,
        src: &dyn WriteSource,
        src_off: usize,
        len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        self.mark();
        self.inner.write_from(src, src_off, len, offset)
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
    /// pool.data opened once more, for an import to start and wait on the writeback of
    /// what it wrote (see `import::ThinPool::write_back`); `None` for a pool not in
    /// files.
    data_wb: Option<File>,
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

impl ThinPool {
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
        let t = std::time::Instant::now();
        let synced = if data_dirty {
            self.data.sync().map_err(|source| Error::Io {
                op: "syncing pool.data",
                source,
            })
        } else {
            Ok(())
        };
        let sync_us = t.elapsed().as_micros() as u64;
        let r = synced.and_then(|_| m.commit());
        tracing::debug!(
            data_dirty,
            sync_us,
            meta_us = t.elapsed().as_micros() as u64 - sync_us,
            "pool commit: synced"
        );
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
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j].0 == freed[j - 1].0 + 1 {
                j += 1;
            }
            let run = self.geo.chunk_run(freed[i], (j - i) as u64);
            // Through the raw file: a punch of a free chunk needs no data sync.
            let r = run.and_then(|(off, len)| {
                self.data_raw
                    .punch_hole(off.raw(), len)
                    .map_err(|source| Error::Io {
                        op: "punching freed chunks",
                        source,
                    })
            });
            if let Err(e) = r {
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
