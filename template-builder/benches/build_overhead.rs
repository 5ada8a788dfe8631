//! Build overhead: `template_builder::build` of recipes/debian/minimal.toml against a bare
//! `mmdebstrap` + `mke2fs -d` of the same package set, same run, same local .deb cache
//! (both sync the cache in and out, so neither downloads), same machine.
//!
//! Needs the .debs the tests cached (`cargo test -p template-builder --test debian_build`).
//! Run: `cargo bench -p template-builder --bench build_overhead`

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use template_builder::{build, BuildOptions, Recipe};

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let debs = Path::new(common::TEST_CACHE).join("a/debs");
    assert!(
        debs.is_dir(),
        "no cached .debs at {}: run the debian_build test first",
        debs.display()
    );
    let recipe = Recipe::load(common::repo_root().join("recipes/debian/minimal.toml")).unwrap();
    let mirror = common::debian_mirror_from_apt();
    let work = Path::new("/var/tmp/tb-bench/overhead");
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work.join("cache")).unwrap();
    std::os::unix::fs::symlink(&debs, work.join("cache/debs")).unwrap();

    // Bare: the same mmdebstrap invocation a careful user would write, then mke2fs -d.
    let tree = work.join("bare-root");
    let t = Instant::now();
    let st = Command::new("mmdebstrap")
        .arg(format!("--variant={}", recipe.variant))
        .arg("--components=main")
        .arg(format!("--include={}", recipe.packages.join(",")))
        .arg("--skip=essential/unlink")
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            debs.display()
        ))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            debs.display()
        ))
        .arg(&recipe.release)
        .arg(&tree)
        .arg(&mirror)
        .env("SOURCE_DATE_EPOCH", recipe.source_date_epoch.to_string())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "mmdebstrap: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let img = work.join("bare.img");
    fs::File::create(&img)
        .unwrap()
        .set_len(recipe.image_size)
        .unwrap();
    let st = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let bare = t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(&tree);
    let _ = fs::remove_file(&img);

    let opts = BuildOptions {
        name: Some("overhead".into()),
        mirror: Some(mirror),
        cache_dir: work.join("cache"),
        work_dir: work.join("work"),
        progress: false,
    };
    let t = Instant::now();
    let built = build(&recipe, &opts).unwrap();
    let ours = t.elapsed().as_secs_f64();
    assert!(!built.cache_hit);
    let t = Instant::now();
    let hit = build(&recipe, &opts).unwrap();
    let hit_s = t.elapsed().as_secs_f64();
    assert!(hit.cache_hit);

    println!("| build | seconds |");
    println!("|---|---:|");
    println!("| bare mmdebstrap + mke2fs -d | {bare:.1} |");
    println!("| template_builder::build (cold, .debs cached) | {ours:.1} |");
    println!("| template_builder::build (cache hit) | {hit_s:.2} |");
    println!("overhead: {:+.1}%", 100.0 * (ours - bare) / bare);
    let _ = fs::remove_dir_all(work);
}
