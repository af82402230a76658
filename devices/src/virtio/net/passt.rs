//! The passt backend: virtio-net frames over passt's QEMU stream protocol.
//!
//! passt (and QEMU's `-netdev stream`) carry Ethernet frames over a
//! SOCK_STREAM Unix socket, each preceded by its length as a 32-bit
//! big-endian number, with no virtio-net header on the wire. A stream keeps
//! no frame boundaries: a frame may arrive split over many reads and a
//! write may take only part of one. This module owns that framing:
//!
//! - [`FrameReader`] reassembles frames from whatever reads return; a
//!   length over [`MAX_PASST_FRAME`] is a protocol error (the peer is not
//!   speaking this protocol, or is broken) and ends the connection.
//! - [`FrameWriter`] queues what a short write left over and sends it when
//!   the socket is writable again (the device polls for EPOLLOUT while
//!   [`NetBackend::tx_pending`] says so); past [`TX_QUEUE_CAP`] queued
//!   bytes it refuses new frames, which holds the guest's TX queue back.
//!   Small frames are gathered there too and sent as one batch (up to
//!   [`BATCH_BYTES`], or on the event loop's next turn).
//! - [`PasstBackend`] is the [`NetBackend`]: on receive it puts a zeroed
//!   `virtio_net_hdr_v1` in front of each frame, on transmit it drops the
//!   guest's header. It offers no checksum or segmentation offloads (passt
//!   takes and gives plain frames with valid checksums). Once the peer has
//!   hung up (or broke the protocol) the link is down for good:
//!   [`NetBackend::link_up`] turns false and the socket is no longer polled.

use std::io;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use super::backend::NetBackend;
use super::{NetError, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::error_limited;
use crate::virtio::iovec::{IoVecBuf, IoVecBufMut};

/// The longest frame accepted either way (a 64 KiB packet, the Ethernet
/// header and a VLAN tag; passt's own limit is 65520 + 14).
pub const MAX_PASST_FRAME: usize = MAX_FRAME_LEN - VNET_HDR_LEN;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of not-yet-sent frames the writer holds before it refuses more.
pub const TX_QUEUE_CAP: usize = 256 << 10;
/// Shortest frame passed on (an Ethernet header); shorter ones are dropped.
const MIN_FRAME: usize = 14;
/// TX frames up to this size (with their prefix) are gathered and sent
/// together: one `sendmsg` per batch instead of one per frame.
const COALESCE_MAX: usize = 4096;
/// A gathered batch is sent once it reaches this size; what is left when
/// the guest's TX queue is empty goes out on the event loop's next turn
/// (the device polls for EPOLLOUT while [`NetBackend::tx_pending`]).
const BATCH_BYTES: usize = 64 << 10;
/// Size of the receive buffer: several frames per read when they are small,
/// always room for one whole frame.
const RX_BUF_LEN: usize = 4 * (LEN_PREFIX + MAX_PASST_FRAME);

/// A broken stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("frame length {len} is over the limit of {MAX_PASST_FRAME} bytes")]
    TooLong { len: u32 },
}

/// Reassembles length-prefixed frames from a byte stream.
pub struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &(self.end - self.start))
            .finish()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader {
            buf: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The next whole frame already received, if any. Frames shorter than
    /// an Ethernet header are skipped (counted in `runts`).
    pub fn next_frame(&mut self, runts: &mut u64) -> Result<Option<&[u8]>, FramingError> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let Some(prefix) = avail.get(..LEN_PREFIX) else {
                return Ok(None);
            };
            let mut be = [0u8; LEN_PREFIX];
            be.copy_from_slice(prefix);
            let len32 = u32::from_be_bytes(be);
            let len = len32 as usize;
            if len > MAX_PASST_FRAME {
                return Err(FramingError::TooLong { len: len32 });
            }
            if avail.len() < LEN_PREFIX + len {
                return Ok(None);
            }
            let begin = self.start + LEN_PREFIX;
            self.start = begin + len;
            if len < MIN_FRAME {
                *runts += 1;
                continue;
            }
            return Ok(Some(&self.buf[begin..begin + len]));
        }
    }

    /// Reads once from `read` into the free space (moving what is buffered
    /// to the front first). Returns what `read` returned: `Ok(0)` is the end
    /// of the stream.
    pub fn fill(&mut self, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.buf.len() - self.end < LEN_PREFIX + MAX_PASST_FRAME {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = read(&mut self.buf[self.end..])?;
        self.end += n.min(self.buf.len() - self.end);
        Ok(n)
    }
}

