//! Boot-time and footprint bench of `b2p-vmm` with the probe guest
//! (DESIGN.md §9, issue 2 must-show 4). `cargo bench --bench boot`.
//!
//! - process start → first guest instruction (`first_exit_us`: the probe's
//!   first instruction is `out` to port 0x80) and → boot-timer write
//!   (`boot_timer_us`), both as printed by `b2p-vmm` with B2P_TIMINGS=1,
//!   microseconds since its main() started; plus spawn → exit wall time
//!   measured here. Runs with `probe.quick=1` (boot timer as soon as the
//!   probe's C code runs) and with the full probe checks.
//! - b2p-vmm's RSS with a 512 MiB guest, not counting guest memory: read
//!   from /proc/PID/smaps while the probe holds (`probe.hold_ms`), minus the
//!   Rss of the guest RAM mapping (identified by its size).
//!
//! Env: B2P_BENCH_RUNS (default 20), B2P_VMM (binary to measure).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GUEST_MIB: u64 = 512;

struct Sample {
    first_exit_us: u64,
    boot_timer_us: u64,
    wall_us: u64,
}

fn boot_once(vmm: &Path, kernel: &Path, initrd: &Path, cmdline: &str) -> Result<Sample, String> {
    let mut cmd = vmm_command(vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", cmdline, "--memory", &GUEST_MIB.to_string()])
        .args(["--cpus", "1", "--console", "none", "--boot-timer"])
        .env("B2P_TIMINGS", "1");
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    if out.timed_out || out.status.code() != Some(0) {
        return Err(out.describe());
    }
    match (
        timing(&out.stderr, "first_exit_us"),
        timing(&out.stderr, "boot_timer_us"),
    ) {
        (Some(f), Some(b)) => Ok(Sample {
            first_exit_us: f,
            boot_timer_us: b,
            wall_us: out.wall.as_micros() as u64,
        }),
        _ => Err(format!("no timing lines\n{}", out.describe())),
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn row(name: &str, v: Vec<u64>, target_us: Option<u64>) {
    let (min, med, max) = min_median_max(&v);
    let verdict = match target_us {
        Some(t) if med < t => format!("< {} ✓", ms(t)),
        Some(t) => format!("< {} ✗", ms(t)),
        None => "-".into(),
    };
    println!(
        "| {name} | {} | {} | {} | {verdict} |",
        ms(min),
        ms(med),
        ms(max)
    );
}

/// Sums `Rss:` (kB) of the whole process, and of mappings of exactly
/// `guest_kib` (the guest RAM).
fn rss_from_smaps(pid: u32, guest_kib: u64) -> Option<(u64, u64, usize)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest, mut guest_maps) = (0u64, 0u64, 0usize);
    let mut size = 0u64;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("Size:") => size = it.next()?.parse().ok()?,
            Some("Rss:") => {
                let rss: u64 = it.next()?.parse().ok()?;
                total += rss;
                if size == guest_kib {
                    guest += rss;
                    guest_maps += 1;
                }
            }
            _ => {}
        }
    }
    Some((total, guest, guest_maps))
}

fn measure_rss(vmm: &Path, kernel: &Path, initrd: &Path, dir: &TempDir) -> Result<String, String> {
    let log = dir.join("rss-console.log");
    let mut child = vmm_command(vmm)
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", "console=ttyS0 probe.hold_ms=4000"])
        .args(["--memory", &GUEST_MIB.to_string(), "--cpus", "1"])
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = child.id();
    let start = Instant::now();
    // Wait until the probe is holding (all checks done, boot timer written).
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("probe: holding")
    {
        if start.elapsed() > Duration::from_secs(30) || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the probe never reached its hold".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let smaps = rss_from_smaps(pid, GUEST_MIB * 1024);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    let _ = child.wait();
    let (total, guest, maps) = smaps.ok_or("cannot read smaps")?;
    if maps == 0 {
        return Err(format!(
            "no {GUEST_MIB} MiB guest RAM mapping found in smaps"
        ));
    }
    let overhead = total.saturating_sub(guest);
    let verdict = if overhead < 5 * 1024 {
        "< 5 MiB ✓"
    } else {
        "< 5 MiB ✗"
    };
    Ok(format!(
        "| b2p-vmm RSS, {GUEST_MIB} MiB guest | total {total} KiB | guest RAM {guest} KiB | **overhead {overhead} KiB ({:.2} MiB)** | {verdict} |\n\n({}; peak includes guest RAM)",
        overhead as f64 / 1024.0,
        hwm.split_whitespace().collect::<Vec<_>>().join(" ")
    ))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some((vmm, runs)) = bench_start("bench boot") else {
        return;
    };
    let dir = TempDir::new("bench-boot");
    let kernel = probe_kernel(&dir);
    let data = random_bytes(4096);
    let initrd = write_file(&dir, "initrd.img", &data);
    let full_cmdline = probe_cmdline(GUEST_MIB, 1, Some(&data), "");

    // Warm the page cache and the binary.
    let _ = boot_once(&vmm, &kernel, &initrd, "probe.quick=1");

    let mut quick = Vec::new();
    let mut full = Vec::new();
    for _ in 0..runs {
        match boot_once(&vmm, &kernel, &initrd, "probe.quick=1") {
            Ok(s) => quick.push(s),
            Err(e) => {
                eprintln!("bench boot: a quick run failed:\n{e}");
                std::process::exit(1);
            }
        }
    }
    for _ in 0..runs.min(10) {
        match boot_once(&vmm, &kernel, &initrd, &full_cmdline) {
            Ok(s) => full.push(s),
            Err(e) => {
                eprintln!("bench boot: a full-probe run failed:\n{e}");
                std::process::exit(1);
            }
        }
    }

    let host = Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!();
    println!(
        "### b2p-vmm boot with the probe guest ({} runs, {GUEST_MIB} MiB, 1 vCPU, console none; {host})",
        quick.len()
    );
    println!();
    println!("| milestone (from b2p-vmm's main) | min | median | max | target |");
    println!("|---|---|---|---|---|");
    row(
        "first guest instruction (first_exit_us)",
        quick.iter().map(|s| s.first_exit_us).collect(),
        Some(5000),
    );
    row(
        "boot timer, probe.quick=1 (boot_timer_us)",
        quick.iter().map(|s| s.boot_timer_us).collect(),
        None,
    );
    row(
        "spawn → exit (wall, measured outside), probe.quick=1",
        quick.iter().map(|s| s.wall_us).collect(),
        None,
    );
    row(
        &format!("boot timer after all probe checks ({} runs)", full.len()),
        full.iter().map(|s| s.boot_timer_us).collect(),
        None,
    );
    row(
        "spawn → exit (wall), all probe checks",
        full.iter().map(|s| s.wall_us).collect(),
        None,
    );
    println!();
    match measure_rss(&vmm, &kernel, &initrd, &dir) {
        Ok(line) => {
            println!("| footprint | | | | target |");
            println!("|---|---|---|---|---|");
            println!("{line}");
        }
        Err(e) => {
            eprintln!("bench boot: RSS measurement failed: {e}");
            std::process::exit(1);
        }
    }
}
