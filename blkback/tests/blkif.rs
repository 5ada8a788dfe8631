//! The blkif ring protocol against an in-process frontend over shared memory (no Xen):
//! data verified byte for byte against the pool volumes, flush = pool commit, discard
//! frees chunks, indirect requests, multi-page rings, and a hostile frontend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use blkback::blkif::abi::*;
use blkback::blkif::persistent::PersistentGrants;
use blkback::blkif::ring::BackRing;
use blkback::blkif::testing::Frontend;
use blkback::blkif::{serve, ServeError, Vbd, VbdParams};
use storage::{BlockDevice, Pool};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

struct Backend {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Backend {
    fn start(front: &Frontend, dev: Arc<dyn BlockDevice>) -> Backend {
        Self::start_with(front, dev, VbdParams::default())
    }

    fn start_with(front: &Frontend, dev: Arc<dyn BlockDevice>, params: VbdParams) -> Backend {
        let ring = BackRing::attach(front.grants.map_ring(&front.ring_refs).unwrap()).unwrap();
        let guest = PersistentGrants::new(front.grants.clone(), front.persistent);
        let mut vbd = Vbd::new(ring, guest, dev, params);
        let chan = front.channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || serve(&mut vbd, &chan, &s));
        Backend {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Result<(), ServeError> {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn thin_pool(dir: &std::path::Path, capacity: u64) -> Arc<storage::ThinPool> {
    storage::ThinPool::create(
        dir,
        storage::ThinOptions {
            chunk_size: CHUNK,
            capacity,
        },
    )
    .unwrap()
}

fn read_dev(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    dev.read_at(&mut v, off).unwrap();
    v
}

fn exercise_rw(dev: Arc<dyn BlockDevice>, order: u32) {
    let mut front = Frontend::new(order);
    let be = Backend::start(&front, dev.clone());
    // 1 page, the most a direct request carries (11), indirect 64 pages and 256 (1 MiB).
    for (i, pages) in [1usize, 11, 12, 64, 256].into_iter().enumerate() {
        let data = pattern(pages * PAGE_SIZE, i as u64);
        let sector = 8 * (1 + i as u64 * 300) + 3; // not chunk- or page-aligned
        assert_eq!(
            front.write(sector, &data),
            RSP_OKAY,
            "write of {pages} pages"
        );
        assert_eq!(
            read_dev(&*dev, sector * 512, data.len()),
            data,
            "volume content after a {pages}-page write"
        );
        let (st, back) = front.read(sector, pages);
        assert_eq!(st, RSP_OKAY);
        assert_eq!(back, data, "read back {pages} pages");
    }
    be.stop().unwrap();
}

#[test]
fn reads_and_writes_match_a_mem_volume_byte_for_byte() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("work/private", 64 * MIB).unwrap();
    exercise_rw(pool.open_volume("work/private", false).unwrap(), 0);
}

#[test]
fn reads_and_writes_match_by_grant_copy_when_the_frontend_keeps_no_grants() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("work/private", 64 * MIB).unwrap();
    let dev = pool.open_volume("work/private", false).unwrap();
    let mut front = Frontend::new(0);
    front.persistent = false;
    let be = Backend::start(&front, dev.clone());
    let data = pattern(12 * PAGE_SIZE, 3);
    assert_eq!(front.write(24, &data), RSP_OKAY);
    assert_eq!(read_dev(&*dev, 24 * 512, data.len()), data);
    assert_eq!(front.read(24, 12), (RSP_OKAY, data));
    be.stop().unwrap();
}

/// blkfront with persistent grants bounces every transfer through one pool of pages it
/// keeps granted: each is mapped once, later transfers through it are plain copies;
/// past the cap the rest go by grant copy, and the data is right either way. Without
/// the feature nothing is mapped.
#[test]
fn persistent_grants_map_each_page_once_and_fall_back_past_the_cap() {
    for enabled in [true, false] {
        let pool = storage::MemPool::with_options(CHUNK, None);
        pool.create_volume("v", 4 * MIB).unwrap();
        let dev = pool.open_volume("v", false).unwrap();
        let mut front = Frontend::new(0);
        let ring = BackRing::attach(front.grants.map_ring(&front.ring_refs).unwrap()).unwrap();
        let guest = PersistentGrants::with_limit(front.grants.clone(), enabled, 4);
        let mut vbd = Vbd::new(ring, guest, dev.clone(), VbdParams::default());
        let bounce = front.alloc(6, None);
        let segs = Frontend::page_segments(&bounce);
        let mut serve = |front: &mut Frontend, op: u8, sector: u64| {
            let id = front.id();
            front.ring.put_request(&encode::rw(op, id, sector, &segs));
            front.push();
            vbd.process().unwrap();
            let r = front.ring.next_response().expect("a response");
            assert_eq!((r.id, r.status), (id, RSP_OKAY));
            vbd.guest().stats()
        };
        let mut stats = Default::default();
        for round in 0..5u64 {
            let sector = 8 + round * 64;
            let data = pattern(6 * PAGE_SIZE, 40 + round);
            bounce.mem.write(0, &data);
            serve(&mut front, OP_WRITE, sector);
            assert_eq!(read_dev(&*dev, sector * 512, data.len()), data);
            bounce.mem.write(0, &vec![0xee; data.len()]);
            stats = serve(&mut front, OP_READ, sector);
            assert_eq!(bounce.read(), data, "round {round} read back");
        }
        if enabled {
            assert_eq!(
                stats.mapped, 4,
                "each page mapped once, up to the cap: {stats:?}"
            );
            assert_eq!(stats.map_calls, 1, "the 4 pages in one call: {stats:?}");
            assert_eq!((stats.hits, stats.copied), (40, 20), "{stats:?}");
        } else {
            assert_eq!(
                stats,
                Default::default(),
                "nothing mapped without the feature"
            );
        }
    }
}

/// With persistent grants and a thin volume a write goes to the pool straight from the
/// guest's mapped pages (`pwritev`, no copy of ours) and a read straight into them
/// (`preadv`): segments out of page order and partial pages, across a chunk boundary,
/// copy-on-write under a snapshot; the volume and the snapshot match a model, the read
/// fills exactly the segments' sectors. Past the mapping cap, or without persistent
/// grants, the same transfers go by copy.
#[test]
fn transfers_go_between_a_thin_volume_and_mapped_pages_directly() {
    for (enabled, limit) in [(true, 1056), (true, 4), (false, 1056)] {
        let dir = tempfile::tempdir().unwrap();
        let pool = thin_pool(dir.path(), 32 * MIB);
        pool.create_volume("v", 4 * MIB).unwrap();
        let dev = pool.open_volume("v", false).unwrap();
        let mut front = Frontend::new(0);
        let ring = BackRing::attach(front.grants.map_ring(&front.ring_refs).unwrap()).unwrap();
        let guest = PersistentGrants::with_limit(front.grants.clone(), enabled, limit);
        let mut vbd = Vbd::new(ring, guest, dev.clone(), VbdParams::default());
        let bounce = front.alloc(6, None);
        // Pages 5, 4, 3, 2, 1, 0; the first from sector 3, the last up to sector 4.
        let mut segs = Frontend::page_segments(&bounce);
        segs.reverse();
        segs[0].first_sect = 3;
        segs[5].last_sect = 4;
        let mut model = vec![0u8; 4 * MIB as usize];
        let mut snap_model = None;
        let rounds = 5u64;
        for round in 0..rounds {
            if round == 2 {
                pool.snapshot("v", "snap").unwrap();
                snap_model = Some(model.clone());
            }
            let page_data = pattern(6 * PAGE_SIZE, 70 + round);
            bounce.mem.write(0, &page_data);
            let mut want = Vec::new();
            for s in &segs {
                let page = bounce.refs.iter().position(|&r| r == s.gref).unwrap();
                let a = page * PAGE_SIZE + s.first_sect as usize * 512;
                let b = page * PAGE_SIZE + (s.last_sect as usize + 1) * 512;
                want.extend_from_slice(&page_data[a..b]);
            }
            // Sector 120 is 4 KiB before the second chunk; later rounds overlap.
            let sector = 120 + round * 9;
            let id = front.id();
            front
                .ring
                .put_request(&encode::rw(OP_WRITE, id, sector, &segs));
            front.push();
            vbd.process().unwrap();
            let r = front.ring.next_response().expect("a response");
            assert_eq!((r.id, r.status), (id, RSP_OKAY));
            let off = sector as usize * 512;
            model[off..off + want.len()].copy_from_slice(&want);
        }
        assert!(
            read_dev(&*dev, 0, model.len()) == model,
            "volume differs from the model ({enabled}, {limit})"
        );
        let snap = pool.open_volume("snap", true).unwrap();
        assert!(
            read_dev(&*snap, 0, model.len()) == snap_model.unwrap(),
            "snapshot differs from the model ({enabled}, {limit})"
        );
        // Read the area back into the same pages, in the same order.
        bounce.mem.write(0, &vec![0xee; 6 * PAGE_SIZE]);
        let sector = 120 + (rounds - 1) * 9;
        let id = front.id();
        front
            .ring
            .put_request(&encode::rw(OP_READ, id, sector, &segs));
        front.push();
        vbd.process().unwrap();
        let r = front.ring.next_response().expect("a response");
        assert_eq!((r.id, r.status), (id, RSP_OKAY));
        let got = bounce.read();
        let mut at = sector as usize * 512;
        for s in &segs {
            let page = bounce.refs.iter().position(|&r| r == s.gref).unwrap();
            let a = page * PAGE_SIZE + s.first_sect as usize * 512;
            let b = page * PAGE_SIZE + (s.last_sect as usize + 1) * 512;
            assert!(
                got[a..b] == model[at..at + b - a],
                "read back ({enabled}, {limit})"
            );
            at += b - a;
        }
        let (w, rd) = (vbd.stats.direct_writes, vbd.stats.direct_reads);
        let p = vbd.guest().stats();
        if enabled && limit > 6 {
            assert_eq!((w, rd), (rounds, 1), "every transfer in place");
            assert_eq!(
                (p.direct, p.hits, p.copied),
                (6 * (rounds + 1), 0, 0),
                "{p:?}"
            );
        } else {
            assert_eq!((w, rd, p.direct), (0, 0, 0), "by copy: {p:?}");
        }
        dev.flush().unwrap();
        let r = pool.verify().unwrap();
        assert!(r.is_clean(), "{r:?}");
    }
}

#[test]
fn reads_and_writes_match_a_thin_volume_byte_for_byte_on_a_16_page_ring() {
    let dir = tempfile::tempdir().unwrap();
    let pool = thin_pool(dir.path(), 256 * MIB);
    pool.create_volume("work/private", 64 * MIB).unwrap();
    exercise_rw(pool.open_volume("work/private", false).unwrap(), 4);
}

#[test]
fn partial_page_segments_move_exactly_their_sectors() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("v", 4 * MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(0);
    let be = Backend::start(&front, dev.clone());
    let page = pattern(PAGE_SIZE, 7);
    let buf = front.alloc(1, Some(&page));
    let seg = Segment {
        gref: buf.refs[0],
        first_sect: 2,
        last_sect: 5,
    };
    let id = front.id();
    let r = front.call(&encode::rw(OP_WRITE, id, 100, &[seg]));
    assert_eq!((r.id, r.status), (id, RSP_OKAY));
    assert_eq!(read_dev(&*dev, 100 * 512, 4 * 512), page[1024..3072]);
    assert_eq!(read_dev(&*dev, 99 * 512, 512), vec![0; 512]);
    assert_eq!(read_dev(&*dev, 104 * 512, 512), vec![0; 512]);
    // Read sector 101 only into the last sector of a fresh page: the rest stays as is.
    let dst = front.alloc(1, Some(&[0xaa; PAGE_SIZE]));
    let seg = Segment {
        gref: dst.refs[0],
        first_sect: 7,
        last_sect: 7,
    };
    let id = front.id();
    assert_eq!(
        front.call(&encode::rw(OP_READ, id, 101, &[seg])).status,
        RSP_OKAY
    );
    let got = dst.read();
    assert_eq!(got[..7 * 512], [0xaa; 7 * 512]);
    assert_eq!(got[7 * 512..], page[1536..2048]);
    be.stop().unwrap();
}

#[test]
fn flush_is_a_pool_commit_and_survives_a_crash() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("work/private", 8 * MIB).unwrap();
    pool.commit().unwrap();
    let dev = pool.open_volume("work/private", false).unwrap();
    let mut front = Frontend::new(0);
    let be = Backend::start(&front, dev.clone());
    let flushed = pattern(16 * PAGE_SIZE, 1);
    assert_eq!(front.write(0, &flushed), RSP_OKAY);
    let id = front.id();
    let r = front.call(&encode::simple(OP_FLUSH_DISKCACHE, id));
    assert_eq!(
        (r.id, r.operation, r.status),
        (id, OP_FLUSH_DISKCACHE, RSP_OKAY)
    );
    let unflushed = pattern(16 * PAGE_SIZE, 2);
    assert_eq!(front.write(0, &unflushed), RSP_OKAY);
    // A barrier is served as a flush too.
    let barriered = pattern(PAGE_SIZE, 3);
    assert_eq!(front.write(1024, &barriered), RSP_OKAY);
    let id = front.id();
    let r = front.call(&encode::simple(OP_WRITE_BARRIER, id));
    assert_eq!((r.operation, r.status), (OP_WRITE_BARRIER, RSP_OKAY));
    be.stop().unwrap();
    drop(dev);

