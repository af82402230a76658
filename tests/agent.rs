//! Tier-3 tests of the guest agent without a VM: b2p-agent on Unix sockets
//! in front of the host's real Podman (`podman system service`, started by
//! the agent itself), driven by the python `varlink` client from PyPI
//! (tests/varlink/*.py), by b2p's own client (`b2p varlink`), and by a stock
//! `podman --remote` through the agent's REST forwarder.
//!
//! Podman gets a private store, containers.conf and storage.conf under a
//! temporary directory, and runs in a private mount namespace. Where a
//! hybrid cgroup layout mounts cgroup2 at /sys/fs/cgroup/unified, crun
//! refuses to run ("cgroups in hybrid mode not supported"): that mount is
//! detached inside the namespace only. Containers get no network
//! (netns "none"), so the host's network is never touched.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/busybox:latest";

/// Prints a skip line straight to stderr (past libtest's capture).
#[path = "common/require.rs"]
mod require;

fn skip(reason: &str) {
    require::skip(reason);
}

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why these tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (podman service and a private mount namespace)".into());
    }
    if !have("podman", &["--version"]) {
        return Some("podman is not installed (apt-get install podman crun conmon)".into());
    }
    if !have("python3", &["-c", "import varlink"]) {
        return Some("python varlink is missing (pip install varlink)".into());
    }
    if !have("unshare", &["--version"]) {
        return Some("unshare (util-linux) is missing".into());
    }
    if busybox_static().is_none() {
        return Some("no static busybox (apt-get install busybox-static)".into());
    }
    None
}

fn busybox_static() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            // A static ELF has no PT_INTERP: look for the interpreter path.
            std::fs::read(p)
                .map(|b| b.starts_with(b"\x7fELF") && !b.windows(12).any(|w| w == b"/lib64/ld-li"))
                .unwrap_or(false)
        })
}

/// The workspace's target profile directory (where cargo put this test).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/agent-<hash>
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The b2p-agent binary: `B2P_AGENT_BIN`, else built with cargo next to
/// this test.
fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("B2P_AGENT_BIN") {
        return p.into();
    }
    let profile = profile_dir();
    let target = profile.parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "b2p-agent", "--target-dir"])
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build -p b2p-agent");
    assert!(status.success(), "cargo build -p b2p-agent failed");
    profile.join("b2p-agent")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A private Podman setup and an agent serving it.
struct Fixture {
    dir: PathBuf,
    agent: Child,
    /// Where the agent's sockets are, seen from the host.
    sockets: PathBuf,
}

impl Fixture {
    fn varlink(&self) -> PathBuf {
        self.sockets.join("varlink.sock")
    }

    fn forward(&self) -> PathBuf {
        self.sockets.join("podman-fwd.sock")
    }

    fn podman_env(&self, cmd: &mut Command) {
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
    }

    fn start(name: &str) -> Fixture {
        Fixture::start_with(name, &[])
    }

