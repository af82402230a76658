//! A machine's life: `create` (directory, SSH key, format-me data disk,
//! config.json), `start` (a detached VM process, `b2p __run-vm NAME`, that
//! embeds the monitor), `stop` (the guest's own shutdown over varlink,
//! then SIGTERM to the VM process, then SIGKILL), waiting for the guest's
//! agent, `rm`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use b2p_vmm::config::DEFAULT_CMDLINE;
use b2p_vmm::signals::StopSignals;
use b2p_vmm::{
    image, Console, DiskConfig, FsBackend, FsConfig, NetConfig, Vm, VmConfig, VsockConfig,
};

use crate::machine::{
    create_private_dir, private_file, Machine, MachineConfig, Network, State, Volume, RUN_VM,
};
use crate::userdata;
use crate::varlink;

/// What `b2p create` takes besides the name (its command-line options).
#[derive(clap::Args, Debug)]
pub struct CreateOptions {
    /// Guest memory in MiB
    #[arg(long = "memory", value_name = "MiB", default_value_t = 2048)]
    pub memory_mib: u64,
    /// Number of vCPUs
    #[arg(long, default_value_t = 2)]
    pub cpus: usize,
    /// Data disk size in MiB (sparse)
    #[arg(long = "disk-size", value_name = "MiB", default_value_t = 20480)]
    pub disk_size_mib: u64,
    /// Kernel [default: the guest image's vmlinuz64, looked up at start]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initrd [default: the guest image's boot2podman.lz4, else .gz]
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub cmdline: String,
    /// How eth0 reaches the world: passt (user-mode, no root, DHCP in the
    /// guest), tap (the TAP named by --tap, made by root), none
    /// [default: passt, or tap with --tap]
    #[arg(long, value_enum, value_name = "passt|tap|none")]
    pub network: Option<Network>,
    /// A TAP interface for the machine's eth0 (implies --network tap)
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// Static eth0 address ADDR/PREFIX (what `ip` and `ssh` use)
    #[arg(long, value_name = "ADDR/PREFIX", requires = "tap")]
    pub ip: Option<String>,
    /// Default gateway for eth0
    #[arg(long, value_name = "ADDR", requires = "ip")]
    pub gateway: Option<String>,
    /// A host folder in the guest over virtio-fs (repeatable): HOST at GUEST
    /// (default: the same path), read-only with :ro; `none` for no folder
    /// [default: your home folder at the same path, as podman machine does,
    /// when it is a folder and virtiofsd is installed]
    #[arg(long = "volume", value_name = "HOST[:GUEST][:ro]|none")]
    pub volumes: Vec<String>,
}

/// `HOST[:GUEST][:ro]`: absolute paths (HOST must be a folder), no `:` in
/// them, nothing the kernel command line would split (whitespace).
pub fn parse_volume(s: &str) -> Result<Volume> {
    let (rest, read_only) = match s.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (s, false),
    };
    let (host, guest) = match rest.split_once(':') {
        Some((h, g)) => (h, g),
        None => (rest, rest),
    };
    if guest.contains(':') {
        bail!("--volume {s:?}: expected HOST[:GUEST][:ro] (a path may not contain ':')");
    }
    for p in [host, guest] {
        if !p.starts_with('/') {
            bail!("--volume {s:?}: {p:?} is not an absolute path");
        }
        if p.chars().any(char::is_whitespace) {
            bail!("--volume {s:?}: a path may not contain whitespace");
        }
    }
    let host = std::fs::canonicalize(host).with_context(|| format!("--volume {s:?}: {host}"))?;
    if !host.is_dir() {
        bail!("--volume {s:?}: {} is not a folder", host.display());
    }
    Ok(Volume {
        host,
        guest: PathBuf::from(guest),
        read_only,
    })
}

