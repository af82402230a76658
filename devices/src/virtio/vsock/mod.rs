//! virtio-vsock (virtio 1.2 §5.10) in userspace, host side on Unix sockets.
//!
//! The split follows Firecracker's:
//! - [`packet`]: the 44-byte header and parsing of TX/RX descriptor chains
//!   (through the `virtio-vsock` crate).
//! - [`connection`]: one guest<->host stream: its state machine and
//!   credit-based flow control.
//! - [`txbuf`]: the bounded buffer of guest bytes the host socket has not
//!   taken yet.
//! - [`listener`]: binding the host Unix listeners (stale-socket handling).
//! - [`muxer`]: the Unix-socket backend: listeners, the `CONNECT` handshake,
//!   the connection table, timeouts, and the order in which packets go to
//!   the guest.
//! - [`device`]: the `VirtioDevice` (queues, config space, activation).
//! - [`event_handler`]: the `MutEventSubscriber` glue.
//!
//! Host protocol (Firecracker-compatible): a host client connects to
//! `uds_path`, writes `CONNECT <port>\n` and gets `OK <host_port>\n` once
//! the guest accepts (or a closed socket when it refuses). A guest
//! connection to CID 2 port `P` is joined to a new connection to
//! `<uds_path>_<P>`. Beyond Firecracker, each `(port, path)` port listener
//! joins every connection accepted on `path` to guest port `port` with no
//! handshake at all.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod listener;
pub mod muxer;
pub mod packet;
pub mod txbuf;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::Vsock;

/// The well-known CID of the host.
pub const VSOCK_HOST_CID: u64 = 2;
/// Socket type: stream (the only one offered; no SEQPACKET feature).
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2 §5.10.6).
pub mod op {
    pub const INVALID: u16 = 0;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive no more data.
pub const SHUTDOWN_F_RECEIVE: u32 = 1;
/// SHUTDOWN flags: the sender will send no more data.
pub const SHUTDOWN_F_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_F_BOTH: u32 = SHUTDOWN_F_RECEIVE | SHUTDOWN_F_SEND;

/// Event queue: the transport was reset (all connections are gone).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Size of each queue (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
/// Index of the rx queue (device -> driver).
pub const RXQ: usize = 0;
/// Index of the tx queue (driver -> device).
pub const TXQ: usize = 1;
/// Index of the event queue.
pub const EVQ: usize = 2;

/// Bytes the host side buffers per connection for guest data the host
/// socket has not taken (advertised to the guest as `buf_alloc`).
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Most open connections per device.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most pending `CONNECT` handshakes per device, apart from connections;
/// when full, the oldest is dropped for a new one.
pub const MAX_HANDSHAKES: usize = 1024;
/// Largest payload of one packet, both ways (Linux uses 64 KiB).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// How long a host-initiated connection waits for the guest's RESPONSE, a
/// `CONNECT` line may take, and a closing connection waits for the guest's
/// RST before it is reset.
pub const CONN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Longest accepted `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE: usize = 32;

/// How the guest's vsock device is wired to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 ..= u32::MAX - 1).
    pub guest_cid: u64,
    /// The hybrid socket: host clients connect here and say `CONNECT <port>`;
    /// guest connections to host port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("invalid guest CID {0}: must be between 3 and 4294967294")]
    InvalidCid(u64),
    #[error("socket path {0} is in use")]
    PathInUse(PathBuf),
    #[error("socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("socket path {0} is longer than a Unix socket address allows")]
    PathTooLong(PathBuf),
    #[error("socket path {0} is given twice")]
    DuplicatePath(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock backend: {0}")]
    Io(#[from] std::io::Error),
}
