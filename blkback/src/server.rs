//! The NBD server: a Unix socket, its exports, and the threads that serve them.
//!
//! Every server of the process shares one runtime: one accept thread waits (epoll, no
//! timeout) on all listening sockets, and one worker pool sized to the cores runs the
//! queued requests of every connection. An idle server therefore costs a registered
//! descriptor and nothing else: no thread and no wake-up, however many qubes run.
//! Isolation stays per socket: a connection accepted on a socket negotiates only among
//! that socket's exports.
//!
//! ```text
//!   accept thread (all sockets) ──> per connection: handshake, then the reader thread, which
//!     - parses request headers and rejects bad ones itself (error reply, payload skipped),
//!     - runs small READ/WRITE (<= 64 KiB, no FUA) inline, batching their replies into
//!       one send per burst of pipelined requests, unless a worker is idle and more
//!       requests are already buffered (then it shares the load),
//!     - queues everything else (large transfers, FLUSH/FUA, TRIM, WRITE_ZEROES,
//!       BLOCK_STATUS, CACHE) ──┐
//!   worker pool (process-wide) <┘ runs the device call, builds the whole reply in one
//!       buffer (read data lands straight behind its header) and sends it; concurrent
//!       small replies are combined into one write (see `Conn::send`)
//! ```
//!
//! Contract: a socket serves exactly the exports it was bound with; the socket file is
//! mode 0600; a client can pipeline up to [`MAX_INFLIGHT`] requests per connection and
//! replies may come back out of order (as NBD allows). Every malformed input ends in an
//! error reply or a clean close of that one connection; other connections are unaffected.
//! `shutdown` stops accepting, waits for clients to leave, force-closes the rest, flushes
//! every device and removes the socket.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use storage::{BlockDevice, BlockError};

use crate::negotiate::{ExportInfo, Negotiation, Outcome};
use crate::proto::*;

/// Requests one connection may have queued or running at once; the reader stops reading
/// beyond this, so a client cannot make the server buffer unbounded work.
pub const MAX_INFLIGHT: usize = 64;
/// Request bytes (write payloads, read replies) one connection may have in flight; one
/// request is always admitted, so a single maximum-size request still goes through.
pub const MAX_INFLIGHT_BYTES: u64 = 128 << 20;
/// The whole option haggling must progress at least this often.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Reads at least this long are checked with `block_status` so holes go out as
/// OFFSET_HOLE chunks; shorter ones are sent as data (a probe would cost more than it saves).
const HOLE_PROBE_MIN: u32 = 64 << 10;
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// One volume a socket serves.
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("binding NBD socket {path}: {source}")]
    Binding { path: PathBuf, source: io::Error },
    #[error("NBD socket {0} is in use by a running server")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("export name {name:?} is not valid: {reason}")]
    InvalidExport { name: String, reason: &'static str },
    #[error("starting a server thread: {0}")]
    SpawningThread(io::Error),
    #[error("flushing export {export} at shutdown: {source}")]
    Flushing { export: String, source: BlockError },
    #[error("removing NBD socket {path}: {source}")]
    RemovingSocket { path: PathBuf, source: io::Error },
}

/// Reusable reply/payload buffers, so steady-state I/O allocates nothing per request.
struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

const POOL_MAX_BUFS: usize = 64;
const POOL_MAX_BUF: usize = (1 << 20) + (64 << 10);

