//! The varlink connection loop: reads calls, resolves the interface and
//! method, checks the parameters against the signature, runs the method and
//! writes its replies (several with `continues` when the client asked for
//! `more`, none for `oneway`). Also the accept loops for Unix and vsock
//! listeners, with a bound on concurrent connections.

use std::sync::Arc;

use log::{debug, warn};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::{mpsc, Semaphore};

use crate::dispatch::Agent;
use crate::protocol::{read_message, write_reply, Call, Reply, VarlinkError};

/// Connections served at once per listener; more wait in the backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// A sender for the intermediate replies of a `more` call.
pub type Progress = mpsc::Sender<Value>;

/// Serves one varlink connection until the peer closes it or breaks the
/// protocol.
pub async fn serve_connection<S>(agent: Arc<Agent>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        let call = match read_message(&mut rd, &mut buf).await {
            Ok(Some(call)) => call,
            Ok(None) => return,
            Err(e) => {
                debug!("closing varlink connection: {e}");
                return;
            }
        };
        if let Err(e) = handle_call(&agent, call, &mut wr).await {
            debug!("closing varlink connection: {e}");
            return;
        }
    }
}

async fn handle_call<W: AsyncWrite + Unpin>(
    agent: &Agent,
    call: Call,
    wr: &mut W,
) -> std::io::Result<()> {
    let oneway = call.oneway;
    let more = call.more && !oneway;
    let (tx, mut rx) = mpsc::channel::<Value>(16);
    let progress = more.then_some(tx);
    let fut = run_call(agent, call, progress);
    tokio::pin!(fut);
    let result = loop {
        tokio::select! {
            r = &mut fut => break r,
            Some(p) = rx.recv() => {
                if !oneway {
                    write_reply(wr, &Reply::ok(p, true)).await?;
                }
            }
        }
    };
    while let Ok(p) = rx.try_recv() {
        write_reply(wr, &Reply::ok(p, true)).await?;
    }
    if oneway {
        return Ok(());
    }
    let reply = match result {
        Ok(params) => Reply::ok(params, false),
        Err(e) => Reply::err(e),
    };
    write_reply(wr, &reply).await
}

async fn run_call(
    agent: &Agent,
    call: Call,
    progress: Option<Progress>,
) -> Result<Value, VarlinkError> {
    let Some((iface_name, method_name)) = call.method.rsplit_once('.') else {
        return Err(VarlinkError::interface_not_found(&call.method));
    };
    let iface = agent
        .registry()
        .get(iface_name)
        .ok_or_else(|| VarlinkError::interface_not_found(iface_name))?;
    let method = iface
        .method(method_name)
        .ok_or_else(|| VarlinkError::method_not_found(&call.method))?;
    if call.upgrade {
        return Err(VarlinkError::method_not_implemented(&call.method));
    }
    let params = call.parameters.unwrap_or_default();
    iface
        .check_input(method, &params)
        .map_err(|e| VarlinkError::invalid_parameter(&e.0))?;
    agent.call(iface.name, method_name, params, progress).await
}

/// Accepts varlink connections on a Unix listener forever.
pub async fn serve_unix(agent: Arc<Agent>, listener: tokio::net::UnixListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    serve_connection(agent, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept on the varlink socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts varlink connections on a vsock listener forever.
pub async fn serve_vsock(agent: Arc<Agent>, listener: tokio_vsock::VsockListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                debug!("varlink connection from {peer:?}");
                let agent = agent.clone();
                tokio::spawn(async move {
                    serve_connection(agent, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept on the varlink vsock port: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