    let after = pool.crash();
    let dev = after.open_volume("work/private", true).unwrap();
    // The barrier committed everything before it, including the second write at 0.
    assert_eq!(read_dev(&*dev, 0, unflushed.len()), unflushed);
    assert_eq!(read_dev(&*dev, 1024 * 512, PAGE_SIZE), barriered);

    // And without any flush, a crash loses the writes: the flush above is what kept them.
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("v", MIB).unwrap();
    pool.commit().unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(0);
    let be = Backend::start(&front, dev.clone());
    assert_eq!(front.write(0, &flushed), RSP_OKAY);
    be.stop().unwrap();
    drop(dev);
    let after = pool.crash();
    let dev = after.open_volume("v", true).unwrap();
    assert_eq!(read_dev(&*dev, 0, PAGE_SIZE), vec![0; PAGE_SIZE]);
}

#[test]
fn discard_frees_chunks_in_a_thin_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = thin_pool(dir.path(), 64 * MIB);
    pool.create_volume("work/private", 16 * MIB).unwrap();
    let dev = pool.open_volume("work/private", false).unwrap();
    let mut front = Frontend::new(0);
    let be = Backend::start(&front, dev.clone());
    let data = pattern(MIB as usize, 5);
    assert_eq!(front.write(0, &data), RSP_OKAY);
    let mapped = pool.volume("work/private").unwrap().mapped;
    assert_eq!(mapped, MIB);
    let used = pool.info().unwrap().data_used;
    // Discard the second half (whole chunks) and a ragged piece of the first.
    let id = front.id();
    let r = front.call(&encode::discard(id, 1024, 1024, false));
    assert_eq!((r.id, r.operation, r.status), (id, OP_DISCARD, RSP_OKAY));
    assert_eq!(pool.volume("work/private").unwrap().mapped, MIB / 2);
    assert!(pool.info().unwrap().data_used <= used - MIB / 2);
    let (st, back) = front.read(0, 256);
    assert_eq!(st, RSP_OKAY);
    assert_eq!(back[..MIB as usize / 2], data[..MIB as usize / 2]);
    assert!(back[MIB as usize / 2..].iter().all(|&b| b == 0));
    // Secure discard is not offered; past the end is an error; neither frees anything.
    let id = front.id();
    assert_eq!(
        front.call(&encode::discard(id, 0, 128, true)).status,
        RSP_EOPNOTSUPP
    );
    let id = front.id();
    assert_eq!(
        front.call(&encode::discard(id, 0, u64::MAX, false)).status,
        RSP_ERROR
    );
    assert_eq!(pool.volume("work/private").unwrap().mapped, MIB / 2);
    be.stop().unwrap();
}

