//! The probe guest, built by this crate's build script: a freestanding
//! bzImage (C and assembly under `guest/`, compiled by gcc) that checks the
//! Linux boot path from inside a VM and reports on the 8250 serial port.
//!
//! Command-line switches the guest understands (see `guest/cmdline.c`):
//! `probe.mem=MiB`, `probe.cpus=N`, `probe.initrd_sum=0xHEX` (see
//! [`initrd_sum`]), `probe.initrd_size=N`, `probe.hold_ms=N`, `probe.quick=1`.

/// Path of the built probe bzImage.
pub const BZIMAGE: &str = concat!(env!("OUT_DIR"), "/probe.bzImage");

/// Path of the linked probe ELF: a PVH kernel (a Xen `PHYS32_ENTRY` note
/// names its 32-bit entry; segments at their physical load addresses from
/// 1 MiB), bootable by `b2p-vmm run --kernel` and QEMU's `-kernel`.
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

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn elf_has_a_pvh_note_naming_the_32bit_entry() {
        let elf = std::fs::read(ELF).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        let (phoff, phentsize, phnum) = (
            u64_at(&elf, 0x20) as usize,
            usize::from(u16::from_le_bytes([elf[0x36], elf[0x37]])),
            usize::from(u16::from_le_bytes([elf[0x38], elf[0x39]])),
        );
        let phdrs: Vec<&[u8]> = (0..phnum)
            .map(|i| &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize])
            .collect();
        // (type, offset, paddr, filesz)
        let seg = |p: &[u8]| (u32_at(p, 0), u64_at(p, 8), u64_at(p, 24), u64_at(p, 32));
        let note = phdrs
            .iter()
            .map(|p| seg(p))
            .find(|s| s.0 == 4)
            .expect("PT_NOTE");
        let n = &elf[note.1 as usize..];
        assert_eq!((u32_at(n, 0), u32_at(n, 4), u32_at(n, 8)), (4, 4, 18));
        assert_eq!(&n[12..16], b"Xen\0");
        let entry = u64::from(u32_at(n, 16));
        // The entry lies in a PT_LOAD from 1 MiB up and starts with `out %al,$0x80`.
        let load = phdrs
            .iter()
            .map(|p| seg(p))
            .find(|s| s.0 == 1 && s.2 <= entry && entry < s.2 + s.3)
            .expect("entry inside a PT_LOAD");
        assert!(load.2 >= 0x10_0000);
        let at = (load.1 + entry - load.2) as usize;
        assert_eq!(&elf[at..at + 2], &[0xe6, 0x80]);
    }

    #[test]
    fn initrd_sum_pads_the_tail() {
        assert_eq!(initrd_sum(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(initrd_sum(b"a"), initrd_sum(b"a\0\0\0\0\0\0\0"));
        assert_ne!(initrd_sum(b"ab"), initrd_sum(b"ba"));
    }
}
