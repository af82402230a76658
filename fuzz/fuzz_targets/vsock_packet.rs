//! Fuzz virtio-vsock packet handling: a hostile driver sends packets with
//! any header (CIDs, ports, op, type, len, flags, credit fields), payloads
//! in any descriptor layout, raw descriptors and RX buffers of any shape,
//! while host clients connect (hybrid `CONNECT` lines, port listeners),
//! write and close, and a host listener takes guest connections. The
//! device must never panic or touch memory outside the guest.
#![no_main]

#[path = "../common/input.rs"]
mod input;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::testing::{guest_memory, Arena, RawDesc, Seg, TestDriver};
use b2p_devices::virtio::vsock::packet::{Hdr, HDR_SIZE};
use b2p_devices::virtio::vsock::{Vsock, VsockConfig, RXQ, TXQ};
use input::In;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Address, Bytes, GuestAddress};

const MEM: usize = 1 << 20;
const CID: u64 = 3;
const QSIZE: u16 = 64;
/// TX payload/header scratch area.
const TXAREA: u64 = 0x8_0000;
/// RX buffers.
const RXAREA: u64 = 0xa_0000;
const GUEST_PORT: u32 = 1234;

struct Env {
    dir: PathBuf,
    /// Takes guest-initiated connections to host port GUEST_PORT.
    host: UnixListener,
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("b2p-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host = UnixListener::bind(dir.join(format!("v.sock_{GUEST_PORT}"))).unwrap();
        host.set_nonblocking(true).unwrap();
        Env { dir, host }
    })
}

struct Guest {
    d: TestDriver,
    dev: Arc<Mutex<Vsock>>,
    /// Descriptors in flight per queue, by head.
    inflight: [HashMap<u32, usize>; 2],
}

