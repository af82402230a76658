//! The `io.podman` interface (Podman 1.9.3 names and types) implemented on
//! Podman's REST API.

pub mod convert;
pub mod create;
pub mod ps;
pub mod rest;

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};

use crate::protocol::VarlinkError;
use crate::server::Progress;
use rest::{encode, PodmanService, RestError, API};

const IFACE: &str = "io.podman";

fn error_occurred(reason: impl Into<String>) -> VarlinkError {
    VarlinkError::new(
        format!("{IFACE}.ErrorOccurred"),
        json!({"reason": reason.into()}),
    )
}

/// Maps a REST failure: 404 to `not_found` (ContainerNotFound or
/// ImageNotFound for `id`), an unreachable service to RuntimeError, the rest
/// to ErrorOccurred.
fn map_err(e: RestError, not_found: Option<(&str, &str)>) -> VarlinkError {
    match (&e, not_found) {
        (RestError::Status { status, .. }, Some((error, id)))
            if *status == StatusCode::NOT_FOUND =>
        {
            VarlinkError::new(
                format!("{IFACE}.{error}"),
                json!({"id": id, "reason": e.message()}),
            )
        }
        (RestError::Unreachable { .. } | RestError::Start(_) | RestError::Http(_), _) => {
            VarlinkError::new(
                format!("{IFACE}.RuntimeError"),
                json!({"reason": e.to_string()}),
            )
        }
        _ => error_occurred(e.message()),
    }
}

fn ctr(id: &str) -> impl Fn(RestError) -> VarlinkError + '_ {
    move |e| map_err(e, Some(("ContainerNotFound", id)))
}

fn img(id: &str) -> impl Fn(RestError) -> VarlinkError + '_ {
    move |e| map_err(e, Some(("ImageNotFound", id)))
}

fn plain(e: RestError) -> VarlinkError {
    map_err(e, None)
}

fn str_param<'a>(p: &'a Map<String, Value>, key: &str) -> &'a str {
    p.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn int_param(p: &Map<String, Value>, key: &str) -> i64 {
    p.get(key).and_then(Value::as_i64).unwrap_or_default()
}

fn bool_param(p: &Map<String, Value>, key: &str) -> bool {
    p.get(key).and_then(Value::as_bool).unwrap_or_default()
}

/// The io.podman implementation.
pub struct Podman {
    rest: PodmanService,
    /// GetVersion's answer, with the service generation it came from:
    /// Podman's /version runs conmon and the OCI runtime each time (seconds
    /// on a busy machine), and its answer only changes with the service.
    version: std::sync::Mutex<Option<(u64, Value)>>,
}

impl Podman {
    pub fn new(rest: PodmanService) -> Self {
        Self {
            rest,
            version: std::sync::Mutex::new(None),
        }
    }

    pub fn service(&self) -> &PodmanService {
        &self.rest
    }

    /// Runs `method`; `None` when this interface does not implement it.
    pub async fn call(
        &self,
        method: &str,
        p: &Map<String, Value>,
        progress: Option<Progress>,
    ) -> Option<Result<Value, VarlinkError>> {
        Some(match method {
            "GetVersion" => self.get_version().await,
            "GetInfo" => self.get_info().await,
            "ListContainers" => self.list_containers().await,
            "Ps" => {
                let none = Map::new();
                let opts = p.get("opts").and_then(Value::as_object).unwrap_or(&none);
                self.ps(opts).await
            }
            "GetContainersByStatus" => self.by_status(p.get("status")).await,
            "GetContainer" => self.get_container(str_param(p, "id")).await,
            "ContainerExists" => self.container_exists(str_param(p, "name")).await,
            "ListContainerMounts" => self.container_mounts().await,
            "CreateContainer" => self.create_container(p).await,
            "InspectContainer" => self
                .inspect(str_param(p, "name"))
                .await
                .map(|v| json!({"container": v.to_string()})),
            "StartContainer" => self.start(str_param(p, "name")).await,
            "StopContainer" => {
                self.stop(str_param(p, "name"), int_param(p, "timeout"))
                    .await
            }
            "RemoveContainer" => {
                self.remove(
                    str_param(p, "name"),
                    bool_param(p, "force"),
                    bool_param(p, "removeVolumes"),
                )
                .await
            }
            "GetContainerLogs" => self.logs(str_param(p, "name")).await,
            "WaitContainer" => {
                self.wait(str_param(p, "name"), int_param(p, "interval"))
                    .await
            }
            "ListImages" => self.list_images().await,
            "ImageExists" => self.image_exists(str_param(p, "name")).await,
            "PullImage" => {
                let creds = p.get("creds").cloned().unwrap_or(Value::Null);
                self.pull(str_param(p, "name"), &creds, progress).await
            }
            "RemoveImage" => {
                self.remove_image(str_param(p, "name"), bool_param(p, "force"))
                    .await
            }
            _ => return None,
        })
    }

