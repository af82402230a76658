//! The host side of published ports (src/ports.rs, run alone as
//! `b2p __forward-ports UDS --state ports.json`, under its seccomp filter)
//! against a hostile guest. The guest here is a fake agent on a real Unix
//! socket: it answers the hybrid vsock `CONNECT` handshake and
//! `io.b2p.Machine.WatchPorts` with real varlink framing (NUL-terminated
//! JSON, `continues`), and serves the relay port 1026. A fake is right
//! here: the point is the host's defence against whatever a guest sends,
//! which the real agent (it caps at 256 itself) would never send. Checked:
//! 10,000 port records are capped at 256 (the first 256 listen and relay,
//! none of the rest does), one log line however often the guest repeats
//! it; a HOSTIP that is not loopback or wildcard is refused with a log line
//! and an error in ports.json; `0.0.0.0` and empty mean the host's
//! 127.0.0.1 (and [::1]), never the host's wildcard; `127.0.0.1` and
//! `127.0.0.2` are those addresses alone; a host port another program holds
//! is forwarded once it lets it go.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CAP: usize = 256;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fake agent: each WatchPorts call gets the replies sent on `sets`
/// (the most recent call; earlier ones are held open); relay connections
/// record the port they name and echo what follows.
struct FakeAgent {
    /// A set, and a pause to make in the middle of writing it.
    sets: mpsc::Sender<(Vec<Value>, Duration)>,
    relayed: Arc<Mutex<Vec<String>>>,
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' && line.len() < 256 {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

impl FakeAgent {
    fn start(uds: &Path) -> FakeAgent {
        let l = UnixListener::bind(uds).expect("binding the fake hybrid socket");
        let (tx, rx) = mpsc::channel::<(Vec<Value>, Duration)>();
        let relayed = Arc::new(Mutex::new(Vec::new()));
        let watcher: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        {
            let watcher = watcher.clone();
            std::thread::spawn(move || {
                for (set, pause) in rx {
                    // Wait for the forwarder's call.
                    let t = Instant::now();
                    while watcher.lock().unwrap().is_none() && t.elapsed() < Duration::from_secs(20)
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let mut msg = serde_json::to_vec(
                        &json!({"parameters": {"ports": set}, "continues": true}),
                    )
                    .unwrap();
                    msg.push(0);
                    let (a, b) = msg.split_at(msg.len() / 2);
                    for (i, part) in [a, b].into_iter().enumerate() {
                        if i == 1 {
                            std::thread::sleep(pause);
                        }
                        if let Some(w) = watcher.lock().unwrap().as_mut() {
                            w.write_all(part).expect("writing the WatchPorts reply");
                        }
                    }
                }
            });
        }
        let rel = relayed.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let line = read_line(&mut c);
                let port: u32 = line
                    .strip_prefix("CONNECT ")
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(0);
                if c.write_all(format!("OK {port}\n").as_bytes()).is_err() {
                    continue;
                }
                match port {
                    1024 => {
                        let mut r = BufReader::new(c.try_clone().unwrap());
                        let mut call = Vec::new();
                        let _ = r.read_until(0, &mut call);
                        let call: Value =
                            serde_json::from_slice(&call[..call.len().saturating_sub(1)])
                                .unwrap_or_default();
                        assert_eq!(call["method"], "io.b2p.Machine.WatchPorts");
                        assert_eq!(call["more"], true);
                        *watcher.lock().unwrap() = Some(c);
                    }
                    1026 => {
                        let rel = rel.clone();
                        std::thread::spawn(move || {
                            let req = read_line(&mut c);
                            rel.lock().unwrap().push(req);
                            let mut w = c.try_clone().unwrap();
                            let _ = std::io::copy(&mut c, &mut w);
                        });
                    }
                    _ => {}
                }
            }
        });
        FakeAgent { sets: tx, relayed }
    }

    fn send(&self, set: Vec<Value>) {
        self.sets.send((set, Duration::ZERO)).unwrap();
    }

    /// Sends `set` in two halves `pause` apart.
    fn send_slowly(&self, set: Vec<Value>, pause: Duration) {
        self.sets.send((set, pause)).unwrap();
    }
}

