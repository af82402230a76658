//! An in-process virtio driver for tests, fuzzers and benches.
//!
//! `TestDriver` plays the guest: it owns an [`MmioTransport`], performs the
//! driver initialisation sequence through the MMIO registers (virtio 1.2
//! §3.1.1), lays out split virtqueues (descriptor table, available and used
//! rings) in guest memory taken from an [`Arena`], builds descriptor chains
//! (direct, indirect, or raw hostile ones), notifies queues and collects used
//! entries. It never runs the device: the caller pumps the device's event
//! loop (or calls it directly) between `notify` and `poll_used`.
//!
//! Compiled for unit tests and behind the `test-utils` cargo feature.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::mmio::{regs, status, MmioTransport};
use crate::{BusDevice, GuestMemoryMmap};

/// Make a guest memory of `size` bytes at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// A bump allocator over a range of guest memory.
#[derive(Debug, Clone)]
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    /// Allocate from `[start, start + len)`.
    pub fn new(start: GuestAddress, len: u64) -> Self {
        Arena {
            next: start.raw_value(),
            end: start.raw_value() + len,
        }
    }

    /// `size` bytes aligned to `align` (a power of two). Panics when full:
    /// this is test code, and a test that runs out wants to know.
    pub fn alloc(&mut self, size: u64, align: u64) -> GuestAddress {
        let start = (self.next + align - 1) & !(align - 1);
        assert!(
            start + size <= self.end,
            "test arena exhausted ({size} bytes wanted)"
        );
        self.next = start + size;
        GuestAddress(start)
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }
}

/// One buffer of a descriptor chain, as the driver describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub write: bool,
}

impl Seg {
    /// A device-readable buffer.
    pub fn ro(addr: GuestAddress, len: u32) -> Self {
        Seg {
            addr: addr.raw_value(),
            len,
            write: false,
        }
    }
    /// A device-writable buffer.
    pub fn wo(addr: GuestAddress, len: u32) -> Self {
        Seg {
            addr: addr.raw_value(),
            len,
            write: true,
        }
    }
}

/// A raw split-ring descriptor, written as is (for hostile chains).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One entry of the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
    /// Descriptor indices to free when a head comes back.
    in_flight: Vec<Vec<u16>>,
}

/// Errors of the init sequence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    #[error("bad magic {0:#x}")]
    Magic(u32),
    #[error("bad version {0}")]
    Version(u32),
    #[error("device refused features {0:#x} (FEATURES_OK not set)")]
    FeaturesRefused(u64),
    #[error("queue {0} has max size 0")]
    NoQueue(u16),
    #[error("device set DEVICE_NEEDS_RESET at DRIVER_OK (status {0:#x})")]
    NeedsReset(u32),
}

/// The guest side of one virtio-mmio device.
pub struct TestDriver {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub arena: Arena,
    pub queues: Vec<DriverQueue>,
    /// Features the device offered (read at init).
    pub device_features: u64,
    /// Features the driver acked.
    pub features: u64,
}

const DESC_SIZE: u64 = 16;

impl TestDriver {
    pub fn new(mem: GuestMemoryMmap, transport: MmioTransport, arena: Arena) -> Self {
        TestDriver {
            mem,
            transport,
            arena,
            queues: Vec::new(),
            device_features: 0,
            features: 0,
        }
    }

    /// Read a 32-bit register.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Write a 32-bit register.
    pub fn write_reg(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    /// Read `data.len()` bytes of device config space.
    pub fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(regs::CONFIG + offset, data);
    }

    pub fn status(&mut self) -> u32 {
        self.read_reg(regs::STATUS)
    }

    pub fn set_status(&mut self, v: u32) {
        self.write_reg(regs::STATUS, v)
    }

