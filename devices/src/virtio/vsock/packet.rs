//! The vsock packet header and the parsing of TX chains (driver -> device)
//! and filling of RX chains (device -> driver).
//!
//! The `virtio-vsock` crate does the common layouts (header and payload in
//! one descriptor, or a header descriptor and one payload descriptor). A
//! payload scattered over more descriptors (legal, if rare) is gathered
//! into an owned buffer through virtio-queue's `Reader`. Every length and
//! address comes from the guest: parsing errors drop the packet.

use std::io::Read;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::VolatileSlice;

use super::MAX_PKT_PAYLOAD;
use crate::GuestMemoryMmap;

/// Size of the packed header.
pub const HDR_SIZE: usize = 44;

/// A decoded packet header (host byte order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn le_u32(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u16(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Hdr {
    /// Decode the wire layout.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Hdr {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encode to the wire layout.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn from_vsock_packet(p: &VsockPacket<'_, ()>) -> Self {
        Hdr {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }
}

/// The payload of a TX packet.
#[derive(Debug)]
pub enum Payload<'a> {
    None,
    /// Straight from guest memory (the common case).
    Guest(VolatileSlice<'a, ()>),
    /// Gathered from several descriptors.
    Owned(Vec<u8>),
}

impl Payload<'_> {
    pub fn len(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::Guest(s) => s.len(),
            Payload::Owned(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy `[off, off + dst.len())` of the payload into `dst`; returns the
    /// bytes copied.
    pub fn copy_to(&self, off: usize, dst: &mut [u8]) -> usize {
        match self {
            Payload::None => 0,
            Payload::Guest(s) => match s.subslice(off, s.len().saturating_sub(off)) {
                Ok(sub) => sub.copy_to(dst),
                Err(_) => 0,
            },
            Payload::Owned(v) => {
                let src = v.get(off..).unwrap_or(&[]);
                let n = src.len().min(dst.len());
                dst[..n].copy_from_slice(&src[..n]);
                n
            }
        }
    }
}

/// A packet the driver sent.
#[derive(Debug)]
pub struct TxPacket<'a> {
    pub hdr: Hdr,
    pub payload: Payload<'a>,
}

/// Why a TX chain was dropped.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("vsock packet: {0}")]
    Parse(#[from] virtio_vsock::packet::Error),
    #[error("vsock packet: payload of {0} bytes is larger than allowed")]
    TooLong(u32),
    #[error("vsock packet: descriptor chain: {0}")]
    Chain(String),
    #[error("vsock packet: chain holds {have} of {want} payload bytes")]
    Short { have: usize, want: usize },
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Parse a TX chain into a header and its payload.
pub fn parse_tx<'a>(
    mem: &'a GuestMemoryMmap,
    chain: Chain<'a>,
) -> Result<TxPacket<'a>, PacketError> {
    let mut first = chain.clone();
    match VsockPacket::from_tx_virtq_chain(mem, &mut first, MAX_PKT_PAYLOAD) {
        Ok(p) => {
            let hdr = Hdr::from_vsock_packet(&p);
            let payload = match p.data_slice() {
                Some(s) if hdr.len > 0 => Payload::Guest(*s),
                _ => Payload::None,
            };
            Ok(TxPacket { hdr, payload })
        }
        // The payload may be spread over several descriptors: gather it.
        Err(virtio_vsock::packet::Error::DescriptorLengthTooSmall)
        | Err(virtio_vsock::packet::Error::FragmentedMemory) => gather_tx(mem, chain),
        Err(e) => Err(e.into()),
    }
}

fn gather_tx<'a>(mem: &'a GuestMemoryMmap, chain: Chain<'a>) -> Result<TxPacket<'a>, PacketError> {
    let mut reader = chain
        .reader(mem)
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    let mut hb = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut hb)
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    let hdr = Hdr::from_bytes(&hb);
    if hdr.len > MAX_PKT_PAYLOAD {
        return Err(PacketError::TooLong(hdr.len));
    }
    let want = hdr.len as usize;
    if reader.available_bytes() < want {
        return Err(PacketError::Short {
            have: reader.available_bytes(),
            want,
        });
    }
    let mut data = vec![0u8; want];
    reader
        .read_exact(&mut data)
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    let payload = if want == 0 {
        Payload::None
    } else {
        Payload::Owned(data)
    };
    Ok(TxPacket { hdr, payload })
}

/// An RX chain ready to be filled: where the header goes and the payload
/// space (if any).
pub struct RxBuffer<'a> {
    pkt: VsockPacket<'a, ()>,
}

impl<'a> RxBuffer<'a> {
    /// Map an RX chain (header descriptor, then payload space).
    pub fn from_chain(mem: &'a GuestMemoryMmap, mut chain: Chain<'a>) -> Result<Self, PacketError> {
        let pkt = VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_PAYLOAD)?;
        Ok(RxBuffer { pkt })
    }

    /// The payload space.
    pub fn data(&self) -> Option<&VolatileSlice<'a, ()>> {
        self.pkt.data_slice()
    }

    /// Write the header; returns the used length (header + payload).
    pub fn finish(&mut self, hdr: &Hdr) -> Result<u32, PacketError> {
        self.pkt.set_header_from_raw(&hdr.to_bytes())?;
        Ok(HDR_SIZE as u32 + hdr.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5678,
            len: 17,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 262144,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Hdr::from_bytes(&b), h);
    }

    #[test]
    fn owned_payload_copy() {
        let p = Payload::Owned(vec![1, 2, 3, 4]);
        let mut d = [0u8; 3];
        assert_eq!(p.copy_to(2, &mut d), 2);
        assert_eq!(&d[..2], &[3, 4]);
        assert_eq!(p.copy_to(9, &mut d), 0);
    }
}
