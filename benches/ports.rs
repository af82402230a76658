//! A published port's throughput, in-process: bytes from a host TCP client
//! through the real forwarder (`b2p __forward-ports`, src/ports.rs, under
//! its seccomp filter) into the virtio-vsock device's hybrid socket, echoed
//! by the guest and back out, against the same echo over a plain vsock
//! stream (the host connecting to the hybrid socket itself). The device
//! runs behind the MMIO transport and the event loop; the guest is the
//! in-process test driver emulating the agent's side: it answers the
//! forwarder's `io.b2p.Machine.WatchPorts` with one published port, takes
//! the relay's `TCP <port>\n` line on vsock port 1026 and echoes, as the
//! agent's relay would through a container's server (no Linux, no Podman:
//! this measures the host side and the device, not the guest's TCP stack).
//!
//! `cargo bench --bench ports` (release). Env: `B2P_PORTS_BENCH_MIB`
//! (default 256 per run), `B2P_PORTS_BENCH_RUNS` (default 3).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
use vm_memory::{Address, Bytes, GuestAddress};

const CID: u64 = 3;
const VARLINK: u32 = 1024;
const RELAY: u32 = 1026;
/// The plain stream's echo port.
const ECHO: u32 = 1027;
const GUEST_BUF: u32 = 1 << 20;
const RX_BUF: u32 = 64 << 10;
const SLOTS: usize = 128;

type Em = EventManager<Arc<Mutex<Vsock>>>;

/// One stream, seen from the guest.
#[derive(Default)]
struct Conn {
    guest_port: u32,
    /// The relay's request line is still to come (port 1026).
    want_line: bool,
    /// Bytes of the varlink call so far (port 1024).
    call: Vec<u8>,
    /// Received, not yet echoed.
    out: VecDeque<u8>,
    rx_total: u32,
    announced: u32,
    tx_total: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Conn {
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_total.wrapping_sub(self.peer_fwd_cnt))
    }
}

struct Guest {
    d: TestDriver,
    em: Em,
    rx_slots: Vec<(GuestAddress, GuestAddress)>,
    rx_inflight: HashMap<u32, usize>,
    tx_free: Vec<GuestAddress>,
    tx_inflight: HashMap<u32, GuestAddress>,
    /// By the host's port.
    conns: HashMap<u32, Conn>,
    /// The port the WatchPorts answer publishes.
    published: u16,
}

