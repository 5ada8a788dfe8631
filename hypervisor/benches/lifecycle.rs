//! Lifecycle latencies of the qemu backend, side by side with its peer: the very same
//! QEMU command line launched and stopped directly (what a shell script would do),
//! so the difference is what the backend adds (state checks, QMP, cleanup).
//! TCG, a busybox guest that idles; `QUBES_BENCH_ROUNDS` rounds (default 5).

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hypervisor::initramfs::{busybox_initramfs, host_kernel};
use hypervisor::{Accel, DomainSpec, DomainState, Hypervisor, Qemu, VirtMode};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn pid_of(run_dir: &Path) -> i32 {
    std::fs::read_to_string(run_dir.join("qemu.pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid")
}

fn main() {
    let rounds: usize = std::env::var("QUBES_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::Builder::new()
        .prefix("hvb")
        .tempdir_in("/tmp")
        .unwrap();
    let initrd = tmp.path().join("initramfs.cpio");
    std::fs::write(
        &initrd,
        busybox_initramfs("while true; do sleep 1; done\n", &[]).unwrap(),
    )
    .unwrap();
    let spec = DomainSpec {
        name: "bench".into(),
        memory_mib: 256,
        maxmem_mib: 256,
        vcpus: 1,
        virt_mode: VirtMode::Hvm,
        kernel: Some(host_kernel().expect("no /boot/vmlinuz-*")),
        initrd: Some(initrd),
        cmdline: "quiet".into(),
        disks: vec![],
        netvm: None,
        net: Default::default(),
        label: "gray".into(),
        run_dir: tmp.path().join("run/bench"),
        user: None,
    };
    let hv = Qemu::new().with_accel(Accel::Tcg);

    let (mut start, mut state, mut kill) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        hv.start(&spec).expect("start");
        start.push(ms(t));
        let t = Instant::now();
        assert_eq!(
            hv.state("bench", &spec.run_dir).unwrap(),
            DomainState::Running
        );
        state.push(ms(t));
        let t = Instant::now();
        hv.kill("bench", &spec.run_dir).expect("kill");
        kill.push(ms(t));
    }

    // Peer: the same arguments, launched directly (daemonized, so without the sandbox's
    // spawn=deny and elevateprivileges=deny, which -daemonize trips); stopped with
    // SIGTERM + wait.
    let mut args = hv.command_line(&spec, Accel::Tcg).unwrap();
    for a in args.iter_mut() {
        if a.as_str() == hypervisor::qemu::SANDBOX {
            *a = "on,obsolete=deny,resourcecontrol=deny".into();
        }
    }
    args.push("-daemonize".into());
    let (mut pstart, mut palive, mut pkill) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        let st = Command::new("qemu-system-x86_64")
            .args(&args)
            .current_dir(&spec.run_dir)
            .stdin(Stdio::null())
            .status()
            .expect("qemu");
        assert!(st.success());
        pstart.push(ms(t));
        let pid = pid_of(&spec.run_dir);
        let t = Instant::now();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        palive.push(ms(t));
        let t = Instant::now();
        Command::new("kill").arg(pid.to_string()).status().unwrap();
        while Path::new(&format!("/proc/{pid}/cmdline")).exists()
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| !c.is_empty())
                .unwrap_or(false)
        {
            thread::sleep(Duration::from_millis(5));
        }
        pkill.push(ms(t));
        let _ = std::fs::remove_file(spec.run_dir.join("qmp.sock"));
    }

    println!("qemu lifecycle, TCG, {rounds} rounds, median ms");
    println!(
        "{:<28} {:>12} {:>14}",
        "operation", "hypervisor", "direct qemu"
    );
    println!(
        "{:<28} {:>12.1} {:>14.1}",
        "start (to QMP ready)",
        median(start),
        median(pstart)
    );
    println!(
        "{:<28} {:>12.1} {:>14.1}",
        "state (QMP / /proc check)",
        median(state),
        median(palive)
    );
    println!(
        "{:<28} {:>12.1} {:>14.1}",
        "stop (QMP quit / SIGTERM)",
        median(kill),
        median(pkill)
    );
}
