//! The virtio-vsock device: config space (the guest CID), the three queues
//! and the moving of packets between them and the [`Muxer`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::{error_limited, warn_limited};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::muxer::Muxer;
use super::packet::{parse_tx, RxBuffer};
use super::{
    VsockConfig, VsockError, EVQ, QUEUE_SIZE, RXQ, TXQ, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
};
use crate::virtio::lifecycle::Lifecycle;
use crate::virtio::{
    device_type, read_config_window, ActivateContext, ActivateError, IrqLine, VirtioDevice,
};
use crate::GuestMemoryMmap;

pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqLine>,
}

/// The vsock device. Build it with [`Vsock::new`], wrap it in an
/// `MmioTransport`, and register it with the event loop.
pub struct Vsock {
    cfg: VsockConfig,
    pub(super) muxer: Muxer,
    pub(super) life: Lifecycle<Active>,
    /// TX processing paused because the RX backlog is full.
    tx_stalled: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cfg", &self.cfg)
            .field("active", &self.life.is_active())
            .field("connections", &self.muxer.connection_count())
            .finish()
    }
}

impl Vsock {
    /// Build the device and bind its host sockets now, so a bad path is an
    /// error at start-up, not when the guest first connects.
    ///
    /// - `cfg.guest_cid`: 3 ..= 4294967294.
    /// - `cfg.uds_path`: the hybrid (Firecracker) socket; guest connections
    ///   to host port P go to `<uds_path>_<P>`.
    /// - `port_listeners`: `(guest_port, path)`; the device listens on each
    ///   path and joins every accepted connection to `guest_port`, without
    ///   a handshake (`--vsock-port PORT=PATH`).
    ///
    /// A path a live listener owns is refused ("socket path X is in use");
    /// a stale socket file is replaced; the files are removed on drop.
    pub fn new(cfg: VsockConfig, port_listeners: Vec<(u32, PathBuf)>) -> Result<Vsock, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cfg.guest_cid));
        }
        let muxer = Muxer::new(cfg.guest_cid, &cfg.uds_path, &port_listeners)?;
        Ok(Vsock {
            cfg,
            muxer,
            life: Lifecycle::new("vsock")?,
            tx_stalled: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.cfg.guest_cid
    }

    pub fn is_active(&self) -> bool {
        self.life.is_active()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Pending `CONNECT` handshakes on the hybrid socket.
    pub fn handshake_count(&self) -> usize {
        self.muxer.handshake_count()
    }

    /// Move host-bound packets from the TX queue to the muxer. Returns
    /// whether used entries were added.
    pub fn process_tx(&mut self) -> bool {
        let Some(a) = self.life.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(TXQ) else {
            return false;
        };
        let mut added = false;
        self.tx_stalled = false;
        loop {
            if self.muxer.tx_blocked() {
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            match parse_tx(&a.mem, chain) {
                Ok(pkt) => self.muxer.send_pkt(&pkt),
                Err(e) => warn_limited!("vsock: tx: {e}"),
            }
            if let Err(e) = q.add_used(&a.mem, head, 0) {
                warn_limited!("vsock: tx add_used({head}): {e}");
                break;
            }
            added = true;
        }
        added
    }

    /// Fill RX buffers with what the muxer owes the guest. Returns whether
    /// used entries were added.
    pub fn process_rx(&mut self) -> bool {
        let Some(a) = self.life.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(RXQ) else {
            return false;
        };
        let mut added = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let used_len = match RxBuffer::from_chain(&a.mem, chain) {
                Ok(mut buf) => match self.muxer.recv_pkt(buf.data()) {
                    Some(hdr) => match buf.finish(&hdr) {
                        Ok(n) => n,
                        Err(e) => {
                            warn_limited!("vsock: rx header: {e}");
                            0
                        }
                    },
                    None => {
                        // Nothing could be produced after all: keep the buffer.
                        q.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    warn_limited!("vsock: rx buffer dropped: {e}");
                    0
                }
            };
            if let Err(e) = q.add_used(&a.mem, head, used_len) {
                warn_limited!("vsock: rx add_used({head}): {e}");
                break;
            }
            added = true;
        }
        added
    }

    /// Run both directions until neither makes progress, then interrupt
    /// the guest once if anything was used.
    pub fn process_all(&mut self) {
        let mut any = false;
        loop {
            let tx = self.process_tx();
            let rx = self.process_rx();
            any |= tx | rx;
            if !(rx && self.tx_stalled) {
                break;
            }
        }
        if any {
            self.signal_used();
        }
    }

    /// Host-side readiness: let the muxer handle it, then move packets.
    pub fn process_backend(&mut self) {
        self.muxer.process_events();
        self.process_all();
    }

    fn signal_used(&self) {
        if let Some(a) = self.life.active.as_ref() {
            if let Err(e) = a.irq.signal_used_queue() {
                error_limited!("vsock: interrupt: {e}");
            }
        }
    }

    /// Post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (e.g.
    /// after a restore); `false` if the driver left no event buffer.
    pub fn send_transport_reset(&mut self) -> bool {
        let Some(a) = self.life.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(EVQ) else {
            return false;
        };
        let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut len = 0;
        if let Some(d) = chain.clone().find(|d| d.is_write_only() && d.len() >= 4) {
            if a.mem
                .write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le(), d.addr())
                .is_ok()
            {
                len = 4;
            }
        }
        let ok = q.add_used(&a.mem, head, len).is_ok();
        if ok {
            self.signal_used();
        }
        ok && len == 4
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.cfg.guest_cid.to_le_bytes();
        read_config_window(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn_limited!(
            "vsock: guest wrote {} bytes of read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.life.begin(&mut ctx, 3)?;
        self.life.finish(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            irq: ctx.irq,
        })
    }

    fn reset(&mut self) -> bool {
        // Every connection goes: host clients see their socket close.
        self.muxer.reset();
        self.life.reset();
        self.tx_stalled = false;
        true
    }
}
