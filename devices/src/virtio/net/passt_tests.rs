//! virtio-net on the passt backend, driven through the MMIO transport and
//! an event loop by the in-process test driver: a real passt (Debian's
//! `passt`, on one end of a socketpair as `passt --fd`) answering a
//! DHCPDISCOVER, and a socketpair playing passt for the link going down and
//! for TX back-pressure.

use std::io::Write;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;

use super::device::features;
use super::passt::{read_fd, send_parts, PasstBackend, MAX_PASST_FRAME};
use super::*;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{guest_memory, Arena, Seg, TestDriver};

const MAC: MacAddr = [0x52, 0x54, 0x00, 0xb2, 0x70, 0x01];
/// VIRTIO_F_VERSION_1.
const VERSION_1: u64 = 1 << 32;

type Em = EventManager<Arc<Mutex<Net>>>;

/// `SKIP:` and return, unless B2P_REQUIRE names `tools` (or `all`): then fail.
fn skip(test: &str, why: &str) {
    let req = std::env::var("B2P_REQUIRE").unwrap_or_default();
    if req
        .split(',')
        .any(|r| r.trim() == "tools" || r.trim() == "all")
    {
        panic!("{test}: {why} (B2P_REQUIRE={req})");
    }
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
}

fn stream_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into fds.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

struct Guest {
    d: TestDriver,
    em: Em,
    dev: Arc<Mutex<Net>>,
    rx: Vec<(u16, GuestAddress)>,
}

const RX_SIZE: u32 = 2048;

impl Guest {
    fn on(be: PasstBackend, wanted: u64) -> Guest {
        let net = Net::with_backend(Box::new(be), Some(MAC)).unwrap();
        let mem = guest_memory(16 << 20);
        let dev = Arc::new(Mutex::new(net));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut d = TestDriver::new(
            mem,
            t,
            Arena::new(GuestAddress(0x1000), (16 << 20) - 0x1000),
        );
        d.init(wanted, QUEUE_SIZE).unwrap();
        em.run_with_timeout(0).unwrap();
        Guest {
            d,
            em,
            dev,
            rx: Vec::new(),
        }
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let b = self.d.buf(RX_SIZE as usize);
            let head = self.d.add_chain(RXQ as u16, &[Seg::wo(b, RX_SIZE)]);
            self.rx.push((head, b));
        }
        self.d.notify(RXQ as u16);
    }

    fn send(&mut self, frame: &[u8]) {
        let mut data = vec![0u8; VNET_HDR_LEN];
        data.extend_from_slice(frame);
        let b = self.d.buf_with(&data);
        self.d
            .add_chain(TXQ as u16, &[Seg::ro(b, data.len() as u32)]);
        self.d.notify(TXQ as u16);
    }

    /// Runs the loop until `done` or `secs` pass; returns the events dispatched.
    fn pump_until(&mut self, secs: u64, mut done: impl FnMut(&mut Guest) -> bool) -> usize {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut events = 0;
        while !done(self) && Instant::now() < end {
            events += self.em.run_with_timeout(20).unwrap();
        }
        events
    }

    /// The frames (without the virtio-net header) of the used RX buffers.
    fn rx_frames(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for u in self.d.used(RXQ as u16) {
            let Some(&(_, addr)) = self.rx.iter().find(|(h, _)| u32::from(*h) == u.id) else {
                continue;
            };
            let data = self.d.read_buf(addr, u.len as usize);
            if data.len() > VNET_HDR_LEN {
                assert_eq!(&data[..VNET_HDR_LEN - 2], &[0u8; VNET_HDR_LEN - 2]);
                out.push(data[VNET_HDR_LEN..].to_vec());
            }
        }
        out
    }

    fn link_status(&mut self) -> u16 {
        let mut cfg = [0u8; 8];
        self.d.read_config(0, &mut cfg);
        u16::from_le_bytes([cfg[6], cfg[7]])
    }
}

