//! virtio-rng (virtio 1.2 §5.4): fills the driver's device-writable buffers
//! with bytes from the host's `getrandom(2)`, straight into guest memory.

use std::sync::Arc;

use crate::{error_limited, warn_limited};
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryBackend, Permissions, VolatileSlice};

use super::lifecycle::{Lifecycle, DATA_ACTIVATE};
use super::{device_type, ActivateContext, ActivateError, IrqLine, VirtioDevice};
use crate::GuestMemoryMmap;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out for one chain (Linux asks for at most a page or so).
pub const MAX_BYTES_PER_CHAIN: u64 = 64 * 1024;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Arc<IrqLine>,
}

/// The entropy device.
pub struct Rng {
    life: Lifecycle<Active>,
    /// Bytes handed to the guest so far.
    bytes_served: u64,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.life.is_active())
            .field("bytes_served", &self.bytes_served)
            .finish()
    }
}

/// Fill a slice of guest memory from getrandom.
fn fill_random(s: &VolatileSlice<'_>) -> std::io::Result<()> {
    let (ptr, len) = (s.ptr_guard_mut().as_ptr(), s.len());
    let mut done = 0usize;
    while done < len {
        // SAFETY: a VolatileSlice is valid for writes of its length for its
        // lifetime (vm-memory's contract), and done < len.
        let r = unsafe { libc::getrandom(ptr.add(done) as *mut libc::c_void, len - done, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

/// Serve one chain; returns the bytes written. Readable descriptors and
/// ranges outside guest memory end the chain early.
fn serve_chain(mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) -> u32 {
    let mut written: u64 = 0;
    for d in chain {
        if !d.is_write_only() {
            warn_limited!("virtio-rng: device-readable descriptor in a request");
            break;
        }
        let len = u64::from(d.len()).min(MAX_BYTES_PER_CHAIN - written);
        if len == 0 {
            if written >= MAX_BYTES_PER_CHAIN {
                break;
            }
            continue;
        }
        let len = len as usize;
        if !GuestMemoryBackend::check_range(mem, d.addr(), len) {
            warn_limited!("virtio-rng: buffer outside guest memory");
            break;
        }
        let Ok(slices) = GuestMemory::get_slices(mem, d.addr(), len, Permissions::Write) else {
            break;
        };
        for s in slices {
            let Ok(s) = s else { return written as u32 };
            if let Err(e) = fill_random(&s) {
                error_limited!("virtio-rng: getrandom: {e}");
                return written as u32;
            }
            written += s.len() as u64;
        }
    }
    // written <= MAX_BYTES_PER_CHAIN fits in u32.
    written as u32
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            life: Lifecycle::new("virtio-rng")?,
            bytes_served: 0,
        })
    }

    pub fn is_active(&self) -> bool {
        self.life.is_active()
    }

    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    /// Drain the request queue.
    pub fn process_queue(&mut self) {
        let Some(a) = self.life.active.as_mut() else {
            return;
        };
        let event_idx = a.queue.event_idx_enabled();
        let mut added = false;
        loop {
            if event_idx {
                let _ = a.queue.disable_notification(&a.mem);
            }
            while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                let n = serve_chain(&a.mem, chain);
                self.bytes_served += u64::from(n);
                match a.queue.add_used(&a.mem, head, n) {
                    Ok(()) => added = true,
                    Err(e) => warn_limited!("virtio-rng: add_used({head}): {e}"),
                }
            }
            if !event_idx || !matches!(a.queue.enable_notification(&a.mem), Ok(true)) {
                break;
            }
        }
        if added && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            if let Err(e) = a.irq.signal_used_queue() {
                error_limited!("virtio-rng: interrupt: {e}");
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.life.begin(&mut ctx, 1)?;
        let got = ctx.queues.len();
        let mut queues = ctx.queues.into_iter();
        let (Some(queue), None) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.life.finish(Active {
            mem: ctx.mem,
            queue,
            irq: ctx.irq,
        })
    }

    fn reset(&mut self) -> bool {
        self.life.reset();
        true
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.life.watch_activate(ops);
        if self.is_active() {
            self.life.subscribe_queues(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DATA_ACTIVATE => {
                self.life.ack_activate();
                self.life.subscribe_queues(ops);
                self.process_queue();
            }
            0 => {
                self.life.ack_queue(0);
                self.process_queue();
            }
            other => warn_limited!("virtio-rng: event with unknown data {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::testing::{guest_memory, Arena, RawDesc, Seg, TestDriver};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    type Em = EventManager<Arc<Mutex<Rng>>>;

    fn setup() -> (TestDriver, Em) {
        let mem = guest_memory(1 << 20);
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let t = MmioTransport::new(mem.clone(), rng.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(rng);
        let mut d = TestDriver::new(mem, t, Arena::new(GuestAddress(0x1000), 0xf_0000));
        d.init(1 << VIRTIO_RING_F_EVENT_IDX, 64).unwrap();
        em.run_with_timeout(100).unwrap();
        (d, em)
    }

    #[test]
    fn fills_buffers_with_random_bytes() {
        let (mut d, mut em) = setup();
        let a = d.buf(64);
        let b = d.buf(4096);
        d.add_chain(0, &[Seg::wo(a, 64), Seg::wo(b, 4096)]);
        d.set_used_event(0, 0);
        d.notify(0);
        let used = d.poll_used(0, 1, 10, || {
            em.run_with_timeout(50).unwrap();
        });
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].len, 64 + 4096);
        let x = d.read_buf(a, 64);
        let y = d.read_buf(b, 4096);
        assert!(x.iter().any(|&v| v != 0) && y.iter().any(|&v| v != 0));
        assert_ne!(x, y[..64].to_vec());
        assert_ne!(d.take_interrupt(), 0);
        // A second request gets different bytes.
        let c = d.buf(64);
        d.add_indirect_chain(0, &[Seg::wo(c, 64)]);
        d.notify(0);
        let used = d.poll_used(0, 1, 10, || {
            em.run_with_timeout(50).unwrap();
        });
        assert_eq!(used[0].len, 64);
        assert_ne!(d.read_buf(c, 64), x);
    }

    #[test]
    fn hostile_chains() {
        let (mut d, mut em) = setup();
        let end = d.mem_end();
        // Outside memory, read-only, zero-length, huge, a loop.
        let cases = [
            RawDesc {
                addr: end - 8,
                len: 64,
                flags: 2,
                next: 0,
            },
            RawDesc {
                addr: 0x8000,
                len: 64,
                flags: 0,
                next: 0,
            },
            RawDesc {
                addr: 0x8000,
                len: 0,
                flags: 2,
                next: 0,
            },
            RawDesc {
                addr: 0x8000,
                len: u32::MAX,
                flags: 2,
                next: 0,
            },
            RawDesc {
                addr: 0x8000,
                len: 16,
                flags: 2 | 1,
                next: 5,
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            d.write_raw_desc(0, 5, *c);
            d.publish(0, 5);
            d.notify(0);
            em.run_with_timeout(50).unwrap();
            let used = d.used(0);
            assert_eq!(used.len(), 1, "case {i}");
            assert!(used[0].len as u64 <= MAX_BYTES_PER_CHAIN, "case {i}");
        }
        // A head index beyond the queue: nothing to serve, no crash.
        d.publish(0, 999);
        d.notify(0);
        em.run_with_timeout(50).unwrap();
    }
}
