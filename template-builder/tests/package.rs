//! Template packages: round trip, damage anywhere refused (naming the region), truncation
//! refused, dedup and zero chunks.

use std::fs;
use std::io::Read;
use std::path::Path;

use template_builder::package::{
    export_package_with, read_package, PackageError, RawImageFile, TemplateMeta,
};

const CHUNK: u64 = 64 << 10;

/// A 16 MiB sparse image: text-like data, a repeated block (dedup), zero runs, holes and
/// a partial last chunk.
fn test_image(path: &Path) -> Vec<u8> {
    let size = (16 << 20) + 12_345;
    let mut img = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, b) in img[..4 << 20].iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Compressible but not trivial: words from a small alphabet.
        *b = if i % 7 == 0 {
            b' '
        } else {
            b'a' + (x % 16) as u8
        };
    }
    let block: Vec<u8> = (0..CHUNK as usize).map(|i| (i * 31 % 251) as u8).collect();
    for k in [6usize, 9, 12] {
        img[k << 20..(k << 20) + CHUNK as usize].copy_from_slice(&block);
    }
    for (i, b) in img[size - 5000..].iter_mut().enumerate() {
        *b = (i % 200) as u8 + 1;
    }
    fs::write(path, &img).unwrap();
    // Punch a hole over a zero region so the export sees a real hole.
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        13 << 20,
        2 << 20,
    )
    .unwrap();
    img
}

