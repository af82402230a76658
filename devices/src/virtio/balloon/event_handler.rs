//! Event-loop glue of the balloon: `init` watches the activate eventfd; on
//! activation the four queue eventfds and the stats timer are watched too;
//! after a reset they are dropped again.

use std::os::unix::io::AsRawFd;

use crate::{error_limited, warn_limited};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Balloon;
use super::NUM_QUEUES;

const DATA_ACTIVATE: u32 = 100;
const DATA_STATS_TIMER: u32 = 101;

impl Balloon {
    fn subscribe_runtime(&mut self, ops: &mut EventOps) {
        if self.subscribed {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error_limited!("virtio-balloon: cannot watch queue {i}: {e:?}");
            }
        }
        let timer =
            Events::with_data_raw(self.stats_timer.as_raw_fd(), DATA_STATS_TIMER, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            error_limited!("virtio-balloon: cannot watch the stats timer: {e:?}");
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
        let _ = ops.remove(Events::with_data_raw(
            self.stats_timer.as_raw_fd(),
            DATA_STATS_TIMER,
            EventSet::IN,
        ));
        self.subscribed = false;
    }

    fn process_all(&mut self) {
        for q in 0..NUM_QUEUES {
            self.process_queue(q);
        }
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            error_limited!("virtio-balloon: cannot watch the activate eventfd: {e:?}");
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
                if let Some(evt) = self.queue_evts.get(q as usize) {
                    let _ = evt.read();
                }
                self.process_queue(q as usize);
            }
            other => warn_limited!("virtio-balloon: event with unknown data {other}"),
        }
    }
}
