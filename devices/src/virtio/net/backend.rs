//! Where a virtio-net device's frames go. [`NetBackend`] is what the data
//! paths need of it: one frame (virtio-net header included) per `readv` /
//! `writev`, a pollable descriptor, the offloads it can honour (the device
//! offers those), the TAP's receive offloads, and for a stream backend the
//! bytes a short write left queued and whether the host end is still there.
//! The TAP ([`super::Tap`]) and passt ([`super::passt::PasstBackend`]) are
//! the backends of a VM; [`SeqPacketBackend`], a Unix SOCK_SEQPACKET socket
//! (which keeps frame boundaries like a TAP), lets tests and the fuzzer
//! drive the device with no TAP and no root.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::device::features;
use super::tap::{readv_fd, writev_fd};
use super::NetError;
use crate::virtio::iovec::{IoVecBuf, IoVecBufMut};

/// A frame-preserving, non-blocking host end of a virtio-net device.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame (header included); `WouldBlock` when there is none.
    /// After an error, [`NetBackend::link_up`] says whether it was fatal.
    fn readv(&self, buf: &mut IoVecBufMut<'_>) -> io::Result<usize>;
    /// Writes one frame (header included), or takes it to write later
    /// ([`NetBackend::tx_pending`]); `WouldBlock` when it can take nothing
    /// now (the device retries once the descriptor is writable).
    fn writev(&self, buf: &IoVecBuf<'_>) -> io::Result<usize>;
    /// The offloads (`TUN_F_*`) the guest accepts on receive.
    fn set_offload(&self, flags: u32) -> Result<(), NetError>;
    /// A name for messages.
    fn name(&self) -> &str;
    /// Feature bits the backend can honour beyond what every virtio-net
    /// device offers (VERSION_1, MAC, MRG_RXBUF, STATUS): the TAP's
    /// checksum and segmentation offloads; none for plain frames.
    fn offload_features(&self) -> u64 {
        0
    }
    /// Whether frames `writev` took are still partly unwritten: the device
    /// then polls for EPOLLOUT and calls [`NetBackend::flush`].
    fn tx_pending(&self) -> bool {
        false
    }
    /// Writes what [`NetBackend::tx_pending`] says is queued (as much as
    /// the descriptor takes).
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    /// False once the host end is gone for good (passt exited): the device
    /// reports the link down and stops polling the backend.
    fn link_up(&self) -> bool {
        true
    }
}

/// The TAP's offloads: checksums and TSO4/6, both ways.
pub const TAP_OFFLOADS: u64 = features::CSUM
    | features::GUEST_CSUM
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::HOST_TSO4
    | features::HOST_TSO6;

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
    fn offload_features(&self) -> u64 {
        TAP_OFFLOADS
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
    /// It stands in for a TAP: the same offloads.
    fn offload_features(&self) -> u64 {
        TAP_OFFLOADS
    }
}
