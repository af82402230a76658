//! The Podman REST forwarder: each connection accepted on vsock port 1025
//! (or a Unix socket, for tests) is joined to Podman's REST socket, bytes
//! copied both ways until either side closes.

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
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => debug!("forwarded {up} bytes up, {down} down"),
        Err(e) => debug!("forwarded connection ended: {e}"),
    }
}
