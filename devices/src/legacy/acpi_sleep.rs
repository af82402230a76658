//! The ACPI SLEEP_CONTROL / SLEEP_STATUS register of a hardware-reduced
//! platform (one byte at PIO 0x600, as Cloud Hypervisor has it). Linux powers
//! off by writing 0x80 (WAK_STS) to status, then `(SLP_TYP << 2) | SLP_EN`
//! to control; with `SLP_TYP` = 5 (`_S5_` in the DSDT) that is 0x34.

use crate::legacy::{EventSink, LegacyEvent};
use crate::BusDevice;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The sleep control/status register.
pub struct AcpiSleep {
    s5_type: u8,
    events: EventSink,
}

impl AcpiSleep {
    /// `s5_type` is the SLP_TYP the DSDT's `_S5_` package announces.
    pub fn new(s5_type: u8, events: EventSink) -> Self {
        AcpiSleep { s5_type, events }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake events pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 1 {
            return;
        }
        let v = data[0];
        if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_type {
            (self.events)(LegacyEvent::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn s5_write_powers_off() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = AcpiSleep::new(5, Arc::new(move |e| s.lock().unwrap().push(e)));
        dev.write(0, &[0x80]); // clear WAK_STS
        dev.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        dev.write(0, &[0x20 | (3 << 2)]); // S3: not ours
        dev.write(1, &[0x34]);
        dev.write(0, &[0x34, 0]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(0, &[0x34]);
        assert_eq!(*seen.lock().unwrap(), vec![LegacyEvent::PowerOff]);
        let mut b = [0xffu8; 4];
        dev.read(0, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
