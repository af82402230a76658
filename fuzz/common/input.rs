//! The fuzzer's bytes as a stream of little-endian fields (past the end
//! every field reads as zero, so any input is a complete run), and the
//! hostile split-queue layouts the device targets share.

use b2p_devices::virtio::testing::{RawDesc, TestDriver};

pub struct In<'a>(pub &'a [u8]);

#[allow(dead_code)] // each target uses the readers it needs
impl In<'_> {
    pub fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Where fuzzed descriptors point: mostly into a data area the fuzzer also
/// fills, sometimes anywhere.
#[allow(dead_code)]
pub struct DataArea {
    pub start: u64,
    pub len: usize,
    /// Lengths drawn for in-area descriptors stay under this.
    pub max_desc_len: u16,
}

#[allow(dead_code)]
impl In<'_> {
    /// A whole descriptor table for queue `q`: addresses in the data area
    /// or raw, lengths small or any, any flags, `next` in and out of range.
    pub fn descriptors(&mut self, d: &mut TestDriver, q: u16, qsize: u16, area: &DataArea) {
        for i in 0..qsize {
            let kind = self.u8();
            let addr = if kind & 0x80 == 0 {
                area.start + u64::from(self.u16()) % area.len as u64
            } else {
                self.u64()
            };
            let len = if kind & 0x40 == 0 {
                u32::from(self.u16() % area.max_desc_len)
            } else {
                self.u32()
            };
            let flags = u16::from(kind & 0x07);
            let next = u16::from(self.u8()) % (qsize + 2);
            d.write_raw_desc(
                q,
                i,
                RawDesc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
    }

    /// Heads to publish on an available ring: any count up to a few more
    /// than the queue holds, some out of range.
    pub fn ring(&mut self, qsize: u16) -> Vec<u16> {
        let heads = self.u8() % (qsize as u8 + 4);
        (0..heads)
            .map(|_| u16::from(self.u8()) % (qsize + 2))
            .collect()
    }
}
