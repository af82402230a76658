//! virtio-blk driven in-process through the MMIO transport by the test
//! driver, on real image files in temporary directories. The device serves
//! its queue on its own worker thread: `H::pump` waits for that thread to
//! finish what was published.

#[path = "../../tests/common/require.rs"]
mod require;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use b2p_devices::virtio::block::{req_status, req_type, Block, BlockConfig, BlockError, Syncer};
use b2p_devices::virtio::mmio::{regs, status, MmioTransport};
use b2p_devices::virtio::testing::{guest_memory, Arena, RawDesc, Seg, TestDriver, UsedElem};
use b2p_devices::{BusDevice, GuestMemoryMmap};
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Address, Bytes, GuestAddress};

const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_SEG_MAX: u64 = 1 << 2;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_INDIRECT: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const ALL: u64 = F_FLUSH | F_SEG_MAX | F_BLK_SIZE | F_DISCARD | F_WRITE_ZEROES | F_INDIRECT;

const MEM_SIZE: usize = 16 << 20;
const DISK_SIZE: u64 = 4 << 20;

struct H {
    d: TestDriver,
    blk: Arc<Mutex<Block>>,
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

fn cfg(path: &Path, ro: bool, serial: Option<&str>) -> BlockConfig {
    BlockConfig {
        path: path.to_owned(),
        read_only: ro,
        serial: serial.map(str::to_owned),
    }
}

impl H {
    fn with_block(blk: Block, path: PathBuf, dir: Option<tempfile::TempDir>, features: u64) -> H {
        H::with_block_mem(blk, path, dir, features, guest_memory(MEM_SIZE))
    }

    fn with_block_mem(
        blk: Block,
        path: PathBuf,
        dir: Option<tempfile::TempDir>,
        features: u64,
        mem: GuestMemoryMmap,
    ) -> H {
        let blk = Arc::new(Mutex::new(blk));
        let t = MmioTransport::new(mem.clone(), blk.clone()).unwrap();
        let arena = Arena::new(GuestAddress(0x10000), (MEM_SIZE as u64 / 2) - 0x10000);
        let mut d = TestDriver::new(mem, t, arena);
        d.init(features, 256).unwrap();
        let mut h = H {
            d,
            blk,
            path,
            _dir: dir,
        };
        h.pump();
        assert!(h.blk.lock().unwrap().is_active());
        h
    }

    fn new(features: u64, ro: bool, serial: Option<&str>) -> H {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path(), DISK_SIZE);
        let blk = Block::new(cfg(&path, ro, serial)).unwrap();
        H::with_block(blk, path, Some(dir), features)
    }

    /// Waits until the worker has served everything published so far.
    fn pump(&mut self) {
        pump(&self.blk);
    }

    fn header(&mut self, t: u32, sector: u64) -> GuestAddress {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.d.buf_with(&h)
    }

    /// Publish the chain, notify, run the device, return its used entry.
    fn run(&mut self, segs: &[Seg], indirect: bool) -> UsedElem {
        let head = if indirect {
            self.d.add_indirect_chain(0, segs)
        } else {
            self.d.add_chain(0, segs)
        };
        self.d.notify(0);
        let blk = &self.blk;
        let used = self.d.poll_used(0, 1, 20, || pump(blk));
        assert_eq!(used.len(), 1, "exactly one completion");
        assert_eq!(used[0].id, u32::from(head));
        used[0]
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.write_opt(sector, data, false)
    }

    fn write_opt(&mut self, sector: u64, data: &[u8], indirect: bool) -> u8 {
        let h = self.header(req_type::OUT, sector);
        let b = self.d.buf_with(data);
        let s = self.d.buf_with(&[0xff]);
        let u = self.run(
            &[Seg::ro(h, 16), Seg::ro(b, data.len() as u32), Seg::wo(s, 1)],
            indirect,
        );
        assert_eq!(u.len, 1);
        self.d.read_buf(s, 1)[0]
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.read_opt(sector, len, false)
    }

    fn read_opt(&mut self, sector: u64, len: usize, indirect: bool) -> (u8, Vec<u8>) {
        let h = self.header(req_type::IN, sector);
        let b = self.d.buf(len);
        let s = self.d.buf_with(&[0xff]);
        let u = self.run(
            &[Seg::ro(h, 16), Seg::wo(b, len as u32), Seg::wo(s, 1)],
            indirect,
        );
        let st = self.d.read_buf(s, 1)[0];
        if st == req_status::OK {
            assert_eq!(u.len as usize, len + 1);
        }
        (st, self.d.read_buf(b, len))
    }

    fn simple(&mut self, t: u32, sector: u64) -> u8 {
        let h = self.header(t, sector);
        let s = self.d.buf_with(&[0xff]);
        self.run(&[Seg::ro(h, 16), Seg::wo(s, 1)], false);
        self.d.read_buf(s, 1)[0]
    }

