//! Determinism of the guest image: `guest-image/build.sh --verify-reproducible`
//! rebuilds vmlinuz64, vmlinux, boot2podman.gz and boot2podman.lz4 from the cached
//! .debs and compares their sha256 with the built ones. A full rebuild takes
//! a minute or more, so it runs only with B2P_TEST_REPRO=1 or in CI
//! (CI=true, as `.ci/run` is run).

#[path = "guest_image/mod.rs"]
mod support;

use std::process::Command;
use support::*;

#[test]
fn two_builds_from_the_same_debs_are_byte_identical() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if std::env::var_os("B2P_TEST_REPRO").is_none() && !ci {
        skip("set B2P_TEST_REPRO=1 (or CI=true) to rebuild the guest image and compare sha256 (or run guest-image/build.sh --verify-reproducible)");
        return;
    }
    if image().is_none() {
        return;
    }
    if !is_root() || !have_tool("mmdebstrap") {
        skip("needs root and mmdebstrap (guest-image/install-deps.sh)");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/guest-image/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("--verify-reproducible")
        .output()
        .expect("run build.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    for f in ["vmlinuz64", "vmlinux", "boot2podman.gz", "boot2podman.lz4"] {
        assert!(stdout.contains(&format!("reproducible: {f} ")), "{all}");
    }
    assert!(!stdout.contains("NOT reproducible"), "{all}");
}
