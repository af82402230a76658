//! The accept loop shared by the varlink server and the Podman REST
//! forwarder: Unix and vsock listeners behind one trait, each accepted
//! connection served on its own task, at most [`MAX_CONNECTIONS`] at once.

use std::future::Future;
use std::io;
use std::sync::Arc;

use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::dispatch::Agent;

/// Connections served at once per listener; more wait in the backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// A listener the agent accepts connections on.
pub trait Listener: Send + 'static {
    /// The accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection; the peer's address as text for logs.
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        Ok((s, format!("{peer:?}")))
    }
}

impl Listener for tokio_vsock::VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn accept_one(&self) -> io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        Ok((s, format!("{peer:?}")))
    }
}

/// Accepts connections on `listener` forever and runs `serve` for each.
/// `what` names the listener in log lines.
pub async fn accept_loop<L, F, Fut>(agent: Arc<Agent>, listener: L, what: &str, serve: F)
where
    L: Listener,
    F: Fn(Arc<Agent>, L::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept_one().await {
            Ok((stream, peer)) => {
                debug!("{what}: connection from {peer}");
                let conn = serve(agent.clone(), stream);
                tokio::spawn(async move {
                    conn.await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept on {what}: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
