//! virtio-balloon free page reporting end to end.
//!
//! - The probe guest on the real /dev/kvm (`b2p-vmm run --balloon`,
//!   tests/probe/guest/balloon.c): it touches 256 MiB, the monitor's VmRSS
//!   (/proc/PID/status) grows by that much; it reports ranges the device
//!   must refuse (unaligned, outside memory: refused, logged, the guest's
//!   data there intact), then the 256 MiB as free, and the monitor's VmRSS
//!   falls by at least 200 MiB. Its statistics reach the host's log.
//! - A guest whose balloon driver stops answering (the statistics request
//!   stays unanswered, the guest spins): the monitor still stops at once
//!   on SIGTERM.
//! - Under QEMU TCG with QEMU's own balloon (free-page-reporting=on) and
//!   the guest image (vsock through vhost-device-vsock, ssh as b2p does):
//!   after a container that held 500 MiB exits, the image's kernel reports
//!   the freed pages and QEMU's RSS falls by at least 300 MiB within 120 s
//!   (the guest side: virtio_balloon and CONFIG_PAGE_REPORTING work there).

// common/ and guest_image/ each load common/require.rs.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "guest_image/mod.rs"]
mod support;
#[path = "guest_image/vsock.rs"]
#[allow(dead_code)]
mod vsock;

use common::*;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// VmRSS of `pid` in bytes.
fn vm_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
}

