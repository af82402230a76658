//! `b2p ssh`: log in to a machine as boot2podman's user `tc` with the
//! machine's own key and known_hosts, over its static address or, with no
//! network at all, over vsock port 22 (`b2p __vsock-proxy` as ssh's
//! ProxyCommand; the agent joins that port to sshd).

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::machine::{Machine, State};

/// `ssh` into the machine as boot2podman's user `tc` with its own key;
/// replaces this process. Over the machine's static address when it has
/// one, else over vsock port 22 (the agent joins it to sshd), which needs
/// no network at all.
pub fn ssh(m: &Machine, args: &[String]) -> Result<()> {
    let config = m.load()?;
    if m.state() == State::Stopped {
        bail!("machine {} is not running (b2p start {})", m.name, m.name);
    }
    let mut cmd = Command::new("ssh");
    cmd.arg("-i")
        .arg(m.key_path())
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            m.known_hosts_path().display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "IdentitiesOnly=yes",
        ]);
    match config.address() {
        Some(addr) => {
            cmd.arg(format!("tc@{addr}"));
        }
        None => {
            let exe = std::env::current_exe().context("locating the b2p binary")?;
            // ssh runs ProxyCommand through a shell: quote the paths.
            cmd.arg("-o").arg(format!(
                "ProxyCommand={} {} {} 22",
                shell_quote(&exe.display().to_string()),
                crate::vsock::PROXY,
                shell_quote(&m.vsock_path().display().to_string())
            ));
            cmd.arg(format!("tc@b2p-{}", m.name));
        }
    }
    let err = cmd.args(args).exec();
    Err(err).context("running ssh (Debian package openssh-client)")
}

/// `s` in single quotes for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