/// The folders a new machine mounts: the `--volume`s, `none`, or by
/// default the home folder.
fn volumes(given: &[String]) -> Result<Vec<Volume>> {
    if given.iter().any(|v| v == "none") {
        if given.len() > 1 {
            bail!("--volume none goes alone");
        }
        return Ok(Vec::new());
    }
    if given.is_empty() {
        // The default is a convenience, never a reason to fail: no home
        // folder (a system user's /nonexistent), one the command line cannot
        // carry, or no virtiofsd to serve it means no folder.
        let home = std::env::var_os("HOME").map(|h| h.to_string_lossy().into_owned());
        return Ok(home
            .and_then(|h| parse_volume(&h).ok())
            .filter(|_| b2p_vmm::virtiofsd::find_virtiofsd().is_some())
            .into_iter()
            .collect());
    }
    let vols = given
        .iter()
        .map(|v| parse_volume(v))
        .collect::<Result<Vec<_>>>()?;
    for (i, v) in vols.iter().enumerate() {
        if vols[..i].iter().any(|w| w.guest == v.guest) {
            bail!(
                "--volume: {} is given twice as a guest path",
                v.guest.display()
            );
        }
    }
    Ok(vols)
}

/// The guest's vsock CID; each machine has its own host-side socket, so
/// all can share it.
const GUEST_CID: u32 = 3;
/// Guest vsock ports the agent serves (DESIGN.md §7).
const VARLINK_PORT: u32 = 1024;
const PODMAN_PORT: u32 = 1025;

/// Makes the machine's directory, key, disk and config; on any failure
/// nothing is left behind.
pub fn create(m: &Machine, opts: CreateOptions) -> Result<MachineConfig> {
    if m.dir.exists() {
        bail!("machine {} already exists ({})", m.name, m.dir.display());
    }
    let network = match (opts.network, &opts.tap) {
        (None, Some(_)) | (Some(Network::Tap), Some(_)) => Network::Tap,
        (None, None) => Network::Passt,
        (Some(Network::Tap), None) => bail!("--network tap needs --tap NAME"),
        (Some(n), Some(_)) => bail!("--tap goes with --network tap, not {}", n.as_str()),
        (Some(n), None) => n,
    };
    if network == Network::Passt && b2p_vmm::passt::find_passt().is_none() {
        bail!(
            "{} (or create the machine with --network none, or --tap NAME)",
            b2p_vmm::passt::PasstError::NotInstalled
        );
    }
    let volumes = volumes(&opts.volumes)?;
    if !volumes.is_empty() && b2p_vmm::virtiofsd::find_virtiofsd().is_none() {
        bail!(
            "{} (or create the machine with --volume none)",
            b2p_vmm::virtiofsd::VirtiofsdError::NotInstalled
        );
    }
    let config = MachineConfig {
        name: m.name.clone(),
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        disk_size_mib: opts.disk_size_mib,
        kernel: opts.kernel.map(absolute).transpose()?,
        initrd: opts.initrd.map(absolute).transpose()?,
        cmdline: opts.cmdline,
        network: Some(network),
        tap: opts.tap,
        ip: opts.ip,
        gateway: opts.gateway,
        volumes,
        created: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    if config.disk_size_mib < 64 {
        bail!("--disk-size must be at least 64 MiB");
    }
    // A file offset is an i64: beyond that the size would wrap.
    let disk_bytes = config
        .disk_size_mib
        .checked_mul(1 << 20)
        .filter(|b| i64::try_from(*b).is_ok())
        .with_context(|| {
            format!(
                "--disk-size {} MiB is too large (at most {} MiB)",
                config.disk_size_mib,
                (i64::MAX as u64) >> 20
            )
        })?;
    // (clap makes --ip need --tap, and --gateway need --ip.)
    if let Some(ip) = &config.ip {
        check_cidr(ip)?;
    }
    if let Some(gw) = &config.gateway {
        // It lands on the kernel command line: an address and nothing else.
        if gw.parse::<std::net::Ipv4Addr>().is_err() {
            bail!("--gateway {gw:?}: expected an IPv4 address such as 192.168.127.1");
        }
    }
    // Everything the VM will be given must make sense now, not at start
    // (the socket paths under a deep XDG_DATA_HOME too).
    let vm = vm_config(m, &config, false)?;
    vm.validate()
        .map_err(|e| anyhow::anyhow!("{e}{}", socket_hint(&e)))?;
    vm.check_host_memory().map_err(anyhow::Error::new)?;
    create_private_dir(&m.dir)?;
    let made = (|| {
        let public_key = ssh_keygen(&m.key_path(), &m.name)?;
        userdata::create_disk(&m.disk_path(), disk_bytes, &public_key)
            .with_context(|| format!("creating {}", m.disk_path().display()))?;
        let size = std::fs::metadata(m.disk_path())?.len();
        if size != disk_bytes {
            bail!(
                "{} is {size} bytes, not {disk_bytes}",
                m.disk_path().display()
            );
        }
        m.save(&config)
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&m.dir);
        return Err(e);
    }
    Ok(config)
}

/// What to do about a machine directory too deep for its sockets.
fn socket_hint(e: &b2p_vmm::config::ConfigError) -> &'static str {
    match e {
        b2p_vmm::config::ConfigError::SocketPathTooLong { .. } => {
            ": the machine's directory is too deep (set XDG_DATA_HOME to a shorter path)"
        }
        _ => "",
    }
}