#[test]
fn a_full_multi_page_ring_of_requests_in_flight() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("v", 64 * MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(2);
    assert_eq!(front.ring.entries(), 128);
    let be = Backend::start(&front, dev.clone());
    for round in 0..3u64 {
        let mut bufs = Vec::new();
        let mut ids = Vec::new();
        for i in 0..128u64 {
            let data = pattern(2 * PAGE_SIZE, round * 1000 + i);
            let buf = front.alloc(2, Some(&data));
            let id = front.id();
            front.ring.put_request(&encode::rw(
                OP_WRITE,
                id,
                i * 16,
                &Frontend::page_segments(&buf),
            ));
            bufs.push((data, buf));
            ids.push(id);
        }
        front.push();
        for id in ids {
            let r = front.wait_response();
            assert_eq!((r.id, r.status), (id, RSP_OKAY));
        }
        for (i, (data, _)) in bufs.iter().enumerate() {
            assert_eq!(&read_dev(&*dev, i as u64 * 16 * 512, data.len()), data);
        }
    }
    be.stop().unwrap();
}

#[test]
fn malformed_requests_get_errors_and_touch_nothing() {
    malformed_requests(true);
    malformed_requests(false);
}

fn malformed_requests(persistent: bool) {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("a", MIB).unwrap();
    pool.create_volume("b", MIB).unwrap();
    let dev = pool.open_volume("a", false).unwrap();
    let other = pool.open_volume("b", false).unwrap();
    other.write_at(&[0x5b; 4096], 0).unwrap();
    let sectors = MIB / 512;
    let mut front = Frontend::new(0);
    front.persistent = persistent;
    let be = Backend::start(&front, dev.clone());
    let data = pattern(PAGE_SIZE, 9);
    let buf = front.alloc(1, Some(&data));
    let good = Segment {
        gref: buf.refs[0],
        first_sect: 0,
        last_sect: 7,
    };
    let seg = |gref, first_sect, last_sect| Segment {
        gref,
        first_sect,
        last_sect,
    };
    let cases: Vec<(&str, [u8; REQUEST_SIZE], i16)> = vec![
        ("unknown operation", encode::simple(4, 1), RSP_EOPNOTSUPP),
        ("operation 200", encode::simple(200, 2), RSP_EOPNOTSUPP),
        ("zero segments", encode::rw(OP_WRITE, 3, 0, &[]), RSP_ERROR),
        (
            "first > last",
            encode::rw(OP_WRITE, 4, 0, &[seg(good.gref, 5, 4)]),
            RSP_ERROR,
        ),
        (
            "last past the page",
            encode::rw(OP_WRITE, 5, 0, &[seg(good.gref, 0, 8)]),
            RSP_ERROR,
        ),
        (
            "last = 255",
            encode::rw(OP_READ, 6, 0, &[seg(good.gref, 0, 255)]),
            RSP_ERROR,
        ),
        (
            "past the end",
            encode::rw(OP_WRITE, 7, sectors - 7, &[good]),
            RSP_ERROR,
        ),
        (
            "read past the end",
            encode::rw(OP_READ, 8, sectors, &[good]),
            RSP_ERROR,
        ),
        (
            "sector overflow",
            encode::rw(OP_READ, 9, u64::MAX - 3, &[good]),
            RSP_ERROR,
        ),
        (
            "never-granted ref",
            encode::rw(OP_WRITE, 10, 0, &[seg(99_999, 0, 7)]),
            RSP_ERROR,
        ),
        (
            "read into a bad ref",
            encode::rw(OP_READ, 11, 0, &[good, seg(77_777, 0, 7)]),
            RSP_ERROR,
        ),
        (
            "indirect, 0 segments",
            encode::indirect(OP_READ, 12, 0, 0, &[good.gref]),
            RSP_ERROR,
        ),
        (
            "indirect, 257 segments",
            encode::indirect(OP_READ, 13, 0, 257, &[good.gref]),
            RSP_ERROR,
        ),
        (
            "indirect flush",
            encode::indirect(OP_FLUSH_DISKCACHE, 14, 0, 1, &[good.gref]),
            RSP_ERROR,
        ),
        (
            "indirect, bad page ref",
            encode::indirect(OP_WRITE, 15, 0, 4, &[55_555]),
            RSP_ERROR,
        ),
        (
            "discard past the end",
            encode::discard(16, sectors - 1, 2, false),
            RSP_ERROR,
        ),
    ];
    // Twelve segments claimed by a direct request.
    let mut twelve = encode::rw(OP_WRITE, 17, 0, &[good; 11]);
    twelve[1] = 12;
    let mut all = cases;
    all.push(("12 direct segments", twelve, RSP_ERROR));
    // Indirect page whose segments are themselves bad (last_sect 9, and an unknown ref).
    let bad_segs: Vec<u8> = [seg(good.gref, 0, 9), seg(44_444, 0, 7)]
        .iter()
        .flat_map(|s| s.encode())
        .collect();
    let ind = front.alloc(1, Some(&bad_segs));
    all.push((
        "indirect bad segment",
        encode::indirect(OP_WRITE, 18, 0, 1, &ind.refs),
        RSP_ERROR,
    ));
    all.push((
        "indirect unknown ref",
        encode::indirect(OP_WRITE, 19, 0, 2, &ind.refs),
        RSP_ERROR,
    ));
    for (what, raw, status) in &all {
        let r = front.call(raw);
        assert_eq!(r.status, *status, "{what}");
        assert_eq!(
            r.id,
            u64::from_le_bytes(raw[8..16].try_into().unwrap()),
            "{what}: id"
        );
    }
    // Nothing was written anywhere, the other volume is intact, the ring still works.
    assert_eq!(read_dev(&*dev, 0, MIB as usize), vec![0; MIB as usize]);
    assert_eq!(read_dev(&*other, 0, 4096), vec![0x5b; 4096]);
    assert_eq!(front.write(0, &data), RSP_OKAY);
    assert_eq!(front.read(0, 1), (RSP_OKAY, data.clone()));
    // A grant revoked by the guest fails the copy, not the backend. With persistent
    // grants the page stays mapped (as in Xen, where a guest cannot end access to a page
    // the backend has mapped): the read still lands in it.
    front.grants.revoke(buf.refs[0]);
    let id = front.id();
    assert_eq!(
        front.call(&encode::rw(OP_READ, id, 0, &[good])).status,
        if persistent { RSP_OKAY } else { RSP_ERROR }
    );
    be.stop().unwrap();
}

