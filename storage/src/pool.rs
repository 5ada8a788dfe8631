//! The two boundaries of the storage engine.
//!
//! * [`Pool`]: what a pool driver offers the volume model. Operations are *staged*: they
//!   take effect in memory at once (reads see them) and become durable, all together and
//!   atomically, at [`Pool::commit`]. A crash before the commit leaves the pool as it was
//!   at the previous commit. This is what lets a qube start (three snapshots, a few
//!   renames) be one metadata transaction instead of a series of lvcreate calls.
//! * [`BlockDevice`]: what a block transport (NBD, Xen blkif) needs from one open volume.
//!   `flush` is a durability barrier: every write acknowledged before it survives a crash.
//!
//! Volume keys inside a pool are driver-level names such as `work/private` or
//! `work/private@1764160000.123456`; the volume model decides their shape, the pool only
//! checks them with [`validate_volume_key`].

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One run of a volume's address space with the same allocation status
/// (the NBD `base:allocation` context: a hole reads as zeros and holds no data chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// No data chunk backs this run (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads return zeros (NBD_STATE_ZERO); always true for holes.
    pub zero: bool,
}

/// Why a block operation failed; transports map this to their own error codes
/// (NBD: ENOSPC, EPERM, EINVAL, EIO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockErrorKind {
    /// The pool has no free data chunk left. The write did not complete; metadata is
    /// consistent and writes succeed again once space is freed.
    NoSpace,
    /// The volume is read-only (a template root served to an AppVM's reader, say).
    ReadOnly,
    /// Offset or length outside the volume.
    OutOfRange,
    /// The volume was removed or the pool closed while the handle was open.
    Gone,
    /// The underlying storage failed (or metadata failed its checksum).
    Io,
}

#[derive(Debug, Error)]
#[error("{op} on volume {volume} at offset {offset} (+{length}): {kind:?}: {detail}")]
pub struct BlockError {
    pub kind: BlockErrorKind,
    pub op: &'static str,
    pub volume: String,
    pub offset: u64,
    pub length: u64,
    pub detail: String,
}

impl BlockError {
    pub fn new(
        kind: BlockErrorKind,
        op: &'static str,
        volume: &str,
        offset: u64,
        length: u64,
        detail: impl Into<String>,
    ) -> Self {
        BlockError {
            kind,
            op,
            volume: volume.to_string(),
            offset,
            length,
            detail: detail.into(),
        }
    }

    /// A write through a read-only handle is `ReadOnly`: the first check every driver
    /// makes at the `BlockDevice` boundary.
    pub fn check_writable(
        volume: &str,
        read_only: bool,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<(), BlockError> {
        if write && read_only {
            return Err(BlockError::new(
                BlockErrorKind::ReadOnly,
                op,
                volume,
                offset,
                length,
                "read-only handle",
            ));
        }
        Ok(())
    }

    /// A request that passes the end of a volume of `size` bytes (or `u64::MAX`) is
    /// `OutOfRange`, never truncated or wrapped.
    pub fn check_range(
        volume: &str,
        size: u64,
        op: &'static str,
        offset: u64,
        length: u64,
    ) -> Result<(), BlockError> {
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(BlockError::new(
                BlockErrorKind::OutOfRange,
                op,
                volume,
                offset,
                length,
                format!("volume size is {size}"),
            ));
        }
        Ok(())
    }

    pub fn errno(&self) -> i32 {
        match self.kind {
            BlockErrorKind::NoSpace => libc::ENOSPC,
            BlockErrorKind::ReadOnly => libc::EPERM,
            BlockErrorKind::OutOfRange => libc::EINVAL,
            BlockErrorKind::Gone | BlockErrorKind::Io => libc::EIO,
        }
    }
}

