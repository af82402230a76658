//! virtio-fs through b2p-vmm and a real virtiofsd, under the real /dev/kvm,
//! driven by the probe guest's FUSE driver (tests/probe/guest/fs.c): it
//! reads a file this test put in the shared folder (bytes checked) and
//! writes one this test reads back on the host; the folder's path holds a
//! `,` (written `,,`) and a `:`. Also: joining a virtiofsd started here
//! (`socket=`), a read-only folder (EROFS in the guest, nothing on the
//! host), virtiofsd killed mid-run (the guest's next request fails with
//! EIO, the VM goes on and powers off, one log line), and the CLI's bad
//! input (a missing folder, virtiofsd missing, the same tag twice).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);
const LEN: usize = 4096;

/// b2p-vmm and virtiofsd, or a printed reason to skip.
fn setup(test: &str) -> Option<(PathBuf, PathBuf)> {
    if let Err(reason) = kvm_usable() {
        skip(test, &reason);
        return None;
    }
    let Some(virtiofsd) = b2p_vmm::virtiofsd::find_virtiofsd() else {
        skip(
            test,
            "virtiofsd is not installed (.ci/install-deps.sh: cargo install virtiofsd)",
        );
        return None;
    };
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{test}: no b2p-vmm binary: {e}"));
    Some((vmm, virtiofsd))
}

/// `b2p-vmm run` of the probe with `extra`, console into `dir/console.log`.
fn probe_cmd(vmm: &Path, dir: &TempDir, cmdline: &str, extra: &[String]) -> (Command, PathBuf) {
    let kernel = probe_kernel(dir);
    let log = dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = vmm_command(vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "128", "--cpus", "1"])
        .arg("--cmdline")
        .arg(format!("console=ttyS0 probe.nosmp=1 {cmdline}"))
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .args(extra);
    (cmd, log)
}

struct Boot {
    out: Outcome,
    console: String,
}

impl Boot {
    fn run(vmm: &Path, dir: &TempDir, cmdline: &str, extra: &[String]) -> Boot {
        let (cmd, log) = probe_cmd(vmm, dir, cmdline, extra);
        let out = run_with_deadline(cmd, LIMIT);
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        Boot { out, console }
    }

    fn describe(&self) -> String {
        format!("--- console ---\n{}\n{}", self.console, self.out.describe())
    }

    fn assert_pass(&self) {
        assert!(!self.out.timed_out, "timed out\n{}", self.describe());
        assert!(!self.console.contains("probe: FAIL"), "{}", self.describe());
        assert!(self.console.contains("probe: PASS"), "{}", self.describe());
        assert_eq!(self.out.status.code(), Some(0), "{}", self.describe());
    }

    fn has(&self, needle: &str) {
        assert!(
            self.console.contains(needle),
            "console lacks {needle:?}\n{}",
            self.describe()
        );
    }
}

/// The shared folder with `in.bin` = probe_pattern(seed).
fn shared_folder(dir: &TempDir, name: &str, seed: u64) -> PathBuf {
    let share = dir.join(name);
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("in.bin"), probe_pattern(seed, LEN)).unwrap();
    share
}

