//! b2p-agent: the guest agent. Serves varlink (`org.varlink.service`,
//! `io.podman`, `io.b2p.Machine`) on vsock port 1024, forwards vsock port
//! 1025 to Podman's REST socket, vsock port 22 to sshd and vsock port 1026
//! to published container ports (`ports`); for tests, the
//! same on Unix sockets.

mod clock;
mod dispatch;
mod forward;
mod idl;
mod listen;
mod machine;
mod podman;
mod ports;
mod protocol;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use log::{info, warn};
use tokio::signal::unix::{signal, SignalKind};

use dispatch::Agent;
use machine::{Machine, MachineConfig};
use podman::rest::PodmanService;
use podman::Podman;

/// How long `--podman-at-start` waits for Podman before listening anyway.
const PODMAN_START_WAIT: Duration = Duration::from_secs(60);

/// The b2p guest agent: varlink for io.podman and io.b2p.Machine, and a
/// forwarder to Podman's REST API.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// vsock port for varlink (default 1024 when no --unix is given).
    #[arg(long)]
    vsock_port: Option<u32>,
    /// vsock port forwarded to Podman's REST socket (default 1025 when no
    /// --unix is given).
    #[arg(long)]
    forward_port: Option<u32>,
    /// vsock port forwarded to sshd (default 22 when no --unix is given).
    #[arg(long)]
    ssh_port: Option<u32>,
    /// vsock port on which the host reaches published container ports
    /// (default 1026 when no --unix is given).
    #[arg(long)]
    ports_port: Option<u32>,
    /// Where sshd listens in the guest.
    #[arg(long, default_value = "127.0.0.1:22")]
    ssh_target: std::net::SocketAddr,
    /// Serve varlink on this Unix socket path.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Forward connections on this Unix socket path to Podman's REST socket.
    #[arg(long, value_name = "PATH")]
    forward_unix: Option<PathBuf>,
    /// Podman's REST socket.
    #[arg(long, default_value = "/run/podman/podman.sock")]
    podman_socket: PathBuf,
    /// The podman binary that starts the REST service when it does not answer.
    #[arg(long, default_value = "podman")]
    podman_bin: PathBuf,
    /// Never start the REST service; only use a running one.
    #[arg(long)]
    no_podman_autostart: bool,
    /// Start the REST service now rather than on first use, and open the
    /// ports once it answers (at most a minute later).
    #[arg(long)]
    podman_at_start: bool,
    /// With --podman-at-start, also wait (within the same minute) for the
    /// init's boot milestone NAME (e.g. busybox-image) before opening the
    /// ports, while Podman's service starts.
    #[arg(long, value_name = "NAME", requires = "podman_at_start")]
    wait_milestone: Option<String>,
    /// The init's boot milestones file (`NAME UPTIME` lines).
    #[arg(long, default_value = "/run/b2p/milestones")]
    milestones: PathBuf,
    /// Where the data disk is mounted.
    #[arg(long, default_value = "/var/lib/boot2podman")]
    data_mount: PathBuf,
    /// The command io.b2p.Machine.Shutdown runs (split on spaces).
    #[arg(long, default_value = "poweroff")]
    shutdown_command: String,
}

fn bind_unix(path: &PathBuf) -> Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

fn bind_vsock(port: u32) -> Result<tokio_vsock::VsockListener> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    tokio_vsock::VsockListener::bind(addr).with_context(|| format!("binding vsock port {port}"))
}

async fn run(args: Args) -> Result<()> {
    let registry = idl::Registry::new()?;
    let bin = (!args.no_podman_autostart).then(|| args.podman_bin.clone());
    let podman = Podman::new(PodmanService::new(args.podman_socket.clone(), bin));
    let machine = Machine::new(MachineConfig {
        milestones: args.milestones.clone(),
        data_mount: args.data_mount.clone(),
        shutdown_command: args
            .shutdown_command
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    });
    let agent = Arc::new(Agent::new(registry, podman, machine));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if args.podman_at_start {
        // Podman first, then the ports: a host that reaches the agent
        // reaches a Podman that answers. A Podman that does not come up
        // does not keep the agent (status, Shutdown) away for long.
        info!("starting podman's service before listening");
        let podman = async {
            match agent.podman().warm_up(PODMAN_START_WAIT).await {
                Ok(()) => {
                    agent.machine().milestone("podman-ready");
                    info!("podman answers");
                }
                Err(e) => warn!("podman's service is not ready ({e}); listening anyway"),
            }
        };
        let init = async {
            let Some(name) = &args.wait_milestone else {
                return;
            };
            if agent
                .machine()
                .wait_milestone(name, PODMAN_START_WAIT)
                .await
            {
                info!("the init reached {name}");
            } else {
                warn!("the init did not reach {name} in a minute; listening anyway");
            }
        };
        tokio::select! {
            _ = async { tokio::join!(podman, init) } => {}
            _ = term.recv() => return stop(&agent, &[], "SIGTERM").await,
            _ = int.recv() => return stop(&agent, &[], "SIGINT").await,
        }
    }

    let guest_defaults = args.unix.is_none() && args.forward_unix.is_none();
    let vsock_port = args.vsock_port.or(guest_defaults.then_some(1024));
    let forward_port = args.forward_port.or(guest_defaults.then_some(1025));
    let ssh_port = args.ssh_port.or(guest_defaults.then_some(22));
    let ports_port = args.ports_port.or(guest_defaults.then_some(1026));
    let mut sockets = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = &args.unix {
        let l = bind_unix(path)?;
        sockets.push(path.clone());
        info!("varlink on unix:{}", path.display());
        tasks.spawn(listen::accept_loop(
            agent.clone(),
            l,
            "the varlink socket",
            server::serve_connection,
        ));
    }
    if let Some(path) = &args.forward_unix {
        let l = bind_unix(path)?;
        sockets.push(path.clone());
        info!("forwarding unix:{} to podman", path.display());
        tasks.spawn(listen::accept_loop(
            agent.clone(),
            l,
            "the forwarding socket",
            forward::forward,
        ));
    }
    if let Some(port) = vsock_port {
        let l = bind_vsock(port)?;
        info!("varlink on vsock port {port}");
        tasks.spawn(listen::accept_loop(
            agent.clone(),
            l,
            "the varlink vsock port",
            server::serve_connection,
        ));
    }
    if let Some(port) = forward_port {
        let l = bind_vsock(port)?;
        info!("forwarding vsock port {port} to podman");
        tasks.spawn(listen::accept_loop(
            agent.clone(),
            l,
            "the forwarding vsock port",
            forward::forward,
        ));
    }
    if let Some(port) = ssh_port {
        let l = bind_vsock(port)?;
        let target = args.ssh_target;
        info!("forwarding vsock port {port} to sshd at {target}");
        tasks.spawn(listen::accept_loop(
            agent.clone(),
            l,
            "the ssh vsock port",
            move |_agent, s| forward::forward_tcp(target, s),
        ));
    }
    if let Some(port) = ports_port {
        let l = bind_vsock(port)?;
        info!("relaying vsock port {port} to published container ports");
        tasks.spawn(ports::follow(agent.clone()));
        tasks.spawn(listen::accept_loop(
            agent.clone(),
            l,
            "the published-ports vsock port",
            ports::relay,
        ));
    }
    agent.machine().milestone("agent-listening");

    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    stop(&agent, &sockets, why).await
}

/// Stops the podman service this agent started and removes its sockets.
async fn stop(agent: &Agent, sockets: &[PathBuf], why: &str) -> Result<()> {
    info!("{why}: exiting");
    agent.podman().service().stop_started().await;
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(args))
}
