//! Debian builds against the machine's own mirror: a real mmdebstrap bootstrap, the
//! image's content, the cache, and bit-for-bit reproducibility across template names.
//!
//! One build is shared by every test here (OnceLock) and kept under TEST_CACHE, so a
//! rerun only repeats the deliberate second build of the reproducibility check.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use template_builder::{build, BuildOptions, BuiltTemplate, Recipe};

fn recipe() -> Recipe {
    Recipe::load(common::repo_root().join("recipes/debian/minimal.toml")).unwrap()
}

fn opts(name: &str, sub: &str) -> BuildOptions {
    let base = PathBuf::from(common::TEST_CACHE);
    BuildOptions {
        name: Some(name.into()),
        mirror: Some(common::debian_mirror_from_apt()),
        cache_dir: base.join(sub),
        work_dir: base.join("work").join(sub),
        progress: false,
    }
}

fn shared() -> &'static BuiltTemplate {
    static BUILT: OnceLock<BuiltTemplate> = OnceLock::new();
    BUILT.get_or_init(|| {
        common::need_tool("mmdebstrap");
        common::need_tool("mke2fs");
        build(&recipe(), &opts("debian-a", "a")).unwrap_or_else(|e| panic!("debian build: {e}"))
    })
}

#[test]
fn image_holds_the_guest_integration_and_no_host_leftovers() {
    let t = shared();
    let img = &t.image;
    assert_eq!(std::fs::metadata(img).unwrap().len(), t.size);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dump = Command::new("dumpe2fs")
        .arg("-h")
        .arg(img)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("Filesystem volume name:   root"), "{dump}");

    assert_eq!(common::debugfs(img, "cat /etc/hostname"), "localhost\n");
    assert_eq!(common::debugfs(img, "cat /etc/machine-id"), "");
    assert!(common::debugfs(img, "cat /etc/fstab").contains("LABEL=root / ext4"));
    let setup = common::debugfs(img, "stat /usr/lib/qubes-guest/qubes-guest-setup");
    assert!(setup.contains("Mode:  0755"), "{setup}");
    let link = common::debugfs(
        img,
        "stat /etc/systemd/system/sysinit.target.wants/qubes-guest-setup.service",
    );
    assert!(link.contains("Type: symlink"), "{link}");
    assert!(
        common::debugfs(img, "ls -l /etc/systemd/system/multi-user.target.wants")
            .contains("qubes-rc-local.service")
    );
    for gone in [
        "/var/log/dpkg.log",
        "/var/log/apt/history.log",
        "/var/cache/ldconfig/aux-cache",
    ] {
        assert!(
            common::debugfs(img, &format!("stat {gone}")).is_empty(),
            "{gone} left in the image"
        );
    }
    assert!(common::debugfs(img, "ls /var/cache/apt")
        .split_whitespace()
        .all(|e| e == "."
            || e == ".."
            || e.starts_with('(')
            || e.chars().all(|c| c.is_ascii_digit())));

    assert!(
        t.packages.iter().any(|p| p.starts_with("systemd=")),
        "{:?}",
        t.packages
    );
    assert!(t
        .packages
        .iter()
        .any(|p| p.starts_with("linux-image-amd64=")));
    assert_eq!(t.kernel_cmdline, "root=/dev/vda rw console=ttyS0");
    let kernel = t.kernel.as_ref().expect("kernel");
    let initrd = t.initrd.as_ref().expect("initrd");
    assert!(std::fs::metadata(kernel).unwrap().len() > 1 << 20);
    assert!(std::fs::metadata(initrd).unwrap().len() > 1 << 20);
    assert_initrd_has(initrd, "virtio_blk");
    assert_eq!(t.fingerprint.len(), 64);
}

/// Lists the initrd with the host's cpio after skipping microcode/early archives through
/// the kernel's own tooling: the image ships unmkinitramfs, run it from the host.
fn assert_initrd_has(initrd: &Path, module: &str) {
    let dir = tempfile::tempdir().unwrap();
    let probe = Command::new("sh")
        .arg("-c")
        .arg("command -v unmkinitramfs || command -v lsinitramfs")
        .output()
        .unwrap();
    if !probe.status.success() {
        // Fall back to a raw search of the decompressed main archive.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "(zstdcat {0} 2>/dev/null || zcat {0} 2>/dev/null) | grep -a -c {module}.ko",
                initrd.display()
            ))
            .output()
            .unwrap();
        let hits: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert!(hits > 0, "{module}.ko not found in {}", initrd.display());
        return;
    }
    let out = Command::new("unmkinitramfs")
        .arg(initrd)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let find = Command::new("find")
        .arg(dir.path())
        .arg("-name")
        .arg(format!("{module}.ko*"))
        .output()
        .unwrap();
    assert!(
        !find.stdout.is_empty(),
        "{module} not in {}",
        initrd.display()
    );
}

