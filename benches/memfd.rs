//! Setup cost of memfd-backed (shared) guest memory against anonymous
//! memory in `b2p-vmm` (issue 13 must-show 3), interleaved in one run:
//! `kvm_vm_us − vm_start_us` (creating guest memory, the VM, registering
//! the memory, the irqchip) and `first_exit_us` (process start → the
//! guest's first instruction), as b2p-vmm prints them with B2P_TIMINGS=1,
//! for a 512 MiB probe guest (`probe.quick=1`):
//! - anonymous: no vhost-user device;
//! - memfd: the same with `--shared-memory` (a sealed memfd mapped shared);
//! - memfd + virtiofsd: `--fs tag=b,path=DIR` (memfd, virtiofsd started
//!   and the vhost-user handshake), when virtiofsd is installed.
//!
//! `cargo bench --bench memfd`. Env: B2P_BENCH_RUNS (default 20), B2P_VMM.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

const GUEST_MIB: u64 = 512;

/// (memory + VM setup, first guest instruction), microseconds.
fn boot_once(vmm: &Path, kernel: &Path, extra: &[String]) -> Result<(u64, u64), String> {
    let mut cmd = vmm_command(vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(["--cmdline", "console=ttyS0 probe.quick=1"])
        .args(["--memory", &GUEST_MIB.to_string(), "--cpus", "1"])
        .args(["--console", "none", "--boot-timer"])
        .args(extra)
        .env("B2P_TIMINGS", "1");
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    if out.timed_out || out.status.code() != Some(0) {
        return Err(out.describe());
    }
    match (
        timing(&out.stderr, "vm_start_us"),
        timing(&out.stderr, "kvm_vm_us"),
        timing(&out.stderr, "first_exit_us"),
    ) {
        (Some(s), Some(k), Some(f)) => Ok((k.saturating_sub(s), f)),
        _ => Err(format!("no timing lines\n{}", out.describe())),
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some((vmm, runs)) = bench_start("bench memfd") else {
        return;
    };
    let dir = TempDir::new("bench-memfd");
    let kernel = probe_kernel(&dir);
    let share = dir.join("share");
    std::fs::create_dir(&share).unwrap();
    let mut variants: Vec<(&str, Vec<String>)> = vec![
        ("anonymous", vec![]),
        ("memfd", vec!["--shared-memory".into()]),
    ];
    if b2p_vmm::virtiofsd::find_virtiofsd().is_some() {
        variants.push((
            "memfd + virtiofsd (--fs)",
            vec!["--fs".into(), format!("tag=b,path={}", share.display())],
        ));
    } else {
        eprintln!("bench memfd: virtiofsd not installed, the --fs row is left out");
    }
    // Warm the page cache and the binary.
    let _ = boot_once(&vmm, &kernel, &[]);
    let mut samples: Vec<(Vec<u64>, Vec<u64>)> = vec![(Vec::new(), Vec::new()); variants.len()];
    for _ in 0..runs {
        for (i, (name, extra)) in variants.iter().enumerate() {
            match boot_once(&vmm, &kernel, extra) {
                Ok((setup, first)) => {
                    samples[i].0.push(setup);
                    samples[i].1.push(first);
                }
                Err(e) => {
                    eprintln!("bench memfd: a {name} run failed:\n{e}");
                    std::process::exit(1);
                }
            }
        }
    }
    println!("b2p-vmm, {GUEST_MIB} MiB probe guest, {runs} interleaved runs each, ms (min / median / max)");
    println!("| guest memory | memory + VM setup | to first guest instruction |");
    println!("|---|---|---|");
    let mut medians = Vec::new();
    for ((name, _), (setup, first)) in variants.iter().zip(&samples) {
        let s = min_median_max(setup);
        let f = min_median_max(first);
        medians.push((s.1, f.1));
        println!(
            "| {name} | {} / {} / {} | {} / {} / {} |",
            ms(s.0),
            ms(s.1),
            ms(s.2),
            ms(f.0),
            ms(f.1),
            ms(f.2)
        );
    }
    let (a, m) = (medians[0], medians[1]);
    println!(
        "memfd − anonymous (medians): setup {:+.2} ms, first instruction {:+.2} ms",
        (m.0 as f64 - a.0 as f64) / 1000.0,
        (m.1 as f64 - a.1 as f64) / 1000.0
    );
}
