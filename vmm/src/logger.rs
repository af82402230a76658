//! The one logger of both binaries (`b2p-vmm`, and `b2p` whose VM process
//! writes it into the machine's vmm.log): each record is one stderr line
//! `PREFIX: LEVEL: message`, warnings and errors by default, more with
//! `B2P_LOG=info|debug|trace`, none with `B2P_LOG=off`.

use std::io::Write;

struct StderrLogger {
    prefix: &'static str,
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            log::Level::Warn => "warning",
            l => &l.as_str().to_ascii_lowercase(),
        };
        // One write per record, so lines from several threads stay whole;
        // a message's own newlines would split it, so they become spaces.
        let msg = r.args().to_string().replace('\n', " ");
        let line = format!("{}: {level}: {msg}\n", self.prefix);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The level `B2P_LOG` asks for (warnings when unset or unknown).
pub fn level_from_env() -> log::LevelFilter {
    match std::env::var("B2P_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    }
}

/// Installs the stderr logger with lines starting `prefix: ` (the binary's
/// name). A second call, or another logger already installed, is a no-op.
pub fn init(prefix: &'static str) {
    let level = level_from_env();
    let logger: &'static StderrLogger = Box::leak(Box::new(StderrLogger { prefix, level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
