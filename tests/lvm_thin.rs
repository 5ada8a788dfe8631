//! `lvm_thin` on a real kernel (dm-thin of Debian 12's 6.1, lvm2 2.03.16) inside the VM
//! harness (scripts/testvm.sh). The host test [`lvm_thin_in_vm`] boots the VM once and
//! runs this same binary's ignored tests there:
//! * `vm::conformance::*`, `vm::model_rules::*`: the storage conformance suite and the
//!   volume-model rules, each on a thin pool in a loop-backed VG of its own;
//! * `vm_cli::qubes_shaped_pool_is_read`: a pool laid out by plain `lvcreate` commands as
//!   Qubes does, taken over by `qubes-ctl pool init --driver lvm_thin`, read by
//!   `volume list` / `volume info`, started and stopped;
//! * `vm_cli::sigkill_at_random_points_leaves_the_pool_consistent`: the daemon killed
//!   during start / stop / revert / import, then `lvs` shows no orphan and the next start
//!   works;
//! * `vm_cli::bench_start_shutdown`: start+shutdown latency, lvm_thin against thin, in the
//!   same VM (figures printed, nothing asserted about them).

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
        for round in 0..12 {
            let running = ctl
                .json(&["qube", "list"])
                .as_array()
                .unwrap()
                .iter()
                .any(|q| q["name"] == "work" && q["state"] == "running");
            let op = if running { 1 } else { [0, 2, 3][round % 3] };
            let args = &ops[op];
            ctl.ok(&["daemon", "start"]);
            let pid = ctl.daemon_pid();
            let mut child = ctl
                .cmd(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
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
            println!("round {round}: {args:?} killed {when}; LVs {lvs:?}");
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

/// What CI runs in the VM: the conformance suite (about 3 min in the VM under TCG, 4 min
/// with the boot). The volume-model rules take over a minute each under TCG on a loaded
/// host (every start/stop is several LVM commands, each scanning devices), and the
/// `vm_cli` tests boot the daemon: run them with
/// `QUBES_LVM_VM_TESTS=$'vm::model_rules --test-threads=2\nvm_cli:: --test-threads=1 --nocapture'`.
const DEFAULT_VM_TESTS: &str = "vm::conformance --test-threads=2";

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
             {runs_sh}\
             echo; echo 'LVM after the tests:'\n\
             vgs; lvs\n"
        ),
    )
    .unwrap();
    let out = Command::new(repo_dir().join("scripts/testvm.sh"))
        .args(["--timeout", "1500", "--scratch", "40G", "--share"])
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
            summaries[0].contains("ok. 17 passed"),
            "the 17 conformance tests: {summaries:?}"
        );
    }
}
