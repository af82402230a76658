//! The guest clock after a host suspend (issue 14, must-show 1), under QEMU
//! TCG with the guest image: the disk of a machine `b2p create` made, vsock
//! through vhost-device-vsock as b2p's VM process reaches the agent. QEMU's
//! monitor `stop` for 30 s stands in for the host's sleep: under TCG the
//! guest's clock is QEMU's virtual clock, which stops with the VM, so the
//! guest falls 30 s behind. The test then does what the VM process's
//! resume detector does on a jump of CLOCK_BOOTTIME − CLOCK_MONOTONIC
//! (src/clock.rs; its detector is unit-tested on a fake clock pair there):
//! `b2p __set-guest-time` sends the host's CLOCK_REALTIME to
//! io.b2p.Machine.SetTime. The guest clock is read over ssh (`date
//! +%s.%N`, ten samples stamped with the host's clock on arrival).
//!
//! On this machine's real KVM, with the probe guest as a machine's kernel:
//! the VM process of `b2p start` runs the thread `b2p-clock` under a seccomp
//! filter, and it lives through its retries (the probe has no agent)
//! without a forbidden system call.

#![allow(dead_code)]

#[path = "guest_image/mod.rs"]
mod support;
#[path = "guest_image/vsock.rs"]
mod vsock;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::*;
use vsock::{ssh_rig, VsockGuest};

fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The next QMP reply (`return` or `error`) or greeting; events skipped.
fn qmp_reply(r: &mut BufReader<UnixStream>) -> Result<serde_json::Value, String> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)
            .map_err(|e| format!("qmp read: {e}"))?
            == 0
        {
            return Err("qmp closed".into());
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("qmp {line:?}: {e}"))?;
        if let Some(err) = v.get("error") {
            return Err(err.to_string());
        }
        if v.get("return").is_some() || v.get("QMP").is_some() {
            return Ok(v);
        }
    }
}

/// One QMP command on a fresh connection (after the greeting and
/// qmp_capabilities); its reply.
fn qmp(sock: &Path, command: &str) -> Result<serde_json::Value, String> {
    let mut w = UnixStream::connect(sock).map_err(|e| format!("qmp connect: {e}"))?;
    w.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut r = BufReader::new(w.try_clone().map_err(|e| e.to_string())?);
    qmp_reply(&mut r)?;
    writeln!(w, "{{\"execute\":\"qmp_capabilities\"}}").map_err(|e| e.to_string())?;
    qmp_reply(&mut r)?;
    writeln!(w, "{{\"execute\":\"{command}\"}}").map_err(|e| e.to_string())?;
    qmp_reply(&mut r)
}

/// The guest clock minus the host's, in seconds: ten `date +%s.%N` lines
/// over ssh, each stamped with the host clock when it arrives. Transit
/// only makes the guest look further behind, so the largest difference is
/// the best estimate; returns (largest, smallest).
fn guest_offset(g: &VsockGuest, b2p: &Path, key: &Path) -> Result<(f64, f64), String> {
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do date +%s.%N; sleep 0.3; done";
    let mut child = g
        .ssh_command(b2p, key, "tc", script, 300, 120)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ssh: {e}"))?;
    let out = child.stdout.take().unwrap();
    let mut diffs = Vec::new();
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let host = host_now();
        if let Ok(guest) = line.trim().parse::<f64>() {
            diffs.push(guest - host);
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if diffs.len() < 5 {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(format!(
            "ssh gave {} samples ({status}): {err}",
            diffs.len()
        ));
    }
    let max = diffs.iter().cloned().fold(f64::MIN, f64::max);
    let min = diffs.iter().cloned().fold(f64::MAX, f64::min);
    Ok((max, min))
}

/// `b2p __set-guest-time UDS`: what the VM process's clock thread calls.
fn set_guest_time(b2p: &Path, g: &VsockGuest) -> String {
    let out = Command::new(b2p)
        .arg("__set-guest-time")
        .arg(g.uds())
        .output()
        .expect("running b2p __set-guest-time");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "b2p __set-guest-time: {text}");
    text.trim().to_string()
}

