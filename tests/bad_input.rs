//! Bad input to `b2p-vmm run`: each case must end with a non-zero exit
//! status, exactly one stderr line starting `b2p-vmm: error:`, and no panic.
//! Cases that root would sail through (file modes) run with privileges
//! dropped through setpriv.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

struct Case {
    dir: TempDir,
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn case(test: &str) -> Case {
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    let dir = TempDir::new(test);
    let kernel = probe_kernel(&dir);
    let initrd = write_file(&dir, "initrd.img", &random_bytes(4096));
    Case {
        dir,
        vmm,
        kernel,
        initrd,
    }
}

fn run_args(kernel: &Path, initrd: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0 probe.mem=64".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Asserts the one-line error contract; `want` must appear in that line
/// (case-insensitive).
fn assert_clean_error(test: &str, out: &Outcome, want: &[&str]) {
    assert!(!out.timed_out, "{test}: timed out\n{}", out.describe());
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !all.contains("panicked"),
        "{test}: panicked\n{}",
        out.describe()
    );
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "{test}: want a non-zero exit status\n{}",
        out.describe()
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{test}: want exactly one stderr line\n{}",
        out.describe()
    );
    assert!(
        lines[0].starts_with("b2p-vmm: error: "),
        "{test}: the line must start with 'b2p-vmm: error: '\n{}",
        out.describe()
    );
    let lower = lines[0].to_lowercase();
    assert!(
        want.iter().any(|w| lower.contains(&w.to_lowercase())),
        "{test}: the error should mention one of {want:?}\n{}",
        out.describe()
    );
    eprintln!("{test}: {}", lines[0]);
}

fn run_vmm(c: &Case, args: &[String]) -> Outcome {
    let mut cmd = vmm_command(&c.vmm);
    cmd.args(args);
    run_with_deadline(cmd, LIMIT)
}

#[test]
fn missing_kernel() {
    let c = case("missing_kernel");
    let missing = c.dir.join("no-such-vmlinuz");
    let out = run_vmm(&c, &run_args(&missing, &c.initrd, &[]));
    assert_clean_error("missing_kernel", &out, &["no-such-vmlinuz", "kernel"]);
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let c = case("not_a_kernel");
    let junk = write_file(&c.dir, "junk.bin", &random_bytes(64 * 1024));
    let text = write_file(&c.dir, "notes.txt", b"this is not a kernel\n");
    for k in [&junk, &text] {
        let out = run_vmm(&c, &run_args(k, &c.initrd, &[]));
        assert_clean_error(
            "kernel_that_is_not_a_kernel",
            &out,
            &["kernel", "bzimage", "elf"],
        );
    }
}

#[test]
fn initrd_larger_than_guest_memory() {
    let c = case("big_initrd");
    // Sparse: 96 MiB of initrd for a 64 MiB guest.
    let big = c.dir.join("big.img");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(96 << 20).unwrap();
    let out = run_vmm(&c, &run_args(&c.kernel, &big, &["--memory", "64"]));
    assert_clean_error(
        "initrd_larger_than_guest_memory",
        &out,
        &["initrd", "memory"],
    );
}

#[test]
fn memory_too_small() {
    let c = case("small_memory");
    for mem in ["0", "1"] {
        let out = run_vmm(&c, &run_args(&c.kernel, &c.initrd, &["--memory", mem]));
        assert_clean_error("memory_too_small", &out, &["memory"]);
    }
}

#[test]
fn cpus_zero_and_too_many() {
    let c = case("bad_cpus");
    for cpus in ["0", "255", "100000"] {
        let out = run_vmm(&c, &run_args(&c.kernel, &c.initrd, &["--cpus", cpus]));
        assert_clean_error("cpus_zero_and_too_many", &out, &["cpu"]);
    }
}

/// setpriv, or the reason this test cannot drop privileges.
fn setpriv() -> Result<PathBuf, String> {
    if !is_root() {
        return Err("not root: cannot switch users".into());
    }
    which("setpriv").ok_or_else(|| "setpriv (util-linux) not found".into())
}

