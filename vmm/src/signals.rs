//! Stopping a VM on SIGINT, SIGTERM, SIGHUP or SIGQUIT, for the binaries
//! that embed the monitor (`b2p-vmm run`, the `b2p` manager's VM process):
//! the signals are blocked in every thread from the start of `main`, so one
//! that arrives during setup stays pending (setup never blocks: console,
//! kernel, initrd and disks are opened so that a FIFO cannot hang it) and
//! stops the VM as soon as the waiting thread starts. Each stop goes
//! through the VM's teardown: sockets removed, terminal restored.

use std::io;

use crate::StopHandle;

/// The signals that stop a VM.
pub const STOP_SIGNALS: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// [`STOP_SIGNALS`], blocked in the calling thread and in every thread it
/// starts afterwards (call it first thing, before [`crate::Vm::start`]).
pub struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks the stop signals in this thread (and its future children).
    pub fn block() -> io::Result<StopSignals> {
        // SAFETY: plain sigset manipulation on a local; pthread_sigmask
        // only reads the set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in STOP_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(StopSignals(set))
        }
    }

    /// Starts the thread that stops the VM behind `stop` when one of the
    /// signals arrives (at once when one came during setup).
    pub fn stop_vm_on_signal(self, stop: StopHandle) -> io::Result<()> {
        let set = self.0;
        std::thread::Builder::new()
            .name("b2p-signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: `set` is a valid sigset; sigwait writes the signal number.
                while unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    // Later ones (a second ^C during teardown) are swallowed:
                    // the stop is already under way.
                    log::info!("signal {sig}: stopping the VM");
                    stop.stop();
                }
            })
            .map(|_| ())
    }
}
