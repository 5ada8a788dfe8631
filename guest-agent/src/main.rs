//! `qubes-guest-agent [--port PATH | --stdio]`: runs in the qube (started by udev/systemd
//! when the virtio-serial port appears) and serves `qubes-ctl qube run`.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use guest_agent::agent::{serve, Link};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut port = PathBuf::from("/dev/virtio-ports").join(guest_agent::PORT_NAME);
    let mut stdio = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => match args.next() {
                Some(p) => port = p.into(),
                None => usage(),
            },
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
            match OpenOptions::new().read(true).write(true).open(&port) {
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

fn usage() -> ! {
    eprintln!("usage: qubes-guest-agent [--port PATH | --stdio]");
    std::process::exit(2);
}
