// The body of storage/tests/model_rules.rs (shared with tests/lvm_thin.rs, which runs it inside a VM):
// the checks, written once against `&dyn Pool`; the test modules are in storage/tests/model_rules.rs.

use super::backends;

use std::io::Read;
use std::sync::Arc;

use backends::Backend;
use storage::qubes::{head_key, run_key, ModelError, QubeClass, Volumes};
use storage::{NameError, Pool, PoolError};

const MIB: u64 = 1 << 20;

pub fn write(pool: &dyn Pool, key: &str, offset: u64, data: &[u8]) {
    let dev = pool.open_volume(key, false).unwrap();
    dev.write_at(data, offset).unwrap();
    dev.flush().unwrap();
}

pub fn read(pool: &dyn Pool, key: &str, offset: u64, len: usize) -> Vec<u8> {
    let dev = pool.open_volume(key, true).unwrap();
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}

/// A TemplateVM `deb` whose root holds `tmpl-v1` at offset 0, and an AppVM `work`.
pub fn template_and_appvm(v: &Volumes) {
    v.create_qube("deb", QubeClass::TemplateVM, None).unwrap();
    set_template_root(v, b"tmpl-v1");
    v.create_qube("work", QubeClass::AppVM, Some("deb"))
        .unwrap();
}

/// Updates the template the way a user does: start it, write into its root, stop it.
pub fn set_template_root(v: &Volumes, content: &[u8]) {
    let started = v.start("deb").unwrap();
    write(&**v.pool(), &started[0].key, 0, content);
    v.stop("deb").unwrap();
}

/// One run of `qube` that writes `content` at offset 0 of its private volume.
pub fn run_writing_private(v: &Volumes, qube: &str, content: &[u8]) {
    let started = v.start(qube).unwrap();
    let private = started.iter().find(|s| s.name == "private").unwrap();
    write(&**v.pool(), &private.key, 0, content);
    v.stop(qube).unwrap();
}

pub fn private_head(v: &Volumes, qube: &str, len: usize) -> Vec<u8> {
    read(&**v.pool(), &head_key(qube, "private"), 0, len)
}

pub fn layout_of_each_class(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let t = v.qube("deb").unwrap();
    let root = t.volume("root").unwrap();
    assert!(root.save_on_stop && !root.snap_on_start && root.rw);
    assert_eq!((root.size, root.revisions_to_keep), (10 << 30, 1));
    assert_eq!(t.volume("private").unwrap().size, 2 << 30);
    let vol = t.volume("volatile").unwrap();
    assert!(!vol.save_on_stop && !vol.snap_on_start && vol.size == 10 << 30);

    let a = v.qube("work").unwrap();
    assert_eq!(a.template.as_deref(), Some("deb"));
    let root = a.volume("root").unwrap();
    assert!(root.snap_on_start && !root.save_on_stop);
    assert_eq!(root.source.as_deref(), Some("deb:root"));
    assert!(a.volume("private").unwrap().save_on_stop);
    // Until it starts, an AppVM owns only its private volume.
    assert_eq!(
        v.pool_keys("work").unwrap().into_iter().collect::<Vec<_>>(),
        vec!["work/private".to_string()]
    );

    v.create_qube("dvm", QubeClass::AppVM, Some("deb")).unwrap();
    let d = v
        .create_qube("disp1", QubeClass::DispVM, Some("dvm"))
        .unwrap();
    assert_eq!(
        d.volume("root").unwrap().source.as_deref(),
        Some("deb:root")
    );
    assert_eq!(
        d.volume("private").unwrap().source.as_deref(),
        Some("dvm:private")
    );
    assert!(d.volumes.iter().all(|c| !c.save_on_stop));
    assert!(v.pool_keys("disp1").unwrap().is_empty());

    let list: Vec<String> = v
        .list_qubes()
        .unwrap()
        .into_iter()
        .map(|q| q.qube)
        .collect();
    assert_eq!(list, ["deb", "disp1", "dvm", "work"]);
    // The config survives in the pool's key/value store.
    assert!(v.pool().get_meta("qube-volumes/work").unwrap().is_some());
}

