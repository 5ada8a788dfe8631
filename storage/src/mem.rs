//! `mem`: the simulation driver (stratisd's `sim_engine`). A whole pool in memory, with
//! the same staged/commit contract as the on-disk drivers, so the volume model and the
//! controller can be tested in milliseconds and without root.
//!
//! Contract (the [`Pool`] trait docs, nothing more):
//! * Every operation is staged at once; [`Pool::commit`] copies the staged catalogue to the
//!   committed one. [`MemPool::crash`] returns a new pool holding only what was committed
//!   (plus data made durable by [`BlockDevice::flush`] of a volume that existed at the last
//!   commit), as a power cut would.
//! * Volumes are shared maps of chunk index -> shared chunk. A snapshot and a commit share
//!   the map (O(1)); the first write after either copies the map, and a write into a chunk
//!   that anything else holds (another volume, or the committed copy) copies the chunk
//!   first, so a committed head never changes.
//! * Optional capacity: a chunk allocation beyond it fails with ENOSPC and nothing else
//!   changes. Chunks still held by the committed copy count as used, as on disk.
//! * `remove_volume` of a volume with open handles is refused with `Busy`; handles follow
//!   renames and report `Gone` once their volume is removed.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::pool::{
    validate_volume_key, BlockDevice, BlockError, BlockErrorKind, Extent, ImportOptions,
    ImportStats, Pool, PoolError, PoolInfo, VerifyReport, VolumeInfo,
};

/// Default chunk size, as the `thin` driver.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;

/// One data chunk. Dropping the last reference returns its space to the pool.
struct Chunk {
    data: Box<[u8]>,
    used: Arc<AtomicU64>,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.used
            .fetch_sub(self.data.len() as u64, Ordering::Relaxed);
    }
}

#[derive(Clone, Default)]
struct Vol {
    size: u64,
    chunks: Arc<BTreeMap<u64, Arc<Chunk>>>,
    attrs: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Catalog {
    keys: BTreeMap<String, u64>,
    vols: HashMap<u64, Vol>,
    meta: BTreeMap<String, String>,
}

impl Catalog {
    fn id(&self, key: &str) -> Result<u64, PoolError> {
        self.keys
            .get(key)
            .copied()
            .ok_or_else(|| PoolError::NoSuchVolume(key.to_string()))
    }

    fn vol(&self, key: &str) -> Result<&Vol, PoolError> {
        let id = self.id(key)?;
        Ok(&self.vols[&id])
    }
}

#[derive(Default)]
struct State {
    staged: Catalog,
    committed: Catalog,
    next_id: u64,
    /// Open handles per volume id.
    open: HashMap<u64, usize>,
    generation: u64,
}

struct Shared {
    state: Mutex<State>,
    chunk_size: u64,
    capacity: Option<u64>,
    used: Arc<AtomicU64>,
    /// See `Pool::batch`.
    batch: parking_lot::ReentrantMutex<()>,
}

impl Shared {
    /// A zeroed chunk, or ENOSPC. The reservation is taken before the memory so two
    /// writers cannot both squeeze into the last chunk.
    fn alloc(&self) -> Result<Chunk, u64> {
        let cs = self.chunk_size;
        let prev = self.used.fetch_add(cs, Ordering::Relaxed);
        if let Some(cap) = self.capacity {
            if prev + cs > cap {
                self.used.fetch_sub(cs, Ordering::Relaxed);
                return Err(cap.saturating_sub(prev));
            }
        }
        Ok(Chunk {
            data: vec![0u8; cs as usize].into_boxed_slice(),
            used: self.used.clone(),
        })
    }

    fn nospace(&self, free: u64) -> PoolError {
        PoolError::NoSpace {
            needed: self.chunk_size,
            free,
        }
    }
}

/// The in-memory pool. Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct MemPool {
    shared: Arc<Shared>,
}

impl Default for MemPool {
    fn default() -> Self {
        Self::new()
    }
}

impl MemPool {
    /// Unlimited capacity, 64 KiB chunks.
    pub fn new() -> Self {
        Self::with_options(DEFAULT_CHUNK_SIZE, None)
    }

