//! The Xen blkif backend: serves a pool volume to a Xen guest's blkfront over a shared
//! ring, with no NBD hop, no kernel blkback and no QEMU.
//!
//! ```text
//!  guest blkfront ── xenstore handshake ──> xenbus (state machine, XenStore trait)
//!        │ ring pages (mapped grants), event channel
//!        └── requests ──> ring (BackRing) ──> abi (parse + validate, fuzzed)
//!                          └──> vbd (grant copy or persistent grants
//!                                    <-> Arc<dyn storage::BlockDevice>)
//! ```
//!
//! Everything but `xen` is plain safe Rust over two small traits ([`vbd::GuestMemory`],
//! [`vbd::EventChannel`]) and [`xen_sys::SharedMem`], so the protocol is tested without
//! Xen against the in-process frontend in [`testing`]. The `unsafe` lives in `xen-sys`.

pub mod abi;
pub mod persistent;
pub mod ring;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vbd;
pub mod xen;
pub mod xenbus;

pub use vbd::{serve, EventChannel, GuestMemory, ServeError, Vbd, VbdParams};
