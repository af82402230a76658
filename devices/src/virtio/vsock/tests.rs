//! Device-level vsock tests: the device runs behind the real MMIO transport
//! and event loop, driven by the in-process test driver playing a guest
//! with a small vsock stack (echo server, credit accounting); the host side
//! is real Unix sockets in a temporary directory.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};

use super::packet::{Hdr, HDR_SIZE};
use super::*;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{guest_memory, Arena, RawDesc, Seg, TestDriver};

const CID: u64 = 3;
const GUEST_BUF: u32 = 256 * 1024;
const TX_SLOTS: usize = 96;

type Em = EventManager<Arc<Mutex<Vsock>>>;

/// One connection as the test guest sees it.
#[derive(Debug, Default)]
struct GConn {
    /// Bytes received and not yet echoed.
    out: VecDeque<u8>,
    rx_total: u32,
    /// Bytes the guest consumed (announced as fwd_cnt).
    fwd_cnt: u32,
    last_announced: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_total: u32,
    peer_shut: u32,
    /// We sent SHUTDOWN(both) and wait for the device's RST.
    closing: bool,
    /// Bytes received, kept when not echoing.
    got: Vec<u8>,
    resets: usize,
}

impl GConn {
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_total.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The guest side: driver, queues, buffers, event loop.
struct Guest {
    d: TestDriver,
    em: Em,
    dev: Arc<Mutex<Vsock>>,
    rx_slots: Vec<(GuestAddress, GuestAddress)>,
    rx_inflight: HashMap<u32, usize>,
    rx_buf: u32,
    tx_free: Vec<(GuestAddress, GuestAddress)>,
    tx_inflight: HashMap<u32, (GuestAddress, GuestAddress)>,
    /// Connections keyed by (guest port, host port).
    conns: HashMap<(u32, u32), GConn>,
    /// Guest ports that accept connections.
    listen: Vec<u32>,
    echo: bool,
    /// Ignore REQUESTs entirely (a guest that never answers).
    silent: bool,
    /// Every packet received, in order (for tests that inspect them).
    log: Vec<Hdr>,
    /// The guest's buf_alloc.
    buf_alloc: u32,
    /// Announce consumed bytes (false: a guest that never reads).
    consume: bool,
    _dir: Option<tempfile::TempDir>,
    uds: PathBuf,
}

impl Guest {
    fn new(ports: &[u32], rx_buf: u32) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listeners = ports
            .iter()
            .map(|p| (*p, dir.path().join(format!("port{p}.sock"))))
            .collect();
        let mut g = Guest::with_device(
            Vsock::new(
                VsockConfig {
                    guest_cid: CID,
                    uds_path: uds.clone(),
                },
                listeners,
            )
            .unwrap(),
            rx_buf,
        );
        g._dir = Some(dir);
        g.uds = uds;
        g
    }

    fn with_device(dev: Vsock, rx_buf: u32) -> Guest {
        let mem = guest_memory(64 << 20);
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut d = TestDriver::new(
            mem,
            t,
            Arena::new(GuestAddress(0x1000), (64 << 20) - 0x1000),
        );
        d.init(0, QUEUE_SIZE).unwrap();
        em.run_with_timeout(0).unwrap();
        let mut g = Guest {
            d,
            em,
            dev,
            rx_slots: Vec::new(),
            rx_inflight: HashMap::new(),
            rx_buf,
            tx_free: Vec::new(),
            tx_inflight: HashMap::new(),
            conns: HashMap::new(),
            listen: Vec::new(),
            echo: true,
            silent: false,
            log: Vec::new(),
            buf_alloc: GUEST_BUF,
            consume: true,
            _dir: None,
            uds: PathBuf::new(),
        };
        for _ in 0..TX_SLOTS {
            let h = g.d.buf(HDR_SIZE);
            let b = g.d.buf(MAX_PKT_PAYLOAD as usize);
            g.tx_free.push((h, b));
        }
        for i in 0..128 {
            let h = g.d.buf(HDR_SIZE);
            let b = g.d.buf(rx_buf as usize);
            g.rx_slots.push((h, b));
            g.post_rx(i);
        }
        g.d.notify(RXQ as u16);
        g
    }

    fn port_path(&self, port: u32) -> PathBuf {
        self.uds.parent().unwrap().join(format!("port{port}.sock"))
    }

    fn post_rx(&mut self, slot: usize) {
        let (h, b) = self.rx_slots[slot];
        let head = self.d.add_chain(
            RXQ as u16,
            &[Seg::wo(h, HDR_SIZE as u32), Seg::wo(b, self.rx_buf)],
        );
        self.rx_inflight.insert(u32::from(head), slot);
    }

    fn pump(&mut self, ms: i32) {
        self.em.run_with_timeout(ms).unwrap();
    }

    fn reap_tx(&mut self) {
        for u in self.d.used(TXQ as u16) {
            if let Some(s) = self.tx_inflight.remove(&u.id) {
                self.tx_free.push(s);
            }
        }
    }

