//! Template package export/import against the usual peers, same run, same images:
//! `qemu-img convert -c -O qcow2` and `zstd -3` (both directions).
//!
//! Images: the Debian minimal image the tests cached under /var/tmp/qubes-ctl-test-cache
//! (or TB_BENCH_IMAGE=path), and a synthetic 1 GiB image with realistic content (text,
//! incompressible runs, repeated blocks, zeros and holes).
//!
//! Run: `cargo bench -p template-builder --bench package_bench`

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use template_builder::package::{export_package, read_package, RawImageFile, TemplateMeta};

const WORK: &str = "/var/tmp/tb-bench";

fn find_debian_image() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TB_BENCH_IMAGE") {
        return Some(PathBuf::from(p));
    }
    for sub in ["a", "b"] {
        let builds = Path::new("/var/tmp/qubes-ctl-test-cache")
            .join(sub)
            .join("builds");
        for e in fs::read_dir(&builds).ok()?.flatten() {
            let img = e.path().join("root.img");
            if img.exists() && e.path().join("build.json").exists() {
                return Some(img);
            }
        }
    }
    None
}

/// 1 GiB: 25% text-like, 8% incompressible, 12% copies of earlier blocks, rest zeros
/// (half of them holes), in 1 MiB extents scattered like a used filesystem.
fn synthetic_image(path: &Path) {
    if fs::metadata(path)
        .map(|m| m.len() == 1 << 30)
        .unwrap_or(false)
    {
        return;
    }
    let mut f = fs::File::create(path).unwrap();
    f.set_len(1 << 30).unwrap();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: Vec<&[u8]> = "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her she there would their we him been has when who will more no if out so said what up its about into than them can only other new some could time these two may then do first any my now such like our over man me even most made after also did many before must through back years where much your way well down should because each just those people how too little state good very make world still own see men work long get here between both life being under never day same another know while last might us great old year off come since against go came right used take three".split(' ').map(str::as_bytes).collect();
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    use std::os::unix::fs::FileExt;
    for mb in 0..1024u64 {
        let kind = rnd() % 100;
        let fill = match kind {
            0..=24 => {
                let mut o = 0;
                while o < buf.len() {
                    let w = words[(rnd() % words.len() as u64) as usize];
                    let n = w.len().min(buf.len() - o);
                    buf[o..o + n].copy_from_slice(&w[..n]);
                    o += n;
                    if o < buf.len() {
                        buf[o] = if rnd() % 12 == 0 { b'\n' } else { b' ' };
                        o += 1;
                    }
                }
                true
            }
            25..=32 => {
                for c in buf.chunks_mut(8) {
                    let v = rnd().to_le_bytes();
                    c.copy_from_slice(&v[..c.len()]);
                }
                true
            }
            33..=44 if !kept.is_empty() => {
                let k = (rnd() % kept.len() as u64) as usize;
                buf.copy_from_slice(&kept[k]);
                true
            }
            45..=70 => {
                buf.fill(0);
                true
            }
            _ => false,
        };
        if fill {
            f.write_all_at(&buf, mb << 20).unwrap();
            if kind <= 32 && kept.len() < 64 {
                kept.push(buf.clone());
            }
        }
    }
    f.flush().unwrap();
}

fn used_bytes(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// CPU seconds (user + system) of this process and its waited-for children.
fn cpu_seconds() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage only writes the struct we pass, which is plain data.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        total += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    total
}

