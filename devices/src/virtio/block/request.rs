//! One virtio-blk request: parse a descriptor chain (header, data, status
//! byte) and execute it against the [`DiskImage`].
//!
//! The chain is untrusted. Its readable part is `header (16 bytes) || data`
//! and its writable part `data || status (1 byte)`, with any framing into
//! descriptors (virtio 1.x has no fixed layout). Readable descriptors must
//! precede writable ones. Every guest range is resolved through vm-memory
//! before use, so an address outside guest RAM is an I/O error, never an
//! access. A chain whose status byte cannot be found or written is returned
//! with a used length of 0. An IN/OUT request moves at most
//! [`MAX_REQUEST_BYTES`]; DISCARD and WRITE_ZEROES are bounded by their
//! segment limits, so the work of one request is bounded.

use log::debug;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::disk::DiskImage;
use super::{
    req_status, req_type, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_REQUEST_BYTES,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX,
    WRITE_ZEROES_FLAG_UNMAP,
};
use crate::virtio::iovec::{IoVecBuf, IoVecBufMut, IoVecError, IoVecStorage};
use crate::{warn_limited, GuestMemoryMmap};

/// Most descriptors one request may use.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Size of the request header (type, reserved, sector).
pub const HEADER_SIZE: u64 = 16;
/// Size of one DISCARD / WRITE_ZEROES segment.
const DWZ_SEG_SIZE: u64 = 16;

/// A contiguous guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub addr: GuestAddress,
    pub len: u64,
}

/// Why a chain is not a well-formed request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("a device-readable descriptor follows a device-writable one")]
    Direction,
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("a descriptor wraps around the address space")]
    Wraps,
    #[error("header shorter than 16 bytes")]
    ShortHeader,
}

/// Reusable buffers so the hot path does not allocate per request.
#[derive(Debug, Default)]
pub struct Scratch {
    readable: Vec<Range>,
    writable: Vec<Range>,
    data: Vec<Range>,
    iovs: IoVecStorage,
}

/// Per-device request context.
pub struct Context<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub disk: &'a mut DiskImage,
    pub acked_features: u64,
    /// GET_ID answer, zero padded; None answers UNSUPP.
    pub id: Option<&'a [u8; ID_BYTES]>,
    pub scratch: &'a mut Scratch,
}

/// Outcome of one chain: what goes in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into the chain (data + status), 0 if dropped.
    pub used_len: u32,
    /// The status written, if any.
    pub status: Option<u8>,
    /// The request type, if the header could be read.
    pub req_type: Option<u32>,
}

fn total(ranges: &[Range]) -> u64 {
    ranges.iter().map(|r| r.len).sum()
}

/// Ranges covering bytes `[skip, skip + take)` of the stream `ranges`.
fn sub_ranges(ranges: &[Range], mut skip: u64, mut take: u64, out: &mut Vec<Range>) {
    out.clear();
    for r in ranges {
        if take == 0 {
            break;
        }
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        let len = (r.len - skip).min(take);
        out.push(Range {
            addr: r.addr.unchecked_add(skip),
            len,
        });
        take -= len;
        skip = 0;
    }
}

/// Address of the last byte of the stream.
fn last_byte(ranges: &[Range]) -> Option<GuestAddress> {
    let r = ranges.iter().rev().find(|r| r.len > 0)?;
    r.addr.checked_add(r.len - 1)
}

/// Copy `buf.len()` bytes of the stream, from byte `skip` on, into `buf`.
fn read_stream(
    mem: &GuestMemoryMmap,
    ranges: &[Range],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), GuestMemoryError> {
    // Fast path: all of it inside the first range (the usual header).
    if let Some(first) = ranges.first() {
        if skip + buf.len() as u64 <= first.len {
            return mem.read_slice(buf, first.addr.unchecked_add(skip));
        }
    }
    let mut parts = Vec::new();
    sub_ranges(ranges, skip, buf.len() as u64, &mut parts);
    let mut at = 0usize;
    let expected = buf.len();
    for p in parts {
        let n = p.len as usize;
        let dst = buf
            .get_mut(at..at + n)
            .ok_or(GuestMemoryError::PartialBuffer {
                expected,
                completed: at,
            })?;
        mem.read_slice(dst, p.addr)?;
        at += n;
    }
    if at != buf.len() {
        return Err(GuestMemoryError::PartialBuffer {
            expected: buf.len(),
            completed: at,
        });
    }
    Ok(())
}

/// Write `data` to the start of the stream.
fn write_stream(
    mem: &GuestMemoryMmap,
    ranges: &[Range],
    data: &[u8],
) -> Result<(), GuestMemoryError> {
    let mut at = 0usize;
    for r in ranges {
        if at == data.len() {
            break;
        }
        let n = (r.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], r.addr)?;
        at += n;
    }
    Ok(())
}