    fn dwz(&mut self, t: u32, segs: &[(u64, u32, u32)]) -> u8 {
        let h = self.header(t, 0);
        let mut raw = Vec::new();
        for (sector, num, flags) in segs {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&num.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        let b = self.d.buf_with(&raw);
        let s = self.d.buf_with(&[0xff]);
        self.run(
            &[Seg::ro(h, 16), Seg::ro(b, raw.len() as u32), Seg::wo(s, 1)],
            false,
        );
        self.d.read_buf(s, 1)[0]
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

fn pump(blk: &Mutex<Block>) {
    assert!(
        blk.lock().unwrap().sync(Duration::from_secs(20)),
        "the disk worker did not finish within 20 s"
    );
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn features_and_config_space() {
    let mut h = H::new(ALL | F_EVENT_IDX, false, None);
    let offered = h.d.device_features;
    for f in [
        F_VERSION_1,
        F_FLUSH,
        F_SEG_MAX,
        F_BLK_SIZE,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_EVENT_IDX,
        F_INDIRECT,
    ] {
        assert_ne!(offered & f, 0, "feature {f:#x} offered");
    }
    assert_eq!(offered & F_RO, 0);
    assert_eq!(h.d.read_reg(regs::DEVICE_ID), 2);
    let mut c = [0u8; 60];
    h.d.read_config(0, &mut c);
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        DISK_SIZE / 512
    );
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126); // seg_max
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512); // blk_size
    assert_ne!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 0); // max_discard_sectors
    assert_eq!(c[56], 1); // write_zeroes_may_unmap
                          // Sub-word and out-of-range config reads.
    let mut b = [0u8; 1];
    h.d.read_config(1, &mut b);
    assert_eq!(b[0], c[1]);
    let mut b = [0xffu8; 4];
    h.d.read_config(0x400, &mut b);
    assert_eq!(b, [0; 4]);
    // Writes to the config space are ignored.
    h.d.transport.write(regs::CONFIG, &[0xff; 8]);
    let mut c2 = [0u8; 8];
    h.d.read_config(0, &mut c2);
    assert_eq!(c2, c[..8]);
}

#[test]
fn write_then_read_back_and_on_disk() {
    let mut h = H::new(ALL, false, None);
    let data = pattern(7, 8192);
    assert_eq!(h.write(10, &data), req_status::OK);
    let (st, back) = h.read(10, 8192);
    assert_eq!(st, req_status::OK);
    assert_eq!(back, data);
    // The bytes are in the image file at sector 10.
    let f = h.file();
    assert_eq!(&f[10 * 512..10 * 512 + 8192], &data[..]);
    // Last sector of the disk works; one past it does not.
    let last = DISK_SIZE / 512 - 1;
    assert_eq!(h.write(last, &pattern(1, 512)), req_status::OK);
    assert_eq!(h.write(last, &pattern(1, 1024)), req_status::IOERR);
    assert_eq!(h.read(last + 1, 512).0, req_status::IOERR);
    assert_eq!(h.read(u64::MAX / 512 + 1, 512).0, req_status::IOERR);
    assert_eq!(h.read(u64::MAX, 512).0, req_status::IOERR);
    // Not a multiple of the sector size.
    assert_eq!(h.write(0, &[1u8; 100]), req_status::IOERR);
    assert_eq!(h.read(0, 100).0, req_status::IOERR);
    assert_eq!(h.blk.lock().unwrap().completed_requests(), 9);
}

#[test]
fn scattered_segments_and_any_layout() {
    let mut h = H::new(ALL, false, None);
    // Header and data in one descriptor, data split in odd pieces, status
    // sharing the last data descriptor.
    let data = pattern(3, 2048);
    let mut first = vec![0u8; 16];
    first[0..4].copy_from_slice(&req_type::OUT.to_le_bytes());
    first[8..16].copy_from_slice(&4u64.to_le_bytes());
    first.extend_from_slice(&data[..100]);
    let a = h.d.buf_with(&first);
    let b = h.d.buf_with(&data[100..1500]);
    let c = h.d.buf_with(&data[1500..]);
    let s = h.d.buf(1);
    let u = h.run(
        &[
            Seg::ro(a, first.len() as u32),
            Seg::ro(b, 1400),
            Seg::ro(c, 548),
            Seg::wo(s, 1),
        ],
        false,
    );
    assert_eq!(u.len, 1);
    assert_eq!(h.d.read_buf(s, 1)[0], req_status::OK);
    // Read back into [700 bytes][1348 + status byte].
    let hd = h.header(req_type::IN, 4);
    let x = h.d.buf(700);
    let y = h.d.buf(1349);
    let u = h.run(&[Seg::ro(hd, 16), Seg::wo(x, 700), Seg::wo(y, 1349)], false);
    assert_eq!(u.len, 2049);
    let mut back = h.d.read_buf(x, 700);
    back.extend(h.d.read_buf(y, 1348));
    assert_eq!(back, data);
    assert_eq!(h.d.read_buf(y.unchecked_add(1348), 1)[0], req_status::OK);
}

#[test]
fn indirect_descriptors() {
    let mut h = H::new(ALL, false, None);
    let data = pattern(9, 4096);
    assert_eq!(h.write_opt(100, &data, true), req_status::OK);
    let (st, back) = h.read_opt(100, 4096, true);
    assert_eq!(st, req_status::OK);
    assert_eq!(back, data);
    // Mixed: written indirect, read direct.
    assert_eq!(h.read(100, 4096).1, data);
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    std::fs::write(&path, pattern(5, DISK_SIZE as usize)).unwrap();
    let blk = Block::new(cfg(&path, true, None)).unwrap();
    let mut h = H::with_block(blk, path.clone(), Some(dir), ALL | F_RO);
    assert_ne!(h.d.device_features & F_RO, 0);
    assert_eq!(h.d.device_features & (F_DISCARD | F_WRITE_ZEROES), 0);
    assert_eq!(h.write(0, &[0u8; 512]), req_status::IOERR);
    assert_eq!(
        h.dwz(req_type::WRITE_ZEROES, &[(0, 8, 0)]),
        req_status::UNSUPP,
        "not negotiated"
    );
    assert_eq!(h.read(0, 512).1, pattern(5, 512));
    assert_eq!(h.simple(req_type::FLUSH, 0), req_status::OK);
    assert_eq!(h.file(), pattern(5, DISK_SIZE as usize));
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = H::new(ALL, false, Some("b2p-data-0"));
    let hd = h.header(req_type::GET_ID, 0);
    let b = h.d.buf(20);
    let s = h.d.buf(1);
    let u = h.run(&[Seg::ro(hd, 16), Seg::wo(b, 20), Seg::wo(s, 1)], false);
    assert_eq!(u.len, 21);
    assert_eq!(h.d.read_buf(s, 1)[0], req_status::OK);
    let mut want = b"b2p-data-0".to_vec();
    want.resize(20, 0);
    assert_eq!(h.d.read_buf(b, 20), want);
    // A short buffer gets a prefix, never an overflow past it.
    let hd = h.header(req_type::GET_ID, 0);
    let b = h.d.buf(8);
    let guard = h.d.buf_with(&[0xaa; 8]);
    let s = h.d.buf(1);
    let u = h.run(&[Seg::ro(hd, 16), Seg::wo(b, 4), Seg::wo(s, 1)], false);
    assert_eq!(u.len, 5);
    assert_eq!(h.d.read_buf(b, 4), b"b2p-");
    assert_eq!(h.d.read_buf(guard, 8), vec![0xaa; 8]);

    // No serial configured: UNSUPP.
    let mut h = H::new(ALL, false, None);
    let hd = h.header(req_type::GET_ID, 0);
    let b = h.d.buf(20);
    let s = h.d.buf(1);
    h.run(&[Seg::ro(hd, 16), Seg::wo(b, 20), Seg::wo(s, 1)], false);
    assert_eq!(h.d.read_buf(s, 1)[0], req_status::UNSUPP);

    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), 4096);
    let e = Block::new(cfg(&p, false, Some("x".repeat(21).as_str()))).unwrap_err();
    assert!(matches!(e, BlockError::SerialTooLong(_)));
}

