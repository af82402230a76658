//! The embedding API's input: what VM to build. [`VmConfig`] holds plain
//! data; [`VmConfig::validate`] checks everything that can be checked
//! without touching the host; [`VmBuilder`] is the fluent way to fill it in.

use std::path::PathBuf;

use b2p_boot::layout::{MAX_VCPUS, MIN_MEMORY_MIB};

use crate::{Error, Vm};

/// Command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Guest memory when none is given, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Largest guest memory accepted, in MiB (1 TiB: the guest physical map
/// stays far below the 46-bit limit of common hosts).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Appended to the command line when the boot timer is on.
pub const BOOT_TIMER_CMDLINE: &str = "b2p.boot_timer=1";

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Console {
    /// Output to stdout; stdin is the input when it is a terminal (raw mode,
    /// restored when the VM ends).
    #[default]
    Stdio,
    /// Output to a file (created or truncated); no input.
    File(PathBuf),
    /// Output discarded; no input.
    None,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    pub serial: Option<String>,
}

/// Where a virtio-net device's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// An existing TAP interface (root made it: `ip tuntap add NAME mode tap
    /// user USER`); checksum and segmentation offloads.
    Tap { name: String },
    /// User-mode networking through passt: the monitor starts its own
    /// passt (`socket: None`, ended with the VM) or joins one listening on
    /// `socket` (`passt -s PATH`). No root, no offloads.
    Passt { socket: Option<PathBuf> },
}

impl std::fmt::Display for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetBackend::Tap { name } => write!(f, "tap={name}"),
            NetBackend::Passt { socket: None } => write!(f, "passt"),
            NetBackend::Passt { socket: Some(p) } => write!(f, "passt={}", p.display()),
        }
    }
}

/// A virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// The guest's MAC; `None` picks a random locally administered one.
    pub mac: Option<[u8; 6]>,
}

impl NetConfig {
    /// A device on the TAP `name`.
    pub fn tap(name: impl Into<String>) -> Self {
        NetConfig {
            backend: NetBackend::Tap { name: name.into() },
            mac: None,
        }
    }

    /// A device on a passt the monitor starts.
    pub fn passt() -> Self {
        NetConfig {
            backend: NetBackend::Passt { socket: None },
            mac: None,
        }
    }
}

/// The virtio-vsock device (Firecracker's hybrid Unix-socket protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest CID (3 or more).
    pub cid: u32,
    /// Host side: `CONNECT <port>` here; guest connections go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// Where a virtio-fs device's backend comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsBackend {
    /// The monitor starts virtiofsd on this folder (ended with the VM).
    Folder { path: PathBuf, read_only: bool },
    /// A virtiofsd already listening here (`virtiofsd --socket-path PATH`).
    Socket(PathBuf),
}

