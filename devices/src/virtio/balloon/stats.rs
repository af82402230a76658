//! The guest's memory statistics (virtio 1.2 §5.5.6.3): a buffer of
//! 10-byte entries, a little-endian u16 tag and a u64 value each.

use std::fmt;

/// Tags the spec defines.
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
}

/// Bytes of one entry.
pub const ENTRY_SIZE: usize = 10;
/// Most entries read from one buffer (the spec defines 10 tags; a driver
/// may repeat or add some, more is cut).
pub const MAX_ENTRIES: usize = 64;

/// The latest statistics: `values[tag]` for the tags the spec defines
/// (`None` when the guest did not send it), plus how many sets came.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    pub values: [Option<u64>; 10],
    /// Entries with tags the spec does not define (ignored).
    pub unknown: u32,
    /// Buffers received so far.
    pub updates: u64,
}

impl BalloonStats {
    /// The value of `tag`, if the guest sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(usize::from(tag)).copied().flatten()
    }

    /// Replace the values with those of `buf` (whole entries only; a
    /// trailing partial entry is ignored).
    pub fn update(&mut self, buf: &[u8]) {
        self.values = [None; 10];
        self.unknown = 0;
        for e in buf.chunks_exact(ENTRY_SIZE).take(MAX_ENTRIES) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            match self.values.get_mut(usize::from(tag)) {
                Some(slot) => *slot = Some(u64::from_le_bytes(v)),
                None => self.unknown += 1,
            }
        }
        self.updates += 1;
    }
}

/// Entries laid out as a driver writes them (tests, fuzzers).
pub fn encode(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_SIZE);
    for (t, v) in entries {
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

impl fmt::Display for BalloonStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 10] = [
            "swap_in",
            "swap_out",
            "major_faults",
            "minor_faults",
            "free",
            "total",
            "available",
            "caches",
            "hugetlb_allocs",
            "hugetlb_failures",
        ];
        let mut first = true;
        for (i, v) in self.values.iter().enumerate() {
            let Some(v) = v else { continue };
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            // Memory amounts are bytes; show MiB.
            if (4..=7).contains(&i) {
                write!(f, "{}_mib={}", NAMES[i], v >> 20)?;
            } else {
                write!(f, "{}={v}", NAMES[i])?;
            }
        }
        if first {
            f.write_str("(no values)")?;
        }
        Ok(())
    }
}
