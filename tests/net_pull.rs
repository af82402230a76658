//! `podman pull` through a real passt, with real Linux (issue 10): QEMU TCG
//! boots the guest image with `-netdev stream` to a passt run as an
//! unprivileged user (as root passt drops to nobody itself), and a
//! vhost-user-vsock device for ssh (vsock port 22). On the host's loopback
//! the test runs a DNS server (dnsmasq), a registry (docker-registry, seeded
//! by skopeo with the busybox image guest-image/mkoci.sh builds) and an
//! HTTP proxy (tinyproxy). passt and tinyproxy see a resolv.conf naming the
//! dnsmasq on 127.0.0.1 (bound over /etc/resolv.conf in a mount namespace
//! of their own; the host's is not touched).
//!
//! Checked: the guest's DHCP lease; `registry.b2p.test` resolves through
//! passt's DNS forwarding to the gateway; the guest's Podman service (the
//! one the agent starts, `podman --remote` in the guest) pulls an image
//! from the registry through the gateway and runs it; and the proxy
//! settings `b2p __proxy-cmdline` makes from an `HTTP_PROXY` of
//! `http://127.0.0.1:PORT` (what `b2p start` adds to the command line)
//! reach that service: `proxied.b2p.test` (127.0.0.1 in the DNS, so only
//! the host's proxy can reach it) pulls through tinyproxy, whose log shows
//! the request, while `registry.b2p.test` in `NO_PROXY` does not go there.
//!
//! The manager's half, with the probe guest on real KVM: `b2p start` refuses
//! a proxy value the command line cannot carry with one line, hands the
//! settings to its VM process (which adds `b2p __proxy-cmdline`'s words to
//! the guest's command line), and `--no-proxy-env` leaves them out.

// Only part of the shared rig is used here; both helper modules include
// tests/common/require.rs (the skip rules).
#![allow(dead_code, clippy::duplicate_mod)]

mod common;

#[path = "guest_image/mod.rs"]
mod support;
#[path = "common/vhost_half_close.rs"]
mod vhost_half_close;
#[path = "guest_image/vsock.rs"]
mod vsock;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use vsock::VsockGuest;

fn spawn(cmd: &mut Command, log: &Path) -> Kill {
    Kill(
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}")),
    )
}

/// `prog args` in a mount namespace of its own whose /etc/resolv.conf is
/// `resolv` (passt and tinyproxy read the host's resolver from it).
fn with_resolv(resolv: &Path, prog: &str, args: &[String]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind '{}' /etc/resolv.conf && exec \"$0\" \"$@\"",
            resolv.display()
        ))
        .arg(prog)
        .args(args);
    cmd
}

fn read(p: &Path) -> String {
    let mut s = std::fs::read_to_string(p).unwrap_or_default();
    s.push_str(&std::fs::read_to_string(p.with_extension("err")).unwrap_or_default());
    s
}

fn wait_for(what: &str, limit: Duration, ok: impl FnMut() -> bool, log: &Path) {
    assert!(wait_until(limit, ok).is_some(), "{what}: {}", read(log));
}

