//! The virtio-net device: features, config space and the two data paths.
//!
//! The features offered are VERSION_1, MAC, MRG_RXBUF and STATUS, plus the
//! offloads the backend honours (the TAP's checksum and TSO; none on passt).
//!
//! TX: each chain (12-byte `virtio_net_hdr_v1` + frame) is handed to the
//! backend with one `writev` straight from guest memory; the TAP applies the
//! header's checksum/GSO requests. A backend that can take nothing now
//! (`WouldBlock`: passt's socket and our queue behind it are full) gets the
//! chain back on the ring, and TX resumes when the backend's descriptor is
//! writable again. RX: a frame is read from the backend into a host buffer
//! only when the guest has at least one RX buffer, then copied into one
//! buffer (or, with MRG_RXBUF, as many as it needs, `num_buffers` set).
//! When the guest has no room, the frame waits and the backend is not
//! polled until the guest adds buffers.
//!
//! When the host end goes away for good (passt exited), the link goes down
//! (config `status`, a config-change interrupt, one log line), the backend
//! is no longer polled, and the guest's frames are completed as dropped.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::backend::NetBackend;
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::{
    random_mac, MacAddr, NetConfig, NetError, MAX_FRAME_LEN, QUEUE_SIZE, RXQ, TXQ, VNET_HDR_LEN,
};
use crate::virtio::iovec::{IoVecBuf, IoVecBufMut, IoVecStorage};
use crate::virtio::lifecycle::Lifecycle;
use crate::virtio::{
    device_type, read_config_window, ActivateContext, ActivateError, IrqLine, VirtioDevice,
};
use crate::{error_limited, warn_limited, GuestMemoryMmap};

/// Feature bits (virtio 1.2 §5.1.3).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// Config space `status`: the link is up.
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Most iovecs one TX frame may use.
const MAX_TX_IOVS: usize = 64;

/// Counters of the data paths.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
}

pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqLine>,
    pub acked: u64,
}

/// The net device. Build it with [`Net::new`], wrap it in an
/// `MmioTransport`, and register it with the event loop.
pub struct Net {
    /// The host end: the TAP in a VM.
    pub(super) tap: Box<dyn NetBackend>,
    mac: MacAddr,
    pub(super) life: Lifecycle<Active>,
    /// The frame read from the TAP and not yet given to the guest.
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// The guest has no RX buffer: the TAP is not polled.
    pub(super) rx_blocked: bool,
    /// What the event loop polls the backend for (`None`: not registered).
    pub(super) tap_events: Option<event_manager::EventSet>,
    /// The host end is gone (passt exited or hung up): link down for good.
    pub(super) link_lost: bool,
    stats: NetStats,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .field("active", &self.life.is_active())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Writable regions of an RX chain; `None` if it has a readable
/// descriptor or memory outside the guest.
fn rx_regions(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Option<Vec<(GuestAddress, usize)>> {
    let mut v = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), len) {
            return None;
        }
        v.push((d.addr(), len));
        total = total.saturating_add(len);
        if total >= MAX_FRAME_LEN {
            break;
        }
    }
    Some(v)
}

/// Copy `data` over `regions`; returns the bytes written.
fn write_regions(mem: &GuestMemoryMmap, regions: &[(GuestAddress, usize)], data: &[u8]) -> usize {
    let mut off = 0;
    for &(addr, len) in regions {
        if off >= data.len() {
            break;
        }
        let n = len.min(data.len() - off);
        if mem.write_slice(&data[off..off + n], addr).is_err() {
            break;
        }
        off += n;
    }
    off
}

impl Net {
    /// Attach to the existing TAP `cfg.tap` (an error if it does not exist,
    /// is not a TAP, or is attached elsewhere). The MAC defaults to a random
    /// locally administered address.
    pub fn new(cfg: NetConfig) -> Result<Net, NetError> {
        let tap = Tap::open(&cfg.tap)?;
        Net::with_backend(Box::new(tap), cfg.mac)
    }

