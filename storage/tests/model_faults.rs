//! Every model operation, with the pool failing its k-th change, for every k: the operation
//! reports the error and what it staged is undone, so the next commit (of anything) cannot
//! make half of it durable. Only what was being dropped anyway (leftover snapshots, volatile
//! volumes, pruned revisions) may stay dropped.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use storage::qubes::{QubeClass, Volumes};
use storage::{
    BlockDevice, ImportOptions, ImportStats, MemPool, Pool, PoolError, PoolInfo, VerifyReport,
    VolumeInfo,
};

/// Delegates to a `MemPool`; the change numbered `fail_at` (0-based) fails with EIO.
struct Faulty {
    inner: MemPool,
    fail_at: AtomicI64,
}

impl Faulty {
    fn change(&self, what: &str) -> Result<(), PoolError> {
        if self.fail_at.fetch_sub(1, Ordering::SeqCst) == 0 {
            return Err(PoolError::io(
                format!("injected failure in {what}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }
}

impl Pool for Faulty {
    fn driver(&self) -> &'static str {
        "faulty-mem"
    }
    fn info(&self) -> Result<PoolInfo, PoolError> {
        self.inner.info()
    }
    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        self.inner.list_volumes()
    }
    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError> {
        self.inner.volume(key)
    }
    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError> {
        self.change("create")?;
        self.inner.create_volume(key, size)
    }
    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError> {
        self.change("snapshot")?;
        self.inner.snapshot(source, target)
    }
    fn remove_volume(&self, key: &str) -> Result<(), PoolError> {
        self.change("remove")?;
        self.inner.remove_volume(key)
    }
    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError> {
        self.change("rename")?;
        self.inner.rename_volume(from, to)
    }
    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError> {
        self.change("resize")?;
        self.inner.resize_volume(key, size, allow_shrink)
    }
    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError> {
        self.change("attr")?;
        self.inner.set_volume_attr(key, attr, value)
    }
    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError> {
        self.inner.open_volume(key, read_only)
    }
    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError> {
        self.inner.get_meta(key)
    }
    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError> {
        self.change("set_meta")?;
        self.inner.set_meta(key, value)
    }
    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError> {
        self.inner.meta_keys(prefix)
    }
    fn commit(&self) -> Result<(), PoolError> {
        self.change("commit")?;
        self.inner.commit()
    }
    fn verify(&self) -> Result<VerifyReport, PoolError> {
        self.inner.verify()
    }
    fn import_volume(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        self.change("import")?;
        self.inner.import_volume(key, image, size, opts)
    }
    fn fingerprint(&self, key: &str) -> Result<String, PoolError> {
        self.inner.fingerprint(key)
    }
}

/// What must survive a failed operation: every volume the model keeps (heads of volumes
/// saved at stop, running snapshots) with its content, and the whole key/value store.
#[derive(Debug, PartialEq)]
struct Kept {
    volumes: BTreeMap<String, (u64, u64, Vec<u8>)>,
    meta: BTreeMap<String, Option<String>>,
}

/// The first bytes, where the tests write (hashing whole 10 GiB volumes is too slow here).
fn head_bytes(p: &dyn Pool, key: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    p.open_volume(key, true)
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    buf
}

fn kept(p: &dyn Pool, droppable: &dyn Fn(&str) -> bool) -> Kept {
    let volumes = p
        .list_volumes()
        .unwrap()
        .into_iter()
        .filter(|i| !droppable(&i.key))
        .map(|i| (i.key.clone(), (i.size, i.mapped, head_bytes(p, &i.key))))
        .collect();
    let meta = p
        .meta_keys("")
        .unwrap()
        .into_iter()
        .map(|k| (k.clone(), p.get_meta(&k).unwrap()))
        .collect();
    Kept { volumes, meta }
}

fn write(p: &dyn Pool, key: &str, data: &[u8]) {
    let dev = p.open_volume(key, false).unwrap();
    dev.write_at(data, 0).unwrap();
    dev.flush().unwrap();
}

/// deb (TemplateVM), work (AppVM, two runs so it has a revision), dvm + disp (DispVM).
fn setup(v: &Volumes) {
    v.create_qube("deb", QubeClass::TemplateVM, None).unwrap();
    v.create_qube("work", QubeClass::AppVM, Some("deb"))
        .unwrap();
    v.set_revisions_to_keep("work", "private", 1).unwrap();
    for content in [&b"one"[..], b"two"] {
        let st = v.start("work").unwrap();
        write(&**v.pool(), &st[1].key, content);
        v.stop("work").unwrap();
    }
    v.create_qube("dvm", QubeClass::AppVM, Some("deb")).unwrap();
    v.create_qube("disp", QubeClass::DispVM, Some("dvm"))
        .unwrap();
}

type Op = fn(&Volumes) -> Result<(), storage::ModelError>;

/// Runs `prepare` without faults, then `op` failing at change 0, 1, 2, ... until it
/// succeeds; after each failure the kept state equals the state before the attempt.
fn sweep(name: &str, prepare: Op, op: Op, droppable: &dyn Fn(&str) -> bool) {
    for k in 0.. {
        let faulty = Arc::new(Faulty {
            inner: MemPool::new(),
            fail_at: AtomicI64::new(-1),
        });
        let v = Volumes::new(faulty.clone());
        setup(&v);
        prepare(&v).unwrap();
        let before = kept(&faulty.inner, droppable);
        faulty.fail_at.store(k, Ordering::SeqCst);
        match op(&v) {
            Ok(()) => {
                assert!(k > 0, "{name}: the sweep never reached a change");
                return;
            }
            Err(e) => {
                assert!(
                    format!("{e}").contains("injected failure"),
                    "{name} at change {k}: unexpected error {e}"
                );
                let after = kept(&faulty.inner, droppable);
                assert_eq!(
                    before, after,
                    "{name}: failing change {k} left part of the operation staged"
                );
                // The pool and the model work on: the failed step can be retried.
                faulty.inner.commit().unwrap();
                assert!(faulty.inner.verify().unwrap().is_clean());
                op(&v).unwrap_or_else(|e| panic!("{name}: retry after failing change {k}: {e}"));
            }
        }
        assert!(k < 50, "{name}: no success after 50 injected failures");
    }
}

fn nothing(_: &Volumes) -> Result<(), storage::ModelError> {
    Ok(())
}

/// Volumes a stop or a start drops anyway, and revisions (pruning may have begun).
fn transient(key: &str) -> bool {
    key.ends_with("/root") && !key.starts_with("deb/")
        || key.ends_with("/volatile")
        || key.starts_with("disp/")
        || {
            let tail = key.rsplit_once('@').map(|(_, t)| t);
            tail.is_some_and(|t| t != "run")
        }
}

#[test]
fn start_is_all_or_nothing() {
    sweep(
        "start work",
        nothing,
        |v| v.start("work").map(|_| ()),
        &transient,
    );
    sweep(
        "start disp",
        nothing,
        |v| v.start("disp").map(|_| ()),
        &transient,
    );
    sweep(
        "start deb",
        nothing,
        |v| v.start("deb").map(|_| ()),
        &transient,
    );
}

#[test]
fn stop_is_all_or_nothing() {
    sweep(
        "stop work",
        |v| {
            let st = v.start("work")?;
            write(&**v.pool(), &st[1].key, b"three");
            Ok(())
        },
        |v| v.stop("work"),
        &transient,
    );
    sweep(
        "stop disp",
        |v| v.start("disp").map(|_| ()),
        |v| v.stop("disp"),
        &transient,
    );
}

#[test]
fn revert_import_resize_are_all_or_nothing() {
    let none = |_: &str| false;
    sweep(
        "revert",
        nothing,
        |v| v.revert("work", "private", None),
        &none,
    );
    sweep(
        "import",
        nothing,
        |v| {
            v.import("deb", "root", &mut &[7u8; 100_000][..], 1 << 20)
                .map(|_| ())
        },
        &transient,
    );
    sweep(
        "resize",
        |v| v.start("work").map(|_| ()),
        |v| v.resize("work", "private", 4 << 30, false),
        &none,
    );
    // What discard drops is dropped even if its commit then fails.
    sweep(
        "discard",
        |v| v.start("work").map(|_| ()),
        |v| v.discard("work", "private"),
        &|k: &str| k.ends_with("@run"),
    );
}

#[test]
fn create_clone_remove_are_all_or_nothing() {
    let none = |_: &str| false;
    sweep(
        "create template",
        nothing,
        |v| v.create_qube("t2", QubeClass::TemplateVM, None).map(|_| ()),
        &none,
    );
    sweep(
        "create standalone",
        nothing,
        |v| {
            v.create_qube("s", QubeClass::StandaloneVM, Some("deb"))
                .map(|_| ())
        },
        &none,
    );
    sweep(
        "clone",
        nothing,
        |v| v.clone_qube("work", "work2").map(|_| ()),
        &none,
    );
    // Removal drops volumes as it goes (they are being removed); the qube config stays
    // until the end, so a retry finishes the job.
    sweep("remove", nothing, |v| v.remove_qube("work"), &|k: &str| {
        k.starts_with("work/")
    });
}
