//! Every xl config the xen backend generates is parsed by libxlutil (through
//! bindgen), the library `xl create` itself uses, and the values it reads back are
//! checked. Xen is not needed; a config xl would reject fails here.
//! The command plumbing (`xl create/list/shutdown/destroy`) runs against a stand-in
//! `xl` script that records its arguments.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fake_xl;
use hypervisor::xen::{config_text, disk_spec_string};
use hypervisor::{DiskSpec, DomainSpec, DomainState, Hypervisor, VirtMode, Xen, XenDiskMode};
use xlutil_sys::ffi::{libxl_disk_backend, libxl_disk_format};
use xlutil_sys::XlConfig;

fn spec(mode: VirtMode, run_dir: &Path, socket: &str) -> DomainSpec {
    DomainSpec {
        name: "work-1".into(),
        memory_mib: 400,
        maxmem_mib: 4000,
        vcpus: 2,
        virt_mode: mode,
        kernel: Some("/var/lib/qubes/vm-kernels/6.1.57-1/vmlinuz".into()),
        initrd: Some("/var/lib/qubes/vm-kernels/6.1.57-1/initramfs".into()),
        cmdline: "root=/dev/mapper/dmroot ro nomodeset".into(),
        disks: ["root", "private", "volatile"]
            .iter()
            .enumerate()
            .map(|(i, v)| DiskSpec {
                vdev: format!("xvd{}", (b'a' + i as u8) as char),
                nbd_socket: PathBuf::from(socket),
                export: format!("work-1/{v}"),
                read_only: i == 0,
                block_device: None,
            })
            .collect(),
        netvm: Some("sys-firewall".into()),
        net: Default::default(),
        label: "blue".into(),
        run_dir: run_dir.to_path_buf(),
        user: None,
    }
}

/// Parses the config for `spec` and checks everything xl would read from it.
fn check(spec: &DomainSpec) -> XlConfig {
    let text = config_text(spec).expect("config_text");
    let cfg = XlConfig::parse(&text).unwrap_or_else(|e| panic!("{e}\nconfig:\n{text}"));
    assert_eq!(cfg.string("name").as_deref(), Some(spec.name.as_str()));
    assert_eq!(cfg.string("type").as_deref(), Some(spec.virt_mode.as_str()));
    assert_eq!(cfg.long("memory"), Some(spec.memory_mib as i64));
    assert_eq!(cfg.long("maxmem"), Some(spec.maxmem_mib as i64));
    assert_eq!(cfg.long("vcpus"), Some(spec.vcpus as i64));
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    assert_eq!(cfg.string("kernel"), path(&spec.kernel));
    assert_eq!(cfg.string("ramdisk"), path(&spec.initrd));
    for ev in ["on_poweroff", "on_reboot", "on_crash"] {
        assert_eq!(cfg.string(ev).as_deref(), Some("destroy"), "{ev}");
    }

    let disks = cfg.list("disk").expect("disk list");
    assert_eq!(disks.len(), spec.disks.len());
    for (raw, want) in disks.iter().zip(&spec.disks) {
        assert_eq!(raw, &disk_spec_string(want));
        let d = cfg
            .parse_disk(raw)
            .unwrap_or_else(|e| panic!("{e}\nspec: {raw}"));
        assert_eq!(d.vdev.as_deref(), Some(want.vdev.as_str()));
        assert_eq!(
            d.pdev_path,
            Some(format!(
                "nbd:unix:{}:exportname={}",
                want.nbd_socket.display(),
                want.export
            ))
        );
        assert_eq!(d.backend, libxl_disk_backend::LIBXL_DISK_BACKEND_QDISK);
        assert_eq!(d.format, libxl_disk_format::LIBXL_DISK_FORMAT_RAW);
        assert_eq!(d.readwrite, !want.read_only, "{raw}");
        assert!(!d.is_cdrom);
    }

    let vifs = cfg.list("vif").expect("vif list");
    match (&spec.netvm, &spec.net.uplink_bridge) {
        (Some(n), _) => assert_eq!(vifs, vec![hypervisor::xen::vif_spec_string(spec, n)]),
        (None, Some(b)) => assert_eq!(vifs, vec![hypervisor::xen::uplink_vif_spec_string(spec, b)]),
        (None, None) => assert!(vifs.is_empty()),
    }
    cfg
}

