//! The whole product for a user, with a real Debian guest under QEMU (TCG where KVM does
//! not work): build recipes/debian/minimal, create AppVM `work`, boot it; the guest's
//! `/rw/config/rc.local` (on the private volume the test imports) reports what it sees on
//! the serial console and writes markers into /rw (private) and /etc (root).
//!
//! 0. `qube run` starts `work2` and runs commands through the guest agent (output, exit
//!    status, stdin), `qube console` in a real terminal (tmux) logs in, runs a command,
//!    detaches, the qube runs on; 1. first boot writes the markers; 2. the next boot sees /rw's, not /etc's;
//! 3. a template update is seen by `work` at its next start, while `work2`, running across
//!    the update, keeps the old root; 4. `volume revert work:private` brings back the state
//!    before the markers; 5. a DispVM leaves nothing behind, a StandaloneVM does not follow
//!    the template; 6. SIGKILL of the daemon while `work` runs: the pool verifies clean and
//!    the private head is what it was before that start.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{apt_mirror, ext4_cat, private_image, qubes_ctl_bin, wait_for, Ctl};
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// What every qube's private volume runs at boot (through the guest integration's
/// /rw/config/rc.local hook): report, bump the /rw counter, mark /etc, power off unless
/// the kernel command line says `qtest.stay`.
const RC_LOCAL: &str = r#"#!/bin/sh
rw=$(cat /rw/marker 2>/dev/null || echo none)
etc=$(cat /etc/marker 2>/dev/null || echo none)
tpl=$(cat /etc/tpl-marker 2>/dev/null || echo none)
echo "QTEST host=$(hostname) rw=$rw etc=$etc tpl=$tpl" > /dev/ttyS0
if [ "$rw" = none ]; then n=1; else n=$((rw + 1)); fi
echo "$n" > /rw/marker
echo "written-by-$(hostname)" > /etc/marker
sync
echo "QTEST-DONE host=$(hostname)" > /dev/ttyS0
grep -q qtest.stay /proc/cmdline || systemctl poweroff
"#;

/// The template's own private volume: updates the template's root.
const TEMPLATE_RC_LOCAL: &str = r#"#!/bin/sh
echo "v2" > /etc/tpl-marker
sync
echo "QTEST-TEMPLATE-UPDATED" > /dev/ttyS0
systemctl poweroff
"#;

/// Boots `qube`, waits for its report line and, unless it stays up, for it to halt.
/// Returns the report line (`QTEST host=.. rw=.. etc=.. tpl=..`).
fn boot(ctl: &Ctl, qube: &str, expect_halt: bool) -> String {
    let _ = std::fs::remove_file(ctl.console_path(qube));
    let started = ctl.json(&["qube", "start", qube]);
    assert_eq!(started["state"], "running", "{started}");
    let mut line = String::new();
    wait_for(
        &format!("{qube}'s report on its console"),
        BOOT_TIMEOUT,
        || {
            let log = ctl.console(qube);
            if let Some(l) = log.lines().find(|l| l.starts_with("QTEST ")) {
                line = l.trim().to_string();
            }
            log.contains("QTEST-DONE") || log.contains("QTEST-TEMPLATE-UPDATED")
        },
    );
    if expect_halt {
        wait_for(
            &format!("{qube} to power off and be reaped"),
            BOOT_TIMEOUT,
            || ctl.state(qube) == "halted",
        );
    }
    line
}

fn fingerprint(ctl: &Ctl, vol: &str) -> String {
    let out = ctl.root.join("fp.img");
    ctl.ok(&["volume", "export", vol, out.to_str().unwrap()]);
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    blake3::hash(&data).to_hex().to_string()
}

/// Reads a file out of an ext4 image (exported volume) with debugfs; None if absent.
fn export_to(ctl: &Ctl, vol: &str, path: &Path) {
    ctl.ok(&["volume", "export", vol, path.to_str().unwrap()]);
}

