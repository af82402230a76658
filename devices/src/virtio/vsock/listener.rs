//! Host Unix listeners and outgoing connections of the vsock backend.
//!
//! A path a live listener already owns is refused ("in use"); a socket file
//! nobody listens on (left by a dead monitor) is replaced; anything that is
//! not a socket is left alone and refused. A listener removes its socket
//! file when dropped, if the file is still the one it created.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{info, warn};

use super::VsockError;

/// A bound, non-blocking Unix listener that unlinks its path on drop.
#[derive(Debug)]
pub struct HostListener {
    sock: UnixListener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file we created.
    id: Option<(u64, u64)>,
}

impl HostListener {
    /// Listen on `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<Self, VsockError> {
        if path.as_os_str().len() >= 108 {
            return Err(VsockError::PathTooLong(path.to_path_buf()));
        }
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if !md.file_type().is_socket() {
                return Err(VsockError::NotASocket(path.to_path_buf()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(VsockError::PathInUse(path.to_path_buf())),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    info!("vsock: replacing stale socket {}", path.display());
                    std::fs::remove_file(path).map_err(|source| VsockError::Listen {
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    // A live listener with a full backlog.
                    return Err(VsockError::PathInUse(path.to_path_buf()));
                }
                Err(source) => {
                    return Err(VsockError::Listen {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        let sock = UnixListener::bind(path).map_err(|source| match source.kind() {
            io::ErrorKind::AddrInUse => VsockError::PathInUse(path.to_path_buf()),
            _ => VsockError::Listen {
                path: path.to_path_buf(),
                source,
            },
        })?;
        sock.set_nonblocking(true)?;
        let id = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(HostListener {
            sock,
            path: path.to_path_buf(),
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept one pending connection (non-blocking); `Ok(None)` when none.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        match self.sock.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true)?;
                Ok(Some(s))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let current = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.id {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!("vsock: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// Connect to a Unix socket without blocking: a listener whose backlog is
/// full answers `EAGAIN` instead of stalling the event loop.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: zero is a valid bit pattern for sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_use_stale_and_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.sock");
        let l = HostListener::bind(&p).unwrap();
        let e = HostListener::bind(&p).unwrap_err();
        assert!(matches!(e, VsockError::PathInUse(_)), "{e}");
        assert!(e.to_string().contains("is in use"));
        // A stale socket file: bound by a listener that is gone, file left.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let l2 = HostListener::bind(&stale).unwrap();
        assert!(connect_nonblocking(&stale).is_ok());
        // A regular file is never replaced.
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            HostListener::bind(&f),
            Err(VsockError::NotASocket(_))
        ));
        drop(l);
        drop(l2);
        assert!(!p.exists() && !stale.exists());
        assert!(connect_nonblocking(&p).is_err());
    }
}
