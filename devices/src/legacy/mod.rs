//! Legacy devices every b2p guest sees: 8250 serial (COM1), the i8042 reset
//! line, the Firecracker-compatible boot timer, the ACPI sleep-control
//! register (S5 power-off) and a silent sink for the POST-code port.
//!
//! Devices that end or mark the life of the VM report it through an
//! [`EventSink`]; the VMM decides what to do (stop the vCPUs, print a timing).

use std::sync::Arc;

pub mod acpi_sleep;
pub mod boot_timer;
pub mod i8042;
pub mod serial;
pub mod sink;

pub use acpi_sleep::AcpiSleep;
pub use boot_timer::BootTimer;
pub use i8042::I8042;
pub use serial::{ConsoleOutput, SerialDevice};
pub use sink::PortSink;

/// Something a legacy device tells the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyEvent {
    /// ACPI S5: the guest powered off.
    PowerOff,
    /// The guest pulsed the reset line (i8042 command 0xFE).
    Reset,
    /// The guest wrote the boot-timer magic; microseconds since the VMM started.
    BootComplete { since_start_us: u64 },
}

/// Where legacy devices report [`LegacyEvent`]s (called on the vCPU thread).
pub type EventSink = Arc<dyn Fn(LegacyEvent) + Send + Sync>;