#[test]
fn guest_pulls_from_a_registry_on_the_hosts_loopback_through_passt_and_a_proxy() {
    let Some((kernel, initrd)) = image() else {
        return;
    };
    let initrd = lz4_initrd().unwrap_or(initrd);
    if !have_tool("qemu-system-x86_64") {
        return skip("net_pull: QEMU is not installed (apt-get install qemu-system-x86)");
    }
    if !is_root() {
        return skip("net_pull: needs root (a DNS server on 127.0.0.1:53, a mount namespace for passt's resolv.conf)");
    }
    for (tool, package) in [
        ("passt", "passt"),
        ("dnsmasq", "dnsmasq-base"),
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("tinyproxy", "tinyproxy"),
        ("unshare", "util-linux"),
        ("busybox", "busybox-static"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
    ] {
        if !have_tool(tool) {
            return skip(&format!(
                "net_pull: {tool} is not installed (apt-get install {package})"
            ));
        }
    }
    let vhost = match vhost_half_close::patched_vhost() {
        Ok(bin) => bin,
        Err(why) => {
            return skip(&format!(
                "net_pull: no vhost-device-vsock with half-closes ({why})"
            ))
        }
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-net-pull");
    sh(&format!("chmod 0755 '{}'", dir.display()));
    let b2p = PathBuf::from(env!("CARGO_BIN_EXE_b2p"));
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();

    // The registry, seeded with busybox.
    let reg_port = free_port();
    let reg_log = dir.join("registry.log");
    std::fs::write(
        dir.join("registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{reg_port}\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let _registry = spawn(
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("registry.yml")),
        &reg_log,
    );
    wait_for(
        "the registry did not listen",
        Duration::from_secs(30),
        || TcpStream::connect(("127.0.0.1", reg_port)).is_ok(),
        &reg_log,
    );
    let archive = dir.join("busybox.tar");
    let mkoci = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-image/mkoci.sh");
    let t = Instant::now();
    sh(&format!(
        "SOURCE_DATE_EPOCH=0 bash '{}' \"$(command -v busybox)\" '{}' '{}' >/dev/null",
        mkoci.display(),
        archive.display(),
        dir.join("oci").display()
    ));
    sh(&format!(
        "skopeo copy -q --dest-tls-verify=false docker-archive:'{}' docker://127.0.0.1:{reg_port}/b2p/busybox:pulled",
        archive.display()
    ));
    let seeded = t.elapsed();

    // The proxy, as nobody, resolving through the test's DNS server.
    let proxy_port = free_port();
    let proxy_log = dir.join("tinyproxy.log");
    std::fs::write(&proxy_log, "").unwrap();
    sh(&format!("chown nobody '{}'", proxy_log.display()));
    std::fs::write(
        dir.join("tinyproxy.conf"),
        format!(
            "User nobody\nGroup nogroup\nPort {proxy_port}\nListen 127.0.0.1\nTimeout 600\n\
             LogFile \"{}\"\nLogLevel Info\nMaxClients 50\nAllow 127.0.0.1\n",
            proxy_log.display()
        ),
    )
    .unwrap();
    let _proxy = spawn(
        &mut with_resolv(
            &resolv,
            "tinyproxy",
            &[
                "-d".into(),
                "-c".into(),
                dir.join("tinyproxy.conf").display().to_string(),
            ],
        ),
        &dir.join("tinyproxy.out"),
    );
    wait_for(
        "tinyproxy did not listen",
        Duration::from_secs(30),
        || TcpStream::connect(("127.0.0.1", proxy_port)).is_ok(),
        &dir.join("tinyproxy.out"),
    );

    // passt, in a directory nobody may write.
    let passt_sock = passt_socket_path(&dir);
    let passt_log = dir.join("passt.log");
    let _passt = spawn(
        &mut with_resolv(
            &resolv,
            "passt",
            &[
                "--foreground".into(),
                "--stderr".into(),
                "-s".into(),
                passt_sock.display().to_string(),
            ],
        ),
        &passt_log,
    );
    wait_for(
        "passt did not listen",
        Duration::from_secs(10),
        || passt_sock.exists(),
        &passt_log,
    );

    // What `b2p start` would add for this environment.
    let out = Command::new(&b2p)
        .arg("__proxy-cmdline")
        .env_clear()
        .env("HTTP_PROXY", format!("http://127.0.0.1:{proxy_port}"))
        .env("https_proxy", format!("http://localhost:{proxy_port}/"))
        .env("NO_PROXY", "registry.b2p.test")
        .output()
        .expect("b2p __proxy-cmdline");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy_args = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        proxy_args,
        format!(
            "b2p.proxy.http=http://host.b2p.internal:{proxy_port} \
             b2p.proxy.https=http://host.b2p.internal:{proxy_port}/ b2p.proxy.no=registry.b2p.test"
        )
    );

    let (key, disk) = keyed_format_me_disk(&dir, 1024, "b2p-net-pull");
    let mut g = VsockGuest::boot_with(
        &vhost,
        &kernel,
        &initrd,
        &disk,
        &format!("b2p.ip=dhcp {proxy_args}"),
        &[
            "-netdev".into(),
            format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                passt_sock.display()
            ),
            "-device".into(),
            "virtio-net-device,netdev=n0".into(),
        ],
    );
    let what = |g: &VsockGuest, msg: &str| {
        format!(
            "{msg}\n--- passt ---\n{}\n--- registry (tail) ---\n{}\n--- tinyproxy ---\n{}\n--- dnsmasq ---\n{}\n--- console ---\n{}",
            read(&passt_log),
            read(&reg_log).lines().rev().take(15).collect::<Vec<_>>().join("\n"),
            read(&proxy_log),
            read(&dir.join("dnsmasq.log")),
            g.console()
        )
    };

    // 1. The lease (the udhcpc hook writes it to the console).
    let lease = loop {
        if let Some(l) = g.console().lines().find(|l| l.contains("eth0: DHCP lease")) {
            break l.to_string();
        }
        if let Some(st) = g.exited() {
            panic!(
                "{}",
                what(&g, &format!("QEMU exited ({st}) before a lease"))
            );
        }
        assert!(
            g.started.elapsed() < Duration::from_secs(600),
            "{}",
            what(&g, "no DHCP lease")
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let lease_at = g.started.elapsed();
    let router = lease
        .split_whitespace()
        .skip_while(|w| *w != "router")
        .nth(1)
        .and_then(|r| r.parse::<std::net::Ipv4Addr>().ok())
        .unwrap_or_else(|| panic!("{}", what(&g, &format!("no router in {lease:?}"))));

    // The DNS server: the registry's name is the gateway (the host's
    // loopback through passt); proxied.b2p.test is 127.0.0.1, which only
    // the host's proxy reaches.
    let dns_log = dir.join("dnsmasq.log");
    let _dns = spawn(
        Command::new("dnsmasq")
            .args(["--keep-in-foreground", "--conf-file=/dev/null"])
            .args(["--no-resolv", "--no-hosts", "--pid-file="])
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=53",
            ])
            .args(["--user=nobody", "--group=nogroup", "--log-queries"])
            .arg("--log-facility=-")
            .arg(format!("--host-record=registry.b2p.test,{router}"))
            .arg("--host-record=proxied.b2p.test,127.0.0.1"),
        &dns_log,
    );
    wait_for(
        "dnsmasq did not start",
        Duration::from_secs(10),
        || read(&dns_log).contains("started"),
        &dns_log,
    );

    // 2. The agent, hence the Podman service it starts, answers.
    g.wait_call(
        "io.podman.GetVersion",
        Duration::from_secs(600),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{}", what(&g, &format!("the agent never answered: {e}"))));
    let ready_at = g.started.elapsed();
    let ssh = |g: &VsockGuest, script: &str, secs: u32| g.ssh_tc(&b2p, &key, script, secs);
    let remote = "sudo podman --remote --url unix:///run/podman/podman.sock";

    // 3. The name through passt's DNS forwarding, and what the proxy
    // settings became in the guest.
    let (ok, out) = ssh(
        &g,
        "cat /etc/resolv.conf; grep host.b2p.internal /etc/hosts; \
         echo nslookup:; busybox nslookup registry.b2p.test; echo service:; \
         sudo sh -c 'for p in $(busybox pidof podman); do tr \"\\0\" \"\\n\" </proc/$p/environ; done' | grep -i _proxy= | sort -u",
        180,
    );
    let report = what(&g, &format!("guest said:\n{out}"));
    assert!(ok, "{report}");
    assert!(
        out.contains(&format!("nameserver {router}")),
        "passt did not hand out the gateway as DNS: {report}"
    );
    assert!(
        out.contains(&format!("{router}\thost.b2p.internal")),
        "{report}"
    );
    let answer = out.split("nslookup:").nth(1).unwrap_or_default();
    let answer = answer.split("service:").next().unwrap_or_default();
    assert!(
        answer
            .lines()
            .any(|l| l.contains("Address") && l.trim_end().ends_with(&router.to_string())),
        "registry.b2p.test did not resolve to {router}: {report}"
    );
    assert!(
        read(&dns_log).contains("query[A] registry.b2p.test"),
        "the query did not reach the host's dnsmasq: {report}"
    );
    let service = out.split("service:").nth(1).unwrap_or_default();
    for line in [
        format!("HTTP_PROXY=http://host.b2p.internal:{proxy_port}"),
        format!("https_proxy=http://host.b2p.internal:{proxy_port}/"),
        "NO_PROXY=registry.b2p.test".to_string(),
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "Podman's service lacks {line}: {report}"
        );
    }

    // 4. A pull from the registry on the host's loopback, not through the
    // proxy (NO_PROXY), then a run of what was pulled.
    let image = format!("registry.b2p.test:{reg_port}/b2p/busybox:pulled");
    let t = Instant::now();
    let (ok, out) = ssh(
        &g,
        &format!("{remote} pull --tls-verify=false {image}"),
        600,
    );
    let pull_took = t.elapsed();
    assert!(ok, "{}", what(&g, &format!("pull {image}: {out}")));
    let (ok, out) = ssh(
        &g,
        &format!("{remote} run --rm {image} echo pulled-from-the-hosts-loopback"),
        300,
    );
    assert!(ok, "{}", what(&g, &format!("run {image}: {out}")));
    assert!(
        out.lines().any(|l| l == "pulled-from-the-hosts-loopback"),
        "{}",
        what(&g, &out)
    );
    assert!(
        read(&reg_log).contains("/v2/b2p/busybox/manifests/pulled"),
        "{}",
        what(&g, "the registry saw no manifest request")
    );
    assert!(
        !read(&proxy_log).contains("registry.b2p.test"),
        "{}",
        what(&g, "a NO_PROXY host went through the proxy")
    );

    // 5. Through the proxy: only tinyproxy (resolving through the test's
    // DNS on the host) reaches proxied.b2p.test. The image goes first, so
    // that its layer comes through the proxy too.
    let (ok, out) = ssh(&g, &format!("{remote} rmi {image}"), 300);
    assert!(ok, "{}", what(&g, &format!("rmi {image}: {out}")));
    let proxied = format!("proxied.b2p.test:{reg_port}/b2p/busybox:pulled");
    let t = Instant::now();
    let (ok, out) = ssh(
        &g,
        &format!("{remote} pull --tls-verify=false {proxied}"),
        600,
    );
    let proxied_took = t.elapsed();
    assert!(ok, "{}", what(&g, &format!("pull {proxied}: {out}")));
    let plog = read(&proxy_log);
    assert!(
        plog.lines()
            .any(|l| l.contains("proxied.b2p.test") && l.contains("/v2/")),
        "{}",
        what(&g, "tinyproxy's log shows no request for proxied.b2p.test")
    );
    assert!(
        plog.lines()
            .any(|l| l.contains("proxied.b2p.test") && l.contains("/blobs/sha256:")),
        "{}",
        what(&g, "the layer did not come through tinyproxy")
    );
    let (ok, out) = ssh(
        &g,
        &format!("{remote} run --rm {proxied} echo pulled-through-the-proxy"),
        300,
    );
    assert!(
        ok && out.contains("pulled-through-the-proxy"),
        "{}",
        what(&g, &out)
    );

    eprintln!(
        "MEASURE: net_pull (QEMU TCG): lease {lease:?} {:.1} s after QEMU started, agent {:.1} s; \
         seeding the registry {:.2} s; podman pull from the host's loopback {:.1} s, through tinyproxy {:.1} s",
        lease_at.as_secs_f64(),
        ready_at.as_secs_f64(),
        seeded.as_secs_f64(),
        pull_took.as_secs_f64(),
        proxied_took.as_secs_f64()
    );
    drop(g);
    if std::env::var_os("B2P_KEEP_TEST_DIR").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The proxy variables of a running VM process (pid `pid`).
fn proxy_environ(pid: u64) -> Vec<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    env.split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|v| v.to_ascii_lowercase().contains("_proxy="))
        .collect()
}

