//! Imports run alongside guests: a FLUSH (pool commit) does not wait for an import to
//! finish, and deduplication never shares a chunk that a commit during the import let
//! another volume reuse.

use std::io::Read;
use std::sync::mpsc;
use std::time::Duration;

use storage::thin::{ThinOptions, ThinPool};
use storage::{ImportOptions, Pool};

const CS: u64 = 64 << 10;
/// More than one import batch (32 MiB), so the reader can stop between batches.
const FIRST: usize = 40 << 20;

/// Yields `first`, tells the test it is waiting, then yields `rest` once released.
struct PausingReader {
    first: Vec<u8>,
    rest: Vec<u8>,
    pos: usize,
    paused: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
}

impl Read for PausingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.first.len() {
            if let Some((tell, wait)) = self.paused.take() {
                let _ = tell.send(());
                let _ = wait.recv();
            }
        }
        let all = self.first.len() + self.rest.len();
        if self.pos >= all {
            return Ok(0);
        }
        let src = if self.pos < self.first.len() {
            &self.first[self.pos..]
        } else {
            &self.rest[self.pos - self.first.len()..]
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        self.pos += n;
        Ok(n)
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 4096) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

fn pool(dir: &std::path::Path) -> std::sync::Arc<ThinPool> {
    ThinPool::create(
        dir,
        ThinOptions {
            chunk_size: CS,
            capacity: 1 << 30,
        },
    )
    .unwrap()
}

#[test]
fn a_flush_does_not_wait_for_an_import() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path());
    pool.create_volume("guest", 1 << 20).unwrap();
    let guest = pool.open_volume("guest", false).unwrap();
    let (tell, paused) = mpsc::channel();
    let (release, wait) = mpsc::channel();
    let first = pattern(1, FIRST);
    let rest = pattern(2, 8 << 20);
    let image = [first.clone(), rest.clone()].concat();
    let importer = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            let mut r = PausingReader {
                first,
                rest,
                pos: 0,
                paused: Some((tell, wait)),
            };
            pool.import_volume(
                "imported",
                &mut r,
                (FIRST + (8 << 20)) as u64,
                &ImportOptions {
                    dedup: true,
                    dedup_against: None,
                },
            )
        })
    };
    paused.recv().unwrap();
    // The import is half done and stalled on its reader: a guest writes and flushes.
    let (done_tx, done_rx) = mpsc::channel();
    {
        let guest = guest.clone();
        std::thread::spawn(move || {
            guest.write_at(&[0x5A; 4096], 0).unwrap();
            let _ = done_tx.send(guest.flush());
        });
    }
    let flushed = done_rx.recv_timeout(Duration::from_secs(20));
    release.send(()).unwrap();
    let stats = importer.join().unwrap().unwrap();
    flushed
        .expect("the guest's FLUSH waited for the import to finish")
        .unwrap();
    assert_eq!(stats.bytes, image.len() as u64);
    pool.commit().unwrap();
    let mut back = vec![0u8; image.len()];
    pool.open_volume("imported", true)
        .unwrap()
        .read_at(&mut back, 0)
        .unwrap();
    assert!(back == image, "imported bytes differ");
    let r = pool.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
    drop(guest);
    drop(pool);
    let pool = ThinPool::open(dir.path()).unwrap();
    assert!(pool.verify().unwrap().is_clean());
}

/// Dedup against a volume whose chunks are freed, committed and reused by another
/// volume while the import waits: the import must write its own copy.
#[test]
fn dedup_never_shares_a_chunk_reused_during_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path());
    let old = pattern(7, 16 << 20);
    pool.create_volume("source", old.len() as u64).unwrap();
    let source = pool.open_volume("source", false).unwrap();
    source.write_at(&old, 0).unwrap();
    pool.commit().unwrap();
    let (tell, paused) = mpsc::channel();
    let (release, wait) = mpsc::channel();
    // The second part of the image repeats the source's content: dedup candidates.
    let first = pattern(9, FIRST);
    let image = [first.clone(), old.clone()].concat();
    let importer = {
        let pool = pool.clone();
        let old = old.clone();
        std::thread::spawn(move || {
            let mut r = PausingReader {
                first,
                rest: old,
                pos: 0,
                paused: Some((tell, wait)),
            };
            let size = (FIRST + (16 << 20)) as u64;
            pool.import_volume(
                "imported",
                &mut r,
                size,
                &ImportOptions {
                    dedup: true,
                    dedup_against: Some("source".into()),
                },
            )
        })
    };
    paused.recv().unwrap();
    // Free every chunk of the source, make that durable, and let another volume take
    // the chunks with other bytes.
    let (done_tx, done_rx) = mpsc::channel();
    {
        let pool = pool.clone();
        let len = old.len() as u64;
        std::thread::spawn(move || {
            source.discard(0, len).unwrap();
            source.flush().unwrap();
            pool.create_volume("thief", len).unwrap();
            let thief = pool.open_volume("thief", false).unwrap();
            thief.write_at(&vec![0xEE; len as usize], 0).unwrap();
            let _ = done_tx.send(());
        });
    }
    let reused = done_rx.recv_timeout(Duration::from_secs(20));
    release.send(()).unwrap();
    reused.expect("the source's FLUSH waited for the import to finish");
    importer.join().unwrap().unwrap();
    pool.commit().unwrap();
    let mut back = vec![0u8; image.len()];
    pool.open_volume("imported", true)
        .unwrap()
        .read_at(&mut back, 0)
        .unwrap();
    assert!(
        back == image,
        "the import shared chunks that now hold another volume's bytes"
    );
    let r = pool.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
}