    /// A device on any [`NetBackend`] (tests and fuzzing use a
    /// [`super::SeqPacketBackend`]).
    pub fn with_backend(tap: Box<dyn NetBackend>, mac: Option<MacAddr>) -> Result<Net, NetError> {
        Ok(Net {
            tap,
            mac: mac.unwrap_or_else(random_mac),
            life: Lifecycle::new("virtio-net")?,
            rx_frame: vec![0u8; MAX_FRAME_LEN],
            rx_len: 0,
            rx_blocked: false,
            tap_events: None,
            link_lost: false,
            stats: NetStats::default(),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn is_active(&self) -> bool {
        self.life.is_active()
    }

    /// Whether the link to the host is up (config space `status`).
    pub fn link_up(&self) -> bool {
        !self.link_lost && self.tap.link_up()
    }

    /// The host end is gone: say so once (unless the backend already did),
    /// tell the guest (config change), and stop polling the backend.
    pub(super) fn lose_link(&mut self, backend_said_so: bool) {
        if self.link_lost {
            return;
        }
        self.link_lost = true;
        if !backend_said_so {
            error_limited!(
                "virtio-net: {}: the host end hung up; link down",
                self.tap.name()
            );
        }
        if let Some(a) = self.life.active.as_ref() {
            if let Err(e) = a.irq.signal_config_change() {
                error_limited!("virtio-net: interrupt: {e}");
            }
        }
    }

    /// Notices a backend that went away by itself (its own log line).
    fn check_link(&mut self) {
        if !self.link_lost && !self.tap.link_up() {
            self.lose_link(true);
        }
    }

    /// Send the guest's frames to the TAP. Returns whether any chain was used.
    pub fn process_tx(&mut self) -> bool {
        let Some(a) = self.life.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(TXQ) else {
            return false;
        };
        let mut added = false;
        let mut storage = IoVecStorage::with_capacity(MAX_TX_IOVS);
        while let Some(chain) = q.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            // The frame, header included, at most MAX_FRAME_LEN bytes.
            let mut iovs = IoVecBuf::with_storage(storage, MAX_FRAME_LEN as u64);
            let mut ok = true;
            for d in chain {
                if d.is_write_only()
                    || iovs.push_guest(&a.mem, d.addr(), d.len() as usize).is_err()
                    || iovs.as_raw().len() > MAX_TX_IOVS
                {
                    ok = false;
                    break;
                }
            }
            let total = iovs.len() as usize;
            if self.link_lost || !self.tap.link_up() {
                // Nobody to send to: completed, dropped.
                self.stats.tx_dropped += 1;
            } else if ok && total >= VNET_HDR_LEN {
                match self.tap.writev(&iovs) {
                    Ok(_) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += (total - VNET_HDR_LEN) as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The backend is full: the chain goes back on the
                        // ring; TX resumes once it drains (EPOLLOUT).
                        drop(iovs);
                        q.go_to_previous_position();
                        break;
                    }
                    Err(e) => {
                        if self.tap.link_up() {
                            warn_limited!("virtio-net: {} write: {e}", self.tap.name());
                        }
                        self.stats.tx_dropped += 1;
                    }
                }
            } else {
                warn_limited!("virtio-net: malformed TX chain dropped");
                self.stats.tx_dropped += 1;
            }
            storage = iovs.into_storage();
            if let Err(e) = q.add_used(&a.mem, head, 0) {
                warn_limited!("virtio-net: tx add_used({head}): {e}");
                break;
            }
            added = true;
        }
        self.check_link();
        added
    }

    fn rx_has_buffer(&self) -> bool {
        let Some(a) = self.life.active.as_ref() else {
            return false;
        };
        let Some(q) = a.queues.get(RXQ) else {
            return false;
        };
        match q.avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            Err(_) => false,
        }
    }

