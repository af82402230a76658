//! The probe guest drives each virtio-mmio device of `b2p-vmm` under the
//! real /dev/kvm with its own minimal drivers (tests/probe/guest: found via
//! the DSDT's LNRO0005 nodes, the spec's init sequence, completions by
//! IOAPIC interrupt): virtio-blk (pattern, FLUSH, read back, second boot,
//! read-only), virtio-rng, virtio-net against a TAP in a network namespace
//! made here, virtio-vsock (echo through the CONNECT handshake and through
//! --vsock-port, 64 concurrent connections, a stream, a guest-initiated
//! connection to CID 2; half-closes both ways through the handshake,
//! --vsock-port and `b2p __vsock-proxy`).

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

fn setup(test: &str) -> Option<PathBuf> {
    if let Err(reason) = kvm_usable() {
        skip(test, &reason);
        return None;
    }
    Some(vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}")))
}

struct Boot {
    out: Outcome,
    console: String,
}

impl Boot {
    fn assert_ok(&self) {
        let all = format!("{}{}{}", self.console, self.out.stdout, self.out.stderr);
        assert!(!all.contains("panicked"), "{}", self.describe());
        assert!(!self.out.timed_out, "timed out\n{}", self.describe());
        let fails: Vec<&str> = self
            .console
            .lines()
            .filter(|l| l.contains("probe: FAIL"))
            .collect();
        assert!(
            fails.is_empty(),
            "probe failures {fails:#?}\n{}",
            self.describe()
        );
        assert_eq!(self.out.status.code(), Some(0), "{}", self.describe());
        self.has("probe: PASS");
    }

    fn has(&self, needle: &str) {
        assert!(
            self.console.contains(needle),
            "console lacks {needle:?}\n{}",
            self.describe()
        );
    }

    fn describe(&self) -> String {
        format!("--- console ---\n{}\n{}", self.console, self.out.describe())
    }
}

