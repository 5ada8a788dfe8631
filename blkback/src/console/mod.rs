//! A PV console backend: a second console of a Xen guest (its /dev/hvc1) served by the
//! daemon itself, the transport of the guest agent (`qubes-ctl qube run`) on Xen.
//!
//! ```text
//!  guest hvc_xen ── xenstore handshake ──> device (state machine, XenStore trait)
//!        │ one ring page (struct xencons_interface), one event channel
//!        └── bytes ──> ring (ConsRing: indices checked) ──> bridge ──> Unix socket client
//! ```
//!
//! Why not the device model (libxl `channel=`, served by qemu-system-xen): it costs a
//! QEMU per qube, and in practice the guest never saw the channel. Why not libxenvchan:
//! the guest would need its own vchan client (a kernel console needs nothing). Like
//! the blkif backend, only [`xen`] touches Xen; the rest is tested in-process.

pub mod bridge;
pub mod device;
pub mod ring;
pub mod xen;
