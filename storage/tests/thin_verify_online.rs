//! `verify` walks a pinned commit without the metadata lock: guest writes, flushes,
//! snapshots and removals go on while it runs, and the pages it reads are not reused
//! under it (dm-thin's `metadata_snap`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use storage::io::{BlockFile, FaultyFile};
use storage::thin::{ThinOptions, ThinPool};
use storage::Pool;

/// The metadata file; reads from one chosen thread (the verifier) stop at the first
/// read until the test opens the gate.
#[derive(Clone)]
struct GatedFile {
    inner: FaultyFile,
    reader: Arc<Mutex<Option<ThreadId>>>,
    open: Arc<(Mutex<bool>, Condvar)>,
    reached: Arc<AtomicBool>,
}

impl BlockFile for GatedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if *self.reader.lock().unwrap() == Some(std::thread::current().id()) {
            self.reached.store(true, Ordering::SeqCst);
            let (m, cv) = &*self.open;
            let mut g = m.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

fn pat(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed | 1) | 1)
        .collect()
}

#[test]
fn guest_io_and_commits_go_on_during_verify() {
    let dir = tempfile::tempdir().unwrap();
    let meta = GatedFile {
        inner: FaultyFile::new(),
        reader: Arc::new(Mutex::new(None)),
        open: Arc::new((Mutex::new(false), Condvar::new())),
        reached: Arc::new(AtomicBool::new(false)),
    };
    let cs = 4096u64;
    let pool = ThinPool::create_with_io(
        dir.path(),
        ThinOptions {
            chunk_size: cs,
            capacity: 64 << 20,
        },
        Box::new(meta.clone()),
        Box::new(FaultyFile::new()),
    )
    .unwrap();
    // Several volumes with map pages of their own, committed.
    for i in 0..8u8 {
        let k = format!("v{i}");
        pool.create_volume(&k, 8 << 20).unwrap();
        let v = pool.open_volume(&k, false).unwrap();
        for leaf in 0..6 {
            v.write_at(&pat(i, 4096), leaf * 168 * cs).unwrap();
        }
    }
    pool.commit().unwrap();

    let verifier = {
        let pool = pool.clone();
        let reader = meta.reader.clone();
        std::thread::spawn(move || {
            *reader.lock().unwrap() = Some(std::thread::current().id());
            pool.verify().unwrap()
        })
    };
    while !meta.reached.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The verifier is inside its walk. Rewrite, remove and re-create every volume and
    // commit many times: on the old code this waits for the metadata lock held by verify.
    let (tx, rx) = mpsc::channel();
    let writer = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            for round in 0..6u8 {
                for i in 0..8u8 {
                    let k = format!("v{i}");
                    pool.remove_volume(&k).unwrap();
                    pool.create_volume(&k, 8 << 20).unwrap();
                    let v = pool.open_volume(&k, false).unwrap();
                    for leaf in 0..6 {
                        v.write_at(&pat(round.wrapping_add(i), 4096), leaf * 168 * cs)
                            .unwrap();
                    }
                    v.flush().unwrap();
                }
            }
            tx.send(()).unwrap();
        })
    };
    let done = rx.recv_timeout(Duration::from_secs(120));
    // Let the verifier go on whatever happened, so the test ends.
    {
        let (m, cv) = &*meta.open;
        *m.lock().unwrap() = true;
        cv.notify_all();
    }
    assert!(
        done.is_ok(),
        "writes and commits stalled while verify ran (it holds the metadata lock)"
    );
    writer.join().unwrap();
    // The pinned commit's pages were not reused under the walk.
    let report = verifier.join().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.volumes, 8);
    let report = pool.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
}
