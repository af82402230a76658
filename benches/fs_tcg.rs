//! virtio-fs under QEMU TCG against the same work on the host (issue 13
//! must-show 3; TCG figures: the guest's side measures this machine's
//! instruction emulator as much as virtio-fs). The guest image boots with a
//! `vhost-user-fs-device` on a real virtiofsd (`--cache auto`, its default)
//! and mounts the tag on /data (`b2p.fs=vol:/data`); over ssh (vsock port
//! 22) it times, inside the guest:
//! - a sequential read of a 256 MiB file (`cat > /dev/null`),
//! - a stat walk of 10,000 files in 100 folders (`find -printf %s`),
//!
//! twice each (the second run finds what the first cached), and the host
//! does the same on the folder itself. `cargo bench --bench fs_tcg`
//! (minutes: the image's boot under TCG dominates).

#![allow(dead_code)]

#[path = "../tests/guest_image/mod.rs"]
mod support;
#[path = "../tests/guest_image/vsock.rs"]
mod vsock;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use vsock::{find_tool, VsockGuest};

const BIG_MIB: usize = 256;
const FILES: usize = 10_000;

/// The guest-side script: `name seconds` lines.
const SCRIPT: &str = r#"t() { s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo "$((e - s))"; }
for i in 1 2; do
  echo "read$i $(t cat /data/big.bin)"
  echo "walk$i $(t find /data/tree -type f -printf '%s\n')"
done
echo "count $(find /data/tree -type f | wc -l)""#;

fn host_ns(f: impl Fn()) -> u64 {
    let t = Instant::now();
    f();
    t.elapsed().as_nanos() as u64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some((kernel, initrd)) = image() else {
        return;
    };
    let initrd = lz4_initrd().unwrap_or(initrd);
    for t in ["qemu-system-x86_64", "ssh", "ssh-keygen"] {
        if !have_tool(t) {
            return skip(&format!("bench fs_tcg: {t} is not installed"));
        }
    }
    let Some(vhost) = find_tool("vhost-device-vsock") else {
        return skip("bench fs_tcg: vhost-device-vsock is not installed");
    };
    let Some(virtiofsd) = b2p_vmm::virtiofsd::find_virtiofsd() else {
        return skip("bench fs_tcg: virtiofsd is not installed (cargo install virtiofsd)");
    };
    let dir = tempfile_dir("b2p-bench-fs");
    let share = dir.join("share");
    std::fs::create_dir_all(share.join("tree")).unwrap();
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut big = Vec::with_capacity(BIG_MIB << 20);
    for _ in 0..BIG_MIB {
        big.extend_from_slice(&block);
    }
    std::fs::write(share.join("big.bin"), &big).unwrap();
    drop(big);
    for i in 0..FILES {
        let d = share.join(format!("tree/d{:02}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir(&d).unwrap();
        }
        std::fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
    }
    let sock = dir.join("vfs.sock");
    let mut daemon = Command::new(&virtiofsd)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&share)
        .args(["--sandbox=none", "--log-level=error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting virtiofsd");
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let b2p = Path::new(env!("CARGO_BIN_EXE_b2p"));
    let args = ["--disk-size", "512", "--volume", "none"];
    let machine = create_machine(&dir, "fsb", &args, &kernel);
    let disk = machine.join("disk.raw");
    let mut g = VsockGuest::boot_virtiofs(&vhost, &kernel, &initrd, &disk, &sock);
    if let Err(e) = g.wait_call(
        "io.podman.GetVersion",
        Duration::from_secs(600),
        Duration::from_secs(30),
    ) {
        eprintln!(
            "bench fs_tcg: the agent never answered: {e}\n{}",
            g.console()
        );
        std::process::exit(1);
    }
    let o = g.ssh(b2p, &machine.join("id_ed25519"), "tc", SCRIPT, 1800);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if get("count") != Some(FILES as u64) {
        eprintln!(
            "bench fs_tcg: the guest's run failed\n{text}\n{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            g.console()
        );
        std::process::exit(1);
    }
    let _ = g.ssh(b2p, &machine.join("id_ed25519"), "tc", "sudo poweroff", 120);
    drop(g);
    let _ = daemon.kill();
    let _ = daemon.wait();

    let host_read = || {
        host_ns(|| {
            let mut f = std::fs::File::open(share.join("big.bin")).unwrap();
            std::io::copy(&mut f, &mut std::io::sink()).unwrap();
        })
    };
    let host_walk = || {
        host_ns(|| {
            let n = Command::new("find")
                .arg(share.join("tree"))
                .args(["-type", "f", "-printf", "%s\n"])
                .stdout(Stdio::piped())
                .output()
                .unwrap()
                .stdout
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            assert_eq!(n, FILES);
        })
    };
    let host = [host_read(), host_walk(), host_read(), host_walk()];
    let guest = [
        get("read1").unwrap_or(0),
        get("walk1").unwrap_or(0),
        get("read2").unwrap_or(0),
        get("walk2").unwrap_or(0),
    ];
    let ms = |ns: u64| format!("{:.1}", ns as f64 / 1e6);
    println!("virtio-fs under QEMU TCG (guest) against the host, ms; ratio = guest / host");
    println!("| work | run | guest (TCG) | host | ratio |");
    println!("|---|---|---|---|---|");
    let names = [
        "read 256 MiB",
        "stat walk 10,000 files",
        "read 256 MiB",
        "stat walk 10,000 files",
    ];
    for i in 0..4 {
        println!(
            "| {} | {} | {} | {} | {:.1} |",
            names[i],
            1 + i / 2,
            ms(guest[i]),
            ms(host[i]),
            guest[i] as f64 / host[i].max(1) as f64
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