/// A monitor whose stdout and stderr are collected by threads.
struct Running {
    child: Child,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let collect = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = r.read_to_end(&mut s);
                String::from_utf8_lossy(&s).into_owned()
            })
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Running {
            child,
            out: Some(out),
            err: Some(err),
        }
    }

    /// Waits up to `limit` for the process to end (killed after that);
    /// returns (exit code, stdout, stderr, how long it took).
    fn finish(&mut self, limit: Duration) -> (Option<i32>, String, String, Duration) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = self
            .out
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let err = self
            .err
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (status.code(), out, err, t.elapsed())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `log` contains `needle` (or the process ended, or `limit`).
fn wait_console(r: &mut Running, log: &Path, needle: &str, limit: Duration) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Ok(Some(s)) = r.child.try_wait() {
            return Err(format!(
                "the monitor ended ({s}) before {needle:?}:\n{text}"
            ));
        }
        if t.elapsed() > limit {
            return Err(format!("no {needle:?} within {limit:?}:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn probe_balloon_cmd(vmm: &Path, dir: &TempDir, extra: &str) -> (Command, std::path::PathBuf) {
    let kernel = probe_kernel(dir);
    let initrd = write_file(dir, "initrd.img", b"probe");
    let log = dir.join("console.log");
    let mut cmd = vmm_command(vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--cmdline",
            &probe_cmdline(512, 1, None, extra),
            "--memory",
            "512",
            "--cpus",
            "1",
            "--balloon",
        ])
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .env("B2P_LOG", "info");
    (cmd, log)
}

#[test]
fn probe_reports_256_mib_and_the_monitor_gives_them_back() {
    let test = "probe_reports_256_mib_and_the_monitor_gives_them_back";
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let dir = TempDir::new(test);
    let (cmd, log) = probe_balloon_cmd(
        &vmm,
        &dir,
        "probe.nosmp=1 probe.balloon=256 probe.balloon_hold_ms=1500",
    );
    let mut r = Running::spawn(cmd);
    let pid = r.child.id();
    let limit = Duration::from_secs(180);
    let step = |r: &mut Running, needle: &str| {
        if let Err(e) = wait_console(r, &log, needle, limit) {
            let (code, out, err, _) = r.finish(Duration::from_secs(5));
            panic!("{e}\nexit {code:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
        }
        // The guest holds for 1.5 s after each line: read in the middle.
        std::thread::sleep(Duration::from_millis(300));
        vm_rss(pid).expect("VmRSS of the monitor")
    };
    let t0 = Instant::now();
    let ready = step(&mut r, "probe: balloon0 ready");
    let touched = step(&mut r, "probe: balloon0 touched 256 MiB");
    let t_report = Instant::now();
    let reported = step(&mut r, "probe: balloon0 reported 256 MiB");
    let report_time = t_report.elapsed();
    let (code, out, err, _) = r.finish(Duration::from_secs(60));
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let describe = format!(
        "exit {code:?}\n--- console ---\n{console}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    eprintln!(
        "{test}: monitor VmRSS {} MiB at ready, {} MiB after the guest touched 256 MiB, {} MiB after it reported them ({:.1} s from 'touched' to 'reported' line incl. 1.5 s hold; whole run {:.1} s)",
        ready / MIB,
        touched / MIB,
        reported / MIB,
        report_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        touched >= ready + 240 * MIB,
        "touching 256 MiB did not grow the RSS ({} -> {} MiB)\n{describe}",
        ready / MIB,
        touched / MIB
    );
    assert!(
        reported + 200 * MIB <= touched,
        "reporting 256 MiB free did not shrink the RSS by 200 MiB ({} -> {} MiB)\n{describe}",
        touched / MIB,
        reported / MIB
    );
    assert!(
        console.contains("probe: balloon0 bad ranges refused, data kept"),
        "{describe}"
    );
    assert!(!console.contains("probe: FAIL"), "{describe}");
    assert!(console.contains("probe: PASS"), "{describe}");
    assert_eq!(code, Some(0), "{describe}");
    // The refusals are logged (rate-limited: at most 5 per 10 s per site).
    let refused = err
        .lines()
        .filter(|l| l.contains("virtio-balloon: reported range") && l.contains("refused"))
        .count();
    assert!(
        (1..=5).contains(&refused),
        "{refused} refusal lines\n{describe}"
    );
    assert!(err.contains("not 4 KiB-aligned"), "{describe}");
    assert!(err.contains("outside guest memory"), "{describe}");
    // The guest's statistics reached the host.
    assert!(
        err.lines()
            .any(|l| l.contains("virtio-balloon: guest memory: free_mib=")
                && l.contains("total_mib=")),
        "{describe}"
    );
}

#[test]
fn a_balloon_driver_that_stops_answering_hangs_nothing() {
    let test = "a_balloon_driver_that_stops_answering_hangs_nothing";
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let dir = TempDir::new(test);
    // The guest sets the balloon up, sends statistics, touches 16 MiB and
    // then sits in a 10-minute hold: it never takes a buffer back again.
    let (cmd, log) = probe_balloon_cmd(
        &vmm,
        &dir,
        "probe.nosmp=1 probe.balloon=16 probe.balloon_hold_ms=600000",
    );
    let mut r = Running::spawn(cmd);
    if let Err(e) = wait_console(
        &mut r,
        &log,
        "probe: balloon0 ready",
        Duration::from_secs(180),
    ) {
        let (code, out, err, _) = r.finish(Duration::from_secs(5));
        panic!("{e}\nexit {code:?}\n{out}\n{err}");
    }
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) }, 0);
    let (code, out, err, took) = r.finish(Duration::from_secs(10));
    eprintln!("{test}: SIGTERM to exit {:.3} s", took.as_secs_f64());
    assert_eq!(code, Some(0), "exit after SIGTERM\n{out}\n{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}\n{err}");
}

