//! A guest cannot flood the host's log: the probe guest in `probe.flood`
//! mode (tests/probe/guest/flood.c) writes to a register a virtio-mmio
//! device does not have, as fast as it can, for 5 s. Every such write is a
//! warning in b2p-vmm, rate-limited per call site
//! (`b2p_devices::warn_limited!`): stderr stays at a handful of lines where
//! it used to get hundreds of thousands.

mod common;

use common::*;
use std::time::Duration;

/// The whole of stderr may not exceed this many lines (issue 11: ≤ 100).
const MAX_LINES: usize = 100;

#[test]
fn a_guest_looping_on_an_unknown_register_writes_at_most_100_lines() {
    let test = "a_guest_looping_on_an_unknown_register_writes_at_most_100_lines";
    if let Err(reason) = kvm_usable() {
        skip(test, &reason);
        return;
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let dir = TempDir::new(test);
    let kernel = probe_kernel(&dir);
    let mut cmd = vmm_command(&vmm);
    cmd.args(["run", "--memory", "64", "--cpus", "1", "--virtio-rng"])
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", "console=ttyS0 probe.flood=5000"]);
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert!(!out.timed_out, "{test}: timed out\n{}", out.describe());
    assert!(out.status.success(), "{test}\n{}", out.describe());
    // The guest really flooded: it reports its write count at the end.
    let writes: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("probe: flood done, "))
        .and_then(|r| r.strip_suffix(" writes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{test}: no flood report\n{}", out.describe()));
    assert!(writes >= 10_000, "{test}: only {writes} writes");
    // The monitor noticed (the warning is there) but said it only a few times.
    let lines = out.stderr.lines().count();
    assert!(
        out.stderr.contains("unknown/read-only register"),
        "{test}: the bad write was never reported\n{}",
        out.describe()
    );
    assert!(
        lines <= MAX_LINES,
        "{test}: {lines} stderr lines for {writes} bad writes (at most {MAX_LINES})\n{}",
        out.stderr.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    eprintln!("{test}: {writes} bad register writes in 5 s, {lines} stderr lines");
}
