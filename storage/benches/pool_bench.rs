//! Thin pool benchmark, side by side with its peers (qemu-img / qcow2, XFS reflink, plain
//! pread/pwrite on the same disk). Run: `cargo bench -p storage --bench pool_bench`.
//! Needs root (loop mount for XFS), qemu-img, mkfs.xfs; scratch space under
//! $POOL_BENCH_DIR (default /var/tmp), about 10 GiB, removed at the end.
//!
//! Prints one table; every figure is measured in this run. `POOL_BENCH_ONLY=snap,io,import`
//! runs some sections only.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::thin::{ThinOptions, ThinPool};
use storage::{ImportOptions, Pool};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CHUNK: u64 = 64 << 10;

struct Table(Vec<[String; 4]>);

impl Table {
    fn row(&mut self, what: &str, ours: String, peer: String, note: String) {
        println!("{what}: ours {ours} | peer {peer} | {note}");
        self.0.push([what.into(), ours, peer, note]);
    }
    fn print(&self) {
        let w: Vec<usize> = (0..4)
            .map(|i| self.0.iter().map(|r| r[i].len()).max().unwrap_or(0).max(6))
            .collect();
        let line = |r: &[String; 4]| {
            format!(
                "| {:w0$} | {:>w1$} | {:>w2$} | {:w3$} |",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3]
            )
        };
        println!();
        println!(
            "{}",
            line(&[
                "measurement".into(),
                "thin (ours)".into(),
                "peer".into(),
                "peer / notes".into()
            ])
        );
        println!(
            "|{}|",
            w.iter()
                .map(|n| "-".repeat(n + 2))
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.0 {
            println!("{}", line(r));
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    run(cmd);
    t.elapsed()
}

/// An endless-looking image: the same non-zero 64 KiB block, `left` bytes of it.
struct Pattern {
    block: Vec<u8>,
    pos: usize,
    left: u64,
}

impl Pattern {
    fn new(len: u64) -> Pattern {
        Pattern {
            block: (0..CHUNK).map(|i| (i % 251) as u8 + 1).collect(),
            pos: 0,
            left: len,
        }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() && self.left > 0 {
            let take = (self.block.len() - self.pos)
                .min(buf.len() - n)
                .min(self.left as usize);
            buf[n..n + take].copy_from_slice(&self.block[self.pos..self.pos + take]);
            self.pos = (self.pos + take) % self.block.len();
            self.left -= take as u64;
            n += take;
        }
        Ok(n)
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The `qubes-ctl` binary next to this bench's target dir (`QUBES_CTL` overrides).
fn qubes_ctl() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("QUBES_CTL") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    // target/release/deps/pool_bench-HASH -> target/release/qubes-ctl
    let p = exe.parent()?.parent()?.join("qubes-ctl");
    p.is_file().then_some(p)
}

/// A snapshot as a user makes one: `qubes-ctl qube clone` of a StandaloneVM whose root
/// is 1 GiB fully mapped, timed as a whole process (start, pool open and lock, two
/// volume snapshots, the catalogue, commit, exit); `qubes-ctl pool info` alone is the
/// process floor. Medians of 11.
fn ctl_snapshot_bench(s: &Path, ctl: &Path) -> (Duration, Duration) {
    let root = s.join("ctl-root");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(ctl);
        c.arg("--root").arg(&root).args(args);
        c
    };
    run(&mut cmd(&["pool", "init", "--size", "4G"]));
    let img = s.join("ctl-root.img");
    {
        let mut f = File::create(&img).unwrap();
        std::io::copy(&mut Pattern::new(GIB), &mut f).unwrap();
    }
    run(cmd(&["template", "create", "t", "--from-image"]).arg(&img));
    std::fs::remove_file(&img).unwrap();
    run(&mut cmd(&[
        "qube",
        "create",
        "sa",
        "--class",
        "StandaloneVM",
        "--template",
        "t",
    ]));
    let mut clone = Vec::new();
    let mut info = Vec::new();
    for i in 0..11 {
        clone.push(timed(&mut cmd(&["qube", "clone", "sa", &format!("sa{i}")])));
        info.push(timed(&mut cmd(&["pool", "info"])));
    }
    std::fs::remove_dir_all(&root).unwrap();
    (median(clone), median(info))
}

fn pool_at(dir: &Path, capacity: u64) -> Arc<ThinPool> {
    let _ = std::fs::remove_dir_all(dir);
    ThinPool::create(
        dir,
        ThinOptions {
            chunk_size: CHUNK,
            capacity,
        },
    )
    .unwrap()
}

fn reopen(pool: Arc<ThinPool>, dir: &Path) -> (Arc<ThinPool>, Duration) {
    drop(pool);
    let t = Instant::now();
    let p = ThinPool::open(dir).unwrap();
    (p, t.elapsed())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = PathBuf::from(std::env::var("POOL_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let scratch = tempfile::Builder::new()
        .prefix("pool-bench-")
        .tempdir_in(&root)
        .unwrap();
    let s = scratch.path();
    let mut t = Table(Vec::new());
    let start = Instant::now();

    let only = std::env::var("POOL_BENCH_ONLY").unwrap_or_default();
    let want = |section: &str| only.is_empty() || only.split(',').any(|x| x == section);
    if want("snap") {
        // ---- Pool with a 64 GiB fully mapped volume: open time and snapshot latency. ----
        let big_dir = s.join("big");
        let pool = pool_at(&big_dir, 16 * GIB);
        let t0 = Instant::now();
        let st = pool
            .import_volume(
                "big",
                &mut Pattern::new(64 * GIB),
                64 * GIB,
                &ImportOptions {
                    dedup: true,
                    dedup_against: None,
                },
            )
            .unwrap();
        pool.commit().unwrap();
        let import64 = t0.elapsed();
        assert_eq!(st.written_chunks, 1);
        let info = pool.info().unwrap();
        println!(
            "mapped 64 GiB in {:.1} s; metadata {} MiB",
            import64.as_secs_f64(),
            info.metadata_used / MIB
        );
        let mut pool = pool;
        let mut opens = Vec::new();
        for _ in 0..11 {
            let (p, d) = reopen(pool, &big_dir);
            pool = p;
            opens.push(d);
        }
        let open1 = median(opens);

        let mut staged = Vec::new();
        let mut committed = Vec::new();
        for i in 0..25 {
            let t0 = Instant::now();
            pool.snapshot("big", &format!("big@{i}")).unwrap();
            staged.push(t0.elapsed());
            pool.commit().unwrap();
            committed.push(t0.elapsed());
        }
        let (snap64, snap64c) = (median(staged), median(committed));

        // 1,000 volumes.
        for i in 25..999 {
            pool.snapshot("big", &format!("big@{i}")).unwrap();
        }
        pool.commit().unwrap();
        assert_eq!(pool.info().unwrap().volumes, 1000);
        let mut opens = Vec::new();
        for _ in 0..11 {
            let (p, d) = reopen(pool, &big_dir);
            pool = p;
            opens.push(d);
        }
        let open1000 = median(opens);
        let list = {
            let t0 = Instant::now();
            assert_eq!(pool.list_volumes().unwrap().len(), 1000);
            t0.elapsed()
        };
        drop(pool);
        std::fs::remove_dir_all(&big_dir).unwrap();

        // 1 GiB fully mapped.
        let small_dir = s.join("small");
        let pool = pool_at(&small_dir, 4 * GIB);
        pool.import_volume(
            "v",
            &mut Pattern::new(GIB),
            GIB,
            &ImportOptions {
                dedup: true,
                dedup_against: None,
            },
        )
        .unwrap();
        pool.commit().unwrap();
        let mut staged = Vec::new();
        let mut committed = Vec::new();
        for i in 0..25 {
            let t0 = Instant::now();
            pool.snapshot("v", &format!("v@{i}")).unwrap();
            staged.push(t0.elapsed());
            pool.commit().unwrap();
            committed.push(t0.elapsed());
        }
        let (snap1, snap1c) = (median(staged), median(committed));
        drop(pool);
        std::fs::remove_dir_all(&small_dir).unwrap();

        let ctl = qubes_ctl().map(|c| ctl_snapshot_bench(s, &c));

        // qemu-img overlays on a 1 GiB / 64 GiB base with all L2 tables allocated.
        let qemu_create = |size: &str| {
            let base = s.join(format!("base-{size}.qcow2"));
            run(Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "preallocation=metadata",
                ])
                .arg(&base)
                .arg(size));
            let mut v = Vec::new();
            for i in 0..11 {
                let ovl = s.join(format!("ovl-{size}-{i}.qcow2"));
                v.push(timed(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-b"])
                        .arg(&base)
                        .args(["-F", "qcow2"])
                        .arg(&ovl),
                ));
                std::fs::remove_file(&ovl).unwrap();
            }
            std::fs::remove_file(&base).unwrap();
            median(v)
        };
        let q1 = qemu_create("1G");
        let q64 = qemu_create("64G");

        // cp --reflink=always on XFS (loop-mounted 8 GiB image).
        let (r1, r64, r64_extents) = reflink_bench(s);
        t.row(
            "snapshot 1 GiB mapped (staged / +commit)",
            format!("{} / {}", ms(snap1), ms(snap1c)),
            format!("qemu-img create -b {} / reflink {}", ms(q1), ms(r1)),
            "median of 25 (ours) / 11 (qemu, incl. process start) / 5 (cp)".into(),
        );
        match ctl {
            Some((clone, info)) => t.row(
                "snapshot 1 GiB mapped, whole `qubes-ctl` process",
                ms(clone),
                format!("qemu-img create -b {} / cp --reflink {}", ms(q1), ms(r1)),
                format!(
                    "`qube clone` of a StandaloneVM (root 1 GiB mapped + private): process start, \
                     pool open, 2 snapshots, catalogue, commit; `pool info` alone {}; median of 11",
                    ms(info)
                ),
            ),
            None => t.row(
                "snapshot 1 GiB mapped, whole `qubes-ctl` process",
                "-".into(),
                "-".into(),
                "not run: build qubes-ctl first (cargo build --release -p qubes-ctl) or set QUBES_CTL"
                    .into(),
            ),
        }
        t.row(
            "snapshot 64 GiB mapped (staged / +commit)",
            format!("{} / {}", ms(snap64), ms(snap64c)),
            format!("qemu-img create -b {} / reflink {}", ms(q64), ms(r64)),
            format!("reflink file: 64 GiB sparse, {r64_extents} allocated 64 KiB extents"),
        );
        t.row(
            "pool open, 1 volume, 64 GiB mapped",
            ms(open1),
            "-".into(),
            "median of 11; target < 20 ms".into(),
        );
        t.row(
            "pool open, 1000 volumes, 64 GiB mapped",
            ms(open1000),
            "-".into(),
            format!("list_volumes {}", ms(list)),
        );

        t.row(
            "map 64 GiB (import of a repeated pattern)",
            format!("{:.1} s", import64.as_secs_f64()),
            "-".into(),
            "setup for the 64 GiB rows; blake3 fingerprint over all 64 GiB".into(),
        );
    }
    if want("io") {
        // ---- Sequential 1 MiB I/O vs plain pread/pwrite on the same disk. ----
        let seq_dir = s.join("seq");
        let pool = pool_at(&seq_dir, 4 * GIB);
        pool.create_volume("seq", GIB).unwrap();
        let vol = pool.open_volume("seq", false).unwrap();
        let plain_path = s.join("plain.raw");
        let plain = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&plain_path)
            .unwrap();
        let mut buf = vec![0u8; MIB as usize];
        Rng(7).fill(&mut buf);
        let seq_write = |w: &dyn Fn(&[u8], u64), sync: &dyn Fn()| {
            let t0 = Instant::now();
            for i in 0..GIB / MIB {
                w(&buf, i * MIB);
            }
            sync();
            GIB as f64 / t0.elapsed().as_secs_f64() / MIB as f64
        };
        // Fresh (allocating) writes, then overwrites in the other order.
        let plain_w = seq_write(&|b, o| plain.write_all_at(b, o).unwrap(), &|| {
            plain.sync_data().unwrap()
        });
        let ours_w = seq_write(&|b, o| vol.write_at(b, o).unwrap(), &|| {
            vol.flush().unwrap()
        });
        let ours_w2 = seq_write(&|b, o| vol.write_at(b, o).unwrap(), &|| {
            vol.flush().unwrap()
        });
        let plain_w2 = seq_write(&|b, o| plain.write_all_at(b, o).unwrap(), &|| {
            plain.sync_data().unwrap()
        });
        let mut rbuf = vec![0u8; MIB as usize];
        let mut seq_read = |r: &mut dyn FnMut(&mut [u8], u64)| {
            let t0 = Instant::now();
            for i in 0..GIB / MIB {
                r(&mut rbuf, i * MIB);
            }
            GIB as f64 / t0.elapsed().as_secs_f64() / MIB as f64
        };
        let plain_r = seq_read(&mut |b, o| plain.read_exact_at(b, o).unwrap());
        let ours_r = seq_read(&mut |b, o| vol.read_at(b, o).unwrap());
        let ours_r = ours_r.max(seq_read(&mut |b, o| vol.read_at(b, o).unwrap()));
        let plain_r = plain_r.max(seq_read(&mut |b, o| plain.read_exact_at(b, o).unwrap()));
        t.row(
            "sequential 1 MiB write, fresh 1 GiB + flush",
            format!("{ours_w:.0} MiB/s"),
            format!("pwrite {plain_w:.0} MiB/s"),
            format!("ratio {:.0}% (target >= 70%)", 100.0 * ours_w / plain_w),
        );
        t.row(
            "sequential 1 MiB overwrite, 1 GiB + flush",
            format!("{ours_w2:.0} MiB/s"),
            format!("pwrite {plain_w2:.0} MiB/s"),
            format!("ratio {:.0}%", 100.0 * ours_w2 / plain_w2),
        );
        t.row(
            "sequential 1 MiB read, 1 GiB (page cache)",
            format!("{ours_r:.0} MiB/s"),
            format!("pread {plain_r:.0} MiB/s"),
            format!("ratio {:.0}%, best of 2", 100.0 * ours_r / plain_r),
        );

        // ---- 4 KiB writes: into a fresh snapshot (copy-on-write) vs into the origin. ----
        const N: u64 = 20_000;
        let mut rng = Rng(99);
        let offsets: Vec<u64> = (0..N).map(|_| rng.next() % (GIB / 4096) * 4096).collect();
        let small = vec![0x5Au8; 4096];
        // IOPS without and with the final flush (a pool commit: fdatasync + metadata).
        let iops = |vol: &dyn storage::BlockDevice, offs: &mut dyn Iterator<Item = u64>| {
            let t0 = Instant::now();
            let mut n = 0;
            for o in offs {
                vol.write_at(&small, o).unwrap();
                n += 1;
            }
            let writes = t0.elapsed();
            vol.flush().unwrap();
            (
                n as f64 / writes.as_secs_f64(),
                n as f64 / t0.elapsed().as_secs_f64(),
            )
        };
        let origin = iops(&*vol, &mut offsets.iter().copied());
        pool.snapshot("seq", "seq@1").unwrap();
        pool.commit().unwrap();
        let snap = pool.open_volume("seq@1", false).unwrap();
        let cow = iops(&*snap, &mut offsets.iter().copied());
        pool.snapshot("seq", "seq@2").unwrap();
        pool.commit().unwrap();
        let snap2 = pool.open_volume("seq@2", false).unwrap();
        let cow_seq = iops(&*snap2, &mut (0..N).map(|i| i * 4096));
        let data_used = pool.info().unwrap().data_used;
        drop((vol, snap, snap2, pool));

        // qemu-img bench on a qcow2 overlay of a fully allocated base (the same 1 GiB).
        let base = s.join("base.qcow2");
        run(Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&plain_path)
            .arg(&base));
        let qbench = |cache: &str, extended: bool| -> f64 {
            let ovl = s.join("bench-ovl.qcow2");
            let mut c = Command::new("qemu-img");
            c.args(["create", "-q", "-f", "qcow2", "-b"])
                .arg(&base)
                .args(["-F", "qcow2"]);
            if extended {
                c.args(["-o", "extended_l2=on"]);
            }
            run(c.arg(&ovl));
            let out = run(Command::new("qemu-img")
                .args([
                    "bench", "-f", "qcow2", "-w", "-t", cache, "-s", "4k", "-d", "1", "-c",
                ])
                .arg(N.to_string())
                .arg(&ovl));
            std::fs::remove_file(&ovl).unwrap();
            let secs: f64 = out
                .split("Run completed in ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("unexpected qemu-img bench output: {out}"));
            N as f64 / secs
        };
        let q_wb = qbench("writeback", false);
        let q_none = qbench("none", false);
        let q_wb_x = qbench("writeback", true);
        let q_none_x = qbench("none", true);
        t.row(
            "4 KiB random writes into the origin",
            format!("{:.0} IOPS ({:.0} w/ flush)", origin.0, origin.1),
            "-".into(),
            "1 GiB fully mapped volume, chunks exclusive: in place".into(),
        );
        // qemu-img bench writes sequentially only: its figures go in the sequential row,
        // where the pattern is the same; the random row has no peer.
        t.row(
            "4 KiB random writes into a fresh snapshot",
            format!("{:.0} IOPS ({:.0} w/ flush)", cow.0, cow.1),
            "-".into(),
            format!(
                "{:.0}% of origin; qemu-img bench has no random pattern (see next row)",
                100.0 * cow.0 / origin.0
            ),
        );
        t.row(
            "4 KiB sequential writes into a fresh snapshot",
            format!("{:.0} IOPS ({:.0} w/ flush)", cow_seq.0, cow_seq.1),
            format!("qcow2 {q_wb:.0} / extended_l2 {q_wb_x:.0} IOPS"),
            format!(
                "same pattern (sequential 4k, depth 1, {N} writes, one thread) and cache \
                 (host page cache: ours buffered pwrite, qemu-img bench -t writeback; \
                 its timed run issues no flush (no --flush-interval): compare with ours without); with O_DIRECT \
                 (-t none) qcow2 {q_none:.0} / extended_l2 {q_none_x:.0}; pool data now {} MiB",
                data_used / MIB
            ),
        );
        std::fs::remove_dir_all(&seq_dir).unwrap();
        std::fs::remove_file(&base).unwrap();
        std::fs::remove_file(&plain_path).unwrap();
    }
    if want("import") {
        // ---- Import of a realistic 2 GiB image. ----
        let img_path = s.join("image.raw");
        {
            let mut f =
                std::io::BufWriter::with_capacity(8 << 20, File::create(&img_path).unwrap());
            let mut rng = Rng(12345);
            let mut chunk = vec![0u8; CHUNK as usize];
            let dups: Vec<Vec<u8>> = (0..16)
                .map(|_| {
                    let mut c = vec![0u8; CHUNK as usize];
                    rng.fill(&mut c);
                    c
                })
                .collect();
            for _ in 0..2 * GIB / CHUNK {
                match rng.next() % 100 {
                    0..=29 => f.write_all(&[0u8; CHUNK as usize]).unwrap(),
                    30..=39 => f.write_all(&dups[(rng.next() % 16) as usize]).unwrap(),
                    _ => {
                        rng.fill(&mut chunk);
                        f.write_all(&chunk).unwrap();
                    }
                }
            }
            f.into_inner().unwrap().sync_all().unwrap();
        }
        let imp_dir = s.join("import");
        let pool = pool_at(&imp_dir, 4 * GIB);
        let mut img = File::open(&img_path).unwrap();
        let t0 = Instant::now();
        let st = pool
            .import_volume(
                "img",
                &mut img,
                2 * GIB,
                &ImportOptions {
                    dedup: true,
                    dedup_against: None,
                },
            )
            .unwrap();
        let imp = t0.elapsed();
        pool.commit().unwrap();
        let imp_c = t0.elapsed();
        let info = pool.info().unwrap();
        let mapped = pool.volume("img").unwrap().mapped;
        let b3 = {
            let mut f = File::open(&img_path).unwrap();
            let mut h = blake3::Hasher::new();
            let mut b = vec![0u8; 32 << 20];
            let t0 = Instant::now();
            loop {
                let n = f.read(&mut b).unwrap();
                if n == 0 {
                    break;
                }
                h.update_rayon(&b[..n]);
            }
            assert_eq!(h.finalize().to_hex().as_str(), st.fingerprint);
            t0.elapsed()
        };
        t.row(
            "import 2 GiB image (30% zero, 10% dup)",
            format!("{:.2} GB/s", 2.0 * GIB as f64 / imp.as_secs_f64() / 1e9),
            format!(
                "blake3 alone {:.2} GB/s",
                2.0 * GIB as f64 / b3.as_secs_f64() / 1e9
            ),
            format!(
                "+commit (fdatasync) {:.2} GB/s; {} zero, {} dedup, {} written chunks",
                2.0 * GIB as f64 / imp_c.as_secs_f64() / 1e9,
                st.zero_chunks,
                st.dedup_chunks,
                st.written_chunks
            ),
        );
        t.row(
            "metadata bytes per mapped data",
            format!("{:.4}%", 100.0 * info.metadata_used as f64 / mapped as f64),
            "-".into(),
            format!(
                "{} KiB metadata for {} MiB mapped (target <= 0.1%)",
                info.metadata_used >> 10,
                mapped / MIB
            ),
        );
        drop(pool);
    }
    t.print();
    println!(
        "\ntotal benchmark time {:.0} s",
        start.elapsed().as_secs_f64()
    );
}

/// Times `cp --reflink=always` of a 1 GiB allocated file and of a 64 GiB sparse file with
/// many allocated extents, on a loop-mounted XFS image. Returns (1 GiB, 64 GiB, extents).
fn reflink_bench(s: &Path) -> (Duration, Duration, u64) {
    let img = s.join("xfs.img");
    let mnt = s.join("xfs");
    std::fs::create_dir_all(&mnt).unwrap();
    File::create(&img).unwrap().set_len(8 * GIB).unwrap();
    run(Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let result = std::panic::catch_unwind(|| {
        let f1 = mnt.join("one");
        run(Command::new("fallocate").args(["-l", "1G"]).arg(&f1));
        let f64 = mnt.join("sixtyfour");
        let f = File::create(&f64).unwrap();
        f.set_len(64 * GIB).unwrap();
        let extents = 32768u64;
        for i in 0..extents {
            rustix::fs::fallocate(
                &f,
                rustix::fs::FallocateFlags::empty(),
                i * 2 * MIB,
                64 << 10,
            )
            .unwrap();
        }
        f.sync_all().unwrap();
        let copy = |src: &Path| {
            let mut v = Vec::new();
            for _ in 0..5 {
                let dst = mnt.join("copy");
                v.push(timed(
                    Command::new("cp")
                        .arg("--reflink=always")
                        .arg(src)
                        .arg(&dst),
                ));
                std::fs::remove_file(&dst).unwrap();
            }
            median(v)
        };
        (copy(&f1), copy(&f64), extents)
    });
    run(Command::new("umount").arg(&mnt));
    std::fs::remove_file(&img).unwrap();
    result.unwrap_or_else(|e| std::panic::resume_unwind(e))
}