fn meta() -> TemplateMeta {
    TemplateMeta {
        packages: vec!["bash=5.2".into(), "systemd=252".into()],
        recipe_hash: "abc".into(),
        build_date: "2026-11-26T00:00:00Z".into(),
        kernel_cmdline: "root=/dev/vda rw console=ttyS0".into(),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    pkg: std::path::PathBuf,
    out: std::path::PathBuf,
    img: Vec<u8>,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = test_image(&d.join("root.img"));
    let kernel: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
    let initrd: Vec<u8> = (0..200_000u32).map(|i| (i % 89) as u8).collect();
    fs::write(d.join("vmlinuz"), &kernel).unwrap();
    fs::write(d.join("initrd.img"), &initrd).unwrap();
    let dev = RawImageFile::open(&d.join("root.img")).unwrap();
    let pkg = d.join("t.qtpkg");
    let stats = export_package_with(
        "t",
        &dev,
        &meta(),
        Some(&d.join("vmlinuz")),
        Some(&d.join("initrd.img")),
        &pkg,
        CHUNK,
    )
    .unwrap();
    assert_eq!(stats.image_bytes, img.len() as u64);
    assert!(stats.dedup_chunks >= 2, "{stats:?}");
    assert!(stats.zero_chunks >= 100, "{stats:?}");
    assert_eq!(stats.fingerprint, blake3::hash(&img).to_hex().to_string());
    assert_eq!(stats.package_bytes, fs::metadata(&pkg).unwrap().len());
    Fixture {
        out: d.join("out"),
        pkg,
        _dir: dir,
        img,
        kernel,
        initrd,
    }
}

#[test]
fn round_trip_gives_identical_bytes() {
    let f = fixture();
    let p = read_package(&f.pkg).unwrap();
    let m = p.manifest();
    assert_eq!(m.name, "t");
    assert_eq!(m.size, f.img.len() as u64);
    assert_eq!(m.packages, meta().packages);
    assert_eq!(m.fingerprint, blake3::hash(&f.img).to_hex().to_string());
    assert!(m.has_kernel() && m.has_initrd());
    let mut back = Vec::new();
    p.image_reader().read_to_end(&mut back).unwrap();
    assert!(back == f.img, "image bytes differ after the round trip");
    assert_eq!(
        fs::read(p.write_kernel(&f.out).unwrap().unwrap()).unwrap(),
        f.kernel
    );
    assert_eq!(
        fs::read(p.write_initrd(&f.out).unwrap().unwrap()).unwrap(),
        f.initrd
    );
    // The package is much smaller than the image: zeros omitted, duplicates stored once.
    assert!(fs::metadata(&f.pkg).unwrap().len() < f.img.len() as u64 / 4);
}

/// Flips one byte at every `step` bytes across the whole file: every flip is refused.
#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let f = fixture();
    let good = fs::read(&f.pkg).unwrap();
    let p = read_package(&f.pkg).unwrap();
    let m = p.manifest().clone();
    drop(p);
    let kernel_at = m.kernel.as_ref().unwrap().offset;
    let initrd_at = m.initrd.as_ref().unwrap().offset;
    let manifest_at = initrd_at + m.initrd.as_ref().unwrap().stored_len;
    let step = (good.len() / 150).max(1);
    let mut offsets: Vec<u64> = (0..good.len() as u64).step_by(step).collect();
    offsets.extend([
        0,
        8,
        20,
        40,
        100,
        127,
        128,
        kernel_at + 10,
        initrd_at + 10,
        manifest_at + 5,
        good.len() as u64 - 1,
    ]);
    let mut seen = std::collections::BTreeSet::new();
    for off in offsets {
        let mut bad = good.clone();
        bad[off as usize] ^= 0x40;
        fs::write(&f.pkg, &bad).unwrap();
        let err = read_package(&f.pkg).expect_err(&format!("flip at {off} accepted"));
        let region = match &err {
            PackageError::NotAPackage { .. } | PackageError::HeaderCorrupt { .. } => "header",
            PackageError::ManifestCorrupt { .. } => "manifest",
            PackageError::ChunkCorrupt { .. } => "chunk",
            PackageError::BlobCorrupt { what, .. } => what,
            other => panic!("flip at {off}: unexpected error {other}"),
        };
        let expected = if off < 128 {
            "header"
        } else if off < kernel_at {
            "chunk"
        } else if off < initrd_at {
            "kernel"
        } else if off < manifest_at {
            "initrd"
        } else {
            "manifest"
        };
        assert_eq!(region, expected, "flip at {off}: {err}");
        seen.insert(region);
        if let PackageError::ChunkCorrupt { chunk, .. } = &err {
            // The named chunk is one whose blob holds the flipped byte.
            let b = m
                .blobs
                .iter()
                .find(|b| b.offset <= off && off < b.offset + b.stored_len)
                .unwrap();
            assert_eq!(
                m.chunk_hashes[*chunk as usize], b.hash,
                "flip at {off}: {err}"
            );
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
}

#[test]
fn truncated_or_extended_file_is_refused() {
    let f = fixture();
    let good = fs::read(&f.pkg).unwrap();
    for len in [0, 50, 128, 5000, good.len() / 2, good.len() - 1] {
        fs::write(&f.pkg, &good[..len]).unwrap();
        let err = read_package(&f.pkg).expect_err(&format!("truncated to {len} accepted"));
        assert!(
            matches!(err, PackageError::Truncated { .. }),
            "{len}: {err}"
        );
    }
    let mut longer = good.clone();
    longer.extend_from_slice(b"junk");
    fs::write(&f.pkg, &longer).unwrap();
    assert!(matches!(
        read_package(&f.pkg).unwrap_err(),
        PackageError::Truncated { .. }
    ));
    fs::write(&f.pkg, b"not a package at all, just text that is long enough to hold a header .................................................................").unwrap();
    assert!(matches!(
        read_package(&f.pkg).unwrap_err(),
        PackageError::NotAPackage { .. }
    ));
}

#[test]
fn image_without_kernel_and_with_odd_size() {
    let dir = tempfile::tempdir().unwrap();
    let img: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 13) as u8).collect();
    fs::write(dir.path().join("i"), &img).unwrap();
    let dev = RawImageFile::open(&dir.path().join("i")).unwrap();
    let pkg = dir.path().join("p");
    export_package_with(
        "odd",
        &dev,
        &TemplateMeta::default(),
        None,
        None,
        &pkg,
        CHUNK,
    )
    .unwrap();
    let p = read_package(&pkg).unwrap();
    assert!(!p.manifest().has_kernel());
    assert_eq!(p.write_kernel(dir.path()).unwrap(), None);
    let mut back = Vec::new();
    p.image_reader().read_to_end(&mut back).unwrap();
    assert!(back == img);
}
