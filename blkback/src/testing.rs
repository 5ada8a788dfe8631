//! A file-backed [`BlockDevice`] for tests and benchmarks (the simulated side of the
//! transport boundary): sparse file, real allocation status through `SEEK_DATA`/`SEEK_HOLE`,
//! TRIM as hole punching, and an optional space limit that makes writes beyond it fail with
//! `NoSpace`, so ENOSPC can be exercised without a pool.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use storage::{BlockDevice, BlockError, BlockErrorKind, Extent};

pub struct FileDevice {
    file: File,
    name: String,
    size: u64,
    read_only: bool,
    /// Writes touching bytes at or past this offset fail with `NoSpace`.
    space_limit: Option<u64>,
}

impl FileDevice {
    /// Opens (creating if needed) `path` and sizes it to `size` bytes.
    pub fn create(path: &Path, size: u64) -> std::io::Result<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(size)?;
        Ok(FileDevice {
            file,
            name: path.display().to_string(),
            size,
            read_only: false,
            space_limit: None,
        })
    }

    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    pub fn space_limit(mut self, limit: u64) -> Self {
        self.space_limit = Some(limit);
        self
    }

    fn err(
        &self,
        kind: BlockErrorKind,
        op: &'static str,
        offset: u64,
        length: u64,
        detail: String,
    ) -> BlockError {
        BlockError::new(kind, op, &self.name, offset, length, detail)
    }

    fn check(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<(), BlockError> {
        if write && self.read_only {
            return Err(self.err(
                BlockErrorKind::ReadOnly,
                op,
                offset,
                length,
                "read-only".into(),
            ));
        }
        match offset.checked_add(length) {
            Some(end) if end <= self.size => {
                if write && self.space_limit.is_some_and(|l| end > l) {
                    return Err(self.err(
                        BlockErrorKind::NoSpace,
                        op,
                        offset,
                        length,
                        "space limit".into(),
                    ));
                }
                Ok(())
            }
            _ => Err(self.err(
                BlockErrorKind::OutOfRange,
                op,
                offset,
                length,
                format!("size {}", self.size),
            )),
        }
    }

    fn io(&self, op: &'static str, offset: u64, length: u64, e: std::io::Error) -> BlockError {
        self.err(BlockErrorKind::Io, op, offset, length, e.to_string())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> std::io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        // SAFETY: plain syscall on a file descriptor owned by `self.file`; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn seek(&self, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an fd owned by `self.file`; the shared file position it moves is
        // never used (all data I/O is positional), so concurrent callers do not interfere.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    }
}

impl BlockDevice for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.check("read", offset, buf.len() as u64, false)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io("read", offset, buf.len() as u64, e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check("write", offset, buf.len() as u64, true)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io("write", offset, buf.len() as u64, e))
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(|e| self.io("flush", 0, 0, e))
    }
    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        self.check("discard", offset, length, true)?;
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
        .map_err(|e| self.io("discard", offset, length, e))
    }
    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check("write_zeroes", offset, length, true)?;
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.fallocate(mode, offset, length)
            .map_err(|e| self.io("write_zeroes", offset, length, e))
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        self.check("block_status", offset, length, false)?;
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        let io = |e| self.io("block_status", offset, length, e);
        while pos < end && out.len() < 1024 {
            let data = self
                .seek(pos, libc::SEEK_DATA)
                .map_err(io)?
                .unwrap_or(end)
                .min(end);
            if data > pos {
                out.push(Extent {
                    offset: pos,
                    length: data - pos,
                    hole: true,
                    zero: true,
                });
                pos = data;
                continue;
            }
            let hole = self
                .seek(pos, libc::SEEK_HOLE)
                .map_err(io)?
                .unwrap_or(end)
                .min(end)
                .max(pos + 1);
            out.push(Extent {
                offset: pos,
                length: hole - pos,
                hole: false,
                zero: false,
            });
            pos = hole;
        }
        Ok(out)
    }
}
