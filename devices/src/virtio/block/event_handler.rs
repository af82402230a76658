//! virtio-blk in the event loop: on `activate_evt` subscribe the queue
//! eventfd, on a queue notification drain the queue.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use super::device::Block;

impl Block {
    fn subscribe_queue(&mut self, ops: &mut EventOps) {
        if self.queue_subscribed {
            return;
        }
        let Some(evt) = self.queue_evt.as_ref() else {
            return;
        };
        match ops.add(Events::new(evt, EventSet::IN)) {
            Ok(()) => self.queue_subscribed = true,
            Err(e) => error!("virtio-blk: cannot watch the queue eventfd: {e:?}"),
        }
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            error!("virtio-blk: cannot watch the activate eventfd: {e:?}");
        }
        // Registered after an activation already happened.
        if self.is_active() {
            self.subscribe_queue(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == std::os::unix::io::AsRawFd::as_raw_fd(&self.activate_evt) {
            let _ = self.activate_evt.read();
            self.subscribe_queue(ops);
            // Notifications may have arrived before we were watching.
            self.process_queue();
            return;
        }
        if let Some(evt) = self.queue_evt.as_ref() {
            if fd == std::os::unix::io::AsRawFd::as_raw_fd(evt) {
                // Drain the counter whether or not we are active.
                let _ = evt.read();
                self.process_queue();
                return;
            }
        }
        warn!("virtio-blk: event on unknown fd {fd}");
    }
}
