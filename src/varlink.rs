//! A blocking varlink client for the host side: connects to a `unix:PATH`
//! address, or to a Firecracker-style hybrid vsock socket
//! (`vsock:UDS_PATH:PORT`: writes `CONNECT PORT\n`, accepts any `OK <n>`
//! answer), sends one call and reads its replies (several when `more` is
//! set), each a NUL-terminated JSON object.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};
use thiserror::Error;

/// The largest reply accepted.
pub const MAX_REPLY: usize = 64 << 20;

/// A varlink service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket path (`unix:PATH`, varlink's own address form).
    Unix(PathBuf),
    /// A hybrid vsock Unix socket and the guest port to connect to.
    Vsock { uds: PathBuf, port: u32 },
}

/// Client failures.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("bad varlink address {0:?}: expected unix:PATH or vsock:UDS_PATH:PORT")]
    Address(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("vsock handshake refused: {0:?}")]
    Handshake(String),
    #[error("no reply within the timeout")]
    Timeout,
    #[error(transparent)]
    Io(std::io::Error),
    #[error("reply larger than {MAX_REPLY} bytes")]
    TooLong,
    #[error("connection closed before the reply")]
    Closed,
    #[error("malformed reply: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the service answered {error}: {parameters}")]
    Remote { error: String, parameters: Value },
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            // What a read past SO_RCVTIMEO returns.
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout,
            _ => ClientError::Io(e),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::Address(s.to_string());
        if let Some(rest) = s.strip_prefix("unix:") {
            // Varlink addresses may carry `;mode=…` parameters.
            let path = rest.split(';').next().unwrap_or_default();
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Address::Unix(path.into()));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (uds, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let port = port.parse().map_err(|_| bad())?;
            if uds.is_empty() {
                return Err(bad());
            }
            return Ok(Address::Vsock {
                uds: uds.into(),
                port,
            });
        }
        Err(bad())
    }
}

/// One connection to a varlink service.
pub struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    /// Connects, doing the vsock handshake when the address asks for it.
    pub fn connect(addr: &Address, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let (path, port) = match addr {
            Address::Unix(p) => (p, None),
            Address::Vsock { uds, port } => (uds, Some(*port)),
        };
        let stream = match port {
            Some(port) => crate::vsock::hybrid_connect(path, port, timeout)?,
            None => {
                let s = UnixStream::connect(path)
                    .map_err(|e| ClientError::Connect(path.display().to_string(), e))?;
                s.set_read_timeout(timeout)?;
                s
            }
        };
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a call.
    pub fn send(
        &mut self,
        method: &str,
        parameters: &Value,
        more: bool,
    ) -> Result<(), ClientError> {
        let mut call = json!({"method": method, "parameters": parameters});
        if more {
            call["more"] = json!(true);
        }
        let mut bytes = serde_json::to_vec(&call)?;
        bytes.push(0);
        self.writer.write_all(&bytes)?;
        Ok(())
    }

    /// Reads one reply object.
    pub fn receive(&mut self) -> Result<Map<String, Value>, ClientError> {
        let mut buf = Vec::new();
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                return Err(ClientError::Closed);
            }
            let (take, done) = match chunk.iter().position(|&b| b == 0) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if buf.len() + take > MAX_REPLY {
                return Err(ClientError::TooLong);
            }
            buf.extend_from_slice(&chunk[..take]);
            self.reader.consume(take);
            if done {
                buf.pop();
                return Ok(serde_json::from_slice(&buf)?);
            }
        }
    }

    /// Calls `method` and hands each reply's parameters to `on_reply`
    /// (one reply, or several when `more` is set); an error reply becomes
    /// `ClientError::Remote`.
    pub fn call(
        &mut self,
        method: &str,
        parameters: &Value,
        more: bool,
        mut on_reply: impl FnMut(&Value),
    ) -> Result<(), ClientError> {
        self.send(method, parameters, more)?;
        loop {
            let mut reply = self.receive()?;
            if let Some(error) = reply.get("error").and_then(Value::as_str) {
                return Err(ClientError::Remote {
                    error: error.to_string(),
                    parameters: reply.remove("parameters").unwrap_or(Value::Null),
                });
            }
            let params = reply.remove("parameters").unwrap_or_else(|| json!({}));
            on_reply(&params);
            let continues = reply.get("continues").and_then(Value::as_bool) == Some(true);
            if !(more && continues) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/run/x.sock;mode=0600".parse::<Address>().unwrap(),
            Address::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "vsock:/tmp/v.sock:1024".parse::<Address>().unwrap(),
            Address::Vsock {
                uds: "/tmp/v.sock".into(),
                port: 1024
            }
        );
        for bad in [
            "tcp:1.2.3.4:5",
            "unix:",
            "vsock:/x",
            "vsock::1024",
            "vsock:/x:port",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }

    #[test]
    fn handshake_and_more_replies() {
        let dir = std::env::temp_dir().join(format!("b2p-varlink-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            // The answer and the first reply arrive in one write.
            let mut call = Vec::new();
            s.write_all(b"OK 1024\n").unwrap();
            r.read_until(0, &mut call).unwrap();
            let call: Value = serde_json::from_slice(&call[..call.len() - 1]).unwrap();
            assert_eq!(call["method"], "io.podman.PullImage");
            assert_eq!(call["more"], true);
            s.write_all(
                b"{\"parameters\":{\"n\":1},\"continues\":true}\0{\"parameters\":{\"n\":2}}\0",
            )
            .unwrap();
            let mut call = Vec::new();
            r.read_until(0, &mut call).unwrap();
            s.write_all(b"{\"error\":\"io.podman.ImageNotFound\",\"parameters\":{\"id\":\"x\"}}\0")
                .unwrap();
        });
        let addr = Address::Vsock {
            uds: path.clone(),
            port: 1024,
        };
        let mut c = Connection::connect(&addr, Some(Duration::from_secs(5))).unwrap();
        let mut seen = Vec::new();
        c.call("io.podman.PullImage", &json!({}), true, |p| {
            seen.push(p["n"].clone())
        })
        .unwrap();
        assert_eq!(seen, [json!(1), json!(2)]);
        match c.call("io.podman.RemoveImage", &json!({}), false, |_| {}) {
            Err(ClientError::Remote { error, parameters }) => {
                assert_eq!(error, "io.podman.ImageNotFound");
                assert_eq!(parameters["id"], "x");
            }
            other => panic!("unexpected {other:?}"),
        }
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
