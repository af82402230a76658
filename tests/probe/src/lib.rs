//! The probe guest, built by this crate's build script: a freestanding
//! bzImage (C and assembly under `guest/`, compiled by gcc) that checks the
//! Linux boot path from inside a VM and reports on the 8250 serial port.
//!
//! Command-line switches the guest understands (see `guest/cmdline.c`):
//! `probe.mem=MiB`, `probe.cpus=N`, `probe.initrd_sum=0xHEX` (FNV-1a 32, see
//! [`fnv1a32`]), `probe.initrd_size=N`, `probe.hold_ms=N`, `probe.quick=1`.

/// Path of the built probe bzImage.
pub const BZIMAGE: &str = concat!(env!("OUT_DIR"), "/probe.bzImage");

/// Path of the linked probe ELF (for disassembly and debugging).
pub const ELF: &str = concat!(env!("OUT_DIR"), "/probe.elf");

/// FNV-1a, 32 bit: the checksum the probe computes over the initrd.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter()
        .fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
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
        assert_eq!(&img[pm + 0x200..pm + 0x202], &[0xe6, 0x80], "out %al,$0x80 first");
        let init_size = u32::from_le_bytes(img[0x260..0x264].try_into().unwrap()) as usize;
        assert!(init_size >= img.len() - pm);
    }

    #[test]
    fn fnv1a32_known_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
    }
}