    /// Send a raw packet (header as given, payload as given).
    fn send_raw(&mut self, hdr: Hdr, data: &[u8]) {
        while self.tx_free.is_empty() {
            self.reap_tx();
            if self.tx_free.is_empty() {
                self.pump(5);
            }
        }
        let (h, b) = self.tx_free.pop().unwrap();
        self.d.mem.write_slice(&hdr.to_bytes(), h).unwrap();
        let head = if data.is_empty() {
            self.d.add_chain(TXQ as u16, &[Seg::ro(h, HDR_SIZE as u32)])
        } else {
            self.d.mem.write_slice(data, b).unwrap();
            self.d.add_chain(
                TXQ as u16,
                &[Seg::ro(h, HDR_SIZE as u32), Seg::ro(b, data.len() as u32)],
            )
        };
        self.tx_inflight.insert(u32::from(head), (h, b));
        self.d.notify(TXQ as u16);
    }

    fn hdr(&mut self, gport: u32, hport: u32, op_: u16, len: u32) -> Hdr {
        let buf_alloc = self.buf_alloc;
        let c = self.conns.entry((gport, hport)).or_default();
        c.last_announced = c.fwd_cnt;
        Hdr {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: gport,
            dst_port: hport,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn send_op(&mut self, gport: u32, hport: u32, op_: u16, flags: u32) {
        let mut h = self.hdr(gport, hport, op_, 0);
        h.flags = flags;
        self.send_raw(h, &[]);
    }

    /// Collect RX packets, repost their buffers.
    fn recv(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.d.used(RXQ as u16);
        // Map every head to its slot before reposting (reposting reuses
        // the descriptor ids just freed).
        let slots: Vec<usize> = used
            .iter()
            .map(|u| self.rx_inflight.remove(&u.id).expect("unknown rx head"))
            .collect();
        for (u, slot) in used.iter().zip(slots) {
            let (h, b) = self.rx_slots[slot];
            let mut hb = [0u8; HDR_SIZE];
            self.d.mem.read_slice(&mut hb, h).unwrap();
            let hdr = Hdr::from_bytes(&hb);
            assert_eq!(u.len as usize, HDR_SIZE + hdr.len as usize, "{hdr:?}");
            let data = self.d.read_buf(b, hdr.len as usize);
            out.push((hdr, data));
            self.post_rx(slot);
        }
        if !used.is_empty() {
            self.d.notify(RXQ as u16);
        }
        self.reap_tx();
        out
    }

    /// One round: run the device, handle what arrived as an echo server.
    fn step(&mut self, ms: i32) {
        self.pump(ms);
        for (h, data) in self.recv() {
            self.handle(h, data);
        }
        self.flush_out();
    }

    fn handle(&mut self, h: Hdr, data: Vec<u8>) {
        self.log.push(h);
        assert_eq!(h.src_cid, VSOCK_HOST_CID);
        assert_eq!(h.dst_cid, CID);
        assert_eq!(h.type_, VSOCK_TYPE_STREAM);
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            if self.silent {
                return;
            }
            if self.listen.contains(&h.dst_port) {
                self.conns.insert(key, GConn::default());
                self.update_credit(key, &h);
                self.send_op(key.0, key.1, op::RESPONSE, 0);
            } else {
                self.send_op(key.0, key.1, op::RST, 0);
            }
            return;
        }
        if h.op == op::RST {
            if let Some(c) = self.conns.get_mut(&key) {
                c.resets += 1;
                if c.closing {
                    self.conns.remove(&key);
                }
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            return;
        }
        self.update_credit(key, &h);
        let consume = self.consume;
        let echo = self.echo;
        let c = self.conns.get_mut(&key).unwrap();
        match h.op {
            op::RW => {
                assert_eq!(data.len(), h.len as usize);
                // The device must respect the credit we gave it.
                let in_flight = c
                    .rx_total
                    .wrapping_add(h.len)
                    .wrapping_sub(c.last_announced);
                assert!(
                    in_flight <= self.buf_alloc,
                    "device overran guest credit: {in_flight} > {}",
                    self.buf_alloc
                );
                c.rx_total = c.rx_total.wrapping_add(h.len);
                if consume {
                    c.fwd_cnt = c.rx_total;
                }
                if echo {
                    c.out.extend(&data);
                } else {
                    c.got.extend(&data);
                }
            }
            op::CREDIT_REQUEST => self.send_op(key.0, key.1, op::CREDIT_UPDATE, 0),
            op::SHUTDOWN => {
                c.peer_shut |= h.flags;
                // Like Linux: a peer that shut both ways gets RST.
                if c.peer_shut == SHUTDOWN_F_BOTH && echo {
                    self.send_op(key.0, key.1, op::RST, 0);
                    self.conns.remove(&key);
                }
            }
            _ => {}
        }
    }

    fn update_credit(&mut self, key: (u32, u32), h: &Hdr) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
    }

    /// Echo pending bytes within the device's credit.
    fn flush_out(&mut self) {
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for key in keys {
            loop {
                let c = &self.conns[&key];
                let n = c
                    .out
                    .len()
                    .min(c.peer_free() as usize)
                    .min(MAX_PKT_PAYLOAD as usize);
                if n == 0 {
                    break;
                }
                let c = self.conns.get_mut(&key).unwrap();
                let chunk: Vec<u8> = c.out.drain(..n).collect();
                c.tx_total = c.tx_total.wrapping_add(n as u32);
                let h = self.hdr(key.0, key.1, op::RW, n as u32);
                self.send_raw(h, &chunk);
            }
            let c = &self.conns[&key];
            // An echo server closes after EOF once everything is echoed.
            if c.out.is_empty() && c.peer_shut & SHUTDOWN_F_SEND != 0 && !c.closing && self.echo {
                self.conns.get_mut(&key).unwrap().closing = true;
                self.send_op(key.0, key.1, op::SHUTDOWN, SHUTDOWN_F_BOTH);
                continue;
            }
            if c.fwd_cnt.wrapping_sub(c.last_announced) >= 64 * 1024 {
                self.send_op(key.0, key.1, op::CREDIT_UPDATE, 0);
            }
        }
    }

    /// Step until `done()` or the timeout.
    fn run_until(&mut self, secs: u64, mut done: impl FnMut(&mut Guest) -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            assert!(Instant::now() < end, "timed out");
            self.step(5);
        }
    }

