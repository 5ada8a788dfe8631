//! The `Pool` / `BlockDevice` contract (storage/src/pool.rs), written once against
//! `&dyn Pool` and run for every driver: `mem`, `reflink` on XFS and on btrfs, and `thin`.

#[path = "model_backends.rs"]
mod backends;

mod suite {
    include!("suite/conformance.rs");
}
use suite::*;
#[allow(unused_imports)]
use {backends::Backend, std::sync::Arc, storage::Pool};

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::backends;

            fn run(f: fn(&mut dyn backends::Backend)) {
                let mut b = $make;
                f(&mut b);
                let report = backends::Backend::pool(&b).verify().unwrap();
                assert!(report.is_clean(), "{report:?}");
            }

            #[test]
            fn new_volume_reads_zeros_and_maps_nothing() {
                run(super::new_volume_reads_zeros_and_maps_nothing)
            }
            #[test]
            fn unaligned_writes_round_trip() {
                run(super::unaligned_writes_round_trip)
            }
            #[test]
            fn snapshots_are_independent() {
                run(super::snapshots_are_independent)
            }
            #[test]
            fn remove_is_refused_while_open() {
                run(super::remove_is_refused_while_open)
            }
            #[test]
            fn rename_moves_and_handles_follow() {
                run(super::rename_moves_and_handles_follow)
            }
            #[test]
            fn resize_grows_with_zeros_and_shrinks_only_when_asked() {
                run(super::resize_grows_with_zeros_and_shrinks_only_when_asked)
            }
            #[test]
            fn attrs_and_meta() {
                run(super::attrs_and_meta)
            }
            #[test]
            fn commit_is_atomic_across_a_crash() {
                run(super::commit_is_atomic_across_a_crash)
            }
            #[test]
            fn flush_leaves_staged_catalogue_changes_staged() {
                run(super::flush_leaves_staged_catalogue_changes_staged)
            }
            #[test]
            fn read_only_handles_refuse_every_write() {
                run(super::read_only_handles_refuse_every_write)
            }
            #[test]
            fn discard_unmaps_whole_chunks_only() {
                run(super::discard_unmaps_whole_chunks_only)
            }
            #[test]
            fn write_zeroes_reads_zeros() {
                run(super::write_zeroes_reads_zeros)
            }
            #[test]
            fn block_status_reports_data_and_holes() {
                run(super::block_status_reports_data_and_holes)
            }
            #[test]
            fn import_skips_zeros_dedups_and_fingerprints() {
                run(super::import_skips_zeros_dedups_and_fingerprints)
            }
            #[test]
            fn failed_import_creates_nothing() {
                run(super::failed_import_creates_nothing)
            }
            #[test]
            fn concurrent_writers_on_several_volumes() {
                run(super::concurrent_writers_on_several_volumes)
            }
            #[test]
            fn info_counts_volumes_and_commits() {
                run(super::info_counts_volumes_and_commits)
            }
        }
    };
}

conformance!(mem, backends::Mem::new());
conformance!(thin, backends::Thin::new());
conformance!(reflink_xfs, backends::Reflink::xfs());
conformance!(reflink_btrfs, backends::Reflink::btrfs());
conformance!(rbd, backends::Rbd::new());

#[test]
fn mem_pool_full_is_a_clean_error() {
    let mut b = backends::Mem::with_capacity(4096, 64 * 4096);
    pool_full_is_a_clean_error(&mut b, 64 * 4096);
}

#[test]
fn thin_pool_full_is_a_clean_error() {
    let mut b = backends::Thin::with_options(4096, 64 * 4096);
    pool_full_is_a_clean_error(&mut b, 64 * 4096);
}

#[test]
fn reflink_pool_full_is_a_clean_error() {
    // A small XFS of its own, so filling it is quick and other tests are not disturbed.
    let fs = backends::LoopFs::new("xfs", 320 << 20);
    let dir = fs.subdir();
    let p: Arc<dyn Pool> = Arc::new(storage::ReflinkPool::create(&dir).unwrap());
    let free = {
        let i = p.info().unwrap();
        i.capacity - i.data_used
    };
    struct One(Arc<dyn Pool>);
    impl Backend for One {
        fn name(&self) -> &'static str {
            "reflink-small"
        }
        fn pool(&self) -> Arc<dyn Pool> {
            self.0.clone()
        }
        fn crash(&mut self) -> Arc<dyn Pool> {
            unreachable!("not used by this test")
        }
    }
    pool_full_is_a_clean_error(&mut One(p.clone()), free);
    drop(p);
}