#[test]
fn b2p_start_hands_its_proxy_env_to_the_vm_and_no_proxy_env_leaves_it_out() {
    let test = "b2p_start_hands_its_proxy_env_to_the_vm_and_no_proxy_env_leaves_it_out";
    if let Err(reason) = common::kvm_usable() {
        return common::skip(test, &reason);
    }
    if !have_tool("ssh-keygen") {
        return common::skip(
            test,
            "ssh-keygen not installed (apt-get install openssh-client)",
        );
    }
    let dir = common::TempDir::new("net-pull-proxy-env");
    let kernel = common::probe_kernel(&dir).display().to_string();
    let b2p = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_b2p"));
        cmd.args(args).env("XDG_DATA_HOME", dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            if !env.iter().any(|(e, _)| e == &k) {
                cmd.env_remove(k);
            }
        }
        common::run_with_deadline(cmd, Duration::from_secs(60))
    };
    let ok = |args: &[&str], env: &[(&str, &str)]| {
        let out = b2p(args, env);
        assert!(
            out.status.success() && !out.timed_out,
            "b2p {args:?}: {}",
            out.describe()
        );
        out.stdout
    };
    ok(
        &[
            "create",
            "m",
            "--network",
            "none",
            "--memory",
            "128",
            "--disk-size",
            "64",
            "--kernel",
            &kernel,
            "--cmdline",
            "probe.hold_ms=120000",
        ],
        &[],
    );
    let pid = || -> u64 {
        let v: serde_json::Value = serde_json::from_str(&ok(&["inspect", "m"], &[])).unwrap();
        v["pid"].as_u64().expect("no pid while running")
    };

    // 1. A value the command line cannot carry: one line, nothing started.
    let bad = [("HTTP_PROXY", "http://proxy corp:3128")];
    let out = b2p(&["start", "m", "--no-wait"], &bad);
    assert!(!out.status.success(), "{}", out.describe());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.describe());
    assert!(
        lines[0].contains("HTTP_PROXY") && lines[0].contains("--no-proxy-env"),
        "{}",
        out.describe()
    );
    assert_eq!(ok(&["status", "m"], &[]).trim(), "Stopped");

    // 2. --no-proxy-env: it starts, and its VM process has none of them.
    let mut env = bad.to_vec();
    env.push(("no_proxy", ".corp"));
    ok(&["start", "m", "--no-wait", "--no-proxy-env"], &env);
    let seen = proxy_environ(pid());
    ok(&["stop", "m", "--timeout", "1"], &[]);
    assert!(seen.is_empty(), "the VM process got {seen:?}");

    // 3. By default the VM process keeps them (run_vm adds what
    // `b2p __proxy-cmdline` prints for them to the guest's command line).
    let env = [
        ("https_proxy", "http://127.0.0.1:3128"),
        ("NO_PROXY", ".corp,*.lan"),
    ];
    ok(&["start", "m", "--no-wait"], &env);
    let mut seen = proxy_environ(pid());
    ok(&["stop", "m", "--timeout", "1"], &[]);
    seen.sort();
    assert_eq!(
        seen,
        ["NO_PROXY=.corp,*.lan", "https_proxy=http://127.0.0.1:3128"],
        "the VM process's proxy settings"
    );
    let words = ok(&["__proxy-cmdline"], &env);
    assert_eq!(
        words.trim(),
        "b2p.proxy.https=http://host.b2p.internal:3128 b2p.proxy.no=.corp,%2A.lan"
    );
}
