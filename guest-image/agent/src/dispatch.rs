//! The agent's method table: routes a checked call to the interface that
//! implements it, and serves `org.varlink.service` itself.

use serde_json::{json, Map, Value};

use crate::idl::Registry;
use crate::machine::Machine;
use crate::podman::Podman;
use crate::ports::{self, Ports};
use crate::protocol::VarlinkError;
use crate::server::Progress;

/// What GetInfo says about this service.
pub const VENDOR: &str = "b2p";
pub const PRODUCT: &str = "b2p-agent";
/// This project has no public address yet: GetInfo names it and where its
/// agent is documented rather than pointing at another project.
pub const URL: &str = "b2p (boot2podman as a microVM): guest-image/agent/README.md";

/// Everything a connection needs to serve calls.
pub struct Agent {
    registry: Registry,
    podman: Podman,
    machine: Machine,
    ports: Ports,
}

impl Agent {
    pub fn new(registry: Registry, podman: Podman, machine: Machine) -> Self {
        Self {
            registry,
            podman,
            machine,
            ports: Ports::new(),
        }
    }

    /// The published container ports (followed by `ports::follow`).
    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn podman(&self) -> &Podman {
        &self.podman
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Runs `iface.method` with parameters already checked against its
    /// signature. A method the IDL declares but no code serves answers
    /// MethodNotImplemented.
    pub async fn call(
        &self,
        iface: &str,
        method: &str,
        params: Map<String, Value>,
        progress: Option<Progress>,
    ) -> Result<Value, VarlinkError> {
        let result = match iface {
            "org.varlink.service" => self.service(method, &params),
            "io.podman" => self.podman.call(method, &params, progress).await,
            "io.b2p.Machine" if method == "WatchPorts" => {
                Some(ports::watch_ports(self, progress).await)
            }
            "io.b2p.Machine" => {
                self.machine
                    .call(method, &params, self.podman.service())
                    .await
            }
            _ => None,
        };
        result.unwrap_or_else(|| {
            Err(VarlinkError::method_not_implemented(&format!(
                "{iface}.{method}"
            )))
        })
    }

    fn service(
        &self,
        method: &str,
        params: &Map<String, Value>,
    ) -> Option<Result<Value, VarlinkError>> {
        Some(match method {
            "GetInfo" => Ok(json!({
                "vendor": VENDOR,
                "product": PRODUCT,
                "version": env!("CARGO_PKG_VERSION"),
                "url": URL,
                "interfaces": self.registry.names(),
            })),
            "GetInterfaceDescription" => {
                let name = params
                    .get("interface")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                self.registry
                    .get(name)
                    .map(|i| json!({"description": i.text}))
                    .ok_or_else(|| VarlinkError::interface_not_found(name))
            }
            _ => return None,
        })
    }
}
