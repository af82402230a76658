//! b2p: the manager CLI (the successor of podman-machine). For now it
//! carries the host-side varlink client:
//! `b2p varlink ADDRESS call METHOD [PARAMS-JSON]`.

mod varlink;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(name = "b2p", version, about = "Manage b2p microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Talk varlink to a machine's agent.
    Varlink {
        /// unix:PATH, or vsock:UDS_PATH:PORT for a hybrid vsock socket.
        address: String,
        #[command(subcommand)]
        action: VarlinkAction,
    },
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

fn varlink_call(
    address: &str,
    method: &str,
    params: &str,
    more: bool,
    timeout: u64,
) -> Result<ExitCode> {
    let addr: varlink::Address = address.parse()?;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Varlink {
            address,
            action:
                VarlinkAction::Call {
                    method,
                    parameters,
                    more,
                    timeout,
                },
        } => varlink_call(&address, &method, &parameters, more, timeout),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("b2p: {e:#}");
            ExitCode::from(2)
        }
    }
}
