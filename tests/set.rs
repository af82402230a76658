//! `b2p set NAME [--disk-size MiB] [--memory MiB] [--cpus N]` on real
//! machine directories: a stopped machine's disk grows (sparse, its
//! userdata head intact) and its config changes; a running machine (its pid
//! file names a live VM process), a disk another VM holds locked (a paused
//! QEMU with the disk attached), a smaller disk, memory below the
//! monitor's minimum, 0 vCPUs and no option at all each fail with one
//! error line, a non-zero status, and the machine exactly as it was. What
//! the guest makes of a grown disk is tests/disk_care.rs (QEMU TCG).

mod common;

use common::home::*;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

impl Home {
    /// Makes machine `name` (no network, a stand-in kernel: nothing boots).
    fn create(&self, name: &str, disk_mib: u64) {
        let k = self.dir.join("vmlinuz");
        std::fs::write(&k, b"not booted here").unwrap();
        self.ok(&[
            "create",
            name,
            "--network",
            "none",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "512",
            "--cpus",
            "1",
            "--disk-size",
            &disk_mib.to_string(),
        ]);
    }

    /// What must not change when a set is refused: config.json's bytes,
    /// disk.raw's length and its first 4 KiB (the userdata tar).
    fn snapshot(&self, name: &str) -> (Vec<u8>, u64, Vec<u8>) {
        let d = self.machine_dir(name);
        let config = std::fs::read(d.join("config.json")).unwrap();
        let disk = d.join("disk.raw");
        let len = std::fs::metadata(&disk).unwrap().len();
        let head = std::fs::read(&disk).unwrap()[..4096].to_vec();
        (config, len, head)
    }

