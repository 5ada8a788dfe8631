//! fio (ioengine=nbd) against this server and its peers, side by side:
//!
//! * blkback on a 1 GiB volume (thin pool when available, and the sparse-file double),
//!   and on a fresh thin snapshot of it (copy-on-write against the qcow2 overlay's),
//! * `qemu-nbd -f raw --cache=writeback` on a raw file with the same bytes,
//! * `qemu-nbd -f qcow2` on a fresh qcow2 overlay of that raw file,
//! * `nbdkit file` on the raw file,
//!
//! for sequential 1 MiB read/write (iodepth 4) and random 4 KiB read/write (iodepth 32),
//! with 1 and 4 connections, `NBD_BENCH_SECS` (default 5) seconds each. Prints MB/s, IOPS
//! and the ratios against each peer. `NBD_BENCH_SIZE_MIB` (default 1024) sizes the volume.
//! Every server is a separate process except blkback, which runs in this process.
//! `NBD_BENCH_ONLY` / `NBD_BENCH_WORKLOAD` restrict the run to servers / workloads whose
//! names contain one of the given comma-separated texts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkback::testing::FileDevice;
use blkback::{nbd_uri, Export, NbdServer};
use storage::BlockDevice;

struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "seq read 1M qd4",
        rw: "read",
        bs: "1M",
        iodepth: 4,
    },
    Workload {
        name: "seq write 1M qd4",
        rw: "write",
        bs: "1M",
        iodepth: 4,
    },
    Workload {
        name: "rand read 4k qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Workload {
        name: "rand write 4k qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
];

#[derive(Clone, Copy, Default)]
struct Figures {
    mbps: f64,
    iops: f64,
    /// Server CPU time (user + system, all threads) per I/O: less sensitive than
    /// throughput to other load on a shared machine.
    cpu_us_per_io: f64,
}

/// CPU seconds used so far by this process (the in-process blkback servers).
fn self_cpu() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds used so far by a peer process (utime + stime from /proc).
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(14) + ticks(15)) / hz
}

fn tool(name: &str) -> Command {
    if Command::new("which")
        .arg(name)
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        panic!("{name} is not installed (see scripts/install-deps.sh)");
    }
    Command::new(name)
}

fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(
            Instant::now() < deadline,
            "server on {} never came up",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A peer server process, killed (by its own pid) when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fio(uri: &str, w: &Workload, jobs: u32, secs: u64, size: u64, dir: &Path) -> Figures {
    let out = tool("fio")
        .current_dir(dir)
        .args([
            "--name=bench",
            "--ioengine=nbd",
            "--time_based",
            "--group_reporting",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={}", w.rw))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.iodepth))
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--runtime={secs}"))
        .arg(format!("--size={size}"))
        .arg("--randrepeat=0")
        .output()
        .expect("running fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed on {uri}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = text.find('{').expect("fio printed no JSON");
    let v: serde_json::Value = serde_json::from_str(&text[start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    let side = if w.rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    Figures {
        cpu_us_per_io: 0.0,
        mbps: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        iops: side["iops"].as_f64().unwrap_or(0.0),
    }
}

fn write_base(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        for w in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

type Target = (
    String,
    Box<dyn Fn() -> (String, Option<Box<dyn std::any::Any>>)>,
);

fn name_dir(snapshot: bool) -> &'static str {
    if snapshot {
        "blkback-thin-snap"
    } else {
        "blkback-thin"
    }
}

/// A thin pool in `pdir` with volume `vol` holding `base`'s bytes, fully written (reads
/// hit data, writes overwrite mapped chunks), committed.
fn thin_pool_with_volume(pdir: &Path, base: &Path, size: u64) -> Arc<storage::ThinPool> {
    use std::io::Read;
    use storage::Pool;
    let _ = std::fs::remove_dir_all(pdir);
    std::fs::create_dir(pdir).unwrap();
    let pool = storage::ThinPool::create(
        pdir,
        storage::ThinOptions {
            chunk_size: 64 << 10,
            capacity: size * 2,
        },
    )
    .unwrap();
    pool.create_volume("vol", size).unwrap();
    pool.commit().unwrap();
    let dev = pool.open_volume("vol", false).unwrap();
    let mut f = std::fs::File::open(base).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        f.read_exact(&mut buf).unwrap();
        dev.write_at(&buf, i << 20).unwrap();
    }
    dev.flush().unwrap();
    pool
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let secs: u64 = std::env::var("NBD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let size: u64 = std::env::var("NBD_BENCH_SIZE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024)
        << 20;
    // Substring filters on server and workload names, for profiling one case.
    let only: Option<String> = std::env::var("NBD_BENCH_ONLY").ok();
    let workload: Option<String> = std::env::var("NBD_BENCH_WORKLOAD").ok();
    let dir = tempfile::Builder::new()
        .prefix("nbd-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path().to_owned();
    let base = d.join("base.raw");
    eprintln!("writing {} MiB of test data...", size >> 20);
    write_base(&base, size);

    let mut targets: Vec<Target> = Vec::new();
    for snapshot in [false, true] {
        let d = d.clone();
        let base = base.clone();
        let name = if snapshot {
            "blkback (thin snapshot)"
        } else {
            "blkback (thin pool)"
        };
        targets.push((
            name.into(),
            Box::new(move || {
                let pool = thin_pool_with_volume(&d.join(name_dir(snapshot)), &base, size);
                // The snapshot row: a fresh snapshot of the fully written volume, so every
                // first write to a chunk is a copy-on-write, as in the fresh qcow2 overlay
                // (the "thin pool" row overwrites in place).
                let key = if snapshot {
                    use storage::Pool;
                    pool.snapshot("vol", "snap").unwrap();
                    pool.commit().unwrap();
                    "snap"
                } else {
                    "vol"
                };
                let dev = storage::Pool::open_volume(&*pool, key, false).unwrap();
                let sock = d.join(format!("{}.sock", name_dir(snapshot)));
                let server = NbdServer::bind_unix(
                    &sock,
                    vec![Export {
                        name: "vol".into(),
                        description: String::new(),
                        device: dev,
                    }],
                )
                .unwrap();
                (
                    nbd_uri(&sock, "vol"),
                    Some(Box::new(server) as Box<dyn std::any::Any>),
                )
            }),
        ));
    }
    {
        let d = d.clone();
        let base = base.clone();
        targets.push((
            "blkback (file)".into(),
            Box::new(move || {
                let copy = d.join("blkback-file.raw");
                std::fs::copy(&base, &copy).unwrap();
                let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&copy, size).unwrap());
                let sock = d.join("blkback-file.sock");
                let server = NbdServer::bind_unix(
                    &sock,
                    vec![Export {
                        name: "vol".into(),
                        description: String::new(),
                        device: dev,
                    }],
                )
                .unwrap();
                (
                    nbd_uri(&sock, "vol"),
                    Some(Box::new(server) as Box<dyn std::any::Any>),
                )
            }),
        ));
    }
    {
        let d = d.clone();
        let base = base.clone();
        targets.push((
            "qemu-nbd raw".into(),
            Box::new(move || {
                let sock = d.join("qemu-raw.sock");
                let child = tool("qemu-nbd")
                    .args([
                        "-f",
                        "raw",
                        "--cache=writeback",
                        "--shared=8",
                        "-t",
                        "-x",
                        "vol",
                        "-k",
                    ])
                    .arg(&sock)
                    .arg(&base)
                    .spawn()
                    .unwrap();
                let peer = Peer(child);
                wait_for_socket(&sock);
                (
                    nbd_uri(&sock, "vol"),
                    Some(Box::new(peer) as Box<dyn std::any::Any>),
                )
            }),
        ));
    }
    {
        let d = d.clone();
        let base = base.clone();
        targets.push((
            "qemu-nbd qcow2 overlay".into(),
            Box::new(move || {
                let ov = d.join("overlay.qcow2");
                let _ = std::fs::remove_file(&ov);
                let st = tool("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(&base)
                    .arg(&ov)
                    .status()
                    .unwrap();
                assert!(st.success());
                let sock = d.join("qemu-qcow2.sock");
                let child = tool("qemu-nbd")
                    .args([
                        "-f",
                        "qcow2",
                        "--cache=writeback",
                        "--shared=8",
                        "-t",
                        "-x",
                        "vol",
                        "-k",
                    ])
                    .arg(&sock)
                    .arg(&ov)
                    .spawn()
                    .unwrap();
                let peer = Peer(child);
                wait_for_socket(&sock);
                (
                    nbd_uri(&sock, "vol"),
                    Some(Box::new(peer) as Box<dyn std::any::Any>),
                )
            }),
        ));
    }
    {
        let d = d.clone();
        let base = base.clone();
        targets.push((
            "nbdkit file".into(),
            Box::new(move || {
                let sock = d.join("nbdkit.sock");
                let child = tool("nbdkit")
                    .args(["-f", "-U"])
                    .arg(&sock)
                    .arg("file")
                    .arg(format!("file={}", base.display()))
                    .spawn()
                    .unwrap();
                let peer = Peer(child);
                wait_for_socket(&sock);
                (
                    nbd_uri(&sock, ""),
                    Some(Box::new(peer) as Box<dyn std::any::Any>),
                )
            }),
        ));
    }

    let names: Vec<String> = targets.iter().map(|t| t.0.clone()).collect();
    let rows: Vec<(usize, u32)> = (0..WORKLOADS.len())
        .flat_map(|w| [(w, 1), (w, 4)])
        .filter(|&(w, _)| {
            workload
                .as_deref()
                .is_none_or(|f| f.split(',').any(|f| WORKLOADS[w].name.contains(f)))
        })
        .collect();
    // All servers up at once (idle ones cost nothing), then each row runs against every
    // server back to back, so load from elsewhere on the machine hits all of them alike.
    let mut uris = Vec::new();
    let mut guards: Vec<Option<Box<dyn std::any::Any>>> = Vec::new();
    for (name, start) in &targets {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|o| name.contains(o)))
        {
            uris.push(None);
            guards.push(None);
            continue;
        }
        let (uri, guard) = start();
        uris.push(Some(uri));
        guards.push(guard);
    }
    let cpu = |ti: usize| match guards[ti].as_ref().and_then(|g| g.downcast_ref::<Peer>()) {
        Some(p) => proc_cpu(p.0.id()),
        None => self_cpu(),
    };
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); targets.len()];
    for &(w, jobs) in &rows {
        for (ti, name) in names.iter().enumerate() {
            let f = match &uris[ti] {
                Some(uri) => {
                    let c0 = cpu(ti);
                    let mut f = fio(uri, &WORKLOADS[w], jobs, secs, size, &d);
                    let ios = f.iops * secs as f64;
                    f.cpu_us_per_io = if ios > 0.0 {
                        (cpu(ti) - c0) * 1e6 / ios
                    } else {
                        0.0
                    };
                    f
                }
                None => Figures::default(),
            };
            eprintln!(
                "{name:>24} | {:<20} x{jobs} | {:>9.1} MB/s {:>9.0} IOPS {:>7.1} CPU us/IO",
                WORKLOADS[w].name, f.mbps, f.iops, f.cpu_us_per_io
            );
            results[ti].push(f);
        }
    }
    drop(guards);

    let peer = |n: &str| names.iter().position(|x| x == n).unwrap();
    let (raw, qcow, kit) = (
        peer("qemu-nbd raw"),
        peer("qemu-nbd qcow2 overlay"),
        peer("nbdkit file"),
    );
    println!();
    println!(
        "{:<24} {:<22} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10}",
        "server", "workload", "MB/s", "IOPS", "CPU us/IO", "vs raw", "vs qcow2", "vs nbdkit"
    );
    for (ri, &(w, jobs)) in rows.iter().enumerate() {
        for (ti, name) in names.iter().enumerate() {
            let f = results[ti][ri];
            let ratio = |p: usize| {
                let b = results[p][ri].iops;
                if b > 0.0 {
                    format!("{:.2}x", f.iops / b)
                } else {
                    "-".into()
                }
            };
            println!(
                "{:<24} {:<22} {:>10.1} {:>10.0} {:>9.1} {:>10} {:>10} {:>10}",
                name,
                format!("{} x{jobs}", WORKLOADS[w].name),
                f.mbps,
                f.iops,
                f.cpu_us_per_io,
                ratio(raw),
                ratio(qcow),
                ratio(kit)
            );
        }
    }
    let _: PathBuf = d;
}