    async fn get_version(&self) -> Result<Value, VarlinkError> {
        // The service must answer (this also starts it); the cached version
        // is used only while the service this agent saw is still the one.
        drop(self.rest.connect().await.map_err(plain)?);
        let generation = self.rest.generation();
        if let Ok(cache) = self.version.lock() {
            if let Some((_, v)) = cache.as_ref().filter(|(g, _)| *g == generation) {
                return Ok(v.clone());
            }
        }
        let v = self
            .rest
            .json(Method::GET, &format!("{API}/version"), None)
            .await
            .map_err(plain)?;
        let v = convert::version(&v);
        if let Ok(mut cache) = self.version.lock() {
            *cache = Some((generation, v.clone()));
        }
        Ok(v)
    }

    async fn get_info(&self) -> Result<Value, VarlinkError> {
        let v = self
            .rest
            .json(Method::GET, &format!("{API}/info"), None)
            .await
            .map_err(plain)?;
        Ok(json!({"info": convert::info(&v)}))
    }

    async fn raw_containers(&self) -> Result<Vec<Value>, VarlinkError> {
        let v = self
            .rest
            .json(
                Method::GET,
                &format!("{API}/containers/json?all=true"),
                None,
            )
            .await
            .map_err(plain)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    async fn list_containers(&self) -> Result<Value, VarlinkError> {
        let list: Vec<Value> = self
            .raw_containers()
            .await?
            .iter()
            .map(convert::container)
            .collect();
        Ok(json!({"containers": list}))
    }

    async fn ps(&self, opts: &Map<String, Value>) -> Result<Value, VarlinkError> {
        let q = ps::query(opts).map_err(|e| VarlinkError::invalid_parameter(&e.0))?;
        let v = self
            .rest
            .json(
                Method::GET,
                &format!("{API}/containers/json?{}", q.query),
                None,
            )
            .await
            .map_err(plain)?;
        let mut list = v.as_array().cloned().unwrap_or_default();
        if let Some(key) = &q.sort {
            ps::sort(&mut list, key);
        }
        let list: Vec<Value> = list
            .iter()
            .map(|c| ps::container(c, q.no_trunc, q.quiet))
            .collect();
        Ok(json!({"containers": list}))
    }

    async fn by_status(&self, status: Option<&Value>) -> Result<Value, VarlinkError> {
        let wanted: Vec<&str> = status
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(bad) = wanted.iter().find(|s| !ps::STATES.contains(s)) {
            return Err(error_occurred(format!(
                "unknown container state {bad:?} (one of {})",
                ps::STATES.join(", ")
            )));
        }
        // Any of the states (an empty list: every container, as 1.9.3).
        let list: Vec<Value> = self
            .raw_containers()
            .await?
            .iter()
            .filter(|c| {
                let state = c.get("State").and_then(Value::as_str).unwrap_or_default();
                wanted.is_empty() || wanted.contains(&state)
            })
            .map(convert::container)
            .collect();
        Ok(json!({"containerS": list}))
    }

    async fn container_exists(&self, name: &str) -> Result<Value, VarlinkError> {
        if name.is_empty() {
            return Ok(json!({"exists": 1}));
        }
        let exists = match self
            .rest
            .call(
                Method::GET,
                &format!("{API}/containers/{}/exists", encode(name)),
                None,
            )
            .await
        {
            Ok(_) => true,
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => false,
            Err(e) => return Err(plain(e)),
        };
        Ok(json!({"exists": if exists { 0 } else { 1 }}))
    }

    async fn container_mounts(&self) -> Result<Value, VarlinkError> {
        let v = self
            .rest
            .json(Method::GET, &format!("{API}/containers/showmounted"), None)
            .await
            .map_err(plain)?;
        let mounts: Map<String, Value> = v
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|p| (k.clone(), Value::from(p))))
                    .collect()
            })
            .unwrap_or_default();
        Ok(json!({"mounts": mounts}))
    }

    async fn get_container(&self, id: &str) -> Result<Value, VarlinkError> {
        let not_found = || {
            VarlinkError::new(
                format!("{IFACE}.ContainerNotFound"),
                json!({"id": id, "reason": "no such container"}),
            )
        };
        if id.is_empty() {
            return Err(not_found());
        }
        let list = self.raw_containers().await?;
        let by_name = list.iter().find(|c| {
            c.get("Names")
                .and_then(Value::as_array)
                .is_some_and(|n| n.iter().any(|n| n.as_str() == Some(id)))
        });
        let by_id: Vec<&Value> = list
            .iter()
            .filter(|c| {
                c.get("Id")
                    .and_then(Value::as_str)
                    .is_some_and(|c| c.starts_with(id))
            })
            .collect();
        let found = match (by_name, by_id.as_slice()) {
            (Some(c), _) => c,
            (None, [c]) => c,
            (None, []) => return Err(not_found()),
            (None, _) => return Err(error_occurred(format!("container ID {id} is ambiguous"))),
        };
        Ok(json!({"container": convert::container(found)}))
    }

    async fn inspect(&self, name: &str) -> Result<Value, VarlinkError> {
        // An empty name (a missing parameter) names no container; as a
        // path segment it would name the collection.
        if name.is_empty() {
            return Err(VarlinkError::new(
                format!("{IFACE}.ContainerNotFound"),
                json!({"id": name, "reason": "no container name or ID given"}),
            ));
        }
        self.rest
            .json(
                Method::GET,
                &format!("{API}/containers/{}/json", encode(name)),
                None,
            )
            .await
            .map_err(ctr(name))
    }

    /// The full ID of a container named or ID-prefixed `name`.
    async fn resolve(&self, name: &str) -> Result<String, VarlinkError> {
        let v = self.inspect(name).await?;
        v.get("Id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| error_occurred("podman's inspect data has no Id"))
    }

    async fn create_container(&self, p: &Map<String, Value>) -> Result<Value, VarlinkError> {
        let empty = Map::new();
        let c = p.get("create").and_then(Value::as_object).unwrap_or(&empty);
        let plan = create::plan(c).map_err(|e| VarlinkError::invalid_parameter(&e.0))?;
        let not_found = |why: String| {
            VarlinkError::new(
                format!("{IFACE}.ImageNotFound"),
                json!({"id": plan.image, "reason": why}),
            )
        };
        let pull = match plan.pull {
            create::PullPolicy::Always => true,
            create::PullPolicy::Never => {
                if !self.exists(&plan.image).await? {
                    return Err(not_found("not in the local store (pull: never)".into()));
                }
                false
            }
            create::PullPolicy::Missing => !self.exists(&plan.image).await?,
        };
        if pull {
            if let Err(e) = self.pull(&plan.image, &Value::Null, None).await {
                // An image that is not here and cannot be pulled is not
                // found; a failed re-pull of a local image stays an error.
                if plan.pull == create::PullPolicy::Missing || !self.exists(&plan.image).await? {
                    let why = e
                        .parameters
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or("pull failed");
                    return Err(not_found(format!(
                        "not in the local store, and pulling it failed: {why}"
                    )));
                }
                return Err(e);
            }
        }
        let v = self
            .rest
            .json(
                Method::POST,
                &format!("{API}/containers/create"),
                Some(&plan.spec),
            )
            .await
            .map_err(img(&plan.image))?;
        let id = v.get("Id").and_then(Value::as_str).unwrap_or_default();
        Ok(json!({"container": id}))
    }

    async fn start(&self, name: &str) -> Result<Value, VarlinkError> {
        let id = self.resolve(name).await?;
        self.rest
            .call(Method::POST, &format!("{API}/containers/{id}/start"), None)
            .await
            .map_err(ctr(name))?;
        Ok(json!({"container": id}))
    }

    async fn stop(&self, name: &str, timeout: i64) -> Result<Value, VarlinkError> {
        let id = self.resolve(name).await?;
        let timeout = timeout.clamp(0, i64::from(u32::MAX));
        self.rest
            .call(
                Method::POST,
                &format!("{API}/containers/{id}/stop?timeout={timeout}"),
                None,
            )
            .await
            .map_err(ctr(name))?;
        Ok(json!({"container": id}))
    }

    async fn remove(&self, name: &str, force: bool, volumes: bool) -> Result<Value, VarlinkError> {
        let id = self.resolve(name).await?;
        let v = self
            .rest
            .json(
                Method::DELETE,
                &format!("{API}/containers/{id}?force={force}&v={volumes}"),
                None,
            )
            .await
            .map_err(ctr(name))?;
        // Podman 4 answers [{Id, Err}] per removed container.
        if let Some(err) = v
            .as_array()
            .and_then(|a| a.iter().find_map(|r| r.get("Err").and_then(Value::as_str)))
            .filter(|e| !e.is_empty())
        {
            return Err(error_occurred(err));
        }
        Ok(json!({"container": id}))
    }

    async fn logs(&self, name: &str) -> Result<Value, VarlinkError> {
        let c = self.inspect(name).await?;
        let tty = c
            .pointer("/Config/Tty")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let id = c.get("Id").and_then(Value::as_str).unwrap_or(name);
        let (_, body) = self
            .rest
            .call(
                Method::GET,
                &format!(
                    "{API}/containers/{}/logs?stdout=true&stderr=true",
                    encode(id)
                ),
                None,
            )
            .await
            .map_err(ctr(name))?;
        let text = convert::demux_logs(&body, tty);
        Ok(json!({"container": convert::log_lines(&text)}))
    }

    async fn wait(&self, name: &str, interval_ms: i64) -> Result<Value, VarlinkError> {
        let id = self.resolve(name).await?;
        let mut path = format!("{API}/containers/{id}/wait?condition=stopped&condition=exited");
        if interval_ms > 0 {
            path.push_str(&format!("&interval={}ms", interval_ms.min(60_000)));
        }
        let v = self
            .rest
            .json(Method::POST, &path, None)
            .await
            .map_err(ctr(name))?;
        let code = v
            .as_i64()
            .or_else(|| v.get("StatusCode").and_then(Value::as_i64))
            .ok_or_else(|| error_occurred(format!("unexpected wait answer {v}")))?;
        Ok(json!({"exitcode": code}))
    }

    async fn list_images(&self) -> Result<Value, VarlinkError> {
        let v = self
            .rest
            .json(Method::GET, &format!("{API}/images/json"), None)
            .await
            .map_err(plain)?;
        let list: Vec<Value> = v
            .as_array()
            .map(|a| a.iter().map(convert::image).collect())
            .unwrap_or_default();
        Ok(json!({"images": list}))
    }

    async fn exists(&self, name: &str) -> Result<bool, VarlinkError> {
        if name.is_empty() {
            return Ok(false);
        }
        match self
            .rest
            .call(
                Method::GET,
                &format!("{API}/images/{}/exists", encode(name)),
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(false),
            Err(e) => Err(plain(e)),
        }
    }

    async fn image_exists(&self, name: &str) -> Result<Value, VarlinkError> {
        let exists = self.exists(name).await?;
        Ok(json!({"exists": if exists { 0 } else { 1 }}))
    }

    async fn pull(
        &self,
        name: &str,
        creds: &Value,
        progress: Option<Progress>,
    ) -> Result<Value, VarlinkError> {
        if name.is_empty() {
            return Err(VarlinkError::invalid_parameter("name"));
        }
        let user = creds
            .get("username")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let pass = creds
            .get("password")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let path = format!("{API}/images/pull?reference={}&policy=always", encode(name));
        let resp = if user.is_empty() {
            self.rest.request(Method::POST, &path, None).await
        } else {
            self.rest
                .request_with_auth(Method::POST, &path, user, pass)
                .await
        }
        .map_err(plain)?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut logs = Vec::new();
        let mut id = String::new();
        let mut error = None;
        loop {
            let frame = match body.frame().await {
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(plain(RestError::Http(e))),
                None => break,
            };
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
            // The body is a sequence of JSON objects; consume the complete ones.
            let mut consumed = 0;
            let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            while let Some(Ok(v)) = stream.next() {
                consumed = stream.byte_offset();
                if let Some(line) = v.get("stream").and_then(Value::as_str) {
                    let line = line.trim_end().to_string();
                    if let Some(tx) = &progress {
                        let _ = tx
                            .send(json!({"reply": {"logs": [line.clone()], "id": ""}}))
                            .await;
                    }
                    logs.push(line);
                }
                if let Some(e) = v.get("error").and_then(Value::as_str) {
                    error = Some(e.to_string());
                }
                if let Some(i) = v.get("id").and_then(Value::as_str) {
                    id = i.to_string();
                }
                if let Some(m) = v.get("message").and_then(Value::as_str) {
                    error.get_or_insert_with(|| m.to_string());
                }
            }
            buf.drain(..consumed);
        }
        if let Some(e) = error.filter(|_| id.is_empty()) {
            return Err(error_occurred(e));
        }
        if !status.is_success() || id.is_empty() {
            return Err(error_occurred(format!("pulling {name} failed ({status})")));
        }
        let logs = if progress.is_some() { Vec::new() } else { logs };
        Ok(json!({"reply": {"logs": logs, "id": id}}))
    }

    async fn remove_image(&self, name: &str, force: bool) -> Result<Value, VarlinkError> {
        let v = self
            .rest
            .json(
                Method::GET,
                &format!("{API}/images/{}/json", encode(name)),
                None,
            )
            .await
            .map_err(img(name))?;
        let id = v
            .get("Id")
            .and_then(Value::as_str)
            .unwrap_or(name)
            .to_string();
        let r = self
            .rest
            .json(
                Method::DELETE,
                &format!("{API}/images/{}?force={force}", encode(name)),
                None,
            )
            .await
            .map_err(img(name))?;
        if let Some(errs) = r
            .get("Errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        {
            let text: Vec<String> = errs
                .iter()
                .map(|e| {
                    e.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| e.to_string())
                })
                .collect();
            return Err(error_occurred(text.join("; ")));
        }
        Ok(json!({"image": id}))
    }
}

impl Podman {
    /// Starts the service if needed and waits, up to `timeout`, until it
    /// answers GetVersion (whose answer is then cached): used at boot, so
    /// that the first call from the host finds Podman ready.
    pub async fn warm_up(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.get_version()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{}: {}", e.name, e.parameters)),
            Err(_) => Err(format!("no answer in {} s", timeout.as_secs())),
        }
    }
}