fn ip_checksum(d: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in d.chunks(2) {
        s += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A broadcast DHCPDISCOVER from `mac` (RFC 2131), transaction `xid`.
fn dhcp_discover(mac: MacAddr, xid: u32) -> Vec<u8> {
    let mut bootp = vec![0u8; 240];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[10] = 0x80; // broadcast
    bootp[28..34].copy_from_slice(&mac);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    // DHCP message type DISCOVER; parameter list: mask, router, DNS.
    bootp.extend_from_slice(&[53, 1, 1, 55, 3, 1, 3, 6, 255]);
    let udp_len = 8 + bootp.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&bootp);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut eth = vec![0xff; 6];
    eth.extend_from_slice(&mac);
    eth.extend_from_slice(&[0x08, 0x00]);
    eth.extend_from_slice(&ip);
    eth.extend_from_slice(&udp);
    eth
}

/// DHCP options: (code, value).
type DhcpOptions = Vec<(u8, Vec<u8>)>;

/// A DHCP reply to `xid` in `f`: (message type, your address, options).
fn dhcp_reply(f: &[u8], xid: u32) -> Option<(u8, [u8; 4], DhcpOptions)> {
    if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    let udp = f.get(14 + ihl..)?;
    if udp.get(0..4)? != [0, 67, 0, 68] {
        return None;
    }
    let b = &udp[8..];
    if b.get(4..8)? != xid.to_be_bytes() || b.get(236..240)? != [99, 130, 83, 99] {
        return None;
    }
    let yiaddr = [b[16], b[17], b[18], b[19]];
    let mut opts = Vec::new();
    let mut i = 240;
    let mut kind = 0;
    while let Some(&code) = b.get(i) {
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(*b.get(i + 1)?);
        let val = b.get(i + 2..i + 2 + len)?.to_vec();
        if code == 53 {
            kind = *val.first()?;
        }
        opts.push((code, val));
        i += 2 + len;
    }
    Some((kind, yiaddr, opts))
}

/// Real passt on a socketpair: our end (blocking) and the child.
fn spawn_passt() -> Option<(OwnedFd, std::process::Child)> {
    let (ours, theirs) = stream_pair();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new("passt");
    cmd.args(["--foreground", "--quiet", "--fd", &fd.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().ok()?;
    drop(theirs);
    Some((ours, child))
}

#[test]
fn features_come_from_the_backend() {
    let (ours, _wire) = stream_pair();
    let net = Net::with_backend(
        Box::new(PasstBackend::new(ours, "test").unwrap()),
        Some(MAC),
    )
    .unwrap();
    use crate::virtio::VirtioDevice;
    let f = net.avail_features();
    assert_eq!(
        f,
        VERSION_1 | features::MAC | features::MRG_RXBUF | features::STATUS,
        "passt takes and gives plain frames: no checksum or TSO offloads"
    );
}

#[test]
fn dhcp_offer_from_a_real_passt() {
    let test = "dhcp_offer_from_a_real_passt";
    let Some((ours, mut child)) = spawn_passt() else {
        return skip(test, "passt is not installed (apt install passt)");
    };
    let be = PasstBackend::new(ours, "real passt").unwrap();
    let mut g = Guest::on(be, features::MAC | features::MRG_RXBUF | features::STATUS);
    assert_eq!(g.link_status(), 1);
    g.post_rx(16);
    let xid = 0xb2b2_0001;
    g.send(&dhcp_discover(MAC, xid));
    let mut offer = None;
    g.pump_until(10, |g| {
        for f in g.rx_frames() {
            if let Some(r) = dhcp_reply(&f, xid) {
                offer = Some((f[..6].to_vec(), r));
            }
        }
        offer.is_some()
    });
    let (dst, (kind, yiaddr, opts)) = offer.expect("no DHCPOFFER from passt within 10 s");
    assert_eq!(kind, 2, "DHCPOFFER");
    assert!(dst == MAC || dst == [0xff; 6], "to us: {dst:02x?}");
    assert_ne!(yiaddr, [0; 4]);
    let router = opts.iter().find(|o| o.0 == 3).map(|o| o.1.clone());
    assert!(
        router.as_ref().is_some_and(|r| r.len() == 4),
        "a router option: {opts:?}"
    );
    let stats = g.dev.lock().unwrap().stats();
    assert_eq!(stats.tx_frames, 1);
    assert!(stats.rx_frames >= 1);
    let _ = writeln!(
        std::io::stderr(),
        "passt offered {yiaddr:?}, router {router:?}"
    );
    drop(g);
    // Our end closed: passt --fd exits by itself.
    let end = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "passt did not exit after the VM's end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn passt_closing_takes_the_link_down_without_a_busy_loop() {
    let (ours, wire) = stream_pair();
    let mut g = Guest::on(
        PasstBackend::new(ours, "test").unwrap(),
        features::MAC | features::MRG_RXBUF | features::STATUS,
    );
    g.post_rx(4);
    // One frame each way first.
    let f = dhcp_discover(MAC, 7);
    g.send(&f);
    let mut buf = vec![0u8; 4096];
    g.pump_until(5, |g| g.dev.lock().unwrap().stats().tx_frames == 1);
    let n = read_fd(wire.as_raw_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..4], &(f.len() as u32).to_be_bytes());
    assert_eq!(&buf[4..n], &f[..]);
    assert_eq!(g.d.used(TXQ as u16).len(), 1);
    let _ = g.d.take_interrupt();
    drop(wire);
    g.pump_until(5, |g| g.link_status() == 0);
    assert_eq!(g.link_status(), 0, "link down once passt is gone");
    assert_ne!(g.d.take_interrupt() & 2, 0, "a config-change interrupt");
    // Nothing left to wake the loop: no busy loop on the hung-up socket.
    let events = g.pump_until(1, |_| false);
    assert!(events <= 2, "{events} events in 1 s after the hang-up");
    // The guest's frames are completed (dropped), the device goes on.
    g.send(&f);
    let used = g.d.poll_used(TXQ as u16, 1, 50, || {
        let _ = g.em.run_with_timeout(20);
    });
    assert_eq!(used.len(), 1);
    let s = g.dev.lock().unwrap().stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (1, 1));
}

#[test]
fn a_full_socket_holds_tx_back_and_epollout_resumes_it() {
    let (ours, wire) = stream_pair();
    let mut g = Guest::on(
        PasstBackend::new(ours, "test").unwrap(),
        features::MAC | features::MRG_RXBUF,
    );
    // 64 KiB frames, far more than the socket and our queue hold.
    let frames: Vec<Vec<u8>> = (0..40u8)
        .map(|i| {
            let mut f = vec![i; 65536];
            f[..6].copy_from_slice(&[0xff; 6]);
            f[6..12].copy_from_slice(&MAC);
            f
        })
        .collect();
    for f in &frames {
        g.send(f);
    }
    g.pump_until(1, |_| false);
    let done = g.d.used(TXQ as u16).len();
    assert!(
        done < frames.len(),
        "all {done} frames taken with nobody reading"
    );
    // The far end reads; the device resumes by itself (EPOLLOUT) and every
    // frame arrives whole and in order.
    let want: Vec<u8> = frames
        .iter()
        .flat_map(|f| [&(f.len() as u32).to_be_bytes()[..], f].concat())
        .collect();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: F_SETFL on our descriptor.
    unsafe { libc::fcntl(wire.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let end = Instant::now() + Duration::from_secs(20);
    let mut used = done;
    while got.len() < want.len() && Instant::now() < end {
        g.em.run_with_timeout(10).unwrap();
        used += g.d.used(TXQ as u16).len();
        loop {
            match read_fd(wire.as_raw_fd(), &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the byte stream differs");
    assert_eq!(used, frames.len());
    let s = g.dev.lock().unwrap().stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (40, 0));
}

#[test]
fn frames_from_passt_in_pieces_and_a_64k_frame_reach_the_guest() {
    let (ours, wire) = stream_pair();
    let mut g = Guest::on(
        PasstBackend::new(ours, "test").unwrap(),
        features::MAC | features::MRG_RXBUF,
    );
    g.post_rx(64);
    let small: Vec<u8> = (0..60u8).collect();
    let big: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let mut stream = Vec::new();
    for f in [&small, &big, &small] {
        stream.extend_from_slice(&(f.len() as u32).to_be_bytes());
        stream.extend_from_slice(f);
    }
    for piece in stream.chunks(1000) {
        send_parts(wire.as_raw_fd(), &[piece]).unwrap();
        g.em.run_with_timeout(0).unwrap();
    }
    // With MRG_RXBUF the big frame spans 33 buffers; collect by
    // num_buffers from the first buffer's header.
    let mut frames = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut left = 0u16;
    g.pump_until(5, |g| {
        for u in g.d.used(RXQ as u16) {
            let &(_, addr) = g.rx.iter().find(|(h, _)| u32::from(*h) == u.id).unwrap();
            let data = g.d.read_buf(addr, u.len as usize);
            if left == 0 {
                left = u16::from_le_bytes([data[10], data[11]]);
                pending = data[VNET_HDR_LEN..].to_vec();
            } else {
                pending.extend_from_slice(&data);
            }
            left -= 1;
            if left == 0 {
                frames.push(std::mem::take(&mut pending));
            }
        }
        frames.len() == 3
    });
    assert_eq!(frames, vec![small.clone(), big, small]);
    const { assert!(MAX_PASST_FRAME >= 65536 + 14) };
}
