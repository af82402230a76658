//! The contract between a device and the VMM's PIO/MMIO buses.

/// A device that answers guest reads and writes on a bus (PIO or MMIO).
///
/// `offset` is relative to the base the device was registered at. The guest
/// controls `offset` and `data.len()`: implementations must accept any value
/// without panicking (unknown registers read as zero, writes are ignored).
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
