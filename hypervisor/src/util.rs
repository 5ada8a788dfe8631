//! Small process and file helpers shared by the backends: finding tools on PATH,
//! running a command with a deadline, checking that a pid is a live (non-zombie)
//! process that belongs to us.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::HvError;

/// Finds `tool` on PATH (or takes it as is when it contains a slash).
pub(crate) fn find_tool(tool: &str, fix: &'static str) -> Result<PathBuf, HvError> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(HvError::ToolMissing {
                tool: tool.to_string(),
                fix,
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(tool);
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(HvError::ToolMissing {
        tool: tool.to_string(),
        fix,
    })
}

pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion, killing it when it outlives `timeout`.
/// Returns `Ok(None)` on timeout.
pub(crate) fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> std::io::Result<Option<Output>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Pipes are drained on threads so a chatty child cannot block on a full pipe.
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_deadline(&mut child, timeout)?;
    match status {
        Some(status) => Ok(Some(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Ok(None)
        }
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Waits for a child until `timeout`; `Ok(None)` when it is still running.
pub(crate) fn wait_deadline(
    child: &mut Child,
    timeout: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (not a zombie) whose command line contains
/// `needle`, which guards against a recycled pid.
pub(crate) fn pid_alive_with(pid: i32, needle: &OsStr) -> bool {
    if pid <= 0 {
        return false;
    }
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // The state letter follows the parenthesised comm, which may itself hold spaces.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("?");
    if state == "Z" || state == "X" || state == "x" {
        return false;
    }
    let cmdline = match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(_) => return false,
    };
    let needle = needle.as_encoded_bytes();
    needle.is_empty() || cmdline.windows(needle.len()).any(|w| w == needle)
}

pub(crate) fn read_pidfile(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last `n` lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join(" | ")
}

pub(crate) fn io_err(name: &str, op: impl Into<String>) -> impl FnOnce(std::io::Error) -> HvError {
    let name = name.to_string();
    let op = op.into();
    move |source| HvError::Io { name, op, source }
}
