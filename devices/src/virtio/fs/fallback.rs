//! Requests the monitor answers itself once the vhost-user backend is gone:
//! each FUSE request gets a reply header with `-EIO`, so the guest's
//! filesystem calls fail instead of waiting forever. Replies carry the
//! request's `unique`; chains without a reply buffer (FORGET, the hiprio
//! queue's requests) are returned with nothing written.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes};

use crate::warn_limited;
use crate::GuestMemoryMmap;

/// `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;

/// `struct fuse_out_header` (little endian, as the guest is x86).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes).
unsafe impl ByteValued for OutHeader {}

/// Takes over `queue` from a backend that is gone: the next chain to serve
/// is the first one the backend did not return (its used index).
pub fn take_over(mem: &GuestMemoryMmap, queue: &mut Queue) {
    match queue.used_idx(mem, Ordering::Acquire) {
        Ok(used) => {
            queue.set_next_avail(used.0);
            queue.set_next_used(used.0);
        }
        Err(e) => warn_limited!("virtio-fs: reading the used index: {e}"),
    }
}

/// Answer one chain; returns the bytes written to it.
pub fn fail_chain(mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) -> u32 {
    let mut header = [0u8; IN_HEADER_LEN];
    let mut got = 0usize;
    for d in chain {
        if !d.is_write_only() {
            let n = (d.len() as usize).min(IN_HEADER_LEN - got);
            if n > 0 && mem.read_slice(&mut header[got..got + n], d.addr()).is_err() {
                return 0;
            }
            got += n;
            continue;
        }
        if got < IN_HEADER_LEN || (d.len() as usize) < OUT_HEADER_LEN {
            return 0;
        }
        let mut unique = [0u8; 8];
        unique.copy_from_slice(&header[8..16]);
        let reply = OutHeader {
            len: OUT_HEADER_LEN as u32,
            error: -libc::EIO,
            unique: u64::from_le_bytes(unique),
        };
        return match mem.write_obj(reply, d.addr()) {
            Ok(()) => OUT_HEADER_LEN as u32,
            Err(_) => 0,
        };
    }
    0
}

/// Serve every pending chain of `queue` with an error; true if any was
/// returned (the caller signals the interrupt).
pub fn drain(mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
    let mut added = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let n = fail_chain(mem, chain);
        match queue.add_used(mem, head, n) {
            Ok(()) => added = true,
            Err(e) => warn_limited!("virtio-fs: add_used({head}): {e}"),
        }
    }
    added
}
