//! The lock a pool directory's owner holds: `DIR/lock`, `flock`ed exclusively by the one
//! process that has the pool open, with that process's id written inside so a refusal
//! can name the holder.
//!
//! The lock belongs to the open file description, so it lasts as long as any copy of the
//! descriptor does. A child forked by another thread of the owning process holds such a
//! copy until it execs (the descriptor is close-on-exec); reopening a pool right after
//! closing it in a process that spawns programs would see its own lock for that moment.
//! When the recorded holder is this very process, acquiring retries briefly first.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::PoolError;

/// The lock file's name inside a pool directory.
pub const LOCK_FILE: &str = "lock";

/// How long a lock recorded as our own is retried (a fork's copy lasts until its exec).
const OWN_LOCK_RETRIES: u32 = 50;
const OWN_LOCK_PAUSE: Duration = Duration::from_millis(2);

/// Takes `dir`'s lock (creating the file, mode 0600) and records our pid in it; the lock
/// lasts as long as the returned file is open. A lock held elsewhere is
/// [`PoolError::Locked`] naming the holder's pid when it is known.
pub fn lock_pool_dir(dir: &Path) -> Result<File, PoolError> {
    lock_file(&dir.join(LOCK_FILE)).map_err(|e| match e {
        LockFileError::Held { pid, .. } => PoolError::Locked {
            path: dir.display().to_string(),
            pid,
        },
        LockFileError::Io { op, path, source } => {
            PoolError::io(format!("{op} {}", path.display()), source)
        }
    })
}

#[derive(Debug, Error)]
pub enum LockFileError {
    #[error("{} is locked by {}", path.display(), pid.map_or("another process".to_string(), |p| format!("pid {p}")))]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The lock of any file with this protocol (a pool directory's, the daemon's): an
/// exclusive `flock` taken without waiting (the file is created, mode 0600), our pid
/// written inside. Held elsewhere: [`LockFileError::Held`] with the recorded pid.
pub fn lock_file(path: &Path) -> Result<File, LockFileError> {
    let io = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| LockFileError::Io { op, path, source }
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io("opening"))?;
    let mut attempts = 0;
    loop {
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = recorded_pid(&mut f);
                if holder != Some(std::process::id()) || attempts == OWN_LOCK_RETRIES {
                    return Err(LockFileError::Held {
                        path: path.to_path_buf(),
                        pid: holder,
                    });
                }
                attempts += 1;
                std::thread::sleep(OWN_LOCK_PAUSE);
            }
            Err(e) => return Err(io("locking")(e.into())),
        }
    }
    f.set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| f.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io("writing"))?;
    Ok(f)
}

fn recorded_pid(f: &mut File) -> Option<u32> {
    let mut s = String::new();
    f.rewind().and_then(|()| f.read_to_string(&mut s)).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_the_lock_frees_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_pool_dir(dir.path()).unwrap();
        match lock_pool_dir(dir.path()) {
            Err(PoolError::Locked { pid, path }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(path, dir.path().display().to_string());
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        let again = lock_pool_dir(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_lock_held_by_another_process_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // flock(1) holds the lock in a child while it sleeps; its pid is what we record.
        let path = dir.path().join(LOCK_FILE);
        std::fs::write(&path, "").unwrap();
        let mut child = std::process::Command::new("flock")
            .arg(&path)
            .args(["sh", "-c", "echo $$ > \"$0\"; echo ready; sleep 30"])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("flock(1) from util-linux");
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut ready,
        )
        .unwrap();
        let r = lock_pool_dir(dir.path());
        let _ = child.kill();
        let _ = child.wait();
        match r {
            Err(PoolError::Locked { pid: Some(p), .. }) => assert_ne!(p, std::process::id()),
            other => panic!("expected Locked with a pid, got {other:?}"),
        }
    }
}