/// The bytes of one write, in memory another party may change while the write runs (a
/// Xen guest's granted pages), so that a driver can hand them to the kernel without a
/// bounce copy. No `&[u8]` into that memory is ever made: [`Self::copy_to`] reads it
/// (the implementation decides how, e.g. with atomics), and [`Self::iovecs`] gives raw
/// pieces only the kernel reads (`pwritev`).
///
/// Nothing in a write path may rely on these bytes staying the same between two looks
/// (no checksum of them, no "validate then write"): a driver reads each byte at most once
/// per destination, and a source that changes meanwhile gets some mix of old and new
/// bytes, which only a guest writing its own volume can cause.
///
/// # Safety
/// Every piece [`Self::iovecs`] gives must be memory readable for as long as `self` is
/// borrowed, and the pieces for `(off, len)` must cover exactly `len` bytes.
pub unsafe trait WriteSource: Sync {
    /// The write's length in bytes.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies the source's bytes `[off, off + dst.len())` into `dst`.
    fn copy_to(&self, off: usize, dst: &mut [u8]);
    /// Appends to `out` the pieces of memory holding bytes `[off, off + len)`, in order.
    /// Panics if the range passes [`Self::len`] (a caller's bug).
    fn iovecs(&self, off: usize, len: usize, out: &mut Vec<libc::iovec>);
}

// SAFETY: the one piece is inside the slice (checked by the slicing), which outlives the
// borrow of `self`.
unsafe impl WriteSource for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn copy_to(&self, off: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&self[off..off + dst.len()]);
    }
    fn iovecs(&self, off: usize, len: usize, out: &mut Vec<libc::iovec>) {
        let piece = &self[off..off + len];
        if !piece.is_empty() {
            out.push(libc::iovec {
                iov_base: piece.as_ptr() as *mut libc::c_void,
                iov_len: piece.len(),
            });
        }
    }
}

/// Where a read's bytes go, in memory another party may read or write meanwhile (a Xen
/// guest's granted pages), so that a driver can have the kernel fill it without a bounce
/// copy: [`Self::fill_from`] for bytes the driver makes itself (zeros of a hole), raw
/// [`Self::iovecs`] for the kernel (`preadv`). As for [`WriteSource`], no `&mut [u8]`
/// into it is ever made.
///
/// # Safety
/// Every piece [`Self::iovecs`] gives must be memory writable for as long as `self` is
/// borrowed, and the pieces for `(off, len)` must cover exactly `len` bytes.
pub unsafe trait ReadTarget: Sync {
    /// The read's length in bytes.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `src` into the target's bytes `[off, off + src.len())`.
    fn fill_from(&self, off: usize, src: &[u8]);
    /// Appends to `out` the pieces of memory for bytes `[off, off + len)`, in order.
    /// Panics if the range passes [`Self::len`] (a caller's bug).
    fn iovecs(&self, off: usize, len: usize, out: &mut Vec<libc::iovec>);
}

