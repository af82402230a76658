//! The virtio-fs device on the MMIO transport, its queues served by a
//! vhost-user backend. The transport's DRIVER_OK reaches [`Fs::activate`]
//! on a vCPU thread, which only stores the queues and wakes the event
//! loop; the event loop then starts the backend's vrings (vhost-user
//! messages are socket I/O with a timeout, kept off the vCPUs). The
//! backend signals one call eventfd per queue; the event loop relays each
//! to the interrupt line, which sets InterruptStatus' used-buffer bit and
//! writes the irqfd. A hang-up of the backend's socket (or a failed
//! message) is logged once and switches the device to
//! [`fallback`](super::fallback): the monitor watches the queues itself
//! and fails every request with EIO.

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, info};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::frontend::{FrontendError, Session};
use super::{config_space, fallback, NUM_QUEUES, QUEUE_SIZE, TAG_LEN};
use crate::virtio::lifecycle::Lifecycle;
use crate::virtio::{
    device_type, read_config_window, ActivateContext, ActivateError, IrqLine, VirtioDevice,
};
use crate::{error_limited, warn_limited, GuestMemoryMmap};

/// What DRIVER_OK handed over.
struct Active {
    mem: GuestMemoryMmap,
    acked_features: u64,
    queues: Vec<Queue>,
    irq: Arc<IrqLine>,
    /// The backend has the vrings.
    started: bool,
}

/// A virtio-fs device.
pub struct Fs {
    tag: String,
    config: [u8; TAG_LEN + 4],
    session: Option<Session>,
    avail_features: u64,
    /// The backend signals queue `i`'s used buffers on `calls[i]`.
    calls: Vec<EventFd>,
    /// Activation and the queue eventfds; the backend, not this event
    /// loop, watches those until it is gone.
    life: Lifecycle<Active>,
    /// The backend is gone: the monitor fails requests itself.
    backend_gone: bool,
    /// Requests failed since the backend went.
    failed_requests: u64,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("active", &self.life.is_active())
            .field("backend_gone", &self.backend_gone)
            .finish()
    }
}

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Tag(#[from] super::TagError),
    #[error("vhost-user handshake with the backend: {0}")]
    Handshake(#[from] FrontendError),
    #[error("eventfd: {0}")]
    EventFd(#[from] std::io::Error),
}

/// What one readiness check of the socket found.
enum SocketState {
    Open,
    Gone(String),
}

fn socket_state(fd: RawFd) -> SocketState {
    let mut b = [0u8; 1];
    // SAFETY: recv into a 1-byte buffer we own; MSG_PEEK leaves the data.
    let r = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match r {
        0 => SocketState::Gone("it closed the socket".into()),
        n if n > 0 => SocketState::Gone("it sent a message nobody asked for".into()),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                    SocketState::Open
                }
                _ => SocketState::Gone(e.to_string()),
            }
        }
    }
}

