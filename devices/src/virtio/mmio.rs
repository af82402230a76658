//! The virtio-mmio transport, version 2 (modern only; virtio 1.2 §4.2).
//!
//! `MmioTransport` owns the register file of one 4 KiB virtio-mmio slot: it
//! answers guest reads and writes (offsets relative to the slot base), runs
//! the device-status state machine and feature negotiation, keeps the queue
//! configuration the driver writes, and on DRIVER_OK hands validated queues,
//! their notification eventfds, the guest memory and the interrupt line to
//! the [`VirtioDevice`] it wraps. Every value written here comes from the
//! guest and is treated as hostile: bad accesses are logged and ignored.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use log::debug;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, IrqLine, VirtioDevice};
use crate::{warn_limited, BusDevice, GuestMemoryMmap};

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("b2p\0" is as good as any).
pub const VENDOR_ID: u32 = 0x0070_3262;

/// Register offsets of the virtio-mmio layout (virtio 1.2 §4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1), as `u32` register values.
pub mod status {
    use super::*;
    pub const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    pub const DEVICE_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
}

/// The size of one virtio-mmio slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;

/// One virtio-mmio device slot.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    irq: Arc<IrqLine>,
    queue_evts: Vec<EventFd>,
    /// The driver's view of each queue; copies go to the device at DRIVER_OK.
    queues: Vec<Queue>,
    device_type: u32,
    avail_features: u64,
    acked_features: u64,
    /// The driver acked bits in a feature page beyond the two we have.
    features_violation: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish()
    }
}

