//! Idle cost and start/shutdown latency of the daemon with many running qubes
//! (`--hypervisor none`: storage and NBD exports only, no guests).
//!
//! At 10, 200 and 1,000 running qubes: the daemon's CPU use while idle (utime+stime from
//! `/proc/PID/stat` over a few seconds), its thread count and RSS, and the latency of a
//! `qube start` and a `qube shutdown` of one more qube (p50/p99 over ROUNDS rounds), both
//! as the daemon answers them on the admin socket and as the CLI sees them (a process
//! per command, as a user runs it).
//!
//! First, PARALLEL qubes started one after another, then all at once (a client thread
//! each), and shut down the same ways: the daemon runs requests on different qubes in
//! parallel, so "all at once" should take about the slowest one, not the sum.
//!
//! Last, the same latencies while a `volume import` of IMPORT_MIB MiB streams into
//! another qube through the daemon.
//!
//! `cargo bench -p e2e-tests --bench daemon_scale` (builds nothing itself: run
//! `cargo build --release -p qubes-ctl` first, or set QUBES_CTL_BIN). Environment:
//! `LEVELS=10,200,1000`, `ROUNDS=100`, `IDLE_SECS=5`, `PARALLEL=20`, `IMPORT_MIB=2048`
//! (0: no import).

use std::path::Path;
use std::time::{Duration, Instant};

use e2e_tests::{admin_call, pattern, proc_status, Ctl};
use serde_json::json;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// (cpu ticks, threads, rss KiB) of a process.
fn proc_stat(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the comm: state is [0]; utime, stime are fields 14, 15 (1-based) -> [11], [12].
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let field = |name: &str| {
        proc_status(pid as i32, name)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks, field("Threads"), field("VmRSS"))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Starts and shuts down q0..qN sequentially, then all at once; prints the wall times.
fn parallel_starts(sock: &Path, n: usize) {
    if n == 0 {
        return;
    }
    let each = |op: &str, name: String| match op {
        "start" => json!({"op": "qube_start", "name": name, "hypervisor": "none"}),
        _ => json!({"op": "qube_shutdown", "name": name, "timeout_secs": 10, "kill": false}),
    };
    let sequential = |op: &str| {
        let t = Instant::now();
        for i in 0..n {
            admin_call(sock, each(op, format!("q{i}")));
        }
        t.elapsed()
    };
    let parallel = |op: &str| {
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..n {
                let req = each(op, format!("q{i}"));
                s.spawn(move || admin_call(sock, req));
            }
        });
        t.elapsed()
    };
    let (ss, sd) = (sequential("start"), sequential("shutdown"));
    let (ps, pd) = (parallel("start"), parallel("shutdown"));
    println!("| {n} qubes | one after another | all at once |");
    println!("|---|---:|---:|");
    println!("| start | {ss:.1?} | {ps:.1?} |");
    println!("| shutdown | {sd:.1?} | {pd:.1?} |");
    println!();
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let levels: Vec<usize> = std::env::var("LEVELS")
        .unwrap_or_else(|_| "10,200,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds: usize = env_or("ROUNDS", 100);
    let idle_secs: u64 = env_or("IDLE_SECS", 5);
    let max = levels.iter().copied().max().unwrap_or(0);

    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "64G"]);
    let img = ctl.root.join("tpl.img");
    std::fs::write(&img, pattern(1, 4 << 20)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    ctl.ok(&["daemon", "start"]);
    let sock = ctl.admin_socket();
    let pid = admin_call(&sock, json!({"op": "ping"}))["pid"]
        .as_u64()
        .unwrap() as u32;
    let t = Instant::now();
    for i in 0..max + 3 {
        admin_call(
            &sock,
            json!({"op": "qube_create", "name": format!("q{i}"), "class": "AppVM",
                   "template": "tpl", "label": null}),
        );
    }
    eprintln!("created {} qubes in {:.1?}", max + 3, t.elapsed());
    parallel_starts(&sock, env_or("PARALLEL", 20).min(max));
    let probe_admin = format!("q{}", max);
    let probe_cli = format!("q{}", max + 1);
    let imported = format!("q{}:private", max + 2);
    let probes = Probes {
        ctl: &ctl,
        sock: &sock,
        admin: &probe_admin,
        cli: &probe_cli,
        rounds,
    };

    println!(
        "| running qubes | idle CPU (% of a core) | threads | RSS MiB | start p50/p99 (admin) | shutdown p50/p99 (admin) | start p50/p99 (CLI) | shutdown p50/p99 (CLI) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut running = 0;
    for &n in &levels {
        while running < n {
            admin_call(
                &sock,
                json!({"op": "qube_start", "name": format!("q{running}"), "hypervisor": "none"}),
            );
            running += 1;
        }
        // Let the starts settle, then measure the idle daemon.
        std::thread::sleep(Duration::from_secs(1));
        let (t0, _, _) = proc_stat(pid);
        let w = Instant::now();
        std::thread::sleep(Duration::from_secs(idle_secs));
        let (t1, threads, rss) = proc_stat(pid);
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = (t1 - t0) as f64 / hz / w.elapsed().as_secs_f64() * 100.0;

        let (sa, da) = probes.latency(false);
        let (sc, dc) = probes.latency(true);
        println!(
            "| {n} | {cpu:.2} | {threads} | {:.0} | {sa} | {da} | {sc} | {dc} |",
            rss as f64 / 1024.0
        );
    }
    let import_mib: usize = env_or("IMPORT_MIB", 2048);
    if import_mib > 0 {
        import_latency(&probes, &imported, import_mib, running);
    }
    ctl.stop_daemon();
}

/// The qubes whose start and shutdown are timed.
struct Probes<'a> {
    ctl: &'a Ctl,
    sock: &'a Path,
    /// Started on the admin socket.
    admin: &'a str,
    /// Started by the CLI, a process per command.
    cli: &'a str,
    rounds: usize,
}

