//! The client of a node's local API: one HTTP/1.1 request with a JSON body
//! over the node's Unix socket. The `weft` CLI, `weft demo`, `weft-chaos`
//! and the end-to-end tests all call the node through this one piece.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket (no node, or not yet started).
    #[error("cannot reach the weft node at {} ({reason})", socket.display())]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// What the connection said.
        reason: String,
    },
    /// The node accepted the connection but the exchange failed.
    #[error("the weft node at {} did not answer: {reason}", socket.display())]
    Exchange {
        /// The socket tried.
        socket: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// One request to the node at `socket`: its status and JSON body
/// (`Value::Null` when the body is not JSON). `body` is sent as JSON.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let bytes = body
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .unwrap_or_default();
    request_raw(socket, method, path, Bytes::from(bytes)).await
}

/// [`request`] with the body as raw bytes (to send what is not JSON).
pub async fn request_raw(
    socket: &Path,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<(u16, Value), ClientError> {
    let resp = send(socket, method, path, body).await?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| exchange(socket, e.to_string()))?
        .to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// A GET whose answer streams (`/v1/tap`): its status and the body as it
/// comes.
pub async fn stream(socket: &Path, path: &str) -> Result<(u16, Incoming), ClientError> {
    let resp = send(socket, Method::GET, path, Bytes::new()).await?;
    Ok((resp.status().as_u16(), resp.into_body()))
}

fn exchange(socket: &Path, reason: String) -> ClientError {
    ClientError::Exchange {
        socket: socket.to_path_buf(),
        reason,
    }
}

async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<Response<Incoming>, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        socket: socket.to_path_buf(),
        reason,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| exchange(socket, e.to_string()))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| exchange(socket, e.to_string()))
}
