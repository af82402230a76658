//! Loading the guest kernel (bzImage with a 64-bit entry, or ELF vmlinux
//! with or without a PVH note) and placing the initrd.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use crate::layout::{low_ram_end, CMDLINE_MAX_SIZE, HIGH_RAM_START};
use crate::{Error, GuestMemoryMmap, Result};

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS", the setup header magic at 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `xloadflags`: the kernel has the 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the protected-mode code start.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Default `initrd_addr_max` for boot protocols older than 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE: u64 = 4096;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit Linux boot protocol: long mode, `rsi` = zero page.
    Linux64(u64),
    /// PVH: 32-bit protected mode without paging, `ebx` = `hvm_start_info`.
    Pvh(u64),
}

impl EntryPoint {
    /// The guest address of the first instruction.
    pub fn addr(self) -> u64 {
        match self {
            EntryPoint::Linux64(a) | EntryPoint::Pvh(a) => a,
        }
    }
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// The bzImage setup header (to be copied into the zero page).
    pub setup_header: Option<setup_header>,
    /// Where the kernel was loaded.
    pub load_addr: u64,
    /// First byte past the memory the kernel claims (image or `init_size`).
    pub end: u64,
    /// Longest command line the kernel accepts, without the NUL.
    pub cmdline_max: usize,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

/// Which kind of file `image` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Recognise a bzImage ("HdrS" at 0x202) or an ELF file.
pub fn detect_format<F: Read + Seek>(image: &mut F) -> Result<KernelFormat> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0)).map_err(Error::KernelRead)?;
    if read_full(image, &mut magic)? && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    image
        .seek(SeekFrom::Start(0x202))
        .map_err(Error::KernelRead)?;
    if read_full(image, &mut magic)? && u32::from_le_bytes(magic) == HDRS_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::NotAKernel)
}

/// Read exactly `buf.len()` bytes; `Ok(false)` at end of file.
fn read_full<F: Read>(f: &mut F, buf: &mut [u8]) -> Result<bool> {
    match f.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::KernelRead(e)),
    }
}

/// Load a kernel image into guest memory of `mem_size` bytes.
pub fn load_kernel<F>(mem: &GuestMemoryMmap, mem_size: u64, image: &mut F) -> Result<LoadedKernel>
where
    F: Read + Seek + ReadVolatile,
{
    match detect_format(image)? {
        KernelFormat::BzImage => load_bzimage(mem, mem_size, image),
        KernelFormat::Elf => load_elf(mem, mem_size, image),
    }
}

fn read_setup_header<F: Read + Seek>(image: &mut F) -> Result<setup_header> {
    let mut hdr = setup_header::default();
    // SAFETY-free: setup_header is ByteValued (plain old data).
    let bytes = vm_memory::ByteValued::as_mut_slice(&mut hdr);
    image
        .seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(Error::KernelRead)?;
    if !read_full(image, bytes)? {
        return Err(Error::NotAKernel);
    }
    Ok(hdr)
}

fn load_bzimage<F>(mem: &GuestMemoryMmap, mem_size: u64, image: &mut F) -> Result<LoadedKernel>
where
    F: Read + Seek + ReadVolatile,
{
    let hdr = read_setup_header(image)?;
    let version = hdr.version;
    if version < 0x020c {
        return Err(Error::BootProtocolTooOld {
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::No64BitEntry);
    }
    let file_len = image.seek(SeekFrom::End(0)).map_err(Error::KernelRead)?;
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let payload = file_len.saturating_sub((setup_sects + 1) * 512);
    let needed = payload.max(u64::from(hdr.init_size));
    let ram_end = low_ram_end(mem_size);
    if HIGH_RAM_START + needed > ram_end {
        return Err(Error::KernelTooBig {
            start: HIGH_RAM_START,
            needed,
            ram_end,
        });
    }
    let res = BzImage::load(mem, Some(GuestAddress(HIGH_RAM_START)), image, None)
        .map_err(Error::KernelLoad)?;
    let load = res.kernel_load.0;
    let cmdline_max = (hdr.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1);
    let initrd_addr_max = if hdr.initrd_addr_max == 0 {
        DEFAULT_INITRD_ADDR_MAX
    } else {
        u64::from(hdr.initrd_addr_max)
    };
    Ok(LoadedKernel {
        entry: EntryPoint::Linux64(load + STARTUP_64_OFFSET),
        setup_header: res.setup_header.or(Some(hdr)),
        load_addr: load,
        end: load + needed,
        cmdline_max,
        initrd_addr_max,
    })
}

fn load_elf<F>(mem: &GuestMemoryMmap, mem_size: u64, image: &mut F) -> Result<LoadedKernel>
where
    F: Read + Seek + ReadVolatile,
{
    let res = Elf::load(mem, None, image, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(Error::KernelLoad)?;
    let entry = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.0),
        _ => EntryPoint::Linux64(res.kernel_load.0),
    };
    let ram_end = low_ram_end(mem_size);
    if res.kernel_end > ram_end {
        return Err(Error::KernelTooBig {
            start: res.kernel_load.0,
            needed: res.kernel_end.saturating_sub(res.kernel_load.0),
            ram_end,
        });
    }
    Ok(LoadedKernel {
        entry,
        setup_header: None,
        load_addr: res.kernel_load.0,
        end: res.kernel_end,
        cmdline_max: CMDLINE_MAX_SIZE - 1,
        initrd_addr_max: ram_end - 1,
    })
}

