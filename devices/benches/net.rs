//! virtio-net throughput, in-process, on its two backends in one run. The
//! device runs behind the MMIO transport and the event loop, driven by the
//! in-process test driver (playing the guest).
//!
//! - passt backend: the far end is this bench on the other end of a Unix
//!   socketpair speaking passt's framing (a 32-bit big-endian length before
//!   each frame), not a real passt: this measures our device and backend,
//!   not passt's own switching. A stream drops nothing: every frame counts.
//! - TAP backend: a real TAP in a network namespace made for the run (root
//!   only; the TAP rows are skipped otherwise), the far end an AF_PACKET
//!   socket on it; measured against plain writev/readv on the same TAP (the
//!   ceiling a device can reach), counted at the receiving end (the TAP and
//!   the socket drop what they cannot queue).
//!
//! Frames of one size per run. Run: `cargo bench -p b2p-devices --bench net`.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use b2p_devices::virtio::iovec::{IoVecBuf, IoVecBufMut, IoVecStorage};
use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::net::device::features;
use std::os::unix::io::{FromRawFd, OwnedFd};

use b2p_devices::virtio::net::netns::{in_netns, is_root, Packet, ETHERTYPE, TAP};
use b2p_devices::virtio::net::passt::{read_fd, FrameReader, PasstBackend};
use b2p_devices::virtio::net::{Net, NetConfig, Tap, QUEUE_SIZE, RXQ, TXQ, VNET_HDR_LEN};
use b2p_devices::virtio::testing::{guest_memory, Arena, Seg, TestDriver};
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Address, Bytes, GuestAddress};

const MTU: u32 = 65521;
const MAC: [u8; 6] = [0x02, 0xb2, 0x70, 0, 0, 2];
/// Chains in flight per batch.
const BATCH: usize = 128;
/// A receiver that sees nothing for this long counts the run as over.
const IDLE: Duration = Duration::from_millis(300);

type Em = EventManager<Arc<Mutex<Net>>>;

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0x5au8; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f
}

fn is_ours(buf: &[u8], n: usize) -> bool {
    n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes()
}

struct Guest {
    d: TestDriver,
    em: Em,
}

impl Guest {
    fn new() -> Guest {
        let net = Net::new(NetConfig {
            tap: TAP.to_string(),
            mac: Some(MAC),
        })
        .expect("opening the TAP");
        Guest::with(net)
    }

    /// A guest on the passt backend; the other end of its socketpair.
    fn passt() -> (Guest, OwnedFd) {
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
        assert_eq!(r, 0, "socketpair");
        // SAFETY: both are new and ours.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let be = PasstBackend::new(ours, "bench").expect("passt backend");
        let net = Net::with_backend(Box::new(be), Some(MAC)).expect("net device");
        (Guest::with(net), theirs)
    }

    fn with(net: Net) -> Guest {
        let mem_size = 2 * BATCH * (64 << 10) + (8 << 20);
        let mem = guest_memory(mem_size);
        let dev = Arc::new(Mutex::new(net));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev);
        let arena = Arena::new(GuestAddress(0x1000), mem_size as u64 - 0x1000);
        let mut d = TestDriver::new(mem, t, arena);
        d.init(features::MRG_RXBUF, QUEUE_SIZE).unwrap();
        em.run_with_timeout(0).unwrap();
        Guest { d, em }
    }
}

/// Counts our frames arriving on `pkt` until `stop` and an idle gap;
/// returns (frames, bytes, time of the last one).
fn count_frames(pkt: Packet, stop: Arc<AtomicBool>) -> (u64, u64, Instant) {
    let mut buf = vec![0u8; 65536];
    let (mut frames, mut bytes, mut last) = (0u64, 0u64, Instant::now());
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                pkt.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n > 0 && is_ours(&buf, n as usize) {
            frames += 1;
            bytes += n as u64;
            last = Instant::now();
        } else if stop.load(Ordering::Acquire) && last.elapsed() > IDLE {
            return (frames, bytes, last);
        }
    }
}

/// Counts our frames arriving on the TAP while `send` runs with the
/// virtio-net header and frame bytes; what arrived, and how long it took.
fn tx_run(len: usize, send: impl FnOnce(&mut [u8])) -> (u64, u64, Duration) {
    let pkt = Packet::open(TAP);
    let stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let stop = stop.clone();
        std::thread::spawn(move || count_frames(pkt, stop))
    };
    let mut chain = vec![0u8; VNET_HDR_LEN];
    chain.extend_from_slice(&frame(len));
    let start = Instant::now();
    send(&mut chain);
    stop.store(true, Ordering::Release);
    let (got, bytes, last) = rx.join().unwrap();
    (got, bytes, last.duration_since(start))
}

/// The guest's side of TX: `frames` chains of `chain`, BATCH at a time.
fn guest_send(g: &mut Guest, chain: &[u8], frames: usize) {
    let bufs: Vec<GuestAddress> = (0..BATCH).map(|_| g.d.buf_with(chain)).collect();
    let mut sent = 0;
    while sent < frames {
        let n = BATCH.min(frames - sent);
        for b in &bufs[..n] {
            g.d.add_chain(TXQ as u16, &[Seg::ro(*b, chain.len() as u32)]);
        }
        g.d.notify(TXQ as u16);
        let mut done = 0;
        while done < n {
            g.em.run_with_timeout(1000).unwrap();
            done += g.d.used(TXQ as u16).len();
        }
        sent += n;
    }
}