#[test]
fn kvm_not_accessible() {
    let test = "kvm_not_accessible";
    let setpriv = match setpriv() {
        Ok(p) => p,
        Err(reason) => return skip(test, &reason),
    };
    let meta = match std::fs::metadata("/dev/kvm") {
        Ok(m) => m,
        Err(_) => {
            // No /dev/kvm at all: the monitor must say so in one line.
            let c = case(test);
            let out = run_vmm(&c, &run_args(&c.kernel, &c.initrd, &[]));
            return assert_clean_error(test, &out, &["/dev/kvm", "kvm"]);
        }
    };
    if meta.permissions().mode() & 0o006 != 0 {
        return skip(test, "/dev/kvm is accessible to everyone here");
    }
    let c = case(test);
    // The binary must be reachable by nobody: copy it into the scratch dir.
    let vmm = c.dir.join("b2p-vmm");
    std::fs::copy(&c.vmm, &vmm).unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(setpriv);
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&vmm)
        .args(run_args(&c.kernel, &c.initrd, &[]))
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("B2P_TIMINGS");
    let out = run_with_deadline(cmd, LIMIT);
    assert_clean_error(test, &out, &["/dev/kvm", "kvm"]);
}

/// /dev/kvm absent: a private mount namespace with an empty /dev.
#[test]
fn kvm_absent() {
    let test = "kvm_absent";
    if !is_root() {
        return skip(test, "not root: cannot make a mount namespace");
    }
    let Some(unshare) = which("unshare") else {
        return skip(test, "unshare (util-linux) not found");
    };
    let c = case(test);
    let script = "mount -t tmpfs b2p-empty-dev /dev && exec \"$0\" \"$@\"";
    let mut cmd = Command::new(unshare);
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&c.vmm)
        .args(run_args(&c.kernel, &c.initrd, &[]))
        .env_remove("RUST_LOG")
        .env_remove("B2P_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("B2P_TIMINGS");
    let out = run_with_deadline(cmd, LIMIT);
    assert_clean_error(test, &out, &["/dev/kvm", "kvm"]);
}

#[test]
fn console_file_not_writable() {
    let test = "console_file_not_writable";
    let setpriv = match setpriv() {
        Ok(p) => p,
        Err(reason) => return skip(test, &reason),
    };
    if let Err(reason) = kvm_usable() {
        return skip(test, &reason);
    }
    let c = case(test);
    let log = c.dir.join("console.log");
    std::fs::write(&log, b"").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Stay root (owner of /dev/kvm) but without CAP_DAC_OVERRIDE, so the
    // file's read-only mode applies.
    let mut cmd = Command::new(setpriv);
    cmd.args([
        "--bounding-set=-dac_override,-dac_read_search",
        "--inh-caps=-dac_override,-dac_read_search",
        "--",
    ])
    .arg(&c.vmm)
    .args(run_args(
        &c.kernel,
        &c.initrd,
        &["--console", &format!("file:{}", log.display())],
    ))
    .env_remove("RUST_LOG")
    .env_remove("RUST_BACKTRACE")
    .env_remove("B2P_TIMINGS");
    let out = run_with_deadline(cmd, LIMIT);
    assert_clean_error(test, &out, &["console", "console.log"]);
    assert_eq!(
        std::fs::read(&log).unwrap(),
        b"",
        "the console file was written"
    );
}

#[test]
fn console_in_missing_directory() {
    let c = case("console_missing_dir");
    let log = c.dir.join("no-such-dir/console.log");
    let out = run_vmm(
        &c,
        &run_args(
            &c.kernel,
            &c.initrd,
            &["--console", &format!("file:{}", log.display())],
        ),
    );
    assert_clean_error(
        "console_in_missing_directory",
        &out,
        &["console", "no-such-dir"],
    );
}

