//! Boot of the same guest under `b2p-vmm` and under QEMU, in one run
//! (DESIGN.md §9: ratios against `-M microvm` and `-M q35`).
//! `cargo bench --bench boot_vs_qemu`.
//!
//! The guest is the probe (tests/probe) with `probe.quick=1`: it prints its
//! console marker `probe: hello` as soon as its C code runs, then powers
//! off (ACPI S5 where the FADT has sleep registers, else the i8042 reset,
//! which `-no-reboot` turns into QEMU's exit). QEMU has no boot timer, so
//! both monitors are timed the same way from here: spawn → the marker on
//! the serial console (stdout pipe) and spawn → process exit.
//!
//! Peers: b2p-vmm with the bzImage (64-bit boot protocol) and with the ELF
//! (PVH entry); QEMU `-M microvm,acpi=on` and `-M q35` (SeaBIOS) with the
//! ELF through PVH (QEMU's bzImage path is the 32-bit protocol, which the
//! probe does not implement). All with `-accel kvm`, 512 MiB, 1 vCPU, no
//! devices beyond the serial console. Rounds are interleaved (each round
//! runs every peer once) so machine noise spreads over all of them.
//!
//! With B2P_BENCH_IMAGE=1 (VMX/SVM hosts; refused on PVM) the guest is the
//! boot2podman image from RAM instead, 2 GiB and 2 vCPUs, timed to its
//! `b2p: userspace ready` line (`b2p.check=disk` then powers it off), with
//! the bzImage under every monitor: DESIGN.md §9's image ratios.
//!
//! Env: B2P_BENCH_RUNS (default 20, 10 for the image), B2P_BENCH_Q35_RUNS
//! (default 5: SeaBIOS takes seconds here), B2P_VMM (binary), B2P_QEMU
//! (default qemu-system-x86_64), B2P_QEMU_CPU (a `-cpu` model; default
//! QEMU's own).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PROBE_MARKER: &str = "probe: hello";
const IMAGE_MARKER: &str = "b2p: userspace ready";
const LIMIT: Duration = Duration::from_secs(120);

/// What both monitors boot, and the console line that times it.
struct Guest {
    what: String,
    /// For b2p-vmm (and, for the image, QEMU too).
    bzimage: PathBuf,
    /// The probe's PVH ELF, for QEMU and a second b2p-vmm peer.
    elf: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: String,
    marker: String,
    memory_mib: u64,
    cpus: u32,
}

/// One monitor configuration under test.
struct Peer {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    marker: Vec<u8>,
    runs: usize,
    marker_us: Vec<u64>,
    exit_us: Vec<u64>,
}

impl Peer {
    fn new(name: &str, program: &Path, args: Vec<String>, marker: &str, runs: usize) -> Peer {
        Peer {
            name: name.into(),
            program: program.to_path_buf(),
            args,
            marker: marker.as_bytes().to_vec(),
            runs,
            marker_us: Vec::new(),
            exit_us: Vec::new(),
        }
    }

    /// Boots once; records spawn → marker and spawn → exit.
    fn boot(&mut self) -> Result<(), String> {
        let mut cmd = vmm_command(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        let marker = self.marker.clone();
        let reader = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let mut sent = false;
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if !sent && seen.windows(marker.len()).any(|w| w == marker.as_slice()) {
                    sent = true;
                    let _ = tx.send(Instant::now());
                }
            }
            seen
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if start.elapsed() > LIMIT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{}: no exit within {LIMIT:?}", self.name));
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => return Err(format!("{}: wait: {e}", self.name)),
            }
        };
        let exit = start.elapsed();
        let console = reader.join().unwrap_or_default();
        let errors = err_reader.join().unwrap_or_default();
        let marker = rx.try_recv().map_err(|_| {
            format!(
                "{}: no {:?} on the console (status {status:?})\n--- console ---\n{}\n--- stderr ---\n{errors}",
                self.name,
                String::from_utf8_lossy(&self.marker),
                String::from_utf8_lossy(&console)
            )
        })?;
        if !status.success() {
            return Err(format!(
                "{}: exit status {status:?}\n--- stderr ---\n{errors}",
                self.name
            ));
        }
        self.marker_us
            .push(marker.duration_since(start).as_micros() as u64);
        self.exit_us.push(exit.as_micros() as u64);
        Ok(())
    }
}

