//! Virtio over MMIO: the device contract shared by the transport and the
//! block, net, vsock and rng devices.
//!
//! Life of a device (the Firecracker pattern):
//! 1. The VMM builds the device and wraps it in an `MmioTransport`
//!    (`Arc<Mutex<dyn VirtioDevice>>` inside), registers the transport on the
//!    MMIO bus, each `queue_evts()[i]` as a KVM ioeventfd on
//!    `base + QueueNotify` with datamatch `i`, and `IrqLine::irq_evt` as a KVM
//!    irqfd on the device's GSI. It also registers the device with the event
//!    loop (`event_manager::MutEventSubscriber`), whose `init` subscribes the
//!    device's own `activate_evt` (and nothing else yet).
//! 2. The driver negotiates features and sets up queues through the transport
//!    registers. On DRIVER_OK the transport calls [`VirtioDevice::activate`]
//!    with the queues, their eventfds, the guest memory and the interrupt
//!    line. The device stores them and writes its `activate_evt`.
//! 3. In the event loop the device sees `activate_evt` and subscribes the
//!    queue eventfds and its backend fds (file, TAP, Unix sockets); the
//!    activate and queue eventfds, the active state and their subscription
//!    are [`lifecycle::Lifecycle`]'s, shared by every device but blk. From then
//!    on a queue notification or backend readiness makes it process chains
//!    and call `IrqLine::signal_used_queue`. (virtio-blk is the exception:
//!    its worker thread waits on the queue eventfd itself, so disk I/O never
//!    runs on the event loop; see `block::worker`.)
//! 4. A write of 0 to Status resets: the transport calls
//!    [`VirtioDevice::reset`]; the device drops its queues and backend
//!    subscriptions (a device that cannot reset returns false and the
//!    transport sets DEVICE_NEEDS_RESET).
//!
//! Everything a guest writes (register values, descriptor chains, packets)
//! is untrusted: it may produce errors, never panics or accesses outside
//! guest memory.

pub mod balloon;
pub mod block;
pub mod fs;
pub mod iovec;
pub mod lifecycle;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vsock;

pub use mmio::MmioTransport;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Virtio device ids (virtio 1.2 §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus
/// register plus the eventfd the VMM registers as an irqfd for the GSI.
#[derive(Debug)]
pub struct IrqLine {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl IrqLine {
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqLine {
            status: AtomicU32::new(0),
            irq_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as a KVM irqfd (or to poll in tests).
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// Current InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clear the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Raise the interrupt with the given status bits.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// A used buffer was added to some queue.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.trigger(VIRTIO_MMIO_INT_VRING)
    }

    /// The config space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.trigger(VIRTIO_MMIO_INT_CONFIG)
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// Feature bits both sides agreed on.
    pub acked_features: u64,
    /// The queues, ready and validated, in queue-index order.
    pub queues: Vec<Queue>,
    /// `queue_evts[i]` fires when the driver notifies queue `i`.
    pub queue_evts: Vec<EventFd>,
    pub irq: Arc<IrqLine>,
}

impl ActivateContext {
    /// The checks every device makes first: not active yet, and exactly
    /// `queues` queues with one notifier each.
    pub fn check(&self, already_active: bool, queues: usize) -> Result<(), ActivateError> {
        if already_active {
            return Err(ActivateError::AlreadyActive);
        }
        if self.queues.len() != queues || self.queue_evts.len() != queues {
            return Err(ActivateError::QueueCount {
                expected: queues,
                got: self.queues.len(),
            });
        }
        Ok(())
    }
}

/// Why a device refused activation (the transport then sets DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("wrong number of queues: expected {expected}, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device already activated")]
    AlreadyActive,
    #[error("backend: {0}")]
    Backend(#[from] std::io::Error),
}

/// Copies the window `offset..offset + data.len()` of a config space into
/// `data`; bytes past the end of `config` (or an offset that overflows) read 0.
pub fn read_config_window(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).ok();
    for (i, b) in data.iter_mut().enumerate() {
        *b = start
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device as the MMIO transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device id (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// Read from the device-specific config space. Out-of-range bytes read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the config space. Out-of-range or read-only bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device with negotiated features and ready queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Return to the pre-activation state. `false` if the device cannot.
    fn reset(&mut self) -> bool {
        false
    }
}