/// Guest → TAP through the device.
fn tx_device(len: usize, frames: usize) -> (u64, u64, Duration) {
    let mut g = Guest::new();
    tx_run(len, |chain| guest_send(&mut g, chain, frames))
}

/// Guest → passt's end of the socketpair through the device: every frame
/// arrives (a stream), parsed from the framing as passt would.
fn tx_passt(len: usize, frames: usize) -> (u64, u64, Duration) {
    let (mut g, peer) = Guest::passt();
    let rx = std::thread::spawn(move || {
        let mut r = FrameReader::new();
        let (mut got, mut bytes, mut runts) = (0u64, 0u64, 0u64);
        while got < frames as u64 {
            match r.fill(|b| read_fd(peer.as_raw_fd(), b)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("reading the socketpair: {e}"),
            }
            while let Some(f) = r.next_frame(&mut runts).expect("framing") {
                if is_ours(f, f.len()) {
                    got += 1;
                    bytes += f.len() as u64;
                }
            }
        }
        (got, bytes, Instant::now())
    });
    let mut chain = vec![0u8; VNET_HDR_LEN];
    chain.extend_from_slice(&frame(len));
    let start = Instant::now();
    guest_send(&mut g, &chain, frames);
    // What a short write left queued goes out as the socket drains.
    while !rx.is_finished() {
        g.em.run_with_timeout(10).unwrap();
    }
    let (got, bytes, last) = rx.join().unwrap();
    (got, bytes, last.duration_since(start))
}

/// The ceiling: writev of the same frames straight to the TAP.
fn tx_plain(len: usize, frames: usize) -> (u64, u64, Duration) {
    let tap = Tap::open(TAP).expect("opening the TAP");
    tx_run(len, |chain| {
        let mut iov = IoVecBuf::new(u64::MAX);
        iov.push_slice(chain).unwrap();
        for _ in 0..frames {
            let _ = tap.writev(&iov);
        }
    })
}

