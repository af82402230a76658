//! Parsers for the `b2p-vmm run` option values, shared with the manager so
//! both accept exactly the same syntax. Each returns a one-line message on
//! error (clap prefixes it with the option name). [`parse_args`] gives both
//! binaries the same one-line usage errors.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Console, DiskConfig, FsBackend, FsConfig, NetBackend, NetConfig, VsockConfig};

/// `stdio`, `none` or `file:PATH`.
pub fn parse_console(s: &str) -> Result<Console, String> {
    match s {
        "stdio" => Ok(Console::Stdio),
        "none" => Ok(Console::None),
        _ => match s.strip_prefix("file:") {
            Some("") => Err("file: needs a path (file:PATH)".into()),
            Some(p) => Ok(Console::File(PathBuf::from(p))),
            None => Err(format!("{s:?} is not stdio, none or file:PATH")),
        },
    }
}

/// `PATH[,ro][,serial=S]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err("missing disk path (PATH[,ro][,serial=S])".into());
    }
    let mut disk = DiskConfig {
        path: PathBuf::from(path),
        read_only: false,
        serial: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            None if opt == "rw" => disk.read_only = false,
            Some(("serial", v)) => {
                if v.is_empty() || v.len() > 20 || !v.is_ascii() {
                    return Err(format!("serial {v:?} must be 1 to 20 ASCII characters"));
                }
                disk.serial = Some(v.to_string());
            }
            _ => return Err(format!("unknown disk option {opt:?} (ro, serial=S)")),
        }
    }
    Ok(disk)
}

/// `aa:bb:cc:dd:ee:ff`, unicast (the devices crate's parser, its error as text).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    b2p_devices::virtio::net::parse_mac(s).map_err(|e| e.to_string())
}

/// `tap=NAME[,mac=M]`, `passt[,mac=M]` or `passt=PATH[,mac=M]`.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    const USAGE: &str = "tap=NAME[,mac=M], passt[,mac=M] or passt=PATH[,mac=M]";
    let mut backend = None;
    let mut mac = None;
    for opt in s.split(',') {
        let b = match opt.split_once('=') {
            None if opt == "passt" => NetBackend::Passt { socket: None },
            Some(("passt", v)) if !v.is_empty() => NetBackend::Passt {
                socket: Some(PathBuf::from(v)),
            },
            Some(("tap", v)) if !v.is_empty() => {
                if v.len() >= libc::IFNAMSIZ {
                    return Err(format!(
                        "TAP name {v:?} is longer than {} bytes",
                        libc::IFNAMSIZ - 1
                    ));
                }
                NetBackend::Tap {
                    name: v.to_string(),
                }
            }
            Some(("mac", v)) => {
                mac = Some(parse_mac(v)?);
                continue;
            }
            _ => return Err(format!("unknown net option {opt:?} ({USAGE})")),
        };
        if backend.replace(b).is_some() {
            return Err(format!(
                "more than one of tap= and passt in {s:?} ({USAGE})"
            ));
        }
    }
    let backend = backend.ok_or(format!("missing tap=NAME or passt ({USAGE})"))?;
    Ok(NetConfig { backend, mac })
}

/// `cid=N,uds=PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let mut cid = None;
    let mut uds = None;
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("cid", v)) => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| format!("cid {v:?} is not a number"))?;
                if n < 3 || n == u32::MAX {
                    return Err(format!("cid {n} is reserved (use 3 or more)"));
                }
                cid = Some(n);
            }
            Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown vsock option {opt:?} (cid=N,uds=PATH)")),
        }
    }
    Ok(VsockConfig {
        cid: cid.ok_or("missing cid=N")?,
        uds_path: uds.ok_or("missing uds=PATH")?,
    })
}

/// Splits `s` at single commas; `,,` stands for a literal comma (so a
/// path may hold one, as in QEMU's option syntax).
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                cur.push(',');
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// `tag=TAG,path=DIR[,ro]` or `tag=TAG,socket=PATH` (a `,` inside a path
/// is written `,,`).
pub fn parse_fs(s: &str) -> Result<FsConfig, String> {
    const USAGE: &str = "tag=TAG,path=DIR[,ro] or tag=TAG,socket=PATH";
    let (mut tag, mut path, mut socket, mut ro) = (None, None, None, false);
    for opt in split_options(s) {
        match opt.split_once('=') {
            None if opt == "ro" => ro = true,
            Some(("tag", v)) => {
                b2p_devices::virtio::fs::check_tag(v).map_err(|e| e.to_string())?;
                tag = Some(v.to_string());
            }
            Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
            Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown fs option {opt:?} ({USAGE})")),
        }
    }
    let tag = tag.ok_or(format!("missing tag=TAG ({USAGE})"))?;
    let backend = match (path, socket) {
        (Some(path), None) => FsBackend::Folder {
            path,
            read_only: ro,
        },
        (None, Some(_)) if ro => {
            return Err("ro needs path=DIR (a running virtiofsd decides for itself)".into())
        }
        (None, Some(p)) => FsBackend::Socket(p),
        _ => return Err(format!("give one of path=DIR and socket=PATH ({USAGE})")),
    };
    Ok(FsConfig { tag, backend })
}

