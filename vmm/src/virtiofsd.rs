//! The virtiofsd behind `--fs tag=T,path=DIR`, and joining one already
//! listening (`--fs tag=T,socket=PATH`).
//!
//! [`spawn`] binds a listening Unix socket in a fresh 0700 directory,
//! connects to it (the connection waits in the backlog), removes the
//! socket file and the directory, and starts virtiofsd on the listening
//! descriptor (`--fd N`): it accepts that one connection, serves it, and
//! exits when it closes; nobody else can ever reach the socket. virtiofsd
//! runs as the invoking user (as root with its namespace sandbox, as
//! anyone else with `--sandbox none`, which needs no privileges) and is a
//! [`crate::child::Helper`]: PR_SET_PDEATHSIG, ended with the VM.
//!
//! Found as Debian 13's `/usr/libexec/virtiofsd`, else `virtiofsd` in PATH
//! (`cargo install virtiofsd` puts it in ~/.cargo/bin).

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::child::{self, Helper};

/// Debian 13's virtiofsd.
pub const DEBIAN_VIRTIOFSD: &str = "/usr/libexec/virtiofsd";
/// The program looked up in PATH (and ~/.cargo/bin) otherwise.
pub const VIRTIOFSD_PROGRAM: &str = "virtiofsd";

/// Why virtiofsd could not be started or joined.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("virtiofsd is not installed (Debian 13: apt install virtiofsd; elsewhere: cargo install virtiofsd)")]
    NotInstalled,
    #[error("shared folder {}: {reason}", path.display())]
    Folder { path: PathBuf, reason: String },
    #[error("socket for virtiofsd: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to virtiofsd at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// virtiofsd: Debian's, then PATH, then ~/.cargo/bin.
pub fn find_virtiofsd() -> Option<PathBuf> {
    let debian = Path::new(DEBIAN_VIRTIOFSD);
    if child::is_executable(debian) {
        return Some(debian.to_path_buf());
    }
    child::find_in_path(VIRTIOFSD_PROGRAM).or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/virtiofsd");
        child::is_executable(&p).then_some(p)
    })
}

/// A folder virtiofsd can share: it exists and is a directory.
pub fn check_folder(path: &Path) -> Result<(), VirtiofsdError> {
    let bad = |reason: String| VirtiofsdError::Folder {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(bad("is not a folder".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(bad("does not exist".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// A listening socket nobody else can reach, and our queued connection to it.
fn private_socket() -> io::Result<(UnixListener, UnixStream)> {
    let mut template = std::env::temp_dir()
        .join("b2p-virtiofsd-XXXXXX")
        .into_os_string()
        .into_encoded_bytes();
    template.push(0);
    // SAFETY: mkdtemp rewrites the NUL-terminated template in place.
    let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    template.pop();
    // SAFETY: mkdtemp left a path of the same bytes, minus the NUL.
    let dir = PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(template) });
    let sock = dir.join("s");
    let result = UnixListener::bind(&sock).and_then(|l| Ok((UnixStream::connect(&sock)?, l)));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
    let (stream, listener) = result?;
    Ok((listener, stream))
}

/// Start virtiofsd sharing `dir` (read-only when asked); returns our
/// connected end and the process.
pub fn spawn(dir: &Path, read_only: bool) -> Result<(UnixStream, Helper), VirtiofsdError> {
    let program = find_virtiofsd().ok_or(VirtiofsdError::NotInstalled)?;
    spawn_program(&program, dir, read_only)
}

/// [`spawn`] with an explicit program path.
pub fn spawn_program(
    program: &Path,
    dir: &Path,
    read_only: bool,
) -> Result<(UnixStream, Helper), VirtiofsdError> {
    check_folder(dir)?;
    let (listener, stream) = private_socket().map_err(VirtiofsdError::Socket)?;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.arg(format!("--fd={fd}"))
        .arg("--shared-dir")
        .arg(dir)
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Unprivileged: no namespaces to enter, no rlimit to raise.
        cmd.args(["--sandbox=none", "--rlimit-nofile=0"]);
    }
    if read_only {
        cmd.arg("--readonly");
    }
    let helper = child::spawn(cmd, Some(fd)).map_err(|source| VirtiofsdError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    drop(listener);
    Ok((stream, helper))
}

/// Connect to a virtiofsd listening on `path` (`virtiofsd --socket-path PATH`).
pub fn connect(path: &Path) -> Result<UnixStream, VirtiofsdError> {
    UnixStream::connect(path).map_err(|source| VirtiofsdError::Connect {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_folder_is_named() {
        let e = spawn_program(Path::new("/bin/true"), Path::new("/nonexistent/dir"), false)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "shared folder /nonexistent/dir: does not exist"
        );
        let e = check_folder(Path::new("/etc/hostname")).unwrap_err();
        assert!(e.to_string().contains("is not a folder"), "{e}");
    }

    #[test]
    fn not_installed_names_package_and_crate() {
        let e = VirtiofsdError::NotInstalled.to_string();
        assert!(e.contains("apt install virtiofsd") && e.contains("cargo install virtiofsd"));
    }

    #[test]
    fn the_private_socket_leaves_nothing_behind() {
        let (listener, stream) = private_socket().unwrap();
        let path = listener
            .local_addr()
            .unwrap()
            .as_pathname()
            .map(Path::to_path_buf)
            .unwrap();
        assert!(!path.exists() && !path.parent().unwrap().exists());
        let (accepted, _) = listener.accept().unwrap();
        drop(stream);
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &accepted, &mut b).unwrap(), 0);
    }
}
