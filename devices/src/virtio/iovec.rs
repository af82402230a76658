//! Iovecs that safe code may hand to the kernel.
//!
//! A `libc::iovec` is a raw pointer and a length: a safe function that
//! passes caller-made iovecs to `readv`/`preadv` would let safe code make the
//! kernel write through a dangling pointer. So the I/O paths take these
//! types instead (Firecracker's `IoVecBuffer` / `IoVecBufferMut` pattern):
//! [`IoVecBufMut`] (memory the kernel may write into) and [`IoVecBuf`]
//! (memory it may read from) can only be built from guest memory resolved
//! through vm-memory (`&'a GuestMemoryMmap`, so the mapping outlives them)
//! or from a borrowed host slice; the borrow lasts as long as the buffer.
//! Each buffer also has a byte cap, fixed when it is made: a descriptor
//! chain can describe far more than any request may move (128 descriptors
//! of up to 4 GiB each), and a push past the cap is an error.

use std::marker::PhantomData;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, Permissions, VolatileSlice};

use crate::GuestMemoryMmap;

/// Why a range could not be added to a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoVecError {
    #[error("guest range {addr:#x} + {len} bytes is outside guest memory")]
    OutOfBounds { addr: u64, len: u64 },
    #[error("buffer longer than {max} bytes")]
    TooLong { max: u64 },
}

/// An empty iovec allocation, kept between requests so the hot paths do
/// not allocate. It holds no pointers, so it may move between threads.
#[derive(Debug, Default)]
pub struct IoVecStorage(Vec<libc::iovec>);

// SAFETY: the vector is always empty (see `IoVecBuf::into_storage`): no
// pointer is ever sent anywhere with it, only the allocation.
unsafe impl Send for IoVecStorage {}

impl IoVecStorage {
    /// Room for `n` iovecs.
    pub fn with_capacity(n: usize) -> Self {
        IoVecStorage(Vec::with_capacity(n))
    }
}

/// The common part: the iovecs, where the unconsumed ones start, the bytes
/// they cover, and the cap.
#[derive(Debug)]
struct Raw {
    iovs: Vec<libc::iovec>,
    start: usize,
    len: u64,
    max: u64,
}

impl Raw {
    fn new(storage: IoVecStorage, max: u64) -> Raw {
        let mut iovs = storage.0;
        iovs.clear();
        Raw {
            iovs,
            start: 0,
            len: 0,
            max,
        }
    }

    fn reserve(&self, n: u64) -> Result<(), IoVecError> {
        match self.len.checked_add(n) {
            Some(total) if total <= self.max => Ok(()),
            _ => Err(IoVecError::TooLong { max: self.max }),
        }
    }

    fn push(&mut self, ptr: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.iovs.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        });
        self.len += len as u64;
    }

    /// Resolves `[addr, addr + len)` through vm-memory and appends its host
    /// slices (a range may span several regions).
    fn push_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        perm: Permissions,
    ) -> Result<(), IoVecError> {
        let oob = IoVecError::OutOfBounds {
            addr: addr.0,
            len: len as u64,
        };
        self.reserve(len as u64)?;
        if len == 0 {
            return Ok(());
        }
        // Checked up front so an out-of-range tail is an error, not a short list.
        if !GuestMemoryBackend::check_range(mem, addr, len) {
            return Err(oob);
        }
        let before = (self.iovs.len(), self.len);
        let slices = GuestMemory::get_slices(mem, addr, len, perm).map_err(|_| oob)?;
        for s in slices {
            let Ok(s) = s else {
                self.iovs.truncate(before.0);
                self.len = before.1;
                return Err(oob);
            };
            self.push_volatile(&s);
        }
        Ok(())
    }

    fn push_volatile(&mut self, s: &VolatileSlice<'_>) {
        self.push(s.ptr_guard_mut().as_ptr(), s.len());
    }

    fn as_raw(&self) -> &[libc::iovec] {
        &self.iovs[self.start..]
    }

    fn advance(&mut self, mut n: usize) {
        n = n.min(self.len as usize);
        self.len -= n as u64;
        while n > 0 {
            let Some(first) = self.iovs.get_mut(self.start) else {
                return;
            };
            if n < first.iov_len {
                // SAFETY: moves within the same iovec (n < its length), so
                // the pointer stays inside the memory it was built from.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                return;
            }
            n -= first.iov_len;
            self.start += 1;
        }
    }

    fn into_storage(mut self) -> IoVecStorage {
        self.iovs.clear();
        IoVecStorage(self.iovs)
    }
}

