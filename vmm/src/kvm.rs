//! Creating the KVM VM: guest memory (registered BEFORE the irqchip: on
//! this host the memory ioctl costs 5-10 ms once an irqchip exists and well
//! under 1 ms before), the in-kernel irqchip and PIT, and the masked 8259.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::GuestMemoryMmap;

/// Three pages KVM needs for real-mode emulation on Intel (in the MMIO hole,
/// above the device slots and below the IOAPIC).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Open `/dev/kvm` and create a VM.
pub fn create_vm() -> Result<(Kvm, VmFd)> {
    let handle = Kvm::new().map_err(Error::KvmOpen)?;
    let vm = handle.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    Ok((handle, vm))
}

/// Register every guest RAM region as a KVM memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM
        // handle keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The in-kernel LAPIC/IOAPIC/PIC (after the memory: DESIGN §3).
pub fn create_irqchip(vm: &VmFd) -> Result<()> {
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))
}

/// The in-kernel PIT, and both 8259s masked, since a guest that never
/// programs the PIC would otherwise take its interrupts on garbage vectors
/// through LINT0 (ExtINT). Creating the PIT starts a kernel thread, which
/// can take milliseconds on a busy host: [`crate::vm`] runs this in
/// parallel with loading the guest image.
pub fn setup_pit_and_pic(vm: &VmFd) -> Result<()> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
    for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        // chip_id selects the `pic` member of the union (writing it is safe).
        chip.chip.pic.imr = 0xff;
        vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