/// The same through the volume model (`volume import`): a running qube's FLUSH is not
/// held back by another qube's import, and the import still commits like a stop.
#[test]
fn a_running_qubes_flush_does_not_wait_for_volume_import() {
    use storage::qubes::{QubeClass, Volumes};
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path());
    let shared: std::sync::Arc<dyn Pool> = pool.clone();
    let v = std::sync::Arc::new(Volumes::new(shared));
    v.create_qube("deb", QubeClass::TemplateVM, None).unwrap();
    v.create_qube("work", QubeClass::StandaloneVM, None)
        .unwrap();
    let started = v.start("work").unwrap();
    let private = started.iter().find(|s| s.name == "private").unwrap();
    let dev = pool.open_volume(&private.key, false).unwrap();
    let (tell, paused) = mpsc::channel();
    let (release, wait) = mpsc::channel();
    let first = pattern(3, FIRST);
    let rest = pattern(4, 8 << 20);
    let image = [first.clone(), rest.clone()].concat();
    let importer = {
        let v = v.clone();
        std::thread::spawn(move || {
            let mut r = PausingReader {
                first,
                rest,
                pos: 0,
                paused: Some((tell, wait)),
            };
            v.import("deb", "root", &mut r, (FIRST + (8 << 20)) as u64)
        })
    };
    paused.recv().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    {
        let dev = dev.clone();
        std::thread::spawn(move || {
            dev.write_at(&[0x42; 4096], 0).unwrap();
            let _ = done_tx.send(dev.flush());
        });
    }
    let flushed = done_rx.recv_timeout(Duration::from_secs(20));
    release.send(()).unwrap();
    importer.join().unwrap().unwrap();
    flushed
        .expect("work's FLUSH waited for deb's import to finish")
        .unwrap();
    drop(dev);
    v.stop("work").unwrap();
    let head = pool
        .open_volume(&storage::qubes::head_key("deb", "root"), true)
        .unwrap();
    let mut back = vec![0u8; image.len()];
    head.read_at(&mut back, 0).unwrap();
    assert!(back == image, "the imported root differs");
    assert!(pool.verify().unwrap().is_clean());
}

/// The model lock is not held while an import copies: another qube starts and stops and
/// the qubes are listed meanwhile; a second import into the same volume is refused; and
/// a qube started under the import makes it fail at its commit, leaving nothing staged.
#[test]
fn other_qubes_start_and_stop_while_an_import_copies() {
    use storage::qubes::{ModelError, QubeClass, Volumes};
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path());
    let shared: std::sync::Arc<dyn Pool> = pool.clone();
    let v = std::sync::Arc::new(Volumes::new(shared));
    v.create_qube("deb", QubeClass::TemplateVM, None).unwrap();
    v.create_qube("work", QubeClass::StandaloneVM, None)
        .unwrap();
    let held_import = |qube: &'static str| {
        let (tell, paused) = mpsc::channel();
        let (release, wait) = mpsc::channel();
        let v = v.clone();
        let t = std::thread::spawn(move || {
            let mut r = PausingReader {
                first: pattern(3, FIRST),
                rest: pattern(4, 1 << 20),
                pos: 0,
                paused: Some((tell, wait)),
            };
            v.import(qube, "root", &mut r, (FIRST + (1 << 20)) as u64)
        });
        paused.recv().unwrap();
        (t, release)
    };
    let (importer, release) = held_import("deb");
    let (done_tx, done_rx) = mpsc::channel();
    {
        let v = v.clone();
        std::thread::spawn(move || {
            let r = (|| {
                v.start("work")?;
                let n = v.list_qubes()?.len();
                v.stop("work")?;
                Ok::<_, ModelError>(n)
            })();
            let _ = done_tx.send(r);
        });
    }
    let Ok(other) = done_rx.recv_timeout(Duration::from_secs(20)) else {
        release.send(()).unwrap();
        let _ = importer.join();
        panic!("work's start waited for deb's import to finish");
    };
    assert_eq!(other.unwrap(), 2);
    let second = v.import("deb", "root", &mut std::io::empty(), 0);
    release.send(()).unwrap();
    importer.join().unwrap().unwrap();
    assert!(
        matches!(second, Err(ModelError::Busy { .. })),
        "a second import into deb:root while one copies: {second:?}"
    );

    // The importing qube itself started meanwhile: the import must not commit under it.
    let (importer, release) = held_import("work");
    v.start("work").unwrap();
    release.send(()).unwrap();
    let r = importer.join().unwrap();
    assert!(
        matches!(
            r,
            Err(ModelError::Running { .. } | ModelError::Dirty { .. })
        ),
        "an import committed into a running qube: {r:?}"
    );
    v.stop("work").unwrap();
    let staged = pool
        .list_volumes()
        .unwrap()
        .into_iter()
        .filter(|i| i.key.contains("import"))
        .count();
    assert_eq!(staged, 0, "the failed import left its staging volume");
    assert!(pool.verify().unwrap().is_clean());
}
