//! The guest memory map (E820), shared by the Linux zero page and the PVH
//! `hvm_start_info` (both use the same type numbers).

use crate::layout::*;

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved (EBDA, MMIO hole).
pub const E820_RESERVED: u32 = 2;
/// ACPI tables (reclaimable).
pub const E820_ACPI: u32 = 3;

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    const fn new(addr: u64, size: u64, kind: u32) -> Self {
        E820Entry { addr, size, kind }
    }
}

/// The memory map of a guest with `mem_size` bytes of RAM, in address order:
/// low RAM, the EBDA (reserved), the ACPI area, RAM from 1 MiB to the hole,
/// the MMIO hole (reserved) and RAM above 4 GiB when there is more than 3 GiB.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = low_ram_end(mem_size);
    let mut map = vec![
        E820Entry::new(0, EBDA_START, E820_RAM),
        E820Entry::new(EBDA_START, LOW_MEM_END - EBDA_START, E820_RESERVED),
        E820Entry::new(ACPI_START, ACPI_END - ACPI_START, E820_ACPI),
    ];
    if low_end > HIGH_RAM_START {
        map.push(E820Entry::new(
            HIGH_RAM_START,
            low_end - HIGH_RAM_START,
            E820_RAM,
        ));
    }
    map.push(E820Entry::new(
        MMIO_HOLE_START,
        MMIO_HOLE_SIZE,
        E820_RESERVED,
    ));
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry::new(
            RAM_ABOVE_4G_START,
            mem_size - MMIO_HOLE_START,
            E820_RAM,
        ));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn map_64_mib() {
        let map = memory_map(64 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry::new(0, 0x9fc00, E820_RAM),
                E820Entry::new(0x9fc00, 0x400, E820_RESERVED),
                E820Entry::new(0xe0000, 0x20000, E820_ACPI),
                E820Entry::new(0x10_0000, (64 << 20) - 0x10_0000, E820_RAM),
                E820Entry::new(0xc000_0000, 0x4000_0000, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn map_512_mib() {
        let map = memory_map(512 << 20);
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[3],
            E820Entry::new(0x10_0000, (512 << 20) - 0x10_0000, E820_RAM)
        );
        // RAM below 1 MiB that is not listed: EBDA, VGA hole, ACPI area.
        assert_eq!(ram_total(&map), (512 << 20) - 0x60400);
    }

    #[test]
    fn map_4096_mib_goes_above_4g() {
        let map = memory_map(4096 << 20);
        assert_eq!(map.len(), 6);
        assert_eq!(
            map[3],
            E820Entry::new(0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM)
        );
        assert_eq!(
            map[4],
            E820Entry::new(0xc000_0000, 0x4000_0000, E820_RESERVED)
        );
        assert_eq!(map[5], E820Entry::new(1 << 32, 1 << 30, E820_RAM));
        // Sorted and non-overlapping.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }
}
