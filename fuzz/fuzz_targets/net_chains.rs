//! Fuzz virtio-net's data paths: a hostile driver controls the negotiated
//! features, both queues' descriptor tables and available rings, and the
//! buffer contents (TX headers and frames); the host side sends frames of
//! any length into RX. The device runs on a SOCK_SEQPACKET backend (no TAP,
//! no root) and must never panic or touch memory outside the guest.
#![no_main]

#[path = "../common/input.rs"]
mod input;

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::net::{Net, SeqPacketBackend, RXQ, TXQ};
use b2p_devices::virtio::testing::{guest_memory, Arena, TestDriver};
use input::{DataArea, In};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 256 << 10;
const QSIZE: u16 = 16;
/// Buffers the fuzzer fills live here.
const DATA: u64 = 0x10000;
const DATA_LEN: usize = 0x8000;

fuzz_target!(|data: &[u8]| {
    let mut inp = In(data);
    let Ok((backend, wire)) = SeqPacketBackend::pair() else {
        return;
    };
    let Ok(net) = Net::with_backend(Box::new(backend), Some([2, 0, 0, 0, 0, 1])) else {
        return;
    };
    let net = Arc::new(Mutex::new(net));
    let mem = guest_memory(MEM);
    let t = MmioTransport::new(mem.clone(), net.clone()).unwrap();
    let mut d = TestDriver::new(mem.clone(), t, Arena::new(GuestAddress(0x1000), 0xe000));
    let features = u64::from(inp.u32()) << 32 | u64::from(inp.u32());
    if d.init(features, QSIZE).is_err() {
        return;
    }
    let area = DataArea {
        start: DATA,
        len: DATA_LEN,
        max_desc_len: 0x2000,
    };
    for q in [RXQ as u16, TXQ as u16] {
        inp.descriptors(&mut d, q, QSIZE, &area);
    }
    let rings = [inp.ring(QSIZE), inp.ring(QSIZE)];
    // Frames from the host side: any length, a runt included.
    let frames = inp.u8() % 4;
    for _ in 0..frames {
        let len = usize::from(inp.u16()) % 70_000;
        let fill = inp.u8();
        let f = vec![fill; len];
        // SAFETY: f is readable for its length.
        unsafe { libc::send(wire.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    }
    let n = inp.0.len().min(DATA_LEN);
    mem.write_slice(&inp.0[..n], GuestAddress(DATA)).unwrap();
    for (q, ring) in rings.iter().enumerate() {
        for h in ring {
            d.publish(q as u16, *h);
        }
        d.notify(q as u16);
    }
    for _ in 0..2 {
        net.lock().unwrap().process_all();
        let _ = d.used(RXQ as u16);
        let _ = d.used(TXQ as u16);
    }
    // Drain what the guest sent.
    let mut buf = vec![0u8; 70_000];
    // SAFETY: buf is writable for its length.
    while unsafe {
        libc::recv(
            wire.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } > 0
    {}
});
