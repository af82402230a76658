//! vhost-device-vsock 0.3.0 with half-closes carried both ways, for the QEMU
//! tests only (tests/agent_vsock.rs, tests/ports.rs): the stock 0.3.0 drops
//! a guest's SHUTDOWN(SEND) and turns the host's end of file into a full
//! close (rust-vmm/vhost-device#874). Built once, offline, from the source
//! `cargo install` left in the cargo registry, under the target directory.
//! Nothing of it is in the product. Only std, so any test crate can include
//! it by `#[path]`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixes applied to vhost-device-vsock 0.3.0's source, each
/// `(file, before, after)` with `before` found there exactly once.
const VHOST_HALF_CLOSE: &[(&str, &str, &str)] = &[
    // Host EOF: SHUTDOWN(SEND) alone, unless the host socket is hung up
    // entirely (then RECEIVE too).
    (
        "src/vsock_conn.rs",
        "                        pkt.set_op(VSOCK_OP_SHUTDOWN)
                            .set_flag(VSOCK_FLAGS_SHUTDOWN_RCV)
                            .set_flag(VSOCK_FLAGS_SHUTDOWN_SEND);",
        "                        pkt.set_op(VSOCK_OP_SHUTDOWN)
                            .set_flag(VSOCK_FLAGS_SHUTDOWN_SEND);
                        let mut pfd = libc::pollfd { fd: self.stream.as_raw_fd(), events: 0, revents: 0 };
                        // SAFETY: one pollfd, no wait.
                        if unsafe { libc::poll(&mut pfd, 1, 0) } == 1
                            && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
                        {
                            pkt.set_flag(VSOCK_FLAGS_SHUTDOWN_RCV);
                        }",
    ),
    // Guest SHUTDOWN(SEND): shut the host socket's write side once the
    // buffered guest bytes are out (the host reads EOF, can still write).
    (
        "src/vsock_conn.rs",
        "                if recv_off && send_off && self.tx_buf.is_empty() {
                    self.rx_queue.enqueue(RxOps::Reset);
                }",
        "                if recv_off && send_off && self.tx_buf.is_empty() {
                    self.rx_queue.enqueue(RxOps::Reset);
                } else if send_off {
                    self.shut_wr_pending = true;
                    self.shut_wr_if_flushed();
                }",
    ),
    (
        "src/vsock_conn.rs",
        "    tx_buffer_size: u32,\n}",
        "    tx_buffer_size: u32,\n    shut_wr_pending: bool,\n}",
    ),
    (
        "src/vsock_conn.rs",
        "            tx_buffer_size,\n        }\n    }\n\n    /// Create a new vsock connection object for connections initiated by\n    /// an application running in the guest.",
        "            tx_buffer_size,\n            shut_wr_pending: false,\n        }\n    }\n\n    /// Create a new vsock connection object for connections initiated by\n    /// an application running in the guest.",
    ),
    (
        "src/vsock_conn.rs",
        "            tx_buffer_size,\n        }\n    }\n\n    /// Set the peer port",
        "            tx_buffer_size,\n            shut_wr_pending: false,\n        }\n    }\n\n    /// Set the peer port",
    ),
    (
        "src/vsock_conn.rs",
        "    /// Set the peer port to the guest side application's port.",
        "    /// After the guest's SHUTDOWN(SEND): shut our write side once the
    /// buffered bytes are out.
    pub fn shut_wr_if_flushed(&mut self) {
        if self.shut_wr_pending && self.tx_buf.is_empty() {
            self.shut_wr_pending = false;
            // SAFETY: shutdown(2) on this connection's own socket.
            unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_WR) };
        }
    }

    /// Set the peer port to the guest side application's port.",
    ),
    (
        "src/vhu_vsock_thread.rs",
        "                            if cnt > 0 {
                                conn.fwd_cnt += Wrapping(cnt as u32);",
        "                            conn.shut_wr_if_flushed();
                            if cnt > 0 {
                                conn.fwd_cnt += Wrapping(cnt as u32);",
    ),
];

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
        }
    }
    Ok(())
}

/// vhost-device-vsock 0.3.0 with half-closes carried both ways, built once
/// (offline, from the source `cargo install` left in the registry) under
/// the target directory.
pub fn patched_vhost() -> Result<PathBuf, String> {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vhost-device-vsock-half-close");
    let bin = out.join("target/release/vhost-device-vsock");
    let stamp = out.join("stamp");
    let want = format!("{VHOST_HALF_CLOSE:?}");
    if bin.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(bin);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("no CARGO_HOME or HOME")?;
    let src = std::fs::read_dir(cargo_home.join("registry/src"))
        .map_err(|e| format!("no cargo registry sources: {e}"))?
        .flatten()
        .map(|d| d.path().join("vhost-device-vsock-0.3.0"))
        .find(|p| p.join("Cargo.toml").is_file())
        .ok_or("the source of vhost-device-vsock 0.3.0 is not in the cargo registry")?;
    let tree = out.join("src");
    let _ = std::fs::remove_dir_all(&tree);
    copy_tree(&src, &tree).map_err(|e| format!("copying {}: {e}", src.display()))?;
    for (file, before, after) in VHOST_HALF_CLOSE {
        let path = tree.join(file);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{file}: {e}"))?;
        if text.matches(before).count() != 1 {
            return Err(format!(
                "{file}: the code to fix is not there once: {before}"
            ));
        }
        std::fs::write(&path, text.replacen(before, after, 1))
            .map_err(|e| format!("{file}: {e}"))?;
    }
    // Its own workspace (it sits under ours); versions from the local cache.
    let manifest = tree.join("Cargo.toml");
    let mut toml = std::fs::read_to_string(&manifest).map_err(|e| e.to_string())?;
    toml.push_str("\n[workspace]\n");
    std::fs::write(&manifest, toml).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(tree.join("Cargo.lock"));
    let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--offline", "-q", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(out.join("target"))
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "building it failed: {}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    std::fs::write(&stamp, want).map_err(|e| e.to_string())?;
    Ok(bin)
}
