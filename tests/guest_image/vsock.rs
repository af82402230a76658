//! A guest under QEMU TCG that the host reaches the way `b2p` does: a
//! `vhost-user-vsock-device` backed by `vhost-device-vsock` (memfd guest
//! memory, share=on; DESIGN.md §8), varlink to the agent on vsock port 1024
//! through the hybrid Unix socket (`CONNECT 1024`, any `OK n`), and ssh to
//! the guest's sshd on vsock port 22 through `b2p __vsock-proxy`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{have_tool, host_khz, image, lz4_initrd, skip, tempfile_dir, wait_until};

/// `name` on PATH or in ~/.cargo/bin (where `cargo install` puts
/// vhost-device-vsock).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// What a test that boots a `b2p create` disk and ssh-es in needs: the
/// image's kernel and initrd (the lz4 one where built) and
/// vhost-device-vsock; `None`, after a skip line that starts with `test`,
/// when the image, QEMU, vhost-device-vsock, ssh, ssh-keygen or timeout is
/// missing.
#[allow(dead_code)]
pub fn ssh_rig(test: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let (kernel, initrd) = image()?;
    let initrd = lz4_initrd().unwrap_or(initrd);
    if !have_tool("qemu-system-x86_64") {
        skip(&format!(
            "{test}: QEMU is not installed (apt-get install qemu-system-x86)"
        ));
        return None;
    }
    let Some(vhost) = find_tool("vhost-device-vsock") else {
        skip(&format!(
            "{test}: vhost-device-vsock is missing (cargo install vhost-device-vsock)"
        ));
        return None;
    };
    for t in ["ssh", "ssh-keygen", "timeout"] {
        if !have_tool(t) {
            skip(&format!("{test}: {t} not installed"));
            return None;
        }
    }
    Some((kernel, initrd, vhost))
}

/// A Unix socket at `listen` whose connections are joined to guest vsock
/// `port` through the hybrid socket `uds` (for `podman --remote`).
#[allow(dead_code)]
pub fn hybrid_proxy(listen: &Path, uds: PathBuf, port: u32) {
    let l = std::os::unix::net::UnixListener::bind(listen).expect("binding the proxy socket");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let Ok(mut g) = UnixStream::connect(&uds) else {
                    return;
                };
                if g.write_all(format!("CONNECT {port}\n").as_bytes()).is_err() {
                    return;
                }
                let mut byte = [0u8; 1];
                let mut line = Vec::new();
                while g.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                if !line.starts_with(b"OK ") {
                    return;
                }
                let (mut c2, mut g2) = (c.try_clone().unwrap(), g.try_clone().unwrap());
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut g2);
                    let _ = g2.shutdown(std::net::Shutdown::Write);
                });
                let (mut c3, mut g3) = (c, g);
                let _ = std::io::copy(&mut g3, &mut c3);
                let _ = c3.shutdown(std::net::Shutdown::Both);
                let _ = up.join();
            });
        }
    });
}

/// One running guest; QEMU and the vsock backend are killed on drop.
pub struct VsockGuest {
    qemu: Child,
    vhost: Child,
    dir: PathBuf,
    uds: PathBuf,
    console: PathBuf,
    /// When QEMU was spawned.
    pub started: Instant,
}

/// How long the kernel gets to reach `Run /init` before the boot counts as
/// stalled (normally 7-30 s under TCG here).
const EARLY_BOOT: Duration = Duration::from_secs(240);

impl VsockGuest {
    /// Boots as `boot_once` does, again (up to 3 tries) when the kernel
    /// stalls before /init. That is a TCG artefact of an overloaded host, not
    /// of the image: the console then ends at "APIC frequency too slow,
    /// disabling apic timer" ... "Booting SMP configuration", with the clock
    /// stopped (1 boot in 4 at a load average of 10 on 2 cores). The disk is
    /// not touched that early, so a retry is a fresh boot of the same state.
    pub fn boot(
        vhost_bin: &Path,
        kernel: &Path,
        initrd: &Path,
        disk: &Path,
        cmdline: &str,
    ) -> VsockGuest {
        VsockGuest::boot_with(vhost_bin, kernel, initrd, disk, cmdline, &[])
    }