impl Guest {
    fn new(dev: Vsock, published: u16) -> Guest {
        let size = 32 << 20;
        let mem = guest_memory(size);
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev);
        let mut d = TestDriver::new(
            mem,
            t,
            Arena::new(GuestAddress(0x1000), size as u64 - 0x1000),
        );
        d.init(0, QUEUE_SIZE).unwrap();
        em.run_with_timeout(0).unwrap();
        let mut g = Guest {
            d,
            em,
            rx_slots: Vec::new(),
            rx_inflight: HashMap::new(),
            tx_free: Vec::new(),
            tx_inflight: HashMap::new(),
            conns: HashMap::new(),
            published,
        };
        for _ in 0..SLOTS {
            let a = g.d.buf(HDR_SIZE + MAX_PKT_PAYLOAD as usize);
            g.tx_free.push(a);
            let h = g.d.buf(HDR_SIZE);
            let b = g.d.buf(RX_BUF as usize);
            g.rx_slots.push((h, b));
        }
        for i in 0..SLOTS {
            g.post_rx(i);
        }
        g.d.notify(RXQ as u16);
        g
    }

    fn post_rx(&mut self, i: usize) {
        let (h, b) = self.rx_slots[i];
        let head = self.d.add_chain(
            RXQ as u16,
            &[Seg::wo(h, HDR_SIZE as u32), Seg::wo(b, RX_BUF)],
        );
        self.rx_inflight.insert(u32::from(head), i);
    }

    fn hdr(c: &mut Conn, host_port: u32, op_: u16, len: u32) -> Hdr {
        c.announced = c.rx_total;
        Hdr {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: c.guest_port,
            dst_port: host_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc: GUEST_BUF,
            fwd_cnt: c.rx_total,
        }
    }

    /// Queues one packet; false when every TX slot is in flight.
    fn send(&mut self, h: Hdr, payload: &[u8]) -> bool {
        if self.tx_free.is_empty() {
            self.reclaim();
        }
        let Some(a) = self.tx_free.pop() else {
            return false;
        };
        self.d.mem.write_slice(&h.to_bytes(), a).unwrap();
        self.d
            .mem
            .write_slice(payload, a.unchecked_add(HDR_SIZE as u64))
            .unwrap();
        let head = self
            .d
            .add_chain(TXQ as u16, &[Seg::ro(a, HDR_SIZE as u32 + h.len)]);
        self.tx_inflight.insert(u32::from(head), a);
        true
    }

    fn control(&mut self, host_port: u32, op_: u16) -> bool {
        let Some(mut c) = self.conns.remove(&host_port) else {
            return false;
        };
        let h = Self::hdr(&mut c, host_port, op_, 0);
        let sent = self.send(h, &[]);
        self.conns.insert(host_port, c);
        sent
    }

    /// What a connection received.
    fn take(&mut self, host_port: u32, data: &[u8]) {
        let published = self.published;
        let Some(c) = self.conns.get_mut(&host_port) else {
            return;
        };
        c.rx_total = c.rx_total.wrapping_add(data.len() as u32);
        let mut data = data;
        if c.guest_port == VARLINK {
            c.call.extend_from_slice(data);
            if c.call.contains(&0) {
                c.call.clear();
                let mut reply = format!(
                    "{{\"parameters\":{{\"ports\":[{{\"protocol\":\"tcp\",\"host_ip\":\"\",\
                     \"host_port\":{published},\"container_port\":80,\"container\":\"bench\"}}]}},\
                     \"continues\":true}}"
                )
                .into_bytes();
                reply.push(0);
                c.out.extend(reply);
            }
            return;
        }
        while c.want_line && !data.is_empty() {
            c.want_line = data[0] != b'\n';
            data = &data[1..];
        }
        c.out.extend(data);
    }

    /// Takes back the TX slots the device is done with.
    fn reclaim(&mut self) {
        for u in self.d.used(TXQ as u16) {
            if let Some(a) = self.tx_inflight.remove(&u.id) {
                self.tx_free.push(a);
            }
        }
    }

    /// Sends what each connection has to echo, as far as credit and slots go.
    fn flush(&mut self) -> bool {
        let mut any = false;
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        let mut chunk = vec![0u8; MAX_PKT_PAYLOAD as usize];
        for p in ports {
            while let Some(c) = self.conns.get(&p) {
                let n = c
                    .out
                    .len()
                    .min(MAX_PKT_PAYLOAD as usize)
                    .min(c.peer_free() as usize);
                if n == 0 {
                    break;
                }
                if self.tx_free.is_empty() {
                    self.reclaim();
                    if self.tx_free.is_empty() {
                        return any;
                    }
                }
                let Some(mut c) = self.conns.remove(&p) else {
                    break;
                };
                for (i, b) in c.out.drain(..n).enumerate() {
                    chunk[i] = b;
                }
                let h = Self::hdr(&mut c, p, op::RW, n as u32);
                let sent = self.send(h, &chunk[..n]);
                debug_assert!(sent);
                c.tx_total = c.tx_total.wrapping_add(n as u32);
                self.conns.insert(p, c);
                any = true;
            }
        }
        any
    }

    /// Runs the device once and answers what came.
    fn step(&mut self) {
        self.em.run_with_timeout(1).unwrap();
        let used = self.d.used(RXQ as u16);
        let mut tx = false;
        let mut buf = vec![0u8; RX_BUF as usize];
        let mut freed = Vec::with_capacity(used.len());
        for u in &used {
            let Some(slot) = self.rx_inflight.remove(&u.id) else {
                continue;
            };
            freed.push(slot);
            let (h, b) = self.rx_slots[slot];
            let mut hb = [0u8; HDR_SIZE];
            self.d.mem.read_slice(&mut hb, h).unwrap();
            let hdr = Hdr::from_bytes(&hb);
            let host_port = hdr.src_port;
            if let Some(c) = self.conns.get_mut(&host_port) {
                c.peer_buf_alloc = hdr.buf_alloc;
                c.peer_fwd_cnt = hdr.fwd_cnt;
            }
            match hdr.op {
                op::REQUEST => {
                    let c = Conn {
                        guest_port: hdr.dst_port,
                        want_line: hdr.dst_port == RELAY,
                        peer_buf_alloc: hdr.buf_alloc,
                        peer_fwd_cnt: hdr.fwd_cnt,
                        ..Conn::default()
                    };
                    self.conns.insert(host_port, c);
                    tx |= self.control(host_port, op::RESPONSE);
                }
                op::RW => {
                    let n = (hdr.len as usize).min(buf.len());
                    self.d.mem.read_slice(&mut buf[..n], b).unwrap();
                    self.take(host_port, &buf[..n]);
                }
                op::CREDIT_REQUEST => tx |= self.control(host_port, op::CREDIT_UPDATE),
                op::SHUTDOWN | op::RST => {
                    if hdr.op == op::SHUTDOWN {
                        tx |= self.control(host_port, op::RST);
                    }
                    self.conns.remove(&host_port);
                }
                _ => {}
            }
        }
        // Posted again only once all of this batch is taken back (a new
        // chain may get the id of one not yet taken back).
        for s in freed {
            self.post_rx(s);
        }
        if !used.is_empty() {
            self.d.notify(RXQ as u16);
        }
        let late: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.rx_total.wrapping_sub(c.announced) >= GUEST_BUF / 4)
            .map(|(p, _)| *p)
            .collect();
        for p in late {
            tx |= self.control(p, op::CREDIT_UPDATE);
        }
        tx |= self.flush();
        if tx {
            self.d.notify(TXQ as u16);
        }
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `CONNECT port` on the hybrid socket, the `OK` line read.
fn hybrid(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut b = [0u8; 1];
    let mut line = Vec::new();
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    s
}

