//! Host folders over virtio-fs with real Linux (issue 13 must-show 2):
//! QEMU TCG boots the guest image with a `vhost-user-fs-device` served by a
//! real virtiofsd (memfd guest memory, share=on, as for vsock) and
//! `b2p.fs=vol:/data` on the command line; the image's init mounts the tag
//! before Podman starts. Through the host's `podman --remote` (vsock port
//! 1025), a busybox container with `-v /data:/data` reads a host file and
//! writes one, which appears on the host owned by the user virtiofsd runs
//! as (an unprivileged one: `nobody` when the test runs as root), and
//! `podman --remote build` of a Containerfile in the shared folder works.

// Only part of the shared rig is used here.
#![allow(dead_code)]

#[path = "guest_image/mod.rs"]
mod support;
#[path = "guest_image/vsock.rs"]
mod vsock;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;
use vsock::{find_tool, hybrid_proxy, VsockGuest};

#[test]
fn a_container_reads_and_writes_a_host_folder_under_qemu_tcg() {
    let Some((kernel, initrd)) = image() else {
        return;
    };
    let initrd = lz4_initrd().unwrap_or(initrd);
    for t in ["qemu-system-x86_64", "podman"] {
        if !have_tool(t) {
            return skip(&format!("guest_image_fs: {t} is not installed"));
        }
    }
    let Some(vhost) = find_tool("vhost-device-vsock") else {
        return skip("guest_image_fs: vhost-device-vsock is not installed");
    };
    let Some(virtiofsd) = b2p_vmm::virtiofsd::find_virtiofsd() else {
        return skip("guest_image_fs: virtiofsd is not installed (cargo install virtiofsd)");
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-fs-guest");
    // The folder and virtiofsd belong to an unprivileged user.
    let (uid, gid) = if is_root() {
        (65534, 65534)
    } else {
        // SAFETY: getuid/getgid have no preconditions.
        unsafe { (libc::getuid(), libc::getgid()) }
    };
    let share = dir.join("share");
    let run = dir.join("run");
    for d in [&share, &run] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(share.join("in.txt"), "hello from the host\n").unwrap();
    std::fs::write(
        share.join("Containerfile"),
        "FROM docker.io/library/busybox:latest\nCOPY in.txt /in.txt\nRUN cat /in.txt\n",
    )
    .unwrap();
    for f in ["in.txt", "Containerfile"] {
        std::os::unix::fs::chown(share.join(f), Some(uid), Some(gid)).unwrap();
    }
    let sock = run.join("vfs.sock");
    // Its binary may lie where that user cannot reach (~root/.cargo/bin).
    let virtiofsd = if is_root() {
        let copy = dir.join("virtiofsd");
        std::fs::copy(&virtiofsd, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    } else {
        virtiofsd
    };
    let mut cmd = Command::new(&virtiofsd);
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&share)
        .args(["--sandbox=none", "--rlimit-nofile=0", "--log-level=warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("virtiofsd.log")).unwrap());
    if is_root() {
        cmd.uid(uid).gid(gid);
    }
    let _daemon = Kill(cmd.spawn().expect("starting virtiofsd"));
    assert!(
        wait_until(Duration::from_secs(20), || sock.exists()).is_some(),
        "virtiofsd did not listen"
    );

    let disk = create_machine(&dir, "fs", &["--disk-size", "512"], &kernel).join("disk.raw");
    let mut g = VsockGuest::boot_virtiofs(&vhost, &kernel, &initrd, &disk, &sock);
    g.wait_agent("io.podman.GetVersion", Duration::from_secs(30));
    assert!(
        g.console().contains("b2p: host folder: vol on /data"),
        "the init did not mount the tag\n{}",
        g.console()
    );

    let psock = dir.join("podman.sock");
    hybrid_proxy(&psock, g.uds().to_path_buf(), 1025);
    let url = format!("unix://{}", psock.display());
    let podman = |args: &[&str]| {
        let out = Command::new("timeout")
            .arg("900")
            .arg("podman")
            .arg("--remote")
            .arg("--url")
            .arg(&url)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running podman --remote");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = podman(&[
        "run",
        "--rm",
        "-v",
        "/data:/data",
        "docker.io/library/busybox:latest",
        "sh",
        "-c",
        "cat /data/in.txt && echo written in a container > /data/out.txt",
    ]);
    assert!(ok, "podman run: {stderr}\n{}", g.console());
    assert_eq!(stdout, "hello from the host\n", "{stderr}");
    let out = share.join("out.txt");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "written in a container\n"
    );
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (uid, gid),
        "the container's file is not the host user's"
    );

    let ctx = share.display().to_string();
    let (ok, stdout, stderr) = podman(&["build", "-t", "b2p-fs-test", &ctx]);
    assert!(ok, "podman build: {stdout}\n{stderr}");
    assert!(stdout.contains("hello from the host"), "{stdout}\n{stderr}");
}