pub fn wrong_templates_are_refused(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    assert!(matches!(
        v.create_qube("x", QubeClass::AppVM, None),
        Err(ModelError::TemplateRequired { .. })
    ));
    assert!(matches!(
        v.create_qube("x", QubeClass::AppVM, Some("nope")),
        Err(ModelError::NoSuchQube { .. })
    ));
    assert!(matches!(
        v.create_qube("x", QubeClass::AppVM, Some("work")),
        Err(ModelError::WrongTemplateClass { .. })
    ));
    assert!(matches!(
        v.create_qube("x", QubeClass::DispVM, Some("deb")),
        Err(ModelError::WrongTemplateClass { .. })
    ));
    assert!(matches!(
        v.create_qube("x", QubeClass::TemplateVM, Some("deb")),
        Err(ModelError::TemplateNotAllowed { .. })
    ));
    assert!(matches!(
        v.create_qube("work", QubeClass::AppVM, Some("deb")),
        Err(ModelError::QubeExists { .. })
    ));
    assert!(v.pool_keys("x").unwrap().is_empty());
}

pub fn names_are_validated(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    for bad in ["", "..", "a/b", "../etc", "-rf", "a b", "x\n"] {
        let e = v.create_qube(bad, QubeClass::TemplateVM, None).unwrap_err();
        assert!(matches!(e, ModelError::Name(_)), "{bad:?}: {e}");
    }
    assert!(matches!(
        v.create_qube("ok", QubeClass::AppVM, Some("../t")),
        Err(ModelError::Name(NameError::Reserved { .. }))
    ));
    assert!(matches!(v.start("a/b"), Err(ModelError::Name(_))));
    assert!(matches!(v.clone_qube("a", "b/c"), Err(ModelError::Name(_))));
    v.create_qube("ok", QubeClass::TemplateVM, None).unwrap();
    assert!(matches!(
        v.volume_status("ok", "../root"),
        Err(ModelError::Name(_))
    ));
    assert!(matches!(
        v.revert("ok", "private", Some("../../x")),
        Err(ModelError::Name(_))
    ));
    assert!(matches!(
        v.resize("ok", "root\n", 1, false),
        Err(ModelError::Name(_))
    ));
    v.remove_qube("ok").unwrap();
    assert!(v.pool().list_volumes().unwrap().is_empty());
}

pub fn start_and_stop_keys_and_one_commit_each(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let gen = v.pool().info().unwrap().generation;
    let started = v.start("work").unwrap();
    assert_eq!(
        v.pool().info().unwrap().generation,
        gen + 1,
        "a start is one commit"
    );
    let names: Vec<_> = started
        .iter()
        .map(|s| (s.name.as_str(), s.key.as_str(), s.read_only))
        .collect();
    assert_eq!(
        names,
        [
            ("root", "work/root", false),
            ("private", "work/private@run", false),
            ("volatile", "work/volatile", false)
        ]
    );
    assert_eq!(started[0].size, 10 << 30);
    assert!(v.is_running("work").unwrap());
    assert_eq!(v.running_qubes().unwrap(), ["work"]);
    assert!(v.volume_status("work", "private").unwrap().dirty);
    // The AppVM's root starts as the template's root.
    assert_eq!(read(&**v.pool(), "work/root", 0, 7), b"tmpl-v1");

    let gen = v.pool().info().unwrap().generation;
    v.stop("work").unwrap();
    assert_eq!(
        v.pool().info().unwrap().generation,
        gen + 1,
        "a stop is one commit"
    );
    assert!(!v.is_running("work").unwrap());
    assert!(v.running_qubes().unwrap().is_empty());
    let keys = v.pool_keys("work").unwrap();
    assert!(keys.contains("work/private"));
    assert!(
        !keys.contains("work/root")
            && !keys.contains("work/volatile")
            && !keys.contains("work/private@run")
    );
    assert!(matches!(v.stop("work"), Err(ModelError::NotRunning { .. })));
}

