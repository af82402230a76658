//! Translation of a Podman 1.9.3 `Create` record into Podman 4's
//! SpecGenerator (the body of `POST /libpod/containers/create`). Every field
//! the IDL declares is honoured; a value that does not parse is refused with
//! the path of the offending parameter.

use serde_json::{json, Map, Value};

use crate::idl::InvalidParameter;

/// What to do about pulling the image before creating the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    Missing,
    Never,
}

/// A create request ready for the REST API.
#[derive(Debug)]
pub struct CreatePlan {
    pub image: String,
    pub pull: PullPolicy,
    pub spec: Value,
}

fn bad(field: &str) -> InvalidParameter {
    InvalidParameter(format!("create.{field}"))
}

fn opt_str<'a>(c: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    c.get(key).and_then(Value::as_str)
}

fn opt_bool(c: &Map<String, Value>, key: &str) -> Option<bool> {
    c.get(key).and_then(Value::as_bool)
}

fn opt_list<'a>(c: &'a Map<String, Value>, key: &str) -> Vec<&'a str> {
    c.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Parses a size such as `64m`, `1g`, `512k`, `100b` or `1048576` into bytes.
pub fn parse_size(s: &str) -> Option<i64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1i64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let bytes = n * mult as f64;
    (bytes <= i64::MAX as f64).then_some(bytes as i64)
}

/// Parses `[ip:][hostPort:]containerPort[/proto]` into a port mapping.
pub fn parse_publish(spec: &str) -> Option<Value> {
    let (addr, proto) = match spec.rsplit_once('/') {
        Some((a, p)) if ["tcp", "udp", "sctp"].contains(&p) => (a, p),
        Some(_) => return None,
        None => (spec, "tcp"),
    };
    let parts: Vec<&str> = addr.rsplitn(3, ':').collect();
    let port = |p: &str| p.parse::<u16>().ok().filter(|&n| n != 0);
    let (ip, host, ctr) = match parts.as_slice() {
        [c] => ("", None, port(c)?),
        [c, h] => ("", Some(port(h)?), port(c)?),
        [c, h, ip] => (
            *ip,
            if h.is_empty() { None } else { Some(port(h)?) },
            port(c)?,
        ),
        _ => return None,
    };
    let mut m = json!({"container_port": ctr, "protocol": proto});
    if let Some(h) = host {
        m["host_port"] = json!(h);
    }
    if !ip.is_empty() {
        m["host_ip"] = json!(ip.trim_start_matches('[').trim_end_matches(']'));
    }
    Some(m)
}

fn key_values(items: &[&str], field: &str) -> Result<Map<String, Value>, InvalidParameter> {
    let mut m = Map::new();
    for (idx, item) in items.iter().enumerate() {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        if k.is_empty() {
            return Err(bad(&format!("{field}[{idx}]")));
        }
        m.insert(k.to_string(), Value::from(v));
    }
    Ok(m)
}

