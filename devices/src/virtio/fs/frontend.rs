//! The vhost-user session with a virtio-fs backend (rust-vmm's `vhost`
//! frontend): [`Session::new`] runs the handshake that needs no guest
//! (owner, features, protocol features); [`Session::start`] hands the
//! backend the memory table and the vrings once the driver set DRIVER_OK.
//! The socket carries a send and a receive timeout, so a backend that
//! stops answering costs at most [`REPLY_TIMEOUT`] per message
//! ([`HANDSHAKE_TIMEOUT`] during the handshake), never a hung monitor.

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::NUM_QUEUES;
use crate::GuestMemoryMmap;

/// The longest the monitor waits for one reply of the backend.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// The same during the handshake, when a virtiofsd just started may still
/// be setting itself up (its sandbox) on a loaded host.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit, never offered to the guest.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// The virtio features the monitor passes through from the backend.
const GUEST_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// Protocol features we use when the backend has them: multiqueue (so it
/// can say how many queues it serves) and replies to every message (so a
/// refused message is an error here, not silence).
const WANTED_PROTOCOL: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

/// A vhost-user failure, with the step it happened in.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{step}: {source}")]
    Protocol {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("the backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("the backend serves {0} queues, virtio-fs needs {NUM_QUEUES}")]
    TooFewQueues(u64),
    #[error("guest memory is not shareable (anonymous memory; the VM needs memfd-backed memory for vhost-user)")]
    MemoryNotShared,
    #[error("queue {0}: a ring address is outside guest memory")]
    RingOutsideMemory(usize),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Protocol { step, source }
}

/// One connected backend.
pub struct Session {
    frontend: Frontend,
    fd: RawFd,
    backend_features: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("fd", &self.fd)
            .field("backend_features", &self.backend_features)
            .finish()
    }
}

impl Session {
    /// Takes a connected socket, sets its timeouts and runs the handshake:
    /// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM.
    pub fn new(sock: UnixStream) -> Result<Self, FrontendError> {
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        // The same socket, to shorten the timeouts once the handshake is done.
        let ours = sock.try_clone()?;
        let fd = sock.as_raw_fd();
        let mut frontend = Frontend::from_stream(sock, NUM_QUEUES as u64);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FrontendError::NotModern);
        }
        if backend_features & PROTOCOL_FEATURES_BIT != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let acked = offered & WANTED_PROTOCOL;
            frontend
                .set_protocol_features(acked)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                if n < NUM_QUEUES as u64 {
                    return Err(FrontendError::TooFewQueues(n));
                }
            }
        }
        ours.set_read_timeout(Some(REPLY_TIMEOUT))?;
        ours.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Session {
            frontend,
            fd,
            backend_features,
        })
    }

    /// The socket (to watch for the backend hanging up).
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The virtio features to offer the guest.
    pub fn guest_features(&self) -> u64 {
        self.backend_features & GUEST_FEATURES
    }

    /// SET_FEATURES (the driver's, plus PROTOCOL_FEATURES when offered),
    /// SET_MEM_TABLE (every region of `mem`, each a file mapping), then for
    /// each queue NUM, ADDR (host addresses), BASE, CALL, KICK and ENABLE.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FrontendError> {
        let features =
            (acked_features & GUEST_FEATURES) | (self.backend_features & PROTOCOL_FEATURES_BIT);
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| FrontendError::MemoryNotShared)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        for (i, ((q, kick), call)) in queues.iter().zip(kicks).zip(calls).enumerate() {
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| FrontendError::RingOutsideMemory(i))
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, q.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, call)
                .map_err(step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, kick)
                .map_err(step("SET_VRING_KICK"))?;
            if self.backend_features & PROTOCOL_FEATURES_BIT != 0 {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}
