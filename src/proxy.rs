//! The HTTP proxy settings a machine's guest gets from `b2p start`'s
//! environment: `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` (either case,
//! upper first, as Go's net/http reads them) become the kernel command line
//! words `b2p.proxy.http=`, `b2p.proxy.https=` and `b2p.proxy.no=`, which
//! the guest's init exports to the agent and Podman's service (and to login
//! shells). A proxy on the host's loopback (`localhost`, `127.0.0.1`,
//! `[::1]`) is rewritten to `host.b2p.internal`, the name the guest gives
//! its gateway, which passt maps to the host's loopback.
//!
//! Values travel %XX-escaped (anything but `A-Za-z0-9._~:/@,=+-`), so the
//! guest's shell never sees a glob or a separator; whitespace, quotes,
//! backslashes and control characters are refused with one error line.

use thiserror::Error;

/// The guest's name for the host (its gateway), written by its init.
pub const HOST_NAME: &str = "host.b2p.internal";

/// The environment variables read, each with its kernel command line key.
const VARS: [(&str, &str, &str); 3] = [
    ("HTTP_PROXY", "http_proxy", "b2p.proxy.http"),
    ("HTTPS_PROXY", "https_proxy", "b2p.proxy.https"),
    ("NO_PROXY", "no_proxy", "b2p.proxy.no"),
];

/// All the variable names, for clearing them.
pub const NAMES: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("{var} holds {what}, which cannot go on the guest's kernel command line; fix it, or start with --no-proxy-env")]
    Refused { var: &'static str, what: String },
    #[error("the proxy settings take {0} bytes of the guest's kernel command line, more than {MAX_LEN}; shorten NO_PROXY, or start with --no-proxy-env")]
    TooLong(usize),
}

/// The most the proxy words may take of the guest's kernel command line
/// (Linux's x86 limit is 2048 bytes for all of it).
pub const MAX_LEN: usize = 1024;

/// The command line words for the proxy settings `lookup` finds (a
/// leading space before each; empty when none is set).
pub fn kernel_args(lookup: impl Fn(&str) -> Option<String>) -> Result<String, ProxyError> {
    let mut out = String::new();
    for (upper, lower, key) in VARS {
        let (var, value) = match lookup(upper).filter(|v| !v.is_empty()) {
            Some(v) => (upper, v),
            None => match lookup(lower).filter(|v| !v.is_empty()) {
                Some(v) => (lower, v),
                None => continue,
            },
        };
        check(var, &value)?;
        let value = if key == "b2p.proxy.no" {
            value
        } else {
            to_guest(&value)
        };
        out.push_str(&format!(" {key}={}", escape(&value)));
    }
    if out.len() > MAX_LEN {
        return Err(ProxyError::TooLong(out.len()));
    }
    Ok(out)
}

/// [`kernel_args`] of this process's environment.
pub fn from_env() -> Result<String, ProxyError> {
    kernel_args(|k| std::env::var(k).ok())
}

fn check(var: &'static str, value: &str) -> Result<(), ProxyError> {
    let bad = value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '\'' | '"' | '`' | '\\'));
    match bad {
        Some(c) => Err(ProxyError::Refused {
            var,
            what: format!("{c:?}"),
        }),
        None => Ok(()),
    }
}

/// `scheme://[user@]HOST[:port]...` (or without a scheme) with a loopback
/// HOST replaced by [`HOST_NAME`].
pub fn to_guest(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(auth_end);
    let (user, hostport) = match authority.rfind('@') {
        Some(i) => authority.split_at(i + 1),
        None => ("", authority),
    };
    let (host, port) = if hostport.starts_with('[') {
        match hostport.find(']') {
            Some(i) => hostport.split_at(i + 1),
            None => (hostport, ""),
        }
    } else {
        match hostport.rfind(':') {
            Some(i) => hostport.split_at(i),
            None => (hostport, ""),
        }
    };
    let loopback = host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1" || host == "[::1]";
    if loopback {
        format!("{scheme}{user}{HOST_NAME}{port}{path}")
    } else {
        url.to_string()
    }
}

