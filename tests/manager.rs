//! The manager CLI `b2p` (podman-machine's verbs) on real files and, where
//! /dev/kvm works, a real VM: the probe guest stands in for the guest image
//! (which cannot boot on this workplace's PVM KVM, DESIGN.md §8) so that
//! start, status, stop and the disk lock run for real. The guest-image side
//! of a `b2p create` disk (formatted, keys extracted) is checked under QEMU
//! in tests/guest_image.rs.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// A private machines directory (XDG_DATA_HOME) for one test.
struct Home {
    dir: TempDir,
}

/// `b2p create` makes each machine's key with ssh-keygen.
fn no_ssh_keygen(test: &str) -> bool {
    if which("ssh-keygen").is_none() {
        skip(test, "ssh-keygen not found (Debian package openssh-client)");
        return true;
    }
    false
}

impl Home {
    fn new(test: &str) -> Home {
        Home {
            dir: TempDir::new(test),
        }
    }

    fn b2p(&self, args: &[&str]) -> Outcome {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_b2p"));
        cmd.args(args).env("XDG_DATA_HOME", self.dir.path());
        run_with_deadline(cmd, LIMIT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.b2p(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "b2p {args:?} failed\n{}",
            out.describe()
        );
        out.stdout
    }

    /// Runs a command that must fail with one `b2p: error:` line holding `want`.
    fn fails(&self, args: &[&str], want: &str) {
        let out = self.b2p(args);
        assert!(!out.timed_out, "b2p {args:?} hung\n{}", out.describe());
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "b2p {args:?} should fail\n{}",
            out.describe()
        );
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "want one error line\n{}", out.describe());
        assert!(
            lines[0].starts_with("b2p: error: ") || lines[0].starts_with("error: "),
            "{}",
            out.describe()
        );
        assert!(
            lines[0].contains(want),
            "b2p {args:?}: the error should mention {want:?}\n{}",
            out.describe()
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    }

    fn machine_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("b2p/machines").join(name)
    }
}

fn tar_entries(disk: &Path) -> Vec<(String, Vec<u8>)> {
    let head = std::fs::read(disk).unwrap();
    let mut a = tar::Archive::new(&head[..4096]);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut body).unwrap();
            (name, body)
        })
        .collect()
}

#[test]
fn create_ls_inspect_env_rm() {
    if no_ssh_keygen("manager_create") {
        return;
    }
    let h = Home::new("manager_create");
    let kernel = write_file(&h.dir, "vmlinuz", b"not booted by this test");
    let k = kernel.display().to_string();
    let out = h.ok(&[
        "create",
        "dev",
        "--memory",
        "1024",
        "--cpus",
        "2",
        "--disk-size",
        "512",
        "--kernel",
        &k,
    ]);
    assert!(out.contains("Machine dev created"), "{out}");
    let dir = h.machine_dir("dev");

    // The data disk: sparse, 512 MiB, a format-me tar carrying the key.
    let disk = dir.join("disk.raw");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 512 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "the disk is not sparse");
    let entries = tar_entries(&disk);
    assert_eq!(entries[0].0, "boot2podman, please format-me");
    let public = std::fs::read(dir.join("id_ed25519.pub")).unwrap();
    assert!(public.starts_with(b"ssh-ed25519 "));
    let keys = entries
        .iter()
        .find(|(n, _)| n == ".ssh/authorized_keys")
        .expect("no .ssh/authorized_keys in the userdata tar");
    assert_eq!(keys.1, public);
    let mode = std::fs::metadata(dir.join("id_ed25519")).unwrap().mode();
    assert_eq!(mode & 0o077, 0, "the private key is readable by others");

    let ls = h.ok(&["ls"]);
    let row = ls.lines().find(|l| l.starts_with("dev ")).expect(&ls);
    assert!(row.contains("Stopped") && row.contains("1024MiB"), "{ls}");
    assert_eq!(h.ok(&["status", "dev"]).trim(), "Stopped");
    let inspect: serde_json::Value = serde_json::from_str(&h.ok(&["inspect", "dev"])).unwrap();
    assert_eq!(inspect["state"], "Stopped");
    assert_eq!(inspect["config"]["cpus"], 2);
    assert_eq!(inspect["config"]["kernel"], k);
    let env = h.ok(&["env", "dev"]);
    assert!(env.contains(&format!(
        "export CONTAINER_HOST=unix://{}/podman.sock",
        dir.display()
    )));
    assert!(env.contains(&format!(
        "export VARLINK_ADDRESS=unix:{}/io.podman",
        dir.display()
    )));

    // Mistakes: one line each, nothing changed.
    h.fails(&["create", "dev", "--kernel", &k], "already exists");
    h.fails(&["create", "../evil"], "invalid machine name");
    h.fails(
        &["create", "tiny", "--cpus", "0", "--kernel", &k],
        "--cpus 0",
    );
    h.fails(
        &[
            "create",
            "badip",
            "--tap",
            "t0",
            "--ip",
            "10.0.0.300/24",
            "--kernel",
            &k,
        ],
        "--ip",
    );
    h.fails(
        &[
            "create",
            "badgw",
            "--tap",
            "t0",
            "--ip",
            "10.0.0.2/24",
            "--gateway",
            "10.0.0.1 init=/bin/sh",
            "--kernel",
            &k,
        ],
        "--gateway",
    );
    assert!(!h.machine_dir("tiny").exists() && !h.machine_dir("badip").exists());
    assert!(!h.machine_dir("badgw").exists());
    h.fails(&["start", "nosuch"], "does not exist");
    h.fails(&["ip", "dev"], "no static address");
    h.fails(&["ssh", "dev"], "is not running");

    assert!(h.ok(&["rm", "dev"]).contains("removed"));
    assert!(!dir.exists());
    assert!(!h.ok(&["ls"]).contains("dev "));
}

