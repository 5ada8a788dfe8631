//! Where `tracing` events go.
//!
//! - The CLI: stderr, warnings and errors only unless `-v` (info), `-vv` (debug),
//!   `-vvv` (trace); `RUST_LOG` (e.g. `RUST_LOG=blkback=debug`) overrides both.
//! - The daemon: the journal when systemd runs it (it sets `JOURNAL_STREAM` or
//!   `INVOCATION_ID`), with each field a journal field (`QUBE=work`, so
//!   `journalctl -u qubes-ctl QUBE=work` shows one qube's lines); otherwise
//!   `ROOT/run/daemon.log`, one line per event with its fields (`qube=work`). Info level
//!   unless `RUST_LOG` says otherwise.
//!
//! [`qube_lines`] reads one qube's lines back for `qubes-ctl qube log`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::paths::Paths;

/// Identifier of the daemon's journal entries (`SYSLOG_IDENTIFIER`).
pub const JOURNAL_IDENTIFIER: &str = "qubes-ctl";

fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// The CLI's subscriber: stderr, level from `-v` count or `RUST_LOG`.
pub fn init_cli(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        .with_target(verbose >= 2)
        .try_init();
}

/// Whether systemd started this process (its stdout/stderr then lead to the journal).
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Where the daemon's log goes, for messages that point the user at it.
pub fn daemon_log_place(paths: &Paths) -> String {
    if under_systemd() {
        "the journal (`journalctl -u qubes-ctl`)".into()
    } else {
        paths.daemon_log().display().to_string()
    }
}

/// The daemon's subscriber: the journal under systemd, else `ROOT/run/daemon.log`.
pub fn init_daemon(paths: &Paths) -> Result<()> {
    if under_systemd() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_syslog_identifier(JOURNAL_IDENTIFIER.into())
                    .with_field_prefix(None);
                let _ = tracing_subscriber::registry()
                    .with(filter("info"))
                    .with(layer)
                    .try_init();
                return Ok(());
            }
            Err(e) => {
                // stderr still reaches the journal through systemd's stream.
                eprintln!(
                    "qubes-ctl daemon: journald socket not reachable ({e}); logging to stderr"
                );
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter("info"))
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .try_init();
                return Ok(());
            }
        }
    }
    let log = paths.daemon_log();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("opening the daemon log {}", log.display()))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter("info"))
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .try_init();
    Ok(())
}

/// The lines of a log file that name `qube` (`qube=NAME` or `qube="NAME"`), last
/// `max` of them.
pub fn qube_lines(log: &Path, qube: &str, max: usize) -> Vec<String> {
    let Ok(text) = std::fs::read(log) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&text);
    let plain = format!("qube={qube}");
    let quoted = format!("qube=\"{qube}\"");
    let names = |l: &str, pat: &str| {
        l.match_indices(pat).any(|(i, _)| {
            let after = l[i + pat.len()..].chars().next();
            let before = l[..i].chars().next_back();
            after.is_none_or(|c| c == ' ' || c == ',' || c == '}')
                && before.is_none_or(|c| !c.is_alphanumeric() && c != '_')
        })
    };
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| names(l, &plain) || names(l, &quoted))
        .map(str::to_string)
        .collect();
    if lines.len() > max {
        lines.drain(..lines.len() - max);
    }
    lines
}

/// One qube's daemon lines from the journal (`journalctl QUBE=NAME`), if journalctl runs.
pub fn journal_lines(qube: &str, max: usize) -> Option<Vec<String>> {
    let out = std::process::Command::new("journalctl")
        .args(["--no-pager", "-q", "-o", "short-iso", "-n"])
        .arg(max.to_string())
        .arg(format!("SYSLOG_IDENTIFIER={JOURNAL_IDENTIFIER}"))
        .arg(format!("QUBE={qube}"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qube_lines_match_the_whole_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("daemon.log");
        std::fs::write(
            &log,
            "a INFO qube started qube=work\n\
             b INFO qube started qube=work2\n\
             c WARN flush failed qube=\"work\" volume=private\n\
             d INFO qube started qube=mywork\n\
             e INFO other\n",
        )
        .unwrap();
        let got = qube_lines(&log, "work", 10);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("a ") && got[1].starts_with("c "));
        assert_eq!(qube_lines(&log, "work", 1).len(), 1);
    }
}
