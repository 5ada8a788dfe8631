//! `qubes-ctl qube run NAME [--user U] [--pass-io] [--no-wait] [--no-autostart] -- CMD...`:
//! runs a command in the qube through its guest agent (see the guest-agent crate), as
//! `qvm-run` does through qrexec. It starts a halted qube first (unless
//! `--no-autostart`), waits for the agent, and exits with the command's exit status.
//! Unlike qvm-run, stdout and stderr are always passed back and the exit status is always
//! the command's; `--pass-io` adds this process's stdin as the command's (otherwise
//! /dev/null). The CLI talks to the agent directly (QEMU's agent socket in the qube's run
//! dir, or on Xen the daemon's bridge to the agent's PV console at the same place): a
//! guest that stalls stalls this one process, not the daemon.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use guest_agent::host::{self, Outcome};
use guest_agent::proto::Exec;

use crate::api::Request;
use crate::cli::execute;
use crate::console::qube_status;
use crate::paths::Paths;

pub struct RunArgs {
    pub name: String,
    pub user: Option<String>,
    pub pass_io: bool,
    pub no_wait: bool,
    pub no_autostart: bool,
    /// Seconds to wait for the qube's agent (booting under TCG takes a while).
    pub timeout: u64,
    pub command: Vec<String>,
}

/// Runs the command; returns its exit status (this process's exit code).
pub fn run(paths: &Paths, a: &RunArgs) -> Result<i32> {
    let name = &a.name;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let (state, _) = qube_status(paths, name)?;
    match state.as_str() {
        "halted" if a.no_autostart => {
            bail!("{name} is not running and --no-autostart was given")
        }
        "halted" => {
            execute(
                paths,
                Request::QubeStart {
                    name: name.clone(),
                    hypervisor: None,
                },
                true,
            )
            .with_context(|| format!("starting {name} to run the command"))?;
        }
        "paused" => bail!("{name} is paused: `qubes-ctl qube unpause {name}` first"),
        _ => {}
    }
    let (_, hv) = qube_status(paths, name)?;
    let run_dir = paths.qube_run_dir(name);
    let sock = match hv.as_str() {
        "" | "none" => bail!("{name} runs no guest (hypervisor none): nothing can run in it"),
        // The daemon serves the agent's PV console on the same socket (xen_agent).
        "xen" => crate::xen_agent::ensure_socket(name, &run_dir)?,
        other => hypervisor::by_name(other)?
            .agent_socket(&run_dir)
            .ok_or_else(|| anyhow!("the {other} backend has no agent channel"))?,
    };
    // One session at a time per qube (the port is one stream): queue behind others.
    let _lock = session_lock(name, &run_dir.join("agent.lock"), deadline)?;
    let conn = connect(name, &sock, deadline)?;
    let exec = Exec {
        user: a.user.clone().unwrap_or_default(),
        argv: a.command.iter().map(|s| s.as_bytes().to_vec()).collect(),
        pass_io: a.pass_io,
        no_wait: a.no_wait,
    };
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let outcome = host::run(
        &conn,
        &exec,
        a.pass_io.then(|| stdin.as_fd()),
        &mut stdout,
        &mut stderr,
        deadline,
    )
    .with_context(|| format!("running {:?} in {name}", a.command.join(" ")))?;
    stdout.flush()?;
    if let Outcome::Failed { message, .. } = &outcome {
        eprintln!("qubes-ctl: {name}: {message}");
    }
    Ok(outcome.code())
}

fn session_lock(name: &str, path: &Path, deadline: Instant) -> Result<std::fs::File> {
    use rustix::fs::{flock, FlockOperation};
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut told = false;
    while flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        if Instant::now() >= deadline {
            bail!("another `qube run` in {name} is still running; try again later");
        }
        if !told {
            eprintln!("qubes-ctl: waiting for another `qube run` in {name} to finish");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(f)
}

/// Connects to the agent socket, which appears a moment after QEMU starts.
fn connect(name: &str, sock: &Path, deadline: Instant) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(sock) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("{}: {e}; retrying", sock.display());
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "connecting to {name}'s agent socket {}: is the qube running?",
                        sock.display()
                    )
                })
            }
        }
    }
}
