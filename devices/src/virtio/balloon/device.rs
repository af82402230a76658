//! The balloon as a `VirtioDevice`: features, the 16-byte config space
//! (`num_pages` always 0, `actual` as the driver writes it), activation,
//! and the work of each queue. Runs on the event loop; every queue is
//! drained at once and nothing waits for the guest.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use crate::{error_limited, log_limited, warn_limited};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::timerfd::TimerFd;

use super::release::release_range;
use super::stats::{BalloonStats, ENTRY_SIZE, MAX_ENTRIES};
use super::{
    BalloonConfig, DEFLATEQ, DEVICE_ID, F_PAGE_REPORTING, F_STATS_VQ, INFLATEQ, MAX_PFN_BYTES,
    NUM_QUEUES, PAGE_SIZE, QUEUE_SIZE, REPORTINGQ, STATSQ,
};
use crate::virtio::lifecycle::Lifecycle;
use crate::virtio::{read_config_window, ActivateContext, ActivateError, IrqLine, VirtioDevice};
use crate::GuestMemoryMmap;

/// What the device has done so far (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes and ranges given back from the reporting queue.
    pub reported_bytes: u64,
    pub reported_ranges: u64,
    /// Bytes given back from the inflate queue.
    pub inflated_bytes: u64,
    /// Reported ranges or inflated page runs refused (nothing released).
    pub rejected: u64,
    /// Chains returned on each queue.
    pub chains: [u64; NUM_QUEUES],
}

pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queues: Vec<Queue>,
    pub(super) irq: Arc<IrqLine>,
    /// The stats buffer the device holds until it wants new statistics.
    stats_head: Option<u16>,
}

/// The balloon device.
pub struct Balloon {
    config: BalloonConfig,
    acked_features: u64,
    /// The driver's `actual` field (pages it holds in the balloon).
    actual: u32,
    pub(super) life: Lifecycle<Active>,
    pub(super) stats_timer: TimerFd,
    counters: Counters,
    stats: BalloonStats,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("active", &self.life.is_active())
            .field("counters", &self.counters)
            .finish()
    }
}

/// Which queue a chain came from, for the per-chain work.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Work {
    Inflate,
    Deflate,
    Report,
}

impl Balloon {
    pub fn new(config: BalloonConfig) -> std::io::Result<Self> {
        let stats_timer = TimerFd::new()?;
        // Non-blocking, so a read after a reset finds nothing and returns.
        let fd = stats_timer.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Balloon {
            config,
            acked_features: 0,
            actual: 0,
            life: Lifecycle::new("virtio-balloon")?,
            stats_timer,
            counters: Counters::default(),
            stats: BalloonStats::default(),
        })
    }

    pub fn is_active(&self) -> bool {
        self.life.is_active()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The guest's latest statistics (`updates == 0`: none yet).
    pub fn stats(&self) -> &BalloonStats {
        &self.stats
    }

    /// The `actual` the driver last wrote.
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    fn has(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Drain queue `q` (inflate, deflate or reporting).
    pub fn process_queue(&mut self, q: usize) {
        let work = match q {
            INFLATEQ => Work::Inflate,
            DEFLATEQ => Work::Deflate,
            REPORTINGQ if self.has(F_PAGE_REPORTING) => Work::Report,
            STATSQ if self.has(F_STATS_VQ) => return self.process_stats(),
            _ => return,
        };
        let Some(a) = self.life.active.as_mut() else {
            return;
        };
        let counters = &mut self.counters;
        let event_idx = a.queues[q].event_idx_enabled();
        let mut added = false;
        loop {
            if event_idx {
                let _ = a.queues[q].disable_notification(&a.mem);
            }
            while let Some(chain) = a.queues[q].pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                match work {
                    Work::Inflate => inflate_chain(&a.mem, chain, counters),
                    Work::Deflate => {}
                    Work::Report => report_chain(&a.mem, chain, counters),
                }
                counters.chains[q] += 1;
                match a.queues[q].add_used(&a.mem, head, 0) {
                    Ok(()) => added = true,
                    Err(e) => warn_limited!("virtio-balloon: queue {q}: add_used({head}): {e}"),
                }
            }
            if !event_idx || !matches!(a.queues[q].enable_notification(&a.mem), Ok(true)) {
                break;
            }
        }
        if added {
            signal(a, q);
        }
    }

    /// A new statistics buffer: read it, keep it until the next request.
    /// A second buffer while one is held returns the held one.
    fn process_stats(&mut self) {
        let Some(a) = self.life.active.as_mut() else {
            return;
        };
        let mut returned = false;
        while let Some(chain) = a.queues[STATSQ].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let buf = read_readable(&a.mem, chain, MAX_ENTRIES * ENTRY_SIZE);
            self.stats.update(&buf);
            log_limited!(
                log::Level::Info,
                "virtio-balloon: guest memory: {}",
                self.stats
            );
            if let Some(old) = a.stats_head.replace(head) {
                returned |= give_back(a, old);
                self.counters.chains[STATSQ] += 1;
            }
        }
        if a.queues[STATSQ].event_idx_enabled() {
            let _ = a.queues[STATSQ].enable_notification(&a.mem);
        }
        if returned {
            signal(a, STATSQ);
        }
    }

    /// The stats timer fired: return the held buffer, which asks the driver
    /// for fresh statistics. Nothing held (the driver has not answered the
    /// last request): nothing to do.
    pub fn request_stats(&mut self) {
        let Some(a) = self.life.active.as_mut() else {
            return;
        };
        if let Some(head) = a.stats_head.take() {
            self.counters.chains[STATSQ] += 1;
            if give_back(a, head) {
                signal(a, STATSQ);
            }
        }
    }

    fn arm_stats_timer(&mut self) {
        if let (true, Some(every)) = (self.has(F_STATS_VQ), self.config.stats_interval) {
            if let Err(e) = self.stats_timer.reset(every, Some(every)) {
                error_limited!("virtio-balloon: stats timer: {e}");
            }
        }
    }
}