/// %XX for every byte outside `A-Za-z0-9._~:/@,=+-`.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"._~:/@,=+-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn args(vars: &[(&str, &str)]) -> Result<String, ProxyError> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        kernel_args(|k| env.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_nothing_on_the_command_line() {
        assert_eq!(args(&[]), Ok(String::new()));
        assert_eq!(args(&[("HTTP_PROXY", "")]), Ok(String::new()));
    }

    #[test]
    fn either_case_upper_first_and_loopback_becomes_the_hosts_name() {
        assert_eq!(
            args(&[
                ("http_proxy", "http://127.0.0.1:3128"),
                ("HTTPS_PROXY", "http://proxy.corp:8080/"),
                ("https_proxy", "http://ignored:1"),
                ("no_proxy", "localhost,.corp,10.0.0.0/8"),
            ]),
            Ok(" b2p.proxy.http=http://host.b2p.internal:3128 \
                b2p.proxy.https=http://proxy.corp:8080/ \
                b2p.proxy.no=localhost,.corp,10.0.0.0/8"
                .to_string())
        );
    }

    #[test]
    fn loopback_forms_are_rewritten_and_others_are_kept() {
        for (from, to) in [
            ("http://localhost:3128", "http://host.b2p.internal:3128"),
            ("http://LOCALHOST", "http://host.b2p.internal"),
            ("127.0.0.1:3128", "host.b2p.internal:3128"),
            (
                "http://u:p@127.0.0.1:3128/x",
                "http://u:p@host.b2p.internal:3128/x",
            ),
            ("http://[::1]:3128", "http://host.b2p.internal:3128"),
            ("socks5://[::1]", "socks5://host.b2p.internal"),
            ("http://127.0.0.10:3128", "http://127.0.0.10:3128"),
            ("http://localhost.corp:3128", "http://localhost.corp:3128"),
            ("http://[fd00::1]:3128", "http://[fd00::1]:3128"),
        ] {
            assert_eq!(to_guest(from), to, "{from}");
        }
    }

    #[test]
    fn odd_characters_travel_escaped() {
        assert_eq!(escape("http://u:p%40ss@h:1"), "http://u:p%2540ss@h:1");
        assert_eq!(escape("*.corp;$x&[y]"), "%2A.corp%3B%24x%26%5By%5D");
        assert_eq!(escape("é"), "%C3%A9");
        assert_eq!(
            args(&[("NO_PROXY", "*.corp")]),
            Ok(" b2p.proxy.no=%2A.corp".to_string())
        );
    }

    #[test]
    fn whitespace_and_quotes_are_refused_with_the_variable_named() {
        for bad in [
            "http://a b",
            "http://a\tb",
            "'x'",
            "a\"b",
            "a`b",
            "a\\b",
            "a\nb",
        ] {
            let e = args(&[("HTTPS_PROXY", bad)]).unwrap_err();
            let line = e.to_string();
            assert!(line.contains("HTTPS_PROXY"), "{line}");
            assert!(line.contains("--no-proxy-env"), "{line}");
            assert_eq!(line.lines().count(), 1, "{line}");
        }
        assert!(args(&[("no_proxy", "a, b")]).is_err());
    }

    #[test]
    fn a_no_proxy_list_too_long_for_the_command_line_is_refused() {
        let hosts: Vec<String> = (0..60).map(|i| format!("host{i}.example.corp")).collect();
        let e = args(&[("NO_PROXY", &hosts.join(","))]).unwrap_err();
        assert!(matches!(e, ProxyError::TooLong(n) if n > MAX_LEN), "{e}");
        assert!(e.to_string().contains("NO_PROXY"), "{e}");
        assert!(args(&[("NO_PROXY", &hosts[..10].join(","))]).is_ok());
    }
}
