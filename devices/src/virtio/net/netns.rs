//! Test support for virtio-net on a real TAP (tests and benches, root
//! only): a network namespace made for the run holding one persistent TAP,
//! an AF_PACKET socket on it as the far end, and a helper that runs a
//! closure in a thread inside that namespace.

use std::io::Write;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The TAP's name inside the namespace.
pub const TAP: &str = "b2ptap0";
/// The ethertype of the frames tests and benches send (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace holding one persistent TAP; deleted on drop.
pub struct NetNs(String);

impl NetNs {
    pub fn new(mtu: u32) -> Option<NetNs> {
        if !is_root() {
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: virtio-net TAP tests need root (ip netns, /dev/net/tun)"
            );
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: the `ip` tool (iproute2) is missing"
            );
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "b2p-net-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
        let ns = NetNs(name);
        let mtu = mtu.to_string();
        assert!(ip(&[
            "-n", &ns.0, "tuntap", "add", "dev", TAP, "mode", "tap"
        ]));
        assert!(ip(&["-n", &ns.0, "link", "set", TAP, "mtu", &mtu, "up"]));
        Some(ns)
    }

    /// Move the calling thread into the namespace.
    pub fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        // SAFETY: setns on an fd we own; affects only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

/// An AF_PACKET socket bound to the TAP (created in the current netns).
pub struct Packet {
    fd: OwnedFd,
}

impl Packet {
    pub fn open(ifname: &str) -> Packet {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2), result checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: valid C string.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(idx > 0);
        // SAFETY: zeroed sockaddr_ll is valid; filled below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = idx as i32;
        // SAFETY: sll is a valid sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Packet { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: frame is a readable buffer.
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        assert_eq!(
            r,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// Next frame with our ethertype, within `timeout`.
    pub fn recv_ours(&self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut b = vec![0u8; 65536];
        while Instant::now() < end {
            // SAFETY: b is writable.
            let r = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    b.as_mut_ptr() as *mut libc::c_void,
                    b.len(),
                    0,
                )
            };
            if r >= 14 && u16::from_be_bytes([b[12], b[13]]) == ETHERTYPE {
                return Some(b[..r as usize].to_vec());
            }
        }
        None
    }
}

impl AsRawFd for Packet {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Run `f` in a thread inside a fresh namespace with the TAP.
pub fn in_netns(mtu: u32, f: impl FnOnce() + Send + 'static) {
    let Some(ns) = NetNs::new(mtu) else {
        return;
    };
    let ns = Arc::new(ns);
    let ns2 = ns.clone();
    let r = std::thread::spawn(move || {
        ns2.enter();
        f();
    })
    .join();
    drop(ns);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