/// Writes `total` bytes on one thread, reads them back on another; MiB/s.
fn echo<S: Read + Write + Send + 'static>(w: S, r: S, total: usize) -> f64 {
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut w = w;
        let buf = vec![0xa5u8; 256 << 10];
        let mut n = 0;
        while n < total {
            let k = buf.len().min(total - n);
            w.write_all(&buf[..k]).unwrap();
            n += k;
        }
        w
    });
    let mut r = r;
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0;
    while n < total {
        let k = r.read(&mut buf).unwrap();
        assert!(k > 0, "the echo ended after {n} of {total} bytes");
        n += k;
    }
    let dt = t.elapsed();
    drop(writer.join().unwrap());
    total as f64 / (1 << 20) as f64 / dt.as_secs_f64()
}

/// Steps the guest until `client` is done; its result.
fn drive(g: &mut Guest, client: std::thread::JoinHandle<f64>) -> f64 {
    while !client.is_finished() {
        g.step();
    }
    client.join().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn plain(dir: &Path, run: usize, total: usize) -> f64 {
    let uds = dir.join(format!("p{run}.sock"));
    let dev = Vsock::new(
        VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        },
        vec![],
    )
    .unwrap();
    let mut g = Guest::new(dev, 0);
    let client = std::thread::spawn(move || {
        let s = hybrid(&uds, ECHO);
        echo(s.try_clone().unwrap(), s, total)
    });
    drive(&mut g, client)
}

fn forwarded(dir: &Path, run: usize, total: usize) -> f64 {
    let uds: PathBuf = dir.join(format!("f{run}.sock"));
    let dev = Vsock::new(
        VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        },
        vec![],
    )
    .unwrap();
    let port = free_port();
    let mut g = Guest::new(dev, port);
    let fwd = Kill(
        Command::new(env!("CARGO_BIN_EXE_b2p"))
            .arg("__forward-ports")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting b2p __forward-ports"),
    );
    let client = std::thread::spawn(move || {
        let t = Instant::now();
        let s = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(30) => {
                    panic!("the forwarder never listened on {port}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let _ = s.set_nodelay(true);
        echo(s.try_clone().unwrap(), s, total)
    });
    let r = drive(&mut g, client);
    drop(fwd);
    r
}

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
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("B2P_PORTS_BENCH_MIB", if quick { 4 } else { 256 });
    let runs = env("B2P_PORTS_BENCH_RUNS", if quick { 1 } else { 3 });
    let total = mib << 20;
    let dir = std::env::temp_dir().join(format!("b2p-ports-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("echo host -> guest -> host, {mib} MiB per run, {runs} runs, interleaved");
    let (mut p, mut f) = (Vec::new(), Vec::new());
    for r in 0..runs {
        p.push(plain(&dir, r, total));
        f.push(forwarded(&dir, r, total));
    }
    println!("plain vsock stream (hybrid socket)  : {}", stats(p));
    println!("published port (TCP + forwarder)   : {}", stats(f));
    let _ = std::fs::remove_dir_all(&dir);
}