impl Probes<'_> {
    /// `qube start` and `qube shutdown` p50/p99, on the admin socket or through the CLI.
    fn latency(&self, cli: bool) -> (String, String) {
        let [(st, sd)] = self.latencies_while(&[cli], &mut || true);
        (st, sd)
    }

    /// For each of `modes` (CLI or not), start and shutdown p50/p99 over the rounds that
    /// begin while `go` holds (at least one); the modes take turns within each round, so
    /// they see the same conditions.
    fn latencies_while<const N: usize>(
        &self,
        modes: &[bool; N],
        go: &mut dyn FnMut() -> bool,
    ) -> [(String, String); N] {
        let mut samples = [(); N].map(|()| (Vec::new(), Vec::new()));
        for i in 0..self.rounds {
            if i > 0 && !go() {
                break;
            }
            for (&cli, (st, sd)) in modes.iter().zip(samples.iter_mut()) {
                let t = Instant::now();
                if cli {
                    self.ctl
                        .ok(&["qube", "start", self.cli, "--hypervisor", "none"]);
                } else {
                    admin_call(
                        self.sock,
                        json!({"op": "qube_start", "name": self.admin, "hypervisor": "none"}),
                    );
                }
                st.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                if cli {
                    self.ctl.ok(&["qube", "shutdown", self.cli]);
                } else {
                    admin_call(
                        self.sock,
                        json!({"op": "qube_shutdown", "name": self.admin, "timeout_secs": 10, "kill": false}),
                    );
                }
                sd.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        samples.map(|(mut st, mut sd)| {
            st.sort_by(f64::total_cmp);
            sd.sort_by(f64::total_cmp);
            let n = st.len();
            (
                format!("{:.1}/{:.1} ms (n={n})", pct(&st, 0.5), pct(&st, 0.99)),
                format!("{:.1}/{:.1} ms (n={n})", pct(&sd, 0.5), pct(&sd, 0.99)),
            )
        })
    }
}

/// Start/shutdown latency while a `volume import` of `mib` MiB of distinct data (no
/// chunk to share) streams into the daemon through the CLI, as a user runs it.
fn import_latency(probes: &Probes<'_>, vol: &str, mib: usize, running: usize) {
    use std::io::Write;
    let mut child = probes
        .ctl
        .cmd(&["volume", "import", vol, "-", "--size", &format!("{mib}M")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        for i in 0..mib {
            if stdin.write_all(&pattern(1000 + i as u64, 1 << 20)).is_err() {
                break;
            }
        }
    });
    // Let the copy get under way.
    std::thread::sleep(Duration::from_millis(500));
    // Only rounds that begin while the import runs count.
    let mut importing = || child.try_wait().unwrap().is_none();
    let [(sa, da), (sc, dc)] = probes.latencies_while(&[false, true], &mut importing);
    let under_way = importing();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success(), "the import failed");
    println!();
    println!(
        "While a {mib} MiB `volume import` runs ({running} qubes running; the import took {:.1?}{}):",
        t.elapsed(),
        if under_way {
            ""
        } else {
            "; it ended before the rounds did: n < ROUNDS, raise IMPORT_MIB for more"
        }
    );
    println!();
    println!("| start p50/p99 (admin) | shutdown p50/p99 (admin) | start p50/p99 (CLI) | shutdown p50/p99 (CLI) |");
    println!("|---:|---:|---:|---:|");
    println!("| {sa} | {da} | {sc} | {dc} |");
}
