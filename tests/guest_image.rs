//! Guest image under real Linux, without our monitor (DESIGN.md §8 tier 3):
//! `qemu-system-x86_64 -M microvm -accel tcg` boots vmlinuz64 +
//! boot2podman.gz with virtio-blk data disks; the init runs the checks named
//! by `b2p.check=` and powers off, and each test reads the guest console.
//! Skips (loudly) when the image is not built or QEMU is missing.

#[path = "guest_image/mod.rs"]
mod support;

use std::fs;
use std::time::Duration;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(420);
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB2pB2pB2pB2pB2pB2pB2pB2pB2pB2pB2pB2pB2p b2p-test";

fn prerequisites() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let img = image()?;
    if !have_tool("qemu-system-x86_64") {
        skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)");
        return None;
    }
    for t in ["tar", "mkfs.ext4", "sfdisk", "blkid"] {
        if !have_tool(t) {
            skip(&format!("{t} not installed"));
            return None;
        }
    }
    Some(img)
}

/// A fresh format-me disk carrying authorized_keys ends partitioned,
/// formatted, labelled and mounted with the keys extracted; `podman run`
/// prints hello through crun on cgroup v2; eth0 is set from `ip=`; a second
/// boot on the same disk keeps the image and the file of the first and does
/// not reformat.
#[test]
fn format_me_disk_then_second_boot_keeps_data() {
    let Some((kernel, initrd)) = prerequisites() else {
        return;
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-formatme");
    let disk = dir.join("disk.raw");
    format_me_disk(&disk, 512, KEY);

    let b1 = boot_qemu(
        &kernel,
        &initrd,
        &[&disk],
        "ip=10.0.2.15::10.0.2.2:255.255.255.0:b2ptest:eth0:off:10.0.2.3 \
         b2p.check=disk,info,hello,persist-write,net",
        TIMEOUT,
    );
    let d = b1.dump();
    assert!(b1.has("b2p: userspace ready"), "{d}");
    assert!(
        b1.has("disk vda: starts with 'boot2podman, please format-me': keeping userdata.tar"),
        "{d}"
    );
    let disk1 = b1.check("data=").unwrap_or_default();
    assert!(
        disk1.starts_with("/dev/vda1 label=boot2podman-data type=ext4"),
        "{d}"
    );
    assert!(
        b1.check("keys /home/tc/.ssh/authorized_keys 1 ssh-ed25519")
            .is_some(),
        "{d}"
    );
    assert!(
        b1.check("keys /root/.ssh/authorized_keys 1 ssh-ed25519")
            .is_some(),
        "{d}"
    );
    assert!(b1.has("b2p-check: bound /var/lib/containers"), "{d}");
    assert!(b1.has("b2p-check: bound /var/lib/boot2podman"), "{d}");
    let info = b1.check("info").unwrap_or_default();
    assert!(
        info.contains("runtime=crun") && info.contains("cgroups=v2"),
        "{d}"
    );
    assert!(
        info.contains("manager=cgroupfs") && info.contains("driver=overlay"),
        "{d}"
    );
    assert_eq!(b1.check("hello").as_deref(), Some("rc=0 out=hello"), "{d}");
    let written = b1.check("persist-write").unwrap_or_default();
    assert!(written.starts_with("rc=0 file=kept-"), "{d}");
    let kept = written.trim_start_matches("rc=0 file=").to_string();
    assert!(
        b1.check("net")
            .unwrap_or_default()
            .starts_with("10.0.2.15/24 route default via 10.0.2.2"),
        "{d}"
    );

    // The host sees the partition and the label.
    let pt = sh(&format!("sfdisk -d '{}'", disk.display()));
    assert!(pt.contains("label: dos") && pt.contains("type=83"), "{pt}");

    let b2 = boot_qemu(
        &kernel,
        &initrd,
        &[&disk],
        "b2p.boot_timer=1 b2p.check=disk,persist-read,hello",
        TIMEOUT,
    );
    let d2 = b2.dump();
    assert!(
        b2.has("data disk: /dev/vda1 (label boot2podman-data)"),
        "{d2}"
    );
    assert!(!b2.has("formatting"), "second boot reformatted: {d2}");
    // Same filesystem (UUID) as the first boot.
    assert_eq!(b2.check("data=").unwrap_or_default(), disk1, "{d2}");
    assert_eq!(
        b2.check("persist-read"),
        Some(format!("image=0 file={kept}")),
        "{d2}"
    );
    assert!(
        b2.check("keys /home/tc/.ssh/authorized_keys 1 ssh-ed25519")
            .is_some(),
        "{d2}"
    );
    assert_eq!(b2.check("hello").as_deref(), Some("rc=0 out=hello"), "{d2}");
    assert!(b2.has("b2p: boot timer written"), "{d2}");
    assert!(
        !b2.has("busybox image loaded"),
        "image reloaded on the second boot: {d2}"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// A disk already labelled boot2podman-data (made on the host, with a file
/// in it) is mounted and never reformatted. Boots the lz4 initramfs when the
/// build made one, so both compressions are covered.
#[test]
fn labelled_disk_is_mounted_not_reformatted() {
    let Some((kernel, initrd)) = prerequisites() else {
        return;
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-labelled");
    let content = dir.join("content");
    fs::create_dir_all(content.join("var/lib/boot2podman")).unwrap();
    fs::write(
        content.join("var/lib/boot2podman/keep.txt"),
        "made-on-host\n",
    )
    .unwrap();
    let disk = dir.join("disk.raw");
    blank_disk(&disk, 256);
    sh(&format!(
        "mkfs.ext4 -q -F -L boot2podman-data -d '{}' '{}'",
        content.display(),
        disk.display()
    ));
    let uuid = sh(&format!("blkid -o value -s UUID '{}'", disk.display()));

    let initrd = lz4_initrd().unwrap_or(initrd);
    let b = boot_qemu(
        &kernel,
        &initrd,
        &[&disk],
        "b2p.check=disk,persist-read",
        TIMEOUT,
    );
    let d = b.dump();
    assert!(b.has("data disk: /dev/vda (label boot2podman-data)"), "{d}");
    assert!(!b.has("formatting"), "{d}");
    assert_eq!(
        b.check("data=").as_deref(),
        Some(format!("/dev/vda label=boot2podman-data type=ext4 uuid={uuid}").as_str()),
        "{d}"
    );
    assert!(
        b.check("persist-read")
            .unwrap_or_default()
            .ends_with("file=made-on-host"),
        "{d}"
    );
    assert_eq!(
        sh(&format!("blkid -o value -s UUID '{}'", disk.display())),
        uuid
    );
    let _ = fs::remove_dir_all(&dir);
}

/// A disk with another (unlabelled) filesystem and a disk with a partition
/// table are never touched, byte for byte; a blank disk next to them is
/// partitioned and formatted, as boot2podman did.
#[test]
fn foreign_disks_untouched_blank_disk_formatted() {
    let Some((kernel, initrd)) = prerequisites() else {
        return;
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-foreign");
    let fsdisk = dir.join("ext4.raw");
    blank_disk(&fsdisk, 64);
    sh(&format!("mkfs.ext4 -q -F -L other '{}'", fsdisk.display()));
    let ptdisk = dir.join("mbr.raw");
    blank_disk(&ptdisk, 64);
    sh(&format!(
        "echo 'type=83' | sfdisk -q --label dos '{}'",
        ptdisk.display()
    ));
    let blank = dir.join("blank.raw");
    blank_disk(&blank, 256);
    let (s1, s2) = (sha256(&fsdisk), sha256(&ptdisk));

    let b = boot_qemu(
        &kernel,
        &initrd,
        &[&fsdisk, &ptdisk, &blank],
        "b2p.check=disk",
        TIMEOUT,
    );
    let d = b.dump();
    assert!(
        b.has("disk vda: has a partition table or filesystem"),
        "{d}"
    );
    assert!(
        b.has("disk vdb: has a partition table or filesystem"),
        "{d}"
    );
    assert!(b.has("disk vdc: blank: partitioning, formatting"), "{d}");
    assert!(
        b.check("data=")
            .unwrap_or_default()
            .starts_with("/dev/vdc1 label=boot2podman-data type=ext4"),
        "{d}"
    );
    assert_eq!(sha256(&fsdisk), s1, "the ext4 disk was modified");
    assert_eq!(sha256(&ptdisk), s2, "the partitioned disk was modified");

    // Without any usable disk the guest runs from RAM and touches nothing.
    let b = boot_qemu(
        &kernel,
        &initrd,
        &[&fsdisk, &ptdisk],
        "b2p.check=disk",
        TIMEOUT,
    );
    let d = b.dump();
    assert!(b.has("no boot2podman-data disk: running from RAM"), "{d}");
    assert_eq!(b.check("data=").as_deref(), Some("none"), "{d}");
    assert_eq!(sha256(&fsdisk), s1, "the ext4 disk was modified");
    assert_eq!(sha256(&ptdisk), s2, "the partitioned disk was modified");
    let _ = fs::remove_dir_all(&dir);
}

/// The data disk `b2p create` makes (the manager's format-me tar with the
/// machine's own SSH key) is the one the image's init formats: labelled,
/// mounted, the key extracted byte for byte.
#[test]
fn disk_made_by_b2p_create_is_formatted_with_its_key() {
    let Some((kernel, initrd)) = prerequisites() else {
        return;
    };
    if !have_tool("ssh-keygen") {
        return skip("ssh-keygen not installed (apt-get install openssh-client)");
    }
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-create-disk");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_b2p"))
        .args(["create", "qemu", "--disk-size", "256", "--kernel"])
        .arg(&kernel)
        .env("XDG_DATA_HOME", &dir)
        .output()
        .expect("run b2p create");
    assert!(
        out.status.success(),
        "b2p create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let machine = dir.join("b2p/machines/qemu");
    let public = fs::read_to_string(machine.join("id_ed25519.pub")).unwrap();
    let disk = machine.join("disk.raw");

    let b = boot_qemu(&kernel, &initrd, &[&disk], "b2p.check=disk", TIMEOUT);
    let d = b.dump();
    assert!(
        b.has("disk vda: starts with 'boot2podman, please format-me': keeping userdata.tar"),
        "{d}"
    );
    assert!(
        b.check("data=")
            .unwrap_or_default()
            .starts_with("/dev/vda1 label=boot2podman-data type=ext4"),
        "{d}"
    );
    // The check prints the key's first 60 bytes.
    let head: String = public.chars().take(60).collect();
    assert!(
        b.check(&format!("keys /home/tc/.ssh/authorized_keys 1 {head}"))
            .is_some(),
        "the machine's key did not reach /home/tc: {d}"
    );
    assert!(b.has("b2p-check: bound /var/lib/containers"), "{d}");
    let _ = fs::remove_dir_all(&dir);
}