#[test]
fn rebuild_is_a_cache_hit() {
    let first = shared();
    let again = build(&recipe(), &opts("debian-a-again", "a")).unwrap();
    assert!(again.cache_hit);
    assert_eq!(again.name, "debian-a-again");
    assert_eq!(again.fingerprint, first.fingerprint);
    assert_eq!(again.image, first.image);
}

#[test]
fn same_recipe_under_another_name_is_bit_identical() {
    let first = shared();
    // A second, independent build (own output cache, own work dir) that reuses the
    // first build's downloaded .debs, so both see the same package content.
    let b = PathBuf::from(common::TEST_CACHE).join("b");
    let _ = std::fs::remove_dir_all(&b);
    std::fs::create_dir_all(&b).unwrap();
    std::os::unix::fs::symlink(
        PathBuf::from(common::TEST_CACHE).join("a/debs"),
        b.join("debs"),
    )
    .unwrap();
    let second = build(&recipe(), &opts("another-name", "b")).unwrap();
    assert!(!second.cache_hit);
    assert_eq!(second.name, "another-name");
    assert_eq!(second.packages, first.packages);
    assert_eq!(
        second.fingerprint,
        first.fingerprint,
        "images differ: compare {} and {}",
        first.image.display(),
        second.image.display()
    );
    let k1 = std::fs::read(first.kernel.as_ref().unwrap()).unwrap();
    let k2 = std::fs::read(second.kernel.as_ref().unwrap()).unwrap();
    assert!(k1 == k2);
}

/// `remove_packages` purges what the bootstrap brought in anyway (here tzdata, which
/// minbase installs as priority required), and refuses a removal that would take a
/// package the recipe lists.
#[test]
fn remove_packages_purges_what_the_bootstrap_brought_in() {
    common::need_tool("mmdebstrap");
    let base = PathBuf::from(common::TEST_CACHE);
    let sub = "removal";
    let cache = base.join(sub);
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    // Reuse the shared build's .debs when they exist (CI runs this file's tests together).
    std::fs::create_dir_all(base.join("a/debs")).unwrap();
    std::os::unix::fs::symlink(base.join("a/debs"), cache.join("debs")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, extra: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"{name}\"\ndistribution = \"debian\"\nrelease = \"bookworm\"\n\
                 architecture = \"amd64\"\nvariant = \"minbase\"\nimage_size = \"1G\"\n\
                 kernel = false\n{extra}"
            ),
        )
        .unwrap();
        Recipe::load(&p).unwrap()
    };
    let r = write(
        "no-tzdata",
        "packages = [\"less\"]\nremove_packages = [\"tzdata\"]\n",
    );
    let t = build(&r, &opts("no-tzdata", sub)).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !t.packages.iter().any(|p| p.starts_with("tzdata=")),
        "{:?}",
        t.packages
    );
    assert!(t.packages.iter().any(|p| p.starts_with("less=")));
    assert!(common::debugfs(&t.image, "stat /usr/share/zoneinfo/UTC").is_empty());
    // vim-tiny depends on vim-common: removing that would take vim-tiny with it.
    let r = write(
        "conflict",
        "packages = [\"vim-tiny\"]\nremove_packages = [\"vim-common\"]\n",
    );
    let err = build(&r, &opts("conflict", sub)).unwrap_err().to_string();
    assert!(
        err.contains("removing vim-common would also remove vim-tiny"),
        "{err}"
    );
    // What apt itself refuses (bash pre-depends on libtinfo6) comes back as apt's words.
    let r = write(
        "essential",
        "packages = [\"less\"]\nremove_packages = [\"libtinfo6\"]\n",
    );
    let err = build(&r, &opts("essential", sub)).unwrap_err().to_string();
    assert!(
        err.contains("planning the removal of libtinfo6") && err.contains("libtinfo6"),
        "{err}"
    );
}