/// One open volume, as a block transport sees it. Implementations are thread-safe:
/// several connections and several in-flight requests call these concurrently.
pub trait BlockDevice: Send + Sync {
    /// Pool-level key of the volume this handle serves (for error messages and logs).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`; unmapped ranges read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;
    /// Reads into `dst` what [`Self::read_at`] would read at `offset`. The default reads
    /// into a buffer first; a driver that reads straight into the target says so with
    /// [`Self::reads_in_place`]. On error `dst` holds anything.
    fn read_into(&self, dst: &dyn ReadTarget, offset: u64) -> Result<(), BlockError> {
        let mut buf = vec![0u8; dst.len()];
        self.read_at(&mut buf, offset)?;
        dst.fill_from(0, &buf);
        Ok(())
    }
    /// [`Self::read_into`] fills the target with no copy of its own.
    fn reads_in_place(&self) -> bool {
        false
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError>;
    /// Writes `src` at `offset`, as [`Self::write_at`] would write its bytes. The default
    /// copies them into a buffer first; a driver that writes straight from the source
    /// says so with [`Self::writes_in_place`].
    fn write_from(&self, src: &dyn WriteSource, offset: u64) -> Result<(), BlockError> {
        let mut buf = vec![0u8; src.len()];
        src.copy_to(0, &mut buf);
        self.write_at(&buf, offset)
    }
    /// [`Self::write_from`] writes from the source's memory, with no copy of its own (a
    /// transport with its own bounce buffer uses `write_at` otherwise).
    fn writes_in_place(&self) -> bool {
        false
    }
    /// Makes every write acknowledged so far durable (commits the mapping).
    fn flush(&self) -> Result<(), BlockError>;
    /// Unmaps whole chunks inside the range (frees them); partial chunks at the edges are
    /// left as they are (TRIM is advisory).
    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError>;
    /// The range reads as zeros afterwards. With `may_unmap`, whole chunks are unmapped;
    /// without (NBD_CMD_FLAG_NO_HOLE), space stays allocated.
    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError>;
    /// Allocation status of `[offset, offset+length)`, as extents in order, covering at
    /// least the first byte (they may stop early, as NBD allows).
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError>;
}

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("volume {0} does not exist in the pool")]
    NoSuchVolume(String),
    #[error("volume {0} already exists in the pool")]
    VolumeExists(String),
    #[error("volume key {key:?} is not valid: {reason}")]
    BadVolumeKey { key: String, reason: String },
    #[error("the pool is full: {needed} more bytes of data space needed, {free} free; remove qubes, revisions or templates, or grow the pool")]
    NoSpace { needed: u64, free: u64 },
    #[error("the filesystem holding the pool is full ({op}); free space on it (build caches, old logs, other files) and retry; nothing already written was lost")]
    HostFull { op: String },
    #[error("volume {volume} is open ({users} users); stop the qube that uses it first")]
    Busy { volume: String, users: usize },
    /// A shared pool (`rbd`): another machine has the volume open for writing.
    #[error("volume {volume} is in use on machine {holder} (RBD exclusive lock held by {owners}: {detail}); stop the qube there first; if that machine is dead, break the lock with `rbd lock rm` or start the qube from that machine's root")]
    HeldElsewhere {
        volume: String,
        holder: String,
        owners: String,
        detail: String,
    },
    #[error("shrinking volume {volume} from {from} to {to} bytes loses data; pass --allow-shrink to do it anyway")]
    ShrinkRefused { volume: String, from: u64, to: u64 },
    #[error("{pool}: {space} space is {used} used, at or above the {threshold_pct}% threshold below which new volumes (a qube start, a create) are allowed; {fix}")]
    SpaceLow {
        pool: String,
        space: &'static str,
        used: String,
        threshold_pct: u32,
        fix: String,
    },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no pool at {path}: {reason}; create one with `qubes-ctl pool init`")]
    NotAPool { path: String, reason: String },
    /// The pool was written in an older on-disk format this build does not read.
    #[error("the pool at {path} {reason}")]
    OldFormat { path: String, reason: String },
    #[error("the pool at {path} is in use by another process{}; stop it or talk to it through `qubes-ctl daemon`", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked { path: String, pid: Option<u32> },
    #[error("pool metadata is corrupt: {0}{hint}", hint = verify_hint(.0))]
    Corrupt(String),
    /// Device-mapper devices of an LVM thin pool left suspended by an LVM command killed
    /// between its suspend and its resume: every I/O to them would wait forever.
    #[error("device-mapper devices of thin pool {pool} are suspended: {}; an LVM command was killed between suspending and resuming them, and nothing can use them until they are resumed: run `dmsetup resume` on each, the pool's `-tpool` device first, then retry", devices.join(", "))]
    Suspended { pool: String, devices: Vec<String> },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// `pool verify` needs an open pool: a pool that cannot be opened gets its own way out.
fn verify_hint(msg: &str) -> &'static str {
    if msg.contains("cannot be opened") {
        ""
    } else {
        "; run `qubes-ctl pool verify` for a full report"
    }
}