    fn run_threads<T>(&mut self, secs: u64, hs: Vec<JoinHandle<T>>) -> Vec<T> {
        self.run_until(secs, |_| hs.iter().all(|h| h.is_finished()));
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Connect through the hybrid socket; returns the stream after `OK`.
fn hybrid_connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    // Read the line byte by byte so no payload is swallowed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    (s, String::from_utf8(line).unwrap())
}

fn echo_roundtrip(mut s: UnixStream, data: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = s.try_clone().unwrap();
    let n = data.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; n];
        r.read_exact(&mut got).unwrap();
        got
    });
    s.write_all(data).unwrap();
    reader.join().unwrap()
}

#[test]
fn config_space_and_features() {
    let g = Guest::new(&[], 4096);
    let mut cfg = [0u8; 8];
    let mut d = g.d;
    d.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut b = [0u8; 4];
    d.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    assert_eq!(d.read_reg(crate::virtio::mmio::regs::DEVICE_ID), 19);
}

#[test]
fn invalid_cid_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(
            VsockConfig {
                guest_cid: cid,
                uds_path: uds.clone(),
            },
            vec![],
        )
        .unwrap_err();
        assert!(matches!(e, VsockError::InvalidCid(_)));
    }
    let cfg = VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    };
    let v = Vsock::new(cfg.clone(), vec![]).unwrap();
    let e = Vsock::new(cfg.clone(), vec![]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("socket path {} is in use", uds.display())
    );
    drop(v);
    // Duplicate port paths.
    let p = dir.path().join("p.sock");
    let e = Vsock::new(cfg.clone(), vec![(1, p.clone()), (2, p.clone())]).unwrap_err();
    assert!(matches!(e, VsockError::DuplicatePath(_)), "{e}");
    // A stale socket at the hybrid path is replaced.
    drop(UnixListener::bind(&uds).unwrap());
    assert!(uds.exists());
    let _v = Vsock::new(cfg, vec![]).unwrap();
}

#[test]
fn hybrid_connect_echo() {
    let mut g = Guest::new(&[], 4096);
    g.listen.push(1234);
    let uds = g.uds.clone();
    let h = std::thread::spawn(move || {
        let (s, line) = hybrid_connect(&uds, 1234);
        assert!(line.starts_with("OK ") && line.ends_with('\n'), "{line:?}");
        let port: u32 = line[3..line.len() - 1].parse().unwrap();
        assert!(port >= 1 << 30);
        echo_roundtrip(s, b"hello over vsock")
    });
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], b"hello over vsock");
}

#[test]
fn hybrid_refused_and_bad_lines() {
    let mut g = Guest::new(&[], 4096);
    // No guest listener: the guest answers RST, the host sees EOF, no OK.
    let uds = g.uds.clone();
    let h1 = std::thread::spawn(move || hybrid_connect(&uds, 7777).1);
    let uds = g.uds.clone();
    let h2 = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"HELLO 12\n").unwrap();
        let mut v = Vec::new();
        // Closed unread: EOF or ECONNRESET, never an answer.
        match s.read_to_end(&mut v) {
            Ok(_) => String::from_utf8(v).unwrap(),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
                String::new()
            }
        }
    });
    let out = g.run_threads(20, vec![h1, h2]);
    assert_eq!(out, vec![String::new(), String::new()]);
    assert_eq!(g.connections(), 0);
}

#[test]
fn port_listener_echo_without_handshake() {
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    let path = g.port_path(1024);
    let h = std::thread::spawn(move || {
        let s = UnixStream::connect(&path).unwrap();
        // The first bytes back are the echo: no "OK" line.
        echo_roundtrip(s, b"{\"method\":\"org.varlink.service.GetInfo\"}\0")
    });
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], b"{\"method\":\"org.varlink.service.GetInfo\"}\0");
}

