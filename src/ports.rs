//! Published container ports on the host's loopback: the VM process follows
//! the agent's `io.b2p.Machine.WatchPorts` over the machine's hybrid vsock
//! socket, opens a listener on 127.0.0.1:HOSTPORT (and [::1]:HOSTPORT where
//! the host has it) for each TCP port a running container publishes, closes
//! it when the port goes away, and joins each accepted connection to the
//! guest through vsock port [`RELAY_PORT`] (`TCP <hostport>\n`, then bytes
//! both ways, end of file passed on as a half-close). A host port already
//! taken is one log line (and an `error` in ports.json); the others work,
//! and the taken one is tried again every [`RETRY_EVERY`] until it is free.
//! The guest is untrusted: at most [`MAX_PORTS`] ports and
//! [`MAX_CONNECTIONS`] connections at once, replies capped in size, the
//! lines it makes us log rate-limited ([`LOG_BURST`] a minute), and its
//! HOSTIP mapped by [`bind_addrs`]: empty, `0.0.0.0` or `::` (the guest's
//! "all addresses") is the host's 127.0.0.1 and [::1], never the host's
//! own wildcard (a guest must not open ports on the host's network); a
//! loopback address (127.0.0.0/8, ::1) is that address alone; anything
//! else is refused with a log line and an `error` in ports.json.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vsock::{pump, wait_hangup};

/// One line on stderr (vmm.log in the VM process).
macro_rules! note {
    ($($t:tt)*) => {
        eprintln!("b2p: published ports: {}", format_args!($($t)*))
    };
}

/// The agent's varlink port and its published-ports relay port.
pub const VARLINK_PORT: u32 = 1024;
pub const RELAY_PORT: u32 = 1026;
/// The most ports forwarded; the guest's further ones are logged once.
pub const MAX_PORTS: usize = 256;
/// Forwarded connections at once (all ports); more are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// The VM process's record of the forwarded ports, in the machine's dir.
pub const STATE_FILE: &str = "ports.json";
/// The largest WatchPorts reply taken (10,000 records fit).
const MAX_REPLY: usize = 4 << 20;
/// Lines the guest's requests may make us log per [`LOG_WINDOW`]; the rest
/// are counted and the count logged when the window turns.
pub const LOG_BURST: u32 = 8;
const LOG_WINDOW: Duration = Duration::from_secs(60);
/// How often a host port that was taken is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// A rate limit for the log lines the guest can cause.
struct LogBudget {
    since: Instant,
    used: u32,
    dropped: u64,
}

impl LogBudget {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            used: 0,
            dropped: 0,
        }
    }

    /// Logs `line` unless this window's lines are spent.
    fn note(&mut self, line: &str) {
        if self.since.elapsed() >= LOG_WINDOW {
            if self.dropped > 0 {
                note!(
                    "{} more lines about the guest's ports not logged",
                    self.dropped
                );
            }
            *self = Self::new();
        }
        if self.used < LOG_BURST {
            self.used += 1;
            note!("{line}");
        } else {
            self.dropped += 1;
        }
    }
}

/// The host addresses a guest HOSTIP is forwarded on (see the module doc),
/// or why it is refused.
pub fn bind_addrs(host_ip: &str) -> Result<Vec<IpAddr>, String> {
    let all = || {
        vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]
    };
    let ip = host_ip.trim().trim_start_matches('[').trim_end_matches(']');
    if ip.is_empty() {
        return Ok(all());
    }
    match ip.parse::<IpAddr>() {
        Ok(a) if a.is_unspecified() => Ok(all()),
        Ok(a) if a.is_loopback() => Ok(vec![a]),
        Ok(a) => Err(format!(
            "HOSTIP {a} is not a loopback or wildcard address: refused"
        )),
        Err(_) => Err(format!(
            "HOSTIP {:?} is not an address: refused",
            ip.chars().take(64).collect::<String>()
        )),
    }
}

