//! Boots the probe guest (tests/probe) under the real /dev/kvm through the
//! `b2p-vmm run` CLI, the same bzImage path Linux takes, and asserts what
//! the guest found from inside: 64-bit entry with boot_params, the E820 map
//! against --memory, the command line, the initrd bytes, the ACPI tables
//! (RSDP/XSDT/FACP/APIC/DSDT with checksums, one LAPIC per vCPU), every AP
//! started with INIT-SIPI-SIPI, then the boot-timer write and an ACPI S5
//! poweroff that ends the monitor with 0 (APs still halted). The probe's
//! ELF takes the PVH path (hvm_start_info) through the same checks.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// Everything a boot test needs, or the reason to skip.
fn setup(test: &str) -> Option<std::path::PathBuf> {
    if let Err(reason) = kvm_usable() {
        skip(test, &reason);
        return None;
    }
    match vmm_binary() {
        Ok(p) => Some(p),
        Err(e) => panic!("{test}: no b2p-vmm binary: {e}"),
    }
}

fn assert_line(console: &str, needle: &str, out: &Outcome) {
    assert!(
        console.lines().any(|l| l.contains(needle)),
        "probe output lacks {needle:?}\n--- console ---\n{console}\n{}",
        out.describe()
    );
}

/// Which of the probe's two images, and so which entry, a boot takes.
#[derive(Clone, Copy, PartialEq)]
enum Entry {
    /// The bzImage: Linux's 64-bit boot protocol, boot_params in rsi.
    BzImage,
    /// The ELF with its Xen PHYS32_ENTRY note: PVH, hvm_start_info in ebx.
    Pvh,
}

/// Boots the probe with `cpus` vCPUs and `mem` MiB and a random initrd,
/// console to a file; checks every report line.
fn boot_and_check(test: &str, cpus: u32, mem: u64) {
    boot_entry_and_check(test, Entry::BzImage, cpus, mem)
}

fn boot_entry_and_check(test: &str, entry: Entry, cpus: u32, mem: u64) {
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let kernel = match entry {
        Entry::BzImage => probe_kernel(&dir),
        Entry::Pvh => {
            let elf = dir.join("probe.elf");
            std::fs::copy(b2p_probe::ELF, &elf).unwrap();
            elf
        }
    };
    // Not a multiple of 8 or of a page: the checksum covers a padded tail.
    let initrd_data = random_bytes(64 * 1024 + 13);
    let initrd = write_file(&dir, "initrd.img", &initrd_data);
    let log = dir.join("console.log");
    let cmdline = probe_cmdline(mem, cpus, Some(&initrd_data), "");

    let mut cmd = vmm_command(&vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline])
        .args(["--memory", &mem.to_string(), "--cpus", &cpus.to_string()])
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .arg("--boot-timer")
        .env("B2P_TIMINGS", "1");
    let out = run_with_deadline(cmd, LIMIT);
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let all = format!("{console}{}{}", out.stdout, out.stderr);
    assert!(!out.timed_out, "timed out\n{console}\n{}", out.describe());
    assert!(!all.contains("panicked"), "{}", out.describe());
    assert_eq!(
        out.status.code(),
        Some(0),
        "b2p-vmm did not exit 0\n--- console ---\n{console}\n{}",
        out.describe()
    );

    let fails: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("probe: FAIL"))
        .collect();
    assert!(
        fails.is_empty(),
        "probe reported failures: {fails:#?}\n--- console ---\n{console}"
    );
    match entry {
        Entry::BzImage => {
            assert_line(&console, "probe: entry64 rsi=0x", &out);
            assert_line(&console, "probe: setup_header magic=HdrS", &out);
        }
        Entry::Pvh => {
            assert_line(&console, "probe: pvh entry ebx=0x", &out);
            // The initrd travels as the one module of hvm_start_info.
            assert_line(&console, "probe: hvm_start_info version=1", &out);
            assert_line(&console, "nr_modules=1", &out);
            assert!(
                !console.contains("probe: entry64"),
                "the ELF took the 64-bit entry\n{console}"
            );
        }
    }
    // b2p-vmm --boot-timer appends b2p.boot_timer=1.
    assert_line(&console, &format!("probe: cmdline \"{cmdline}"), &out);
    assert_line(&console, " b2p.boot_timer=1\"", &out);
    let kib = mem * 1024;
    assert_line(&console, &format!("expected={kib} KiB"), &out);
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("probe: e820 ram=") && l.ends_with(" ok")),
        "no E820 ok line\n{console}"
    );
    if mem > 3072 {
        assert_line(&console, "probe: e820 0x0000000100000000-", &out);
    }
    assert_line(&console, "probe: memtouch ok", &out);
    assert_line(
        &console,
        &format!(
            "probe: initrd sum={:#018x}",
            b2p_probe::initrd_sum(&initrd_data)
        ),
        &out,
    );
    assert_line(&console, "probe: initrd ok", &out);
    for sig in ["RSDP", "XSDT", "FACP", "APIC", "DSDT"] {
        assert!(
            console
                .lines()
                .any(|l| l.starts_with(&format!("probe: acpi {sig} 0x"))
                    && l.ends_with("checksum ok")),
            "no checked {sig} table\n{console}"
        );
    }
    assert_line(&console, "probe: acpi FACP hw_reduced=1", &out);
    assert_line(&console, &format!("lapics={cpus} ioapics=1"), &out);
    assert_line(&console, "probe: acpi DSDT s5=5", &out);
    assert_line(&console, "hypervisor=1", &out);
    if cpus > 1 {
        // Every MADT LAPIC is a vCPU that INIT-SIPI-SIPI brings to long mode.
        let aps = cpus - 1;
        assert_line(
            &console,
            &format!("probe: smp started {aps} of {aps} APs"),
            &out,
        );
    }
    assert_line(&console, "probe: PASS", &out);
    assert_line(&console, "probe: boot timer written", &out);
    assert_line(&console, "probe: poweroff via ACPI S5", &out);
    assert!(
        !console.contains("probe: reset via i8042"),
        "S5 did not stop the VM\n{console}"
    );

    let first = timing(&out.stderr, "first_exit_us");
    let timer = timing(&out.stderr, "boot_timer_us");
    assert!(
        first.is_some(),
        "no first_exit_us timing\n{}",
        out.describe()
    );
    assert!(
        timer.is_some(),
        "no boot_timer_us timing\n{}",
        out.describe()
    );
    assert!(
        first <= timer,
        "first exit after the boot timer\n{}",
        out.describe()
    );
    eprintln!(
        "{test}: first_exit_us={} boot_timer_us={} wall={:?}",
        first.unwrap_or(0),
        timer.unwrap_or(0),
        out.wall
    );
}

