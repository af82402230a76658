//! Attaching to an existing TAP interface through `/dev/net/tun`.
//!
//! The interface must already exist (`ip tuntap add NAME mode tap`, made
//! persistent by whoever configures the host network): b2p never creates
//! one, so a typo is an error instead of a new, unconfigured interface.
//! Existence is checked in the calling thread's network namespace.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::{NetError, VNET_HDR_LEN};
use crate::virtio::iovec::{IoVecBuf, IoVecBufMut};

const IFNAMSIZ: usize = 16;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
// _IOW('T', 202, int) and friends.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// TUNSETOFFLOAD flags.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// An open TAP queue (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` with the flags member.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

impl Tap {
    /// Attach to the existing TAP `name` with virtio-net headers.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || name.contains(['/', ' ', '\0'])
            || name == "."
            || name == ".."
        {
            return Err(NetError::InvalidName(name.to_string()));
        }
        let cname = CString::new(name).map_err(|_| NetError::InvalidName(name.to_string()))?;
        // SAFETY: cname is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(NetError::NoSuchTap(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq
        // lays out (40 bytes); the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EINVAL) => NetError::NotATap(name.to_string()),
                Some(libc::EBUSY) => NetError::Busy(name.to_string()),
                _ => NetError::Ioctl {
                    name: name.to_string(),
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) };
        if r < 0 {
            return Err(tap.ioctl_err("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn ioctl_err(&self, op: &'static str) -> NetError {
        NetError::Ioctl {
            name: self.name.clone(),
            op,
            source: io::Error::last_os_error(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tell the TAP which offloads the guest accepts on receive.
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(self.ioctl_err("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// `readv` one frame (header included) into `buf`.
    pub fn readv(&self, buf: &mut IoVecBufMut<'_>) -> io::Result<usize> {
        readv_fd(self.file.as_raw_fd(), buf)
    }

    /// `writev` one frame (header included) from `buf`.
    pub fn writev(&self, buf: &IoVecBuf<'_>) -> io::Result<usize> {
        writev_fd(self.file.as_raw_fd(), buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `readv(2)` on `fd` into `buf`, again on EINTR.
pub(super) fn readv_fd(fd: RawFd, buf: &mut IoVecBufMut<'_>) -> io::Result<usize> {
    let iov = buf.as_raw();
    retry_eintr(|| {
        // SAFETY: an IoVecBufMut holds only memory valid for writes for its
        // lifetime (resolved guest memory or a borrowed host buffer).
        unsafe { libc::readv(fd, iov.as_ptr(), iov_count(iov)) }
    })
}

/// `writev(2)` on `fd` from `buf`, again on EINTR.
pub(super) fn writev_fd(fd: RawFd, buf: &IoVecBuf<'_>) -> io::Result<usize> {
    let iov = buf.as_raw();
    retry_eintr(|| {
        // SAFETY: an IoVecBuf holds only memory valid for reads for its
        // lifetime (resolved guest memory or a borrowed host buffer).
        unsafe { libc::writev(fd, iov.as_ptr(), iov_count(iov)) }
    })
}

/// The iovec count for readv/writev: at most IOV_MAX (1024) entries.
pub(super) fn iov_count(iov: &[libc::iovec]) -> libc::c_int {
    // At most 1024, which fits a c_int.
    iov.len().min(1024) as libc::c_int
}

/// Runs a syscall returning a byte count, again while it fails with EINTR.
pub(super) fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let r = call();
        if let Ok(n) = usize::try_from(r) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
