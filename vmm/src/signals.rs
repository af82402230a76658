//! Stopping a VM on SIGINT/SIGTERM, for the binaries that embed the
//! monitor (`b2p-vmm run`, the `b2p` manager's VM process): the signals are
//! blocked in every thread and one thread waits for them with sigwait.

use std::io;

use crate::StopHandle;

/// SIGINT and SIGTERM, blocked in the calling thread and in every thread
/// it starts afterwards (call it before [`crate::Vm::start`]).
pub struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in this thread (and its future children).
    pub fn block() -> io::Result<StopSignals> {
        // SAFETY: plain sigset manipulation on a local; pthread_sigmask
        // only reads the set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(StopSignals(set))
        }
    }

    /// Starts the thread that stops the VM behind `stop` when one of the
    /// signals arrives.
    pub fn stop_vm_on_signal(self, stop: StopHandle) -> io::Result<()> {
        let set = self.0;
        std::thread::Builder::new()
            .name("b2p-signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: `set` is a valid sigset; sigwait writes the signal number.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    log::info!("signal {sig}: stopping the VM");
                    stop.stop();
                }
            })
            .map(|_| ())
    }
}
