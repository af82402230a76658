//! The steps of building a VM, in the order [`crate::Vm::start`] runs them:
//! open the host inputs (fail before touching KVM), create the VM and its
//! memory, load the guest image, create the devices, create the vCPUs.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use b2p_boot::acpi::VirtioMmioSlot;
use b2p_boot::bootparams::{self, Initrd};
use b2p_boot::kernel::{self, EntryPoint};
use b2p_boot::layout::ram_regions;
use b2p_boot::paging::{self, CpuMode};
use b2p_devices::legacy::{ConsoleOutput, EventSink, SerialDevice};
use event_manager::SubscriberOps;
use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Console, VmConfig};
use crate::console::{self, ConsoleFlusher, OpenedConsole};
use crate::devices::DeviceManager;
use crate::error::{Error, Result};
use crate::event_loop::{self, Manager, Subscriber};
use crate::{vcpu, virtio, GuestMemoryMmap};

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Prints `b2p-vmm: timing NAME_us=N` lines when timings are on.
pub struct StageClock {
    pub start_ns: u64,
    pub enabled: bool,
}

impl StageClock {
    pub fn since_start_us(&self) -> u64 {
        crate::monotonic_ns().saturating_sub(self.start_ns) / 1000
    }

    pub fn stage(&self, name: &str) {
        if self.enabled {
            eprintln!("b2p-vmm: timing {name}_us={}", self.since_start_us());
        }
    }
}

/// Host files the VM needs, opened and checked up front.
pub struct HostInputs {
    kernel: File,
    initrd: Option<(PathBuf, File, u64)>,
    pub console: OpenedConsole,
}

/// Opens a kernel or initrd without blocking (a FIFO must not hang setup)
/// and checks that it is a regular file.
fn open_image(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // Reads of a regular file never block; clear the flag anyway.
    // SAFETY: fcntl on an fd we own; no memory is passed.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
    Ok(f)
}

/// Refuses a disk that cannot be one before the device opens it (a FIFO
/// would hang the open, a directory has no sectors): a regular file of at
/// least one sector, or a block device.
fn check_disk(path: &Path) -> Result<()> {
    let bad = |reason: String| Error::Disk {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(bad("is a directory, not a disk image".into()));
    }
    if kind.is_block_device() {
        return Ok(());
    }
    if !kind.is_file() {
        return Err(bad("is not a regular file or block device".into()));
    }
    if meta.len() < 512 {
        return Err(bad(format!(
            "is {} bytes, less than one 512-byte sector (make it with truncate -s SIZE)",
            meta.len()
        )));
    }
    Ok(())
}

impl HostInputs {
    pub fn open(config: &VmConfig) -> Result<Self> {
        let mut kernel = open_image(&config.kernel).map_err(|source| Error::KernelOpen {
            path: config.kernel.clone(),
            source,
        })?;
        kernel::detect_format(&mut kernel).map_err(|source| Error::Kernel {
            path: config.kernel.clone(),
            source,
        })?;
        let initrd = match &config.initrd {
            None => None,
            Some(path) => {
                let open_err = |source| Error::InitrdOpen {
                    path: path.clone(),
                    source,
                };
                let f = open_image(path).map_err(open_err)?;
                let size = f.metadata().map_err(open_err)?.len();
                if size > config.memory_bytes() {
                    return Err(Error::InitrdLargerThanMemory {
                        path: path.clone(),
                        size,
                        memory_mib: config.memory_mib,
                    });
                }
                Some((path.clone(), f, size))
            }
        };
        for d in &config.disks {
            check_disk(&d.path)?;
        }
        let disks: Vec<PathBuf> = config.disks.iter().map(|d| d.path.clone()).collect();
        let console = console::open_output(&config.console, &disks)?;
        Ok(HostInputs {
            kernel,
            initrd,
            console,
        })
    }
}

/// `/dev/kvm`, a VM with its guest memory registered (before the irqchip:
/// DESIGN §3) and the in-kernel irqchip.
pub fn create_vm(config: &VmConfig) -> Result<(Kvm, VmFd, GuestMemoryMmap)> {
    let (kvm, vm_fd) = crate::kvm::create_vm()?;
    let max = kvm.get_max_vcpus();
    if config.vcpus > max {
        return Err(Error::TooManyVcpus {
            vcpus: config.vcpus,
            max,
        });
    }
    // vhost-user backends map guest memory themselves: a shared memfd.
    let shared = config.shared_memory || !config.fs.is_empty();
    let mem = crate::memory::create(
        &ram_regions(config.memory_bytes()),
        config.memory_mib,
        shared,
    )?;
    crate::kvm::register_memory(&vm_fd, &mem)?;
    crate::kvm::create_irqchip(&vm_fd)?;
    Ok((kvm, vm_fd, mem))
}

/// The guest command line: the configured one, plus `virtio_mmio.device=`
/// hints when asked for.
pub fn guest_cmdline(config: &VmConfig, slots: &[VirtioMmioSlot]) -> String {
    let mut cmdline = config.effective_cmdline();
    if config.virtio_mmio_cmdline {
        for s in slots {
            if !cmdline.is_empty() && !cmdline.ends_with(' ') {
                cmdline.push(' ');
            }
            cmdline.push_str(&format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                s.size >> 10,
                s.base,
                s.gsi
            ));
        }
    }
    cmdline
}

