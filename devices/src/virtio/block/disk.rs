//! The image file behind a virtio-blk device: opening and locking it
//! ([`super::lock`], the locks QEMU takes), positional vectored I/O straight
//! into guest memory through [`IoVecBuf`]/[`IoVecBufMut`], flush through a
//! [`Syncer`], and hole punching / zeroing for DISCARD and WRITE_ZEROES.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::lock::{lock_image, LockError};
use super::BlockError;
use crate::virtio::iovec::{IoVecBuf, IoVecBufMut};

/// What `rw_all` needs of either buffer type.
trait Iovs {
    fn raw(&self) -> &[libc::iovec];
    fn consume(&mut self, n: usize);
}

impl Iovs for IoVecBuf<'_> {
    fn raw(&self) -> &[libc::iovec] {
        self.as_raw()
    }
    fn consume(&mut self, n: usize) {
        self.advance(n)
    }
}

impl Iovs for IoVecBufMut<'_> {
    fn raw(&self) -> &[libc::iovec] {
        self.as_raw()
    }
    fn consume(&mut self, n: usize) {
        self.advance(n)
    }
}

/// How the disk makes written data durable. The default is [`FdataSync`];
/// tests plug in an observing implementation to check FLUSH ordering.
pub trait Syncer: Send {
    /// Make every write issued before this call durable.
    fn sync(&mut self, file: &File) -> io::Result<()>;
}

/// `fdatasync(2)` on the image.
#[derive(Debug, Default, Clone, Copy)]
pub struct FdataSync;

impl Syncer for FdataSync {
    fn sync(&mut self, file: &File) -> io::Result<()> {
        // SAFETY: fdatasync on an fd we own; no memory is passed.
        let r = unsafe { libc::fdatasync(file.as_raw_fd()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// An open, locked raw image.
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    syncer: Box<dyn Syncer>,
    zeroes: Vec<u8>,
}

impl std::fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl DiskImage {
    /// Open `path` and lock it as QEMU would (see [`super::lock`]): a
    /// writable disk excludes every other user, a read-only one shares with
    /// other readers only. A lock held elsewhere, by another b2p or a QEMU,
    /// is [`BlockError::InUse`].
    pub fn open(path: &Path, read_only: bool, syncer: Box<dyn Syncer>) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        match lock_image(&file, read_only) {
            Ok(()) => {}
            Err(LockError::Conflict { .. }) => {
                return Err(BlockError::InUse {
                    path: path.to_owned(),
                    mode: if read_only { " for writing" } else { "" },
                })
            }
            Err(LockError::Io(source)) => {
                return Err(BlockError::Lock {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        let mut f = &file;
        let size = f
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        Ok(DiskImage {
            file,
            path: path.to_owned(),
            size,
            read_only,
            syncer,
            zeroes: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in whole 512-byte sectors (a trailing partial sector is not exposed).
    pub fn sectors(&self) -> u64 {
        self.size >> super::SECTOR_SHIFT
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Replace the flush implementation.
    pub fn set_syncer(&mut self, syncer: Box<dyn Syncer>) {
        self.syncer = syncer;
    }

    /// Whether `[offset, offset + len)` lies inside the exposed sectors.
    pub fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.sectors() << super::SECTOR_SHIFT)
    }

    /// Fill `buf` from the image at `offset` (all of it, or an error).
    pub fn read_vectored_at(&self, buf: &mut IoVecBufMut<'_>, offset: u64) -> io::Result<()> {
        self.rw_all(buf, offset, false)
    }

    /// Write all of `buf` to the image at `offset`.
    pub fn write_vectored_at(&self, buf: &mut IoVecBuf<'_>, offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.rw_all(buf, offset, true)
    }

    fn rw_all(&self, buf: &mut dyn Iovs, mut offset: u64, write: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        loop {
            let iovs = buf.raw();
            if iovs.is_empty() {
                return Ok(());
            }
            let cnt = iovs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the iovecs come from an IoVecBuf/IoVecBufMut, which
            // only holds memory valid for its lifetime (resolved guest
            // memory or a borrowed host slice); `cnt` does not exceed them.
            let r = unsafe {
                if write {
                    libc::pwritev(fd, iovs.as_ptr(), cnt, off)
                } else {
                    libc::preadv(fd, iovs.as_ptr(), cnt, off)
                }
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                // The file shrank under us.
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            offset += r as u64;
            buf.consume(r as usize);
        }
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.syncer.sync(&self.file)
    }

    /// DISCARD: deallocate the range; it reads back as zeros afterwards.
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// WRITE_ZEROES: zero the range, deallocating it when `unmap` allows.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes_by_hand(offset, len)
            }
            r => r,
        }
    }

    fn write_zeroes_by_hand(&mut self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        if self.zeroes.is_empty() {
            self.zeroes = vec![0u8; CHUNK];
        }
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK as u64) as usize;
            let mut buf = IoVecBuf::new(CHUNK as u64);
            buf.push_slice(&self.zeroes[..n])
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            self.rw_all(&mut buf, offset, true)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&mut self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