#[test]
fn sixty_four_concurrent_connections() {
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    g.listen.push(2048);
    let mut hs = Vec::new();
    for i in 0..64u32 {
        let path = g.port_path(1024);
        let uds = g.uds.clone();
        hs.push(std::thread::spawn(move || {
            let data = pattern(i, 48 * 1024 + i as usize);
            let s = if i % 2 == 0 {
                UnixStream::connect(&path).unwrap()
            } else {
                let (s, line) = hybrid_connect(&uds, 2048);
                assert!(line.starts_with("OK "), "{line:?}");
                s
            };
            echo_roundtrip(s, &data) == data
        }));
    }
    let out = g.run_threads(60, hs);
    assert!(out.iter().all(|ok| *ok));
    // Closing every host end closes every connection.
    g.run_until(20, |g| g.connections() == 0);
}

#[test]
fn stream_64_mib_sha256() {
    let mut g = Guest::new(&[1024], 65536);
    g.listen.push(1024);
    let path = g.port_path(1024);
    const TOTAL: usize = 64 << 20;
    let h = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            while n < TOTAL {
                let k = r.read(&mut buf).unwrap();
                assert!(k > 0, "EOF after {n} bytes");
                hash.update(&buf[..k]);
                n += k;
            }
            hash.finalize()
        });
        let mut hash = Sha256::new();
        let chunk = pattern(7, 1 << 20);
        for i in 0..64u8 {
            let mut c = chunk.clone();
            c[0] = i;
            hash.update(&c);
            s.write_all(&c).unwrap();
        }
        let sent = hash.finalize();
        let got = reader.join().unwrap();
        (sent, got)
    });
    let out = g.run_threads(300, vec![h]);
    assert_eq!(out[0].0, out[0].1);
}

#[test]
fn guest_initiated_connection() {
    let mut g = Guest::new(&[], 4096);
    g.echo = false;
    let path = PathBuf::from(format!("{}_5000", g.uds.display()));
    let l = UnixListener::bind(&path).unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"pong").unwrap();
        let mut rest = Vec::new();
        // The guest's SHUTDOWN(both) closes our end.
        s.read_to_end(&mut rest).unwrap();
        (b, rest)
    });
    g.conns.insert((3000, 5000), GConn::default());
    g.send_op(3000, 5000, op::REQUEST, 0);
    g.run_until(10, |g| g.log.iter().any(|h| h.op == op::RESPONSE));
    let h_ = g.hdr(3000, 5000, op::RW, 4);
    g.conns.get_mut(&(3000, 5000)).unwrap().tx_total = 4;
    g.send_raw(h_, b"ping");
    g.run_until(10, |g| g.conns[&(3000, 5000)].got.len() >= 4);
    assert_eq!(g.conns[&(3000, 5000)].got, b"pong");
    g.send_op(3000, 5000, op::SHUTDOWN, SHUTDOWN_F_BOTH);
    g.run_until(10, |g| g.log.iter().any(|h| h.op == op::RST));
    let out = g.run_threads(10, vec![h]);
    assert_eq!(&out[0].0, b"ping");
    assert!(out[0].1.is_empty());
    assert_eq!(g.connections(), 0);
    // Nobody listens on port 5001: RST.
    g.log.clear();
    g.send_op(3001, 5001, op::REQUEST, 0);
    g.run_until(10, |g| {
        g.log
            .iter()
            .any(|h| h.op == op::RST && h.src_port == 5001 && h.dst_port == 3001)
    });
}

#[test]
fn host_close_shuts_down_then_resets() {
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    g.echo = false;
    let path = g.port_path(1024);
    let s = UnixStream::connect(&path).unwrap();
    g.run_until(10, |g| g.conns.len() == 1);
    let key = *g.conns.keys().next().unwrap();
    (&s).write_all(b"last words").unwrap();
    drop(s);
    // The bytes sent before closing arrive, then SHUTDOWN(both).
    g.run_until(10, |g| {
        g.log
            .iter()
            .any(|h| h.op == op::SHUTDOWN && h.flags == SHUTDOWN_F_BOTH)
    });
    assert_eq!(g.conns[&key].got, b"last words");
    // A guest that writes anyway gets RST: the host side is gone.
    g.conns.get_mut(&key).unwrap().tx_total = 3;
    let h = g.hdr(key.0, key.1, op::RW, 3);
    g.send_raw(h, b"abc");
    g.run_until(10, |g| g.conns[&key].resets == 1);
    assert_eq!(g.connections(), 0);
}

#[test]
fn host_half_close_keeps_the_other_direction() {
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    let path = g.port_path(1024);
    let h = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"request").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    // The echo guest sees SHUTDOWN(SEND) only, echoes, then closes.
    g.run_until(20, |g| {
        g.log
            .iter()
            .any(|h| h.op == op::SHUTDOWN && h.flags == SHUTDOWN_F_SEND)
    });
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], b"request");
}

