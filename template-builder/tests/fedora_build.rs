//! Fedora path against a LOCAL rpm repository built here (real Fedora mirrors are out of
//! reach): rpmbuild a tiny noarch package set (filesystem-like, release, a busybox-backed
//! shell providing /bin/sh, an app), createrepo_c it, build a recipe with
//! `dnf --installroot` and check what landed in the image.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use template_builder::{build, BuildOptions, Recipe};

fn spec(
    name: &str,
    version: &str,
    requires: &[&str],
    provides: &[&str],
    install: &str,
    files: &str,
) -> String {
    let req: String = requires
        .iter()
        .map(|r| match r.strip_prefix('(') {
            // "(pre): name" gives Requires(pre): name
            Some(ctx) => format!("Requires({ctx}\n"),
            None => format!("Requires: {r}\n"),
        })
        .collect();
    let prov: String = provides
        .iter()
        .map(|p| format!("Provides: {p}\n"))
        .collect();
    format!(
        "%global debug_package %{{nil}}\n%global __os_install_post %{{nil}}\n\
         %global _binaries_in_noarch_packages_terminate_build 0\n\
         Name: {name}\nVersion: {version}\nRelease: 1\nSummary: test package {name}\nLicense: MIT\n\
         BuildArch: noarch\nAutoReqProv: no\n{req}{prov}\n%description\ntest package\n\n\
         %install\n{install}\n\n%files\n{files}\n"
    )
}

fn make_repo(dir: &Path) -> std::path::PathBuf {
    common::need_tool("rpmbuild");
    common::need_tool("createrepo_c");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let busybox = busybox.expect("busybox-static is not installed: run scripts/install-deps.sh");
    let top = dir.join("rpmbuild");
    fs::create_dir_all(top.join("SPECS")).unwrap();
    let specs = [
        spec(
            "tb-filesystem",
            "1.0",
            &[],
            &[],
            "mkdir -p %{buildroot}/etc %{buildroot}/usr/bin %{buildroot}/usr/lib %{buildroot}/var/lib %{buildroot}/tmp\n\
             ln -s usr/bin %{buildroot}/bin\nln -s usr/bin %{buildroot}/sbin",
            "%dir /etc\n%dir /usr/bin\n%dir /usr/lib\n%dir /var/lib\n%dir /tmp\n/bin\n/sbin",
        ),
        spec(
            "tb-release",
            "41",
            &["tb-filesystem"],
            &["system-release"],
            "mkdir -p %{buildroot}/etc\nprintf 'NAME=TestFedora\\nVERSION_ID=41\\n' > %{buildroot}/etc/os-release",
            "/etc/os-release",
        ),
        spec(
            "tb-shell",
            "5.2",
            &["tb-filesystem"],
            &["/bin/sh"],
            &format!(
                "mkdir -p %{{buildroot}}/usr/bin\ninstall -m 0755 {busybox} %{{buildroot}}/usr/bin/busybox\n\
                 ln -s busybox %{{buildroot}}/usr/bin/sh\nln -s busybox %{{buildroot}}/usr/bin/cat\n\
                 ln -s busybox %{{buildroot}}/usr/bin/echo"
            ),
            "/usr/bin/busybox\n/usr/bin/sh\n/usr/bin/cat\n/usr/bin/echo",
        ),
        // Needed only while tb-hello installs: a remove_packages candidate that the
        // package list alone cannot keep out.
        spec(
            "tb-installer",
            "1.0",
            &["tb-filesystem"],
            &[],
            "mkdir -p %{buildroot}/usr/bin\nprintf '#!/bin/sh\\n' > %{buildroot}/usr/bin/tb-installer",
            "/usr/bin/tb-installer",
        ),
        spec(
            "tb-hello",
            "2.0",
            &["tb-shell", "tb-release", "(pre): tb-installer"],
            &[],
            "mkdir -p %{buildroot}/usr/bin\nprintf '#!/bin/sh\\necho hello\\n' > %{buildroot}/usr/bin/tb-hello\n\
             chmod 755 %{buildroot}/usr/bin/tb-hello",
            "/usr/bin/tb-hello",
        ),
    ];
    for (i, s) in specs.iter().enumerate() {
        let p = top.join("SPECS").join(format!("p{i}.spec"));
        fs::write(&p, s).unwrap();
        let out = Command::new("rpmbuild")
            .arg("-bb")
            .arg("--define")
            .arg(format!("_topdir {}", top.display()))
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rpmbuild {s}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let repo = dir.join("repo");
    fs::create_dir_all(&repo).unwrap();
    for e in fs::read_dir(top.join("RPMS/noarch")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), repo.join(e.file_name())).unwrap();
    }
    let out = Command::new("createrepo_c")
        .arg("-q")
        .arg(&repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "createrepo_c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    repo
}

