//! The event-loop thread: one event-manager for device backends (queue
//! ioeventfds, TAP, vsock sockets, console input) plus a stop eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// A subscriber as the event manager holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The VMM's event manager.
pub type Manager = EventManager<Subscriber>;

struct Stopper {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch the stop event: {e:?}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }
}

/// A running event loop.
pub struct EventLoop {
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// A fresh event manager for devices to subscribe to.
pub fn new_manager() -> Result<Manager> {
    EventManager::new().map_err(|e| Error::Io {
        what: "creating the event loop",
        source: std::io::Error::other(format!("{e:?}")),
    })
}

impl EventLoop {
    /// Start the thread that runs `manager` until [`EventLoop::stop`].
    pub fn start(mut manager: Manager) -> Result<Self> {
        let io = |what| move |source| Error::Io { what, source };
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopper: Subscriber = Arc::new(Mutex::new(Stopper {
            evt: stop_evt.try_clone().map_err(io("eventfd"))?,
            stop: stop.clone(),
        }));
        manager.add_subscriber(stopper);
        // The thread reports its filter before start returns, so the loop is
        // sandboxed before any guest code runs, and a failure is start's error.
        let (sandboxed_tx, sandboxed_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("b2p-events".into())
            .spawn(move || {
                let sandboxed = crate::seccomp::apply(crate::seccomp::Role::EventLoop);
                let ok = sandboxed.is_ok();
                let _ = sandboxed_tx.send(sandboxed);
                if !ok {
                    return;
                }
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        log::error!("event loop: {e:?}");
                        break;
                    }
                }
            })
            .map_err(io("spawning the event-loop thread"))?;
        match sandboxed_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(Error::Device(
                    "the event-loop thread ended before it started".into(),
                ))
            }
        }
        Ok(EventLoop {
            stop_evt,
            thread: Some(thread),
        })
    }

    /// Stop the loop and wait for its thread.
    pub fn stop(&mut self) {
        let _ = self.stop_evt.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