/// Appends the guest ranges to an iovec buffer (`push` is its `push_guest`).
fn push_ranges(
    ranges: &[Range],
    mut push: impl FnMut(GuestAddress, usize) -> Result<(), IoVecError>,
) -> Result<(), IoVecError> {
    for r in ranges {
        let len = usize::try_from(r.len).map_err(|_| IoVecError::TooLong {
            max: MAX_REQUEST_BYTES,
        })?;
        push(r.addr, len)?;
    }
    Ok(())
}

/// Moves the data of an IN or OUT request between `data` (guest ranges,
/// at most [`MAX_REQUEST_BYTES`]) and the disk at `offset`.
fn transfer(
    mem: &GuestMemoryMmap,
    disk: &DiskImage,
    data: &[Range],
    storage: &mut IoVecStorage,
    offset: u64,
    write: bool,
) -> Result<std::io::Result<()>, IoVecError> {
    let st = std::mem::take(storage);
    if write {
        let mut buf = IoVecBuf::with_storage(st, MAX_REQUEST_BYTES);
        let built = push_ranges(data, |a, l| buf.push_guest(mem, a, l));
        let r = built.map(|()| disk.write_vectored_at(&mut buf, offset));
        *storage = buf.into_storage();
        r
    } else {
        let mut buf = IoVecBufMut::with_storage(st, MAX_REQUEST_BYTES);
        let built = push_ranges(data, |a, l| buf.push_guest(mem, a, l));
        let r = built.map(|()| disk.read_vectored_at(&mut buf, offset));
        *storage = buf.into_storage();
        r
    }
}

/// Split the chain into its readable and writable ranges.
fn collect(
    chain: impl Iterator<Item = Descriptor>,
    readable: &mut Vec<Range>,
    writable: &mut Vec<Range>,
) -> Result<(), ChainError> {
    readable.clear();
    writable.clear();
    for (n, d) in chain.enumerate() {
        if n >= MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        let r = Range {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        // Keeps every later `addr + offset` (offset < len) from overflowing.
        if r.addr.checked_add(r.len).is_none() {
            return Err(ChainError::Wraps);
        }
        if d.is_write_only() {
            writable.push(r);
        } else if !writable.is_empty() {
            return Err(ChainError::Direction);
        } else {
            readable.push(r);
        }
    }
    Ok(())
}

/// Parse and execute one chain. Never panics on guest input.
pub fn process(ctx: &mut Context<'_>, chain: impl Iterator<Item = Descriptor>) -> Completion {
    let Scratch {
        readable,
        writable,
        data,
        iovs,
    } = &mut *ctx.scratch;
    let dropped = Completion {
        used_len: 0,
        status: None,
        req_type: None,
    };
    if let Err(e) = collect(chain, readable, writable) {
        warn_limited!("virtio-blk: dropping chain: {e}");
        return dropped;
    }
    let w_total = total(writable);
    if w_total == 0 {
        warn_limited!("virtio-blk: dropping chain: {}", ChainError::NoStatus);
        return dropped;
    }
    // The status is the last writable byte.
    let Some(status_addr) = last_byte(writable) else {
        return dropped;
    };
    if !GuestMemoryBackend::check_range(ctx.mem, status_addr, 1) {
        warn_limited!("virtio-blk: status byte outside guest memory; dropping chain");
        return dropped;
    }
    let finish = |status: u8, data_len: u64, req_type: Option<u32>| -> Completion {
        if ctx.mem.write_obj(status, status_addr).is_err() {
            return dropped;
        }
        // data_len is at most MAX_REQUEST_BYTES (IN) or ID_BYTES (GET_ID),
        // so this never saturates.
        let used_len = u32::try_from(data_len + 1).unwrap_or(u32::MAX);
        Completion {
            used_len,
            status: Some(status),
            req_type,
        }
    };

    let r_total = total(readable);
    let mut header = [0u8; HEADER_SIZE as usize];
    if r_total < HEADER_SIZE || read_stream(ctx.mem, readable, 0, &mut header).is_err() {
        warn_limited!("virtio-blk: {}", ChainError::ShortHeader);
        return finish(req_status::IOERR, 0, None);
    }
    let t = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_b = [0u8; 8];
    sector_b.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_b);
    let out_len = r_total - HEADER_SIZE;
    let in_len = w_total - 1;
    let rt = Some(t);

    match t {
        req_type::IN | req_type::OUT => {
            let write = t == req_type::OUT;
            let len = if write { out_len } else { in_len };
            if !len.is_multiple_of(SECTOR_SIZE) {
                warn_limited!("virtio-blk: data length {len} is not a multiple of 512");
                return finish(req_status::IOERR, 0, rt);
            }
            if len > MAX_REQUEST_BYTES {
                warn_limited!(
                    "virtio-blk: {len}-byte request refused (at most {MAX_REQUEST_BYTES})"
                );
                return finish(req_status::IOERR, 0, rt);
            }
            let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                return finish(req_status::IOERR, 0, rt);
            };
            if !ctx.disk.in_range(offset, len) {
                debug!("virtio-blk: sector {sector} + {len} bytes beyond the disk");
                return finish(req_status::IOERR, 0, rt);
            }
            if write && ctx.disk.read_only() {
                return finish(req_status::IOERR, 0, rt);
            }
            if write {
                sub_ranges(readable, HEADER_SIZE, out_len, data);
            } else {
                sub_ranges(writable, 0, in_len, data);
            }
            match transfer(ctx.mem, ctx.disk, data, iovs, offset, write) {
                Err(e) => {
                    warn_limited!("virtio-blk: data buffer: {e}");
                    finish(req_status::IOERR, 0, rt)
                }
                Ok(Ok(())) => finish(req_status::OK, if write { 0 } else { len }, rt),
                Ok(Err(e)) => {
                    warn_limited!("virtio-blk: {}: {e}", ctx.disk.path().display());
                    finish(req_status::IOERR, 0, rt)
                }
            }
        }
        req_type::FLUSH => match ctx.disk.flush() {
            Ok(()) => finish(req_status::OK, 0, rt),
            Err(e) => {
                warn_limited!("virtio-blk: flush {}: {e}", ctx.disk.path().display());
                finish(req_status::IOERR, 0, rt)
            }
        },
        req_type::GET_ID => {
            let Some(id) = ctx.id else {
                return finish(req_status::UNSUPP, 0, rt);
            };
            let n = (in_len as usize).min(ID_BYTES);
            sub_ranges(writable, 0, n as u64, data);
            match write_stream(ctx.mem, data, &id[..n]) {
                Ok(()) => finish(req_status::OK, n as u64, rt),
                Err(_) => finish(req_status::IOERR, 0, rt),
            }
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = t == req_type::DISCARD;
            let feature = if discard {
                VIRTIO_BLK_F_DISCARD
            } else {
                VIRTIO_BLK_F_WRITE_ZEROES
            };
            if ctx.acked_features & (1 << feature) == 0 {
                return finish(req_status::UNSUPP, 0, rt);
            }
            if ctx.disk.read_only() {
                return finish(req_status::IOERR, 0, rt);
            }
            let status = discard_or_zero(ctx.mem, ctx.disk, readable, out_len, discard);
            finish(status, 0, rt)
        }
        _ => {
            debug!("virtio-blk: unsupported request type {t}");
            finish(req_status::UNSUPP, 0, rt)
        }
    }
}

