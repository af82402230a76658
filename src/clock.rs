//! The guest's wall clock, kept to the host's by the VM process: once when
//! the guest's agent first answers, and after every host resume. A resume
//! shows as a jump of CLOCK_BOOTTIME − CLOCK_MONOTONIC (BOOTTIME counts the
//! time the host slept, MONOTONIC does not); the guest, whose clock did not
//! run while the host slept, is then behind by about that much. Each time
//! the thread `b2p-clock` sends the host's CLOCK_REALTIME to
//! io.b2p.Machine.SetTime over the machine's hybrid vsock socket (port
//! 1024). It runs under the ports thread's seccomp role (the same needs: a
//! Unix connection, reads, writes, sleeps).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::varlink::{Address, ClientError, Connection};

/// How often the detector samples the clocks.
pub const POLL: Duration = Duration::from_secs(2);
/// A jump of BOOTTIME − MONOTONIC at least this large is a resume.
pub const RESUME_JUMP: Duration = Duration::from_secs(1);
/// The guest's varlink port (the agent).
const VARLINK_PORT: u32 = 1024;
/// Each SetTime call's bound.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the detector reads the time the host has slept so far.
pub trait SleepClock {
    /// CLOCK_BOOTTIME − CLOCK_MONOTONIC, in nanoseconds.
    fn slept_ns(&self) -> i128;
}

/// The host's own clocks.
pub struct HostClocks;

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl SleepClock for HostClocks {
    fn slept_ns(&self) -> i128 {
        // MONOTONIC first, so the few nanoseconds between the reads never
        // make it negative (a sleep between them counts at once).
        let mono = now_ns(libc::CLOCK_MONOTONIC);
        now_ns(libc::CLOCK_BOOTTIME) - mono
    }
}

/// Tells a resume from the clocks' ordinary drift.
pub struct ResumeDetector<C: SleepClock> {
    clock: C,
    last: i128,
    jump_ns: i128,
}

impl<C: SleepClock> ResumeDetector<C> {
    pub fn new(clock: C, jump: Duration) -> Self {
        let last = clock.slept_ns();
        Self {
            clock,
            last,
            jump_ns: jump.as_nanos() as i128,
        }
    }

    /// How long the host slept since the last sample, when that is a
    /// resume (a jump of at least the threshold); `None` otherwise.
    pub fn poll(&mut self) -> Option<Duration> {
        let now = self.clock.slept_ns();
        let jump = now - self.last;
        self.last = now;
        (jump >= self.jump_ns).then(|| Duration::from_nanos(jump.min(u64::MAX as i128) as u64))
    }
}

