//! Event-loop glue of the vsock device: `init` watches the activate eventfd;
//! on activation the three queue eventfds and the muxer's epoll fd are
//! watched too; after a reset they are dropped again.

use crate::{error_limited, warn_limited};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;
use super::{EVQ, RXQ, TXQ};

const DATA_ACTIVATE: u32 = 100;
const DATA_BACKEND: u32 = 101;

impl Vsock {
    fn subscribe_runtime(&mut self, ops: &mut EventOps) {
        if self.subscribed {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error_limited!("vsock: cannot watch queue {i}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.muxer, DATA_BACKEND, EventSet::IN)) {
            error_limited!("vsock: cannot watch the backend: {e:?}");
        }
        self.subscribed = true;
    }

    fn unsubscribe_runtime(&mut self, ops: &mut EventOps) {
        if !self.subscribed {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let _ = ops.remove(Events::with_data(evt, i as u32, EventSet::IN));
        }
        let _ = ops.remove(Events::with_data(&self.muxer, DATA_BACKEND, EventSet::IN));
        self.subscribed = false;
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            error_limited!("vsock: cannot watch the activate eventfd: {e:?}");
        }
        if self.is_active() {
            self.subscribe_runtime(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data == DATA_ACTIVATE {
            let _ = self.activate_evt.read();
            if self.is_active() {
                self.subscribe_runtime(ops);
                self.process_backend();
            }
            return;
        }
        if !self.is_active() {
            // Reset happened: stop watching until the next activation.
            self.unsubscribe_runtime(ops);
            return;
        }
        match data {
            d if d == RXQ as u32 || d == TXQ as u32 || d == EVQ as u32 => {
                if let Some(evt) = self.queue_evts.get(d as usize) {
                    let _ = evt.read();
                }
                if d != EVQ as u32 {
                    self.process_all();
                }
            }
            DATA_BACKEND => self.process_backend(),
            other => warn_limited!("vsock: event with unknown data {other}"),
        }
    }
}