pub fn stop_keeps_the_old_head_as_a_revision(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    run_writing_private(&v, "work", b"first");
    assert_eq!(private_head(&v, "work", 5), b"first");
    let st = v.volume_status("work", "private").unwrap();
    assert_eq!(st.revisions.len(), 1);
    assert_eq!(st.head_key.as_deref(), Some("work/private"));
    assert!(!st.dirty && !st.running);
    // The revision is the empty private volume the qube was created with.
    assert_eq!(read(&**v.pool(), &st.revisions[0].key, 0, 5), [0; 5]);
    let id = &st.revisions[0].id;
    assert_eq!(st.revisions[0].key, format!("work/private@{id}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - st.revisions[0].timestamp).abs() < 600.0);
}

pub fn revert_restores_bytes_and_can_be_undone(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let old: Vec<u8> = (0..3 * MIB as usize / 2).map(|i| (i % 251) as u8).collect();
    let new: Vec<u8> = (0..MIB as usize).map(|i| (i % 13) as u8 + 1).collect();
    run_writing_private(&v, "work", &old);
    run_writing_private(&v, "work", &new);
    let mut expect_new = old.clone();
    expect_new[..new.len()].copy_from_slice(&new);
    assert_eq!(private_head(&v, "work", old.len()), expect_new);

    v.revert("work", "private", None).unwrap();
    assert_eq!(
        private_head(&v, "work", old.len()),
        old,
        "revert restores the previous contents byte for byte"
    );
    // The replaced head is now the newest revision: reverting again undoes the revert.
    v.revert("work", "private", None).unwrap();
    assert_eq!(private_head(&v, "work", old.len()), expect_new);

    // A named revision, and a named one that does not exist.
    let revs = v.volume_status("work", "private").unwrap().revisions;
    let oldest = revs.first().unwrap().id.clone();
    let e = v.revert("work", "private", Some("1.000000")).unwrap_err();
    assert!(matches!(e, ModelError::NoSuchRevision { .. }));
    assert!(e.to_string().contains(&oldest), "{e}");
    v.revert("work", "private", Some(&revs.last().unwrap().id))
        .unwrap();

    v.start("work").unwrap();
    assert!(matches!(
        v.revert("work", "private", None),
        Err(ModelError::Dirty { .. } | ModelError::Running { .. })
    ));
    v.stop("work").unwrap();
    assert!(matches!(
        v.revert("work", "root", None),
        Err(ModelError::NotPersistent { .. })
    ));
    assert!(matches!(
        v.revert("work", "nope", None),
        Err(ModelError::NoSuchVolume { .. })
    ));
}

pub fn revisions_are_pruned_to_revisions_to_keep(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    v.set_revisions_to_keep("work", "private", 2).unwrap();
    for i in 0..4u8 {
        run_writing_private(&v, "work", &[i + 1; 16]);
    }
    let revs = v.volume_status("work", "private").unwrap().revisions;
    assert_eq!(revs.len(), 2);
    assert!(revs[0].timestamp <= revs[1].timestamp);
    assert_eq!(
        read(&**v.pool(), &revs[0].key, 0, 1),
        [2],
        "the oldest ones go first"
    );
    assert_eq!(read(&**v.pool(), &revs[1].key, 0, 1), [3]);

    v.set_revisions_to_keep("work", "private", 0).unwrap();
    assert!(
        v.volume_status("work", "private")
            .unwrap()
            .revisions
            .is_empty(),
        "lowering it prunes at once"
    );
    run_writing_private(&v, "work", &[9; 16]);
    let st = v.volume_status("work", "private").unwrap();
    assert!(st.revisions.is_empty(), "0 keeps none");
    assert_eq!(st.config.revisions_to_keep, 0);
    assert_eq!(private_head(&v, "work", 1), [9]);
    assert!(matches!(
        v.revert("work", "private", None),
        Err(ModelError::NoRevisions { .. })
    ));
    // Nothing of the dropped revisions is left in the pool.
    assert_eq!(v.pool_keys("work").unwrap().len(), 1);
}

pub fn template_update_is_invisible_to_a_running_appvm(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    v.start("work").unwrap();
    set_template_root(&v, b"tmpl-v2");
    assert_eq!(read(&**v.pool(), "deb/root", 0, 7), b"tmpl-v2");
    assert_eq!(
        read(&**v.pool(), "work/root", 0, 7),
        b"tmpl-v1",
        "a running AppVM keeps the root it started with"
    );
    // What the AppVM writes into its root never reaches the template.
    write(&**v.pool(), "work/root", 0, b"appvm!!");
    assert_eq!(read(&**v.pool(), "deb/root", 0, 7), b"tmpl-v2");
    v.stop("work").unwrap();
    v.start("work").unwrap();
    assert_eq!(
        read(&**v.pool(), "work/root", 0, 7),
        b"tmpl-v2",
        "the next start sees the update"
    );
    v.stop("work").unwrap();
}

pub fn appvm_started_while_its_template_runs_sees_the_committed_root(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let t = v.start("deb").unwrap();
    write(&**v.pool(), &t[0].key, 0, b"not-yet");
    v.start("work").unwrap();
    assert_eq!(read(&**v.pool(), "work/root", 0, 7), b"tmpl-v1");
    v.stop("work").unwrap();
    v.stop("deb").unwrap();
}

pub fn dispvm_leaves_nothing(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    v.create_qube("dvm", QubeClass::AppVM, Some("deb")).unwrap();
    run_writing_private(&v, "dvm", b"dvm-home");
    v.create_qube("disp1", QubeClass::DispVM, Some("dvm"))
        .unwrap();
    let started = v.start("disp1").unwrap();
    let keys: Vec<_> = started.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["disp1/root", "disp1/private", "disp1/volatile"]);
    assert_eq!(read(&**v.pool(), "disp1/root", 0, 7), b"tmpl-v1");
    assert_eq!(read(&**v.pool(), "disp1/private", 0, 8), b"dvm-home");
    write(&**v.pool(), "disp1/private", 0, b"secret!!");
    write(&**v.pool(), "disp1/volatile", 0, b"swap");
    v.stop("disp1").unwrap();
    assert!(
        v.pool_keys("disp1").unwrap().is_empty(),
        "nothing of a DispVM survives its stop"
    );
    assert_eq!(private_head(&v, "dvm", 8), b"dvm-home");
    let again = v.start("disp1").unwrap();
    assert_eq!(read(&**v.pool(), &again[1].key, 0, 8), b"dvm-home");
    assert_eq!(read(&**v.pool(), &again[2].key, 0, 4), [0; 4]);
    v.stop("disp1").unwrap();
    assert!(matches!(
        v.revert("disp1", "private", None),
        Err(ModelError::NotPersistent { .. })
    ));
}

pub fn standalone_is_independent_of_its_template(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let s = v
        .create_qube("alone", QubeClass::StandaloneVM, Some("deb"))
        .unwrap();
    assert!(s.volume("root").unwrap().save_on_stop && s.volume("root").unwrap().source.is_none());
    assert_eq!(read(&**v.pool(), "alone/root", 0, 7), b"tmpl-v1");
    set_template_root(&v, b"tmpl-v2");
    assert_eq!(
        read(&**v.pool(), "alone/root", 0, 7),
        b"tmpl-v1",
        "later template changes do not reach it"
    );
    let st = v.start("alone").unwrap();
    assert_eq!(st[0].key, "alone/root@run");
    write(&**v.pool(), &st[0].key, 0, b"mine!!!");
    v.stop("alone").unwrap();
    assert_eq!(read(&**v.pool(), "alone/root", 0, 7), b"mine!!!");
    assert_eq!(read(&**v.pool(), "deb/root", 0, 7), b"tmpl-v2");
    // The template can go: the standalone qube does not depend on it.
    v.remove_qube("work").unwrap();
    v.remove_qube("deb").unwrap();
    assert_eq!(read(&**v.pool(), "alone/root", 0, 7), b"mine!!!");
    // Without a template: empty own volumes.
    v.create_qube("blank", QubeClass::StandaloneVM, None)
        .unwrap();
    assert_eq!(read(&**v.pool(), "blank/root", 0, 4), [0; 4]);
}

pub fn clone_is_a_snapshot_of_the_heads(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    run_writing_private(&v, "work", b"work-data");
    let c = v.clone_qube("work", "work2").unwrap();
    assert_eq!(
        (c.class, c.template.as_deref()),
        (QubeClass::AppVM, Some("deb"))
    );
    assert_eq!(private_head(&v, "work2", 9), b"work-data");
    assert!(
        v.volume_status("work2", "private")
            .unwrap()
            .revisions
            .is_empty(),
        "revisions are not cloned"
    );
    run_writing_private(&v, "work2", b"other----");
    assert_eq!(private_head(&v, "work", 9), b"work-data");
    assert!(matches!(
        v.clone_qube("work", "work2"),
        Err(ModelError::QubeExists { .. })
    ));
    assert!(matches!(
        v.clone_qube("nope", "x"),
        Err(ModelError::NoSuchQube { .. })
    ));
    // The template now has two users.
    let e = v.remove_qube("deb").unwrap_err();
    assert!(matches!(e, ModelError::InUse { .. }));
    assert!(
        e.to_string().contains("work") && e.to_string().contains("work2"),
        "{e}"
    );
}

pub fn remove_refuses_running_and_used(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    v.create_qube("dvm", QubeClass::AppVM, Some("deb")).unwrap();
    v.create_qube("disp1", QubeClass::DispVM, Some("dvm"))
        .unwrap();
    let e = v.remove_qube("dvm").unwrap_err();
    assert!(
        matches!(e, ModelError::InUse { .. }) && e.to_string().contains("disp1"),
        "{e}"
    );
    v.start("work").unwrap();
    let e = v.remove_qube("work").unwrap_err();
    assert!(
        matches!(e, ModelError::Running { .. }) && e.to_string().contains("work"),
        "{e}"
    );
    v.stop("work").unwrap();
    run_writing_private(&v, "work", b"x");
    v.remove_qube("work").unwrap();
    assert!(
        v.pool_keys("work").unwrap().is_empty(),
        "revisions go with the qube"
    );
    assert!(matches!(v.qube("work"), Err(ModelError::NoSuchQube { .. })));
    v.remove_qube("disp1").unwrap();
    v.remove_qube("dvm").unwrap();
    v.remove_qube("deb").unwrap();
    assert!(v.pool().list_volumes().unwrap().is_empty());
    assert!(v.list_qubes().unwrap().is_empty());
}

pub fn crash_while_running_resumes_then_commits(b: &mut dyn Backend) {
    let pool = b.pool();
    {
        let v = Volumes::new(pool.clone());
        template_and_appvm(&v);
        run_writing_private(&v, "work", b"committed");
        let started = v.start("work").unwrap();
        // Flushed writes into the running snapshot, the AppVM root and volatile.
        write(&*pool, &started[1].key, 0, b"flushed!!");
        write(&*pool, &started[0].key, 0, b"rootjunk");
        write(&*pool, &started[2].key, 0, b"volatile");
    }
    drop(pool);
    let v = Volumes::new(b.crash());
    assert_eq!(
        v.running_qubes().unwrap(),
        ["work"],
        "the running marker survives the crash"
    );
    let st = v.volume_status("work", "private").unwrap();
    assert!(st.dirty);
    assert_eq!(
        private_head(&v, "work", 9),
        b"committed",
        "the head is untouched"
    );
    // Revert and import refuse and name the ways out.
    let e = v.revert("work", "private", None).unwrap_err();
    assert!(matches!(e, ModelError::Dirty { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("start and stop") && msg.contains("volume discard work:private"),
        "{msg}"
    );
    let e = v
        .import("work", "private", &mut &b"img"[..], MIB)
        .unwrap_err();
    assert!(matches!(e, ModelError::Dirty { .. }), "{e}");

    let started = v.start("work").unwrap();
    assert_eq!(started[1].key, "work/private@run");
    assert_eq!(
        read(&**v.pool(), &started[1].key, 0, 9),
        b"flushed!!",
        "the next start resumes from the dirty snapshot"
    );
    assert_eq!(
        read(&**v.pool(), &started[0].key, 0, 8),
        b"tmpl-v1\0",
        "leftover root snapshot dropped, fresh from the template"
    );
    assert_eq!(
        read(&**v.pool(), &started[2].key, 0, 8),
        [0; 8],
        "leftover volatile dropped"
    );
    v.stop("work").unwrap();
    assert_eq!(
        private_head(&v, "work", 9),
        b"flushed!!",
        "the next stop commits it"
    );
    assert!(!v.volume_status("work", "private").unwrap().dirty);
}

pub fn crash_then_stop_commits_and_discard_drops(b: &mut dyn Backend) {
    let pool = b.pool();
    {
        let v = Volumes::new(pool.clone());
        template_and_appvm(&v);
        v.create_qube("other", QubeClass::AppVM, Some("deb"))
            .unwrap();
        for q in ["work", "other"] {
            let started = v.start(q).unwrap();
            write(&*pool, &started[1].key, 0, q.as_bytes());
        }
    }
    drop(pool);
    let v = Volumes::new(b.crash());
    assert_eq!(v.running_qubes().unwrap(), ["other", "work"]);
    // Stop alone commits what was flushed.
    v.stop("work").unwrap();
    assert_eq!(private_head(&v, "work", 4), b"work");
    // Discard drops it; the head stays as it was.
    v.discard("other", "private").unwrap();
    let st = v.volume_status("other", "private").unwrap();
    assert!(!st.dirty);
    assert_eq!(private_head(&v, "other", 5), [0; 5]);
    assert!(!v.pool().exists(&run_key("other", "private")).unwrap());
    v.discard("other", "private").unwrap();
    assert!(matches!(
        v.discard("other", "root"),
        Err(ModelError::NotPersistent { .. })
    ));
    v.stop("other").unwrap();
    assert_eq!(private_head(&v, "other", 5), [0; 5]);
    assert!(
        v.volume_status("other", "private")
            .unwrap()
            .revisions
            .is_empty(),
        "nothing to commit, no revision"
    );
}

pub fn crash_before_commit_loses_the_whole_operation(b: &mut dyn Backend) {
    let pool = b.pool();
    {
        let v = Volumes::new(pool.clone());
        template_and_appvm(&v);
        // Staged but never committed: as if the controller died inside a transaction.
        pool.create_volume("work/volatile", MIB).unwrap();
        pool.set_meta("qube-running/work", Some("1")).unwrap();
    }
    drop(pool);
    let v = Volumes::new(b.crash());
    if !b.transactional() {
        // rbd: every step was durable when it returned; the half-done start is visible
        // and the model's stop repairs it like a stop after a crash while running.
        assert_eq!(v.running_qubes().unwrap(), ["work"]);
        assert!(v.pool().exists("work/volatile").unwrap());
        v.stop("work").unwrap();
        assert!(v.running_qubes().unwrap().is_empty());
    } else {
        assert!(v.running_qubes().unwrap().is_empty());
        assert!(!v.pool().exists("work/volatile").unwrap());
    }
    v.start("work").unwrap();
    v.stop("work").unwrap();
}

pub fn orphan_volumes_do_not_block_a_name(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    // What a create that crashed after its volumes became durable leaves behind.
    v.pool().create_volume("ghost/private", MIB).unwrap();
    v.pool()
        .create_volume("ghost/private@1764160000.000001", MIB)
        .unwrap();
    v.pool().commit().unwrap();
    v.create_qube("ghost", QubeClass::TemplateVM, None).unwrap();
    let keys: Vec<String> = v.pool_keys("ghost").unwrap().into_iter().collect();
    assert_eq!(keys, ["ghost/private", "ghost/root"]);
    assert_eq!(v.volume_status("ghost", "private").unwrap().size, 2 << 30);
    assert!(v
        .volume_status("ghost", "private")
        .unwrap()
        .revisions
        .is_empty());
}

/// Qubes' lvm_thin leaves `vm-work-root-snap` (an AppVM root's running snapshot) after a
/// crash, and its next start failed on it (qubes-issues #3964, #7573). Here such a stale
/// `@run` of a volume not saved at stop is dropped by the next start; the `@run` of a
/// saved volume is resumed (crash_while_running_resumes_then_commits).
pub fn stale_run_snapshot_of_a_discarded_volume_is_dropped_at_start(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    v.pool()
        .snapshot("deb/root", &run_key("work", "root"))
        .unwrap();
    v.pool()
        .create_volume(&run_key("work", "volatile"), MIB)
        .unwrap();
    v.pool().commit().unwrap();
    let started = v.start("work").unwrap();
    assert!(started.iter().any(|s| s.key == head_key("work", "root")));
    assert!(!v.pool().exists(&run_key("work", "root")).unwrap());
    assert!(!v.pool().exists(&run_key("work", "volatile")).unwrap());
    v.stop("work").unwrap();
    let keys: Vec<String> = v.pool_keys("work").unwrap().into_iter().collect();
    assert!(
        keys.iter()
            .all(|k| k.starts_with("work/private") && !k.ends_with("@run")),
        "{keys:?}"
    );
}

/// A driver that commits between two steps of a transaction (thin's flush does) can leave
/// a revert half done: the head renamed to a revision, the chosen revision not yet the head.
pub fn half_done_revert_is_repaired_by_revert(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    run_writing_private(&v, "work", b"one");
    run_writing_private(&v, "work", b"two");
    v.pool()
        .rename_volume("work/private", "work/private@9999999999.000000")
        .unwrap();
    v.pool().commit().unwrap();
    let e = v.start("work").unwrap_err();
    assert!(matches!(e, ModelError::HeadMissing { .. }), "{e}");
    assert!(e.to_string().contains("volume revert work:private"), "{e}");
    assert!(!v.is_running("work").unwrap());
    v.revert("work", "private", None).unwrap();
    assert_eq!(private_head(&v, "work", 3), b"two");
    run_writing_private(&v, "work", b"three");
}

pub fn import_commits_like_a_stop_and_export_round_trips(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let image: Vec<u8> = (0..2 * MIB as usize + 4096)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    let mut padded = image.clone();
    padded.resize(3 * MIB as usize, 0);
    let stats = v.import("deb", "root", &mut &image[..], 3 * MIB).unwrap();
    assert_eq!(
        stats.fingerprint,
        blake3::hash(&padded).to_hex().to_string()
    );
    assert_eq!(v.pool().fingerprint("deb/root").unwrap(), stats.fingerprint);
    let st = v.volume_status("deb", "root").unwrap();
    assert_eq!((st.size, st.config.size), (3 * MIB, 3 * MIB));
    assert_eq!(st.revisions.len(), 1, "the old head became a revision");
    assert_eq!(read(&**v.pool(), &st.revisions[0].key, 0, 7), b"tmpl-v1");
    let mut out = Vec::new();
    assert_eq!(v.export("deb", "root", &mut out).unwrap(), 3 * MIB);
    assert_eq!(out, padded);
    // AppVMs see it at their next start; the import is revertible.
    let started = v.start("work").unwrap();
    assert_eq!(started[0].size, 3 * MIB);
    assert_eq!(read(&**v.pool(), "work/root", 0, 4096), image[..4096]);
    v.stop("work").unwrap();
    assert!(matches!(
        v.export("work", "root", &mut Vec::new()),
        Err(ModelError::NotPersistent { .. })
    ));
    v.revert("deb", "root", None).unwrap();
    assert_eq!(read(&**v.pool(), "deb/root", 0, 7), b"tmpl-v1");
    // Refused while running.
    v.start("deb").unwrap();
    let e = v.import("deb", "private", &mut &b"x"[..], MIB).unwrap_err();
    assert!(
        matches!(e, ModelError::Dirty { .. } | ModelError::Running { .. }),
        "{e}"
    );
    v.stop("deb").unwrap();
}

/// A reader that fails half-way, like a truncated download.
struct Failing(usize);

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::other("network down"));
        }
        let n = buf.len().min(self.0);
        buf[..n].fill(7);
        self.0 -= n;
        Ok(n)
    }
}

