//! Initial state of a vCPU as pure functions over `kvm-bindings` types:
//! registers, segment registers, FPU, CPUID (APIC ids, topology, hypervisor
//! bit), boot MSRs and LAPIC LINT0/LINT1.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    CpuId,
};

use crate::kernel::EntryPoint;
use crate::layout::*;
use crate::paging::{BOOT_CS, BOOT_DS, BOOT_TSS};
use crate::{Error, Result};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// General registers at the kernel entry.
pub fn regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Linux64(rip) => kvm_regs {
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_ADDR,
            rflags: 0x2,
            ..Default::default()
        },
        EntryPoint::Pvh(rip) => kvm_regs {
            rip,
            rbx: PVH_INFO_ADDR,
            rflags: 0x2,
            ..Default::default()
        },
    }
}

fn segment(selector: u16, type_: u8, s: u8, db: u8, l: u8, limit: u32, g: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Segment and control registers at the kernel entry, starting from the
/// vCPU's current `sregs` (which keeps KVM's APIC base and the like).
pub fn sregs(entry: EntryPoint, current: &kvm_sregs) -> kvm_sregs {
    let mut s = *current;
    let long = matches!(entry, EntryPoint::Linux64(_));
    s.cs = if long {
        segment(BOOT_CS, 0xb, 1, 0, 1, 0xffff_ffff, 1)
    } else {
        segment(BOOT_CS, 0xb, 1, 1, 0, 0xffff_ffff, 1)
    };
    let data = segment(BOOT_DS, 0x3, 1, 1, 0, 0xffff_ffff, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(BOOT_TSS, 0xb, 0, 0, 0, 0x67, 0);
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = 5 * 8 - 1;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 7;
    if long {
        s.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
        s.cr3 = PML4_ADDR;
        s.cr4 = X86_CR4_PAE;
        s.efer = EFER_LME | EFER_LMA;
    } else {
        s.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE;
        s.cr3 = 0;
        s.cr4 = 0;
        s.efer = 0;
    }
    s
}

/// FPU state after reset (FCW 0x37f, MXCSR 0x1f80).
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices set at boot.
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// The boot MSRs: syscall/sysenter cleared, TSC 0, fast strings, MTRRs on
/// with write-back as the default type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(msr::IA32_SYSENTER_CS, 0),
        e(msr::IA32_SYSENTER_ESP, 0),
        e(msr::IA32_SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::IA32_TSC, 0),
        e(msr::IA32_MISC_ENABLE, 1),
        e(msr::MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// LINT0 = ExtINT (virtual-wire mode for the 8259), LINT1 = NMI.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

/// Read LINT0/LINT1 back (for tests and diagnostics).
pub fn lint(lapic: &kvm_lapic_state) -> (u32, u32) {
    (lapic_reg(lapic, APIC_LVT0), lapic_reg(lapic, APIC_LVT1))
}

/// Bits needed to number `n` ids.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// CPUID for vCPU `index` of `count`, from KVM_GET_SUPPORTED_CPUID:
/// one socket of `count` cores with one thread each, APIC id = index.
pub fn vcpu_cpuid(supported: &CpuId, index: usize, count: usize) -> Result<CpuId> {
    if count == 0 || count > MAX_VCPUS || index >= count {
        return Err(Error::VcpuCount(count));
    }
    let apic_id = index as u32;
    let count32 = count as u32;
    let core_bits = id_bits(count32);
    let is_amd = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == u32::from_le_bytes(*b"Auth"));
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: APIC id [31:24], logical processor count [23:16].
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count32 & 0xff) << 16);
                // ECX bit 31: running under a hypervisor.
                e.ecx |= 1 << 31;
                // EDX bit 28: HTT (the count field above is valid).
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // Cores per package - 1 in [31:26]; threads sharing the cache - 1 in [25:14]
                // (one thread per core: L1/L2 private, L3 shared by all cores).
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count32 - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: all vCPUs in one package.
                        e.eax = core_bits;
                        e.ebx = count32;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x8000_001e if is_amd => {
                // Extended APIC id; compute-unit (core) id, one thread per core; node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            0x8000_0008 if is_amd => {
                // ECX[7:0]: number of cores - 1; [15:12]: APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | (count32 - 1) | (core_bits << 12);
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|e| Error::Cpuid(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let mut v = vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ebx: u32::from_le_bytes(*b"Genu"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                edx: 1 << 28,
                ..Default::default()
            },
        ];
        for (i, level) in [(0u32, 1u32), (1, 1), (2, 2), (3, 3)] {
            v.push(kvm_cpuid_entry2 {
                function: 4,
                index: i,
                eax: (level << 5) | 1,
                ..Default::default()
            });
        }
        for i in 0..3 {
            v.push(kvm_cpuid_entry2 {
                function: 0xb,
                index: i,
                ..Default::default()
            });
        }
        CpuId::from_entries(&v).unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_ids_topology_and_hypervisor_bit() {
        let s = supported();
        let c = vcpu_cpuid(&s, 3, 4).unwrap();
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_ne!(l1.edx & (1 << 28), 0);
        let smt = leaf(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = leaf(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        assert_eq!(leaf(&c, 0xb, 2).ecx, 2);
        assert_eq!(leaf(&c, 4, 0).eax >> 26, 3);
        assert_eq!((leaf(&c, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!((leaf(&c, 4, 0).eax >> 14) & 0xfff, 0);
    }

    #[test]
    fn amd_extended_topology() {
        let v = vec![
            kvm_cpuid_entry2 {
                function: 0,
                ebx: u32::from_le_bytes(*b"Auth"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                ecx: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_001e,
                eax: 0,
                ebx: 0x100,
                ..Default::default()
            },
        ];
        let c = vcpu_cpuid(&CpuId::from_entries(&v).unwrap(), 2, 4).unwrap();
        let e = leaf(&c, 0x8000_001e, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (2, 2, 0));
        let e = leaf(&c, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 3);
        assert_eq!((e.ecx >> 12) & 0xf, 2);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = vcpu_cpuid(&supported(), 0, 1).unwrap();
        assert_eq!(leaf(&c, 1, 0).edx & (1 << 28), 0);
        assert_eq!(leaf(&c, 0xb, 1).eax, 0);
        assert!(vcpu_cpuid(&supported(), 1, 1).is_err());
        assert!(vcpu_cpuid(&supported(), 0, 255).is_err());
    }

    #[test]
    fn long_mode_sregs() {
        let s = sregs(EntryPoint::Linux64(0x10_0200), &kvm_sregs::default());
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        let r = regs(EntryPoint::Linux64(0x10_0200));
        assert_eq!((r.rip, r.rsi), (0x10_0200, ZERO_PAGE_ADDR));
    }

    #[test]
    fn pvh_sregs() {
        let s = sregs(EntryPoint::Pvh(0x100_0000), &kvm_sregs::default());
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(regs(EntryPoint::Pvh(0x100_0000)).rbx, PVH_INFO_ADDR);
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        set_lint(&mut l);
        let (l0, l1) = lint(&l);
        assert_eq!(l0, 0x0001_0700);
        assert_eq!(l1, 0x400);
    }
}
