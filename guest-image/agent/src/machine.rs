//! The `io.b2p.Machine` interface: the guest's status for the host-side
//! manager (uptime, boot milestones, data disk, Podman readiness),
//! Shutdown, and SetTime (clock.rs).
//!
//! Boot milestones come from the init: `/run/b2p/milestones` holds one line
//! per milestone, `NAME UPTIME_SECONDS` (the first field of /proc/uptime when
//! it was reached), appended in order. The agent adds its own
//! (`agent-listening`, `podman-ready`) in memory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use log::{info, warn};
use serde_json::{json, Map, Value};

use crate::podman::rest::PodmanService;
use crate::protocol::VarlinkError;

/// How often `wait_milestone` reads the milestones file.
const MILESTONE_POLL: Duration = Duration::from_millis(50);

/// Where the machine's files are and how it powers off.
pub struct MachineConfig {
    pub milestones: PathBuf,
    pub data_mount: PathBuf,
    pub shutdown_command: Vec<String>,
}

/// The io.b2p.Machine implementation.
pub struct Machine {
    cfg: MachineConfig,
    own_milestones: Mutex<Vec<(String, f64)>>,
}

/// Seconds since the kernel started, from /proc/uptime.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse().ok()))
        .unwrap_or(0.0)
}

/// This process's resident set size in bytes (VmRSS).
pub fn rss_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        })
        .map_or(0, |kib| kib.saturating_mul(1024))
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Parses the milestones file; malformed lines are skipped.
pub fn parse_milestones(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            let at: f64 = f.next()?.parse().ok()?;
            at.is_finite().then(|| (name.to_string(), at))
        })
        .collect()
}

/// Undoes the octal escapes (`\040`) of /proc/self/mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (source device, fstype) of the mount at `mountpoint`, from mountinfo text.
pub fn find_mount(mountinfo: &str, mountpoint: &Path) -> Option<(String, String)> {
    let want = mountpoint.to_str()?;
    mountinfo.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mp = pre.split_whitespace().nth(4)?;
        if unescape(mp) != want {
            return None;
        }
        let mut p = post.split_whitespace();
        let fstype = p.next()?.to_string();
        let source = unescape(p.next()?);
        Some((source, fstype))
    })
}

fn statvfs(path: &Path) -> Option<(i64, i64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as i64;
    Some((
        (st.f_blocks as i64).saturating_mul(frsize),
        (st.f_bavail as i64).saturating_mul(frsize),
    ))
}

impl Machine {
    pub fn new(cfg: MachineConfig) -> Self {
        Self {
            cfg,
            own_milestones: Mutex::new(Vec::new()),
        }
    }

    /// Records a milestone reached by the agent itself.
    pub fn milestone(&self, name: &str) {
        if let Ok(mut m) = self.own_milestones.lock() {
            m.push((name.to_string(), uptime()));
        }
    }

    /// Whether the init's milestones file names `name` yet.
    pub fn init_reached(&self, name: &str) -> bool {
        std::fs::read_to_string(&self.cfg.milestones)
            .map(|t| parse_milestones(&t).iter().any(|(n, _)| n == name))
            .unwrap_or(false)
    }