#[test]
fn unknown_console_kind() {
    let c = case("console_kind");
    let out = run_vmm(
        &c,
        &run_args(&c.kernel, &c.initrd, &["--console", "telnet:23"]),
    );
    assert_clean_error("unknown_console_kind", &out, &["console"]);
}

/// Device arguments that the monitor must refuse (they get past KVM setup,
/// so these need /dev/kvm): the disk, TAP and socket cases of the rules.
fn device_case(test: &str) -> Option<Case> {
    if let Err(reason) = kvm_usable() {
        skip(test, &reason);
        return None;
    }
    Some(case(test))
}

#[test]
fn disk_missing_or_given_twice() {
    let test = "disk_missing_or_given_twice";
    let Some(c) = device_case(test) else { return };
    let missing = c.dir.join("no-such-disk.img");
    let out = run_vmm(
        &c,
        &run_args(
            &c.kernel,
            &c.initrd,
            &["--disk", &missing.display().to_string()],
        ),
    );
    assert_clean_error(test, &out, &["no-such-disk.img"]);

    let disk = write_file(&c.dir, "data.img", &[0xa5; 64 * 1024]);
    let d = disk.display().to_string();
    let out = run_vmm(
        &c,
        &run_args(&c.kernel, &c.initrd, &["--disk", &d, "--disk", &d]),
    );
    assert_clean_error(test, &out, &["given twice"]);
    // Under another name (a hard link) only the image's lock can tell.
    let link = c.dir.join("same-data.img");
    std::fs::hard_link(&disk, &link).unwrap();
    let l = link.display().to_string();
    let out = run_vmm(
        &c,
        &run_args(&c.kernel, &c.initrd, &["--disk", &d, "--disk", &l]),
    );
    assert_clean_error(test, &out, &["in use"]);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        vec![0xa5; 64 * 1024],
        "{test}: the refused disk was modified"
    );
}

#[test]
fn disk_in_use_by_another_vm() {
    let test = "disk_in_use_by_another_vm";
    let Some(c) = device_case(test) else { return };
    let disk = write_file(&c.dir, "data.img", &[0x5a; 64 * 1024]);
    let d = disk.display().to_string();
    // The first VM holds the disk for a while (probe.hold_ms) before it
    // powers off; the second must be refused while it runs.
    let mut args = run_args(&c.kernel, &c.initrd, &["--disk", &d, "--console", "none"]);
    if let Some(i) = args.iter().position(|a| a == "--cmdline") {
        args[i + 1] = "console=ttyS0 probe.hold_ms=20000".into();
    }
    let mut first = vmm_command(&c.vmm);
    first
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut first = first.spawn().expect("spawning the first VM");
    // Wait until the first VM holds the lock (flock is visible in /proc/locks).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&disk).unwrap().ino()
    };
    while !std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(&format!(":{ino} ")))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{test}: the first VM never locked its disk"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_vmm(&c, &run_args(&c.kernel, &c.initrd, &["--disk", &d]));
    let _ = first.kill();
    let _ = first.wait();
    assert_clean_error(test, &out, &["in use"]);
}

/// A console path naming a disk (itself, a hard link, a symlink) is refused
/// before anything is opened for writing, and the disk keeps its bytes.
#[test]
fn console_that_is_a_disk() {
    let test = "console_that_is_a_disk";
    let c = case(test);
    let disk = write_file(&c.dir, "precious.img", &[0xa5; 64 * 1024]);
    let d = disk.display().to_string();
    let link = c.dir.join("same-precious.img");
    std::fs::hard_link(&disk, &link).unwrap();
    let sym = c.dir.join("sym-precious.img");
    std::os::unix::fs::symlink(&disk, &sym).unwrap();
    for (console, want) in [
        (&disk, "is the disk image"),
        (&link, "is the disk image"),
        (&sym, "symbolic link"),
    ] {
        let out = run_vmm(
            &c,
            &run_args(
                &c.kernel,
                &c.initrd,
                &[
                    "--disk",
                    &d,
                    "--console",
                    &format!("file:{}", console.display()),
                ],
            ),
        );
        assert_clean_error(test, &out, &[want]);
        assert_eq!(
            std::fs::read(&disk).unwrap(),
            vec![0xa5; 64 * 1024],
            "{test}: --console file:{} changed the disk",
            console.display()
        );
    }
}