fn allocated_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = H::new(ALL, false, None);
    let mb = 1 << 20;
    assert_eq!(h.write(0, &pattern(1, mb)), req_status::OK);
    assert_eq!(h.write(2048, &pattern(2, mb)), req_status::OK);
    File::open(&h.path).unwrap().sync_all().unwrap();
    let before = allocated_bytes(&h.path);
    assert!(before >= 2 * mb as u64, "allocated {before}");

    // DISCARD the first MiB: zeros, deallocated.
    assert_eq!(h.dwz(req_type::DISCARD, &[(0, 2048, 0)]), req_status::OK);
    assert_eq!(h.read(0, mb).1, vec![0u8; mb]);
    let after = allocated_bytes(&h.path);
    assert!(after <= before - mb as u64, "{before} -> {after}");
    // The unmap flag is not valid for DISCARD.
    assert_eq!(h.dwz(req_type::DISCARD, &[(0, 8, 1)]), req_status::UNSUPP);

    // WRITE_ZEROES without UNMAP: zeros, still allocated.
    assert_eq!(h.write(0, &pattern(3, 8192)), req_status::OK);
    assert_eq!(h.dwz(req_type::WRITE_ZEROES, &[(0, 16, 0)]), req_status::OK);
    assert_eq!(h.read(0, 8192).1, vec![0u8; 8192]);
    // WRITE_ZEROES with UNMAP over the second MiB: zeros, deallocated.
    let before = allocated_bytes(&h.path);
    assert_eq!(
        h.dwz(req_type::WRITE_ZEROES, &[(2048, 2048, 1)]),
        req_status::OK
    );
    assert_eq!(h.read(2048, mb).1, vec![0u8; mb]);
    assert!(allocated_bytes(&h.path) <= before - mb as u64);
    // Unknown flags, out of range, malformed segment lists.
    assert_eq!(
        h.dwz(req_type::WRITE_ZEROES, &[(0, 8, 2)]),
        req_status::UNSUPP
    );
    assert_eq!(
        h.dwz(req_type::DISCARD, &[(DISK_SIZE / 512 - 4, 8, 0)]),
        req_status::IOERR
    );
    assert_eq!(
        h.dwz(req_type::DISCARD, &[(u64::MAX, 8, 0)]),
        req_status::IOERR
    );
    assert_eq!(h.dwz(req_type::DISCARD, &[]), req_status::IOERR);
    let many: Vec<_> = (0..33).map(|i| (i * 8, 8, 0)).collect();
    assert_eq!(h.dwz(req_type::DISCARD, &many), req_status::IOERR);
    // WRITE_ZEROES is one segment of at most 64 MiB (the work of one request
    // is bounded even where the zeros are written by hand).
    assert_eq!(
        h.dwz(req_type::WRITE_ZEROES, &[(0, 8, 0), (8, 8, 0)]),
        req_status::IOERR
    );
    assert_eq!(
        h.dwz(req_type::WRITE_ZEROES, &[(0, (64 << 20) / 512 + 8, 0)]),
        req_status::IOERR
    );
    assert_eq!(h.file().len() as u64, DISK_SIZE, "size kept");
}

#[test]
fn discard_refused_when_not_negotiated() {
    let mut h = H::new(F_FLUSH, false, None);
    assert_eq!(h.dwz(req_type::DISCARD, &[(0, 8, 0)]), req_status::UNSUPP);
    assert_eq!(
        h.dwz(req_type::WRITE_ZEROES, &[(0, 8, 0)]),
        req_status::UNSUPP
    );
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut h = H::new(ALL, false, None);
    for t in [2u32, 3, 5, 7, 9, 14, 0x8000_0000, u32::MAX] {
        assert_eq!(h.simple(t, 0), req_status::UNSUPP, "type {t}");
    }
}

/// Records, at each sync, what a crash at that instant would keep and
/// what the guest had been told.
#[derive(Clone)]
struct Observer {
    mem: GuestMemoryMmap,
    used_ring: Arc<Mutex<Option<GuestAddress>>>,
    path: PathBuf,
    log: Arc<Mutex<Vec<SyncObs>>>,
    fail: Arc<Mutex<bool>>,
}

struct SyncObs {
    /// used->idx when fdatasync was called.
    used_idx: u16,
    /// Image contents when fdatasync was called.
    file: Vec<u8>,
}

