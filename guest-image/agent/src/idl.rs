//! The interface definitions the agent serves: the IDL text of each
//! interface (the files under `idl/`), parsed once with `varlink_parser`, and
//! the generic check of a call's parameters against a method's signature.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use thiserror::Error;
use varlink_parser::{Argument, Method, VStruct, VStructOrEnum, VType, VTypeExt, IDL};

/// The IDL text of each interface, in the order GetInfo lists them.
pub const INTERFACE_TEXTS: [&str; 3] = [
    include_str!("../idl/org.varlink.service.varlink"),
    include_str!("../idl/io.podman.varlink"),
    include_str!("../idl/io.b2p.Machine.varlink"),
];

/// An IDL file that does not parse (a build defect, caught by the unit tests).
#[derive(Debug, Error)]
#[error("interface definition {index} does not parse: {message}")]
pub struct IdlError {
    index: usize,
    message: String,
}

/// Why a call's parameters do not fit the method's signature: the dotted path
/// of the offending parameter (`create.args`, `create.bogus`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid parameter {0}")]
pub struct InvalidParameter(pub String);

/// The interface whose missing parameters take their zero values, as Podman
/// 1.9.3's Go server filled them (`RemoveContainer '{"name": "x"}'`).
pub const ZERO_DEFAULTS: &str = "io.podman";

/// One served interface: its name, IDL text and parsed form.
pub struct Interface {
    pub name: &'static str,
    pub text: &'static str,
    idl: IDL<'static>,
    /// A missing (or null) non-optional field is accepted and means its
    /// zero value ("", 0, false, [], {}); a wrongly typed or unknown field is
    /// still refused.
    zero_defaults: bool,
}

impl Interface {
    /// The method named `method`, if the interface defines it.
    pub fn method(&self, method: &str) -> Option<&Method<'static>> {
        self.idl.methods.get(method)
    }

    /// Checks `params` against the input of `method`: every non-optional
    /// field present (unless the interface takes zero values for missing
    /// ones) with the declared type, no unknown field set.
    pub fn check_input(
        &self,
        method: &Method<'static>,
        params: &Map<String, Value>,
    ) -> Result<(), InvalidParameter> {
        self.check_struct(&method.input, params, "")
    }

    fn check_struct(
        &self,
        def: &VStruct<'static>,
        obj: &Map<String, Value>,
        prefix: &str,
    ) -> Result<(), InvalidParameter> {
        let path = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        for Argument { name, vtype } in &def.elts {
            match obj.get(*name) {
                None | Some(Value::Null) => {
                    if !self.zero_defaults && !matches!(vtype, VTypeExt::Option(_)) {
                        return Err(InvalidParameter(path(name)));
                    }
                }
                Some(v) => self.check_ext(vtype, v, &path(name))?,
            }
        }
        // A field the signature does not know is refused when it is set:
        // never silently ignored. A null one means "not set".
        for (key, value) in obj {
            if !value.is_null() && !def.elts.iter().any(|a| a.name == key) {
                return Err(InvalidParameter(path(key)));
            }
        }
        Ok(())
    }

    fn check_ext(
        &self,
        t: &VTypeExt<'static>,
        v: &Value,
        path: &str,
    ) -> Result<(), InvalidParameter> {
        let bad = || InvalidParameter(path.to_string());
        match t {
            VTypeExt::Option(inner) => {
                if v.is_null() {
                    Ok(())
                } else {
                    self.check_ext(inner, v, path)
                }
            }
            VTypeExt::Array(inner) => {
                let items = v.as_array().ok_or_else(bad)?;
                items
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, item)| self.check_ext(inner, item, &format!("{path}[{i}]")))
            }
            VTypeExt::Dict(inner) => {
                let map = v.as_object().ok_or_else(bad)?;
                map.iter()
                    .try_for_each(|(k, item)| self.check_ext(inner, item, &format!("{path}[{k}]")))
            }
            VTypeExt::Plain(plain) => self.check_plain(plain, v, path),
        }
    }

    fn check_plain(
        &self,
        t: &VType<'static>,
        v: &Value,
        path: &str,
    ) -> Result<(), InvalidParameter> {
        let ok = match t {
            VType::Bool => v.is_boolean(),
            VType::Int => v.is_i64() || v.is_u64(),
            VType::Float => v.is_number(),
            VType::String => v.is_string(),
            VType::Object => true,
            VType::Struct(s) => {
                let obj = v
                    .as_object()
                    .ok_or_else(|| InvalidParameter(path.to_string()))?;
                return self.check_struct(s, obj, path);
            }
            VType::Enum(e) => v.as_str().is_some_and(|s| e.elts.contains(&s)),
            VType::Typename(name) => match self.idl.typedefs.get(name).map(|t| &t.elt) {
                Some(VStructOrEnum::VStruct(s)) => {
                    let obj = v
                        .as_object()
                        .ok_or_else(|| InvalidParameter(path.to_string()))?;
                    return self.check_struct(s, obj, path);
                }
                Some(VStructOrEnum::VEnum(e)) => v.as_str().is_some_and(|s| e.elts.contains(&s)),
                None => false,
            },
        };
        if ok {
            Ok(())
        } else {
            Err(InvalidParameter(path.to_string()))
        }
    }
}