/// Builds the SpecGenerator for `create` (already checked against the IDL).
pub fn plan(create: &Map<String, Value>) -> Result<CreatePlan, InvalidParameter> {
    let args = opt_list(create, "args");
    let (image, rest) = args.split_first().ok_or_else(|| bad("args"))?;
    if image.is_empty() {
        return Err(bad("args[0]"));
    }
    let mut spec = Map::new();
    spec.insert("image".into(), json!(image));
    let command: Vec<&str> = if rest.is_empty() {
        opt_list(create, "command")
    } else {
        rest.to_vec()
    };
    if !command.is_empty() {
        spec.insert("command".into(), json!(command));
    }
    for (from, to) in [
        ("name", "name"),
        ("hostname", "hostname"),
        ("user", "user"),
        ("workDir", "work_dir"),
    ] {
        if let Some(v) = opt_str(create, from) {
            spec.insert(to.into(), json!(v));
        }
    }
    if let Some(ep) = opt_str(create, "entrypoint") {
        let list: Vec<String> = if ep.trim_start().starts_with('[') {
            serde_json::from_str(ep).map_err(|_| bad("entrypoint"))?
        } else {
            vec![ep.to_string()]
        };
        spec.insert("entrypoint".into(), json!(list));
    }
    let env = opt_list(create, "env");
    if !env.is_empty() {
        spec.insert("env".into(), Value::Object(key_values(&env, "env")?));
    }
    let labels = opt_list(create, "label");
    if !labels.is_empty() {
        spec.insert(
            "labels".into(),
            Value::Object(key_values(&labels, "label")?),
        );
    }
    let mut ports = Vec::new();
    for (idx, p) in opt_list(create, "publish").iter().enumerate() {
        ports.push(parse_publish(p).ok_or_else(|| bad(&format!("publish[{idx}]")))?);
    }
    if !ports.is_empty() {
        spec.insert("portmappings".into(), json!(ports));
    }
    let mut mounts = Vec::new();
    let mut volumes = Vec::new();
    for (idx, v) in opt_list(create, "volume").iter().enumerate() {
        let mut parts = v.splitn(3, ':');
        let (src, dst) = match (parts.next(), parts.next()) {
            (Some(s), Some(d)) if !s.is_empty() && d.starts_with('/') => (s, d),
            _ => return Err(bad(&format!("volume[{idx}]"))),
        };
        let options: Vec<&str> = parts
            .next()
            .map(|o| o.split(',').filter(|o| !o.is_empty()).collect())
            .unwrap_or_default();
        if src.starts_with('/') {
            mounts.push(
                json!({"destination": dst, "type": "bind", "source": src, "options": options}),
            );
        } else {
            volumes.push(json!({"Name": src, "Dest": dst, "Options": options}));
        }
    }
    for (idx, t) in opt_list(create, "tmpfs").iter().enumerate() {
        let (dst, opts) = t.split_once(':').unwrap_or((t, ""));
        if !dst.starts_with('/') {
            return Err(bad(&format!("tmpfs[{idx}]")));
        }
        let options: Vec<&str> = opts.split(',').filter(|o| !o.is_empty()).collect();
        mounts.push(
            json!({"destination": dst, "type": "tmpfs", "source": "tmpfs", "options": options}),
        );
    }
    if !mounts.is_empty() {
        spec.insert("mounts".into(), json!(mounts));
    }
    if !volumes.is_empty() {
        spec.insert("volumes".into(), json!(volumes));
    }
    for (from, to) in [
        ("dns", "dns_server"),
        ("addHost", "hostadd"),
        ("capAdd", "cap_add"),
        ("capDrop", "cap_drop"),
    ] {
        let list = opt_list(create, from);
        if !list.is_empty() {
            spec.insert(to.into(), json!(list));
        }
    }
    for (from, to) in [
        ("rm", "remove"),
        ("tty", "terminal"),
        ("interactive", "stdin"),
        ("privileged", "privileged"),
        ("readonly", "read_only_filesystem"),
        ("init", "init"),
    ] {
        if let Some(b) = opt_bool(create, from) {
            spec.insert(to.into(), json!(b));
        }
    }
    // `detach` is how every varlink-created container runs: nothing attaches.
    let mut limits = Map::new();
    if let Some(m) = opt_str(create, "memory") {
        let bytes = parse_size(m)
            .filter(|&b| b > 0)
            .ok_or_else(|| bad("memory"))?;
        limits.insert("memory".into(), json!({"limit": bytes}));
    }
    if let Some(c) = create.get("cpus").and_then(Value::as_f64) {
        if !(c > 0.0 && c <= 1024.0) {
            return Err(bad("cpus"));
        }
        let period = 100_000u64;
        limits.insert(
            "cpu".into(),
            json!({"quota": (c * period as f64) as i64, "period": period}),
        );
    }
    if !limits.is_empty() {
        spec.insert("resource_limits".into(), Value::Object(limits));
    }
    if let Some(net) = opt_str(create, "network") {
        match net {
            "host" | "none" | "private" | "bridge" | "slirp4netns" => {
                spec.insert("netns".into(), json!({"nsmode": net}));
            }
            "" => return Err(bad("network")),
            name => {
                spec.insert("netns".into(), json!({"nsmode": "bridge"}));
                spec.insert("Networks".into(), json!({ name: {} }));
            }
        }
    }
    if let Some(t) = create.get("stopTimeout").and_then(Value::as_i64) {
        let t = u32::try_from(t).map_err(|_| bad("stopTimeout"))?;
        spec.insert("stop_timeout".into(), json!(t));
    }
    let pull = match opt_str(create, "pull") {
        None | Some("missing") => PullPolicy::Missing,
        Some("always") | Some("newer") => PullPolicy::Always,
        Some("never") => PullPolicy::Never,
        Some(_) => return Err(bad("pull")),
    };
    Ok(CreatePlan {
        image: image.to_string(),
        pull,
        spec: Value::Object(spec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn image_and_command() {
        let p = plan(&create(
            json!({"args": ["busybox", "echo", "hello"], "rm": true, "env": ["A=1", "B"]}),
        ))
        .unwrap();
        assert_eq!(p.image, "busybox");
        assert_eq!(p.pull, PullPolicy::Missing);
        assert_eq!(p.spec["command"], json!(["echo", "hello"]));
        assert_eq!(p.spec["remove"], true);
        assert_eq!(p.spec["env"], json!({"A": "1", "B": ""}));
    }

    #[test]
    fn refuses_bad_values_by_name() {
        assert_eq!(
            plan(&create(json!({"args": []}))).unwrap_err().0,
            "create.args"
        );
        assert_eq!(
            plan(&create(json!({"args": ["i"], "publish": ["80", "x:y"]})))
                .unwrap_err()
                .0,
            "create.publish[1]"
        );
        assert_eq!(
            plan(&create(json!({"args": ["i"], "memory": "lots"})))
                .unwrap_err()
                .0,
            "create.memory"
        );
        assert_eq!(
            plan(&create(json!({"args": ["i"], "pull": "sometimes"})))
                .unwrap_err()
                .0,
            "create.pull"
        );
    }

    #[test]
    fn resources_ports_mounts() {
        let p = plan(&create(json!({"args": ["i"], "memory": "64m", "cpus": 0.5,
            "publish": ["127.0.0.1:8080:80/udp"], "volume": ["/h:/c:ro", "data:/d"],
            "tmpfs": ["/run:size=1m"], "network": "none"})))
        .unwrap();
        assert_eq!(p.spec["resource_limits"]["memory"]["limit"], 64 << 20);
        assert_eq!(p.spec["resource_limits"]["cpu"]["quota"], 50_000);
        assert_eq!(
            p.spec["portmappings"][0],
            json!({"container_port": 80, "host_port": 8080, "host_ip": "127.0.0.1", "protocol": "udp"})
        );
        assert_eq!(p.spec["mounts"][0]["options"], json!(["ro"]));
        assert_eq!(p.spec["mounts"][1]["type"], "tmpfs");
        assert_eq!(p.spec["volumes"][0]["Name"], "data");
        assert_eq!(p.spec["netns"]["nsmode"], "none");
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("-1"), None);
    }
}