#[test]
fn a_read_only_volume_refuses_writes_and_discards() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("t/root", MIB).unwrap();
    let rw = pool.open_volume("t/root", false).unwrap();
    rw.write_at(&[7; 4096], 0).unwrap();
    drop(rw);
    let dev = pool.open_volume("t/root", true).unwrap();
    let mut front = Frontend::new(0);
    let be = Backend::start(&front, dev.clone());
    assert_eq!(front.write(0, &[1; PAGE_SIZE]), RSP_ERROR);
    let id = front.id();
    assert_eq!(
        front.call(&encode::discard(id, 0, 8, false)).status,
        RSP_ERROR
    );
    assert_eq!(front.read(0, 1), (RSP_OKAY, vec![7; PAGE_SIZE]));
    be.stop().unwrap();
}

#[test]
fn a_producer_index_beyond_the_ring_closes_the_device() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("v", MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(0);
    let be = Backend::start(&front, dev);
    assert_eq!(front.read(0, 1).0, RSP_OKAY);
    front.ring.set_req_prod(1000);
    front.to_back.kick();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !be.thread.as_ref().unwrap().is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "backend did not close"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(matches!(be.stop(), Err(ServeError::Ring(_))));
}

#[test]
fn back_to_back_transfers_are_served_as_one_run_and_a_bad_one_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let pool = thin_pool(dir.path(), 16 * MIB);
    pool.create_volume("v", 4 * MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(1);
    let ring = BackRing::attach(front.grants.map_ring(&front.ring_refs).unwrap()).unwrap();
    let mut vbd = Vbd::new(
        ring,
        front.grants.clone(),
        dev.clone(),
        VbdParams::default(),
    );
    // 40 writes of 3 pages at contiguous sectors (direct and, for the 16-page ones,
    // indirect), one with a never-granted ref, a flush in the middle: one batch.
    let n = 40u64;
    let pages = |i: u64| if i.is_multiple_of(5) { 16 } else { 3 };
    let mut sector = 8;
    let mut expect = Vec::new();
    let mut ids = Vec::new();
    let mut keep = Vec::new();
    for i in 0..n {
        let data = pattern(pages(i) * PAGE_SIZE, 100 + i);
        let buf = front.alloc(pages(i), Some(&data));
        let mut segs = Frontend::page_segments(&buf);
        if i == 17 {
            segs[1].gref = 999_999;
        }
        let id = front.id();
        let raw = if segs.len() <= MAX_SEGMENTS_PER_REQUEST {
            encode::rw(OP_WRITE, id, sector, &segs)
        } else {
            let bytes: Vec<u8> = segs.iter().flat_map(|s| s.encode()).collect();
            let ind = front.alloc(1, Some(&bytes));
            let raw = encode::indirect(OP_WRITE, id, sector, segs.len() as u16, &ind.refs);
            keep.push(ind);
            raw
        };
        front.ring.put_request(&raw);
        ids.push((id, if i == 17 { RSP_ERROR } else { RSP_OKAY }));
        expect.push((sector, if i == 17 { None } else { Some(data) }));
        keep.push(buf);
        sector += pages(i) as u64 * 8;
        if i == 25 {
            let id = front.id();
            front
                .ring
                .put_request(&encode::simple(OP_FLUSH_DISKCACHE, id));
            ids.push((id, RSP_OKAY));
        }
    }
    front.push();
    vbd.process().unwrap();
    for (id, status) in &ids {
        let r = front.ring.next_response().expect("a response per request");
        assert_eq!((r.id, r.status), (*id, *status));
    }
    assert!(front.ring.next_response().is_none());
    // 0..=25 end at the flush and hold the bad write: redone one by one; 26..40 are
    // one run.
    assert_eq!(
        vbd.stats.merged, 14,
        "the writes after the flush went as one run"
    );
    assert_eq!(vbd.stats.errors, 1);
    for (sector, data) in &expect {
        match data {
            Some(d) => assert_eq!(&read_dev(&*dev, sector * 512, d.len()), d),
            // The failed write left its sectors as they were: never written, zeros.
            None => assert_eq!(
                read_dev(&*dev, sector * 512, 3 * PAGE_SIZE),
                vec![0; 3 * PAGE_SIZE]
            ),
        }
    }
    // The same ranges read back: as one run, then with a bad ref among them (the run
    // fails and is redone read by read).
    for bad in [None, Some(30)] {
        let merged = vbd.stats.merged;
        let mut reads = Vec::new();
        for (i, (sector, data)) in expect.iter().enumerate() {
            let np = data.as_ref().map_or(3, |d| d.len() / PAGE_SIZE);
            let buf = front.alloc(np, None);
            let mut segs = Frontend::page_segments(&buf);
            if bad == Some(i) {
                segs[0].gref = 888_888;
            }
            let id = front.id();
            let raw = if segs.len() <= MAX_SEGMENTS_PER_REQUEST {
                encode::rw(OP_READ, id, *sector, &segs)
            } else {
                let bytes: Vec<u8> = segs.iter().flat_map(|s| s.encode()).collect();
                let ind = front.alloc(1, Some(&bytes));
                let raw = encode::indirect(OP_READ, id, *sector, segs.len() as u16, &ind.refs);
                keep.push(ind);
                raw
            };
            front.ring.put_request(&raw);
            reads.push((id, i, buf));
        }
        front.push();
        vbd.process().unwrap();
        for (id, i, buf) in &reads {
            let r = front.ring.next_response().expect("a response per read");
            let want = if bad == Some(*i) { RSP_ERROR } else { RSP_OKAY };
            assert_eq!((r.id, r.status), (*id, want), "read {i}");
            if bad != Some(*i) {
                let d = expect[*i].1.clone().unwrap_or(vec![0; 3 * PAGE_SIZE]);
                assert_eq!(buf.read(), d, "read {i}");
            }
        }
        let want = if bad.is_none() { n } else { 0 };
        assert_eq!(vbd.stats.merged - merged, want, "{:?}", vbd.stats);
    }
}

