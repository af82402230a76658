//! The guest kernel built by guest-image/kernel/build.sh: its `.config` has
//! every option of guest-image/kernel/required.list, its `vmlinux` carries
//! the PVH entry note b2p-vmm boots through, and `vmlinuz64` is a bzImage.
//!
//! The kernel looked at is `$B2P_KERNEL_DIR` when set, else the newest
//! `$B2P_CACHE/kernel/<key>/` built from the current b2p.config and patches
//! (its `key` file names their sha256). Skips when there is none.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The sha256 build.sh records for the patch set (sha256sum over the sorted
/// `./NAME.patch` list, hashed again).
fn patches_sha() -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -name '*.patch' | LC_ALL=C sort | xargs -r sha256sum | sha256sum")
        .current_dir(Path::new(ROOT).join("guest-image/kernel/patches"))
        .output()
        .expect("hash the patches");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The kernel output directory to check, or why there is none.
fn kernel_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("B2P_KERNEL_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return if d.join("config").is_file() {
            Ok(d)
        } else {
            Err(format!(
                "B2P_KERNEL_DIR={} holds no config of a built guest image kernel",
                d.display()
            ))
        };
    }
    let cache = std::env::var_os("B2P_CACHE")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/b2p")))
        .ok_or("neither B2P_CACHE nor HOME is set, so the guest image kernel cannot be found")?;
    let want_frag = format!(
        "fragment {}",
        sha256_of(&Path::new(ROOT).join("guest-image/kernel/b2p.config"))
    );
    let want_patches = format!("patches {}", patches_sha());
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(cache.join("kernel"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let key = std::fs::read_to_string(e.path().join("key")).unwrap_or_default();
        if !key.lines().any(|l| l == want_frag) || !key.lines().any(|l| l == want_patches) {
            continue;
        }
        if !e.path().join("config").is_file() {
            continue;
        }
        let t = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, e.path()));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        format!(
            "the guest image kernel is not built for the current b2p.config under {} \
             (run guest-image/kernel/build.sh)",
            cache.join("kernel").display()
        )
    })
}

/// Lines of `required` that `config` does not satisfy: `CONFIG_X=v` must be
/// a line of `config`; `# CONFIG_X is not set` must not be `=y` or `=m`.
fn unmet(required: &str, config: &str) -> Vec<String> {
    let lines: std::collections::HashSet<&str> = config.lines().collect();
    let mut out = Vec::new();
    for req in required.lines().map(str::trim) {
        if req.starts_with("CONFIG_") {
            if !lines.contains(req) {
                let name = req.split('=').next().unwrap_or(req);
                let got = config
                    .lines()
                    .find(|l| {
                        l.starts_with(&format!("{name}=")) || *l == format!("# {name} is not set")
                    })
                    .unwrap_or("absent");
                out.push(format!("{req} (got: {got})"));
            }
        } else if let Some(name) = req
            .strip_prefix("# ")
            .and_then(|r| r.strip_suffix(" is not set"))
        {
            for v in ["y", "m"] {
                if lines.contains(format!("{name}={v}").as_str()) {
                    out.push(format!("{req} (got: {name}={v})"));
                }
            }
        }
    }
    out
}

