//! ACPI tables: RSDP at 0xE0000, then DSDT, FADT (hardware-reduced, S5 sleep
//! registers), MADT (one LAPIC per vCPU + the IOAPIC) and XSDT, all inside
//! the E820 ACPI area below 1 MiB.
//!
//! The DSDT declares COM1 (`PNP0501`), `_S5_` and one `LNRO0005` node per
//! virtio-mmio slot. The boot-timer page is deliberately claimed by no `_CRS`.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope,
    IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::layout::*;
use crate::{write_guest, Error, GuestMemoryMmap, Result};

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"B2P   ";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"B2PVM   ";
const OEM_REVISION: u32 = 1;
/// MADT flag: the platform also has dual 8259 PICs (KVM's).
const MADT_PCAT_COMPAT: u32 = 1;

/// A virtio-mmio device as the DSDT announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// One ACPI table and where it goes.
#[derive(Clone, Debug)]
pub struct Table {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

impl Table {
    /// The 4-byte signature (8 for the RSDP).
    pub fn signature(&self) -> &[u8] {
        if self.bytes.starts_with(b"RSD PTR ") {
            &self.bytes[..8]
        } else {
            &self.bytes[..4.min(self.bytes.len())]
        }
    }
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Set byte 9 so the whole table sums to zero.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

/// The DSDT body (AML) for COM1, `_S5_` and the virtio-mmio devices.
pub fn dsdt_aml(virtio: &[VirtioMmioSlot]) -> Vec<u8> {
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &aml::ZERO);
    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_crs = Name::new("_CRS".into(), &com1_crs);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let mut devices = Vec::new();
    for (i, slot) in virtio.iter().enumerate() {
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid = Name::new("_UID".into(), &(i as u32));
        let mem = Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
        let irq = Interrupt::new(true, true, false, false, slot.gsi);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq]));
        let path = Path::new(&format!("V{:03X}", i));
        devices.push(to_bytes(&Device::new(path, vec![&hid, &uid, &crs])));
    }
    struct Raw(Vec<u8>);
    impl Aml for Raw {
        fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
            sink.vec(&self.0);
        }
    }
    let devices: Vec<Raw> = devices.into_iter().map(Raw).collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    let sb = Scope::new("_SB_".into(), children);

    let s5 = Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE]));
    let mut out = to_bytes(&sb);
    out.extend(to_bytes(&s5));
    out
}

/// Build all tables for `vcpus` vCPUs and the given virtio-mmio slots.
pub fn build_tables(vcpus: usize, virtio: &[VirtioMmioSlot]) -> Result<Vec<Table>> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::VcpuCount(vcpus));
    }
    let align = |a: u64| (a + 15) & !15;

    // DSDT
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(virtio));
    let dsdt = dsdt.as_slice().to_vec();
    let dsdt_addr = align(RSDP_ADDR + Rsdp::len() as u64);

    // FADT
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_PORT),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = sleep_reg;
    fadt.sleep_status_reg = sleep_reg;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"B2PVMM\0\0").into();
    let fadt = to_bytes(&fadt.finalize());
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);

    // MADT
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let mut madt = to_bytes(&madt);
    madt[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut madt);
    let madt_addr = align(fadt_addr + fadt.len() as u64);

    // XSDT
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);

    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(Error::AcpiTooLarge {
            size: (end - ACPI_START) as usize,
            max: (ACPI_END - ACPI_START) as usize,
        });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![
        Table {
            addr: RSDP_ADDR,
            bytes: rsdp,
        },
        Table {
            addr: dsdt_addr,
            bytes: dsdt,
        },
        Table {
            addr: fadt_addr,
            bytes: fadt,
        },
        Table {
            addr: madt_addr,
            bytes: madt,
        },
        Table {
            addr: xsdt_addr,
            bytes: xsdt,
        },
    ])
}

