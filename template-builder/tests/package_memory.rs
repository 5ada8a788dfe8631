//! Issue 13.7: a package comes from the network and may be many GiB: opening, verifying
//! and unpacking it must stream, never hold its data region in memory. A counting
//! allocator (this test binary only) measures the peak heap while a 96 MiB image is read
//! back from its package. (Old code: `read_package` read the whole data region into RAM,
//! a peak of at least the 96 MiB; the bound is half of that, as unpacking holds a few
//! chunks per core.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

use template_builder::package::{export_package, read_package, RawImageFile, TemplateMeta};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are
// only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: usize = 1 << 20;
const IMAGE: usize = 96 * MIB;

#[test]
fn reading_a_package_streams_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.img");
    // Incompressible, no zero or repeated chunks: the data region is the image's size.
    // Written a MiB at a time, so the test itself holds no copy.
    let mut want = blake3::Hasher::new();
    {
        let mut f = fs::File::create(&img).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; MIB];
        for _ in 0..IMAGE / MIB {
            for b in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            want.update(&buf);
            f.write_all(&buf).unwrap();
        }
    }
    let pkg = dir.path().join("t.qtpkg");
    let meta = TemplateMeta {
        packages: vec![],
        recipe_hash: "r".into(),
        build_date: "2026-12-01T00:00:00Z".into(),
        kernel_cmdline: String::new(),
    };
    let dev = RawImageFile::open(&img).unwrap();
    export_package("t", &dev, &meta, None, None, &pkg).unwrap();
    drop(dev);
    assert!(fs::metadata(&pkg).unwrap().len() >= IMAGE as u64);

    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let p = read_package(&pkg).unwrap();
    let mut got = blake3::Hasher::new();
    let mut r = p.image_reader();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
    }
    assert_eq!(got.finalize(), want.finalize());
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert!(
        peak < IMAGE / 2,
        "reading a {} MiB package peaked at {} MiB of heap",
        IMAGE / MIB,
        peak / MIB
    );
    eprintln!(
        "peak heap while reading: {:.1} MiB",
        peak as f64 / MIB as f64
    );
}
