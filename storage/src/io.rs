//! The block I/O layer under pool drivers: positioned reads and writes on one file,
//! with a durability barrier, and two implementations.
//!
//! * [`RealFile`]: a `std::fs::File` (pread/pwrite, `fdatasync`, `fallocate(PUNCH_HOLE)`).
//! * [`FaultyFile`]: memory only, for crash tests. It keeps the *durable* image (what a
//!   disk holds after a power cut) apart from writes that were not yet synced. A shared
//!   [`Faults`] counter numbers every mutating call (write, sync, set_len, punch_hole)
//!   across all files that share it; `fail_after(n)` makes call `n` and every later one
//!   fail with `EIO` (`fail_only(n)`: call `n` alone), and [`FaultyFile::power_cut`]
//!   returns the durable image, on which a test reopens the pool.
//!   [`FaultyFile::power_cut_torn`] is harsher, as real disks are: any subset of the
//!   unsynced calls persists, in any order, writes torn at 512-byte sectors.
//!
//! Images are sparse (4 KiB pages, absent pages read as zeros), so a test can simulate a
//! large, mostly empty disk cheaply.
//!
//! Contract: `write_at` may extend the file; `read_at` past the end is an error
//! (`UnexpectedEof`); `punch_hole` makes the range read as zeros without changing the
//! length; nothing is durable before `sync` returns `Ok`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::pool::{ReadTarget, WriteSource};

/// Positioned I/O on one file. Implementations are thread-safe.
pub trait BlockFile: Send + Sync {
    /// Fills `buf` from `offset`; fails with `UnexpectedEof` if the file is shorter.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes bytes `[src_off, src_off + len)` of `src` at `offset`. The default copies
    /// them into a buffer and calls `write_at`; a real file hands the source's memory to
    /// the kernel (`pwritev`).
    fn write_from(
        &self,
        src: &dyn WriteSource,
        src_off: usize,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; len];
        src.copy_to(src_off, &mut buf);
        self.write_at(&buf, offset)
    }
    /// Fills bytes `[dst_off, dst_off + len)` of `dst` from `offset`; `UnexpectedEof` if
    /// the file is shorter. The default reads into a buffer and copies; a real file has
    /// the kernel fill the target's memory (`preadv`).
    fn read_into(
        &self,
        dst: &dyn ReadTarget,
        dst_off: usize,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        dst.fill_from(dst_off, &buf);
        Ok(())
    }
    /// Durability barrier for data written so far (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The range reads as zeros afterwards and its space is released; the length stays.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserves host space for later writes to the range (the length stays), so they
    /// cannot fail for want of space; `ENOSPC` now instead of halfway through a commit.
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Bytes free for an unprivileged writer on the filesystem holding the file, if known.
    fn host_free(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

/// Writes (`pwritev`) or reads (`preadv`) every byte of `iov` at `offset`: at most
/// `IOV_MAX` pieces per call, again after a short transfer or `EINTR` (the pieces are
/// advanced in place). A read that meets the end of the file is `UnexpectedEof`.
fn vectored_all(file: &File, iov: &mut [libc::iovec], mut offset: u64, dir: Dir) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const IOV_MAX: usize = 1024;
    let mut at = 0;
    while at < iov.len() {
        if iov[at].iov_len == 0 {
            at += 1;
            continue;
        }
        let batch = &iov[at..iov.len().min(at + IOV_MAX)];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
        let (fd, cnt) = (file.as_raw_fd(), batch.len() as i32);
        let n = match dir {
            // SAFETY: `batch` is a valid array of at most IOV_MAX iovecs; each points to
            // memory readable for the whole call (the `WriteSource` contract); the
            // kernel only reads it.
            Dir::Write => unsafe { libc::pwritev(fd, batch.as_ptr(), cnt, off) },
            // SAFETY: as above, memory writable for the whole call (the `ReadTarget`
            // contract), which no Rust reference covers meanwhile.
            Dir::Read => unsafe { libc::preadv(fd, batch.as_ptr(), cnt, off) },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(match dir {
                Dir::Write => io::ErrorKind::WriteZero,
                Dir::Read => io::ErrorKind::UnexpectedEof,
            }));
        }
        let mut left = n as usize;
        offset += left as u64;
        while left > 0 {
            let v = &mut iov[at];
            let k = left.min(v.iov_len);
            // Advancing inside the piece the kernel just read: still the same memory.
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(k).cast();
            v.iov_len -= k;
            left -= k;
            if v.iov_len == 0 {
                at += 1;
            }
        }
    }
    Ok(())
}

/// A regular file (or block device) on the host.
pub struct RealFile {
    file: File,
}

