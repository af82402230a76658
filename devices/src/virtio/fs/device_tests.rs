//! The virtio-fs device driven in-process through the MMIO transport
//! against a real virtiofsd (skipped, with a printed reason, where it is
//! not installed): FUSE_INIT and a LOOKUP answered by the backend over the
//! vhost-user vrings on memfd memory; then the backend killed: one log
//! line's worth of state change, and every request, hostile ones
//! included, answered by the monitor (EIO, or nothing written).

use std::os::unix::io::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{FileOffset, GuestAddress};

use super::fallback::{IN_HEADER_LEN, OUT_HEADER_LEN};
use super::Fs;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{Arena, RawDesc, Seg, TestDriver};
use crate::GuestMemoryMmap;

type Em = EventManager<Arc<Mutex<Fs>>>;

fn virtiofsd() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.insert(0, "/usr/libexec".into());
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

/// 1 MiB of guest memory on a memfd, mapped shared.
fn memfd_memory() -> GuestMemoryMmap {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"fs-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nothing else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(1 << 20).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        1 << 20,
        Some(FileOffset::new(f, 0)),
    )])
    .unwrap()
}

struct Backend {
    child: Child,
    dir: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// virtiofsd on a fresh folder holding `hello.txt`; our connection to it.
fn start_backend(bin: &PathBuf, name: &str) -> (Backend, UnixStream) {
    let dir = std::env::temp_dir().join(format!("b2p-fs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("share")).unwrap();
    std::fs::write(dir.join("share/hello.txt"), b"hi").unwrap();
    let sock = dir.join("s");
    let child = Command::new(bin)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(dir.join("share"))
        .args(["--sandbox=none", "--log-level=error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no virtiofsd socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    (Backend { child, dir }, stream)
}

/// A FUSE request header.
fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> [u8; IN_HEADER_LEN] {
    let mut h = [0u8; IN_HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&opcode.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h[16..24].copy_from_slice(&nodeid.to_le_bytes());
    h
}

/// Sends one request on queue 1; returns (used len, out error, out unique).
fn request(
    d: &mut TestDriver,
    em: &mut Em,
    opcode: u32,
    unique: u64,
    nodeid: u64,
    body: &[u8],
    reply_len: u32,
) -> (u32, i32, u64) {
    let h = in_header((IN_HEADER_LEN + body.len()) as u32, opcode, unique, nodeid);
    let hdr = d.buf_with(&h);
    let b = d.buf_with(body);
    let out = d.buf(OUT_HEADER_LEN + reply_len as usize);
    let mut segs = vec![Seg::ro(hdr, IN_HEADER_LEN as u32)];
    if !body.is_empty() {
        segs.push(Seg::ro(b, body.len() as u32));
    }
    segs.push(Seg::wo(out, OUT_HEADER_LEN as u32 + reply_len));
    d.add_chain(1, &segs);
    d.notify(1);
    let used = d.poll_used(1, 1, 500, || {
        em.run_with_timeout(10).unwrap();
    });
    assert_eq!(used.len(), 1, "no reply to opcode {opcode}");
    let r = d.read_buf(out, OUT_HEADER_LEN);
    let err = i32::from_le_bytes(r[4..8].try_into().unwrap());
    let uniq = u64::from_le_bytes(r[8..16].try_into().unwrap());
    (used[0].len, err, uniq)
}

fn setup(mem: GuestMemoryMmap, stream: UnixStream) -> (TestDriver, Em, Arc<Mutex<Fs>>) {
    let fs = Arc::new(Mutex::new(Fs::new("test", stream).unwrap()));
    let t = MmioTransport::new(mem.clone(), fs.clone()).unwrap();
    let mut em = Em::new().unwrap();
    em.add_subscriber(fs.clone());
    let mut d = TestDriver::new(mem, t, Arena::new(GuestAddress(0x1000), 0xf_0000));
    d.init(0, 16).unwrap();
    for _ in 0..20 {
        em.run_with_timeout(20).unwrap();
    }
    (d, em, fs)
}

#[test]
fn real_virtiofsd_then_its_death() {
    let Some(bin) = virtiofsd() else {
        eprintln!("SKIP: real_virtiofsd_then_its_death: virtiofsd is not installed");
        return;
    };
    let (mut backend, stream) = start_backend(&bin, "live");
    let (mut d, mut em, fs) = setup(memfd_memory(), stream);
    assert!(fs.lock().unwrap().is_started());
    let mut cfg = [0u8; 40];
    d.read_config(0, &mut cfg);
    assert_eq!(&cfg[..5], b"test\0");
    assert_eq!(&cfg[36..], &1u32.to_le_bytes());

    // FUSE_INIT 7.31, answered by virtiofsd.
    let mut init = [0u8; 16];
    init[0..4].copy_from_slice(&7u32.to_le_bytes());
    init[4..8].copy_from_slice(&31u32.to_le_bytes());
    let (len, err, uniq) = request(&mut d, &mut em, 26, 2, 0, &init, 64);
    assert_eq!((err, uniq), (0, 2));
    assert!(len > OUT_HEADER_LEN as u32);
    assert_ne!(d.take_interrupt(), 0, "the call eventfd was not relayed");
    // LOOKUP of a file that is there, and of one that is not.
    let (_, err, uniq) = request(&mut d, &mut em, 1, 4, 1, b"hello.txt\0", 128);
    assert_eq!((err, uniq), (0, 4));
    let (_, err, _) = request(&mut d, &mut em, 1, 6, 1, b"nope\0", 128);
    assert_eq!(err, -libc::ENOENT);

    // The backend dies: the device notices and takes the queues over.
    backend.child.kill().unwrap();
    backend.child.wait().unwrap();
    let start = Instant::now();
    while !fs.lock().unwrap().backend_gone() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the hang-up went unseen"
        );
        em.run_with_timeout(20).unwrap();
    }
    let (len, err, uniq) = request(&mut d, &mut em, 1, 8, 1, b"hello.txt\0", 128);
    assert_eq!((len, err, uniq), (OUT_HEADER_LEN as u32, -libc::EIO, 8));

    // Hostile chains: no reply buffer, a short header, a short reply
    // buffer, a buffer outside memory. Each is returned, nothing written.
    let end = d.mem_end();
    let hdr = d.buf_with(&in_header(40, 1, 10, 1));
    let small = d.buf(8);
    let cases = [
        vec![RawDesc {
            addr: hdr.0,
            len: 40,
            flags: 0,
            next: 0,
        }],
        vec![
            RawDesc {
                addr: hdr.0,
                len: 8,
                flags: 1,
                next: 1,
            },
            RawDesc {
                addr: small.0,
                len: 16,
                flags: 2,
                next: 0,
            },
        ],
        vec![
            RawDesc {
                addr: hdr.0,
                len: 40,
                flags: 1,
                next: 1,
            },
            RawDesc {
                addr: small.0,
                len: 8,
                flags: 2,
                next: 0,
            },
        ],
        vec![
            RawDesc {
                addr: end - 4,
                len: 40,
                flags: 1,
                next: 1,
            },
            RawDesc {
                addr: small.0,
                len: 16,
                flags: 2,
                next: 0,
            },
        ],
    ];
    for (i, chain) in cases.iter().enumerate() {
        for (k, desc) in chain.iter().enumerate() {
            d.write_raw_desc(
                1,
                10 + k as u16,
                RawDesc {
                    next: if desc.flags & 1 != 0 {
                        11 + k as u16
                    } else {
                        0
                    },
                    ..*desc
                },
            );
        }
        d.publish(1, 10);
        d.notify(1);
        let used = d.poll_used(1, 1, 100, || {
            em.run_with_timeout(10).unwrap();
        });
        assert_eq!(used.len(), 1, "case {i}");
        assert_eq!(used[0].len, 0, "case {i}");
    }
    assert!(fs.lock().unwrap().failed_requests() >= 5);
}

#[test]
fn anonymous_memory_is_refused_and_requests_fail() {
    let Some(bin) = virtiofsd() else {
        eprintln!(
            "SKIP: anonymous_memory_is_refused_and_requests_fail: virtiofsd is not installed"
        );
        return;
    };
    let (_backend, stream) = start_backend(&bin, "anon");
    let (mut d, mut em, fs) = setup(crate::virtio::testing::guest_memory(1 << 20), stream);
    assert!(fs.lock().unwrap().backend_gone());
    let (len, err, uniq) = request(&mut d, &mut em, 26, 2, 0, &[0u8; 16], 64);
    assert_eq!((len, err, uniq), (OUT_HEADER_LEN as u32, -libc::EIO, 2));
}

#[test]
fn a_backend_that_hangs_up_or_talks_nonsense_is_an_error_not_a_hang() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(theirs);
    let t = Instant::now();
    assert!(Fs::new("t", ours).is_err());
    // Garbage instead of a GET_FEATURES reply.
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let talker = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut b = [0u8; 12];
        // SET_OWNER, then GET_FEATURES: answer the second with junk.
        let _ = theirs.read_exact(&mut b);
        let _ = theirs.read_exact(&mut b);
        let _ = theirs.write_all(&[0xff; 20]);
    });
    assert!(Fs::new("t", ours).is_err());
    talker.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
}
