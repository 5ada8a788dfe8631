//! Image import: reads the image in large batches, hashes and zero-checks chunks in
//! parallel (rayon), maps them under the metadata lock (zero chunks stay holes, known
//! content shares an existing chunk), then writes the unique chunks outside the lock in
//! contiguous runs. The volume fingerprint is computed on the way (blake3 over the bytes).

use std::collections::HashMap;
use std::io::Read;

use rayon::prelude::*;

use super::format::{Chunk, MapEntry, RootEntry, MAP_LEAF_ENTRIES};
use super::meta::{map_height, Meta};
use super::{Error, ThinPool};
use crate::pool::{validate_volume_key, ImportOptions, ImportStats, PoolError};

/// The gate is held while a batch is mapped and written, so a snapshot or a commit (a
/// qube start, a guest's FLUSH) waits for up to one batch. 2 MiB (32 chunks of 64 KiB to
/// hash in parallel) keeps that to a few ms: with 32 MiB a batch held it 100s of ms on a
/// busy host, and the import was slower too (each pass over a batch left the cache).
const BATCH_BYTES: u64 = 2 << 20;

static ZERO: [u8; 4096] = [0; 4096];

pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Content already in the pool, by blake3: a chunk and, for chunks of the volume
/// deduplicated against, where that volume maps it (checked again before sharing, since
/// commits between batches can free and reuse a chunk).
type Known = HashMap<[u8; 32], KnownChunk>;
/// A chunk and where (volume id, virtual chunk) the deduplicated-against volume maps it.
type KnownChunk = (Chunk, Option<(u64, u64)>);

/// What one chunk of a batch became.
enum Placed {
    Zero,
    Shared,
    New(Chunk, bool),
}

impl ThinPool {
    pub(crate) fn import(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        validate_volume_key(key)?;
        // The I/O gate is held per batch, not for the whole import: a guest's FLUSH (a
        // pool commit) must not wait for an image of many GiB. A commit between batches
        // makes the partly imported volume durable under `key`, every mapped chunk
        // written; callers import under a staging key and rename once complete.
        let id = {
            let mut m = self.lock()?;
            if m.id_of(key).is_some() {
                return Err(PoolError::VolumeExists(key.into()));
            }
            let h = map_height(size.div_ceil(self.geo.chunk_size));
            self.mutate(&mut m, |m| {
                m.add_volume(
                    key,
                    size,
                    RootEntry {
                        height: h,
                        ..Default::default()
                    },
                )
            })
            .map_err(|e| self.perr(e))?
        };
        let r = self.import_into(id, image, size, opts);
        if r.is_err() {
            let mut m = self.state.lock();
            let _ = self.mutate(&mut m, |m| m.remove_volume(id));
        }
        r
    }

    fn known_chunks(&self, other: &str) -> Result<Known, PoolError> {
        let cs = self.geo.chunk_size;
        let (oid, entries) = {
            let mut m = self.lock()?;
            let oid = self.id(&m, other)?;
            let e = m.mapped_in(oid, 0, u64::MAX).map_err(|e| self.perr(e))?;
            (oid, e)
        };
        let plain: Vec<(u64, Chunk)> = entries
            .iter()
            .filter(|(_, e)| e.backing.is_none())
            .map(|(vc, e)| (*vc, e.chunk))
            .collect();
        let hashed: Result<Vec<([u8; 32], KnownChunk)>, Error> = plain
            .par_iter()
            .map_init(
                || vec![0u8; cs as usize],
                |buf, &(vc, c)| {
                    let (off, _) = self.geo.chunk_run(c, 1)?;
                    self.data
                        .read_at(buf, off.raw())
                        .map_err(|source| Error::Io {
                            op: "reading the volume to dedup against",
                            source,
                        })?;
                    Ok((*blake3::hash(buf).as_bytes(), (c, Some((oid, vc)))))
                },
            )
            .collect();
        Ok(hashed.map_err(|e| self.perr(e))?.into_iter().collect())
    }

