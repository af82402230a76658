//! vsock throughput through the device, in-process: a host Unix-socket
//! client on a `--vsock-port` listener on one side, the test driver playing
//! the guest (RX/TX queues in guest memory, credit accounting) on the
//! other, the device between them behind the MMIO transport and the event
//! loop. Both directions, plus a plain Unix socket pair as the baseline.
//!
//! `cargo bench -p b2p-devices --bench vsock` (release). Env:
//! `B2P_VSOCK_BENCH_MIB` (default 512) bytes per run, `B2P_VSOCK_BENCH_RUNS`
//! (default 3).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::testing::{guest_memory, Arena, Seg, TestDriver};
use b2p_devices::virtio::vsock::packet::{Hdr, HDR_SIZE};
use b2p_devices::virtio::vsock::{
    op, Vsock, VsockConfig, MAX_PKT_PAYLOAD, QUEUE_SIZE, RXQ, TXQ, VSOCK_HOST_CID,
    VSOCK_TYPE_STREAM,
};
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const PORT: u32 = 1024;
const GUEST_BUF: u32 = 1 << 20;
const RX_SLOTS: usize = 128;
const TX_SLOTS: usize = 128;

type Em = EventManager<Arc<Mutex<Vsock>>>;

struct Guest {
    d: TestDriver,
    em: Em,
    rx_slots: Vec<(GuestAddress, GuestAddress)>,
    rx_buf: u32,
    rx_inflight: HashMap<u32, usize>,
    tx_free: Vec<GuestAddress>,
    tx_inflight: HashMap<u32, GuestAddress>,
    host_port: u32,
    rx_total: u32,
    announced: u32,
    tx_total: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Guest {
    fn new(dev: Vsock, rx_buf: u32) -> Guest {
        let mem = guest_memory(32 << 20);
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev);
        let mut d = TestDriver::new(
            mem,
            t,
            Arena::new(GuestAddress(0x1000), (32 << 20) - 0x1000),
        );
        d.init(0, QUEUE_SIZE).unwrap();
        em.run_with_timeout(0).unwrap();
        let mut g = Guest {
            d,
            em,
            rx_slots: Vec::new(),
            rx_buf,
            rx_inflight: HashMap::new(),
            tx_free: Vec::new(),
            tx_inflight: HashMap::new(),
            host_port: 0,
            rx_total: 0,
            announced: 0,
            tx_total: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        };
        for _ in 0..TX_SLOTS {
            let a = g.d.buf(HDR_SIZE + MAX_PKT_PAYLOAD as usize);
            g.tx_free.push(a);
        }
        for i in 0..RX_SLOTS {
            let h = g.d.buf(HDR_SIZE);
            let b = g.d.buf(rx_buf as usize);
            g.rx_slots.push((h, b));
            g.post_rx(i);
        }
        g.d.notify(RXQ as u16);
        g
    }

    fn post_rx(&mut self, i: usize) {
        let (h, b) = self.rx_slots[i];
        let head = self.d.add_chain(
            RXQ as u16,
            &[Seg::wo(h, HDR_SIZE as u32), Seg::wo(b, self.rx_buf)],
        );
        self.rx_inflight.insert(u32::from(head), i);
    }

    fn hdr(&mut self, op_: u16, len: u32) -> Hdr {
        self.announced = self.rx_total;
        Hdr {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: PORT,
            dst_port: self.host_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc: GUEST_BUF,
            fwd_cnt: self.rx_total,
        }
    }

    /// Send one packet whose payload (if any) is already in the slot.
    fn send(&mut self, h: Hdr) -> bool {
        if self.tx_free.is_empty() {
            for u in self.d.used(TXQ as u16) {
                if let Some(a) = self.tx_inflight.remove(&u.id) {
                    self.tx_free.push(a);
                }
            }
        }
        let Some(a) = self.tx_free.pop() else {
            return false;
        };
        self.d.mem.write_slice(&h.to_bytes(), a).unwrap();
        // Linux >= 6.2 style: header and payload in one descriptor.
        let head = self
            .d
            .add_chain(TXQ as u16, &[Seg::ro(a, HDR_SIZE as u32 + h.len)]);
        self.tx_inflight.insert(u32::from(head), a);
        true
    }

    /// Run the device once, take RX packets; returns payload bytes received.
    fn step(&mut self) -> usize {
        self.em.run_with_timeout(1).unwrap();
        let used = self.d.used(RXQ as u16);
        let slots: Vec<usize> = used
            .iter()
            .map(|u| self.rx_inflight.remove(&u.id).unwrap())
            .collect();
        let mut bytes = 0;
        let mut tx = false;
        for (u, slot) in used.iter().zip(slots) {
            let (h, _) = self.rx_slots[slot];
            let mut hb = [0u8; HDR_SIZE];
            self.d.mem.read_slice(&mut hb, h).unwrap();
            let hdr = Hdr::from_bytes(&hb);
            debug_assert_eq!(u.len as usize, HDR_SIZE + hdr.len as usize);
            self.peer_buf_alloc = hdr.buf_alloc;
            self.peer_fwd_cnt = hdr.fwd_cnt;
            match hdr.op {
                op::REQUEST => {
                    self.host_port = hdr.src_port;
                    let r = self.hdr(op::RESPONSE, 0);
                    tx |= self.send(r);
                }
                op::RW => {
                    bytes += hdr.len as usize;
                    self.rx_total = self.rx_total.wrapping_add(hdr.len);
                }
                op::CREDIT_REQUEST => {
                    let r = self.hdr(op::CREDIT_UPDATE, 0);
                    tx |= self.send(r);
                }
                _ => {}
            }
            self.post_rx(slot);
        }
        if !used.is_empty() {
            self.d.notify(RXQ as u16);
        }
        if self.rx_total.wrapping_sub(self.announced) >= GUEST_BUF / 4 {
            let r = self.hdr(op::CREDIT_UPDATE, 0);
            tx |= self.send(r);
        }
        if tx {
            self.d.notify(TXQ as u16);
        }
        bytes
    }

    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_total.wrapping_sub(self.peer_fwd_cnt))
    }
}

