//! Errors of the b2p-vmm library. Messages carry context only; the cause
//! is the `source()` chain (print with anyhow's `{:#}` to get both).

use std::path::PathBuf;

use crate::config::ConfigError;

/// Why a VM could not be built, or why it ended badly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kernel {}", path.display())]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {}", path.display())]
    Kernel {
        path: PathBuf,
        #[source]
        source: b2p_boot::Error,
    },
    #[error("initrd {}", path.display())]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {}", path.display())]
    Initrd {
        path: PathBuf,
        #[source]
        source: b2p_boot::Error,
    },
    #[error("initrd {} ({size} bytes) is larger than guest memory ({memory_mib} MiB)", path.display())]
    InitrdLargerThanMemory {
        path: PathBuf,
        size: u64,
        memory_mib: u64,
    },
    #[error("cannot open /dev/kvm: {0}{hint}", hint = kvm_hint(.0))]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM lacks a required capability: {0}")]
    KvmCapability(&'static str),
    #[error("{vcpus} vCPUs requested but KVM supports at most {max}")]
    TooManyVcpus { vcpus: usize, max: usize },
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest boot setup")]
    Boot(#[from] b2p_boot::Error),
    #[error("console file {}", path.display())]
    ConsoleFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("console file {} is the disk image {} (give the console another file)", path.display(), disk.display())]
    ConsoleIsDisk { path: PathBuf, disk: PathBuf },
    #[error("console file {} is in use by another VM", path.display())]
    ConsoleInUse { path: PathBuf },
    #[error("console file {} is a symbolic link (give the file it points to)", path.display())]
    ConsoleSymlink { path: PathBuf },
    #[error("console file {} is a FIFO that nobody reads", path.display())]
    ConsoleFifo { path: PathBuf },
    #[error("disk {}: {reason}", path.display())]
    Disk { path: PathBuf, reason: String },
    #[error("the guest triple-faulted before it wrote to its console: is {} a complete kernel for x86_64?", kernel.display())]
    TripleFaultBeforeOutput { kernel: PathBuf },
    #[error("terminal")]
    Terminal(#[source] std::io::Error),
    #[error("device setup: {0}")]
    Device(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {vcpu}: {reason}")]
    Vcpu { vcpu: usize, reason: String },
    #[error("vCPU {vcpu}: {exit} at RIP {rip:#x}, instruction bytes [{insn}]")]
    GuestFault {
        vcpu: usize,
        exit: String,
        rip: u64,
        insn: String,
    },
}

fn kvm_hint(e: &kvm_ioctls::Error) -> &'static str {
    match e.errno() {
        libc::ENOENT => " (no KVM on this host: load kvm-intel/kvm-amd or enable virtualization)",
        libc::EACCES | libc::EPERM => {
            " (add the user to the kvm group or fix the device's permissions)"
        }
        _ => "",
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
