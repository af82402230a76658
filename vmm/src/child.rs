//! Helper processes the monitor starts and owns (passt, virtiofsd):
//! [`spawn`] starts one with PR_SET_PDEATHSIG (it ends if we die without
//! cleaning up) and, optionally, one inherited descriptor; the returned
//! [`Helper`] ends it when dropped at teardown (SIGTERM, up to 2 s, then
//! SIGKILL) and reaps it.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::RawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// A helper process we started; ended and reaped when dropped.
#[derive(Debug)]
pub struct Helper {
    child: Child,
}

impl Helper {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and is reaped) already.
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Both helpers exit by themselves once our end of their socket is
        // closed; a signal makes sure, and the wait reaps it.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            // Up to 2 s: a helper still setting itself up (passt takes a
            // while; the probe guest can be done first) exits once through.
            for _ in 0..2000 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // SAFETY: as above.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// `program` in `PATH` (an executable regular file), if any.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

/// An executable regular file.
pub fn is_executable(p: &std::path::Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Starts `cmd` with PR_SET_PDEATHSIG = SIGTERM; `keep` (a CLOEXEC
/// descriptor of ours) stays open across its exec under the same number.
pub fn spawn(mut cmd: Command, keep: Option<RawFd>) -> io::Result<Helper> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls (fcntl, prctl, getppid) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl.
            if libc::getppid() != parent {
                return Err(io::Error::other("the monitor is gone"));
            }
            Ok(())
        });
    }
    Ok(Helper {
        child: cmd.spawn()?,
    })
}