impl Syncer for Observer {
    fn sync(&mut self, file: &File) -> std::io::Result<()> {
        let used = self.used_ring.lock().unwrap().expect("used ring known");
        let used_idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        self.log.lock().unwrap().push(SyncObs {
            used_idx,
            file: std::fs::read(&self.path).unwrap(),
        });
        if *self.fail.lock().unwrap() {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        // The real thing too.
        file.sync_data()
    }
}

#[test]
fn flush_syncs_after_covered_writes_and_before_completion() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    let mem = guest_memory(MEM_SIZE);
    let obs = Observer {
        mem: mem.clone(),
        used_ring: Arc::new(Mutex::new(None)),
        path: path.clone(),
        log: Arc::new(Mutex::new(Vec::new())),
        fail: Arc::new(Mutex::new(false)),
    };
    let blk = Block::with_syncer(cfg(&path, false, None), Box::new(obs.clone())).unwrap();
    let mut h = H::with_block_mem(blk, path, Some(dir), ALL, mem);
    *obs.used_ring.lock().unwrap() = Some(h.d.queues[0].used);

    // One batch: W(0) W(8) FLUSH W(16) FLUSH, a single notification.
    let a = pattern(0xa, 4096);
    let b = pattern(0xb, 4096);
    let c = pattern(0xc, 4096);
    let mut heads = Vec::new();
    let mut statuses = Vec::new();
    for (kind, sector, data) in [
        (req_type::OUT, 0u64, Some(&a)),
        (req_type::OUT, 8, Some(&b)),
        (req_type::FLUSH, 0, None),
        (req_type::OUT, 16, Some(&c)),
        (req_type::FLUSH, 0, None),
    ] {
        let hd = h.header(kind, sector);
        let s = h.d.buf_with(&[0xff]);
        let head = match data {
            Some(d) => {
                let buf = h.d.buf_with(d);
                h.d.add_chain(0, &[Seg::ro(hd, 16), Seg::ro(buf, 4096), Seg::wo(s, 1)])
            }
            None => h.d.add_chain(0, &[Seg::ro(hd, 16), Seg::wo(s, 1)]),
        };
        heads.push(head);
        statuses.push(s);
    }
    h.d.notify(0);
    let blk = &h.blk;
    let used = h.d.poll_used(0, 5, 20, || pump(blk));
    assert_eq!(used.len(), 5);
    for s in &statuses {
        assert_eq!(h.d.read_buf(*s, 1)[0], req_status::OK);
    }
    let log = obs.log.lock().unwrap();
    assert_eq!(log.len(), 2, "one fdatasync per FLUSH");
    for (flush_no, (req_idx, covered)) in [
        (2usize, vec![(0usize, &a), (8, &b)]),
        (4, vec![(0, &a), (8, &b), (16, &c)]),
    ]
    .into_iter()
    .enumerate()
    {
        let o = &log[flush_no];
        // Every write submitted before this FLUSH reached the file before
        // the sync.
        for (sector, data) in covered {
            assert_eq!(
                &o.file[sector * 512..sector * 512 + 4096],
                &data[..],
                "flush {flush_no}: write at sector {sector} not issued before fdatasync"
            );
        }
        // The FLUSH completion was not yet visible to the guest.
        let pos = used
            .iter()
            .position(|u| u.id == u32::from(heads[req_idx]))
            .unwrap();
        assert!(
            usize::from(o.used_idx) <= pos,
            "flush {flush_no} completed (used slot {pos}) before its fdatasync (used idx {})",
            o.used_idx
        );
    }
    drop(log);

    // A failing fdatasync is reported to the guest.
    *obs.fail.lock().unwrap() = true;
    assert_eq!(h.simple(req_type::FLUSH, 0), req_status::IOERR);
    *obs.fail.lock().unwrap() = false;
    assert_eq!(h.simple(req_type::FLUSH, 0), req_status::OK);
    assert_eq!(obs.log.lock().unwrap().len(), 4);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = H::new(ALL | F_EVENT_IDX, false, None);
    assert_ne!(h.d.features & F_EVENT_IDX, 0);
    h.d.take_interrupt();
    // Ask for an interrupt only after the 3rd completion (used_event = 2).
    h.d.set_used_event(0, 2);
    assert_eq!(h.write(0, &[1u8; 512]), req_status::OK);
    assert_eq!(h.d.take_interrupt(), 0, "no interrupt for completion 1");
    assert_eq!(h.read(0, 512).0, req_status::OK);
    assert_eq!(h.d.take_interrupt(), 0, "no interrupt for completion 2");
    assert_eq!(h.read(0, 512).0, req_status::OK);
    assert_eq!(h.d.take_interrupt(), 1, "interrupt at completion 3");
    // The device publishes avail_event = next avail index it will read.
    assert_eq!(h.d.avail_event(0), 3);
    // Without EVENT_IDX every completion interrupts.
    let mut h = H::new(ALL, false, None);
    h.d.take_interrupt();
    h.d.set_used_event(0, 100);
    h.write(0, &[1u8; 512]);
    assert_eq!(h.d.take_interrupt(), 1);
}

#[test]
fn image_lock_refuses_a_second_user() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    let first = Block::new(cfg(&path, false, None)).unwrap();
    let e = Block::new(cfg(&path, false, None)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, BlockError::InUse { .. }));
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    assert!(msg.contains("in use by another VM"), "{msg}");
    // A reader may not join a writer either.
    assert!(matches!(
        Block::new(cfg(&path, true, None)),
        Err(BlockError::InUse { .. })
    ));
    drop(first);
    // Readers share; a writer is refused while they hold it.
    let r1 = Block::new(cfg(&path, true, None)).unwrap();
    let r2 = Block::new(cfg(&path, true, None)).unwrap();
    assert!(matches!(
        Block::new(cfg(&path, false, None)),
        Err(BlockError::InUse { .. })
    ));
    drop((r1, r2));
    Block::new(cfg(&path, false, None)).unwrap();
    // Missing file: a clear error naming it.
    let missing = dir.path().join("nope.raw");
    let e = Block::new(cfg(&missing, false, None)).unwrap_err();
    assert!(e.to_string().contains("nope.raw"));
}

