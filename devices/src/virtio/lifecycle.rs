//! The activation lifecycle every event-loop device shares: the activate
//! eventfd (written on DRIVER_OK on a vCPU thread, seen by the event loop),
//! the per-queue notification eventfds (the VMM registers the first
//! activation's as ioeventfds once, so they are kept across resets), the
//! device's state between activation and reset, and the event-loop
//! subscription of those eventfds.
//!
//! In the event loop the activate eventfd carries [`DATA_ACTIVATE`] and
//! queue `i`'s eventfd carries `i`; a device picks other values for its
//! backend fds.

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, ActivateError};
use crate::error_limited;

/// Event data of the activate eventfd.
pub const DATA_ACTIVATE: u32 = 100;

/// One device's lifecycle; `A` is what the device holds while active.
pub struct Lifecycle<A> {
    /// Device name for log lines ("virtio-rng", "vsock", ...).
    name: &'static str,
    activate_evt: EventFd,
    queue_evts: Vec<EventFd>,
    /// The queue eventfds are watched by the event loop.
    subscribed: bool,
    /// `Some` between activation and reset.
    pub active: Option<A>,
}

impl<A> Lifecycle<A> {
    pub fn new(name: &'static str) -> std::io::Result<Self> {
        Ok(Lifecycle {
            name,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            queue_evts: Vec::new(),
            subscribed: false,
            active: None,
        })
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// The queue eventfds (empty until the first activation).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Checks `ctx` (not active yet, `queues` queues) and takes its queue
    /// eventfds on the first activation; the caller then builds its state.
    pub fn begin(&mut self, ctx: &mut ActivateContext, queues: usize) -> Result<(), ActivateError> {
        ctx.check(self.is_active(), queues)?;
        if self.queue_evts.is_empty() {
            self.queue_evts = std::mem::take(&mut ctx.queue_evts);
        }
        Ok(())
    }

    /// Stores the active state and wakes the event loop.
    pub fn finish(&mut self, active: A) -> Result<(), ActivateError> {
        self.active = Some(active);
        self.activate_evt.write(1)?;
        Ok(())
    }

    /// Back to the pre-activation state (queue eventfds kept).
    pub fn reset(&mut self) {
        self.active = None;
    }

    /// `MutEventSubscriber::init`: watch the activate eventfd.
    pub fn watch_activate(&self, ops: &mut EventOps) {
        let ev = Events::with_data(&self.activate_evt, DATA_ACTIVATE, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            error_limited!("{}: cannot watch the activate eventfd: {e:?}", self.name);
        }
    }

    /// Drains the activate eventfd (its event arrived).
    pub fn ack_activate(&self) {
        let _ = self.activate_evt.read();
    }

    /// Drains queue `i`'s eventfd, if there is one.
    pub fn ack_queue(&self, i: usize) {
        if let Some(evt) = self.queue_evts.get(i) {
            let _ = evt.read();
        }
    }

    /// Watches every queue eventfd (data `i`); `false` if already watched.
    pub fn subscribe_queues(&mut self, ops: &mut EventOps) -> bool {
        if self.subscribed {
            return false;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error_limited!("{}: cannot watch queue {i}: {e:?}", self.name);
            }
        }
        self.subscribed = true;
        true
    }

    /// Stops watching the queue eventfds; `false` if they were not watched.
    pub fn unsubscribe_queues(&mut self, ops: &mut EventOps) -> bool {
        if !self.subscribed {
            return false;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let _ = ops.remove(Events::with_data(evt, i as u32, EventSet::IN));
        }
        self.subscribed = false;
        true
    }
}