/// One host port being forwarded (or that could not be).
struct Forward {
    host_ip: String,
    container_port: u64,
    container: String,
    listening: Vec<SocketAddr>,
    /// Addresses another program held (EADDRINUSE), with that error:
    /// tried again.
    taken: Vec<(SocketAddr, String)>,
    /// The first error that no retry mends (a refused HOSTIP, EACCES).
    failed: Option<String>,
    stop: Arc<AtomicBool>,
    fds: Vec<i32>,
}

impl Forward {
    /// What ports.json says went wrong: a lasting error first, else the
    /// first address still taken.
    fn error(&self) -> Option<&str> {
        self.failed
            .as_deref()
            .or_else(|| self.taken.first().map(|(_, msg)| msg.as_str()))
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for fd in &self.fds {
            // SAFETY: shutting down a listening socket its accept thread
            // owns wakes that thread's accept(2) (EINVAL); the descriptor
            // stays open until the thread drops its listener.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
    }
}

/// The forwarder of one machine.
pub struct Forwarder {
    uds: PathBuf,
    state: Option<File>,
    ports: BTreeMap<u16, Forward>,
    connections: Arc<AtomicUsize>,
    /// Whether the last set was over [`MAX_PORTS`] (logged on the way up).
    capped: bool,
    log: LogBudget,
    /// Whether the current WatchPorts call has answered.
    following: bool,
    /// When the taken host ports were last tried again.
    last_retry: Instant,
}

impl Forwarder {
    /// A forwarder for the guest behind the hybrid socket `uds`; `state`
    /// (ports.json, opened by the caller) gets the current set.
    pub fn new(uds: PathBuf, state: Option<File>) -> Self {
        Self {
            uds,
            state,
            ports: BTreeMap::new(),
            connections: Arc::new(AtomicUsize::new(0)),
            capped: false,
            log: LogBudget::new(),
            following: false,
            last_retry: Instant::now(),
        }
    }