    /// [`VsockGuest::boot`] with more QEMU arguments (a `-netdev`, say).
    pub fn boot_with(
        vhost_bin: &Path,
        kernel: &Path,
        initrd: &Path,
        disk: &Path,
        cmdline: &str,
        qemu_args: &[String],
    ) -> VsockGuest {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut g = VsockGuest::boot_once(vhost_bin, kernel, initrd, disk, cmdline, qemu_args);
            while g.started.elapsed() < EARLY_BOOT && g.exited().is_none() {
                if g.console().contains("Run /init") {
                    return g;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let console = g.console();
            if console.contains("Run /init") || tries == 3 {
                return g;
            }
            let last = console.lines().rev().find(|l| !l.trim().is_empty());
            let _ = writeln!(
                std::io::stderr(),
                "RETRY: the kernel stalled before /init ({:?} of QEMU; last console line {:?}): booting again",
                EARLY_BOOT,
                last.unwrap_or_default()
            );
        }
    }

    /// [`VsockGuest::boot`] with a `vhost-user-fs-device` on the virtiofsd
    /// listening at `virtiofsd_sock`, tag `vol`, which the image's init
    /// mounts on /data (`b2p.fs=vol:/data`); no network (`b2p.ip=off`).
    #[allow(dead_code)]
    pub fn boot_virtiofs(
        vhost_bin: &Path,
        kernel: &Path,
        initrd: &Path,
        disk: &Path,
        virtiofsd_sock: &Path,
    ) -> VsockGuest {
        let fs_args = [
            "-chardev".to_string(),
            format!("socket,id=fs0,path={}", virtiofsd_sock.display()),
            "-device".to_string(),
            "vhost-user-fs-device,chardev=fs0,tag=vol".to_string(),
        ];
        let cmdline = "b2p.ip=off b2p.fs=vol:/data";
        VsockGuest::boot_with(vhost_bin, kernel, initrd, disk, cmdline, &fs_args)
    }

    /// Boots `kernel` + `initrd` with `disk` as vda and `cmdline` appended.
    fn boot_once(
        vhost_bin: &Path,
        kernel: &Path,
        initrd: &Path,
        disk: &Path,
        cmdline: &str,
        qemu_args: &[String],
    ) -> VsockGuest {
        let dir = tempfile_dir("b2p-vsock-guest");
        let vhost_sock = dir.join("vhost.sock");
        let uds = dir.join("vsock.sock");
        let console = dir.join("console.log");
        let vhost = Command::new(vhost_bin)
            .arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={},uds-path={}",
                vhost_sock.display(),
                uds.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("vhost.log")).unwrap())
            .spawn()
            .expect("starting vhost-device-vsock");
        assert!(
            wait_until(Duration::from_secs(20), || vhost_sock.exists()).is_some(),
            "vhost-device-vsock did not listen"
        );
        let started = Instant::now();
        let qemu = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,memory-backend=mem0", "-accel", "tcg"])
            .args(["-cpu", "max", "-m", "2048", "-smp", "2"])
            .args([
                "-object",
                "memory-backend-memfd,id=mem0,size=2048M,share=on",
            ])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-monitor", "none", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 tsc_early_khz={} panic=-1 {cmdline}",
                host_khz()
            ))
            .args(["-device", "virtio-rng-device"])
            .arg("-drive")
            .arg(format!("if=none,id=d0,format=raw,file={}", disk.display()))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", vhost_sock.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=c0"])
            .args(qemu_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("qemu.log")).unwrap())
            .spawn()
            .expect("starting qemu-system-x86_64");
        VsockGuest {
            qemu,
            vhost,
            dir,
            uds,
            console,
            started,
        }
    }

    /// The hybrid vsock socket (`CONNECT <port>\n`) of vhost-device-vsock.
    #[allow(dead_code)]
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// The guest console so far, with the tails of QEMU's and the vsock
    /// backend's stderr.
    pub fn console(&self) -> String {
        let mut text =
            String::from_utf8_lossy(&fs::read(&self.console).unwrap_or_default()).into_owned();
        for (what, file) in [
            ("qemu stderr", "qemu.log"),
            ("vhost-device-vsock", "vhost.log"),
        ] {
            let err = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
            if !err.trim().is_empty() {
                let tail: Vec<&str> = err.lines().rev().take(20).collect();
                text.push_str(&format!("\n[{what}, last lines] "));
                text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        text
    }

    /// Whether QEMU has exited (the guest powered off).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.qemu.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for QEMU to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Best effort at the end of a test: asks the agent to power the guest
    /// off and gives QEMU 120 s to exit (drop kills it in any case).
    #[allow(dead_code)]
    pub fn try_shutdown(&mut self) {
        let _ = self.call(
            "io.b2p.Machine.Shutdown",
            serde_json::json!({}),
            Duration::from_secs(60),
        );
        let _ = self.wait_exit(Duration::from_secs(120));
    }

    /// One varlink call to the agent (vsock port 1024) on a fresh
    /// connection: the reply's `parameters`, or the error reply / the
    /// transport failure as text.
    pub fn call(
        &self,
        method: &str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        let mut s = UnixStream::connect(&self.uds).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout)).ok();
        s.set_write_timeout(Some(timeout)).ok();
        s.write_all(b"CONNECT 1024\n")
            .map_err(|e| format!("CONNECT: {e}"))?;
        let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| format!("CONNECT answer: {e}"))?;
        if !line.starts_with("OK ") {
            return Err(format!("CONNECT answered {line:?}"));
        }
        let msg = serde_json::json!({"method": method, "parameters": params});
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        bytes.push(0);
        s.write_all(&bytes).map_err(|e| format!("send: {e}"))?;
        let mut reply = Vec::new();
        r.read_until(0, &mut reply)
            .map_err(|e| format!("reply: {e}"))?;
        if reply.last() != Some(&0) {
            return Err(format!(
                "connection closed after {} bytes of reply",
                reply.len()
            ));
        }
        reply.pop();
        let v: serde_json::Value =
            serde_json::from_slice(&reply).map_err(|e| format!("reply is not JSON: {e}"))?;
        if v.get("error").is_some() {
            return Err(v.to_string());
        }
        Ok(v.get("parameters").cloned().unwrap_or_default())
    }

    /// Retries `method` until it answers, the guest exits or `timeout`
    /// passes; each try may take `per_try`.
    pub fn wait_call(
        &mut self,
        method: &str,
        timeout: Duration,
        per_try: Duration,
    ) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.call(method, serde_json::json!({}), per_try) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
            if let Some(s) = self.exited() {
                return Err(format!("qemu exited ({s}); last error: {last}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(format!("no answer in {timeout:?}; last error: {last}"))
    }

    /// [`VsockGuest::wait_call`] of `method` for up to 600 s (TCG boots
    /// are slow), `per_try` each; panics with the console when the agent
    /// never answers. How long after QEMU's start it answered.
    #[allow(dead_code)]
    pub fn wait_agent(&mut self, method: &str, per_try: Duration) -> Duration {
        self.wait_call(method, Duration::from_secs(600), per_try)
            .unwrap_or_else(|e| panic!("the agent never answered: {e}\n{}", self.console()));
        self.started.elapsed()
    }

    /// The command `ssh USER@guest COMMAND` with `key`, over vsock port 22
    /// (`b2p __vsock-proxy` as the ProxyCommand), bounded by coreutils
    /// timeout (`secs`), giving up on the connection after `connect_secs`.
    pub fn ssh_command(
        &self,
        b2p: &Path,
        key: &Path,
        user: &str,
        command: &str,
        secs: u32,
        connect_secs: u32,
    ) -> Command {
        let proxy = format!("{} __vsock-proxy {} 22", b2p.display(), self.uds.display());
        let mut cmd = Command::new("timeout");
        cmd.arg(secs.to_string())
            .arg("ssh")
            .arg("-i")
            .arg(key)
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("ConnectTimeout={connect_secs}"))
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg(format!("{user}@b2p-guest"))
            .arg(command)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs [`VsockGuest::ssh_command`] (60 s to connect) to its end.
    pub fn ssh(&self, b2p: &Path, key: &Path, user: &str, command: &str, secs: u32) -> Output {
        self.ssh_command(b2p, key, user, command, secs, 60)
            .output()
            .expect("running ssh")
    }

    /// `command` as tc over [`VsockGuest::ssh`]: whether it succeeded, and
    /// its stdout followed by its stderr.
    #[allow(dead_code)]
    pub fn ssh_tc(&self, b2p: &Path, key: &Path, command: &str, secs: u32) -> (bool, String) {
        let o = self.ssh(b2p, key, "tc", command, secs);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    }
}

impl Drop for VsockGuest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.vhost.kill();
        let _ = self.vhost.wait();
        if std::env::var_os("B2P_KEEP_TEST_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The state of the ext4 filesystem in the first partition of `disk` (or
/// on the whole disk when it has no MBR): read from its superblock.
#[derive(Debug, PartialEq, Eq)]
pub struct Ext4State {
    /// s_state bit 0: unmounted cleanly (EXT4_VALID_FS).
    pub valid: bool,
    /// s_state bit 1: errors detected (EXT4_ERROR_FS).
    pub errors: bool,
    /// s_feature_incompat bit 2: the journal must be replayed (RECOVER).
    pub needs_recovery: bool,
}

pub fn ext4_state(disk: &Path) -> Result<Ext4State, String> {
    let mut f = fs::File::open(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    let mut mbr = [0u8; 512];
    f.read_exact(&mut mbr).map_err(|e| e.to_string())?;
    let start = if mbr[510..512] == [0x55, 0xaa] {
        u64::from(u32::from_le_bytes([mbr[454], mbr[455], mbr[456], mbr[457]])) * 512
    } else {
        0
    };
    let mut sb = vec![0u8; 1024];
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(start + 1024))
        .map_err(|e| e.to_string())?;
    f.read_exact(&mut sb).map_err(|e| e.to_string())?;
    let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
    if magic != 0xEF53 {
        return Err(format!(
            "no ext4 superblock at byte {} (magic {magic:#x})",
            start + 1024
        ));
    }
    let state = u16::from_le_bytes([sb[0x3A], sb[0x3B]]);
    let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
    Ok(Ext4State {
        valid: state & 1 != 0,
        errors: state & 2 != 0,
        needs_recovery: incompat & 4 != 0,
    })
}
