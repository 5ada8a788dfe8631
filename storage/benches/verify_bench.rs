//! Guest I/O while `pool verify` walks a pool of 1,000 volumes, against the same I/O on
//! an idle pool. Run: `cargo bench -p storage --bench verify_bench`. Scratch space under
//! $POOL_BENCH_DIR (default /var/tmp), about 1 GiB, removed at the end.
//!
//! Each volume has map pages of its own (one written 4 KiB chunk per map leaf), so the
//! walk reads about 100,000 metadata pages. The I/O: 4 threads of random 4 KiB reads
//! and writes (half each) on one 1 GiB volume, for a fixed time; verify runs in a loop
//! meanwhile. Prints IOPS idle, IOPS during verify, and the time of one verify.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::thin::{ThinOptions, ThinPool};
use storage::Pool;

const VOLUMES: u64 = 1000;
const CS: u64 = 4096;
const LEAF_SPAN: u64 = 168 * CS;
const LEAVES: u64 = 100;
const RUN: Duration = Duration::from_secs(5);

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn io_rate(pool: &Arc<ThinPool>, stop_verify: Option<&AtomicBool>) -> f64 {
    let ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (pool, ops, stop) = (pool.clone(), ops.clone(), stop.clone());
            std::thread::spawn(move || {
                let v = pool.open_volume("hot", false).unwrap();
                let blocks = v.size() / 4096;
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                let mut buf = vec![t as u8 | 1; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let r = rng(&mut seed);
                    let off = (r % blocks) * 4096;
                    if r & (1 << 40) != 0 {
                        v.write_at(&buf, off).unwrap();
                    } else {
                        v.read_at(&mut buf, off).unwrap();
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let n = ops.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    if let Some(s) = stop_verify {
        s.store(true, Ordering::Relaxed);
    }
    for t in threads {
        t.join().unwrap();
    }
    n as f64 / secs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = std::env::var("POOL_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("verify-bench")
        .tempdir_in(base)
        .unwrap();
    let pool = ThinPool::create(
        &dir.path().join("pool"),
        ThinOptions {
            chunk_size: CS,
            capacity: 8 << 30,
        },
    )
    .unwrap();
    let t0 = Instant::now();
    let block = vec![0x5au8; CS as usize];
    for i in 0..VOLUMES {
        let k = format!("vol{i}");
        pool.create_volume(&k, LEAVES * LEAF_SPAN).unwrap();
        let v = pool.open_volume(&k, false).unwrap();
        for l in 0..LEAVES {
            v.write_at(&block, l * LEAF_SPAN).unwrap();
        }
    }
    pool.create_volume("hot", 1 << 30).unwrap();
    // The hot volume fully mapped: random writes overwrite in place, reads hit data.
    let hot = pool.open_volume("hot", false).unwrap();
    let mib = vec![0x33u8; 1 << 20];
    for m in 0..1024u64 {
        hot.write_at(&mib, m << 20).unwrap();
    }
    drop(hot);
    pool.commit().unwrap();
    println!(
        "setup: {VOLUMES} volumes x {LEAVES} map leaves, 1 GiB hot volume, in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let r = pool.verify().unwrap();
    let one = t.elapsed();
    assert!(r.is_clean(), "{r:?}");
    println!(
        "one verify: {:.2} s ({} volumes, {} metadata pages)",
        one.as_secs_f64(),
        r.volumes,
        r.metadata_pages
    );

    let idle = io_rate(&pool, None);
    let stop = Arc::new(AtomicBool::new(false));
    let verifies = Arc::new(AtomicU64::new(0));
    let verifier = {
        let (pool, stop, verifies) = (pool.clone(), stop.clone(), verifies.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert!(pool.verify().unwrap().is_clean());
                verifies.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let busy = io_rate(&pool, Some(&stop));
    verifier.join().unwrap();
    println!();
    println!("| random 4 KiB I/O, 4 threads, 50% writes | IOPS |");
    println!("|---|---|");
    println!("| idle pool | {idle:.0} |");
    println!(
        "| during verify ({} walks of {VOLUMES} volumes in {} s) | {busy:.0} ({:.2}x idle) |",
        verifies.load(Ordering::Relaxed),
        RUN.as_secs(),
        busy / idle
    );
}