fn lock_device<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    // A poisoned lock means a thread panicked while holding the device.
    // That happens only in test and debug builds: the release profile has
    // panic = "abort", so there a panic ends the whole process. Not an
    // unwrap, so a test that provokes one sees its own failure, not ours.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl MmioTransport {
    /// Wrap `device`; creates one notification eventfd per queue and the
    /// interrupt line. Fails if the device reports an invalid queue size
    /// (zero, not a power of two, above 32768) or an eventfd cannot be made.
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> io::Result<Self> {
        let (device_type, avail_features, max_sizes) = {
            let d = lock_device(&device);
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
            )
        };
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for max in max_sizes {
            let q = Queue::new(max).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("virtio device type {device_type}: queue size {max}: {e}"),
                )
            })?;
            queues.push(q);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            mem,
            device,
            irq: Arc::new(IrqLine::new()?),
            queue_evts,
            queues,
            device_type,
            avail_features,
            acked_features: 0,
            features_violation: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// `queue_evts()[i]` is signalled when the driver notifies queue `i`
    /// (register each as a KVM ioeventfd on `base + QueueNotify`, datamatch i).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt line (its eventfd goes to a KVM irqfd).
    pub fn irq(&self) -> Arc<IrqLine> {
        self.irq.clone()
    }

    /// The wrapped device.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device has been activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver acknowledged so far.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    /// Queue registers may be written between FEATURES_OK and DRIVER_OK.
    fn queue_writable(&self) -> bool {
        self.has_status(
            status::FEATURES_OK,
            status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET,
        )
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn update_selected_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_writable() {
            warn_limited!(
                "virtio-mmio: queue register write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(q) => f(q),
            None => warn_limited!(
                "virtio-mmio: write to non-existent queue {} ignored",
                self.queue_sel
            ),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device_type,
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            regs::INTERRUPT_STATUS => self.irq.status(),
            regs::STATUS => self.status,
            // No shared memory regions: their length reads as -1.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of unknown/write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => self.write_driver_features(v),
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM => self.update_selected_queue(|q| {
                if v > u32::from(u16::MAX) || q.try_set_size(v as u16).is_err() {
                    warn_limited!("virtio-mmio: invalid queue size {v} ignored");
                }
            }),
            regs::QUEUE_READY => self.update_selected_queue(|q| q.set_ready(v == 1)),
            regs::QUEUE_DESC_LOW => {
                self.update_selected_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            regs::QUEUE_DESC_HIGH => {
                self.update_selected_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            regs::QUEUE_DRIVER_LOW => {
                self.update_selected_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            regs::QUEUE_DRIVER_HIGH => {
                self.update_selected_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            regs::QUEUE_DEVICE_LOW => {
                self.update_selected_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            regs::QUEUE_DEVICE_HIGH => {
                self.update_selected_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            regs::QUEUE_NOTIFY => self.notify(v),
            regs::INTERRUPT_ACK => self.irq.ack(v),
            regs::STATUS => self.write_status(v),
            regs::SHM_SEL => {}
            _ => {
                warn_limited!("virtio-mmio: write {v:#x} to unknown/read-only register {offset:#x}")
            }
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if !self.has_status(
            status::ACKNOWLEDGE | status::DRIVER,
            status::FEATURES_OK | status::FAILED,
        ) {
            warn_limited!(
                "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel => {
                if v != 0 {
                    warn_limited!(
                        "virtio-mmio: driver acked features {v:#x} in page {sel}, none offered"
                    );
                    // Remember the violation so FEATURES_OK is refused.
                    self.features_violation = true;
                }
            }
        }
    }

    fn notify(&mut self, v: u32) {
        // With a KVM ioeventfd this write never reaches us; without one
        // (tests, or a VMM that registers none) forward it by hand.
        match self.queue_evts.get(v as usize) {
            Some(evt) if self.activated => {
                if let Err(e) = evt.write(1) {
                    warn_limited!("virtio-mmio: queue {v} notify: {e}");
                }
            }
            Some(_) => debug!("virtio-mmio: notify of queue {v} before activation ignored"),
            None => warn_limited!("virtio-mmio: notify of non-existent queue {v} ignored"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Status bits are only ever added (except by reset).
        if v & old != old {
            warn_limited!("virtio-mmio: status {old:#x} -> {v:#x} clears bits; ignored");
            return;
        }
        let added = v & !old;
        if added & status::FAILED != 0 {
            // The driver gave up on the device; keep what we have and stop.
            self.status |= status::FAILED;
            return;
        }
        if old & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            warn_limited!(
                "virtio-mmio: status {v:#x} after FAILED/DEVICE_NEEDS_RESET ignored; reset first"
            );
            return;
        }
        match added {
            0 => {}
            status::ACKNOWLEDGE if old == 0 => self.status = v,
            status::DRIVER if old == status::ACKNOWLEDGE => self.status = v,
            status::FEATURES_OK if old == status::ACKNOWLEDGE | status::DRIVER => {
                if self.features_acceptable() {
                    self.status = v;
                } else {
                    // The driver reads Status back and sees FEATURES_OK unset.
                    warn_limited!(
                        "virtio-mmio: features {:#x} refused (offered {:#x})",
                        self.acked_features,
                        self.avail_features
                    );
                }
            }
            status::DRIVER_OK
                if old == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK =>
            {
                self.status = v;
                self.activate();
            }
            _ => warn_limited!("virtio-mmio: illegal status transition {old:#x} -> {v:#x} ignored"),
        }
    }

    fn features_acceptable(&self) -> bool {
        !self.features_violation
            && self.acked_features & !self.avail_features == 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            if let Err(e) = self.irq.signal_config_change() {
                warn_limited!("virtio-mmio: config interrupt: {e}");
            }
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                warn_limited!(
                    "virtio-mmio: device type {}: queue {i} not ready or outside guest memory",
                    self.device_type
                );
                self.set_needs_reset();
                return;
            }
            let mut state = q.state();
            state.event_idx_enabled = event_idx;
            match Queue::try_from(state) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    warn_limited!("virtio-mmio: queue {i}: {e}");
                    self.set_needs_reset();
                    return;
                }
            }
        }
        let mut queue_evts = Vec::with_capacity(self.queue_evts.len());
        for evt in &self.queue_evts {
            match evt.try_clone() {
                Ok(e) => queue_evts.push(e),
                Err(e) => {
                    warn_limited!("virtio-mmio: cloning a queue eventfd: {e}");
                    self.set_needs_reset();
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.acked_features,
            queues,
            queue_evts,
            irq: self.irq.clone(),
        };
        let result = lock_device(&self.device).activate(ctx);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                warn_limited!(
                    "virtio-mmio: device type {} failed to activate: {e}",
                    self.device_type
                );
                self.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            let ok = lock_device(&self.device).reset();
            if !ok {
                warn_limited!("virtio-mmio: device type {} cannot reset", self.device_type);
                self.status |= status::DEVICE_NEEDS_RESET;
                return;
            }
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        // Drain notifications that were meant for the old queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.irq.ack(u32::MAX);
        let _ = self.irq.irq_evt().read();
        self.acked_features = 0;
        self.features_violation = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            data.fill(0);
            lock_device(&self.device).read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn_limited!(
                "virtio-mmio: {}-byte read at {offset:#x}: registers are 32-bit aligned",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            lock_device(&self.device).write_config(offset - regs::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_limited!(
                "virtio-mmio: {}-byte write at {offset:#x}: registers are 32-bit",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            warn_limited!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, Arena, DriverError, TestDriver};
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

    const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

    #[derive(Default)]
    struct Dummy {
        config: [u8; 8],
        activations: usize,
        resets: usize,
        can_reset: bool,
        event_idx: Vec<bool>,
        fail_activate: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            F_VERSION_1 | F_EVENT_IDX | 1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::AlreadyActive);
            }
            self.activations += 1;
            self.event_idx = ctx.queues.iter().map(|q| q.event_idx_enabled()).collect();
            assert_eq!(ctx.queue_evts.len(), 2);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.can_reset
        }
    }

    fn setup(d: Dummy) -> (TestDriver, Arc<Mutex<Dummy>>) {
        let mem = guest_memory(1 << 20);
        let dev = Arc::new(Mutex::new(d));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let arena = Arena::new(GuestAddress(0x1000), (1 << 20) - 0x1000);
        (TestDriver::new(mem, t, arena), dev)
    }

    #[test]
    fn identity_registers() {
        let (mut d, _) = setup(Dummy::default());
        assert_eq!(d.read_reg(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(d.read_reg(regs::VERSION), 2);
        assert_eq!(d.read_reg(regs::DEVICE_ID), 42);
        assert_eq!(d.read_reg(regs::VENDOR_ID), VENDOR_ID);
        assert_eq!(d.read_reg(regs::SHM_LEN_LOW), u32::MAX);
        // Sub-word register reads are refused (read as zero).
        let mut b = [0xffu8; 2];
        d.transport.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        // Unknown offsets read 0; writes to read-only registers do nothing.
        assert_eq!(d.read_reg(0x0f0), 0);
        d.write_reg(regs::MAGIC_VALUE, 0);
        assert_eq!(d.read_reg(regs::MAGIC_VALUE), 0x7472_6976);
    }

    #[test]
    fn full_init_activates_with_event_idx() {
        let (mut d, dev) = setup(Dummy::default());
        let f = d.init(F_EVENT_IDX | 1 << 3 | 1 << 5, 16).unwrap();
        // Bit 5 was not offered: the driver helper masked it.
        assert_eq!(f, F_VERSION_1 | F_EVENT_IDX | 1 << 3);
        assert!(d.transport.is_activated());
        let dv = dev.lock().unwrap();
        assert_eq!(dv.activations, 1);
        assert_eq!(dv.event_idx, vec![true, true]);
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits_only() {
        let (mut d, _) = setup(Dummy::default());
        d.set_status(status::ACKNOWLEDGE);
        d.set_status(status::ACKNOWLEDGE | status::DRIVER);
        d.write_driver_features(1 << 3); // no VERSION_1
        d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(d.status() & status::FEATURES_OK, 0);
        d.write_driver_features(F_VERSION_1 | 1 << 5); // bit 5 not offered
        d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(d.status() & status::FEATURES_OK, 0);
        // A feature page beyond 1 with bits set is refused too.
        d.write_driver_features(F_VERSION_1);
        d.write_reg(regs::DRIVER_FEATURES_SEL, 7);
        d.write_reg(regs::DRIVER_FEATURES, 1);
        d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(d.status() & status::FEATURES_OK, 0);
        d.set_status(0);
        assert_eq!(
            d.negotiate(0).unwrap(),
            F_VERSION_1,
            "after reset negotiation works"
        );
        // Features are frozen after FEATURES_OK.
        d.write_driver_features(F_VERSION_1 | F_EVENT_IDX);
        assert_eq!(d.transport.acked_features(), F_VERSION_1);
    }

    #[test]
    fn illegal_status_transitions_are_ignored() {
        let (mut d, dev) = setup(Dummy::default());
        d.set_status(status::DRIVER_OK);
        assert_eq!(d.status(), 0);
        d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(d.status(), 0);
        d.set_status(status::ACKNOWLEDGE);
        d.set_status(status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!(d.status(), status::ACKNOWLEDGE);
        // Clearing a bit without reset is refused.
        d.set_status(status::ACKNOWLEDGE | status::DRIVER);
        d.set_status(status::DRIVER);
        assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK before FEATURES_OK.
        d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER);
        // FAILED is accepted any time and sticks until reset.
        d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
        assert_ne!(d.status() & status::FAILED, 0);
        d.write_driver_features(F_VERSION_1);
        d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FAILED | status::FEATURES_OK);
        assert_eq!(d.status() & status::FEATURES_OK, 0);
        assert_eq!(dev.lock().unwrap().activations, 0);
        d.set_status(0);
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn queue_registers_only_between_features_ok_and_driver_ok() {
        let (mut d, _) = setup(Dummy::default());
        d.write_reg(regs::QUEUE_SEL, 0);
        d.write_reg(regs::QUEUE_READY, 1);
        assert_eq!(d.read_reg(regs::QUEUE_READY), 0, "before FEATURES_OK");
        d.negotiate(0).unwrap();
        assert_eq!(d.read_reg(regs::QUEUE_NUM_MAX), 16);
        d.write_reg(regs::QUEUE_SEL, 1);
        assert_eq!(d.read_reg(regs::QUEUE_NUM_MAX), 8);
        d.write_reg(regs::QUEUE_SEL, 2);
        assert_eq!(d.read_reg(regs::QUEUE_NUM_MAX), 0);
        d.write_reg(regs::QUEUE_READY, 1); // non-existent queue: ignored
        assert_eq!(d.read_reg(regs::QUEUE_READY), 0);
    }

    #[test]
    fn queue_outside_memory_fails_activation() {
        let (mut d, dev) = setup(Dummy::default());
        d.negotiate(0).unwrap();
        d.setup_queue(0, 16).unwrap();
        // Queue 1's used ring ends past the end of guest memory.
        let end = d.mem_end();
        d.program_queue(
            1,
            8,
            GuestAddress(0x2000),
            GuestAddress(0x3000),
            GuestAddress(end - 8),
        );
        assert_eq!(d.driver_ok(), Err(DriverError::NeedsReset(0x4f)));
        assert_eq!(dev.lock().unwrap().activations, 0);
        // The config-change interrupt tells the driver.
        assert_eq!(d.take_interrupt(), crate::virtio::VIRTIO_MMIO_INT_CONFIG);
        // Huge addresses (beyond u32) are rejected the same way.
        d.set_status(0);
        d.negotiate(0).unwrap();
        d.setup_queue(0, 16).unwrap();
        d.program_queue(
            1,
            8,
            GuestAddress(u64::MAX - 15),
            GuestAddress(0x3000),
            GuestAddress(0x4000),
        );
        assert!(d.driver_ok().is_err());
        // A queue never made ready fails activation too.
        d.set_status(0);
        d.negotiate(0).unwrap();
        d.setup_queue(0, 16).unwrap();
        assert!(d.driver_ok().is_err());
        assert_eq!(dev.lock().unwrap().activations, 0);
    }

    #[test]
    fn invalid_queue_sizes_are_ignored() {
        let (mut d, _) = setup(Dummy::default());
        d.negotiate(0).unwrap();
        d.write_reg(regs::QUEUE_SEL, 0);
        for bad in [0u32, 3, 32, 0x1_0000, u32::MAX] {
            d.write_reg(regs::QUEUE_NUM, bad);
        }
        assert_eq!(d.transport.queues[0].size(), 16);
        d.write_reg(regs::QUEUE_NUM, 4);
        assert_eq!(d.transport.queues[0].size(), 4);
    }

    #[test]
    fn notify_interrupt_ack_and_config() {
        let (mut d, dev) = setup(Dummy::default());
        d.init(0, 16).unwrap();
        d.notify(1);
        assert_eq!(d.transport.queue_evts()[1].read().unwrap(), 1);
        assert!(d.transport.queue_evts()[0].read().is_err());
        d.notify(9); // no such queue: ignored
        let irq = d.transport.irq();
        irq.signal_used_queue().unwrap();
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), 1);
        d.write_reg(regs::INTERRUPT_ACK, 1);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), 0);

        let g0 = d.read_reg(regs::CONFIG_GENERATION);
        d.transport.write(regs::CONFIG + 2, &[7, 8]);
        assert_ne!(d.read_reg(regs::CONFIG_GENERATION), g0);
        let mut b = [0u8; 4];
        d.read_config(0, &mut b);
        assert_eq!(b, [0, 0, 7, 8]);
        // Out-of-range config reads are zero, writes ignored.
        d.transport.write(regs::CONFIG + 0xf00, &[1; 8]);
        let mut b = [0xffu8; 8];
        d.read_config(0xefc, &mut b);
        assert_eq!(b, [0; 8]);
        assert_eq!(dev.lock().unwrap().config[..4], [0, 0, 7, 8]);
    }

    #[test]
    fn reset_calls_device_and_clears_state() {
        let (mut d, dev) = setup(Dummy {
            can_reset: true,
            ..Default::default()
        });
        d.init(0, 16).unwrap();
        d.transport.irq().signal_used_queue().unwrap();
        d.set_status(0);
        assert_eq!(d.status(), 0);
        assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), 0);
        assert!(!d.transport.is_activated());
        assert_eq!(dev.lock().unwrap().resets, 1);
        d.init(0, 16).unwrap();
        assert_eq!(dev.lock().unwrap().activations, 2);
        // A device that cannot reset: DEVICE_NEEDS_RESET.
        dev.lock().unwrap().can_reset = false;
        d.set_status(0);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn device_activation_error_sets_needs_reset() {
        let (mut d, _) = setup(Dummy {
            fail_activate: true,
            ..Default::default()
        });
        assert!(matches!(d.init(0, 16), Err(DriverError::NeedsReset(_))));
        assert!(!d.transport.is_activated());
    }

    #[test]
    fn arbitrary_register_traffic_never_panics() {
        let (mut d, _) = setup(Dummy::default());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x >> 8) % 0x140;
            let len = [1usize, 2, 4, 8, 3][(x % 5) as usize];
            let v = (x >> 32).to_le_bytes();
            if x & 1 == 0 {
                d.transport.write(off, &v[..len.min(8)]);
            } else {
                let mut b = vec![0u8; len];
                d.transport.read(off, &mut b);
            }
        }
    }
}