fn median(v: &[u64]) -> u64 {
    min_median_max(v).1
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn min_med_max(v: &[u64]) -> String {
    let (lo, med, hi) = min_median_max(v);
    format!("{} / {} / {}", ms(lo), ms(med), ms(hi))
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn qemu_args(machine: &str, kernel: &Path, g: &Guest) -> Vec<String> {
    let mut args: Vec<String> = ["-M", machine, "-accel", "kvm", "-m"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(g.memory_mib.to_string());
    args.extend(["-smp".to_string(), g.cpus.to_string()]);
    args.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.push(kernel.display().to_string());
    if let Some(i) = &g.initrd {
        args.extend(["-initrd".to_string(), i.display().to_string()]);
    }
    args.extend(["-append".to_string(), g.cmdline.clone()]);
    if let Some(cpu) = std::env::var("B2P_QEMU_CPU").ok().filter(|c| !c.is_empty()) {
        args.extend(["-cpu".to_string(), cpu]);
    }
    args
}

fn vmm_args(kernel: &Path, g: &Guest) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--kernel", &kernel.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(i) = &g.initrd {
        args.extend(["--initrd".to_string(), i.display().to_string()]);
    }
    args.extend(["--cmdline".to_string(), g.cmdline.clone()]);
    args.extend(["--memory".to_string(), g.memory_mib.to_string()]);
    args.extend(["--cpus".to_string(), g.cpus.to_string()]);
    args.extend(["--console".to_string(), "stdio".to_string()]);
    args
}

/// Why this host cannot boot an unmodified Linux under KVM in reasonable
/// time (PVM, DESIGN.md §8), if it cannot.
fn pvm_host() -> Option<&'static str> {
    is_pvm_kvm().then_some("/dev/kvm is PVM (kvm_pvm): an unmodified Linux never reaches userspace here (DESIGN.md §8); run B2P_BENCH_IMAGE=1 on a VMX/SVM host")
}