    fn config(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.machine_dir(name).join("config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

#[test]
fn set_grows_the_disk_and_changes_memory_and_cpus() {
    if no_ssh_keygen("set_grows") {
        return;
    }
    let h = Home::new("set-grow");
    h.create("m", 64);
    let disk = h.machine_dir("m").join("disk.raw");
    let (_, len, head) = h.snapshot("m");
    assert_eq!(len, 64 << 20);
    let blocks = std::fs::metadata(&disk).unwrap().blocks();

    let out = h.ok(&["set", "m", "--disk-size", "4096"]);
    assert!(out.contains("disk 64 -> 4096 MiB"), "{out}");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 4096 << 20);
    // Sparse: growing allocates nothing.
    assert_eq!(meta.blocks(), blocks, "the grown tail took space");
    assert_eq!(h.snapshot("m").2, head, "the userdata head changed");
    assert_eq!(h.config("m")["disk_size_mib"], 4096);
    // ls shows the new size.
    assert!(h.ok(&["ls"]).contains("4096MiB"));

    let out = h.ok(&["set", "m", "--memory", "1024", "--cpus", "3"]);
    assert!(out.contains("memory 512 -> 1024 MiB"), "{out}");
    assert!(out.contains("cpus 1 -> 3"), "{out}");
    let c = h.config("m");
    assert_eq!(
        (c["memory_mib"].as_u64(), c["cpus"].as_u64()),
        (Some(1024), Some(3))
    );
    assert_eq!(c["disk_size_mib"], 4096);
    // The same size again changes nothing.
    assert!(h
        .ok(&["set", "m", "--disk-size", "4096"])
        .contains("nothing changed"));
}

#[test]
fn bad_sets_fail_with_one_line_and_change_nothing() {
    if no_ssh_keygen("set_bad") {
        return;
    }
    let h = Home::new("set-bad");
    h.create("m", 128);
    let before = h.snapshot("m");
    let cases: [(&[&str], &str); 7] = [
        (&["set", "m", "--disk-size", "64"], "a disk can only grow"),
        (
            &["set", "m", "--disk-size", "127"],
            "smaller than the disk's 128 MiB",
        ),
        (
            &["set", "m", "--memory", "16"],
            "--memory 16 MiB is too small (at least",
        ),
        (&["set", "m", "--memory", "0"], "too small"),
        (&["set", "m", "--cpus", "0"], "--cpus 0 is out of range"),
        (&["set", "m"], "nothing to set"),
        (
            &["set", "m", "--disk-size", "4096", "--memory", "8"],
            "too small",
        ),
    ];
    for (args, want) in cases {
        h.fails(args, want);
        assert!(
            h.snapshot("m") == before,
            "b2p {args:?} changed the machine"
        );
    }
    // More memory than the host has is refused as create refuses it.
    h.fails(&["set", "m", "--memory", "99999999"], "--memory");
    h.fails(&["set", "nope", "--cpus", "2"], "does not exist");
    assert!(h.snapshot("m") == before);
}

/// A stand-in VM process: its command line reads `… __run-vm NAME` and
/// the pid file names it, so the machine reads Running (as in
/// src/lifecycle.rs's tests).
fn fake_vm_process(dir: &Path, name: &str) -> Child {
    let child = Command::new("sh")
        .args(["-c", "sleep 60; :", "__run-vm", name])
        .spawn()
        .unwrap();
    let stat = loop {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let cmd = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
        if cmd.windows(8).any(|w| w == b"__run-vm") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    std::fs::write(dir.join("pid"), format!("{} {start}\n", child.id())).unwrap();
    child
}

#[test]
fn a_running_machine_is_not_set() {
    if no_ssh_keygen("set_running") {
        return;
    }
    let h = Home::new("set-running");
    h.create("m", 64);
    let before = h.snapshot("m");
    let mut vm = fake_vm_process(&h.machine_dir("m"), "m");
    assert_eq!(h.ok(&["status", "m"]).trim(), "Running");
    for args in [
        &["set", "m", "--disk-size", "256"][..],
        &["set", "m", "--memory", "1024"][..],
        &["set", "m", "--cpus", "2"][..],
    ] {
        h.fails(args, "is running (pid");
        assert!(
            h.snapshot("m") == before,
            "b2p {args:?} changed the machine"
        );
    }
    let _ = vm.kill();
    let _ = vm.wait();
    // Once it is gone, the same set works.
    h.ok(&["set", "m", "--disk-size", "256"]);
    assert_eq!(h.snapshot("m").1, 256 << 20);
}

#[test]
fn a_disk_another_vm_holds_is_not_grown() {
    if no_ssh_keygen("set_locked") {
        return;
    }
    if which("qemu-system-x86_64").is_none() {
        skip(
            "set_locked",
            "qemu-system-x86_64 not found (Debian package qemu-system-x86)",
        );
        return;
    }
    let h = Home::new("set-locked");
    h.create("m", 64);
    let before = h.snapshot("m");
    let disk = h.machine_dir("m").join("disk.raw");
    // A paused QEMU with the disk attached holds its write lock, as a VM
    // started outside b2p (or a b2p VM whose pid file is gone) would.
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-S", "-drive"])
        .arg(format!("if=none,id=d0,format=raw,file={}", disk.display()))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-system-x86_64");
    // Until QEMU has opened the disk, a set would go through.
    let begin = Instant::now();
    loop {
        let want = std::fs::canonicalize(&disk).unwrap();
        let held = std::fs::read_dir(format!("/proc/{}/fd", qemu.id()))
            .map(|fds| {
                fds.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .any(|p| p == want)
            })
            .unwrap_or(false);
        if held {
            break;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(30),
            "QEMU never opened the disk"
        );
        assert!(qemu.try_wait().unwrap().is_none(), "QEMU exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    h.fails(
        &["set", "m", "--disk-size", "256"],
        "is in use by a running VM",
    );
    assert!(h.snapshot("m") == before, "the locked disk was changed");
    let _ = qemu.kill();
    let _ = qemu.wait();
    h.ok(&["set", "m", "--disk-size", "256"]);
    assert_eq!(h.snapshot("m").1, 256 << 20);
}
