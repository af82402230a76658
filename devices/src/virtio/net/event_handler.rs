//! Event-loop glue of the net device: the activate eventfd always; after
//! activation the two queue eventfds; the TAP only while the guest has RX
//! buffers (a frame with nowhere to go must not spin the loop).

use crate::{error_limited, warn_limited};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::{RXQ, TXQ};

const DATA_ACTIVATE: u32 = 100;
const DATA_TAP: u32 = 101;

impl Net {
    fn subscribe_queues(&mut self, ops: &mut EventOps) {
        if self.subscribed {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error_limited!("virtio-net: cannot watch queue {i}: {e:?}");
            }
        }
        self.subscribed = true;
    }

    /// Watch the TAP exactly when the device is active and has RX room.
    fn sync_tap(&mut self, ops: &mut EventOps) {
        let want = self.is_active() && !self.rx_blocked;
        if want == self.tap_watched {
            return;
        }
        let ev = Events::with_data_raw(self.tap.as_raw_fd(), DATA_TAP, EventSet::IN);
        let r = if want { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.tap_watched = want,
            Err(e) => error_limited!("virtio-net: TAP watch {want}: {e:?}"),
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            error_limited!("virtio-net: cannot watch the activate eventfd: {e:?}");
        }
        if self.is_active() {
            self.subscribe_queues(ops);
            self.sync_tap(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DATA_ACTIVATE => {
                let _ = self.activate_evt.read();
                if self.is_active() {
                    self.subscribe_queues(ops);
                    self.process_all();
                }
            }
            d if d == RXQ as u32 || d == TXQ as u32 => {
                if let Some(evt) = self.queue_evts.get(d as usize) {
                    let _ = evt.read();
                }
                self.process_all();
            }
            DATA_TAP => self.process_all(),
            other => warn_limited!("virtio-net: event with unknown data {other}"),
        }
        self.sync_tap(ops);
    }
}