#[test]
fn credit_limits_respected_both_ways() {
    let mut g = Guest::new(&[1024], 65536);
    g.listen.push(1024);
    g.echo = false;
    g.consume = false;
    g.buf_alloc = 4096;
    let path = g.port_path(1024);
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_nonblocking(true).unwrap();
    g.run_until(10, |g| g.conns.len() == 1);
    let key = *g.conns.keys().next().unwrap();
    let data = pattern(3, 100 * 1024);
    let mut written = 0;
    while written < data.len() {
        match s.write(&data[written..]) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    // The device sends exactly the 4 KiB of credit, then asks for more.
    g.run_until(10, |g| g.log.iter().any(|h| h.op == op::CREDIT_REQUEST));
    for _ in 0..20 {
        g.step(5);
    }
    assert_eq!(g.conns[&key].got.len(), 4096);
    assert_eq!(g.conns[&key].got, data[..4096]);
    // Granting 4 KiB more releases exactly 4 KiB more.
    g.conns.get_mut(&key).unwrap().fwd_cnt = 4096;
    g.send_op(key.0, key.1, op::CREDIT_UPDATE, 0);
    g.run_until(10, |g| g.conns[&key].got.len() == 8192);
    for _ in 0..20 {
        g.step(5);
    }
    assert_eq!(g.conns[&key].got.len(), 8192);

    // The device's own credit: the host does not read, the guest ignores
    // buf_alloc and keeps sending: the device resets the connection once
    // its bounded buffer is full, and never buffers more.
    let mut sent = 0u32;
    let chunk = vec![0x5au8; 65536];
    while g.conns[&key].resets == 0 {
        assert!(sent <= 16 << 20, "device buffered without bound");
        let h = g.hdr(key.0, key.1, op::RW, 65536);
        g.send_raw(h, &chunk);
        sent += 65536;
        g.step(1);
    }
    assert!(sent > CONN_TX_BUF_SIZE);
    assert_eq!(g.connections(), 0);
}

#[test]
fn connection_limit() {
    let mut g = Guest::new(&[1024], 4096);
    g.silent = true;
    // The guest never answers; connections pile up until the limit.
    let path = g.port_path(1024);
    let mut streams = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 20 {
        streams.push(UnixStream::connect(&path).unwrap());
        if streams.len() % 100 == 0 {
            g.step(1);
        }
    }
    for _ in 0..50 {
        g.step(2);
    }
    assert_eq!(g.connections(), MAX_CONNECTIONS);
    // The ones over the limit were closed.
    let mut closed = 0;
    for s in &streams {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        if matches!((&*s).read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 20);
    // The guest cannot open more either.
    g.log.clear();
    g.send_op(9, 77, op::REQUEST, 0);
    g.run_until(10, |g| {
        g.log.iter().any(|h| h.op == op::RST && h.dst_port == 9)
    });
}

#[test]
fn unanswered_request_times_out() {
    let mut g = Guest::new(&[1024], 4096);
    g.silent = true;
    let path = g.port_path(1024);
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let h = std::thread::spawn(move || {
        let mut v = Vec::new();
        s.read_to_end(&mut v).map(|_| v.len()).unwrap_or(usize::MAX)
    });
    let out = g.run_threads(10, vec![h]);
    assert_eq!(out[0], 0);
    assert!(t.elapsed() >= CONN_TIMEOUT);
    // The guest is told the REQUEST is void.
    assert!(g.log.iter().any(|h| h.op == op::RST));
}

#[test]
fn hostile_packets_never_panic() {
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    let end = g.d.mem_end();
    let good = |g: &mut Guest| g.hdr(40, 1 << 30, op::RW, 4);
    let mut cases: Vec<(Hdr, Vec<u8>)> = Vec::new();
    let mut h = good(&mut g);
    h.len = u32::MAX;
    cases.push((h, b"abcd".to_vec()));
    h.len = MAX_PKT_PAYLOAD + 1;
    cases.push((h, b"abcd".to_vec()));
    h.len = 100; // longer than the data descriptor
    cases.push((h, b"abcd".to_vec()));
    for op_ in [
        0u16,
        8,
        99,
        u16::MAX,
        op::RESPONSE,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
    ] {
        let mut h = good(&mut g);
        h.op = op_;
        h.len = 0;
        cases.push((h, vec![]));
    }
    let mut h = good(&mut g);
    h.src_cid = 99;
    cases.push((h, b"abcd".to_vec()));
    let mut h = good(&mut g);
    h.dst_cid = 7;
    h.op = op::REQUEST;
    cases.push((h, vec![]));
    let mut h = good(&mut g);
    h.type_ = 2;
    h.op = op::REQUEST;
    cases.push((h, vec![]));
    let mut h = good(&mut g);
    h.buf_alloc = u32::MAX;
    h.fwd_cnt = u32::MAX;
    cases.push((h, b"abcd".to_vec()));
    for (h, data) in cases {
        g.send_raw(h, &data);
        g.step(1);
    }
    // Raw hostile chains: short header, write-only header, outside memory,
    // a descriptor loop, a head beyond the ring.
    let raw = [
        RawDesc {
            addr: 0x2000,
            len: 10,
            flags: 0,
            next: 0,
        },
        RawDesc {
            addr: 0x2000,
            len: 44,
            flags: 2,
            next: 0,
        },
        RawDesc {
            addr: end - 8,
            len: 44,
            flags: 0,
            next: 0,
        },
        RawDesc {
            addr: u64::MAX - 4,
            len: u32::MAX,
            flags: 0,
            next: 0,
        },
        RawDesc {
            addr: 0x2000,
            len: 44,
            flags: 1,
            next: 200,
        },
    ];
    for r in raw {
        g.d.write_raw_desc(TXQ as u16, 200, r);
        g.d.publish(TXQ as u16, 200);
        g.d.notify(TXQ as u16);
        g.step(1);
    }
    g.d.publish(TXQ as u16, 9999);
    g.d.notify(TXQ as u16);
    g.step(1);
    // Hostile RX buffers: read-only, tiny, crossing the end of memory.
    // First the device fills every posted RX buffer (RSTs for REQUESTs to
    // a closed port) and the buffers are taken back without reposting, so
    // each hostile buffer below is the only one the device can use.
    g.step(5);
    let mut free_slots = Vec::new();
    let mut port = 4444;
    while !g.rx_inflight.is_empty() {
        g.send_op(41, port, op::REQUEST, 0);
        port += 1;
        g.pump(1);
        g.reap_tx();
        for u in g.d.used(RXQ as u16) {
            free_slots.extend(g.rx_inflight.remove(&u.id));
        }
    }
    // One more RST owed to the guest, waiting for an RX buffer.
    g.send_op(41, port, op::REQUEST, 0);
    g.pump(5);
    let scratch = g.d.buf(4096);
    let fill = vec![0xa5u8; 4096];
    let tail = GuestAddress(end - 16);
    for (r, watch) in [
        // Device-readable only: the device must not write into it.
        (
            RawDesc {
                addr: scratch.0,
                len: 4096,
                flags: 0,
                next: 0,
            },
            scratch,
        ),
        // Write-only but smaller than a header.
        (
            RawDesc {
                addr: scratch.0,
                len: 8,
                flags: 2,
                next: 0,
            },
            scratch,
        ),
        // Write-only, running past the end of guest memory.
        (
            RawDesc {
                addr: end - 16,
                len: 4096,
                flags: 2,
                next: 0,
            },
            tail,
        ),
    ] {
        let n = if watch == tail { 16 } else { 4096 };
        g.d.mem.write_slice(&fill[..n], watch).unwrap();
        g.d.write_raw_desc(RXQ as u16, 250, r);
        g.d.publish(RXQ as u16, 250);
        g.d.notify(RXQ as u16);
        g.pump(5);
        // The device gives the buffer back empty and writes nothing.
        let used = g.d.used(RXQ as u16);
        assert_eq!(used.len(), 1, "{r:?}: {used:?}");
        assert_eq!((used[0].id, used[0].len), (250, 0), "{r:?}");
        assert_eq!(g.d.read_buf(watch, n), fill[..n], "{r:?} was written");
    }
    // The RSTs owed meanwhile were kept, not lost with the bad buffers.
    g.log.clear();
    for slot in free_slots {
        g.post_rx(slot);
    }
    g.d.notify(RXQ as u16);
    g.run_until(10, |g| {
        g.log
            .iter()
            .any(|h| h.op == op::RST && h.dst_port == 41 && h.src_port == port)
    });
    // Still works.
    let path = g.port_path(1024);
    let h = std::thread::spawn(move || echo_roundtrip(UnixStream::connect(&path).unwrap(), b"ok"));
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], b"ok");
}

