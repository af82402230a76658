//! Rootless networking through a real passt, with real Linux: QEMU's TCG
//! (`-netdev stream` to passt's Unix socket, the same framing b2p-vmm's
//! passt backend speaks) boots the guest image with `ip=dhcp`; passt runs
//! as an unprivileged user (as root it drops to `nobody` itself) and
//! forwards a host port to the guest's sshd. Over ssh the test checks what
//! DHCP configured (address, default route, resolv.conf) and that the
//! gateway address reaches a TCP server the test runs on the host's
//! 127.0.0.1, both ways (passt maps the gateway to the host's loopback).
//!
//! The same backend under b2p-vmm, on real KVM: the probe guest's
//! virtio-net driver gets a DHCPOFFER through the passt b2p-vmm started
//! (which ends with the VM) and through one it joins (`--net passt=PATH`),
//! passt killed mid-run leaves the VM running with
//! one log line, and a missing passt is one line naming the package.

// Both helper modules include tests/common/require.rs (the skip rules).
#![allow(clippy::duplicate_mod)]

#[path = "guest_image/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const BOOT_LIMIT: Duration = Duration::from_secs(420);

/// A TCP server on 127.0.0.1 that greets each connection with `greeting`
/// and passes on (peer address, first line received).
fn tcp_server(greeting: &'static str) -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let _ = (&s).write_all(greeting.as_bytes());
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            let _ = tx.send((peer, line.trim().to_string()));
        }
    });
    (port, rx)
}

/// Ends the child with the test process even when it is killed.
fn die_with_us(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        })
    }
}

/// One ssh run of `script` as tc through passt's forward of `port`, at
/// most 60 s (a connection that hangs under a loaded TCG guest is retried).
fn ssh(key: &Path, port: u16, script: &str) -> common::Outcome {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
    ])
    .args([
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "LogLevel=ERROR",
    ])
    .arg("-i")
    .arg(key)
    .args(["-p", &port.to_string(), "tc@127.0.0.1", script]);
    common::run_with_deadline(cmd, Duration::from_secs(60))
}

