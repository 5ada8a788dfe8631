//! Recipe parsing: the shipped recipes, errors with file:line, `extends` merging, hashing.

mod common;

use std::fs;

use template_builder::recipe::{Distribution, Recipe, RecipeError};

#[test]
fn shipped_recipes_load() {
    let root = common::repo_root().join("recipes");
    let min = Recipe::load(root.join("debian/minimal.toml")).unwrap();
    assert_eq!(min.distribution, Distribution::Debian);
    assert_eq!(min.release, "bookworm");
    assert!(min.kernel);
    for p in [
        "systemd",
        "systemd-sysv",
        "linux-image-amd64",
        "e2fsprogs",
        "udev",
    ] {
        assert!(min.packages.contains(&p.to_string()), "{p} missing");
    }
    assert!(min
        .services
        .contains(&"qubes-guest-setup.service".to_string()));
    assert!(min
        .files
        .iter()
        .any(|f| f.dest == "/usr/lib/qubes-guest/qubes-guest-setup" && f.mode == 0o755));
    let std = Recipe::load(root.join("debian/standard.toml")).unwrap();
    assert_eq!(std.name, "debian-12-standard");
    assert!(std.packages.starts_with(&min.packages));
    assert!(std.packages.len() > min.packages.len());
    assert_eq!(std.files, min.files);
    let fed = Recipe::load(root.join("fedora/minimal.toml")).unwrap();
    assert_eq!(fed.distribution, Distribution::Fedora);
    assert_eq!(fed.gpg_keys.len(), 1);
    assert_ne!(min.hash(), std.hash());
}

fn load_text(text: &str) -> Result<Recipe, RecipeError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.toml");
    fs::write(&p, text).unwrap();
    Recipe::load(&p)
}

#[test]
fn unknown_key_names_line_and_hint() {
    let err =
        load_text("name = \"x\"\ndistribution = \"debian\"\npakages = [\"a\"]\n").unwrap_err();
    let RecipeError::Invalid { line, hint, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*line, 3);
    assert_eq!(hint.as_deref(), Some("did you mean `packages`?"));
    let msg = err.to_string();
    assert!(msg.contains("r.toml:3:"), "{msg}");
    assert!(msg.contains("pakages"), "{msg}");
}

#[test]
fn bad_values_name_their_line() {
    for (text, line, needle) in [
        ("name = \"x\"\n\ndistribution = \"arch\"\n", 3, "arch"),
        ("name = \"x\"\nimage_size = \"2X\"\n", 2, "bad size"),
        ("name = \"x\"\nkernel = \"yes\"\n", 2, "bool"),
        (
            "name = \"x\"\n[[files]]\nsrc = \"a\"\ndest = \"/a\"\nmode = \"0999\"\n",
            5,
            "octal",
        ),
        (
            "name = \"x\"\n[[files]]\nsrc = \"a\"\ndest = \"/a\"\nowner = \"root\"\n",
            5,
            "owner",
        ),
    ] {
        let err = load_text(text).unwrap_err();
        let RecipeError::Invalid { line: l, .. } = &err else {
            panic!("{text}: {err}")
        };
        assert_eq!(*l, line, "{text}: {err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(matches!(
        load_text("name = \"x\"\n").unwrap_err(),
        RecipeError::Incomplete { .. }
    ));
}

#[test]
fn extends_merges_lists_and_overrides_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("base")).unwrap();
    fs::write(d.join("base/a.conf"), "parent a").unwrap();
    fs::write(d.join("base/b.conf"), "parent b").unwrap();
    fs::write(d.join("b2.conf"), "child b").unwrap();
    fs::write(
        d.join("base/parent.toml"),
        r#"name = "parent"
distribution = "debian"
release = "bookworm"
packages = ["a", "b", "c"]
services = ["x.service"]
commands = ["echo parent"]
image_size = "1G"
[[files]]
src = "a.conf"
dest = "/etc/a.conf"
[[files]]
src = "b.conf"
dest = "/etc/b.conf"
"#,
    )
    .unwrap();
    fs::write(
        d.join("child.toml"),
        r#"extends = "base/parent.toml"
name = "child"
packages = ["d", "a"]
remove_packages = ["b"]
services = ["y.service", "x.service"]
commands = ["echo child"]
[[files]]
src = "b2.conf"
dest = "/etc/b.conf"
mode = 0o600
"#,
    )
    .unwrap();
    let r = Recipe::load(d.join("child.toml")).unwrap();
    assert_eq!(r.name, "child");
    assert_eq!(r.release, "bookworm");
    assert_eq!(r.image_size, 1 << 30);
    assert_eq!(r.packages, ["a", "c", "d"]);
    assert_eq!(r.services, ["x.service", "y.service"]);
    assert_eq!(r.commands, ["echo parent", "echo child"]);
    assert_eq!(r.files.len(), 2);
    assert_eq!(r.files[0].src, d.join("base/a.conf"));
    assert_eq!(
        (r.files[1].src.clone(), r.files[1].mode),
        (d.join("b2.conf"), 0o600)
    );

    let h1 = r.hash();
    fs::write(d.join("b2.conf"), "child b, edited").unwrap();
    let edited = Recipe::load(d.join("child.toml")).unwrap();
    assert_ne!(h1, edited.hash(), "hash must cover installed files");
    fs::write(d.join("b2.conf"), "child b").unwrap();
    assert_eq!(h1, Recipe::load(d.join("child.toml")).unwrap().hash());
    // A moved checkout hashes the same.
    let moved = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", d.display()))
        .arg(moved.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        h1,
        Recipe::load(moved.path().join("child.toml"))
            .unwrap()
            .hash()
    );
    fs::remove_file(d.join("b2.conf")).unwrap();
    assert!(matches!(
        Recipe::load(d.join("child.toml")).unwrap_err(),
        RecipeError::MissingFile { .. }
    ));
}

#[test]
fn extends_cycle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.toml"), "extends = \"b.toml\"\n").unwrap();
    fs::write(dir.path().join("b.toml"), "extends = \"a.toml\"\n").unwrap();
    assert!(matches!(
        Recipe::load(dir.path().join("a.toml")).unwrap_err(),
        RecipeError::ExtendsTooDeep { .. }
    ));
}
