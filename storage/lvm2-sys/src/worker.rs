//! The LVM worker process: one command at a time over a pipe.
//!
//! Wire format, one line each way per command:
//! - request: the checked command line (no whitespace inside an argument, so no newline);
//! - reply: a JSON object, `{"rc": STATUS, "messages": [[LEVEL, "text"], ...]}` with what
//!   liblvm2cmd returned and logged, or `{"error": "text"}` when liblvm2cmd could not be
//!   loaded or set up.
//!
//! The worker ends when its input ends (the parent finished with it, or died), never in
//! the middle of a command.

use std::ffi::{c_int, OsString};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{json, Value};

/// The worker's name in `ps` (argv[0]) and its comm (`pkill`, `top`): not its parent's,
/// so that `pkill -9 qubes-ctl` stops the daemon and leaves LVM to finish.
pub const WORKER_NAME: &str = "qubes-lvm-worker";

/// The parent's side of a running worker.
pub(crate) struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    pub(crate) fn spawn(program: &Path, args: &[OsString]) -> io::Result<Client> {
        let mut child = Command::new(program)
            .arg0(WORKER_NAME)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Out of the parent's process group: a Ctrl-C on the terminal, or a kill of
            // the group, must not stop LVM half-way through a command.
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Client {
            child,
            stdin,
            stdout,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn call(&mut self, line: &str) -> io::Result<(c_int, Vec<(c_int, String)>)> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let mut reply = String::new();
        if self.stdout.read_line(&mut reply)? == 0 {
            let status = self.child.try_wait()?;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the worker exited without a reply ({status:?})"),
            ));
        }
        parse_reply(&reply)
    }

    /// Closes the worker's input and waits until it has finished and exited.
    pub(crate) fn finish(self) {
        let Client {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let _ = child.wait();
    }
}

fn parse_reply(reply: &str) -> io::Result<(c_int, Vec<(c_int, String)>)> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{why}: {reply:?}"));
    let v: Value = serde_json::from_str(reply).map_err(|_| bad("unreadable reply"))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(io::Error::other(e.to_string()));
    }
    let rc = v
        .get("rc")
        .and_then(Value::as_i64)
        .ok_or_else(|| bad("reply without a status"))?;
    let mut messages = Vec::new();
    for m in v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("reply without messages"))?
    {
        match (
            m.get(0).and_then(Value::as_i64),
            m.get(1).and_then(Value::as_str),
        ) {
            (Some(level), Some(text)) => messages.push((level as c_int, text.to_string())),
            _ => return Err(bad("malformed message")),
        }
    }
    Ok((rc as c_int, messages))
}

/// The worker's main loop, for the program given to [`crate::use_worker`]: runs each
/// command line read from standard input in this process and writes its reply to
/// standard output, until the input ends. Returns when it ends, or with the error that
/// stopped it (a parent that went away while a reply was written).
pub fn serve() -> io::Result<()> {
    // SIGINT, SIGTERM, SIGHUP and SIGQUIT would kill the worker in the middle of a
    // command, the very thing it exists to prevent; it ends when its input ends. SIGKILL
    // still works (and is what a stuck worker needs).
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler; nothing
        // else in this process depends on these signals' dispositions.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // The comm is the executable's file name (`exe` for /proc/self/exe) until renamed;
    // the kernel keeps its first 15 bytes.
    let name = std::ffi::CString::new(WORKER_NAME).expect("no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which `name`
    // is and outlives the call; the other arguments are unused.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    let stdin = io::stdin();
    let mut stdout = io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        let args: Vec<&str> = line.split(' ').collect();
        let reply = match crate::check_arguments(&args).and_then(|l| crate::run_here(&l)) {
            Ok((rc, msgs)) => json!({ "rc": rc, "messages": msgs }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        writeln!(stdout, "{reply}")?;
        stdout.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip_and_bad_ones_are_errors() {
        let msgs = vec![
            (4, "  LVM version: 2\n".to_string()),
            (131, "x \"y\"".into()),
        ];
        let line = json!({ "rc": 1, "messages": msgs }).to_string();
        assert_eq!(parse_reply(&line).unwrap(), (1, msgs));
        let e = parse_reply(r#"{"error":"cannot load liblvm2cmd"}"#).unwrap_err();
        assert!(e.to_string().contains("cannot load"), "{e}");
        for bad in [
            "",
            "{",
            r#"{"rc":1}"#,
            r#"{"rc":1,"messages":[[1]]}"#,
            r#"{"messages":[]}"#,
        ] {
            assert!(parse_reply(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
