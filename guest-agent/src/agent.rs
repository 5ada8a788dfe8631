//! The guest side: serves sessions on one stream, one session at a time, runs the
//! command each asks for as the user it names, streams its output, returns its exit
//! status. A host that goes away mid-session ends the command (its whole process group).
//!
//! On a virtio-serial port a read returns 0 while no host is connected (and writes would
//! block), so the agent polls with non-blocking I/O and, between sessions, waits for a
//! host by retrying every [`IDLE_POLL`].

use std::ffi::CString;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use crate::proto::{encode, exit_code, Decoder, Exec, Msg, DATA_CHUNK, SYNC, VERSION};

const IDLE_POLL: Duration = Duration::from_millis(200);
/// Bytes queued towards the host before the agent stops reading the command's output.
const OUT_HIGH: usize = 4 * DATA_CHUNK;
/// Bytes of stdin held for the command before the agent stops reading from the host.
const IN_HIGH: usize = 4 * DATA_CHUNK;
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The stream to the host: one file for a virtio port, stdin/stdout in `--stdio` mode.
pub struct Link {
    pub rd: File,
    pub wr: File,
    /// A read of 0 bytes means "no host yet, retry" (virtio) rather than "the end" (stdio).
    pub reconnects: bool,
}

enum Got {
    Msg(Msg),
    /// The host went away (or, in stdio mode, the stream ended).
    Gone,
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::io::ioctl_fionbio(fd, true).map_err(io::Error::from)
}

impl Link {
    pub fn new(rd: File, wr: File, reconnects: bool) -> io::Result<Link> {
        set_nonblocking(rd.as_fd())?;
        set_nonblocking(wr.as_fd())?;
        Ok(Link { rd, wr, reconnects })
    }