#[test]
fn pv_config_parses_with_three_nbd_disks_and_a_vif() {
    let mut s = spec(
        VirtMode::Pv,
        Path::new("/run/qubes/work-1"),
        "/run/qubes/work-1/nbd.sock",
    );
    s.net.mac = "00:16:3e:5e:6c:07".into();
    s.net.ip = "10.137.0.7".into();
    let cfg = check(&s);
    // The guest finds its NIC by this MAC (qubes.mac=); without it libxl picks one. The
    // netvm's vif hotplug reads the client's address from the backend's `ip`.
    assert_eq!(
        cfg.list("vif").unwrap(),
        vec!["backend=sys-firewall,mac=00:16:3e:5e:6c:07,ip=10.137.0.7".to_string()]
    );
    assert_eq!(
        cfg.string("cmdline").as_deref(),
        Some("root=/dev/mapper/dmroot ro nomodeset console=hvc0")
    );
}

#[test]
fn a_netvms_uplink_vif_parses() {
    let mut s = spec(
        VirtMode::Pv,
        Path::new("/run/qubes/sys-net"),
        "/run/qubes/sys-net/nbd.sock",
    );
    s.netvm = None;
    s.net.provides_network = true;
    s.net.mac = "00:16:3e:5e:6c:02".into();
    s.net.uplink_bridge = Some("xenbr0".into());
    let cfg = check(&s);
    // Backend dom0 (no backend=), on that bridge, with the MAC the guest configures.
    assert_eq!(
        cfg.list("vif").unwrap(),
        vec!["bridge=xenbr0,mac=00:16:3e:5e:6c:02".to_string()]
    );
}

#[test]
fn pvh_config_parses_with_three_nbd_disks_and_a_vif() {
    let s = spec(
        VirtMode::Pvh,
        Path::new("/run/qubes/work-1"),
        "/run/qubes/work-1/nbd.sock",
    );
    let cfg = check(&s);
    assert!(cfg.string("cmdline").unwrap().ends_with("console=hvc0"));
}

#[test]
fn hvm_config_parses_with_and_without_a_kernel() {
    let s = spec(
        VirtMode::Hvm,
        Path::new("/run/qubes/work-1"),
        "/run/qubes/work-1/nbd.sock",
    );
    let cfg = check(&s);
    // HVM keeps its emulated serial console choice to the command line.
    assert_eq!(
        cfg.string("cmdline").as_deref(),
        Some("root=/dev/mapper/dmroot ro nomodeset")
    );
    let mut s = s;
    s.kernel = None;
    s.initrd = None;
    s.netvm = None;
    let cfg = check(&s);
    assert_eq!(cfg.string("cmdline"), None);
}

#[test]
fn awkward_values_survive_quoting() {
    // Quotes and backslashes in the command line, commas, quotes and a backslash in
    // the socket path and export name: libxlutil must read back exactly what we meant.
    let mut s = spec(
        VirtMode::Pvh,
        Path::new("/run/qubes/work-1"),
        "/run/qu,bes/it's \"x\"\\y/nbd.sock",
    );
    s.cmdline = r#"init=/bin/sh -c "echo 'hi' \\ there"	tab"#.into();
    for d in &mut s.disks {
        d.export = format!("{},odd", d.export);
    }
    let cfg = check(&s);
    assert_eq!(
        cfg.string("cmdline"),
        Some(format!("{} console=hvc0", s.cmdline))
    );
}

#[test]
fn libxlutil_rejects_what_xl_would_reject() {
    // Proves the parser in these tests is the strict one, not a stand-in.
    assert!(XlConfig::parse("name = \"unterminated\n").is_err());
    let err = XlConfig::parse("memory = = 4\n").err().unwrap();
    assert!(err.contains("xlu_cfg_readdata"), "{err}");
    let cfg = XlConfig::parse("name = \"x\"\n").unwrap();
    assert!(cfg.parse_disk("vdev=xvda,access=bogus,target=/x").is_err());
}

