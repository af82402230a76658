//! The manager CLI `b2p` (podman-machine's verbs) on real files and, where
//! /dev/kvm works, a real VM: the probe guest stands in for the guest image
//! (which cannot boot on this workplace's PVM KVM, DESIGN.md §8) so that
//! start, status, stop and the disk lock run for real. The guest-image side
//! of a `b2p create` disk (formatted, keys extracted) is checked under QEMU
//! in tests/guest_image.rs.

mod common;

use common::home::*;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn tar_entries(disk: &Path) -> Vec<(String, Vec<u8>)> {
    let head = std::fs::read(disk).unwrap();
    let mut a = tar::Archive::new(&head[..4096]);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut body).unwrap();
            (name, body)
        })
        .collect()
}

#[test]
fn create_ls_inspect_env_rm() {
    if no_ssh_keygen("manager_create") {
        return;
    }
    let h = Home::new("manager_create");
    let kernel = write_file(&h.dir, "vmlinuz", b"not booted by this test");
    let k = kernel.display().to_string();
    let out = h.ok(&[
        "create",
        "dev",
        "--memory",
        "1024",
        "--cpus",
        "2",
        "--disk-size",
        "512",
        "--kernel",
        &k,
    ]);
    assert!(out.contains("Machine dev created"), "{out}");
    let dir = h.machine_dir("dev");

    // The data disk: sparse, 512 MiB, a format-me tar carrying the key.
    let disk = dir.join("disk.raw");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 512 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "the disk is not sparse");
    let entries = tar_entries(&disk);
    assert_eq!(entries[0].0, "boot2podman, please format-me");
    let public = std::fs::read(dir.join("id_ed25519.pub")).unwrap();
    assert!(public.starts_with(b"ssh-ed25519 "));
    let keys = entries
        .iter()
        .find(|(n, _)| n == ".ssh/authorized_keys")
        .expect("no .ssh/authorized_keys in the userdata tar");
    assert_eq!(keys.1, public);
    let mode = std::fs::metadata(dir.join("id_ed25519")).unwrap().mode();
    assert_eq!(mode & 0o077, 0, "the private key is readable by others");

    let ls = h.ok(&["ls"]);
    let row = ls.lines().find(|l| l.starts_with("dev ")).expect(&ls);
    assert!(row.contains("Stopped") && row.contains("1024MiB"), "{ls}");
    assert_eq!(h.ok(&["status", "dev"]).trim(), "Stopped");
    let inspect: serde_json::Value = serde_json::from_str(&h.ok(&["inspect", "dev"])).unwrap();
    assert_eq!(inspect["state"], "Stopped");
    assert_eq!(inspect["config"]["cpus"], 2);
    assert_eq!(inspect["config"]["kernel"], k);
    let env = h.ok(&["env", "dev"]);
    assert!(env.contains(&format!(
        "export CONTAINER_HOST=unix://{}/podman.sock",
        dir.display()
    )));
    assert!(env.contains(&format!(
        "export VARLINK_ADDRESS=unix:{}/io.podman",
        dir.display()
    )));

    // Mistakes: one line each, nothing changed.
    h.fails(&["create", "dev", "--kernel", &k], "already exists");
    h.fails(&["create", "../evil"], "invalid machine name");
    h.fails(
        &["create", "tiny", "--cpus", "0", "--kernel", &k],
        "--cpus 0",
    );
    h.fails(
        &[
            "create",
            "badip",
            "--tap",
            "t0",
            "--ip",
            "10.0.0.300/24",
            "--kernel",
            &k,
        ],
        "--ip",
    );
    h.fails(
        &[
            "create",
            "badgw",
            "--tap",
            "t0",
            "--ip",
            "10.0.0.2/24",
            "--gateway",
            "10.0.0.1 init=/bin/sh",
            "--kernel",
            &k,
        ],
        "--gateway",
    );
    assert!(!h.machine_dir("tiny").exists() && !h.machine_dir("badip").exists());
    assert!(!h.machine_dir("badgw").exists());
    h.fails(&["start", "nosuch"], "does not exist");
    h.fails(&["ip", "dev"], "no static address");
    h.fails(&["ssh", "dev"], "is not running");

    assert!(h.ok(&["rm", "dev"]).contains("removed"));
    assert!(!dir.exists());
    assert!(!h.ok(&["ls"]).contains("dev "));
}