fn absolute(p: PathBuf) -> Result<PathBuf> {
    std::fs::canonicalize(&p).with_context(|| format!("{}", p.display()))
}

/// `ADDR/PREFIX` with an IPv4 address and a prefix of 1 to 32.
fn check_cidr(s: &str) -> Result<()> {
    let ok = s.split_once('/').is_some_and(|(a, p)| {
        a.parse::<std::net::Ipv4Addr>().is_ok()
            && p.parse::<u8>().is_ok_and(|p| (1..=32).contains(&p))
    });
    if !ok {
        bail!("--ip {s:?}: expected an IPv4 ADDR/PREFIX such as 192.168.127.2/24");
    }
    Ok(())
}

/// A new ed25519 key pair at `path` (no passphrase); returns the public key.
fn ssh_keygen(path: &Path, name: &str) -> Result<String> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("b2p-{name}"))
        .arg("-f")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (Debian package openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pub_path = path.with_extension("pub");
    // Like every file of the machine: 0600 (ssh-keygen makes it 0644).
    std::fs::set_permissions(&pub_path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", pub_path.display()))?;
    std::fs::read_to_string(&pub_path).with_context(|| format!("reading {}", pub_path.display()))
}

/// The monitor's configuration for a machine. `resolve_image` looks up
/// the default guest image (start); `create` checks only the rest.
pub fn vm_config(m: &Machine, c: &MachineConfig, resolve_image: bool) -> Result<VmConfig> {
    let (kernel, initrd) = match (&c.kernel, resolve_image) {
        (Some(k), _) => (k.clone(), c.initrd.clone()),
        (None, true) => {
            let (k, i) = image::default_image(c.initrd.as_deref())?;
            (k, Some(i))
        }
        (None, false) => (PathBuf::from("vmlinuz64"), c.initrd.clone()),
    };
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    if let Some(ip) = &c.ip {
        // The init's ip= syntax: client::gateway::hostname:device.
        let gw = c.gateway.as_deref().unwrap_or("");
        cmdline.push_str(&format!(" b2p.ip={ip}::{gw}::{}:eth0", c.name));
    } else if c.network() == Network::Passt {
        // passt answers DHCP with the host's address, gateway and DNS.
        cmdline.push_str(" b2p.ip=dhcp");
    }
    // Each folder is tag volN, mounted by the init (b2p.fs=volN:GUEST[:ro]).
    let mut fs = Vec::with_capacity(c.volumes.len());
    for (i, vol) in c.volumes.iter().enumerate() {
        let tag = format!("vol{i}");
        let ro = if vol.read_only { ":ro" } else { "" };
        cmdline.push_str(&format!(" b2p.fs={tag}:{}{ro}", vol.guest.display()));
        fs.push(FsConfig {
            tag,
            backend: FsBackend::Folder {
                path: vol.host.clone(),
                read_only: vol.read_only,
            },
        });
    }
    if !c.cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&c.cmdline);
    }
    let mut v = VmConfig::new(kernel);
    v.fs = fs;
    v.initrd = initrd;
    v.cmdline = cmdline;
    v.memory_mib = c.memory_mib;
    v.vcpus = c.cpus;
    v.console = Console::File(m.console_log_path());
    v.boot_timer = true;
    v.disks = vec![DiskConfig {
        path: m.disk_path(),
        read_only: false,
        serial: Some(format!("b2p-{}", c.name).chars().take(20).collect()),
    }];
    v.nets = match (c.network(), &c.tap) {
        (Network::Passt, _) => vec![NetConfig::passt()],
        (Network::Tap, Some(tap)) => vec![NetConfig::tap(tap)],
        (Network::Tap, None) | (Network::None, _) => Vec::new(),
    };
    v.vsock = Some(VsockConfig {
        cid: GUEST_CID,
        uds_path: m.vsock_path(),
    });
    v.vsock_ports = vec![
        (VARLINK_PORT, m.varlink_path()),
        (PODMAN_PORT, m.podman_socket_path()),
    ];
    v.virtio_rng = true;
    // The guest gives the memory its containers freed back (free page
    // reporting).
    v.balloon = true;
    Ok(v)
}