pub fn failed_import_leaves_the_pool_as_it_was(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let before: Vec<_> = v
        .pool()
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|i| (i.key, i.size))
        .collect();
    let gen = v.pool().info().unwrap().generation;
    let e = v
        .import("deb", "root", &mut Failing(MIB as usize), 4 * MIB)
        .unwrap_err();
    assert!(
        e.to_string().contains("network down") || format!("{e:?}").contains("network down"),
        "{e}"
    );
    let after: Vec<_> = v
        .pool()
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|i| (i.key, i.size))
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        v.pool().info().unwrap().generation,
        gen,
        "nothing committed"
    );
    assert_eq!(read(&**v.pool(), "deb/root", 0, 7), b"tmpl-v1");
    // And a later commit does not pick up anything left staged.
    v.start("work").unwrap();
    v.stop("work").unwrap();
    assert!(v
        .pool()
        .list_volumes()
        .unwrap()
        .iter()
        .all(|i| !i.key.contains("import")));
}

pub fn resize_rules(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    v.resize("work", "private", 4 << 30, false).unwrap();
    assert_eq!(v.volume_status("work", "private").unwrap().size, 4 << 30);
    assert_eq!(
        v.qube("work").unwrap().volume("private").unwrap().size,
        4 << 30
    );
    let e = v.resize("work", "private", 1 << 30, false).unwrap_err();
    assert!(e.to_string().contains("allow-shrink"), "{e}");
    assert!(matches!(
        v.resize("work", "root", 20 << 30, false),
        Err(ModelError::FollowsSource { .. })
    ));
    // While running: what the qube sees changes, and the size holds after the stop.
    let started = v.start("work").unwrap();
    v.resize("work", "private", 5 << 30, false).unwrap();
    assert_eq!(v.pool().volume(&started[1].key).unwrap().size, 5 << 30);
    v.stop("work").unwrap();
    assert_eq!(v.pool().volume("work/private").unwrap().size, 5 << 30);
    v.resize("work", "private", MIB, true).unwrap();
    assert_eq!(v.volume_status("work", "private").unwrap().size, MIB);
    v.resize("work", "volatile", MIB, true).unwrap();
    assert_eq!(v.start("work").unwrap()[2].size, MIB);
    v.stop("work").unwrap();
}

