//! Guest image under real Linux, without our monitor (DESIGN.md §8 tier 3):
//! `qemu-system-x86_64 -M microvm -accel tcg` boots vmlinuz64 +
//! boot2podman.gz with virtio-blk data disks; the init runs the checks named
//! by `b2p.check=` and powers off, and each test reads the guest console.
//! Skips (loudly) when the image is not built or QEMU is missing.

#[path = "guest_image/mod.rs"]
mod support;
#[path = "guest_image/vsock.rs"]
mod vsock;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;
use vsock::{ext4_state, find_tool, Ext4State, VsockGuest};

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
    let machine = create_machine(&dir, "qemu", &["--disk-size", "256"], &kernel);
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

/// The superblock reader the shutdown test relies on: a host-made ext4 in
/// a partition is clean; with the journal-replay flag set (what an unclean
/// poweroff leaves), it says so.
#[test]
fn ext4_state_reads_the_superblock_of_the_first_partition() {
    for t in ["mkfs.ext4", "sfdisk", "debugfs"] {
        if !have_tool(t) {
            return skip(&format!("{t} not installed"));
        }
    }
    let dir = tempfile_dir("b2p-ext4state");
    let disk = dir.join("disk.raw");
    blank_disk(&disk, 64);
    sh(&format!(
        "echo 'start=2048, type=83' | sfdisk -q --label dos '{}'",
        disk.display()
    ));
    let part = dir.join("part.raw");
    blank_disk(&part, 63);
    sh(&format!("mkfs.ext4 -q -F '{}'", part.display()));
    let put = |p: &Path| {
        sh(&format!(
            "dd if='{}' of='{}' bs=512 seek=2048 conv=notrunc status=none",
            p.display(),
            disk.display()
        ))
    };
    put(&part);
    let clean = Ext4State {
        valid: true,
        errors: false,
        needs_recovery: false,
    };
    assert_eq!(ext4_state(&disk), Ok(clean));
    sh(&format!(
        "debugfs -w -R 'feature needs_recovery' '{}' >/dev/null 2>&1",
        part.display()
    ));
    put(&part);
    assert!(ext4_state(&disk).unwrap().needs_recovery);
    assert!(ext4_state(&dir.join("part.raw")).unwrap().needs_recovery);
    assert!(ext4_state(&dir.join("nope")).is_err());
    let _ = fs::remove_dir_all(&dir);
}