    fn import_into(
        &self,
        id: u64,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        let cs = self.geo.chunk_size;
        let mut known = HashMap::new();
        if opts.dedup {
            if let Some(other) = &opts.dedup_against {
                known = self.known_chunks(other)?;
            }
        }
        let batch = (BATCH_BYTES / cs).max(1);
        let total = size.div_ceil(cs);
        let batch_len = (batch.min(total) * cs) as usize;
        let dedup = opts.dedup;
        // Two buffers: this thread reads batch k+1 while a worker hashes, maps and
        // writes batch k.
        std::thread::scope(|sc| {
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, usize, Vec<u8>)>(1);
            let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            for _ in 0..total.div_ceil(batch).min(2) {
                let _ = free_tx.send(vec![0u8; batch_len]);
            }
            let worker = sc.spawn(move || -> Result<ImportStats, PoolError> {
                let mut hasher = blake3::Hasher::new();
                let mut stats = ImportStats {
                    bytes: size,
                    ..Default::default()
                };
                let mut behind = None;
                for (vc0, want, buf) in full_rx {
                    let n = batch.min(total - vc0);
                    let bytes = &buf[..(n * cs) as usize];
                    let span = self.import_batch(
                        id,
                        vc0,
                        bytes,
                        want,
                        dedup,
                        &mut hasher,
                        &mut known,
                        &mut stats,
                    )?;
                    let _ = free_tx.send(buf);
                    self.write_back(span, &mut behind);
                }
                stats.fingerprint = hasher.finalize().to_hex().to_string();
                Ok(stats)
            });
            let mut read_err = None;
            let mut vc0 = 0;
            while vc0 < total {
                // The worker stopped early (an error): it reports it below.
                let Ok(mut buf) = free_rx.recv() else { break };
                let n = batch.min(total - vc0);
                let want = (n * cs).min(size - vc0 * cs) as usize;
                match read_full(image, &mut buf[..want]) {
                    Ok(got) => buf[got..(n * cs) as usize].fill(0),
                    Err(e) => {
                        read_err = Some(e);
                        break;
                    }
                }
                if full_tx.send((vc0, want, buf)).is_err() {
                    break;
                }
                vc0 += n;
            }
            drop(full_tx);
            let stats = worker
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            if let Some(e) = read_err {
                return Err(PoolError::io("reading the image", e));
            }
            let stats = stats?;
            let mut m = self.lock()?;
            if let Some(v) = m.vol_mut(id) {
                v.fingerprint = Some(stats.fingerprint.clone());
            }
            m.cat_dirty = true;
            Ok(stats)
        })
    }

    /// Starts the writeback of what the batch just written put in pool.data (`span`, a
    /// byte range), and waits for that of the batch before it (`behind`). Unbounded, a
    /// multi-GiB import leaves GiBs dirty in the page cache, and the next commit's sync
    /// of pool.data (any qube's start or stop, a guest's FLUSH) writes them all out
    /// while holding the gate: starts took 100s of ms, stops seconds. Bounded, the
    /// import goes at the disk's pace and a commit finds about two batches to write.
    /// Durability still comes from the commit's sync (this is an early start of it):
    /// errors are left for that sync to report, on its own file description.
    fn write_back(&self, span: Option<(u64, u64)>, behind: &mut Option<(u64, u64)>) {
        use std::os::fd::AsRawFd;
        let Some(f) = &self.data_wb else { return };
        let range = |(off, len): (u64, u64), flags| {
            // SAFETY: sync_file_range only reads its integer arguments; the descriptor
            // is ours and open for as long as `self`.
            let r = unsafe { libc::sync_file_range(f.as_raw_fd(), off as i64, len as i64, flags) };
            if r != 0 {
                tracing::debug!(
                    "writeback of imported chunks: {}",
                    std::io::Error::last_os_error()
                );
            }
        };
        if let Some(s) = span {
            range(s, libc::SYNC_FILE_RANGE_WRITE);
        }
        if let Some(b) = std::mem::replace(behind, span) {
            range(
                b,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
    }

    /// Hashes, maps and writes one batch of whole chunks starting at virtual chunk `vc0`;
    /// the first `want` bytes belong to the volume (the rest is zero padding). Returns
    /// the byte range of pool.data the new chunks went to, if any.
    #[allow(clippy::too_many_arguments)]
    fn import_batch(
        &self,
        id: u64,
        vc0: u64,
        bytes: &[u8],
        want: usize,
        dedup: bool,
        hasher: &mut blake3::Hasher,
        known: &mut Known,
        stats: &mut ImportStats,
    ) -> Result<Option<(u64, u64)>, PoolError> {
        let c = self.geo.chunk_size as usize;
        let n = bytes.len() / c;
        let (_, sums) = rayon::join(
            || hasher.update_rayon(&bytes[..want]),
            || {
                let mut sums: Vec<Option<Option<[u8; 32]>>> = (0..n)
                    .into_par_iter()
                    .map(|i| {
                        let chunk = &bytes[i * c..(i + 1) * c];
                        if is_zero(chunk) {
                            None
                        } else if !dedup {
                            Some(Some([0; 32]))
                        } else if i > 0 && chunk == &bytes[(i - 1) * c..i * c] {
                            // A run of identical chunks is hashed once (memcmp is far
                            // cheaper than blake3).
                            Some(None)
                        } else {
                            Some(Some(*blake3::hash(chunk).as_bytes()))
                        }
                    })
                    .collect();
                for i in 1..sums.len() {
                    if let Some(None) = sums[i] {
                        sums[i] = sums[i - 1];
                    }
                }
                sums.into_iter()
                    .map(|s| s.map(|h| h.expect("the first chunk of a run is hashed")))
                    .collect::<Vec<_>>()
            },
        );
        let t = std::time::Instant::now();
        let _g = self.gate.read();
        let gate_us = t.elapsed().as_micros() as u64;
        let placed = {
            let mut m = self.lock()?;
            let r = self.mutate(&mut m, |m| place_batch(m, id, vc0, &sums, dedup, known));
            let placed = r.map_err(|e| self.perr(e))?;
            for p in &placed {
                if let Placed::New(c, _) = p {
                    m.inflight.insert(*c);
                }
            }
            placed
        };
        let mapped_us = t.elapsed().as_micros() as u64;
        let r = self.write_batch(bytes, &placed);
        tracing::debug!(
            vc0,
            gate_us,
            mapped_us,
            written_us = t.elapsed().as_micros() as u64,
            "import batch"
        );
        {
            let mut m = self.state.lock();
            for p in &placed {
                if let Placed::New(c, _) = p {
                    m.inflight.remove(c);
                }
            }
            if r.is_err() {
                // The batch's chunks are mapped but not (all) written. Still under the
                // gate, so no commit can make them durable: drop the volume now (a
                // failed import leaves no trace) instead of stopping the pool, so a
                // full host filesystem does not need a reopen once space is freed.
                let _ = self.mutate(&mut m, |m| m.remove_volume(id));
            }
            self.cv.notify_all();
        }
        r.map_err(|e| self.perr(e))?;
        let mut new = (u64::MAX, 0);
        for p in &placed {
            match p {
                Placed::Zero => stats.zero_chunks += 1,
                Placed::Shared => stats.dedup_chunks += 1,
                Placed::New(c, _) => {
                    stats.written_chunks += 1;
                    new = (new.0.min(c.0), new.1.max(c.0));
                }
            }
        }
        if new.0 > new.1 {
            return Ok(None);
        }
        let (first, _) = self
            .geo
            .chunk_run(Chunk(new.0), 1)
            .map_err(|e| self.perr(e))?;
        let (last, len) = self
            .geo
            .chunk_run(Chunk(new.1), 1)
            .map_err(|e| self.perr(e))?;
        Ok(Some((first.raw(), last.raw() + len - first.raw())))
    }

    fn write_batch(&self, bytes: &[u8], placed: &[Placed]) -> Result<(), Error> {
        let cs = self.geo.chunk_size;
        // Runs of consecutive batch chunks landing in consecutive data chunks.
        let mut runs: Vec<(usize, Chunk, usize)> = Vec::new();
        for (i, p) in placed.iter().enumerate() {
            if let Placed::New(c, reused) = p {
                if *reused {
                    let (off, len) = self.geo.chunk_run(*c, 1)?;
                    self.data
                        .punch_hole(off.raw(), len)
                        .map_err(|source| Error::Io {
                            op: "punching a reused chunk",
                            source,
                        })?;
                }
                match runs.last_mut() {
                    Some((start, first, len))
                        if *start + *len == i && first.0 + *len as u64 == c.0 =>
                    {
                        *len += 1
                    }
                    _ => runs.push((i, *c, 1)),
                }
            }
        }
        // Pieces of at most 2 MiB, so the copies into the page cache use every core.
        let per = ((2 << 20) / cs as usize).max(1);
        let pieces: Vec<(usize, Chunk, usize)> = runs
            .iter()
            .flat_map(|&(i, c, len)| {
                (0..len)
                    .step_by(per)
                    .map(move |k| (i + k, Chunk(c.0 + k as u64), per.min(len - k)))
            })
            .collect();
        pieces.par_iter().try_for_each(|&(i, c, len)| {
            let from = i * cs as usize;
            let (off, n) = self.geo.chunk_run(c, len as u64)?;
            self.data
                .write_at(&bytes[from..from + n as usize], off.raw())
                .map_err(|source| Error::Io {
                    op: "writing imported chunks",
                    source,
                })
        })
    }
}

fn place_batch(
    m: &mut Meta,
    id: u64,
    vc0: u64,
    sums: &[Option<[u8; 32]>],
    dedup: bool,
    known: &mut Known,
) -> Result<Vec<Placed>, Error> {
    let mut placed = Vec::with_capacity(sums.len());
    let mut leaf = None;
    let mut mapped = 0;
    let mut r = Ok(());
    for (i, sum) in sums.iter().enumerate() {
        let vc = vc0 + i as u64;
        let Some(sum) = sum else {
            placed.push(Placed::Zero);
            continue;
        };
        let mut entry_chunk = None;
        if dedup {
            if let Some(&(c, src)) = known.get(sum) {
                // Only a chunk still mapped where it was hashed: one freed meanwhile
                // (discarded in the source, the volume removed) may have been reused by
                // another volume after a commit.
                let still = match src {
                    None => m.data_rc(c)? > 0,
                    Some((sid, svc)) => {
                        let cs = m.geo.chunk_size;
                        match m.vol(sid).map(|v| v.size.div_ceil(cs)) {
                            Some(n) if svc < n => {
                                let e = m.lookup(sid, svc)?;
                                e.is_mapped() && e.chunk == c && e.backing.is_none()
                            }
                            _ => false,
                        }
                    }
                };
                if still {
                    m.chunk_inc(c)?;
                    entry_chunk = Some(c);
                    placed.push(Placed::Shared);
                }
            }
        }
        let c = match entry_chunk {
            Some(c) => c,
            None => match m.alloc_chunk() {
                Ok((c, reused)) => {
                    if dedup {
                        known.insert(*sum, (c, None));
                    }
                    placed.push(Placed::New(c, reused));
                    c
                }
                Err(e) => {
                    r = Err(e);
                    break;
                }
            },
        };
        let lb = vc / MAP_LEAF_ENTRIES as u64;
        let page = match leaf {
            Some((b, p)) if b == lb => p,
            _ => {
                let p = m.shadow_path(id, vc)?;
                leaf = Some((lb, p));
                p
            }
        };
        m.leaf_mut(page)?[(vc % MAP_LEAF_ENTRIES as u64) as usize] = MapEntry {
            chunk: c,
            ..Default::default()
        };
        mapped += 1;
    }
    let mut root = m.root(id)?;
    root.mapped = root.mapped.checked_add(mapped).ok_or_else(|| {
        Error::Inconsistent(format!("volume id {id}: mapped chunk count overflow"))
    })?;
    m.set_root(id, root)?;
    r.map(|_| placed)
}
