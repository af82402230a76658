//! The console: the serial device's output sink, stdin as its input when
//! stdin is a terminal (raw mode, restored by [`TerminalGuard`]), and the
//! event-loop subscribers that feed input with flow control and flush
//! buffered output.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use b2p_devices::legacy::{ConsoleOutput, SerialDevice};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::Console;
use crate::error::{Error, Result};

/// The console's output, opened by [`open_output`] without truncating or
/// writing anything: a refused VM must leave the file as it found it.
/// [`OpenedConsole::commit`] empties a regular file once every disk is
/// locked; dropped uncommitted, a file that `open_output` created is removed.
pub struct OpenedConsole {
    output: Option<ConsoleOutput>,
    /// The regular file to empty at commit (the same open file as the output).
    truncate: Option<File>,
    /// The path when `open_output` created the file.
    created: Option<PathBuf>,
}

impl OpenedConsole {
    fn new(output: ConsoleOutput) -> Self {
        OpenedConsole {
            output: Some(output),
            truncate: None,
            created: None,
        }
    }

    /// The sink for the serial device (once; `Sink` after that).
    pub fn take_output(&mut self) -> ConsoleOutput {
        self.output.take().unwrap_or(ConsoleOutput::Sink)
    }

    /// Every disk is locked and the VM is built: empty the console file
    /// (the guest has not written yet) and keep it.
    pub fn commit(&mut self) -> Result<()> {
        self.created = None;
        if let Some(f) = self.truncate.take() {
            f.set_len(0).map_err(|source| Error::Io {
                what: "emptying the console file",
                source,
            })?;
        }
        Ok(())
    }
}

impl Drop for OpenedConsole {
    fn drop(&mut self) {
        if let Some(path) = self.created.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// (device, inode) of what `path` names, following symlinks.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Opens the console's output sink without truncating it. A file is
/// refused when it is one of `disks` (under any name), a symbolic link
/// (O_NOFOLLOW: another user's link must not redirect it), a FIFO nobody
/// reads (O_NONBLOCK: open must not hang), or in use as another VM's
/// console (an exclusive flock, held while the VM runs). A new file is
/// created 0600.
pub fn open_output(console: &Console, disks: &[PathBuf]) -> Result<OpenedConsole> {
    let path = match console {
        Console::Stdio => return Ok(OpenedConsole::new(ConsoleOutput::Stdout)),
        Console::None => return Ok(OpenedConsole::new(ConsoleOutput::Sink)),
        Console::File(path) => path,
    };
    let err = |source: std::io::Error| match source.raw_os_error() {
        Some(libc::ELOOP) => Error::ConsoleSymlink { path: path.clone() },
        Some(libc::ENXIO) if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) => {
            Error::ConsoleFifo { path: path.clone() }
        }
        _ => Error::ConsoleFile {
            path: path.clone(),
            source,
        },
    };
    let open = |create: bool| {
        OpenOptions::new()
            .write(true)
            .create_new(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    };
    let (file, created) = match open(false) {
        Ok(f) => (f, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match open(true) {
            Ok(f) => (f, true),
            // Created by someone else in between: open what is there.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                (open(false).map_err(err)?, false)
            }
            Err(e) => return Err(err(e)),
        },
        Err(e) => return Err(err(e)),
    };
    let mut opened = OpenedConsole::new(ConsoleOutput::Sink);
    opened.created = created.then(|| path.clone());
    let meta = file.metadata().map_err(err)?;
    let id = (meta.dev(), meta.ino());
    if let Some(disk) = disks.iter().find(|d| file_id(d) == Some(id)) {
        return Err(Error::ConsoleIsDisk {
            path: path.clone(),
            disk: disk.clone(),
        });
    }
    // Writes block like they do on stdout (a FIFO's reader sets the pace).
    // SAFETY: fcntl on an fd we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    if meta.file_type().is_file() {
        // SAFETY: flock on an fd we own; the lock lives as long as the open file.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::ConsoleInUse { path: path.clone() });
            }
            return Err(err(e));
        }
        opened.truncate = Some(file.try_clone().map_err(err)?);
        opened.output = Some(ConsoleOutput::Writer(Box::new(CappedFile::new(
            file,
            CONSOLE_FILE_MAX,
        ))));
        return Ok(opened);
    }
    opened.output = Some(ConsoleOutput::File(file));
    Ok(opened)
}

/// A console file (a regular one) holds at most this much guest output;
/// the rest is dropped after one marker line (a cap, not a rotation: it
/// needs no syscall but write(2) on the threads that write the console).
pub const CONSOLE_FILE_MAX: u64 = 16 << 20;

/// The line written where the output was cut.
const CAP_MARKER: &[u8] = b"\n[b2p: console output cut here: this file holds at most 16 MiB]\n";

/// A file that takes at most `left` more bytes of output, then drops the rest.
pub struct CappedFile<W> {
    inner: W,
    left: u64,
}

impl<W: std::io::Write> CappedFile<W> {
    pub fn new(inner: W, max: u64) -> Self {
        CappedFile { inner, left: max }
    }
}

impl<W: std::io::Write> std::io::Write for CappedFile<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // Dropped: the guest must not see an error (or stall) for it.
            return Ok(buf.len());
        }
        let room = usize::try_from(self.left).unwrap_or(usize::MAX);
        if buf.len() <= room {
            let n = self.inner.write(buf)?;
            self.left -= n as u64;
            return Ok(n);
        }
        self.inner.write_all(&buf[..room])?;
        self.left = 0;
        self.inner.write_all(CAP_MARKER)?;
        log::warn!("console file: the guest wrote more than 16 MiB; dropping the rest");
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn capped_file_keeps_the_first_bytes_then_one_marker() {
        let mut w = CappedFile::new(Vec::new(), 10);
        assert_eq!(w.write(b"12345").unwrap(), 5);
        assert_eq!(w.write(b"6789abcdef").unwrap(), 10);
        for _ in 0..1000 {
            assert_eq!(w.write(b"more output").unwrap(), 11);
        }
        let mut want = b"123456789a".to_vec();
        want.extend_from_slice(CAP_MARKER);
        assert_eq!(w.inner, want);
    }

    #[test]
    fn the_cap_is_what_the_marker_says() {
        assert_eq!(CONSOLE_FILE_MAX, 16 << 20);
        assert!(String::from_utf8_lossy(CAP_MARKER).contains("16 MiB"));
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("b2p-console-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_new_console_file_is_private_and_removed_when_the_vm_is_not_built() {
        let d = scratch("new");
        let path = d.join("console.log");
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let opened = open_output(&Console::File(path.clone()), &[]).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(opened);
        assert!(
            !path.exists(),
            "an uncommitted console file was left behind"
        );
        let mut opened = open_output(&Console::File(path.clone()), &[]).unwrap();
        opened.commit().unwrap();
        drop(opened);
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_existing_file_is_emptied_only_at_commit_and_locked() {
        let d = scratch("existing");
        let path = d.join("console.log");
        std::fs::write(&path, b"the last boot").unwrap();
        let mut opened = open_output(&Console::File(path.clone()), &[]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"the last boot");
        match open_output(&Console::File(path.clone()), &[]) {
            Err(Error::ConsoleInUse { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a second VM got the same console file"),
        }
        opened.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_fifo_without_reader_is_refused_at_once() {
        let d = scratch("fifo");
        let path = d.join("console.fifo");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        match open_output(&Console::File(path.clone()), &[]) {
            Err(Error::ConsoleFifo { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened a FIFO nobody reads"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