#[test]
fn fedora_recipe_builds_from_a_local_repository() {
    common::need_tool("dnf");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let repo = make_repo(dir.path());
    let guest = common::repo_root().join("recipes/guest/guest.toml");
    let recipe_path = dir.path().join("fedora-test.toml");
    fs::write(
        &recipe_path,
        format!(
            r#"extends = "{guest}"
name = "fedora-test"
distribution = "fedora"
release = "41"
architecture = "x86_64"
packages = ["tb-hello"]
image_size = "64M"
kernel = false
mirror = "file://{repo}"
commands = ["echo built-in-chroot > /etc/tb-marker"]
remove_packages = ["tb-installer"]
"#,
            guest = guest.display(),
            repo = repo.display()
        ),
    )
    .unwrap();
    let recipe = Recipe::load(&recipe_path).unwrap();
    let opts = BuildOptions {
        name: None,
        mirror: None,
        cache_dir: dir.path().join("cache"),
        work_dir: dir.path().join("work"),
        progress: false,
    };
    let t = build(&recipe, &opts).unwrap_or_else(|e| panic!("fedora build: {e}"));
    assert_eq!(t.name, "fedora-test");
    assert!(t.kernel.is_none() && t.initrd.is_none());
    assert_eq!(
        t.packages,
        [
            "tb-filesystem=1.0-1",
            "tb-hello=2.0-1",
            "tb-release=41-1",
            "tb-shell=5.2-1"
        ],
        "rpm database not where Fedora expects it? (tb-installer must be removed)"
    );
    let logs: Vec<String> = fs::read_dir(dir.path().join("work"))
        .unwrap()
        .filter_map(|e| fs::read_to_string(e.unwrap().path().join("build.log")).ok())
        .collect();
    assert!(
        logs.iter().any(|l| l.contains("removed tb-installer")),
        "tb-installer was never installed and removed: {logs:?}"
    );
    let img = &t.image;
    assert!(
        common::debugfs(img, "stat /usr/bin/tb-installer").is_empty(),
        "remove_packages left tb-installer's files"
    );
    let fsck = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        common::debugfs(img, "cat /usr/bin/tb-hello"),
        "#!/bin/sh\necho hello\n"
    );
    assert!(common::debugfs(img, "cat /etc/os-release").contains("VERSION_ID=41"));
    assert_eq!(
        common::debugfs(img, "cat /etc/tb-marker"),
        "built-in-chroot\n"
    );
    assert!(
        common::debugfs(img, "stat /usr/lib/qubes-guest/qubes-guest-setup").contains("Mode:  0755")
    );
    assert!(
        common::debugfs(img, "ls -l /etc/systemd/system/sysinit.target.wants")
            .contains("qubes-guest-setup.service")
    );
    assert!(
        !common::debugfs(img, "ls /usr/lib/sysimage/rpm").is_empty(),
        "rpmdb missing"
    );
    assert!(
        common::debugfs(img, "stat /root/.rpmdb").is_empty(),
        "rpmdb in the host's default place"
    );
    assert_eq!(common::debugfs(img, "cat /etc/machine-id"), "");
    // Downloaded rpms were kept in the cache, not in the image.
    assert!(common::debugfs(img, "ls /var/cache/dnf")
        .split_whitespace()
        .all(|e| e.starts_with('(')
            || e == "."
            || e == ".."
            || e.chars().all(|c| c.is_ascii_digit())));
    let again = build(
        &recipe,
        &BuildOptions {
            name: Some("other".into()),
            ..opts
        },
    )
    .unwrap();
    assert!(again.cache_hit);
    assert_eq!(again.fingerprint, t.fingerprint);
    // An independent build (own output cache and work dir) from the same downloaded rpms,
    // under another name, gives the same image bit for bit.
    let second = dir.path().join("second");
    fs::create_dir_all(&second).unwrap();
    std::os::unix::fs::symlink(dir.path().join("cache/dnf"), second.join("dnf")).unwrap();
    let independent = build(
        &recipe,
        &BuildOptions {
            name: Some("fedora-again".into()),
            mirror: None,
            cache_dir: second.clone(),
            work_dir: dir.path().join("work2"),
            progress: false,
        },
    )
    .unwrap();
    assert!(!independent.cache_hit);
    assert_eq!(independent.packages, t.packages);
    if independent.fingerprint != t.fingerprint {
        let keep = std::path::PathBuf::from("/var/tmp/fedora-repro-diff");
        let _ = fs::remove_dir_all(&keep);
        fs::create_dir_all(&keep).unwrap();
        fs::copy(&t.image, keep.join("first.img")).unwrap();
        fs::copy(&independent.image, keep.join("second.img")).unwrap();
        panic!(
            "two builds of the same Fedora recipe differ: images kept in {}",
            keep.display()
        );
    }
}

