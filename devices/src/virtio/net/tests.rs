//! virtio-net tests against a real TAP inside a network namespace made by
//! the test (root only; they print SKIP otherwise). The device runs behind
//! the MMIO transport and event loop, driven by the in-process test driver;
//! the far end of the TAP is an AF_PACKET socket in the same namespace.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;

use super::device::{features, NetStats};
use super::netns::{in_netns, is_root, Packet, ETHERTYPE, TAP};
use super::*;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{guest_memory, Arena, RawDesc, Seg, TestDriver};
use std::os::unix::io::AsRawFd;

const MAC: MacAddr = [0x02, 0xb2, 0x70, 0, 0, 1];

fn frame(src: MacAddr, dst: MacAddr, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

type Em = EventManager<Arc<Mutex<Net>>>;

struct Guest {
    d: TestDriver,
    em: Em,
    dev: Arc<Mutex<Net>>,
}

impl Guest {
    fn new(wanted: u64) -> Guest {
        let net = Net::new(NetConfig {
            tap: TAP.to_string(),
            mac: Some(MAC),
        })
        .unwrap();
        Guest::on(net, wanted)
    }

    fn on(net: Net, wanted: u64) -> Guest {
        let mem = guest_memory(8 << 20);
        let dev = Arc::new(Mutex::new(net));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut d = TestDriver::new(mem, t, Arena::new(GuestAddress(0x1000), (8 << 20) - 0x1000));
        d.init(wanted, QUEUE_SIZE).unwrap();
        em.run_with_timeout(0).unwrap();
        Guest { d, em, dev }
    }

    fn pump_until(&mut self, q: u16, n: usize, secs: u64) -> Vec<crate::virtio::testing::UsedElem> {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < end {
            self.em.run_with_timeout(20).unwrap();
            out.extend(self.d.used(q));
        }
        out
    }

    fn post_rx(&mut self, n: usize, size: u32) -> Vec<(u16, GuestAddress)> {
        let v: Vec<_> = (0..n)
            .map(|_| {
                let b = self.d.buf(size as usize);
                (self.d.add_chain(RXQ as u16, &[Seg::wo(b, size)]), b)
            })
            .collect();
        self.d.notify(RXQ as u16);
        v
    }
}

#[test]
fn missing_tap_is_a_clear_error() {
    let e = Net::new(NetConfig {
        tap: "b2p-no-such0".to_string(),
        mac: None,
    })
    .unwrap_err();
    assert!(matches!(e, NetError::NoSuchTap(_)), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    for bad in ["", "a/b", "0123456789abcdefXX"] {
        assert!(matches!(
            Net::new(NetConfig {
                tap: bad.to_string(),
                mac: None
            }),
            Err(NetError::InvalidName(_))
        ));
    }
    if is_root() {
        let e = Net::new(NetConfig {
            tap: "lo".to_string(),
            mac: None,
        })
        .unwrap_err();
        assert!(matches!(e, NetError::NotATap(_)), "{e}");
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: 'lo is not a TAP' check needs root"
        );
    }
}

#[test]
fn mac_parsing_and_config_space() {
    assert_eq!(parse_mac("02:b2:70:00:00:01").unwrap(), MAC);
    for bad in [
        "01:00:00:00:00:00",
        "02:b2:70:00:00",
        "02:b2:70:00:00:01:02",
        "zz:00:00:00:00:00",
        "2:b2:70:00:00:01",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad}");
    }
    let m = random_mac();
    assert_eq!(m[0] & 3, 2);
}

