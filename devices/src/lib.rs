//! b2p-devices: the emulated devices of a b2p microVM.
//!
//! `legacy` holds the PIO/MMIO devices every guest sees (8250 serial, i8042
//! reset line, the Firecracker-compatible boot timer); `virtio` holds the
//! virtio-mmio transport and the block, net, vsock and rng devices.
//! Nothing here calls `/dev/kvm`: devices see guest memory, eventfds and the
//! [`BusDevice`] trait, so each one is testable in-process with no VM.

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod threads;
pub mod virtio;

pub use bus::BusDevice;

/// Guest memory as every device sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