/// Starts the machine's VM process and waits until its VM runs (or says
/// why it cannot); returns its pid. With `proxy_env`, the VM process keeps
/// this environment's proxy settings, which it hands to the guest
/// (proxy.rs); without, they are taken out of its environment.
pub fn start(m: &Machine, limit: Duration, proxy_env: bool) -> Result<u32> {
    if let State::Running(pid) = m.state() {
        bail!("machine {} is already running (pid {pid})", m.name);
    }
    let config = m.load()?;
    vm_config(m, &config, true)?
        .validate()
        .map_err(anyhow::Error::new)?;
    if proxy_env {
        crate::proxy::from_env()?;
    }
    // A machine made before directories were private becomes private.
    std::fs::set_permissions(&m.dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", m.dir.display()))?;
    // vmm.log is locked for as long as the VM process lives (the lock is
    // on the open file, which the VM process inherits as its stdout and
    // stderr): a second start racing this one is refused before it
    // empties the log or touches the pid file.
    let log = private_file(&m.vmm_log_path(), false)
        .with_context(|| format!("opening {}", m.vmm_log_path().display()))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(log.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "machine {} is already starting or running ({} is locked)",
            m.name,
            m.vmm_log_path().display()
        );
    }
    log.set_len(0)
        .with_context(|| format!("emptying {}", m.vmm_log_path().display()))?;
    let _ = std::fs::remove_file(m.pid_path());
    let exe = std::env::current_exe().context("locating the b2p binary")?;
    let mut cmd = Command::new(exe);
    if !proxy_env {
        for var in crate::proxy::NAMES {
            cmd.env_remove(var);
        }
    }
    cmd.arg(RUN_VM)
        .arg(&m.name)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the VM process from
    // this terminal's session so it outlives `b2p start`.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the VM process")?;
    let begin = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(m.vmm_log_path()).unwrap_or_default();
            let why = log
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("b2p: error: "))
                .map(str::to_string)
                .unwrap_or_else(|| format!("the VM process exited ({status})"));
            bail!("{why}");
        }
        if m.state() == State::Running(child.id()) {
            return Ok(child.id());
        }
        if begin.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM process did not come up within {limit:?} (see {})",
                m.vmm_log_path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the guest's agent answers varlink (org.varlink.service
