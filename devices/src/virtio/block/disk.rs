//! The image file behind a virtio-blk device: opening and locking it,
//! positional vectored I/O straight into guest memory, flush through a
//! [`Syncer`], and hole punching / zeroing for DISCARD and WRITE_ZEROES.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::BlockError;

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
    /// Open `path` and take a lock on it: exclusive for a writable disk,
    /// shared for a read-only one (several readers, never beside a writer).
    /// A lock held elsewhere is [`BlockError::InUse`].
    pub fn open(path: &Path, read_only: bool, syncer: Box<dyn Syncer>) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on an fd we own. The lock belongs to this open file
        // description and goes away when `file` is closed.
        let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if r < 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BlockError::InUse {
                    path: path.to_owned(),
                    mode: if read_only { " for writing" } else { "" },
                }
            } else {
                BlockError::Lock {
                    path: path.to_owned(),
                    source: err,
                }
            });
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

    /// Fill `iovs` from the image at `offset`. The iovecs must point at
    /// memory the caller keeps valid and writable for the call.
    pub fn read_vectored_at(&self, iovs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.rw_all(iovs, offset, false)
    }

    /// Write `iovs` to the image at `offset`.
    pub fn write_vectored_at(&self, iovs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.rw_all(iovs, offset, true)
    }

    fn rw_all(&self, mut iovs: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        while !iovs.is_empty() {
            let cnt = iovs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the iovecs describe memory the caller guarantees valid
            // for the call (guest memory slices checked by vm-memory); `cnt`
            // does not exceed the slice length.
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
            let mut n = r as usize;
            offset += n as u64;
            while let Some(first) = iovs.first_mut() {
                if n < first.iov_len {
                    // SAFETY: advancing within the same iovec, n < its length.
                    first.iov_base = unsafe { (first.iov_base as *mut u8).add(n) } as *mut _;
                    first.iov_len -= n;
                    break;
                }
                n -= first.iov_len;
                iovs = &mut iovs[1..];
            }
        }
        Ok(())
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
            let mut iov = [libc::iovec {
                iov_base: self.zeroes.as_mut_ptr() as *mut libc::c_void,
                iov_len: n,
            }];
            self.rw_all(&mut iov, offset, true)?;
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