/// Why the guest clock could not be set.
#[derive(Debug, thiserror::Error)]
pub enum SetTimeError {
    #[error(transparent)]
    Call(#[from] ClientError),
    #[error("the host clock is before 1970")]
    HostClock,
}

/// Sends the host's CLOCK_REALTIME to the agent behind the hybrid vsock
/// socket `uds`; returns how far the guest clock was off before (seconds,
/// negative when behind), as the agent measured it.
pub fn set_guest_time(uds: &Path) -> Result<f64, SetTimeError> {
    let addr = Address::Vsock {
        uds: uds.to_path_buf(),
        port: VARLINK_PORT,
    };
    let mut conn = Connection::connect(&addr, Some(CALL_TIMEOUT))?;
    // Read the clock last, right before the call goes out.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| SetTimeError::HostClock)?;
    let params = json!({"seconds": now.as_secs(), "nanoseconds": now.subsec_nanos()});
    let mut offset = 0.0;
    conn.call("io.b2p.Machine.SetTime", &params, false, |reply| {
        offset = reply
            .get("previous_offset")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
    })?;
    Ok(offset)
}

/// One line on stderr (vmm.log in the VM process).
macro_rules! note {
    ($($t:tt)*) => {
        eprintln!("b2p: clock: {}", format_args!($($t)*))
    };
}

/// What became of one attempt to set the guest clock.
#[derive(Debug, PartialEq, Eq)]
enum Setting {
    Set,
    /// The guest's agent has no SetTime (an older image): never retried.
    Unsupported,
    Failed(String),
}

/// Sets the guest clock, retrying every second for up to `tries` seconds
/// (the agent may not listen yet); logs success and lack of support.
fn set_with_retries(uds: &Path, tries: u32, why: &str) -> Setting {
    let mut last = String::new();
    for _ in 0..tries {
        match set_guest_time(uds) {
            Ok(off) => {
                note!("{why}: guest clock set from the host's (it was {off:+.3} s off)");
                return Setting::Set;
            }
            Err(SetTimeError::Call(ClientError::Remote { error, .. }))
                if error.ends_with("MethodNotFound") || error.ends_with("MethodNotImplemented") =>
            {
                note!("the guest's agent has no SetTime ({error}): its clock is not kept");
                return Setting::Unsupported;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Setting::Failed(last)
}

/// The thread's body: the first setting once the agent answers (however
/// long the boot takes; the first failed minute is logged), then one after
/// every resume. Ends when the agent has no SetTime.
fn run(uds: PathBuf) {
    let mut logged = false;
    loop {
        match set_with_retries(&uds, 60, "boot") {
            Setting::Set => break,
            Setting::Unsupported => return,
            Setting::Failed(e) if !logged => {
                note!("boot: no answer from the agent for a minute yet ({e}); still trying");
                logged = true;
            }
            Setting::Failed(_) => {}
        }
    }
    let mut detector = ResumeDetector::new(HostClocks, RESUME_JUMP);
    loop {
        std::thread::sleep(POLL);
        if let Some(slept) = detector.poll() {
            let why = format!("host resumed after {:.1} s asleep", slept.as_secs_f64());
            match set_with_retries(&uds, 30, &why) {
                Setting::Set => {}
                Setting::Unsupported => return,
                Setting::Failed(e) => note!("{why}: the guest clock was not set ({e})"),
            }
        }
    }
}

/// Starts `b2p-clock` for the guest behind `uds`, under its seccomp filter.
pub fn spawn(uds: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("b2p-clock".into())
        .spawn(move || {
            if let Err(e) = b2p_vmm::seccomp::apply(b2p_vmm::seccomp::Role::Ports) {
                note!("not kept: {e}");
                return;
            }
            run(uds)
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A clock pair the test moves by hand: BOOTTIME and MONOTONIC in ns.
    #[derive(Clone, Default)]
    struct FakeClocks {
        boot: Rc<Cell<i128>>,
        mono: Rc<Cell<i128>>,
    }

    impl FakeClocks {
        /// Time passes with the host awake: both clocks advance.
        fn run(&self, ns: i128) {
            self.boot.set(self.boot.get() + ns);
            self.mono.set(self.mono.get() + ns);
        }
        /// The host sleeps: only BOOTTIME advances.
        fn sleep(&self, ns: i128) {
            self.boot.set(self.boot.get() + ns);
        }
    }

    impl SleepClock for FakeClocks {
        fn slept_ns(&self) -> i128 {
            self.boot.get() - self.mono.get()
        }
    }

    const S: i128 = 1_000_000_000;

    #[test]
    fn a_sleep_is_a_resume_and_running_time_is_not() {
        let c = FakeClocks::default();
        c.run(100 * S);
        c.sleep(7 * S); // slept before the VM started: not ours
        let mut d = ResumeDetector::new(c.clone(), RESUME_JUMP);
        for _ in 0..5 {
            c.run(2 * S);
            assert_eq!(d.poll(), None);
        }
        c.run(S);
        c.sleep(30 * S);
        c.run(S);
        assert_eq!(d.poll(), Some(Duration::from_secs(30)));
        // Reported once, not again at the next samples.
        c.run(2 * S);
        assert_eq!(d.poll(), None);
        // Two sleeps between samples add up.
        c.sleep(3 * S);
        c.run(S / 2);
        c.sleep(4 * S);
        assert_eq!(d.poll(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn small_drift_is_not_a_resume() {
        let c = FakeClocks::default();
        let mut d = ResumeDetector::new(c.clone(), RESUME_JUMP);
        // NTP slews and rounding move the difference by microseconds.
        for i in 0..100 {
            c.run(2 * S);
            c.sleep(if i % 2 == 0 { 50_000 } else { 0 });
            assert_eq!(d.poll(), None);
        }
        // Just under the threshold: no; at it: yes.
        c.sleep(RESUME_JUMP.as_nanos() as i128 - 1);
        assert_eq!(d.poll(), None);
        c.sleep(RESUME_JUMP.as_nanos() as i128);
        assert_eq!(d.poll(), Some(RESUME_JUMP));
    }

    #[test]
    fn the_host_clocks_read_sanely() {
        let h = HostClocks;
        // A host that never slept: about 0 (the time between the reads).
        let a = h.slept_ns();
        assert!(a >= 0, "{a}");
        let mut d = ResumeDetector::new(HostClocks, RESUME_JUMP);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(d.poll(), None);
    }

    /// A one-connection stand-in for the VM's hybrid vsock socket and the
    /// agent behind it: answers the CONNECT line with `OK 1024`, reads one
    /// varlink call and answers `reply`. Returns the CONNECT line and the call.
    fn fake_agent(uds: &Path, reply: &'static [u8]) -> std::thread::JoinHandle<(String, String)> {
        let l = std::os::unix::net::UnixListener::bind(uds).unwrap();
        std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Write};
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            (&s).write_all(b"OK 1024\n").unwrap();
            let mut call = Vec::new();
            r.read_until(0, &mut call).unwrap();
            (&s).write_all(reply).unwrap();
            (line, String::from_utf8_lossy(&call).into_owned())
        })
    }

    #[test]
    fn an_agent_without_settime_is_not_asked_again() {
        let dir = std::env::temp_dir().join(format!("b2p-clock-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock.sock");
        let t = fake_agent(
            &uds,
            b"{\"error\":\"org.varlink.service.MethodNotFound\",\"parameters\":{\"method\":\"SetTime\"}}\0",
        );
        let begin = std::time::Instant::now();
        assert_eq!(set_with_retries(&uds, 30, "test"), Setting::Unsupported);
        assert!(begin.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        // Nothing listens any more: each try fails, bounded by `tries`.
        drop(std::fs::remove_file(&uds));
        assert!(matches!(
            set_with_retries(&uds, 2, "test"),
            Setting::Failed(_)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_agent_is_an_error_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("b2p-clock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock.sock");
        assert!(set_guest_time(&uds).is_err());
        // A vsock socket that answers the handshake, then an error reply.
        let t = fake_agent(
            &uds,
            b"{\"error\":\"io.b2p.Machine.ErrorOccurred\",\"parameters\":{\"reason\":\"no\"}}\0",
        );
        let e = set_guest_time(&uds).unwrap_err();
        assert!(e.to_string().contains("ErrorOccurred"), "{e}");
        let (line, call) = t.join().unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        assert!(call.contains("io.b2p.Machine.SetTime"), "{call}");
        let v: Value = serde_json::from_str(call.trim_end_matches('\0')).unwrap();
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let sent = v["parameters"]["seconds"].as_u64().unwrap();
        assert!(host.abs_diff(sent) <= 2, "sent {sent}, host {host}");
        assert!(v["parameters"]["nanoseconds"].as_u64().unwrap() < 1_000_000_000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
