//! A machine's state on the host: its directory
//! `$XDG_DATA_HOME/b2p/machines/NAME/` (default `~/.local/share/…`), the
//! `config.json` written by `b2p create`, the paths of its disk, key,
//! sockets and logs, whose it is, and whether its VM process is running
//! (the pid file names the process and its start time). The directory is
//! 0700 and every file 0600, whatever the umask.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What `b2p create` decided about a machine; `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineConfig {
    pub name: String,
    pub memory_mib: u64,
    pub cpus: usize,
    pub disk_size_mib: u64,
    /// A kernel other than the default guest image's vmlinuz64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// An initrd other than the default image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Appended to the monitor's default kernel command line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// How eth0 is wired: user-mode through passt, a TAP, or not at all.
    /// Missing in machines made before it existed: [`MachineConfig::network`]
    /// then says what they had (a TAP when `tap` is set, else none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// A TAP interface for virtio-net.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The guest's static eth0 address, `ADDR/PREFIX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The guest's default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Host folders the guest mounts over virtio-fs (`--volume`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Seconds since the epoch.
    pub created: u64,
}

/// A host folder in the guest (`b2p create --volume HOST[:GUEST][:ro]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub guest: PathBuf,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// A machine's network (`b2p create --network`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// User-mode networking through passt (no root; DHCP in the guest).
    Passt,
    /// The TAP named by `--tap` (made by root; static address or none).
    Tap,
    /// No network device.
    None,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Passt => "passt",
            Network::Tap => "tap",
            Network::None => "none",
        }
    }
}

impl MachineConfig {
    /// How eth0 is wired (see the `network` field).
    pub fn network(&self) -> Network {
        match (self.network, &self.tap) {
            (Some(n), _) => n,
            (None, Some(_)) => Network::Tap,
            (None, None) => Network::None,
        }
    }

    /// The guest's static IPv4 address, without its prefix.
    pub fn address(&self) -> Option<&str> {
        let ip = self.ip.as_deref()?;
        ip.split('/').next()
    }
}

/// A machine's directory and the files in it.
#[derive(Clone, Debug)]
pub struct Machine {
    pub name: String,
    pub dir: PathBuf,
}

/// Running or not, as `ls` and `status` say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running(u32),
    Stopped,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running(_) => "Running",
            State::Stopped => "Stopped",
        })
    }
}

/// `$XDG_DATA_HOME/b2p/machines`, else `$HOME/.local/share/b2p/machines`.
pub fn machines_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .context("neither XDG_DATA_HOME nor HOME is set")?;
            Path::new(&home).join(".local/share")
        }
    };
    Ok(base.join("b2p/machines"))
}

/// Machine names become directory and host names: letters, digits, `-`
/// and `_`, starting with a letter or digit, at most 32 bytes (the socket
/// paths under the directory must fit a Unix socket address).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        bail!("invalid machine name {name:?}: use 1 to 32 letters, digits, '-' or '_', starting with a letter or digit");
    }
    Ok(())
}

impl Machine {
    /// The machine called `name` (which need not exist yet).
    pub fn named(name: &str) -> Result<Machine> {
        check_name(name)?;
        Ok(Machine {
            name: name.to_string(),
            dir: machines_dir()?.join(name),
        })
    }