    /// Waits until the init's milestones file names `name`, at most
    /// `limit`; says whether it did.
    pub async fn wait_milestone(&self, name: &str, limit: Duration) -> bool {
        let end = tokio::time::Instant::now() + limit;
        loop {
            if self.init_reached(name) {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(MILESTONE_POLL).await;
        }
    }

    fn data_disk(&self) -> Value {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        match find_mount(&mountinfo, &self.cfg.data_mount) {
            Some((device, fstype)) => {
                let (size, free) = statvfs(&self.cfg.data_mount).unwrap_or((0, 0));
                json!({"state": "mounted", "device": device,
                       "mountpoint": self.cfg.data_mount.display().to_string(),
                       "fstype": fstype, "size_bytes": size, "free_bytes": free})
            }
            None => json!({"state": "absent", "device": "", "mountpoint": "", "fstype": "",
                           "size_bytes": 0, "free_bytes": 0}),
        }
    }

    async fn status(&self, podman: &PodmanService) -> Value {
        let mut milestones = std::fs::read_to_string(&self.cfg.milestones)
            .map(|t| parse_milestones(&t))
            .unwrap_or_default();
        if let Ok(own) = self.own_milestones.lock() {
            milestones.extend(own.iter().cloned());
        }
        milestones.sort_by(|a, b| a.1.total_cmp(&b.1));
        let milestones: Vec<Value> = milestones
            .into_iter()
            .map(|(name, at)| json!({"name": name, "uptime": at}))
            .collect();
        json!({"status": {
            "uptime": uptime(),
            "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
            "hostname": read_trimmed("/proc/sys/kernel/hostname"),
            "agent_version": env!("CARGO_PKG_VERSION"),
            "agent_rss_bytes": rss_bytes(),
            "milestones": milestones,
            "data_disk": self.data_disk(),
            "podman_ready": podman.is_up().await,
        }})
    }

    fn shutdown(&self) -> Result<Value, VarlinkError> {
        let Some((prog, args)) = self.cfg.shutdown_command.split_first() else {
            return Err(VarlinkError::new(
                "io.b2p.Machine.ErrorOccurred",
                json!({"reason": "no shutdown command configured"}),
            ));
        };
        let (prog, args) = (prog.clone(), args.to_vec());
        info!("shutdown requested: running {prog} {args:?}");
        // Reply first; the power-off starts a moment later.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match tokio::process::Command::new(&prog)
                .args(&args)
                .status()
                .await
            {
                Ok(s) if s.success() => {}
                Ok(s) => warn!("{prog} exited with {s}"),
                Err(e) => warn!("running {prog}: {e}"),
            }
        });
        Ok(json!({}))
    }

    /// Runs `method`; `None` when this interface does not implement it.
    pub async fn call(
        &self,
        method: &str,
        params: &Map<String, Value>,
        podman: &PodmanService,
    ) -> Option<Result<Value, VarlinkError>> {
        Some(match method {
            "GetStatus" => Ok(self.status(podman).await),
            "Shutdown" => self.shutdown(),
            "SetTime" => crate::clock::set_time(params),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_inits_milestone_and_gives_up_at_the_limit() {
        let path =
            std::env::temp_dir().join(format!("b2p-agent-milestones-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let m = Machine::new(MachineConfig {
            milestones: path.clone(),
            data_mount: "/nonexistent".into(),
            shutdown_command: vec![],
        });
        // No file: it gives up at the limit, not before.
        let t = std::time::Instant::now();
        assert!(
            !m.wait_milestone("busybox-image", Duration::from_millis(200))
                .await
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        // The init appends the line later: the wait sees it.
        std::fs::write(&path, "init 0.4\n").unwrap();
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                std::fs::write(&path, "init 0.4\nbusybox-image 2.1\n").unwrap();
            })
        };
        let t = std::time::Instant::now();
        assert!(
            m.wait_milestone("busybox-image", Duration::from_secs(10))
                .await
        );
        assert!(t.elapsed() >= Duration::from_millis(100));
        writer.await.unwrap();
        // A name is matched whole.
        assert!(
            !m.wait_milestone("busybox", Duration::from_millis(100))
                .await
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn milestones_file() {
        let m = parse_milestones("kernel 0.00\ninit 0.41\nbroken\nnan x\nmodules 1.5\n");
        assert_eq!(
            m,
            [
                ("kernel".into(), 0.0),
                ("init".into(), 0.41),
                ("modules".into(), 1.5)
            ]
        );
    }

    #[test]
    fn mountinfo_lookup() {
        let mi = "22 1 0:21 / / rw - tmpfs rootfs rw\n\
                  40 22 254:1 / /mnt/vda1 rw - ext4 /dev/vda1 rw\n\
                  41 22 254:1 /var/lib/boot2podman /var/lib/boot2podman rw - ext4 /dev/vda1 rw\n\
                  42 22 0:5 / /with\\040space rw - tmpfs none rw\n";
        assert_eq!(
            find_mount(mi, Path::new("/var/lib/boot2podman")),
            Some(("/dev/vda1".into(), "ext4".into()))
        );
        assert_eq!(
            find_mount(mi, Path::new("/with space")),
            Some(("none".into(), "tmpfs".into()))
        );
        assert_eq!(find_mount(mi, Path::new("/nope")), None);
        assert_eq!(unescape("a\\04"), "a\\04");
    }
}