    /// `chunk_size` must be a power of two of at least 512 bytes; `capacity` in bytes.
    pub fn with_options(chunk_size: u64, capacity: Option<u64>) -> Self {
        assert!(
            chunk_size.is_power_of_two() && chunk_size >= 512,
            "chunk size {chunk_size} is not a power of two >= 512"
        );
        MemPool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    next_id: 1,
                    ..State::default()
                }),
                chunk_size,
                capacity,
                used: Arc::new(AtomicU64::new(0)),
                batch: parking_lot::ReentrantMutex::new(()),
            }),
        }
    }

    /// A power cut: a new pool holding the last committed state (and flushed data of
    /// volumes that existed at that commit). This pool is left as it is; drop it.
    pub fn crash(&self) -> MemPool {
        let st = self.shared.state.lock();
        let new = MemPool::with_options(self.shared.chunk_size, self.shared.capacity);
        let used = new.shared.used.clone();
        // Copy chunks once each so the new pool's space accounting starts from its own
        // counter and sharing between volumes is preserved.
        let mut copies: HashMap<*const Chunk, Arc<Chunk>> = HashMap::new();
        let mut cat = st.committed.clone();
        for vol in cat.vols.values_mut() {
            for chunk in Arc::make_mut(&mut vol.chunks).values_mut() {
                let copy = copies.entry(Arc::as_ptr(chunk)).or_insert_with(|| {
                    used.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                    Arc::new(Chunk {
                        data: chunk.data.clone(),
                        used: used.clone(),
                    })
                });
                *chunk = copy.clone();
            }
        }
        {
            let mut ns = new.shared.state.lock();
            ns.staged = cat.clone();
            ns.committed = cat;
            ns.next_id = st.next_id;
            ns.generation = st.generation;
        }
        new
    }

    fn chunks_for(&self, size: u64) -> u64 {
        size.div_ceil(self.shared.chunk_size)
    }
}