fn discard_or_zero(
    mem: &GuestMemoryMmap,
    disk: &mut DiskImage,
    readable: &[Range],
    out_len: u64,
    discard: bool,
) -> u8 {
    let (max_seg, max_sectors) = if discard {
        (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
    } else {
        (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
    };
    if out_len == 0
        || !out_len.is_multiple_of(DWZ_SEG_SIZE)
        || out_len / DWZ_SEG_SIZE > max_seg.into()
    {
        return req_status::IOERR;
    }
    let n = (out_len / DWZ_SEG_SIZE) as usize;
    let mut raw = vec![0u8; out_len as usize];
    if read_stream(mem, readable, HEADER_SIZE, &mut raw).is_err() {
        return req_status::IOERR;
    }
    // Validate every segment before touching the disk.
    let mut segs = Vec::with_capacity(n);
    for s in raw.chunks_exact(DWZ_SEG_SIZE as usize) {
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&s[0..8]);
        let sector = u64::from_le_bytes(b8);
        let num = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
        let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
        let allowed = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
        if flags & !allowed != 0 {
            return req_status::UNSUPP;
        }
        if num > max_sectors {
            return req_status::IOERR;
        }
        let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
            return req_status::IOERR;
        };
        let len = u64::from(num) << SECTOR_SHIFT;
        if !disk.in_range(offset, len) {
            return req_status::IOERR;
        }
        segs.push((offset, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0));
    }
    for (offset, len, unmap) in segs {
        let r = if discard {
            disk.discard(offset, len)
        } else {
            disk.write_zeroes(offset, len, unmap)
        };
        if let Err(e) = r {
            warn_limited!(
                "virtio-blk: discard/write-zeroes {}: {e}",
                disk.path().display()
            );
            return req_status::IOERR;
        }
    }
    req_status::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, l: u64) -> Range {
        Range {
            addr: GuestAddress(a),
            len: l,
        }
    }

    #[test]
    fn sub_ranges_splits_streams() {
        let rs = [r(0x1000, 10), r(0x2000, 6), r(0x3000, 1)];
        let mut out = Vec::new();
        sub_ranges(&rs, 8, 5, &mut out);
        assert_eq!(out, vec![r(0x1008, 2), r(0x2000, 3)]);
        sub_ranges(&rs, 16, 1, &mut out);
        assert_eq!(out, vec![r(0x3000, 1)]);
        sub_ranges(&rs, 17, 4, &mut out);
        assert!(out.is_empty());
        sub_ranges(&rs, 0, 0, &mut out);
        assert!(out.is_empty());
    }
}
