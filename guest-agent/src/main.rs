//! `qubes-guest-agent [--port PATH [--tty] | --xen | --stdio]`: runs in the qube and
//! serves `qubes-ctl qube run`. QEMU: the virtio-serial port (started by udev/systemd when
//! it appears). Xen: `--xen`, the agent's PV channel, the domain's second console
//! (`/dev/hvc1`, a tty: `--tty` puts it in raw mode so the line discipline neither echoes
//! nor rewrites the protocol's bytes).

use std::fs::{File, OpenOptions};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use guest_agent::agent::{serve, Link};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut port = PathBuf::from("/dev/virtio-ports").join(guest_agent::PORT_NAME);
    let mut stdio = false;
    let mut tty = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => match args.next() {
                Some(p) => port = p.into(),
                None => usage(),
            },
            "--tty" => tty = true,
            "--xen" => {
                // The host gives a Xen domain exactly one channel, the agent's, so it is
                // the second PV console.
                port = PathBuf::from("/dev/hvc1");
                tty = true;
            }
            "--stdio" => stdio = true,
            _ => usage(),
        }
    }
    let link = if stdio {
        // SAFETY: fds 0 and 1 are open for the life of the process (the caller's stdio);
        // nothing else in this process uses them.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(0), OwnedFd::from_raw_fd(1)) };
        Link::new(rd.into(), wr.into(), false)
    } else {
        let file = loop {
            // O_NOCTTY: the channel must never become the agent's controlling terminal.
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(&port)
                .and_then(|f| if tty { raw(f) } else { Ok(f) })
            {
                Ok(f) => break f,
                Err(e) => {
                    eprintln!("qubes-guest-agent: {}: {e}; retrying", port.display());
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        };
        file.try_clone().and_then(|wr| Link::new(file, wr, true))
    };
    let res = link.and_then(serve);
    if let Err(e) = res {
        eprintln!("qubes-guest-agent: {e}");
        std::process::exit(1);
    }
}

/// The tty in raw mode: 8-bit clean, no echo, no line editing, no signals, no CR/NL
/// translation (the protocol is binary).
fn raw(f: File) -> std::io::Result<File> {
    let mut t = rustix::termios::tcgetattr(&f)?;
    t.make_raw();
    rustix::termios::tcsetattr(&f, rustix::termios::OptionalActions::Now, &t)?;
    Ok(f)
}

fn usage() -> ! {
    eprintln!("usage: qubes-guest-agent [--port PATH [--tty] | --xen | --stdio]");
    std::process::exit(2);
}