#[test]
fn start_status_stop_with_the_probe_guest() {
    let test = "manager_start_stop";
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    if no_ssh_keygen(test) {
        return;
    }
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let h = Home::new(test);
    let kernel = probe_kernel(&h.dir).display().to_string();
    h.ok(&[
        "create",
        "vm1",
        "--memory",
        "128",
        "--cpus",
        "2",
        "--disk-size",
        "64",
        "--kernel",
        &kernel,
        "--cmdline",
        "probe.hold_ms=120000",
    ]);
    let dir = h.machine_dir("vm1");
    // start waits for the guest's agent; the probe has none: after the
    // timeout it says so, and the VM is left running.
    // B2P_LOG=info: the monitor's log records reach vmm.log through the
    // manager's logger.
    let out = h.b2p_with(&["start", "vm1", "--timeout", "2"], |c| {
        c.env("B2P_LOG", "info");
    });
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stdout.contains("Machine vm1 started"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("agent did not answer within 2 s"),
        "{}",
        out.describe()
    );
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Running");
    let inspect: serde_json::Value = serde_json::from_str(&h.ok(&["inspect", "vm1"])).unwrap();
    let pid = inspect["pid"].as_u64().expect("no pid while running");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    // The running VM process holds vmm.log's lock (a racing start is refused).
    let log = std::fs::File::open(dir.join("vmm.log")).unwrap();
    // SAFETY: flock on an fd we own.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&log),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_ne!(rc, 0, "vmm.log is not locked while the VM runs");
    drop(log);

    // The guest runs, with the machine's devices: its console, and the
    // host ends of vsock (hybrid socket, varlink and podman ports).
    let console = dir.join("console.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("probe: holding")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never got to its hold\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("probe: PASS"), "{text}");
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    assert!(
        log.contains("b2p: info: guest boot complete after"),
        "the monitor's log records are lost: vmm.log is\n{log}"
    );
    assert!(text.contains("probe: boot timer written"), "{text}");
    assert!(text.contains("lapics=2"), "{text}");
    for sock in ["vsock.sock", "io.podman", "podman.sock"] {
        let meta = std::fs::metadata(dir.join(sock)).unwrap();
        assert!(
            std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()),
            "{sock}"
        );
    }

    // A second start, and another VM on the same disk, are refused.
    h.fails(&["start", "vm1"], "already running");
    h.fails(&["rm", "vm1"], "is running");
    let disk = dir.join("disk.raw").display().to_string();
    let mut other = vmm_command(&vmm);
    other.args([
        "run",
        "--kernel",
        &kernel,
        "--disk",
        &disk,
        "--console",
        "none",
    ]);
    let o = run_with_deadline(other, LIMIT);
    assert!(
        o.status.code() != Some(0) && o.stderr.contains("in use"),
        "a second VM got the machine's disk\n{}",
        o.describe()
    );

    // The probe has no agent to shut it down: stop falls back to SIGTERM,
    // which the VM process turns into a clean stop.
    let out = h.ok(&["stop", "vm1", "--timeout", "1"]);
    assert!(out.contains("Machine vm1 stopped"), "{out}");
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Stopped");
    // Gone, or the pid reused by a process that is not our VM.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        !cmdline.windows(8).any(|w| w == b"__run-vm"),
        "the VM process {pid} is still there"
    );
    for f in ["pid", "vsock.sock", "io.podman", "podman.sock"] {
        assert!(!dir.join(f).exists(), "{f} left behind after stop");
    }
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    assert!(log.contains("VM ended: stopped"), "{log}");
    assert!(h.ok(&["stop", "vm1"]).contains("not running"));

    // Started again (not waiting for an agent), then removed with --force.
    assert!(h.ok(&["start", "vm1", "--no-wait"]).contains("started"));
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Running");
    h.ok(&["rm", "--force", "vm1"]);
    assert!(!dir.exists());
}

#[test]
fn start_reports_what_the_vm_refused() {
    let test = "manager_start_error";
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    if no_ssh_keygen(test) {
        return;
    }
    let h = Home::new(test);
    let junk = write_file(&h.dir, "junk", &random_bytes(8192));
    h.ok(&["create", "bad", "--kernel", &junk.display().to_string()]);
    h.fails(&["start", "bad"], "kernel");
    assert_eq!(h.ok(&["status", "bad"]).trim(), "Stopped");
    // Guest memory the host cannot give is also refused before any boot.
    let kernel = probe_kernel(&h.dir).display().to_string();
    h.fails(
        &[
            "create", "huge", "--memory", "99999999", "--kernel", &kernel,
        ],
        "--memory",
    );
}