#[test]
fn guest_frame_reaches_the_tap_and_back() {
    in_netns(1500, || {
        let mut g = Guest::new(features::MRG_RXBUF | features::CSUM | features::GUEST_CSUM);
        let mut cfg = [0u8; 8];
        g.d.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &MAC);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
        let pkt = Packet::open(TAP);
        // Guest -> TAP.
        let f = frame(MAC, [0xff; 6], b"b2p: from the guest");
        let mut chain = vec![0u8; VNET_HDR_LEN];
        chain.extend_from_slice(&f);
        let a = g.d.buf_with(&chain);
        // Header and frame split over two descriptors.
        g.d.add_chain(
            TXQ as u16,
            &[
                Seg::ro(a, 5),
                Seg::ro(a.unchecked_add(5), chain.len() as u32 - 5),
            ],
        );
        g.d.notify(TXQ as u16);
        assert_eq!(g.pump_until(TXQ as u16, 1, 5).len(), 1);
        let got = pkt
            .recv_ours(Duration::from_secs(5))
            .expect("frame on the TAP");
        assert_eq!(got, f);
        // TAP -> guest.
        let bufs = g.post_rx(32, 2048);
        let f = frame([0x02, 0, 0, 0, 0, 9], MAC, b"b2p: to the guest");
        pkt.send(&f);
        let mut pending = Vec::new();
        let used = loop {
            if pending.is_empty() {
                pending = g.pump_until(RXQ as u16, 1, 5);
                assert!(!pending.is_empty(), "no frame reached the guest");
            }
            let u = pending.remove(0);
            // Skip frames the kernel sent on its own (IPv6 ND, ...).
            let (_, b) = bufs.iter().find(|(h, _)| u32::from(*h) == u.id).unwrap();
            let data = g.d.read_buf(*b, u.len as usize);
            if data.len() >= VNET_HDR_LEN + 14
                && data[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes()
            {
                break data;
            }
        };
        assert_eq!(&used[VNET_HDR_LEN..], &f[..]);
        assert_eq!(u16::from_le_bytes([used[10], used[11]]), 1, "num_buffers");
        let st = g.dev.lock().unwrap().stats();
        assert_eq!(st.tx_frames, 1);
        assert!(st.rx_frames >= 1);
    });
}