/// `qemu-system-x86_64` holding `path` as a virtio-blk drive (paused, TCG,
/// no firmware run: `-S`), or None (with a SKIP line) when QEMU is missing.
fn qemu_drive(test: &str, path: &Path, read_only: bool) -> Option<std::process::Command> {
    let qemu = "qemu-system-x86_64";
    if std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .is_err()
    {
        let _ = writeln!(std::io::stderr(), "SKIP: {test}: {qemu} not found");
        return None;
    }
    let mut c = std::process::Command::new(qemu);
    c.args(["-M", "microvm", "-accel", "tcg", "-S", "-nodefaults"])
        .args(["-display", "none", "-monitor", "none", "-serial", "none"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,readonly={}",
            path.display(),
            if read_only { "on" } else { "off" }
        ))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    Some(c)
}

/// Kills the child on drop (a failing assertion must not leave QEMU running).
struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_holding_the_image_refuses_b2p() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    let Some(mut qemu) = qemu_drive("qemu_holding_the_image_refuses_b2p", &path, false) else {
        return;
    };
    let mut q = Reap(qemu.spawn().unwrap());
    // QEMU takes its locks while it starts: wait for b2p to be refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let e = loop {
        match Block::new(cfg(&path, false, None)) {
            Err(e) => break e,
            Ok(b) => drop(b),
        }
        assert!(
            q.0.try_wait().unwrap().is_none(),
            "QEMU exited before taking the image"
        );
        assert!(
            Instant::now() < deadline,
            "b2p still gets a disk QEMU holds"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(matches!(e, BlockError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("in use by another VM"), "{e}");
    // A reader is refused beside QEMU's writer too.
    let e = Block::new(cfg(&path, true, None)).unwrap_err();
    assert!(matches!(e, BlockError::InUse { .. }), "{e}");
    drop(q);
    Block::new(cfg(&path, false, None)).expect("free once QEMU is gone");
}

#[test]
fn b2p_holding_the_image_makes_qemu_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    let test = "b2p_holding_the_image_makes_qemu_refuse";
    for (b2p_ro, qemu_ro) in [(false, false), (false, true), (true, false)] {
        let held = Block::new(cfg(&path, b2p_ro, None)).unwrap();
        let Some(mut qemu) = qemu_drive(test, &path, qemu_ro) else {
            return;
        };
        let mut q = Reap(qemu.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = q.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU (read-only {qemu_ro}) attached a disk b2p holds (read-only {b2p_ro})"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(q.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{err}");
        assert!(err.contains("lock"), "QEMU's complaint: {err}");
        drop(held);
    }
    // Two readers share: QEMU read-only beside a read-only b2p keeps running.
    let _held = Block::new(cfg(&path, true, None)).unwrap();
    let Some(mut qemu) = qemu_drive(test, &path, true) else {
        return;
    };
    let mut q = Reap(qemu.spawn().unwrap());
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        q.0.try_wait().unwrap().is_none(),
        "QEMU read-only refused beside a read-only b2p"
    );
}

/// A FLUSH whose fdatasync takes 2 s.
struct SlowSync {
    started: Arc<Mutex<Option<Instant>>>,
}

impl Syncer for SlowSync {
    fn sync(&mut self, file: &File) -> std::io::Result<()> {
        *self.started.lock().unwrap() = Some(Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        file.sync_data()
    }
}

/// A slow flush on the disk must not stall the event loop that serves the
/// VM's other devices (vsock, console, rng): the disk's I/O runs on its own
/// thread. Here a virtio-rng on the same event loop answers within 100 ms
/// while the flush is in flight.
#[test]
fn a_slow_flush_does_not_stall_the_event_loop() {
    use b2p_devices::virtio::rng::Rng;
    use event_manager::MutEventSubscriber;
    type Sub = Arc<Mutex<dyn MutEventSubscriber + Send>>;

    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    let started = Arc::new(Mutex::new(None));
    let blk = Block::with_syncer(
        cfg(&path, false, None),
        Box::new(SlowSync {
            started: started.clone(),
        }),
    )
    .unwrap();
    let blk = Arc::new(Mutex::new(blk));
    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    let mut em = EventManager::<Sub>::new().unwrap();
    em.add_subscriber(blk.clone());
    em.add_subscriber(rng.clone());
    let mem = guest_memory(MEM_SIZE);
    let t = MmioTransport::new(mem.clone(), blk.clone()).unwrap();
    let mut bd = TestDriver::new(
        mem,
        t,
        Arena::new(GuestAddress(0x10000), MEM_SIZE as u64 / 2),
    );
    bd.init(ALL, 256).unwrap();
    let rmem = guest_memory(1 << 20);
    let t = MmioTransport::new(rmem.clone(), rng.clone()).unwrap();
    let mut rd = TestDriver::new(rmem, t, Arena::new(GuestAddress(0x10000), 0x80000));
    rd.init(0, 64).unwrap();
    // The event loop, as the VMM runs it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let lp = std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            em.run_with_timeout(10).unwrap();
        }
    });
    // FLUSH, and wait until its fdatasync is running.
    let hd = {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type::FLUSH.to_le_bytes());
        bd.buf_with(&h)
    };
    let st = bd.buf_with(&[0xff]);
    bd.add_chain(0, &[Seg::ro(hd, 16), Seg::wo(st, 1)]);
    bd.notify(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while started.lock().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the flush never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Three rng requests while it runs, each answered within 100 ms.
    for _ in 0..3 {
        let b = rd.buf(64);
        rd.add_chain(0, &[Seg::wo(b, 64)]);
        let t0 = Instant::now();
        rd.notify(0);
        let used = rd.poll_used(0, 1, 1000, || std::thread::sleep(Duration::from_millis(1)));
        let took = t0.elapsed();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].len, 64);
        assert!(
            took < Duration::from_millis(100),
            "rng answered after {took:?} while a flush was in flight"
        );
    }
    let flush_started = started.lock().unwrap().unwrap();
    assert!(
        flush_started.elapsed() < Duration::from_secs(2),
        "the rng requests were not served during the flush"
    );
    // The flush completes, OK.
    let used = bd.poll_used(0, 1, 500, || std::thread::sleep(Duration::from_millis(10)));
    assert_eq!(used.len(), 1);
    assert_eq!(bd.read_buf(st, 1)[0], req_status::OK);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    lp.join().unwrap();
}