#[test]
fn reset_closes_connections_and_reactivates() {
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    let path = g.port_path(1024);
    let mut s = UnixStream::connect(&path).unwrap();
    g.run_until(10, |g| g.connections() == 1);
    g.d.set_status(0);
    assert!(!g.dev.lock().unwrap().is_active());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut v = Vec::new();
    assert_eq!(s.read_to_end(&mut v).unwrap(), 0);
    g.pump(10);
    // The driver initialises it again.
    g.reinit();
    let h =
        std::thread::spawn(move || echo_roundtrip(UnixStream::connect(&path).unwrap(), b"again"));
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], b"again");
}

impl Guest {
    /// Run the driver init sequence again (after a reset), reusing buffers.
    fn reinit(&mut self) {
        self.d.init(0, QUEUE_SIZE).unwrap();
        self.pump(0);
        self.rx_inflight.clear();
        let inflight: Vec<_> = self.tx_inflight.drain().map(|(_, v)| v).collect();
        self.tx_free.extend(inflight);
        self.conns.clear();
        for i in 0..self.rx_slots.len() {
            self.post_rx(i);
        }
        self.d.notify(RXQ as u16);
    }
}

#[test]
fn transport_reset_event() {
    let mut g = Guest::new(&[], 4096);
    let e = g.d.buf(8);
    g.d.add_chain(EVQ as u16, &[Seg::wo(e, 8)]);
    g.d.notify(EVQ as u16);
    g.pump(0);
    assert!(g.dev.lock().unwrap().send_transport_reset());
    let used = g.d.used(EVQ as u16);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].len, 4);
    let v: u32 = g.d.mem.read_obj(e).unwrap();
    assert_eq!(v, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    // No buffer left: nothing to post.
    assert!(!g.dev.lock().unwrap().send_transport_reset());
}