/// Queues the tail of frames a short write left unsent.
#[derive(Debug, Default)]
pub struct FrameWriter {
    pending: Vec<u8>,
    sent: usize,
}

impl FrameWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes accepted and not yet written.
    pub fn pending(&self) -> usize {
        self.pending.len() - self.sent
    }

    /// Whether a new frame may be taken.
    pub fn has_room(&self) -> bool {
        self.pending() < TX_QUEUE_CAP
    }

    /// Writes what is queued. `Ok(())` once it is all written or the
    /// socket is full (`pending() > 0` then); errors are the socket's.
    pub fn flush(
        &mut self,
        write: &mut impl FnMut(&[&[u8]]) -> io::Result<usize>,
    ) -> io::Result<()> {
        while self.pending() > 0 {
            match write(&[&self.pending[self.sent..]]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n.min(self.pending()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.pending() == 0 {
            self.pending.clear();
            self.sent = 0;
        } else if self.sent > TX_QUEUE_CAP {
            self.pending.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }

    /// Queues `prefix` then the memory `iovs` describe, from byte `skip` of
    /// that whole on (what a short write left).
    ///
    /// # Safety
    ///
    /// Each iovec must describe memory valid for reads of its length.
    unsafe fn queue_iovecs(&mut self, prefix: &[u8], iovs: &[libc::iovec], mut skip: usize) {
        if skip < prefix.len() {
            self.pending.extend_from_slice(&prefix[skip..]);
            skip = 0;
        } else {
            skip -= prefix.len();
        }
        for iov in iovs {
            if skip >= iov.iov_len {
                skip -= iov.iov_len;
                continue;
            }
            let n = iov.iov_len - skip;
            self.pending.reserve(n);
            let len = self.pending.len();
            // SAFETY: the source is readable (the caller's contract) and
            // `skip < iov_len` keeps it inside the iovec; `reserve` made
            // room for `n` bytes past `len`, which the copy initialises.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iov.iov_base.cast::<u8>().add(skip),
                    self.pending.as_mut_ptr().add(len),
                    n,
                );
                self.pending.set_len(len + n);
            }
            skip = 0;
        }
    }

    /// Sends one frame made of `parts` (its length prefix first), directly
    /// when nothing is queued, and queues whatever the socket did not
    /// take. `WouldBlock` (nothing taken) when the queue is full.
    pub fn send(
        &mut self,
        parts: &[&[u8]],
        write: &mut impl FnMut(&[&[u8]]) -> io::Result<usize>,
    ) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(total).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let prefix = len.to_be_bytes();
        if self.pending() > 0 {
            self.flush(write)?;
            if !self.has_room() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let mut written = 0;
        if self.pending() == 0 {
            let mut iov: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
            iov.push(&prefix);
            iov.extend_from_slice(parts);
            written = match write(&iov) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
        }
        // Queue the rest: the part of the prefix and of each part not written.
        let mut skip = written;
        for p in std::iter::once(&prefix[..]).chain(parts.iter().copied()) {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            self.pending.extend_from_slice(&p[skip..]);
            skip = 0;
        }
        Ok(())
    }
}

/// `sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT)` of `parts` on `fd` (no SIGPIPE
/// when the peer is gone: EPIPE instead), again on EINTR.
pub fn send_parts(fd: RawFd, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: the iovecs describe `parts`, readable for the whole call.
    unsafe { send_iovecs(fd, &iov) }
}

/// [`send_parts`] on raw iovecs (at most IOV_MAX of them are sent).
///
/// # Safety
///
/// Each iovec must describe memory valid for reads of its length for the
/// duration of the call.
unsafe fn send_iovecs(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid; only the iovec array is filled in,
    // and the kernel only reads through it.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len().min(1024);
    loop {
        // SAFETY: the iovecs are readable (the caller's contract).
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if let Ok(n) = usize::try_from(r) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `read(2)` on `fd`, again on EINTR.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if let Ok(n) = usize::try_from(r) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

struct State {
    reader: FrameReader,
    writer: FrameWriter,
    /// The peer is gone (or broke the protocol): nothing more either way.
    down: bool,
    runts: u64,
}

/// A virtio-net host end on a connected passt socket (SOCK_STREAM).
pub struct PasstBackend {
    fd: OwnedFd,
    name: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for PasstBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasstBackend")
            .field("fd", &self.fd)
            .field("name", &self.name)
            .finish()
    }
}

impl PasstBackend {
    /// A backend on `fd`, a connected SOCK_STREAM socket to passt (made
    /// non-blocking here); `name` is for messages.
    pub fn new(fd: OwnedFd, name: impl Into<String>) -> io::Result<Self> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(PasstBackend {
            fd,
            name: name.into(),
            state: Mutex::new(State {
                reader: FrameReader::new(),
                writer: FrameWriter::new(),
                down: false,
                runts: 0,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frames shorter than an Ethernet header that passt sent (dropped).
    pub fn runts(&self) -> u64 {
        self.state().runts
    }

    fn hang_up(&self, st: &mut State, why: &dyn std::fmt::Display) {
        if !st.down {
            st.down = true;
            error_limited!("virtio-net: passt {}: {why}; link down", self.name);
            // SAFETY: shutdown on a descriptor we own.
            unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    fn gone() -> io::Error {
        io::Error::new(io::ErrorKind::NotConnected, "passt is gone")
    }
}

impl AsRawFd for PasstBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The iovecs of a TX buffer's frame: the buffer's, less the first `skip`
/// bytes (the virtio-net header). Pointer arithmetic only: guest memory,
/// which the guest may change at any time, is never referenced from Rust;
/// it is handed to the kernel or copied.
fn frame_iovecs(buf: &IoVecBuf<'_>, mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(buf.as_raw().len() + 1);
    for iov in buf.as_raw() {
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // `skip < iov_len`: still inside the same iovec.
            iov_base: iov.iov_base.cast::<u8>().wrapping_add(skip).cast(),
            iov_len: iov.iov_len - skip,
        });
        skip = 0;
    }
    out
}

impl NetBackend for PasstBackend {
    /// One frame with a zeroed virtio-net header in front; `WouldBlock`
    /// when no whole frame has arrived, `NotConnected` once passt is gone.
    fn readv(&self, buf: &mut IoVecBufMut<'_>) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let mut guard = self.state();
        let st = &mut *guard;
        loop {
            if st.down {
                return Err(Self::gone());
            }
            match st.reader.next_frame(&mut st.runts) {
                Ok(Some(frame)) => {
                    let hdr = [0u8; VNET_HDR_LEN];
                    let n = copy_into(buf, 0, &hdr);
                    if n < VNET_HDR_LEN {
                        return Ok(n);
                    }
                    return Ok(n + copy_into(buf, VNET_HDR_LEN, frame));
                }
                Ok(None) => {}
                Err(e) => {
                    self.hang_up(st, &e);
                    return Err(Self::gone());
                }
            }
            match st.reader.fill(|b| read_fd(fd, b)) {
                Ok(0) => {
                    self.hang_up(st, &"closed the connection");
                    return Err(Self::gone());
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) => {
                    self.hang_up(st, &e);
                    return Err(Self::gone());
                }
            }
        }
    }

    /// Takes one frame (header included, dropped here), or `WouldBlock`
    /// with nothing taken when the queue of unsent bytes is full.
    fn writev(&self, buf: &IoVecBuf<'_>) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let mut st = self.state();
        if st.down {
            return Err(Self::gone());
        }
        let total = buf.len() as usize;
        if total < VNET_HDR_LEN {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let frame = frame_iovecs(buf, VNET_HDR_LEN);
        let prefix = ((total - VNET_HDR_LEN) as u32).to_be_bytes();
        let mut write = |p: &[&[u8]]| send_parts(fd, p);
        let wire = LEN_PREFIX + total - VNET_HDR_LEN;
        if wire <= COALESCE_MAX && st.writer.pending() + wire <= BATCH_BYTES {
            // SAFETY: `prefix` is ours; the frame's iovecs come from `buf`,
            // readable for its lifetime, which spans this call.
            unsafe { st.writer.queue_iovecs(&prefix, &frame, 0) };
            if st.writer.pending() + COALESCE_MAX > BATCH_BYTES {
                if let Err(e) = st.writer.flush(&mut write) {
                    self.hang_up(&mut st, &e);
                    return Err(Self::gone());
                }
            }
            return Ok(total);
        }
        if st.writer.pending() > 0 {
            // What earlier frames left goes first; a full queue takes nothing.
            if let Err(e) = st.writer.flush(&mut write) {
                self.hang_up(&mut st, &e);
                return Err(Self::gone());
            }
            if !st.writer.has_room() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let mut written = 0;
        if st.writer.pending() == 0 {
            let mut iov = Vec::with_capacity(frame.len() + 1);
            iov.push(libc::iovec {
                iov_base: prefix.as_ptr() as *mut libc::c_void,
                iov_len: prefix.len(),
            });
            iov.extend_from_slice(&frame);
            // SAFETY: `prefix` is ours; the frame's iovecs come from `buf`,
            // readable for its lifetime, which spans this call.
            written = match unsafe { send_iovecs(fd, &iov) } {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    self.hang_up(&mut st, &e);
                    return Err(Self::gone());
                }
            };
        }
        if written < prefix.len() + total - VNET_HDR_LEN {
            // SAFETY: as above.
            unsafe { st.writer.queue_iovecs(&prefix, &frame, written) };
        }
        Ok(total)
    }

    fn set_offload(&self, _flags: u32) -> Result<(), NetError> {
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
    fn tx_pending(&self) -> bool {
        let st = self.state();
        !st.down && st.writer.pending() > 0
    }

    fn flush(&self) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        let mut st = self.state();
        if st.down {
            return Err(Self::gone());
        }
        let mut write = |p: &[&[u8]]| send_parts(fd, p);
        match st.writer.flush(&mut write) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.hang_up(&mut st, &e);
                Err(Self::gone())
            }
        }
    }

    fn link_up(&self) -> bool {
        !self.state().down
    }
}

/// Copies `data` into `buf`'s memory starting `skip` bytes in; returns
/// the bytes copied.
fn copy_into(buf: &IoVecBufMut<'_>, mut skip: usize, mut data: &[u8]) -> usize {
    let mut done = 0;
    for iov in buf.as_raw() {
        if data.is_empty() {
            break;
        }
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        let room = iov.iov_len - skip;
        let n = room.min(data.len());
        // SAFETY: an IoVecBufMut's iovecs are valid for writes for its
        // lifetime; `data` is the reader's own buffer, which no iovec covers;
        // `skip < iov_len` keeps the pointer inside the iovec.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), iov.iov_base.cast::<u8>().add(skip), n)
        };
        skip = 0;
        data = &data[n..];
        done += n;
    }
    done
}

#[cfg(test)]
mod codec_tests {
    use super::*;
    use std::os::unix::io::FromRawFd;

    fn encode(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    fn frame_of(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Feeds `stream` to a reader in the given chunk sizes and collects the frames.
    fn decode_chunks(stream: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, FramingError> {
        let mut r = FrameReader::new();
        let mut out = Vec::new();
        let mut runts = 0;
        let mut pos = 0;
        loop {
            while let Some(f) = r.next_frame(&mut runts)? {
                out.push(f.to_vec());
            }
            if pos == stream.len() {
                return Ok(out);
            }
            let n = r
                .fill(|b| {
                    let n = chunk.min(stream.len() - pos).min(b.len());
                    b[..n].copy_from_slice(&stream[pos..pos + n]);
                    Ok(n)
                })
                .unwrap();
            pos += n;
        }
    }

    #[test]
    fn a_frame_split_at_every_offset_is_reassembled() {
        let a = frame_of(60, 1);
        let b = frame_of(1514, 2);
        let mut stream = encode(&a);
        stream.extend(encode(&b));
        for cut in 1..stream.len() {
            let mut r = FrameReader::new();
            let mut runts = 0;
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                r.fill(|buf| {
                    buf[..part.len()].copy_from_slice(part);
                    Ok(part.len())
                })
                .unwrap();
                while let Some(f) = r.next_frame(&mut runts).unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "split at {cut}");
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn byte_by_byte_and_large_frames() {
        let frames: Vec<Vec<u8>> = vec![
            frame_of(14, 3),
            frame_of(65536, 4),
            frame_of(MAX_PASST_FRAME, 5),
            frame_of(100, 6),
        ];
        let stream: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        assert_eq!(decode_chunks(&stream, 1).unwrap(), frames);
        assert_eq!(decode_chunks(&stream, 7919).unwrap(), frames);
        assert_eq!(decode_chunks(&stream, 1 << 20).unwrap(), frames);
    }

    #[test]
    fn a_length_over_the_limit_is_an_error_and_runts_are_skipped() {
        let mut stream = encode(&frame_of(3, 0));
        stream.extend(encode(&frame_of(64, 7)));
        stream.extend(((MAX_PASST_FRAME + 1) as u32).to_be_bytes());
        let mut r = FrameReader::new();
        r.fill(|b| {
            b[..stream.len()].copy_from_slice(&stream);
            Ok(stream.len())
        })
        .unwrap();
        let mut runts = 0;
        assert_eq!(
            r.next_frame(&mut runts).unwrap().map(<[u8]>::to_vec),
            Some(frame_of(64, 7))
        );
        assert_eq!(runts, 1);
        assert_eq!(
            r.next_frame(&mut runts),
            Err(FramingError::TooLong {
                len: MAX_PASST_FRAME as u32 + 1
            })
        );
        assert_eq!(
            decode_chunks(&u32::MAX.to_be_bytes(), 4),
            Err(FramingError::TooLong { len: u32::MAX })
        );
    }

    /// A writer whose "socket" takes at most `take` bytes per call, and
    /// nothing (WouldBlock) while `full`.
    struct Sink {
        got: Vec<u8>,
        take: usize,
        full: bool,
    }
    impl Sink {
        fn write(&mut self, parts: &[&[u8]]) -> io::Result<usize> {
            if self.full {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for p in parts {
                let k = p.len().min(self.take - n);
                self.got.extend_from_slice(&p[..k]);
                n += k;
                if n == self.take {
                    break;
                }
            }
            Ok(n)
        }
    }

    #[test]
    fn partial_writes_are_queued_and_resumed() {
        let frames: Vec<Vec<u8>> = (0..20).map(|i| frame_of(100 + i * 37, i as u8)).collect();
        for take in [1, 3, 4, 5, 99, 4096] {
            let mut sink = Sink {
                got: Vec::new(),
                take,
                full: false,
            };
            let mut w = FrameWriter::new();
            for f in &frames {
                w.send(&[&f[..10], &f[10..]], &mut |p| sink.write(p))
                    .unwrap();
            }
            while w.pending() > 0 {
                w.flush(&mut |p| sink.write(p)).unwrap();
            }
            let want: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
            assert_eq!(sink.got, want, "take {take}");
        }
    }

    #[test]
    fn the_rest_of_a_short_write_is_queued_from_any_offset() {
        let a = frame_of(5, 1);
        let b = frame_of(9, 2);
        let prefix = 14u32.to_be_bytes();
        let iovs = [&a, &b].map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        });
        let whole = [&prefix[..], &a, &b].concat();
        for skip in 0..=whole.len() {
            let mut w = FrameWriter::new();
            // SAFETY: the iovecs describe `a` and `b`, alive here.
            unsafe { w.queue_iovecs(&prefix, &iovs, skip) };
            assert_eq!(w.pending, whole[skip..], "skip {skip}");
        }
    }

    #[test]
    fn a_full_queue_refuses_frames_until_flushed() {
        let mut sink = Sink {
            got: Vec::new(),
            take: usize::MAX,
            full: true,
        };
        let mut w = FrameWriter::new();
        let f = frame_of(60000, 9);
        let mut accepted = 0;
        loop {
            match w.send(&[&f], &mut |p| sink.write(p)) {
                Ok(()) => accepted += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(accepted < 100, "the queue never filled");
        }
        assert!(w.pending() >= TX_QUEUE_CAP && w.pending() < TX_QUEUE_CAP + 60004);
        sink.full = false;
        w.flush(&mut |p| sink.write(p)).unwrap();
        assert_eq!(w.pending(), 0);
        w.send(&[&f], &mut |p| sink.write(p)).unwrap();
        let want: Vec<u8> = (0..accepted + 1).flat_map(|_| encode(&f)).collect();
        assert_eq!(sink.got, want);
    }

    fn stream_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into fds.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both are new and ours.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Both directions through a real socketpair with a small send buffer,
    /// so the kernel itself makes short writes.
    #[test]
    fn backend_over_a_socketpair() {
        let (ours, wire) = stream_pair();
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt with an int option on our descriptor.
        unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let be = PasstBackend::new(ours, "test").unwrap();

        // TX: frames with a 12-byte header, more than the socket holds.
        let f = frame_of(65536, 11);
        let mut hdr_and_frame = vec![0xeeu8; VNET_HDR_LEN];
        hdr_and_frame.extend_from_slice(&f);
        let mut sent = 0;
        loop {
            let mut b = IoVecBuf::new(MAX_FRAME_LEN as u64);
            b.push_slice(&hdr_and_frame).unwrap();
            match be.writev(&b) {
                Ok(n) => {
                    assert_eq!(n, hdr_and_frame.len());
                    sent += 1
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(sent >= 1 && be.tx_pending());
        // The far end drains while we flush; what arrives is exactly the frames.
        let mut got = Vec::new();
        let want: Vec<u8> = (0..sent).flat_map(|_| encode(&f)).collect();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < want.len() {
            be.flush().unwrap();
            let n = read_fd(wire.as_raw_fd(), &mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want);
        assert!(!be.tx_pending());

        // RX: two frames written in odd pieces; each readv gives one with
        // a zeroed header.
        let a = frame_of(1514, 12);
        let b2 = frame_of(42, 13);
        let mut stream = encode(&a);
        stream.extend(encode(&b2));
        let mut out = vec![0u8; MAX_FRAME_LEN];
        for piece in [&stream[..3], &stream[3..700], &stream[700..]] {
            assert_eq!(send_parts(wire.as_raw_fd(), &[piece]).unwrap(), piece.len());
        }
        let mut frames = Vec::new();
        while frames.len() < 2 {
            let mut iov = IoVecBufMut::new(MAX_FRAME_LEN as u64);
            iov.push_slice(&mut out).unwrap();
            match be.readv(&mut iov) {
                Ok(n) => frames.push(out[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        let with_hdr = |f: &[u8]| [&[0u8; VNET_HDR_LEN][..], f].concat();
        assert_eq!(frames, vec![with_hdr(&a), with_hdr(&b2)]);
        let mut iov = IoVecBufMut::new(MAX_FRAME_LEN as u64);
        iov.push_slice(&mut out).unwrap();
        assert_eq!(
            be.readv(&mut iov).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(be.link_up());

        // The peer hangs up: link down, reads and writes fail at once.
        drop(wire);
        let mut iov = IoVecBufMut::new(MAX_FRAME_LEN as u64);
        iov.push_slice(&mut out).unwrap();
        assert_eq!(
            be.readv(&mut iov).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        assert!(!be.link_up());
        let mut b = IoVecBuf::new(MAX_FRAME_LEN as u64);
        b.push_slice(&hdr_and_frame).unwrap();
        assert_eq!(
            be.writev(&b).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
    }

    /// Small frames are gathered into one batch; a large one after them
    /// goes out behind them; what the peer reads is every frame, in order.
    #[test]
    fn small_frames_are_batched_and_stay_in_order() {
        let (ours, wire) = stream_pair();
        let be = PasstBackend::new(ours, "test").unwrap();
        let frames: Vec<Vec<u8>> = [60, 1514, 342, 65536, 60, 1514]
            .iter()
            .enumerate()
            .map(|(i, &n)| frame_of(n, i as u8))
            .collect();
        for (i, f) in frames.iter().enumerate() {
            let mut chain = vec![0xeeu8; VNET_HDR_LEN];
            chain.extend_from_slice(f);
            let mut b = IoVecBuf::new(MAX_FRAME_LEN as u64);
            b.push_slice(&chain).unwrap();
            assert_eq!(be.writev(&b).unwrap(), chain.len());
            if i == 0 {
                // Held for the batch: nothing on the wire yet.
                assert!(be.tx_pending());
                let mut pfd = libc::pollfd {
                    fd: wire.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
            }
        }
        let want: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < want.len() {
            be.flush().unwrap();
            let n = read_fd(wire.as_raw_fd(), &mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want);
        assert!(!be.tx_pending());
    }

    #[test]
    fn an_oversized_length_from_the_peer_drops_the_connection() {
        let (ours, wire) = stream_pair();
        let be = PasstBackend::new(ours, "test").unwrap();
        send_parts(wire.as_raw_fd(), &[&0x0010_0000u32.to_be_bytes()]).unwrap();
        let mut out = vec![0u8; 64];
        let mut iov = IoVecBufMut::new(64);
        iov.push_slice(&mut out).unwrap();
        assert_eq!(
            be.readv(&mut iov).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        assert!(!be.link_up());
        // Our side shut the socket: the peer sees end of stream.
        let mut b = [0u8; 8];
        assert_eq!(read_fd(wire.as_raw_fd(), &mut b).unwrap(), 0);
    }
}