/// Base `b2p-vmm run` command for the probe, console into `dir/console.log`.
fn probe_cmd(vmm: &Path, dir: &TempDir, cmdline: &str, extra: &[String]) -> (Command, PathBuf) {
    let kernel = probe_kernel(dir);
    let initrd = write_file(dir, "initrd.img", b"probe");
    let log = dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = vmm_command(vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", cmdline, "--memory", "128", "--cpus", "1"])
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .args(extra);
    (cmd, log)
}

fn boot(vmm: &Path, dir: &TempDir, cmdline: &str, extra: &[String]) -> Boot {
    let (cmd, log) = probe_cmd(vmm, dir, cmdline, extra);
    let out = run_with_deadline(cmd, LIMIT);
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    Boot { out, console }
}

fn disk(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

#[test]
fn blk_pattern_flush_second_boot_and_read_only() {
    let test = "blk_pattern_flush_second_boot_and_read_only";
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let rw = disk(&dir, "rw.raw", 4 << 20);
    let ro = disk(&dir, "ro.raw", 1 << 20);
    std::fs::write(&ro, vec![0xa5u8; 1 << 20]).unwrap();
    let seed = 0x5eed_0000_0000_0001u64 ^ u64::from(std::process::id());
    let disks = vec![
        "--disk".to_string(),
        format!("{},serial=probe-rw", rw.display()),
        "--disk".to_string(),
        format!("{},ro", ro.display()),
    ];
    let sector = 8u64;

    let b = boot(
        &vmm,
        &dir,
        &format!("probe.blk0=write probe.blk1=ro probe.blk_seed={seed} probe.blk_sector={sector}"),
        &disks,
    );
    b.assert_ok();
    b.has("probe: blk0 serial \"probe-rw\"");
    b.has("probe: blk0 write ok: pattern read back");
    b.has("probe: blk1 read-only write rejected with IOERR ok");
    b.has("ro=1");

    // The pattern is in the file on the host, where the guest put it.
    let data = std::fs::read(&rw).unwrap();
    let off = (sector * 512) as usize;
    assert_eq!(
        &data[off..off + 4096],
        &probe_pattern(seed, 4096)[..],
        "pattern not on disk"
    );
    assert!(
        data[..off].iter().all(|&b| b == 0),
        "bytes before the sector changed"
    );
    assert!(
        std::fs::read(&ro).unwrap().iter().all(|&b| b == 0xa5),
        "the read-only disk changed"
    );

    // A second boot reads the pattern again.
    let b2 = boot(
        &vmm,
        &dir,
        &format!("probe.blk0=verify probe.blk_seed={seed} probe.blk_sector={sector}"),
        &disks[..2],
    );
    b2.assert_ok();
    b2.has("probe: blk0 verify ok: pattern read back");
}

/// FLUSH reaches the disk: under strace, every guest FLUSH is an fdatasync
/// (or fsync) of the image, issued after the pwrite it covers and returned
/// before the device signals the guest (the irqfd write).
#[test]
fn blk_flush_is_fdatasync_before_completion() {
    let test = "blk_flush_is_fdatasync_before_completion";
    let Some(vmm) = setup(test) else { return };
    let Some(strace) = which("strace") else {
        return skip(test, "strace not found");
    };
    let dir = TempDir::new(test);
    let rw = disk(&dir, "rw.raw", 1 << 20);
    let trace = dir.join("strace.log");
    let (cmd, log) = probe_cmd(
        &vmm,
        &dir,
        "probe.blk0=write probe.blk_seed=7",
        &["--disk".to_string(), rw.display().to_string()],
    );
    let mut st = Command::new(strace);
    st.args([
        "-f",
        "-qq",
        "-e",
        "trace=pwrite64,pwritev,pwritev2,write,writev,fdatasync,fsync,openat",
        "-o",
    ])
    .arg(&trace)
    .arg(cmd.get_program())
    .args(cmd.get_args());
    let out = run_with_deadline(st, LIMIT);
    let b = Boot {
        out,
        console: std::fs::read_to_string(&log).unwrap_or_default(),
    };
    b.assert_ok();
    b.has("probe: blk0 write ok");
    let trace = std::fs::read_to_string(&trace).unwrap();
    // The image's fd, from its openat.
    let name = rw.display().to_string();
    let fd: String = trace
        .lines()
        .filter(|l| l.contains("openat(") && l.contains(&name))
        .filter_map(|l| l.rsplit("= ").next())
        .map(|s| s.trim().to_string())
        .next_back()
        .unwrap_or_else(|| panic!("no openat of the image in the trace\n{trace}"));
    // Only the syscalls that matter (the loader's openat noise is long).
    let lines: Vec<&str> = trace
        .lines()
        .filter(|l| !l.contains("ENOENT") && !l.contains(".so"))
        .collect();
    let trace = lines.join("\n");
    let is_write = |l: &str| {
        (l.contains("pwrite64(") || l.contains("pwritev(") || l.contains("pwritev2("))
            && l.contains(&format!("({fd},"))
    };
    let is_sync = |l: &str| {
        (l.contains("fdatasync(") || l.contains("fsync(")) && l.contains(&format!("({fd})"))
    };
    let first_write = lines
        .iter()
        .position(|l| is_write(l))
        .unwrap_or_else(|| panic!("no pwrite to fd {fd}\n{trace}"));
    let sync = lines.iter().position(|l| is_sync(l)).unwrap_or_else(|| {
        panic!("no fdatasync/fsync of fd {fd}: FLUSH did not reach the disk\n{trace}")
    });
    assert!(
        first_write < sync,
        "the sync came before the write it covers\n{trace}"
    );
    // After the sync returns, the device signals completion through an
    // eventfd write (8 bytes) in the same thread.
    let pid = lines[sync].split_whitespace().next().unwrap_or("");
    let signalled = lines[sync + 1..].iter().any(|l| {
        l.starts_with(pid)
            && l.contains(" write(")
            && l.contains(", 8)")
            && l.trim_end().ends_with("= 8")
    });
    assert!(signalled, "no completion signal after the sync\n{trace}");
}

#[test]
fn rng_bytes_by_interrupt() {
    let test = "rng_bytes_by_interrupt";
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let b = boot(&vmm, &dir, "console=ttyS0", &["--virtio-rng".to_string()]);
    b.assert_ok();
    b.has("probe: rng0 ok (interrupt-driven)");
    b.has("-> ioapic pin");
}

/// A network namespace with a TAP in it, removed on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Result<NetNs, String> {
        let name = format!("b2p-{tag}-{}", std::process::id());
        let ns = NetNs(name.clone());
        let ip = |args: &[&str]| -> Result<(), String> {
            let o = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            if o.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ))
            }
        };
        ip(&["netns", "add", &name])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &name, "tuntap", "add", "dev", "b2ptap0", "mode", "tap",
        ])?;
        ip(&["-n", &name, "link", "set", "b2ptap0", "up"])?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

const NET_HELPER: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind(("b2ptap0", 0))
s.settimeout(120)
print("ready", flush=True)
while True:
    f = s.recv(2048)
    if f[12:14] == b"\x88\xb5" and f[14:33] == b"b2p-probe net hello":
        break
print("guest-frame", f[6:12].hex(":"), flush=True)
reply = f[6:12] + bytes.fromhex("02b2b2000001") + b"\x88\xb5" + b"b2p-host net hello".ljust(46, b"\0")
for _ in range(30):
    s.send(reply)
    time.sleep(0.2)
"#;

