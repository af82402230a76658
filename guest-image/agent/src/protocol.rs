//! The varlink wire protocol: NUL-terminated JSON messages, the call and
//! reply objects, and the standard `org.varlink.service` errors.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message the agent accepts; a longer one ends the connection.
pub const MAX_MESSAGE: usize = 8 << 20;

/// A method call as sent by a client.
#[derive(Debug, Deserialize)]
pub struct Call {
    pub method: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub oneway: bool,
    #[serde(default)]
    pub more: bool,
    #[serde(default)]
    pub upgrade: bool,
}

/// A reply: parameters, or an error name with its parameters.
#[derive(Debug, Serialize, PartialEq)]
pub struct Reply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub parameters: Value,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub continues: bool,
}

/// A varlink error reply: the fully qualified error name and its parameters.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{name}: {parameters}")]
pub struct VarlinkError {
    pub name: String,
    pub parameters: Value,
}

impl VarlinkError {
    pub fn new(name: impl Into<String>, parameters: Value) -> Self {
        Self {
            name: name.into(),
            parameters,
        }
    }

    pub fn interface_not_found(interface: &str) -> Self {
        Self::new(
            "org.varlink.service.InterfaceNotFound",
            json!({ "interface": interface }),
        )
    }

    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            "org.varlink.service.MethodNotFound",
            json!({ "method": method }),
        )
    }

    pub fn method_not_implemented(method: &str) -> Self {
        Self::new(
            "org.varlink.service.MethodNotImplemented",
            json!({ "method": method }),
        )
    }

    pub fn invalid_parameter(parameter: &str) -> Self {
        Self::new(
            "org.varlink.service.InvalidParameter",
            json!({ "parameter": parameter }),
        )
    }
}

impl Reply {
    pub fn ok(parameters: Value, continues: bool) -> Self {
        Self {
            error: None,
            parameters,
            continues,
        }
    }

    pub fn err(e: VarlinkError) -> Self {
        Self {
            error: Some(e.name),
            parameters: e.parameters,
            continues: false,
        }
    }
}

/// Framing failures; each ends the connection.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("message is not a varlink call: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Reads one NUL-terminated message; `Ok(None)` at a clean end of stream.
pub async fn read_message<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Call>, FrameError> {
    buf.clear();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        let (take, done) = match chunk.iter().position(|&b| b == 0) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take > MAX_MESSAGE + 1 {
            return Err(FrameError::TooLong);
        }
        buf.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if done {
            buf.pop();
            return Ok(Some(serde_json::from_slice(buf)?));
        }
    }
}

/// Writes one reply followed by its NUL terminator.
pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(0);
    w.write_all(&bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn reads_nul_terminated_calls() {
        let data = b"{\"method\":\"a.b.C\",\"parameters\":{\"x\":1}}\0{\"method\":\"a.b.D\",\"more\":true}\0";
        let mut r = BufReader::with_capacity(7, &data[..]);
        let mut buf = Vec::new();
        let c = read_message(&mut r, &mut buf).await.unwrap().unwrap();
        assert_eq!(c.method, "a.b.C");
        assert_eq!(c.parameters.unwrap()["x"], 1);
        let d = read_message(&mut r, &mut buf).await.unwrap().unwrap();
        assert!(d.more && !d.oneway);
        assert!(read_message(&mut r, &mut buf).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_garbage_and_truncation() {
        let mut buf = Vec::new();
        let mut r = BufReader::new(&b"not json\0"[..]);
        assert!(matches!(
            read_message(&mut r, &mut buf).await,
            Err(FrameError::Malformed(_))
        ));
        let mut r = BufReader::new(&b"{\"method\":"[..]);
        assert!(matches!(
            read_message(&mut r, &mut buf).await,
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn reply_shape() {
        let r = Reply::err(VarlinkError::invalid_parameter("name"));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "name"}})
        );
        let r = Reply::ok(json!({}), true);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"parameters": {}, "continues": true})
        );
    }
}
