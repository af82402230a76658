//! `b2p-vmm`: boot a kernel + initrd in a KVM microVM.
//!
//! `b2p-vmm run --kernel K --initrd I [--cmdline S] [--memory MiB] [--cpus N]
//! [--console stdio|file:PATH|none] [--boot-timer] [--disk PATH[,ro][,serial=S]]...
//! [--net tap=NAME|passt[=PATH][,mac=M]]... [--vsock cid=N,uds=PATH] [--vsock-port PORT=PATH]...
//! [--virtio-rng] [--balloon] [--fs tag=T,path=DIR[,ro]|tag=T,socket=PATH]... [--virtio-mmio-cmdline]
//! [--timings] [--no-seccomp]`
//!
//! Exit status 0 when the guest shuts down (power-off, reset, a triple
//! fault after it wrote to the console) or on SIGTERM/SIGINT/SIGHUP/SIGQUIT
//! (in any phase: the VM is torn down, sockets removed, the terminal
//! restored); otherwise 1 (2 for usage errors) with exactly one
//! line `b2p-vmm: error: ...` on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use b2p_vmm::signals::StopSignals;
use b2p_vmm::{
    cli, image, monotonic_ns, Console, DiskConfig, FsConfig, NetConfig, Vm, VmConfig, VsockConfig,
};
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
    /// A virtio-net device (repeatable): on an existing TAP (tap=NAME), or
    /// rootless through passt: `passt` starts a passt of its own (ended with
    /// the VM; its messages go to stderr), `passt=PATH` joins one listening
    /// on PATH (`passt -s PATH`). Guest DHCP from passt: ip=dhcp
    #[arg(
        long,
        value_name = "tap=NAME|passt[=PATH][,mac=M]",
        value_parser = cli::parse_net
    )]
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
    /// A host folder over virtio-fs (repeatable): path=DIR starts virtiofsd
    /// on it (ended with the VM; ro: read-only), socket=PATH joins a running
    /// one. The guest mounts it with `mount -t virtiofs TAG DIR`. A `,` in a
    /// path is written `,,`
    #[arg(long, value_name = "tag=TAG,path=DIR[,ro]|tag=TAG,socket=PATH", value_parser = cli::parse_fs)]
    fs: Vec<FsConfig>,
    /// Back guest memory with a shared memfd even without --fs (for benches)
    #[arg(long, hide = true)]
    shared_memory: bool,
    /// A virtio-balloon device: the guest's free page reporting gives the
    /// memory it frees back to the host; its memory statistics are logged
    /// every 30 s (B2P_LOG=info)
    #[arg(long)]
    balloon: bool,
    /// Also list the virtio-mmio devices on the command line (virtio_mmio.device=),
    /// for kernels with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and no ACPI
    #[arg(long)]
    virtio_mmio_cmdline: bool,
    /// Print `b2p-vmm: timing NAME_us=N` milestones to stderr (also B2P_TIMINGS=1)
    #[arg(long)]
    timings: bool,
    /// Run without the per-thread seccomp filters (for debugging a filter
    /// that ends the process: a forbidden system call is named on stderr)
    #[arg(long)]
    no_seccomp: bool,
}

fn resolve_image(args: &RunArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(k) = &args.kernel {
        return Ok((k.clone(), args.initrd.clone()));
    }
    let (kernel, initrd) =
        image::default_image(args.initrd.as_deref()).context("no --kernel given")?;
    Ok((kernel, Some(initrd)))
}

fn run(args: RunArgs, start_ns: u64, signals: StopSignals) -> anyhow::Result<()> {
    b2p_vmm::seccomp::set_mode(match args.no_seccomp {
        true => b2p_vmm::seccomp::Mode::Off,
        false => b2p_vmm::seccomp::Mode::Process,
    });
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
        balloon: args.balloon,
        fs: args.fs,
        shared_memory: args.shared_memory,
        virtio_mmio_cmdline: args.virtio_mmio_cmdline,
        timings,
        start_ns: Some(start_ns),
    };
    let vm = Vm::start(config)?;
    signals
        .stop_vm_on_signal(vm.stop_handle())
        .context("spawning the signal thread")?;
    let exit = vm.wait()?;
    log::debug!("VM ended: {exit}");
    Ok(())
}

fn main() -> ExitCode {
    let mut start_ns = PROCESS_START_NS.load(Ordering::Relaxed);
    if start_ns == 0 {
        start_ns = monotonic_ns();
    }
    let cli: Cli = match cli::parse_args("b2p-vmm", "b2p-vmm run --help") {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Warnings go to stderr as `b2p-vmm: warning: ...` (B2P_LOG=info|debug for more).
    b2p_vmm::logger::init("b2p-vmm");
    let Command::Run(args) = cli.command;
    // From here on a stop signal is never lost, whatever phase it lands in.
    let result = StopSignals::block()
        .context("blocking the stop signals")
        .and_then(|signals| run(args, start_ns, signals));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("b2p-vmm: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
