//! Named helper threads spawned by devices (disk I/O workers and the like).
//!
//! Devices never install seccomp filters themselves (that is the monitor's
//! policy), but a thread they spawn must get its filter before it touches any
//! guest data. The monitor registers one process-wide start hook with
//! [`set_start_hook`]; every thread spawned through [`spawn`] runs the hook
//! with its role name first, then its body.

use std::io;
use std::sync::OnceLock;
use std::thread::JoinHandle;

/// What a new device thread runs first, given its role (e.g. `"blk-worker"`).
/// An error ends the thread before its body runs and is [`spawn`]'s error, so
/// a device thread that cannot be sandboxed never serves the guest.
pub type StartHook = fn(role: &str) -> Result<(), String>;

static START_HOOK: OnceLock<StartHook> = OnceLock::new();

/// Registers the start hook; only the first call takes effect (returns false
/// when a hook was already set).
pub fn set_start_hook(hook: StartHook) -> bool {
    START_HOOK.set(hook).is_ok()
}

/// Spawns a thread named `name` that runs the start hook for `role`, then
/// `body`. Returns once the hook has run in the new thread, so the thread is
/// sandboxed before its caller goes on (and before any guest code runs when
/// devices are built before the vCPUs start).
pub fn spawn<F>(name: String, role: &'static str, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let hooked = START_HOOK.get().map_or(Ok(()), |hook| hook(role));
        let ok = hooked.is_ok();
        let _ = started_tx.send(hooked);
        if ok {
            body();
        }
    })?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(io::Error::other(format!("{role} thread: start hook: {e}"))),
        Err(_) => Err(io::Error::other(format!(
            "{role} thread ended before it started"
        ))),
    }
}