#[test]
fn guest_gets_dhcp_from_passt_and_reaches_the_hosts_loopback() {
    let Some((kernel, initrd)) = image() else {
        return;
    };
    if !have_tool("qemu-system-x86_64") {
        return skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)");
    }
    if !have_tool("passt") {
        return skip("passt not installed (apt-get install passt)");
    }
    for t in ["ssh", "ssh-keygen", "tar"] {
        if !have_tool(t) {
            return skip(&format!(
                "{t} not installed (apt-get install openssh-client)"
            ));
        }
    }
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-net-passt");
    let (key, disk) = keyed_format_me_disk(&dir, 512, "b2p-net-passt");

    // passt listens in a directory of its own.
    let sock = passt_socket_path(&dir);
    let ssh_port = free_port();
    let passt_log = dir.join("passt.log");
    let _passt = Kill(
        die_with_us(&mut Command::new("passt"))
            .args(["--foreground", "--stderr", "-s"])
            .arg(&sock)
            .args(["-t", &format!("{ssh_port}:22")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&passt_log).unwrap())
            .spawn()
            .expect("starting passt"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()).is_some(),
        "passt did not listen on {}: {}",
        sock.display(),
        std::fs::read_to_string(&passt_log).unwrap_or_default()
    );
    let (tcp_port, peers) = tcp_server("b2p-host-loopback-hello\n");

    let console = dir.join("console.log");
    let start = Instant::now();
    let mut qemu = Kill(
        die_with_us(&mut Command::new("qemu-system-x86_64"))
            .args(["-M", "microvm", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", "2048", "-smp", "2"])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-monitor", "none", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 tsc_early_khz={} panic=-1 ip=dhcp b2p.agent=0",
                host_khz()
            ))
            .arg("-netdev")
            .arg(format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                sock.display()
            ))
            .args(["-device", "virtio-net-device,netdev=n0"])
            .args(["-device", "virtio-rng-device"])
            .arg("-drive")
            .arg(format!("if=none,id=d0,format=raw,file={}", disk.display()))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
            .spawn()
            .expect("starting qemu-system-x86_64"),
    );
    let log = |what: &str| {
        format!(
            "{what}\n--- console ---\n{}\n--- passt ---\n{}\n--- qemu ---\n{}",
            std::fs::read_to_string(&console).unwrap_or_default(),
            std::fs::read_to_string(&passt_log).unwrap_or_default(),
            std::fs::read_to_string(dir.join("qemu.err")).unwrap_or_default()
        )
    };
    // The lease (the udhcpc hook writes it to the console), then sshd.
    let lease = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("eth0: DHCP lease")) {
            break l.to_string();
        }
        if let Ok(Some(st)) = qemu.0.try_wait() {
            panic!(
                "{}",
                log(&format!("QEMU exited ({st}) before a DHCP lease"))
            );
        }
        assert!(start.elapsed() < BOOT_LIMIT, "{}", log("no DHCP lease"));
        std::thread::sleep(Duration::from_millis(250));
    };
    let lease_at = start.elapsed();
    // "b2p: eth0: DHCP lease 192.0.2.2/24 router 192.0.2.1"
    let words: Vec<&str> = lease.split_whitespace().collect();
    let addr = words
        .iter()
        .position(|w| *w == "lease")
        .and_then(|i| words.get(i + 1))
        .copied()
        .unwrap_or_default()
        .to_string();
    let router = words
        .iter()
        .position(|w| *w == "router")
        .and_then(|i| words.get(i + 1))
        .copied()
        .unwrap_or_default()
        .to_string();
    assert!(
        router.parse::<std::net::Ipv4Addr>().is_ok(),
        "{}",
        log(&format!("no router in the lease line {lease:?}"))
    );

    // sshd answers through passt's port forward once userspace is up.
    // (ip is a busybox applet in /usr/sbin, not on tc's PATH.)
    let script = format!(
        "busybox ip -4 -o addr show dev eth0; busybox ip route; cat /etc/resolv.conf; \
         echo nc:; echo b2p-guest-hello | busybox nc {router} {tcp_port}"
    );
    let out = loop {
        let o = ssh(&key, ssh_port, &script);
        if o.status.success() && !o.timed_out {
            break o.stdout;
        }
        assert!(
            start.elapsed() < BOOT_LIMIT,
            "{}",
            log(&format!(
                "ssh through passt's forward never worked: {}",
                o.describe()
            ))
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let report = log(&format!("ssh output:\n{out}"));
    assert!(out.contains(&format!("inet {addr}")), "{report}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("default via {router} dev eth0"))),
        "{report}"
    );
    let host_dns: Vec<String> = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|s| s.trim().to_string())
        .collect();
    let guest_dns: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(str::trim)
        .collect();
    assert!(
        !guest_dns.is_empty(),
        "no nameserver in resolv.conf: {report}"
    );
    assert!(
        guest_dns
            .iter()
            .all(|d| host_dns.iter().any(|h| h == d) || *d == router),
        "resolv.conf {guest_dns:?} is neither the host's {host_dns:?} nor the gateway: {report}"
    );
    let greeting = out.split("nc:").nth(1).unwrap_or_default();
    assert!(greeting.contains("b2p-host-loopback-hello"), "{report}");
    // The connection came out of passt on the host's loopback, and what
    // the guest sent arrived.
    let (peer, line) = peers
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    assert!(peer.starts_with("127.0.0.1:"), "peer {peer}: {report}");
    assert_eq!(line, "b2p-guest-hello", "{report}");
    eprintln!(
        "net_passt: lease {addr} router {router} dns {guest_dns:?} after {:.1}s; \
         TCP via the gateway from {peer}; total {:.1}s",
        lease_at.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    drop(qemu);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- b2p-vmm's own passt backend, with the probe guest on real KVM ----

mod common;

use common::{
    kvm_usable, probe_cmdline, probe_kernel, run_with_deadline, vmm_binary, vmm_command, TempDir,
};

const PROBE_LIMIT: Duration = Duration::from_secs(120);

fn probe_setup(test: &str) -> Option<std::path::PathBuf> {
    if let Err(e) = kvm_usable() {
        common::skip(test, &e);
        return None;
    }
    if !have_tool("passt") {
        common::skip(test, "passt not installed (apt-get install passt)");
        return None;
    }
    match vmm_binary() {
        Ok(v) => Some(v),
        Err(e) => panic!("{e}"),
    }
}

/// `b2p-vmm run` of the probe with `--net ARG` and B2P_LOG=info.
fn probe_run(vmm: &Path, dir: &TempDir, net: &str, extra: &str) -> Command {
    let mut cmd = vmm_command(vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(probe_kernel(dir))
        .args(["--memory", "64", "--cpus", "1", "--net", net])
        .arg("--cmdline")
        .arg(probe_cmdline(
            64,
            1,
            None,
            &format!("probe.nosmp=1 {extra}"),
        ))
        .arg("--console")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .env("B2P_LOG", "info");
    cmd
}

/// The pid b2p-vmm logged for the passt it started.
fn passt_pid(stderr: &str) -> Option<u32> {
    stderr
        .lines()
        .find_map(|l| l.split("started passt, pid ").nth(1))
        .and_then(|p| p.trim().parse().ok())
}

fn is_passt(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"passt"))
        })
        .unwrap_or(false)
}

