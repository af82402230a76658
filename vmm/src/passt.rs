//! The passt process behind `--net passt`, and joining one already
//! listening (`--net passt=PATH`).
//!
//! [`spawn`] starts Debian's `passt` as its own process on one end of a
//! `socketpair(AF_UNIX, SOCK_STREAM)` (`passt --fd N`, which makes it serve
//! that one connection and exit when it closes): no socket file anywhere,
//! so no directory to protect and nobody else can connect to it. It runs
//! in the foreground with its messages on our stderr (the VM's log), as a
//! [`crate::child::Helper`]: PR_SET_PDEATHSIG, and ended (SIGTERM, then
//! reaped) when dropped at teardown.
//! As root, passt drops to user `nobody` by itself.
//!
//! [`connect`] joins a passt started by someone else (`passt -s PATH`).

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
pub type Passt = crate::child::Helper;

/// `passt` in `PATH` (an executable regular file), if any.
pub fn find_passt() -> Option<PathBuf> {
    crate::child::find_in_path(PASST_PROGRAM)
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
    let mut cmd = Command::new(program);
    cmd.args(["--foreground", "--quiet", "--stderr", "--fd"])
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // Its end survives exec; ours (CLOEXEC) does not.
    let passt =
        crate::child::spawn(cmd, Some(theirs.as_raw_fd())).map_err(|source| PasstError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    drop(theirs);
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