impl PoolError {
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        PoolError::Io {
            op: op.into(),
            source,
        }
    }
}

/// Pool-wide figures, as `pool info` prints them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolInfo {
    pub driver: String,
    pub path: String,
    pub chunk_size: u64,
    /// Data capacity in bytes.
    pub capacity: u64,
    /// Data bytes in use (allocated chunks x chunk size).
    pub data_used: u64,
    /// Metadata bytes in use.
    pub metadata_used: u64,
    /// Size of a fixed metadata area (`lvm_thin`: the thin pool's metadata LV); `None`
    /// when metadata grows in the pool's own space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_capacity: Option<u64>,
    pub volumes: u64,
    /// Commit counter (superblock generation for `thin`).
    pub generation: u64,
    /// Bytes free on the host filesystem holding the pool (for an unprivileged writer),
    /// when the driver sits on one: a sparse pool can run out of host space before its
    /// own capacity.
    #[serde(default)]
    pub host_free: Option<u64>,
    /// What the driver found wrong but worked around at open (a damaged superblock slot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One volume, as listings show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub key: String,
    pub size: u64,
    /// Bytes backed by data chunks (shared chunks count in every volume that maps them).
    pub mapped: u64,
    /// Free-form attributes the volume model stores with the volume (committed atomically
    /// with everything else).
    pub attrs: BTreeMap<String, String>,
}

/// What `verify` found. `errors` empty means the pool is consistent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub volumes: u64,
    pub metadata_pages: u64,
    pub data_chunks: u64,
    /// Allocated but unreferenced chunks/pages ("leaked ...").
    pub leaks: Vec<String>,
    /// Checksums, refcount mismatches, dangling references, bad structure.
    pub errors: Vec<String>,
    /// Damage the pool works around (a superblock slot, left torn by a power cut or
    /// damaged since: the pool runs on the other one and its next commit rewrites it).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.leaks.is_empty() && self.errors.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Share chunks with identical content (blake3) inside the image and with the
    /// volume this import replaces, if any (`dedup_against`).
    pub dedup: bool,
    pub dedup_against: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImportStats {
    pub bytes: u64,
    pub zero_chunks: u64,
    pub dedup_chunks: u64,
    pub written_chunks: u64,
    /// blake3 over the volume's bytes.
    pub fingerprint: String,
}

/// See [`Pool::batch`]; dropping it lets other threads' commits through again.
pub struct BatchGuard<'a>(pub Option<parking_lot::ReentrantMutexGuard<'a, ()>>);

