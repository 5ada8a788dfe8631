//! `qubes-ctl qube console NAME`: the qube's serial console in this terminal, as `virsh
//! console` does: raw terminal, Ctrl-] detaches, the terminal is restored however the
//! session ends (detach, qube stopped, error, signal, panic). QEMU: the console socket in
//! the qube's run dir; Xen: `xl console`. One client at a time: a lock file in the qube's
//! run dir says who holds it.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::termios::{isatty, tcgetattr, tcsetattr, OptionalActions, Termios};

use crate::api::Request;
use crate::cli::execute;
use crate::paths::Paths;

/// Ctrl-]: the escape that detaches.
pub const ESCAPE: u8 = 0x1d;

/// The qube's state and hypervisor, as `qube list` reports them.
pub fn qube_status(paths: &Paths, name: &str) -> Result<(String, String)> {
    let list: Vec<crate::results::QubeInfo> =
        serde_json::from_value(execute(paths, Request::QubeList, false)?)?;
    let q = list
        .into_iter()
        .find(|q| q.name == name)
        .ok_or_else(|| anyhow!("no qube named {name}; see `qubes-ctl qube list`"))?;
    Ok((q.state.to_string(), q.hypervisor.unwrap_or_default()))
}

pub fn attach(paths: &Paths, name: &str) -> Result<()> {
    let (state, hv) = qube_status(paths, name)?;
    if state == "halted" {
        bail!(
            "{name} is not running: start it with `qubes-ctl qube start {name}` \
             (`qubes-ctl qube console {name} --log` shows its last boot)"
        );
    }
    match hv.as_str() {
        "xen" => {
            // xl console has the same escape (Ctrl-]) and restores the terminal itself;
            // the lock keeps it to one client, as on QEMU.
            let _lock = lock(name, &paths.qube_run_dir(name).join("console.lock"))?;
            let st = std::process::Command::new("xl")
                .args(["console", name])
                .status()
                .context("running `xl console` (is this a Xen dom0 with xl installed?)")?;
            if !st.success() {
                bail!("`xl console {name}` failed ({st})");
            }
            Ok(())
        }
        "" | "none" => bail!("{name} runs no guest (hypervisor none): there is no console"),
        other => {
            let run_dir = paths.qube_run_dir(name);
            let sock = hypervisor::by_name(other)?
                .console_socket(&run_dir)
                .ok_or_else(|| anyhow!("the {other} backend has no console socket"))?;
            attach_socket(name, &sock, &run_dir.join("console.lock"))
        }
    }
}

/// Holds the one-client lock for as long as it lives.
pub struct ConsoleLock {
    _file: std::fs::File,
}

/// Takes the console's lock or says who has it.
pub fn lock(name: &str, lock_path: &Path) -> Result<ConsoleLock> {
    use rustix::fs::{flock, FlockOperation};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        bail!(
            "{name}'s console is already attached (by process {}); one client at a time: \
             detach there with Ctrl-] first",
            holder.trim()
        );
    }
    f.set_len(0)?;
    write!(f, "{}", std::process::id())?;
    Ok(ConsoleLock { _file: f })
}

/// The terminal in raw mode until dropped (also on unwinding from a panic).
struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    fn enter() -> Result<Option<RawTerminal>> {
        let stdin = std::io::stdin();
        if !isatty(stdin.as_fd()) {
            return Ok(None);
        }
        let saved = tcgetattr(stdin.as_fd()).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)
            .context("switching the terminal to raw mode")?;
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}

/// Why a console session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Detached,
    QubeStopped,
    InputClosed,
    Signalled,
}

pub fn attach_socket(name: &str, sock: &Path, lock_path: &Path) -> Result<()> {
    let _lock = lock(name, lock_path)?;
    let conn = UnixStream::connect(sock).with_context(|| {
        format!(
            "connecting to {name}'s console at {}: is the qube running?",
            sock.display()
        )
    })?;
    eprintln!("Connected to {name}'s console. Escape character is ^] (Ctrl + ])");
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let ended = {
        let _raw = RawTerminal::enter()?;
        pump(&conn, &stop)
    };
    match ended? {
        Ended::QubeStopped => eprintln!("\n{name}'s console closed: the qube stopped."),
        _ => eprintln!("\nDetached from {name}'s console; {name} keeps running."),
    }
    Ok(())
}

/// Copies stdin to the console and the console to stdout until Ctrl-], the end of
/// either side, or a signal.
fn pump(conn: &UnixStream, stop: &AtomicBool) -> Result<Ended> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    let mut sock = conn;
    let mut buf = [0u8; 4096];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(Ended::Signalled);
        }
        let mut fds = [
            PollFd::new(&stdin, PollFlags::IN),
            PollFd::new(conn, PollFlags::IN),
        ];
        match poll(&mut fds, 250) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        let (stdin_ready, sock_ready) =
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if sock_ready {
            let n = match sock.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e).context("reading the console"),
            };
            if n == 0 {
                return Ok(Ended::QubeStopped);
            }
            stdout.write_all(&buf[..n])?;
            stdout.flush()?;
        }
        if stdin_ready {
            let n = match rustix::io::read(stdin.as_fd(), &mut buf) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                Err(e) => return Err(std::io::Error::from(e)).context("reading stdin"),
            };
            if n == 0 {
                return Ok(Ended::InputClosed);
            }
            let (keys, detach) = match buf[..n].iter().position(|&b| b == ESCAPE) {
                Some(i) => (&buf[..i], true),
                None => (&buf[..n], false),
            };
            sock.write_all(keys).context("writing to the console")?;
            if detach {
                return Ok(Ended::Detached);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_client_is_refused_with_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.lock");
        let held = lock("work", &p).unwrap();
        let e = lock("work", &p).err().unwrap().to_string();
        assert!(e.contains("already attached"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(held);
        lock("work", &p).expect("free again once the first client left");
    }
}
