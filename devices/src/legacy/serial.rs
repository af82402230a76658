//! COM1: a 16550A UART (vm-superio's 8250 model) whose output goes to stdout,
//! a file or nowhere, whose input is fed by the VMM's console, and whose
//! interrupt is an eventfd (the VMM registers it as an irqfd on GSI 4).
//!
//! Output is written through at every byte unless the VMM asks for a flush
//! timer ([`SerialDevice::flush_timer`]): then it is buffered and written
//! at each newline, every 4 KiB, and [`FLUSH_DELAY`] after the first
//! unwritten byte (so prompts without a newline still show up), which turns
//! one write(2) per byte of a Linux boot log into one per line.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::BusDevice;

/// Where the guest's console output goes.
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (opened by the caller).
    File(File),
    /// Discarded.
    Sink,
    /// Any writer (tests, embedding).
    Writer(Box<dyn Write + Send>),
}

impl ConsoleOutput {
    fn into_writer(self) -> Box<dyn Write + Send> {
        match self {
            ConsoleOutput::Stdout => Box::new(std::io::stdout()),
            ConsoleOutput::File(f) => Box::new(f),
            ConsoleOutput::Sink => Box::new(std::io::sink()),
            ConsoleOutput::Writer(w) => w,
        }
    }
}

/// How long buffered output may wait for a newline.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);
/// Buffered output is written once it reaches this size.
const FLUSH_SIZE: usize = 4096;

/// Runs once, at the first byte the guest writes to the transmitter (a
/// boot milestone), before any buffering.
pub type FirstOutputHook = Box<dyn FnOnce() + Send>;

/// The serial device's output: write-through, or buffered with a flush timer.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    timer: Option<TimerFd>,
    armed: bool,
    first_output: Option<FirstOutputHook>,
}

impl ConsoleWriter {
    fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleWriter {
            out,
            buf: Vec::new(),
            timer: None,
            armed: false,
            first_output: None,
        }
    }

    /// Write what is buffered. A failing sink loses the bytes (the guest
    /// must never stall on its console).
    fn flush_now(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.out.write_all(&self.buf);
            let _ = self.out.flush();
            self.buf.clear();
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Some(hook) = self.first_output.take() {
            hook();
        }
        self.buf.extend_from_slice(data);
        match self.timer.as_mut() {
            None => self.flush_now(),
            Some(_) if data.contains(&b'\n') || self.buf.len() >= FLUSH_SIZE => self.flush_now(),
            Some(timer) => {
                if !self.armed && timer.reset(FLUSH_DELAY, None).is_ok() {
                    self.armed = true;
                }
                if !self.armed {
                    self.flush_now();
                }
            }
        }
        Ok(data.len())
    }

    /// vm-superio flushes after every byte: buffering happens above.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.flush_now();
    }
}

/// The interrupt line: an eventfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the console input side that the receive FIFO drained.
pub struct InputEvents(Option<EventFd>);

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0 {
            let _ = evt.write(1);
        }
    }
}

/// The COM1 device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, InputEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// `irq` fires for each interrupt; `input_ready` (if any) fires when the
    /// guest has drained the receive FIFO, so the console can feed more.
    pub fn new(irq: EventFd, output: ConsoleOutput, input_ready: Option<EventFd>) -> Self {
        SerialDevice {
            serial: Serial::with_events(
                IrqTrigger(irq),
                InputEvents(input_ready),
                ConsoleWriter::new(output.into_writer()),
            ),
        }
    }

    /// Switch output to buffered mode. Returns the timer to watch: when it
    /// is readable, read it and call [`SerialDevice::flush_output`].
    pub fn flush_timer(&mut self) -> std::io::Result<TimerFd> {
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: dup returns a new descriptor we own (checked below).
        let dup = unsafe { libc::dup(timer.as_raw_fd()) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh, owned timerfd descriptor.
        let watcher = unsafe { TimerFd::from_raw_fd(dup) };
        self.serial.writer_mut().timer = Some(timer);
        Ok(watcher)
    }

    /// Run `hook` at the first byte the guest transmits (once).
    pub fn on_first_output(&mut self, hook: FirstOutputHook) {
        self.serial.writer_mut().first_output = Some(hook);
    }

    /// Write buffered output now (the flush timer fired).
    pub fn flush_output(&mut self) {
        let w = self.serial.writer_mut();
        w.armed = false;
        w.flush_now();
    }

    /// Free room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queue bytes for the guest to read; returns how many were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.serial.fifo_capacity());
        if n == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match (u8::try_from(offset), data.len()) {
            (Ok(o), 1) if o < 8 => self.serial.read(o),
            _ => 0,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), [v]) = (u8::try_from(offset), data) {
            if o < 8 {
                // A lost output byte (closed stdout, full disk) must not stop the guest.
                let _ = self.serial.write(o, *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_interrupts() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleOutput::Writer(Box::new(out.clone())),
            Some(ready.try_clone().unwrap()),
        );
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Enable the RX interrupt, feed input, read it back.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert_eq!(ready.read().unwrap(), 1);
        // Hostile accesses are ignored.
        dev.write(u64::MAX, &[1]);
        dev.write(0, &[1, 2, 3]);
        let mut wide = [0xffu8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
    }

    #[test]
    fn buffered_output_flushes_on_newline_timer_and_drop() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, ConsoleOutput::Writer(Box::new(out.clone())), None);
        let mut timer = dev.flush_timer().unwrap();
        for b in b"log line\nlogin: " {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"log line\n");
        // The prompt shows up once the timer fires.
        assert_eq!(timer.wait().unwrap(), 1);
        dev.flush_output();
        assert_eq!(&*out.0.lock().unwrap(), b"log line\nlogin: ");
        dev.write(0, b"x");
        drop(dev);
        assert_eq!(&*out.0.lock().unwrap(), b"log line\nlogin: x");
    }

    #[test]
    fn first_output_hook_runs_once_at_the_first_byte() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, ConsoleOutput::Sink, None);
        let calls = Arc::new(Mutex::new(0));
        let c = calls.clone();
        dev.on_first_output(Box::new(move || *c.lock().unwrap() += 1));
        dev.write(1, &[0]); // IER: not output
        dev.write(3, &[3]); // LCR
        assert_eq!(*calls.lock().unwrap(), 0);
        dev.write(0, b"a");
        dev.write(0, b"b");
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[test]
    fn fifo_fills_up() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, ConsoleOutput::Sink, None);
        let big = vec![b'x'; 1000];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < 1000);
        assert_eq!(dev.input_capacity(), 0);
        assert_eq!(dev.enqueue_input(&big), 0);
    }
}