#[test]
fn net_frames_both_ways_through_a_tap() {
    let test = "net_frames_both_ways_through_a_tap";
    let Some(vmm) = setup(test) else { return };
    if !is_root() {
        return skip(test, "needs root for a network namespace and a TAP");
    }
    let (Some(_), Some(python)) = (which("ip"), which("python3")) else {
        return skip(test, "needs ip (iproute2) and python3");
    };
    let ns = match NetNs::new("net") {
        Ok(ns) => ns,
        Err(e) => return skip(test, &format!("cannot make a netns with a TAP: {e}")),
    };
    let dir = TempDir::new(test);
    let mut helper = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(&python)
        .args(["-c", NET_HELPER])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(|l| l.ok()).as_deref(), Some("ready"));

    let (cmd, log) = probe_cmd(
        &vmm,
        &dir,
        "probe.net=1",
        &["--net".into(), "tap=b2ptap0,mac=52:54:00:b2:b2:01".into()],
    );
    let mut netns_cmd = Command::new("ip");
    netns_cmd
        .args(["netns", "exec", &ns.0])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let out = run_with_deadline(netns_cmd, LIMIT);
    let _ = helper.kill();
    let _ = helper.wait();
    let seen: Vec<String> = lines.map_while(Result::ok).collect();
    let b = Boot {
        out,
        console: std::fs::read_to_string(&log).unwrap_or_default(),
    };
    assert!(
        seen.iter().any(|l| l == "guest-frame 52:54:00:b2:b2:01"),
        "the guest's frame did not reach the TAP: {seen:?}\n{}",
        b.describe()
    );
    b.assert_ok();
    b.has("probe: net0 mac 52:54:00:b2:b2:01");
    b.has("probe: net0 tx ok");
    b.has("probe: net0 rx ok from 02:b2:b2:00:00:01 \"b2p-host net hello");
}

fn wait_for_console(log: &Path, needle: &str, child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(needle)
        {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Opens a stream to guest port `port` through the hybrid CONNECT handshake.
fn vsock_connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "EOF during the CONNECT handshake"
        );
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("OK "), "handshake answer {line:?}");
    s
}

fn echo_roundtrip(mut s: UnixStream, data: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = s.try_clone().unwrap();
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&owned).unwrap());
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    got
}

