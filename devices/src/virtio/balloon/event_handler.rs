//! Event-loop glue of the balloon: `init` watches the activate eventfd; on
//! activation the four queue eventfds and the stats timer are watched too;
//! after a reset they are dropped again.

use std::os::unix::io::AsRawFd;

use crate::{error_limited, warn_limited};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Balloon;
use super::NUM_QUEUES;
use crate::virtio::lifecycle::DATA_ACTIVATE;

const DATA_STATS_TIMER: u32 = 101;

impl Balloon {
    fn subscribe_runtime(&mut self, ops: &mut EventOps) {
        if !self.life.subscribe_queues(ops) {
            return;
        }
        let timer =
            Events::with_data_raw(self.stats_timer.as_raw_fd(), DATA_STATS_TIMER, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            error_limited!("virtio-balloon: cannot watch the stats timer: {e:?}");
        }
    }

    fn unsubscribe_runtime(&mut self, ops: &mut EventOps) {
        if !self.life.unsubscribe_queues(ops) {
            return;
        }
        let _ = ops.remove(Events::with_data_raw(
            self.stats_timer.as_raw_fd(),
            DATA_STATS_TIMER,
            EventSet::IN,
        ));
    }

    fn process_all(&mut self) {
        for q in 0..NUM_QUEUES {
            self.process_queue(q);
        }
    }
}

impl MutEventSubscriber for Balloon {
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
                self.process_all();
            }
            return;
        }
        if !self.is_active() {
            // Reset happened: stop watching until the next activation.
            self.unsubscribe_runtime(ops);
            return;
        }
        match data {
            DATA_STATS_TIMER => {
                // Non-blocking: after a reset there may be nothing to read.
                let _ = self.stats_timer.wait();
                self.request_stats();
            }
            q if (q as usize) < NUM_QUEUES => {
                self.life.ack_queue(q as usize);
                self.process_queue(q as usize);
            }
            other => warn_limited!("virtio-balloon: event with unknown data {other}"),
        }
    }
}
