//! Event-loop glue of the net device: the activate eventfd always; after
//! activation the two queue eventfds; the backend (TAP or passt socket)
//! while the device is active and the link up: readable only while the
//! guest has RX buffers (a frame with nowhere to go must not spin the loop),
//! writable only while a short write left bytes queued, and its hang-up
//! (passt exited) always. A lost link is never polled again.

use crate::{error_limited, warn_limited};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::{RXQ, TXQ};
use crate::virtio::lifecycle::DATA_ACTIVATE;

const DATA_TAP: u32 = 101;

impl Net {
    /// Poll the backend for what the device can act on now (see the
    /// module doc); hang-ups and errors are reported whatever the set.
    fn sync_tap(&mut self, ops: &mut EventOps) {
        let want = (self.is_active() && self.link_up()).then(|| {
            let mut set = EventSet::empty();
            if !self.rx_blocked {
                set |= EventSet::IN;
            }
            if self.tap.tx_pending() {
                set |= EventSet::OUT;
            }
            set
        });
        if want == self.tap_events {
            return;
        }
        let fd = self.tap.as_raw_fd();
        let r = match (self.tap_events, want) {
            (None, Some(set)) => ops.add(Events::with_data_raw(fd, DATA_TAP, set)),
            (Some(_), Some(set)) => ops.modify(Events::with_data_raw(fd, DATA_TAP, set)),
            (Some(set), None) => ops.remove(Events::with_data_raw(fd, DATA_TAP, set)),
            (None, None) => Ok(()),
        };
        match r {
            Ok(()) => self.tap_events = want,
            Err(e) => error_limited!("virtio-net: {} watch {want:?}: {e:?}", self.tap.name()),
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.life.watch_activate(ops);
        if self.is_active() {
            self.life.subscribe_queues(ops);
            self.sync_tap(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DATA_ACTIVATE => {
                self.life.ack_activate();
                if self.is_active() {
                    self.life.subscribe_queues(ops);
                    self.process_all();
                }
            }
            d if d == RXQ as u32 || d == TXQ as u32 => {
                self.life.ack_queue(d as usize);
                self.process_all();
            }
            DATA_TAP => {
                self.process_all();
                // A hang-up the data paths did not see (no RX room: nothing
                // read) still ends the link, or it would be reported forever.
                let gone = events.event_set() & (EventSet::HANG_UP | EventSet::ERROR);
                if !gone.is_empty() {
                    self.lose_link(!self.tap.link_up());
                }
            }
            other => warn_limited!("virtio-net: event with unknown data {other}"),
        }
        self.sync_tap(ops);
    }
}
