//! Boot page tables (identity map of the first 4 GiB with 2 MiB pages) and
//! the boot GDT, for the 64-bit Linux entry and the 32-bit PVH entry.

use crate::layout::*;
use crate::{write_guest, GuestMemoryMmap, Result};

/// Selector of the boot code segment (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Which GDT to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Long mode (64-bit code segment).
    Long,
    /// 32-bit protected mode (PVH entry).
    Protected32,
}

/// A GDT descriptor from access/flags bits (`flags` = G D/B L AVL in the
/// top nibble, access byte in the low byte), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20).
pub fn gdt(mode: CpuMode) -> [u64; 5] {
    let code = match mode {
        CpuMode::Long => gdt_entry(0xa09b, 0, 0xfffff),
        CpuMode::Protected32 => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Write the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap, mode: CpuMode) -> Result<()> {
    let bytes: Vec<u8> = gdt(mode).iter().flat_map(|e| e.to_le_bytes()).collect();
    write_guest(mem, &bytes, GDT_ADDR)?;
    write_guest(mem, &0u64.to_le_bytes(), IDT_ADDR)
}

/// Write the identity map: PML4[0] -> PDPT, PDPT[0..4] -> 4 PDs of 2 MiB pages.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write_guest(mem, &(PDPT_ADDR | PRESENT_RW).to_le_bytes(), PML4_ADDR)?;
    let pds = IDENTITY_MAP_SIZE >> 30;
    let mut pdpt = Vec::with_capacity(pds as usize * 8);
    for i in 0..pds {
        pdpt.extend_from_slice(&((PD_ADDR + i * 4096) | PRESENT_RW).to_le_bytes());
    }
    write_guest(mem, &pdpt, PDPT_ADDR)?;
    let mut pd = Vec::with_capacity(pds as usize * 4096);
    for i in 0..pds * 512 {
        pd.extend_from_slice(&((i << 21) | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
    }
    write_guest(mem, &pd, PD_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn gdt_entries_match_known_values() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(
            gdt(CpuMode::Long)[(BOOT_CS >> 3) as usize],
            0x00af_9b00_0000_ffff
        );
    }

    #[test]
    fn identity_map_covers_4g() {
        let m = GuestMemoryMmap::from_ranges(&ram_regions(64 << 20)).unwrap();
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        assert_eq!(pdpt3, (PD_ADDR + 3 * 4096) | 3);
        // The PDE that maps 0xC000_0000 (the boot timer / virtio slots).
        let idx = 0xc000_0000u64 >> 21;
        let pde: u64 = m.read_obj(GuestAddress(PD_ADDR + idx * 8)).unwrap();
        assert_eq!(pde, 0xc000_0000 | 0x83);
    }
}
