//! The passt process behind `--net passt`, and joining one already
//! listening (`--net passt=PATH`).
//!
//! [`spawn`] starts Debian's `passt` as its own process on one end of a
//! `socketpair(AF_UNIX, SOCK_STREAM)` (`passt --fd N`, which makes it serve
//! that one connection and exit when it closes): no socket file anywhere,
//! so no directory to protect and nobody else can connect to it. It runs
//! in the foreground with its messages on our stderr (the VM's log), with
//! PR_SET_PDEATHSIG so it ends if we die without cleaning up; the returned
//! [`Passt`] ends it (SIGTERM, then reaps it) when dropped at teardown.
//! As root, passt drops to user `nobody` by itself.
//!
//! [`connect`] joins a passt started by someone else (`passt -s PATH`).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The program looked up in `PATH`.
pub const PASST_PROGRAM: &str = "passt";

/// Why passt could not be started or joined.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("passt is not installed (install the `passt` package: apt install passt)")]
    NotInstalled,
    #[error("socketpair for passt: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to passt at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A passt process we started; ended and reaped when dropped.
#[derive(Debug)]
pub struct Passt {
    child: Child,
}

impl Passt {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        // It exits by itself once our end of the socket is closed; a signal
        // makes sure, and the wait reaps it.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            // Up to 2 s: a passt still setting itself up (it takes a
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

/// `passt` in `PATH` (an executable regular file), if any.
pub fn find_passt() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(PASST_PROGRAM))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Start passt on a new socketpair; returns our end (connected, blocking)
/// and the process.
pub fn spawn() -> Result<(OwnedFd, Passt), PasstError> {
    let program = find_passt().ok_or(PasstError::NotInstalled)?;
    spawn_program(&program)
}

/// [`spawn`] with an explicit program path.
pub fn spawn_program(program: &Path) -> Result<(OwnedFd, Passt), PasstError> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(PasstError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are new and ours.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let child_fd = theirs.as_raw_fd();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(program);
    cmd.args(["--foreground", "--quiet", "--stderr", "--fd"])
        .arg(child_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: only async-signal-safe calls (fcntl, prctl, getppid) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Its end survives exec; ours (CLOEXEC) does not.
            if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
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
    let child = cmd.spawn().map_err(|source| PasstError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    drop(theirs);
    let passt = Passt { child };
    Ok((ours, passt))
}

/// Connect to a passt listening on the Unix socket `path` (`passt -s PATH`).
pub fn connect(path: &Path) -> Result<OwnedFd, PasstError> {
    let s = UnixStream::connect(path).map_err(|source| PasstError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(OwnedFd::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let e = spawn_program(Path::new("/nonexistent/passt")).unwrap_err();
        assert!(matches!(e, PasstError::Spawn { .. }), "{e}");
    }

    #[test]
    fn connect_to_nothing_names_the_path() {
        let e = connect(Path::new("/nonexistent/passt.sock")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/passt.sock"), "{e}");
    }

    #[test]
    fn not_installed_names_the_package() {
        assert!(PasstError::NotInstalled
            .to_string()
            .contains("apt install passt"));
    }
}
