//! Model-based test of the thin pool: random operation sequences against an in-memory
//! reference (per volume the bytes at the last commit and now), with power cuts through
//! `FaultyFile`.
//!
//! After every reopen: `verify` is clean, the data chunks in use equal the distinct
//! chunks referenced (no leaks), and every volume reads as at the last commit. One
//! allowance, the pool's documented contract: data written *in place* since the last
//! commit (into a chunk exclusive to its volume then and now, as dm-thin does) may be
//! durable after a crash, so a 512-byte sector may also hold any value written to that
//! volume's sector since the commit. Writes into shared chunks, discards, snapshots and
//! every metadata change must be exactly as committed.
//!
//! `THIN_MODEL_SEQS=n` scales the number of sequences (default: 80 with 4 KiB chunks and
//! 30 with 64 KiB chunks, ~110 operations each, so ~12,000 operations).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use storage::io::{DiskImage, Faults, FaultyFile};
use storage::thin::{ThinOptions, ThinPool};
use storage::{BlockErrorKind, Pool, PoolError};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let seed = self.next();
        (0..n)
            .map(|i| ((seed >> ((i % 8) * 8)) as u8).wrapping_add((i / 8) as u8) | 1)
            .collect()
    }
}

const SECTOR: u64 = 512;

#[derive(Clone)]
struct Vol {
    /// Identity of the volume object (survives renames, new for snapshots).
    id: u64,
    data: Vec<u8>,
}

struct Harness {
    dir: tempfile::TempDir,
    chunk: u64,
    meta: FaultyFile,
    data: FaultyFile,
    pool: Option<Arc<ThinPool>>,
    cur: BTreeMap<String, Vol>,
    committed: BTreeMap<String, Vol>,
    meta_kv: BTreeMap<String, String>,
    meta_kv_committed: BTreeMap<String, String>,
    /// (volume id, sector) -> values written since the last commit.
    in_place: HashMap<(u64, u64), Vec<Vec<u8>>>,
    next_id: u64,
    ops: u64,
}

impl Harness {
    fn new(chunk: u64, capacity: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let meta = FaultyFile::with_faults(DiskImage::default(), faults.clone());
        let data = FaultyFile::with_faults(DiskImage::default(), faults);
        let pool = ThinPool::create_with_io(
            dir.path(),
            ThinOptions {
                chunk_size: chunk,
                capacity,
            },
            Box::new(meta.clone()),
            Box::new(data.clone()),
        )
        .unwrap();
        Harness {
            dir,
            chunk,
            meta,
            data,
            pool: Some(pool),
            cur: BTreeMap::new(),
            committed: BTreeMap::new(),
            meta_kv: BTreeMap::new(),
            meta_kv_committed: BTreeMap::new(),
            in_place: HashMap::new(),
            next_id: 1,
            ops: 0,
        }
    }

    fn pool(&self) -> &Arc<ThinPool> {
        self.pool.as_ref().unwrap()
    }

    fn record_written(&mut self, key: &str, off: u64, bytes: &[u8]) {
        let id = self.cur[key].id;
        for (i, s) in bytes.chunks(SECTOR as usize).enumerate() {
            let sector = off / SECTOR + i as u64;
            self.in_place
                .entry((id, sector))
                .or_default()
                .push(s.to_vec());
        }
    }

    fn pick(&mut self, rng: &mut Rng) -> Option<String> {
        if self.cur.is_empty() {
            return None;
        }
        let i = rng.below(self.cur.len() as u64) as usize;
        self.cur.keys().nth(i).cloned()
    }

    /// A sector-aligned range inside a volume of `size` bytes, biased to small.
    fn range(&self, rng: &mut Rng, size: u64) -> (u64, u64) {
        let sectors = size / SECTOR;
        if sectors == 0 {
            return (0, 0);
        }
        let off = rng.below(sectors);
        let max = (sectors - off).min(3 * self.chunk / SECTOR);
        let len = if rng.below(3) == 0 {
            1 + rng.below(max)
        } else {
            (1 + rng.below(8)).min(max)
        };
        (off * SECTOR, len * SECTOR)
    }

