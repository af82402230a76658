//! Disk image locks that QEMU and Cloud Hypervisor see: open-file-description
//! byte-range locks (`fcntl(F_OFD_SETLK)`) on the bytes QEMU's
//! `block/file-posix.c` uses.
//!
//! QEMU describes what an open image does with one shared (read) lock per
//! permission bit: byte `100 + bit` for a permission it uses, byte `200 + bit`
//! for one it does not let others have. It then tests the opposite bytes
//! for locks held by anyone else: a permission it uses against `200 + bit`,
//! one it does not share against `100 + bit`. The bits are QEMU's
//! `BLK_PERM_*`: CONSISTENT_READ = 0, WRITE = 1 (WRITE_UNCHANGED = 2,
//! RESIZE = 3 are not used here).
//!
//! We take exactly what a QEMU virtio-blk drive takes (checked with
//! `/proc/locks` against QEMU 7.2): read-write uses CONSISTENT_READ and
//! WRITE (bytes 100, 101) and does not share WRITE (byte 201); read-only uses
//! CONSISTENT_READ (byte 100) and does not share WRITE (byte 201). So two
//! readers coexist, and a writer excludes every other writer and reader,
//! whether it is another b2p or a QEMU. The locks belong to the open file
//! description and go away when the file is closed.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + bit` = "I use permission bit".
pub const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + bit` = "I do not share bit".
pub const SHARED_BASE: i64 = 200;
/// `BLK_PERM_CONSISTENT_READ`'s bit number.
pub const PERM_CONSISTENT_READ: i64 = 0;
/// `BLK_PERM_WRITE`'s bit number.
pub const PERM_WRITE: i64 = 1;

/// The outcome of [`lock_image`].
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open file description holds a conflicting lock byte.
    #[error("another process holds a conflicting lock (byte {byte})")]
    Conflict { byte: i64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn flock(kind: libc::c_int, start: i64) -> libc::flock {
    // SAFETY: `struct flock` is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = 1;
    // l_pid must be 0 for OFD locks.
    fl
}

/// Takes a shared OFD lock on byte `start`.
fn take_shared(file: &File, start: i64) -> Result<(), LockError> {
    let fl = flock(libc::F_RDLCK, start);
    // SAFETY: F_OFD_SETLK reads one `struct flock`; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => LockError::Conflict { byte: start },
            _ => LockError::Io(e),
        });
    }
    Ok(())
}

/// Whether some other open file description holds a lock on byte `start`.
fn held_elsewhere(file: &File, start: i64) -> Result<bool, LockError> {
    let mut fl = flock(libc::F_WRLCK, start);
    // SAFETY: F_OFD_GETLK reads and writes one `struct flock`; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(LockError::Io(io::Error::last_os_error()));
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Lock `file` as QEMU locks a drive that is read-only or read-write.
pub fn lock_image(file: &File, read_only: bool) -> Result<(), LockError> {
    let used: &[i64] = if read_only {
        &[PERM_CONSISTENT_READ]
    } else {
        &[PERM_CONSISTENT_READ, PERM_WRITE]
    };
    let unshared: &[i64] = &[PERM_WRITE];
    for bit in used {
        take_shared(file, PERM_BASE + bit)?;
    }
    for bit in unshared {
        take_shared(file, SHARED_BASE + bit)?;
    }
    // Our own locks do not conflict with us (same open file description).
    for bit in used {
        if held_elsewhere(file, SHARED_BASE + bit)? {
            return Err(LockError::Conflict {
                byte: SHARED_BASE + bit,
            });
        }
    }
    for bit in unshared {
        if held_elsewhere(file, PERM_BASE + bit)? {
            return Err(LockError::Conflict {
                byte: PERM_BASE + bit,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path, rw: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(rw)
            .open(path)
            .unwrap()
    }

    #[test]
    fn readers_share_and_a_writer_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let r1 = open(&p, false);
        let r2 = open(&p, false);
        lock_image(&r1, true).unwrap();
        lock_image(&r2, true).unwrap();
        let w = open(&p, true);
        assert!(matches!(
            lock_image(&w, false),
            Err(LockError::Conflict { .. })
        ));
        drop((r1, r2, w));
        let w = open(&p, true);
        lock_image(&w, false).unwrap();
        for rw in [false, true] {
            let other = open(&p, rw);
            assert!(matches!(
                lock_image(&other, !rw),
                Err(LockError::Conflict { .. })
            ));
        }
        // The lock bytes QEMU reads: 100, 101 and 201 are held.
        let probe = open(&p, false);
        for byte in [100, 101, 201] {
            assert!(held_elsewhere(&probe, byte).unwrap(), "byte {byte}");
        }
        assert!(!held_elsewhere(&probe, 200).unwrap());
    }
}