#[test]
fn the_guest_clock_is_the_hosts_again_after_a_30_s_stop_under_qemu_tcg() {
    let Some((kernel, initrd, vhost)) = ssh_rig("clock") else {
        return;
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-clock");
    let b2p = Path::new(env!("CARGO_BIN_EXE_b2p"));
    let args = ["--network", "none", "--disk-size", "512"];
    let machine = create_machine(&dir, "clk", &args, &kernel);
    let key = machine.join("id_ed25519");
    let qmp_sock = dir.join("qmp.sock");
    let mut g = VsockGuest::boot_with(
        &vhost,
        &kernel,
        &initrd,
        &machine.join("disk.raw"),
        "b2p.ip=off",
        &[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_sock.display()),
        ],
    );
    g.wait_agent("org.varlink.service.GetInfo", Duration::from_secs(60));

    // At boot: the VM process sets the guest clock once the agent answers.
    let boot = set_guest_time(b2p, &g);
    let (first, _) = guest_offset(&g, b2p, &key).unwrap_or_else(|e| panic!("{e}\n{}", g.console()));
    assert!(
        first.abs() < 1.0,
        "after the boot-time SetTime the guest is {first:+.3} s off ({boot})"
    );

    // The "host sleep": the VM stops for 30 s.
    qmp(&qmp_sock, "stop").unwrap_or_else(|e| panic!("qmp stop: {e}"));
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    qmp(&qmp_sock, "cont").unwrap_or_else(|e| panic!("qmp cont: {e}"));
    let stop_s = stopped.elapsed().as_secs_f64();
    let (behind, behind_min) =
        guest_offset(&g, b2p, &key).unwrap_or_else(|e| panic!("{e}\n{}", g.console()));
    assert!(
        behind < -(stop_s - 5.0) && behind > -(stop_s + 5.0),
        "after a {stop_s:.1} s stop the guest is {behind:+.3} s off (expected about -{stop_s:.0} s)"
    );

    // What the resume detector does.
    let t = Instant::now();
    let resumed = set_guest_time(b2p, &g);
    let call_s = t.elapsed().as_secs_f64();
    let (after, after_min) =
        guest_offset(&g, b2p, &key).unwrap_or_else(|e| panic!("{e}\n{}", g.console()));
    assert!(
        after.abs() < 1.0,
        "after SetTime the guest is still {after:+.3} s off ({resumed})"
    );
    eprintln!(
        "FIGURES: clock under QEMU TCG: at boot {first:+.3} s ({boot}); after a {stop_s:.1} s \
         stop {behind:+.3} s (worst sample {behind_min:+.3}); SetTime took {call_s:.2} s ({resumed}); \
         then {after:+.3} s (worst sample {after_min:+.3}); offsets are guest - host, best of 10 ssh samples"
    );
    g.try_shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The threads of `pid` whose name is `name`: their Seccomp mode field.
fn seccomp_of_threads(pid: u32, name: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim().to_string())
        })
        .collect()
}

#[test]
fn the_vm_process_keeps_its_clock_thread_under_a_filter() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return skip(&format!("clock_thread: /dev/kvm cannot be opened: {e}"));
    }
    if !have_tool("ssh-keygen") {
        return skip("clock_thread: ssh-keygen not installed");
    }
    let home = tempfile_dir("b2p-clock-thread");
    let kernel = home.join("probe.bzImage");
    std::fs::copy(b2p_probe::BZIMAGE, &kernel).unwrap();
    let b2p = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_b2p"))
            .args(args)
            .env("XDG_DATA_HOME", &home)
            .stdin(Stdio::null())
            .output()
            .expect("running b2p");
        let text = format!(
            "b2p {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            text,
        )
    };
    let out = b2p(&[
        "create",
        "clk",
        "--network",
        "none",
        "--memory",
        "128",
        "--cpus",
        "1",
        "--disk-size",
        "64",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "probe.hold_ms=60000",
    ]);
    assert_eq!(out.0, Some(0), "{}", out.2);
    let out = b2p(&["start", "clk", "--no-wait"]);
    assert_eq!(out.0, Some(0), "{}", out.2);
    let dir = home.join("b2p/machines/clk");
    let inspect: serde_json::Value = serde_json::from_str(&b2p(&["inspect", "clk"]).1).unwrap();
    let pid = inspect["pid"].as_u64().expect("no pid while running") as u32;
    // The thread is there, filtered (mode 2), and still there after it
    // has tried the agent a few times (one try a second).
    let begin = Instant::now();
    let mut modes = seccomp_of_threads(pid, "b2p-clock");
    while modes.is_empty() && begin.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        modes = seccomp_of_threads(pid, "b2p-clock");
    }
    assert_eq!(modes, ["2"], "the b2p-clock thread's Seccomp field");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(b2p(&["status", "clk"]).1.trim(), "Running");
    assert_eq!(seccomp_of_threads(pid, "b2p-clock"), ["2"]);
    let out = b2p(&["stop", "clk", "--timeout", "1"]);
    assert_eq!(out.0, Some(0), "{}", out.2);
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    assert!(!log.contains("forbidden system call"), "vmm.log:\n{log}");
    let _ = std::fs::remove_dir_all(&home);
}
