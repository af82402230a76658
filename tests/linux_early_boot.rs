//! Opt-in (B2P_LINUX_TEST=1): the Debian cloud kernel's early boot under
//! `b2p-vmm run`, through tests/linux-early-boot.sh. It takes minutes on a
//! PVM host (DESIGN.md §8) and downloads the kernel package once into
//! ~/.cache/b2p/debs, so it does not run by default.

mod common;

use common::*;
use std::process::Command;

#[test]
fn debian_kernel_accepts_our_boot_tables() {
    let test = "debian_kernel_accepts_our_boot_tables";
    if std::env::var_os("B2P_LINUX_TEST").as_deref() != Some("1".as_ref()) {
        return skip(
            test,
            "opt-in: set B2P_LINUX_TEST=1 (takes minutes, downloads a kernel .deb)",
        );
    }
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/linux-early-boot.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&vmm)
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
