//! Where a virtio-net device's frames go. [`NetBackend`] is what the data
//! paths need of it: one frame (virtio-net header included) per `readv` /
//! `writev`, a pollable descriptor, and the TAP's receive offloads. The TAP
//! ([`super::Tap`]) is the backend of a VM; [`SeqPacketBackend`], a Unix
//! SOCK_SEQPACKET socket (which keeps frame boundaries like a TAP), lets
//! tests and the fuzzer drive the device with no TAP and no root.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::tap::{readv_fd, writev_fd};
use super::NetError;
use crate::virtio::iovec::{IoVecBuf, IoVecBufMut};

/// A frame-preserving, non-blocking host end of a virtio-net device.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame (header included); `WouldBlock` when there is none.
    fn readv(&self, buf: &mut IoVecBufMut<'_>) -> io::Result<usize>;
    /// Writes one frame (header included).
    fn writev(&self, buf: &IoVecBuf<'_>) -> io::Result<usize>;
    /// The offloads (`TUN_F_*`) the guest accepts on receive.
    fn set_offload(&self, flags: u32) -> Result<(), NetError>;
    /// A name for messages.
    fn name(&self) -> &str;
}

impl NetBackend for super::Tap {
    fn readv(&self, buf: &mut IoVecBufMut<'_>) -> io::Result<usize> {
        super::Tap::readv(self, buf)
    }
    fn writev(&self, buf: &IoVecBuf<'_>) -> io::Result<usize> {
        super::Tap::writev(self, buf)
    }
    fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        super::Tap::set_offload(self, flags)
    }
    fn name(&self) -> &str {
        super::Tap::name(self)
    }
}

/// One end of a non-blocking `socketpair(AF_UNIX, SOCK_SEQPACKET)`.
pub struct SeqPacketBackend {
    fd: OwnedFd,
}

impl SeqPacketBackend {
    /// A connected pair: give one end to the device, keep the other as the
    /// "wire" (each `send` is one frame to the guest, each `recv` one from it).
    pub fn pair() -> io::Result<(SeqPacketBackend, OwnedFd)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and ours.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SeqPacketBackend { fd: a }, b))
    }
}

impl AsRawFd for SeqPacketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for SeqPacketBackend {
    fn readv(&self, buf: &mut IoVecBufMut<'_>) -> io::Result<usize> {
        readv_fd(self.fd.as_raw_fd(), buf)
    }
    fn writev(&self, buf: &IoVecBuf<'_>) -> io::Result<usize> {
        writev_fd(self.fd.as_raw_fd(), buf)
    }
    fn set_offload(&self, _flags: u32) -> Result<(), NetError> {
        Ok(())
    }
    fn name(&self) -> &str {
        "seqpacket"
    }
}
