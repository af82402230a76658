//! The Unix-socket backend of the vsock device: it owns the host listeners,
//! the pending `CONNECT` handshakes, the connection table, the timeouts and
//! the queue of connections that owe the guest a packet.
//!
//! Everything host-side is polled through one nested epoll fd
//! ([`Muxer::as_raw_fd`]) that the device registers with the event loop;
//! [`Muxer::process_events`] handles what it reports. Epoll entries carry a
//! per-registration token, never a raw fd, so a recycled fd number cannot
//! receive a stale event.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections and, apart from them,
//! [`MAX_HANDSHAKES`] pending `CONNECT` handshakes (the oldest gives way to
//! a new one, and each is drained into its own line buffer so a stalled
//! client leaves nothing readable to wake the loop); the RX
//! queue holds each connection at most once plus RSTs for unknown
//! connections, and [`Muxer::tx_blocked`] tells the device to stop taking
//! TX packets while that queue is long (the guest must take RX first).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::warn_limited;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Kill};
use super::listener::{connect_nonblocking, HostListener};
use super::packet::{Hdr, TxPacket};
use super::{
    op, VsockError, CONN_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECT_LINE, MAX_HANDSHAKES,
    VSOCK_HOST_CID, VSOCK_TYPE_STREAM,
};

/// TX processing pauses while this many packets wait for RX buffers.
pub const RXQ_SOFT_LIMIT: usize = 256;
/// First host-side port for host-initiated connections (as Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A connection is named by (host-side port, guest port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local: u32,
    pub peer: u32,
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Timer,
    /// Index into `listeners`.
    Listener(usize),
    Handshake,
    Conn(ConnKey),
}

#[derive(Debug)]
enum ListenKind {
    /// The hybrid socket: `CONNECT <port>\n` first.
    Hybrid,
    /// Joined to this guest port with no handshake.
    Port(u32),
}

#[derive(Debug)]
struct Listener {
    sock: HostListener,
    kind: ListenKind,
}

/// A host client on the hybrid socket that has not finished its
/// `CONNECT <port>\n` line. The bytes of the line read so far are kept
/// here, so the socket is drained on every event and a client that stops
/// mid-line leaves nothing readable behind to wake the level-triggered
/// event loop again (issue 11, item 6).
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    deadline: Instant,
    line: [u8; MAX_CONNECT_LINE],
    len: usize,
}

/// What one look at a handshake socket found.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// The line is complete (without its newline).
    Done,
    /// No newline yet; everything readable was taken.
    Partial,
    /// End of file, an error, or a line too long: drop the client.
    Failed,
}

#[derive(Debug, Clone, Copy)]
enum RxItem {
    Conn(ConnKey),
    Rst(ConnKey),
}

/// The host side of the vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    timer: TimerFd,
    timer_at: Option<Instant>,
    listeners: Vec<Listener>,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, Owner>,
    next_token: u64,
    rxq: VecDeque<RxItem>,
    next_local_port: u32,
}

const TIMER_TOKEN: u64 = 0;

