//! Loud skips that CI can forbid: [`skip`] prints `SKIP: <reason>`, unless
//! `B2P_REQUIRE` lists the reason's kind, in which case it panics, so the
//! test fails instead of passing without having run.
//!
//! `B2P_REQUIRE=kvm,root,image,qemu,podman,vhost,tools` (comma-separated;
//! `all` = every kind below but `opt-in`, `vmx` and `debug`). The kind is
//! read from the reason's words, first match wins:
//!
//! | kind | the reason mentions |
//! |---|---|
//! | `opt-in` | "opt-in" or "set B2P_…" (a test nobody asked for) |
//! | `vmx` | PVM or VMX/SVM (a real Linux under b2p-vmm needs a VMX/SVM host) |
//! | `debug` | "debug build" |
//! | `kvm` | /dev/kvm or KVM |
//! | `image` | the guest image |
//! | `root` | root |
//! | `qemu` | QEMU |
//! | `podman` | Podman |
//! | `vhost` | vhost-device-vsock |
//! | `tools` | anything else (a tool not installed, a netns that cannot be made) |
//!
//! Standalone (std only), so that crates other than the root package can
//! include it with `#[path]`.
#![allow(dead_code)]

/// Every kind, in the order [`kind_of`] tries them.
pub const KINDS: [&str; 10] = [
    "opt-in", "vmx", "debug", "kvm", "image", "root", "qemu", "podman", "vhost", "tools",
];

/// The kind of a skip reason (see the module doc).
pub fn kind_of(reason: &str) -> &'static str {
    let lower = reason.to_ascii_lowercase();
    let has = |w: &str| lower.contains(w);
    let word = |w: &str| {
        lower
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|t| t == w)
    };
    if has("opt-in") || reason.contains("set B2P_") {
        "opt-in"
    } else if word("pvm") || has("vmx/svm") {
        "vmx"
    } else if has("debug build") {
        "debug"
    } else if has("/dev/kvm") || word("kvm") {
        "kvm"
    } else if has("guest image") || has("b2p/image") {
        "image"
    } else if word("root") {
        "root"
    } else if has("qemu") {
        "qemu"
    } else if word("podman") {
        "podman"
    } else if has("vhost-device-vsock") {
        "vhost"
    } else {
        "tools"
    }
}

/// The kinds `B2P_REQUIRE` lists; a name that is not a kind is an error
/// (a typo must not turn the check off).
pub fn required() -> Result<Vec<&'static str>, String> {
    let Ok(list) = std::env::var("B2P_REQUIRE") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name == "all" {
            out.extend(
                KINDS
                    .iter()
                    .filter(|k| !["opt-in", "vmx", "debug"].contains(k)),
            );
        } else if let Some(k) = KINDS.iter().find(|k| **k == name) {
            out.push(*k);
        } else {
            return Err(format!(
                "B2P_REQUIRE names {name:?}, which is not one of {} (or all)",
                KINDS.join(", ")
            ));
        }
    }
    Ok(out)
}

/// `Some(message)` when `reason` must not be a skip under `B2P_REQUIRE`.
pub fn forbidden(reason: &str) -> Option<String> {
    let kind = kind_of(reason);
    match required() {
        Err(e) => Some(e),
        Ok(kinds) if kinds.contains(&kind) => Some(format!(
            "B2P_REQUIRE lists {kind:?}, but this test would skip: {reason}"
        )),
        Ok(_) => None,
    }
}

/// Prints `SKIP: <reason>` to stderr (past libtest's capture), or panics
/// when `B2P_REQUIRE` lists the reason's kind.
pub fn skip(reason: &str) {
    skip_named("", reason);
}

/// [`skip`] for the test `test`: `SKIP: <test>: <reason>` (the kind is read
/// from the reason alone).
pub fn skip_named(test: &str, reason: &str) {
    if let Some(msg) = forbidden(reason) {
        panic!("{test}: {msg}");
    }
    use std::io::Write;
    if test.is_empty() {
        let _ = writeln!(std::io::stderr(), "SKIP: {reason}");
    } else {
        let _ = writeln!(std::io::stderr(), "SKIP: {test}: {reason}");
    }
}