/// GetInfo on the machine's io.podman socket); how long that took. Fails
/// when the VM ends first or `limit` passes (the VM is left running).
pub fn wait_for_agent(m: &Machine, limit: Duration) -> Result<Duration> {
    let begin = Instant::now();
    loop {
        if call_agent(m, "org.varlink.service.GetInfo", Duration::from_secs(2)) {
            return Ok(begin.elapsed());
        }
        if m.state() == State::Stopped {
            bail!(
                "the VM of machine {} ended before its agent answered (see {} and {})",
                m.name,
                m.console_log_path().display(),
                m.vmm_log_path().display()
            );
        }
        if begin.elapsed() > limit {
            bail!(
                "machine {} is running but its agent did not answer within {} s (see {}; b2p stop {})",
                m.name,
                limit.as_secs(),
                m.console_log_path().display(),
                m.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The body of `b2p __run-vm NAME`: runs the machine's VM in this process
/// until the guest shuts down or a stop signal (SIGTERM, SIGINT, SIGHUP,
/// SIGQUIT) arrives.
pub fn run_vm(m: &Machine) -> Result<()> {
    // The same per-thread filters as `b2p-vmm run`. This thread's own goes
    // on once the VM is built, right after the pid file is written (the
    // filter allows no open): the file says "running" before the guest runs.
    b2p_vmm::seccomp::set_mode(b2p_vmm::seccomp::Mode::Process);
    let signals = StopSignals::block().context("blocking the stop signals")?;
    let config = m.load()?;
    let machine = m.clone();
    b2p_vmm::seccomp::before_guest_starts(move || {
        machine.write_pid_file().map_err(|e| format!("{e:#}"))
    });
    // Published container ports (ports.rs): its thread puts on its own
    // filter first; it reaches the guest once the VM's vsock socket is up.
    let state = crate::ports::open_state(&m.dir.join(crate::ports::STATE_FILE))
        .map_err(|e| eprintln!("b2p: published ports: ports.json: {e}"))
        .ok();
    crate::ports::spawn(m.vsock_path(), state).context("spawning the ports thread")?;
    // The guest's wall clock from the host's, at boot and after each
    // host resume (clock.rs).
    crate::clock::spawn(m.vsock_path()).context("spawning the clock thread")?;
    let mut vm_cfg = vm_config(m, &config, true)?;
    // The proxy settings `b2p start` left in this process's environment.
    vm_cfg.cmdline.push_str(&crate::proxy::from_env()?);
    let vm = Vm::start(vm_cfg)?;
    signals
        .stop_vm_on_signal(vm.stop_handle())
        .context("spawning the signal thread")?;
    let exit = vm.wait();
    let _ = std::fs::remove_file(m.pid_path());
    let exit = exit?;
    eprintln!("b2p: {}: VM ended: {exit}", m.name);
    Ok(())
}

/// Stops a running machine: the guest's own shutdown first (io.b2p.Machine
/// over varlink), SIGTERM to the VM process when the guest does not answer
/// or does not finish within `grace`, SIGKILL as the last resort.
pub fn stop(m: &Machine, grace: Duration) -> Result<bool> {
    let State::Running(pid) = m.state() else {
        return Ok(false);
    };
    let me = crate::machine::euid();
    if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}")) {
        if me != 0 && meta.uid() != me {
            bail!(
                "machine {} is not yours: its VM process {pid} runs as uid {}",
                m.name,
                meta.uid()
            );
        }
    }
    let asked = call_agent(m, "io.b2p.Machine.Shutdown", Duration::from_secs(3));
    if asked && wait_stopped(m, grace) {
        return Ok(true);
    }
    for (sig, wait) in [
        (libc::SIGTERM, Duration::from_secs(10)),
        (libc::SIGKILL, Duration::from_secs(5)),
    ] {
        // SAFETY: kill(2) on the pid that the pid file and /proc agree is
        // this machine's VM process.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        {
            bail!(
                "machine {} is not yours: cannot signal its VM process {pid}",
                m.name
            );
        }
        if wait_stopped(m, wait) {
            if sig == libc::SIGKILL {
                let _ = std::fs::remove_file(m.pid_path());
            }
            return Ok(true);
        }
    }
    bail!("machine {} (pid {pid}) did not stop", m.name)
}

/// Calls `method` (no parameters) on the machine's agent; whether it
/// answered without an error within `timeout`.
fn call_agent(m: &Machine, method: &str, timeout: Duration) -> bool {
    let addr = varlink::Address::Unix(m.varlink_path());
    let Ok(mut conn) = varlink::Connection::connect(&addr, Some(timeout)) else {
        return false;
    };
    conn.call(method, &serde_json::json!({}), false, |_| {})
        .is_ok()
}

fn wait_stopped(m: &Machine, limit: Duration) -> bool {
    let begin = Instant::now();
    while begin.elapsed() < limit {
        if m.state() == State::Stopped {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    m.state() == State::Stopped
}

/// What `b2p set` changes (its command-line options; at least one).
#[derive(clap::Args, Debug)]
pub struct SetOptions {
    /// New data disk size in MiB (it can only grow; the guest grows its
    /// partition and filesystem at the next boot)
    #[arg(long = "disk-size", value_name = "MiB")]
    pub disk_size_mib: Option<u64>,
    /// New guest memory in MiB
    #[arg(long = "memory", value_name = "MiB")]
    pub memory_mib: Option<u64>,
    /// New number of vCPUs
    #[arg(long)]
    pub cpus: Option<usize>,
}

/// Changes a stopped machine's disk size, memory or vCPUs. Everything is
/// checked before anything changes: a running machine (its pid file, the
/// vmm.log lock a starting one holds, the disk's lock any VM holds), a
/// smaller disk, memory or vCPUs the monitor or host cannot give each
/// fail with one line and leave the machine as it was. Returns what
/// changed, one line each.
pub fn set(m: &Machine, opts: SetOptions) -> Result<Vec<String>> {
    if opts.disk_size_mib.is_none() && opts.memory_mib.is_none() && opts.cpus.is_none() {
        bail!("nothing to set: give --disk-size, --memory or --cpus");
    }
    if let State::Running(pid) = m.state() {
        bail!(
            "machine {} is running (pid {pid}): stop it first (b2p stop {})",
            m.name,
            m.name
        );
    }
    // Held until the end: a `b2p start` racing this one is refused.
    let log = private_file(&m.vmm_log_path(), false)
        .with_context(|| format!("opening {}", m.vmm_log_path().display()))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(log.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "machine {} is starting or running ({} is locked): stop it first",
            m.name,
            m.vmm_log_path().display()
        );
    }
    let old = m.load()?;
    let mut new = old.clone();
    if let Some(mib) = opts.memory_mib {
        new.memory_mib = mib;
    }
    if let Some(n) = opts.cpus {
        new.cpus = n;
    }
    let vm = vm_config(m, &new, false)?;
    vm.validate().map_err(anyhow::Error::new)?;
    if opts.memory_mib.is_some() {
        vm.check_host_memory().map_err(anyhow::Error::new)?;
    }
    let disk_path = m.disk_path();
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_path)
        .with_context(|| format!("opening {}", disk_path.display()))?;
    // Any VM of this disk (ours, QEMU, Cloud Hypervisor) holds this lock.
    b2p_vmm::disk_lock::lock_image(&disk, false).map_err(|e| {
        anyhow::anyhow!(
            "{} is in use by a running VM ({e}): stop it first",
            disk_path.display()
        )
    })?;
    let old_bytes = disk.metadata()?.len();
    let mut grow_to = None;
    if let Some(mib) = opts.disk_size_mib {
        let bytes = mib
            .checked_mul(1 << 20)
            .filter(|b| i64::try_from(*b).is_ok())
            .with_context(|| {
                format!(
                    "--disk-size {mib} MiB is too large (at most {} MiB)",
                    (i64::MAX as u64) >> 20
                )
            })?;
        if bytes < old_bytes {
            bail!(
                "--disk-size {mib} MiB is smaller than the disk's {} MiB: a disk can only grow",
                old_bytes >> 20
            );
        }
        new.disk_size_mib = mib;
        if bytes > old_bytes {
            grow_to = Some(bytes);
        }
    }
    let mut changed = Vec::new();
    if let Some(bytes) = grow_to {
        // Sparse: the new tail takes no space until the guest writes it.
        disk.set_len(bytes)
            .with_context(|| format!("growing {}", disk_path.display()))?;
        changed.push(format!(
            "disk {} -> {} MiB (the guest grows its partition and filesystem at the next boot)",
            old_bytes >> 20,
            bytes >> 20
        ));
    }
    if let Err(e) = m.save(&new) {
        if grow_to.is_some() {
            // Nothing has been written to the new tail: give it back.
            let _ = disk.set_len(old_bytes);
        }
        return Err(e);
    }
    if new.memory_mib != old.memory_mib {
        changed.push(format!(
            "memory {} -> {} MiB",
            old.memory_mib, new.memory_mib
        ));
    }
    if new.cpus != old.cpus {
        changed.push(format!("cpus {} -> {}", old.cpus, new.cpus));
    }
    drop(disk);
    drop(log);
    Ok(changed)
}

/// Removes a machine; a running one only with `force` (it is stopped first).
pub fn remove(m: &Machine, force: bool) -> Result<()> {
    if let State::Running(pid) = m.state() {
        if !force {
            bail!(
                "machine {} is running (pid {pid}): stop it first, or rm --force",
                m.name
            );
        }
        stop(m, Duration::from_secs(10))?;
    }
    std::fs::remove_dir_all(&m.dir).with_context(|| format!("removing {}", m.dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn scratch(tag: &str) -> Machine {
        let dir = std::env::temp_dir().join(format!("b2p-lifecycle-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Machine {
            name: "t".into(),
            dir,
        }
    }

    /// A stand-in VM process: its command line reads `… __run-vm t`, and
    /// the pid file names it, so the machine reads Running.
    fn fake_vm_process(m: &Machine) -> std::process::Child {
        let child = Command::new("sh")
            .args(["-c", "sleep 30; :", RUN_VM, &m.name])
            .spawn()
            .unwrap();
        let start = crate::machine::process_start_time(child.id()).unwrap();
        std::fs::write(m.pid_path(), format!("{} {start}\n", child.id())).unwrap();
        // Until it has exec'd, /proc shows the test's own command line.
        let begin = Instant::now();
        while m.state() != State::Running(child.id()) {
            assert!(begin.elapsed() < Duration::from_secs(5), "sh never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn waits_until_the_agent_answers() {
        let m = scratch("answer");
        let mut vm = fake_vm_process(&m);
        let path = m.varlink_path();
        let t = std::thread::spawn(move || {
            // Not there at first: the wait retries.
            std::thread::sleep(Duration::from_millis(200));
            let l = UnixListener::bind(&path).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut call = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).unwrap() == 1 && b[0] != 0 {
                call.push(b[0]);
            }
            s.write_all(b"{\"parameters\":{\"vendor\":\"b2p\"}}\0")
                .unwrap();
            String::from_utf8(call).unwrap()
        });
        let took = wait_for_agent(&m, Duration::from_secs(10)).unwrap();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(t.join().unwrap().contains("org.varlink.service.GetInfo"));
        let _ = vm.kill();
        let _ = vm.wait();
        let _ = std::fs::remove_dir_all(&m.dir);
    }

    #[test]
    fn a_silent_agent_times_out() {
        let m = scratch("silent");
        let mut vm = fake_vm_process(&m);
        let begin = Instant::now();
        let e = wait_for_agent(&m, Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("did not answer within"), "{e}");
        assert!(begin.elapsed() < Duration::from_secs(5));
        let _ = vm.kill();
        let _ = vm.wait();
        let _ = std::fs::remove_dir_all(&m.dir);
    }

    #[test]
    fn a_stopped_vm_ends_the_wait() {
        let m = scratch("stopped");
        let e = wait_for_agent(&m, Duration::from_secs(10)).unwrap_err();
        assert!(
            e.to_string().contains("ended before its agent answered"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&m.dir);
    }

    fn config_with(network: Option<Network>, tap: Option<&str>) -> MachineConfig {
        MachineConfig {
            name: "t".into(),
            memory_mib: 512,
            cpus: 1,
            disk_size_mib: 64,
            kernel: Some("/k".into()),
            initrd: None,
            cmdline: String::new(),
            network,
            tap: tap.map(String::from),
            ip: None,
            gateway: None,
            volumes: Vec::new(),
            created: 0,
        }
    }

    #[test]
    fn volumes_become_fs_devices_and_mount_words() {
        let m = scratch("volumes");
        let mut c = config_with(Some(Network::None), None);
        c.volumes = vec![
            Volume {
                host: "/srv/a,b".into(),
                guest: "/a".into(),
                read_only: false,
            },
            Volume {
                host: "/srv/c".into(),
                guest: "/srv/c".into(),
                read_only: true,
            },
        ];
        let v = vm_config(&m, &c, false).unwrap();
        assert_eq!(v.fs.len(), 2);
        assert_eq!(v.fs[1].tag, "vol1");
        assert_eq!(
            v.fs[1].backend,
            FsBackend::Folder {
                path: "/srv/c".into(),
                read_only: true
            }
        );
        assert!(
            v.cmdline.contains(" b2p.fs=vol0:/a b2p.fs=vol1:/srv/c:ro"),
            "{}",
            v.cmdline
        );
    }

    #[test]
    fn volume_syntax() {
        let tmp = std::env::temp_dir();
        let t = tmp.display().to_string();
        let canon = std::fs::canonicalize(&tmp).unwrap();
        let v = parse_volume(&t).unwrap();
        assert_eq!(
            (v.host.clone(), v.guest, v.read_only),
            (canon.clone(), tmp.clone(), false)
        );
        let v = parse_volume(&format!("{t}:/data:ro")).unwrap();
        assert_eq!(
            (v.host, v.guest, v.read_only),
            (canon, "/data".into(), true)
        );
        for bad in [
            "rel",
            "/nonexistent-b2p-dir",
            "/etc/hostname",
            "/a:/b:/c",
            "/tmp:rel",
            "/tmp:/x y",
        ] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
        assert!(volumes(&["none".into()]).unwrap().is_empty());
        assert!(volumes(&["none".into(), t.clone()]).is_err());
        assert!(volumes(&[t.clone(), format!("{t}:{t}")]).is_err());
    }

    #[test]
    fn the_network_picks_the_device_and_the_guests_dhcp() {
        let m = scratch("network");
        let v = vm_config(&m, &config_with(Some(Network::Passt), None), false).unwrap();
        assert_eq!(v.nets, vec![NetConfig::passt()]);
        assert!(v.cmdline.contains(" b2p.ip=dhcp"), "{}", v.cmdline);
        let v = vm_config(&m, &config_with(Some(Network::None), None), false).unwrap();
        assert!(v.nets.is_empty());
        assert!(!v.cmdline.contains("b2p.ip"), "{}", v.cmdline);
        let v = vm_config(&m, &config_with(Some(Network::Tap), Some("tap7")), false).unwrap();
        assert_eq!(v.nets, vec![NetConfig::tap("tap7")]);
        assert!(!v.cmdline.contains("b2p.ip=dhcp"), "{}", v.cmdline);
        // A config.json from before --network: a TAP if it named one, else none.
        let old = config_with(None, Some("tap7"));
        assert_eq!(old.network(), Network::Tap);
        assert_eq!(config_with(None, None).network(), Network::None);
        let _ = std::fs::remove_dir_all(&m.dir);
    }
}
