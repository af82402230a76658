//! The I/O thread of one virtio-blk disk.
//!
//! A FLUSH's `fdatasync`, a large read or a WRITE_ZEROES that is zeroed by
//! hand can take seconds; on the VM's event loop that would stall vsock, the
//! console and every other device. So each disk gets one thread
//! (`b2p-blk<N>`, role `"blk-worker"`, spawned through
//! [`crate::threads::spawn`] when the device is built, so before any guest
//! code runs) that waits on the queue's notification eventfd itself and
//! runs the whole queue loop: parse, disk I/O, used ring, interrupt. The
//! event loop never touches the disk.
//!
//! The queue state ([`Engine`]) sits behind a mutex that the worker holds
//! for one pass over the available ring. A device reset asks the pass to stop
//! after the request in flight and then takes the mutex, so a reset waits
//! for at most one request (whose size the request limits bound).
//!
//! Syscalls the worker makes (for its seccomp allowlist): `poll` on its two
//! eventfds, `read` to drain them, `preadv`/`pwritev` on the image,
//! `fdatasync`, `fallocate` (DISCARD, WRITE_ZEROES), `write` to the irqfd
//! eventfd, `futex` (the engine mutex, the sync condvar), and `write` to
//! stderr through the logger. Its allocations can reach `mmap`/`munmap`/
//! `madvise`/`mprotect` (malloc's per-thread arena), and it ends with
//! `sigaltstack`, `munmap`, `madvise` and `exit`.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::device::Engine;

/// What the device and its worker share.
pub(crate) struct Shared {
    pub engine: Mutex<Engine>,
    /// Set while a reset waits for the engine: the pass stops after the
    /// request in flight.
    pub yield_now: AtomicBool,
    /// The queue's notification eventfd, known from the first activation on
    /// (the VMM registered it once; it is kept across resets).
    pub queue_evt: OnceLock<EventFd>,
    /// Wakes the worker: a new activation, a sync, or the end.
    kick: EventFd,
    stop: AtomicBool,
    /// (syncs asked for, syncs done) and its condvar: see [`Worker::sync`].
    sync: Mutex<(u64, u64)>,
    synced: Condvar,
}

impl Shared {
    /// The engine, even if a thread panicked while holding it (test and
    /// debug builds; the release profile aborts on panic).
    pub fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The worker thread and what it shares with the device.
pub(crate) struct Worker {
    pub shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread `name` serving `engine`.
    pub fn spawn(name: String, engine: Engine) -> io::Result<Worker> {
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            yield_now: AtomicBool::new(false),
            queue_evt: OnceLock::new(),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            sync: Mutex::new((0, 0)),
            synced: Condvar::new(),
        });
        let s = shared.clone();
        let thread = crate::threads::spawn(name, "blk-worker", move || run(&s))?;
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }

    /// Makes the worker look at the queue now.
    pub fn kick(&self) {
        let _ = self.shared.kick.write(1);
    }

    /// Waits until the worker has made a full pass over the queue that
    /// started after this call (so every chain published before it is
    /// done), or `timeout` passed. Returns whether it has.
    pub fn sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.sync.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        let want = s.0;
        self.kick();
        while s.1 < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = match self.shared.synced.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Blocks until the kick or the queue eventfd is readable.
fn wait(kick: &EventFd, queue: Option<&EventFd>) {
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: queue.map_or(-1, |q| q.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll reads and writes the two pollfds we pass; a negative fd
    // is ignored. EINTR and errors just mean another look at the queue.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
}

fn run(s: &Shared) {
    loop {
        wait(&s.kick, s.queue_evt.get());
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = s.kick.read();
        if let Some(q) = s.queue_evt.get() {
            let _ = q.read();
        }
        let seen = s.sync.lock().unwrap_or_else(|e| e.into_inner()).0;
        s.engine().process_queue(&s.yield_now);
        let mut g = s.sync.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = g.1.max(seen);
        s.synced.notify_all();
    }
}
