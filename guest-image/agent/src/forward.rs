//! The Podman REST forwarder: each connection accepted on vsock port 1025
//! (or a Unix socket, for tests) is joined to Podman's REST socket, bytes
//! copied both ways until either side closes.

use std::sync::Arc;

use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::dispatch::Agent;
use crate::server::MAX_CONNECTIONS;

async fn forward<S>(agent: Arc<Agent>, mut client: S)
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

/// Forwards every connection accepted on a Unix listener.
pub async fn forward_unix(agent: Arc<Agent>, listener: tokio::net::UnixListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    forward(agent, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept on the forwarding socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Forwards every connection accepted on a vsock listener.
pub async fn forward_vsock(agent: Arc<Agent>, listener: tokio_vsock::VsockListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    forward(agent, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept on the forwarding vsock port: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
