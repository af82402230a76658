//! b2p-boot: everything about an x86_64 guest that can be computed without
//! `/dev/kvm`.
//!
//! - [`layout`]: the guest physical memory map (RAM, MMIO hole, fixed
//!   addresses of the zero page, page tables, ACPI area, devices).
//! - [`kernel`]: loading a bzImage (64-bit entry) or an ELF vmlinux (PVH note
//!   when present) and placing the initrd.
//! - [`e820`]: the memory map handed to the guest.
//! - [`bootparams`]: the Linux zero page and the PVH `hvm_start_info`.
//! - [`acpi`]: RSDP, XSDT, FADT, MADT and DSDT.
//! - [`paging`]: identity page tables and the boot GDT.
//! - [`cpu`]: initial registers, CPUID, MSRs and LAPIC setup of a vCPU,
//!   as pure functions over `kvm-bindings` types.
//!
//! Every function works on guest memory and plain data, so the whole crate is
//! unit-tested without KVM.

pub mod acpi;
pub mod bootparams;
pub mod cpu;
pub mod e820;
pub mod kernel;
pub mod layout;
pub mod paging;

/// Guest memory as the boot code sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Everything that can go wrong while preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the kernel image")]
    KernelRead(#[source] std::io::Error),
    #[error("not a Linux kernel: neither a bzImage nor an ELF vmlinux")]
    NotAKernel,
    #[error("bzImage boot protocol {major}.{minor:02} is too old (2.12 or newer needed)")]
    BootProtocolTooOld { major: u16, minor: u16 },
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")]
    No64BitEntry,
    #[error("cannot load the kernel: {0}")]
    KernelLoad(linux_loader::loader::Error),
    #[error("guest memory too small for the kernel: it needs {needed} bytes from {start:#x}, RAM ends at {ram_end:#x}")]
    KernelTooBig {
        start: u64,
        needed: u64,
        ram_end: u64,
    },
    #[error("cannot read the initrd")]
    InitrdRead(#[source] std::io::Error),
    #[error("initrd of {size} bytes does not fit in guest memory ({available} bytes free between the kernel and {limit:#x}); raise --memory")]
    InitrdTooBig {
        size: u64,
        available: u64,
        limit: u64,
    },
    #[error("command line of {len} bytes is longer than the kernel accepts ({max} bytes)")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("too many devices for the ACPI area ({size} bytes of tables, {max} available)")]
    AcpiTooLarge { size: usize, max: usize },
    #[error("unsupported vCPU count {0} (1 to {max})", max = layout::MAX_VCPUS)]
    VcpuCount(usize),
    #[error("writing guest memory at {addr:#x}")]
    GuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("CPUID: {0}")]
    Cpuid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Write `data` at `addr`, mapping the error.
pub(crate) fn write_guest(mem: &GuestMemoryMmap, data: &[u8], addr: u64) -> Result<()> {
    use vm_memory::{Bytes, GuestAddress};
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { addr, source })
}
