//! The console: the serial device's output sink, stdin as its input when
//! stdin is a terminal (raw mode, restored by [`TerminalGuard`]), and the
//! event-loop subscribers that feed input with flow control and flush
//! buffered output.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use b2p_devices::legacy::{ConsoleOutput, SerialDevice};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::Console;
use crate::error::{Error, Result};

/// Open the console's output sink.
pub fn open_output(console: &Console) -> Result<ConsoleOutput> {
    Ok(match console {
        Console::Stdio => ConsoleOutput::Stdout,
        Console::None => ConsoleOutput::Sink,
        Console::File(path) => ConsoleOutput::File(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|source| Error::ConsoleFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// Whether stdin is a terminal we should read from: a tty whose foreground
/// process group is ours (a background `b2p-vmm ... &` must neither stop on
/// SIGTTOU when setting raw mode nor steal the shell's input).
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty, tcgetpgrp and getpgrp only inspect the descriptor/process.
    unsafe {
        libc::isatty(libc::STDIN_FILENO) == 1
            && libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp()
    }
}

/// Puts a terminal in raw mode (no echo, no line editing, no signals from
/// ^C) and restores the saved settings when dropped.
pub struct TerminalGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl TerminalGuard {
    pub fn raw(fd: RawFd) -> Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(Error::Terminal(std::io::Error::last_os_error()));
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(Error::Terminal(std::io::Error::last_os_error()));
        }
        Ok(TerminalGuard { fd, saved })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // SAFETY: valid fd and pointer to the settings saved at creation.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Feeds stdin into the serial receive FIFO. While the FIFO is full it stops
/// watching stdin and waits for the device's "FIFO drained" event.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    input_ready: EventFd,
    pending: VecDeque<u8>,
    watching_stdin: bool,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input_ready: EventFd) -> Self {
        ConsoleInput {
            serial,
            input_ready,
            pending: VecDeque::new(),
            watching_stdin: false,
        }
    }

    fn stdin_events() -> Events {
        Events::new_raw(libc::STDIN_FILENO, EventSet::IN)
    }

    /// Push pending bytes into the FIFO; true when all went in.
    fn flush_pending(&mut self) -> bool {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            let n = serial.enqueue_input(a);
            if n == 0 {
                return false;
            }
            self.pending.drain(..n);
        }
        true
    }

    fn watch_stdin(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching_stdin {
            return;
        }
        let res = if on {
            ops.add(Self::stdin_events())
        } else {
            ops.remove(Self::stdin_events())
        };
        match res {
            Ok(()) => self.watching_stdin = on,
            Err(e) => log::warn!("console input: {e:?}"),
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input_ready, EventSet::IN)) {
            log::warn!("console input: {e:?}");
        }
        self.watch_stdin(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready.as_raw_fd() {
            let _ = self.input_ready.read();
            if self.flush_pending() {
                self.watch_stdin(ops, true);
            }
            return;
        }
        if events.fd() != libc::STDIN_FILENO {
            return;
        }
        let mut buf = [0u8; 64];
        let n = match std::io::stdin().lock().read(&mut buf) {
            Ok(0) => {
                // End of input: stop watching for good.
                self.watch_stdin(ops, false);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::warn!("console input: {e}");
                self.watch_stdin(ops, false);
                return;
            }
        };
        self.pending.extend(&buf[..n]);
        if !self.flush_pending() {
            self.watch_stdin(ops, false);
        }
    }
}

/// Writes the serial device's buffered output when its flush timer fires.
pub struct ConsoleFlusher {
    serial: Arc<Mutex<SerialDevice>>,
    timer: TimerFd,
}

impl ConsoleFlusher {
    /// Put `serial` in buffered mode and return the subscriber that flushes it.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Result<Self> {
        let timer = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush_timer()
            .map_err(|source| Error::Io {
                what: "console flush timer",
                source,
            })?;
        Ok(ConsoleFlusher { serial, timer })
    }
}

impl MutEventSubscriber for ConsoleFlusher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::warn!("console flush timer: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush_output();
    }
}