    fn step(&mut self, rng: &mut Rng) {
        self.ops += 1;
        let pool = self.pool().clone();
        let keys = ["v0", "v1", "v2", "v3", "v4", "v5", "d/x@1", "d/x@2"];
        let max_size = 64 * self.chunk.min(16 << 10);
        match rng.below(100) {
            0..=7 => {
                let key = keys[rng.below(keys.len() as u64) as usize];
                let size = rng.below(max_size / SECTOR + 1) * SECTOR;
                let r = pool.create_volume(key, size);
                if self.cur.contains_key(key) {
                    assert!(matches!(r, Err(PoolError::VolumeExists(_))));
                } else {
                    r.unwrap();
                    self.cur.insert(
                        key.into(),
                        Vol {
                            id: self.next_id,
                            data: vec![0; size as usize],
                        },
                    );
                    self.next_id += 1;
                }
            }
            8..=39 => {
                let Some(key) = self.pick(rng) else { return };
                let size = self.cur[&key].data.len() as u64;
                let (off, len) = self.range(rng, size);
                let bytes = rng.bytes(len as usize);
                let v = pool.open_volume(&key, false).unwrap();
                v.write_at(&bytes, off).unwrap();
                self.cur.get_mut(&key).unwrap().data[off as usize..(off + len) as usize]
                    .copy_from_slice(&bytes);
                self.record_written(&key, off, &bytes);
            }
            40..=45 => {
                let Some(key) = self.pick(rng) else { return };
                let size = self.cur[&key].data.len() as u64;
                let (off, len) = self.range(rng, size);
                let v = pool.open_volume(&key, false).unwrap();
                v.discard(off, len).unwrap();
                let cs = self.chunk;
                let end = off + len;
                let lo = off.div_ceil(cs) * cs;
                let hi = if end == size { end } else { end / cs * cs };
                if lo < hi {
                    self.cur.get_mut(&key).unwrap().data[lo as usize..hi as usize].fill(0);
                }
            }
            46..=51 => {
                let Some(key) = self.pick(rng) else { return };
                let size = self.cur[&key].data.len() as u64;
                let (off, len) = self.range(rng, size);
                let v = pool.open_volume(&key, false).unwrap();
                v.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                self.cur.get_mut(&key).unwrap().data[off as usize..(off + len) as usize].fill(0);
                self.record_written(&key, off, &vec![0; len as usize]);
            }
            52..=59 => {
                let Some(src) = self.pick(rng) else { return };
                let dst = keys[rng.below(keys.len() as u64) as usize];
                let r = pool.snapshot(&src, dst);
                if self.cur.contains_key(dst) {
                    assert!(matches!(r, Err(PoolError::VolumeExists(_))));
                } else {
                    r.unwrap();
                    let data = self.cur[&src].data.clone();
                    self.cur.insert(
                        dst.into(),
                        Vol {
                            id: self.next_id,
                            data,
                        },
                    );
                    self.next_id += 1;
                }
            }
            60..=64 => {
                let Some(key) = self.pick(rng) else { return };
                if rng.below(4) == 0 {
                    let h = pool.open_volume(&key, true).unwrap();
                    assert!(matches!(
                        pool.remove_volume(&key),
                        Err(PoolError::Busy { .. })
                    ));
                    drop(h);
                }
                pool.remove_volume(&key).unwrap();
                self.cur.remove(&key);
            }
            65..=68 => {
                let Some(from) = self.pick(rng) else { return };
                let to = keys[rng.below(keys.len() as u64) as usize];
                let r = pool.rename_volume(&from, to);
                if self.cur.contains_key(to) {
                    assert!(r.is_err());
                } else {
                    r.unwrap();
                    let v = self.cur.remove(&from).unwrap();
                    self.cur.insert(to.into(), v);
                }
            }
            69..=73 => {
                let Some(key) = self.pick(rng) else { return };
                let old = self.cur[&key].data.len() as u64;
                let size = rng.below(max_size * 2 / SECTOR + 1) * SECTOR;
                pool.resize_volume(&key, size, true).unwrap();
                if size < old && !size.is_multiple_of(self.chunk) {
                    // The pool zeroes the rest of the new last chunk, possibly in place.
                    let end = (size.div_ceil(self.chunk) * self.chunk).min(old);
                    self.record_written(&key, size, &vec![0; (end - size) as usize]);
                }
                self.cur
                    .get_mut(&key)
                    .unwrap()
                    .data
                    .resize(size as usize, 0);
            }
            74..=76 => {
                let k = format!("m{}", rng.below(4));
                if rng.below(3) == 0 {
                    pool.set_meta(&k, None).unwrap();
                    self.meta_kv.remove(&k);
                } else {
                    let v = format!("{}", rng.next());
                    pool.set_meta(&k, Some(&v)).unwrap();
                    self.meta_kv.insert(k, v);
                }
            }
            77..=84 => {
                if rng.below(2) == 0 {
                    pool.commit().unwrap();
                } else if let Some(key) = self.pick(rng) {
                    pool.open_volume(&key, false).unwrap().flush().unwrap();
                } else {
                    pool.commit().unwrap();
                }
                self.committed = self.cur.clone();
                self.meta_kv_committed = self.meta_kv.clone();
                self.in_place.clear();
            }
            85..=88 => {
                drop(pool);
                self.crash_and_reopen()
            }
            _ => {
                let Some(key) = self.pick(rng) else { return };
                let size = self.cur[&key].data.len() as u64;
                let (off, len) = self.range(rng, size);
                let v = pool.open_volume(&key, true).unwrap();
                let mut buf = vec![0u8; len as usize];
                v.read_at(&mut buf, off).unwrap();
                let want = &self.cur[&key].data[off as usize..(off + len) as usize];
                assert!(
                    buf == want,
                    "{key} differs at {off}+{len} after {} ops",
                    self.ops
                );
                if len > 0 {
                    let e = v.read_at(&mut buf, size - len + 1).unwrap_err();
                    assert_eq!(e.kind, BlockErrorKind::OutOfRange);
                }
            }
        }
    }

