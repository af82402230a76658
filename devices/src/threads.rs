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
/// An error ends the whole process with one log line: a device thread that
/// cannot be sandboxed must not serve the guest, and ending only the thread
/// would leave its device hung.
pub type StartHook = fn(role: &str) -> Result<(), String>;

static START_HOOK: OnceLock<StartHook> = OnceLock::new();

/// Registers the start hook; only the first call takes effect (returns false
/// when a hook was already set).
pub fn set_start_hook(hook: StartHook) -> bool {
    START_HOOK.set(hook).is_ok()
}

/// Spawns a thread named `name` that runs the start hook for `role`, then `body`.
pub fn spawn<F>(name: String, role: &'static str, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new().name(name).spawn(move || {
        if let Some(hook) = START_HOOK.get() {
            if let Err(e) = hook(role) {
                log::error!("{role} thread: start hook failed: {e}");
                std::process::exit(1);
            }
        }
        body();
    })
}