/// A virtio-fs device (a host folder the guest mounts by `tag`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    pub tag: String,
    pub backend: FsBackend,
}

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The full kernel command line (`--boot-timer` appends to it).
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: usize,
    pub console: Console,
    /// Map the boot-timer device and tell the guest (`b2p.boot_timer=1`).
    pub boot_timer: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    /// `--vsock-port PORT=PATH`: listen on PATH, join to guest port PORT.
    pub vsock_ports: Vec<(u32, PathBuf)>,
    /// A virtio-rng device fed by the host's getrandom.
    pub virtio_rng: bool,
    /// A virtio-balloon device with free page reporting: the guest gives
    /// the memory it frees back to the host (`--balloon`).
    pub balloon: bool,
    /// virtio-fs devices (vhost-user; guest memory becomes a shared memfd).
    pub fs: Vec<FsConfig>,
    /// Back guest memory with a memfd even with no vhost-user device
    /// (benches compare its setup cost with anonymous memory).
    pub shared_memory: bool,
    /// Also announce each virtio-mmio device on the command line
    /// (`virtio_mmio.device=4K@0x...:GSI`), for kernels built with
    /// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; the DSDT announces them anyway,
    /// so a kernel with both would see every device twice.
    pub virtio_mmio_cmdline: bool,
    /// Print `b2p-vmm: timing ...` lines to stderr.
    pub timings: bool,
    /// CLOCK_MONOTONIC ns when the process started (timings and the boot
    /// timer count from here); `None` = when the VM was started.
    pub start_ns: Option<u64>,
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            console: Console::Stdio,
            boot_timer: false,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            vsock_ports: Vec::new(),
            virtio_rng: false,
            balloon: false,
            fs: Vec::new(),
            shared_memory: false,
            virtio_mmio_cmdline: false,
            timings: false,
            start_ns: None,
        }
    }

    /// The command line the guest gets.
    pub fn effective_cmdline(&self) -> String {
        if self.boot_timer {
            let c = self.cmdline.trim_end();
            if c.is_empty() {
                BOOT_TIMER_CMDLINE.to_string()
            } else {
                format!("{c} {BOOT_TIMER_CMDLINE}")
            }
        } else {
            self.cmdline.clone()
        }
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Checks that need no host resources.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::MemoryTooLarge(self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.cmdline.as_bytes().contains(&0) {
            return Err(ConfigError::CmdlineNul);
        }
        let mut disk_paths = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            if let Some(s) = &d.serial {
                if s.len() > 20 {
                    return Err(ConfigError::DiskSerial(s.clone()));
                }
            }
            // The same image under another name is still caught by the
            // disk's exclusive lock; this names the plain mistake.
            let path = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
            if disk_paths.contains(&path) {
                return Err(ConfigError::DiskTwice(d.path.clone()));
            }
            disk_paths.push(path);
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid == u32::MAX {
                return Err(ConfigError::VsockCid(v.cid));
            }
        }
        if let Some(v) = &self.vsock {
            // Guest-initiated connections go to `<uds>_<port>`.
            check_socket_path(&v.uds_path, "_4294967295".len())?;
        }
        for (_, path) in &self.vsock_ports {
            check_socket_path(path, 0)?;
        }
        if !self.vsock_ports.is_empty() && self.vsock.is_none() {
            return Err(ConfigError::VsockPortWithoutVsock);
        }
        let mut tags: Vec<&str> = Vec::with_capacity(self.fs.len());
        for f in &self.fs {
            b2p_devices::virtio::fs::check_tag(&f.tag)
                .map_err(|e| ConfigError::FsTag(e.to_string()))?;
            if tags.contains(&f.tag.as_str()) {
                return Err(ConfigError::FsTagTwice(f.tag.clone()));
            }
            tags.push(&f.tag);
            if let FsBackend::Socket(p) = &f.backend {
                check_socket_path(p, 0)?;
            }
        }
        let mut ports: Vec<u32> = self.vsock_ports.iter().map(|(p, _)| *p).collect();
        ports.sort_unstable();
        if let Some(w) = ports.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::VsockPortTwice(w[0]));
        }
        Ok(())
    }
}

/// The longest path a Unix socket address holds (sun_path less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// `path`, plus `suffix` more bytes, must fit a Unix socket address.
fn check_socket_path(path: &std::path::Path, suffix: usize) -> Result<(), ConfigError> {
    let len = path.as_os_str().len() + suffix;
    if len > MAX_SOCKET_PATH {
        return Err(ConfigError::SocketPathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

impl VmConfig {
    /// Guest memory against this host's RAM (/proc/meminfo): more than
    /// MemTotal is refused (the guest would be killed, or the host swap,
    /// as soon as it used it); more than MemAvailable gets a warning.
    pub fn check_host_memory(&self) -> Result<(), ConfigError> {
        let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
            return Ok(());
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib >> 10)
        };
        if let Some(total) = field("MemTotal:") {
            if self.memory_mib > total {
                return Err(ConfigError::MemoryMoreThanHost {
                    mib: self.memory_mib,
                    host_mib: total,
                });
            }
        }
        if let Some(avail) = field("MemAvailable:") {
            if self.memory_mib > avail {
                log::warn!(
                    "--memory {} MiB is more than this host has available now ({avail} MiB)",
                    self.memory_mib
                );
            }
        }
        Ok(())
    }
}

/// A config that cannot work, found before touching the host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--memory {0} MiB is too small (at least {MIN_MEMORY_MIB} MiB)")]
    MemoryTooSmall(u64),
    #[error("--memory {0} MiB is too large (at most {MAX_MEMORY_MIB} MiB)")]
    MemoryTooLarge(u64),
    #[error("--memory {mib} MiB is more than this host's RAM ({host_mib} MiB)")]
    MemoryMoreThanHost { mib: u64, host_mib: u64 },
    #[error("--cpus {0} is out of range (1 to {MAX_VCPUS})")]
    Vcpus(usize),
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("disk serial {0:?} is longer than 20 bytes")]
    DiskSerial(String),
    #[error("disk image {} is given twice (--disk)", .0.display())]
    DiskTwice(PathBuf),
    #[error("vsock CID {0} is reserved (use 3 or more)")]
    VsockCid(u32),
    #[error("socket path {} is too long for a Unix socket ({len} bytes with what is appended, at most {MAX_SOCKET_PATH})", path.display())]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("--vsock-port needs --vsock")]
    VsockPortWithoutVsock,
    #[error("vsock port {0} is given twice")]
    VsockPortTwice(u32),
    #[error("--fs: {0}")]
    FsTag(String),
    #[error("--fs tag {0:?} is given twice")]
    FsTagTwice(String),
}

/// Fluent construction of a [`VmConfig`], ending in a running [`Vm`].
#[derive(Clone, Debug)]
pub struct VmBuilder {
    config: VmConfig,
}