/// Where the initrd goes: page-aligned, as high as possible below both
/// `initrd_addr_max` and the end of low RAM, above the kernel.
pub fn initrd_placement(kernel: &LoadedKernel, mem_size: u64, size: u64) -> Result<u64> {
    let limit = kernel
        .initrd_addr_max
        .saturating_add(1)
        .min(low_ram_end(mem_size));
    let lowest = kernel.end.div_ceil(PAGE) * PAGE;
    let available = limit.saturating_sub(lowest);
    if size > available {
        return Err(Error::InitrdTooBig {
            size,
            available,
            limit,
        });
    }
    Ok((limit - size) / PAGE * PAGE)
}

/// Read an initrd of `size` bytes into guest memory; returns its address.
pub fn load_initrd<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    initrd: &mut F,
    size: u64,
) -> Result<u64> {
    let addr = initrd_placement(kernel, mem_size, size)?;
    if size > 0 {
        mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
            .map_err(|e| match e {
                vm_memory::GuestMemoryError::IOError(io) => Error::InitrdRead(io),
                other => Error::GuestMemory {
                    addr,
                    source: other,
                },
            })?;
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&crate::layout::ram_regions(size)).unwrap()
    }

    /// A minimal bzImage: 1 setup sector + boot sector, then `payload` bytes.
    pub(crate) fn fake_bzimage(version: u16, xloadflags: u16, payload: usize) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512 + payload];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&(4u32 << 20).to_le_bytes()); // init_size
        for (i, b) in img[1024..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        img
    }

    #[test]
    fn loads_a_bzimage_with_64bit_entry() {
        let m = mem(64 << 20);
        let img = fake_bzimage(0x020f, XLF_KERNEL_64, 8192);
        let k = load_kernel(&m, 64 << 20, &mut Cursor::new(img)).unwrap();
        assert_eq!(k.entry, EntryPoint::Linux64(0x10_0200));
        assert_eq!(k.end, 0x10_0000 + (4 << 20));
        assert_eq!(k.cmdline_max, 2048);
        let b: u8 = m.read_obj(GuestAddress(0x10_0000 + 300)).unwrap();
        assert_eq!(b, (300 % 251) as u8);
    }

    #[test]
    fn refuses_bzimage_without_64bit_entry() {
        let m = mem(64 << 20);
        let img = fake_bzimage(0x020f, 0, 8192);
        let e = load_kernel(&m, 64 << 20, &mut Cursor::new(img)).unwrap_err();
        assert!(matches!(e, Error::No64BitEntry), "{e}");
        let img = fake_bzimage(0x0209, 1, 8192);
        let e = load_kernel(&m, 64 << 20, &mut Cursor::new(img)).unwrap_err();
        assert!(matches!(e, Error::BootProtocolTooOld { .. }), "{e}");
    }

    #[test]
    fn refuses_non_kernels() {
        let m = mem(64 << 20);
        for data in [vec![], vec![0u8; 100], vec![0x42u8; 10000]] {
            let e = load_kernel(&m, 64 << 20, &mut Cursor::new(data)).unwrap_err();
            assert!(matches!(e, Error::NotAKernel), "{e}");
        }
    }

    #[test]
    fn kernel_larger_than_memory() {
        let m = mem(32 << 20);
        let img = fake_bzimage(0x020f, 1, 40 << 20);
        let e = load_kernel(&m, 32 << 20, &mut Cursor::new(img)).unwrap_err();
        assert!(matches!(e, Error::KernelTooBig { .. }), "{e}");
    }

    /// An ELF64 with one PT_LOAD of `code` at 16 MiB and, optionally, a
    /// PT_NOTE holding Xen's PHYS32_ENTRY note.
    fn fake_elf(code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let load: u64 = 0x100_0000;
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&load.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        let ph = |f: &mut Vec<u8>, i: usize, ty: u32, off: u64, addr: u64, len: u64| {
            let p = &mut f[64 + i * 56..64 + (i + 1) * 56];
            p[0..4].copy_from_slice(&ty.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&len.to_le_bytes());
            p[40..48].copy_from_slice(&len.to_le_bytes());
        };
        ph(&mut f, 0, 1, 0x1000, load, code.len() as u64);
        if let Some(entry) = pvh_entry {
            // namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry
            let mut note = Vec::new();
            for v in [4u32, 4, 18] {
                note.extend_from_slice(&v.to_le_bytes());
            }
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
            f[0x800..0x800 + note.len()].copy_from_slice(&note);
            ph(&mut f, 1, 4, 0x800, 0, note.len() as u64);
        }
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn loads_an_elf_vmlinux_with_and_without_pvh() {
        let m = mem(64 << 20);
        let k = load_kernel(&m, 64 << 20, &mut Cursor::new(fake_elf(&[0xf4; 64], None))).unwrap();
        assert_eq!(k.entry, EntryPoint::Linux64(0x100_0000));
        assert!(k.setup_header.is_none());
        let b: u8 = m.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(b, 0xf4);
        let img = fake_elf(&[0xf4; 64], Some(0x100_0020));
        let k = load_kernel(&m, 64 << 20, &mut Cursor::new(img)).unwrap();
        assert_eq!(k.entry, EntryPoint::Pvh(0x100_0020));
        // The initrd goes above the kernel, below the end of RAM.
        let addr = initrd_placement(&k, 64 << 20, 4096).unwrap();
        assert!(addr >= k.end && addr + 4096 <= 64 << 20);
        // A kernel linked beyond guest memory is refused, not loaded half-way.
        let small = mem(32 << 20);
        let mut big = fake_elf(&[0xf4; 64], None);
        big.resize(0x1000 + (20 << 20), 0);
        big[96..104].copy_from_slice(&(20u64 << 20).to_le_bytes()); // p_filesz
        big[104..112].copy_from_slice(&(20u64 << 20).to_le_bytes()); // p_memsz
        assert!(load_kernel(&small, 32 << 20, &mut Cursor::new(big)).is_err());
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let m = mem(64 << 20);
        let img = fake_bzimage(0x020f, XLF_KERNEL_64, 8192);
        let k = load_kernel(&m, 64 << 20, &mut Cursor::new(img)).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let addr = load_initrd(&m, 64 << 20, &k, &mut Cursor::new(&data[..]), 10_000).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10_000 <= 64 << 20);
        assert!(addr + 10_000 + 4096 > 64 << 20);
        let mut back = vec![0u8; 10_000];
        m.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let img = fake_bzimage(0x020f, XLF_KERNEL_64, 8192);
        let m = mem(4096 << 20);
        let k = load_kernel(&m, 4096 << 20, &mut Cursor::new(img)).unwrap();
        let addr = initrd_placement(&k, 4096 << 20, 1 << 20).unwrap();
        assert_eq!(addr, 0x8000_0000 - (1 << 20));
    }

    #[test]
    fn initrd_too_big() {
        let m = mem(64 << 20);
        let img = fake_bzimage(0x020f, XLF_KERNEL_64, 8192);
        let k = load_kernel(&m, 64 << 20, &mut Cursor::new(img)).unwrap();
        // Larger than guest memory.
        let e = initrd_placement(&k, 64 << 20, 65 << 20).unwrap_err();
        assert!(matches!(e, Error::InitrdTooBig { .. }), "{e}");
        // Fits in memory but not above the kernel's init_size.
        let free = (64 << 20) - (0x10_0000 + (4 << 20));
        assert!(initrd_placement(&k, 64 << 20, free).is_ok());
        assert!(initrd_placement(&k, 64 << 20, free + 1).is_err());
    }
}
