//! Shared helpers for the template-builder integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Fixed cache so reruns reuse downloaded packages and finished builds.
pub const TEST_CACHE: &str = "/var/tmp/qubes-ctl-test-cache";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The Debian archive this machine's apt uses (never a host name written in the tree).
pub fn debian_mirror_from_apt() -> String {
    let mut texts = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            if e.path()
                .extension()
                .is_some_and(|x| x == "sources" || x == "list")
            {
                texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for t in &texts {
        for line in t.lines().map(str::trim) {
            let url = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(u) = url {
                let u = u.trim_end_matches('/');
                if u.ends_with("/debian") {
                    return u.to_string();
                }
            }
        }
    }
    panic!("no Debian mirror in /etc/apt/sources.list{{,.d/*}}: the build tests need one");
}

pub fn need_tool(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        ok.unwrap_or(false),
        "{tool} is not installed: run scripts/install-deps.sh"
    );
}

/// `debugfs -R CMD IMAGE` stdout.
pub fn debugfs(image: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