#[test]
fn connect_line_split_across_writes() {
    let mut g = Guest::new(&[], 4096);
    g.listen.push(99);
    let uds = g.uds.clone();
    let h = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.write_all(b"CONN").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // The line and the first payload bytes in one write.
        s.write_all(b"ECT 99\nxyz").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut b = [0u8; 3];
        r.read_exact(&mut b).unwrap();
        (line, b)
    });
    let out = g.run_threads(20, vec![h]);
    assert!(out[0].0.starts_with("OK "));
    assert_eq!(&out[0].1, b"xyz");
}

#[test]
fn varlink_exchange_through_port_listener() {
    // The recorded org.varlink.service.GetInfo call and b2p-agent's reply
    // (NUL-framed, tests/varlink/recorded/), carried byte for byte both ways
    // through the port listener `--vsock-port 1024=PATH` configures.
    const CALL: &[u8] = include_bytes!("../../../../tests/varlink/recorded/getinfo.call");
    const REPLY: &[u8] = include_bytes!("../../../../tests/varlink/recorded/getinfo.reply");
    assert_eq!(CALL.last(), Some(&0), "recorded call is NUL-terminated");
    assert_eq!(REPLY.last(), Some(&0), "recorded reply is NUL-terminated");
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    g.echo = false;
    let path = g.port_path(1024);
    let h = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(CALL).unwrap();
        let mut r = BufReader::new(s);
        let mut reply = Vec::new();
        r.read_until(0, &mut reply).unwrap();
        reply
    });
    g.run_until(20, |g| g.conns.values().any(|c| c.got.len() >= CALL.len()));
    let key = *g.conns.keys().next().unwrap();
    assert_eq!(g.conns[&key].got, CALL);
    g.conns.get_mut(&key).unwrap().tx_total = REPLY.len() as u32;
    let hd = g.hdr(key.0, key.1, op::RW, REPLY.len() as u32);
    g.send_raw(hd, REPLY);
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], REPLY);
}

#[test]
fn tx_payload_layouts() {
    // Header+payload in one descriptor (Linux >= 6.2), header and payload
    // apart, and a payload scattered over three descriptors.
    let mut g = Guest::new(&[], 4096);
    g.echo = false;
    let path = PathBuf::from(format!("{}_6000", g.uds.display()));
    let l = UnixListener::bind(&path).unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut v = vec![0u8; 30];
        s.read_exact(&mut v).unwrap();
        v
    });
    g.conns.insert((3000, 6000), GConn::default());
    g.send_op(3000, 6000, op::REQUEST, 0);
    g.run_until(10, |g| g.log.iter().any(|h| h.op == op::RESPONSE));
    let data = pattern(9, 30);
    // One descriptor.
    let hd = g.hdr(3000, 6000, op::RW, 10);
    let mut one = hd.to_bytes().to_vec();
    one.extend_from_slice(&data[..10]);
    let a = g.d.buf_with(&one);
    g.d.add_chain(TXQ as u16, &[Seg::ro(a, one.len() as u32)]);
    // Two descriptors.
    let hd = g.hdr(3000, 6000, op::RW, 10);
    let a = g.d.buf_with(&hd.to_bytes());
    let b = g.d.buf_with(&data[10..20]);
    g.d.add_chain(TXQ as u16, &[Seg::ro(a, HDR_SIZE as u32), Seg::ro(b, 10)]);
    // Scattered: 3 + 3 + 4 bytes.
    let hd = g.hdr(3000, 6000, op::RW, 10);
    let a = g.d.buf_with(&hd.to_bytes());
    let b1 = g.d.buf_with(&data[20..23]);
    let b2 = g.d.buf_with(&data[23..26]);
    let b3 = g.d.buf_with(&data[26..30]);
    g.d.add_chain(
        TXQ as u16,
        &[
            Seg::ro(a, HDR_SIZE as u32),
            Seg::ro(b1, 3),
            Seg::ro(b2, 3),
            Seg::ro(b3, 4),
        ],
    );
    g.d.notify(TXQ as u16);
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], data);
}

/// Event-loop wake-ups during `window`: the events the event manager
/// dispatched.
fn wakeups_in(g: &mut Guest, window: Duration) -> usize {
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < window {
        n += g.em.run_with_timeout(50).unwrap();
    }
    n
}

#[test]
fn split_connect_line_does_not_spin() {
    // Issue 11 item 6: a client that sent half a CONNECT line and waits
    // used to wake the level-triggered loop ~177,000 times in 500 ms.
    let mut g = Guest::new(&[], 4096);
    g.listen.push(99);
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    g.run_until(5, |g| g.dev.lock().unwrap().handshake_count() == 1);
    g.pump(10);
    let n = wakeups_in(&mut g, Duration::from_millis(500));
    assert!(n <= 100, "{n} event-loop wake-ups in 500 ms");
    assert_eq!(g.dev.lock().unwrap().handshake_count(), 1);
    // The rest of the line still connects, and the bytes after it are
    // payload.
    let h = std::thread::spawn(move || {
        s.write_all(b"ECT 99\nxyz").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut b = [0u8; 3];
        r.read_exact(&mut b).unwrap();
        (line, b)
    });
    let out = g.run_threads(20, vec![h]);
    assert!(out[0].0.starts_with("OK "), "{:?}", out[0].0);
    assert_eq!(&out[0].1, b"xyz");
}