    /// Follows the guest forever: connects to WatchPorts (again after each
    /// loss, every 200 ms) and applies each set it gets.
    pub fn run(mut self) -> ! {
        loop {
            if let Err(e) = self.watch() {
                if self.following {
                    note!("the agent's WatchPorts ended ({e}); retrying");
                }
            }
            self.following = false;
            self.apply(&[]);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One WatchPorts call, until the connection ends.
    fn watch(&mut self) -> Result<(), String> {
        let stream =
            crate::vsock::hybrid_connect(&self.uds, VARLINK_PORT, Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
        let mut w = stream.try_clone().map_err(|e| e.to_string())?;
        w.write_all(b"{\"method\":\"io.b2p.Machine.WatchPorts\",\"more\":true}\0")
            .map_err(|e| e.to_string())?;
        // Woken every RETRY_EVERY to try the taken host ports again; a
        // reply cut by the wake-up goes on in the same buffer.
        stream
            .set_read_timeout(Some(RETRY_EVERY))
            .map_err(|e| e.to_string())?;
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            let room = MAX_REPLY.saturating_sub(buf.len()) as u64;
            match (&mut r).take(room).read_until(0, &mut buf) {
                Ok(0) => return Err("closed".into()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.retry_taken();
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            }
            if buf.pop() != Some(0) {
                return Err("reply too long or cut".into());
            }
            let reply: Value = serde_json::from_slice(&buf).map_err(|e| e.to_string())?;
            buf.clear();
            if let Some(err) = reply.get("error").and_then(Value::as_str) {
                return Err(format!("the agent answered {err}"));
            }
            let list = reply
                .pointer("/parameters/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            self.following = true;
            self.apply(&list);
            // A guest that answers more often than RETRY_EVERY does not
            // keep the taken ports from their retry.
            self.retry_taken();
            if reply.get("continues").and_then(Value::as_bool) != Some(true) {
                return Ok(());
            }
        }
    }

    /// Makes the listeners match `list` (the agent's PublishedPort values):
    /// the first [`MAX_PORTS`] distinct TCP host ports, in the guest's order.
    fn apply(&mut self, list: &[Value]) {
        let mut want: BTreeMap<u16, (String, u64, String)> = BTreeMap::new();
        let mut asked = std::collections::BTreeSet::new();
        for p in list {
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("tcp");
            let Some(port) = p
                .get("host_port")
                .and_then(Value::as_u64)
                .and_then(|v| u16::try_from(v).ok())
                .filter(|&v| v != 0 && proto == "tcp")
            else {
                continue;
            };
            asked.insert(port);
            if want.len() >= MAX_PORTS || want.contains_key(&port) {
                continue;
            }
            let text = |k: &str, max: usize| -> String {
                let s = p.get(k).and_then(Value::as_str).unwrap_or_default();
                s.chars().take(max).collect()
            };
            let cport = p.get("container_port").and_then(Value::as_u64).unwrap_or(0);
            want.insert(port, (text("host_ip", 64), cport, text("container", 128)));
        }
        let over = asked.len() > MAX_PORTS;
        if over && !self.capped {
            let n = asked.len();
            self.log.note(&format!(
                "the guest asks for {n} ports; forwarding the first {MAX_PORTS}, not the other {}",
                n - MAX_PORTS
            ));
        }
        self.capped = over;
        let before = self.ports.len();
        let mut changed = false;
        // Kept while the host addresses stay: another container on the
        // same host port only changes what ports.json says.
        let mut moved = std::collections::BTreeSet::new();
        self.ports.retain(|port, f| match want.get(port) {
            Some((ip, _, _)) if *ip != f.host_ip => {
                moved.insert(*port);
                false
            }
            Some((_, cport, name)) => {
                if (cport, name) != (&f.container_port, &f.container) {
                    (f.container_port, f.container) = (*cport, name.clone());
                    changed = true;
                }
                true
            }
            None => false,
        });
        changed |= before != self.ports.len();
        if !moved.is_empty() {
            // The old listeners close as their accept threads wake.
            std::thread::sleep(Duration::from_millis(50));
        }
        for (port, (ip, cport, name)) in want {
            if self.ports.contains_key(&port) {
                continue;
            }
            changed = true;
            let f = self.open(port, ip, cport, name);
            self.ports.insert(port, f);
        }
        if changed {
            self.write_state();
        }
    }

    /// Opens the listeners for one port and their accept threads.
    fn open(
        &mut self,
        port: u16,
        host_ip: String,
        container_port: u64,
        container: String,
    ) -> Forward {
        let stop = Arc::new(AtomicBool::new(false));
        let addrs = bind_addrs(&host_ip);
        let mut f = Forward {
            host_ip,
            container_port,
            container,
            listening: Vec::new(),
            taken: Vec::new(),
            failed: None,
            stop,
            fds: Vec::new(),
        };
        let addrs = match addrs {
            Ok(a) => a,
            Err(why) => {
                let msg = format!("host port {port}: {why}");
                self.log.note(&msg);
                f.failed = Some(msg);
                return f;
            }
        };
        let wildcard = addrs.len() > 1;
        for ip in addrs {
            let addr = SocketAddr::new(ip, port);
            match listen(&mut f, addr, &self.uds, &self.connections) {
                Ok(()) => {}
                // A host without IPv6 on its loopback.
                Err(e)
                    if wildcard
                        && addr.is_ipv6()
                        && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    let msg =
                        format!("host port {addr} is not free ({e}): not forwarded until it is");
                    self.log.note(&msg);
                    f.taken.push((addr, msg));
                }
                Err(e) => {
                    let msg = format!("host port {addr}: {e}: not forwarded");
                    self.log.note(&msg);
                    f.failed.get_or_insert(msg);
                }
            }
        }
        f
    }

    /// Tries the taken host addresses again, at most every
    /// [`RETRY_EVERY`]; those now free are forwarded (one log line each)
    /// and ports.json says so.
    fn retry_taken(&mut self) {
        if self.last_retry.elapsed() < RETRY_EVERY {
            return;
        }
        self.last_retry = Instant::now();
        let mut changed = false;
        for f in self.ports.values_mut() {
            for (addr, msg) in std::mem::take(&mut f.taken) {
                match listen(f, addr, &self.uds, &self.connections) {
                    Ok(()) => {
                        self.log
                            .note(&format!("host port {addr} is free now: forwarded"));
                        changed = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        f.taken.push((addr, msg))
                    }
                    Err(e) => {
                        let msg = format!("host port {addr}: {e}: not forwarded");
                        self.log.note(&msg);
                        f.failed.get_or_insert(msg);
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.write_state();
        }
    }

    fn write_state(&self) {
        let Some(file) = &self.state else { return };
        let list: Vec<Value> = self
            .ports
            .iter()
            .map(|(port, f)| {
                json!({"protocol": "tcp", "host_ip": f.host_ip, "host_port": port,
                       "container_port": f.container_port,
                       "container": f.container,
                       "listening": f.listening.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                       "error": f.error()})
            })
            .collect();
        let mut text = json!({ "ports": list }).to_string();
        text.push('\n');
        let _ = file.set_len(0);
        if let Err(e) = file.write_all_at(text.as_bytes(), 0) {
            note!("writing ports.json: {e}");
        }
    }
}

/// Binds `addr` for `f` and starts its accept thread.
fn listen(
    f: &mut Forward,
    addr: SocketAddr,
    uds: &Path,
    conns: &Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let l = TcpListener::bind(addr)?;
    let fd = l.as_raw_fd();
    let (uds, stop, conns, port) = (
        uds.to_path_buf(),
        f.stop.clone(),
        conns.clone(),
        addr.port(),
    );
    std::thread::Builder::new()
        .name(format!("b2p-port{port}"))
        .spawn(move || accept_loop(l, port, uds, stop, conns))?;
    f.fds.push(fd);
    f.listening.push(addr);
    Ok(())
}

fn accept_loop(
    l: TcpListener,
    port: u16,
    uds: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicUsize>,
) {
    loop {
        let accepted = l.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match accepted {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                note!("accept on host port {port}: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            conns.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (uds, conns2) = (uds.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name("b2p-port-conn".into())
            .spawn(move || {
                relay(client, port, &uds);
                conns2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            conns.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Joins one accepted connection to the guest's published `port`.
fn relay(client: TcpStream, port: u16, uds: &Path) {
    let guest = match crate::vsock::hybrid_connect(uds, RELAY_PORT, Some(Duration::from_secs(5))) {
        Ok(s) => s,
        Err(_) => return,
    };
    if guest.set_read_timeout(None).is_err()
        || (&guest)
            .write_all(format!("TCP {port}\n").as_bytes())
            .is_err()
    {
        return;
    }
    let _ = client.set_nodelay(true);
    join(client, guest);
}

/// Copies both ways; each end of file becomes a half-close of the other
/// side; once the guest side is gone entirely, the client is closed too.
fn join(client: TcpStream, guest: UnixStream) {
    let (Ok(c2), Ok(g2)) = (client.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = std::thread::Builder::new()
        .name("b2p-port-up".into())
        .spawn(move || {
            let _ = pump(&c2, &g2);
            let _ = g2.shutdown(Shutdown::Write);
        });
    let _ = pump(&guest, &client);
    let _ = client.shutdown(Shutdown::Write);
    // The guest may still read what the client sends (a half-close); when
    // it is gone altogether, so is the client's connection.
    wait_hangup(&guest);
    let _ = client.shutdown(Shutdown::Both);
    if let Ok(t) = up {
        let _ = t.join();
    }
}

/// Opens (creates, 0600) the state file the forwarder keeps current.
pub fn open_state(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all_at(b"{\"ports\":[]}\n", 0)?;
    Ok(f)
}

/// Starts the forwarder on its own thread (`b2p-ports`), under its own
/// seccomp filter; the threads it starts inherit that filter.
pub fn spawn(uds: PathBuf, state: Option<File>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("b2p-ports".into())
        .spawn(move || {
            if let Err(e) = b2p_vmm::seccomp::apply(b2p_vmm::seccomp::Role::Ports) {
                note!("not forwarded: {e}");
                return;
            }
            Forwarder::new(uds, state).run()
        })
        .map(|_| ())
}