pub fn missing_template_head_fails_cleanly(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    // Damage: the template's head vanished (as after a manual removal).
    v.pool().remove_volume("deb/root").unwrap();
    v.pool().commit().unwrap();
    let keys_before = v.pool_keys("work").unwrap();
    let e = v.start("work").unwrap_err();
    assert!(
        matches!(e, ModelError::SourceMissing { .. }) && e.to_string().contains("deb:root"),
        "{e}"
    );
    assert_eq!(v.pool_keys("work").unwrap(), keys_before);
    assert!(!v.is_running("work").unwrap());
}

pub fn open_volume_blocks_stop_without_damage(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    run_writing_private(&v, "work", b"before");
    let started = v.start("work").unwrap();
    write(&**v.pool(), &started[1].key, 0, b"during");
    let held = v.pool().open_volume(&started[0].key, false).unwrap();
    let e = v.stop("work").unwrap_err();
    assert!(
        matches!(e.pool_error(), Some(PoolError::Busy { .. })),
        "{e}"
    );
    // Nothing of the stop was staged: the head and the running snapshot are as they were.
    assert!(v.is_running("work").unwrap());
    assert_eq!(private_head(&v, "work", 6), b"before");
    drop(held);
    v.stop("work").unwrap();
    assert_eq!(private_head(&v, "work", 6), b"during");
}