/// A pool driver. Implementations: `thin` (default), `reflink`, `lvm_thin`, `rbd`, `mem` (simulation).
/// All methods are callable from several threads.
pub trait Pool: Send + Sync {
    fn driver(&self) -> &'static str;
    fn info(&self) -> Result<PoolInfo, PoolError>;
    /// [`Pool::info`] without waiting: figures at hand (possibly a little old), or
    /// `None` when getting them would wait on I/O or on another operation. For status
    /// replies that must answer at once (the daemon's ping).
    fn info_cached(&self) -> Option<PoolInfo> {
        self.info().ok()
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError>;
    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError>;
    fn exists(&self, key: &str) -> Result<bool, PoolError> {
        match self.volume(key) {
            Ok(_) => Ok(true),
            Err(PoolError::NoSuchVolume(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A new, empty (all zeros, nothing allocated) volume.
    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError>;
    /// `target` becomes a writable copy-on-write snapshot of `source` as it is now
    /// (including staged, uncommitted changes). O(1) for `thin`. Attributes are not copied.
    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError>;
    /// Frees the volume's chunks that nothing else shares. Refused with `Busy` while open.
    fn remove_volume(&self, key: &str) -> Result<(), PoolError>;
    /// Renames; refuses if `to` exists. Open handles follow the volume.
    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError>;
    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError>;
    /// Sets (`Some`) or clears (`None`) one attribute.
    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError>;

    /// An I/O handle; `read_only` handles refuse writes with `BlockErrorKind::ReadOnly`.
    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError>;

    /// The volume as a kernel block device of this host (activated), for pools whose
    /// volumes are ones (`lvm_thin`'s LVs), so a hypervisor can hand it to its kernel
    /// backend (Xen's `phy`). `None`: the volume is only reachable through
    /// [`Pool::open_volume`]. It may be larger than the volume (LVM rounds sizes up to
    /// its extents).
    fn kernel_block_device(&self, key: &str) -> Result<Option<std::path::PathBuf>, PoolError> {
        self.volume(key)?;
        Ok(None)
    }

    /// Pool-level key/value store, committed atomically with the volumes (the controller
    /// keeps its qube catalogue here).
    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError>;
    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError>;
    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError>;

    /// Makes every staged change and every acknowledged write durable, atomically.
    fn commit(&self) -> Result<(), PoolError>;

    /// Holds commits from other threads (a guest's FLUSH, which commits the pool) off
    /// while the caller stages a multi-step change, so none of it becomes durable before
    /// the caller's own commit. Re-entrant: the holder's own `commit` goes through. Hold
    /// it only for the staging and the commit, never while waiting on a guest.
    fn batch(&self) -> BatchGuard<'_> {
        BatchGuard(None)
    }

    /// Thorough check (like thin_check): walks every structure.
    fn verify(&self) -> Result<VerifyReport, PoolError>;

    /// Creates `key` from a raw image: zero chunks are skipped, identical chunks shared
    /// when `opts.dedup`. The volume is created staged; the caller commits. Data I/O of
    /// other volumes and commits (guest FLUSHes) go on during the import, so a commit
    /// may make a partly imported `key` durable: import under a staging key.
    fn import_volume(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError>;

    /// blake3 over the volume's bytes (zeros for holes), hex.
    fn fingerprint(&self, key: &str) -> Result<String, PoolError>;
}

/// In-memory bookkeeping every driver keeps the same way: the pool key/value store (a
/// sorted map, so prefix listing is a range scan) and live handle counts per volume id.
pub(crate) mod bookkeeping {
    use std::collections::{BTreeMap, HashMap};

    pub fn set_meta(meta: &mut BTreeMap<String, String>, key: &str, value: Option<&str>) {
        match value {
            Some(v) => meta.insert(key.to_string(), v.to_string()),
            None => meta.remove(key),
        };
    }

    pub fn meta_keys(meta: &BTreeMap<String, String>, prefix: &str) -> Vec<String> {
        meta.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// One handle of volume `id` went away.
    pub fn release_handle(open: &mut HashMap<u64, usize>, id: u64) {
        if let Some(n) = open.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&id);
            }
        }
    }
}

/// Checks a pool-level volume key: 1..=200 bytes of `[A-Za-z0-9._@:+/-]`, no empty path
/// segment, no `.`/`..` segment, no leading `/`.
pub fn validate_volume_key(key: &str) -> Result<(), PoolError> {
    let bad = |reason: &str| PoolError::BadVolumeKey {
        key: key.escape_debug().to_string(),
        reason: reason.into(),
    };
    if key.is_empty() || key.len() > 200 {
        return Err(bad("length must be 1 to 200 bytes"));
    }
    if let Some(c) = key.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | ':' | '+' | '/' | '-'))
    }) {
        return Err(bad(&format!("character {c:?} is not allowed")));
    }
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(bad("empty, `.` or `..` path segment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_keys() {
        validate_volume_key("work/private").unwrap();
        validate_volume_key("work/private@1764160000.123456").unwrap();
        for bad in ["", "/abs", "a//b", "a/../b", "a/./b", "a b", "a\0b", "x/"] {
            assert!(validate_volume_key(bad).is_err(), "{bad:?} accepted");
        }
    }
}
