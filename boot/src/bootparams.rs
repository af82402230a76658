//! What the kernel reads at entry: the command line, the Linux zero page
//! (`struct boot_params`, 64-bit boot protocol) or the PVH `hvm_start_info`.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::e820::memory_map;
use crate::kernel::LoadedKernel;
use crate::layout::*;
use crate::{write_guest, Error, GuestMemoryMmap, Result};

/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;
/// `loadflags` bit: `heap_end_ptr` is valid.
const CAN_USE_HEAP: u8 = 0x80;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// An initrd in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Check and write the NUL-terminated command line at [`CMDLINE_ADDR`].
pub fn write_cmdline(mem: &GuestMemoryMmap, kernel: &LoadedKernel, cmdline: &str) -> Result<()> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }
    if cmdline.len() > kernel.cmdline_max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: kernel.cmdline_max,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write_guest(mem, &bytes, CMDLINE_ADDR)
}

/// The zero page for a kernel entered through the 64-bit boot protocol.
pub fn zero_page(
    kernel: &LoadedKernel,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> boot_params {
    let hdr = kernel.setup_header.unwrap_or_else(|| setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT,
        ..Default::default()
    });
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = RSDP_ADDR;
    let map = memory_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

/// Write the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> Result<()> {
    let params = zero_page(kernel, mem_size, cmdline_len, initrd);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| Error::GuestMemory {
            addr: ZERO_PAGE_ADDR,
            source,
        })
}

/// Write `hvm_start_info` (version 1), its module list (the initrd) and its
/// memory map, for a kernel entered through PVH.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<Initrd>,
) -> Result<()> {
    let map = memory_map(mem_size);
    let mut memmap = Vec::new();
    for e in &map {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        memmap.extend_from_slice(entry.as_slice());
    }
    write_guest(mem, &memmap, PVH_MEMMAP_ADDR)?;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        write_guest(mem, module.as_slice(), PVH_MODLIST_ADDR)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    write_guest(mem, info.as_slice(), PVH_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::EntryPoint;

    fn kernel() -> LoadedKernel {
        LoadedKernel {
            entry: EntryPoint::Linux64(0x10_0200),
            setup_header: Some(setup_header {
                boot_flag: KERNEL_BOOT_FLAG_MAGIC,
                header: KERNEL_HDR_MAGIC,
                version: 0x020f,
                cmdline_size: 2048,
                ..Default::default()
            }),
            load_addr: 0x10_0000,
            end: 0x50_0000,
            cmdline_max: 2047,
            initrd_addr_max: 0x7fff_ffff,
        }
    }

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    #[test]
    fn cmdline_is_nul_terminated_at_its_address() {
        let m = mem(64 << 20);
        write_cmdline(&m, &kernel(), "console=ttyS0 b2p.x=1").unwrap();
        let mut buf = [0u8; 22];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 b2p.x=1\0");
    }

    #[test]
    fn cmdline_limits() {
        let m = mem(64 << 20);
        let long = "a".repeat(2048);
        assert!(matches!(
            write_cmdline(&m, &kernel(), &long),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(write_cmdline(&m, &kernel(), &long[..2047]).is_ok());
        assert!(matches!(
            write_cmdline(&m, &kernel(), "a\0b"),
            Err(Error::CmdlineNul)
        ));
    }

    #[test]
    fn zero_page_fields() {
        let rd = Initrd {
            addr: 0x300_0000,
            size: 1234,
        };
        let p = zero_page(&kernel(), 512 << 20, 10, Some(rd));
        let (image, size, ptr, rsdp) = (
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.hdr.cmd_line_ptr,
            p.acpi_rsdp_addr,
        );
        assert_eq!((image, size), (0x300_0000, 1234));
        assert_eq!(ptr, CMDLINE_ADDR as u32);
        assert_eq!(rsdp, 0xe0000);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!(p.e820_entries, 5);
        let e = p.e820_table[3];
        let (addr, sz, ty) = (e.addr, e.size, e.r#type);
        assert_eq!((addr, sz, ty), (0x10_0000, (512 << 20) - 0x10_0000, 1));
        // acpi_rsdp_addr sits at zero-page offset 0x070.
        let raw = p.as_slice();
        assert_eq!(&raw[0x70..0x78], &0xe0000u64.to_le_bytes());
        assert_eq!(&raw[0x202..0x206], b"HdrS");
    }

    #[test]
    fn pvh_start_info_layout() {
        let m = mem(4096 << 20);
        let rd = Initrd {
            addr: 0x100_0000,
            size: 42,
        };
        write_pvh_start_info(&m, 4096 << 20, Some(rd)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 6);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((module.paddr, module.size), (0x100_0000, 42));
        let last: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 5 * 24)).unwrap();
        assert_eq!((last.addr, last.size, last.type_), (1 << 32, 1 << 30, 1));
    }
}