#[test]
fn reset_and_reinit() {
    let mut h = H::new(ALL, false, None);
    assert_eq!(h.write(0, &pattern(4, 512)), req_status::OK);
    h.d.set_status(0);
    assert_eq!(h.d.status(), 0);
    h.pump();
    assert!(!h.blk.lock().unwrap().is_active());
    h.d.init(ALL | F_EVENT_IDX, 128).unwrap();
    h.pump();
    assert_eq!(h.read(0, 512).1, pattern(4, 512));
}

// ---- hostile chains ----

/// Publish raw descriptors (index, desc) with `head`, run the device and
/// return the used entries (0 or 1).
fn raw(h: &mut H, descs: &[(u16, RawDesc)], head: u16) -> Vec<UsedElem> {
    for (i, d) in descs {
        h.d.write_raw_desc(0, *i, *d);
    }
    h.d.publish(0, head);
    h.d.notify(0);
    h.pump();
    h.pump();
    h.d.used(0)
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn rd(addr: GuestAddress, len: u32, flags: u16, next: u16) -> RawDesc {
    RawDesc {
        addr: addr.raw_value(),
        len,
        flags,
        next,
    }
}

/// Guest memory beyond the arena stays untouched by hostile requests.
fn sentinel(h: &mut H) -> (GuestAddress, Vec<u8>) {
    let a = GuestAddress(MEM_SIZE as u64 - 4096);
    let v = pattern(0x5e, 4096);
    h.d.mem.write_slice(&v, a).unwrap();
    (a, v)
}

#[test]
fn hostile_descriptor_loops() {
    let mut h = H::new(ALL, false, None);
    let (sa, sv) = sentinel(&mut h);
    let hd = h.header(req_type::IN, 0);
    let st = h.d.buf(1);
    // Self loop on a writable descriptor: more than MAX descriptors -> dropped.
    let u = raw(
        &mut h,
        &[
            (200, rd(hd, 16, NEXT, 201)),
            (201, rd(st, 1, NEXT | WRITE, 201)),
        ],
        200,
    );
    assert_eq!(u, vec![UsedElem { id: 200, len: 0 }]);
    // Two-descriptor cycle.
    let u = raw(
        &mut h,
        &[
            (202, rd(hd, 16, NEXT, 203)),
            (203, rd(st, 512, NEXT | WRITE, 202)),
        ],
        202,
    );
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].len, 0);
    // Indirect table that points at itself through INDIRECT (nested) and a
    // loop inside an indirect table.
    let table = h.d.arena.alloc(64, 16);
    h.d.write_raw_desc(0, 0, RawDesc::default()); // keep index 0 benign
    let t = [
        rd(hd, 16, NEXT, 1),
        rd(table, 64, INDIRECT | NEXT, 2),
        rd(st, 1, WRITE, 0),
        rd(st, 1, WRITE | NEXT, 3),
    ];
    for (i, d) in t.iter().enumerate() {
        h.d.mem
            .write_slice(
                &[
                    d.addr.to_le_bytes().as_slice(),
                    &d.len.to_le_bytes(),
                    &d.flags.to_le_bytes(),
                    &d.next.to_le_bytes(),
                ]
                .concat(),
                table.unchecked_add(16 * i as u64),
            )
            .unwrap();
    }
    let u = raw(&mut h, &[(204, rd(table, 64, INDIRECT, 0))], 204);
    assert_eq!(u.len(), 1);
    assert_eq!(h.d.read_buf(sa, 4096), sv);
    // The device still works.
    assert_eq!(h.write(0, &pattern(8, 512)), req_status::OK);
}

