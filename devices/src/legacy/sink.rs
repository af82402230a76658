//! A device that ignores writes and reads as zero (the POST-code port 0x80,
//! which the probe guest hits with its very first instruction).

use crate::BusDevice;

/// Silent sink: writes vanish, reads return zeros.
#[derive(Debug, Default)]
pub struct PortSink;

impl BusDevice for PortSink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
