//! The storage engine: a userspace thin-provisioning copy-on-write pool and the Qubes
//! volume model on top of it.
//!
//! ```text
//!   qubes (volume model: start/stop/revert/revisions)     <- controller calls this
//!        |  &dyn Pool (transactional: stage ops, then commit)
//!   +----+-------------------+------------------+
//!   thin (default driver)    reflink (XFS/btrfs) mem (simulation, tests)
//!        |  BlockFile (real file | fault-injecting, for crash tests)
//!   pool directory: superblocks + metadata pages + data chunks
//! ```
//!
//! Everything a block transport (NBD, Xen blkif) needs from a volume is the
//! [`BlockDevice`] trait; everything the volume model needs from a driver is [`Pool`].

pub mod dirlock;
pub mod io;
pub mod lvm_thin;
pub mod mem;
pub mod names;
pub mod pool;
pub mod qubes;
pub mod rbd;
pub mod reflink;
pub mod thin;

pub use lvm_thin::{LvmThinOptions, LvmThinPool};
pub use mem::MemPool;
pub use names::{validate_name, NameError};
pub use pool::{
    BatchGuard, BlockDevice, BlockError, BlockErrorKind, Extent, ImportOptions, ImportStats, Pool,
    PoolError, PoolInfo, ReadTarget, VerifyReport, VolumeInfo, WriteSource,
};
pub use qubes::{ModelError, QubeClass, QubeVolumes, Volumes};
pub use rbd::{RbdOptions, RbdPool};
pub use reflink::ReflinkPool;
pub use thin::{ThinOptions, ThinPool};
