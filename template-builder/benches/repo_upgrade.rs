//! Incremental template upgrade through a signed repository: bytes transferred and pool
//! bytes added, against the full package size.
//!
//! Images: an ext4 image made by `mke2fs -d` from a real file tree (default /usr/share,
//! or TB_REPO_BENCH_TREE), as version 1; version 2 is a copy with files added by
//! `debugfs -w` (a few "packages": about TB_REPO_BENCH_ADD_MB MiB, default 16, taken
//! from /usr/lib/x86_64-linux-gnu), so ext4 allocates blocks and rewrites bitmaps,
//! inode tables and directories as an install would. A Debian build is not used here
//! because bootstrapping one takes too long for a benchmark run.
//!
//! The client holds version 1 in a real thin pool; the upgrade runs the same library
//! path as `qubes-ctl template upgrade` (index check, manifest, missing chunks only,
//! import deduplicated against the old root) against the repository as a local path.
//!
//! Run: `cargo bench -p template-builder --bench repo_upgrade`

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use storage::{ImportOptions, Pool, ThinOptions, ThinPool};
use template_builder::package::{export_package, RawImageFile, TemplateMeta};
use template_builder::repo::{self, DeviceChunks, PackageFetch, TrustStore};
use template_builder::FingerprintReader;

const WORK: &str = "/var/tmp/tb-repo-bench";

fn run(c: &mut Command) {
    let out = c.output().expect("running a tool");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn main() {
    let tree = std::env::var("TB_REPO_BENCH_TREE").unwrap_or_else(|_| "/usr/share".into());
    let add_mb: u64 = std::env::var("TB_REPO_BENCH_ADD_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let work = Path::new(WORK);
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).unwrap();
    let (v1, v2) = (work.join("v1.img"), work.join("v2.img"));

    let t = Instant::now();
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-E"])
        .arg("hash_seed=6b8f2a9e-1d43-4c6a-9b1e-0c2d3e4f5a6b,root_owner=0:0")
        .args(["-U", "0b6e9c7a-5a8e-4f4b-8d2a-3c1e5f7a9b0d", "-d", &tree])
        .arg(&v1)
        .arg("2G"));
    fs::copy(&v1, &v2).unwrap();
    // "Install a few packages": files from another tree, into a new directory.
    let mut cmds = String::from("mkdir /added\n");
    let mut added = 0u64;
    let mut files: Vec<_> = fs::read_dir("/usr/lib/x86_64-linux-gnu")
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .collect();
    files.sort_by_key(|e| e.file_name());
    for e in files {
        let len = e.metadata().unwrap().len();
        if len < (64 << 10) || added + len > add_mb << 20 {
            continue;
        }
        added += len;
        cmds.push_str(&format!(
            "write {} /added/{}\n",
            e.path().display(),
            e.file_name().to_string_lossy()
        ));
    }
    fs::write(work.join("cmds"), &cmds).unwrap();
    run(Command::new("debugfs")
        .args(["-w", "-f"])
        .arg(work.join("cmds"))
        .arg(&v2));
    println!(
        "images: ext4 of {tree} (2 GiB), v2 adds {:.1} MiB of files; made in {:.1}s",
        mib(added),
        t.elapsed().as_secs_f64()
    );

    // Publisher: two packages in a signed repository.
    let key = work.join("key");
    repo::keygen(&key).unwrap();
    let rdir = work.join("repo");
    repo::repo_init(&rdir, &key, 30).unwrap();
    let meta = TemplateMeta::default();
    let mut sizes = Vec::new();
    for (ver, img) in [("1", &v1), ("2", &v2)] {
        let pkg = work.join(format!("deb-{ver}.qtpl"));
        let t = Instant::now();
        let st = export_package(
            "deb",
            &RawImageFile::open(img).unwrap(),
            &meta,
            None,
            None,
            &pkg,
        )
        .unwrap();
        println!(
            "package v{ver}: {:.1} MiB ({} stored chunks, exported in {:.1}s)",
            mib(st.package_bytes),
            st.stored_chunks,
            t.elapsed().as_secs_f64()
        );
        repo::repo_add(&rdir, &key, &pkg, ver, 30).unwrap();
        sizes.push(st.package_bytes);
        fs::remove_file(&pkg).unwrap();
    }

    // Used bytes and changed bytes between the images, at 4 KiB.
    let (a, b) = (fs::read(&v1).unwrap(), fs::read(&v2).unwrap());
    let used = b.chunks(4096).filter(|c| c.iter().any(|&x| x != 0)).count() as u64 * 4096;
    let changed = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count() as u64
        * 4096;
    drop((a, b));

    // Client: v1 in a thin pool, then the upgrade.
    let pool = ThinPool::create(
        &work.join("pool"),
        ThinOptions {
            chunk_size: 64 << 10,
            capacity: 8 << 30,
        },
    )
    .unwrap();
    let size1 = fs::metadata(&v1).unwrap().len();
    pool.import_volume(
        "deb-v1",
        &mut fs::File::open(&v1).unwrap(),
        size1,
        &ImportOptions {
            dedup: true,
            dedup_against: None,
        },
    )
    .unwrap();
    pool.commit().unwrap();
    let used_before = pool.info().unwrap().data_used;

    let t = Instant::now();
    let mut trust = TrustStore::default();
    trust.trust(&repo::load_public(&repo::pub_path(&key)).unwrap());
    let r = repo::open_repo(rdir.to_str().unwrap(), &mut trust, repo::now_secs()).unwrap();
    let entry = r
        .index
        .packages
        .iter()
        .find(|e| e.version == "2")
        .unwrap()
        .clone();
    let mut fetch = PackageFetch::start(&r, &entry, &work.join("cache"), false).unwrap();
    let m = fetch.manifest.clone();
    let old = pool.open_volume("deb-v1", true).unwrap();
    let local = DeviceChunks::scan(old.as_ref(), m.chunk_size).unwrap();
    let need = repo::missing_blobs(&m, &local);
    fetch.fetch_blobs(&need).unwrap();
    let mut reader =
        FingerprintReader::new(fetch.image_reader(&local), m.size, &m.fingerprint, "v2");
    let stats = pool
        .import_volume(
            "deb-v2",
            &mut reader,
            m.size,
            &ImportOptions {
                dedup: true,
                dedup_against: Some("deb-v1".into()),
            },
        )
        .unwrap();
    pool.commit().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(stats.fingerprint, m.fingerprint);
    let added_pool = pool.info().unwrap().data_used - used_before;
    let full = sizes[1];
    println!(
        "used bytes {:.1} MiB; changed between versions {:.1} MiB ({:.2}% of used)",
        mib(used),
        mib(changed),
        100.0 * changed as f64 / used as f64
    );
    println!(
        "upgrade v1 -> v2: fetched {:.2} MiB in {} requests = {:.2}% of the {:.1} MiB package \
         ({} of {} blobs); pool bytes added {:.2} MiB ({:.2}% of the package); {:.1}s",
        mib(fetch.fetched_bytes),
        fetch.requests,
        100.0 * fetch.fetched_bytes as f64 / full as f64,
        mib(full),
        need.len(),
        m.blobs.len(),
        mib(added_pool),
        100.0 * added_pool as f64 / full as f64,
        secs
    );

    let _ = fs::remove_dir_all(work);
}