/// `path=` with QEMU-style `,,` for each comma.
fn fs_arg(tag: &str, share: &Path, ro: bool) -> String {
    let path = share.display().to_string().replace(',', ",,");
    format!("tag={tag},path={path}{}", if ro { ",ro" } else { "" })
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn probe_reads_and_writes_a_host_folder() {
    let Some((vmm, _)) = setup("probe_reads_and_writes_a_host_folder") else {
        return;
    };
    let dir = TempDir::new("virtio-fs-rw");
    // A `,` and a `:` in the folder's name.
    let share = shared_folder(&dir, "sh,are:d", 7);
    let b = Boot::run(
        &vmm,
        &dir,
        "probe.fs_read=in.bin probe.fs_write=out.bin probe.fs_seed=7",
        &["--fs".into(), fs_arg("share", &share, false)],
    );
    b.assert_pass();
    b.has("probe: fs0 tag \"share\" request queues 1");
    b.has("probe: fs0 FUSE_INIT ok");
    b.has("probe: fs0 read in.bin: 4096 bytes match (seed 7)");
    b.has("probe: fs0 wrote out.bin: 4096 bytes (seed 8)");
    b.has("InterruptStatus used-buffer bit seen");
    let written = std::fs::read(share.join("out.bin")).unwrap();
    assert!(
        written == probe_pattern(8, LEN),
        "out.bin differs from the pattern"
    );
    // virtiofsd ended with the VM.
    let left = processes_mentioning(&share.display().to_string());
    assert!(left.is_empty(), "virtiofsd still running: {left:?}");
}

/// Starts virtiofsd on `share`, listening on `sock`.
fn start_virtiofsd(virtiofsd: &Path, share: &Path, sock: &Path) -> Child {
    let child = Command::new(virtiofsd)
        .arg("--socket-path")
        .arg(sock)
        .arg("--shared-dir")
        .arg(share)
        .arg("--log-level=error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start virtiofsd");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no virtiofsd socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn joins_a_running_virtiofsd() {
    let Some((vmm, virtiofsd)) = setup("joins_a_running_virtiofsd") else {
        return;
    };
    let dir = TempDir::new("virtio-fs-sock");
    let share = shared_folder(&dir, "share", 11);
    let sock = dir.join("vfs.sock");
    let mut daemon = start_virtiofsd(&virtiofsd, &share, &sock);
    let b = Boot::run(
        &vmm,
        &dir,
        "probe.fs_read=in.bin probe.fs_write=out.bin probe.fs_seed=11",
        &["--fs".into(), format!("tag=s,socket={}", sock.display())],
    );
    b.assert_pass();
    b.has("probe: fs0 read in.bin: 4096 bytes match (seed 11)");
    assert!(std::fs::read(share.join("out.bin")).unwrap() == probe_pattern(12, LEN));
    // It served one connection and exits when the VM closes it.
    let start = Instant::now();
    while daemon.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "virtiofsd stayed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn read_only_folder_refuses_guest_writes() {
    let Some((vmm, _)) = setup("read_only_folder_refuses_guest_writes") else {
        return;
    };
    let dir = TempDir::new("virtio-fs-ro");
    let share = shared_folder(&dir, "share", 3);
    let before: Vec<_> = std::fs::read_dir(&share).unwrap().flatten().collect();
    let b = Boot::run(
        &vmm,
        &dir,
        "probe.fs_read=in.bin probe.fs_write=new.bin probe.fs_seed=3 probe.fs_expect_error=30",
        &["--fs".into(), fs_arg("ro", &share, true)],
    );
    b.assert_pass();
    b.has("probe: fs0 read in.bin: 4096 bytes match (seed 3)");
    b.has("probe: fs0 create new.bin refused with error -30 as expected");
    assert!(!share.join("new.bin").exists());
    let after: Vec<_> = std::fs::read_dir(&share).unwrap().flatten().collect();
    assert_eq!(before.len(), after.len());
    assert!(std::fs::read(share.join("in.bin")).unwrap() == probe_pattern(3, LEN));
}

#[test]
fn killed_virtiofsd_fails_guest_requests_and_the_vm_goes_on() {
    let Some((vmm, virtiofsd)) = setup("killed_virtiofsd_fails_guest_requests_and_the_vm_goes_on")
    else {
        return;
    };
    let dir = TempDir::new("virtio-fs-kill");
    let share = shared_folder(&dir, "share", 5);
    let sock = dir.join("vfs.sock");
    let mut daemon = start_virtiofsd(&virtiofsd, &share, &sock);
    let (mut cmd, log) = probe_cmd(
        &vmm,
        &dir,
        "probe.fs_read=in.bin probe.fs_seed=5 probe.fs_until_error_ms=60000",
        &["--fs".into(), format!("tag=k,socket={}", sock.display())],
    );
    let stderr_path = dir.join("stderr.log");
    let mut vm = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let console = || std::fs::read_to_string(&log).unwrap_or_default();
    while !console().contains("polling until a request fails") {
        assert!(
            start.elapsed() < LIMIT && vm.try_wait().unwrap().is_none(),
            "the probe never got to polling\n{}",
            console()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let status = loop {
        if let Some(s) = vm.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > LIMIT {
            let _ = vm.kill();
            panic!("the VM hung after virtiofsd died\n{}", console());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let console = console();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let all = format!("{console}\n--- stderr ---\n{stderr}");
    assert!(
        console.contains("probe: fs0 read in.bin: 4096 bytes match"),
        "{all}"
    );
    assert!(
        console.contains("probe: fs0 request failed with error -5 after the backend went"),
        "{all}"
    );
    assert!(console.contains("probe: PASS"), "{all}");
    assert_eq!(status.code(), Some(0), "{all}");
    let gone = stderr
        .lines()
        .filter(|l| l.contains("vhost-user backend is gone"))
        .count();
    assert_eq!(gone, 1, "{all}");
}

/// One `b2p-vmm: error: ` line, exit 1, containing `needle`.
fn assert_one_error(out: &Outcome, needle: &str) {
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("b2p-vmm: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.describe());
    assert!(errors[0].contains(needle), "{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)),
        "{}",
        out.describe()
    );
}

#[test]
fn bad_fs_options_are_one_line_each() {
    let Some((vmm, _)) = setup("bad_fs_options_are_one_line_each") else {
        return;
    };
    let dir = TempDir::new("virtio-fs-bad");
    let share = shared_folder(&dir, "share", 1);
    let missing = dir.join("no-such-folder");
    let run = |extra: &[String], env: &[(&str, &str)]| {
        let (mut cmd, _) = probe_cmd(&vmm, &dir, "", extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_with_deadline(cmd, LIMIT)
    };
    let out = run(&["--fs".into(), fs_arg("a", &missing, false)], &[]);
    assert_one_error(
        &out,
        &format!("shared folder {}: does not exist", missing.display()),
    );
    let twice = [
        "--fs".into(),
        fs_arg("a", &share, false),
        "--fs".into(),
        fs_arg("a", &share, true),
    ];
    assert_one_error(&run(&twice, &[]), "--fs tag \"a\" is given twice");
    assert_one_error(
        &run(&["--fs".into(), "tag=a:b,path=/tmp".into()], &[]),
        "may hold only letters",
    );
    if !Path::new(b2p_vmm::virtiofsd::DEBIAN_VIRTIOFSD).exists() {
        let out = run(
            &["--fs".into(), fs_arg("a", &share, false)],
            &[("PATH", "/nonexistent"), ("HOME", "/nonexistent")],
        );
        assert_one_error(&out, "apt install virtiofsd");
        assert!(
            out.stderr.contains("cargo install virtiofsd"),
            "{}",
            out.describe()
        );
    }
}

/// `b2p ARGS` with its machines under `dir`.
fn b2p(dir: &TempDir, args: &[&str]) -> Outcome {
    b2p_home(dir, args, None)
}

/// [`b2p`] with HOME set to `home`.
fn b2p_home(dir: &TempDir, args: &[&str], home: Option<&Path>) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_b2p"));
    cmd.args(args).env("XDG_DATA_HOME", dir.path());
    if let Some(h) = home {
        cmd.env("HOME", h);
    }
    run_with_deadline(cmd, LIMIT)
}

#[test]
fn manager_volumes_reach_the_guest() {
    let Some(_) = setup("manager_volumes_reach_the_guest") else {
        return;
    };
    if which("ssh-keygen").is_none() {
        return skip("manager_volumes_reach_the_guest", "ssh-keygen not found");
    }
    let dir = TempDir::new("virtio-fs-manager");
    let share = shared_folder(&dir, "share", 9);
    let kernel = probe_kernel(&dir).display().to_string();
    let vol = format!("{}:/data:ro", share.display());
    let cmdline = "probe.nosmp=1 probe.fs_read=in.bin probe.fs_seed=9 probe.fs_write=x.bin \
                   probe.fs_expect_error=30 probe.hold_ms=60000";
    let base = [
        "--memory",
        "128",
        "--cpus",
        "1",
        "--disk-size",
        "64",
        "--kernel",
        &kernel,
        "--network",
        "none",
    ];
    let mut args = vec!["create", "fsm"];
    args.extend(base);
    args.extend(["--volume", &vol, "--cmdline", cmdline]);
    let out = b2p(&dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let inspect: serde_json::Value =
        serde_json::from_str(&b2p(&dir, &["inspect", "fsm"]).stdout).unwrap();
    let v = &inspect["config"]["volumes"][0];
    assert_eq!(v["guest"], "/data", "{inspect}");
    assert_eq!(v["read_only"], true, "{inspect}");
    assert_eq!(
        v["host"].as_str().map(PathBuf::from),
        Some(std::fs::canonicalize(&share).unwrap())
    );
    // The probe has no agent: start says so after 2 s and leaves it running.
    let out = b2p(&dir, &["start", "fsm", "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    let console = dir.path().join("b2p/machines/fsm/console.log");
    let start = Instant::now();
    let text = loop {
        let t = std::fs::read_to_string(&console).unwrap_or_default();
        if t.contains("probe: holding") {
            break t;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the probe never got to its hold\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = b2p(&dir, &["stop", "fsm", "--timeout", "1"]);
    assert!(text.contains("b2p.fs=vol0:/data:ro"), "{text}");
    assert!(text.contains("probe: fs0 tag \"vol0\""), "{text}");
    assert!(
        text.contains("probe: fs0 read in.bin: 4096 bytes match (seed 9)"),
        "{text}"
    );
    assert!(
        text.contains("create x.bin refused with error -30"),
        "{text}"
    );
    assert!(text.contains("probe: PASS"), "{text}");
    assert!(!share.join("x.bin").exists());

    // --volume none: no folder; bad volumes: one error line each.
    let mut args = vec!["create", "nofs"];
    args.extend(base);
    args.extend(["--volume", "none"]);
    assert_eq!(b2p(&dir, &args).status.code(), Some(0));
    let inspect: serde_json::Value =
        serde_json::from_str(&b2p(&dir, &["inspect", "nofs"]).stdout).unwrap();
    assert!(inspect["config"].get("volumes").is_none(), "{inspect}");
    // By default: the home folder at the same path; none when HOME is no folder.
    for (name, home, want) in [
        (
            "homefs",
            share.clone(),
            Some(std::fs::canonicalize(&share).unwrap()),
        ),
        ("nohome", dir.join("no-such-home"), None),
    ] {
        let mut args = vec!["create", name];
        args.extend(base);
        let out = b2p_home(&dir, &args, Some(&home));
        assert_eq!(out.status.code(), Some(0), "{}", out.describe());
        let inspect: serde_json::Value =
            serde_json::from_str(&b2p(&dir, &["inspect", name]).stdout).unwrap();
        let host = inspect["config"]["volumes"][0]["host"]
            .as_str()
            .map(PathBuf::from);
        assert_eq!(host, want, "{inspect}");
        if want.is_some() {
            assert_eq!(
                inspect["config"]["volumes"][0]["guest"]
                    .as_str()
                    .map(PathBuf::from),
                Some(home)
            );
        }
    }
    let missing = dir.join("missing").display().to_string();
    let colon = format!("{}:/a:/b", share.display());
    for (vol, want) in [
        (missing.as_str(), "missing"),
        (colon.as_str(), "may not contain ':'"),
        ("relative", "not an absolute path"),
    ] {
        let mut args = vec!["create", "bad"];
        args.extend(base);
        args.extend(["--volume", vol]);
        let out = b2p(&dir, &args);
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{}",
            out.describe()
        );
        assert_eq!(lines.len(), 1, "{}", out.describe());
        assert!(lines[0].contains(want), "{}", out.describe());
        assert!(!dir.path().join("b2p/machines/bad").exists());
    }
}