#[test]
fn start_writes_the_config_and_drives_xl() {
    let tmp = tempfile::tempdir().unwrap();
    let xl = fake_xl(tmp.path());
    let hv = Xen::with_xl(xl.to_string_lossy()).with_disk_mode(XenDiskMode::Qdisk);
    let run_dir = tmp.path().join("work-1");
    let s = spec(VirtMode::Pvh, &run_dir, "/run/qubes/work-1/nbd.sock");
    assert_eq!(hv.state("work-1", &run_dir).unwrap(), DomainState::Halted);
    hv.start(&s).unwrap();
    assert_eq!(hv.state("work-1", &run_dir).unwrap(), DomainState::Running);
    assert!(matches!(
        hv.start(&s),
        Err(hypervisor::HvError::AlreadyRunning { .. })
    ));
    // The file handed to `xl create` is the one libxlutil accepts.
    let written = fs::read_to_string(Xen::config_path(&run_dir)).unwrap();
    assert_eq!(written, config_text(&s).unwrap());
    hv.shutdown("work-1", &run_dir, Duration::from_secs(5))
        .unwrap();
    assert_eq!(hv.state("work-1", &run_dir).unwrap(), DomainState::Halted);
    hv.kill("work-1", &run_dir).unwrap();
    assert_eq!(
        hv.console_log(&run_dir),
        PathBuf::from("/var/log/xen/console/guest-work-1.log")
    );
    let calls = fs::read_to_string(tmp.path().join("xl.calls")).unwrap();
    let cfg = Xen::config_path(&run_dir);
    assert!(
        calls.contains(&format!("create {}\n", cfg.display())),
        "{calls}"
    );
    assert!(calls.contains("shutdown -F -w work-1\n"), "{calls}");
    // kill of a halted domain does not call destroy.
    assert!(!calls.contains("destroy"), "{calls}");
}

/// Seen on a loaded nested Xen: `xl shutdown -w` failed while xl's own monitor tore the
/// domain down, and the `xl destroy` that followed failed too ("unable to find domain
/// info"), so `qube shutdown` reported an error for a domain that was gone.
#[test]
fn a_destroy_that_loses_the_race_with_xls_teardown_is_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let xl = fake_xl(tmp.path());
    let hv = Xen::with_xl(xl.to_string_lossy()).with_disk_mode(XenDiskMode::Qdisk);
    let run_dir = tmp.path().join("work-1");
    let s = spec(VirtMode::Pvh, &run_dir, "/run/qubes/work-1/nbd.sock");
    hv.start(&s).unwrap();
    // From now on: the wait fails with the domain still listed, and the destroy
    // fails although the domain goes.
    let marker = tmp.path().join("xl.running");
    let racing = tmp.path().join("xl-racing");
    fs::write(
        &racing,
        format!(
            "#!/bin/sh\n\
             case \"$1\" in\n\
             shutdown) echo \"$*\" >> '{calls}'; echo 'libxl: error: wait failed' >&2; exit 1 ;;\n\
             destroy) echo \"$*\" >> '{calls}'; rm -f '{marker}'; \
                      echo 'libxl: error: unable to find domain info for domain 7' >&2; exit 1 ;;\n\
             esac\n\
             exec '{xl}' \"$@\"\n",
            calls = tmp.path().join("xl.calls").display(),
            marker = marker.display(),
            xl = xl.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&racing, fs::Permissions::from_mode(0o755)).unwrap();
    let hv = Xen::with_xl(racing.to_string_lossy()).with_disk_mode(XenDiskMode::Qdisk);
    hv.shutdown("work-1", &run_dir, Duration::from_secs(5))
        .expect("the domain is gone: the shutdown succeeded");
    assert_eq!(hv.state("work-1", &run_dir).unwrap(), DomainState::Halted);
    let calls = fs::read_to_string(tmp.path().join("xl.calls")).unwrap();
    assert!(calls.contains("destroy work-1"), "{calls}");
    // A destroy that fails with the domain still there stays an error.
    hv.start(&s).unwrap();
    fs::write(
        &racing,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = destroy ] && {{ echo 'libxl: error: busy' >&2; exit 1; }}\n\
             exec '{}' \"$@\"\n",
            xl.display()
        ),
    )
    .unwrap();
    assert!(hv.kill("work-1", &run_dir).is_err());
    assert_eq!(hv.state("work-1", &run_dir).unwrap(), DomainState::Running);
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(256))]

    /// Whatever printable text reaches the config (command line, paths, export names),
    /// libxlutil reads back exactly that text.
    #[test]
    fn any_printable_values_round_trip_through_libxlutil(
        name in "[A-Za-z0-9][A-Za-z0-9_.-]{0,30}",
        cmdline in "\\PC{0,80}",
        kernel in "/\\PC{1,60}",
        socket in "/\\PC{1,60}",
        export in "\\PC{1,40}",
        mode in proptest::sample::select(vec![VirtMode::Pv, VirtMode::Pvh, VirtMode::Hvm]),
        ro in proptest::bool::ANY,
    ) {
        let mut s = spec(mode, Path::new("/run/qubes/x"), &socket);
        s.name = name;
        s.cmdline = cmdline.clone();
        s.kernel = Some(PathBuf::from(&kernel));
        for d in &mut s.disks {
            d.export = export.clone();
            d.read_only = ro;
        }
        if export.ends_with(|c: char| c == ',' || c.is_whitespace()) {
            // xl's disk syntax would drop it; the backend refuses rather than mangle.
            proptest::prop_assert!(config_text(&s).is_err());
            return Ok(());
        }
        let cfg = check(&s);
        let has_console = cmdline.split_whitespace().any(|w| w.starts_with("console="));
        let want = match mode {
            VirtMode::Hvm => cmdline.trim().to_string(),
            _ if has_console => cmdline.clone(),
            _ if cmdline.trim().is_empty() => "console=hvc0".to_string(),
            _ => format!("{} console=hvc0", cmdline.trim()),
        };
        let got = cfg.string("cmdline");
        if want.is_empty() {
            proptest::prop_assert_eq!(got, None);
        } else {
            proptest::prop_assert_eq!(got, Some(want));
        }
    }
}

