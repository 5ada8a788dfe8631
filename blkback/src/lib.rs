//! Serving pool volumes to domains over NBD.
//!
//! ```text
//!  QEMU / nbd clients ── nbd+unix:// ──> NbdServer (one Unix socket per qube, mode 0600)
//!        handshake: negotiate (pure option state machine) ── transmission: server (threads)
//!        wire format: proto (pure parsers/encoders, fuzzed)
//!                                   └──> Arc<dyn storage::BlockDevice>
//! ```
//!
//! The protocol layer is written here rather than taken from the `nbd` crate: that crate
//! (0.3) serves one `Read + Write + Seek` object, one request at a time, without structured
//! replies, metadata contexts (`base:allocation` block status), `NBD_OPT_GO`/`INFO`, TRIM,
//! WRITE_ZEROES or multi-connection flags, and its parsers are not separable for fuzzing.
//!
//! Threads rather than an async runtime: every device call is blocking file I/O (pread,
//! pwrite, fdatasync), which an async runtime would push onto a blocking pool anyway; a
//! reader thread per connection plus a small shared worker pool keeps both cores busy with
//! no extra dependency.

pub mod blkif;
pub mod console;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod negotiate;
pub mod proto;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;

pub use server::{nbd_uri, Export, NbdError, NbdServer};