impl RealFile {
    pub fn new(file: File) -> Self {
        RealFile { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_from(
        &self,
        src: &dyn WriteSource,
        src_off: usize,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut iov = Vec::new();
        src.iovecs(src_off, len, &mut iov);
        vectored_all(&self.file, &mut iov, offset, Dir::Write)
    }

    fn read_into(
        &self,
        dst: &dyn ReadTarget,
        dst_off: usize,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut iov = Vec::new();
        dst.iovecs(dst_off, len, &mut iov);
        vectored_all(&self.file, &mut iov, offset, Dir::Read)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len) {
            // A filesystem without fallocate allocates at write time, as before.
            Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            r => r.map_err(io::Error::from),
        }
    }

    fn host_free(&self) -> io::Result<Option<u64>> {
        let st = rustix::fs::fstatvfs(&self.file).map_err(io::Error::from)?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }
}

/// Fault schedule shared by the [`FaultyFile`]s of one simulated machine: one counter of
/// mutating calls, one failure threshold.
#[derive(Debug)]
pub struct Faults {
    ops: AtomicU64,
    fail_at: AtomicU64,
    /// Calls from `fail_at` up to (not including) this one fail.
    fail_end: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            ops: AtomicU64::new(0),
            fail_at: AtomicU64::new(u64::MAX),
            fail_end: AtomicU64::new(u64::MAX),
        }
    }
}

impl Faults {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Mutating call number `n` (0-based, counted from now on) and every later one fail.
    pub fn fail_after(&self, n: u64) {
        let now = self.ops.load(Ordering::SeqCst);
        self.fail_end.store(u64::MAX, Ordering::SeqCst);
        self.fail_at.store(now.saturating_add(n), Ordering::SeqCst);
    }

    /// Only mutating call number `n` (0-based, counted from now on) fails: a transient
    /// error, after which the device works again.
    pub fn fail_only(&self, n: u64) {
        let at = self.ops.load(Ordering::SeqCst).saturating_add(n);
        self.fail_end.store(at.saturating_add(1), Ordering::SeqCst);
        self.fail_at.store(at, Ordering::SeqCst);
    }

    /// Mutating calls issued so far (failed ones included).
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    pub fn clear(&self) {
        self.fail_at.store(u64::MAX, Ordering::SeqCst);
    }

    fn next(&self) -> io::Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_at.load(Ordering::SeqCst) && n < self.fail_end.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
}

const IMG_PAGE: usize = 4096;
/// The unit a disk writes atomically.
const SECTOR: u64 = 512;

/// A sparse in-memory disk image (absent pages read as zeros), as a power cut leaves it.
#[derive(Clone, Default, Debug)]
pub struct DiskImage {
    len: u64,
    pages: std::collections::HashMap<u64, Box<[u8; IMG_PAGE]>>,
}

impl DiskImage {
    pub fn from_bytes(bytes: &[u8]) -> DiskImage {
        let mut img = DiskImage::default();
        img.write(0, bytes);
        img
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        self.read(0, &mut v);
        v
    }

