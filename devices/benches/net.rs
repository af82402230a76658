//! virtio-net throughput, in-process, on a real TAP in a network namespace
//! made for the run (root only; prints SKIP otherwise). The device runs
//! behind the MMIO transport and the event loop, driven by the in-process
//! test driver; the far end is an AF_PACKET socket on the TAP. Each
//! direction is measured against plain writev/readv on the same TAP (the
//! ceiling a device can reach), frames of one size per run, counted at the
//! receiving end (the TAP and the socket drop what they cannot queue).
//! Run: `cargo bench -p b2p-devices --bench net`.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use b2p_devices::virtio::iovec::{IoVecBuf, IoVecBufMut, IoVecStorage};
use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::net::device::features;
use b2p_devices::virtio::net::netns::{in_netns, is_root, Packet, ETHERTYPE, TAP};
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

/// Guest → TAP through the device.
fn tx_device(len: usize, frames: usize) -> (u64, u64, Duration) {
    let mut g = Guest::new();
    tx_run(len, |chain| {
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
    })
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
    let mut g = Guest::new();
    let size = 64 << 10;
    let mut heads = std::collections::HashMap::new();
    for _ in 0..BATCH {
        let b = g.d.buf(size);
        heads.insert(g.d.add_chain(RXQ as u16, &[Seg::wo(b, size as u32)]), b);
    }
    g.d.notify(RXQ as u16);
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tx = flood(len, frames, sent.clone());
    let (mut got, mut bytes, mut last) = (0u64, 0u64, start);
    while last.elapsed() < IDLE || !tx.is_finished() {
        g.em.run_with_timeout(50).unwrap();
        let used = g.d.used(RXQ as u16);
        if used.is_empty() {
            continue;
        }
        for u in used {
            let Some(b) = heads.remove(&(u.id as u16)) else {
                continue;
            };
            let mut eth = [0u8; 14];
            g.d.mem
                .read_slice(&mut eth, b.unchecked_add(VNET_HDR_LEN as u64))
                .unwrap();
            if is_ours(&eth, (u.len as usize).saturating_sub(VNET_HDR_LEN)) {
                got += 1;
                bytes += u64::from(u.len) - VNET_HDR_LEN as u64;
            }
            heads.insert(g.d.add_chain(RXQ as u16, &[Seg::wo(b, size as u32)]), b);
        }
        g.d.notify(RXQ as u16);
        last = Instant::now();
    }
    let _ = tx.join();
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

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    if !is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: bench net: needs root (ip netns, /dev/net/tun)"
        );
        return;
    }
    in_netns(MTU, move || {
        let rounds = if quick { 1 } else { 3 };
        println!("virtio-net in-process vs plain writev/readv on the TAP, best of {rounds}");
        println!(
            "{:<28} {:>11} {:>11} {:>11} {:>11} {:>7}",
            "workload", "device MB/s", "device kf/s", "plain MB/s", "plain kf/s", "ratio"
        );
        type Run = fn(usize, usize) -> (u64, u64, Duration);
        let cases: [(&str, usize, Run, Run); 4] = [
            ("guest -> TAP, 1514 B", 1514, tx_device, tx_plain),
            ("guest -> TAP, 64000 B", 64000, tx_device, tx_plain),
            ("TAP -> guest, 1514 B", 1514, rx_device, rx_plain),
            ("TAP -> guest, 64000 B", 64000, rx_device, rx_plain),
        ];
        for (name, len, device, plain) in cases {
            let frames = match (quick, len > 9000) {
                (true, _) => 2_000,
                (false, false) => 400_000,
                (false, true) => 40_000,
            };
            let rate = |r: (u64, u64, Duration)| {
                let s = r.2.as_secs_f64().max(1e-9);
                (r.1 as f64 / s / 1e6, r.0 as f64 / s / 1e3)
            };
            let (mut dev, mut pl) = ((0.0f64, 0.0f64), (0.0f64, 0.0f64));
            for _ in 0..rounds {
                let d = rate(device(len, frames));
                let p = rate(plain(len, frames));
                if d.0 > dev.0 {
                    dev = d;
                }
                if p.0 > pl.0 {
                    pl = p;
                }
            }
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