/// Add `head` to the stats queue's used ring (length 0: nothing written).
fn give_back(a: &mut Active, head: u16) -> bool {
    match a.queues[STATSQ].add_used(&a.mem, head, 0) {
        Ok(()) => true,
        Err(e) => {
            warn_limited!("virtio-balloon: stats add_used({head}): {e}");
            false
        }
    }
}

fn signal(a: &mut Active, q: usize) {
    if a.queues[q].needs_notification(&a.mem).unwrap_or(true) {
        if let Err(e) = a.irq.signal_used_queue() {
            error_limited!("virtio-balloon: interrupt: {e}");
        }
    }
}

/// Up to `max` bytes of the chain's device-readable buffers.
fn read_readable(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    for d in chain {
        if d.is_write_only() {
            continue;
        }
        let want = (d.len() as usize).min(max - out.len());
        if want == 0 {
            break;
        }
        let at = out.len();
        out.resize(at + want, 0);
        if mem.read_slice(&mut out[at..], d.addr()).is_err() {
            warn_limited!("virtio-balloon: buffer outside guest memory");
            out.truncate(at);
            break;
        }
    }
    out
}

/// Each descriptor of a reporting chain is one free range (Linux makes
/// them device-writable; either direction is accepted).
fn report_chain(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, c: &mut Counters) {
    for d in chain {
        let (addr, len) = (d.addr().0, u64::from(d.len()));
        match release_range(mem, addr, len) {
            Ok(n) => {
                c.reported_bytes += n;
                c.reported_ranges += 1;
            }
            Err(e) => {
                c.rejected += 1;
                warn_limited!(
                    "virtio-balloon: reported range {addr:#x}+{len:#x} refused, nothing released: {e}"
                );
            }
        }
    }
}

/// An inflate buffer holds little-endian u32 page numbers (4 KiB pages);
/// runs of consecutive pages are released together.
fn inflate_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    c: &mut Counters,
) {
    let mut run: Option<(u64, u64)> = None; // (first pfn, count)
    let flush = |run: (u64, u64), c: &mut Counters| {
        let (addr, len) = (run.0 * PAGE_SIZE, run.1 * PAGE_SIZE);
        match release_range(mem, addr, len) {
            Ok(n) => c.inflated_bytes += n,
            Err(e) => {
                c.rejected += 1;
                warn_limited!(
                    "virtio-balloon: inflated pages {addr:#x}+{len:#x} refused, nothing released: {e}"
                );
            }
        }
    };
    for d in chain {
        if d.is_write_only() {
            continue;
        }
        if d.len() > MAX_PFN_BYTES {
            warn_limited!(
                "virtio-balloon: inflate buffer of {} bytes, only {MAX_PFN_BYTES} read",
                d.len()
            );
        }
        let n = d.len().min(MAX_PFN_BYTES) as usize / 4;
        let mut buf = vec![0u8; n * 4];
        if mem.read_slice(&mut buf, d.addr()).is_err() {
            warn_limited!("virtio-balloon: inflate buffer outside guest memory");
            continue;
        }
        for p in buf.chunks_exact(4) {
            let pfn = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
            run = match run {
                Some((first, count)) if first + count == pfn => Some((first, count + 1)),
                Some(r) => {
                    flush(r, c);
                    Some((pfn, 1))
                }
                None => Some((pfn, 1)),
            };
        }
    }
    if let Some(r) = run {
        flush(r, c);
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << F_STATS_VQ
            | 1 << F_PAGE_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages (0: never inflate), actual, free_page_hint_cmd_id, poison_val.
        let mut config = [0u8; 16];
        config[4..8].copy_from_slice(&self.actual.to_le_bytes());
        read_config_window(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut actual = self.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(at) = offset.checked_add(i as u64).and_then(|o| o.checked_sub(4)) {
                if let Some(slot) = actual.get_mut(at as usize) {
                    *slot = *b;
                }
            }
        }
        self.actual = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.life.begin(&mut ctx, NUM_QUEUES)?;
        self.acked_features = ctx.acked_features;
        self.arm_stats_timer();
        self.life.finish(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            irq: ctx.irq,
            stats_head: None,
        })
    }

    fn reset(&mut self) -> bool {
        self.life.reset();
        self.acked_features = 0;
        let _ = self.stats_timer.clear();
        true
    }
}
