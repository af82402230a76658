//! Builds the probe guest: gcc compiles the freestanding C and assembly in
//! `guest/`, ld links it with `guest/probe.ld` into an ELF that is itself a
//! PVH kernel, and objcopy makes the bzImage from it (the setup sectors,
//! then the flattened protected-mode part). The disassembly is then checked
//! for instructions this workplace's KVM (PVM, DESIGN.md §8) cannot execute
//! in a guest.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &[
    "head.S",
    "main.c",
    "console.c",
    "lib.c",
    "cmdline.c",
    "bootparams.c",
    "pvh.c",
    "acpi.c",
    "cpu.c",
    "trap.c",
    "power.c",
    "virtio.c",
    "ioapic.c",
    "rng.c",
    "blk.c",
    "net.c",
    "vsock.c",
    "balloon.c",
    "fs.c",
    "smp.c",
    "flood.c",
];

const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-pic",
    "-O2",
    "-mcmodel=kernel",
    "-march=x86-64",
    "-mtune=generic",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns",
    "-fno-common",
    "-Wall",
    "-Wextra",
    "-std=gnu11",
];

/// Mnemonics (objdump AT&T syntax) that fail with KVM_EXIT_INTERNAL_ERROR
/// under this machine's PVM instruction emulator, or that need SSE/x87.
const FORBIDDEN: &[&str] = &[
    "%xmm",
    "%ymm",
    "%zmm",
    "%st",
    "%mm",
    "popcnt",
    "crc32",
    "xgetbv",
    "rdtscp",
    "mfence",
    "lfence",
    "sfence",
    "fld",
    "fst",
    "fwait",
    "clac",
    "stac",
    "cmpxchg16b",
    "xrstor",
    "xsave",
    "int3",
    "endbr64",
];

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("b2p-probe: cannot run {shown}: {e} (install gcc and binutils)")
    });
    if !out.status.success() {
        panic!(
            "b2p-probe: {shown} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning={line}");
    }
}

fn check_disassembly(elf: &Path) {
    let out = match Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(elf)
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ => panic!("b2p-probe: objdump -d failed (install binutils)"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bad = Vec::new();
    for line in text.lines() {
        // "ffffffff80200a10:\tmov    %rax,%rbx" -> the instruction part
        let Some((_, insn)) = line.split_once(":\t") else {
            continue;
        };
        let insn = insn.trim();
        let mnemonic = insn.split_whitespace().next().unwrap_or("");
        let hit = FORBIDDEN.iter().any(|f| {
            if f.starts_with('%') {
                insn.contains(f) && !(f == &"%st" && insn.contains("%stack"))
            } else {
                mnemonic.starts_with(f)
            }
        }) || (mnemonic == "int" && !insn.contains("int3"));
        if hit {
            bad.push(line.to_string());
        }
    }
    if !bad.is_empty() {
        panic!(
            "b2p-probe: the guest contains instructions PVM cannot run (DESIGN.md §8):\n{}",
            bad.join("\n")
        );
    }
}

/// The ELF must carry the PVH entry note (type 18; older readelf names it
/// PHYS32_ENTRY, newer ones print the number).
fn check_pvh_note(elf: &Path) {
    let out = match Command::new("readelf").args(["-n", "-l"]).arg(elf).output() {
        Ok(o) if o.status.success() => o,
        _ => panic!("b2p-probe: readelf -n failed (install binutils)"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NOTE")
            && text.contains("Xen")
            && (text.contains("PHYS32_ENTRY") || text.contains("(0x00000012)")),
        "b2p-probe: no XEN_ELFNOTE_PHYS32_ENTRY note in probe.elf:\n{text}"
    );
}

fn check_header(image: &[u8]) {
    assert!(image.len() > 0x1200, "b2p-probe: bzImage too small");
    assert_eq!(&image[0x202..0x206], b"HdrS", "b2p-probe: no HdrS at 0x202");
    assert_eq!(
        &image[0x1fe..0x200],
        &[0x55, 0xaa],
        "b2p-probe: no boot flag"
    );
    let setup_sects = image[0x1f1] as usize;
    let xloadflags = u16::from_le_bytes([image[0x236], image[0x237]]);
    assert!(xloadflags & 1 != 0, "b2p-probe: XLF_KERNEL_64 not set");
    let pm = (setup_sects + 1) * 512;
    let syssize = u32::from_le_bytes(image[0x1f4..0x1f8].try_into().unwrap()) as usize;
    assert!(
        syssize * 16 >= image.len() - pm,
        "b2p-probe: syssize too small"
    );
    // The 64-bit entry's first instruction: outb %al, $0x80 (e6 80).
    assert_eq!(
        &image[pm + 0x200..pm + 0x202],
        &[0xe6, 0x80],
        "b2p-probe: entry is not out 0x80"
    );
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest.join("guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cc = std::env::var("B2P_PROBE_CC").unwrap_or_else(|_| "gcc".into());

    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-env-changed=B2P_PROBE_CC");

    let mut objs = Vec::new();
    for src in SOURCES {
        let obj = out.join(format!("{src}.o"));
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-c")
            .arg(guest.join(src))
            .arg("-o")
            .arg(&obj));
        objs.push(obj);
    }
    let elf = out.join("probe.elf");
    run(Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "-z",
            "max-page-size=4096",
            "-z",
            "noexecstack",
        ])
        .args(["--build-id=none", "--no-warn-rwx-segments", "-T"])
        .arg(guest.join("probe.ld"))
        .arg("-o")
        .arg(&elf)
        .args(&objs));
    check_disassembly(&elf);
    check_pvh_note(&elf);
    // bzImage = the (non-loadable) setup sectors + the loadable segments
    // flattened from the lowest physical address on.
    let setup = out.join("probe.setup.bin");
    let pm = out.join("probe.pm.bin");
    run(Command::new("objcopy")
        .arg("--dump-section")
        .arg(format!(".setup={}", setup.display()))
        .arg(&elf)
        .arg(out.join("probe.elf.tmp")));
    let _ = std::fs::remove_file(out.join("probe.elf.tmp"));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&pm));
    let mut bytes = std::fs::read(&setup).expect("read probe.setup.bin");
    bytes.extend(std::fs::read(&pm).expect("read probe.pm.bin"));
    let image = out.join("probe.bzImage");
    std::fs::write(&image, &bytes).expect("write probe.bzImage");
    check_header(&bytes);
}