/// Starts `sh -c 'sleep 30; :' __run-vm NAME`: a process whose command line
/// looks like a machine's VM process.
fn impostor(name: &str) -> std::process::Child {
    let child = Command::new("sh")
        .args(["-c", "sleep 30; :", "__run-vm", name])
        .spawn()
        .unwrap();
    let begin = std::time::Instant::now();
    while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
        .unwrap_or_default()
        .windows(8)
        .any(|w| w == b"__run-vm")
    {
        assert!(begin.elapsed() < Duration::from_secs(5), "sh never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// A pid file naming a process that merely has `__run-vm NAME` in its
/// arguments (a reused pid, or a file from an older run) is not the VM:
/// without the start time the VM process wrote, the machine is Stopped and
/// `stop` signals nobody.
#[test]
fn pid_file_names_one_process() {
    let test = "manager_pid_file";
    if no_ssh_keygen(test) {
        return;
    }
    let h = Home::new(test);
    let kernel = write_file(&h.dir, "vmlinuz", b"not booted by this test");
    h.ok(&["create", "m", "--kernel", &kernel.display().to_string()]);
    let mut fake = impostor("m");
    let pid_file = h.machine_dir("m").join("pid");
    for text in [format!("{}\n", fake.id()), format!("{} 1\n", fake.id())] {
        std::fs::write(&pid_file, &text).unwrap();
        assert_eq!(
            h.ok(&["status", "m"]).trim(),
            "Stopped",
            "pid file {text:?} names a process that is not the VM"
        );
        assert!(h.ok(&["stop", "m"]).contains("not running"));
        assert!(
            fake.try_wait().unwrap().is_none(),
            "stop killed the impostor"
        );
    }
    let _ = fake.kill();
    let _ = fake.wait();
}

/// One corrupt config.json: `ls` still lists every machine, marks that one
/// Broken, says why in one line, and exits 1.
#[test]
fn ls_with_one_corrupt_config() {
    let test = "manager_ls_corrupt";
    if no_ssh_keygen(test) {
        return;
    }
    let h = Home::new(test);
    let kernel = write_file(&h.dir, "vmlinuz", b"not booted by this test");
    let k = kernel.display().to_string();
    for name in ["alpha", "beta", "gamma"] {
        h.ok(&["create", name, "--kernel", &k, "--memory", "256"]);
    }
    std::fs::write(h.machine_dir("beta").join("config.json"), b"{ not json").unwrap();
    let out = h.b2p(&["ls"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    let row = |name: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} is not listed\n{}", out.describe()))
            .to_string()
    };
    assert!(row("alpha").contains("Stopped") && row("alpha").contains("256MiB"));
    assert!(row("gamma").contains("Stopped"));
    assert!(row("beta").contains("Broken"), "{}", out.describe());
    let errors: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(errors.len(), 1, "{}", out.describe());
    assert!(
        errors[0].starts_with("b2p: error: machine beta is broken"),
        "{}",
        out.describe()
    );
}

/// What `start` could never use is refused at `create`, and nothing is
/// left behind: a disk size that overflows, guest memory beyond the host's
/// RAM, a machines directory too deep for its sockets.
#[test]
fn create_refuses_what_start_could_not_use() {
    let test = "manager_create_refuses";
    if no_ssh_keygen(test) {
        return;
    }
    let h = Home::new(test);
    let kernel = write_file(&h.dir, "vmlinuz", b"not booted by this test");
    let k = kernel.display().to_string();
    h.fails(
        &[
            "create",
            "big",
            "--kernel",
            &k,
            "--disk-size",
            "17592186044416",
        ],
        "--disk-size",
    );
    assert!(!h.machine_dir("big").exists());
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let mib = ((total_kib >> 10) + 1024).to_string();
    h.fails(
        &["create", "fat", "--kernel", &k, "--memory", &mib],
        "host's RAM",
    );
    assert!(!h.machine_dir("fat").exists());

    let deep = h.dir.path().join("x".repeat(60)).join("y".repeat(30));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_b2p"));
    cmd.args(["create", "deep", "--kernel", &k])
        .env("XDG_DATA_HOME", &deep);
    let out = run_with_deadline(cmd, LIMIT);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("too long") && out.stderr.contains("XDG_DATA_HOME"),
        "{}",
        out.describe()
    );
    assert!(!deep.join("b2p/machines/deep").exists());
}

/// A second local user (made with useradd), or why there is none.
fn neighbour(test: &str) -> Option<(u32, u32, PathBuf)> {
    if !is_root() {
        skip(test, "not root: cannot add a second local user");
        return None;
    }
    let Some(setpriv) = which("setpriv") else {
        skip(test, "setpriv (util-linux) not found");
        return None;
    };
    let name = "b2p-neighbour";
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        // Another test may be adding it at the same moment: ask again after.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status();
    }
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Some((uid, gid, setpriv)),
        _ => {
            skip(test, "useradd could not add a second local user");
            None
        }
    }
}

