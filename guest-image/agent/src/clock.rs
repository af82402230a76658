//! io.b2p.Machine.SetTime: sets the guest's wall clock (CLOCK_REALTIME) to
//! the host's, which the host's VM process sends at boot and after every
//! host resume. The guest has no RTC to write (b2p-vmm emulates none; a
//! QEMU guest's RTC is the host's clock already): the kernel's clock is all
//! there is. The parameters come from the host, so they are checked before
//! anything is set.

use log::info;
use serde_json::{json, Map, Value};

use crate::protocol::VarlinkError;

/// The earliest time the host may send (2020-01-01T00:00:00Z): anything
/// before it is a broken host clock, not one to copy.
pub const EARLIEST: i64 = 1_577_836_800;
/// The latest (3000-01-01T00:00:00Z).
pub const LATEST: i64 = 32_503_680_000;

/// `(seconds, nanoseconds)` from the call's parameters, or why not.
pub fn parse(params: &Map<String, Value>) -> Result<(i64, i64), String> {
    let seconds = params
        .get("seconds")
        .and_then(Value::as_i64)
        .ok_or("seconds must be an integer")?;
    let nanos = params
        .get("nanoseconds")
        .and_then(Value::as_i64)
        .ok_or("nanoseconds must be an integer")?;
    if !(EARLIEST..LATEST).contains(&seconds) {
        return Err(format!(
            "seconds {seconds} is outside {EARLIEST}..{LATEST} (2020 to 3000)"
        ));
    }
    if !(0..1_000_000_000).contains(&nanos) {
        return Err(format!("nanoseconds {nanos} is outside 0..1000000000"));
    }
    Ok((seconds, nanos))
}

/// How far `before` (the guest clock) was from `(seconds, nanos)` (the
/// host's), in seconds: negative when the guest was behind.
pub fn offset(before: libc::timespec, seconds: i64, nanos: i64) -> f64 {
    (before.tv_sec - seconds) as f64 + (before.tv_nsec - nanos) as f64 / 1e9
}

fn error(reason: String) -> VarlinkError {
    VarlinkError::new("io.b2p.Machine.ErrorOccurred", json!({ "reason": reason }))
}

/// SetTime: checks the parameters, sets CLOCK_REALTIME, answers the offset
/// the guest clock had before.
pub fn set_time(params: &Map<String, Value>) -> Result<Value, VarlinkError> {
    let (seconds, nanos) = parse(params).map_err(error)?;
    let mut before = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut before) };
    let ts = libc::timespec {
        tv_sec: seconds as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    // SAFETY: clock_settime reads one valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(error(format!("clock_settime: {e}")));
    }
    let off = offset(before, seconds, nanos);
    info!("clock set from the host's: the guest clock was {off:+.3} s off");
    Ok(json!({ "previous_offset": off }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn takes_a_sane_time_and_refuses_the_rest() {
        let now = 1_796_000_000;
        assert_eq!(
            parse(&params(json!({"seconds": now, "nanoseconds": 5}))),
            Ok((now, 5))
        );
        for bad in [
            json!({"seconds": now}),
            json!({"seconds": "x", "nanoseconds": 0}),
            json!({"seconds": 0, "nanoseconds": 0}),
            json!({"seconds": EARLIEST - 1, "nanoseconds": 0}),
            json!({"seconds": LATEST, "nanoseconds": 0}),
            json!({"seconds": i64::MAX, "nanoseconds": 0}),
            json!({"seconds": now, "nanoseconds": 1_000_000_000}),
            json!({"seconds": now, "nanoseconds": -1}),
            json!({"seconds": now, "nanoseconds": 1.5}),
        ] {
            assert!(parse(&params(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_clock_behind_has_a_negative_offset() {
        let before = libc::timespec {
            tv_sec: 1_000,
            tv_nsec: 250_000_000,
        };
        assert!((offset(before, 1_030, 750_000_000) + 30.5).abs() < 1e-9);
        assert!((offset(before, 999, 0) - 1.25).abs() < 1e-9);
    }

    #[test]
    fn bad_parameters_are_an_error_reply_and_set_nothing() {
        // (A good call would set this host's clock: never made here.)
        let e = set_time(&params(json!({"seconds": 1, "nanoseconds": 0}))).unwrap_err();
        let text = format!("{e:?}");
        assert!(text.contains("ErrorOccurred"), "{text}");
        assert!(text.contains("outside"), "{text}");
    }
}
