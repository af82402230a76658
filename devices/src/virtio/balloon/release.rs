//! Giving a range of guest memory back to the host: the range is checked
//! against guest memory (page-aligned, non-empty, inside one region), then
//! released the way its region's mapping needs ([`Backing`]). A range that
//! fails a check touches no host memory.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::PAGE_SIZE;
use crate::GuestMemoryMmap;

/// Why a guest range was not released.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error("empty range")]
    Empty,
    #[error("not 4 KiB-aligned")]
    Unaligned,
    #[error("outside guest memory")]
    Outside,
    #[error("crosses a guest memory region boundary")]
    CrossesRegion,
    #[error("madvise: {0}")]
    Madvise(std::io::Error),
}

/// How a guest memory region is mapped, which decides how its pages are
/// given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A private mapping (anonymous memory, the usual case):
    /// MADV_DONTNEED frees the pages; the next touch gets zeroed ones.
    Private,
    /// A shared mapping (a memfd shared with a vhost-user backend, or
    /// shared anonymous memory): MADV_DONTNEED would only unmap the pages
    /// from this process, MADV_REMOVE frees them in the file (as a punched
    /// hole, without the fallocate the event loop may not call).
    Shared,
}

impl Backing {
    /// The backing of a region, from its mmap flags.
    pub fn of(region: &vm_memory::GuestRegionMmap<()>) -> Self {
        if region.flags() & libc::MAP_SHARED != 0 {
            Backing::Shared
        } else {
            Backing::Private
        }
    }

    fn advice(self) -> libc::c_int {
        match self {
            Backing::Private => libc::MADV_DONTNEED,
            Backing::Shared => libc::MADV_REMOVE,
        }
    }

    /// Release `len` bytes of this process's memory at `host`.
    ///
    /// # Safety
    /// `host..host + len` must lie inside one guest memory mapping of this
    /// backing: its contents are discarded.
    unsafe fn release(self, host: *mut u8, len: usize) -> std::io::Result<()> {
        // SAFETY: the caller guarantees the range is guest memory; madvise
        // changes what the pages hold (zeros next), never the mapping.
        let r = unsafe { libc::madvise(host as *mut libc::c_void, len, self.advice()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The host address of guest range `addr..addr + len` and its region's
/// backing, when the range may be released.
pub fn check_range(
    mem: &GuestMemoryMmap,
    addr: u64,
    len: u64,
) -> Result<(*mut u8, usize, Backing), RangeError> {
    if len == 0 {
        return Err(RangeError::Empty);
    }
    if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(RangeError::Unaligned);
    }
    let end = addr.checked_add(len).ok_or(RangeError::Outside)?;
    let region = mem
        .find_region(GuestAddress(addr))
        .ok_or(RangeError::Outside)?;
    let start = region.start_addr().0;
    let region_end = start + region.len();
    if end > region_end {
        return Err(if mem.find_region(GuestAddress(region_end)).is_some() {
            RangeError::CrossesRegion
        } else {
            RangeError::Outside
        });
    }
    let host = region
        .get_host_address(MemoryRegionAddress(addr - start))
        .map_err(|_| RangeError::Outside)?;
    let len = usize::try_from(len).map_err(|_| RangeError::Outside)?;
    Ok((host, len, Backing::of(region)))
}

/// Give guest range `addr..addr + len` back to the host; returns the bytes
/// released.
pub fn release_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<u64, RangeError> {
    let (host, n, backing) = check_range(mem, addr, len)?;
    // SAFETY: check_range found host..host + n inside one region of `mem`.
    unsafe { backing.release(host, n) }.map_err(RangeError::Madvise)?;
    Ok(len)
}
