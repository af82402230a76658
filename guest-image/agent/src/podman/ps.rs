//! `io.podman.Ps` and `GetContainersByStatus` as Podman 1.9.3 answered
//! them: PsOpts into the query of `GET /libpod/containers/json`, and each
//! entry of Podman 4's list into a PsContainer (the texts `podman ps`
//! prints: "Up 3 minutes ago", "0.0.0.0:8080->80/tcp").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::convert::{i, rfc3339, strings};
use super::rest::encode;
use crate::idl::InvalidParameter;

/// The container states Podman 1.9.3 knew (define.StringToContainerStatus).
pub const STATES: [&str; 8] = [
    "unknown",
    "configured",
    "created",
    "running",
    "stopped",
    "exited",
    "paused",
    "removing",
];

/// The keys `podman ps --sort` took.
const SORT_KEYS: [&str; 8] = [
    "command",
    "created",
    "id",
    "image",
    "names",
    "runningfor",
    "size",
    "status",
];

/// What Ps asks the REST API and does with its answer.
#[derive(Debug, PartialEq, Eq)]
pub struct PsQuery {
    pub query: String,
    pub sort: Option<String>,
    pub no_trunc: bool,
    pub quiet: bool,
}

fn bad(field: &str) -> InvalidParameter {
    InvalidParameter(format!("opts.{field}"))
}

fn flag(opts: &Map<String, Value>, key: &str) -> bool {
    opts.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// The REST query for `opts` (already checked against the IDL): filters are
/// `key=value` texts, gathered as Podman 4's `{"key": ["value", ...]}`.
pub fn query(opts: &Map<String, Value>) -> Result<PsQuery, InvalidParameter> {
    let mut filters: Map<String, Value> = Map::new();
    if let Some(list) = opts.get("filters").and_then(Value::as_array) {
        for (idx, f) in list.iter().enumerate() {
            let (k, v) = f
                .as_str()
                .and_then(|f| f.split_once('='))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| bad(&format!("filters[{idx}]")))?;
            let values = filters.entry(k.to_string()).or_insert_with(|| json!([]));
            if let Some(a) = values.as_array_mut() {
                a.push(Value::from(v));
            }
        }
    }
    let last = match opts.get("last").and_then(Value::as_i64) {
        Some(n) if n < 0 => return Err(bad("last")),
        Some(n) => n,
        None => 0,
    };
    let limit = if flag(opts, "latest") { 1 } else { last };
    // --last and --latest look at every container, as podman ps did.
    let all = flag(opts, "all") || limit > 0;
    let mut q = format!("all={all}");
    if limit > 0 {
        q.push_str(&format!("&limit={limit}"));
    }
    if flag(opts, "size") {
        q.push_str("&size=true");
    }
    if flag(opts, "sync") {
        q.push_str("&sync=true");
    }
    if !filters.is_empty() {
        q.push_str(&format!(
            "&filters={}",
            encode(&Value::Object(filters).to_string())
        ));
    }
    let sort = match opts.get("sort").and_then(Value::as_str) {
        None | Some("") => None,
        Some(k) if SORT_KEYS.contains(&k) => Some(k.to_string()),
        Some(_) => return Err(bad("sort")),
    };
    Ok(PsQuery {
        query: q,
        sort,
        no_trunc: flag(opts, "noTrunc"),
        quiet: flag(opts, "quiet"),
    })
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn unix(v: &Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(t) => {
            humantime::parse_rfc3339_weak(t.trim_end_matches('Z').split('.').next().unwrap_or(t))
                .ok()
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_secs()).ok())
        }
        _ => None,
    }
}

/// RFC 3339 of Unix seconds; Go's zero time for a time never reached.
fn time_text(secs: Option<i64>) -> String {
    match secs {
        Some(s) if s > 0 => rfc3339(s),
        _ => "0001-01-01T00:00:00Z".to_string(),
    }
}

/// docker/go-units HumanDuration, which podman ps printed.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let minutes = secs / 60;
    let hours = (d.as_secs_f64() / 3600.0 + 0.5) as u64;
    match () {
        _ if secs < 1 => "Less than a second".into(),
        _ if secs == 1 => "1 second".into(),
        _ if secs < 60 => format!("{secs} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", secs / 3600 / 24 / 365),
    }
}