fn min_median_max(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Boot, a container writing to a volume, shutdown, on one data disk, many
/// times over (5 by default, `B2P_SHUTDOWN_CYCLES=20` for more): each
/// shutdown (io.b2p.Machine.Shutdown over vsock, or `sudo poweroff` as tc in
/// ssh, in turn) stops the still-writing container and Podman, ends every
/// process and unmounts the data disk, so its ext4 superblock says clean
/// with no journal to replay, no boot prints "recovery complete", and each
/// boot finds every line the earlier ones wrote. Also: tc has passwordless
/// sudo and ps, top, less, vi; the agent answers only once Podman does.
#[test]
fn shutdown_leaves_the_data_disk_clean() {
    let Some((kernel, initrd)) = prerequisites() else {
        return;
    };
    let Some(vhost) = find_tool("vhost-device-vsock") else {
        return skip("vhost-device-vsock is missing (cargo install vhost-device-vsock)");
    };
    for t in ["ssh", "ssh-keygen", "timeout"] {
        if !have_tool(t) {
            return skip(&format!("{t} not installed"));
        }
    }
    let cycles: usize = match std::env::var("B2P_SHUTDOWN_CYCLES") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .expect("B2P_SHUTDOWN_CYCLES must be a positive number"),
        Err(_) => 5,
    };
    let _g = boot_lock();
    let dir = tempfile_dir("b2p-shutdown");
    let b2p = Path::new(env!("CARGO_BIN_EXE_b2p"));
    let machine = create_machine(&dir, "shut", &["--disk-size", "512"], &kernel);
    let disk = machine.join("disk.raw");
    let key = machine.join("id_ed25519");
    let image = "docker.io/library/busybox:latest";
    let initrd = lz4_initrd().unwrap_or(initrd);
    let long = Duration::from_secs(600);

    let mut shutdowns = Vec::new();
    let mut in_guest = Vec::new();
    let mut to_version = Vec::new();
    for cycle in 0..cycles {
        let mut g = VsockGuest::boot(&vhost, &kernel, &initrd, &disk, "b2p.ip=off");
        let at = |g: &VsockGuest, what: &str| format!("cycle {cycle}: {what}:\n{}", g.console());
        // The agent opens its port once Podman answers: the first call
        // made, GetVersion, needs no Podman start.
        let v = g.wait_call("io.podman.GetVersion", long, Duration::from_secs(60));
        to_version.push(g.started.elapsed());
        let v = v.unwrap_or_else(|e| panic!("{}", at(&g, &format!("GetVersion: {e}"))));
        assert_eq!(v["remote_api_version"], 1, "{v}");
        let st = g
            .call("io.b2p.Machine.GetStatus", serde_json::json!({}), long)
            .unwrap_or_else(|e| panic!("{}", at(&g, &e)));
        let st = &st["status"];
        assert_eq!(st["podman_ready"], true, "{st}");
        assert_eq!(st["data_disk"]["state"], "mounted", "{st}");
        let names: Vec<&str> = st["milestones"]
            .as_array()
            .map(|m| m.iter().filter_map(|e| e["name"].as_str()).collect())
            .unwrap_or_default();
        let pos = |n: &str| names.iter().position(|m| *m == n);
        assert!(
            pos("podman-ready").is_some() && pos("podman-ready") < pos("agent-listening"),
            "milestones: {st}"
        );
        // agent.sh's --wait-milestone: the busybox image is in before the
        // agent opens its ports.
        assert!(
            pos("busybox-image").is_some() && pos("busybox-image") < pos("agent-listening"),
            "milestones: {st}"
        );

        // A container that reads what the earlier boots wrote, adds its
        // line, and keeps writing until the shutdown stops it.
        let script = format!(
            "cat /data/log 2>/dev/null; echo cycle-{cycle} >>/data/log && echo written; \
             while :; do date >>/data/ticks; sleep 1; done"
        );
        let c = g
            .call(
                "io.podman.CreateContainer",
                serde_json::json!({"create": {"args": [image, "sh", "-c", script],
                    "volume": ["b2p-shutdown:/data"], "name": format!("writer-{cycle}")}}),
                long,
            )
            .unwrap_or_else(|e| panic!("{}", at(&g, &e)));
        let id = c["container"].as_str().unwrap_or_default().to_string();
        g.call(
            "io.podman.StartContainer",
            serde_json::json!({"name": id}),
            long,
        )
        .unwrap_or_else(|e| panic!("{}", at(&g, &e)));
        let deadline = Instant::now() + Duration::from_secs(300);
        let lines = loop {
            let l = g
                .call(
                    "io.podman.GetContainerLogs",
                    serde_json::json!({"name": id}),
                    long,
                )
                .unwrap_or_else(|e| panic!("{}", at(&g, &e)));
            let lines: Vec<String> = l["container"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if lines.iter().any(|l| l == "written") {
                break lines;
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                at(&g, &format!("the writer never wrote: {lines:?}"))
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let expected: Vec<String> = (0..cycle).map(|i| format!("cycle-{i}")).collect();
        let kept: Vec<String> = lines
            .iter()
            .filter(|l| l.starts_with("cycle-"))
            .cloned()
            .collect();
        assert_eq!(
            kept,
            expected,
            "{}",
            at(&g, "the volume lost lines of earlier boots")
        );

        // The clock starts at the request: for ssh, at the login that
        // runs poweroff (its own login time included).
        let t = if cycle % 2 == 0 {
            let t = Instant::now();
            g.call("io.b2p.Machine.Shutdown", serde_json::json!({}), long)
                .unwrap_or_else(|e| panic!("{}", at(&g, &e)));
            t
        } else {
            // tc, boot2podman's user: passwordless sudo and the usual tools.
            let out = g.ssh(
                b2p,
                &key,
                "tc",
                "sudo -n id -u && ps >/dev/null && for t in top less vi; do command -v $t; done",
                300,
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.starts_with("0\n") && text.lines().count() == 4,
                "{}",
                at(
                    &g,
                    &format!(
                        "sudo/ps/top/less/vi as tc: {text}{}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                )
            );
            let t = Instant::now();
            // The session ends with the guest: its status does not matter.
            let _ = g.ssh(b2p, &key, "tc", "sudo poweroff", 300);
            t
        };
        let exited = g.wait_exit(Duration::from_secs(300));
        if cycle % 2 == 0 {
            shutdowns.push(t.elapsed());
        }
        let console = g.console();
        assert!(
            exited.is_some(),
            "{}",
            at(&g, "QEMU still running 300 s after the shutdown")
        );
        assert!(
            console.contains("b2p: shutdown: stopping"),
            "{}",
            at(&g, "the shutdown script did not run")
        );
        assert!(
            console.contains("; data disk unmounted"),
            "{}",
            at(&g, "the data disk was not unmounted")
        );
        // The script's own time, as it logs it ("done in 4.21 s; ...").
        if let Some(secs) = console
            .lines()
            .find_map(|l| l.split("b2p: shutdown: done in ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
        {
            in_guest.push(Duration::from_secs_f64(secs));
        }
        // A process that needed SIGKILL is the fallback working ("not ended
        // ... SIGKILL"); these are what puts data at risk.
        let said: Vec<&str> = console
            .lines()
            .filter(|l| l.contains("b2p: shutdown: "))
            .collect();
        assert!(
            !said.iter().any(|l| l.contains("failed")),
            "{}",
            at(&g, "a shutdown step failed")
        );
        for bad in [
            "applet not found",
            "still there after SIGKILL",
            "still mounted",
            "recovery complete",
        ] {
            assert!(
                !console.contains(bad),
                "{}",
                at(&g, &format!("console says {bad:?}"))
            );
        }
        assert_eq!(
            ext4_state(&disk),
            Ok(Ext4State {
                valid: true,
                errors: false,
                needs_recovery: false
            }),
            "{}",
            at(&g, "the data filesystem is not clean")
        );
        drop(g);
    }
    let (smin, smed, smax) = min_median_max(&mut shutdowns);
    let (vmin, vmed, vmax) = min_median_max(&mut to_version);
    assert_eq!(in_guest.len(), cycles, "a shutdown did not log its time");
    let (gmin, gmed, gmax) = min_median_max(&mut in_guest);
    eprintln!(
        "FIGURES: {cycles} boot/shutdown cycles, all clean; io.b2p.Machine.Shutdown -> QEMU \
         exit min {smin:.1?} median {smed:.1?} max {smax:.1?}; the shutdown script \
         min {gmin:.1?} median {gmed:.1?} max {gmax:.1?}; QEMU start -> first GetVersion \
         answered min {vmin:.1?} median {vmed:.1?} max {vmax:.1?}"
    );
    let _ = fs::remove_dir_all(&dir);
}