/// Wall seconds and CPU seconds. The machine is shared, so wall time swings with the
/// load; CPU seconds say what the work itself costs.
fn time<T>(f: impl FnOnce() -> T) -> (T, (f64, f64)) {
    let (t, c) = (Instant::now(), cpu_seconds());
    let r = f();
    (r, (t.elapsed().as_secs_f64(), cpu_seconds() - c))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn drop_caches() {
    // Not dropping the page cache: every tool reads the same warm image, which keeps the
    // comparison about CPU work, as it would be for a freshly built image.
}

struct Row {
    tool: &'static str,
    bytes: u64,
    export_s: (f64, f64),
    import_s: (f64, f64),
}

fn bench(label: &str, img: &Path) {
    let size = fs::metadata(img).unwrap().len();
    let used = used_bytes(img);
    let out = Path::new(WORK);
    let mut rows = Vec::new();

    drop_caches();
    let dev = RawImageFile::open(img).unwrap();
    let pkg = out.join("bench.qtpkg");
    let (stats, ex) =
        time(|| export_package(label, &dev, &TemplateMeta::default(), None, None, &pkg).unwrap());
    let (n, im) = time(|| {
        let p = read_package(&pkg).unwrap();
        let mut r = p.image_reader();
        let mut buf = vec![0u8; 8 << 20];
        let mut n = 0u64;
        loop {
            let k = r.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    assert_eq!(n, size);
    rows.push(Row {
        tool: "qtpkg (this crate)",
        bytes: stats.package_bytes,
        export_s: ex,
        import_s: im,
    });

    let qcow = out.join("bench.qcow2");
    let back = out.join("bench.back.raw");
    let (_, ex) = time(|| {
        run(Command::new("qemu-img")
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(img)
            .arg(&qcow))
    });
    let (_, im) = time(|| {
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&qcow)
            .arg(&back))
    });
    rows.push(Row {
        tool: "qemu-img convert -c qcow2",
        bytes: fs::metadata(&qcow).unwrap().len(),
        export_s: ex,
        import_s: im,
    });
    let _ = fs::remove_file(&back);

    let zst = out.join("bench.raw.zst");
    for (tool, threads) in [
        ("zstd -3 (1 thread)", "-T1"),
        ("zstd -3 -T0 (2 cores)", "-T0"),
    ] {
        let (_, ex) = time(|| {
            run(Command::new("zstd")
                .args(["-3", "-q", "-f", threads])
                .arg(img)
                .arg("-o")
                .arg(&zst))
        });
        let (_, im) = time(|| {
            run(Command::new("sh")
                .arg("-c")
                .arg(format!("zstd -d -q -c {} > /dev/null", zst.display())))
        });
        rows.push(Row {
            tool,
            bytes: fs::metadata(&zst).unwrap().len(),
            export_s: ex,
            import_s: im,
        });
    }
    for p in [&pkg, &qcow, &zst] {
        let _ = fs::remove_file(p);
    }

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!();
    println!(
        "## {label}: image {:.0} MiB, used {:.0} MiB; chunks {} (zero {}, dedup {}, stored {})",
        mib(size),
        mib(used),
        stats.chunks,
        stats.zero_chunks,
        stats.dedup_chunks,
        stats.stored_chunks
    );
    println!("| tool | output MiB | % of used | export wall s | export MB/s | export CPU s | MB per CPU s | import wall s | import MB/s | import CPU s | MB per CPU s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mb = size as f64 / 1e6;
    for r in rows {
        println!(
            "| {} | {:.1} | {:.1}% | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
            r.tool,
            mib(r.bytes),
            100.0 * r.bytes as f64 / used as f64,
            r.export_s.0,
            mb / r.export_s.0,
            r.export_s.1,
            mb / r.export_s.1,
            r.import_s.0,
            mb / r.import_s.0,
            r.import_s.1,
            mb / r.import_s.1,
        );
    }
    let _ = std::io::stdout().flush();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    for tool in ["qemu-img", "zstd"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "{tool} is missing: run scripts/install-deps.sh");
    }
    fs::create_dir_all(WORK).unwrap();
    println!(
        "MB/s are image bytes (MB = 10^6) per second of wall time; {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    match find_debian_image() {
        Some(img) => bench("debian-12-minimal", &img),
        None => println!("\n(no cached Debian image: run `cargo test -p template-builder --test debian_build` first, or set TB_BENCH_IMAGE)"),
    }
    let syn = Path::new(WORK).join("synthetic-1g.img");
    synthetic_image(&syn);
    bench("synthetic 1 GiB", &syn);
}
