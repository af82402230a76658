//! The x86_64 guest physical memory map of a b2p microVM.
//!
//! ```text
//! 0x0000_0500  boot GDT               0x0000_0520  boot IDT (empty)
//! 0x0000_6000  PVH hvm_start_info     0x0000_6040  PVH module list
//! 0x0000_6100  PVH memory map         0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack top         0x0000_9000  PML4, PDPT, 4 PDs (identity map of 4 GiB)
//! 0x0002_0000  kernel command line    0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first) up to 1 MiB
//! 0x0010_0000  kernel (bzImage protected-mode code / vmlinux as linked)
//! ...          initrd, as high as the kernel allows
//! 0xc000_0000  MMIO hole (1 GiB): boot timer page, virtio-mmio slots, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Boot IDT (limit 7: no vectors; the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map (room for 160 entries).
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux zero page (`struct boot_params`), in `rsi` at the 64-bit entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the 4 page directories (2 MiB pages) mapping 0..4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// How much the boot page tables identity-map (2 MiB pages).
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we place (the kernel's own limit may be lower).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Extended BIOS data area (reserved in the E820 map).
pub const EBDA_START: u64 = 0x9fc00;
/// End of the legacy low memory (VGA hole follows).
pub const LOW_MEM_END: u64 = 0xa0000;
/// ACPI tables: the RSDP is here (old kernels scan 0xE0000..0xFFFFF only).
pub const ACPI_START: u64 = 0xe0000;
/// Address of the RSDP (also in `boot_params.acpi_rsdp_addr`).
pub const RSDP_ADDR: u64 = ACPI_START;
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// First byte of "high" RAM: where the kernel is loaded.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the MMIO hole (up to 4 GiB).
pub const MMIO_HOLE_SIZE: u64 = 0x4000_0000;
/// First address above 4 GiB, where RAM beyond 3 GiB continues.
pub const RAM_ABOVE_4G_START: u64 = 1 << 32;

/// Size of one device MMIO slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// Range the VMM allocates device MMIO slots from; the first slot is the boot timer.
pub const DEVICE_MMIO_START: u64 = MMIO_HOLE_START;
/// End (inclusive) of the device MMIO slot range (256 MiB).
pub const DEVICE_MMIO_END: u64 = 0xcfff_ffff;
/// The Firecracker-compatible boot timer (first MMIO slot; no `_CRS` claims it).
pub const BOOT_TIMER_ADDR: u64 = MMIO_HOLE_START;
/// The guest writes this byte to the boot timer when boot is complete.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;

/// COM1 port base and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 IRQ (GSI).
pub const COM1_IRQ: u32 = 4;
/// i8042 ports 0x60..=0x64 (data at 0x60, command/status at 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Size of the i8042 port range.
pub const I8042_PORT_LEN: u16 = 5;
/// POST code port: the probe's first instruction writes here; a silent sink.
pub const POST_CODE_PORT: u16 = 0x80;
/// ACPI SLEEP_CONTROL and SLEEP_STATUS registers (one byte, both here).
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// The SLP_TYP of S5 announced by `_S5_` in the DSDT.
pub const S5_SLEEP_TYPE: u8 = 5;

/// First GSI handed to devices (after the legacy ISA IRQs in use).
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Last GSI handed to devices (last IOAPIC pin).
pub const LAST_DEVICE_GSI: u32 = IOAPIC_PINS - 1;

/// Most vCPUs: xAPIC ids are 8 bits and 0xff is broadcast.
pub const MAX_VCPUS: usize = 254;
/// Smallest guest memory b2p accepts, in MiB: below this even the probe's
/// fixed layout (zero page, page tables, kernel at 1 MiB, initrd) gets cramped
/// and no Linux kernel boots.
pub const MIN_MEMORY_MIB: u64 = 32;

/// End (exclusive) of RAM below the MMIO hole for a guest of `mem_size` bytes.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// The guest RAM regions (start, size) for a guest of `mem_size` bytes:
/// one region up to 3 GiB, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = low_ram_end(mem_size);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_HOLE_START {
        regions.push((
            GuestAddress(RAM_ABOVE_4G_START),
            (mem_size - MMIO_HOLE_START) as usize,
        ));
    }
    regions
}

// The fixed areas do not overlap (checked at compile time).
const _: () = {
    assert!(PVH_MEMMAP_ADDR + 160 * 24 <= ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + 4096 <= BOOT_STACK_POINTER);
    assert!(PD_ADDR + 4 * 4096 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(DEVICE_MMIO_END < IOAPIC_ADDR as u64);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_hole() {
        assert_eq!(ram_regions(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        assert_eq!(ram_regions(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(1 << 32), 1 << 30)]
        );
    }
}
