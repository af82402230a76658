//! virtio-net (virtio 1.2 §5.1) on a host TAP interface or on passt.
//!
//! - [`tap`]: attaching to an existing persistent TAP through
//!   `/dev/net/tun` with `IFF_VNET_HDR`, and setting its offloads.
//! - [`passt`]: rootless user-mode networking: frames over passt's QEMU
//!   stream protocol (a 32-bit big-endian length before each frame, no
//!   virtio-net header), short reads and writes and passt going away.
//! - [`backend`]: what the device needs of its host end (the TAP, passt, or
//!   a SOCK_SEQPACKET socket for tests and fuzzing), including the offloads
//!   it can honour.
//! - [`device`]: the `VirtioDevice`: features (the backend's offloads),
//!   config space (MAC, link status), TX (guest frames written to the
//!   backend straight from guest memory with `writev`, held back while it is
//!   full) and RX (frames read from the backend into guest buffers, merged
//!   over several buffers with MRG_RXBUF).
//! - [`event_handler`]: the event-loop glue; the backend is polled for
//!   input only while the guest has RX buffers, for output only while a
//!   short write left bytes queued, and not at all once the link is lost.

pub mod backend;
pub mod device;
pub mod event_handler;
pub mod passt;
pub mod tap;

#[cfg(any(test, feature = "test-utils"))]
pub mod netns;
#[cfg(test)]
mod passt_tests;
#[cfg(test)]
mod tests;

pub use backend::{NetBackend, SeqPacketBackend};
pub use device::Net;
pub use tap::Tap;

/// Queue size offered to the driver (rx and tx).
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RXQ: usize = 0;
/// Index of the transmit queue.
pub const TXQ: usize = 1;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): the header in front of
/// every frame, both ways, once VERSION_1 is negotiated.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with its header: a 64 KiB GSO packet, the Ethernet
/// header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65535 + 14 + 4;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// How the guest NIC is wired to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of an existing TAP interface (`ip tuntap add NAME mode tap`).
    pub tap: String,
    /// The guest's MAC; `None` picks a random locally administered one.
    pub mac: Option<MacAddr>,
}

/// Why a net device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid TAP name {0:?}")]
    InvalidName(String),
    #[error("TAP interface {0} does not exist (create it with `ip tuntap add {0} mode tap`)")]
    NoSuchTap(String),
    #[error("interface {0} is not a TAP device")]
    NotATap(String),
    #[error("TAP interface {0} is busy (attached by another process)")]
    Busy(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    #[error("TAP {name}: {op}: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid MAC address {0:?} (expected xx:xx:xx:xx:xx:xx, unicast)")]
    InvalidMac(String),
    #[error("net device: {0}")]
    Io(#[from] std::io::Error),
}

/// Parse `xx:xx:xx:xx:xx:xx`; multicast addresses are refused.
pub fn parse_mac(s: &str) -> Result<MacAddr, NetError> {
    let bad = || NetError::InvalidMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> MacAddr {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most mac.len() bytes into mac.
    let r = unsafe { libc::getrandom(mac.as_mut_ptr() as *mut libc::c_void, mac.len(), 0) };
    if r != mac.len() as isize {
        // Fall back to something unique enough for one host.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0) as u64
            ^ u64::from(std::process::id());
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}