#[test]
fn probe_gets_a_dhcp_offer_through_b2p_vmms_own_passt() {
    let test = "probe_gets_a_dhcp_offer_through_b2p_vmms_own_passt";
    let Some(vmm) = probe_setup(test) else { return };
    let dir = TempDir::new("net-passt");
    let out = run_with_deadline(
        probe_run(&vmm, &dir, "passt,mac=52:54:00:b2:b2:09", "probe.net=2"),
        PROBE_LIMIT,
    );
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let what = format!("{}\n--- console ---\n{console}", out.describe());
    assert!(out.status.success() && !out.timed_out, "{what}");
    assert!(console.contains("probe: PASS"), "{what}");
    assert!(
        console.contains("probe: net0 mac 52:54:00:b2:b2:09"),
        "{what}"
    );
    assert!(console.contains("probe: net0 tx ok"), "{what}");
    let offer = console
        .lines()
        .find(|l| l.contains("probe: net0 dhcp offer "))
        .unwrap_or_else(|| panic!("no DHCPOFFER seen by the guest: {what}"));
    assert!(offer.contains(" router "), "{offer}");
    // passt offers no checksum/TSO offloads: the device must not either.
    let offered = console
        .lines()
        .find_map(|l| l.split("net0 features offered=0x").nth(1))
        .and_then(|v| u64::from_str_radix(v.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no features line: {what}"));
    let offloads = 1 << 0 | 1 << 1 | 1 << 7 | 1 << 8 | 1 << 11 | 1 << 12;
    assert_eq!(
        offered & offloads,
        0,
        "offloads offered over passt: {offered:#x}"
    );
    // The passt it started is gone with it.
    let pid = passt_pid(&out.stderr).unwrap_or_else(|| panic!("no passt pid logged: {what}"));
    let end = Instant::now() + Duration::from_secs(5);
    while is_passt(pid) {
        assert!(Instant::now() < end, "passt {pid} outlived the VM: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{offer} (b2p-vmm wall {:?})", out.wall);
}

#[test]
fn passt_killed_mid_run_takes_the_link_down_and_the_vm_goes_on() {
    let test = "passt_killed_mid_run_takes_the_link_down_and_the_vm_goes_on";
    let Some(vmm) = probe_setup(test) else { return };
    let dir = TempDir::new("net-passt-kill");
    let mut cmd = probe_run(&vmm, &dir, "passt", "probe.net=2 probe.hold_ms=3000");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    let mut child = Kill(cmd.spawn().unwrap());
    let console = dir.join("console.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("probe: holding")
    {
        assert!(start.elapsed() < PROBE_LIMIT, "the probe never held");
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "b2p-vmm exited early ({st}): {}",
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let pid = passt_pid(&stderr).expect("passt pid logged");
    // SAFETY: kill(2) of the passt process b2p-vmm started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < PROBE_LIMIT, "b2p-vmm did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let what = format!("{status}\n--- stderr ---\n{stderr}\n--- console ---\n{text}");
    assert!(status.success(), "{what}");
    assert!(
        text.contains("probe: hold done"),
        "the guest went on: {what}"
    );
    let down: Vec<&str> = stderr.lines().filter(|l| l.contains("link down")).collect();
    assert_eq!(down.len(), 1, "one log line for the lost link: {what}");
}

#[test]
fn net_passt_without_passt_installed_is_one_line_naming_the_package() {
    let test = "net_passt_without_passt_installed_is_one_line_naming_the_package";
    let Some(vmm) = probe_setup(test) else { return };
    let dir = TempDir::new("net-passt-missing");
    let mut cmd = probe_run(&vmm, &dir, "passt", "probe.net=2");
    cmd.env("PATH", dir.path()).env_remove("B2P_LOG");
    let out = run_with_deadline(cmd, PROBE_LIMIT);
    assert!(!out.status.success(), "{}", out.describe());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.describe());
    assert!(lines[0].contains("apt install passt"), "{}", out.describe());
    // A socket nobody listens on: one line naming it.
    let mut cmd = probe_run(
        &vmm,
        &dir,
        &format!("passt={}", dir.join("nobody.sock").display()),
        "",
    );
    cmd.env_remove("B2P_LOG");
    let out = run_with_deadline(cmd, PROBE_LIMIT);
    assert!(!out.status.success(), "{}", out.describe());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.describe());
    assert!(out.stderr.contains("nobody.sock"), "{}", out.describe());
}

// ---- the manager: `b2p create --network` ----

fn b2p(xdg: &Path, args: &[&str], path: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_b2p"));
    cmd.args(args).env("XDG_DATA_HOME", xdg);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    cmd.output().expect("running b2p")
}

fn inspect_network(xdg: &Path, name: &str) -> String {
    let out = b2p(xdg, &["inspect", name], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["network"], v["config"]["network"], "{v}");
    v["network"].as_str().unwrap_or_default().to_string()
}

#[test]
fn create_defaults_to_passt_and_takes_tap_or_none() {
    let test = "create_defaults_to_passt_and_takes_tap_or_none";
    if !have_tool("passt") || !have_tool("ssh-keygen") {
        return common::skip(
            test,
            "passt and ssh-keygen needed (apt-get install passt openssh-client)",
        );
    }
    let dir = TempDir::new("net-create");
    let xdg = dir.path();
    let small = [
        "--disk-size",
        "64",
        "--memory",
        "256",
        "--kernel",
        "/bin/true",
    ];
    let ok = |args: &[&str]| {
        let out = b2p(xdg, &[&["create"], args, &small].concat(), None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["p"]);
    assert_eq!(inspect_network(xdg, "p"), "passt");
    ok(&["n", "--network", "none"]);
    assert_eq!(inspect_network(xdg, "n"), "none");
    ok(&["t", "--tap", "b2ptap9"]);
    assert_eq!(inspect_network(xdg, "t"), "tap");
    ok(&["t2", "--network", "tap", "--tap", "b2ptap9"]);
    assert_eq!(inspect_network(xdg, "t2"), "tap");
    for (name, args, says) in [
        (
            "bad1",
            &["--network", "tap"][..],
            "--network tap needs --tap",
        ),
        (
            "bad2",
            &["--network", "passt", "--tap", "t0"][..],
            "--tap goes with --network tap",
        ),
        ("bad3", &["--network", "slirp"][..], "slirp"),
    ] {
        let out = b2p(xdg, &[&["create", name], args, &small].concat(), None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
        assert!(
            !xdg.join("b2p/machines").join(name).exists(),
            "{name} half-made"
        );
    }
    // No passt on PATH: one line naming the package, nothing made.
    let empty = dir.join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let out = b2p(
        xdg,
        &[&["create", "nopasst"][..], &small].concat(),
        Some(&empty),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("apt install passt"), "{err}");
    assert!(!xdg.join("b2p/machines/nopasst").exists());
}

#[test]
fn probe_gets_a_dhcp_offer_through_a_passt_it_joins() {
    let test = "probe_gets_a_dhcp_offer_through_a_passt_it_joins";
    let Some(vmm) = probe_setup(test) else { return };
    let dir = TempDir::new("net-passt-join");
    let sock = passt_socket_path(dir.path());
    let _passt = Kill(
        die_with_us(&mut Command::new("passt"))
            .args(["--foreground", "--quiet", "--one-off", "-s"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting passt"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()).is_some(),
        "passt did not listen"
    );
    let out = run_with_deadline(
        probe_run(
            &vmm,
            &dir,
            &format!("passt={}", sock.display()),
            "probe.net=2",
        ),
        PROBE_LIMIT,
    );
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let what = format!("{}\n--- console ---\n{console}", out.describe());
    assert!(out.status.success() && !out.timed_out, "{what}");
    assert!(console.contains("probe: PASS"), "{what}");
    assert!(console.contains("probe: net0 dhcp offer "), "{what}");
    assert!(
        passt_pid(&out.stderr).is_none(),
        "it started a passt of its own: {what}"
    );
}
