//! Helpers for the guest-image tests: where the built image is, a bounded
//! QEMU (`-M microvm -accel tcg`) boot that returns the guest console, raw
//! disk files made with host tools, machines made by `b2p create`, child
//! processes ended on drop, and loud skips when something is missing.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// QEMU boots are heavy under TCG: one at a time per test binary.
static BOOT_LOCK: Mutex<()> = Mutex::new(());

pub fn boot_lock() -> MutexGuard<'static, ()> {
    BOOT_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[path = "../common/require.rs"]
mod require;

/// Prints a skip line straight to stderr (past libtest's capture).
pub fn skip(reason: &str) {
    require::skip(reason);
}

/// The image directory: `$B2P_CACHE/image` (default `~/.cache/b2p/image`).
pub fn image_dir() -> PathBuf {
    let cache = std::env::var_os("B2P_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/b2p")
        });
    cache.join("image")
}

/// The same initramfs compressed as legacy lz4, when the build made it.
pub fn lz4_initrd() -> Option<PathBuf> {
    let p = image_dir().join("boot2podman.lz4");
    p.is_file().then_some(p)
}

/// The built kernel and initrd, or `None` after printing why.
pub fn image() -> Option<(PathBuf, PathBuf)> {
    let d = image_dir();
    let k = d.join("vmlinuz64");
    let i = d.join("boot2podman.gz");
    if k.is_file() && i.is_file() {
        Some((k, i))
    } else {
        skip(&format!(
            "guest image not built in {} (run guest-image/build.sh)",
            d.display()
        ));
        None
    }
}