#[test]
fn streams_answer_while_handshakes_are_pending() {
    // MAX_HANDSHAKES clients that never finish their CONNECT line neither
    // spin the loop nor keep real connections out: a port-listener stream
    // (varlink's path) and a hybrid client both get their echo.
    let mut g = Guest::new(&[1024], 4096);
    g.listen.push(1024);
    let mut idle = Vec::new();
    for i in 0..MAX_HANDSHAKES {
        let mut s = UnixStream::connect(&g.uds).unwrap();
        s.write_all(b"CONNECT 10").unwrap();
        idle.push(s);
        if i % 32 == 0 {
            g.pump(0);
        }
    }
    g.run_until(5, |g| {
        g.dev.lock().unwrap().handshake_count() == MAX_HANDSHAKES
    });
    let t = Instant::now();
    let n = wakeups_in(&mut g, Duration::from_millis(500));
    assert!(n <= 100, "{n} event-loop wake-ups in 500 ms");
    let path = g.port_path(1024);
    let uds = g.uds.clone();
    let a = std::thread::spawn(move || {
        let t = Instant::now();
        let got = echo_roundtrip(UnixStream::connect(&path).unwrap(), b"varlink\0");
        (got, t.elapsed())
    });
    let b = std::thread::spawn(move || {
        let t = Instant::now();
        let (s, line) = hybrid_connect(&uds, 1024);
        assert!(line.starts_with("OK "), "{line:?}");
        (echo_roundtrip(s, b"hybrid"), t.elapsed())
    });
    let out = g.run_threads(20, vec![a, b]);
    assert_eq!(out[0].0, b"varlink\0");
    assert_eq!(out[1].0, b"hybrid");
    for (_, took) in &out {
        assert!(
            *took < Duration::from_millis(500),
            "answered after {took:?}"
        );
    }
    // Still pending all along (the hybrid client took the oldest's place).
    assert!(t.elapsed() < CONN_TIMEOUT);
    assert!(g.dev.lock().unwrap().handshake_count() >= MAX_HANDSHAKES - 1);
    drop(idle);
}

#[test]
fn guest_half_close_keeps_the_other_direction() {
    // The guest sends SHUTDOWN(SEND): the host reads EOF and can still
    // write; the guest still receives. Through a port listener and through
    // the hybrid socket.
    for hybrid in [false, true] {
        let mut g = Guest::new(&[1024], 4096);
        g.listen.push(1024);
        g.echo = false;
        let path = g.port_path(1024);
        let uds = g.uds.clone();
        let h = std::thread::spawn(move || {
            let mut s = if hybrid {
                let (s, line) = hybrid_connect(&uds, 1024);
                assert!(line.starts_with("OK "), "{line:?}");
                s
            } else {
                UnixStream::connect(&path).unwrap()
            };
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).unwrap();
            s.write_all(b"after eof").unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            v
        });
        g.run_until(10, |g| g.conns.len() == 1);
        let key = *g.conns.keys().next().unwrap();
        g.conns.get_mut(&key).unwrap().tx_total = 5;
        let hd = g.hdr(key.0, key.1, op::RW, 5);
        g.send_raw(hd, b"reply");
        g.send_op(key.0, key.1, op::SHUTDOWN, SHUTDOWN_F_SEND);
        let out = g.run_threads(20, vec![h]);
        assert_eq!(out[0], b"reply", "hybrid={hybrid}");
        g.run_until(10, |g| g.conns[&key].got == b"after eof");
        // The host shut its side too: both directions are done, the
        // device says SHUTDOWN(both); the guest answers RST and the
        // connection is gone.
        g.run_until(10, |g| {
            g.log
                .iter()
                .any(|h| h.op == op::SHUTDOWN && h.flags == SHUTDOWN_F_BOTH)
        });
        g.send_op(key.0, key.1, op::RST, 0);
        g.run_until(10, |g| g.connections() == 0);
    }
}

#[test]
fn host_half_close_through_the_hybrid_socket() {
    // The host's shutdown(SHUT_WR) after CONNECT reaches the guest as
    // SHUTDOWN(SEND) alone; the echo guest's reply still comes back.
    let mut g = Guest::new(&[], 4096);
    g.listen.push(1024);
    let uds = g.uds.clone();
    let h = std::thread::spawn(move || {
        let (mut s, line) = hybrid_connect(&uds, 1024);
        assert!(line.starts_with("OK "), "{line:?}");
        s.write_all(b"request").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    let out = g.run_threads(20, vec![h]);
    assert_eq!(out[0], b"request");
    let shut: Vec<u32> = g
        .log
        .iter()
        .filter(|h| h.op == op::SHUTDOWN)
        .map(|h| h.flags)
        .collect();
    assert_eq!(shut.first(), Some(&SHUTDOWN_F_SEND), "{shut:?}");
}
