//! The balloon under the in-process driver: reported ranges of touched
//! guest memory leave the process (mincore shows them gone, they read back
//! as zeros), bad ranges release nothing, statistics arrive and are asked
//! for again, and a driver that never answers blocks nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::stats::{encode as encode_stats, tag};
use super::*;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{Arena, Seg, TestDriver};
use crate::{BusDevice, GuestMemoryMmap};

type Em = EventManager<Arc<Mutex<Balloon>>>;

const MIB: u64 = 1 << 20;
/// Where the tests' data pages live (the rings are below 1 MiB).
const DATA: u64 = 4 * MIB;

/// Guest memory: two regions with no gap (0..32 MiB, 32..48 MiB), then a
/// hole, then 64..72 MiB.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), (32 * MIB) as usize),
        (GuestAddress(32 * MIB), (16 * MIB) as usize),
        (GuestAddress(64 * MIB), (8 * MIB) as usize),
    ])
    .unwrap()
}

fn setup(config: BalloonConfig) -> (TestDriver, Em, Arc<Mutex<Balloon>>) {
    let mem = memory();
    let dev = Arc::new(Mutex::new(Balloon::new(config).unwrap()));
    let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    let mut em = Em::new().unwrap();
    em.add_subscriber(dev.clone());
    let mut d = TestDriver::new(mem, t, Arena::new(GuestAddress(0x1000), 0xf_0000));
    let f = d
        .init(
            1 << F_PAGE_REPORTING | 1 << F_STATS_VQ | 1 << VIRTIO_RING_F_EVENT_IDX_BIT,
            64,
        )
        .unwrap();
    assert_ne!(f & 1 << F_PAGE_REPORTING, 0);
    em.run_with_timeout(100).unwrap();
    assert!(dev.lock().unwrap().is_active());
    (d, em, dev)
}

const VIRTIO_RING_F_EVENT_IDX_BIT: u32 = 29;

