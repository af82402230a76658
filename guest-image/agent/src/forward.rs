//! The forwarders: each connection accepted on vsock port 1025 (or a Unix
//! socket, for tests) is joined to Podman's REST socket, and each one on
//! vsock port 22 to the guest's sshd on TCP, so `ssh` works over vsock with
//! no network; bytes are copied both ways until either side closes.

use std::net::SocketAddr;
use std::sync::Arc;

use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::dispatch::Agent;

/// Joins one accepted connection to Podman's REST socket.
pub async fn forward<S>(agent: Arc<Agent>, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match agent.podman().service().connect().await {
        Ok(s) => s,
        Err(e) => {
            warn!("forwarding to podman: {e}");
            return;
        }
    };
    join(&mut client, &mut upstream).await;
}

/// Joins one accepted connection to the TCP service at `target`.
pub async fn forward_tcp<S>(target: SocketAddr, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match tokio::net::TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            warn!("forwarding to {target}: {e}");
            return;
        }
    };
    join(&mut client, &mut upstream).await;
}

async fn join<A, B>(a: &mut A, b: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(a, b).await {
        Ok((up, down)) => debug!("forwarded {up} bytes up, {down} down"),
        Err(e) => debug!("forwarded connection ended: {e}"),
    }
}
