//! Opt-in (B2P_LINUX_TEST=1): real Linux kernels' early boot under
//! `b2p-vmm run`, through tests/linux-early-boot.sh. Each takes minutes on
//! a PVM host (DESIGN.md §8), so they do not run by default.
//! - the Debian cloud kernel accepts our boot tables (downloads its .deb
//!   once into ~/.cache/b2p/debs);
//! - our kernel (guest-image/kernel/build.sh; built if not cached, which
//!   takes tens of minutes) probes our virtio-mmio devices: the data disk's
//!   capacity, eth0 through passt, the vsock transport, the rng.

mod common;

use common::*;
use std::process::Command;

/// Whether B2P_LINUX_TEST=1 asks for these tests; prints the skip if not.
fn opted_in(test: &str) -> bool {
    let yes = std::env::var_os("B2P_LINUX_TEST").as_deref() == Some("1".as_ref());
    if !yes {
        skip(
            test,
            "opt-in: set B2P_LINUX_TEST=1 (takes minutes, may download or build a kernel)",
        );
    }
    yes
}

/// Runs the script with `env`; panics with its output unless every line was found.
fn early_boot(test: &str, env: &[(&str, &str)]) {
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/linux-early-boot.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&vmm)
        .envs(env.iter().copied())
        .output()
        .expect("run tests/linux-early-boot.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "linux-early-boot.sh failed: {:?}",
        out.status
    );
    assert!(!stdout.contains("MISSING"));
}

#[test]
fn debian_kernel_accepts_our_boot_tables() {
    let test = "debian_kernel_accepts_our_boot_tables";
    if opted_in(test) {
        early_boot(test, &[]);
    }
}

#[test]
fn b2p_kernel_probes_our_devices() {
    let test = "b2p_kernel_probes_our_devices";
    if !opted_in(test) {
        return;
    }
    if which("passt").is_none() {
        return skip(test, "passt is not installed (the test's network backend)");
    }
    early_boot(test, &[("B2P_LINUX_SOURCE", "b2p")]);
}
