//! The Qubes volume model's rules (DESIGN.md, "The volume model"), each checked on every
//! pool backend: the simulation (`mem`), the real default driver (`thin`), and `reflink` on
//! XFS and btrfs loop mounts.

#[path = "model_backends.rs"]
mod backends;

mod suite {
    include!("suite/model_rules.rs");
}
use suite::*;

macro_rules! model_tests {
    ($backend:ident, $make:expr, [$($t:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[test]
                fn $t() {
                    let mut b = $make;
                    super::$t(&mut b);
                    let report = storage::Pool::verify(&*backends::Backend::pool(&b)).unwrap();
                    assert!(report.is_clean(), "{report:?}");
                }
            )*
            use super::backends;
        }
    };
}

macro_rules! all_model_tests {
    ($backend:ident, $make:expr) => {
        model_tests!(
            $backend,
            $make,
            [
                layout_of_each_class,
                wrong_templates_are_refused,
                names_are_validated,
                start_and_stop_keys_and_one_commit_each,
                stop_keeps_the_old_head_as_a_revision,
                revert_restores_bytes_and_can_be_undone,
                revisions_are_pruned_to_revisions_to_keep,
                template_update_is_invisible_to_a_running_appvm,
                appvm_started_while_its_template_runs_sees_the_committed_root,
                dispvm_leaves_nothing,
                standalone_is_independent_of_its_template,
                clone_is_a_snapshot_of_the_heads,
                remove_refuses_running_and_used,
                crash_while_running_resumes_then_commits,
                crash_then_stop_commits_and_discard_drops,
                crash_before_commit_loses_the_whole_operation,
                orphan_volumes_do_not_block_a_name,
                stale_run_snapshot_of_a_discarded_volume_is_dropped_at_start,
                half_done_revert_is_repaired_by_revert,
                import_commits_like_a_stop_and_export_round_trips,
                failed_import_leaves_the_pool_as_it_was,
                resize_rules,
                missing_template_head_fails_cleanly,
                open_volume_blocks_stop_without_damage,
                status_reports_usage,
                concurrent_starts_of_many_qubes,
            ]
        );
    };
}

all_model_tests!(mem, backends::Mem::new());
all_model_tests!(thin, backends::Thin::new());
all_model_tests!(reflink_xfs, backends::Reflink::xfs());
all_model_tests!(reflink_btrfs, backends::Reflink::btrfs());
all_model_tests!(rbd, backends::Rbd::new());