    /// Reads what is there into the decoder; `Ok(false)` when the host is gone.
    fn pull(&mut self, dec: &mut Decoder) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        match self.rd.read(&mut buf) {
            Ok(0) => Ok(false),
            Ok(n) => {
                dec.feed(&buf[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes as much of `out` as the stream takes now.
    fn push(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        while !out.is_empty() {
            match self.wr.write(out) {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits for the next message, flushing `out` meanwhile.
    fn next(&mut self, dec: &mut Decoder, out: &mut Vec<u8>) -> io::Result<Got> {
        loop {
            match dec.next_msg() {
                Ok(Some(m)) => return Ok(Got::Msg(m)),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("qubes-guest-agent: {e}; dropping the session");
                    return Ok(Got::Gone);
                }
            }
            let mut fds = vec![PollFd::new(&self.rd, PollFlags::IN)];
            if !out.is_empty() {
                fds.push(PollFd::new(&self.wr, PollFlags::OUT));
            }
            match poll(&mut fds, IDLE_POLL.as_millis() as i32) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            self.push(out)?;
            if !self.pull(dec)? {
                return Ok(Got::Gone);
            }
        }
    }
}

/// Serves sessions until the stream ends (stdio mode) or forever (virtio).
pub fn serve(mut link: Link) -> io::Result<()> {
    // One decoder for the stream's whole life. On a Xen console a host that went away
    // mid-session is not seen (a console has no hangup) until the next host's SYNC +
    // Hello arrives and breaks the old session's framing: those bytes are already in
    // the decoder then, and a fresh decoder would drop them and leave the new host
    // waiting out its handshake.
    let mut dec = Decoder::new();
    loop {
        dec.resync();
        let mut out = Vec::new();
        // Idle: wait for a host's SYNC + Hello.
        let nonce = loop {
            match link.next(&mut dec, &mut out)? {
                Got::Msg(Msg::Hello { nonce, .. }) => break Some(nonce),
                Got::Msg(m) => {
                    eprintln!("qubes-guest-agent: expected Hello, got {}", kind(&m));
                    dec.resync();
                }
                Got::Gone if link.reconnects => {
                    std::thread::sleep(IDLE_POLL);
                    // Stale bytes are skipped up to the next host's SYNC.
                    dec.resync();
                }
                Got::Gone => break None,
            }
        };
        let Some(nonce) = nonce else { return Ok(()) };
        out.extend_from_slice(&SYNC);
        queue(
            &mut out,
            &Msg::Hello {
                version: VERSION,
                nonce,
            },
        );
        match link.next(&mut dec, &mut out)? {
            Got::Msg(Msg::Exec(e)) => run(&mut link, &mut dec, &mut out, e)?,
            Got::Msg(m) => eprintln!("qubes-guest-agent: expected Exec, got {}", kind(&m)),
            Got::Gone => {}
        }
        if !link.reconnects && link_closed(&mut link) {
            return Ok(());
        }
    }
}

/// In stdio mode, whether the host closed the stream after its session.
fn link_closed(link: &mut Link) -> bool {
    let mut fds = [PollFd::new(&link.rd, PollFlags::IN)];
    poll(&mut fds, 0).is_ok() && fds[0].revents().contains(PollFlags::HUP) && {
        let mut b = [0u8; 1];
        matches!(link.rd.read(&mut b), Ok(0))
    }
}

fn kind(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::Exec(_) => "Exec",
        Msg::Stdin(_) => "Stdin",
        Msg::Stdout(_) => "Stdout",
        Msg::Stderr(_) => "Stderr",
        Msg::Exit(_) => "Exit",
        Msg::Started(_) => "Started",
        Msg::Error(_) => "Error",
    }
}

fn queue(out: &mut Vec<u8>, m: &Msg) {
    // Only data frames can be large and they are chunked below the limit.
    out.extend_from_slice(&encode(m).expect("agent frames fit the limit"));
}

/// Flushes `out` until it is empty or the host is gone.
fn drain(link: &mut Link, out: &mut Vec<u8>) -> io::Result<()> {
    while !out.is_empty() {
        let mut fds = [
            PollFd::new(&link.wr, PollFlags::OUT),
            PollFd::new(&link.rd, PollFlags::empty()),
        ];
        match poll(&mut fds, IDLE_POLL.as_millis() as i32) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if fds[1].revents().intersects(PollFlags::HUP | PollFlags::ERR) {
            return Ok(());
        }
        link.push(out)?;
    }
    Ok(())
}

struct User {
    uid: u32,
    gid: u32,
    name: String,
    home: String,
    shell: String,
    groups: Vec<libc::gid_t>,
}

fn lookup_user(name: &str) -> Result<User, String> {
    let cname = CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    let mut pw: libc::passwd = unsafe_zeroed_passwd();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: pw and result are locals, buf is
    // buf.len() bytes; getpwnam_r writes the strings into buf and points pw's fields there.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(format!("no user {name:?} in this qube"));
    }
    let s = |p: *const libc::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: getpwnam_r succeeded, so non-null fields point at NUL-terminated
            // strings inside buf, which outlives this closure's uses.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: groups has n entries; getgrouplist writes at most n and updates n.
    let rc = unsafe { libc::getgrouplist(cname.as_ptr(), pw.pw_gid, groups.as_mut_ptr(), &mut n) };
    groups.truncate(if rc < 0 { 0 } else { n.max(0) as usize });
    if groups.is_empty() {
        groups.push(pw.pw_gid);
    }
    Ok(User {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        name: name.to_string(),
        home: s(pw.pw_dir),
        shell: s(pw.pw_shell),
        groups,
    })
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: passwd is a plain C struct of integers and pointers; all-zero (null
    // pointers) is a valid value that getpwnam_r overwrites.
    unsafe { std::mem::zeroed() }
}

fn command_for(e: &Exec, user: &User) -> Command {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = Command::new(std::ffi::OsStr::from_bytes(&e.argv[0]));
    cmd.args(e.argv[1..].iter().map(|a| std::ffi::OsStr::from_bytes(a)));
    cmd.env_clear()
        .env("PATH", PATH)
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell);
    let home = std::path::Path::new(&user.home);
    cmd.current_dir(if home.is_dir() {
        home
    } else {
        std::path::Path::new("/")
    });
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // syscalls (setsid, setgroups, setgid, setuid) on data captured before the fork; it
    // allocates nothing (last_os_error builds an io::Error from errno without allocating).
    unsafe {
        cmd.pre_exec(move || {
            // Its own session and process group, so a host that goes away ends all of it.
            if libc::setsid() < 0
                || libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn fail(out: &mut Vec<u8>, message: String, code: i32) {
    queue(out, &Msg::Error(message));
    queue(out, &Msg::Exit(code));
}

/// Runs one command for the host.
fn run(link: &mut Link, dec: &mut Decoder, out: &mut Vec<u8>, e: Exec) -> io::Result<()> {
    let user_name = if e.user.is_empty() { "root" } else { &e.user };
    let user = match lookup_user(user_name) {
        Ok(u) => u,
        Err(m) => {
            fail(out, m, 126);
            return drain(link, out);
        }
    };
    let mut cmd = command_for(&e, &user);
    let name = String::from_utf8_lossy(&e.argv[0]).into_owned();
    if e.no_wait {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    } else {
        cmd.stdin(if e.pass_io {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => {
            let (what, code) = match err.kind() {
                ErrorKind::NotFound => ("command not found", 127),
                _ => ("cannot run", 126),
            };
            fail(out, format!("{what}: {name}: {err}"), code);
            return drain(link, out);
        }
    };
    queue(out, &Msg::Started(child.id()));
    if e.no_wait {
        // Reaped in the background; its output goes nowhere, as with qvm-run --no-wait.
        std::thread::spawn(move || child.wait());
        queue(out, &Msg::Exit(0));
        return drain(link, out);
    }
    stream(link, dec, out, &mut child)
}

fn stream(
    link: &mut Link,
    dec: &mut Decoder,
    out: &mut Vec<u8>,
    child: &mut Child,
) -> io::Result<()> {
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take().map(|p| File::from(OwnedFd::from(p)));
    let mut stderr = child.stderr.take().map(|p| File::from(OwnedFd::from(p)));
    for fd in [
        stdin.as_ref().map(|f| f.as_fd()),
        stdout.as_ref().map(|f| f.as_fd()),
        stderr.as_ref().map(|f| f.as_fd()),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(fd)?;
    }
    let mut to_child: Vec<u8> = Vec::new();
    let mut stdin_eof = false;
    let mut status = None;
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        // Messages from the host: stdin for the command.
        loop {
            match dec.next_msg() {
                Ok(Some(Msg::Stdin(d))) if d.is_empty() => stdin_eof = true,
                Ok(Some(Msg::Stdin(d))) => {
                    if stdin.is_some() {
                        to_child.extend_from_slice(&d);
                    }
                }
                Ok(Some(m)) => {
                    eprintln!(
                        "qubes-guest-agent: unexpected {} during a command",
                        kind(&m)
                    );
                    return end(child);
                }
                Ok(None) => break,
                Err(err) => {
                    eprintln!("qubes-guest-agent: {err}; ending the command");
                    return end(child);
                }
            }
        }
        if stdin_eof && to_child.is_empty() {
            stdin = None; // closes the command's stdin
        }
        if stdout.is_none() && stderr.is_none() {
            if status.is_none() {
                status = child.try_wait()?;
            }
            if let Some(st) = status {
                queue(out, &Msg::Exit(exit_code(st)));
                return drain(link, out);
            }
        }
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(6);
        let want_host_in = to_child.len() < IN_HIGH;
        fds.push(PollFd::new(
            &link.rd,
            if want_host_in {
                PollFlags::IN
            } else {
                PollFlags::empty()
            },
        ));
        fds.push(PollFd::new(
            &link.wr,
            if out.is_empty() {
                PollFlags::empty()
            } else {
                PollFlags::OUT
            },
        ));
        // With the host behind, the pipes are left out of the poll altogether: a pipe at
        // its end reports HUP whatever is asked, which would spin this loop.
        let room = out.len() < OUT_HIGH;
        if room {
            for f in [&stdout, &stderr].into_iter().flatten() {
                fds.push(PollFd::new(f, PollFlags::IN));
            }
        }
        if let Some(f) = &stdin {
            if !to_child.is_empty() {
                fds.push(PollFd::new(f, PollFlags::OUT));
            }
        }
        match poll(&mut fds, IDLE_POLL.as_millis() as i32) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
        let host_hup = fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR);
        drop(fds);
        link.push(out)?;
        if host_hup || want_host_in && !link.pull(dec)? {
            // The host went away: so does the command.
            return end(child);
        }
        if room {
            for (pipe, stderr_pipe) in [(&mut stdout, false), (&mut stderr, true)] {
                let Some(f) = pipe else { continue };
                match f.read(&mut buf) {
                    Ok(0) => *pipe = None,
                    Ok(n) => {
                        let d = buf[..n].to_vec();
                        queue(
                            out,
                            &if stderr_pipe {
                                Msg::Stderr(d)
                            } else {
                                Msg::Stdout(d)
                            },
                        );
                    }
                    Err(err)
                        if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    }
                    Err(_) => *pipe = None,
                }
            }
        }
        if let Some(f) = &mut stdin {
            if !to_child.is_empty() {
                match f.write(&to_child) {
                    Ok(n) => {
                        to_child.drain(..n);
                    }
                    Err(err)
                        if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    }
                    // The command closed its stdin: what the host sends is dropped.
                    Err(_) => {
                        stdin = None;
                        to_child.clear();
                    }
                }
            }
        }
        if stdin.is_none() {
            to_child.clear();
        }
    }
}

/// Ends the command and everything it started (its process group).
fn end(child: &mut Child) -> io::Result<()> {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::Kill);
    }
    let _ = child.wait();
    Ok(())
}