/// The pid of the QEMU that `g` started (its command line names `g`'s
/// scratch directory).
fn qemu_pid(g: &vsock::VsockGuest) -> Option<u32> {
    let dir = g.uds().parent()?.to_str()?.to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline);
        let argv0 = text.split('\0').next().unwrap_or("");
        if argv0.contains("qemu-system") && text.contains(&dir) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn the_image_kernel_gives_a_containers_500_mib_back_to_qemus_balloon() {
    let test = "the_image_kernel_gives_a_containers_500_mib_back_to_qemus_balloon";
    let Some((kernel, initrd, vhost)) = vsock::ssh_rig(test) else {
        return;
    };
    let _lock = support::boot_lock();
    let dir = support::tempfile_dir("b2p-balloon");
    let b2p = Path::new(env!("CARGO_BIN_EXE_b2p"));
    let args = ["--network", "none", "--disk-size", "2048"];
    let machine = support::create_machine(&dir, "bal", &args, &kernel);
    let key = machine.join("id_ed25519");
    // 2 GiB of guest memory (VsockGuest's memfd), QEMU's own balloon.
    let mut g = vsock::VsockGuest::boot_with(
        &vhost,
        &kernel,
        &initrd,
        &machine.join("disk.raw"),
        "b2p.ip=off",
        &[
            "-device".into(),
            "virtio-balloon-device,free-page-reporting=on".into(),
        ],
    );
    g.wait_agent("io.podman.GetVersion", Duration::from_secs(60));
    let pid = qemu_pid(&g).unwrap_or_else(|| panic!("no QEMU process found\n{}", g.console()));
    let ssh = |g: &vsock::VsockGuest, script: &str, secs: u32| g.ssh_tc(b2p, &key, script, secs);
    let (ok, drv) = ssh(&g, "ls /sys/bus/virtio/drivers/virtio_balloon/", 300);
    assert!(
        ok && drv.contains("virtio"),
        "the image's kernel has no virtio_balloon driver bound (guest-image/modules.list; \
         rebuild the image): {drv}\n{}",
        g.console()
    );
    // Let boot-time reporting and the service start settle.
    std::thread::sleep(Duration::from_secs(20));
    let base = vm_rss(pid).expect("QEMU VmRSS");

    // A container that holds 500 MiB of the guest's memory (a file in its
    // own /dev/shm tmpfs, freed when the container ends) for 15 s.
    let remote = "sudo podman --remote --url unix:///run/podman/podman.sock";
    let script = format!(
        "{remote} run --rm --shm-size 600m busybox sh -c \
         'dd if=/dev/zero of=/dev/shm/fill bs=1M count=500 2>&1 | tail -n 1; sleep 15; echo container-done'"
    );
    let mut peak = base;
    let (ok, out, ended) = std::thread::scope(|s| {
        let h = s.spawn(|| ssh(&g, &script, 600));
        while !h.is_finished() {
            if let Some(r) = vm_rss(pid) {
                peak = peak.max(r);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let (ok, out) = h.join().unwrap();
        (ok, out, Instant::now())
    });
    assert!(
        ok && out.contains("container-done"),
        "the container failed: {out}\n{}",
        g.console()
    );
    assert!(
        peak >= base + 400 * MIB,
        "the container's 500 MiB did not show in QEMU's RSS ({} -> {} MiB): {out}",
        base / MIB,
        peak / MIB
    );
    // The guest reports free pages 2 s after they gather into 2 MiB
    // blocks; under TCG give it up to 120 s.
    let mut after = vm_rss(pid).unwrap_or(peak);
    let mut fell_at = None;
    while ended.elapsed() < Duration::from_secs(120) {
        after = vm_rss(pid).unwrap_or(after);
        if after + 400 * MIB <= peak {
            fell_at = Some(ended.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Where it settles: the lowest of the next 10 s.
    let settle = Instant::now();
    while fell_at.is_some() && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(500));
        after = after.min(vm_rss(pid).unwrap_or(after));
    }
    eprintln!(
        "FIGURES: {test}: QEMU VmRSS {} MiB before the container, {} MiB at its peak, {} MiB \
         after it exited (fell by 400 MiB {} after the exit; lowest of the next 10 s shown)",
        base / MIB,
        peak / MIB,
        after / MIB,
        match fell_at {
            Some(t) => format!("{:.1} s", t.as_secs_f64()),
            None => "not within 120 s".to_string(),
        }
    );
    assert!(
        after + 300 * MIB <= peak,
        "QEMU's RSS did not fall by 300 MiB within 120 s of the container's exit \
         ({} -> {} MiB)\n{}",
        peak / MIB,
        after / MIB,
        g.console()
    );
    g.try_shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
