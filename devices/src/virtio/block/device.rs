//! The virtio-blk device: feature set, config space, activation and the
//! queue loop that turns available chains into completed requests.

use std::sync::Arc;

use log::{error, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::disk::{DiskImage, FdataSync, Syncer};
use super::request::{self, Completion, Context, Scratch};
use super::{
    BlockConfig, BlockError, DISCARD_SECTOR_ALIGNMENT, ID_BYTES, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX,
};
use crate::virtio::{
    device_type, read_config_window, ActivateContext, ActivateError, IrqLine, VirtioDevice,
};
use crate::GuestMemoryMmap;

/// Size of the config space we expose (through `write_zeroes_may_unmap`).
const CONFIG_SIZE: usize = 60;

/// State that exists only between activation and reset.
pub(crate) struct Active {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: Arc<IrqLine>,
    pub acked_features: u64,
}

/// A virtio-blk device on a raw image.
pub struct Block {
    pub(crate) disk: DiskImage,
    id: Option<[u8; ID_BYTES]>,
    avail_features: u64,
    config: [u8; CONFIG_SIZE],
    pub(crate) active: Option<Active>,
    /// Written on activation; the event loop then subscribes the queue.
    pub(crate) activate_evt: EventFd,
    /// The queue eventfd, kept across resets (the VMM registered it once).
    pub(crate) queue_evt: Option<EventFd>,
    pub(crate) queue_subscribed: bool,
    scratch: Scratch,
    /// (head, used length) of the chains processed in one pass.
    done: Vec<(u16, u32)>,
    /// Completed requests, for tests and metrics.
    pub(crate) completed: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Block {
    /// Open and lock the image; `fdatasync` serves FLUSH.
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        Self::with_syncer(cfg, Box::new(FdataSync))
    }

    /// Like [`Block::new`] with another flush implementation.
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
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if cfg.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let config = build_config(disk.sectors());
        Ok(Block {
            disk,
            id,
            avail_features,
            config,
            active: None,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            queue_evt: None,
            queue_subscribed: false,
            scratch: Scratch::default(),
            done: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            completed: 0,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// The image path.
    pub fn path(&self) -> &std::path::Path {
        self.disk.path()
    }

    /// Whether the device is activated.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The eventfd the event loop watches for activation.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Requests completed since creation.
    pub fn completed_requests(&self) -> u64 {
        self.completed
    }

    /// Drain the available ring; signal the driver if it asked for it.
    /// Called by the event loop on a queue notification (and usable
    /// directly by in-process tests and benches).
    pub fn process_queue(&mut self) {
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
                    warn!("virtio-blk: disable notification: {e}");
                    break;
                }
            }
            let done = &mut self.done;
            done.clear();
            let mut iter = match queue.iter(mem) {
                Ok(it) => it,
                Err(e) => {
                    // A bogus avail idx: stop here rather than spin.
                    warn!("virtio-blk: available ring: {e}");
                    break;
                }
            };
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
            }
            for &(head, len) in done.iter() {
                match queue.add_used(mem, head, len) {
                    Ok(()) => {
                        added = true;
                        self.completed += 1;
                    }
                    Err(e) => warn!("virtio-blk: add_used({head}): {e}"),
                }
            }
            if !event_idx {
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("virtio-blk: enable notification: {e}");
                    break;
                }
            }
        }
        if added {
            match queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = active.irq.signal_used_queue() {
                        error!("virtio-blk: interrupt: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => warn!("virtio-blk: needs_notification: {e}"),
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
    put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
    put(&mut c, 20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(&mut c, 34, &1u16.to_le_bytes()); // num_queues
    put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
    put(&mut c, 44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
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
        warn!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check(self.active.is_some(), 1)?;
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
        if self.queue_evt.is_none() {
            self.queue_evt = queue_evts.into_iter().next();
        }
        self.active = Some(Active {
            mem,
            queue,
            irq,
            acked_features,
        });
        self.activate_evt.write(1)?;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        true
    }
}
