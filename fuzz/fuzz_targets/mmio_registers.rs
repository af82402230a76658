//! Fuzz the virtio-mmio register file: arbitrary reads and writes of any
//! width at any offset (status machine, features, queue setup, notify,
//! config space, reset), interleaved with guest-memory pokes and device
//! queue processing, on virtio-blk and virtio-rng devices.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use b2p_devices::virtio::block::{Block, BlockConfig};
use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::rng::Rng;
use b2p_devices::virtio::VirtioDevice;
use b2p_devices::{BusDevice, GuestMemoryMmap};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 64 << 10;

fn image() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("b2p-fuzz-mmio-{}.raw", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 10).unwrap();
        p
    })
}

enum Dev {
    Blk(Arc<Mutex<Block>>),
    Rng(Arc<Mutex<Rng>>),
}

impl Dev {
    fn process(&self) {
        match self {
            Dev::Blk(b) => b.lock().unwrap().process_queue(),
            Dev::Rng(r) => r.lock().unwrap().process_queue(),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut ops)) = data.split_first() else {
        return;
    };
    let mem: GuestMemoryMmap = b2p_devices::virtio::testing::guest_memory(MEM);
    let (dev, dyn_dev): (Dev, Arc<Mutex<dyn VirtioDevice>>) = if sel & 1 == 0 {
        let cfg = BlockConfig {
            path: image().clone(),
            read_only: sel & 2 != 0,
            serial: None,
        };
        let Ok(b) = Block::new(cfg) else { return };
        let b = Arc::new(Mutex::new(b));
        (Dev::Blk(b.clone()), b)
    } else {
        let r = Arc::new(Mutex::new(Rng::new().unwrap()));
        (Dev::Rng(r.clone()), r)
    };
    let mut t = MmioTransport::new(mem.clone(), dyn_dev).unwrap();
    // Each op: kind(1) offset(2) value(4).
    while ops.len() >= 7 {
        let kind = ops[0];
        let off = u64::from(u16::from_le_bytes([ops[1], ops[2]])) % 0x200;
        let val = [ops[3], ops[4], ops[5], ops[6]];
        ops = &ops[7..];
        match kind % 8 {
            0..=2 => t.write(off & !3, &val),
            3 => {
                let len = [1usize, 2, 4, 8][usize::from(kind >> 3) % 4];
                let mut v = [0u8; 8];
                v[..4].copy_from_slice(&val);
                t.write(off, &v[..len]);
            }
            4 | 5 => {
                let len = [1usize, 2, 4, 8][usize::from(kind >> 3) % 4];
                let mut b = [0u8; 8];
                t.read(off, &mut b[..len]);
            }
            6 => {
                // Poke guest memory (rings, descriptors, buffers).
                let at = GuestAddress(
                    u64::from(u16::from_le_bytes([
                        ops.first().copied().unwrap_or(0),
                        kind,
                    ])) % MEM as u64,
                );
                let _ = mem.write_slice(&val, at);
            }
            _ => dev.process(),
        }
    }
    dev.process();
});