/// `PORT=PATH`.
pub fn parse_vsock_port(s: &str) -> Result<(u32, PathBuf), String> {
    let (port, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PORT=PATH"))?;
    let port: u32 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number"))?;
    if path.is_empty() {
        return Err("missing PATH in PORT=PATH".into());
    }
    Ok((port, PathBuf::from(path)))
}

/// Parses this process's arguments. Help and version print as clap prints
/// them (exit 0); a usage error becomes one line
/// `PROG: error: … (see HELP)` on stderr and exit status 2.
pub fn parse_args<P: clap::Parser>(prog: &str, help: &str) -> Result<P, ExitCode> {
    use clap::error::ErrorKind;
    let e = match P::try_parse() {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            Err(ExitCode::from(2))
        }
        _ => {
            let text = e.render().to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            // clap puts what is missing on the lines after the first.
            let detail: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.contains(line))
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            if detail.is_empty() {
                eprintln!("{prog}: error: {line} (see {help})");
            } else {
                eprintln!("{prog}: error: {line} {} (see {help})", detail.join(" "));
            }
            Err(ExitCode::from(2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console() {
        assert_eq!(parse_console("stdio"), Ok(Console::Stdio));
        assert_eq!(parse_console("none"), Ok(Console::None));
        assert_eq!(
            parse_console("file:/tmp/x.log"),
            Ok(Console::File("/tmp/x.log".into()))
        );
        assert!(parse_console("file:").is_err());
        assert!(parse_console("tty").is_err());
    }

    #[test]
    fn disk() {
        let d = parse_disk("/a/b.raw").unwrap();
        assert_eq!((d.read_only, d.serial), (false, None));
        let d = parse_disk("/a/b.raw,ro,serial=data1").unwrap();
        assert!(d.read_only);
        assert_eq!(d.serial.as_deref(), Some("data1"));
        assert!(parse_disk("").is_err());
        assert!(parse_disk(",ro").is_err());
        assert!(parse_disk("/a,rx").is_err());
        assert!(parse_disk("/a,serial=123456789012345678901").is_err());
    }

    #[test]
    fn net() {
        let n = parse_net("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(
            n.backend,
            NetBackend::Tap {
                name: "tap0".into()
            }
        );
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(parse_net("tap=t1").unwrap().mac, None);
        assert!(parse_net("mac=52:54:00:12:34:56").is_err());
        assert!(parse_net("tap=t,mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("tap=t,mac=52:54:00:12:34").is_err());
        assert!(parse_net("tap=t,mac=52:54:00:12:34:56:78").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        assert_eq!(parse_net("passt").unwrap(), NetConfig::passt());
        let n = parse_net("passt=/run/p.sock,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(
            n.backend,
            NetBackend::Passt {
                socket: Some("/run/p.sock".into())
            }
        );
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(parse_net("passt=").is_err());
        assert!(parse_net("passt,tap=t0").is_err());
        assert!(parse_net("passtx").is_err());
        assert!(parse_net("").is_err());
    }

    #[test]
    fn fs() {
        let f = parse_fs("tag=src,path=/home/u/src").unwrap();
        assert_eq!(f.tag, "src");
        assert_eq!(
            f.backend,
            FsBackend::Folder {
                path: "/home/u/src".into(),
                read_only: false
            }
        );
        let f = parse_fs("tag=d,path=/tmp/a,,b:c,ro").unwrap();
        assert_eq!(
            f.backend,
            FsBackend::Folder {
                path: "/tmp/a,b:c".into(),
                read_only: true
            }
        );
        let f = parse_fs("tag=s,socket=/run/vfs.sock").unwrap();
        assert_eq!(f.backend, FsBackend::Socket("/run/vfs.sock".into()));
        assert!(parse_fs("path=/x").is_err());
        assert!(parse_fs("tag=a,path=/x,socket=/y").is_err());
        assert!(parse_fs("tag=a").is_err());
        assert!(parse_fs("tag=a:b,path=/x").is_err());
        assert!(parse_fs("tag=a,socket=/y,ro").is_err());
        assert!(parse_fs("tag=a,path=/x,rw").is_err());
    }

    #[test]
    fn vsock() {
        let v = parse_vsock("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.uds_path), (3, PathBuf::from("/tmp/v.sock")));
        assert!(parse_vsock("cid=2,uds=/x").is_err());
        assert!(parse_vsock("cid=3").is_err());
        assert!(parse_vsock("uds=/x").is_err());
        assert!(parse_vsock("cid=x,uds=/x").is_err());
        assert_eq!(
            parse_vsock_port("1024=/tmp/io.podman"),
            Ok((1024, PathBuf::from("/tmp/io.podman")))
        );
        assert!(parse_vsock_port("1024").is_err());
        assert!(parse_vsock_port("x=/a").is_err());
        assert!(parse_vsock_port("1024=").is_err());
    }
}
