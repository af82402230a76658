//! One guest<->host vsock stream: the connection state machine and its
//! credit-based flow control (virtio 1.2 §5.10.6.3).
//!
//! Host -> guest: bytes are read from the host socket straight into a guest
//! RX buffer, never more than the guest's advertised free space
//! (`buf_alloc - (rx_cnt - fwd_cnt)`); with no credit the socket is not
//! polled and a CREDIT_REQUEST goes to the guest.
//! Guest -> host: payloads are written to the host socket; what it does not
//! take waits in a [`TxBuf`] bounded by the `buf_alloc` we advertise, so a
//! guest that overruns its credit is reset. `fwd_cnt` counts bytes the host
//! socket accepted, and a CREDIT_UPDATE goes out when enough was freed.
//!
//! The connection never touches the muxer's tables: after each call the
//! muxer reads [`Connection::kill`], [`Connection::interest`],
//! [`Connection::has_pending_rx`] and [`Connection::deadline`].

use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use log::debug;

use crate::warn_limited;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::EventSet;

use super::packet::{Hdr, Payload, TxPacket};
use super::txbuf::TxBuf;
use super::{
    op, CONN_TIMEOUT, CONN_TX_BUF_SIZE, MAX_PKT_PAYLOAD, SHUTDOWN_F_BOTH, SHUTDOWN_F_RECEIVE,
    SHUTDOWN_F_SEND, VSOCK_HOST_CID, VSOCK_TYPE_STREAM,
};

/// Freed guest->host space worth a CREDIT_UPDATE.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 2;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for RESPONSE.
    LocalInit,
    /// Data flows (possibly half-closed).
    Established,
    /// Ending: waiting for the guest's RST or for the last bytes to reach
    /// the host, bounded by a deadline.
    Closing,
}

/// How a finished connection leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// The guest already knows (it sent RST).
    Silent,
    /// Tell the guest with an RST.
    Rst,
}

const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_CREDIT_UPDATE: u8 = 4;
const P_CREDIT_REQUEST: u8 = 8;
const P_SHUTDOWN: u8 = 16;

