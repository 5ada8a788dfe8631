//! The real `qubes-guest-agent` binary (in `--stdio` mode, on one end of a socket pair
//! standing in for the virtio-serial port) driven by the host side, and the host side
//! against hostile guests.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guest_agent::host::{run, HostError, Outcome};
use guest_agent::proto::{encode, Exec, Msg, MAX_PAYLOAD, SYNC, VERSION};

struct Agent {
    child: Child,
    conn: UnixStream,
}

impl Agent {
    fn start() -> Agent {
        let (host, guest) = UnixStream::pair().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qubes-guest-agent"))
            .arg("--stdio")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(
                guest.try_clone().unwrap(),
            )))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(guest)))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Agent { child, conn: host }
    }

    fn run(&self, exec: Exec, stdin: Option<&std::fs::File>) -> (Outcome, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let o = run(
            &self.conn,
            &exec,
            stdin.map(|f| f.as_fd()),
            &mut out,
            &mut err,
            Instant::now() + Duration::from_secs(30),
        )
        .unwrap();
        (o, out, err)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exec(argv: &[&str]) -> Exec {
    Exec {
        user: String::new(),
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        pass_io: false,
        no_wait: false,
    }
}

#[test]
fn commands_run_with_output_exit_status_and_stdin() {
    let agent = Agent::start();
    let (o, out, err) = agent.run(exec(&["sh", "-c", "echo out; echo err >&2; exit 3"]), None);
    assert_eq!(o, Outcome::Exited(3));
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    // The same stream carries the next session.
    let (o, out, _) = agent.run(exec(&["sh", "-c", "kill -TERM $$"]), None);
    assert_eq!(
        o,
        Outcome::Exited(128 + 15),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Without pass_io the command's stdin is empty.
    let (o, out, _) = agent.run(exec(&["cat"]), None);
    assert_eq!((o, out), (Outcome::Exited(0), Vec::new()));
    // 3 MiB through stdin and back: chunking and flow control both ways.
    let dir = tempfile_dir();
    let input = dir.join("in");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let f = std::fs::File::open(&input).unwrap();
    let mut e = exec(&["cat"]);
    e.pass_io = true;
    let (o, out, _) = agent.run(e, Some(&f));
    assert_eq!(o, Outcome::Exited(0));
    assert!(out == data, "{} bytes back of {}", out.len(), data.len());
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn failures_have_shell_exit_codes_and_no_wait_returns_at_once() {
    let agent = Agent::start();
    let (o, _, _) = agent.run(exec(&["/nonexistent/cmd"]), None);
    match o {
        Outcome::Failed { message, code } => {
            assert_eq!(code, 127);
            assert!(message.contains("command not found"), "{message}");
        }
        o => panic!("{o:?}"),
    }
    let mut e = exec(&["id", "-u"]);
    e.user = "no-such-user-here".into();
    let (o, _, _) = agent.run(e, None);
    assert!(
        matches!(&o, Outcome::Failed { code: 126, message } if message.contains("no user")),
        "{o:?}"
    );
    let t = Instant::now();
    let mut e = exec(&["sleep", "30"]);
    e.no_wait = true;
    let (o, _, _) = agent.run(e, None);
    assert!(matches!(o, Outcome::Started(pid) if pid > 0), "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(20));
    // As root, --user switches uid, gid and groups.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut e = exec(&["id"]);
        e.user = "nobody".into();
        let (o, out, _) = agent.run(e, None);
        assert_eq!(o, Outcome::Exited(0));
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("uid=65534(nobody) gid=65534"), "{out}");
        assert!(!out.contains("(root)"), "{out}");
    }
}

#[test]
fn a_host_that_goes_away_ends_the_command() {
    let agent = Agent::start();
    let marker = tempfile_dir().join("still-running");
    // The host sends Exec and hangs up: the agent kills the command's process group
    // before it writes the marker; the agent serves on (stdio mode ends with the stream).
    let mut s = agent.conn.try_clone().unwrap();
    s.write_all(&SYNC).unwrap();
    s.write_all(
        &encode(&Msg::Hello {
            version: VERSION,
            nonce: 1,
        })
        .unwrap(),
    )
    .unwrap();
    let script = format!("sleep 2; touch {}", marker.display());
    let e = exec(&["sh", "-c", &script]);
    s.write_all(&encode(&Msg::Exec(e)).unwrap()).unwrap();
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf).unwrap(); // the Hello: the command is starting
    drop(s);
    let mut agent = agent;
    agent.conn.shutdown(std::net::Shutdown::Both).unwrap();
    let t = Instant::now();
    while agent.child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(!marker.exists(), "the command outlived its host");
    assert!(
        agent.child.try_wait().unwrap().is_some(),
        "in stdio mode the agent ends with its stream"
    );
}

/// On a Xen console a host that goes away does not hang up: the agent still runs the
/// old command when the next host's SYNC + Hello arrive. It ends the old command and
/// answers the new host at once (it used to drop those bytes with the old session, and
/// the new host waited out its handshake).
#[test]
fn a_session_abandoned_without_hangup_gives_way_to_the_next() {
    let agent = Agent::start();
    let mut s = agent.conn.try_clone().unwrap();
    s.write_all(&SYNC).unwrap();
    s.write_all(
        &encode(&Msg::Hello {
            version: VERSION,
            nonce: 7,
        })
        .unwrap(),
    )
    .unwrap();
    s.write_all(&encode(&Msg::Exec(exec(&["sleep", "60"]))).unwrap())
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf).unwrap(); // the Hello: the command is starting
                                       // The first host is gone without a word; the stream stays open. (`run` fails the
                                       // test if the handshake does not come within its deadline.)
    let (o, out, _) = agent.run(exec(&["echo", "second"]), None);
    assert_eq!(o, Outcome::Exited(0), "{o:?}");
    assert_eq!(out, b"second\n");
}