macro_rules! common_methods {
    () => {
        /// An empty buffer that will hold at most `max_len` bytes.
        pub fn new(max_len: u64) -> Self {
            Self::with_storage(IoVecStorage::default(), max_len)
        }

        /// Like [`new`](Self::new), reusing the allocation of an earlier buffer.
        pub fn with_storage(storage: IoVecStorage, max_len: u64) -> Self {
            Self {
                raw: Raw::new(storage, max_len),
                _borrow: PhantomData,
            }
        }

        /// Bytes not yet consumed.
        pub fn len(&self) -> u64 {
            self.raw.len
        }

        pub fn is_empty(&self) -> bool {
            self.raw.len == 0
        }

        /// The unconsumed iovecs, for a vectored syscall. (The pointers are
        /// valid for this buffer's lifetime; using them is the caller's
        /// `unsafe`.)
        pub fn as_raw(&self) -> &[libc::iovec] {
            self.raw.as_raw()
        }

        /// Drops the first `n` bytes (after a short transfer).
        pub fn advance(&mut self, n: usize) {
            self.raw.advance(n)
        }

        /// Gives back the allocation, empty.
        pub fn into_storage(self) -> IoVecStorage {
            self.raw.into_storage()
        }
    };
}

/// Memory the kernel may write into (the destination of `readv`, `preadv`),
/// valid and exclusively lent for `'a`.
#[derive(Debug)]
pub struct IoVecBufMut<'a> {
    raw: Raw,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> IoVecBufMut<'a> {
    common_methods!();

    /// Appends the guest range `[addr, addr + len)`.
    pub fn push_guest(
        &mut self,
        mem: &'a GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), IoVecError> {
        self.raw.push_guest(mem, addr, len, Permissions::Write)
    }

    /// Appends a vm-memory slice (valid for `'a` by its own contract).
    pub fn push_volatile(&mut self, s: VolatileSlice<'a>) -> Result<(), IoVecError> {
        self.raw.reserve(s.len() as u64)?;
        self.raw.push_volatile(&s);
        Ok(())
    }

    /// Appends a host buffer, borrowed for `'a`.
    pub fn push_slice(&mut self, buf: &'a mut [u8]) -> Result<(), IoVecError> {
        self.raw.reserve(buf.len() as u64)?;
        self.raw.push(buf.as_mut_ptr(), buf.len());
        Ok(())
    }
}

/// Memory the kernel may read from (the source of `writev`, `pwritev`),
/// valid for `'a`.
#[derive(Debug)]
pub struct IoVecBuf<'a> {
    raw: Raw,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> IoVecBuf<'a> {
    common_methods!();

    /// Appends the guest range `[addr, addr + len)`.
    pub fn push_guest(
        &mut self,
        mem: &'a GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), IoVecError> {
        self.raw.push_guest(mem, addr, len, Permissions::Read)
    }

    /// Appends a vm-memory slice (valid for `'a` by its own contract).
    pub fn push_volatile(&mut self, s: VolatileSlice<'a>) -> Result<(), IoVecError> {
        self.raw.reserve(s.len() as u64)?;
        self.raw.push_volatile(&s);
        Ok(())
    }

    /// Appends a host buffer, borrowed for `'a`.
    pub fn push_slice(&mut self, buf: &'a [u8]) -> Result<(), IoVecError> {
        self.raw.reserve(buf.len() as u64)?;
        // The kernel only reads through it (writev/pwritev).
        self.raw.push(buf.as_ptr().cast_mut(), buf.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::guest_memory;

    #[test]
    fn guest_ranges_are_checked_and_capped() {
        let mem = guest_memory(1 << 20);
        let mut b = IoVecBufMut::new(8192);
        b.push_guest(&mem, GuestAddress(0x1000), 4096).unwrap();
        assert_eq!(
            b.push_guest(&mem, GuestAddress((1 << 20) - 10), 20),
            Err(IoVecError::OutOfBounds {
                addr: (1 << 20) - 10,
                len: 20
            })
        );
        assert_eq!(
            b.push_guest(&mem, GuestAddress(0), 4097),
            Err(IoVecError::TooLong { max: 8192 })
        );
        assert_eq!(b.len(), 4096);
        assert_eq!(b.as_raw().len(), 1);
        b.push_guest(&mem, GuestAddress(0x3000), 4096).unwrap();
        b.advance(4096 + 100);
        assert_eq!(b.len(), 4096 - 100);
        assert_eq!(b.as_raw().len(), 1);
        assert_eq!(b.as_raw()[0].iov_len, 4096 - 100);
        let s = b.into_storage();
        let b = IoVecBuf::with_storage(s, 1);
        assert!(b.is_empty() && b.as_raw().is_empty());
    }

    #[test]
    fn ranges_spanning_regions_become_several_iovecs() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let mut b = IoVecBuf::new(u64::MAX);
        b.push_guest(&mem, GuestAddress(0xf000), 0x2000).unwrap();
        assert_eq!(b.as_raw().len(), 2);
        assert_eq!(b.len(), 0x2000);
    }
}