    /// Move frames from the TAP to the guest while it has buffers.
    /// Returns whether any chain was used.
    pub fn process_rx(&mut self) -> bool {
        self.rx_blocked = false;
        let mut added = false;
        loop {
            if self.life.active.is_none() {
                break;
            }
            if self.rx_len == 0 {
                if !self.rx_has_buffer() {
                    self.rx_blocked = true;
                    break;
                }
                let mut iov = IoVecBufMut::new(MAX_FRAME_LEN as u64);
                if iov.push_slice(&mut self.rx_frame).is_err() {
                    break;
                }
                match self.tap.readv(&mut iov) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if self.tap.link_up() {
                            error_limited!("virtio-net: {} read: {e}", self.tap.name());
                        }
                        self.check_link();
                        break;
                    }
                }
            }
            match self.deliver_frame() {
                Some(used) => {
                    added |= used;
                    self.rx_len = 0;
                }
                None => {
                    self.rx_blocked = true;
                    break;
                }
            }
        }
        added
    }

    /// Give the pending frame to the guest. `None`: not enough buffers
    /// (nothing consumed); `Some(used)`: the frame is gone (delivered, or
    /// dropped because the guest's buffers are unusable).
    fn deliver_frame(&mut self) -> Option<bool> {
        let a = self.life.active.as_mut()?;
        let q = a.queues.get_mut(RXQ)?;
        let mergeable = a.acked & features::MRG_RXBUF != 0;
        let len = self.rx_len;
        let mut chains: Vec<(u16, Vec<(GuestAddress, usize)>)> = Vec::new();
        let mut room = 0usize;
        let mut bad = false;
        while room < len {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                // Not enough buffers: put back what we took.
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                return None;
            };
            let head = chain.head_index();
            let Some(regions) = rx_regions(&a.mem, chain) else {
                // An unusable buffer: the frame is dropped and every buffer
                // taken so far goes back empty (progress, no retry loop).
                bad = true;
                chains.push((head, Vec::new()));
                break;
            };
            room += regions.iter().map(|r| r.1).sum::<usize>();
            chains.push((head, regions));
            if !mergeable || chains.len() >= usize::from(u16::MAX) {
                break;
            }
        }
        let frame = &mut self.rx_frame[..len];
        let delivered = !bad && room >= len;
        // num_buffers (the last field of virtio_net_hdr_v1).
        let n = (chains.len() as u16).to_le_bytes();
        frame[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&n);
        let mut off = 0;
        for (head, regions) in &chains {
            let used = if delivered && off < len {
                let w = write_regions(&a.mem, regions, &frame[off..]);
                off += w;
                w
            } else {
                0
            };
            if let Err(e) = q.add_used(&a.mem, *head, used as u32) {
                warn_limited!("virtio-net: rx add_used({head}): {e}");
            }
        }
        if delivered && off == len {
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
        } else {
            // A single buffer too small without MRG_RXBUF, or a bad chain.
            self.stats.rx_dropped += 1;
        }
        Some(!chains.is_empty())
    }

    /// Run both paths and interrupt the guest once if anything was used.
    pub fn process_all(&mut self) {
        if !self.link_lost && self.tap.tx_pending() {
            // What a short write left over goes first (in order).
            if let Err(e) = self.tap.flush() {
                if self.tap.link_up() {
                    warn_limited!("virtio-net: {} write: {e}", self.tap.name());
                }
                self.check_link();
            }
        }
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            if let Some(a) = self.life.active.as_ref() {
                if let Err(e) = a.irq.signal_used_queue() {
                    error_limited!("virtio-net: interrupt: {e}");
                }
            }
        }
    }

    fn tun_offloads(acked: u64) -> u32 {
        let mut f = 0;
        if acked & features::GUEST_CSUM != 0 {
            f |= TUN_F_CSUM;
            if acked & features::GUEST_TSO4 != 0 {
                f |= TUN_F_TSO4;
            }
            if acked & features::GUEST_TSO6 != 0 {
                f |= TUN_F_TSO6;
            }
        }
        f
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        use features::*;
        1 << VIRTIO_F_VERSION_1 | MAC | MRG_RXBUF | STATUS | self.tap.offload_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; ... }
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        cfg[6..8].copy_from_slice(&status.to_le_bytes());
        read_config_window(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only once VERSION_1 is negotiated.
        warn_limited!(
            "virtio-net: guest wrote {} bytes of config at {offset:#x}; ignored",
            data.len()
        );
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.life.begin(&mut ctx, 2)?;
        self.tap
            .set_offload(Self::tun_offloads(ctx.acked_features))
            .map_err(|e| ActivateError::Backend(io::Error::other(e.to_string())))?;
        self.rx_len = 0;
        self.rx_blocked = false;
        self.life.finish(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            irq: ctx.irq,
            acked: ctx.acked_features,
        })
    }

    fn reset(&mut self) -> bool {
        self.life.reset();
        self.rx_len = 0;
        if let Err(e) = self.tap.set_offload(0) {
            warn_limited!("virtio-net: {e}");
        }
        true
    }
}