#[test]
fn start_status_stop_with_the_probe_guest() {
    let test = "manager_start_stop";
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    if no_ssh_keygen(test) {
        return;
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let h = Home::new(test);
    let kernel = probe_kernel(&h.dir).display().to_string();
    h.ok(&[
        "create",
        "vm1",
        "--memory",
        "128",
        "--cpus",
        "2",
        "--disk-size",
        "64",
        "--kernel",
        &kernel,
        "--cmdline",
        "probe.hold_ms=120000",
    ]);
    let dir = h.machine_dir("vm1");
    // start waits for the guest's agent; the probe has none: after the
    // timeout it says so, and the VM is left running.
    let out = h.b2p(&["start", "vm1", "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stdout.contains("Machine vm1 started"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("agent did not answer within 2 s"),
        "{}",
        out.describe()
    );
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Running");
    let inspect: serde_json::Value = serde_json::from_str(&h.ok(&["inspect", "vm1"])).unwrap();
    let pid = inspect["pid"].as_u64().expect("no pid while running");
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    // The guest runs, with the machine's devices: its console, and the
    // host ends of vsock (hybrid socket, varlink and podman ports).
    let console = dir.join("console.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("probe: holding")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never got to its hold\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("probe: PASS"), "{text}");
    assert!(text.contains("probe: boot timer written"), "{text}");
    assert!(text.contains("lapics=2"), "{text}");
    for sock in ["vsock.sock", "io.podman", "podman.sock"] {
        let meta = std::fs::metadata(dir.join(sock)).unwrap();
        assert!(
            std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()),
            "{sock}"
        );
    }

    // A second start, and another VM on the same disk, are refused.
    h.fails(&["start", "vm1"], "already running");
    h.fails(&["rm", "vm1"], "is running");
    let disk = dir.join("disk.raw").display().to_string();
    let mut other = vmm_command(&vmm);
    other.args([
        "run",
        "--kernel",
        &kernel,
        "--disk",
        &disk,
        "--console",
        "none",
    ]);
    let o = run_with_deadline(other, LIMIT);
    assert!(
        o.status.code() != Some(0) && o.stderr.contains("in use"),
        "a second VM got the machine's disk\n{}",
        o.describe()
    );

    // The probe has no agent to shut it down: stop falls back to SIGTERM,
    // which the VM process turns into a clean stop.
    let out = h.ok(&["stop", "vm1", "--timeout", "1"]);
    assert!(out.contains("Machine vm1 stopped"), "{out}");
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Stopped");
    // Gone, or the pid reused by a process that is not our VM.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        !cmdline.windows(8).any(|w| w == b"__run-vm"),
        "the VM process {pid} is still there"
    );
    for f in ["pid", "vsock.sock", "io.podman", "podman.sock"] {
        assert!(!dir.join(f).exists(), "{f} left behind after stop");
    }
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    assert!(log.contains("VM ended: stopped"), "{log}");
    assert!(h.ok(&["stop", "vm1"]).contains("not running"));

    // Started again (not waiting for an agent), then removed with --force.
    assert!(h.ok(&["start", "vm1", "--no-wait"]).contains("started"));
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Running");
    h.ok(&["rm", "--force", "vm1"]);
    assert!(!dir.exists());
}

#[test]
fn start_reports_what_the_vm_refused() {
    let test = "manager_start_error";
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    if no_ssh_keygen(test) {
        return;
    }
    let h = Home::new(test);
    let junk = write_file(&h.dir, "junk", &random_bytes(8192));
    h.ok(&["create", "bad", "--kernel", &junk.display().to_string()]);
    h.fails(&["start", "bad"], "kernel");
    assert_eq!(h.ok(&["status", "bad"]).trim(), "Stopped");
    // Guest memory the host cannot give is also refused before any boot.
    let kernel = probe_kernel(&h.dir).display().to_string();
    h.fails(
        &[
            "create", "huge", "--memory", "99999999", "--kernel", &kernel,
        ],
        "--memory",
    );
}