/// The probe (default), or with B2P_BENCH_IMAGE=1 the guest image booted
/// from RAM to "b2p: userspace ready" (then its init powers off).
fn guest(dir: &TempDir) -> Result<Guest, String> {
    if std::env::var("B2P_BENCH_IMAGE").is_ok_and(|v| v == "1") {
        if let Some(reason) = pvm_host() {
            return Err(reason.into());
        }
        let (kernel, initrd) = b2p_vmm::image::default_image(None).map_err(|e| e.to_string())?;
        return Ok(Guest {
            what: format!("the guest image ({})", initrd.display()),
            bzimage: kernel,
            elf: None,
            initrd: Some(initrd),
            // b2p.check=disk: the init prints its check line and powers off.
            cmdline: "console=ttyS0 panic=-1 b2p.ip=off b2p.check=disk".into(),
            marker: IMAGE_MARKER.into(),
            memory_mib: 2048,
            cpus: 2,
        });
    }
    let elf = dir.join("probe.elf");
    std::fs::copy(b2p_probe::ELF, &elf).map_err(|e| format!("copying the probe ELF: {e}"))?;
    Ok(Guest {
        what: "the probe guest".into(),
        bzimage: probe_kernel(dir),
        elf: Some(elf),
        initrd: None,
        cmdline: "console=ttyS0 probe.quick=1".into(),
        marker: PROBE_MARKER.into(),
        memory_mib: 512,
        cpus: 1,
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(reason) = kvm_usable() {
        return skip("bench boot_vs_qemu", &reason);
    }
    let qemu = std::env::var_os("B2P_QEMU")
        .map(PathBuf::from)
        .or_else(|| which("qemu-system-x86_64"));
    let Some(qemu) = qemu else {
        return skip(
            "bench boot_vs_qemu",
            "qemu-system-x86_64 not found (Debian package qemu-system-x86)",
        );
    };
    let vmm = match vmm_binary() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bench boot_vs_qemu: no b2p-vmm binary: {e}");
            std::process::exit(1);
        }
    };
    let dir = TempDir::new("bench-boot-vs-qemu");
    let g = match guest(&dir) {
        Ok(g) => g,
        Err(reason) => return skip("bench boot_vs_qemu", &reason),
    };
    let image = g.elf.is_none();
    let runs = env_usize("B2P_BENCH_RUNS", if image { 10 } else { 20 }).max(1);
    let q35_runs = env_usize("B2P_BENCH_Q35_RUNS", 5);
    let m = g.marker.as_str();
    let mut peers = vec![Peer::new(
        "b2p-vmm, bzImage (64-bit entry)",
        &vmm,
        vmm_args(&g.bzimage, &g),
        m,
        runs,
    )];
    // QEMU boots the probe through PVH (its bzImage loader takes the 32-bit
    // entry, which the probe lacks) and Linux as the bzImage.
    let (qemu_kernel, how) = match &g.elf {
        Some(elf) => {
            peers.push(Peer::new(
                "b2p-vmm, ELF (PVH entry)",
                &vmm,
                vmm_args(elf, &g),
                m,
                runs,
            ));
            (elf.clone(), "ELF (PVH)")
        }
        None => (g.bzimage.clone(), "bzImage"),
    };
    peers.push(Peer::new(
        &format!("QEMU -M microvm,acpi=on, {how}"),
        &qemu,
        qemu_args("microvm,acpi=on", &qemu_kernel, &g),
        m,
        runs,
    ));
    peers.push(Peer::new(
        &format!("QEMU -M q35 (SeaBIOS), {how}"),
        &qemu,
        qemu_args("q35", &qemu_kernel, &g),
        m,
        q35_runs,
    ));
    peers.retain(|p| p.runs > 0);

    // One warm-up boot each (page cache, binaries, QEMU's firmware files).
    for p in &mut peers {
        if let Err(e) = p.boot() {
            eprintln!("bench boot_vs_qemu: warm-up failed: {e}");
            std::process::exit(1);
        }
        p.marker_us.clear();
        p.exit_us.clear();
    }
    let rounds = peers.iter().map(|p| p.runs).max().unwrap_or(0);
    for round in 0..rounds {
        // Rotate the order so no peer always runs right after another.
        let n = peers.len();
        for k in 0..n {
            let p = &mut peers[(round + k) % n];
            if p.marker_us.len() < p.runs {
                if let Err(e) = p.boot() {
                    eprintln!("bench boot_vs_qemu: {e}");
                    std::process::exit(1);
                }
            }
        }
        eprint!("\rbench boot_vs_qemu: round {}/{rounds}", round + 1);
    }
    eprintln!();

    let version = Command::new(&qemu)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let b2p_marker = median(&peers[0].marker_us);
    let b2p_exit = median(&peers[0].exit_us);
    println!();
    println!(
        "### Boot of {}, b2p-vmm vs QEMU ({} MiB, {} vCPU, -accel kvm, marker {:?}; {version})",
        g.what, g.memory_mib, g.cpus, g.marker
    );
    println!();
    println!("| monitor | runs | spawn → console marker, min / median / max | spawn → exit (poweroff), min / median / max | b2p-vmm (bzImage) / this, median marker · exit |");
    println!("|---|---|---|---|---|");
    for p in &peers {
        println!(
            "| {} | {} | {} | {} | {:.3} · {:.3} |",
            p.name,
            p.marker_us.len(),
            min_med_max(&p.marker_us),
            min_med_max(&p.exit_us),
            b2p_marker as f64 / median(&p.marker_us).max(1) as f64,
            b2p_exit as f64 / median(&p.exit_us).max(1) as f64,
        );
    }
    println!();
    println!("(target, DESIGN.md §9: every boot ratio against QEMU ≤ 0.5)");
}