fn info_of(key: &str, vol: &Vol, cs: u64) -> VolumeInfo {
    VolumeInfo {
        key: key.to_string(),
        size: vol.size,
        mapped: vol.chunks.len() as u64 * cs,
        attrs: vol.attrs.clone(),
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Pool for MemPool {
    fn driver(&self) -> &'static str {
        "mem"
    }

    fn info(&self) -> Result<PoolInfo, PoolError> {
        let st = self.shared.state.lock();
        Ok(PoolInfo {
            driver: "mem".into(),
            path: "(memory)".into(),
            chunk_size: self.shared.chunk_size,
            capacity: self.shared.capacity.unwrap_or(u64::MAX),
            data_used: self.shared.used.load(Ordering::Relaxed),
            metadata_used: (st.staged.keys.len() + st.staged.meta.len()) as u64 * 64,
            metadata_capacity: None,
            volumes: st.staged.keys.len() as u64,
            generation: st.generation,
            host_free: None,
            warnings: Vec::new(),
        })
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        let st = self.shared.state.lock();
        let cs = self.shared.chunk_size;
        Ok(st
            .staged
            .keys
            .iter()
            .map(|(k, id)| info_of(k, &st.staged.vols[id], cs))
            .collect())
    }

    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError> {
        let st = self.shared.state.lock();
        Ok(info_of(key, st.staged.vol(key)?, self.shared.chunk_size))
    }

    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError> {
        validate_volume_key(key)?;
        let mut st = self.shared.state.lock();
        if st.staged.keys.contains_key(key) {
            return Err(PoolError::VolumeExists(key.into()));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.staged.keys.insert(key.into(), id);
        st.staged.vols.insert(
            id,
            Vol {
                size,
                ..Vol::default()
            },
        );
        Ok(())
    }

    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError> {
        validate_volume_key(target)?;
        let mut st = self.shared.state.lock();
        let src = st.staged.vol(source)?;
        let vol = Vol {
            size: src.size,
            chunks: src.chunks.clone(),
            attrs: BTreeMap::new(),
        };
        if st.staged.keys.contains_key(target) {
            return Err(PoolError::VolumeExists(target.into()));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.staged.keys.insert(target.into(), id);
        st.staged.vols.insert(id, vol);
        Ok(())
    }

    fn remove_volume(&self, key: &str) -> Result<(), PoolError> {
        let mut st = self.shared.state.lock();
        let id = st.staged.id(key)?;
        if let Some(&users) = st.open.get(&id).filter(|&&u| u > 0) {
            return Err(PoolError::Busy {
                volume: key.into(),
                users,
            });
        }
        st.staged.keys.remove(key);
        st.staged.vols.remove(&id);
        Ok(())
    }

    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError> {
        validate_volume_key(to)?;
        let mut st = self.shared.state.lock();
        let id = st.staged.id(from)?;
        if st.staged.keys.contains_key(to) {
            return Err(PoolError::VolumeExists(to.into()));
        }
        st.staged.keys.remove(from);
        st.staged.keys.insert(to.into(), id);
        Ok(())
    }

    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError> {
        let cs = self.shared.chunk_size;
        let keep = self.chunks_for(size);
        let mut st = self.shared.state.lock();
        let id = st.staged.id(key)?;
        let vol = st
            .staged
            .vols
            .get_mut(&id)
            .expect("catalogue keys and volumes agree");
        if size < vol.size {
            if !allow_shrink {
                return Err(PoolError::ShrinkRefused {
                    volume: key.into(),
                    from: vol.size,
                    to: size,
                });
            }
            Arc::make_mut(&mut vol.chunks).split_off(&keep);
            // Bytes past the new end must read as zeros if the volume grows again.
            let tail = (size % cs) as usize;
            if tail != 0 {
                if let Some(last) = Arc::make_mut(&mut vol.chunks).get_mut(&(keep - 1)) {
                    if let Some(c) = Arc::get_mut(last) {
                        c.data[tail..].fill(0);
                    } else {
                        let mut c = self.shared.alloc().map_err(|f| self.shared.nospace(f))?;
                        c.data[..tail].copy_from_slice(&last.data[..tail]);
                        *last = Arc::new(c);
                    }
                }
            }
        }
        vol.size = size;
        Ok(())
    }

    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError> {
        let mut st = self.shared.state.lock();
        let id = st.staged.id(key)?;
        let vol = st
            .staged
            .vols
            .get_mut(&id)
            .expect("catalogue keys and volumes agree");
        match value {
            Some(v) => vol.attrs.insert(attr.into(), v.into()),
            None => vol.attrs.remove(attr),
        };
        Ok(())
    }

    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError> {
        let mut st = self.shared.state.lock();
        let id = st.staged.id(key)?;
        *st.open.entry(id).or_insert(0) += 1;
        Ok(Arc::new(MemVolume {
            shared: self.shared.clone(),
            id,
            name: key.into(),
            read_only,
        }))
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError> {
        Ok(self.shared.state.lock().staged.meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError> {
        crate::pool::bookkeeping::set_meta(&mut self.shared.state.lock().staged.meta, key, value);
        Ok(())
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError> {
        Ok(crate::pool::bookkeeping::meta_keys(
            &self.shared.state.lock().staged.meta,
            prefix,
        ))
    }

    fn batch(&self) -> crate::pool::BatchGuard<'_> {
        crate::pool::BatchGuard(Some(self.shared.batch.lock()))
    }

    fn commit(&self) -> Result<(), PoolError> {
        let _batch = self.shared.batch.lock();
        let mut st = self.shared.state.lock();
        st.committed = st.staged.clone();
        st.generation += 1;
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport, PoolError> {
        let st = self.shared.state.lock();
        let cs = self.shared.chunk_size;
        let mut report = VerifyReport {
            volumes: st.staged.keys.len() as u64,
            ..VerifyReport::default()
        };
        let mut distinct = std::collections::HashSet::new();
        for (key, id) in &st.staged.keys {
            let Some(vol) = st.staged.vols.get(id) else {
                report
                    .errors
                    .push(format!("volume {key}: id {id} has no block map"));
                continue;
            };
            for (idx, c) in vol.chunks.iter() {
                distinct.insert(Arc::as_ptr(c));
                if *idx >= vol.size.div_ceil(cs) {
                    report.errors.push(format!(
                        "volume {key}: chunk {idx} lies past the end ({} bytes)",
                        vol.size
                    ));
                }
                if c.data.len() as u64 != cs {
                    report.errors.push(format!(
                        "volume {key}: chunk {idx} has {} bytes, not {cs}",
                        c.data.len()
                    ));
                }
            }
        }
        if st.staged.vols.len() != st.staged.keys.len() {
            report.leaks.push(format!(
                "{} block maps have no key",
                st.staged.vols.len() - st.staged.keys.len()
            ));
        }
        report.data_chunks = distinct.len() as u64;
        Ok(report)
    }

    fn import_volume(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        validate_volume_key(key)?;
        let cs = self.shared.chunk_size;
        let mut dedup: HashMap<[u8; 32], Arc<Chunk>> = HashMap::new();
        {
            let st = self.shared.state.lock();
            if st.staged.keys.contains_key(key) {
                return Err(PoolError::VolumeExists(key.into()));
            }
            if opts.dedup {
                if let Some(against) = &opts.dedup_against {
                    if let Ok(vol) = st.staged.vol(against) {
                        for c in vol.chunks.values() {
                            dedup.insert(*blake3::hash(&c.data).as_bytes(), c.clone());
                        }
                    }
                }
            }
        }
        let mut stats = ImportStats::default();
        let mut hasher = blake3::Hasher::new();
        let mut chunks = BTreeMap::new();
        let mut buf = vec![0u8; cs as usize];
        let mut eof = false;
        for idx in 0..self.chunks_for(size) {
            let len = (size - idx * cs).min(cs) as usize;
            buf.fill(0);
            if !eof {
                let n = read_full(image, &mut buf[..len])
                    .map_err(|e| PoolError::io(format!("reading the image for {key}"), e))?;
                stats.bytes += n as u64;
                eof = n < len;
            }
            hasher.update(&buf[..len]);
            if buf.iter().all(|&b| b == 0) {
                stats.zero_chunks += 1;
                continue;
            }
            if opts.dedup {
                let h = *blake3::hash(&buf).as_bytes();
                if let Some(c) = dedup.get(&h) {
                    if c.data[..] == buf[..] {
                        chunks.insert(idx, c.clone());
                        stats.dedup_chunks += 1;
                        continue;
                    }
                }
                let mut c = self.shared.alloc().map_err(|f| self.shared.nospace(f))?;
                c.data.copy_from_slice(&buf);
                let c = Arc::new(c);
                dedup.insert(h, c.clone());
                chunks.insert(idx, c);
            } else {
                let mut c = self.shared.alloc().map_err(|f| self.shared.nospace(f))?;
                c.data.copy_from_slice(&buf);
                chunks.insert(idx, Arc::new(c));
            }
            stats.written_chunks += 1;
        }
        stats.fingerprint = hasher.finalize().to_hex().to_string();
        let mut st = self.shared.state.lock();
        if st.staged.keys.contains_key(key) {
            return Err(PoolError::VolumeExists(key.into()));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.staged.keys.insert(key.into(), id);
        st.staged.vols.insert(
            id,
            Vol {
                size,
                chunks: Arc::new(chunks),
                attrs: BTreeMap::new(),
            },
        );
        Ok(stats)
    }

    fn fingerprint(&self, key: &str) -> Result<String, PoolError> {
        let cs = self.shared.chunk_size;
        let (size, chunks) = {
            let st = self.shared.state.lock();
            let v = st.staged.vol(key)?;
            (v.size, v.chunks.clone())
        };
        let zeros = vec![0u8; cs as usize];
        let mut hasher = blake3::Hasher::new();
        for idx in 0..self.chunks_for(size) {
            let len = (size - idx * cs).min(cs) as usize;
            match chunks.get(&idx) {
                Some(c) => hasher.update(&c.data[..len]),
                None => hasher.update(&zeros[..len]),
            };
        }
        Ok(hasher.finalize().to_hex().to_string())
    }
}

/// An open handle: a volume id, so it follows renames.
struct MemVolume {
    shared: Arc<Shared>,
    id: u64,
    name: String,
    read_only: bool,
}

impl Drop for MemVolume {
    fn drop(&mut self) {
        crate::pool::bookkeeping::release_handle(&mut self.shared.state.lock().open, self.id);
    }
}

impl MemVolume {
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

    /// Runs `f` on the staged block map after the common checks.
    fn with_vol<T>(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
        f: impl FnOnce(&mut Vol) -> Result<T, BlockError>,
    ) -> Result<T, BlockError> {
        if write && self.read_only {
            return Err(self.err(
                BlockErrorKind::ReadOnly,
                op,
                offset,
                length,
                "the volume is exported read-only",
            ));
        }
        let mut st = self.shared.state.lock();
        let Some(vol) = st.staged.vols.get_mut(&self.id) else {
            return Err(self.err(
                BlockErrorKind::Gone,
                op,
                offset,
                length,
                "the volume was removed",
            ));
        };
        BlockError::check_range(&self.name, vol.size, op, offset, length)?;
        f(vol)
    }

    /// The chunk at `idx`, exclusive to this volume's staged map (copied or allocated).
    fn chunk_mut<'a>(
        &self,
        vol: &'a mut Vol,
        idx: u64,
        offset: u64,
        length: u64,
    ) -> Result<&'a mut Chunk, BlockError> {
        let nospace = |free: u64| {
            self.err(
                BlockErrorKind::NoSpace,
                "write",
                offset,
                length,
                format!("the pool is full ({free} bytes free)"),
            )
        };
        let slot = match Arc::make_mut(&mut vol.chunks).entry(idx) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Arc::new(self.shared.alloc().map_err(nospace)?))
            }
        };
        if Arc::get_mut(slot).is_none() {
            let mut c = self.shared.alloc().map_err(nospace)?;
            c.data.copy_from_slice(&slot.data);
            *slot = Arc::new(c);
        }
        Ok(Arc::get_mut(slot).expect("just made exclusive"))
    }
}

/// Splits `[offset, offset+len)` into (chunk index, offset in chunk, length) pieces.
fn pieces(offset: u64, len: u64, cs: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / cs;
        let within = pos % cs;
        let n = (cs - within).min(end - pos);
        pos += n;
        Some((idx, within as usize, n as usize))
    })
}

impl BlockDevice for MemVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.shared
            .state
            .lock()
            .staged
            .vols
            .get(&self.id)
            .map_or(0, |v| v.size)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let cs = self.shared.chunk_size;
        self.with_vol("read", offset, buf.len() as u64, false, |vol| {
            let mut done = 0;
            for (idx, within, n) in pieces(offset, buf.len() as u64, cs) {
                let out = &mut buf[done..done + n];
                match vol.chunks.get(&idx) {
                    Some(c) => out.copy_from_slice(&c.data[within..within + n]),
                    None => out.fill(0),
                }
                done += n;
            }
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let cs = self.shared.chunk_size;
        self.with_vol("write", offset, buf.len() as u64, true, |vol| {
            let mut done = 0;
            for (idx, within, n) in pieces(offset, buf.len() as u64, cs) {
                let c = self.chunk_mut(vol, idx, offset, buf.len() as u64)?;
                c.data[within..within + n].copy_from_slice(&buf[done..done + n]);
                done += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> Result<(), BlockError> {
        let mut st = self.shared.state.lock();
        let Some(staged) = st.staged.vols.get(&self.id) else {
            return Err(self.err(
                BlockErrorKind::Gone,
                "flush",
                0,
                0,
                "the volume was removed",
            ));
        };
        let chunks = staged.chunks.clone();
        // Data of a volume the last commit knows becomes durable; a volume created since
        // becomes durable with the commit that creates it.
        if let Some(c) = st.committed.vols.get_mut(&self.id) {
            let keep = c.size.div_ceil(self.shared.chunk_size);
            c.chunks = chunks;
            if c.chunks
                .keys()
                .next_back()
                .is_some_and(|&last| last >= keep)
            {
                Arc::make_mut(&mut c.chunks).split_off(&keep);
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        let cs = self.shared.chunk_size;
        self.with_vol("discard", offset, length, true, |vol| {
            for (idx, within, n) in pieces(offset, length, cs) {
                if within == 0 && n as u64 == cs && vol.chunks.contains_key(&idx) {
                    Arc::make_mut(&mut vol.chunks).remove(&idx);
                }
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        let cs = self.shared.chunk_size;
        self.with_vol("write_zeroes", offset, length, true, |vol| {
            for (idx, within, n) in pieces(offset, length, cs) {
                let whole = within == 0 && n as u64 == cs;
                if whole && may_unmap {
                    if vol.chunks.contains_key(&idx) {
                        Arc::make_mut(&mut vol.chunks).remove(&idx);
                    }
                } else if vol.chunks.contains_key(&idx) || whole {
                    let c = self.chunk_mut(vol, idx, offset, length)?;
                    c.data[within..within + n].fill(0);
                }
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        let cs = self.shared.chunk_size;
        self.with_vol("block_status", offset, length, false, |vol| {
            let mut out: Vec<Extent> = Vec::new();
            let mut push = |off: u64, len: u64, hole: bool| {
                if len == 0 {
                    return;
                }
                match out.last_mut() {
                    Some(last) if last.hole == hole && last.offset + last.length == off => {
                        last.length += len
                    }
                    _ => out.push(Extent {
                        offset: off,
                        length: len,
                        hole,
                        zero: hole,
                    }),
                }
            };
            let end = offset + length;
            let mut pos = offset;
            if length > 0 {
                for (&idx, _) in vol.chunks.range(offset / cs..=(end - 1) / cs) {
                    let start = (idx * cs).max(offset);
                    push(pos, start - pos, true);
                    let stop = ((idx + 1) * cs).min(end);
                    push(start, stop - start, false);
                    pos = stop;
                }
            }
            push(pos, end - pos, true);
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_until_commit_and_crash_returns_committed() {
        let p = MemPool::with_options(4096, None);
        p.create_volume("a/b", 1 << 20).unwrap();
        p.set_meta("k", Some("v")).unwrap();
        p.commit().unwrap();
        p.create_volume("a/c", 4096).unwrap();
        p.set_meta("k", Some("w")).unwrap();
        let c = p.crash();
        assert!(c.exists("a/b").unwrap());
        assert!(!c.exists("a/c").unwrap());
        assert_eq!(c.get_meta("k").unwrap().as_deref(), Some("v"));
    }

    #[test]
    fn flushed_writes_survive_a_crash_unflushed_do_not() {
        let p = MemPool::with_options(4096, None);
        p.create_volume("v", 65536).unwrap();
        p.commit().unwrap();
        let h = p.open_volume("v", false).unwrap();
        h.write_at(&[1; 100], 0).unwrap();
        h.flush().unwrap();
        h.write_at(&[2; 100], 8192).unwrap();
        let c = p.crash();
        let h2 = c.open_volume("v", true).unwrap();
        let mut buf = [0u8; 100];
        h2.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1; 100]);
        h2.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [0; 100]);
    }

    #[test]
    fn capacity_gives_enospc_and_freeing_restores_it() {
        let p = MemPool::with_options(4096, Some(2 * 4096));
        p.create_volume("v", 65536).unwrap();
        let h = p.open_volume("v", false).unwrap();
        h.write_at(&[1; 8192], 0).unwrap();
        let e = h.write_at(&[1; 10], 8192).unwrap_err();
        assert_eq!(e.kind, BlockErrorKind::NoSpace);
        h.discard(0, 4096).unwrap();
        h.write_at(&[1; 10], 8192).unwrap();
        assert_eq!(p.info().unwrap().data_used, 8192);
    }

    #[test]
    fn block_status_merges_runs() {
        let p = MemPool::with_options(4096, None);
        p.create_volume("v", 8 * 4096).unwrap();
        let h = p.open_volume("v", false).unwrap();
        h.write_at(&[1; 4096 * 2], 4096 * 2).unwrap();
        let ext = h.block_status(100, 8 * 4096 - 100).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 100,
                    length: 2 * 4096 - 100,
                    hole: true,
                    zero: true
                },
                Extent {
                    offset: 2 * 4096,
                    length: 2 * 4096,
                    hole: false,
                    zero: false
                },
                Extent {
                    offset: 4 * 4096,
                    length: 4 * 4096,
                    hole: true,
                    zero: true
                },
            ]
        );
    }
}