/// Removing a package that a listed package needs is refused, naming both.
#[test]
fn removing_what_a_listed_package_needs_is_refused() {
    common::need_tool("dnf");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let repo = make_repo(dir.path());
    let recipe_path = dir.path().join("conflict.toml");
    fs::write(
        &recipe_path,
        format!(
            r#"name = "fedora-conflict"
distribution = "fedora"
release = "41"
architecture = "x86_64"
packages = ["tb-hello"]
remove_packages = ["tb-release"]
image_size = "64M"
kernel = false
mirror = "file://{repo}"
"#,
            repo = repo.display()
        ),
    )
    .unwrap();
    let recipe = Recipe::load(&recipe_path).unwrap();
    let err = build(
        &recipe,
        &BuildOptions {
            name: None,
            mirror: None,
            cache_dir: dir.path().join("cache"),
            work_dir: dir.path().join("work"),
            progress: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("removing tb-release would also remove tb-hello"),
        "{err}"
    );
}

/// Signs every rpm of `repo` with a fresh key and refreshes the metadata; returns the
/// signing key's public part and an unrelated key's, both armored files.
fn sign_repo(dir: &Path, repo: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    common::need_tool("gpg");
    common::need_tool("rpmsign");
    let home = dir.join("gnupg");
    fs::create_dir_all(&home).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        let out = Command::new("gpg")
            .env("GNUPGHOME", &home)
            .args([
                "--batch",
                "--yes",
                "--passphrase",
                "",
                "--pinentry-mode",
                "loopback",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let mut keys = Vec::new();
    for uid in ["tb-signer <signer@tb.test>", "tb-other <other@tb.test>"] {
        gpg(&["--quick-gen-key", uid, "rsa2048", "sign", "never"]);
        let armored = gpg(&["--armor", "--export", uid]);
        let path = dir.join(format!("{}.asc", uid.split(' ').next().unwrap()));
        fs::write(&path, armored).unwrap();
        keys.push(path);
    }
    let rpms: Vec<std::path::PathBuf> = fs::read_dir(repo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .collect();
    let out = Command::new("rpmsign")
        .env("GNUPGHOME", &home)
        .arg("--define")
        // Debian's rpm looks for gpg2; the gnupg package installs gpg.
        .arg("__gpg /usr/bin/gpg")
        .arg("--define")
        .arg("_gpg_name tb-signer")
        .arg("--define")
        .arg("_gpg_sign_cmd_extra_args --batch --pinentry-mode loopback --passphrase ''")
        .arg("--addsign")
        .args(&rpms)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rpmsign: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("createrepo_c")
        .arg("-q")
        .arg(repo)
        .output()
        .unwrap();
    assert!(out.status.success());
    (keys[0].clone(), keys[1].clone())
}

/// With gpg_keys, dnf checks every package: a repository signed by that key builds,
/// the same repository checked against an unrelated key is refused.
#[test]
fn packages_are_gpg_checked_against_the_recipe_keys() {
    common::need_tool("dnf");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let repo = make_repo(dir.path());
    let (signer, other) = sign_repo(dir.path(), &repo);
    let build_with = |name: &str, key: &Path| {
        let path = dir.path().join(format!("{name}.toml"));
        fs::write(
            &path,
            format!(
                r#"name = "{name}"
distribution = "fedora"
release = "41"
architecture = "x86_64"
packages = ["tb-hello"]
image_size = "64M"
kernel = false
mirror = "file://{repo}"
gpg_keys = ["{key}"]
"#,
                repo = repo.display(),
                key = key.display()
            ),
        )
        .unwrap();
        build(
            &Recipe::load(&path).unwrap(),
            &BuildOptions {
                name: None,
                mirror: None,
                cache_dir: dir.path().join(format!("cache-{name}")),
                work_dir: dir.path().join(format!("work-{name}")),
                progress: false,
            },
        )
    };
    let t = build_with("signed", &signer).unwrap_or_else(|e| panic!("signed build: {e}"));
    assert!(t.packages.iter().any(|p| p.starts_with("tb-hello=")));
    let err = build_with("wrong-key", &other)
        .expect_err("packages signed by another key were installed")
        .to_string();
    assert!(
        err.contains("dnf failed") && err.contains("wrong key"),
        "{err}"
    );
}