/// All served interfaces, by name.
pub struct Registry {
    interfaces: BTreeMap<&'static str, Interface>,
    order: Vec<&'static str>,
}

impl Registry {
    /// Parses the built-in IDL files.
    pub fn new() -> Result<Self, IdlError> {
        let mut interfaces = BTreeMap::new();
        let mut order = Vec::new();
        for (index, text) in INTERFACE_TEXTS.iter().enumerate() {
            let idl = IDL::try_from(*text).map_err(|e| IdlError {
                index,
                message: e.to_string(),
            })?;
            let name = idl.name;
            order.push(name);
            let zero_defaults = name == ZERO_DEFAULTS;
            interfaces.insert(
                name,
                Interface {
                    name,
                    text,
                    idl,
                    zero_defaults,
                },
            );
        }
        Ok(Self { interfaces, order })
    }

    /// The interface named `name`.
    pub fn get(&self, name: &str) -> Option<&Interface> {
        self.interfaces.get(name)
    }

    /// Interface names in their listing order.
    pub fn names(&self) -> &[&'static str] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn all_interfaces_parse() {
        let r = Registry::new().unwrap();
        assert_eq!(
            r.names(),
            ["org.varlink.service", "io.podman", "io.b2p.Machine"]
        );
        assert!(r.get("io.podman").unwrap().method("GetVersion").is_some());
    }

    #[test]
    fn checks_parameters_by_name() {
        let r = Registry::new().unwrap();
        let p = r.get("io.podman").unwrap();
        let m = p.method("StopContainer").unwrap();
        assert!(p
            .check_input(m, &params(json!({"name": "x", "timeout": 3})))
            .is_ok());
        // Missing parameters take their zero values (Podman 1.9.3's server).
        assert!(p.check_input(m, &params(json!({"name": "x"}))).is_ok());
        assert!(p.check_input(m, &params(json!({}))).is_ok());
        assert!(p
            .check_input(m, &params(json!({"name": "x", "timeout": null})))
            .is_ok());
        assert_eq!(
            p.check_input(m, &params(json!({"name": "x", "timeout": "3"}))),
            Err(InvalidParameter("timeout".into()))
        );
        assert_eq!(
            p.check_input(m, &params(json!({"name": "x", "signal": 9}))),
            Err(InvalidParameter("signal".into()))
        );
        assert_eq!(
            p.check_input(m, &params(json!({"name": 1, "timeout": 3}))),
            Err(InvalidParameter("name".into()))
        );
        assert_eq!(
            p.check_input(m, &params(json!({"name": "x", "timeout": 1.5}))),
            Err(InvalidParameter("timeout".into()))
        );
        let c = p.method("CreateContainer").unwrap();
        assert!(p
            .check_input(
                c,
                &params(json!({"create": {"args": ["img", "true"], "tty": null}}))
            )
            .is_ok());
        assert_eq!(
            p.check_input(
                c,
                &params(json!({"create": {"args": ["img"], "cidfile": "/x"}}))
            ),
            Err(InvalidParameter("create.cidfile".into()))
        );
        assert_eq!(
            p.check_input(c, &params(json!({"create": {"args": ["img", 3]}}))),
            Err(InvalidParameter("create.args[1]".into()))
        );
        // A missing args is an empty list: CreateContainer refuses it later
        // (create::plan), naming create.args.
        assert!(p.check_input(c, &params(json!({"create": {}}))).is_ok());
    }

    #[test]
    fn other_interfaces_still_require_every_parameter() {
        let r = Registry::new().unwrap();
        let s = r.get("org.varlink.service").unwrap();
        let m = s.method("GetInterfaceDescription").unwrap();
        assert_eq!(
            s.check_input(m, &params(json!({}))),
            Err(InvalidParameter("interface".into()))
        );
    }
}