/// Load kernel and initrd and write `cmdline`, the zero page (or PVH start
/// info), page tables and GDT. Returns the entry point.
pub fn load_guest_image(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    inputs: &mut HostInputs,
    cmdline: &str,
) -> Result<EntryPoint> {
    let mem_size = config.memory_bytes();
    let loaded =
        kernel::load_kernel(mem, mem_size, &mut inputs.kernel).map_err(|source| Error::Kernel {
            path: config.kernel.clone(),
            source,
        })?;
    let initrd = match inputs.initrd.as_mut() {
        None => None,
        Some((path, f, size)) => {
            let addr = kernel::load_initrd(mem, mem_size, &loaded, f, *size).map_err(|source| {
                Error::Initrd {
                    path: path.clone(),
                    source,
                }
            })?;
            Some(Initrd { addr, size: *size })
        }
    };
    bootparams::write_cmdline(mem, &loaded, cmdline)?;
    match loaded.entry {
        EntryPoint::Linux64(_) => {
            bootparams::write_zero_page(mem, &loaded, mem_size, cmdline.len(), initrd)?;
            paging::write_page_tables(mem)?;
            paging::write_gdt(mem, CpuMode::Long)?;
        }
        EntryPoint::Pvh(_) => {
            bootparams::write_pvh_start_info(mem, mem_size, initrd)?;
            paging::write_gdt(mem, CpuMode::Protected32)?;
        }
    }
    Ok(loaded.entry)
}

/// The devices of a VM and the event manager their backends live on.
pub struct Devices {
    pub manager: DeviceManager,
    pub event_manager: Manager,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Set when stdin is a terminal the console reads (fires when the
    /// serial FIFO drains).
    pub input_ready: Option<EventFd>,
    /// The helper processes started for `--net passt` and `--fs path=`
    /// (ended when dropped).
    pub passt: Vec<crate::child::Helper>,
}

/// Sets the process umask to 0177 (files and sockets 0600) until dropped.
/// The umask is process-wide: files another thread of an embedding program
/// creates meanwhile get it too (more private, never less).
struct PrivateUmask(libc::mode_t);

impl PrivateUmask {
    fn set() -> Self {
        // SAFETY: umask only swaps the process's file-creation mask.
        PrivateUmask(unsafe { libc::umask(0o177) })
    }
}

impl Drop for PrivateUmask {
    fn drop(&mut self) {
        // SAFETY: as in `set`.
        unsafe { libc::umask(self.0) };
    }
}

/// Legacy devices, virtio devices, the console's output flusher, and the
/// ACPI tables that announce them.
pub fn create_devices(
    config: &VmConfig,
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    output: ConsoleOutput,
    events: EventSink,
    start_ns: u64,
) -> Result<Devices> {
    let mut event_manager = event_loop::new_manager()?;
    let mut manager = DeviceManager::new()?;
    let mut passt = Vec::new();
    let interactive = config.console == Console::Stdio && console::stdin_is_tty();
    let input_ready = if interactive {
        Some(EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?)
    } else {
        None
    };
    let ready_clone = input_ready
        .as_ref()
        .map(|e| e.try_clone())
        .transpose()
        .map_err(io("eventfd"))?;
    let serial = manager.add_legacy(
        vm_fd,
        output,
        ready_clone,
        events,
        config.boot_timer.then_some(start_ns),
    )?;
    if config.console != Console::None {
        let flusher: Subscriber = Arc::new(Mutex::new(ConsoleFlusher::new(serial.clone())?));
        event_manager.add_subscriber(flusher);
    }
    {
        // The vsock sockets are bound 0600 whatever the caller's umask:
        // bind(2) creates them with this mask applied, so there is no
        // moment at which another user could connect.
        let _private = PrivateUmask::set();
        virtio::add_devices(
            config,
            vm_fd,
            mem,
            &mut event_manager,
            &mut manager,
            &mut passt,
        )?;
    }
    b2p_boot::acpi::write_tables(mem, config.vcpus, &manager.virtio_slots)?;
    Ok(Devices {
        manager,
        event_manager,
        serial,
        input_ready,
        passt,
    })
}

/// Create and configure every vCPU (registers on the boot vCPU only).
pub fn create_vcpus(
    vm_fd: &VmFd,
    supported: &CpuId,
    count: usize,
    entry: EntryPoint,
) -> Result<Vec<VcpuFd>> {
    let mut fds = Vec::with_capacity(count);
    for i in 0..count {
        fds.push(vcpu::create_vcpu(vm_fd, supported, i, count, entry)?);
    }
    vcpu::install_kick_handler()?;
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_mmio_cmdline_hints() {
        let slots = [
            VirtioMmioSlot {
                base: 0xc000_1000,
                size: 0x1000,
                gsi: 5,
            },
            VirtioMmioSlot {
                base: 0xc000_2000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        let mut c = VmConfig::new("k");
        c.cmdline = "console=ttyS0".into();
        assert_eq!(guest_cmdline(&c, &slots), "console=ttyS0");
        c.virtio_mmio_cmdline = true;
        assert_eq!(
            guest_cmdline(&c, &slots),
            "console=ttyS0 virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=4K@0xc0002000:6"
        );
    }
}