/// Pages of `addr..addr + len` resident in this process (mincore).
fn resident(mem: &GuestMemoryMmap, addr: u64, len: u64) -> u64 {
    let r = mem.find_region(GuestAddress(addr)).unwrap();
    let host = r
        .get_host_address(MemoryRegionAddress(addr - r.start_addr().0))
        .unwrap();
    let pages = (len / PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: host..host+len is inside the region's mapping (a test's own
    // guest memory); mincore only reads the page tables.
    let rc = unsafe { libc::mincore(host as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64
}

fn touch(mem: &GuestMemoryMmap, addr: u64, len: u64, byte: u8) {
    let buf = vec![byte; len as usize];
    mem.write_slice(&buf, GuestAddress(addr)).unwrap();
}

fn pump(em: &mut Em) {
    em.run_with_timeout(50).unwrap();
}

#[test]
fn reported_ranges_leave_the_process() {
    let (mut d, mut em, dev) = setup(BalloonConfig {
        stats_interval: None,
    });
    let mem = d.mem.clone();
    let len = 16 * MIB;
    touch(&mem, DATA, len, 0x5a);
    let before = resident(&mem, DATA, len);
    assert_eq!(before, len / PAGE_SIZE, "touched pages are resident");
    // Two chains: 4 ranges of 2 MiB (device-writable, as Linux sends them)
    // and one of 8 MiB read-only.
    let segs: Vec<Seg> = (0..4)
        .map(|i| Seg::wo(GuestAddress(DATA + i * 2 * MIB), (2 * MIB) as u32))
        .collect();
    d.add_chain(REPORTINGQ as u16, &segs);
    d.add_chain(
        REPORTINGQ as u16,
        &[Seg::ro(GuestAddress(DATA + 8 * MIB), (8 * MIB) as u32)],
    );
    d.notify(REPORTINGQ as u16);
    let used = d.poll_used(REPORTINGQ as u16, 2, 10, || pump(&mut em));
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|u| u.len == 0));
    assert_ne!(d.take_interrupt(), 0, "the driver is told");
    let after = resident(&mem, DATA, len);
    assert_eq!(after, 0, "{before} pages resident before, {after} after");
    // The guest sees zeros there now; its other memory is untouched.
    assert!(d.read_buf(GuestAddress(DATA), 4096).iter().all(|&b| b == 0));
    let c = dev.lock().unwrap().counters();
    assert_eq!(
        (c.reported_bytes, c.reported_ranges, c.rejected),
        (len, 5, 0)
    );
    eprintln!(
        "in-process: {} MiB resident before the report, {} MiB after",
        before * PAGE_SIZE / MIB,
        after * PAGE_SIZE / MIB
    );
}

#[test]
fn bad_ranges_release_nothing() {
    let (mut d, mut em, dev) = setup(BalloonConfig {
        stats_interval: None,
    });
    let mem = d.mem.clone();
    // Resident, recognisable data everywhere a bad range points at.
    touch(&mem, DATA, 8 * MIB, 0xa5);
    touch(&mem, 30 * MIB, 4 * MIB, 0xa5); // across the 32 MiB region boundary
    touch(&mem, 47 * MIB, MIB, 0xa5); // before the hole
    touch(&mem, 71 * MIB, MIB, 0xa5); // the end of memory
    let end = d.mem_end();
    assert_eq!(end, 72 * MIB);
    let bad: &[(u64, u32)] = &[
        (DATA + 1, 4096),             // unaligned start
        (DATA, 4095),                 // unaligned length
        (DATA + 2048, 8192),          // both
        (DATA, 0),                    // empty
        (31 * MIB, (2 * MIB) as u32), // crosses regions 0 and 1
        (47 * MIB, (2 * MIB) as u32), // runs into the hole
        (50 * MIB, 4096),             // in the hole
        (71 * MIB, (2 * MIB) as u32), // past the end
        (end, 4096),                  // at the end
        (!0xfffu64, 0xffff_f000),     // wraps around
        (1 << 40, 4096),              // far away
    ];
    for (i, (addr, len)) in bad.iter().enumerate() {
        d.add_chain(REPORTINGQ as u16, &[Seg::wo(GuestAddress(*addr), *len)]);
        d.notify(REPORTINGQ as u16);
        let used = d.poll_used(REPORTINGQ as u16, 1, 10, || pump(&mut em));
        assert_eq!(used.len(), 1, "case {i}: the chain still comes back");
    }
    let c = dev.lock().unwrap().counters();
    assert_eq!(c.rejected, bad.len() as u64);
    assert_eq!(c.reported_bytes, 0);
    for (addr, len) in [
        (DATA, 8 * MIB),
        (30 * MIB, 2 * MIB),
        (32 * MIB, 2 * MIB),
        (47 * MIB, MIB),
        (71 * MIB, MIB),
    ] {
        assert_eq!(resident(&mem, addr, len), len / PAGE_SIZE, "{addr:#x}");
        assert!(d
            .read_buf(GuestAddress(addr), len as usize)
            .iter()
            .all(|&b| b == 0xa5));
    }
    // A good range after the bad ones works, and in the same chain as a
    // bad one only the good one is released.
    d.add_chain(
        REPORTINGQ as u16,
        &[
            Seg::wo(GuestAddress(DATA + 1), 4096),
            Seg::wo(GuestAddress(DATA), (4 * MIB) as u32),
        ],
    );
    d.notify(REPORTINGQ as u16);
    assert_eq!(
        d.poll_used(REPORTINGQ as u16, 1, 10, || pump(&mut em))
            .len(),
        1
    );
    assert_eq!(resident(&mem, DATA, 4 * MIB), 0);
    assert_eq!(resident(&mem, DATA + 4 * MIB, 4 * MIB), 4 * MIB / PAGE_SIZE);
    // The range API names each refusal.
    assert!(matches!(
        release_range(&mem, 31 * MIB, 2 * MIB),
        Err(RangeError::CrossesRegion)
    ));
    assert!(matches!(
        release_range(&mem, DATA + 1, 4096),
        Err(RangeError::Unaligned)
    ));
    assert!(matches!(
        release_range(&mem, 50 * MIB, 4096),
        Err(RangeError::Outside)
    ));
}

#[test]
fn inflated_pages_are_released_deflate_is_answered() {
    let (mut d, mut em, dev) = setup(BalloonConfig {
        stats_interval: None,
    });
    let mem = d.mem.clone();
    touch(&mem, DATA, MIB, 1);
    // 128 consecutive pfns, a bad one (outside memory), 2 more elsewhere.
    let mut pfns: Vec<u32> = (0..128).map(|i| (DATA / PAGE_SIZE) as u32 + i).collect();
    pfns.push(0xffff_ffff);
    pfns.push((DATA / PAGE_SIZE) as u32 + 200);
    pfns.push((DATA / PAGE_SIZE) as u32 + 201);
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let buf = d.buf_with(&bytes);
    d.add_chain(INFLATEQ as u16, &[Seg::ro(buf, bytes.len() as u32)]);
    d.notify(INFLATEQ as u16);
    assert_eq!(
        d.poll_used(INFLATEQ as u16, 1, 10, || pump(&mut em)).len(),
        1
    );
    assert_eq!(resident(&mem, DATA, 128 * PAGE_SIZE), 0);
    assert_eq!(resident(&mem, DATA + 128 * PAGE_SIZE, 72 * PAGE_SIZE), 72);
    assert_eq!(resident(&mem, DATA + 200 * PAGE_SIZE, 2 * PAGE_SIZE), 0);
    let c = dev.lock().unwrap().counters();
    assert_eq!((c.inflated_bytes, c.rejected), (130 * PAGE_SIZE, 1));
    d.add_chain(DEFLATEQ as u16, &[Seg::ro(buf, 8)]);
    d.notify(DEFLATEQ as u16);
    assert_eq!(
        d.poll_used(DEFLATEQ as u16, 1, 10, || pump(&mut em)).len(),
        1
    );
}

#[test]
fn stats_arrive_and_are_asked_for_again() {
    let (mut d, mut em, dev) = setup(BalloonConfig {
        stats_interval: Some(Duration::from_millis(50)),
    });
    let sq = STATSQ as u16;
    let first = encode_stats(&[
        (tag::MEMFREE, 300 * MIB),
        (tag::MEMTOT, 1024 * MIB),
        (77, 1),
    ]);
    let buf = d.buf_with(&first);
    d.add_chain(sq, &[Seg::ro(buf, first.len() as u32)]);
    d.notify(sq);
    pump(&mut em);
    {
        let b = dev.lock().unwrap();
        let s = b.stats();
        assert_eq!(s.updates, 1);
        assert_eq!(s.get(tag::MEMFREE), Some(300 * MIB));
        assert_eq!(s.get(tag::MEMTOT), Some(1024 * MIB));
        assert_eq!(s.get(tag::AVAIL), None);
        assert_eq!(s.unknown, 1);
        assert_eq!(s.to_string(), "free_mib=300 total_mib=1024");
    }
    // The device holds the buffer until its timer asks for fresh values.
    assert!(d.used(sq).is_empty());
    let used = d.poll_used(sq, 1, 20, || pump(&mut em));
    assert_eq!(used.len(), 1, "the timer returned the buffer");
    // The driver answers with new values.
    let second = encode_stats(&[(tag::MEMFREE, 900 * MIB), (tag::AVAIL, 950 * MIB)]);
    d.mem.write_slice(&second, buf).unwrap();
    d.add_chain(sq, &[Seg::ro(buf, second.len() as u32)]);
    d.notify(sq);
    pump(&mut em);
    let b = dev.lock().unwrap();
    assert_eq!(b.stats().updates, 2);
    assert_eq!(b.stats().get(tag::MEMFREE), Some(900 * MIB));
    assert_eq!(b.stats().get(tag::MEMTOT), None);
}

/// A driver that never gives the stats buffer back, never reads its used
/// rings and never acknowledges interrupts: the event loop keeps running,
/// each round returns at once, and the other queues still work.
#[test]
fn a_driver_that_never_answers_blocks_nothing() {
    let (mut d, mut em, dev) = setup(BalloonConfig {
        stats_interval: Some(Duration::from_millis(10)),
    });
    let sq = STATSQ as u16;
    let s = encode_stats(&[(tag::MEMFREE, MIB)]);
    let buf = d.buf_with(&s);
    d.add_chain(sq, &[Seg::ro(buf, s.len() as u32)]);
    d.notify(sq);
    let t = Instant::now();
    let mut rounds = 0;
    while t.elapsed() < Duration::from_millis(300) {
        em.run_with_timeout(20).unwrap();
        rounds += 1;
    }
    // The one request went out; no buffer came back, so no more requests.
    assert_eq!(dev.lock().unwrap().counters().chains[STATSQ], 1);
    assert!(rounds >= 10, "the loop kept turning ({rounds} rounds)");
    // Reporting still works while the stats request stays unanswered.
    let mem = d.mem.clone();
    touch(&mem, DATA, MIB, 3);
    d.add_chain(
        REPORTINGQ as u16,
        &[Seg::wo(GuestAddress(DATA), MIB as u32)],
    );
    d.notify(REPORTINGQ as u16);
    assert_eq!(
        d.poll_used(REPORTINGQ as u16, 1, 10, || pump(&mut em))
            .len(),
        1
    );
    assert_eq!(resident(&mem, DATA, MIB), 0);
    // A reset while the request is out is fine too.
    d.set_status(0);
    assert!(!dev.lock().unwrap().is_active());
    em.run_with_timeout(50).unwrap();
}

#[test]
fn config_space() {
    let (mut d, _em, dev) = setup(BalloonConfig::default());
    let mut b = [0xffu8; 8];
    d.read_config(0, &mut b);
    assert_eq!(b, [0; 8], "num_pages 0, actual 0");
    d.transport
        .write(crate::virtio::mmio::regs::CONFIG + 4, &7u32.to_le_bytes());
    // num_pages is not the driver's to write.
    d.transport
        .write(crate::virtio::mmio::regs::CONFIG, &9u32.to_le_bytes());
    assert_eq!(dev.lock().unwrap().actual_pages(), 7);
    d.read_config(0, &mut b);
    assert_eq!(b, [0, 0, 0, 0, 7, 0, 0, 0]);
}

#[test]
fn shared_mappings_are_released_with_madv_remove() {
    // A memfd mapped shared, as guest memory shared with a vhost-user
    // backend is: DONTNEED would leave the pages in the file.
    let fd = unsafe { libc::memfd_create(c"b2p-balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a descriptor we just made and own.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(8 * MIB).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        (8 * MIB) as usize,
        Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let r = mem.find_region(GuestAddress(0)).unwrap();
    assert_eq!(Backing::of(r), Backing::Shared);
    touch(&mem, 0, 8 * MIB, 0x11);
    let blocks = |f: &std::fs::File| {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    };
    assert!(blocks(&file) >= 8 * MIB);
    release_range(&mem, 2 * MIB, 4 * MIB).unwrap();
    assert!(
        blocks(&file) <= 4 * MIB,
        "{} bytes left in the memfd",
        blocks(&file)
    );
    let mut v = vec![0u8; 4096];
    mem.read_slice(&mut v, GuestAddress(2 * MIB)).unwrap();
    assert!(v.iter().all(|&b| b == 0));
    mem.read_slice(&mut v, GuestAddress(MIB)).unwrap();
    assert!(v.iter().all(|&b| b == 0x11));
    // Private anonymous memory is the other arm.
    let anon = memory();
    assert_eq!(
        Backing::of(anon.find_region(GuestAddress(0)).unwrap()),
        Backing::Private
    );
}
