//! A private machines directory (`XDG_DATA_HOME`) for one manager test, and
//! running `b2p` against it: the output, a run that must succeed, one that
//! must fail with a single `b2p: error:` line, and a machine's folder.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{run_with_deadline, skip, which, Outcome, TempDir};

/// How long one `b2p` command may take before it counts as hung.
pub const LIMIT: Duration = Duration::from_secs(60);

/// A scratch `XDG_DATA_HOME` (removed on drop) for one test.
pub struct Home {
    pub dir: TempDir,
}

/// `b2p create` makes each machine's key with ssh-keygen: true (after a
/// loud skip) when it is missing.
pub fn no_ssh_keygen(test: &str) -> bool {
    if which("ssh-keygen").is_none() {
        skip(test, "ssh-keygen not found (Debian package openssh-client)");
        return true;
    }
    false
}

impl Home {
    pub fn new(test: &str) -> Home {
        Home {
            dir: TempDir::new(test),
        }
    }

    pub fn b2p(&self, args: &[&str]) -> Outcome {
        self.b2p_with(args, |_| {})
    }

    /// `b2p ARGS` with the command adjusted first (environment, umask).
    pub fn b2p_with(&self, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Outcome {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_b2p"));
        cmd.args(args).env("XDG_DATA_HOME", self.dir.path());
        adjust(&mut cmd);
        run_with_deadline(cmd, LIMIT)
    }

    /// A command that must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.b2p(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "b2p {args:?} failed\n{}",
            out.describe()
        );
        out.stdout
    }

    /// A command that must fail with one `b2p: error:` line holding `want`.
    pub fn fails(&self, args: &[&str], want: &str) {
        let out = self.b2p(args);
        assert!(!out.timed_out, "b2p {args:?} hung\n{}", out.describe());
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "b2p {args:?} should fail\n{}",
            out.describe()
        );
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "want one error line\n{}", out.describe());
        assert!(
            lines[0].starts_with("b2p: error: ") || lines[0].starts_with("error: "),
            "{}",
            out.describe()
        );
        assert!(
            lines[0].contains(want),
            "b2p {args:?}: the error should mention {want:?}\n{}",
            out.describe()
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    }

    /// Where machine `name`'s files are.
    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("b2p/machines").join(name)
    }
}
