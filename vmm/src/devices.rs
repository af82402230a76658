//! The device manager: PIO and MMIO buses, MMIO-slot and GSI allocation
//! (vm-allocator), the legacy devices, and the wiring of virtio-mmio
//! devices (ioeventfd per queue, irqfd per device, event-loop subscription,
//! a DSDT node).

use std::sync::{Arc, Mutex};

use b2p_boot::acpi::VirtioMmioSlot;
use b2p_boot::layout::*;
use b2p_devices::bus::{Bus, SharedBusDevice};
use b2p_devices::legacy::{
    AcpiSleep, BootTimer, ConsoleOutput, EventSink, PortSink, SerialDevice, I8042,
};
use b2p_devices::virtio::mmio::{regs::QUEUE_NOTIFY, MmioTransport};
use b2p_devices::virtio::VirtioDevice;
use event_manager::{MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::event_loop::Manager;
use crate::GuestMemoryMmap;

fn dev_err(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// Buses, allocators and the virtio slots to announce in the DSDT.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    mmio_alloc: AddressAllocator,
    gsi_alloc: IdAllocator,
    boot_timer_slot: u64,
    /// Every virtio-mmio device, in creation order (DSDT nodes V000, V001...).
    pub virtio_slots: Vec<VirtioMmioSlot>,
}

impl DeviceManager {
    /// Empty buses; the first MMIO slot is reserved for the boot timer.
    pub fn new() -> Result<Self> {
        let mut mmio_alloc =
            AddressAllocator::new(DEVICE_MMIO_START, DEVICE_MMIO_END - DEVICE_MMIO_START + 1)
                .map_err(|e| dev_err("MMIO allocator")(e.to_string()))?;
        let gsi_alloc = IdAllocator::new(FIRST_DEVICE_GSI, LAST_DEVICE_GSI)
            .map_err(|e| dev_err("GSI allocator")(e.to_string()))?;
        let boot_timer_slot = mmio_alloc
            .allocate(MMIO_SLOT_SIZE, MMIO_SLOT_SIZE, AllocPolicy::FirstMatch)
            .map_err(|e| dev_err("boot timer slot")(e.to_string()))?
            .start();
        debug_assert_eq!(boot_timer_slot, BOOT_TIMER_ADDR);
        Ok(DeviceManager {
            pio: Bus::new(),
            mmio: Bus::new(),
            mmio_alloc,
            gsi_alloc,
            boot_timer_slot,
            virtio_slots: Vec::new(),
        })
    }

    fn insert_pio(&mut self, dev: SharedBusDevice, base: u16, len: u16) -> Result<()> {
        self.pio
            .insert(dev, u64::from(base), u64::from(len))
            .map_err(|e| dev_err("PIO bus")(e.to_string()))
    }

    /// COM1 (irqfd on GSI 4), i8042, the POST-code sink, the ACPI sleep
    /// register and, when `boot_timer` holds the process start, the boot timer.
    pub fn add_legacy(
        &mut self,
        vm: &VmFd,
        output: ConsoleOutput,
        input_ready: Option<EventFd>,
        events: EventSink,
        boot_timer: Option<u64>,
    ) -> Result<Arc<Mutex<SerialDevice>>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io {
            what: "serial eventfd",
            source,
        })?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(|source| Error::Kvm {
                what: "KVM_IRQFD (serial)",
                source,
            })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, output, input_ready)));
        self.insert_pio(serial.clone(), COM1_PORT, 8)?;
        self.insert_pio(
            Arc::new(Mutex::new(I8042::new(events.clone()))),
            I8042_PORT,
            I8042_PORT_LEN,
        )?;
        self.insert_pio(Arc::new(Mutex::new(PortSink)), POST_CODE_PORT, 1)?;
        self.insert_pio(
            Arc::new(Mutex::new(AcpiSleep::new(S5_SLEEP_TYPE, events.clone()))),
            ACPI_SLEEP_PORT,
            1,
        )?;
        if let Some(start_ns) = boot_timer {
            self.mmio
                .insert(
                    Arc::new(Mutex::new(BootTimer::new(start_ns, events))),
                    self.boot_timer_slot,
                    MMIO_SLOT_SIZE,
                )
                .map_err(|e| dev_err("MMIO bus")(e.to_string()))?;
        }
        Ok(serial)
    }

    /// Wire a virtio device: an MMIO slot and a GSI, the transport on the
    /// MMIO bus, one ioeventfd per queue (QueueNotify, datamatch = queue
    /// index), the interrupt eventfd as an irqfd, and the device on the
    /// event loop.
    pub fn add_virtio<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        event_manager: &mut Manager,
        device: Arc<Mutex<D>>,
        name: &str,
    ) -> Result<VirtioMmioSlot>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let base = self
            .mmio_alloc
            .allocate(MMIO_SLOT_SIZE, MMIO_SLOT_SIZE, AllocPolicy::FirstMatch)
            .map_err(|e| Error::Device(format!("{name}: no MMIO slot left: {e}")))?
            .start();
        let gsi = self
            .gsi_alloc
            .allocate_id()
            .map_err(|e| Error::Device(format!("{name}: no interrupt line left: {e}")))?;
        let virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = MmioTransport::new(mem.clone(), virtio)
            .map_err(|e| Error::Device(format!("{name}: {e}")))?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), i as u32)
                .map_err(|source| Error::Kvm {
                    what: "KVM_IOEVENTFD",
                    source,
                })?;
        }
        vm.register_irqfd(transport.irq().irq_evt(), gsi)
            .map_err(|source| Error::Kvm {
                what: "KVM_IRQFD",
                source,
            })?;
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_SLOT_SIZE)
            .map_err(|e| Error::Device(format!("{name}: {e}")))?;
        event_manager.add_subscriber(device);
        let slot = VirtioMmioSlot {
            base,
            size: MMIO_SLOT_SIZE,
            gsi,
        };
        self.virtio_slots.push(slot);
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use b2p_devices::virtio::rng::Rng;

    #[test]
    fn slots_and_gsis_until_exhausted() {
        let (_kvm, vm) = match crate::kvm::create_vm() {
            Ok(v) => v,
            Err(e) => {
                let _ =
                    std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP: {e}\n"));
                return;
            }
        };
        crate::kvm::create_irqchip(&vm).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(64 << 20)).unwrap();
        let mut events = crate::event_loop::new_manager().unwrap();
        let mut dm = DeviceManager::new().unwrap();
        assert_eq!(dm.boot_timer_slot, BOOT_TIMER_ADDR);
        let n = (LAST_DEVICE_GSI - FIRST_DEVICE_GSI + 1) as usize;
        for i in 0..n {
            let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
            let slot = dm.add_virtio(&vm, &mem, &mut events, rng, "rng").unwrap();
            assert_eq!(slot.base, BOOT_TIMER_ADDR + (i as u64 + 1) * MMIO_SLOT_SIZE);
            assert_eq!(slot.gsi, FIRST_DEVICE_GSI + i as u32);
        }
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let err = dm
            .add_virtio(&vm, &mem, &mut events, rng, "rng")
            .unwrap_err();
        assert!(err.to_string().contains("no interrupt line left"), "{err}");
        // The transport answers at its slot: magic "virt".
        let mut magic = [0u8; 4];
        assert!(dm.mmio.read(BOOT_TIMER_ADDR + MMIO_SLOT_SIZE, &mut magic));
        assert_eq!(&magic, b"virt");
        // Nothing is mapped at the boot-timer page unless asked for.
        assert!(!dm.mmio.read(BOOT_TIMER_ADDR, &mut magic));
    }
}
