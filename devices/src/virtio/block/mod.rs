//! virtio-blk on a raw image file (virtio 1.2 §5.2).
//!
//! The split follows Firecracker: [`disk`] owns the image (open, positional
//! I/O, flush, discard) and [`lock`] its QEMU-compatible locks, [`request`]
//! parses one descriptor chain into a request and executes it against the
//! disk, [`device`] is the `VirtioDevice` (features, config space,
//! activation, the queue loop), `worker` the thread per disk that runs the
//! queue loop and so every disk syscall, off the event loop, and
//! [`event_handler`] plugs the device into the event loop.

pub mod device;
pub mod disk;
pub mod event_handler;
pub mod lock;
pub mod request;
mod worker;

use std::path::PathBuf;

pub use device::Block;
pub use disk::{FdataSync, Syncer};

/// Sector size of the virtio-blk protocol (sector numbers are in 512-byte units).
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the header and the status take two more).
/// Half the queue, so a descriptor loop (which the ring walker cuts at the
/// queue size) is always longer than any legal request.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 / 2 - 2;
/// Largest data segment the driver may use (VIRTIO_BLK_F_SIZE_MAX): with
/// SEG_MAX it bounds what one request moves.
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data bytes one IN/OUT request may move (SEG_MAX segments of
/// SIZE_MAX, 126 MiB; a Linux driver stays within it). A chain that
/// describes more gets IOERR: its descriptors alone could name 128 × 4 GiB.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// DISCARD limits advertised in the config space (hole punching is a
/// metadata operation, cheap whatever the length).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
pub const MAX_DISCARD_SEG: u32 = 32;
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// WRITE_ZEROES limits: one segment (as QEMU advertises) of at most 64 MiB,
/// so a filesystem without FALLOC_FL_ZERO_RANGE, where the zeros are written
/// by hand, costs at most 64 MiB of writes per request.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17;
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;

/// Request types.
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values.
pub mod req_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// What the VMM asks for: one `--disk PATH[,ro][,serial=S]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Answer to GET_ID (at most 20 bytes are used); None answers UNSUPP.
    pub serial: Option<String>,
}

/// Why a block device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by another VM (it is locked{mode})")]
    InUse { path: PathBuf, mode: &'static str },
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot size disk image {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("starting the disk's I/O thread: {0}")]
    Worker(std::io::Error),
}