/// A fake guest: answers the handshake, then sends `after` bytes.
fn hostile(after: Vec<u8>, handshake: bool) -> Result<Outcome, HostError> {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let n = guest.read(&mut buf).unwrap();
        let nonce = u64::from_le_bytes(buf[SYNC.len() + 9..SYNC.len() + 17].try_into().unwrap());
        assert!(n >= SYNC.len() + 17);
        if handshake {
            // Stale output of an earlier session first: skipped by the host.
            let mut b = encode(&Msg::Stdout(b"stale".to_vec())).unwrap();
            b.extend_from_slice(&SYNC);
            b.extend_from_slice(
                &encode(&Msg::Hello {
                    version: VERSION,
                    nonce: nonce ^ 1,
                })
                .unwrap(),
            );
            b.extend_from_slice(&SYNC);
            b.extend_from_slice(
                &encode(&Msg::Hello {
                    version: VERSION,
                    nonce,
                })
                .unwrap(),
            );
            b.extend_from_slice(&after);
            let _ = guest.write_all(&b);
        }
        // Until the host hangs up.
        while matches!(guest.read(&mut buf), Ok(n) if n > 0) {}
    });
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let r = run(
        &host,
        &exec(&["true"]),
        None,
        &mut out,
        &mut err,
        Instant::now() + Duration::from_secs(1),
    );
    assert!(
        out.is_empty() || out == b"ok",
        "stale output reached stdout"
    );
    drop(host);
    t.join().unwrap();
    r
}

#[test]
fn hostile_guests_get_errors_not_allocations_or_obedience() {
    // A frame header announcing 4 GiB: refused from the header alone.
    let mut b = u32::MAX.to_le_bytes().to_vec();
    b.push(4);
    assert!(matches!(hostile(b, true), Err(HostError::Proto(_))));
    // One byte over the limit.
    let mut b = (MAX_PAYLOAD as u32 + 1).to_le_bytes().to_vec();
    b.push(4);
    assert!(matches!(hostile(b, true), Err(HostError::Proto(_))));
    // A guest "asking" the host to run something is a protocol violation.
    let b = encode(&Msg::Exec(exec(&["rm", "-rf", "/"]))).unwrap();
    assert!(matches!(
        hostile(b, true),
        Err(HostError::Unexpected("Exec"))
    ));
    // A guest that never answers: the host gives up at its deadline.
    assert!(matches!(
        hostile(Vec::new(), false),
        Err(HostError::Timeout(_))
    ));
    // A well-behaved answer after the stale bytes still works.
    let mut b = encode(&Msg::Started(9)).unwrap();
    b.extend_from_slice(&encode(&Msg::Stdout(b"ok".to_vec())).unwrap());
    b.extend_from_slice(&encode(&Msg::Exit(0)).unwrap());
    assert_eq!(hostile(b, true).unwrap(), Outcome::Exited(0));
}

/// Xen's agent channel is a tty (`/dev/hvc1`): the agent with `--tty` on a pty, the host
/// on the master side through a socket bridge. Without raw mode the line discipline
/// echoes the host's frames back (the host then sees its own Hello) and rewrites bytes
/// (CR/NL, ^C, ^S, ^D), so the binary round trip below fails.
#[test]
fn over_a_tty_in_raw_mode_every_byte_value_passes() {
    let (mut master, mut slave) = (0, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty writes the two fds and the slave's NUL-terminated name into `name`,
    // which is larger than any pts path; the termios and winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and are owned by nothing else.
    let (master, _slave) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    };
    // SAFETY: openpty NUL-terminated the name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qubes-guest-agent"))
        .args(["--port", &path, "--tty"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The host may talk only once the agent has put the tty in raw mode.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rustix::termios::tcgetattr(&master)
        .unwrap()
        .local_modes
        .contains(rustix::termios::LocalModes::ECHO)
    {
        assert!(
            Instant::now() < deadline,
            "the agent never made the tty raw"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (host, bridge) = UnixStream::pair().unwrap();
    let (mut m_rd, mut m_wr) = (master.try_clone().unwrap(), master);
    let (mut b_rd, mut b_wr) = (bridge.try_clone().unwrap(), bridge);
    std::thread::spawn(move || std::io::copy(&mut b_rd, &mut m_wr));
    std::thread::spawn(move || std::io::copy(&mut m_rd, &mut b_wr));
    // Without raw mode the sessions hang rather than fail: bound them.
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = tempfile_dir();
    let d = dir.clone();
    std::thread::spawn(move || {
        let agent = Agent {
            child: Command::new("true").spawn().unwrap(),
            conn: host,
        };
        let (o, out, err) = agent.run(exec(&["sh", "-c", "echo out; echo err >&2; exit 3"]), None);
        assert_eq!(
            (o, out, err),
            (Outcome::Exited(3), b"out\n".to_vec(), b"err\n".to_vec())
        );
        let input = d.join("bytes");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 256) as u8).collect();
        std::fs::write(&input, &data).unwrap();
        let mut e = exec(&["cat"]);
        e.pass_io = true;
        let (o, out, _) = agent.run(e, Some(&std::fs::File::open(&input).unwrap()));
        assert_eq!(o, Outcome::Exited(0));
        assert!(out == data, "{} bytes back of {}", out.len(), data.len());
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the sessions over the tty did not finish (is the tty raw?)");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}