pub fn have_tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The host TSC frequency in kHz for `tsc_early_khz=` (DESIGN.md §8).
pub fn host_khz() -> u64 {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

pub struct Boot {
    pub console: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Boot {
    pub fn has(&self, s: &str) -> bool {
        self.console.contains(s)
    }
    /// The text after `b2p-check: <key>` on its line.
    pub fn check(&self, key: &str) -> Option<String> {
        let pat = format!("b2p-check: {key}");
        self.console
            .lines()
            .find_map(|l| l.find(&pat).map(|i| l[i + pat.len()..].trim().to_string()))
    }
    pub fn dump(&self) -> String {
        format!(
            "--- guest console ({:.1}s{}) ---\n{}\n--- end ---",
            self.elapsed.as_secs_f64(),
            if self.timed_out { ", TIMED OUT" } else { "" },
            self.console
        )
    }
}

/// Boots vmlinuz64 + boot2podman.gz under `qemu-system-x86_64 -M microvm
/// -accel tcg` with the raw `disks` as virtio-blk devices (vda, vdb, ...),
/// a user-mode virtio-net NIC and virtio-rng; returns the console once the
/// guest powers off or `timeout` passes (QEMU is then killed).
pub fn boot_qemu(
    kernel: &Path,
    initrd: &Path,
    disks: &[&Path],
    cmdline: &str,
    timeout: Duration,
) -> Boot {
    let dir = tempfile_dir("b2p-qemu");
    let log = dir.join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-global", "virtio-mmio.force-legacy=false"])
    .args(["-serial", &format!("file:{}", log.display())])
    .args(["-monitor", "none", "-display", "none"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        &format!(
            "console=ttyS0 tsc_early_khz={} panic=-1 {cmdline}",
            host_khz()
        ),
    ])
    .args([
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-device,netdev=n0",
    ])
    .args(["-device", "virtio-rng-device"]);
    for (i, d) in disks.iter().enumerate() {
        cmd.args([
            "-drive",
            &format!("if=none,id=d{i},format=raw,file={}", d.display()),
            "-device",
            &format!("virtio-blk-device,drive=d{i}"),
        ]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn qemu-system-x86_64");
    let mut timed_out = false;
    let mut done_at: Option<Instant> = None;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            break;
        }
        // The check path powers off; give QEMU a moment to exit by itself.
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains("b2p-check: done") || text.contains("Kernel panic") {
            let t = *done_at.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let mut console = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
    if !err.is_empty() {
        console.push_str("\n[qemu stderr] ");
        console.push_str(&err);
    }
    let _ = fs::remove_dir_all(&dir);
    Boot {
        console,
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// A fresh directory under $TMPDIR or /var/tmp (disk-backed: raw disks are large).
pub fn tempfile_dir(prefix: &str) -> PathBuf {
    let base = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    let d = base.join(format!("{prefix}-{}-{}", std::process::id(), rand_u64()));
    fs::create_dir_all(&d).unwrap();
    d
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
}

pub fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A sparse raw disk of `mib` MiB, all zeroes.
pub fn blank_disk(path: &Path, mib: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// A disk made the way podman-machine/docker-machine make them: a tar whose
/// first entry is `boot2podman, please format-me`, then `.ssh/authorized_keys`.
pub fn format_me_disk(path: &Path, mib: u64, authorized_key: &str) {
    let d = tempfile_dir("b2p-userdata");
    fs::write(d.join("boot2podman, please format-me"), "").unwrap();
    fs::create_dir_all(d.join(".ssh")).unwrap();
    fs::write(
        d.join(".ssh/authorized_keys"),
        format!("{authorized_key}\n"),
    )
    .unwrap();
    let tar = d.join("userdata.tar");
    sh(&format!(
        "cd '{}' && tar --format=gnu -cf '{}' 'boot2podman, please format-me' .ssh",
        d.display(),
        tar.display()
    ));
    blank_disk(path, mib);
    sh(&format!(
        "dd if='{}' of='{}' conv=notrunc status=none",
        tar.display(),
        path.display()
    ));
    let _ = fs::remove_dir_all(&d);
}

/// A fresh ed25519 key `dir/id_ed25519` (comment `comment`) and a
/// format-me disk `dir/data.img` of `mib` MiB that authorizes it: (key, disk).
pub fn keyed_format_me_disk(dir: &Path, mib: u64, comment: &str) -> (PathBuf, PathBuf) {
    let key = dir.join("id_ed25519");
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -C {comment} -f '{}'",
        key.display()
    ));
    let public = fs::read_to_string(dir.join("id_ed25519.pub")).unwrap();
    let disk = dir.join("data.img");
    format_me_disk(&disk, mib, public.trim());
    (key, disk)
}

/// `dir/passt/passt.sock`, in a folder made for it that only passt may use:
/// as root passt drops to nobody, so the folder is then nobody's (0700).
pub fn passt_socket_path(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let sock_dir = dir.join("passt");
    fs::create_dir(&sock_dir).unwrap();
    if is_root() {
        sh(&format!("chown nobody '{}'", sock_dir.display()));
    }
    fs::set_permissions(&sock_dir, fs::Permissions::from_mode(0o700)).unwrap();
    sock_dir.join("passt.sock")
}

pub fn sha256(path: &Path) -> String {
    sh(&format!("sha256sum '{}' | cut -d' ' -f1", path.display()))
}

/// A child process (a daemon the test started) killed and reaped on drop.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls (every 10 ms) until `ok` holds, up to `limit`; how long it took.
pub fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if ok() {
            return Some(t.elapsed());
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `b2p ARGS` with its machines under `xdg` (`XDG_DATA_HOME`); asserts that
/// it succeeded and returns its stdout.
pub fn b2p_ok<S: AsRef<OsStr>>(xdg: &Path, args: &[S]) -> String {
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_b2p"))
        .args(&args)
        .env("XDG_DATA_HOME", xdg)
        .output()
        .expect("running b2p");
    assert!(
        out.status.success(),
        "b2p {args:?}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `b2p create NAME ARGS --kernel KERNEL` under `xdg` (asserted to
/// succeed): the machine's folder, with its `disk.raw` (the format-me disk)
/// and `id_ed25519`.
pub fn create_machine(xdg: &Path, name: &str, args: &[&str], kernel: &Path) -> PathBuf {
    let mut all: Vec<&OsStr> = vec!["create".as_ref(), name.as_ref()];
    all.extend(args.iter().map(OsStr::new));
    all.extend(["--kernel".as_ref(), kernel.as_os_str()]);
    b2p_ok(xdg, &all);
    xdg.join("b2p/machines").join(name)
}