/// `send(2)` with MSG_NOSIGNAL: a host peer that went away gives EPIPE,
/// never SIGPIPE.
fn send_raw(stream: &UnixStream, ptr: *const u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: `ptr..ptr+len` is readable memory (a Rust slice or a
        // guest memory slice resolved by vm-memory) for the call.
        let r = unsafe {
            libc::send(
                stream.as_raw_fd(),
                ptr as *const libc::c_void,
                len,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `io::Write` over [`send_raw`].
struct NoSigWriter<'a>(&'a UnixStream);

impl Write for NoSigWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_raw(self.0, buf.as_ptr(), buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_payload(stream: &UnixStream, p: &Payload<'_>) -> io::Result<usize> {
    match p {
        Payload::None => Ok(0),
        Payload::Guest(s) => {
            let guard = s.ptr_guard();
            send_raw(stream, guard.as_ptr(), s.len())
        }
        Payload::Owned(v) => send_raw(stream, v.as_ptr(), v.len()),
    }
}

fn read_into(stream: &UnixStream, buf: &VolatileSlice<'_, ()>) -> io::Result<usize> {
    loop {
        let guard = buf.ptr_guard_mut();
        // SAFETY: the slice is guest memory resolved by vm-memory, valid for
        // writes of `buf.len()` bytes for the call.
        let r = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                guard.as_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Our (host-side) vsock port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    guest_cid: u64,
    state: State,
    /// Answer `OK <local_port>\n` to the host when the guest accepts.
    hybrid: bool,
    /// Bytes at the front of `txbuf` that are not guest data (the OK line).
    prefix_left: usize,
    // Host -> guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host socket may have bytes for the guest.
    rx_ready: bool,
    host_eof: bool,
    host_hup: bool,
    credit_requested: bool,
    // Guest -> host.
    tx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_to_peer: Wrapping<u32>,
    txbuf: TxBuf,
    /// SHUTDOWN flags the guest sent.
    peer_shut: u32,
    host_write_shut: bool,
    /// Control packets owed to the guest (P_* bits).
    pending: u8,
    shutdown_flags: u32,
    /// When the current wait (RESPONSE, RST, flush) gives up.
    pub deadline: Option<Instant>,
    /// Set once the connection is over.
    pub kill: Option<Kill>,
    /// Muxer bookkeeping: in the RX queue.
    pub queued: bool,
    /// Muxer bookkeeping: epoll token and registered interest.
    pub token: u64,
    pub registered: Option<EventSet>,
}

impl Connection {
    fn base(stream: UnixStream, local_port: u32, peer_port: u32, guest_cid: u64) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state: State::LocalInit,
            hybrid: false,
            prefix_left: 0,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_ready: false,
            host_eof: false,
            host_hup: false,
            credit_requested: false,
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            txbuf: TxBuf::new(CONN_TX_BUF_SIZE as usize),
            peer_shut: 0,
            host_write_shut: false,
            pending: 0,
            shutdown_flags: 0,
            deadline: None,
            kill: None,
            queued: false,
            token: 0,
            registered: None,
        }
    }

    /// A host client connected (through a port listener, or the hybrid
    /// socket after `CONNECT`): ask the guest with a REQUEST.
    pub fn new_local(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        hybrid: bool,
        now: Instant,
    ) -> Self {
        let mut c = Self::base(stream, local_port, peer_port, guest_cid);
        c.hybrid = hybrid;
        c.pending = P_REQUEST;
        c.deadline = Some(now + CONN_TIMEOUT);
        c
    }

    /// The guest's REQUEST reached a host listener: answer RESPONSE.
    pub fn new_peer(stream: UnixStream, req: &Hdr, guest_cid: u64) -> Self {
        let mut c = Self::base(stream, req.dst_port, req.src_port, guest_cid);
        c.state = State::Established;
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c.pending = P_RESPONSE;
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Bytes the guest can still take.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.peer_shut & SHUTDOWN_F_RECEIVE == 0
            && !self.host_eof
            && self.kill.is_none()
    }

    /// Something is owed to the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.kill.is_none()
            && (self.pending != 0
                || (self.rx_ready && self.can_send_data() && self.peer_free() > 0))
    }

    /// Epoll interest on the host stream; `None` means not registered.
    pub fn interest(&self) -> Option<EventSet> {
        if self.kill.is_some() || self.host_hup {
            return None;
        }
        let mut e = EventSet::empty();
        if !self.rx_ready && self.can_send_data() && self.peer_free() > 0 {
            e |= EventSet::IN;
        }
        if !self.txbuf.is_empty() {
            e |= EventSet::OUT;
        }
        Some(e)
    }

    fn hdr(&mut self, op_: u16, len: u32) -> Hdr {
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        self.pending &= !P_CREDIT_UPDATE;
        Hdr {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn reset(&mut self, why: &str) {
        debug!(
            "vsock: reset {}<->{}: {why}",
            self.local_port, self.peer_port
        );
        if self.kill.is_none() {
            self.kill = Some(Kill::Rst);
        }
    }

    /// Next packet for the guest, with `buf` as payload space.
    pub fn recv_pkt(&mut self, buf: Option<&VolatileSlice<'_, ()>>) -> Option<Hdr> {
        if self.kill.is_some() {
            return None;
        }
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            return Some(self.hdr(op::REQUEST, 0));
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            return Some(self.hdr(op::RESPONSE, 0));
        }
        if self.rx_ready && self.can_send_data() {
            if let Some(h) = self.recv_data(buf) {
                return Some(h);
            }
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            return Some(self.hdr(op::CREDIT_UPDATE, 0));
        }
        if self.pending & P_CREDIT_REQUEST != 0 {
            self.pending &= !P_CREDIT_REQUEST;
            return Some(self.hdr(op::CREDIT_REQUEST, 0));
        }
        if self.pending & P_SHUTDOWN != 0 && self.kill.is_none() {
            self.pending &= !P_SHUTDOWN;
            let mut h = self.hdr(op::SHUTDOWN, 0);
            h.flags = self.shutdown_flags;
            return Some(h);
        }
        None
    }

    fn recv_data(&mut self, buf: Option<&VolatileSlice<'_, ()>>) -> Option<Hdr> {
        let credit = self.peer_free();
        if credit == 0 {
            self.rx_ready = self.host_hup;
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending |= P_CREDIT_REQUEST;
            }
            return None;
        }
        let buf = buf?;
        let max = buf.len().min(credit as usize).min(MAX_PKT_PAYLOAD as usize);
        if max == 0 {
            return None;
        }
        let sub = buf.subslice(0, max).ok()?;
        match read_into(&self.stream, &sub) {
            Ok(0) => {
                self.host_eof = true;
                self.rx_ready = false;
                self.shutdown_flags = SHUTDOWN_F_SEND;
                if self.host_hup {
                    // The host side is gone entirely.
                    self.begin_close();
                }
                self.pending |= P_SHUTDOWN;
                None
            }
            Ok(n) => {
                if n < max && !self.host_hup {
                    self.rx_ready = false;
                }
                self.rx_cnt += Wrapping(n as u32);
                if self.peer_free() == 0 && !self.credit_requested {
                    // Out of credit: ask now rather than wait for the guest.
                    self.credit_requested = true;
                    self.pending |= P_CREDIT_REQUEST;
                }
                Some(self.hdr(op::RW, n as u32))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.rx_ready = false;
                None
            }
            Err(e) => {
                self.reset(&format!("host read: {e}"));
                None
            }
        }
    }

    /// Say SHUTDOWN(both) and wait (bounded) for the guest's RST.
    fn begin_close(&mut self) {
        self.shutdown_flags = SHUTDOWN_F_BOTH;
        self.pending |= P_SHUTDOWN;
        if self.state != State::Closing {
            self.state = State::Closing;
            self.deadline = Some(Instant::now() + CONN_TIMEOUT);
        }
    }

    /// A packet from the guest for this connection.
    pub fn send_pkt(&mut self, pkt: &TxPacket<'_>) {
        let h = &pkt.hdr;
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
        match h.op {
            op::RESPONSE if self.state == State::LocalInit => {
                self.state = State::Established;
                self.deadline = None;
                if self.hybrid {
                    let line = format!("OK {}\n", self.local_port);
                    if self.txbuf.push_bytes(line.as_bytes()).is_err() {
                        self.reset("OK line");
                        return;
                    }
                    self.prefix_left = line.len();
                    self.flush();
                }
            }
            op::RW => self.guest_data(&pkt.payload),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.pending |= P_CREDIT_UPDATE,
            op::SHUTDOWN => {
                self.peer_shut |= h.flags & SHUTDOWN_F_BOTH;
                if self.peer_shut == SHUTDOWN_F_BOTH {
                    self.state = State::Closing;
                    self.deadline = Some(Instant::now() + CONN_TIMEOUT);
                }
                self.after_flush();
            }
            op::RST => self.kill = Some(Kill::Silent),
            other => self.reset(&format!("unexpected op {other} in state {:?}", self.state)),
        }
    }

    fn guest_data(&mut self, payload: &Payload<'_>) {
        if self.state != State::Established || self.peer_shut & SHUTDOWN_F_SEND != 0 {
            self.reset("data in a state that takes none");
            return;
        }
        let len = payload.len();
        if len == 0 {
            return;
        }
        if self.host_write_shut {
            self.reset("data after the host stream was shut");
            return;
        }
        self.tx_cnt += Wrapping(len as u32);
        let mut off = 0;
        if self.txbuf.is_empty() {
            match write_payload(&self.stream, payload) {
                Ok(n) => {
                    off = n;
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.reset(&format!("host write: {e}"));
                    return;
                }
            }
        }
        if off < len && self.txbuf.push_payload(payload, off).is_err() {
            warn_limited!(
                "vsock: guest port {} overran its credit; resetting",
                self.peer_port
            );
            self.reset("credit overrun");
            return;
        }
        self.after_flush();
    }

    /// Push buffered bytes to the host.
    fn flush(&mut self) {
        if self.txbuf.is_empty() {
            return;
        }
        match self.txbuf.flush_to(&mut NoSigWriter(&self.stream)) {
            Ok(n) => {
                let prefix = n.min(self.prefix_left);
                self.prefix_left -= prefix;
                self.fwd_cnt += Wrapping((n - prefix) as u32);
            }
            Err(e) => {
                self.reset(&format!("host write: {e}"));
                return;
            }
        }
        self.after_flush();
    }

    /// Credit updates and deferred shutdowns once bytes left the buffer.
    fn after_flush(&mut self) {
        if self.kill.is_some() {
            return;
        }
        let unannounced = (self.fwd_cnt - self.last_fwd_cnt_to_peer).0;
        let guest_view_free =
            CONN_TX_BUF_SIZE.saturating_sub((self.tx_cnt - self.last_fwd_cnt_to_peer).0);
        if unannounced >= CREDIT_UPDATE_THRESHOLD
            || (unannounced > 0 && self.txbuf.is_empty() && guest_view_free < MAX_PKT_PAYLOAD)
        {
            self.pending |= P_CREDIT_UPDATE;
        }
        if !self.txbuf.is_empty() {
            return;
        }
        if self.peer_shut & SHUTDOWN_F_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.peer_shut == SHUTDOWN_F_BOTH {
            // Graceful close from the guest: everything reached the host.
            self.kill = Some(Kill::Rst);
        }
    }

    /// Readiness of the host stream.
    pub fn on_host_event(&mut self, ev: EventSet) {
        if ev.intersects(EventSet::HANG_UP | EventSet::ERROR) && !self.host_hup {
            self.host_hup = true;
            if self.state == State::LocalInit {
                self.reset("host gave up before the guest answered");
                return;
            }
            // Bytes the host sent before closing still go to the guest,
            // then SHUTDOWN; buffered guest bytes can no longer be taken.
            if !self.txbuf.is_empty() {
                self.flush();
            }
            if self.can_send_data() {
                self.rx_ready = true;
            } else {
                self.begin_close();
            }
            return;
        }
        if ev.contains(EventSet::IN) && self.can_send_data() {
            self.rx_ready = true;
        }
        if ev.contains(EventSet::OUT) {
            self.flush();
        }
    }

    /// The deadline passed.
    pub fn on_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if d <= now => {
                self.deadline = None;
                match self.state {
                    State::LocalInit => self.reset("guest did not answer the REQUEST"),
                    State::Closing => self.reset("close timed out"),
                    State::Established => {}
                }
            }
            _ => {}
        }
    }
}
