//! Client of Podman's REST API (`podman system service`) over its Unix
//! socket, on hyper's HTTP/1 client. Starts the service on first use when
//! it does not answer and the agent was told how to start it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use log::{info, warn};
use serde_json::Value;
use thiserror::Error;
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::Mutex;

/// The API prefix; Podman 4 serves `/v4…/libpod/…`.
pub const API: &str = "/v4.0.0/libpod";

/// How long a started service gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed REST exchange.
#[derive(Debug, Error)]
pub enum RestError {
    #[error("podman service at {path} is not reachable: {source}")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting podman service: {0}")]
    Start(String),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("building request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("podman answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("podman's answer is not the expected JSON: {0}")]
    Decode(#[from] serde_json::Error),
}

impl RestError {
    /// The HTTP status podman answered, if it answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            RestError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Podman's own message, or this error's text.
    pub fn message(&self) -> String {
        match self {
            RestError::Status { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// Podman's REST service: where it listens and how to start it.
pub struct PodmanService {
    socket: PathBuf,
    podman_bin: Option<PathBuf>,
    child: Mutex<Option<Child>>,
    /// Bumped each time the agent starts the service.
    generation: AtomicU64,
}

impl PodmanService {
    /// A service at `socket`; `podman_bin` starts it when it does not answer
    /// (None: never start it).
    pub fn new(socket: PathBuf, podman_bin: Option<PathBuf>) -> Self {
        Self {
            socket,
            podman_bin,
            child: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    /// How many times this agent started the service: answers cached from
    /// an older generation are stale.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether the service answers now (no start attempt).
    pub async fn is_up(&self) -> bool {
        UnixStream::connect(&self.socket).await.is_ok()
    }

    /// A connection to the service, starting it first if needed.
    pub async fn connect(&self) -> Result<UnixStream, RestError> {
        match UnixStream::connect(&self.socket).await {
            Ok(s) => return Ok(s),
            Err(e) if self.podman_bin.is_none() => {
                return Err(RestError::Unreachable {
                    path: self.socket.clone(),
                    source: e,
                })
            }
            Err(_) => {}
        }
        let mut child = self.child.lock().await;
        // Another call may have started it while this one waited.
        if let Ok(s) = UnixStream::connect(&self.socket).await {
            return Ok(s);
        }
        if let Some(c) = child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                warn!("podman service exited ({status}); starting it again");
                *child = None;
            }
        }
        if child.is_none() {
            *child = Some(self.spawn()?);
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            match UnixStream::connect(&self.socket).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
                        *child = None;
                        return Err(RestError::Start(format!("podman exited with {status}")));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(RestError::Unreachable {
                            path: self.socket.clone(),
                            source: e,
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the service if this agent started it.
    pub async fn stop_started(&self) {
        if let Some(mut child) = self.child.lock().await.take() {
            if let Some(pid) = child.id() {
                // SAFETY: plain kill(2) on the pid of our own child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    fn spawn(&self) -> Result<Child, RestError> {
        let bin = self
            .podman_bin
            .as_deref()
            .ok_or_else(|| RestError::Start("no podman binary".into()))?;
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| RestError::Start(e.to_string()))?;
        }
        info!(
            "starting {} system service on {}",
            bin.display(),
            self.socket.display()
        );
        let mut child = tokio::process::Command::new(bin)
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", self.socket.display()))
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| RestError::Start(format!("{}: {e}", bin.display())))?;
        if let Some(err) = child.stderr.take() {
            tokio::spawn(relay_stderr(err));
        }
        Ok(child)
    }

    /// Sends one request on a fresh connection and returns the response with
    /// its body unread.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response<Incoming>, RestError> {
        self.send(method, path, body, None).await
    }

    /// Like `request`, with registry credentials in `X-Registry-Auth`
    /// (base64url of the JSON auth record, as the Docker API defines it).
    pub async fn request_with_auth(
        &self,
        method: Method,
        path: &str,
        username: &str,
        password: &str,
    ) -> Result<Response<Incoming>, RestError> {
        let auth = serde_json::json!({"username": username, "password": password});
        let value = URL_SAFE.encode(serde_json::to_vec(&auth)?);
        self.send(method, path, None, Some(value)).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        registry_auth: Option<String>,
    ) -> Result<Response<Incoming>, RestError> {
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "podman");
        if let Some(auth) = registry_auth {
            req = req.header("X-Registry-Auth", auth);
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(serde_json::to_vec(v)?))
            }
            None => Full::new(Bytes::new()),
        };
        Ok(sender.send_request(req.body(body)?).await?)
    }

    /// Sends a request and reads the whole body; an error status becomes
    /// `RestError::Status` carrying podman's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), RestError> {
        let resp = self.request(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status.is_client_error() || status.is_server_error() {
            return Err(RestError::Status {
                status,
                message: error_message(&bytes),
            });
        }
        Ok((status, bytes))
    }

    /// Like `call`, decoding the body as JSON (null when empty).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, RestError> {
        let (_, bytes) = self.call(method, path, body).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// Whether a line of Podman's service log is one of the warnings it prints
/// for every hijacked connection (attach, exec, `podman --remote run`):
/// "IdleTracker: StateClosed transition by connection marked un-managed".
pub fn is_per_connection_noise(line: &str) -> bool {
    line.contains("IdleTracker")
}

/// Copies the service's stderr into the agent's log, line by line, without
/// its per-connection noise (counted, and the count logged now and then).
async fn relay_stderr(err: tokio::process::ChildStderr) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(err).lines();
    let mut dropped: u64 = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        if is_per_connection_noise(&line) {
            dropped += 1;
            if dropped == 1 {
                info!("podman: its per-connection IdleTracker warnings are left out of this log");
            } else if dropped.is_power_of_two() && dropped >= 1024 {
                info!("podman: {dropped} IdleTracker warnings left out of this log so far");
            }
            continue;
        }
        warn!("podman: {line}");
    }
    if dropped > 0 {
        info!("podman: its service ended; {dropped} IdleTracker warnings were left out");
    }
}

/// Podman's error text from an error body (`{"cause","message","response"}`).
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_names() {
        assert_eq!(
            encode("localhost/busybox:latest"),
            "localhost%2Fbusybox%3Alatest"
        );
        assert_eq!(encode("a b"), "a%20b");
    }

    #[test]
    fn idle_tracker_warnings_are_noise() {
        assert!(is_per_connection_noise(
            r#"time="2026-12-01T22:00:00Z" level=warning msg="IdleTracker: StateClosed transition by connection marked un-managed""#
        ));
        assert!(!is_per_connection_noise(
            r#"time="2026-12-01T22:00:00Z" level=error msg="cannot find network""#
        ));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(
                br#"{"cause":"no such container","message":"no container x","response":404}"#
            ),
            "no container x"
        );
        assert_eq!(error_message(b"plain\n"), "plain");
    }
}