#[test]
fn a_spinning_backend_takes_requests_without_asking_for_a_kick() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("v", 4 * MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(0);
    let ring = BackRing::attach(front.grants.map_ring(&front.ring_refs).unwrap()).unwrap();
    let mut vbd = Vbd::new(
        ring,
        front.grants.clone(),
        dev.clone(),
        VbdParams::default(),
    );
    let mut keep = Vec::new();
    let mut put = |front: &mut Frontend, i: u64| {
        let data = pattern(PAGE_SIZE, 500 + i);
        let buf = front.alloc(1, Some(&data));
        let id = front.id();
        front.ring.put_request(&encode::rw(
            OP_WRITE,
            id,
            i * 8,
            &Frontend::page_segments(&buf),
        ));
        keep.push((buf, data));
        id
    };
    // A fresh ring asks for a kick on the first request.
    let id = put(&mut front, 0);
    assert!(front.ring.push_requests(), "the first request needs a kick");
    assert!(vbd.drain().unwrap(), "the frontend waits for its answer");
    assert_eq!(front.ring.next_response().unwrap().id, id);
    // Nothing published: the spin gives up and has not asked for a kick.
    assert!(!vbd.spin(64).unwrap());
    // A request published during the spin phase needs no kick, and the spin finds it.
    let id = put(&mut front, 1);
    assert!(
        !front.ring.push_requests(),
        "no kick while the backend spins"
    );
    assert!(vbd.spin(64).unwrap());
    vbd.drain().unwrap();
    assert_eq!(front.ring.next_response().unwrap().id, id);
    // Once the backend goes to sleep (final check), the next request kicks it again.
    assert!(!vbd.process().unwrap());
    put(&mut front, 2);
    assert!(
        front.ring.push_requests(),
        "a sleeping backend must be kicked"
    );
    vbd.process().unwrap();
    assert!(front.ring.next_response().is_some());
    assert_eq!(vbd.stats.spin_hits, 1);
    for (i, (_, data)) in keep.iter().enumerate() {
        assert_eq!(
            &read_dev(&*dev, i as u64 * PAGE_SIZE as u64, PAGE_SIZE),
            data
        );
    }
}

