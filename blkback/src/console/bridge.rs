//! One console ring to one local client at a time on a Unix socket (the agent's
//! `RUN/agent.sock`, as QEMU's chardev socket is on the virtio-serial side): what the
//! guest writes goes to the connected client (and is dropped while there is none: the
//! agent protocol resynchronises on its SYNC marker), what the client writes goes to
//! the guest. A second client waits in the listen backlog until the first leaves.
//!
//! Bounded both ways: at most [`TO_CLIENT_MAX`] bytes of guest output and
//! [`TO_GUEST_MAX`] bytes of client input are held; past that the ring (or the socket)
//! is simply not read, so a flooding guest fills its own ring and spins in its own
//! kernel. One thread per console, sleeping in poll(2): a guest that stalls or floods
//! cannot block the daemon or another qube. Event floods are throttled: a wakeup that
//! moved nothing sleeps a millisecond.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use super::ring::{ConsRing, RingError};

/// Guest output held for a slow client.
pub const TO_CLIENT_MAX: usize = 64 * 1024;
/// Client input held for a guest that does not read.
pub const TO_GUEST_MAX: usize = 16 * 1024;
const TICK: Duration = Duration::from_millis(200);

/// The event channel as the bridge uses it: an fd that polls readable when the guest
/// notified, `ack` to consume that, `notify` to kick the guest.
pub trait Doorbell: Send {
    fn fd(&self) -> BorrowedFd<'_>;
    fn ack(&self) -> io::Result<()>;
    fn notify(&self) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("event channel: {0}")]
    Channel(io::Error),
    #[error("agent socket: {0}")]
    Socket(io::Error),
}