pub fn status_reports_usage(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    let st = v.volume_status("work", "root").unwrap();
    assert_eq!(
        (st.head_key.as_deref(), st.usage, st.running),
        (None, 0, false)
    );
    run_writing_private(&v, "work", &vec![1u8; MIB as usize]);
    let st = v.volume_status("work", "private").unwrap();
    assert!(st.usage >= MIB, "{st:?}");
    let json = serde_json::to_string(&st).unwrap();
    assert!(json.contains("\"revisions\""));
}

pub fn concurrent_starts_of_many_qubes(b: &mut dyn Backend) {
    let v = Volumes::new(b.pool());
    template_and_appvm(&v);
    for i in 0..8 {
        v.create_qube(&format!("app{i}"), QubeClass::AppVM, Some("deb"))
            .unwrap();
    }
    let v = Arc::new(v);
    std::thread::scope(|s| {
        for i in 0..8 {
            let v = v.clone();
            s.spawn(move || {
                let q = format!("app{i}");
                let st = v.start(&q).unwrap();
                write(&**v.pool(), &st[1].key, 0, q.as_bytes());
                v.stop(&q).unwrap();
            });
        }
    });
    for i in 0..8 {
        let q = format!("app{i}");
        assert_eq!(private_head(&v, &q, q.len()), q.as_bytes());
    }
    assert!(v.pool().verify().unwrap().is_clean());
}