impl BufPool {
    fn get(&self, n: usize) -> Vec<u8> {
        let mut b = lock(&self.free).pop().unwrap_or_default();
        if b.len() < n {
            b.resize(n, 0);
        }
        b
    }
    fn put(&self, b: Vec<u8>) {
        if b.capacity() <= POOL_MAX_BUF {
            let mut free = lock(&self.free);
            if free.len() < POOL_MAX_BUFS {
                free.push(b);
            }
        }
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain data; serving
/// on is better than cascading the panic through every connection.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Job {
    conn: Arc<Conn>,
    req: Request,
    cmd: Command,
    /// Bytes counted against the connection's in-flight budget.
    cost: u64,
    payload: Option<Vec<u8>>,
}

/// What every server of the process shares: the accept thread's epoll set and the
/// worker pool. Created at the first bind and kept for the life of the process.
struct Runtime {
    epoll: OwnedFd,
    /// Registered listening sockets by epoll token.
    listeners: Mutex<HashMap<u64, Arc<Listening>>>,
    next_token: AtomicU64,
    queue: Mutex<VecDeque<Job>>,
    queue_cv: Condvar,
    /// Workers waiting for a job (a hint for [`Conn::offload`]).
    idle_workers: AtomicUsize,
    /// Connection readers with requests in hand (not waiting on their socket): once they
    /// alone can keep every core busy, handing work to a worker only adds a context
    /// switch (a hint for [`Conn::offload`]).
    busy_readers: AtomicUsize,
    cores: usize,
    bufs: BufPool,
}

/// A listening socket and the server it belongs to.
struct Listening {
    listener: UnixListener,
    shared: Arc<Shared>,
}

/// Live connections of one server.
#[derive(Default)]
struct Conns {
    /// A clone of each stream, to force-close them at shutdown.
    streams: HashMap<u64, UnixStream>,
    /// Their threads; a handle is added under the same lock that checks `stopping`, so
    /// shutdown joins every connection it let in.
    threads: Vec<JoinHandle<()>>,
}

/// One server: its exports and connections.
struct Shared {
    exports: Vec<Export>,
    stopping: AtomicBool,
    conns: Mutex<Conns>,
    conns_changed: Condvar,
    next_id: AtomicU64,
    /// Requests parsed on this server's connections.
    requests: AtomicU64,
    rt: &'static Runtime,
}

/// A running NBD server on one Unix socket.
pub struct NbdServer {
    path: PathBuf,
    /// (st_dev, st_ino) of the socket we created, so shutdown removes only our own file.
    socket_id: (u64, u64),
    shared: Arc<Shared>,
    /// The socket's epoll token while it accepts; `None` once stopped.
    token: Option<u64>,
}

/// The process's runtime, started at the first call.
fn runtime() -> Result<&'static Runtime, NbdError> {
    static RT: Mutex<Option<&'static Runtime>> = Mutex::new(None);
    let mut rt = lock(&RT);
    if let Some(r) = *rt {
        return Ok(r);
    }
    let epoll = rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)
        .map_err(|e| NbdError::SpawningThread(e.into()))?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Leaked on purpose: the threads below use it for the rest of the process.
    let r: &'static Runtime = Box::leak(Box::new(Runtime {
        epoll,
        listeners: Mutex::new(HashMap::new()),
        next_token: AtomicU64::new(0),
        queue: Mutex::new(VecDeque::new()),
        queue_cv: Condvar::new(),
        idle_workers: AtomicUsize::new(0),
        busy_readers: AtomicUsize::new(0),
        cores,
        bufs: BufPool {
            free: Mutex::new(Vec::new()),
        },
    }));
    // Workers block on device calls (a flush is a pool commit), so twice the cores keeps
    // the CPUs busy while some wait; the same count one server used to start for itself.
    let nworkers = cores.clamp(2, 8) * 2;
    for i in 0..nworkers {
        std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || worker(r))
            .map_err(NbdError::SpawningThread)?;
    }
    std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || accept_loop(r))
        .map_err(NbdError::SpawningThread)?;
    *rt = Some(r);
    Ok(r)
}

/// `nbd+unix:///EXPORT?socket=/path`, percent-encoding what a URI path/query cannot hold.
pub fn nbd_uri(socket: &Path, export: &str) -> String {
    fn enc(s: &[u8], out: &mut String) {
        for &c in s {
            if c.is_ascii_alphanumeric() || b"-._~/:@".contains(&c) {
                out.push(c as char);
            } else {
                out.push_str(&format!("%{c:02X}"));
            }
        }
    }
    let mut u = String::from("nbd+unix:///");
    enc(export.as_bytes(), &mut u);
    u.push_str("?socket=");
    enc(socket.as_os_str().as_encoded_bytes(), &mut u);
    u
}