impl Fs {
    /// A device named `tag` on the backend at the other end of `sock`
    /// (connected); runs the vhost-user handshake now.
    pub fn new(tag: &str, sock: UnixStream) -> Result<Self, FsError> {
        super::check_tag(tag)?;
        let session = Session::new(sock)?;
        let mut calls = Vec::with_capacity(NUM_QUEUES);
        for _ in 0..NUM_QUEUES {
            calls.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(Fs {
            tag: tag.to_string(),
            config: config_space(tag),
            avail_features: session.guest_features(),
            session: Some(session),
            calls,
            life: Lifecycle::new("virtio-fs")?,
            backend_gone: false,
            failed_requests: 0,
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The backend is gone and the monitor answers requests itself.
    pub fn backend_gone(&self) -> bool {
        self.backend_gone
    }

    /// Requests answered with EIO since the backend went.
    pub fn failed_requests(&self) -> u64 {
        self.failed_requests
    }

    /// Whether the backend has the vrings.
    pub fn is_started(&self) -> bool {
        self.life.active.as_ref().is_some_and(|a| a.started)
    }

    fn start_backend(&mut self, ops: &mut EventOps) {
        let (Some(a), Some(s)) = (self.life.active.as_ref(), self.session.as_mut()) else {
            return;
        };
        if a.started {
            return;
        }
        let queue_evts = self.life.queue_evts();
        match s.start(&a.mem, a.acked_features, &a.queues, queue_evts, &self.calls) {
            Ok(()) => {
                if let Some(a) = self.life.active.as_mut() {
                    a.started = true;
                }
                info!("virtio-fs {}: the backend serves the queues", self.tag);
            }
            Err(e) => self.backend_lost(ops, &format!("starting its queues: {e}")),
        }
    }

    /// Logs once, drops the session, and takes the queues over.
    fn backend_lost(&mut self, ops: &mut EventOps, why: &str) {
        if !self.backend_gone {
            error!(
                "virtio-fs {}: the vhost-user backend is gone ({why}); requests on this folder now fail with EIO",
                self.tag
            );
            self.backend_gone = true;
        }
        if let Some(s) = self.session.take() {
            let _ = ops.remove(Events::new_raw(s.fd(), EventSet::IN));
        }
        self.take_over(ops);
    }

    /// With the backend gone and the driver ready: watch the queues here.
    fn take_over(&mut self, ops: &mut EventOps) {
        let no_queues = self.life.queue_evts().is_empty();
        let Some(a) = self.life.active.as_mut() else {
            return;
        };
        if !self.backend_gone || no_queues && a.queues.is_empty() {
            return;
        }
        for q in a.queues.iter_mut() {
            fallback::take_over(&a.mem, q);
        }
        a.started = false;
        self.life.subscribe_queues(ops);
        self.fail_requests();
    }

    /// Fallback: answer everything pending with EIO.
    fn fail_requests(&mut self) {
        let Some(a) = self.life.active.as_mut() else {
            return;
        };
        let mut added = false;
        for q in a.queues.iter_mut() {
            let before = q.next_used();
            added |= fallback::drain(&a.mem, q);
            self.failed_requests += u64::from(q.next_used().wrapping_sub(before));
        }
        // Also for what the backend completed just before it went.
        let _ = added;
        if let Err(e) = a.irq.signal_used_queue() {
            error_limited!("virtio-fs: interrupt: {e}");
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        warn_limited!("virtio-fs: the config space is read-only");
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.life.begin(&mut ctx, NUM_QUEUES)?;
        self.life.finish(Active {
            mem: ctx.mem,
            acked_features: ctx.acked_features,
            queues: ctx.queues,
            irq: ctx.irq,
            started: false,
        })
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        self.life.watch_activate(ops);
        let mut fds: Vec<RawFd> = Vec::new();
        fds.extend(self.calls.iter().map(|c| c.as_raw_fd()));
        fds.extend(self.session.as_ref().map(|s| s.fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!("virtio-fs {}: cannot watch fd {fd}: {e:?}", self.tag);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.life.activate_evt().as_raw_fd() {
            self.life.ack_activate();
            if self.backend_gone {
                self.take_over(ops);
            } else {
                self.start_backend(ops);
            }
            return;
        }
        if let Some(i) = self.calls.iter().position(|c| c.as_raw_fd() == fd) {
            let _ = self.calls[i].read();
            if let Some(a) = self.life.active.as_ref() {
                if let Err(e) = a.irq.signal_used_queue() {
                    error_limited!("virtio-fs: interrupt: {e}");
                }
            }
            return;
        }
        if self.session.as_ref().map(|s| s.fd()) == Some(fd) {
            if let SocketState::Gone(why) = socket_state(fd) {
                self.backend_lost(ops, &why);
            }
            return;
        }
        let queue = self
            .life
            .queue_evts()
            .iter()
            .position(|e| e.as_raw_fd() == fd);
        match queue {
            Some(i) => {
                self.life.ack_queue(i);
                self.fail_requests();
            }
            None => {
                warn_limited!("virtio-fs: event on unknown fd {fd}");
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            }
        }
    }
}