impl Guest {
    fn room(&self, q: usize, n: usize) -> bool {
        self.inflight[q].values().sum::<usize>() + n <= usize::from(QSIZE) - 4
    }
    fn chain(&mut self, q: usize, segs: &[Seg]) {
        if self.room(q, segs.len()) {
            let head = self.d.add_chain(q as u16, segs);
            self.inflight[q].insert(u32::from(head), segs.len());
        }
    }
    fn run(&mut self) {
        self.dev.lock().unwrap().process_backend();
        for q in [RXQ, TXQ] {
            for u in self.d.used(q as u16) {
                self.inflight[q].remove(&u.id);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let mut inp = In(data);
    let uds = env.dir.join("v.sock");
    let port_path = env.dir.join("port.sock");
    let Ok(v) = Vsock::new(
        VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        },
        vec![(GUEST_PORT, port_path.clone())],
    ) else {
        return;
    };
    let dev = Arc::new(Mutex::new(v));
    let mem = guest_memory(MEM);
    let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    let mut d = TestDriver::new(mem, t, Arena::new(GuestAddress(0x1000), 0x7_0000));
    if d.init(0, QSIZE).is_err() {
        return;
    }
    let mut g = Guest {
        d,
        dev,
        inflight: [HashMap::new(), HashMap::new()],
    };
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut accepted: Vec<UnixStream> = Vec::new();
    let mut steps = 0;
    while !inp.0.is_empty() && steps < 64 {
        steps += 1;
        match inp.u8() % 7 {
            0 => {
                // A packet with a fuzzed header.
                let sel = inp.u8();
                let h = Hdr {
                    src_cid: if sel & 1 == 0 { CID } else { inp.u64() },
                    dst_cid: if sel & 2 == 0 { 2 } else { inp.u64() },
                    src_port: if sel & 4 == 0 {
                        1000 + u32::from(inp.u8() % 4)
                    } else {
                        inp.u32()
                    },
                    dst_port: match inp.u8() % 4 {
                        0 => GUEST_PORT,
                        1 => 1 << 30,
                        2 => (1 << 30) + 1,
                        _ => inp.u32(),
                    },
                    len: if sel & 8 == 0 {
                        u32::from(inp.u8())
                    } else {
                        inp.u32()
                    },
                    type_: if sel & 16 == 0 { 1 } else { inp.u16() },
                    op: u16::from(inp.u8() % 9),
                    flags: inp.u32(),
                    buf_alloc: if sel & 32 == 0 { 1 << 18 } else { inp.u32() },
                    fwd_cnt: inp.u32(),
                };
                let n = usize::from(inp.u8());
                let payload = inp.bytes(n).to_vec();
                let hdr_at = GuestAddress(TXAREA);
                let data_at = GuestAddress(TXAREA + 0x100);
                let _ = g.d.mem.write_slice(&h.to_bytes(), hdr_at);
                let _ = g.d.mem.write_slice(&payload, data_at);
                let plen = payload.len() as u32;
                match inp.u8() % 3 {
                    0 => g.chain(
                        TXQ,
                        &[Seg::ro(hdr_at, HDR_SIZE as u32), Seg::ro(data_at, plen)],
                    ),
                    1 => {
                        let _ =
                            g.d.mem
                                .write_slice(&payload, GuestAddress(TXAREA + HDR_SIZE as u64));
                        g.chain(TXQ, &[Seg::ro(hdr_at, HDR_SIZE as u32 + plen)])
                    }
                    _ => {
                        let half = plen / 2;
                        g.chain(
                            TXQ,
                            &[
                                Seg::ro(hdr_at, HDR_SIZE as u32),
                                Seg::ro(data_at, half),
                                Seg::ro(
                                    GuestAddress(TXAREA + 0x100 + u64::from(half)),
                                    plen - half,
                                ),
                            ],
                        )
                    }
                }
                g.d.notify(TXQ as u16);
            }
            1 => {
                // A raw descriptor published as is (either queue).
                let q = if inp.u8() & 1 == 0 { TXQ } else { RXQ };
                let raw = RawDesc {
                    addr: if inp.u8() & 1 == 0 {
                        TXAREA + u64::from(inp.u16())
                    } else {
                        inp.u64()
                    },
                    len: inp.u32(),
                    flags: inp.u16() & 7,
                    next: inp.u16() % (QSIZE + 2),
                };
                g.d.write_raw_desc(q as u16, QSIZE - 1, raw);
                g.d.publish(
                    q as u16,
                    if inp.u8() & 1 == 0 {
                        QSIZE - 1
                    } else {
                        inp.u16()
                    },
                );
                g.d.notify(q as u16);
            }
            2 => {
                // RX buffers of fuzzed shapes.
                let n = 1 + inp.u8() % 4;
                for i in 0..n {
                    let at = GuestAddress(RXAREA + u64::from(i) * 0x1_0000);
                    let kind = inp.u8();
                    let len = if kind & 1 == 0 {
                        4096
                    } else {
                        u32::from(inp.u16())
                    };
                    if kind & 2 == 0 {
                        g.chain(
                            RXQ,
                            &[
                                Seg::wo(at, HDR_SIZE as u32),
                                Seg::wo(at.unchecked_add(64), len),
                            ],
                        );
                    } else if kind & 4 == 0 {
                        g.chain(RXQ, &[Seg::wo(at, len)]);
                    } else {
                        g.chain(RXQ, &[Seg::ro(at, len), Seg::wo(at.unchecked_add(64), len)]);
                    }
                }
                g.d.notify(RXQ as u16);
            }
            3 => g.run(),
            4 => {
                // A host client: hybrid with a fuzzed line, or port listener.
                let kind = inp.u8();
                let path = if kind & 1 == 0 { &uds } else { &port_path };
                if let Ok(mut s) = UnixStream::connect(path) {
                    let _ = s.set_nonblocking(true);
                    if kind & 2 == 0 {
                        let _ = s.write_all(
                            format!("CONNECT {}\n", 1000 + u32::from(inp.u8() % 4)).as_bytes(),
                        );
                    }
                    let n = usize::from(inp.u8());
                    let _ = s.write(inp.bytes(n));
                    if clients.len() < 16 {
                        clients.push(s);
                    }
                }
            }
            5 => {
                // Host clients write more, or go away.
                let i = usize::from(inp.u8());
                let n = usize::from(inp.u8());
                let b = inp.bytes(n).to_vec();
                if !clients.is_empty() {
                    let i = i % clients.len();
                    if b.is_empty() {
                        clients.swap_remove(i);
                    } else {
                        let _ = clients[i].write(&b);
                    }
                }
            }
            _ => {
                // The host end of guest-initiated connections.
                while let Ok((s, _)) = env.host.accept() {
                    let _ = s.set_nonblocking(true);
                    accepted.push(s);
                }
                let n = usize::from(inp.u8());
                let b = inp.bytes(n).to_vec();
                if let Some(s) = accepted.last_mut() {
                    let _ = s.write(&b);
                }
                if inp.u8() & 1 == 1 {
                    accepted.pop();
                }
            }
        }
        g.run();
    }
    // Drop what the host listener queued so it never fills.
    while let Ok((s, _)) = env.host.accept() {
        drop(s);
    }
});
