//! virtio-fs (virtio 1.2 §5.11) over vhost-user: the queues run in an
//! external backend (virtiofsd); the monitor only owns the device's config
//! space and the control plane.
//!
//! - [`frontend`]: the vhost-user session with the backend (features,
//!   memory table, vrings), every message bounded by a socket timeout.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) on the MMIO
//!   transport. Its event-loop side starts the backend's vrings after
//!   DRIVER_OK, relays the backend's call eventfds to the interrupt line
//!   (InterruptStatus then reads "used buffer"), and watches the socket.
//! - [`fallback`]: once the backend is gone, the monitor answers every
//!   request itself with a FUSE error (EIO), so the guest sees I/O errors
//!   instead of requests that never complete.

pub mod device;
#[cfg(test)]
mod device_tests;
pub mod fallback;
pub mod frontend;

pub use device::Fs;

/// The longest tag the config space holds (virtio 1.2 §5.11.4).
pub const TAG_LEN: usize = 36;
/// Queue 0 is the high-priority queue, 1.. the request queues.
pub const NUM_REQUEST_QUEUES: usize = 1;
/// hiprio + request queues.
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 1024;

/// Why a tag cannot name a virtio-fs device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TagError {
    #[error("the tag is empty")]
    Empty,
    #[error("tag {0:?} is longer than {TAG_LEN} bytes")]
    TooLong(String),
    #[error("tag {0:?} may hold only letters, digits, '-', '_' and '.'")]
    BadChar(String),
}

/// A tag the guest can mount by (`mount -t virtiofs TAG DIR`) and the
/// command line can name (`b2p.fs=TAG:/path`): 1 to 36 bytes of
/// `[A-Za-z0-9._-]`.
pub fn check_tag(tag: &str) -> Result<(), TagError> {
    if tag.is_empty() {
        return Err(TagError::Empty);
    }
    if tag.len() > TAG_LEN {
        return Err(TagError::TooLong(tag.into()));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(TagError::BadChar(tag.into()));
    }
    Ok(())
}

/// The device's config space: the tag, NUL-padded, then
/// `num_request_queues` (le32).
pub fn config_space(tag: &str) -> [u8; TAG_LEN + 4] {
    let mut c = [0u8; TAG_LEN + 4];
    let n = tag.len().min(TAG_LEN);
    c[..n].copy_from_slice(&tag.as_bytes()[..n]);
    c[TAG_LEN..].copy_from_slice(&(NUM_REQUEST_QUEUES as u32).to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(check_tag("home"), Ok(()));
        assert_eq!(check_tag(&"a".repeat(36)), Ok(()));
        assert!(matches!(
            check_tag(&"a".repeat(37)),
            Err(TagError::TooLong(_))
        ));
        assert_eq!(check_tag(""), Err(TagError::Empty));
        for bad in ["a:b", "a,b", "a b", "a/b", "é"] {
            assert!(matches!(check_tag(bad), Err(TagError::BadChar(_))), "{bad}");
        }
    }

    #[test]
    fn config_layout() {
        let c = config_space("src");
        assert_eq!(&c[..4], b"src\0");
        assert!(c[3..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&c[TAG_LEN..], &1u32.to_le_bytes());
    }
}
