//! Published container ports for the host: follows Podman's container
//! events, keeps the current set of TCP ports published by running
//! containers (`-p [HOSTIP:]HOSTPORT:CPORT`), streams it to the host on
//! `io.b2p.Machine.WatchPorts` (the full set on each change), and serves the
//! relay vsock port (1026): the host writes one line `TCP <hostport>\n` and
//! the connection is joined to that published port in the guest (where
//! netavark's DNAT answers), with half-closes as in `forward`.
//!
//! A change reaches the host after one listing (`GET containers/json`);
//! each new container's address (an inspect) is looked up right after,
//! while the host opens its listener, and kept by container Id.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Method;
use log::{debug, info, warn};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use crate::dispatch::Agent;
use crate::podman::rest::{encode, PodmanService, API};
use crate::protocol::VarlinkError;
use crate::server::Progress;

/// The most ports reported to the host; more are dropped with a log line.
pub const MAX_PORTS: usize = 256;

/// How often the set is listed again even without events (a missed event,
/// a service restarted under us).
const RELIST: Duration = Duration::from_secs(5);

/// One published TCP port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    pub host_port: u16,
    /// The guest address it was published on; empty for all.
    pub host_ip: String,
    pub container_port: u16,
    pub container: String,
    /// The container's Id, and its address on its network (from an inspect).
    pub id: String,
    pub container_ip: Option<IpAddr>,
}

impl Port {
    fn to_json(&self) -> Value {
        json!({"protocol": "tcp", "host_ip": self.host_ip, "host_port": self.host_port,
               "container_port": self.container_port, "container": self.container})
    }

    /// Where the guest answers for this port, best first: the container's
    /// own address and port (netavark 1.4 does not DNAT the guest's
    /// 127.0.0.1), then the published address.
    fn targets(&self) -> Vec<SocketAddr> {
        let ip = match self.host_ip.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let mut v: Vec<SocketAddr> = self
            .container_ip
            .map(|c| SocketAddr::new(c, self.container_port))
            .into_iter()
            .collect();
        v.push(SocketAddr::new(ip, self.host_port));
        v
    }
}

/// The TCP ports of a `GET /libpod/containers/json` answer (running
/// containers), expanded over `range`, sorted, duplicates (by host port)
/// dropped, at most [`MAX_PORTS`]; the second value is how many were cut.
pub fn parse_list(list: &Value) -> (Vec<Port>, usize) {
    let mut set = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut cut = 0;
    for c in list.as_array().into_iter().flatten() {
        let id = c.get("Id").and_then(Value::as_str).unwrap_or_default();
        let name = c
            .get("Names")
            .and_then(|n| n.get(0))
            .and_then(Value::as_str)
            .unwrap_or_default();
        for p in c
            .get("Ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("tcp");
            if !proto.eq_ignore_ascii_case("tcp") {
                continue;
            }
            let num = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
            let (hp, cp, range) = (num("host_port"), num("container_port"), num("range"));
            for i in 0..range.clamp(1, 65536) {
                let (Ok(h), Ok(c)) = (u16::try_from(hp + i), u16::try_from(cp + i)) else {
                    break;
                };
                if h == 0 || !seen.insert(h) {
                    continue;
                }
                if set.len() >= MAX_PORTS {
                    cut += 1;
                    continue;
                }
                set.insert(Port {
                    host_port: h,
                    host_ip: p
                        .get("host_ip")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    container_port: c,
                    container: name.to_string(),
                    id: id.to_string(),
                    container_ip: None,
                });
            }
        }
    }
    (set.into_iter().collect(), cut)
}

/// The current set, `None` until it was first listed.
pub struct Ports {
    tx: watch::Sender<Option<Vec<Port>>>,
    /// Container addresses by Id (the running containers' only).
    ips: std::sync::Mutex<HashMap<String, IpAddr>>,
}

impl Default for Ports {
    fn default() -> Self {
        Self::new()
    }
}

