//! The virtio-blk device: feature set, config space, activation, and the
//! queue loop ([`Engine`]) that turns available chains into completed
//! requests. The loop runs on the disk's worker thread (`super::worker`);
//! [`Block::process_queue`] runs one pass on the calling thread (tests,
//! benches, fuzzing).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::disk::{DiskImage, FdataSync, Syncer};
use super::request::{self, Completion, Context, Scratch};
use super::worker::Worker;
use super::{
    BlockConfig, BlockError, DISCARD_SECTOR_ALIGNMENT, ID_BYTES, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SIZE,
    SEG_MAX, SIZE_MAX,
};
use crate::virtio::{
    device_type, read_config_window, ActivateContext, ActivateError, IrqLine, VirtioDevice,
};
use crate::{error_limited, warn_limited, GuestMemoryMmap};

/// Size of the config space we expose (through `write_zeroes_may_unmap`).
const CONFIG_SIZE: usize = 60;

/// State that exists only between activation and reset.
pub(crate) struct Active {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: Arc<IrqLine>,
    pub acked_features: u64,
}

/// Everything the queue loop touches; owned by the worker's mutex.
pub(crate) struct Engine {
    disk: DiskImage,
    id: Option<[u8; ID_BYTES]>,
    pub(crate) active: Option<Active>,
    scratch: Scratch,
    /// (head, used length) of the chains processed in one pass.
    done: Vec<(u16, u32)>,
    /// Completed requests, for tests and metrics.
    completed: u64,
}

/// Names the worker threads `b2p-blk0`, `b2p-blk1`, ...
static DISK_NO: AtomicU32 = AtomicU32::new(0);

/// A virtio-blk device on a raw image.
pub struct Block {
    worker: Worker,
    path: PathBuf,
    sectors: u64,
    avail_features: u64,
    config: [u8; CONFIG_SIZE],
    active: bool,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.path)
            .field("sectors", &self.sectors)
            .field("active", &self.active)
            .finish()
    }
}

impl Block {
    /// Open and lock the image and start its worker thread; `fdatasync`
    /// serves FLUSH.
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        Self::with_syncer(cfg, Box::new(FdataSync))
    }

    /// Like [`Block::new`] with another flush implementation (tests use a
    /// slow or observing one).
    pub fn with_syncer(cfg: BlockConfig, syncer: Box<dyn Syncer>) -> Result<Block, BlockError> {
        let id = match &cfg.serial {
            None => None,
            Some(s) if s.len() > ID_BYTES => return Err(BlockError::SerialTooLong(s.clone())),
            Some(s) => {
                let mut id = [0u8; ID_BYTES];
                id[..s.len()].copy_from_slice(s.as_bytes());
                Some(id)
            }
        };
        let disk = DiskImage::open(&cfg.path, cfg.read_only, syncer)?;
        let mut avail_features = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if cfg.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let sectors = disk.sectors();
        let config = build_config(sectors);
        let engine = Engine {
            disk,
            id,
            active: None,
            scratch: Scratch::default(),
            done: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            completed: 0,
        };
        let name = format!("b2p-blk{}", DISK_NO.fetch_add(1, Ordering::Relaxed));
        let worker = Worker::spawn(name, engine).map_err(BlockError::Worker)?;
        Ok(Block {
            worker,
            path: cfg.path,
            sectors,
            avail_features,
            config,
            active: false,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.sectors
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the device is activated.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Requests completed since creation.
    pub fn completed_requests(&self) -> u64 {
        self.worker.shared.engine().completed
    }

    /// One pass over the available ring on the calling thread, as the
    /// worker makes on each notification (for in-process tests, benches and
    /// fuzzing, which want it synchronous).
    pub fn process_queue(&mut self) {
        self.worker
            .shared
            .engine()
            .process_queue(&AtomicBool::new(false));
    }

    /// Waits until the worker has served every chain published before this
    /// call (tests: the device is asynchronous). False after `timeout`.
    pub fn sync(&self, timeout: Duration) -> bool {
        self.worker.sync(timeout)
    }
}

impl Engine {
    /// Drain the available ring; signal the driver if it asked for it.
    /// Stops early, after the request in flight, once `yield_now` is set.
    pub(crate) fn process_queue(&mut self, yield_now: &AtomicBool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queue;
        let event_idx = queue.event_idx_enabled();
        let mut added = false;
        loop {
            if event_idx {
                if let Err(e) = queue.disable_notification(mem) {
                    warn_limited!("virtio-blk: disable notification: {e}");
                    break;
                }
            }
            let done = &mut self.done;
            done.clear();
            let mut iter = match queue.iter(mem) {
                Ok(it) => it,
                Err(e) => {
                    // A bogus avail idx: stop here rather than spin.
                    warn_limited!("virtio-blk: available ring: {e}");
                    break;
                }
            };
            let mut cut = false;
            for chain in iter.by_ref() {
                let head = chain.head_index();
                let mut ctx = Context {
                    mem,
                    disk: &mut self.disk,
                    acked_features: active.acked_features,
                    id: self.id.as_ref(),
                    scratch: &mut self.scratch,
                };
                let Completion { used_len, .. } = request::process(&mut ctx, chain);
                done.push((head, used_len));
                if yield_now.load(Ordering::Relaxed) {
                    cut = true;
                    break;
                }
            }
            for &(head, len) in done.iter() {
                match queue.add_used(mem, head, len) {
                    Ok(()) => {
                        added = true;
                        self.completed += 1;
                    }
                    Err(e) => warn_limited!("virtio-blk: add_used({head}): {e}"),
                }
            }
            if !event_idx || cut {
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn_limited!("virtio-blk: enable notification: {e}");
                    break;
                }
            }
        }
        if added {
            match queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = active.irq.signal_used_queue() {
                        error_limited!("virtio-blk: interrupt: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => warn_limited!("virtio-blk: needs_notification: {e}"),
            }
        }
    }
}

fn put(cfg: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = cfg.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap`.
fn build_config(sectors: u64) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    put(&mut c, 0, &sectors.to_le_bytes()); // capacity
    put(&mut c, 8, &SIZE_MAX.to_le_bytes()); // size_max
    put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
    put(&mut c, 20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(&mut c, 34, &1u16.to_le_bytes()); // num_queues
    put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
    put(&mut c, 44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(&mut c, 48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(&mut c, 52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The block config space is read-only (no CONFIG_WCE).
        warn_limited!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check(self.active, 1)?;
        let ActivateContext {
            mem,
            acked_features,
            mut queues,
            queue_evts,
            irq,
        } = ctx;
        let Some(queue) = queues.pop() else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        let shared = &self.worker.shared;
        if let Some(evt) = queue_evts.into_iter().next() {
            // The first activation's eventfd is kept (the VMM registered it once).
            let _ = shared.queue_evt.set(evt);
        }
        shared.engine().active = Some(Active {
            mem,
            queue,
            irq,
            acked_features,
        });
        self.active = true;
        // Notifications may have arrived before the worker was watching.
        self.worker.kick();
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Waits for the request in flight, if any, then the worker is idle.
        let shared = &self.worker.shared;
        shared.yield_now.store(true, Ordering::Relaxed);
        shared.engine().active = None;
        shared.yield_now.store(false, Ordering::Relaxed);
        self.active = false;
        true
    }
}
