//! The docker CLI against a machine's Podman (issue 10): Debian's docker.io
//! client (`/usr/bin/docker`, no daemon) with `DOCKER_HOST` exactly as
//! `b2p env` prints it for a machine `b2p create` made, talking to Podman's
//! Docker-compatible API in the guest image under QEMU TCG. The host's
//! socket at that path is joined to the guest's vsock port 1025 (the
//! agent's relay to Podman's REST socket) by socat running `b2p
//! __vsock-proxy` per connection, where the VM process of `b2p start`
//! would serve it (b2p-vmm cannot boot real Linux on this PVM host).
//! Checked: `docker run --rm busybox echo hi` prints hi and exits 0, a
//! named container shows in `docker ps -a` as exited, `docker version`
//! names Podman's engine.

// Only part of the shared rig is used here.
#![allow(dead_code)]

#[path = "guest_image/mod.rs"]
mod support;
#[path = "common/vhost_half_close.rs"]
mod vhost_half_close;
#[path = "guest_image/vsock.rs"]
mod vsock;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;
use vsock::VsockGuest;

/// Debian's docker.io client (not whatever `docker` is first on PATH).
const DOCKER: &str = "/usr/bin/docker";

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn docker_cli_runs_busybox_through_b2p_envs_docker_host_under_qemu_tcg() {
    let Some((kernel, initrd)) = image() else {
        return;
    };
    let initrd = lz4_initrd().unwrap_or(initrd);
    if !have_tool("qemu-system-x86_64") {
        return skip("docker_cli: QEMU is not installed (apt-get install qemu-system-x86)");
    }
    if !Path::new(DOCKER).is_file() {
        return skip("docker_cli: /usr/bin/docker is not installed (apt-get install --no-install-recommends docker.io)");
    }
    if !have_tool("socat") {
        return skip("docker_cli: socat is not installed (apt-get install socat)");
    }
    let vhost = match vhost_half_close::patched_vhost() {
        Ok(bin) => bin,
        Err(why) => {
            return skip(&format!(
                "docker_cli: no vhost-device-vsock with half-closes ({why})"
            ))
        }
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-docker-cli");
    let b2p = Path::new(env!("CARGO_BIN_EXE_b2p"));
    let machine = create_machine(&dir, "dock", &["--disk-size", "512"], &kernel);
    let env = b2p_ok(&dir, &["env", "dock"]);
    let docker_host = env
        .lines()
        .find_map(|l| l.strip_prefix("export DOCKER_HOST="))
        .unwrap_or_else(|| panic!("b2p env printed no DOCKER_HOST: {env}"))
        .to_string();
    let container_host = env
        .lines()
        .find_map(|l| l.strip_prefix("export CONTAINER_HOST="))
        .unwrap_or_else(|| panic!("b2p env no longer prints CONTAINER_HOST: {env}"));
    assert_eq!(docker_host, container_host, "one socket for both: {env}");
    let sock = docker_host
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("DOCKER_HOST {docker_host} is not unix://"))
        .to_string();
    assert!(sock.starts_with(&machine.display().to_string()), "{sock}");

    let disk = machine.join("disk.raw");
    let mut g = VsockGuest::boot(&vhost, &kernel, &initrd, &disk, "b2p.ip=off");
    let answered = g.wait_agent("io.podman.GetVersion", Duration::from_secs(30));

    // What the VM process serves at podman.sock: each connection joined to
    // guest vsock port 1025.
    let _relay = Kill(
        // -t: after the docker client's half-close (it shuts its side of
        // an attach at once when it sends no stdin), wait for the output
        // instead of socat's default half second.
        Command::new("socat")
            .args(["-t", "3600"])
            .arg(format!("UNIX-LISTEN:{sock},fork,unlink-early"))
            .arg(format!(
                "EXEC:{} __vsock-proxy {} 1025",
                b2p.display(),
                g.uds().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("socat.log")).unwrap())
            .spawn()
            .expect("starting socat"),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !Path::new(&sock).exists() {
        assert!(Instant::now() < end, "socat did not listen on {sock}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The docker client, with nothing of this host's docker configuration.
    let cfg = dir.join("docker-config");
    std::fs::create_dir_all(&cfg).unwrap();
    let docker = |args: &[&str]| -> (Output, Duration) {
        let t = Instant::now();
        let out = Command::new("timeout")
            .arg("300")
            .arg(DOCKER)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &dir)
            .env("DOCKER_CONFIG", &cfg)
            .env("DOCKER_HOST", &docker_host)
            .stdin(Stdio::null())
            .output()
            .expect("running /usr/bin/docker");
        (out, t.elapsed())
    };
    let (version, _) = docker(&[
        "version",
        "--format",
        "{{.Server.Version}} {{range .Server.Components}}{{.Name}} {{end}}",
    ]);
    let diag = |what: &str, o: &Output| {
        format!(
            "{what}: {}\n--- socat ---\n{}\n--- console ---\n{}",
            text(o),
            std::fs::read_to_string(dir.join("socat.log")).unwrap_or_default(),
            g.console()
        )
    };
    assert!(
        version.status.success(),
        "{}",
        diag("docker version", &version)
    );
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    assert!(version.contains("Podman Engine"), "server: {version}");

    let (hi, hi_took) = docker(&["run", "--rm", "busybox", "echo", "hi"]);
    assert!(hi.status.success(), "{}", diag("docker run --rm", &hi));
    assert_eq!(String::from_utf8_lossy(&hi.stdout), "hi\n", "{}", text(&hi));

    let (named, _) = docker(&["run", "--name", "b2p-docker-ps", "busybox", "echo", "named"]);
    assert!(
        named.status.success(),
        "{}",
        diag("docker run --name", &named)
    );
    assert_eq!(String::from_utf8_lossy(&named.stdout), "named\n");
    let (ps, _) = docker(&["ps", "-a", "--format", "{{.Names}}|{{.Image}}|{{.Status}}"]);
    assert!(ps.status.success(), "{}", diag("docker ps -a", &ps));
    let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
    let row = ps
        .lines()
        .find(|l| l.starts_with("b2p-docker-ps|"))
        .unwrap_or_else(|| panic!("docker ps -a does not list b2p-docker-ps:\n{ps}"));
    assert!(row.contains("busybox"), "{row}");
    assert!(row.contains("Exited (0)"), "{row}");
    // The --rm one is gone.
    assert_eq!(
        ps.lines().count(),
        1,
        "docker ps -a lists more than the named container:\n{ps}"
    );
    let (rm, _) = docker(&["rm", "b2p-docker-ps"]);
    assert!(rm.status.success(), "{}", diag("docker rm", &rm));
    eprintln!(
        "MEASURE: docker_cli: server {version}; agent answered {:.1} s after QEMU started; \
         docker run --rm busybox echo hi took {:.2} s (QEMU TCG)",
        answered.as_secs_f64(),
        hi_took.as_secs_f64()
    );
    drop(g);
    let _ = std::fs::remove_dir_all(&dir);
}