    /// The agent with `extra` arguments after the fixture's own.
    fn start_with(name: &str, extra: &[&str]) -> Fixture {
        let dir = std::env::temp_dir().join(format!("b2p-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rootfs/bin")).unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\nnetns = \"none\"\n\
             default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/root\"\nrunroot = \"{0}/run\"\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("milestones"), "kernel 0.000\ninit 0.250\n").unwrap();

        // The offline busybox image, from busybox-static.
        let bb = busybox_static().unwrap();
        std::fs::copy(&bb, dir.join("rootfs/bin/busybox")).unwrap();
        for applet in ["sh", "echo", "sleep", "cat", "ls", "true"] {
            std::os::unix::fs::symlink("busybox", dir.join("rootfs/bin").join(applet)).unwrap();
        }
        run(Command::new("tar")
            .arg("-C")
            .arg(dir.join("rootfs"))
            .arg("-cf")
            .arg(dir.join("busybox.tar"))
            .arg("."));
        let mut fx = Fixture {
            dir: dir.clone(),
            agent: Command::new("true").spawn().unwrap(),
            sockets: dir.clone(),
        };
        let mut import = Command::new("podman");
        fx.podman_env(&mut import);
        run(import.arg("import").arg(dir.join("busybox.tar")).arg(IMAGE));

        let mut agent = Command::new("unshare");
        fx.podman_env(&mut agent);
        agent
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                "if grep -q ' /sys/fs/cgroup/unified cgroup2 ' /proc/mounts; then \
                   umount /sys/fs/cgroup/unified || exit 1; fi; exec \"$0\" \"$@\"",
            )
            .arg(agent_binary())
            .arg("--unix")
            .arg(fx.varlink())
            .arg("--forward-unix")
            .arg(fx.forward())
            .arg("--podman-socket")
            .arg(dir.join("podman.sock"))
            .arg("--milestones")
            .arg(dir.join("milestones"))
            .arg("--data-mount")
            .arg(&dir)
            .arg("--shutdown-command")
            .arg(format!(
                "touch {}",
                dir.join("shutdown-requested").display()
            ))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap());
        let _ = fx.agent.wait();
        fx.agent = agent.spawn().expect("starting b2p-agent");
        fx.wait_listening();
        fx
    }

    /// The agent inside a chroot of the unpacked guest image, with the
    /// image's own Podman, crun, conmon, netavark and configuration, in
    /// private mount and network namespaces.
    fn chroot(image: &Path) -> Fixture {
        let dir = std::env::temp_dir().join(format!("b2p-chroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        run(Command::new("sh").arg("-c").arg(format!(
            "gzip -dc '{}' | (cd '{}' && cpio -idm --quiet)",
            image.display(),
            root.display()
        )));
        // The freshly built agent, in place of the image's copy.
        std::fs::copy(agent_binary(), root.join("usr/bin/b2p-agent")).unwrap();
        std::fs::create_dir_all(root.join("b2p-test")).unwrap();
        // This sandbox refuses raising RLIMIT_NOFILE/NPROC to Podman's
        // defaults; a VM does not. Only the test's copy is changed.
        let limits = "default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]";
        let conf = root.join("etc/containers/containers.conf");
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        let text = if text.contains("[containers]") {
            text.replacen("[containers]", &format!("[containers]\n{limits}"), 1)
        } else {
            format!("{text}\n[containers]\n{limits}\n")
        };
        std::fs::write(&conf, text).unwrap();
        let script = r#"set -e
R=$1
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
if grep -q " $R/sys/fs/cgroup/unified cgroup2 " /proc/mounts; then umount "$R/sys/fs/cgroup/unified"; fi
mount --rbind /dev "$R/dev"
mount -t tmpfs run "$R/run"
mount -t tmpfs tmp "$R/tmp"
ip link set lo up 2>/dev/null || true
chroot "$R" podman load -q -i /usr/share/b2p/busybox-image.tar
printf 'kernel 0.000\ninit 0.250\n' >"$R/b2p-test/milestones"
exec chroot "$R" /usr/bin/b2p-agent --unix /b2p-test/varlink.sock \
  --forward-unix /b2p-test/podman-fwd.sock --milestones /b2p-test/milestones \
  --shutdown-command "touch /b2p-test/shutdown-requested"
"#;
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let mut fx = Fixture {
            dir: dir.clone(),
            agent: Command::new("unshare")
                .args([
                    "-m",
                    "-n",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    "sh",
                ])
                .arg(&root)
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting the chroot"),
            sockets: root.join("b2p-test"),
        };
        fx.wait_listening();
        fx
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(self.varlink()).is_err() {
            if let Ok(Some(status)) = self.agent.try_wait() {
                panic!("b2p-agent exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn python(&self, script: &str, args: &[&str]) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/varlink")
            .join(script);
        let out = Command::new("python3")
            .arg(path)
            .arg(format!("unix:{}", self.varlink().display()))
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "{script}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{script} failed; agent log:\n{}",
            self.log()
        );
        stdout
    }

    /// One raw varlink call on a fresh connection.
    fn call(&self, method: &str, params: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(self.varlink()).unwrap();
        let mut c = BufReader::new(s.try_clone().unwrap());
        write!(s, "{{\"method\":\"{method}\",\"parameters\":{params}}}\0").unwrap();
        let mut buf = Vec::new();
        c.read_until(0, &mut buf).unwrap();
        serde_json::from_slice(&buf[..buf.len() - 1]).unwrap()
    }

    /// io.b2p.Machine.GetStatus: the whole reply and its milestones' names
    /// in the order it gives them (by time).
    fn milestones(&self) -> (serde_json::Value, Vec<String>) {
        let r = self.call("io.b2p.Machine.GetStatus", "{}");
        let names = r["parameters"]["status"]["milestones"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_string))
            .collect();
        (r, names)
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.agent.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SIGTERM: the agent stops the podman service it started.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.agent.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.agent.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        if std::env::var_os("B2P_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
fn agent_serves_io_podman_to_python_varlink_and_podman_remote() {
    if let Some(reason) = missing_prerequisite() {
        return skip(&reason);
    }
    let fx = Fixture::start("agent");
    check_agent(&fx, IMAGE);
}

/// The guest image built by guest-image/build.sh, if there is one.
fn guest_image() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let p = cache.join("b2p/image/boot2podman.gz");
    p.exists().then_some(p)
}