/// Machine files are private whatever the umask: at umask 000 the machine
/// directory is 0700, every file 0600 and every socket 0600; a second user
/// can neither read the disk nor reach the guest's varlink, and `b2p stop`
/// from that user says "not yours" at once. A console.log replaced by a
/// symbolic link is refused at start, and the link's target kept intact.
#[test]
fn machine_files_are_private_from_a_neighbour() {
    let test = "manager_private";
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    if no_ssh_keygen(test) {
        return;
    }
    let Some((uid, gid, setpriv)) = neighbour(test) else {
        return;
    };
    let h = Home::new(test);
    let kernel = probe_kernel(&h.dir).display().to_string();
    let umask0 = |c: &mut Command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask is async-signal-safe and touches only the child.
        unsafe {
            c.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
    };
    let args = [
        "create",
        "vm1",
        "--memory",
        "128",
        "--disk-size",
        "64",
        "--kernel",
        &kernel,
        "--cmdline",
        "probe.hold_ms=120000",
    ];
    let out = h.b2p_with(&args, umask0);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let out = h.b2p_with(&["start", "vm1", "--no-wait"], umask0);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let dir = h.machine_dir("vm1");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !dir.join("podman.sock").exists() || !dir.join("console.log").exists() {
        assert!(std::time::Instant::now() < deadline, "the VM never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the machine directory");
    for f in [
        "config.json",
        "disk.raw",
        "id_ed25519",
        "id_ed25519.pub",
        "console.log",
        "vmm.log",
        "pid",
        "vsock.sock",
        "io.podman",
        "podman.sock",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f} at umask 000");
    }
    // The neighbour runs its own copy of b2p (ours may sit in a private tree).
    let b2p = h.dir.join("b2p-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_b2p"), &b2p).unwrap();
    let as_neighbour = |prog: &Path, args: &[&str]| {
        let mut c = Command::new(&setpriv);
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ])
        .arg(prog)
        .args(args)
        .env("XDG_DATA_HOME", h.dir.path());
        run_with_deadline(c, LIMIT)
    };
    for f in ["disk.raw", "config.json", "console.log"] {
        let p = dir.join(f).display().to_string();
        let out = as_neighbour(Path::new("/bin/cat"), &[&p]);
        assert!(
            out.status.code() != Some(0) && out.stdout.is_empty(),
            "the neighbour read {f}\n{}",
            out.describe()
        );
    }
    for sock in ["io.podman", "vsock.sock"] {
        let addr = format!("unix:{}", dir.join(sock).display());
        let out = as_neighbour(
            &b2p,
            &[
                "varlink",
                &addr,
                "call",
                "org.varlink.service.GetInfo",
                "--timeout",
                "2",
            ],
        );
        assert!(
            out.status.code() != Some(0) && out.stderr.contains("ermission denied"),
            "the neighbour reached {sock}\n{}",
            out.describe()
        );
    }
    let begin = std::time::Instant::now();
    let out = as_neighbour(&b2p, &["stop", "vm1"]);
    assert!(
        out.status.code() != Some(0) && out.stderr.contains("not yours"),
        "{}",
        out.describe()
    );
    assert!(
        begin.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        begin.elapsed()
    );
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Running");
    h.ok(&["stop", "vm1", "--timeout", "1"]);

    // A symbolic link where console.log was: start refuses it and the
    // file it points to is untouched.
    let victim = write_file(&h.dir, "victim.txt", b"precious\n");
    let console = dir.join("console.log");
    std::fs::remove_file(&console).unwrap();
    std::os::unix::fs::symlink(&victim, &console).unwrap();
    h.fails(&["start", "vm1", "--no-wait"], "symbolic link");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
    assert_eq!(h.ok(&["status", "vm1"]).trim(), "Stopped");
}

/// A start racing another one (here: vmm.log locked as a starting VM
/// process holds it) is refused before it empties vmm.log or touches the
/// pid file.
#[test]
fn a_second_start_leaves_the_first_alone() {
    let test = "manager_start_race";
    if no_ssh_keygen(test) {
        return;
    }
    let h = Home::new(test);
    let kernel = write_file(&h.dir, "vmlinuz", b"not booted by this test");
    h.ok(&["create", "m", "--kernel", &kernel.display().to_string()]);
    let dir = h.machine_dir("m");
    std::fs::write(dir.join("vmm.log"), b"the first start's log\n").unwrap();
    std::fs::write(dir.join("pid"), b"the first start's pid file\n").unwrap();
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("vmm.log"))
        .unwrap();
    // SAFETY: flock on an fd we own.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&held),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(rc, 0);
    h.fails(&["start", "m", "--no-wait"], "already starting or running");
    assert_eq!(
        std::fs::read(dir.join("vmm.log")).unwrap(),
        b"the first start's log\n"
    );
    assert_eq!(
        std::fs::read(dir.join("pid")).unwrap(),
        b"the first start's pid file\n"
    );
    drop(held);
}
