//! The probe guest, built by this crate's build script: a freestanding
//! bzImage (C and assembly under `guest/`, compiled by gcc) that checks the
//! Linux boot path from inside a VM and reports on the 8250 serial port.
//!
//! Command-line switches the guest understands (see `guest/cmdline.c`):
//! `probe.mem=MiB`, `probe.cpus=N`, `probe.initrd_sum=0xHEX` (see
//! [`initrd_sum`]), `probe.initrd_size=N`, `probe.hold_ms=N`, `probe.quick=1`.

/// Path of the built probe bzImage.
pub const BZIMAGE: &str = concat!(env!("OUT_DIR"), "/probe.bzImage");

/// Path of the linked probe ELF (for disassembly and debugging).
pub const ELF: &str = concat!(env!("OUT_DIR"), "/probe.elf");

/// The checksum the probe computes over the initrd (`probe.initrd_sum=`):
/// FNV-1a 64 over little-endian 64-bit words, the tail zero-padded.
pub fn initrd_sum(data: &[u8]) -> u64 {
    data.chunks(8).fold(0xcbf2_9ce4_8422_2325u64, |h, chunk| {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_has_a_64bit_setup_header() {
        let img = std::fs::read(BZIMAGE).unwrap();
        assert_eq!(&img[0x202..0x206], b"HdrS");
        let version = u16::from_le_bytes([img[0x206], img[0x207]]);
        assert!(version >= 0x020c);
        assert_eq!(img[0x211] & 1, 1, "LOADED_HIGH");
        let xloadflags = u16::from_le_bytes([img[0x236], img[0x237]]);
        assert_eq!(xloadflags & 1, 1, "XLF_KERNEL_64");
        assert_eq!(img[0x234], 1, "relocatable_kernel");
        let pm = (usize::from(img[0x1f1]) + 1) * 512;
        assert_eq!(
            &img[pm + 0x200..pm + 0x202],
            &[0xe6, 0x80],
            "out %al,$0x80 first"
        );
        let init_size = u32::from_le_bytes(img[0x260..0x264].try_into().unwrap()) as usize;
        assert!(init_size >= img.len() - pm);
    }

    #[test]
    fn initrd_sum_pads_the_tail() {
        assert_eq!(initrd_sum(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(initrd_sum(b"a"), initrd_sum(b"a\0\0\0\0\0\0\0"));
        assert_ne!(initrd_sum(b"ab"), initrd_sum(b"ba"));
    }
}
