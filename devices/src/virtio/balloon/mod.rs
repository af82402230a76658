//! virtio-balloon (virtio 1.2 §5.5) used for one job: giving the host back
//! the memory the guest has freed.
//!
//! The device never asks the guest to inflate (`num_pages` stays 0). It
//! offers VIRTIO_BALLOON_F_FREE_PAGE_REPORTING: the guest's free-page
//! reporting (Linux `page_reporting`) puts ranges of free guest memory on
//! the reporting queue, and [`release`] hands each one back to the host
//! (`madvise`) before the descriptor is returned. Pages the guest inflates
//! on its own are released the same way; deflated ones need nothing (the
//! next guest touch faults in a zeroed page). With VIRTIO_BALLOON_F_STATS_VQ
//! the guest's memory statistics are asked for every
//! [`BalloonConfig::stats_interval`] and logged (info level).
//!
//! [`device`] is the `VirtioDevice` (features, config space, queues),
//! [`release`] validates a guest range and gives it back according to how
//! the region is mapped, [`stats`] parses the statistics buffer, and
//! `event_handler` plugs the device into the event loop. Nothing here waits
//! on the guest: a driver that never answers a stats request just leaves
//! the last statistics in place.

pub mod device;
mod event_handler;
pub mod release;
pub mod stats;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use device::Balloon;
pub use release::{release_range, Backing, RangeError};
pub use stats::BalloonStats;

/// Virtio device id of the balloon.
pub const DEVICE_ID: u32 = 5;

/// Feature bits (virtio 1.2 §5.5.3).
pub const F_MUST_TELL_HOST: u32 = 0;
pub const F_STATS_VQ: u32 = 1;
pub const F_DEFLATE_ON_OOM: u32 = 2;
pub const F_FREE_PAGE_HINT: u32 = 3;
pub const F_PAGE_POISON: u32 = 4;
pub const F_PAGE_REPORTING: u32 = 5;

/// Queue indices with the features this device offers (STATS_VQ and
/// PAGE_REPORTING, not FREE_PAGE_HINT). A driver numbers only the queues of
/// the features it accepted (Linux's virtio-mmio `find_vqs` skips absent
/// ones without leaving a gap), so these hold when both are accepted; a
/// driver that declines STATS_VQ leaves queue 3 unset and the transport
/// refuses its DRIVER_OK (logged), since it asks every queue to be ready.
pub const INFLATEQ: usize = 0;
pub const DEFLATEQ: usize = 1;
pub const STATSQ: usize = 2;
pub const REPORTINGQ: usize = 3;
pub const NUM_QUEUES: usize = 4;

/// Queue size offered for each queue (Linux reports at most 32 ranges per
/// chain and inflates 256 pfns per buffer).
pub const QUEUE_SIZE: u16 = 128;

/// The unit of inflate/deflate page numbers and of reported ranges' alignment.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes of page numbers read from one inflate descriptor (Linux sends at
/// most 256 × 4 bytes; more is cut here and logged).
pub const MAX_PFN_BYTES: u32 = 4096;

/// What the VMM chooses about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// How often the guest's statistics are asked for; `None` = only the
    /// set the driver sends when it starts.
    pub stats_interval: Option<Duration>,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            stats_interval: Some(Duration::from_secs(30)),
        }
    }
}
