//! The varlink connection loop: reads calls, resolves the interface and
//! method, checks the parameters against the signature, runs the method and
//! writes its replies (several with `continues` when the client asked for
//! `more`, none for `oneway`). The accept loops are in `listen`.

use std::sync::Arc;

use log::debug;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::mpsc;

use crate::dispatch::Agent;
use crate::protocol::{read_message, write_reply, Call, Reply, VarlinkError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idl::Registry;
    use crate::machine::{Machine, MachineConfig};
    use crate::podman::rest::PodmanService;
    use crate::podman::Podman;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn agent() -> Arc<Agent> {
        let podman = Podman::new(PodmanService::new(
            "/nonexistent/b2p-test/podman.sock".into(),
            None,
        ));
        let machine = Machine::new(MachineConfig {
            milestones: "/nonexistent/milestones".into(),
            data_mount: "/nonexistent/data".into(),
            shutdown_command: Vec::new(),
        });
        Arc::new(Agent::new(Registry::new().unwrap(), podman, machine))
    }

    /// Writes `input` (already framed) and returns the replies until the
    /// agent closes the connection.
    async fn exchange(input: &[u8]) -> Vec<Value> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(serve_connection(agent(), server));
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        task.await.unwrap();
        out.split(|&b| b == 0)
            .filter(|m| !m.is_empty())
            .map(|m| serde_json::from_slice(m).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn pipelined_calls_answer_in_order_with_standard_errors() {
        let replies = exchange(
            b"{\"method\":\"org.varlink.service.GetInfo\"}\0\
              {\"method\":\"org.varlink.service.GetInterfaceDescription\",\"parameters\":{\"interface\":\"io.nope\"}}\0\
              {\"method\":\"io.podman.Nope\"}\0\
              {\"method\":\"nodots\"}\0\
              {\"method\":\"io.podman.GetContainer\",\"parameters\":{\"id\":7}}\0\
              {\"method\":\"io.b2p.Machine.Shutdown\",\"oneway\":true}\0\
              {\"method\":\"io.podman.GetVersion\"}\0\
              {\"method\":\"io.b2p.Machine.GetStatus\",\"more\":true}\0",
        )
        .await;
        assert_eq!(replies.len(), 7, "{replies:?}");
        assert_eq!(replies[0]["parameters"]["vendor"], "b2p");
        assert_eq!(
            replies[1],
            json!({"error": "org.varlink.service.InterfaceNotFound", "parameters": {"interface": "io.nope"}})
        );
        assert_eq!(
            replies[2],
            json!({"error": "org.varlink.service.MethodNotFound", "parameters": {"method": "io.podman.Nope"}})
        );
        assert_eq!(replies[3]["error"], "org.varlink.service.InterfaceNotFound");
        assert_eq!(
            replies[4],
            json!({"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "id"}})
        );
        // The oneway Shutdown got no reply; podman is unreachable here.
        assert_eq!(replies[5]["error"], "io.podman.RuntimeError");
        let status = &replies[6]["parameters"]["status"];
        assert_eq!(status["podman_ready"], false);
        assert_eq!(status["data_disk"]["state"], "absent");
        assert!(replies[6].get("continues").is_none());
    }

    #[tokio::test]
    async fn garbage_closes_the_connection_without_a_reply() {
        assert!(
            exchange(b"\xff\xfe not json\0{\"method\":\"org.varlink.service.GetInfo\"}\0")
                .await
                .is_empty()
        );
        assert!(
            exchange(b"{\"method\":\"org.varlink.service.GetInfo\",\"parameters\":5}\0")
                .await
                .is_empty()
        );
        // A message that never ends is cut at the size limit.
        let big = vec![b' '; crate::protocol::MAX_MESSAGE + 16];
        assert!(exchange(&big).await.is_empty());
    }
}
