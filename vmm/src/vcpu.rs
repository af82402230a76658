//! vCPUs: initial state, the run loop on its own thread, exit dispatch to the
//! PIO/MMIO buses, and the kick (a real-time signal whose handler sets
//! `immediate_exit`, so a kick can never be lost between the stop check and
//! KVM_RUN).

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};

use b2p_boot::kernel::EntryPoint;
use b2p_devices::bus::Bus;
use kvm_bindings::{
    kvm_run, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::vm::{Shared, VmExit};
use crate::GuestMemoryMmap;

/// The signal that kicks a vCPU out of KVM_RUN (offset from SIGRTMIN).
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping (set by the
        // vCPU thread before running and cleared before the VcpuFd is dropped).
        unsafe { (*p).immediate_exit = 1 };
    }
}

/// The kick signal number.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Install the kick handler (once per process).
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
    });
    res.map_err(|e| Error::Io {
        what: "installing the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Create vCPU `index` of `count` and set its initial state. Only the boot
/// vCPU gets registers; the others wait for INIT/SIPI.
pub fn create_vcpu(
    vm: &VmFd,
    supported_cpuid: &CpuId,
    index: usize,
    count: usize,
    entry: EntryPoint,
) -> Result<VcpuFd> {
    let vcpu = vm
        .create_vcpu(index as u64)
        .map_err(kvm("KVM_CREATE_VCPU"))?;
    let cpuid = b2p_boot::cpu::vcpu_cpuid(supported_cpuid, index, count)?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let entries = b2p_boot::cpu::boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu {
        vcpu: index,
        reason: format!("boot MSRs: {e:?}"),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        let failed = entries.get(written).map_or(0, |e| e.index);
        log::warn!("vCPU {index}: KVM refused boot MSR {failed:#x}; continuing without it");
    }
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    b2p_boot::cpu::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    if index == 0 {
        vcpu.set_fpu(&b2p_boot::cpu::fpu())
            .map_err(kvm("KVM_SET_FPU"))?;
        vcpu.set_regs(&b2p_boot::cpu::regs(entry))
            .map_err(kvm("KVM_SET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&b2p_boot::cpu::sregs(entry, &sregs))
            .map_err(kvm("KVM_SET_SREGS"))?;
    }
    Ok(vcpu)
}

/// One vCPU and what it needs to run.
pub struct Vcpu {
    pub index: usize,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub shared: Arc<Shared>,
}

/// What one exit means for the run loop.
enum Next {
    Continue,
    Exit(Result<VmExit>),
    Fault(Fault),
}

impl Vcpu {
    /// The vCPU thread body: run until the VM stops.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run_ptr));
        // Unblock the kick signal on this thread (the caller may block it).
        if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
            log::warn!("vCPU {}: cannot unblock the kick signal: {e}", self.index);
        }
        loop {
            if self.shared.stopping.load(Ordering::Acquire) {
                break;
            }
            let next = match self.fd.run() {
                Ok(exit) => {
                    self.shared.note_first_exit();
                    handle_exit(self.index, exit, run_ptr, &self.pio, &self.mmio)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    Next::Continue
                }
                Err(e) => Next::Exit(Err(Error::Vcpu {
                    vcpu: self.index,
                    reason: format!("KVM_RUN failed: {e}"),
                })),
            };
            match next {
                Next::Continue => {}
                Next::Fault(f) => {
                    let err = self.describe_fault(f);
                    self.shared.finish(Err(err));
                    break;
                }
                Next::Exit(r) => {
                    self.shared.finish(r);
                    break;
                }
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Turn a fault exit into an error naming the exit, RIP and instruction bytes.
    fn describe_fault(&mut self, f: Fault) -> Error {
        let regs = self.fd.get_regs().ok();
        let rip = regs.map_or(0, |r| r.rip);
        let insn = f.insn.unwrap_or_else(|| self.read_insn(rip));
        let insn = if insn.is_empty() {
            "unreadable".to_string()
        } else {
            insn.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        Error::GuestFault {
            vcpu: self.index,
            exit: f.what,
            rip,
            insn,
        }
    }

    /// Up to 15 instruction bytes at CS:RIP, through the guest page tables.
    fn read_insn(&mut self, rip: u64) -> Vec<u8> {
        let Ok(sregs) = self.fd.get_sregs() else {
            return Vec::new();
        };
        let long = sregs.efer & (1 << 10) != 0 && sregs.cs.l == 1;
        let linear = if long {
            rip
        } else {
            sregs.cs.base.wrapping_add(rip)
        };
        let paging = sregs.cr0 & (1 << 31) != 0;
        let mut out = Vec::new();
        for i in 0..15u64 {
            let la = linear.wrapping_add(i);
            let pa = if paging {
                match self.fd.translate_gva(la) {
                    Ok(t) if t.valid != 0 => t.physical_address,
                    _ => break,
                }
            } else {
                la
            };
            match self.mem.read_obj::<u8>(GuestAddress(pa)) {
                Ok(b) => out.push(b),
                Err(_) => break,
            }
        }
        out
    }
}

/// An exit that ends the VM with an error.
struct Fault {
    what: String,
    /// Instruction bytes KVM reported, if any.
    insn: Option<Vec<u8>>,
}

fn fault(what: impl Into<String>) -> Next {
    Next::Fault(Fault {
        what: what.into(),
        insn: None,
    })
}

fn handle_exit(index: usize, exit: VcpuExit<'_>, run: *mut kvm_run, pio: &Bus, mmio: &Bus) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => {
            // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the live union member.
            let size = usize::from(unsafe { (*run).__bindgen_anon_1.io.size }).max(1);
            log::trace!("vCPU {index}: out {port:#x} {data:02x?}");
            for chunk in data.chunks(size) {
                pio.write(u64::from(port), chunk);
            }
            Next::Continue
        }
        VcpuExit::IoIn(port, data) => {
            // SAFETY: as above.
            let size = usize::from(unsafe { (*run).__bindgen_anon_1.io.size }).max(1);
            for chunk in data.chunks_mut(size) {
                if !pio.read(u64::from(port), chunk) {
                    chunk.fill(0xff);
                }
            }
            log::trace!("vCPU {index}: in {port:#x} -> {data:02x?}");
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                log::debug!("unhandled MMIO read at {addr:#x} ({} bytes)", data.len());
                data.fill(0);
            }
            log::trace!("vCPU {index}: mmio read {addr:#x} -> {data:02x?}");
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                log::debug!("unhandled MMIO write at {addr:#x}: {data:02x?}");
            }
            Next::Continue
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
        VcpuExit::Shutdown => Next::Exit(Ok(VmExit::TripleFault)),
        VcpuExit::SystemEvent(kind, _) => Next::Exit(Ok(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
            KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
            KVM_SYSTEM_EVENT_CRASH => VmExit::Crash,
            other => VmExit::SystemEvent(other),
        })),
        VcpuExit::InternalError => {
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
            // (and its `emulation_failure` view) is the live union member.
            let (suberror, ndata, flags, insn) = unsafe {
                let u = &(*run).__bindgen_anon_1;
                let ef = &u.emulation_failure;
                let bytes = &ef.__bindgen_anon_1.__bindgen_anon_1;
                let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
                (
                    u.internal.suberror,
                    u.internal.ndata,
                    ef.flags,
                    bytes.insn_bytes[..n].to_vec(),
                )
            };
            let what = match suberror {
                1 => "emulation failure",
                2 => "exception during event delivery",
                3 => "event delivery failure",
                4 => "unexpected exit reason",
                _ => "unknown suberror",
            };
            let insn =
                (suberror == 1 && ndata >= 2 && flags & 1 != 0 && !insn.is_empty()).then_some(insn);
            Next::Fault(Fault {
                what: format!("KVM_EXIT_INTERNAL_ERROR ({what}, suberror {suberror})"),
                insn,
            })
        }
        VcpuExit::FailEntry(reason, cpu) => fault(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host CPU {cpu})"
        )),
        VcpuExit::MemoryFault { gpa, size, .. } => fault(format!(
            "KVM_EXIT_MEMORY_FAULT (guest physical {gpa:#x}, {size} bytes)"
        )),
        VcpuExit::Exception => fault("KVM_EXIT_EXCEPTION"),
        VcpuExit::Unknown => fault("KVM_EXIT_UNKNOWN"),
        other => {
            log::debug!("vCPU {index}: unexpected exit {other:?}");
            fault(format!("unexpected exit {other:?}"))
        }
    }
}
