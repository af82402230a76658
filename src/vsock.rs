//! The host end of a machine's vsock: Firecracker's hybrid protocol on the
//! monitor's Unix socket (write `CONNECT <port>\n`, read `OK <n>\n`, any
//! `n`: vhost-device-vsock answers the guest port, Firecracker its host
//! port), and `b2p __vsock-proxy UDS PORT`, which joins stdin/stdout to a
//! guest port, for ssh's ProxyCommand.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::varlink::ClientError;

/// The hidden subcommand ssh runs as its ProxyCommand.
pub const PROXY: &str = "__vsock-proxy";

/// Connects to guest `port` through the hybrid socket at `uds`; `timeout`
/// bounds each read (the handshake's included).
pub fn hybrid_connect(
    uds: &Path,
    port: u32,
    timeout: Option<Duration>,
) -> Result<UnixStream, ClientError> {
    let mut stream =
        UnixStream::connect(uds).map_err(|e| ClientError::Connect(uds.display().to_string(), e))?;
    stream.set_read_timeout(timeout)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line_raw(&mut stream)?;
    let ok = line
        .strip_prefix("OK ")
        .is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(ClientError::Handshake(line));
    }
    Ok(stream)
}

/// Reads the answer line byte by byte, so that nothing after the newline
/// (the guest's first bytes) is consumed.
fn read_line_raw(stream: &mut UnixStream) -> Result<String, ClientError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Err(ClientError::Handshake(
        String::from_utf8_lossy(&line).into_owned(),
    ))
}

/// Joins this process's stdin and stdout to guest `port`. Each direction's
/// end of file is passed on as a half-close: stdin's end shuts the socket's
/// write side (the guest reads end of file and can still answer), the
/// guest's SHUTDOWN(SEND) closes stdout (the reader sees end of file while
/// stdin still flows). It returns once both directions are over or the
/// guest side is gone entirely.
pub fn proxy(uds: &Path, port: u32) -> anyhow::Result<()> {
    let stream = hybrid_connect(uds, port, Some(Duration::from_secs(30)))?;
    stream.set_read_timeout(None)?;
    // Plain read/write on the raw descriptors: Rust's Stdout is line
    // buffered, and io::copy would splice(2) a pipe into the socket, which
    // here stalled ssh's key exchange.
    let stdin = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    // SAFETY: this subcommand owns descriptor 1 from here on (nothing else
    // writes to stdout); owning it lets the guest's end of file close it.
    let stdout = unsafe { std::fs::File::from_raw_fd(libc::STDOUT_FILENO) };
    let to_guest = stream.try_clone()?;
    let up = std::thread::spawn(move || {
        let r = pump(stdin, &to_guest);
        let _ = to_guest.shutdown(std::net::Shutdown::Write);
        r
    });
    let down = pump(&stream, &stdout);
    // Whoever reads our stdout sees end of file now.
    drop(stdout);
    down?;
    // Stdin may still have bytes for the guest (and may never end: a
    // terminal). The socket hangs up once both of its directions are shut:
    // when stdin's end was passed on, or when the guest closed entirely.
    wait_hangup(&stream);
    if up.is_finished() {
        if let Ok(Err(e)) = up.join() {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Blocks until `stream` reports POLLHUP or an error.
pub(crate) fn wait_hangup(stream: &UnixStream) {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r > 0
            || (r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
        {
            return;
        }
    }
}

/// Copies until end of file, each chunk written as soon as it is read.
pub(crate) fn pump(mut from: impl Read, mut to: impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn peer(answer: &'static [u8]) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = std::env::temp_dir().join(format!(
            "b2p-vsock-test-{}-{}",
            std::process::id(),
            answer.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = vec![0u8; 11];
            s.read_exact(&mut req).unwrap();
            s.write_all(answer).unwrap();
            req
        });
        (path, t)
    }

    #[test]
    fn handshake_keeps_the_guest_bytes() {
        let (path, t) = peer(b"OK 1073741824\nSSH-2.0-dropbear\r\n");
        let mut s = hybrid_connect(&path, 22, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(t.join().unwrap(), b"CONNECT 22\n");
        let mut banner = String::new();
        s.read_to_string(&mut banner).unwrap();
        assert_eq!(banner, "SSH-2.0-dropbear\r\n");
    }

    #[test]
    fn refusal_is_an_error() {
        let (path, t) = peer(b"NO\n");
        let e = hybrid_connect(&path, 22, Some(Duration::from_secs(5))).unwrap_err();
        assert!(
            matches!(e, ClientError::Handshake(ref l) if l == "NO"),
            "{e}"
        );
        t.join().unwrap();
    }
}