#[test]
fn hostile_addresses_and_lengths() {
    let mut h = H::new(ALL, false, None);
    let (sa, sv) = sentinel(&mut h);
    let end = GuestAddress(MEM_SIZE as u64);
    let hd_in = h.header(req_type::IN, 0);
    let hd_out = h.header(req_type::OUT, 0);
    let st = h.d.buf(1);
    let data = h.d.buf(4096);
    let cases: Vec<(&str, Vec<RawDesc>, Option<u8>)> = vec![
        (
            "data beyond the end of memory",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(GuestAddress(MEM_SIZE as u64 - 512), 1024, WRITE | NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            Some(req_status::IOERR),
        ),
        (
            "data wrapping past u64::MAX",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(GuestAddress(u64::MAX - 511), 512, WRITE | NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            None,
        ),
        (
            "data just below u64::MAX",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(GuestAddress(u64::MAX - 1023), 512, WRITE | NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            Some(req_status::IOERR),
        ),
        (
            "write source beyond memory",
            vec![
                rd(hd_out, 16, NEXT, 1),
                rd(end, 512, NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            Some(req_status::IOERR),
        ),
        (
            "header beyond memory",
            vec![rd(end, 16, NEXT, 1), rd(st, 1, WRITE, 0)],
            Some(req_status::IOERR),
        ),
        (
            "status beyond memory",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(data, 512, WRITE | NEXT, 2),
                rd(end, 1, WRITE, 0),
            ],
            None,
        ),
        (
            "huge data length",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(data, u32::MAX - 511, WRITE | NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            Some(req_status::IOERR),
        ),
        (
            "huge header length",
            // The chain exceeds 4 GiB: the ring walker cuts it, no status.
            vec![rd(hd_out, u32::MAX, NEXT, 1), rd(st, 1, WRITE, 0)],
            None,
        ),
        (
            "header length not a sector multiple",
            vec![rd(hd_out, 1 << 20, NEXT, 1), rd(st, 1, WRITE, 0)],
            Some(req_status::IOERR),
        ),
        (
            "zero-length data",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(data, 0, WRITE | NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            Some(req_status::OK),
        ),
        (
            "zero-length status",
            vec![rd(hd_in, 16, NEXT, 1), rd(st, 0, WRITE, 0)],
            None,
        ),
        (
            "short header",
            vec![rd(hd_in, 8, NEXT, 1), rd(st, 1, WRITE, 0)],
            Some(req_status::IOERR),
        ),
        (
            "no header at all",
            vec![rd(st, 1, WRITE, 0)],
            Some(req_status::IOERR),
        ),
        (
            "header device-writable",
            vec![rd(hd_in, 16, WRITE | NEXT, 1), rd(st, 1, WRITE, 0)],
            Some(req_status::IOERR),
        ),
        (
            "status device-readable",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(data, 512, WRITE | NEXT, 2),
                rd(st, 1, NEXT, 0),
            ],
            None,
        ),
        (
            "IN data device-readable",
            vec![
                rd(hd_in, 16, NEXT, 1),
                rd(data, 512, NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            Some(req_status::OK), // 0 bytes asked for: nothing read, nothing written
        ),
        (
            "OUT data device-writable",
            vec![
                rd(hd_out, 16, NEXT, 1),
                rd(data, 512, WRITE | NEXT, 2),
                rd(st, 1, WRITE, 0),
            ],
            Some(req_status::OK), // an empty write; the 512 writable bytes are the IN area
        ),
        (
            "next index beyond the queue",
            vec![rd(hd_in, 16, NEXT, 1), rd(data, 512, NEXT, 999)],
            None,
        ),
        (
            "no writable descriptor",
            vec![rd(hd_out, 16, NEXT, 1), rd(data, 512, 0, 0)],
            None,
        ),
        (
            "indirect table beyond memory",
            vec![rd(end, 64, INDIRECT, 0)],
            None,
        ),
        (
            "indirect table of odd length",
            vec![rd(data, 17, INDIRECT, 0)],
            None,
        ),
    ];
    for (name, descs, want) in cases {
        h.d.mem.write_obj(0xeeu8, st).unwrap();
        let base = 100u16;
        let descs: Vec<(u16, RawDesc)> = descs
            .into_iter()
            .enumerate()
            .map(|(i, mut d)| {
                if d.flags & NEXT != 0 && d.next != 999 {
                    d.next += base;
                }
                (base + i as u16, d)
            })
            .collect();
        let u = raw(&mut h, &descs, base);
        assert_eq!(u.len(), 1, "{name}: one used entry");
        match want {
            Some(s) => {
                assert_eq!(h.d.read_buf(st, 1)[0], s, "{name}: status");
                assert!(u[0].len >= 1, "{name}: used len");
            }
            None => assert_eq!(u[0].len, 0, "{name}: dropped"),
        }
        assert_eq!(h.d.read_buf(sa, 4096), sv, "{name}: memory past the arena");
    }
    assert_eq!(h.write(0, &pattern(8, 512)), req_status::OK);
}

#[test]
fn hostile_ring_indices() {
    let mut h = H::new(ALL | F_EVENT_IDX, false, None);
    let (sa, sv) = sentinel(&mut h);
    let served = h.blk.lock().unwrap().completed_requests();
    h.d.take_interrupt();
    // A head index beyond the queue size: nothing is served, nothing is
    // written to the used ring, no interrupt.
    h.d.publish(0, 4000);
    h.d.notify(0);
    h.pump();
    assert_eq!(h.d.used_idx(0), 0);
    assert!(h.d.used(0).is_empty());
    assert_eq!(h.blk.lock().unwrap().completed_requests(), served);
    // avail idx jumping far ahead of what we consumed: refused as a whole.
    h.d.set_avail_idx(0, 1000);
    h.d.notify(0);
    h.pump();
    h.pump();
    assert_eq!(h.d.used_idx(0), 0);
    assert_eq!(h.blk.lock().unwrap().completed_requests(), served);
    assert_eq!(h.d.take_interrupt(), 0, "no interrupt for refused rings");
    assert_eq!(h.d.read_buf(sa, 4096), sv, "memory past the arena");
    // The device still answers its registers and is still active.
    assert_eq!(h.d.read_reg(regs::MAGIC_VALUE), 0x7472_6976);
    assert!(h.blk.lock().unwrap().is_active());
    // Recovery is the driver's business (reset); the device must not hang
    // or crash, and reset brings it back.
    h.d.set_status(0);
    h.pump();
    h.d.init(ALL, 256).unwrap();
    h.pump();
    assert_eq!(h.write(0, &pattern(8, 512)), req_status::OK);
    assert_eq!(h.read(0, 512).1, pattern(8, 512));
}

#[test]
fn buffers_straddling_a_memory_hole_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    // RAM [0, 8 MiB) and [9 MiB, 16 MiB): a hole in between.
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 8 << 20),
        (GuestAddress(9 << 20), 7 << 20),
    ])
    .unwrap();
    let blk = Block::new(cfg(&path, false, None)).unwrap();
    let mut h = H::with_block_mem(blk, path, Some(dir), ALL, mem);
    let hd = h.header(req_type::IN, 0);
    let st = h.d.buf(1);
    let u = raw(
        &mut h,
        &[
            (10, rd(hd, 16, NEXT, 11)),
            (
                11,
                rd(GuestAddress((8 << 20) - 512), 1024, WRITE | NEXT, 12),
            ),
            (12, rd(st, 1, WRITE, 0)),
        ],
        10,
    );
    assert_eq!(u.len(), 1);
    assert_eq!(h.d.read_buf(st, 1)[0], req_status::IOERR);
    // Adjacent regions are fine: a buffer may span them.
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 8 << 20),
        (GuestAddress(8 << 20), 8 << 20),
    ])
    .unwrap();
    std::fs::write(&path, pattern(6, DISK_SIZE as usize)).unwrap();
    let blk = Block::new(cfg(&path, false, None)).unwrap();
    let mut h = H::with_block_mem(blk, path, Some(dir), ALL, mem);
    let hd = h.header(req_type::IN, 0);
    let st = h.d.buf(1);
    let at = GuestAddress((8 << 20) - 512);
    let u = raw(
        &mut h,
        &[
            (10, rd(hd, 16, NEXT, 11)),
            (11, rd(at, 1024, WRITE | NEXT, 12)),
            (12, rd(st, 1, WRITE, 0)),
        ],
        10,
    );
    assert_eq!(u[0].len, 1025);
    assert_eq!(h.d.read_buf(st, 1)[0], req_status::OK);
    assert_eq!(h.d.read_buf(at, 1024), pattern(6, 1024));
}