impl Ports {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(None).0,
            ips: Default::default(),
        }
    }

    fn ips(&self) -> std::sync::MutexGuard<'_, HashMap<String, IpAddr>> {
        self.ips.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ports` with the addresses known; the Ids still to look up.
    fn with_known_ips(&self, ports: &mut [Port]) -> Vec<String> {
        let mut ips = self.ips();
        ips.retain(|id, _| ports.iter().any(|p| &p.id == id));
        let mut missing = Vec::new();
        for p in ports {
            p.container_ip = ips.get(&p.id).copied();
            if p.container_ip.is_none() && !missing.contains(&p.id) {
                missing.push(p.id.clone());
            }
        }
        missing
    }

    fn current(&self) -> Option<Vec<Port>> {
        self.tx.borrow().clone()
    }

    fn set(&self, ports: Vec<Port>) {
        self.tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&ports) {
                return false;
            }
            info!(
                "published ports: {:?}",
                ports.iter().map(|p| p.host_port).collect::<Vec<_>>()
            );
            *cur = Some(ports);
            true
        });
    }
}

async fn list(podman: &PodmanService) -> Result<Vec<Port>, String> {
    let v = podman
        .json(Method::GET, &format!("{API}/containers/json"), None)
        .await
        .map_err(|e| e.to_string())?;
    let (ports, cut) = parse_list(&v);
    if cut > 0 {
        warn!("containers publish more than {MAX_PORTS} ports: {cut} not forwarded");
    }
    Ok(ports)
}

/// Lists the ports and tells the host at once; then looks up the new
/// containers' addresses (for the relay) and sets them.
async fn refresh(agent: &Agent) {
    let podman = agent.podman().service();
    let mut ports = match list(podman).await {
        Ok(p) => p,
        Err(e) => return debug!("listing published ports: {e}"),
    };
    let missing = agent.ports().with_known_ips(&mut ports);
    agent.ports().set(ports.clone());
    if missing.is_empty() {
        return;
    }
    for id in missing {
        if let Some(ip) = container_ip(podman, &id).await {
            agent.ports().ips().insert(id, ip);
        }
    }
    agent.ports().with_known_ips(&mut ports);
    agent.ports().set(ports);
}

/// A container's address: `NetworkSettings.IPAddress`, else that of its
/// first network.
async fn container_ip(podman: &PodmanService, id: &str) -> Option<IpAddr> {
    let v = podman
        .json(
            Method::GET,
            &format!("{API}/containers/{}/json", encode(id)),
            None,
        )
        .await
        .ok()?;
    let ns = v.get("NetworkSettings")?;
    let first = ns
        .get("Networks")
        .and_then(Value::as_object)
        .and_then(|m| m.values().find_map(|n| n.get("IPAddress")?.as_str()));
    let ip = [ns.get("IPAddress").and_then(Value::as_str), first]
        .into_iter()
        .flatten()
        .find_map(|s| s.parse().ok());
    ip
}

/// Lists the ports at each container event (and every [`RELIST`]), forever.
pub async fn follow(agent: Arc<Agent>) {
    let filters = encode(r#"{"type":["container"]}"#);
    let path = format!("{API}/events?stream=true&filters={filters}");
    loop {
        // Subscribed first, listed next: no event falls between the two
        // (Podman may hold the answer's head until the first event).
        let events = tokio::spawn({
            let agent = agent.clone();
            let path = path.clone();
            async move {
                agent
                    .podman()
                    .service()
                    .request(Method::GET, &path, None)
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        refresh(&agent).await;
        let Ok(Ok(resp)) = events.await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut body = resp.into_body();
        loop {
            match tokio::time::timeout(RELIST, body.frame()).await {
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(_) => break,
            }
            refresh(&agent).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `io.b2p.Machine.WatchPorts`: the current set; with `more`, again on
/// each change until the host goes away.
pub async fn watch_ports(agent: &Agent, progress: Option<Progress>) -> Result<Value, VarlinkError> {
    let mut rx = agent.ports().tx.subscribe();
    let reply = |v: &Option<Vec<Port>>| {
        let list: Vec<Value> = v.iter().flatten().map(Port::to_json).collect();
        json!({"ports": list})
    };
    let Some(progress) = progress else {
        // One answer: wait (a little) for the first listing.
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        return Ok(reply(&rx.borrow()));
    };
    let _ = rx.wait_for(Option::is_some).await;
    loop {
        let now = reply(&rx.borrow_and_update());
        if progress.send(now).await.is_err() {
            return Ok(json!({"ports": []}));
        }
        if rx.changed().await.is_err() {
            return Ok(json!({"ports": []}));
        }
    }
}

/// Reads the relay's request line (`TCP <port>\n`, at most 32 bytes).
async fn request_line<S: AsyncRead + Unpin>(s: &mut S) -> Option<u16> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        if b[0] == b'\n' {
            let text = std::str::from_utf8(&line).ok()?;
            return text.trim().strip_prefix("TCP ")?.trim().parse().ok();
        }
        line.push(b[0]);
    }
    None
}

/// Serves one connection on the relay port: joins it to the published port
/// it names; a port that is not published closes it.
pub async fn relay<S>(agent: Arc<Agent>, mut client: S)
where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin,
{
    let Some(port) = tokio::time::timeout(Duration::from_secs(10), request_line(&mut client))
        .await
        .ok()
        .flatten()
    else {
        debug!("relay: no valid request line");
        return;
    };
    let Some(mut p) = agent
        .ports()
        .current()
        .into_iter()
        .flatten()
        .find(|p| p.host_port == port)
    else {
        debug!("relay: port {port} is not published");
        return;
    };
    if p.container_ip.is_none() {
        // A connection before `refresh` found the address.
        p.container_ip = container_ip(agent.podman().service(), &p.id).await;
    }
    for target in p.targets() {
        match tokio::net::TcpStream::connect(target).await {
            Ok(up) => return crate::forward::join(client, up).await,
            Err(e) => debug!("relay: port {port}: {target}: {e}"),
        }
    }
    warn!("relay: port {port}: nothing answers in the guest");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_gives_tcp_ports_capped() {
        let v = json!([
            {"Names": ["web"], "Ports": [
                {"host_ip": "", "container_port": 80, "host_port": 8080, "protocol": "tcp", "range": 1},
                {"host_ip": "127.0.0.1", "container_port": 53, "host_port": 5353, "protocol": "udp"},
                {"host_ip": "10.0.2.15", "container_port": 443, "host_port": 8443, "protocol": "tcp", "range": 2}
            ]},
            {"Names": ["dup"], "Ports": [{"container_port": 81, "host_port": 8080}]},
            {"Names": ["big"], "Ports": [{"container_port": 1, "host_port": 10000, "range": 10000}]}
        ]);
        let (ports, cut) = parse_list(&v);
        assert_eq!(ports.len(), MAX_PORTS);
        assert_eq!(cut, 10000 - (MAX_PORTS - 3));
        let p8080 = ports.iter().find(|p| p.host_port == 8080).unwrap();
        assert_eq!(p8080.container, "web");
        assert_eq!(p8080.targets(), ["127.0.0.1:8080".parse().unwrap()]);
        let p8444 = ports.iter().find(|p| p.host_port == 8444).unwrap();
        assert_eq!(p8444.container_port, 444);
        assert_eq!(p8444.targets(), ["10.0.2.15:8444".parse().unwrap()]);
        let with_ip = Port {
            container_ip: Some("10.88.0.2".parse().unwrap()),
            ..p8080.clone()
        };
        assert_eq!(
            with_ip.targets(),
            [
                "10.88.0.2:80".parse().unwrap(),
                "127.0.0.1:8080".parse().unwrap()
            ]
        );
        assert!(!ports.iter().any(|p| p.host_port == 5353));
        assert_eq!(parse_list(&json!({"x": 1})), (Vec::new(), 0));
    }
}