#[test]
fn unmet_names_missing_wrong_and_forbidden_options() {
    let required = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n# CONFIG_MODULES is not set\n# CONFIG_PCI is not set\n";
    let config = "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_MODULES=y\n";
    assert_eq!(
        unmet(required, config),
        [
            "CONFIG_B=y (got: CONFIG_B=m)",
            "CONFIG_C=y (got: # CONFIG_C is not set)",
            "# CONFIG_MODULES is not set (got: CONFIG_MODULES=y)",
        ]
    );
    assert!(unmet(required, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n").is_empty());
}

#[test]
fn built_kernel_config_has_every_required_option() {
    let test = "built_kernel_config_has_every_required_option";
    let dir = match kernel_dir() {
        Ok(d) => d,
        Err(reason) => return skip(test, &reason),
    };
    let required =
        std::fs::read_to_string(Path::new(ROOT).join("guest-image/kernel/required.list"))
            .expect("read guest-image/kernel/required.list");
    let n = required.lines().filter(|l| l.contains("CONFIG_")).count();
    assert!(n > 50, "required.list lists only {n} options");
    let config = std::fs::read_to_string(dir.join("config")).expect("read the built config");
    let bad = unmet(&required, &config);
    assert!(
        bad.is_empty(),
        "{}: {} of {n} required options unmet:\n  {}",
        dir.join("config").display(),
        bad.len(),
        bad.join("\n  ")
    );
    let version = std::fs::read_to_string(dir.join("version")).unwrap_or_default();
    assert!(
        version.starts_with("6.12."),
        "version file says {version:?}"
    );
    eprintln!(
        "{test}: {n} options present in {} ({})",
        dir.display(),
        version.trim()
    );
}

/// The PVH entry point from `vmlinux`'s Xen ELF note
/// (XEN_ELFNOTE_PHYS32_ENTRY = 18), with the PT_LOAD physical ranges.
fn pvh_entry(elf: &[u8]) -> Result<(u32, Vec<(u64, u64)>), String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return Err("not a 64-bit ELF".into());
    }
    let phoff = u64_at(0x20).ok_or("short header")? as usize;
    let phentsize = u16_at(0x36).ok_or("short header")? as usize;
    let phnum = u16_at(0x38).ok_or("short header")? as usize;
    let (mut entry, mut loads) = (None, Vec::new());
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = u32_at(ph).ok_or("program header past the end")?;
        let off = u64_at(ph + 8).ok_or("short program header")? as usize;
        let paddr = u64_at(ph + 0x18).ok_or("short program header")?;
        let filesz = u64_at(ph + 0x20).ok_or("short program header")? as usize;
        let memsz = u64_at(ph + 0x28).ok_or("short program header")?;
        if kind == 1 {
            loads.push((paddr, paddr + memsz));
        }
        if kind != 4 {
            continue;
        }
        let mut n = off;
        while n + 12 <= off + filesz {
            let namesz = u32_at(n).ok_or("short note")? as usize;
            let descsz = u32_at(n + 4).ok_or("short note")? as usize;
            let ty = u32_at(n + 8).ok_or("short note")?;
            let name = elf.get(n + 12..n + 12 + namesz).ok_or("short note")?;
            let desc = n + 12 + namesz.div_ceil(4) * 4;
            if name == b"Xen\0" && ty == 18 {
                entry = u32_at(desc);
            }
            n = desc + descsz.div_ceil(4) * 4;
        }
    }
    Ok((entry.ok_or("no Xen PHYS32_ENTRY note")?, loads))
}

#[test]
fn built_vmlinux_has_the_pvh_entry_and_vmlinuz64_is_a_bzimage() {
    let test = "built_vmlinux_has_the_pvh_entry_and_vmlinuz64_is_a_bzimage";
    let dir = match kernel_dir() {
        Ok(d) => d,
        Err(reason) => return skip(test, &reason),
    };
    let elf = std::fs::read(dir.join("vmlinux")).expect("read vmlinux");
    let (entry, loads) = pvh_entry(&elf).unwrap_or_else(|e| panic!("{test}: vmlinux: {e}"));
    assert!(
        loads
            .iter()
            .any(|&(s, e)| (s..e).contains(&u64::from(entry))),
        "PVH entry {entry:#x} is in no PT_LOAD segment {loads:x?}"
    );
    let bz = std::fs::read(dir.join("vmlinuz64")).expect("read vmlinuz64");
    assert_eq!(
        bz.get(0x202..0x206),
        Some(&b"HdrS"[..]),
        "vmlinuz64 is not a bzImage"
    );
    // xloadflags bit 0: XLF_KERNEL_64 (the 64-bit entry b2p-vmm uses).
    assert_eq!(
        bz.get(0x236).map(|f| f & 1),
        Some(1),
        "vmlinuz64 has no 64-bit entry"
    );
    assert!(
        bz.len() < elf.len(),
        "the bzImage ({}) should be smaller than the ELF ({})",
        bz.len(),
        elf.len()
    );
    eprintln!(
        "{test}: PVH entry {entry:#x}; vmlinux {} bytes, vmlinuz64 {} bytes",
        elf.len(),
        bz.len()
    );
}