#[test]
fn agent_in_a_chroot_of_the_guest_image() {
    if let Some(reason) = missing_prerequisite() {
        return skip(&reason);
    }
    let Some(image) = guest_image() else {
        return skip("no guest image in ~/.cache/b2p/image (bash guest-image/build.sh)");
    };
    if !have("cpio", &["--version"]) {
        return skip("cpio is missing");
    }
    let fx = Fixture::chroot(&image);
    // The image's busybox image, loaded as the init loads it.
    check_agent(&fx, "docker.io/library/busybox:latest");
}

fn check_agent(fx: &Fixture, image: &str) {
    // The python varlink client: interfaces, GetVersion, images, a container
    // run end to end, errors, 50 concurrent clients.
    let out = fx.python("conformance.py", &[image]);
    assert!(out.contains(" passed, 0 failed"), "{out}");

    // Shutdown answers first and then runs the configured command.
    let r = fx.call("io.b2p.Machine.Shutdown", "{}");
    assert_eq!(r, serde_json::json!({"parameters": {}}));
    let flag = fx.sockets.join("shutdown-requested");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !flag.exists() {
        assert!(Instant::now() < deadline, "shutdown command never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The milestones of the init file come back in order, with the agent's.
    let (r, names) = fx.milestones();
    assert_eq!(names[..2], ["kernel", "init"], "{r}");
    assert!(names.iter().any(|n| n == "agent-listening"), "{r}");

    // A stock podman client through the agent's REST forwarder.
    let url = format!("unix://{}", fx.forward().display());
    let out = run(Command::new("podman").args(["--remote", "--url", &url, "version"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Server:") && text.contains("Version:"),
        "{text}"
    );
    let out = run(Command::new("podman").args(["--remote", "--url", &url, "ps", "-a"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CONTAINER ID"));
    let out = run(Command::new("podman").args(["--remote", "--url", &url, "images"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("busybox"));

    // exec hijacks its connection, and Podman's service warns about each
    // one ("IdleTracker: StateClosed transition ..."): the agent says once
    // that it leaves them out, and its log never gets one.
    let remote = |args: &[&str]| {
        run(Command::new("timeout")
            .args(["120", "podman", "--remote", "--url", &url])
            .args(args))
    };
    remote(&["run", "-d", "--name", "b2p-idle", image, "sleep", "600"]);
    for _ in 0..3 {
        let out = remote(&["exec", "b2p-idle", "echo", "exec-ok"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "exec-ok");
    }
    remote(&["rm", "-f", "-t", "0", "b2p-idle"]);
    let log = fx.log();
    assert!(
        log.contains("IdleTracker warnings are left out"),
        "podman printed no IdleTracker warning, or the agent did not see it:\n{log}"
    );
    assert!(
        !log.contains("IdleTracker: StateClosed"),
        "an IdleTracker warning reached the agent's log:\n{log}"
    );
}

/// `--wait-milestone busybox-image` (the image's agent.sh): the agent keeps
/// its ports shut until the init's milestones file names the milestone, even
/// once Podman answers, so a host never reaches a Podman that is still
/// loading the busybox image.
#[test]
fn wait_milestone_keeps_the_ports_shut_until_the_init_gets_there() {
    if let Some(reason) = missing_prerequisite() {
        return skip(&reason);
    }
    const HOLD: Duration = Duration::from_secs(4);
    let name = "waitms";
    let dir = std::env::temp_dir().join(format!("b2p-{name}-{}", std::process::id()));
    // Stands in for the init: HOLD after the agent starts (its log is
    // created at spawn), it appends the milestone line.
    let init = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let log = dir.join("agent.log");
            let end = Instant::now() + Duration::from_secs(120);
            while !log.exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(HOLD);
            let up = std::fs::read_to_string("/proc/uptime").unwrap();
            let up = up.split_whitespace().next().unwrap().to_string();
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("milestones"))
                .unwrap();
            std::io::Write::write_all(&mut f, format!("busybox-image {up}\n").as_bytes()).unwrap();
            Instant::now()
        })
    };
    let fx = Fixture::start_with(
        name,
        &["--podman-at-start", "--wait-milestone", "busybox-image"],
    );
    let listening = Instant::now();
    let written = init.join().unwrap();
    assert!(
        listening >= written,
        "the agent listened {:?} before the milestone was written:\n{}",
        written - listening,
        fx.log()
    );
    assert!(
        fx.log().contains("the init reached busybox-image"),
        "{}",
        fx.log()
    );
    let (st, names) = fx.milestones();
    let at = |n: &str| names.iter().position(|m| m == n);
    assert!(
        at("busybox-image").is_some() && at("busybox-image") < at("agent-listening"),
        "{st}"
    );
    assert!(at("podman-ready").is_some(), "{st}");
}

/// `--podman-at-start`: the agent starts Podman's service and opens its
/// socket only once Podman answers, so its first GetVersion needs no start
/// of the service; the podman-ready milestone comes before agent-listening.
#[test]
fn podman_at_start_answers_before_the_agent_listens() {
    if let Some(reason) = missing_prerequisite() {
        return skip(&reason);
    }
    let t0 = Instant::now();
    let fx = Fixture::start_with("atstart", &["--podman-at-start"]);
    let listening = t0.elapsed();
    let t1 = Instant::now();
    let v = fx.call("io.podman.GetVersion", "{}");
    let first = t1.elapsed();
    assert!(v["parameters"]["version"].is_string(), "{v}");
    let (st, names) = fx.milestones();
    assert_eq!(st["parameters"]["status"]["podman_ready"], true, "{st}");
    let at = |n: &str| names.iter().position(|m| m == n);
    assert!(
        at("podman-ready").is_some() && at("podman-ready") < at("agent-listening"),
        "{st}"
    );
    eprintln!(
        "FIGURES: --podman-at-start: agent listening {listening:?} after spawn, first GetVersion {first:?}"
    );
    // The version was fetched at start: the first call is a cached answer
    // (podman's /version runs conmon and the OCI runtime: a second or more).
    assert!(
        first < Duration::from_millis(500),
        "first GetVersion took {first:?}"
    );
}

#[test]
fn b2p_cli_calls_the_agent() {
    if let Some(reason) = missing_prerequisite() {
        return skip(&reason);
    }
    let fx = Fixture::start("cli");
    let address = format!("unix:{}", fx.varlink().display());
    let b2p = env!("CARGO_BIN_EXE_b2p");
    let out = run(Command::new(b2p).args(["varlink", &address, "call", "io.podman.GetVersion"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["remote_api_version"], 1, "{v}");
    assert!(v["os_arch"].as_str().unwrap().starts_with("linux/"), "{v}");

    // A container through the CLI alone.
    let out = run(Command::new(b2p).args([
        "varlink",
        &address,
        "call",
        "io.podman.CreateContainer",
        &format!(r#"{{"create":{{"args":["{IMAGE}","echo","from b2p"]}}}}"#),
    ]));
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["container"]
        .as_str()
        .unwrap()
        .to_string();
    let p = format!(r#"{{"name":"{id}"}}"#);
    run(Command::new(b2p).args(["varlink", &address, "call", "io.podman.StartContainer", &p]));
    let out = run(Command::new(b2p).args([
        "varlink",
        &address,
        "call",
        "io.podman.WaitContainer",
        &format!(r#"{{"name":"{id}","interval":50}}"#),
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"exitcode\": 0"));
    let out = run(Command::new(b2p).args([
        "varlink",
        &address,
        "call",
        "io.podman.GetContainerLogs",
        &p,
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("from b2p"));

    // An error reply: exit status 1, the error as JSON on stderr.
    let out = Command::new(b2p)
        .args([
            "varlink",
            &address,
            "call",
            "io.podman.GetContainer",
            r#"{"id":"nope"}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["error"], "io.podman.ContainerNotFound");
    // A bad address: exit status 2 with one clear line.
    let out = Command::new(b2p)
        .args(["varlink", "tcp:1.2.3.4", "call", "io.podman.GetVersion"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn agent_figures_rss_and_getversion_latency() {
    if let Some(reason) = missing_prerequisite() {
        return skip(&reason);
    }
    let fx = Fixture::start("figures");
    let out = fx.python("latency.py", &["1000"]);
    // The same over a raw socket, without the python client's own cost.
    let mut s = UnixStream::connect(fx.varlink()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut samples = Vec::with_capacity(1000);
    let mut buf = Vec::new();
    for _ in 0..1001 {
        let t0 = Instant::now();
        s.write_all(b"{\"method\":\"io.podman.GetVersion\"}\0")
            .unwrap();
        buf.clear();
        r.read_until(0, &mut buf).unwrap();
        samples.push(t0.elapsed());
    }
    samples.remove(0);
    samples.sort();
    let rss = fx.rss_kib().unwrap_or(0);
    eprintln!(
        "FIGURES: agent RSS {rss} KiB after the run; {}; raw socket GetVersion p50 {:?} p99 {:?}",
        out.trim(),
        samples[500],
        samples[990]
    );
    let mut rest = String::new();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = r.read_to_string(&mut rest);
}
