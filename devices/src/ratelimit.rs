//! Per-call-site log rate limiting for messages a guest can trigger.
//!
//! A guest that loops on a bad register write or a malformed chain must not
//! be able to flood the host's log. Every guest-reachable `warn!`/`error!`
//! in this crate goes through [`warn_limited!`](crate::warn_limited) or
//! [`error_limited!`](crate::error_limited): each call site may log
//! [`BURST`] messages per [`WINDOW`]; the rest are counted, and the first
//! message after the window closes says how many were suppressed
//! (Firecracker's pattern).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Messages a call site may log in one window.
pub const BURST: u64 = 5;
/// The window length.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The state of one call site; a `static` of this lives at each site.
pub struct RateLimit {
    /// Window number (milliseconds since the process epoch / WINDOW) of the
    /// current window.
    window: AtomicU64,
    /// Messages logged in the current window.
    logged: AtomicU64,
    /// Messages suppressed since the last one logged.
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl RateLimit {
    /// A site with nothing logged yet.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a message may be logged now; `Some(n)` with the number of
    /// messages suppressed since the last one that was, `None` when this one
    /// must be dropped (and is counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(epoch().elapsed())
    }

    /// [`admit`](Self::admit) at a given time since the process epoch (for tests).
    pub fn admit_at(&self, now: Duration) -> Option<u64> {
        let window = (now.as_millis() / WINDOW.as_millis()) as u64 + 1;
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs at `level` through a per-call-site [`RateLimit`].
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.admit() {
            if suppressed > 0 {
                log::log!($level, "({suppressed} similar messages suppressed)");
            }
            log::log!($level, $($arg)+);
        }
    }};
}

/// `warn!`, rate-limited per call site (see [`ratelimit`](crate::ratelimit)).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Warn, $($arg)+) };
}

/// `error!`, rate-limited per call site (see [`ratelimit`](crate::ratelimit)).
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_the_suppressed_count() {
        let site = RateLimit::new();
        let t0 = Duration::from_secs(1);
        let admitted = (0..1000).filter(|_| site.admit_at(t0).is_some()).count();
        assert_eq!(admitted as u64, BURST);
        // The next window admits again and reports what was dropped.
        assert_eq!(site.admit_at(t0 + WINDOW), Some(1000 - BURST));
        assert_eq!(site.admit_at(t0 + WINDOW), Some(0));
    }
}