    fn check_clean(&self) {
        let pool = self.pool();
        let r = pool.verify().unwrap();
        assert!(r.is_clean(), "verify after {} ops: {r:?}", self.ops);
        let info = pool.info().unwrap();
        assert_eq!(
            info.data_used,
            r.data_chunks * self.chunk,
            "data chunks in use vs referenced: {info:?} {r:?}"
        );
    }

    fn crash_and_reopen(&mut self) {
        let meta = self.meta.power_cut();
        let data = self.data.power_cut();
        self.pool = None;
        let faults = Faults::new();
        self.meta = FaultyFile::with_faults(meta, faults.clone());
        self.data = FaultyFile::with_faults(data, faults);
        let pool = ThinPool::open_with_io(
            self.dir.path(),
            Box::new(self.meta.clone()),
            Box::new(self.data.clone()),
        )
        .unwrap();
        self.pool = Some(pool.clone());
        self.check_clean();
        let keys: Vec<String> = pool
            .list_volumes()
            .unwrap()
            .into_iter()
            .map(|v| v.key)
            .collect();
        let want: Vec<String> = self.committed.keys().cloned().collect();
        assert_eq!(keys, want, "volumes after reopen");
        let kv: BTreeMap<String, String> = pool
            .meta_keys("")
            .unwrap()
            .into_iter()
            .map(|k| (k.clone(), pool.get_meta(&k).unwrap().unwrap()))
            .collect();
        assert_eq!(kv, self.meta_kv_committed);
        let mut now = BTreeMap::new();
        for (key, vol) in &self.committed {
            let v = pool.open_volume(key, true).unwrap();
            assert_eq!(v.size(), vol.data.len() as u64, "{key}: size");
            let mut buf = vec![0u8; vol.data.len()];
            v.read_at(&mut buf, 0).unwrap();
            for (i, (got, want)) in buf
                .chunks(SECTOR as usize)
                .zip(vol.data.chunks(SECTOR as usize))
                .enumerate()
            {
                if got == want {
                    continue;
                }
                let ok = self
                    .in_place
                    .get(&(vol.id, i as u64))
                    .is_some_and(|c| c.iter().any(|c| c == got));
                assert!(ok, "{key}: sector {i} is neither the committed value nor written in place, after {} ops", self.ops);
            }
            now.insert(
                key.clone(),
                Vol {
                    id: vol.id,
                    data: buf,
                },
            );
        }
        self.cur = now.clone();
        self.committed = now;
        self.meta_kv = self.meta_kv_committed.clone();
        self.in_place.clear();
    }

    fn check_all(&self) {
        let pool = self.pool();
        for (key, vol) in &self.cur {
            let v = pool.open_volume(key, true).unwrap();
            let mut buf = vec![0u8; vol.data.len()];
            v.read_at(&mut buf, 0).unwrap();
            assert!(buf == vol.data, "{key} differs at the end of the sequence");
        }
    }
}

fn run(chunk: u64, capacity: u64, seqs: u64, ops: u64, seed: u64) -> u64 {
    let mut total = 0;
    for s in 0..seqs {
        let mut rng = Rng(seed ^ (s * 7919));
        let mut h = Harness::new(chunk, capacity);
        for _ in 0..ops {
            h.step(&mut rng);
        }
        h.check_all();
        h.pool().commit().unwrap();
        h.committed = h.cur.clone();
        h.meta_kv_committed = h.meta_kv.clone();
        h.in_place.clear();
        h.crash_and_reopen();
        h.check_all();
        total += h.ops;
    }
    total
}

fn seqs(default: u64) -> u64 {
    std::env::var("THIN_MODEL_SEQS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn model_4k_chunks() {
    let n = run(4096, 16 << 20, seqs(80), 110, 0x5EED_0001);
    assert!(n >= 80 * 110 || seqs(80) < 80);
}

#[test]
fn model_64k_chunks() {
    let n = run(64 << 10, 64 << 20, seqs(30), 110, 0x5EED_0002);
    assert!(n >= 30 * 110 || seqs(30) < 30);
}