    /// The machine called `name`, which must have been created by this
    /// user (root may manage anyone's).
    pub fn existing(name: &str) -> Result<Machine> {
        let m = Machine::named(name)?;
        match std::fs::metadata(m.config_path()) {
            Ok(meta) if meta.is_file() => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                bail!(
                    "machine {name} is not yours ({}: permission denied)",
                    m.dir.display()
                );
            }
            _ => bail!("machine {name} does not exist (b2p ls lists them)"),
        }
        m.check_owner()?;
        Ok(m)
    }

    /// Fails with "not yours" when another user owns the machine's
    /// directory (root may act on any machine).
    pub fn check_owner(&self) -> Result<()> {
        let me = euid();
        let owner = std::fs::metadata(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
            .uid();
        if me != 0 && owner != me {
            bail!(
                "machine {} is not yours (it belongs to uid {owner}, you are uid {me})",
                self.name
            );
        }
        Ok(())
    }

    /// Every created machine, by name.
    pub fn all() -> Result<Vec<Machine>> {
        let dir = machines_dir()?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let mut v: Vec<Machine> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| Machine::existing(&n).ok())
            .filter(|m| m.check_owner().is_ok())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    pub fn known_hosts_path(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    /// The hybrid vsock socket (`CONNECT <port>` handshake).
    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    /// Varlink (`io.podman`, `io.b2p.Machine`): guest vsock port 1024.
    pub fn varlink_path(&self) -> PathBuf {
        self.dir.join("io.podman")
    }
    /// Podman's REST API: guest vsock port 1025.
    pub fn podman_socket_path(&self) -> PathBuf {
        self.dir.join("podman.sock")
    }
    pub fn console_log_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VM process's own stderr (errors, warnings).
    pub fn vmm_log_path(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("pid")
    }

    pub fn load(&self) -> Result<MachineConfig> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// Writes config.json atomically (a temporary file renamed over it).
    pub fn save(&self, config: &MachineConfig) -> Result<()> {
        let text = serde_json::to_string_pretty(config)?;
        write_atomic(&self.config_path(), format!("{text}\n").as_bytes())
    }

    /// The VM process's pid, when the pid file names a live `b2p` VM
    /// process of this machine: its command line is `… __run-vm NAME` and
    /// its start time is the one the VM process wrote next to its pid (a
    /// stale file from a crash, or a reused pid, reads Stopped).
    pub fn state(&self) -> State {
        let Ok(text) = std::fs::read_to_string(self.pid_path()) else {
            return State::Stopped;
        };
        let mut fields = text.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(start))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u64>),
        ) else {
            return State::Stopped;
        };
        if process_start_time(pid) != Some(start) {
            return State::Stopped;
        }
        match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(cmdline) if is_vm_process_of(&cmdline, &self.name) => State::Running(pid),
            _ => State::Stopped,
        }
    }

    /// Writes the pid file for this process (pid and start time).
    pub fn write_pid_file(&self) -> Result<()> {
        let pid = std::process::id();
        let start = process_start_time(pid).context("reading this process's start time")?;
        write_atomic(&self.pid_path(), format!("{pid} {start}\n").as_bytes())
    }
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A process's start time (clock ticks after boot, field 22 of
/// /proc/PID/stat): with the pid, it names one process for good.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The hidden subcommand that runs a machine's VM (`b2p __run-vm NAME`).
pub const RUN_VM: &str = "__run-vm";

/// True when a /proc/PID/cmdline is `… __run-vm NAME`.
fn is_vm_process_of(cmdline: &[u8], name: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == RUN_VM.as_bytes() && w[1] == name.as_bytes())
}

/// Replaces `path` with `data` through a temporary file in the same
/// directory, so readers never see half a file. The file is 0600, and a
/// symbolic link at the temporary name is not followed.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = private_file(&tmp, true).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Opens `path` for writing as a private file: created 0600 (whatever the
/// umask, and an existing one is made 0600), never through a symbolic
/// link, emptied when `truncate`.
pub fn private_file(path: &Path, truncate: bool) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Makes `dir` (which must not exist) 0700, and its missing parents 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["default", "a", "dev-1", "x_y", "9lives"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "_x", "a/b", "..", "a b", "é", &"n".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vm_process_is_recognised_by_name() {
        let c = b"/usr/bin/b2p\0__run-vm\0dev\0";
        assert!(is_vm_process_of(c, "dev"));
        assert!(!is_vm_process_of(c, "de"));
        assert!(!is_vm_process_of(b"/bin/sleep\0sixty\0", "dev"));
    }

    #[test]
    fn start_time_names_one_process() {
        let me = std::process::id();
        let start = process_start_time(me).expect("no start time for this process");
        assert_eq!(process_start_time(me), Some(start));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let theirs = process_start_time(child.id()).unwrap();
        assert!(theirs >= start);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn config_round_trips() {
        let c = MachineConfig {
            name: "m".into(),
            memory_mib: 2048,
            cpus: 2,
            disk_size_mib: 20480,
            kernel: None,
            initrd: Some("/i".into()),
            cmdline: String::new(),
            network: Some(Network::Passt),
            tap: None,
            ip: None,
            gateway: None,
            volumes: vec![Volume {
                host: "/home/u".into(),
                guest: "/home/u".into(),
                read_only: true,
            }],
            created: 1,
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("kernel"), "{text}");
        assert_eq!(serde_json::from_str::<MachineConfig>(&text).unwrap(), c);
    }
}