/// Sends `frames` frames into the TAP from the AF_PACKET side, as fast as
/// it goes; the count of what the socket accepted.
fn flood(len: usize, frames: usize, sent: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    let pkt = Packet::open(TAP);
    std::thread::spawn(move || {
        let f = frame(len);
        for _ in 0..frames {
            // SAFETY: f is readable for its length.
            let r = unsafe {
                libc::send(
                    pkt.as_raw_fd(),
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                )
            };
            if r > 0 {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

/// TAP → guest through the device: 64 KiB mergeable RX buffers, reposted
/// as the device uses them.
fn rx_device(len: usize, frames: usize) -> (u64, u64, Duration) {
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tx = flood(len, frames, sent.clone());
    guest_receive(Guest::new(), start, tx, None)
}

/// passt's end → guest: the bench writes `frames` length-prefixed frames
/// (several per write when small, as passt batches) as fast as the device
/// takes them.
fn rx_passt(len: usize, frames: usize) -> (u64, u64, Duration) {
    let (g, peer) = Guest::passt();
    let start = Instant::now();
    let tx = std::thread::spawn(move || {
        let mut one = (len as u32).to_be_bytes().to_vec();
        one.extend_from_slice(&frame(len));
        let per_write = (256 << 10) / one.len();
        let per_write = per_write.max(1);
        let batch: Vec<u8> = one.repeat(per_write);
        let mut peer = std::fs::File::from(peer);
        let mut left = frames;
        while left > 0 {
            let n = per_write.min(left);
            if peer.write_all(&batch[..n * one.len()]).is_err() {
                return;
            }
            left -= n;
        }
        // Held open until the guest has them all (a close is link down).
        std::thread::sleep(Duration::from_secs(3600));
    });
    guest_receive(g, start, tx, Some(frames as u64))
}

/// The guest's side of RX: counts our frames until `want` arrived, or, if
/// `None`, until the sender is done and an idle gap passed.
fn guest_receive(
    mut g: Guest,
    start: Instant,
    tx: std::thread::JoinHandle<()>,
    want: Option<u64>,
) -> (u64, u64, Duration) {
    let size = 64 << 10;
    let mut heads = std::collections::HashMap::new();
    for _ in 0..BATCH {
        let b = g.d.buf(size);
        heads.insert(g.d.add_chain(RXQ as u16, &[Seg::wo(b, size as u32)]), b);
    }
    g.d.notify(RXQ as u16);
    let (mut got, mut bytes, mut last) = (0u64, 0u64, start);
    loop {
        match want {
            Some(w) if got >= w => break,
            None if last.elapsed() >= IDLE && tx.is_finished() => break,
            _ => {}
        }
        g.em.run_with_timeout(50).unwrap();
        let used = g.d.used(RXQ as u16);
        if used.is_empty() {
            continue;
        }
        // All of this batch's buffers are taken back before any is posted
        // again: a new chain may get the id of one not yet taken back.
        let mut back = Vec::with_capacity(used.len());
        for u in used {
            let Some(b) = heads.remove(&(u.id as u16)) else {
                continue;
            };
            back.push(b);
            let mut eth = [0u8; 14];
            g.d.mem
                .read_slice(&mut eth, b.unchecked_add(VNET_HDR_LEN as u64))
                .unwrap();
            if is_ours(&eth, (u.len as usize).saturating_sub(VNET_HDR_LEN)) {
                got += 1;
                bytes += u64::from(u.len) - VNET_HDR_LEN as u64;
            }
        }
        for b in back {
            heads.insert(g.d.add_chain(RXQ as u16, &[Seg::wo(b, size as u32)]), b);
        }
        g.d.notify(RXQ as u16);
        last = Instant::now();
    }
    if want.is_none() {
        let _ = tx.join();
    }
    (got, bytes, last.duration_since(start))
}

/// The ceiling: readv from the TAP into one host buffer.
fn rx_plain(len: usize, frames: usize) -> (u64, u64, Duration) {
    let tap = Tap::open(TAP).expect("opening the TAP");
    let mut buf = vec![0u8; VNET_HDR_LEN + 65536];
    let mut storage = IoVecStorage::with_capacity(1);
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tx = flood(len, frames, sent);
    let (mut got, mut bytes, mut last) = (0u64, 0u64, start);
    while last.elapsed() < IDLE || !tx.is_finished() {
        let mut iov = IoVecBufMut::with_storage(std::mem::take(&mut storage), u64::MAX);
        iov.push_slice(&mut buf).unwrap();
        let r = tap.readv(&mut iov);
        storage = iov.into_storage();
        match r {
            Ok(n) if n > VNET_HDR_LEN => {
                if is_ours(&buf[VNET_HDR_LEN..], n - VNET_HDR_LEN) {
                    got += 1;
                    bytes += (n - VNET_HDR_LEN) as u64;
                    last = Instant::now();
                }
            }
            _ => {
                let mut pfd = libc::pollfd {
                    fd: tap.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
            }
        }
    }
    let _ = tx.join();
    (got, bytes, last.duration_since(start))
}

type Run = fn(usize, usize) -> (u64, u64, Duration);

fn frames_for(quick: bool, len: usize) -> usize {
    match (quick, len > 9000) {
        (true, _) => 2_000,
        (false, false) => 400_000,
        (false, true) => 40_000,
    }
}

/// The best of `rounds` runs: (MB/s, thousands of frames/s).
fn best(run: Run, len: usize, frames: usize, rounds: usize) -> (f64, f64) {
    let mut top = (0.0f64, 0.0f64);
    for _ in 0..rounds {
        let r = run(len, frames);
        let s = r.2.as_secs_f64().max(1e-9);
        let rate = (r.1 as f64 / s / 1e6, r.0 as f64 / s / 1e3);
        if rate.0 > top.0 {
            top = rate;
        }
    }
    top
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 1 } else { 3 };
    println!("virtio-net in-process on the passt backend (a socketpair speaking its framing), best of {rounds}");
    println!(
        "{:<28} {:>11} {:>11}",
        "workload", "device MB/s", "device kf/s"
    );
    let cases: [(&str, usize, Run); 4] = [
        ("guest -> passt, 1514 B", 1514, tx_passt),
        ("guest -> passt, 64000 B", 64000, tx_passt),
        ("passt -> guest, 1514 B", 1514, rx_passt),
        ("passt -> guest, 64000 B", 64000, rx_passt),
    ];
    for (name, len, run) in cases {
        let (mb, kf) = best(run, len, frames_for(quick, len), rounds);
        println!("{name:<28} {mb:>11.0} {kf:>11.1}");
    }
    if !is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: bench net, TAP rows: needs root (ip netns, /dev/net/tun)"
        );
        return;
    }
    in_netns(MTU, move || {
        println!("virtio-net in-process vs plain writev/readv on the TAP, best of {rounds}");
        println!(
            "{:<28} {:>11} {:>11} {:>11} {:>11} {:>7}",
            "workload", "device MB/s", "device kf/s", "plain MB/s", "plain kf/s", "ratio"
        );
        let cases: [(&str, usize, Run, Run); 4] = [
            ("guest -> TAP, 1514 B", 1514, tx_device, tx_plain),
            ("guest -> TAP, 64000 B", 64000, tx_device, tx_plain),
            ("TAP -> guest, 1514 B", 1514, rx_device, rx_plain),
            ("TAP -> guest, 64000 B", 64000, rx_device, rx_plain),
        ];
        for (name, len, device, plain) in cases {
            let frames = frames_for(quick, len);
            let dev = best(device, len, frames, rounds);
            let pl = best(plain, len, frames, rounds);
            println!(
                "{:<28} {:>11.0} {:>11.1} {:>11.0} {:>11.1} {:>7.2}",
                name,
                dev.0,
                dev.1,
                pl.0,
                pl.1,
                dev.0 / pl.0.max(1e-9)
            );
        }
    });
}
