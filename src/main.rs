//! b2p: the manager CLI, the successor of podman-machine. Machines live
//! under `$XDG_DATA_HOME/b2p/machines/NAME/` (machine.rs); their VM runs in
//! a detached `b2p` process that embeds the b2p-vmm monitor
//! (lifecycle.rs). Verbs: create, start, stop, status, ls, inspect, env,
//! ip, ssh, set, rm, and `varlink NAME|ADDRESS call METHOD [PARAMS-JSON]`.

mod clock;
mod lifecycle;
mod machine;
mod ports;
mod proxy;
mod ssh;
mod userdata;
mod varlink;
mod vsock;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use lifecycle::{CreateOptions, SetOptions};
use machine::{Machine, State, RUN_VM};

#[derive(Parser, Debug)]
#[command(
    name = "b2p",
    version,
    about = "Manage b2p microVMs (boot2podman on KVM)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a machine: SSH key, data disk (formatted by the guest at its
    /// first boot), config.
    Create {
        name: String,
        #[command(flatten)]
        options: CreateOptions,
    },
    /// Start a machine's VM in the background.
    Start {
        name: String,
        /// Seconds to wait for the guest's agent to answer varlink
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Return as soon as the VM runs, without waiting for the agent
        #[arg(long)]
        no_wait: bool,
        /// Do not hand this environment's HTTP_PROXY, HTTPS_PROXY and
        /// NO_PROXY (either case) to the guest's Podman
        #[arg(long)]
        no_proxy_env: bool,
    },
    /// Stop a machine: the guest shuts down, else its VM is stopped.
    Stop {
        name: String,
        /// Seconds the guest gets to shut down by itself
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Print Running or Stopped.
    Status { name: String },
    /// List machines.
    Ls,
    /// Print a machine's configuration, state and paths as JSON.
    Inspect { name: String },
    /// Print the shell exports that point podman, docker and varlink clients at a machine.
    Env { name: String },
    /// Print a machine's IPv4 address.
    Ip { name: String },
    /// Log in to a machine (user tc) with its key, or run COMMAND there.
    Ssh {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Change a stopped machine's disk size (grow only), memory or vCPUs.
    Set {
        name: String,
        #[command(flatten)]
        options: SetOptions,
    },
    /// Remove a machine and its disk.
    Rm {
        name: String,
        /// Stop it first if it is running
        #[arg(long, short)]
        force: bool,
    },
    /// Talk varlink to a machine's agent.
    Varlink {
        /// A machine NAME, unix:PATH, or vsock:UDS_PATH:PORT for a hybrid vsock socket.
        address: String,
        #[command(subcommand)]
        action: VarlinkAction,
    },
    /// Join stdin/stdout to a guest vsock port (ssh's ProxyCommand).
    #[command(name = vsock::PROXY, hide = true)]
    VsockProxy { uds: std::path::PathBuf, port: u32 },
    /// Forward the published ports of the guest behind a hybrid vsock
    /// socket to the host's loopback (what the VM process runs), until killed.
    #[command(name = "__forward-ports", hide = true)]
    ForwardPorts {
        uds: std::path::PathBuf,
        /// Keep this file (ports.json) current.
        #[arg(long)]
        state: Option<std::path::PathBuf>,
    },
    /// Set the wall clock of the guest behind a hybrid vsock socket to
    /// this host's (what the VM process does at boot and after a resume).
    #[command(name = "__set-guest-time", hide = true)]
    SetGuestTime { uds: std::path::PathBuf },
    /// Print the kernel command line words `b2p start` adds for this
    /// environment's proxy settings (tests).
    #[command(name = "__proxy-cmdline", hide = true)]
    ProxyCmdline,
    /// The VM process of a machine (started by `b2p start`).
    #[command(name = RUN_VM, hide = true)]
    RunVm { name: String },
}

#[derive(Subcommand, Debug)]
enum VarlinkAction {
    /// Call METHOD (e.g. io.podman.GetVersion) and print each reply's
    /// parameters as JSON.
    Call {
        method: String,
        /// The call's parameters as a JSON object.
        #[arg(default_value = "{}")]
        parameters: String,
        /// Ask for several replies (`more`), printed one JSON per line.
        #[arg(long)]
        more: bool,
        /// Seconds to wait for each reply (0: forever).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
}

/// `unix:…` and `vsock:…` as they are; anything else names a machine,
/// whose agent answers on its io.podman socket.
fn varlink_address(address: &str) -> Result<varlink::Address> {
    if address.starts_with("unix:") || address.starts_with("vsock:") {
        return Ok(address.parse()?);
    }
    let m = Machine::existing(address).with_context(|| {
        format!("{address:?} is neither a machine nor a varlink address (unix:PATH, vsock:UDS_PATH:PORT)")
    })?;
    Ok(varlink::Address::Unix(m.varlink_path()))
}

fn varlink_call(
    address: &str,
    method: &str,
    params: &str,
    more: bool,
    timeout: u64,
) -> Result<ExitCode> {
    let addr = varlink_address(address)?;
    let params: Value = serde_json::from_str(params).context("PARAMS-JSON is not JSON")?;
    if !params.is_object() {
        anyhow::bail!("PARAMS-JSON must be a JSON object");
    }
    let timeout = (timeout > 0).then(|| Duration::from_secs(timeout));
    let mut conn = varlink::Connection::connect(&addr, timeout)?;
    let result = conn.call(method, &params, more, |reply| {
        let text = if more {
            reply.to_string()
        } else {
            serde_json::to_string_pretty(reply).unwrap_or_else(|_| reply.to_string())
        };
        println!("{text}");
    });
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(varlink::ClientError::Remote { error, parameters }) => {
            let e = serde_json::json!({"error": error, "parameters": parameters});
            eprintln!("{e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

/// Lists every machine; one whose config.json cannot be read is listed as
/// Broken (with one error line each on stderr and exit status 1), the
/// others as usual.
fn ls() -> Result<ExitCode> {
    let machines = Machine::all()?;
    println!(
        "{:<20} {:<8} {:>4} {:>8} {:>9}",
        "NAME", "STATE", "CPUS", "MEMORY", "DISK"
    );
    let mut broken = Vec::new();
    for m in machines {
        match m.load() {
            Ok(c) => println!(
                "{:<20} {:<8} {:>4} {:>5}MiB {:>6}MiB",
                m.name,
                m.state().to_string(),
                c.cpus,
                c.memory_mib,
                c.disk_size_mib
            ),
            Err(e) => {
                println!(
                    "{:<20} {:<8} {:>4} {:>8} {:>9}",
                    m.name, "Broken", "-", "-", "-"
                );
                broken.push(format!("machine {} is broken: {e:#}", m.name));
            }
        }
    }
    for b in &broken {
        eprintln!("b2p: error: {}", b.replace('\n', " "));
    }
    Ok(if broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn inspect(m: &Machine) -> Result<ExitCode> {
    let config = m.load()?;
    let (state, pid) = match m.state() {
        State::Running(pid) => ("Running", Some(pid)),
        State::Stopped => ("Stopped", None),
    };
    let path = |p: std::path::PathBuf| p.display().to_string();
    // What the VM process forwards (ports.rs), while it runs.
    let ports = pid.and_then(|_| {
        let text = std::fs::read_to_string(m.dir.join(ports::STATE_FILE)).ok()?;
        serde_json::from_str::<Value>(&text)
            .ok()?
            .get("ports")
            .cloned()
    });
    let v = json!({
        "name": m.name,
        "state": state,
        "pid": pid,
        "network": config.network().as_str(),
        "ports": ports.unwrap_or_else(|| json!([])),
        "config": config,
        "paths": {
            "dir": path(m.dir.clone()),
            "disk": path(m.disk_path()),
            "ssh_key": path(m.key_path()),
            "console_log": path(m.console_log_path()),
            "vmm_log": path(m.vmm_log_path()),
            "vsock": path(m.vsock_path()),
            "varlink": format!("unix:{}", m.varlink_path().display()),
            "podman": format!("unix://{}", m.podman_socket_path().display()),
        },
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Create { name, options } => {
            let m = Machine::named(&name)?;
            lifecycle::create(&m, options)?;
            println!("Machine {name} created in {}", m.dir.display());
            println!("Start it with: b2p start {name}");
        }
        Command::Start {
            name,
            timeout,
            no_wait,
            no_proxy_env,
        } => {
            let m = Machine::existing(&name)?;
            let pid = lifecycle::start(&m, Duration::from_secs(30), !no_proxy_env)?;
            println!(
                "Machine {name} started (pid {pid}); console: {}",
                m.console_log_path().display()
            );
            if !no_wait {
                let took = lifecycle::wait_for_agent(&m, Duration::from_secs(timeout))?;
                println!("Its agent answered after {:.2} s", took.as_secs_f64());
            }
            println!("Point podman at it with: eval $(b2p env {name})");
        }
        Command::Stop { name, timeout } => {
            let m = Machine::existing(&name)?;
            if lifecycle::stop(&m, Duration::from_secs(timeout))? {
                println!("Machine {name} stopped");
            } else {
                println!("Machine {name} is not running");
            }
        }
        Command::Status { name } => println!("{}", Machine::existing(&name)?.state()),
        Command::Ls => return ls(),
        Command::Inspect { name } => return inspect(&Machine::existing(&name)?),
        Command::Env { name } => {
            let m = Machine::existing(&name)?;
            println!(
                "export CONTAINER_HOST=unix://{}",
                m.podman_socket_path().display()
            );
            // Podman's Docker-compatible API answers on the same socket.
            println!(
                "export DOCKER_HOST=unix://{}",
                m.podman_socket_path().display()
            );
            println!("export VARLINK_ADDRESS=unix:{}", m.varlink_path().display());
            println!("# Run this command to configure your shell: eval $(b2p env {name})");
        }
        Command::Ip { name } => {
            let m = Machine::existing(&name)?;
            let config = m.load()?;
            let Some(addr) = config.address() else {
                anyhow::bail!("machine {name} has no static address (network {}; a static one needs --tap TAP --ip ADDR/PREFIX)", config.network().as_str());
            };
            println!("{addr}");
        }
        Command::Ssh { name, command } => ssh::ssh(&Machine::existing(&name)?, &command)?,
        Command::Set { name, options } => {
            let changed = lifecycle::set(&Machine::existing(&name)?, options)?;
            if changed.is_empty() {
                println!("Machine {name}: nothing changed");
            }
            for c in changed {
                println!("Machine {name}: {c}");
            }
        }
        Command::Rm { name, force } => {
            lifecycle::remove(&Machine::existing(&name)?, force)?;
            println!("Machine {name} removed");
        }
        Command::Varlink {
            address,
            action:
                VarlinkAction::Call {
                    method,
                    parameters,
                    more,
                    timeout,
                },
        } => return varlink_call(&address, &method, &parameters, more, timeout),
        Command::VsockProxy { uds, port } => vsock::proxy(&uds, port)?,
        Command::ForwardPorts { uds, state } => {
            let state = match state {
                Some(p) => Some(ports::open_state(&p).with_context(|| format!("{}", p.display()))?),
                None => None,
            };
            b2p_vmm::seccomp::apply(b2p_vmm::seccomp::Role::Ports)?;
            ports::Forwarder::new(uds, state).run()
        }
        Command::SetGuestTime { uds } => {
            let off = clock::set_guest_time(&uds)?;
            println!("guest clock set from the host's (it was {off:+.3} s off)");
        }
        Command::ProxyCmdline => println!("{}", proxy::from_env()?.trim_start()),
        Command::RunVm { name } => lifecycle::run_vm(&Machine::existing(&name)?)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli: Cli = match b2p_vmm::cli::parse_args("b2p", "b2p --help") {
        Ok(c) => c,
        Err(code) => return code,
    };
    // log::warn!/error! of the monitor and its devices: stderr, which is
    // vmm.log in the VM process (B2P_LOG=info|debug for more).
    b2p_vmm::logger::init("b2p");
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("b2p: error: {msg}");
            ExitCode::from(2)
        }
    }
}