#[test]
fn mergeable_buffers_and_no_rx_buffers() {
    in_netns(9000, || {
        let mut g = Guest::new(features::MRG_RXBUF);
        let pkt = Packet::open(TAP);
        // No RX buffers yet: the frame waits, the TAP is not polled.
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let f = frame([0x02, 0, 0, 0, 0, 9], MAC, &payload);
        // Let the kernel's own frames (if any) come and go first.
        for _ in 0..5 {
            g.em.run_with_timeout(20).unwrap();
        }
        pkt.send(&f);
        for _ in 0..10 {
            g.em.run_with_timeout(20).unwrap();
        }
        assert!(g.dev.lock().unwrap().rx_blocked);
        // 1 KiB buffers: the 5 KiB frame spans several, num_buffers says so.
        let mut bufs = g.post_rx(32, 1024);
        let mut found = false;
        let end = Instant::now() + Duration::from_secs(5);
        while !found && Instant::now() < end {
            g.em.run_with_timeout(20).unwrap();
            let used = g.d.used(RXQ as u16);
            let mut i = 0;
            while i < used.len() {
                let (_, b) = *bufs
                    .iter()
                    .find(|(h, _)| u32::from(*h) == used[i].id)
                    .unwrap();
                let first = g.d.read_buf(b, used[i].len as usize);
                let nb = usize::from(u16::from_le_bytes([first[10], first[11]]));
                assert!(nb >= 1 && i + nb <= used.len(), "num_buffers {nb}");
                let mut data = first;
                for u in &used[i + 1..i + nb] {
                    let (_, b) = *bufs.iter().find(|(h, _)| u32::from(*h) == u.id).unwrap();
                    data.extend(g.d.read_buf(b, u.len as usize));
                }
                if data[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes() {
                    assert_eq!(&data[VNET_HDR_LEN..], &f[..]);
                    assert_eq!(nb, (f.len() + VNET_HDR_LEN).div_ceil(1024));
                    found = true;
                }
                i += nb;
            }
            bufs.retain(|(h, _)| !used.iter().any(|u| u.id == u32::from(*h)));
        }
        assert!(found, "the 5000-byte frame never reached the guest");
    });
}

/// Hostile TX chains (outside memory, write-only, shorter than the header,
/// 4 GiB long, a descriptor loop, garbage GSO fields) and hostile RX buffers
/// (read-only, outside memory) while a frame arrives: every chain comes back,
/// none reaches guest memory outside itself, the frame is dropped.
/// `send_frame` puts one frame (no vnet header) on the host side.
fn hostile_chains_on(mut g: Guest, send_frame: &dyn Fn(&[u8])) -> NetStats {
    let end = g.d.mem_end();
    for r in [
        RawDesc {
            addr: end - 8,
            len: 64,
            flags: 0,
            next: 0,
        },
        RawDesc {
            addr: 0x2000,
            len: 64,
            flags: 2,
            next: 0,
        },
        RawDesc {
            addr: 0x2000,
            len: 4,
            flags: 0,
            next: 0,
        },
        RawDesc {
            addr: 0x2000,
            len: u32::MAX,
            flags: 0,
            next: 0,
        },
        RawDesc {
            addr: 0x2000,
            len: 64,
            flags: 1,
            next: 200,
        },
        // A syntactically valid header with garbage GSO fields.
        RawDesc {
            addr: 0x3000,
            len: 200,
            flags: 0,
            next: 0,
        },
    ] {
        g.d.mem_write_garbage(0x3000);
        g.d.write_raw_desc(TXQ as u16, 200, r);
        g.d.publish(TXQ as u16, 200);
        g.d.notify(TXQ as u16);
        let used = g.pump_until(TXQ as u16, 1, 2);
        assert_eq!(used.len(), 1, "{r:?}");
        assert_eq!(used[0].id, 200);
        assert_eq!(used[0].len, 0, "TX buffers are returned unwritten");
    }
    let st = g.dev.lock().unwrap().stats();
    assert!(st.tx_dropped >= 5, "{st:?}");
    assert_eq!(st.tx_dropped + st.tx_frames, 6, "{st:?}");
    // Hostile RX buffers: read-only, outside memory; a frame arrives.
    let ro = g.d.buf_with(&[0x5a; 4096]);
    g.d.write_raw_desc(
        RXQ as u16,
        200,
        RawDesc {
            addr: ro.0,
            len: 4096,
            flags: 0,
            next: 0,
        },
    );
    g.d.publish(RXQ as u16, 200);
    g.d.write_raw_desc(
        RXQ as u16,
        201,
        RawDesc {
            addr: end - 8,
            len: 4096,
            flags: 2,
            next: 0,
        },
    );
    g.d.publish(RXQ as u16, 201);
    g.d.notify(RXQ as u16);
    send_frame(&frame([2, 0, 0, 0, 0, 9], MAC, b"x"));
    let used = g.pump_until(RXQ as u16, 1, 2);
    assert!(!used.is_empty(), "the unusable RX buffer comes back");
    assert!(used.iter().all(|u| u.len == 0), "{used:?}");
    assert!(
        g.d.read_buf(ro, 4096) == [0x5a; 4096],
        "a device-readable RX buffer was written"
    );
    let st = g.dev.lock().unwrap().stats();
    assert!(st.rx_dropped >= 1, "{st:?}");
    assert_eq!(st.rx_frames, 0, "{st:?}");
    st
}

#[test]
fn hostile_chains() {
    in_netns(1500, || {
        let g = Guest::new(features::MRG_RXBUF);
        let pkt = Packet::open(TAP);
        hostile_chains_on(g, &|f| pkt.send(f));
    });
}

/// `hostile_chains` on a SOCK_SEQPACKET backend: no TAP, no root, so it
/// runs everywhere.
#[test]
fn hostile_chains_on_a_seqpacket_backend() {
    let (backend, wire) = SeqPacketBackend::pair().unwrap();
    let net = Net::with_backend(Box::new(backend), Some(MAC)).unwrap();
    let g = Guest::on(net, features::MRG_RXBUF);
    let st = hostile_chains_on(g, &|f| {
        let mut dgram = vec![0u8; VNET_HDR_LEN];
        dgram.extend_from_slice(f);
        // SAFETY: dgram is readable for its length.
        let n = unsafe { libc::send(wire.as_raw_fd(), dgram.as_ptr().cast(), dgram.len(), 0) };
        assert_eq!(n as usize, dgram.len());
    });
    // Only the well-formed 200-byte chain reached the wire (a socket does
    // not check GSO fields); the five hostile ones did not.
    assert_eq!((st.tx_dropped, st.tx_frames), (5, 1), "{st:?}");
    let mut got = vec![0u8; 4096];
    let mut dgrams = Vec::new();
    loop {
        // SAFETY: got is writable for its length.
        let n = unsafe {
            libc::recv(
                wire.as_raw_fd(),
                got.as_mut_ptr().cast(),
                got.len(),
                libc::MSG_DONTWAIT,
            )
        };
        // -1: nothing left; 0: the device's end is closed (it was dropped).
        if n <= 0 {
            break;
        }
        dgrams.push(n as usize);
    }
    assert_eq!(dgrams, vec![200]);
}

trait Garbage {
    fn mem_write_garbage(&mut self, at: u64);
}

impl Garbage for TestDriver {
    fn mem_write_garbage(&mut self, at: u64) {
        use vm_memory::Bytes;
        let mut b = [0xffu8; 200];
        b[1] = 0x44; // an unknown gso_type
        self.mem.write_slice(&b, GuestAddress(at)).unwrap();
    }
}

use vm_memory::Address;

/// The same data paths on a SOCK_SEQPACKET backend: no TAP, no root.
#[test]
fn frames_both_ways_on_a_seqpacket_backend() {
    let (backend, wire) = SeqPacketBackend::pair().unwrap();
    let net = Net::with_backend(Box::new(backend), Some(MAC)).unwrap();
    let mut g = Guest::on(net, features::MRG_RXBUF);
    // Guest -> wire: header + frame in one datagram.
    let f = frame(MAC, [0xff; 6], b"b2p: over seqpacket");
    let mut chain = vec![0u8; VNET_HDR_LEN];
    chain.extend_from_slice(&f);
    let a = g.d.buf_with(&chain);
    g.d.add_chain(TXQ as u16, &[Seg::ro(a, chain.len() as u32)]);
    g.d.notify(TXQ as u16);
    assert_eq!(g.pump_until(TXQ as u16, 1, 5).len(), 1);
    let mut got = vec![0u8; 4096];
    // SAFETY: got is writable for its length.
    let n = unsafe { libc::recv(wire.as_raw_fd(), got.as_mut_ptr().cast(), got.len(), 0) };
    assert_eq!(n as usize, chain.len());
    assert_eq!(&got[..chain.len()], &chain[..]);
    // Wire -> guest: a 3000-byte frame over 1 KiB mergeable buffers.
    let big = frame([0x02, 0, 0, 0, 0, 7], MAC, &[0xa5; 3000]);
    let mut dgram = vec![0u8; VNET_HDR_LEN];
    dgram.extend_from_slice(&big);
    let bufs = g.post_rx(8, 1024);
    // SAFETY: dgram is readable for its length.
    let n = unsafe { libc::send(wire.as_raw_fd(), dgram.as_ptr().cast(), dgram.len(), 0) };
    assert_eq!(n as usize, dgram.len());
    let want = dgram.len().div_ceil(1024);
    let used = g.pump_until(RXQ as u16, want, 5);
    assert_eq!(used.len(), want, "{used:?}");
    let mut data = Vec::new();
    for u in &used {
        let (_, b) = *bufs.iter().find(|(h, _)| u32::from(*h) == u.id).unwrap();
        data.extend(g.d.read_buf(b, u.len as usize));
    }
    assert_eq!(u16::from_le_bytes([data[10], data[11]]) as usize, want);
    assert_eq!(&data[VNET_HDR_LEN..], &big[..]);
    assert_eq!(g.dev.lock().unwrap().stats().rx_frames, 1);
}