    fn read(&self, off: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let pos = off + done as u64;
            let (pg, at) = (pos / IMG_PAGE as u64, (pos % IMG_PAGE as u64) as usize);
            let n = (IMG_PAGE - at).min(buf.len() - done);
            match self.pages.get(&pg) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[at..at + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let pos = off + done as u64;
            let (pg, at) = (pos / IMG_PAGE as u64, (pos % IMG_PAGE as u64) as usize);
            let n = (IMG_PAGE - at).min(data.len() - done);
            let p = self
                .pages
                .entry(pg)
                .or_insert_with(|| Box::new([0u8; IMG_PAGE]));
            p[at..at + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(off + data.len() as u64);
    }

    fn zero(&mut self, off: u64, len: u64) {
        let end = (off + len).min(self.len);
        let mut pos = off;
        while pos < end {
            let (pg, at) = (pos / IMG_PAGE as u64, (pos % IMG_PAGE as u64) as usize);
            let n = ((IMG_PAGE - at) as u64).min(end - pos);
            if at == 0 && n == IMG_PAGE as u64 {
                self.pages.remove(&pg);
            } else if let Some(p) = self.pages.get_mut(&pg) {
                p[at..at + n as usize].fill(0);
            }
            pos += n;
        }
    }

    fn apply(&mut self, op: &Pending) {
        match op {
            Pending::Write(off, data) => self.write(*off, data),
            Pending::SetLen(len) => {
                if *len < self.len {
                    self.zero(*len, self.len - *len);
                }
                self.len = *len;
            }
            Pending::Punch(off, len) => self.zero(*off, *len),
        }
    }
}

#[derive(Default)]
struct FaultyState {
    current: DiskImage,
    durable: DiskImage,
    pending: Vec<Pending>,
}

/// In-memory file that loses unsynced writes at a simulated power cut. Clones share state.
#[derive(Clone)]
pub struct FaultyFile {
    state: Arc<Mutex<FaultyState>>,
    faults: Arc<Faults>,
}

impl Default for FaultyFile {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultyFile {
    pub fn new() -> Self {
        Self::with_faults(DiskImage::default(), Faults::new())
    }

    /// A file whose durable and current content is `image`, counting faults in `faults`.
    pub fn with_faults(image: DiskImage, faults: Arc<Faults>) -> Self {
        let st = FaultyState {
            current: image.clone(),
            durable: image,
            pending: Vec::new(),
        };
        FaultyFile {
            state: Arc::new(Mutex::new(st)),
            faults,
        }
    }

    pub fn from_image(image: DiskImage) -> Self {
        Self::with_faults(image, Faults::new())
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Shorthand for `self.faults().fail_after(n)`.
    pub fn fail_after(&self, n: u64) {
        self.faults.fail_after(n)
    }

    /// What the disk holds after a power cut now: the state at the last successful sync.
    pub fn power_cut(&self) -> DiskImage {
        self.state.lock().durable.clone()
    }

    /// A harsher power cut, as real disks behave: each call made since the last sync
    /// persists or not, independently, in any order, and a write may persist only some
    /// of its 512-byte sectors (a torn 4 KiB page). `seed` picks one such outcome.
    pub fn power_cut_torn(&self, seed: u64) -> DiskImage {
        let st = self.state.lock();
        let mut img = st.durable.clone();
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut order: Vec<usize> = (0..st.pending.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        for i in order {
            let op = &st.pending[i];
            match (next() % 3, op) {
                (0, _) => {}
                (_, Pending::Write(off, data)) if next() % 2 == 0 => {
                    // Sector by sector, as the write's sectors are aligned in the file.
                    let mut pos = 0usize;
                    while pos < data.len() {
                        let abs = off + pos as u64;
                        let n = (SECTOR - (abs % SECTOR)).min((data.len() - pos) as u64) as usize;
                        if next() % 2 == 0 {
                            img.write(abs, &data[pos..pos + n]);
                        }
                        pos += n;
                    }
                }
                _ => img.apply(op),
            }
        }
        img
    }

    /// Current content (synced or not).
    pub fn image(&self) -> DiskImage {
        self.state.lock().current.clone()
    }

    /// Overwrites bytes in both images without counting a call (damage injection).
    pub fn corrupt(&self, offset: u64, bytes: &[u8]) {
        let mut st = self.state.lock();
        st.current.write(offset, bytes);
        st.durable.write(offset, bytes);
    }

    fn mutate(&self, op: Pending) -> io::Result<()> {
        self.faults.next()?;
        let mut st = self.state.lock();
        st.current.apply(&op);
        st.pending.push(op);
        Ok(())
    }
}

impl BlockFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.state.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= st.current.len);
        match end {
            Some(_) => {
                st.current.read(offset, buf);
                Ok(())
            }
            None => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mutate(Pending::Write(offset, buf.to_vec()))
    }

    fn sync(&self) -> io::Result<()> {
        self.faults.next()?;
        let mut st = self.state.lock();
        let pending = std::mem::take(&mut st.pending);
        for op in &pending {
            st.durable.apply(op);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mutate(Pending::SetLen(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(Pending::Punch(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faulty_file_loses_unsynced_writes() {
        let f = FaultyFile::new();
        f.write_at(b"hello", 0).unwrap();
        f.sync().unwrap();
        f.write_at(b"HE", 0).unwrap();
        f.punch_hole(3, 2).unwrap();
        let mut b = [0u8; 5];
        f.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"HEl\0\0");
        assert_eq!(f.power_cut().to_bytes(), b"hello");
    }

    #[test]
    fn torn_power_cut_keeps_synced_data_and_tears_at_sectors() {
        let f = FaultyFile::new();
        f.write_at(&[1u8; 8192], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2u8; 4096], 0).unwrap();
        f.write_at(&[3u8; 4096], 4096).unwrap();
        let mut seen_torn = false;
        let mut seen = std::collections::HashSet::new();
        for seed in 0..64 {
            let img = f.power_cut_torn(seed).to_bytes();
            assert_eq!(img.len(), 8192);
            for (i, sector) in img.chunks(512).enumerate() {
                let new = if i < 8 { 2 } else { 3 };
                assert!(sector.iter().all(|&b| b == sector[0]), "a sector tore");
                assert!(sector[0] == 1 || sector[0] == new);
            }
            let page0: Vec<u8> = img[..4096].chunks(512).map(|s| s[0]).collect();
            seen_torn |= page0.contains(&1) && page0.contains(&2);
            seen.insert(img);
        }
        assert!(seen_torn, "no 4 KiB page was torn in 64 cuts");
        assert!(seen.len() > 8, "only {} outcomes", seen.len());
    }

    #[test]
    fn fail_only_fails_one_call() {
        let f = FaultyFile::new();
        f.faults().fail_only(1);
        f.write_at(b"a", 0).unwrap();
        assert!(f.write_at(b"b", 1).is_err());
        f.write_at(b"c", 2).unwrap();
    }

    #[test]
    fn faulty_file_fails_from_the_nth_call() {
        let f = FaultyFile::new();
        f.fail_after(2);
        f.write_at(b"a", 0).unwrap();
        f.sync().unwrap();
        assert!(f.write_at(b"b", 1).is_err());
        assert!(f.sync().is_err());
        assert_eq!(f.power_cut().to_bytes(), b"a");
        assert_eq!(f.faults().ops(), 4);
    }

    #[test]
    fn real_file_punch_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let f = RealFile::new(file);
        f.write_at(&[7u8; 8192], 0).unwrap();
        f.punch_hole(0, 4096).unwrap();
        let mut b = [1u8; 8192];
        f.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 7));
        assert_eq!(f.len().unwrap(), 8192);
    }
}