impl Muxer {
    /// Listen on `uds_path` (hybrid) and on each port listener path.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        port_listeners: &[(u32, PathBuf)],
    ) -> Result<Self, VsockError> {
        let mut paths: Vec<&Path> = vec![uds_path];
        for (_, p) in port_listeners {
            if paths.contains(&p.as_path()) {
                return Err(VsockError::DuplicatePath(p.clone()));
            }
            paths.push(p);
        }
        let epoll = Epoll::new()?;
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // Re-arming clears a pending expiry, so a reported timer event may
        // have nothing to read by the time it is handled: never block on it.
        // SAFETY: fcntl on a timerfd we own.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            epoll,
            timer,
            timer_at: None,
            listeners: Vec::new(),
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: TIMER_TOKEN + 1,
            rxq: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        };
        m.epoll.ctl(
            ControlOperation::Add,
            m.timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        m.tokens.insert(TIMER_TOKEN, Owner::Timer);
        let mut all = vec![(ListenKind::Hybrid, uds_path.to_path_buf())];
        all.extend(
            port_listeners
                .iter()
                .map(|(port, p)| (ListenKind::Port(*port), p.clone())),
        );
        for (kind, path) in all {
            let sock = HostListener::bind(&path)?;
            let token = m.new_token(Owner::Listener(m.listeners.len()));
            m.epoll.ctl(
                ControlOperation::Add,
                sock.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )?;
            info!("vsock: listening on {} ({kind:?})", path.display());
            m.listeners.push(Listener { sock, kind });
        }
        Ok(m)
    }

    fn new_token(&mut self, owner: Owner) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.tokens.insert(t, owner);
        t
    }

    /// Open connections (host-side view), for tests and stats.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Something waits for an RX buffer.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// The device should stop taking TX packets until RX drains.
    pub fn tx_blocked(&self) -> bool {
        self.rxq.len() >= RXQ_SOFT_LIMIT
    }

    fn push_rst(&mut self, key: ConnKey) {
        self.rxq.push_back(RxItem::Rst(key));
    }

    fn rst_hdr(&self, key: ConnKey) -> Hdr {
        Hdr {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn arm_timer(&mut self, at: Instant) {
        if self.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        let d = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(d, None) {
            Ok(()) => self.timer_at = Some(at),
            Err(e) => warn_limited!("vsock: arming the timer: {e}"),
        }
    }

    fn epoll_set(&self, fd: RawFd, old: Option<EventSet>, new: Option<EventSet>, token: u64) {
        let r = match (old, new) {
            (None, Some(e)) => self
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(e, token)),
            (Some(o), Some(e)) if o != e => {
                self.epoll
                    .ctl(ControlOperation::Modify, fd, EpollEvent::new(e, token))
            }
            (Some(_), None) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            _ => Ok(()),
        };
        if let Err(e) = r {
            warn_limited!("vsock: epoll_ctl on fd {fd}: {e}");
        }
    }

    /// Bring the tables in line with what a connection now wants.
    fn sync_conn(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(kill) = c.kill {
            let c = match self.conns.remove(&key) {
                Some(c) => c,
                None => return,
            };
            self.epoll_set(c.stream().as_raw_fd(), c.registered, None, c.token);
            self.tokens.remove(&c.token);
            if kill == Kill::Rst {
                self.push_rst(key);
            }
            debug!(
                "vsock: connection {}<->{} closed ({kill:?})",
                key.local, key.peer
            );
            return;
        }
        let want = c.interest();
        let (fd, old, token) = (c.stream().as_raw_fd(), c.registered, c.token);
        c.registered = want;
        let queue = c.has_pending_rx() && !c.queued;
        if queue {
            c.queued = true;
        }
        let deadline = c.deadline;
        self.epoll_set(fd, old, want, token);
        if queue {
            self.rxq.push_back(RxItem::Conn(key));
        }
        if let Some(d) = deadline {
            self.arm_timer(d);
        }
    }

    fn add_conn(&mut self, key: ConnKey, mut c: Connection) {
        c.token = self.new_token(Owner::Conn(key));
        self.conns.insert(key, c);
        self.sync_conn(key);
    }

    /// Connections are bounded apart from handshakes, so clients that never
    /// finish a `CONNECT` line cannot keep real connections out.
    fn at_capacity(&self) -> bool {
        self.conns.len() >= MAX_CONNECTIONS
    }

    /// Pending CONNECT handshakes (for tests and stats).
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// With the handshake table full, the oldest handshake makes room for a
    /// new one: a client that writes its line at once always gets in, and a
    /// flood of silent clients only evicts itself.
    fn evict_oldest_handshake(&mut self) {
        if self.handshakes.len() < MAX_HANDSHAKES {
            return;
        }
        let oldest = self
            .handshakes
            .iter()
            .min_by_key(|(t, h)| (h.deadline, **t))
            .map(|(t, _)| *t);
        if let Some(t) = oldest {
            debug!("vsock: handshake table full; dropping the oldest");
            self.drop_handshake(t);
        }
    }

    fn alloc_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.contains_key(&ConnKey { local: p, peer }) {
                return p;
            }
        }
    }

    /// A packet from the guest.
    pub fn send_pkt(&mut self, pkt: &TxPacket<'_>) {
        let h = &pkt.hdr;
        if h.src_cid != self.guest_cid {
            debug!("vsock: dropping a packet with source CID {}", h.src_cid);
            return;
        }
        let key = ConnKey {
            local: h.dst_port,
            peer: h.src_port,
        };
        if h.dst_cid != VSOCK_HOST_CID || h.type_ != VSOCK_TYPE_STREAM {
            debug!(
                "vsock: packet to CID {} type {}: refused",
                h.dst_cid, h.type_
            );
            if h.op != op::RST {
                self.push_rst(key);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.send_pkt(pkt);
            self.sync_conn(key);
            return;
        }
        match h.op {
            op::REQUEST => self.guest_connect(key, h),
            op::RST => {}
            _ => self.push_rst(key),
        }
    }

    fn guest_connect(&mut self, key: ConnKey, h: &Hdr) {
        if self.at_capacity() {
            warn_limited!(
                "vsock: connection limit reached; refusing guest port {}",
                key.peer
            );
            self.push_rst(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                debug!(
                    "vsock: guest port {} -> {}",
                    key.peer,
                    Path::new(&path).display()
                );
                self.add_conn(key, Connection::new_peer(stream, h, self.guest_cid));
            }
            Err(e) => {
                debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&path).display()
                );
                self.push_rst(key);
            }
        }
    }

    /// The next packet for the guest, `buf` being the RX payload space.
    pub fn recv_pkt(&mut self, buf: Option<&VolatileSlice<'_, ()>>) -> Option<Hdr> {
        for _ in 0..self.rxq.len() {
            match self.rxq.pop_front()? {
                RxItem::Rst(key) => return Some(self.rst_hdr(key)),
                RxItem::Conn(key) => {
                    let Some(c) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    c.queued = false;
                    let h = c.recv_pkt(buf);
                    self.sync_conn(key);
                    if h.is_some() {
                        return h;
                    }
                }
            }
        }
        None
    }

    /// Handle what the host side reported (never blocks).
    pub fn process_events(&mut self) {
        let mut evs = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut evs) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn_limited!("vsock: epoll_wait: {e}");
                }
                return;
            }
        };
        for ev in &evs[..n] {
            let token = ev.data();
            let Some(owner) = self.tokens.get(&token).copied() else {
                continue;
            };
            let set = ev.event_set();
            match owner {
                Owner::Timer => self.on_timer(),
                Owner::Listener(i) => self.on_listener(i),
                Owner::Handshake => self.on_handshake(token, set),
                Owner::Conn(key) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.on_host_event(set);
                        self.sync_conn(key);
                    }
                }
            }
        }
    }

    fn on_listener(&mut self, i: usize) {
        // Bounded per round so one busy listener cannot starve the loop.
        for _ in 0..64 {
            let Some(l) = self.listeners.get(i) else {
                return;
            };
            let stream = match l.sock.accept() {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(e) => {
                    warn_limited!("vsock: accept on {}: {e}", l.sock.path().display());
                    return;
                }
            };
            let now = Instant::now();
            match self.listeners.get(i).map(|l| &l.kind) {
                Some(ListenKind::Hybrid) => {
                    self.evict_oldest_handshake();
                    let token = self.new_token(Owner::Handshake);
                    if let Err(e) = self.epoll.ctl(
                        ControlOperation::Add,
                        stream.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    ) {
                        warn_limited!("vsock: epoll add: {e}");
                        self.tokens.remove(&token);
                        continue;
                    }
                    let deadline = now + CONN_TIMEOUT;
                    self.handshakes.insert(
                        token,
                        Handshake {
                            stream,
                            deadline,
                            line: [0; MAX_CONNECT_LINE],
                            len: 0,
                        },
                    );
                    self.arm_timer(deadline);
                }
                Some(ListenKind::Port(port)) => {
                    if self.at_capacity() {
                        warn_limited!("vsock: connection limit reached; closing a host connection");
                        continue;
                    }
                    let peer = *port;
                    let local = self.alloc_local_port(peer);
                    let c = Connection::new_local(stream, local, peer, self.guest_cid, false, now);
                    self.add_conn(ConnKey { local, peer }, c);
                }
                None => return,
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) -> Option<UnixStream> {
        let hs = self.handshakes.remove(&token)?;
        self.tokens.remove(&token);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            hs.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(hs.stream)
    }

    fn on_handshake(&mut self, token: u64, set: EventSet) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        match read_line_part(hs) {
            LineRead::Partial if !set.contains(EventSet::HANG_UP) => return,
            LineRead::Partial | LineRead::Failed => {
                debug!("vsock: host connection closed or sent no CONNECT line");
                self.drop_handshake(token);
                return;
            }
            LineRead::Done => {}
        }
        let port = parse_connect(&hs.line[..hs.len]);
        let Some(stream) = self.drop_handshake(token) else {
            return;
        };
        let Some(port) = port else {
            warn_limited!("vsock: bad CONNECT line from a host client");
            return;
        };
        if self.at_capacity() {
            warn_limited!("vsock: connection limit reached; closing a host connection");
            return;
        }
        let local = self.alloc_local_port(port);
        let c = Connection::new_local(stream, local, port, self.guest_cid, true, Instant::now());
        self.add_conn(ConnKey { local, peer: port }, c);
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.timer_at = None;
        let now = Instant::now();
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            debug!("vsock: CONNECT handshake timed out");
            self.drop_handshake(t);
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(c) = self.conns.get_mut(&key) {
                c.on_timeout(now);
                self.sync_conn(key);
            }
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        if let Some(d) = next {
            self.arm_timer(d);
        }
    }

    /// Device reset: every connection and handshake is closed (host clients
    /// see EOF); the listeners stay.
    pub fn reset(&mut self) {
        let tokens: Vec<u64> = self.handshakes.keys().copied().collect();
        for t in tokens {
            self.drop_handshake(t);
        }
        for (_, c) in self.conns.drain() {
            if c.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.tokens.remove(&c.token);
        }
        self.rxq.clear();
    }
}

