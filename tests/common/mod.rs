//! Helpers shared by the integration tests that start real VMs: finding (or
//! building) the `b2p-vmm` binary, KVM availability and loud skips, scratch
//! directories, running the monitor with a deadline, and the probe guest's
//! command line; [`require`] makes skips fail where `B2P_REQUIRE` says so,
//! [`home`] runs the manager `b2p` on a private machines directory.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod home;
pub mod require;

/// Prints the loud skip line the test rules ask for, straight to stderr
/// (past libtest's capture, so it shows even when the test passes); panics
/// instead when `B2P_REQUIRE` lists the reason's kind ([`require`]).
pub fn skip(test: &str, reason: &str) {
    require::skip_named(test, reason);
}

/// `Ok` when /dev/kvm can be opened read-write by this process.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable ({e})"))
}

/// True when /dev/kvm is this workplace's PVM hypervisor (DESIGN.md §8),
/// on which an unmodified Linux never reaches userspace. Built in, kvm_pvm
/// shows only under /sys/module; as a module, also in /proc/modules.
pub fn is_pvm_kvm() -> bool {
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    Path::new("/sys/module/kvm_pvm").exists() || modules.lines().any(|l| l.starts_with("kvm_pvm "))
}

/// True when this process runs as root (some tests drop privileges).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Finds a program on PATH.
pub fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// The target directory and profile directory this test binary was built in
/// (`<target>/<profile>/deps/<test>-<hash>`).
fn target_and_profile() -> Option<(PathBuf, String)> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent()?
    } else {
        deps
    };
    let profile = profile_dir.file_name()?.to_str()?.to_string();
    Some((profile_dir.parent()?.to_path_buf(), profile))
}

/// The `b2p-vmm` binary: `$B2P_VMM` if set, else built once per test
/// process with the same cargo, target directory and profile as this test
/// (a binary of another package is not an artifact of this one).
pub fn vmm_binary() -> Result<PathBuf, String> {
    static VMM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VMM.get_or_init(|| {
        if let Some(p) = std::env::var_os("B2P_VMM") {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(format!("B2P_VMM={} is not a file", p.display()))
            };
        }
        let (target, profile) = target_and_profile().ok_or("cannot locate the target directory")?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "b2p-vmm", "--bin", "b2p-vmm"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let bin = target.join(&profile).join("b2p-vmm");
        match cmd.status() {
            Ok(s) if s.success() => Ok(bin),
            Ok(s) if bin.is_file() => {
                eprintln!(
                    "note: cargo build -p b2p-vmm failed ({s}); using {}",
                    bin.display()
                );
                Ok(bin)
            }
            Ok(s) => Err(format!("cargo build -p b2p-vmm failed: {s}")),
            Err(e) => Err(format!("cannot run cargo to build b2p-vmm: {e}")),
        }
    })
    .clone()
}

/// A scratch directory removed on drop (world-readable, so a test may run
/// the monitor with dropped privileges on files inside it).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "b2p-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Random bytes from the kernel (the initrd payload).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .unwrap();
    buf
}

/// What a finished `b2p-vmm` run left behind.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub wall: Duration,
    pub timed_out: bool,
}

impl Outcome {
    /// A summary for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {:?} timed_out: {} wall: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.timed_out, self.wall, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with stdin closed and stdout/stderr captured; kills it after
/// `limit`.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed();
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    Outcome {
        status,
        stdout,
        stderr,
        wall,
        timed_out,
    }
}

/// A `b2p-vmm` command with a clean environment for its diagnostics.
pub fn vmm_command(vmm: &Path) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.env_remove("RUST_LOG")
        .env_remove("B2P_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("B2P_TIMINGS");
    cmd
}

/// The probe guest's bzImage, copied into `dir` (so that an unprivileged
/// user can read it too).
pub fn probe_kernel(dir: &TempDir) -> PathBuf {
    let dst = dir.join("probe.bzImage");
    std::fs::copy(b2p_probe::BZIMAGE, &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
    dst
}

/// Writes `data` to `dir/name`, world-readable.
pub fn write_file(dir: &TempDir, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// The probe's command line for a boot with the given checks.
pub fn probe_cmdline(mem_mib: u64, cpus: u32, initrd: Option<&[u8]>, extra: &str) -> String {
    let mut s = format!("console=ttyS0 probe.mem={mem_mib} probe.cpus={cpus}");
    if let Some(data) = initrd {
        s.push_str(&format!(
            " probe.initrd_sum={:#x} probe.initrd_size={}",
            b2p_probe::initrd_sum(data),
            data.len()
        ));
    }
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// The bytes the probe writes and checks for `seed` (xorshift64*, as
/// tests/probe/guest/blk.c's fill_pattern): `n` of them.
pub fn probe_pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Parses `b2p-vmm: timing NAME=N` lines from the monitor's stderr.
pub fn timing(stderr: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    stderr
        .lines()
        .filter(|l| l.starts_with("b2p-vmm: timing"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix(key.as_str()))
        .and_then(|v| v.parse().ok())
}

/// The start of a probe bench named `bench`: `None` after a skip line when
/// /dev/kvm is not usable; else the `b2p-vmm` binary (the process exits 1
/// without one) and how many runs `B2P_BENCH_RUNS` asks for (20 by
/// default, at least 1).
pub fn bench_start(bench: &str) -> Option<(PathBuf, usize)> {
    if let Err(reason) = kvm_usable() {
        skip(bench, &reason);
        return None;
    }
    let vmm = match vmm_binary() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{bench}: no b2p-vmm binary: {e}");
            std::process::exit(1);
        }
    };
    let runs: usize = std::env::var("B2P_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(1);
    Some((vmm, runs))
}

/// Min, median and max of timing samples (benches); zeros when empty.
pub fn min_median_max(v: &[u64]) -> (u64, u64, u64) {
    let mut v = v.to_vec();
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return (0, 0, 0);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    (v[0], median, v[n - 1])
}
