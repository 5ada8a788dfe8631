//! `qubes-ctl qube run` and the agent in the qube that runs the commands.
//!
//! ```text
//!  qubes-ctl qube run work -- CMD            guest: qubes-guest-agent (systemd unit,
//!    host::run ── agent.sock (0600) ── QEMU ── virtio-serial ── /dev/virtio-ports/
//!                                               org.qubes-ctl.agent.0) -> agent::serve
//! ```
//!
//! [`proto`] is the one versioned protocol both speak; [`host`] is the host's end of a
//! session, [`agent`] the guest's. The agent binary (`qubes-guest-agent`) is installed into
//! every template `qubes-ctl template build` makes.

pub mod agent;
pub mod host;
pub mod proto;

/// Name of the virtio-serial port (the guest sees `/dev/virtio-ports/NAME`).
pub const PORT_NAME: &str = "org.qubes-ctl.agent.0";