#[test]
fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    {
        let blk = Block::new(cfg(&path, false, None)).unwrap();
        let mut h = H::with_block(blk, path.clone(), None, ALL);
        assert_eq!(h.write(64, &pattern(0x42, 65536)), req_status::OK);
        assert_eq!(h.simple(req_type::FLUSH, 0), req_status::OK);
    }
    {
        let blk = Block::new(cfg(&path, false, None)).unwrap();
        let mut h = H::with_block(blk, path.clone(), None, ALL);
        assert_eq!(h.read(64, 65536).1, pattern(0x42, 65536));
    }
    // A partial trailing sector is not exposed: 100 more bytes change
    // neither the capacity nor what reads past the last whole sector do.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&[0x77u8; 100]).unwrap();
    drop(f);
    let blk = Block::new(cfg(&path, false, None)).unwrap();
    assert_eq!(blk.capacity(), DISK_SIZE / 512);
    let mut h = H::with_block(blk, path.clone(), Some(dir), ALL);
    let mut c = [0u8; 8];
    h.d.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), DISK_SIZE / 512);
    let last = DISK_SIZE / 512 - 1;
    assert_eq!(h.read(last, 512), (req_status::OK, vec![0u8; 512]));
    assert_eq!(h.read(last, 1024).0, req_status::IOERR);
    assert_eq!(h.read(last + 1, 512).0, req_status::IOERR);
    assert_eq!(h.write(last + 1, &[1u8; 512]), req_status::IOERR);
    assert_eq!(h.read(64, 65536).1, pattern(0x42, 65536));
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len() as u64, DISK_SIZE + 100);
    assert_eq!(&on_disk[DISK_SIZE as usize..], &[0x77u8; 100][..]);
}

#[test]
fn status_illegal_transitions_after_activation() {
    let mut h = H::new(ALL, false, None);
    let s = h.d.status();
    // Clearing DRIVER_OK without reset is ignored; the device keeps working.
    h.d.set_status(s & !status::DRIVER_OK);
    assert_eq!(h.d.status(), s);
    // Queue registers are frozen after DRIVER_OK.
    h.d.write_reg(regs::QUEUE_SEL, 0);
    h.d.write_reg(regs::QUEUE_DESC_LOW, 0xdead_0000);
    assert_eq!(h.write(0, &[3u8; 512]), req_status::OK);
    // FAILED stops nothing that is already running but sticks.
    h.d.set_status(s | status::FAILED);
    assert_ne!(h.d.status() & status::FAILED, 0);
}

/// A reset while a long flush is in flight waits for that one request only:
/// the requests queued behind it are not started, and the device comes
/// back after re-initialisation.
#[test]
fn reset_during_a_slow_flush_waits_for_that_request_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), DISK_SIZE);
    let started = Arc::new(Mutex::new(None));
    let blk = Block::with_syncer(
        cfg(&path, false, None),
        Box::new(SlowSync {
            started: started.clone(),
        }),
    )
    .unwrap();
    let mut h = H::with_block(blk, path.clone(), Some(dir), ALL);
    let fl = h.header(req_type::FLUSH, 0);
    let fs = h.d.buf_with(&[0xff]);
    h.d.add_chain(0, &[Seg::ro(fl, 16), Seg::wo(fs, 1)]);
    for i in 0..3u64 {
        let hd = h.header(req_type::OUT, i * 8);
        let b = h.d.buf_with(&[0xab; 4096]);
        let s = h.d.buf_with(&[0xff]);
        h.d.add_chain(0, &[Seg::ro(hd, 16), Seg::ro(b, 4096), Seg::wo(s, 1)]);
    }
    h.d.notify(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while started.lock().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the flush never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    h.d.set_status(0);
    let took = t0.elapsed();
    let flush_took = started.lock().unwrap().unwrap().elapsed();
    assert_eq!(h.d.status(), 0);
    assert!(
        flush_took >= Duration::from_secs(2),
        "reset returned mid-flush"
    );
    assert!(took < Duration::from_secs(3), "reset took {took:?}");
    // The writes behind the flush never ran.
    assert_eq!(&h.file()[..3 * 4096], &[0u8; 3 * 4096][..]);
    h.d.init(ALL, 256).unwrap();
    h.pump();
    assert_eq!(h.write(0, &pattern(9, 4096)), req_status::OK);
    assert_eq!(h.read(0, 4096).1, pattern(9, 4096));
}