fn setup(dir: &std::path::Path, run: usize, rx_buf: u32) -> (Guest, UnixStream) {
    let path = dir.join(format!("p{run}.sock"));
    let dev = Vsock::new(
        VsockConfig {
            guest_cid: CID,
            uds_path: dir.join(format!("v{run}.sock")),
        },
        vec![(PORT, path.clone())],
    )
    .unwrap();
    let mut g = Guest::new(dev, rx_buf);
    let s = UnixStream::connect(&path).unwrap();
    while g.host_port == 0 {
        g.step();
    }
    // Let the RESPONSE reach the device.
    for _ in 0..3 {
        g.step();
    }
    (g, s)
}

fn host_to_guest(dir: &std::path::Path, run: usize, total: usize, rx_buf: u32) -> f64 {
    let (mut g, s) = setup(dir, run, rx_buf);
    let writer = std::thread::spawn(move || {
        let mut s = s;
        let buf = vec![0xa5u8; 256 * 1024];
        let mut n = 0;
        while n < total {
            let k = buf.len().min(total - n);
            s.write_all(&buf[..k]).unwrap();
            n += k;
        }
        s
    });
    let t = Instant::now();
    let mut got = 0;
    while got < total {
        got += g.step();
    }
    let dt = t.elapsed();
    drop(writer.join().unwrap());
    total as f64 / (1 << 20) as f64 / dt.as_secs_f64()
}

fn guest_to_host(dir: &std::path::Path, run: usize, total: usize) -> f64 {
    let (mut g, s) = setup(dir, run, 4096);
    // Payload bytes are written once into every TX slot.
    let pattern = vec![0x5au8; MAX_PKT_PAYLOAD as usize];
    for a in g.tx_free.clone() {
        g.d.mem
            .write_slice(&pattern, a.unchecked_add(HDR_SIZE as u64))
            .unwrap();
    }
    let reader = std::thread::spawn(move || {
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        while n < total {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0);
            n += k;
        }
    });
    let t = Instant::now();
    let mut sent = 0usize;
    while !reader.is_finished() {
        let mut any = false;
        while sent < total {
            let n = (total - sent)
                .min(MAX_PKT_PAYLOAD as usize)
                .min(g.peer_free() as usize) as u32;
            if n == 0 {
                break;
            }
            let h = g.hdr(op::RW, n);
            if !g.send(h) {
                break;
            }
            g.tx_total = g.tx_total.wrapping_add(n);
            sent += n as usize;
            any = true;
        }
        if any {
            g.d.notify(TXQ as u16);
        }
        g.step();
    }
    let dt = t.elapsed();
    reader.join().unwrap();
    total as f64 / (1 << 20) as f64 / dt.as_secs_f64()
}

fn unix_baseline(total: usize) -> f64 {
    let (a, b) = UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut b = b;
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        while n < total {
            n += b.read(&mut buf).unwrap();
        }
    });
    let t = Instant::now();
    let mut a = a;
    let buf = vec![0xa5u8; 256 * 1024];
    let mut n = 0;
    while n < total {
        let k = buf.len().min(total - n);
        a.write_all(&buf[..k]).unwrap();
        n += k;
    }
    reader.join().unwrap();
    total as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

use vm_memory::Address;

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "min {:8.1}  median {:8.1}  max {:8.1} MiB/s",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

fn main() {
    // `cargo test --benches` runs this binary with --bench absent: be quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: usize = std::env::var("B2P_VSOCK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 8 } else { 512 });
    let runs: usize = std::env::var("B2P_VSOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let total = mib << 20;
    let dir = tempfile::tempdir().unwrap();
    println!("vsock throughput, {mib} MiB per run, {runs} runs");
    for rx_buf in [64 * 1024, 4096] {
        let h2g: Vec<f64> = (0..runs)
            .map(|r| host_to_guest(dir.path(), r + rx_buf as usize, total, rx_buf))
            .collect();
        println!(
            "host -> guest, {:2} KiB RX buffers : {}",
            rx_buf / 1024,
            stats(h2g)
        );
    }
    let g2h: Vec<f64> = (0..runs)
        .map(|r| guest_to_host(dir.path(), 100 + r, total))
        .collect();
    println!("guest -> host, 64 KiB packets    : {}", stats(g2h));
    let base: Vec<f64> = (0..runs).map(|_| unix_baseline(total)).collect();
    println!("unix socket pair (baseline)     : {}", stats(base));
}