struct Rig {
    dir: PathBuf,
    agent: FakeAgent,
    fwd: Kill,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("b2p-ports-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock.sock");
        let agent = FakeAgent::start(&uds);
        let log = std::fs::File::create(dir.join("vmm.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_b2p"))
            .arg("__forward-ports")
            .arg(&uds)
            .arg("--state")
            .arg(dir.join("ports.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting b2p __forward-ports");
        Rig {
            dir,
            agent,
            fwd: Kill(child),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default()
    }

    fn state(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("ports.json")).unwrap_or_default();
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["ports"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until ports.json lists `n` ports.
    fn wait_state(&mut self, n: usize) -> Vec<Value> {
        let t = Instant::now();
        loop {
            let s = self.state();
            if s.len() == n {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "ports.json has {} ports, not {n}; the forwarder: {:?}; log:\n{}",
                s.len(),
                self.fwd.0.try_wait(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn record(host_ip: &str, port: u16) -> Value {
    json!({"protocol": "tcp", "host_ip": host_ip, "host_port": port,
           "container_port": 80, "container": "hostile"})
}

fn free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

fn listens(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

fn v4(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((a, port))
}

/// Whether this host has [::1].
fn has_v6_loopback() -> bool {
    TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// Sends "ping" through the forward of `port` and reads the echo.
fn echo_through(port: u16) -> String {
    let mut s = TcpStream::connect(v4([127, 0, 0, 1], port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn ten_thousand_ports_are_capped_and_logged_once() {
    // Ports 20000..29999: below the usual ephemeral range. A port another
    // program on this host holds is left out of the checks.
    let base = 20000u16;
    let ports: Vec<u16> = (0..10_000).map(|i| base + i).collect();
    let was_free: Vec<bool> = ports.iter().map(|&p| free(v4([127, 0, 0, 1], p))).collect();
    let mut rig = Rig::new("cap");
    rig.agent
        .send(ports.iter().map(|&p| record("", p)).collect());
    let state = rig.wait_state(CAP);

    // The first 256 in the guest's order, none of the others.
    let listed: Vec<u64> = state
        .iter()
        .filter_map(|p| p["host_port"].as_u64())
        .collect();
    let first: Vec<u64> = ports[..CAP].iter().map(|&p| u64::from(p)).collect();
    assert_eq!(listed, first, "ports.json lists the first {CAP}");
    for (i, &p) in ports.iter().enumerate() {
        if !was_free[i] {
            continue;
        }
        let up = listens(v4([127, 0, 0, 1], p));
        assert_eq!(
            up,
            i < CAP,
            "127.0.0.1:{p} listening: {up}; log:\n{}",
            rig.log()
        );
    }
    // A port under the cap really forwards, and names its port to the relay.
    let p = ports
        .iter()
        .zip(&was_free)
        .find(|(_, f)| **f)
        .map(|(p, _)| *p)
        .unwrap();
    assert_eq!(echo_through(p), "ping");
    assert!(rig
        .agent
        .relayed
        .lock()
        .unwrap()
        .contains(&format!("TCP {p}")));

    // The guest repeats itself, and asks for another 10,000: still one line.
    rig.agent
        .send(ports.iter().map(|&p| record("", p)).collect());
    rig.agent
        .send(ports.iter().rev().map(|&p| record("", p)).collect());
    std::thread::sleep(Duration::from_secs(2));
    let log = rig.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("asks for")).collect();
    assert_eq!(lines.len(), 1, "one cap line in:\n{log}");
    assert!(
        lines[0].contains("asks for 10000 ports") && lines[0].contains("first 256"),
        "{}",
        lines[0]
    );
    // Reversed, the first 256 are now the top ones.
    let t = Instant::now();
    while rig.state().first().and_then(|p| p["host_port"].as_u64()) != Some(29744) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the reversed set was not applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rig.state().len(), CAP);
    if was_free[0] {
        assert!(
            !listens(v4([127, 0, 0, 1], base)),
            "port {base} closed once dropped"
        );
    }
    assert!(log.lines().count() < 20, "the log stays short:\n{log}");
}

#[test]
fn a_hostip_that_is_not_local_is_refused() {
    let v6 = has_v6_loopback();
    let pick = |n: usize| -> Vec<u16> {
        (31000..32000u16)
            .filter(|&p| {
                free(v4([127, 0, 0, 1], p))
                    && free(v4([127, 0, 0, 2], p))
                    && (!v6 || free(SocketAddr::from((Ipv6Addr::LOCALHOST, p))))
            })
            .take(n)
            .collect()
    };
    let p = pick(7);
    assert_eq!(p.len(), 7, "free ports in 31000..32000");
    let mut rig = Rig::new("hostip");
    rig.agent.send(vec![
        record("10.1.2.3", p[0]),
        record("0.0.0.0", p[1]),
        record("", p[2]),
        record("127.0.0.1", p[3]),
        record("127.0.0.2", p[4]),
        record("192.168.1.1", p[5]),
        record("not-an-address", p[6]),
    ]);
    let state = rig.wait_state(7);
    let entry = |port: u16| {
        state
            .iter()
            .find(|e| e["host_port"] == port)
            .cloned()
            .unwrap_or_default()
    };
    let log = rig.log();
    for (i, ip) in [(0, "10.1.2.3"), (5, "192.168.1.1"), (6, "not-an-address")] {
        let port = p[i];
        assert!(
            log.lines().any(|l| l.contains(&format!("host port {port}"))
                && l.contains(ip)
                && l.contains("refused")),
            "a refusal line for {ip}:{port} in:\n{log}"
        );
        let e = entry(port);
        assert!(
            e["error"].as_str().is_some_and(|s| s.contains("refused")),
            "{e}"
        );
        assert_eq!(e["listening"], json!([]), "{e}");
        assert!(!listens(v4([127, 0, 0, 1], port)));
    }
    // The guest's wildcard is the host's loopback, not the host's wildcard.
    for port in [p[1], p[2]] {
        assert!(listens(v4([127, 0, 0, 1], port)), "127.0.0.1:{port}");
        if v6 {
            assert!(listens(SocketAddr::from((Ipv6Addr::LOCALHOST, port))));
        }
        // Another local address of the host (127.0.0.2 stands in for a
        // wildcard bind, which would answer there too).
        assert!(!listens(v4([127, 0, 0, 2], port)), "127.0.0.2:{port}");
        assert_eq!(entry(port)["error"], Value::Null);
    }
    assert!(listens(v4([127, 0, 0, 1], p[3])));
    if v6 {
        assert!(!listens(SocketAddr::from((Ipv6Addr::LOCALHOST, p[3]))));
    }
    assert!(listens(v4([127, 0, 0, 2], p[4])));
    assert!(!listens(v4([127, 0, 0, 1], p[4])));
    assert_eq!(
        entry(p[4])["listening"],
        json!([format!("127.0.0.2:{}", p[4])])
    );
    assert_eq!(echo_through(p[3]), "ping");

    // The guest moves p[3] to 127.0.0.2 and renames p[1]'s container: the
    // first is listened on there alone, the second keeps its listener.
    let mut renamed = record("0.0.0.0", p[1]);
    renamed["container"] = json!("renamed");
    rig.agent.send(vec![renamed, record("127.0.0.2", p[3])]);
    let t = Instant::now();
    while !rig
        .state()
        .iter()
        .any(|e| e["host_port"] == p[3] && e["listening"] == json!([format!("127.0.0.2:{}", p[3])]))
    {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", rig.state());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(listens(v4([127, 0, 0, 2], p[3])));
    assert!(!listens(v4([127, 0, 0, 1], p[3])));
    let st = rig.state();
    assert_eq!(st.len(), 2, "{st:?}");
    let e1 = st.iter().find(|e| e["host_port"] == p[1]).unwrap();
    assert_eq!(e1["container"], "renamed");
    assert!(listens(v4([127, 0, 0, 1], p[1])));
    for gone in [p[0], p[2], p[4]] {
        assert!(!listens(v4([127, 0, 0, 1], gone)) && !listens(v4([127, 0, 0, 2], gone)));
    }
}

/// A host port another program holds when the guest publishes it: one log
/// line and an error in ports.json, then it is forwarded once that program
/// lets it go (tried again every 2 s), and the error goes.
#[test]
fn a_taken_host_port_is_forwarded_once_it_is_free() {
    let port = (30000..31000u16)
        .find(|&p| free(v4([127, 0, 0, 1], p)))
        .expect("a free port in 30000..31000");
    let holder = TcpListener::bind(v4([127, 0, 0, 1], port)).unwrap();
    let mut rig = Rig::new("taken");
    rig.agent.send(vec![record("127.0.0.1", port)]);
    let state = rig.wait_state(1);
    assert!(
        state[0]["error"]
            .as_str()
            .is_some_and(|s| s.contains("not free")),
        "{state:?}"
    );
    assert_eq!(state[0]["listening"], json!([]), "{state:?}");
    // Still taken a few retries later: still one line about it.
    std::thread::sleep(Duration::from_secs(5));
    let lines = |log: &str, what: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("127.0.0.1:{port}")) && l.contains(what))
            .count()
    };
    assert_eq!(lines(&rig.log(), "not free"), 1, "{}", rig.log());
    drop(holder);
    let t = Instant::now();
    while rig.state()[0]["listening"] != json!([format!("127.0.0.1:{port}")]) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}\n{}",
            rig.state(),
            rig.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "FIGURES: a freed host port was forwarded {:?} after it was freed",
        t.elapsed()
    );
    assert_eq!(rig.state()[0]["error"], Value::Null);
    assert_eq!(echo_through(port), "ping");
    assert_eq!(lines(&rig.log(), "is free now"), 1, "{}", rig.log());

    // A reply that comes in two halves 3 s apart, across the forwarder's
    // 2 s wake-up to retry taken ports, is still one reply.
    let second = (port + 1..31000u16)
        .find(|&p| free(v4([127, 0, 0, 1], p)))
        .expect("a second free port");
    rig.agent.send_slowly(
        vec![record("127.0.0.1", port), record("127.0.0.1", second)],
        Duration::from_secs(3),
    );
    let state = rig.wait_state(2);
    assert!(listens(v4([127, 0, 0, 1], second)), "{state:?}");
    assert_eq!(echo_through(second), "ping");
    assert!(!rig.log().contains("WatchPorts ended"), "{}", rig.log());
}
