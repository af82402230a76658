//! The Firecracker-compatible boot timer: a one-byte write of 123 at offset
//! 0 of its MMIO page (0xC000_0000) records "guest boot complete" with the
//! time since the VMM process started.

use crate::legacy::{EventSink, LegacyEvent};
use crate::BusDevice;

/// The byte the guest writes when it has booted.
pub const MAGIC_VALUE: u8 = 123;

/// CLOCK_MONOTONIC in nanoseconds (the clock `std::time::Instant` uses).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The boot-timer device.
pub struct BootTimer {
    start_ns: u64,
    events: EventSink,
    fired: bool,
}

impl BootTimer {
    /// `start_ns`: [`monotonic_ns`] when the VMM process started.
    pub fn new(start_ns: u64, events: EventSink) -> Self {
        BootTimer {
            start_ns,
            events,
            fired: false,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [MAGIC_VALUE] && !self.fired {
            self.fired = true;
            let us = monotonic_ns().saturating_sub(self.start_ns) / 1000;
            (self.events)(LegacyEvent::BootComplete { since_start_us: us });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn fires_once_on_magic() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let start = monotonic_ns() - 5_000_000;
        let mut dev = BootTimer::new(start, Arc::new(move |e| s.lock().unwrap().push(e)));
        dev.write(0, &[122]);
        dev.write(1, &[123]);
        dev.write(0, &[123, 0, 0, 0]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(0, &[123]);
        dev.write(0, &[123]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        match seen[0] {
            LegacyEvent::BootComplete { since_start_us } => assert!(since_start_us >= 5000),
            e => panic!("{e:?}"),
        }
    }
}