#[test]
fn vsock_echo_handshake_port_map_and_guest_connect() {
    let test = "vsock_echo_handshake_port_map_and_guest_connect";
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let uds = dir.join("v.sock");
    let mapped = dir.join("echo.sock");
    // The guest's connection to CID 2 port 5678 lands on <uds>_5678.
    let guest_side = UnixListener::bind(dir.join("v.sock_5678")).unwrap();
    let (cmd, log) = probe_cmd(
        &vmm,
        &dir,
        "probe.vsock_echo=1234 probe.vsock_connect=5678 probe.vsock_ms=150000",
        &[
            "--vsock".into(),
            format!("cid=3,uds={}", uds.display()),
            "--vsock-port".into(),
            format!("1234={}", mapped.display()),
        ],
    );
    let mut cmd = cmd;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    assert!(
        wait_for_console(
            &log,
            "echo server listening",
            &mut child,
            Duration::from_secs(60)
        ),
        "the probe's echo server did not start\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Guest-initiated connection.
    let (mut g, _) = guest_side.accept().unwrap();
    g.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut hello = [0u8; 21];
    g.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello from the probe\n");
    g.write_all(b"hello from the host\n").unwrap();

    // One echo through each way in.
    let one = echo_roundtrip(vsock_connect(&uds, 1234), b"ping through CONNECT");
    assert_eq!(one, b"ping through CONNECT");
    let two = echo_roundtrip(
        UnixStream::connect(&mapped).unwrap(),
        b"ping through --vsock-port",
    );
    assert_eq!(two, b"ping through --vsock-port");

    // 64 concurrent connections, half each way.
    let threads: Vec<_> = (0..64u32)
        .map(|i| {
            let (uds, mapped) = (uds.clone(), mapped.clone());
            std::thread::spawn(move || {
                let s = if i % 2 == 0 {
                    vsock_connect(&uds, 1234)
                } else {
                    UnixStream::connect(&mapped).unwrap()
                };
                let msg: Vec<u8> = (0..1000u32).map(|k| (k * 7 + i) as u8).collect();
                assert_eq!(echo_roundtrip(s, &msg), msg, "connection {i}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // One stream of a size this machine's emulated guest moves in seconds.
    let stream_len = 1024 * 1024;
    let data = random_bytes(stream_len);
    let t0 = Instant::now();
    let back = echo_roundtrip(vsock_connect(&uds, 1234), &data);
    let took = t0.elapsed();
    assert!(back == data, "stream echo differs");
    eprintln!(
        "{test}: {} KiB echoed in {:?} ({:.0} KiB/s through the emulated guest)",
        stream_len / 1024,
        took,
        stream_len as f64 / 1024.0 / took.as_secs_f64()
    );

    // End the guest's echo server.
    let q = echo_roundtrip(vsock_connect(&uds, 1234), b"QUIT");
    assert_eq!(q, b"QUIT");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("b2p-vmm did not exit after QUIT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!console.contains("probe: FAIL"), "{console}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{console}\n{stderr}");
    let served = console
        .lines()
        .find(|l| l.contains("probe: vsock echo served"))
        .unwrap_or_default();
    eprintln!("{test}: {served}");
    // 2 pings + 64 concurrent + the stream + QUIT.
    assert!(
        served.contains("served 68 connections"),
        "{served}\n{console}"
    );
    for needle in [
        "probe: vsock0 guest_cid=3",
        "probe: vsock connect to cid 2 port 5678 ok, reply \"hello from the host\"",
        "probe: vsock echo ok",
        "probe: PASS",
    ] {
        assert!(
            console.contains(needle),
            "console lacks {needle:?}\n{console}"
        );
    }
}

/// Reads `s` to its end within the read timeout.
fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)
        .expect("end of file within the timeout");
    v
}

#[test]
fn vsock_half_close_both_ways() {
    // Issue 9: a half-close on one side of a stream must reach the other
    // side as a half-close, never a full close, through each way in: the
    // CONNECT handshake, --vsock-port and `b2p __vsock-proxy`.
    let test = "vsock_half_close_both_ways";
    let Some(vmm) = setup(test) else { return };
    let dir = TempDir::new(test);
    let uds = dir.join("v.sock");
    let mapped = dir.join("echo.sock");
    let (mut cmd, log) = probe_cmd(
        &vmm,
        &dir,
        "probe.vsock_echo=1234 probe.vsock_ms=150000",
        &[
            "--vsock".into(),
            format!("cid=3,uds={}", uds.display()),
            "--vsock-port".into(),
            format!("1234={}", mapped.display()),
        ],
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    assert!(
        wait_for_console(
            &log,
            "echo server listening",
            &mut child,
            Duration::from_secs(60)
        ),
        "the probe's echo server did not start\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let open = |hybrid: bool| {
        let s = if hybrid {
            vsock_connect(&uds, 1234)
        } else {
            UnixStream::connect(&mapped).unwrap()
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    };
    let mut after_ours = 0;
    for hybrid in [true, false] {
        // The host shuts its write side: the guest sees SHUTDOWN(SEND)
        // alone (it says which flags it got) and still answers.
        let mut s = open(hybrid);
        s.write_all(b"request").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&read_to_eof(&mut s)),
            "request<eof flags=2>",
            "host half-close, hybrid={hybrid}"
        );
        // The guest shuts its write side: the host reads end of file and
        // can still send.
        let mut s = open(hybrid);
        s.write_all(b"HALF").unwrap();
        assert_eq!(
            read_to_eof(&mut s),
            b"HALF",
            "guest half-close, hybrid={hybrid}"
        );
        s.write_all(b"after eof").unwrap();
        after_ours += 9;
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // Both directions are over: the connection ends.
        assert_eq!(read_to_eof(&mut s), b"");
    }

    // The same through `b2p __vsock-proxy` (ssh's ProxyCommand): stdin's
    // end is a half-close; the guest's half-close ends stdout while stdin
    // still flows.
    let proxy = || {
        Command::new(env!("CARGO_BIN_EXE_b2p"))
            .arg("__vsock-proxy")
            .arg(&uds)
            .arg("1234")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut p = proxy();
    p.stdin.take().unwrap().write_all(b"request").unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "request<eof flags=2>");
    let mut p = proxy();
    let mut stdin = p.stdin.take().unwrap();
    stdin.write_all(b"HALF").unwrap();
    let mut stdout = Vec::new();
    p.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    assert_eq!(stdout, b"HALF");
    assert!(
        p.try_wait().unwrap().is_none(),
        "the proxy exited on the guest's half-close"
    );
    stdin.write_all(b"after eof").unwrap();
    after_ours += 9;
    drop(stdin);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = p.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the proxy did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());

    let q = echo_roundtrip(vsock_connect(&uds, 1234), b"QUIT");
    assert_eq!(q, b"QUIT");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("b2p-vmm did not exit after QUIT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!console.contains("probe: FAIL"), "{console}\n{stderr}");
    assert_eq!(status.code(), Some(0), "{console}\n{stderr}");
    // Two host half-closes and one through the proxy; as many by the guest;
    // every byte sent after the guest's half-close arrived.
    let needle = format!(
        "probe: vsock half-close: 3 by the peer, 6 by us, {after_ours} bytes received after ours"
    );
    assert!(
        console.contains(&needle),
        "console lacks {needle:?}\n{console}"
    );
}