    /// Offered feature bits (both pages).
    pub fn read_device_features(&mut self) -> u64 {
        self.write_reg(regs::DEVICE_FEATURES_SEL, 0);
        let lo = self.read_reg(regs::DEVICE_FEATURES);
        self.write_reg(regs::DEVICE_FEATURES_SEL, 1);
        let hi = self.read_reg(regs::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Write both driver feature pages.
    pub fn write_driver_features(&mut self, f: u64) {
        self.write_reg(regs::DRIVER_FEATURES_SEL, 0);
        self.write_reg(regs::DRIVER_FEATURES, f as u32);
        self.write_reg(regs::DRIVER_FEATURES_SEL, 1);
        self.write_reg(regs::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, negotiate `wanted & offered` (plus
    /// VERSION_1), FEATURES_OK. Returns the acked features.
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, DriverError> {
        let magic = self.read_reg(regs::MAGIC_VALUE);
        if magic != super::mmio::MMIO_MAGIC_VALUE {
            return Err(DriverError::Magic(magic));
        }
        let version = self.read_reg(regs::VERSION);
        if version != 2 {
            return Err(DriverError::Version(version));
        }
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.device_features = self.read_device_features();
        let f = (wanted | 1 << VIRTIO_F_VERSION_1) & self.device_features;
        self.write_driver_features(f);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused(f));
        }
        self.features = f;
        Ok(f)
    }

    /// Lay out queue `index` with `size` entries (capped by QueueNumMax)
    /// in the arena and program its registers.
    pub fn setup_queue(&mut self, index: u16, size: u16) -> Result<(), DriverError> {
        self.write_reg(regs::QUEUE_SEL, index.into());
        let max = self.read_reg(regs::QUEUE_NUM_MAX) as u16;
        if max == 0 {
            return Err(DriverError::NoQueue(index));
        }
        let size = size.min(max);
        let n = u64::from(size);
        let desc = self.arena.alloc(DESC_SIZE * n, 4096);
        let avail = self.arena.alloc(6 + 2 * n, 4096);
        let used = self.arena.alloc(6 + 8 * n, 4096);
        // Start from clean rings (the arena may reuse dirty memory).
        let zeros = vec![0u8; (DESC_SIZE * n) as usize];
        self.mem.write_slice(&zeros, desc).expect("desc table");
        self.mem
            .write_slice(&zeros[..(6 + 2 * n) as usize], avail)
            .expect("avail");
        self.mem
            .write_slice(&zeros[..(6 + 8 * n) as usize], used)
            .expect("used");
        self.program_queue(index, size, desc, avail, used);
        let q = DriverQueue {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            in_flight: vec![Vec::new(); usize::from(size)],
        };
        let i = usize::from(index);
        if self.queues.len() <= i {
            self.queues.resize_with(i + 1, || DriverQueue {
                size: 0,
                desc: GuestAddress(0),
                avail: GuestAddress(0),
                used: GuestAddress(0),
                avail_idx: 0,
                last_used: 0,
                free: Vec::new(),
                in_flight: Vec::new(),
            });
        }
        self.queues[i] = q;
        Ok(())
    }

    /// Program queue registers directly (also for hostile addresses).
    pub fn program_queue(
        &mut self,
        index: u16,
        size: u16,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    ) {
        self.write_reg(regs::QUEUE_SEL, index.into());
        self.write_reg(regs::QUEUE_NUM, size.into());
        let d = desc.raw_value();
        let a = avail.raw_value();
        let u = used.raw_value();
        self.write_reg(regs::QUEUE_DESC_LOW, d as u32);
        self.write_reg(regs::QUEUE_DESC_HIGH, (d >> 32) as u32);
        self.write_reg(regs::QUEUE_DRIVER_LOW, a as u32);
        self.write_reg(regs::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        self.write_reg(regs::QUEUE_DEVICE_LOW, u as u32);
        self.write_reg(regs::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        self.write_reg(regs::QUEUE_READY, 1);
    }

    /// Set DRIVER_OK and check the device accepted it.
    pub fn driver_ok(&mut self) -> Result<(), DriverError> {
        let s = self.status();
        self.set_status(s | status::DRIVER_OK);
        let s = self.status();
        if s & status::DEVICE_NEEDS_RESET != 0 || s & status::DRIVER_OK == 0 {
            return Err(DriverError::NeedsReset(s));
        }
        Ok(())
    }

    /// The whole init sequence: negotiate `wanted`, set up every queue the
    /// device has with up to `queue_size` entries, DRIVER_OK.
    pub fn init(&mut self, wanted: u64, queue_size: u16) -> Result<u64, DriverError> {
        let f = self.negotiate(wanted)?;
        self.queues.clear();
        let mut i = 0u16;
        loop {
            self.write_reg(regs::QUEUE_SEL, i.into());
            if self.read_reg(regs::QUEUE_NUM_MAX) == 0 {
                break;
            }
            self.setup_queue(i, queue_size)?;
            i += 1;
        }
        self.driver_ok()?;
        Ok(f)
    }

    fn queue(&mut self, q: u16) -> &mut DriverQueue {
        &mut self.queues[usize::from(q)]
    }

    fn write_desc(&self, table: GuestAddress, index: u16, d: RawDesc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        let addr = table.unchecked_add(u64::from(index) * DESC_SIZE);
        self.mem.write_slice(&b, addr).expect("descriptor write");
    }

    /// Write raw descriptor `index` of queue `q`'s table.
    pub fn write_raw_desc(&mut self, q: u16, index: u16, d: RawDesc) {
        let table = self.queue(q).desc;
        self.write_desc(table, index, d);
    }

    /// Put `head` in the available ring and publish the new index.
    pub fn publish(&mut self, q: u16, head: u16) {
        let (avail, size, idx) = {
            let dq = self.queue(q);
            (dq.avail, dq.size, dq.avail_idx)
        };
        let slot = avail.unchecked_add(4 + 2 * u64::from(idx % size));
        self.mem.write_obj(head.to_le(), slot).expect("avail slot");
        let new = idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(new.to_le(), avail.unchecked_add(2))
            .expect("avail idx");
        self.queue(q).avail_idx = new;
    }

    /// Set the available ring's idx to any value (hostile drivers).
    pub fn set_avail_idx(&mut self, q: u16, idx: u16) {
        let avail = self.queue(q).avail;
        self.mem
            .write_obj(idx.to_le(), avail.unchecked_add(2))
            .expect("avail idx");
        self.queue(q).avail_idx = idx;
    }

    fn take_descs(&mut self, q: u16, n: usize) -> Vec<u16> {
        let dq = self.queue(q);
        assert!(dq.free.len() >= n, "test queue {q} out of descriptors");
        let at = dq.free.len() - n;
        dq.free.split_off(at)
    }

    /// Add a direct chain of `segs` and publish it. Returns the head.
    pub fn add_chain(&mut self, q: u16, segs: &[Seg]) -> u16 {
        assert!(!segs.is_empty());
        let ids = self.take_descs(q, segs.len());
        let table = self.queue(q).desc;
        for (i, s) in segs.iter().enumerate() {
            let mut flags = if s.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < segs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(
                table,
                ids[i],
                RawDesc {
                    addr: s.addr,
                    len: s.len,
                    flags,
                    next,
                },
            );
        }
        let head = ids[0];
        self.queue(q).in_flight[usize::from(head)] = ids;
        self.publish(q, head);
        head
    }

    /// Add a chain whose buffers live in an indirect table allocated from
    /// the arena; uses one ring descriptor. Returns the head.
    pub fn add_indirect_chain(&mut self, q: u16, segs: &[Seg]) -> u16 {
        assert!(!segs.is_empty());
        let n = segs.len() as u64;
        let table = self.arena.alloc(DESC_SIZE * n, 16);
        for (i, s) in segs.iter().enumerate() {
            let mut flags = if s.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < segs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(
                table,
                i as u16,
                RawDesc {
                    addr: s.addr,
                    len: s.len,
                    flags,
                    next: (i + 1) as u16,
                },
            );
        }
        let ids = self.take_descs(q, 1);
        let head = ids[0];
        let ring = self.queue(q).desc;
        self.write_desc(
            ring,
            head,
            RawDesc {
                addr: table.raw_value(),
                len: (DESC_SIZE * n) as u32,
                flags: VRING_DESC_F_INDIRECT as u16,
                next: 0,
            },
        );
        self.queue(q).in_flight[usize::from(head)] = ids;
        self.publish(q, head);
        head
    }

    /// Notify queue `q` through the QueueNotify register.
    pub fn notify(&mut self, q: u16) {
        self.write_reg(regs::QUEUE_NOTIFY, q.into());
    }

    /// New used entries of queue `q` since the last call; frees their
    /// descriptors.
    pub fn used(&mut self, q: u16) -> Vec<UsedElem> {
        let (used, size, mut last) = {
            let dq = self.queue(q);
            (dq.used, dq.size, dq.last_used)
        };
        let idx: u16 = u16::from_le(self.mem.read_obj(used.unchecked_add(2)).expect("used idx"));
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let mut out = Vec::new();
        while last != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(last % size));
            let id: u32 = u32::from_le(self.mem.read_obj(at).expect("used id"));
            let len: u32 = u32::from_le(self.mem.read_obj(at.unchecked_add(4)).expect("used len"));
            out.push(UsedElem { id, len });
            last = last.wrapping_add(1);
            let dq = self.queue(q);
            if let Some(ids) = dq.in_flight.get_mut(id as usize) {
                dq.free.append(ids);
            }
        }
        self.queue(q).last_used = last;
        out
    }

    /// Call `pump` (which runs the device) until at least `n` used entries
    /// arrived on queue `q` or `tries` rounds passed.
    pub fn poll_used(
        &mut self,
        q: u16,
        n: usize,
        tries: usize,
        mut pump: impl FnMut(),
    ) -> Vec<UsedElem> {
        let mut out = self.used(q);
        for _ in 0..tries {
            if out.len() >= n {
                break;
            }
            pump();
            out.extend(self.used(q));
        }
        out
    }

    /// The device's used-ring idx.
    pub fn used_idx(&self, q: u16) -> u16 {
        let used = self.queues[usize::from(q)].used;
        u16::from_le(self.mem.read_obj(used.unchecked_add(2)).expect("used idx"))
    }

    /// EVENT_IDX: write `used_event` (interrupt me after this used index).
    pub fn set_used_event(&mut self, q: u16, v: u16) {
        let (avail, size) = {
            let dq = self.queue(q);
            (dq.avail, dq.size)
        };
        self.mem
            .write_obj(v.to_le(), avail.unchecked_add(4 + 2 * u64::from(size)))
            .expect("used_event");
    }

    /// EVENT_IDX: the device's `avail_event`.
    pub fn avail_event(&self, q: u16) -> u16 {
        let dq = &self.queues[usize::from(q)];
        u16::from_le(
            self.mem
                .read_obj(dq.used.unchecked_add(4 + 8 * u64::from(dq.size)))
                .expect("avail_event"),
        )
    }

    /// Set VRING_AVAIL_F_NO_INTERRUPT (or clear it).
    pub fn set_avail_flags(&mut self, q: u16, flags: u16) {
        let avail = self.queue(q).avail;
        self.mem
            .write_obj(flags.to_le(), avail)
            .expect("avail flags");
    }

    /// Consume the interrupt: returns the InterruptStatus bits that were
    /// raised (0 if the irq eventfd had not fired), and ACKs them.
    pub fn take_interrupt(&mut self) -> u32 {
        let fired = self.transport.irq().irq_evt().read().is_ok();
        let st = self.read_reg(regs::INTERRUPT_STATUS);
        if st != 0 {
            self.write_reg(regs::INTERRUPT_ACK, st);
        }
        if fired {
            st
        } else {
            0
        }
    }

    /// Allocate a buffer and fill it with `data`.
    pub fn buf_with(&mut self, data: &[u8]) -> GuestAddress {
        let a = self.arena.alloc(data.len().max(1) as u64, 8);
        self.mem.write_slice(data, a).expect("buffer write");
        a
    }

    /// Allocate a zeroed buffer of `len` bytes.
    pub fn buf(&mut self, len: usize) -> GuestAddress {
        let a = self.arena.alloc(len.max(1) as u64, 8);
        let zeros = vec![0u8; len];
        self.mem.write_slice(&zeros, a).expect("buffer write");
        a
    }

    /// Read `len` bytes of guest memory.
    pub fn read_buf(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, addr).expect("buffer read");
        v
    }

    /// Last address of guest memory + 1.
    pub fn mem_end(&self) -> u64 {
        self.mem.last_addr().raw_value() + 1
    }
}