/// Build the tables and write them into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: usize, virtio: &[VirtioMmioSlot]) -> Result<()> {
    for t in build_tables(vcpus, virtio)? {
        write_guest(mem, &t.bytes, t.addr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find<'a>(tables: &'a [Table], sig: &[u8]) -> &'a Table {
        tables.iter().find(|t| t.signature() == sig).unwrap()
    }

    fn slots() -> Vec<VirtioMmioSlot> {
        (0..3)
            .map(|i| VirtioMmioSlot {
                base: 0xc000_1000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    #[test]
    fn checksums_and_lengths() {
        let tables = build_tables(4, &slots()).unwrap();
        let rsdp = find(&tables, b"RSD PTR ");
        assert_eq!(rsdp.addr, 0xe0000);
        assert_eq!(sum(&rsdp.bytes[..20]), 0);
        assert_eq!(sum(&rsdp.bytes), 0);
        for sig in [b"XSDT", b"FACP", b"APIC", b"DSDT"] {
            let t = find(&tables, sig);
            assert_eq!(sum(&t.bytes), 0, "{:?}", std::str::from_utf8(sig));
            let len = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.bytes.len());
            assert!(t.addr >= ACPI_START && t.addr + len as u64 <= ACPI_END);
            assert_eq!(t.addr % 16, 0);
        }
    }

    #[test]
    fn rsdp_xsdt_fadt_dsdt_chain() {
        let tables = build_tables(1, &[]).unwrap();
        let rsdp = find(&tables, b"RSD PTR ");
        let xsdt_addr = u64::from_le_bytes(rsdp.bytes[24..32].try_into().unwrap());
        let xsdt = find(&tables, b"XSDT");
        assert_eq!(xsdt.addr, xsdt_addr);
        let entries: Vec<u64> = xsdt.bytes[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = find(&tables, b"FACP");
        let madt = find(&tables, b"APIC");
        assert_eq!(entries, vec![fadt.addr, madt.addr]);
        // X_DSDT at offset 140, flags at 112 (HW_REDUCED_ACPI = bit 20).
        let x_dsdt = u64::from_le_bytes(fadt.bytes[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, find(&tables, b"DSDT").addr);
        let flags = u32::from_le_bytes(fadt.bytes[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256: SystemIO, 8 bits, 0x600.
        for off in [244, 256] {
            assert_eq!(fadt.bytes[off], 1);
            assert_eq!(fadt.bytes[off + 1], 8);
            let addr = u64::from_le_bytes(fadt.bytes[off + 4..off + 12].try_into().unwrap());
            assert_eq!(addr, 0x600);
        }
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu_and_an_ioapic() {
        for n in [1usize, 2, 4, 254] {
            let tables = build_tables(n, &[]).unwrap();
            let madt = &find(&tables, b"APIC").bytes;
            assert_eq!(
                u32::from_le_bytes(madt[36..40].try_into().unwrap()),
                LAPIC_ADDR
            );
            let mut off = 44;
            let (mut lapics, mut ioapics) = (0, 0);
            while off < madt.len() {
                match madt[off] {
                    0 => {
                        assert_eq!(madt[off + 3] as usize, lapics, "apic id");
                        lapics += 1
                    }
                    1 => ioapics += 1,
                    t => panic!("unexpected MADT entry {t}"),
                }
                off += madt[off + 1] as usize;
            }
            assert_eq!((lapics, ioapics), (n, 1));
        }
        assert!(matches!(build_tables(0, &[]), Err(Error::VcpuCount(0))));
        assert!(matches!(build_tables(255, &[]), Err(Error::VcpuCount(255))));
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_declares_com1_s5_and_virtio_nodes() {
        let tables = build_tables(2, &slots()).unwrap();
        let dsdt = &find(&tables, b"DSDT").bytes;
        assert!(contains(dsdt, b"COM1"));
        assert!(contains(dsdt, b"_S5_"));
        assert_eq!(dsdt.windows(8).filter(|w| *w == b"LNRO0005").count(), 3);
        // Memory32Fixed descriptor (0x86, len 9, rw) for the second slot.
        let mut desc = vec![0x86, 9, 0, 1];
        desc.extend_from_slice(&0xc000_2000u32.to_le_bytes());
        desc.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(dsdt, &desc));
        // Extended IRQ descriptor: consumer + edge, active high, exclusive, GSI 6.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&6u32.to_le_bytes());
        assert!(contains(dsdt, &irq));
        // Nothing claims the boot-timer page.
        assert!(!contains(dsdt, &0xc000_0000u32.to_le_bytes()));
    }

    #[test]
    fn many_devices_still_fit_or_fail_cleanly() {
        let many: Vec<VirtioMmioSlot> = (0..4000)
            .map(|i| VirtioMmioSlot {
                base: 0xc000_1000 + i * 0x1000,
                size: 0x1000,
                gsi: 5,
            })
            .collect();
        assert!(matches!(
            build_tables(254, &many),
            Err(Error::AcpiTooLarge { .. })
        ));
    }
}
