//! `b2p-vmm`: boot a kernel + initrd in a KVM microVM.
//!
//! `b2p-vmm run --kernel K --initrd I [--cmdline S] [--memory MiB] [--cpus N]
//! [--console stdio|file:PATH|none] [--boot-timer] [--disk PATH[,ro][,serial=S]]...
//! [--net tap=NAME[,mac=M]]... [--vsock cid=N,uds=PATH] [--vsock-port PORT=PATH]...
//! [--virtio-rng] [--virtio-mmio-cmdline] [--timings]`
//!
//! Exit status 0 when the guest shuts down (power-off, reset, triple fault)
//! or on SIGTERM/SIGINT; otherwise 1 (2 for usage errors) with exactly one
//! line `b2p-vmm: error: ...` on stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context};
use b2p_vmm::{cli, monotonic_ns, Console, DiskConfig, NetConfig, Vm, VmConfig, VsockConfig};
use clap::{Args, Parser, Subcommand};

/// CLOCK_MONOTONIC when the process image started running (before Rust's
/// runtime and `main`), recorded by an `.init_array` constructor.
static PROCESS_START_NS: AtomicU64 = AtomicU64::new(0);

extern "C" fn record_process_start() {
    PROCESS_START_NS.store(monotonic_ns(), Ordering::Relaxed);
}

#[used]
#[link_section = ".init_array"]
static RECORD_PROCESS_START: extern "C" fn() = record_process_start;

#[derive(Parser)]
#[command(name = "b2p-vmm", version, about = "The b2p microVM monitor (KVM)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel and initrd; exit when the guest shuts down.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: bzImage (64-bit) or ELF vmlinux [default: the guest image's vmlinuz64]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk [default when --kernel is not given: the guest image's boot2podman.lz4, else boot2podman.gz]
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line
    #[arg(long, value_name = "STRING", default_value = b2p_vmm::config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB (at least 32)
    #[arg(long, value_name = "MiB", default_value_t = b2p_vmm::config::DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Number of vCPUs (1 to 254)
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: usize,
    /// Serial console: stdio, file:PATH or none
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio", value_parser = cli::parse_console)]
    console: Console,
    /// Map the boot timer at 0xC000_0000 and append b2p.boot_timer=1 to the command line
    #[arg(long)]
    boot_timer: bool,
    /// A virtio-blk disk (repeatable)
    #[arg(long, value_name = "PATH[,ro][,serial=S]", value_parser = cli::parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-net device on a TAP interface (repeatable)
    #[arg(long, value_name = "tap=NAME[,mac=M]", value_parser = cli::parse_net)]
    net: Vec<NetConfig>,
    /// virtio-vsock with Firecracker's hybrid Unix-socket protocol
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = cli::parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Listen on PATH and join each connection to guest vsock port PORT (repeatable)
    #[arg(long, value_name = "PORT=PATH", value_parser = cli::parse_vsock_port)]
    vsock_port: Vec<(u32, PathBuf)>,
    /// A virtio-rng device fed by the host's getrandom
    #[arg(long)]
    virtio_rng: bool,
    /// Also list the virtio-mmio devices on the command line (virtio_mmio.device=),
    /// for kernels with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and no ACPI
    #[arg(long)]
    virtio_mmio_cmdline: bool,
    /// Print `b2p-vmm: timing NAME_us=N` milestones to stderr (also B2P_TIMINGS=1)
    #[arg(long)]
    timings: bool,
}

/// Where guest-image/build.sh puts the default image.
fn default_image_dir() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("B2P_CACHE").filter(|c| !c.is_empty()) {
        return Some(PathBuf::from(c).join("image"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".cache/b2p/image"))
}

fn resolve_image(args: &RunArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(k) = &args.kernel {
        return Ok((k.clone(), args.initrd.clone()));
    }
    let Some(dir) = default_image_dir() else {
        bail!("no --kernel given and HOME is not set to find the default guest image");
    };
    let kernel = dir.join("vmlinuz64");
    // The image's legacy-lz4 initramfs unpacks in about half the time of
    // the gzip one (guest-image/README.md, "Figures"): prefer it when built.
    let initrd = args.initrd.clone().unwrap_or_else(|| {
        let lz4 = dir.join("boot2podman.lz4");
        if lz4.is_file() {
            lz4
        } else {
            dir.join("boot2podman.gz")
        }
    });
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            bail!(
                "no --kernel given and the default guest image is missing ({}); build it with guest-image/build.sh",
                f.display()
            );
        }
    }
    Ok((kernel, Some(initrd)))
}

/// Block SIGINT/SIGTERM in every thread and stop the VM when one arrives.
fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: plain sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc)).context("blocking SIGINT/SIGTERM");
        }
        Ok(set)
    }
}

fn run(args: RunArgs, start_ns: u64) -> anyhow::Result<()> {
    let (kernel, initrd) = resolve_image(&args)?;
    let timings = args.timings || std::env::var("B2P_TIMINGS").is_ok_and(|v| v == "1");
    let config = VmConfig {
        kernel,
        initrd,
        cmdline: args.cmdline,
        memory_mib: args.memory,
        vcpus: args.cpus,
        console: args.console,
        boot_timer: args.boot_timer,
        disks: args.disk,
        nets: args.net,
        vsock: args.vsock,
        vsock_ports: args.vsock_port,
        virtio_rng: args.virtio_rng,
        virtio_mmio_cmdline: args.virtio_mmio_cmdline,
        timings,
        start_ns: Some(start_ns),
    };
    let set = block_stop_signals()?;
    let vm = Vm::start(config)?;
    let stop = vm.stop_handle();
    std::thread::Builder::new()
        .name("b2p-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is a valid sigset; sigwait writes the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                stop.stop();
            }
        })
        .context("spawning the signal thread")?;
    let exit = vm.wait()?;
    log::debug!("VM ended: {exit}");
    Ok(())
}

/// Warnings from the library go to stderr as `b2p-vmm: warning: ...`
/// (B2P_LOG=debug|info for more).
struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let level = r.level().as_str().to_ascii_lowercase();
            eprintln!("b2p-vmm: {level}: {}", r.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("B2P_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    let logger: &'static StderrLogger = Box::leak(Box::new(StderrLogger(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    let mut start_ns = PROCESS_START_NS.load(Ordering::Relaxed);
    if start_ns == 0 {
        start_ns = monotonic_ns();
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let text = e.render().to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("b2p-vmm: error: {line} (see b2p-vmm run --help)");
            return ExitCode::from(2);
        }
    };
    init_logging();
    let Command::Run(args) = cli.command;
    match run(args, start_ns) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("b2p-vmm: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