#[test]
fn probe_1cpu_64mib() {
    boot_and_check("probe_1cpu_64mib", 1, 64);
}

#[test]
fn probe_4cpu_64mib() {
    boot_and_check("probe_4cpu_64mib", 4, 64);
}

#[test]
fn probe_1cpu_512mib() {
    boot_and_check("probe_1cpu_512mib", 1, 512);
}

#[test]
fn probe_4cpu_512mib() {
    boot_and_check("probe_4cpu_512mib", 4, 512);
}

#[test]
fn probe_1cpu_4096mib() {
    boot_and_check("probe_1cpu_4096mib", 1, 4096);
}

#[test]
fn probe_4cpu_4096mib() {
    boot_and_check("probe_4cpu_4096mib", 4, 4096);
}

/// The ELF vmlinux path: a PVH note makes b2p-vmm take the 32-bit PVH
/// entry with hvm_start_info (memory map, initrd module, RSDP).
#[test]
fn probe_pvh_elf_1cpu_64mib() {
    boot_entry_and_check("probe_pvh_elf_1cpu_64mib", Entry::Pvh, 1, 64);
}

#[test]
fn probe_pvh_elf_4cpu_4096mib() {
    boot_entry_and_check("probe_pvh_elf_4cpu_4096mib", Entry::Pvh, 4, 4096);
}

/// --console stdio: the guest's serial output is the monitor's stdout.
#[test]
fn probe_console_stdio() {
    let test = "probe_console_stdio";
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let kernel = probe_kernel(&dir);
    let data = random_bytes(8192);
    let initrd = write_file(&dir, "initrd.img", &data);
    let cmdline = probe_cmdline(128, 2, Some(&data), "");
    let mut cmd = vmm_command(&vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline, "--memory", "128", "--cpus", "2"])
        .args(["--console", "stdio"]);
    let out = run_with_deadline(cmd, LIMIT);
    assert!(!out.timed_out, "{}", out.describe());
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(out.stdout.contains("probe: PASS"), "{}", out.describe());
    assert!(!out.stdout.contains("probe: FAIL"), "{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

/// --console none: nothing on stdout, and still a clean poweroff.
#[test]
fn probe_console_none_powers_off() {
    let test = "probe_console_none_powers_off";
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let kernel = probe_kernel(&dir);
    let data = random_bytes(4096);
    let initrd = write_file(&dir, "initrd.img", &data);
    let cmdline = probe_cmdline(64, 1, Some(&data), "");
    let mut cmd = vmm_command(&vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline, "--memory", "64", "--console", "none"]);
    let out = run_with_deadline(cmd, LIMIT);
    assert!(!out.timed_out, "{}", out.describe());
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(!out.stdout.contains("probe:"), "{}", out.describe());
}

/// No --kernel: `b2p-vmm run` boots the guest image under `$B2P_CACHE/image`
/// (vmlinuz64 + boot2podman.lz4 when built, else boot2podman.gz). The probe
/// stands in for vmlinuz64 and checks which initrd it was given.
#[test]
fn default_image_prefers_lz4_initrd() {
    let test = "default_image_prefers_lz4_initrd";
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let image = dir.join("image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::copy(b2p_probe::BZIMAGE, image.join("vmlinuz64")).unwrap();
    let gz = random_bytes(4096 + 5);
    let lz4 = random_bytes(8192 + 3);
    std::fs::write(image.join("boot2podman.gz"), &gz).unwrap();
    let boot = |data: &[u8]| {
        let mut cmd = vmm_command(&vmm);
        cmd.arg("run")
            .args(["--cmdline", &probe_cmdline(64, 1, Some(data), "")])
            .args(["--memory", "64", "--console", "stdio"])
            .env("B2P_CACHE", dir.join(""));
        run_with_deadline(cmd, LIMIT)
    };
    // Only the gzip image: it is the initrd.
    let out = boot(&gz);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert_line(&out.stdout, "probe: initrd ok", &out);
    // Both: the lz4 one wins.
    std::fs::write(image.join("boot2podman.lz4"), &lz4).unwrap();
    let out = boot(&lz4);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert_line(&out.stdout, "probe: initrd ok", &out);
    assert!(!out.stdout.contains("probe: FAIL"), "{}", out.describe());
}