#[test]
fn debian_qubes_boot_persist_update_revert_and_survive_a_daemon_kill() {
    let ctl = Ctl::new();
    let work = ctl.root.join("w");
    std::fs::create_dir_all(&work).unwrap();
    ctl.ok(&["pool", "init", "--size", "40G"]);

    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/debian/minimal.toml");
    let mut args = vec![
        "template",
        "build",
        recipe.to_str().unwrap(),
        "--name",
        "deb",
    ];
    let mirror = apt_mirror();
    if let Some(m) = mirror.as_deref() {
        args.extend(["--mirror", m]);
    }
    let t: Value = ctl.json(&args);
    assert!(t["kernel"].is_string(), "the template brings a kernel: {t}");
    assert_eq!(t["fingerprint"].as_str().unwrap().len(), 64);

    // Private volumes with the test's rc.local hook.
    ctl.ok(&[
        "qube",
        "create",
        "work",
        "--template",
        "deb",
        "--label",
        "blue",
    ]);
    ctl.ok(&[
        "qube",
        "create",
        "work2",
        "--template",
        "deb",
        "--label",
        "green",
    ]);
    ctl.ok(&[
        "qube",
        "create",
        "sa",
        "--class",
        "StandaloneVM",
        "--template",
        "deb",
    ]);
    for (q, rc) in [
        ("work", RC_LOCAL),
        ("work2", RC_LOCAL),
        ("deb", TEMPLATE_RC_LOCAL),
    ] {
        let img = private_image(&work, q, rc, "256M");
        ctl.ok(&[
            "volume",
            "import",
            &format!("{q}:private"),
            img.to_str().unwrap(),
        ]);
    }
    ctl.ok(&["volume", "config", "work:private", "revisions_to_keep", "5"]);
    let initial_revisions = ctl.json(&["volume", "info", "work:private"])["revisions"]
        .as_array()
        .unwrap()
        .len();

    // 0. `qube run` starts a halted qube, as qvm-run does, and the guest agent runs
    // commands in it; `qube console` is interactive. work2 stays up (qtest.stay).
    ctl.ok(&["qube", "prefs", "work2", "kernelopts", "qtest.stay"]);
    use_the_running_qube(&ctl, "work2");
    ctl.ok(&["qube", "shutdown", "work2"]);

    // 1. First boot writes the markers.
    let r = boot(&ctl, "work", true);
    assert!(
        r.contains("host=work ") && r.contains("rw=none") && r.contains("etc=none"),
        "{r}"
    );
    // 2. /rw persists, /etc does not.
    let r = boot(&ctl, "work", true);
    assert!(
        r.contains("rw=1") && r.contains("etc=none") && r.contains("tpl=none"),
        "{r}"
    );

    // 3. Template update while work2 runs.
    ctl.ok(&["qube", "prefs", "work2", "kernelopts", "qtest.stay"]);
    let r = boot(&ctl, "work2", false);
    assert!(r.contains("tpl=none"), "{r}");
    // qvm-pause: the guest freezes (QMP stop), its volumes stay served.
    let paused = ctl.json(&["qube", "pause", "work2"]);
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(ctl.state("work2"), "paused");
    let resumed = ctl.json(&["qube", "unpause", "work2"]);
    assert_eq!(resumed["state"], "running", "{resumed}");
    boot(&ctl, "deb", true);
    let tpl_root = work.join("tpl-root.img");
    export_to(&ctl, "deb:root", &tpl_root);
    assert_eq!(
        ext4_cat(&tpl_root, "/etc/tpl-marker").as_deref(),
        Some("v2"),
        "the template committed its change"
    );
    // work2, running across the update, still has the old root under it.
    let info = ctl.json(&["volume", "info", "work2:root"]);
    let uri = info["nbd_uri"]
        .as_str()
        .expect("running volume has an nbd_uri")
        .to_string();
    let w2_root = work.join("w2-root.img");
    let st = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&w2_root)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        ext4_cat(&w2_root, "/etc/tpl-marker"),
        None,
        "a running qube keeps its old root"
    );
    ctl.ok(&["qube", "shutdown", "work2"]);
    // work sees the update at its next start.
    let r = boot(&ctl, "work", true);
    assert!(r.contains("tpl=v2") && r.contains("rw=2"), "{r}");

    // 4. Revert to the oldest revision: the state before the first boot.
    let info = ctl.json(&["volume", "info", "work:private"]);
    let revs = info["revisions"].as_array().unwrap();
    assert!(revs.len() >= initial_revisions + 3, "{info}");
    // Revisions in order of supersession: [empty head, imported image, after boot 1,
    // after boot 2]: the one after the initial ones is the image, before any marker.
    let mut sorted: Vec<(f64, String)> = revs
        .iter()
        .map(|r| {
            (
                r["timestamp"].as_f64().unwrap(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let before_markers = &sorted[initial_revisions].1;
    ctl.ok(&["volume", "revert", "work:private", before_markers]);
    let priv_img = work.join("priv.img");
    export_to(&ctl, "work:private", &priv_img);
    assert_eq!(
        ext4_cat(&priv_img, "/marker"),
        None,
        "the marker from step 1 is gone again"
    );
    assert!(ext4_cat(&priv_img, "/config/rc.local").is_some());

    // 5. A DispVM (on work as its disposable template) leaves nothing behind.
    ctl.ok(&["qube", "prefs", "work", "template_for_dispvms", "true"]);
    ctl.ok(&[
        "qube",
        "create",
        "disp1",
        "--class",
        "DispVM",
        "--template",
        "work",
    ]);
    let work_priv = fingerprint(&ctl, "work:private");
    let deb_root = fingerprint(&ctl, "deb:root");
    let r = boot(&ctl, "disp1", true);
    assert!(r.contains("host=disp1") && r.contains("tpl=v2"), "{r}");
    assert_eq!(
        fingerprint(&ctl, "work:private"),
        work_priv,
        "the DispVM's writes did not reach work:private"
    );
    assert_eq!(fingerprint(&ctl, "deb:root"), deb_root, "nor the template");
    let r = boot(&ctl, "disp1", true);
    assert!(
        r.contains("rw=none") && r.contains("etc=none"),
        "nothing survives a DispVM: {r}"
    );
    // The StandaloneVM, copied before the update, does not follow it.
    let sa_root = work.join("sa-root.img");
    export_to(&ctl, "sa:root", &sa_root);
    assert_eq!(
        ext4_cat(&sa_root, "/etc/tpl-marker"),
        None,
        "a StandaloneVM does not follow its template"
    );

    // 6. SIGKILL the daemon while work runs.
    let head_before = fingerprint(&ctl, "work:private");
    ctl.ok(&["qube", "prefs", "work", "kernelopts", "qtest.stay"]);
    let r = boot(&ctl, "work", false);
    assert!(r.contains("host=work"), "{r}");
    let pid = ctl.daemon_pid();
    // SAFETY: kill(2) of the daemon's pid, read from its pid file.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    let v = ctl.json(&["pool", "verify"]);
    assert_eq!(v["clean"], true, "{v}");
    let info = ctl.json(&["volume", "info", "work:private"]);
    assert_eq!(info["dirty"], true, "{info}");
    assert_eq!(
        fingerprint(&ctl, "work:private"),
        head_before,
        "the head is what it was before that start"
    );
    // A new daemon picks the qube up again; then it shuts down cleanly.
    ctl.ok(&["daemon", "start"]);
    assert_eq!(ctl.state("work"), "running");
    ctl.ok(&["qube", "shutdown", "work", "--timeout", "120"]);
    assert_eq!(ctl.state("work"), "halted");
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}

/// Step 0: `q` is halted; `qube run` starts it, then the console and the agent are used
/// on the running qube. Leaves `q` running.
fn use_the_running_qube(ctl: &Ctl, q: &str) {
    let _ = std::fs::remove_file(ctl.console_path(q));
    // --no-autostart refuses a halted qube.
    let e = ctl.fails(&["qube", "run", q, "--no-autostart", "--", "true"]);
    assert!(e.contains("--no-autostart"), "{e}");
    assert_eq!(ctl.state(q), "halted");
    // qvm-run's autostart: boots the qube, waits for its agent, runs the command.
    let t = Instant::now();
    let out = ctl.output(&["qube", "run", q, "--", "cat", "/etc/hostname"]);
    eprintln!("qube run with autostart took {:?}", t.elapsed());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctl.console(q)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{q}\n"));
    assert_eq!(ctl.state(q), "running");
    // The exit status is the command's; stderr is passed back apart from stdout.
    let out = ctl.output(&["qube", "run", q, "--", "sh", "-c", "echo e >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "e\n");
    // --pass-io: this stdin is the command's.
    let mut child = ctl
        .cmd(&["qube", "run", q, "--pass-io", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    // An unknown command: the shell's 127 and a message naming it.
    let out = ctl.output(&["qube", "run", q, "--", "no-such-command-x"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command-x"));
    // --user: the command runs as that user.
    let out = ctl.ok(&["qube", "run", q, "--user", "nobody", "--", "id", "-un"]);
    assert_eq!(out, "nobody\n");
    // --no-wait returns at once; the command runs on in the qube.
    ctl.ok(&[
        "qube",
        "run",
        q,
        "--no-wait",
        "--",
        "sh",
        "-c",
        "sleep 1; echo late > /tmp/late",
    ]);
    wait_for(
        "the --no-wait command's file",
        Duration::from_secs(60),
        || {
            ctl.output(&["qube", "run", q, "--", "cat", "/tmp/late"])
                .stdout
                == b"late\n"
        },
    );
    console_in_tmux(ctl, q);
    assert_eq!(ctl.state(q), "running", "detaching leaves the qube running");
}

/// `qube console work` in a real terminal: log in (root's autologin on the serial
/// console: Enter gives a prompt), run a command, detach with Ctrl-].
fn console_in_tmux(ctl: &Ctl, q: &str) {
    let server = format!("qctest{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &server])
            .args(args)
            .output()
            .expect("tmux (scripts/install-deps.sh installs it)")
    };
    let pane =
        || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "con"]).stdout).into_owned();
    let cmd = format!(
        "{} --root {} qube console {q}; echo CONSOLE-EXIT-$?; \
         if stty -a | grep -qw -- -icanon; then echo TTY-RAW; else echo TTY-COOKED; fi; \
         sleep 600",
        qubes_ctl_bin().display(),
        ctl.root.display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "con",
        "-x",
        "160",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(out.status.success(), "{out:?}");
    struct Kill<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    let _kill = Kill(&tmux);
    let t = Duration::from_secs(60);
    wait_for("the console banner", t, || {
        pane().contains("Escape character is ^]")
    });
    // One client at a time.
    let e = ctl.fails(&["qube", "console", q]);
    assert!(e.contains("already attached"), "{e}");
    wait_for("a root shell prompt on the console", t, || {
        tmux(&["send-keys", "-t", "con", "Enter"]);
        std::thread::sleep(Duration::from_secs(1));
        pane().contains(&format!("root@{q}"))
    });
    tmux(&["send-keys", "-t", "con", "echo CON-$((6*7))", "Enter"]);
    wait_for("the command's output in the terminal", t, || {
        pane().contains("CON-42")
    });
    tmux(&["send-keys", "-t", "con", "C-]"]);
    wait_for("qube console to detach and exit 0", t, || {
        let p = pane();
        p.contains("CONSOLE-EXIT-0") && p.contains(&format!("Detached from {q}'s console"))
    });
    // The terminal was given back in its normal (cooked) mode. The shell prints the mode
    // after the exit status, so wait for that line too rather than racing it.
    wait_for("the shell to report the terminal mode", t, || {
        pane().contains("TTY-")
    });
    assert!(pane().contains("TTY-COOKED"), "{}", pane());
    assert!(
        ctl.console(q).contains("CON-42"),
        "console.log keeps the session"
    );
}
