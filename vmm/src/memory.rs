//! Guest RAM: anonymous private memory, or — when a vhost-user device
//! must see it (`--fs`) — one memfd (MFD_CLOEXEC, sealed against growing
//! and shrinking) mapped shared, region by region at consecutive offsets,
//! so the backend can map the same pages from the descriptors the memory
//! table hands it.

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress};

use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// A sealed memfd of `size` bytes.
fn memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"b2p-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own descriptor, no memory passed.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Guest memory of `ranges`; shared (memfd) when `shared`.
pub fn create(ranges: &[(GuestAddress, usize)], mib: u64, shared: bool) -> Result<GuestMemoryMmap> {
    let mem_err = |source| Error::Memory { mib, source };
    if !shared {
        return GuestMemoryMmap::from_ranges(ranges).map_err(mem_err);
    }
    let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let file = Arc::new(memfd(total).map_err(|source| Error::Io {
        what: "memfd for guest memory",
        source,
    })?);
    let mut offset = 0u64;
    let with_files: Vec<_> = ranges
        .iter()
        .map(|&(addr, len)| {
            let r = (addr, len, Some(FileOffset::from_arc(file.clone(), offset)));
            offset += len as u64;
            r
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(mem_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn shared_memory_is_one_sealed_memfd() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)];
        let mem = create(&ranges, 3, true).unwrap();
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offsets, [0, 1 << 20]);
        let f = mem.iter().next().unwrap().file_offset().unwrap().file();
        assert_eq!(f.metadata().unwrap().len(), 3 << 20);
        // Sealed: it cannot shrink under the guest.
        assert!(f.set_len(1 << 20).is_err());
        // Guest writes land in the file (at the second region's offset).
        mem.write_obj(0xabcd_u16, GuestAddress(4 << 20)).unwrap();
        let mut b = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut b, 1 << 20).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0xabcd);
    }

    #[test]
    fn anonymous_memory_has_no_file() {
        let mem = create(&[(GuestAddress(0), 1 << 20)], 1, false).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }
}