impl VmBuilder {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmBuilder {
            config: VmConfig::new(kernel),
        }
    }
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.initrd = Some(path.into());
        self
    }
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = cmdline.into();
        self
    }
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.config.memory_mib = mib;
        self
    }
    pub fn vcpus(mut self, n: usize) -> Self {
        self.config.vcpus = n;
        self
    }
    pub fn console(mut self, console: Console) -> Self {
        self.config.console = console;
        self
    }
    pub fn boot_timer(mut self, on: bool) -> Self {
        self.config.boot_timer = on;
        self
    }
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.config.disks.push(disk);
        self
    }
    pub fn net(mut self, net: NetConfig) -> Self {
        self.config.nets.push(net);
        self
    }
    pub fn vsock(mut self, vsock: VsockConfig) -> Self {
        self.config.vsock = Some(vsock);
        self
    }
    pub fn vsock_port(mut self, port: u32, path: impl Into<PathBuf>) -> Self {
        self.config.vsock_ports.push((port, path.into()));
        self
    }
    pub fn virtio_rng(mut self, on: bool) -> Self {
        self.config.virtio_rng = on;
        self
    }
    pub fn fs(mut self, fs: FsConfig) -> Self {
        self.config.fs.push(fs);
        self
    }
    pub fn shared_memory(mut self, on: bool) -> Self {
        self.config.shared_memory = on;
        self
    }
    pub fn balloon(mut self, on: bool) -> Self {
        self.config.balloon = on;
        self
    }
    pub fn virtio_mmio_cmdline(mut self, on: bool) -> Self {
        self.config.virtio_mmio_cmdline = on;
        self
    }
    pub fn timings(mut self, on: bool) -> Self {
        self.config.timings = on;
        self
    }
    pub fn start_ns(mut self, ns: u64) -> Self {
        self.config.start_ns = Some(ns);
        self
    }
    /// The config built so far.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
    /// Validate, build and start the VM.
    pub fn start(self) -> Result<Vm, Error> {
        Vm::start(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = VmConfig::new("k");
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.memory_mib = MIN_MEMORY_MIB - 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::MemoryTooSmall(MIN_MEMORY_MIB - 1))
        );
        let mut c = ok.clone();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 255;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(255)));
        c.vcpus = 254;
        assert_eq!(c.validate(), Ok(()));
        let mut c = ok.clone();
        c.vsock_ports.push((1024, "/x".into()));
        assert_eq!(c.validate(), Err(ConfigError::VsockPortWithoutVsock));
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds_path: "/v".into(),
        });
        assert_eq!(c.validate(), Err(ConfigError::VsockCid(2)));
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: "/v".into(),
        });
        c.vsock_ports.push((1024, "/y".into()));
        assert_eq!(c.validate(), Err(ConfigError::VsockPortTwice(1024)));
        // Socket paths: 107 bytes at most, the hybrid socket's with `_PORT`.
        let mut c = ok.clone();
        let long = format!("/{}", "s".repeat(106));
        c.vsock_ports = vec![(1024, long.clone().into())];
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: "/v".into(),
        });
        assert_eq!(c.validate(), Ok(()));
        c.vsock_ports = vec![(1024, format!("{long}x").into())];
        assert!(matches!(
            c.validate(),
            Err(ConfigError::SocketPathTooLong { len: 108, .. })
        ));
        c.vsock_ports.clear();
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: format!("/{}", "v".repeat(95)).into(),
        });
        assert_eq!(c.validate(), Ok(()));
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: format!("/{}", "v".repeat(96)).into(),
        });
        assert!(matches!(
            c.validate(),
            Err(ConfigError::SocketPathTooLong { len: 108, .. })
        ));
    }

    #[test]
    fn fs_tags() {
        let mut c = VmConfig::new("k");
        let dir = |tag: &str| FsConfig {
            tag: tag.into(),
            backend: FsBackend::Folder {
                path: "/srv".into(),
                read_only: false,
            },
        };
        c.fs = vec![dir("a"), dir("b")];
        assert_eq!(c.validate(), Ok(()));
        c.fs.push(dir("a"));
        assert_eq!(c.validate(), Err(ConfigError::FsTagTwice("a".into())));
        c.fs = vec![dir("a:b")];
        assert!(matches!(c.validate(), Err(ConfigError::FsTag(_))));
    }

    #[test]
    fn boot_timer_cmdline() {
        let mut c = VmConfig::new("k");
        c.cmdline = "console=ttyS0 ".into();
        assert_eq!(c.effective_cmdline(), "console=ttyS0 ");
        c.boot_timer = true;
        assert_eq!(c.effective_cmdline(), "console=ttyS0 b2p.boot_timer=1");
        c.cmdline.clear();
        assert_eq!(c.effective_cmdline(), "b2p.boot_timer=1");
    }
}