fn bind_private(path: &Path) -> Result<UnixListener, NbdError> {
    let err = |source| NbdError::Binding {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(NbdError::SocketInUse(path.to_owned()));
            }
        }
        Ok(_) => return Err(NbdError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // Bind inside a fresh 0700 directory, fix the mode, then rename into place: the socket
    // is never reachable with the umask's mode, and a stale socket is replaced atomically.
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmpdir = parent.join(format!(
        ".nbd{:x}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmpdir)
        .map_err(err)?;
    let tmp = tmpdir.join("s");
    let result = (|| {
        let l = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&tmpdir);
    result.map_err(err)
}

fn set_socket_buffers(s: &UnixStream) {
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        let v: libc::c_int = SOCKET_BUFFER;
        for opt in [force, plain] {
            // SAFETY: the fd is a live socket owned by `s`; the option value points at a
            // c_int that outlives the call and its size is passed alongside.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

impl NbdServer {
    /// Listens on a new Unix socket at `path` (created with mode 0600; an existing stale
    /// socket file is replaced) serving exactly `exports`.
    pub fn bind_unix(path: &Path, exports: Vec<Export>) -> Result<NbdServer, NbdError> {
        for (i, e) in exports.iter().enumerate() {
            let reason = if e.name.is_empty() {
                Some("empty")
            } else if e.name.len() > MAX_STRING {
                Some("longer than 4096 bytes")
            } else if e.name.contains('\0') {
                Some("contains NUL")
            } else if exports[..i].iter().any(|o| o.name == e.name) {
                Some("duplicate")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(NbdError::InvalidExport {
                    name: e.name.clone(),
                    reason,
                });
            }
        }
        let listener = bind_private(path)?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| NbdError::Binding {
            path: path.into(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| NbdError::Binding {
                path: path.into(),
                source,
            })?;
        let rt = runtime()?;
        let shared = Arc::new(Shared {
            exports,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Conns::default()),
            conns_changed: Condvar::new(),
            next_id: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            rt,
        });
        let mut server = NbdServer {
            path: path.to_owned(),
            socket_id: (meta.dev(), meta.ino()),
            shared: shared.clone(),
            token: None,
        };
        let token = rt.next_token.fetch_add(1, Ordering::Relaxed);
        let l = Arc::new(Listening { listener, shared });
        lock(&rt.listeners).insert(token, l.clone());
        server.token = Some(token);
        // From here on a failure is undone by the server's drop (deregister, remove socket).
        rustix::event::epoll::add(
            &rt.epoll,
            &l.listener,
            rustix::event::epoll::EventData::new_u64(token),
            rustix::event::epoll::EventFlags::IN,
        )
        .map_err(|e| NbdError::Binding {
            path: path.into(),
            source: e.into(),
        })?;
        Ok(server)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn active_connections(&self) -> usize {
        lock(&self.shared.conns).streams.len()
    }

    /// Requests received on this socket's connections so far.
    pub fn requests_served(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Stop accepting; wait up to `grace` for clients to disconnect (after their last
    /// flush), then force-close the rest; flushes each device; removes the socket file.
    pub fn shutdown(mut self, grace: Duration) -> Result<(), NbdError> {
        self.stop(grace)
    }

    fn stop(&mut self, grace: Duration) -> Result<(), NbdError> {
        let Some(token) = self.token.take() else {
            return Ok(());
        };
        {
            // Under the connections' lock: the accept thread admits none after this.
            let _conns = lock(&self.shared.conns);
            self.shared.stopping.store(true, Ordering::SeqCst);
        }
        let rt = self.shared.rt;
        if let Some(l) = lock(&rt.listeners).remove(&token) {
            // Closing our descriptor would not remove it while the accept thread holds a
            // clone of the Arc; deregister explicitly so it never wakes for this socket.
            let _ = rustix::event::epoll::delete(&rt.epoll, &l.listener);
        }
        let deadline = Instant::now() + grace;
        let threads = {
            let mut conns = lock(&self.shared.conns);
            while !conns.streams.is_empty() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                conns = self
                    .shared
                    .conns_changed
                    .wait_timeout(conns, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            for s in conns.streams.values() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        // A connection's thread ends only once its queued requests have run, so after
        // these joins no worker touches our devices any more.
        for h in threads {
            let _ = h.join();
        }
        // A worker drops its clone of a connection (and with it the device and `shared`)
        // just after it reports the request done, and the accept thread may still hold the
        // listener it was serving: wait for both, so that when `shutdown` returns nothing
        // of ours holds a device any more (a caller reopens the pool right after).
        let released = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.shared) > 1 && Instant::now() < released {
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut first_err = None;
        for e in &self.shared.exports {
            if let Err(source) = e.device.flush() {
                tracing::error!(export = %e.name, error = %source, "flush at NBD shutdown failed");
                first_err.get_or_insert(NbdError::Flushing {
                    export: e.name.clone(),
                    source,
                });
            }
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.socket_id => {
                if let Err(source) = std::fs::remove_file(&self.path) {
                    first_err.get_or_insert(NbdError::RemovingSocket {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
            _ => {}
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.stop(Duration::ZERO);
    }
}

/// The one accept thread: sleeps in epoll until some socket has a client.
fn accept_loop(rt: &'static Runtime) {
    let mut events = rustix::event::epoll::EventVec::with_capacity(64);
    loop {
        if let Err(e) = rustix::event::epoll::wait(&rt.epoll, &mut events, -1) {
            if e != rustix::io::Errno::INTR {
                tracing::error!(error = %e, "NBD accept: epoll_wait failed");
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        }
        for ev in &events {
            let l = lock(&rt.listeners).get(&ev.data.u64()).cloned();
            if let Some(l) = l {
                accept_pending(&l);
            }
        }
    }
}

/// Accepts every client waiting on one socket (it is non-blocking).
fn accept_pending(l: &Listening) {
    loop {
        let stream = match l.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: the socket stays readable, so pause rather
                // than spin; the client is accepted once resources free up.
                tracing::warn!(socket = ?l.listener.local_addr().ok(), error = %e, "NBD accept failed");
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
        };
        start_connection(&l.shared, stream);
    }
}

fn start_connection(sh: &Arc<Shared>, stream: UnixStream) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut conns = lock(&sh.conns);
    if sh.stopping.load(Ordering::SeqCst) {
        // Dropping the stream closes it: the client sees the server gone.
        return;
    }
    let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
    let sh2 = sh.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            if let Err(e) = serve_connection(stream, &sh2) {
                tracing::debug!(error = %e, "NBD connection ended");
            }
            lock(&sh2.conns).streams.remove(&id);
            sh2.conns_changed.notify_all();
        });
    conns.threads.retain(|h| !h.is_finished());
    match spawned {
        Ok(h) => {
            conns.streams.insert(id, clone);
            conns.threads.push(h);
        }
        Err(e) => tracing::error!(error = %e, "cannot start an NBD connection thread"),
    }
}

fn serve_connection(stream: UnixStream, shared: &Arc<Shared>) -> io::Result<()> {
    let result = serve(&stream, shared);
    // Explicit, because the registry still holds a clone of the fd until we return.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}

fn serve(stream: &UnixStream, shared: &Arc<Shared>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    set_socket_buffers(stream);
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    w.write_all(&server_greeting())?;
    let mut fl = [0u8; 4];
    r.read_exact(&mut fl)?;
    let flags =
        parse_client_flags(&fl).map_err(|f| bad_data(format!("unknown client flags {f:#x}")))?;
    let infos: Vec<ExportInfo> = shared
        .exports
        .iter()
        .map(|e| ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size: e.device.size(),
            read_only: e.device.read_only(),
        })
        .collect();
    let mut neg = Negotiation::new(&infos, flags);
    let mut hdr = [0u8; OPTION_HEADER_LEN];
    let mut data = Vec::new();
    let mut out = Vec::new();
    let agreed = loop {
        r.read_exact(&mut hdr)?;
        let h = parse_option_header(&hdr).map_err(|e| bad_data(e.to_string()))?;
        if h.length > MAX_OPTION_LEN {
            neg.oversized_option(h.option, &mut out);
            w.write_all(&out)?;
            return Err(bad_data("option data too long".into()));
        }
        data.resize(h.length as usize, 0);
        r.read_exact(&mut data)?;
        let outcome = if shared.stopping.load(Ordering::SeqCst) && h.option != OPT_ABORT {
            put_option_reply(
                &mut out,
                h.option,
                REP_ERR_SHUTDOWN,
                &[b"server is shutting down"],
            );
            if h.option == OPT_EXPORT_NAME {
                Outcome::Disconnect("shutting down")
            } else {
                Outcome::Continue
            }
        } else {
            neg.handle_option(h.option, &data, &mut out)
        };
        w.write_all(&out)?;
        out.clear();
        match outcome {
            Outcome::Continue => {}
            Outcome::Abort => return Ok(()),
            Outcome::Disconnect(why) => return Err(bad_data(why.into())),
            Outcome::Transmit(a) => break a,
        }
    };
    stream.set_read_timeout(None)?;
    let conn = Arc::new(Conn {
        device: shared.exports[agreed.export].device.clone(),
        params: agreed.params,
        stream: w,
        out: Mutex::new(OutQueue::default()),
        out_turn: Condvar::new(),
        broken: AtomicBool::new(false),
        inflight: Mutex::new((0, 0)),
        idle: Condvar::new(),
        shared: shared.clone(),
    });
    let result = conn.read_requests(&mut r);
    conn.wait_idle();
    result
}

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Replies waiting for the worker that is writing (see [`Conn::send`]).
#[derive(Default)]
struct OutQueue {
    pending: Vec<u8>,
    /// The writer's batch buffer between turns, so combining allocates nothing.
    spare: Vec<u8>,
    writing: bool,
}

/// Replies up to this size are copied into the combined batch; larger ones take a turn.
const COMBINE_MAX: usize = 64 << 10;

/// Small uncomplicated requests (READ/WRITE up to this size, no FUA) are run by the
/// reader itself and their replies batched: at high queue depth one `recv` brings in many
/// requests and one `send` carries all their replies, with no thread handoff. Everything
/// else (large transfers, FLUSH, FUA, TRIM, block status) goes to the worker pool, so a
/// slow commit never stalls the pipeline.
const INLINE_MAX: u32 = 64 << 10;
/// Batched inline replies are sent once they reach this size (or the reader would block).
const BATCH_MAX: usize = 256 << 10;

/// A reply buffer whose backing `Vec` only ever grows: `len` marks the bytes in use, so
/// reusing it never re-zeroes memory that a device read will overwrite anyway.
#[derive(Default)]
struct ReplyBuf {
    buf: Vec<u8>,
    len: usize,
}

impl ReplyBuf {
    fn from_vec(buf: Vec<u8>) -> Self {
        ReplyBuf { buf, len: 0 }
    }
    /// `n` writable bytes at the end; [`ReplyBuf::commit`] them once filled.
    fn tail(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < self.len + n {
            self.buf.resize(self.len + n, 0);
        }
        &mut self.buf[self.len..self.len + n]
    }
    fn commit(&mut self, n: usize) {
        self.len += n;
    }
    fn push(&mut self, b: &[u8]) {
        self.tail(b.len()).copy_from_slice(b);
        self.commit(b.len());
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// One connection in the transmission phase.
struct Conn {
    device: Arc<dyn BlockDevice>,
    params: SessionParams,
    /// Write side of the socket; see [`Conn::send`] for who may write.
    stream: UnixStream,
    out: Mutex<OutQueue>,
    out_turn: Condvar,
    broken: AtomicBool,
    /// (requests, bytes) queued or running.
    inflight: Mutex<(usize, u64)>,
    idle: Condvar,
    shared: Arc<Shared>,
}

impl Conn {
    fn read_requests(self: &Arc<Self>, r: &mut BufReader<UnixStream>) -> io::Result<()> {
        let mut batch = ReplyBuf::default();
        let mut wbuf = Vec::new();
        let result = self.read_loop(r, &mut batch, &mut wbuf);
        self.flush_batch(&mut batch);
        result
    }

    /// Whether to hand a small request to an idle worker instead of running it inline:
    /// only when the client has already pipelined more requests behind it (so the reader
    /// has work of its own) and a worker is idle (so nothing queues behind a busy one).
    fn offload(&self, buffered: usize, cmd: Command, length: u32) -> bool {
        let own = if cmd == Command::Write {
            length as usize
        } else {
            0
        };
        buffered >= own + REQUEST_LEN
            && self.shared.rt.idle_workers.load(Ordering::Relaxed) > 0
            && self.shared.rt.busy_readers.load(Ordering::Relaxed) < self.shared.rt.cores
    }

    fn flush_batch(&self, batch: &mut ReplyBuf) {
        if batch.len > 0 {
            self.send(batch.bytes());
            batch.len = 0;
        }
    }

    fn read_loop(
        self: &Arc<Self>,
        r: &mut BufReader<UnixStream>,
        batch: &mut ReplyBuf,
        wbuf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let mut hdr = [0u8; REQUEST_LEN];
        let eof_ok = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            }
        };
        let busy = &self.shared.rt.busy_readers;
        busy.fetch_add(1, Ordering::Relaxed);
        let _not_busy = Defer(|| {
            busy.fetch_sub(1, Ordering::Relaxed);
        });
        loop {
            if r.buffer().len() < REQUEST_LEN || batch.len >= BATCH_MAX {
                // About to block on the socket (or the batch is big): let replies go first.
                self.flush_batch(batch);
            }
            let read = if r.buffer().len() < REQUEST_LEN {
                busy.fetch_sub(1, Ordering::Relaxed);
                let read = r.read_exact(&mut hdr);
                busy.fetch_add(1, Ordering::Relaxed);
                read
            } else {
                r.read_exact(&mut hdr)
            };
            if let Err(e) = read {
                // The client closed (cleanly between requests, or mid-frame): nothing to answer.
                return eof_ok(e);
            }
            if self.broken.load(Ordering::Relaxed) {
                return Ok(());
            }
            let req = parse_request(&hdr).map_err(|e| bad_data(e.to_string()))?;
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            let cmd = match check_request(&req, &self.params) {
                Ok(c) => c,
                Err(rej) => {
                    if let Payload::Skip(n) = rej.payload {
                        self.flush_batch(batch);
                        io::copy(&mut r.by_ref().take(u64::from(n)), &mut io::sink())?;
                    }
                    self.error_reply(&req, rej.errno, rej.message, None, batch);
                    if rej.payload == Payload::Disconnect {
                        return Err(bad_data(
                            "write payload over the maximum; framing cannot be trusted".into(),
                        ));
                    }
                    continue;
                }
            };
            match cmd {
                Command::Disc => return Ok(()),
                Command::Read | Command::Write
                    if req.length <= INLINE_MAX
                        && req.flags & CMD_FLAG_FUA == 0
                        && !self.offload(r.buffer().len(), cmd, req.length) =>
                {
                    if cmd == Command::Read {
                        self.read_reply(&req, batch);
                    } else {
                        let n = req.length as usize;
                        if r.buffer().len() < n {
                            self.flush_batch(batch);
                        }
                        if wbuf.len() < n {
                            wbuf.resize(n, 0);
                        }
                        if let Err(e) = r.read_exact(&mut wbuf[..n]) {
                            // Client gone mid-payload: the partial write is never applied.
                            return eof_ok(e);
                        }
                        let res = self.device.write_at(&wbuf[..n], req.offset);
                        self.status_reply(&req, res, batch);
                    }
                    continue;
                }
                _ => {}
            }
            let cost = if matches!(cmd, Command::Read | Command::Write) {
                u64::from(req.length)
            } else {
                0
            };
            {
                // Admission before the payload is read: a client that pipelines faster
                // than the device is slowed by socket backpressure, not server memory.
                let mut n = lock(&self.inflight);
                if n.0 >= MAX_INFLIGHT || (n.0 > 0 && n.1 + cost > MAX_INFLIGHT_BYTES) {
                    drop(n);
                    self.flush_batch(batch);
                    n = lock(&self.inflight);
                }
                while n.0 >= MAX_INFLIGHT || (n.0 > 0 && n.1 + cost > MAX_INFLIGHT_BYTES) {
                    n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
                }
                n.0 += 1;
                n.1 += cost;
            }
            let payload = if cmd == Command::Write {
                let n = req.length as usize;
                if r.buffer().len() < n {
                    self.flush_batch(batch);
                }
                let mut b = self.shared.rt.bufs.get(n);
                if let Err(e) = r.read_exact(&mut b[..n]) {
                    self.done(cost);
                    return eof_ok(e);
                }
                Some(b)
            } else {
                None
            };
            let sh = self.shared.rt;
            lock(&sh.queue).push_back(Job {
                conn: self.clone(),
                req,
                cmd,
                cost,
                payload,
            });
            sh.queue_cv.notify_one();
        }
    }

    fn wait_idle(&self) {
        let mut n = lock(&self.inflight);
        while n.0 > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self, cost: u64) {
        let mut n = lock(&self.inflight);
        n.0 -= 1;
        n.1 -= cost;
        self.idle.notify_all();
    }

    /// Sends one complete reply. Replies are combined: while one worker is writing, others
    /// append their (small) replies to `pending` and return at once; the writing worker
    /// sends everything that piled up in one syscall before it lets go. Large replies wait
    /// for their turn instead of being copied.
    fn send(&self, bytes: &[u8]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut q = lock(&self.out);
        if q.writing {
            if bytes.len() <= COMBINE_MAX {
                q.pending.extend_from_slice(bytes);
                return;
            }
            while q.writing {
                q = self.out_turn.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        }
        q.writing = true;
        let mut batch = std::mem::take(&mut q.spare);
        drop(q);
        self.write_or_break(bytes);
        loop {
            let mut q = lock(&self.out);
            if q.pending.is_empty() {
                q.writing = false;
                q.spare = batch;
                drop(q);
                self.out_turn.notify_all();
                return;
            }
            std::mem::swap(&mut batch, &mut q.pending);
            drop(q);
            self.write_or_break(&batch);
            batch.clear();
        }
    }

    fn write_or_break(&self, bytes: &[u8]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        // Only the worker holding `writing` gets here, so writes never interleave.
        if let Err(e) = (&self.stream).write_all(bytes) {
            // The client vanished: stop the reader too, nothing more can be answered.
            tracing::debug!(error = %e, "NBD reply could not be sent");
            self.broken.store(true, Ordering::Relaxed);
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn error_reply(
        &self,
        req: &Request,
        errno: u32,
        message: &str,
        offset: Option<u64>,
        out: &mut ReplyBuf,
    ) {
        if self.params.structured {
            let msg = truncate_utf8(message, 1024).as_bytes();
            let extra = if offset.is_some() { 8 } else { 0 };
            let kind = if offset.is_some() {
                REPLY_TYPE_ERROR_OFFSET
            } else {
                REPLY_TYPE_ERROR
            };
            let t = out.tail(CHUNK_HEADER_LEN + 6 + msg.len() + extra);
            put_chunk_header(
                t,
                REPLY_FLAG_DONE,
                kind,
                req.handle,
                (6 + msg.len() + extra) as u32,
            );
            t[20..24].copy_from_slice(&errno.max(1).to_be_bytes());
            t[24..26].copy_from_slice(&(msg.len() as u16).to_be_bytes());
            t[26..26 + msg.len()].copy_from_slice(msg);
            if let Some(o) = offset {
                t[26 + msg.len()..].copy_from_slice(&o.to_be_bytes());
            }
            out.commit(CHUNK_HEADER_LEN + 6 + msg.len() + extra);
        } else {
            out.push(&simple_reply(errno, req.handle));
        }
    }

    fn status_reply(&self, req: &Request, r: Result<(), BlockError>, out: &mut ReplyBuf) {
        match r {
            Ok(()) => out.push(&simple_reply(0, req.handle)),
            Err(e) => self.error_reply(req, wire_errno(&e), &e.to_string(), None, out),
        }
    }

    /// Runs one queued request on a worker and sends its reply.
    fn run(&self, req: Request, cmd: Command, payload: Option<Vec<u8>>) {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let dev = &*self.device;
        let then_flush =
            |r: Result<(), BlockError>| if fua { r.and_then(|()| dev.flush()) } else { r };
        let bufs = &self.shared.rt.bufs;
        let mut out = ReplyBuf::from_vec(bufs.get(0));
        match cmd {
            Command::Read => self.read_reply(&req, &mut out),
            Command::Write => {
                let buf = payload.unwrap_or_default();
                let r = dev.write_at(&buf[..req.length as usize], req.offset);
                bufs.put(buf);
                self.status_reply(&req, then_flush(r), &mut out);
            }
            Command::Flush => self.status_reply(&req, dev.flush(), &mut out),
            Command::Trim => {
                let r = then_flush(dev.discard(req.offset, req.length.into()));
                self.status_reply(&req, r, &mut out)
            }
            Command::WriteZeroes => {
                let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                let r = then_flush(dev.write_zeroes(req.offset, req.length.into(), may_unmap));
                self.status_reply(&req, r, &mut out)
            }
            // Reads go through the page cache or the pool's own cache anyway; prefetching
            // would only duplicate that, so CACHE is acknowledged after the range check.
            Command::Cache => self.status_reply(&req, Ok(()), &mut out),
            Command::BlockStatus => self.block_status_reply(&req, &mut out),
            Command::Disc => {}
        }
        self.send(out.bytes());
        bufs.put(out.buf);
    }

    /// Appends the whole reply to a READ, data read straight into place behind its header.
    fn read_reply(&self, req: &Request, out: &mut ReplyBuf) {
        let len = req.length as usize;
        if !self.params.structured {
            let t = out.tail(SIMPLE_REPLY_LEN + len);
            match self.device.read_at(&mut t[SIMPLE_REPLY_LEN..], req.offset) {
                Ok(()) => {
                    put_simple_reply(t, 0, req.handle);
                    out.commit(SIMPLE_REPLY_LEN + len);
                }
                Err(e) => out.push(&simple_reply(wire_errno(&e), req.handle)),
            }
            return;
        }
        if len == 0 {
            put_chunk_header(
                out.tail(CHUNK_HEADER_LEN),
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.handle,
                0,
            );
            out.commit(CHUNK_HEADER_LEN);
            return;
        }
        // Segments (offset, length, reads-as-zero) covering the request.
        let mut segs: Vec<(u64, u32, bool)> = Vec::new();
        if req.length >= HOLE_PROBE_MIN && req.flags & CMD_FLAG_DF == 0 {
            if let Ok(ext) = self.device.block_status(req.offset, req.length.into()) {
                let mut pos = 0u32;
                for d in extents_to_descriptors(&ext, req.offset, req.length, false) {
                    segs.push((
                        req.offset + u64::from(pos),
                        d.length,
                        d.flags & STATE_ZERO != 0,
                    ));
                    pos += d.length;
                }
                if pos < req.length {
                    segs.push((req.offset + u64::from(pos), req.length - pos, false));
                }
            }
        }
        if segs.is_empty() {
            segs.push((req.offset, req.length, false));
        }
        let start = out.len;
        let last = segs.len() - 1;
        for (i, &(off, l, zero)) in segs.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            if zero {
                let t = out.tail(32);
                put_chunk_header(t, flags, REPLY_TYPE_OFFSET_HOLE, req.handle, 12);
                t[20..28].copy_from_slice(&off.to_be_bytes());
                t[28..32].copy_from_slice(&l.to_be_bytes());
                out.commit(32);
            } else {
                let t = out.tail(28 + l as usize);
                put_chunk_header(t, flags, REPLY_TYPE_OFFSET_DATA, req.handle, 8 + l);
                t[20..28].copy_from_slice(&off.to_be_bytes());
                if let Err(e) = self.device.read_at(&mut t[28..], off) {
                    // Nothing of this reply has been sent: replace it by the error alone.
                    out.len = start;
                    self.error_reply(req, wire_errno(&e), &e.to_string(), Some(off), out);
                    return;
                }
                out.commit(28 + l as usize);
            }
        }
    }

    fn block_status_reply(&self, req: &Request, out: &mut ReplyBuf) {
        match self.device.block_status(req.offset, req.length.into()) {
            Ok(ext) => {
                let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
                let descs = extents_to_descriptors(&ext, req.offset, req.length, req_one);
                let len = 4 + 8 * descs.len();
                let t = out.tail(CHUNK_HEADER_LEN + len);
                put_chunk_header(
                    t,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    req.handle,
                    len as u32,
                );
                t[20..24].copy_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                for (i, d) in descs.iter().enumerate() {
                    t[24 + 8 * i..28 + 8 * i].copy_from_slice(&d.length.to_be_bytes());
                    t[28 + 8 * i..32 + 8 * i].copy_from_slice(&d.flags.to_be_bytes());
                }
                out.commit(CHUNK_HEADER_LEN + len);
            }
            Err(e) => self.error_reply(req, wire_errno(&e), &e.to_string(), None, out),
        }
    }
}

fn worker(sh: &'static Runtime) {
    loop {
        let job = {
            let mut q = lock(&sh.queue);
            loop {
                if let Some(j) = q.pop_front() {
                    break j;
                }
                sh.idle_workers.fetch_add(1, Ordering::Relaxed);
                q = sh.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
                sh.idle_workers.fetch_sub(1, Ordering::Relaxed);
            }
        };
        let conn = job.conn;
        // A panicking device must not take the worker (and every connection) down with it.
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            conn.run(job.req, job.cmd, job.payload)
        }));
        if ok.is_err() {
            let mut out = ReplyBuf::default();
            conn.error_reply(&job.req, EIO, "internal error", None, &mut out);
            conn.send(out.bytes());
        }
        conn.done(job.cost);
    }
}

/// Runs a closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
