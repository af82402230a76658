//! Fuzz the virtio-blk request path: a hostile driver controls the
//! negotiated features, the descriptor table (direct and indirect), the
//! available ring and the buffer contents; the device must never panic or
//! touch memory outside the guest.
#![no_main]

#[path = "../common/input.rs"]
mod input;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use b2p_devices::virtio::block::{Block, BlockConfig};
use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::testing::{guest_memory, Arena, TestDriver};
use input::{DataArea, In};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 256 << 10;
const QSIZE: u16 = 16;
/// Buffers the fuzzer fills live here.
const DATA: u64 = 0x8000;
const DATA_LEN: usize = 0x2000;

fn image() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("b2p-fuzz-blk-{}.raw", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let mut inp = In(data);
    let mode = inp.u8();
    let read_only = mode & 1 != 0;
    let cfg = BlockConfig {
        path: image().clone(),
        read_only,
        serial: (mode & 2 != 0).then(|| "fuzz".to_string()),
    };
    let Ok(blk) = Block::new(cfg) else { return };
    let blk = Arc::new(Mutex::new(blk));
    let mem = guest_memory(MEM);
    let t = MmioTransport::new(mem.clone(), blk.clone()).unwrap();
    let mut d = TestDriver::new(mem.clone(), t, Arena::new(GuestAddress(0x1000), 0x6000));
    let features = u64::from(inp.u32()) << 32 | u64::from(inp.u32());
    if d.init(features, QSIZE).is_err() {
        return;
    }
    // Descriptors: small addresses land in the data area, others are raw.
    let area = DataArea {
        start: DATA,
        len: DATA_LEN,
        max_desc_len: 0x1000,
    };
    inp.descriptors(&mut d, 0, QSIZE, &area);
    let ring = inp.ring(QSIZE);
    // The rest fills the data area (headers, segment lists, indirect tables).
    let n = inp.0.len().min(DATA_LEN);
    mem.write_slice(&inp.0[..n], GuestAddress(DATA)).unwrap();
    for h in ring {
        d.publish(0, h);
    }
    if mode & 4 != 0 {
        d.set_used_event(0, u16::from(mode >> 4));
    }
    d.notify(0);
    blk.lock().unwrap().process_queue();
    let _ = d.used(0);
});
