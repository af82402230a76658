//! Event-loop glue of the vsock device: `init` watches the activate eventfd;
//! on activation the three queue eventfds and the muxer's epoll fd are
//! watched too; after a reset they are dropped again.

use crate::{error_limited, warn_limited};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;
use super::{EVQ, RXQ, TXQ};
use crate::virtio::lifecycle::DATA_ACTIVATE;

const DATA_BACKEND: u32 = 101;

impl Vsock {
    fn subscribe_runtime(&mut self, ops: &mut EventOps) {
        if !self.life.subscribe_queues(ops) {
            return;
        }
        if let Err(e) = ops.add(Events::with_data(&self.muxer, DATA_BACKEND, EventSet::IN)) {
            error_limited!("vsock: cannot watch the backend: {e:?}");
        }
    }

    fn unsubscribe_runtime(&mut self, ops: &mut EventOps) {
        if !self.life.unsubscribe_queues(ops) {
            return;
        }
        let _ = ops.remove(Events::with_data(&self.muxer, DATA_BACKEND, EventSet::IN));
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.life.watch_activate(ops);
        if self.is_active() {
            self.subscribe_runtime(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data == DATA_ACTIVATE {
            self.life.ack_activate();
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
                self.life.ack_queue(d as usize);
                if d != EVQ as u32 {
                    self.process_all();
                }
            }
            DATA_BACKEND => self.process_backend(),
            other => warn_limited!("vsock: event with unknown data {other}"),
        }
    }
}