impl AsRawFd for Muxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// Takes what the client wrote of its `CONNECT` line, never a byte past
/// the newline (what follows is payload for the guest and stays in the
/// socket). Peeks first, then consumes exactly the line's part of what was
/// peeked, so nothing readable is left behind unless it follows the line.
fn read_line_part(hs: &mut Handshake) -> LineRead {
    loop {
        let room = MAX_CONNECT_LINE - hs.len;
        if room == 0 {
            return LineRead::Failed;
        }
        let mut peek = [0u8; MAX_CONNECT_LINE];
        // SAFETY: `peek` is writable for `room <= MAX_CONNECT_LINE` bytes.
        let n = unsafe {
            libc::recv(
                hs.stream.as_raw_fd(),
                peek.as_mut_ptr() as *mut libc::c_void,
                room,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => LineRead::Partial,
                _ => LineRead::Failed,
            };
        }
        let n = n as usize;
        if n == 0 {
            return LineRead::Failed;
        }
        let nl = peek[..n].iter().position(|&b| b == b'\n');
        let take = nl.map_or(n, |i| i + 1);
        let dst = &mut hs.line[hs.len..hs.len + take];
        // SAFETY: `dst` is writable for `take` bytes; the same bytes were
        // just peeked, so this consumes exactly them.
        let r = unsafe {
            libc::recv(
                hs.stream.as_raw_fd(),
                dst.as_mut_ptr() as *mut libc::c_void,
                take,
                libc::MSG_DONTWAIT,
            )
        };
        if r != take as isize {
            return LineRead::Failed;
        }
        match nl {
            Some(_) => {
                hs.len += take - 1;
                return LineRead::Done;
            }
            None => hs.len += take,
        }
    }
}

/// `CONNECT <port>` (an optional `\r` before the newline is accepted).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