/// Starts a probe VM that holds `disk` (and writes its console to
/// `console`) for 20 s, and waits until it has locked the disk and written
/// `probe: holding`.
fn holding_vm(test: &str, c: &Case, disk: &Path, console: &Path) -> std::process::Child {
    let mut args = run_args(
        &c.kernel,
        &c.initrd,
        &[
            "--disk",
            &disk.display().to_string(),
            "--console",
            &format!("file:{}", console.display()),
        ],
    );
    if let Some(i) = args.iter().position(|a| a == "--cmdline") {
        args[i + 1] = "console=ttyS0 probe.hold_ms=20000".into();
    }
    let mut cmd = vmm_command(&c.vmm);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.spawn().expect("spawning the first VM");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(console)
        .unwrap_or_default()
        .contains("probe: holding")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{test}: the first VM never reached its hold"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A second VM refused because the first one runs must leave the first
/// one's disk and console log alone, whichever of them it names.
#[test]
fn refused_vm_leaves_the_running_vm_alone() {
    let test = "refused_vm_leaves_the_running_vm_alone";
    let Some(c) = device_case(test) else { return };
    let disk = write_file(&c.dir, "data.img", &[0x5a; 64 * 1024]);
    let d = disk.display().to_string();
    let log = c.dir.join("console.log");
    let l = format!("file:{}", log.display());
    let mut first = holding_vm(test, &c, &disk, &log);
    let before = std::fs::read(&log).unwrap();
    let other = write_file(&c.dir, "other.img", &[0x33; 64 * 1024]);
    let o = other.display().to_string();
    let cases: [(&[&str], &str); 3] = [
        // The running VM's disk as this one's console.
        (
            &["--disk", &d, "--console", &format!("file:{d}")],
            "disk image",
        ),
        // Its disk and its console log.
        (&["--disk", &d, "--console", &l], "in use"),
        // Another disk, but its console log.
        (&["--disk", &o, "--console", &l], "in use"),
    ];
    let mut failures = Vec::new();
    for (args, want) in cases {
        let out = run_vmm(&c, &run_args(&c.kernel, &c.initrd, args));
        let disk_now = std::fs::read(&disk).unwrap();
        let log_now = std::fs::read(&log).unwrap();
        if disk_now != vec![0x5a; 64 * 1024] {
            failures.push(format!("{args:?} changed the running VM's disk"));
        }
        if !log_now.starts_with(&before) {
            failures.push(format!(
                "{args:?} changed the running VM's console log ({} bytes left of {})",
                log_now.len(),
                before.len()
            ));
        }
        if failures.is_empty() {
            assert_clean_error(test, &out, &[want]);
        }
    }
    let _ = first.kill();
    let _ = first.wait();
    assert!(failures.is_empty(), "{test}: {failures:#?}");
}

#[test]
fn tap_that_does_not_exist() {
    let test = "tap_that_does_not_exist";
    let Some(c) = device_case(test) else { return };
    let out = run_vmm(
        &c,
        &run_args(&c.kernel, &c.initrd, &["--net", "tap=b2pnosuch0"]),
    );
    assert_clean_error(test, &out, &["b2pnosuch0"]);
}

#[test]
fn vsock_socket_path_taken() {
    let test = "vsock_socket_path_taken";
    let Some(c) = device_case(test) else { return };
    // A live listener owns the path: the monitor must neither steal nor
    // unlink it.
    let live = c.dir.join("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let uds = c.dir.join("v.sock").display().to_string();
    for args in [
        vec![
            "--vsock".to_string(),
            format!("cid=3,uds={}", live.display()),
        ],
        vec![
            "--vsock".to_string(),
            format!("cid=3,uds={uds}"),
            "--vsock-port".to_string(),
            format!("1024={}", live.display()),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_vmm(&c, &run_args(&c.kernel, &c.initrd, &args));
        assert_clean_error(test, &out, &["in use"]);
        assert!(
            std::os::unix::net::UnixStream::connect(&live).is_ok(),
            "{test}: the live listener lost its path"
        );
    }
    drop(listener);
    // A regular file at the path is not ours to replace.
    let file = write_file(&c.dir, "notes.txt", b"keep me\n");
    let out = run_vmm(
        &c,
        &run_args(
            &c.kernel,
            &c.initrd,
            &[
                "--vsock",
                &format!("cid=3,uds={uds}"),
                "--vsock-port",
                &format!("1024={}", file.display()),
            ],
        ),
    );
    assert_clean_error(test, &out, &["not a socket"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me\n");
}

/// `run_vmm` with a shorter deadline, for cases that used to hang.
fn run_vmm_within(c: &Case, args: &[String], limit: Duration) -> Outcome {
    let mut cmd = vmm_command(&c.vmm);
    cmd.args(args);
    run_with_deadline(cmd, limit)
}

/// A kernel cut short that faults before it prints anything is an error
/// naming the kernel, not a clean exit.
#[test]
fn truncated_kernel() {
    let test = "truncated_kernel";
    let Some(c) = device_case(test) else { return };
    let whole = std::fs::read(&c.kernel).unwrap();
    let half = write_file(&c.dir, "probe-half.bzImage", &whole[..whole.len() / 2]);
    let out = run_vmm(&c, &run_args(&half, &c.initrd, &["--console", "none"]));
    assert_clean_error(test, &out, &["probe-half.bzImage"]);
    assert!(out.stderr.contains("triple-fault"), "{}", out.describe());
}

/// A disk must be a regular file of at least one sector, or a block device.
#[test]
fn disk_that_is_a_directory_empty_or_a_fifo() {
    let test = "disk_that_is_a_directory_empty_or_a_fifo";
    let c = case(test);
    let dir = c.dir.join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let empty = write_file(&c.dir, "empty.img", b"");
    let fifo = c.dir.join("disk.fifo");
    mkfifo(&fifo);
    for (disk, ro, want) in [
        (&dir, ",ro", "is a directory"),
        (&dir, "", "is a directory"),
        (&empty, "", "0 bytes"),
        (&fifo, "", "not a regular file"),
    ] {
        let arg = format!("{}{ro}", disk.display());
        let out = run_vmm_within(
            &c,
            &run_args(&c.kernel, &c.initrd, &["--disk", &arg, "--console", "none"]),
            Duration::from_secs(15),
        );
        assert_clean_error(test, &out, &[want]);
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A FIFO as the console (nobody reads it), the kernel or the initrd must
/// not hang setup in open(2).
#[test]
fn fifo_inputs_do_not_hang() {
    let test = "fifo_inputs_do_not_hang";
    let c = case(test);
    let fifo = c.dir.join("a.fifo");
    mkfifo(&fifo);
    let f = fifo.display().to_string();
    let limit = Duration::from_secs(15);
    let out = run_vmm_within(
        &c,
        &run_args(&c.kernel, &c.initrd, &["--console", &format!("file:{f}")]),
        limit,
    );
    assert_clean_error(test, &out, &["FIFO"]);
    let out = run_vmm_within(&c, &run_args(&fifo, &c.initrd, &[]), limit);
    assert_clean_error(test, &out, &["not a regular file"]);
    let out = run_vmm_within(&c, &run_args(&c.kernel, &fifo, &[]), limit);
    assert_clean_error(test, &out, &["not a regular file"]);
}

/// This host's RAM in MiB (MemTotal).
fn host_ram_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("no MemTotal in /proc/meminfo");
    kib >> 10
}

/// More guest memory than the host has RAM is refused (below the 1 TiB
/// limit, so it is the host check that refuses it).
#[test]
fn memory_larger_than_the_host() {
    let test = "memory_larger_than_the_host";
    let c = case(test);
    let mib = (host_ram_mib() + 1024).to_string();
    let out = run_vmm(&c, &run_args(&c.kernel, &c.initrd, &["--memory", &mib]));
    assert_clean_error(test, &out, &["host's RAM"]);
}

/// A socket path that cannot fit a Unix socket address is refused before
/// anything is built.
#[test]
fn socket_path_too_long() {
    let test = "socket_path_too_long";
    let c = case(test);
    let deep = c.dir.join(&"d".repeat(100));
    let out = run_vmm(
        &c,
        &run_args(
            &c.kernel,
            &c.initrd,
            &[
                "--vsock",
                &format!("cid=3,uds={}", deep.join("v.sock").display()),
            ],
        ),
    );
    assert_clean_error(test, &out, &["too long"]);
}

/// SIGHUP, SIGQUIT, SIGTERM and SIGINT each stop a running VM cleanly:
/// exit status 0, not death by the signal, and its sockets removed.
#[test]
fn every_stop_signal_tears_down() {
    let test = "every_stop_signal_tears_down";
    let Some(c) = device_case(test) else { return };
    for sig in [libc::SIGHUP, libc::SIGQUIT, libc::SIGTERM, libc::SIGINT] {
        let log = c.dir.join(&format!("console-{sig}.log"));
        let uds = c.dir.join(&format!("v{sig}.sock"));
        let port = c.dir.join(&format!("p{sig}.sock"));
        let mut args = run_args(
            &c.kernel,
            &c.initrd,
            &[
                "--console",
                &format!("file:{}", log.display()),
                "--vsock",
                &format!("cid=3,uds={}", uds.display()),
                "--vsock-port",
                &format!("1024={}", port.display()),
            ],
        );
        if let Some(i) = args.iter().position(|a| a == "--cmdline") {
            args[i + 1] = "console=ttyS0 probe.hold_ms=30000".into();
        }
        let mut cmd = vmm_command(&c.vmm);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !(uds.exists()
            && port.exists()
            && std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("probe: holding"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{test}: the VM never came up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{test}: signal {sig} did not stop the VM within 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0), "{test}: signal {sig}: {status:?}");
        assert!(
            !uds.exists() && !port.exists(),
            "{test}: signal {sig} left the sockets behind"
        );
    }
}

/// A stop signal in the middle of setup (here while a 256 MiB initrd
/// loads, after the sockets exist) ends the VM as soon as setup is over:
/// exit 0, the sockets removed, not death by the signal.
#[test]
fn stop_signal_during_setup() {
    let test = "stop_signal_during_setup";
    let Some(c) = device_case(test) else { return };
    let big = c.dir.join("big.initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let uds = c.dir.join("v.sock");
    let port = c.dir.join("p.sock");
    let mut cmd = vmm_command(&c.vmm);
    cmd.args(run_args(
        &c.kernel,
        &big,
        &[
            "--memory",
            "512",
            "--console",
            "none",
            "--timings",
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--vsock-port",
            &format!("1024={}", port.display()),
        ],
    ))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    // The devices (and sockets) exist; the initrd is loading next.
    while !seen.contains("timing devices_us") {
        let n = std::io::Read::read(&mut err, &mut buf).unwrap();
        assert!(n > 0, "{test}: b2p-vmm ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        !seen.contains("guest_image_us"),
        "{test}: setup was over before the signal: {seen}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    let t = std::thread::spawn(move || {
        let _ = std::io::Read::read_to_string(&mut err, &mut seen);
        seen
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{test}: SIGHUP during setup did not end the VM within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = t.join().unwrap();
    assert_eq!(status.code(), Some(0), "{test}: {status:?}\n{stderr}");
    assert!(
        !uds.exists() && !port.exists(),
        "{test}: the sockets were left behind"
    );
}