fn ago(secs: Option<i64>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let at = secs.and_then(|s| u64::try_from(s).ok()).unwrap_or(now);
    human_duration(Duration::from_secs(now.saturating_sub(at)))
}

/// podman ps's STATUS text for a Podman 4 list entry.
fn status_text(c: &Value) -> String {
    match s(c, "State") {
        "exited" | "stopped" => format!(
            "Exited ({}) {} ago",
            i(c, "ExitCode"),
            ago(unix(c, "ExitedAt"))
        ),
        "running" | "stopping" => format!("Up {} ago", ago(unix(c, "StartedAt"))),
        "paused" => "Paused".into(),
        "created" | "configured" => "Created".into(),
        "removing" => "Removing".into(),
        _ => "Error".into(),
    }
}

/// podman ps's PORTS text: `0.0.0.0:8080->80/tcp, ...`.
fn ports_text(c: &Value) -> String {
    let ports = c.get("Ports").and_then(Value::as_array);
    ports
        .map(|list| {
            list.iter()
                .map(|p| {
                    let ip = s(p, "host_ip");
                    let ip = if ip.is_empty() { "0.0.0.0" } else { ip };
                    format!(
                        "{ip}:{}->{}/{}",
                        i(p, "host_port"),
                        i(p, "container_port"),
                        s(p, "protocol")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn short(id: &str, no_trunc: bool) -> String {
    if no_trunc {
        id.to_string()
    } else {
        id.chars().take(12).collect()
    }
}

/// A PsContainer (1.9.3) from one entry of `GET /libpod/containers/json`;
/// with `quiet` only the ID is set, as podman ps -q printed only IDs.
pub fn container(c: &Value, no_trunc: bool, quiet: bool) -> Value {
    let id = short(s(c, "Id"), no_trunc);
    let null = Value::Null;
    let ns = c.get("Namespaces").unwrap_or(&null);
    let size = c.get("Size").unwrap_or(&null);
    let labels: Map<String, Value> = c
        .get("Labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), Value::from(s))))
                .collect()
        })
        .unwrap_or_default();
    if quiet {
        return json!({
            "id": id, "image": "", "command": "", "created": "", "ports": "", "names": "",
            "isInfra": false, "status": "", "state": "", "pidNum": 0, "rootFsSize": 0,
            "rwSize": 0, "pod": "", "createdAt": "", "exitedAt": "", "startedAt": "",
            "labels": {}, "nsPid": "", "cgroup": "", "ipc": "", "mnt": "", "net": "",
            "pidNs": "", "user": "", "uts": "", "mounts": "",
        });
    }
    let created = unix(c, "Created");
    json!({
        "id": id,
        "image": s(c, "Image"),
        "command": strings(c, "Command").join(" "),
        "created": format!("{} ago", ago(created)),
        "ports": ports_text(c),
        "names": strings(c, "Names").first().cloned().unwrap_or_default(),
        "isInfra": c.get("IsInfra").and_then(Value::as_bool).unwrap_or(false),
        "status": status_text(c),
        "state": s(c, "State"),
        "pidNum": i(c, "Pid"),
        "rootFsSize": i(size, "rootFsSize"),
        "rwSize": i(size, "rwSize"),
        "pod": short(s(c, "Pod"), no_trunc),
        "createdAt": time_text(created),
        "exitedAt": time_text(unix(c, "ExitedAt")),
        "startedAt": time_text(unix(c, "StartedAt")),
        "labels": labels,
        "nsPid": i(c, "Pid").to_string(),
        "cgroup": s(ns, "Cgroup"),
        "ipc": s(ns, "Ipc"),
        "mnt": s(ns, "Mnt"),
        "net": s(ns, "Net"),
        "pidNs": s(ns, "Pidns"),
        "user": s(ns, "User"),
        "uts": s(ns, "Uts"),
        "mounts": strings(c, "Mounts").join(","),
    })
}

/// Sorts Podman 4 list entries by a `podman ps --sort` key (newest first
/// for created and runningfor, as podman ps did).
pub fn sort(list: &mut [Value], key: &str) {
    let text = |c: &Value| -> String {
        match key {
            "command" => strings(c, "Command").join(" "),
            "id" => s(c, "Id").to_string(),
            "image" => s(c, "Image").to_string(),
            "names" => strings(c, "Names").first().cloned().unwrap_or_default(),
            "status" => s(c, "State").to_string(),
            _ => String::new(),
        }
    };
    list.sort_by(|a, b| match key {
        "created" | "runningfor" => unix(b, "Created").cmp(&unix(a, "Created")),
        "size" => {
            let size = |c: &Value| c.get("Size").map_or(0, |s| i(s, "rootFsSize"));
            size(a).cmp(&size(b))
        }
        _ => text(a).cmp(&text(b)),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn queries() {
        let q = query(&opts(json!({"all": false}))).unwrap();
        assert_eq!(q.query, "all=false");
        assert_eq!(q.sort, None);
        let q = query(&opts(
            json!({"filters": ["status=exited", "status=created", "name=a=b"],
            "last": 2, "size": true, "sort": "names", "noTrunc": true}),
        ))
        .unwrap();
        assert!(
            q.query.starts_with("all=true&limit=2&size=true&filters="),
            "{}",
            q.query
        );
        assert!(q
            .query
            .contains(&encode(r#"{"name":["a=b"],"status":["exited","created"]}"#)));
        assert_eq!(q.sort.as_deref(), Some("names"));
        assert!(q.no_trunc);
        assert_eq!(
            query(&opts(json!({"latest": true}))).unwrap().query,
            "all=true&limit=1"
        );
        assert_eq!(
            query(&opts(json!({"filters": ["ok=1", "nokey"]})))
                .unwrap_err()
                .0,
            "opts.filters[1]"
        );
        assert_eq!(
            query(&opts(json!({"filters": ["=x"]}))).unwrap_err().0,
            "opts.filters[0]"
        );
        assert_eq!(
            query(&opts(json!({"last": -1}))).unwrap_err().0,
            "opts.last"
        );
        assert_eq!(
            query(&opts(json!({"sort": "bogus"}))).unwrap_err().0,
            "opts.sort"
        );
    }

    #[test]
    fn maps_a_ps_line() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let c = json!({"Id": "0123456789abcdef", "Image": "busybox", "Command": ["sleep", "60"],
            "Created": rfc3339(now - 130), "State": "exited", "ExitCode": 3, "ExitedAt": now - 5,
            "StartedAt": now - 100, "Names": ["n1"], "Pid": 0, "Pod": "",
            "Ports": [{"host_ip": "", "container_port": 80, "host_port": 8080, "protocol": "tcp"}],
            "Namespaces": {"Net": "net:[1]"}, "Mounts": ["/data", "/x"], "Labels": {"a": "b"}});
        let p = container(&c, false, false);
        assert_eq!(p["id"], "0123456789ab");
        assert_eq!(p["command"], "sleep 60");
        assert_eq!(p["created"], "2 minutes ago");
        assert_eq!(p["status"], "Exited (3) 5 seconds ago");
        assert_eq!(p["ports"], "0.0.0.0:8080->80/tcp");
        assert_eq!(p["names"], "n1");
        assert_eq!(p["net"], "net:[1]");
        assert_eq!(p["mounts"], "/data,/x");
        assert_eq!(p["labels"], json!({"a": "b"}));
        assert_eq!(p["startedAt"], rfc3339(now - 100));
        let running = json!({"Id": "x", "State": "running", "StartedAt": now - 7200, "ExitedAt": -62135596800i64});
        let p = container(&running, true, false);
        assert_eq!(p["status"], "Up 2 hours ago");
        assert_eq!(p["exitedAt"], "0001-01-01T00:00:00Z");
        let q = container(&c, true, true);
        assert_eq!(q["id"], "0123456789abcdef");
        assert_eq!(q["image"], "");
    }

    #[test]
    fn durations_and_sorting() {
        assert_eq!(
            human_duration(Duration::from_millis(300)),
            "Less than a second"
        );
        assert_eq!(human_duration(Duration::from_secs(90)), "About a minute");
        assert_eq!(human_duration(Duration::from_secs(3 * 86400)), "3 days");
        let mut l = vec![
            json!({"Id": "b", "Created": 10, "Names": ["z"]}),
            json!({"Id": "a", "Created": 20, "Names": ["y"]}),
        ];
        sort(&mut l, "created");
        assert_eq!(l[0]["Id"], "a");
        sort(&mut l, "names");
        assert_eq!(l[0]["Id"], "a");
        sort(&mut l, "id");
        assert_eq!(l[0]["Id"], "a");
    }
}
