//! Native per-request cost of the blkif backend's userspace path (parse, plan, volume
//! I/O, guest copy through the in-process fake grant table), thin volume vs raw file:
//! splits the pool's cost from the transport's without Xen (the Xen side is
//! `cargo bench -p blkback --bench blkif_xen`). `cargo run --release -p blkback
//! --example blkif_cost` (files in $TMPDIR).
use std::sync::Arc;
use std::time::Instant;

use blkback::blkif::abi::*;
use blkback::blkif::ring::BackRing;
use blkback::blkif::testing::Frontend;
use blkback::blkif::{Vbd, VbdParams};
use blkback::testing::FileDevice;
use storage::{BlockDevice, Pool as _};

fn run(name: &str, dev: Arc<dyn BlockDevice>) {
    let front = Frontend::new(0);
    let mem = front.grants.map_ring(&front.ring_refs).unwrap();
    let ring = BackRing::attach(mem).unwrap();
    let mut vbd = Vbd::new(
        ring,
        front.grants.clone(),
        dev.clone(),
        VbdParams::default(),
    );
    for (label, op, pages, n) in [
        ("write 128K", OP_WRITE, 32usize, 512u64),
        ("read 128K", OP_READ, 32, 512),
        ("write 4K", OP_WRITE, 1, 4096),
        ("read 4K", OP_READ, 1, 4096),
    ] {
        let buf = front.alloc(pages, Some(&vec![0x5a; pages * 4096]));
        let segs = Frontend::page_segments(&buf);
        let bytes: Vec<u8> = segs.iter().flat_map(|s| s.encode()).collect();
        let ind = front.alloc(
            1,
            Some(&{
                let mut b = bytes.clone();
                b.resize(4096, 0);
                b
            }),
        );
        let t = Instant::now();
        for i in 0..n {
            let sector = i * pages as u64 * 8 % (dev.size() / 512 - 256);
            let raw = if pages <= 11 {
                encode::rw(op, i, sector, &segs)
            } else {
                encode::indirect(op, i, sector, pages as u16, &ind.refs)
            };
            let r = vbd.handle(&raw);
            assert_eq!(r.status, RSP_OKAY);
        }
        let el = t.elapsed();
        println!(
            "{name:6} {label:11} {:8.1} us/req {:8.1} MB/s",
            el.as_secs_f64() * 1e6 / n as f64,
            (n as f64 * pages as f64 * 4096.0) / el.as_secs_f64() / 1e6
        );
    }
    dev.flush().unwrap();
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    let fd = FileDevice::create(&raw, 128 << 20).unwrap();
    run("raw", Arc::new(fd));
    let p = storage::ThinPool::create(
        &dir.path().join("pool"),
        storage::ThinOptions {
            chunk_size: 64 << 10,
            capacity: 512 << 20,
        },
    )
    .unwrap();
    p.create_volume("vol", 128 << 20).unwrap();
    p.commit().unwrap();
    let v = p.open_volume("vol", false).unwrap();
    run("thin", v);
}