/// Many requests in flight, reads and writes at random places, the frontend queueing
/// more as answers come (so some land while the backend spins, some while it sleeps):
/// every request answered once, in order, the data byte for byte against a model.
fn requests_in_flight_match_a_model(spin: u32, persistent: bool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = thin_pool(dir.path(), 32 * MIB);
    pool.create_volume("v", 4 * MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(1);
    front.persistent = persistent;
    let params = VbdParams {
        spin,
        ..Default::default()
    };
    let be = Backend::start_with(&front, dev.clone(), params);
    let mut model = vec![0u8; 4 * MIB as usize];
    let mut rng = 0x1234_5678_9abc_def0u64 ^ u64::from(spin);
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // (id, op, buffer, expected read data)
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..1500u64 {
        let pages = 1 + next(4) as usize;
        let page = next(4 * MIB / PAGE_SIZE as u64 - pages as u64);
        let off = page as usize * PAGE_SIZE;
        let id = front.id();
        if next(3) == 0 {
            let buf = front.alloc(pages, None);
            let want = model[off..off + pages * PAGE_SIZE].to_vec();
            front.ring.put_request(&encode::rw(
                OP_READ,
                id,
                page * 8,
                &Frontend::page_segments(&buf),
            ));
            inflight.push_back((id, OP_READ, buf, Some(want)));
        } else {
            let data = pattern(pages * PAGE_SIZE, 9000 + i);
            model[off..off + data.len()].copy_from_slice(&data);
            let buf = front.alloc(pages, Some(&data));
            front.ring.put_request(&encode::rw(
                OP_WRITE,
                id,
                page * 8,
                &Frontend::page_segments(&buf),
            ));
            inflight.push_back((id, OP_WRITE, buf, None));
        }
        // Publish in bursts of 1-5, keep up to 24 in flight.
        if next(5) == 0 || inflight.len() >= 24 {
            front.push();
        }
        while inflight.len() >= 24 || (next(7) == 0 && !inflight.is_empty()) {
            front.push();
            let r = front.wait_response();
            let (id, op, buf, want) = inflight.pop_front().unwrap();
            assert_eq!((r.id, r.operation, r.status), (id, op, RSP_OKAY));
            if let Some(want) = want {
                assert!(buf.read() == want, "read {id} returned other data");
            }
        }
    }
    front.push();
    while let Some((id, op, buf, want)) = inflight.pop_front() {
        let r = front.wait_response();
        assert_eq!((r.id, r.operation, r.status), (id, op, RSP_OKAY));
        if let Some(want) = want {
            assert!(buf.read() == want, "read {id} returned other data");
        }
    }
    assert!(front.ring.next_response().is_none(), "an extra response");
    be.stop().unwrap();
    assert!(
        read_dev(&*dev, 0, model.len()) == model,
        "volume differs from the model"
    );
}

#[test]
fn requests_in_flight_match_a_model_with_a_spinning_backend() {
    requests_in_flight_match_a_model(4096, true);
    requests_in_flight_match_a_model(4096, false);
}

#[test]
fn requests_in_flight_match_a_model_with_a_sleeping_backend() {
    requests_in_flight_match_a_model(0, true);
}

/// A transfer's new grants are mapped in one call; when one of them is bad the call
/// fails as a whole, the good ones are mapped one by one and only the request with the
/// bad grant fails.
#[test]
fn a_bad_grant_in_a_batch_of_new_grants_fails_only_its_request() {
    let pool = storage::MemPool::with_options(CHUNK, None);
    pool.create_volume("v", 4 * MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(0);
    let ring = BackRing::attach(front.grants.map_ring(&front.ring_refs).unwrap()).unwrap();
    let guest = PersistentGrants::new(front.grants.clone(), true);
    let mut vbd = Vbd::new(ring, guest, dev.clone(), VbdParams::default());
    let buf = front.alloc(4, Some(&pattern(4 * PAGE_SIZE, 77)));
    let mut segs = Frontend::page_segments(&buf);
    let good = segs[3].gref;
    segs[3].gref = 999_999;
    let id = front.id();
    front.ring.put_request(&encode::rw(OP_WRITE, id, 8, &segs));
    front.push();
    vbd.process().unwrap();
    let r = front.ring.next_response().unwrap();
    assert_eq!((r.id, r.status), (id, RSP_ERROR));
    let st = vbd.guest().stats();
    assert_eq!((st.mapped, st.map_calls), (3, 3), "{st:?}");
    segs[3].gref = good;
    let id = front.id();
    front.ring.put_request(&encode::rw(OP_WRITE, id, 8, &segs));
    front.push();
    vbd.process().unwrap();
    let r = front.ring.next_response().unwrap();
    assert_eq!((r.id, r.status), (id, RSP_OKAY));
    let st = vbd.guest().stats();
    assert_eq!(
        (st.mapped, st.map_calls),
        (4, 4),
        "one more page alone: {st:?}"
    );
    assert_eq!(
        read_dev(&*dev, 8 * 512, 4 * PAGE_SIZE),
        pattern(4 * PAGE_SIZE, 77)
    );
}
