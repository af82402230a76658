//! The per-thread seccomp filters on real VMs (the probe guest on KVM):
//! every thread of a running `b2p-vmm` and of the manager's VM process
//! (`b2p __run-vm`) shows `Seccomp: 2` and `NoNewPrivs: 1`, `--no-seccomp` turns them off, and a
//! forbidden system call from a vCPU (or any other filtered thread) ends the
//! process with one line naming it, before the guest ran.
//!
//! The forbidden call comes from the debug-build-only hook
//! `B2P_SECCOMP_SELFTEST=<role>` (vmm/src/seccomp.rs; a release build has no
//! such code, and these tests skip there).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Each thread of `pid`: (name, the `Seccomp:` field of its status, and
/// `NoNewPrivs:` after a slash, e.g. "2/1").
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            format!("{}/{}", field("Seccomp:"), field("NoNewPrivs:")),
        ));
    }
    out.sort();
    out
}

/// Waits until `path` holds `needle` (or the child ends, or 30 s pass).
fn wait_for(path: &Path, needle: &str, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

struct Setup {
    vmm: PathBuf,
    dir: TempDir,
    kernel: PathBuf,
}

fn setup(test: &str) -> Option<Setup> {
    if let Err(reason) = kvm_usable() {
        skip(test, &reason);
        return None;
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let dir = TempDir::new(test);
    let kernel = probe_kernel(&dir);
    Some(Setup { vmm, dir, kernel })
}

/// `b2p-vmm run` of the probe with two vCPUs, a disk (its worker thread),
/// vsock and rng, held `hold_ms` after its checks.
fn probe_vm(s: &Setup, hold_ms: u64, extra: &[&str]) -> Command {
    let disk = s.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = vmm_command(&s.vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&s.kernel)
        .args(["--memory", "64", "--cpus", "2", "--virtio-rng"])
        .arg("--cmdline")
        .arg(probe_cmdline(
            64,
            2,
            None,
            &format!("probe.hold_ms={hold_ms}"),
        ))
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", s.dir.join("v.sock").display()))
        .arg("--console")
        .arg(format!("file:{}", s.dir.join("console.log").display()))
        .args(extra);
    cmd
}

/// Boots the probe, reads every thread's status while it holds, then stops
/// it with SIGTERM; the thread list.
fn threads_of_a_running_vm(s: &Setup, extra: &[&str]) -> Vec<(String, String)> {
    let mut child = probe_vm(s, 60_000, extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let held = wait_for(&s.dir.join("console.log"), "probe: holding", &mut child);
    let list = threads(child.id());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let console = std::fs::read_to_string(s.dir.join("console.log")).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        held,
        "the probe never held\n--- console ---\n{console}\n--- stderr ---\n{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "SIGTERM should end the VM cleanly\n{stderr}"
    );
    list
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    let test = "every_thread_of_a_running_vm_is_filtered";
    let Some(s) = setup(test) else { return };
    let list = threads_of_a_running_vm(&s, &[]);
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "b2p-vmm",
        "b2p-vcpu0",
        "b2p-vcpu1",
        "b2p-events",
        "b2p-signals",
    ] {
        assert!(names.contains(&want), "no {want} thread in {list:?}");
    }
    assert!(
        names.iter().any(|n| n.starts_with("b2p-blk")),
        "no disk worker thread in {list:?}"
    );
    for (name, seccomp) in &list {
        assert_eq!(seccomp, "2/1", "thread {name} is not filtered: {list:?}");
    }
}

#[test]
fn no_seccomp_runs_unfiltered() {
    let test = "no_seccomp_runs_unfiltered";
    let Some(s) = setup(test) else { return };
    let list = threads_of_a_running_vm(&s, &["--no-seccomp"]);
    assert!(list.len() >= 5, "{list:?}");
    for (name, seccomp) in &list {
        assert_eq!(seccomp, "0/0", "thread {name} is filtered: {list:?}");
    }
}

/// A forbidden system call (getppid) right after a thread's filter went on:
/// the process ends with status 159 and one line naming the thread and the
/// call.
#[test]
fn a_forbidden_syscall_ends_the_process() {
    let test = "a_forbidden_syscall_ends_the_process";
    if !cfg!(debug_assertions) {
        return skip(test, "B2P_SECCOMP_SELFTEST exists only in debug builds");
    }
    let Some(s) = setup(test) else { return };
    for role in ["vcpu", "event-loop", "main", "blk-worker"] {
        let mut cmd = probe_vm(&s, 0, &[]);
        cmd.env("B2P_SECCOMP_SELFTEST", role);
        let out = run_with_deadline(cmd, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(159), "{role}: {}", out.describe());
        let lines: Vec<&str> = out.stderr.lines().collect();
        let want = format!(
            "b2p-vmm: error: seccomp: the {role} thread made a forbidden system call (number {}); ending the process",
            libc::SYS_getppid
        );
        assert_eq!(lines, [want.as_str()], "{role}: {}", out.describe());
        // The vCPUs pass their gate only once their own filter and the
        // main thread's are in place. (The event loop and the disk worker
        // put theirs on first thing, before they serve the guest, but the
        // guest may already be running by then.)
        if role == "vcpu" || role == "main" {
            let console = std::fs::read_to_string(s.dir.join("console.log")).unwrap_or_default();
            assert!(
                !console.contains("probe:"),
                "{role}: the guest ran before the filters were complete:\n{console}"
            );
        }
    }
    // The same run without filters: the hook's call is harmless, the guest
    // runs and powers off.
    let mut cmd = probe_vm(&s, 0, &["--no-seccomp"]);
    cmd.env("B2P_SECCOMP_SELFTEST", "vcpu");
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let console = std::fs::read_to_string(s.dir.join("console.log")).unwrap_or_default();
    assert!(console.contains("probe: PASS"), "{console}");
}

/// `b2p start` runs the VM in `b2p __run-vm NAME`: every thread of that
/// process is filtered too.
#[test]
fn the_managers_vm_process_is_filtered() {
    let test = "the_managers_vm_process_is_filtered";
    let Some(s) = setup(test) else { return };
    if which("ssh-keygen").is_none() {
        return skip(test, "ssh-keygen not found (Debian package openssh-client)");
    }
    let b2p = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_b2p"));
        cmd.args(args).env("XDG_DATA_HOME", s.dir.path());
        let out = run_with_deadline(cmd, Duration::from_secs(60));
        assert_eq!(
            out.status.code(),
            Some(0),
            "b2p {args:?}\n{}",
            out.describe()
        );
        out.stdout
    };
    let kernel = s.kernel.display().to_string();
    b2p(&[
        "create",
        "sc",
        "--memory",
        "64",
        "--cpus",
        "2",
        "--disk-size",
        "64",
        "--kernel",
        &kernel,
        "--cmdline",
        "probe.hold_ms=60000",
    ]);
    b2p(&["start", "sc", "--no-wait"]);
    let dir = s.dir.path().join("b2p/machines/sc");
    let pid_file = std::fs::read_to_string(dir.join("pid")).unwrap();
    let pid: u32 = pid_file
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("pid file {pid_file:?}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(dir.join("console.log"))
        .unwrap_or_default()
        .contains("probe: holding")
    {
        assert!(Instant::now() < deadline, "the guest never got to its hold");
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = threads(pid);
    b2p(&["stop", "sc"]);
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["b2p-vcpu0", "b2p-vcpu1", "b2p-events", "b2p-signals"] {
        assert!(names.contains(&want), "no {want} thread in {list:?}");
    }
    for (name, seccomp) in &list {
        assert_eq!(seccomp, "2/1", "thread {name} is not filtered: {list:?}");
    }
    let vmm_log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    assert!(!vmm_log.contains("seccomp"), "{vmm_log}");
}
