//! virtio-blk throughput, in-process: requests go through the MMIO
//! transport, the queue eventfd and the disk's worker thread into a real
//! file (the driver waits on the interrupt eventfd, as a guest would), against
//! plain pread/pwrite of the same sizes and offsets on the same file. Run: `cargo bench -p b2p-devices --bench blk`
//! (env B2P_BENCH_DIR picks the directory of the image, default the temp dir;
//! B2P_BENCH_ONLY=TEXT runs only the workloads whose name contains TEXT).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use b2p_devices::virtio::block::{req_status, req_type, Block, BlockConfig};
use b2p_devices::virtio::mmio::MmioTransport;
use b2p_devices::virtio::testing::{guest_memory, Arena, Seg, TestDriver};
use vm_memory::{Bytes, GuestAddress};

const FILE_SIZE: u64 = 256 << 20;
const QUEUE_DEPTH: usize = 32;

struct Dev {
    d: TestDriver,
    _blk: Arc<Mutex<Block>>,
    hdrs: Vec<GuestAddress>,
    bufs: Vec<GuestAddress>,
    stats: Vec<GuestAddress>,
}

impl Dev {
    fn new(path: &std::path::Path, req: usize) -> Dev {
        let mem = guest_memory(QUEUE_DEPTH * req + (8 << 20));
        let blk = Block::new(BlockConfig {
            path: path.to_owned(),
            read_only: false,
            serial: None,
        })
        .unwrap();
        let blk = Arc::new(Mutex::new(blk));
        let t = MmioTransport::new(mem.clone(), blk.clone()).unwrap();
        let size = (QUEUE_DEPTH * req + (7 << 20)) as u64;
        let mut d = TestDriver::new(mem, t, Arena::new(GuestAddress(0x10000), size));
        d.init(1 << 9 | 1 << 29, 256).unwrap(); // FLUSH, EVENT_IDX
        let mut hdrs = Vec::new();
        let mut bufs = Vec::new();
        let mut stats = Vec::new();
        for _ in 0..QUEUE_DEPTH {
            hdrs.push(d.buf(16));
            bufs.push(d.arena.alloc(req as u64, 4096));
            stats.push(d.buf(1));
        }
        Dev {
            d,
            _blk: blk,
            hdrs,
            bufs,
            stats,
        }
    }

    /// Run `offsets` as requests of `req` bytes, QUEUE_DEPTH at a time.
    fn run(&mut self, write: bool, offsets: &[u64], req: usize) {
        for batch in offsets.chunks(QUEUE_DEPTH) {
            for (i, off) in batch.iter().enumerate() {
                let mut h = [0u8; 16];
                let t = if write { req_type::OUT } else { req_type::IN };
                h[0..4].copy_from_slice(&t.to_le_bytes());
                h[8..16].copy_from_slice(&(off / 512).to_le_bytes());
                self.d.mem.write_slice(&h, self.hdrs[i]).unwrap();
                let data = if write {
                    Seg::ro(self.bufs[i], req as u32)
                } else {
                    Seg::wo(self.bufs[i], req as u32)
                };
                self.d.add_chain(
                    0,
                    &[Seg::ro(self.hdrs[i], 16), data, Seg::wo(self.stats[i], 1)],
                );
            }
            // Interrupt after the whole batch (EVENT_IDX), like a busy driver.
            let last = self.d.used_idx(0).wrapping_add(batch.len() as u16 - 1);
            self.d.set_used_event(0, last);
            self.d.notify(0);
            let mut got = 0;
            let irq = self.d.transport.irq();
            while got < batch.len() {
                wait_readable(irq.irq_evt().as_raw_fd());
                let _ = irq.irq_evt().read();
                got += self.d.used(0).len();
            }
            for s in &self.stats[..batch.len()] {
                let st: u8 = self.d.mem.read_obj(*s).unwrap();
                assert_eq!(st, req_status::OK);
            }
        }
    }
}

/// Blocks until `fd` is readable (the interrupt), at most a second.
fn wait_readable(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass.
    unsafe { libc::poll(&mut p, 1, 1000) };
}

/// The baseline: one pread/pwrite per request, rotating over as many
/// buffers as the device has requests in flight (same cache footprint).
fn plain(file: &File, write: bool, offsets: &[u64], bufs: &mut [Vec<u8>]) {
    for (i, off) in offsets.iter().enumerate() {
        let buf = &mut bufs[i % bufs.len()];
        if write {
            file.write_all_at(buf, *off).unwrap();
        } else {
            file.read_exact_at(buf, *off).unwrap();
        }
    }
}

/// xorshift: reproducible random offsets.
fn random_offsets(n: usize, req: u64) -> Vec<u64> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let slots = FILE_SIZE / req;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % slots) * req
        })
        .collect()
}

/// Alternate the two runs `rounds` times (so page-cache and writeback state
/// hit both alike) and keep the best time of each.
fn best_of_pair(rounds: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    let (mut ta, mut tb) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        ta = ta.min(time(&mut a));
        tb = tb.min(time(&mut b));
    }
    (ta, tb)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: stay quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir_in(
        std::env::var_os("B2P_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let path = dir.path().join("bench.raw");
    {
        // A fully allocated image, in the page cache.
        let f = File::create(&path).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..FILE_SIZE >> 20 {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    let rounds = if quick { 1 } else { 5 };
    println!(
        "virtio-blk in-process vs pread/pwrite, {} MiB image, queue depth {QUEUE_DEPTH}, best of {rounds}",
        FILE_SIZE >> 20
    );
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "workload", "device MB/s", "device IOPS", "plain MB/s", "plain IOPS", "ratio"
    );
    let cases: [(&str, usize, bool, bool); 4] = [
        ("seq read 128 KiB", 128 << 10, false, false),
        ("seq write 128 KiB", 128 << 10, true, false),
        ("rand read 4 KiB", 4096, false, true),
        ("rand write 4 KiB", 4096, true, true),
    ];
    // B2P_BENCH_ONLY=text runs the workloads whose name contains it (profiling).
    let only = std::env::var("B2P_BENCH_ONLY").unwrap_or_default();
    for (name, req, write, random) in cases {
        if !name.contains(only.as_str()) {
            continue;
        }
        let n = if random {
            if quick {
                2_000
            } else {
                50_000
            }
        } else if quick {
            64
        } else {
            (FILE_SIZE / req as u64) as usize
        };
        let offsets: Vec<u64> = if random {
            random_offsets(n, req as u64)
        } else {
            (0..n as u64).map(|i| i * req as u64).collect()
        };
        let bytes = (n * req) as f64;
        let mut dev = Dev::new(&path, req);
        // The device holds the image lock; the baseline opens the file
        // without taking one.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut bufs = vec![vec![0xa5u8; req]; QUEUE_DEPTH];
        let (td, tp) = best_of_pair(
            rounds,
            || dev.run(write, &offsets, req),
            || plain(&file, write, &offsets, &mut bufs),
        );
        let mbs = |t: Duration| bytes / t.as_secs_f64() / 1e6;
        let iops = |t: Duration| n as f64 / t.as_secs_f64();
        println!(
            "{:<22} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>7.2}",
            name,
            mbs(td),
            iops(td),
            mbs(tp),
            iops(tp),
            tp.as_secs_f64() / td.as_secs_f64()
        );
    }
}
