//! The i8042 keyboard controller, reduced to what a VM needs: command 0xFE
//! on port 0x64 pulses the CPU reset line (Linux's `reboot=k`, its fallback
//! when ACPI reset is absent). Registered at PIO 0x60..=0x64.

use vm_superio::{I8042Device, Trigger};

use crate::legacy::{EventSink, LegacyEvent};
use crate::BusDevice;

struct ResetTrigger(EventSink);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(LegacyEvent::Reset);
        Ok(())
    }
}

/// i8042 reset line.
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(events: EventSink) -> Self {
        I8042 {
            inner: I8042Device::new(ResetTrigger(events)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (so `kb_wait` ends).
        let v = u8::try_from(offset).map_or(0, |o| self.inner.read(o));
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), [v]) = (u8::try_from(offset), data) {
            let _ = self.inner.write(o, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        let mut b = [0xffu8];
        dev.read(4, &mut b);
        assert_eq!(b, [0]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfe, 0xfe]);
        dev.write(u64::MAX, &[0xfe]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![LegacyEvent::Reset]);
    }
}
