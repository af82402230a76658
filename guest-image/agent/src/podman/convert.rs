//! Conversions from Podman 4's REST answers to the Podman 1.9.3 varlink
//! types (Container, Image, PodmanInfo, GetVersion), and small text helpers
//! (timestamps, multiplexed log streams).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

fn s(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

pub(super) fn i(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or_default()
}

pub(super) fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn string_map(v: &Value, key: &str) -> Map<String, Value> {
    v.get(key)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), Value::from(s))))
                .collect()
        })
        .unwrap_or_default()
}

/// RFC 3339 text of a Unix time in seconds.
pub fn rfc3339(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A timestamp field that may be RFC 3339 text or Unix seconds, as text,
/// and its age.
fn created(v: &Value, key: &str) -> (String, Option<Duration>) {
    let now = SystemTime::now();
    match v.get(key) {
        Some(Value::String(t)) => {
            let age = humantime::parse_rfc3339_weak(
                t.trim_end_matches('Z').split('.').next().unwrap_or(t),
            )
            .ok()
            .and_then(|c| now.duration_since(c).ok());
            (t.clone(), age)
        }
        Some(Value::Number(n)) => {
            let secs = n.as_i64().unwrap_or_default();
            let at = UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
            (rfc3339(secs), now.duration_since(at).ok())
        }
        _ => (String::new(), None),
    }
}

/// A Container (1.9.3) from one entry of `GET /libpod/containers/json`.
pub fn container(c: &Value) -> Value {
    let (createdat, age) = created(c, "Created");
    let runningfor = age
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
        .unwrap_or_default();
    let ports: Vec<Value> = c
        .get("Ports")
        .and_then(Value::as_array)
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    json!({
                        "host_port": i(p, "host_port").to_string(),
                        "host_ip": s(p, "host_ip"),
                        "protocol": s(p, "protocol"),
                        "container_port": i(p, "container_port").to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mounts: Vec<Value> = strings(c, "Mounts")
        .into_iter()
        .map(|d| json!({"destination": d, "type": "", "source": "", "options": []}))
        .collect();
    let ns = c.get("Namespaces").cloned().unwrap_or(Value::Null);
    let size = c.get("Size").cloned().unwrap_or(Value::Null);
    let state = s(c, "State");
    json!({
        "id": s(c, "Id"),
        "image": s(c, "Image"),
        "imageid": s(c, "ImageID"),
        "command": strings(c, "Command"),
        "createdat": createdat,
        "runningfor": runningfor,
        "status": state,
        "ports": ports,
        "rootfssize": i(&size, "rootFsSize"),
        "rwsize": i(&size, "rwSize"),
        "names": strings(c, "Names").first().cloned().unwrap_or_default(),
        "labels": string_map(c, "Labels"),
        "mounts": mounts,
        "containerrunning": state == "running",
        "namespaces": {
            "user": s(&ns, "User"),
            "uts": s(&ns, "Uts"),
            "pidns": s(&ns, "Pidns"),
            "pid": i(c, "Pid").to_string(),
            "cgroup": s(&ns, "Cgroup"),
            "net": s(&ns, "Net"),
            "mnt": s(&ns, "Mnt"),
            "ipc": s(&ns, "Ipc"),
        },
    })
}

/// An Image (1.9.3) from one entry of `GET /libpod/images/json`.
pub fn image(m: &Value) -> Value {
    let (created, _) = created(m, "Created");
    let digest = s(m, "Digest");
    let digests: Vec<String> = if digest.is_empty() {
        Vec::new()
    } else {
        vec![digest.clone()]
    };
    json!({
        "id": s(m, "Id"),
        "digest": digest,
        "digests": digests,
        "parentId": s(m, "ParentId"),
        "repoTags": strings(m, "RepoTags"),
        "repoDigests": strings(m, "RepoDigests"),
        "created": created,
        "size": i(m, "Size"),
        "virtualSize": i(m, "VirtualSize"),
        "containers": i(m, "Containers"),
        "labels": string_map(m, "Labels"),
        "isParent": false,
        "topLayer": "",
        "readOnly": m.get("ReadOnly").and_then(Value::as_bool).unwrap_or(false),
        "history": strings(m, "History"),
    })
}

/// GetVersion's reply (1.9.3) from `GET /libpod/version`.
pub fn version(v: &Value) -> Value {
    json!({
        "version": s(v, "Version"),
        "go_version": s(v, "GoVersion"),
        "git_commit": s(v, "GitCommit"),
        "built": s(v, "BuildTime"),
        "os_arch": format!("{}/{}", s(v, "Os"), s(v, "Arch")),
        "remote_api_version": 1,
    })
}

/// PodmanInfo (1.9.3) from `GET /libpod/info`.
pub fn info(v: &Value) -> Value {
    let null = Value::Null;
    let host = v.get("host").unwrap_or(&null);
    let dist = host.get("distribution").unwrap_or(&null);
    let store = v.get("store").unwrap_or(&null);
    let status = store.get("graphStatus").unwrap_or(&null);
    let ver = v.get("version").unwrap_or(&null);
    let regs = v.get("registries").unwrap_or(&null);
    let flagged = |flag: &str| -> Vec<String> {
        regs.as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, r)| r.get(flag).and_then(Value::as_bool) == Some(true))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    json!({
        "host": {
            "buildah_version": s(host, "buildahVersion"),
            "distribution": {
                "distribution": s(dist, "distribution"),
                "version": s(dist, "version"),
            },
            "mem_free": i(host, "memFree"),
            "mem_total": i(host, "memTotal"),
            "swap_free": i(host, "swapFree"),
            "swap_total": i(host, "swapTotal"),
            "arch": s(host, "arch"),
            "cpus": i(host, "cpus"),
            "hostname": s(host, "hostname"),
            "kernel": s(host, "kernel"),
            "os": s(host, "os"),
            "uptime": s(host, "uptime"),
            "eventlogger": s(host, "eventLogger"),
        },
        "registries": {
            "search": strings(regs, "search"),
            "insecure": flagged("Insecure"),
            "blocked": flagged("Blocked"),
        },
        "store": {
            "containers": i(store.get("containerStore").unwrap_or(&null), "number"),
            "images": i(store.get("imageStore").unwrap_or(&null), "number"),
            "graph_driver_name": s(store, "graphDriverName"),
            "graph_driver_options": store.get("graphOptions").map(Value::to_string).unwrap_or_default(),
            "graph_root": s(store, "graphRoot"),
            "graph_status": {
                "backing_filesystem": s(status, "Backing Filesystem"),
                "native_overlay_diff": s(status, "Native Overlay Diff"),
                "supports_d_type": s(status, "Supports d_type"),
            },
            "run_root": s(store, "runRoot"),
        },
        "podman": {
            "compiler": "gc",
            "go_version": s(ver, "GoVersion"),
            "podman_version": s(ver, "Version"),
            "git_commit": s(ver, "GitCommit"),
        },
    })
}

/// The text of a log stream: Docker's multiplexed frames (8-byte header:
/// stream, 3 zero bytes, big-endian length) unless the container has a TTY.
/// Truncated or malformed framing falls back to the raw bytes.
pub fn demux_logs(body: &[u8], tty: bool) -> String {
    if tty {
        return String::from_utf8_lossy(body).into_owned();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while !rest.is_empty() {
        let Some((head, tail)) = rest.split_at_checked(8) else {
            return String::from_utf8_lossy(body).into_owned();
        };
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if head[0] > 3 || head[1..4] != [0, 0, 0] || len > tail.len() {
            return String::from_utf8_lossy(body).into_owned();
        }
        let (frame, tail) = tail.split_at(len);
        out.extend_from_slice(frame);
        rest = tail;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Log text as lines, without their newlines.
pub fn log_lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demuxes_frames() {
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 6];
        b.extend_from_slice(b"hello\n");
        b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        b.extend_from_slice(b"err\n");
        assert_eq!(log_lines(&demux_logs(&b, false)), ["hello", "err"]);
        assert_eq!(demux_logs(b"raw\n", true), "raw\n");
        // A truncated frame never panics.
        assert_eq!(demux_logs(&[1, 0, 0, 0, 0, 0, 0, 99, b'x'], false).len(), 9);
    }

    #[test]
    fn maps_a_container() {
        let c = json!({"Id": "abc", "Image": "busybox", "ImageID": "def", "Command": ["echo", "hi"],
            "Created": "2020-01-01T00:00:00.5Z", "State": "exited", "Names": ["n1"],
            "Labels": null, "Ports": [{"host_ip": "", "container_port": 80, "host_port": 8080, "protocol": "tcp"}],
            "Namespaces": {"Net": "net:[1]"}, "Pid": 0});
        let v = container(&c);
        assert_eq!(v["id"], "abc");
        assert_eq!(v["names"], "n1");
        assert_eq!(v["containerrunning"], false);
        assert_eq!(v["ports"][0]["host_port"], "8080");
        assert_eq!(v["namespaces"]["net"], "net:[1]");
        assert!(!v["runningfor"].as_str().unwrap().is_empty());
    }

    #[test]
    fn maps_version() {
        let v = version(
            &json!({"Version": "4.3.1", "GoVersion": "go1.19", "GitCommit": "",
            "BuildTime": "1970-01-01T00:00:00Z", "Os": "linux", "Arch": "amd64"}),
        );
        assert_eq!(v["os_arch"], "linux/amd64");
        assert_eq!(v["remote_api_version"], 1);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