/// A stand-in `qemu-nbd` that records its arguments, and a stand-in /sys/block with
/// nbd0..nbd3 of which nbd1 is busy.
fn fake_kernel_nbd(dir: &Path) -> (PathBuf, PathBuf) {
    let script = dir.join("qemu-nbd");
    fs::write(
        &script,
        format!(
            // As qemu-nbd's getopt: `--disconnect` takes no argument.
            "#!/bin/sh\necho \"$*\" >> '{}'\ncase \"$1\" in --disconnect=*) \
             echo \"qemu-nbd: option '--disconnect' doesn't allow an argument\" >&2; exit 1;; esac\n",
            dir.join("qemu-nbd.calls").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let sys = dir.join("sys-block");
    for n in 0..4 {
        fs::create_dir_all(sys.join(format!("nbd{n}"))).unwrap();
    }
    fs::create_dir_all(sys.join("loop0")).unwrap();
    fs::write(sys.join("nbd1/pid"), "4242\n").unwrap();
    (script, sys)
}

#[test]
fn kernel_nbd_mode_gives_phy_disks_and_detaches_them() {
    let tmp = tempfile::tempdir().unwrap();
    let xl = fake_xl(tmp.path());
    let (qemu_nbd, sys) = fake_kernel_nbd(tmp.path());
    let hv = Xen::with_xl(xl.to_string_lossy())
        .with_disk_mode(XenDiskMode::KernelNbd)
        .with_kernel_nbd_tools(qemu_nbd.to_string_lossy(), &sys);
    let run_dir = tmp.path().join("work-1");
    let s = spec(VirtMode::Pvh, &run_dir, "/run/qubes/work 1/nbd.sock");
    hv.start(&s).unwrap();

    let text = fs::read_to_string(Xen::config_path(&run_dir)).unwrap();
    let cfg = XlConfig::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let disks = cfg.list("disk").unwrap();
    let want = [
        ("xvda", "/dev/nbd0", false),
        ("xvdb", "/dev/nbd2", true),
        ("xvdc", "/dev/nbd3", true),
    ];
    assert_eq!(disks.len(), 3);
    for (raw, (vdev, dev, rw)) in disks.iter().zip(want) {
        let d = cfg.parse_disk(raw).unwrap();
        assert_eq!(d.vdev.as_deref(), Some(vdev));
        assert_eq!(d.pdev_path.as_deref(), Some(dev));
        assert_eq!(d.backend, libxl_disk_backend::LIBXL_DISK_BACKEND_PHY);
        assert_eq!(d.format, libxl_disk_format::LIBXL_DISK_FORMAT_RAW);
        assert_eq!(d.readwrite, rw);
    }
    let calls = fs::read_to_string(tmp.path().join("qemu-nbd.calls")).unwrap();
    assert!(
        calls.contains(
            "--connect=/dev/nbd0 --format=raw --cache=none --read-only \
             nbd+unix:///work-1/root?socket=/run/qubes/work%201/nbd.sock\n"
        ),
        "{calls}"
    );
    assert!(
        calls.contains("--connect=/dev/nbd3 --format=raw --cache=none nbd+unix:///work-1/volatile")
    );
    assert!(run_dir.join("nbd-devices").exists());

    hv.shutdown("work-1", &run_dir, Duration::from_secs(5))
        .unwrap();
    let calls = fs::read_to_string(tmp.path().join("qemu-nbd.calls")).unwrap();
    for dev in ["/dev/nbd0", "/dev/nbd2", "/dev/nbd3"] {
        assert!(calls.contains(&format!("--disconnect {dev}\n")), "{calls}");
    }
    assert!(!run_dir.join("nbd-devices").exists());
}

#[test]
fn kernel_nbd_mode_cleans_up_when_xl_create_fails_or_nbd_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let xl = fake_xl(tmp.path());
    let (qemu_nbd, sys) = fake_kernel_nbd(tmp.path());
    fs::write(tmp.path().join("xl.running.fail"), "").unwrap();
    let hv = Xen::with_xl(xl.to_string_lossy())
        .with_disk_mode(XenDiskMode::KernelNbd)
        .with_kernel_nbd_tools(qemu_nbd.to_string_lossy(), &sys);
    let run_dir = tmp.path().join("work-1");
    let s = spec(VirtMode::Pv, &run_dir, "/run/qubes/work-1/nbd.sock");
    let e = hv.start(&s).unwrap_err().to_string();
    assert!(e.contains("qube work-1") && e.contains("boom"), "{e}");
    let calls = fs::read_to_string(tmp.path().join("qemu-nbd.calls")).unwrap();
    assert_eq!(calls.matches("--disconnect /dev/").count(), 3, "{calls}");
    assert!(!run_dir.join("nbd-devices").exists());

    // No nbd devices at all: the error says how to get them.
    let empty = tmp.path().join("no-sys");
    fs::create_dir_all(&empty).unwrap();
    let hv = Xen::with_xl(xl.to_string_lossy())
        .with_disk_mode(XenDiskMode::KernelNbd)
        .with_kernel_nbd_tools(qemu_nbd.to_string_lossy(), &empty);
    let e = hv.start(&s).unwrap_err().to_string();
    assert!(e.contains("modprobe nbd"), "{e}");
}

/// A disconnect that fails at first (a device still busy) is retried; the shutdown
/// reports devices as still attached only when the retries run out.
#[test]
fn kernel_nbd_detach_retries_a_disconnect_that_fails_at_first() {
    let tmp = tempfile::tempdir().unwrap();
    let xl = fake_xl(tmp.path());
    let (qemu_nbd, sys) = fake_kernel_nbd(tmp.path());
    // Every device's first disconnect fails.
    let flaky = format!(
        "#!/bin/sh\necho \"$*\" >> '{calls}'\ncase \"$1\" in --disconnect=*) exit 1;; --disconnect)\n  \
         f='{dir}'/seen-$(basename \"$2\")\n  \
         [ -e \"$f\" ] || {{ touch \"$f\"; echo busy >&2; exit 1; }} ;;\nesac\n",
        calls = tmp.path().join("qemu-nbd.calls").display(),
        dir = tmp.path().display()
    );
    fs::write(&qemu_nbd, flaky).unwrap();
    let hv = Xen::with_xl(xl.to_string_lossy())
        .with_disk_mode(XenDiskMode::KernelNbd)
        .with_kernel_nbd_tools(qemu_nbd.to_string_lossy(), &sys);
    let run_dir = tmp.path().join("work-1");
    let s = spec(VirtMode::Pv, &run_dir, "/run/qubes/work-1/nbd.sock");
    hv.start(&s).unwrap();
    hv.shutdown("work-1", &run_dir, Duration::from_secs(5))
        .unwrap();
    let calls = fs::read_to_string(tmp.path().join("qemu-nbd.calls")).unwrap();
    for dev in ["/dev/nbd0", "/dev/nbd2", "/dev/nbd3"] {
        assert_eq!(
            calls.matches(&format!("--disconnect {dev}\n")).count(),
            2,
            "{calls}"
        );
    }
    assert!(!run_dir.join("nbd-devices").exists());
}
