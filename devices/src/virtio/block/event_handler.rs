//! virtio-blk in the event loop: nothing to do there. The disk's worker
//! thread (`super::worker`) waits on the queue eventfd and does all disk
//! I/O, so a slow disk never stalls the loop that serves vsock, the console
//! and the other devices. The subscriber exists so the VMM registers every
//! virtio device alike.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, _ops: &mut EventOps) {}

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
}
