//! `B2P_REQUIRE` (tests/common/require.rs): a skip whose kind it lists fails
//! the test instead; the kinds of the skip reasons the suite really prints.

mod common;

use common::require::{kind_of, KINDS};
use std::process::Command;

/// Skips for a missing tool when its parent test asks it to (below).
#[test]
fn helper_that_skips() {
    if std::env::var_os("B2P_REQUIRE_SELFTEST").is_none() {
        return;
    }
    common::skip("helper_that_skips", "frobnicate not installed");
}

/// This test binary's `helper_that_skips` under a given B2P_REQUIRE: (exit
/// status success, stdout + stderr).
fn run_helper(require: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "helper_that_skips",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("B2P_REQUIRE_SELFTEST", "1")
    .env_remove("B2P_REQUIRE");
    if let Some(r) = require {
        cmd.env("B2P_REQUIRE", r);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_listed_kind_turns_the_skip_into_a_failure() {
    let (ok, text) = run_helper(None);
    assert!(ok, "{text}");
    assert!(
        text.contains("SKIP: helper_that_skips: frobnicate not installed"),
        "{text}"
    );
    // Another kind listed: still a skip.
    let (ok, text) = run_helper(Some("kvm,root"));
    assert!(ok, "{text}");
    assert!(text.contains("SKIP: helper_that_skips"), "{text}");
    for require in ["tools", "kvm,tools", "all"] {
        let (ok, text) = run_helper(Some(require));
        assert!(!ok, "B2P_REQUIRE={require} should fail it\n{text}");
        assert!(
            text.contains(
                "B2P_REQUIRE lists \"tools\", but this test would skip: frobnicate not installed"
            ),
            "{text}"
        );
    }
    // A typo is an error, not a silently empty list.
    let (ok, text) = run_helper(Some("kvm,tool"));
    assert!(!ok, "{text}");
    assert!(text.contains("B2P_REQUIRE names \"tool\""), "{text}");
}

/// Reasons the suite prints, and the kind each one is.
#[test]
fn kinds_of_the_suites_skip_reasons() {
    for (reason, kind) in [
        ("/dev/kvm is not usable (No such file or directory (os error 2))", "kvm"),
        ("/dev/kvm is accessible to everyone here", "kvm"),
        ("/dev/kvm is PVM (kvm_pvm): Linux guests run ~100x slower and stop on instructions its emulator lacks (DESIGN.md §8)", "vmx"),
        ("the CPU has no VMX/SVM", "vmx"),
        ("opt-in: set B2P_LINUX_TEST=1 (takes minutes, downloads a kernel .deb)", "opt-in"),
        ("set B2P_TEST_REPRO=1 (or CI=true) to rebuild the guest image and compare sha256", "opt-in"),
        ("B2P_SECCOMP_SELFTEST exists only in debug builds", "debug"),
        ("needs root (podman service and a private mount namespace)", "root"),
        ("not root: cannot add a second local user", "root"),
        ("needs root for a network namespace and a TAP", "root"),
        ("needs root and mmdebstrap (guest-image/install-deps.sh)", "root"),
        ("no guest image in ~/.cache/b2p/image (bash guest-image/build.sh)", "image"),
        ("guest image not built in /root/.cache/b2p/image (run guest-image/build.sh)", "image"),
        ("the guest image was built without b2p-agent", "image"),
        ("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)", "qemu"),
        ("podman is not installed (apt-get install podman crun conmon)", "podman"),
        ("vhost-device-vsock is missing (cargo install vhost-device-vsock)", "vhost"),
        ("ssh-keygen not found (Debian package openssh-client)", "tools"),
        ("strace not found", "tools"),
        ("cannot make a netns with a TAP: exit status 1", "tools"),
        ("python varlink is missing (pip install varlink)", "tools"),
    ] {
        assert_eq!(kind_of(reason), kind, "{reason}");
        assert!(KINDS.contains(&kind));
    }
}
