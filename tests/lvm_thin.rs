//! `lvm_thin` on a real kernel (dm-thin of Debian 12's 6.1, lvm2 2.03.16) inside the VM
//! harness (scripts/testvm.sh). The host test [`lvm_thin_in_vm`] boots the VM once and
//! runs this same binary's ignored tests there:
//! * `vm::conformance::*`, `vm::model_rules::*`: the storage conformance suite and the
//!   volume-model rules, each on a thin pool in a loop-backed VG of its own;
//! * `vm_cli::qubes_shaped_pool_is_read` (in CI): a pool laid out by plain `lvcreate` commands as
//!   Qubes does, taken over by `qubes-ctl pool init --driver lvm_thin`, read by
//!   `volume list` / `volume info`, started and stopped;
//! * `vm_cli::sigkill_at_random_points_leaves_the_pool_consistent` (in CI): the daemon killed
//!   during start / stop / revert / import, then `lvs` shows no orphan and the next start
//!   works;
//! * `vm_cli::bench_start_shutdown`: start+shutdown latency, lvm_thin against thin, in the
//!   same VM (figures printed, nothing asserted about them);
//! * `vm_bench::bench_snapshot_random_writes`: 4 KiB random writes into a fresh snapshot,
//!   dm-thin against our thin pool (figures printed).

#[path = "../storage/tests/model_backends.rs"]
mod backends;

#[allow(dead_code)]
mod conformance {
    include!("../storage/tests/suite/conformance.rs");
}

#[allow(dead_code)]
mod model_rules {
    include!("../storage/tests/suite/model_rules.rs");
}

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{pattern, repo_dir, testvm_cache, Ctl};

macro_rules! in_vm {
    ($suite:ident, [$($t:ident),* $(,)?]) => {
        mod $suite {
            $(
                #[test]
                #[ignore = "needs device-mapper: run inside the VM by lvm_thin_in_vm"]
                fn $t() {
                    super::super::lvm_in_worker();
                    let mut b = super::super::backends::LvmThin::new();
                    super::super::$suite::$t(&mut b);
                    let report = storage::Pool::verify(
                        &*super::super::backends::Backend::pool(&b),
                    )
                    .unwrap();
                    assert!(report.is_clean(), "{report:?}");
                }
            )*
        }
    };
}

/// The conformance suite and the rules go through LVM the way the product does: in
/// `qubes-ctl lvm-worker`.
fn lvm_in_worker() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        lvm2_sys::use_worker(e2e_tests::qubes_ctl_bin(), vec!["lvm-worker".into()]);
    });
}

/// The worker that runs LVM for qubes-ctl (on this host: liblvm2cmd loads and `lvm
/// version` runs without device-mapper). It answers over its pipe, is in a process
/// group of its own, shrugs off the signals that would stop it half-way through a
/// command, is started again after it died, and ends when its input ends.
#[test]
fn lvm_worker_survives_signals_restarts_after_death_and_ends_with_its_input() {
    use std::io::{BufRead, BufReader, Write};

    lvm_in_worker();
    let version = || {
        let out = lvm2_sys::run(&["version"]).unwrap();
        assert!(out.printed.join("\n").contains("LVM version"), "{out:?}");
    };
    version();
    let pid = lvm2_sys::worker_pid().expect("a worker runs") as i32;
    assert_ne!(pid as u32, std::process::id());
    // SAFETY: getpgid(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::getpgid(pid) }, pid, "own process group");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(
        lvm2_sys::worker::WORKER_NAME.starts_with(comm.trim()) && comm.len() > 10,
        "`pkill qubes-ctl` must not match the worker: comm {comm:?}"
    );
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
    std::thread::sleep(Duration::from_millis(300));
    version();
    assert_eq!(lvm2_sys::worker_pid(), Some(pid as u32), "the same worker");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let e = lvm2_sys::run(&["version"]).unwrap_err();
    assert!(
        matches!(e, lvm2_sys::LvmError::Worker { .. }) && e.to_string().contains("version"),
        "{e}"
    );
    version();
    let second = lvm2_sys::worker_pid().expect("a new worker");
    assert_ne!(second as i32, pid);
    lvm2_sys::shutdown();
    assert_eq!(lvm2_sys::worker_pid(), None);
    assert!(
        !Path::new(&format!("/proc/{second}")).exists(),
        "shutdown waited for the worker's exit"
    );

    // The wire, as the worker sees it: a reply per line, an error for an empty
    // argument, and a clean exit when its input ends.
    let mut w = Command::new(e2e_tests::qubes_ctl_bin())
        .arg("lvm-worker")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = w.stdin.take().unwrap();
    let mut replies = BufReader::new(w.stdout.take().unwrap()).lines();
    writeln!(input, "version").unwrap();
    let reply: serde_json::Value = serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap();
    assert_eq!(reply["rc"], 1, "LVM2_COMMAND_SUCCEEDED: {reply}");
    assert!(
        reply["messages"].to_string().contains("LVM version"),
        "{reply}"
    );
    writeln!(input, "lvs  x").unwrap();
    let reply: serde_json::Value = serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap();
    assert!(
        reply["error"].as_str().unwrap().contains("argument"),
        "{reply}"
    );
    drop(input);
    assert!(w.wait().unwrap().success());
}

