//! Legacy devices: 8250 serial, i8042 reset line, boot timer.