/// Serves until `stop` (checked at least every 200 ms) or the guest breaks the ring.
pub fn bridge(
    ring: &mut ConsRing,
    bell: &dyn Doorbell,
    listener: &UnixListener,
    stop: &AtomicBool,
) -> Result<(), BridgeError> {
    listener
        .set_nonblocking(true)
        .map_err(BridgeError::Socket)?;
    let mut client: Option<UnixStream> = None;
    let mut to_client: Vec<u8> = Vec::new();
    let mut to_guest: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Acquire) {
        let mut moved = false;
        let mut kick = false;
        // Guest -> client (or nowhere).
        loop {
            let room = if client.is_some() {
                (TO_CLIENT_MAX - to_client.len()).min(buf.len())
            } else {
                buf.len()
            };
            if room == 0 {
                break;
            }
            let n = ring.read_out(&mut buf[..room])?;
            if n == 0 {
                break;
            }
            kick = true;
            if client.is_some() {
                to_client.extend_from_slice(&buf[..n]);
            }
        }
        // Client -> guest.
        if !to_guest.is_empty() {
            let n = ring.write_in(&to_guest)?;
            if n > 0 {
                to_guest.drain(..n);
                kick = true;
            }
        }
        if kick {
            bell.notify().map_err(BridgeError::Channel)?;
            moved = true;
        }
        match client.as_mut() {
            Some(c) => {
                let mut gone = false;
                while !to_client.is_empty() {
                    match c.write(&to_client) {
                        Ok(0) => {
                            gone = true;
                            break;
                        }
                        Ok(n) => {
                            to_client.drain(..n);
                            moved = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            gone = true;
                            break;
                        }
                    }
                }
                while !gone && to_guest.len() < TO_GUEST_MAX {
                    let room = (TO_GUEST_MAX - to_guest.len()).min(buf.len());
                    match c.read(&mut buf[..room]) {
                        Ok(0) => gone = true,
                        Ok(n) => {
                            to_guest.extend_from_slice(&buf[..n]);
                            moved = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => gone = true,
                    }
                }
                if gone {
                    // What the client sent is delivered; what was for it is dropped.
                    client = None;
                    to_client.clear();
                    moved = true;
                    if !to_guest.is_empty() {
                        continue;
                    }
                }
            }
            None => match listener.accept() {
                Ok((c, _)) => {
                    c.set_nonblocking(true).map_err(BridgeError::Socket)?;
                    client = Some(c);
                    continue;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(BridgeError::Socket(e)),
            },
        }
        let (bell_ready, _) = wait(
            bell,
            listener,
            client.as_ref(),
            to_guest.len() < TO_GUEST_MAX,
            !to_client.is_empty(),
        )?;
        if bell_ready {
            bell.ack().map_err(BridgeError::Channel)?;
            if !moved {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    Ok(())
}

fn wait(
    bell: &dyn Doorbell,
    listener: &UnixListener,
    client: Option<&UnixStream>,
    want_input: bool,
    want_output: bool,
) -> Result<(bool, bool), BridgeError> {
    let bfd = bell.fd();
    let mut fds = vec![PollFd::from_borrowed_fd(bfd, PollFlags::IN)];
    match client {
        Some(c) => {
            let mut f = PollFlags::empty();
            if want_input {
                f |= PollFlags::IN;
            }
            if want_output {
                f |= PollFlags::OUT;
            }
            fds.push(PollFd::from_borrowed_fd(c.as_fd(), f));
        }
        None => fds.push(PollFd::new(listener, PollFlags::IN)),
    }
    match poll(&mut fds, TICK.as_millis() as i32) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(BridgeError::Channel(e.into())),
    }
    let bell_ready = !fds[0].revents().is_empty();
    let other = !fds[1].revents().is_empty();
    Ok((bell_ready, other))
}

/// An in-process doorbell pair for tests: each end's fd is readable once the other
/// notified.
pub struct PipeBell(pub UnixStream);

impl PipeBell {
    pub fn pair() -> io::Result<(PipeBell, PipeBell)> {
        let (a, b) = UnixStream::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((PipeBell(a), PipeBell(b)))
    }
}

impl Doorbell for PipeBell {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
    fn ack(&self) -> io::Result<()> {
        let mut b = [0u8; 64];
        loop {
            match (&self.0).read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
    fn notify(&self) -> io::Result<()> {
        match (&self.0).write(&[1]) {
            Ok(_) => Ok(()),
            // Full: the peer has events pending already.
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ring::{GuestEnd, OUT_PROD, OUT_SIZE};
    use super::*;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Instant;
    use xen_sys::SharedMem;

    struct Setup {
        guest: GuestEnd,
        guest_bell: PipeBell,
        sock: std::path::PathBuf,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<Result<(), BridgeError>>>,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        let mut ring = ConsRing::attach(mem.clone()).unwrap();
        let (back, front) = PipeBell::pair().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || bridge(&mut ring, &back, &listener, &s));
        Setup {
            guest: GuestEnd { mem },
            guest_bell: front,
            sock,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    impl Setup {
        /// The guest writes all of `data`, waiting for the backend to drain the ring.
        fn guest_write(&self, data: &[u8]) {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut sent = 0;
            while sent < data.len() {
                sent += self.guest.write_out(&data[sent..]);
                self.guest_bell.notify().unwrap();
                assert!(Instant::now() < deadline, "the backend stopped draining");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        fn guest_read(&self, n: usize) -> Vec<u8> {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut got = Vec::new();
            while got.len() < n {
                got.extend(self.guest.read_in());
                self.guest_bell.notify().unwrap();
                assert!(Instant::now() < deadline, "guest got {} of {n}", got.len());
                std::thread::sleep(Duration::from_millis(1));
            }
            got
        }
        fn finish(mut self) -> Result<(), BridgeError> {
            self.stop.store(true, Ordering::Release);
            self.thread.take().unwrap().join().unwrap()
        }
    }

    fn read_exact(c: &mut UnixStream, n: usize) -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = vec![0u8; n];
        c.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn bytes_cross_between_guest_and_client_and_output_without_client_is_dropped() {
        let s = setup();
        // Nobody connected: dropped (and drained, so the guest does not spin).
        s.guest_write(&vec![b'x'; 10_000]);
        let mut c = UnixStream::connect(&s.sock).unwrap();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let d = data.clone();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&d).unwrap());
        assert_eq!(s.guest_read(data.len()), data);
        writer.join().unwrap();
        // Give the bridge a moment to have accepted before the guest answers.
        s.guest_write(b"hello from the guest");
        assert_eq!(read_exact(&mut c, 20), b"hello from the guest");
        let big: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
        let b2 = big.clone();
        let mut r = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || read_exact(&mut r, b2.len()));
        s.guest_write(&big);
        assert_eq!(reader.join().unwrap(), big);
        drop(c);
        s.finish().unwrap();
    }

    #[test]
    fn a_second_client_waits_for_the_first() {
        let s = setup();
        let mut a = UnixStream::connect(&s.sock).unwrap();
        a.write_all(b"A").unwrap();
        assert_eq!(s.guest_read(1), b"A");
        let mut b = UnixStream::connect(&s.sock).unwrap();
        b.write_all(b"B").unwrap();
        s.guest_write(b"1");
        assert_eq!(read_exact(&mut a, 1), b"1");
        // b's byte is not read while a is connected.
        std::thread::sleep(Duration::from_millis(300));
        assert!(s.guest.read_in().is_empty());
        drop(a);
        assert_eq!(s.guest_read(1), b"B");
        s.guest_write(b"2");
        assert_eq!(read_exact(&mut b, 1), b"2");
        s.finish().unwrap();
    }

    /// A guest that floods while the client does not read: the bridge holds at most
    /// TO_CLIENT_MAX, then stops draining the ring (the guest's ring stays full).
    #[test]
    fn a_flooding_guest_fills_its_own_ring_not_the_daemon() {
        let s = setup();
        let mut c = UnixStream::connect(&s.sock).unwrap();
        // Connected once the bridge takes client bytes.
        c.write_all(b"k").unwrap();
        assert_eq!(s.guest_read(1), b"k");
        let mut total = 0usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stuck_since = Instant::now();
        loop {
            let n = s.guest.write_out(&[7u8; 4096]);
            s.guest_bell.notify().unwrap();
            total += n;
            if n > 0 {
                stuck_since = Instant::now();
            } else if stuck_since.elapsed() > Duration::from_millis(500) {
                break;
            }
            assert!(Instant::now() < deadline, "the ring never filled ({total})");
            std::thread::sleep(Duration::from_millis(1));
        }
        let sock_buffers = 2 * 1024 * 1024; // generous bound for the kernel's socket buffers
        assert!(
            total <= TO_CLIENT_MAX + OUT_SIZE as usize + sock_buffers,
            "{total} bytes taken from a guest whose client reads nothing"
        );
        // Reading resumes the flow.
        let got = read_exact(&mut c, 4096);
        assert!(got.iter().all(|&b| b == 7));
        s.finish().unwrap();
    }

    #[test]
    fn hostile_indices_end_the_bridge_with_an_error() {
        let s = setup();
        s.guest
            .mem
            .store_u32(OUT_PROD, OUT_SIZE * 4, Ordering::Release);
        s.guest_bell.notify().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.thread.as_ref().unwrap().is_finished() {
            assert!(Instant::now() < deadline, "the bridge went on");
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = s.finish().unwrap_err();
        assert!(e.to_string().contains("output indices"), "{e}");
    }
}