mod vm {
    in_vm!(
        conformance,
        [
            new_volume_reads_zeros_and_maps_nothing,
            unaligned_writes_round_trip,
            snapshots_are_independent,
            remove_is_refused_while_open,
            rename_moves_and_handles_follow,
            resize_grows_with_zeros_and_shrinks_only_when_asked,
            attrs_and_meta,
            commit_is_atomic_across_a_crash,
            flush_leaves_staged_catalogue_changes_staged,
            read_only_handles_refuse_every_write,
            discard_unmaps_whole_chunks_only,
            write_zeroes_reads_zeros,
            block_status_reports_data_and_holes,
            import_skips_zeros_dedups_and_fingerprints,
            failed_import_creates_nothing,
            concurrent_writers_on_several_volumes,
            info_counts_volumes_and_commits,
        ]
    );
    in_vm!(
        model_rules,
        [
            layout_of_each_class,
            wrong_templates_are_refused,
            names_are_validated,
            start_and_stop_keys_and_one_commit_each,
            stop_keeps_the_old_head_as_a_revision,
            revert_restores_bytes_and_can_be_undone,
            revisions_are_pruned_to_revisions_to_keep,
            template_update_is_invisible_to_a_running_appvm,
            appvm_started_while_its_template_runs_sees_the_committed_root,
            dispvm_leaves_nothing,
            standalone_is_independent_of_its_template,
            clone_is_a_snapshot_of_the_heads,
            remove_refuses_running_and_used,
            crash_while_running_resumes_then_commits,
            crash_then_stop_commits_and_discard_drops,
            crash_before_commit_loses_the_whole_operation,
            orphan_volumes_do_not_block_a_name,
            stale_run_snapshot_of_a_discarded_volume_is_dropped_at_start,
            half_done_revert_is_repaired_by_revert,
            import_commits_like_a_stop_and_export_round_trips,
            failed_import_leaves_the_pool_as_it_was,
            resize_rules,
            missing_template_head_fails_cleanly,
            open_volume_blocks_stop_without_damage,
            status_reports_usage,
            concurrent_starts_of_many_qubes,
        ]
    );
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A VG `name` with a thin pool `pool` on a loop device over a sparse file in /scratch.
fn make_vg(name: &str, pool_size: &str) {
    sh(&format!(
        "truncate -s 8G /scratch/{name}.img && d=$(losetup -f --show /scratch/{name}.img) && \
         vgcreate -q {name} $d && lvcreate -q --type thin-pool -L {pool_size} -n pool {name}"
    ));
}

fn lv_names(vg: &str) -> Vec<String> {
    sh(&format!("lvs --noheadings -o lv_name {vg}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn lvm_ctl(vg: &str) -> Ctl {
    let ctl = Ctl::new();
    ctl.ok(&[
        "pool",
        "init",
        "--driver",
        "lvm_thin",
        "--volume-group",
        vg,
        "--thin-pool",
        "pool",
    ]);
    ctl
}

/// A template `small` (8 MiB image) and an AppVM `work` on it.
fn template_and_appvm(ctl: &Ctl) {
    let img = ctl.root.join("small.img");
    std::fs::write(&img, pattern(7, 8 << 20)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "small",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    ctl.ok(&[
        "qube",
        "create",
        "work",
        "--class",
        "AppVM",
        "--template",
        "small",
    ]);
    ctl.ok(&["volume", "resize", "work:private", "64M", "--allow-shrink"]);
}

mod vm_cli {
    use super::*;

    #[test]
    #[ignore = "needs device-mapper: run inside the VM by lvm_thin_in_vm"]
    fn qubes_shaped_pool_is_read() {
        make_vg("qubes_dom0", "2G");
        // As Qubes' lvm.py makes them (names, --setactivationskip, thin snapshots).
        for cmd in [
            "lvcreate -q --thin --setactivationskip=n --activate=y --name=vm-debian-12-root --virtualsize=64M qubes_dom0/pool",
            "lvcreate -q --thin --setactivationskip=n --activate=y --name=vm-debian-12-private --virtualsize=16M qubes_dom0/pool",
            "lvcreate -q --thin --setactivationskip=n --activate=y --name=vm-work-private --virtualsize=32M qubes_dom0/pool",
            "lvcreate -q --setactivationskip=n --activate=y --snapshot --name=vm-work-private-1700000000-back qubes_dom0/vm-work-private",
            "lvcreate -q --setactivationskip=n --activate=y --snapshot --name=vm-work-private-1700000100-back qubes_dom0/vm-work-private",
            "lvcreate -q --thin --setactivationskip=n --activate=y --name=vm-sys-net-private --virtualsize=16M qubes_dom0/pool",
            // A crash of Qubes left sys-net's running snapshot behind.
            "lvcreate -q --setactivationskip=n --activate=y --snapshot --name=vm-sys-net-private-snap qubes_dom0/vm-sys-net-private",
        ] {
            sh(cmd);
        }
        sh("printf qubes-private | dd of=/dev/qubes_dom0/vm-work-private conv=notrunc,fsync status=none");
        let ctl = lvm_ctl("qubes_dom0");
        let info = ctl.json(&["pool", "info"]);
        assert_eq!(info["driver"], "lvm_thin", "{info}");
        assert!(info["metadata_capacity"].as_u64().unwrap() > 0, "{info}");
        assert!(info.get("metadata_used_percent").is_some(), "{info}");
        let list = ctl.json(&["volume", "list"]);
        println!("volume list of the Qubes-made pool: {list}");
        let w = ctl.json(&["volume", "info", "work:private"]);
        assert_eq!(w["size"], 32 << 20, "{w}");
        assert_eq!(w["dirty"], false, "{w}");
        let revs: Vec<&str> = w["revisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(revs, ["1700000000.000000", "1700000100.000000"], "{w}");
        let n = ctl.json(&["volume", "info", "sys-net:private"]);
        assert_eq!(
            n["dirty"], true,
            "the stale -snap is the running state: {n}"
        );
        let d = ctl.json(&["volume", "info", "debian-12:root"]);
        assert_eq!(d["size"], 64 << 20, "{d}");
        // The qube starts on its Qubes volume and its stop keeps Qubes' layout.
        ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
        assert!(lv_names("qubes_dom0").contains(&"vm-work-private-snap".to_string()));
        ctl.ok(&["qube", "shutdown", "work"]);
        let lvs = lv_names("qubes_dom0");
        assert!(
            !lvs.contains(&"vm-work-private-snap".to_string()),
            "{lvs:?}"
        );
        assert!(lvs.contains(&"vm-work-private".to_string()), "{lvs:?}");
        assert!(
            lvs.iter()
                .filter(|n| n.starts_with("vm-work-private-") && n.ends_with("-back"))
                .count()
                >= 2,
            "{lvs:?}"
        );
        let head = sh("dd if=/dev/qubes_dom0/vm-work-private bs=13 count=1 status=none");
        assert_eq!(head, "qubes-private");
        ctl.stop_daemon();
    }

    #[test]
    #[ignore = "needs device-mapper: run inside the VM by lvm_thin_in_vm"]
    fn sigkill_at_random_points_leaves_the_pool_consistent() {
        make_vg("crashvg", "2G");
        let ctl = lvm_ctl("crashvg");
        template_and_appvm(&ctl);
        let raw = ctl.root.join("private.img");
        std::fs::write(&raw, pattern(3, 4 << 20)).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        // Each operation timed once without a kill, so the kills land anywhere inside it:
        // a fixed window (0-1.5 s) ended before any start got past its first steps under
        // TCG (no start completed in 12 rounds). The daemon is up before each operation,
        // as here, so the window is the operation's and not a daemon's startup (with the
        // daemon spawned by the shutdown itself, 11 shutdowns in a row were killed before
        // they changed anything).
        let ops: [Vec<&str>; 4] = [
            vec!["qube", "start", "work", "--hypervisor", "none"],
            vec!["qube", "shutdown", "work"],
            vec!["volume", "revert", "work:private"],
            vec!["volume", "import", "work:private", raw.to_str().unwrap()],
        ];
        let mut took = Vec::new();
        ctl.ok(&["daemon", "start"]);
        for args in &ops {
            let t = Instant::now();
            ctl.ok(args);
            took.push(t.elapsed());
        }
        println!(
            "uninterrupted: {:?}",
            ops.iter().zip(&took).collect::<Vec<_>>()
        );
        // Rounds cycle through start, shutdown, revert and import. A killed start never
        // leaves the qube running (recovery undoes it), so a shutdown round first starts
        // the qube, uninterrupted, and the others first shut it down if it runs.
        // CI runs 8 rounds (two of each operation); more by hand.
        let rounds: usize = std::env::var("QUBES_LVM_CRASH_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8);
        for round in 0..rounds {
            let op = round % ops.len();
            ctl.ok(&["daemon", "start"]);
            let running = ctl
                .json(&["qube", "list"])
                .as_array()
                .unwrap()
                .iter()
                .any(|q| q["name"] == "work" && q["state"] == "running");
            if op == 1 && !running {
                ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
            } else if op != 1 && running {
                ctl.ok(&["qube", "shutdown", "work"]);
            }
            let args = &ops[op];
            let pid = ctl.daemon_pid();
            let err_path = ctl.root.join(format!("round{round}.err"));
            let mut child = ctl
                .cmd(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&err_path).unwrap())
                .spawn()
                .unwrap();
            let window = took[op].as_millis() as u64 * 6 / 5;
            std::thread::sleep(Duration::from_millis(rnd(window)));
            // The daemon does the work; kill it (and the client) wherever it is.
            let finished = matches!(child.try_wait(), Ok(Some(_)));
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(200));
            let v = ctl.json(&["pool", "verify"]);
            assert!(
                v["report"]["errors"].as_array().unwrap().is_empty(),
                "round {round} {args:?}: {v}"
            );
            // No orphans: every LV is a volume the model knows about (or a revision).
            let lvs = lv_names("crashvg");
            for lv in &lvs {
                assert!(
                    lv == "pool" || lv.starts_with("vm-small-") || lv.starts_with("vm-work-"),
                    "round {round} {args:?}: orphan LV {lv} in {lvs:?}"
                );
            }
            let when = if finished {
                "after it finished"
            } else {
                "during it"
            };
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            println!(
                "round {round}: {args:?} killed {when}; LVs {lvs:?}; its stderr: {:?}\n{}",
                err.trim(),
                sh("lvs -a --noheadings -o lv_name,lv_attr,thin_id,transaction_id,data_percent,metadata_percent crashvg; dmesg | tail -n 3")
            );
        }
        // Whatever state it was left in, the qube starts and stops.
        let _ = ctl.output(&["qube", "shutdown", "work"]);
        ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
        ctl.ok(&["qube", "shutdown", "work"]);
        let lvs = lv_names("crashvg");
        assert!(
            !lvs.iter()
                .any(|l| l.ends_with("-snap") || l.starts_with("qctrash-")),
            "{lvs:?}"
        );
        ctl.stop_daemon();
    }

    /// What an LVM command SIGKILLed between its suspend and its resume leaves behind
    /// (the worker killed too: `kill -9` of every process, the OOM killer): the thin
    /// pool and a thin LV suspended. The next start refuses at once, naming the devices
    /// and `dmsetup resume`, instead of hanging on the first I/O; done as it says, the
    /// start works.
    #[test]
    #[ignore = "needs device-mapper: run inside the VM by lvm_thin_in_vm"]
    fn devices_left_suspended_are_named_with_the_fix_not_hung_on() {
        make_vg("suspvg", "1G");
        let ctl = lvm_ctl("suspvg");
        template_and_appvm(&ctl);
        ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
        ctl.ok(&["qube", "shutdown", "work"]);
        ctl.stop_daemon();
        let states =
            || sh("dmsetup info -c --noheadings -o name,suspended | grep '^suspvg-' | sort");
        // The thin LV first: suspending it flushes it, which would wait forever on a
        // suspended pool.
        sh("dmsetup suspend suspvg-vm--work--private && dmsetup suspend suspvg-pool-tpool");
        let before = states();
        assert!(
            before.contains("suspvg-pool-tpool:Suspended")
                && before.contains("suspvg-vm--work--private:Suspended"),
            "{before}"
        );
        let mut child = ctl
            .cmd(&["qube", "start", "work", "--hypervisor", "none"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(600) {
                // Let the VM finish rather than hang on the suspended devices.
                sh("dmsetup resume suspvg-pool-tpool; dmsetup resume suspvg-vm--work--private; true");
                let _ = child.kill();
                panic!("qube start hung on the suspended devices: {before}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a start on suspended devices succeeded"
        );
        println!("suspended: {before}\nthe refusal: {err}");
        assert!(
            err.contains("suspvg-pool-tpool")
                && err.contains("suspvg-vm--work--private")
                && err.contains("dmsetup resume"),
            "{err}"
        );
        // As the error says.
        sh(
            "for d in suspvg-pool-tpool suspvg-pool suspvg-vm--work--private; do \
              if dmsetup info $d >/dev/null 2>&1; then dmsetup resume $d; fi; done",
        );
        assert!(!states().contains("Suspended"), "{}", states());
        ctl.stop_daemon();
        ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
        ctl.ok(&["qube", "shutdown", "work"]);
        assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
        ctl.stop_daemon();
    }

    fn percentile(v: &mut [Duration], p: f64) -> Duration {
        v.sort();
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    #[test]
    #[ignore = "benchmark inside the VM, run by lvm_thin_in_vm"]
    fn bench_start_shutdown() {
        make_vg("benchvg", "2G");
        let rounds: usize = std::env::var("QUBES_LVM_BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        for driver in ["lvm_thin", "thin"] {
            let ctl = if driver == "lvm_thin" {
                lvm_ctl("benchvg")
            } else {
                let c = Ctl::new();
                c.ok(&["pool", "init", "--size", "2G"]);
                c
            };
            template_and_appvm(&ctl);
            // The first start spawns the daemon: not measured.
            ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
            ctl.ok(&["qube", "shutdown", "work"]);
            let (mut st, mut sd) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t = Instant::now();
                ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
                st.push(t.elapsed());
                let t = Instant::now();
                ctl.ok(&["qube", "shutdown", "work"]);
                sd.push(t.elapsed());
            }
            println!(
                "BENCH {driver}: start p50 {:.0?} p99 {:.0?}; shutdown p50 {:.0?} p99 {:.0?} ({rounds} rounds, --hypervisor none, TCG VM)",
                percentile(&mut st, 0.5),
                percentile(&mut st, 0.99),
                percentile(&mut sd, 0.5),
                percentile(&mut sd, 0.99)
            );
            ctl.stop_daemon();
        }
    }
}

/// 4 KiB random writes into a fresh snapshot of a fully written volume: dm-thin breaks
/// sharing by copying its whole block (64 KiB here) on the first write into it, as our
/// `thin` pool copies its chunk (64 KiB too). Same API path for both (the `Pool` and
/// `BlockDevice` traits, O_DIRECT on the LV for lvm_thin), figures printed side by side.
mod vm_bench {
    use super::backends::{Backend, LvmThin, Thin};
    use std::time::Instant;

    const VOL: u64 = 256 << 20;
    const WRITES: usize = 4096;

    fn snapshot_writes(b: &dyn Backend) -> (f64, f64) {
        let pool = b.pool();
        pool.create_volume("bench/origin", VOL).unwrap();
        {
            let dev = pool.open_volume("bench/origin", false).unwrap();
            let block = e2e_tests::pattern(9, 1 << 20);
            for off in (0..VOL).step_by(1 << 20) {
                dev.write_at(&block, off).unwrap();
            }
            dev.flush().unwrap();
        }
        pool.commit().unwrap();
        pool.snapshot("bench/origin", "bench/snap").unwrap();
        pool.commit().unwrap();
        let dev = pool.open_volume("bench/snap", false).unwrap();
        let buf = vec![0x5au8; 4096];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let t = Instant::now();
        for _ in 0..WRITES {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            dev.write_at(&buf, (x % (VOL / 4096)) * 4096).unwrap();
        }
        dev.flush().unwrap();
        let secs = t.elapsed().as_secs_f64();
        (WRITES as f64 / secs, secs)
    }

    #[test]
    #[ignore = "benchmark inside the VM, run by lvm_thin_in_vm"]
    fn bench_snapshot_random_writes() {
        let lvm = LvmThin::with_size("900M");
        let (lvm_iops, lvm_s) = snapshot_writes(&lvm);
        let thin = Thin::with_options(64 << 10, 1 << 30);
        let (thin_iops, thin_s) = snapshot_writes(&thin);
        println!(
            "BENCH snapshot 4K random writes ({WRITES} into a fresh snapshot of a fully written {} MiB volume, then flush): lvm_thin {lvm_iops:.0} IOPS ({lvm_s:.2} s), thin {thin_iops:.0} IOPS ({thin_s:.2} s), lvm_thin/thin {:.2}",
            VOL >> 20,
            lvm_iops / thin_iops
        );
    }
}

/// What CI runs in the VM: the conformance suite and the volume-model rules that lean on
/// this driver's own transaction machinery (journal, hidden removals, recovery at open,
/// stale `-snap`s), in one test run (about 4 min in the VM under TCG at load 2, 1.5 min
/// of it the 17 conformance tests), then the Qubes-made pool (100 s), the suspended
/// devices (74 s) and the SIGKILL test (8 rounds; 12 took 313 s at load 5). All 26
/// rules take 650 s there at load 7-8 (every start and stop is a few LVM commands of
/// 0.3-1 s each under TCG), and the other `vm_cli` tests boot the
/// daemon: run them by hand with
/// `QUBES_LVM_VM_TIMEOUT=3000 QUBES_LVM_VM_TESTS=$'vm::model_rules --test-threads=2\nvm_cli:: --test-threads=1 --nocapture\nvm_bench --nocapture'`.
const DEFAULT_VM_TESTS: &str = "vm::conformance \
    vm::model_rules::start_and_stop_keys_and_one_commit_each \
    vm::model_rules::stop_keeps_the_old_head_as_a_revision \
    vm::model_rules::revert_restores_bytes_and_can_be_undone \
    vm::model_rules::revisions_are_pruned_to_revisions_to_keep \
    vm::model_rules::dispvm_leaves_nothing \
    vm::model_rules::crash_while_running_resumes_then_commits \
    vm::model_rules::crash_then_stop_commits_and_discard_drops \
    vm::model_rules::crash_before_commit_loses_the_whole_operation \
    vm::model_rules::stale_run_snapshot_of_a_discarded_volume_is_dropped_at_start \
    vm::model_rules::half_done_revert_is_repaired_by_revert \
    vm::model_rules::import_commits_like_a_stop_and_export_round_trips \
    --test-threads=2\n\
    vm_cli::qubes_shaped_pool_is_read \
    vm_cli::devices_left_suspended_are_named_with_the_fix_not_hung_on \
    vm_cli::sigkill_at_random_points_leaves_the_pool_consistent --test-threads=1 --nocapture";
/// The conformance tests and the rules above.
const DEFAULT_VM_TEST_COUNT: u32 = 17 + 11;

/// Boots the VM once and runs the ignored tests of this binary there (see the module
/// docs; the runtime is printed).
#[test]
fn lvm_thin_in_vm() {
    let t0 = Instant::now();
    let runs = testvm_cache().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let share = tempfile::Builder::new()
        .prefix("lvm")
        .tempdir_in(&runs)
        .unwrap();
    let s = share.path();
    std::fs::copy(std::env::current_exe().unwrap(), s.join("lvm-test")).unwrap();
    // $QUBES_LVM_VM_TESTS narrows the run (a filter per line), e.g. `vm::conformance`.
    let filters = std::env::var("QUBES_LVM_VM_TESTS").unwrap_or_else(|_| DEFAULT_VM_TESTS.into());
    let runs_sh: String = filters
        .lines()
        .map(|f| format!("/share/lvm-test --color never --ignored {f}\n"))
        .collect();
    std::fs::write(
        s.join("run.sh"),
        format!(
            "set -e\n\
             # No udev in the harness: LVM makes the device nodes itself. Only loop devices\n\
             # hold PVs: LVM need not open every thin LV at each command.\n\
             printf 'activation {{\\n udev_sync = 0\\n udev_rules = 0\\n monitoring = 0\\n}}\\ndevices {{\\n obtain_device_list_from_udev = 0\\n global_filter = [ \"a|^/dev/loop|\", \"r|.*|\" ]\\n}}\\n' > /etc/lvm/lvmlocal.conf\n\
             export QUBES_LVM_TEST_DIR=/scratch QUBES_CTL_BIN=$(command -v qubes-ctl)\n\
             # Pools of our own drivers on the same disk as the VGs, for like-for-like figures.\n\
             mkdir -p /scratch/tmp; export TMPDIR=/scratch/tmp\n\
             {runs_sh}\
             echo; echo 'LVM after the tests:'\n\
             vgs; lvs\n"
        ),
    )
    .unwrap();
    // The by-hand runs (model rules, crash rounds, benchmarks) take longer than CI's.
    let vm_timeout = std::env::var("QUBES_LVM_VM_TIMEOUT").unwrap_or_else(|_| "1500".into());
    let out = Command::new(repo_dir().join("scripts/testvm.sh"))
        .args(["--timeout", &vm_timeout, "--scratch", "40G", "--share"])
        .arg(s)
        .args(["--", "sh", "/share/run.sh"])
        .output()
        .expect("running scripts/testvm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    println!("lvm_thin tests in the VM: {:.0?}", t0.elapsed());
    assert!(out.status.success(), "the lvm_thin tests failed in the VM");
    let summaries: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("test result: "))
        .collect();
    assert_eq!(
        summaries.len(),
        filters.lines().count(),
        "every run reports"
    );
    assert!(
        summaries.iter().all(|l| l.starts_with("test result: ok.")),
        "{summaries:?}"
    );
    // A filter that matches nothing also reports "ok": each run must have run tests.
    for l in &summaries {
        let passed: u32 = l
            .split("; ")
            .find_map(|p| {
                p.trim_start_matches("test result: ok. ")
                    .strip_suffix(" passed")
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no passed count in {l:?}"));
        assert!(passed > 0, "a VM run ran no test: {l}");
    }
    if filters == DEFAULT_VM_TESTS {
        assert!(
            summaries[0].contains(&format!("ok. {DEFAULT_VM_TEST_COUNT} passed")),
            "the {DEFAULT_VM_TEST_COUNT} conformance tests and model rules: {summaries:?}"
        );
        assert!(
            summaries[1].contains("ok. 3 passed"),
            "the Qubes-made pool, the suspended devices and the SIGKILL test: {summaries:?}"
        );
    }
}
