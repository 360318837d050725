//! gRPC through the mesh with a real implementation on both sides (tonic's
//! server and channel), on the remote path (QUIC between two nodes) and the
//! local path: unary, errors (Trailers-Only responses), the three streaming
//! kinds, a deadline and a 4 MiB message.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use futures::{Stream, StreamExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Service};
use tonic::{Code, Status, Streaming};

const LIMIT: usize = 16 * 1024 * 1024;

// === A codec for raw bytes, so no code generation is needed ===

#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// === The server: four methods, written as tonic's generated code is ===

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// `Unary` echoes, or fails with the code and message the request names
/// (`fail:<code>:<message>`), or sleeps (`sleep:<ms>`); `Count` streams N
/// messages; `Sum` adds up the lengths it gets; `Echo` echoes each message.
#[derive(Debug, Clone, Default)]
struct TestService;

struct Unary;
impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner();
            let text = String::from_utf8_lossy(&msg).to_string();
            if let Some(rest) = text.strip_prefix("fail:") {
                let (code, message) = rest.split_once(':').unwrap_or((rest, ""));
                let code = Code::from(code.parse::<i32>().unwrap_or(2));
                return Err(Status::new(code, message.to_string()));
            }
            if let Some(ms) = text.strip_prefix("sleep:") {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            }
            Ok(tonic::Response::new(msg))
        })
    }
}

struct Count;
impl tonic::server::ServerStreamingService<Bytes> for Count {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = BoxFuture<Result<tonic::Response<BoxStream>, Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let n: usize = String::from_utf8_lossy(&req.into_inner())
                .parse()
                .unwrap_or(0);
            let items = (0..n).map(|i| Ok(Bytes::from(format!("item-{i}"))));
            let stream: BoxStream = Box::pin(futures::stream::iter(items));
            Ok(tonic::Response::new(stream))
        })
    }
}

struct Sum;
impl tonic::server::ClientStreamingService<Bytes> for Sum {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, req: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let mut stream = req.into_inner();
            let (mut count, mut bytes) = (0usize, 0usize);
            while let Some(msg) = stream.message().await? {
                count += 1;
                bytes += msg.len();
            }
            Ok(tonic::Response::new(Bytes::from(format!(
                "{count} {bytes}"
            ))))
        })
    }
}

struct Echo;
impl tonic::server::StreamingService<Bytes> for Echo {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = BoxFuture<Result<tonic::Response<BoxStream>, Status>>;
    fn call(&mut self, req: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let stream = req.into_inner();
            let echoed: BoxStream = Box::pin(stream.map(|m| {
                m.map(|b| {
                    let mut out = b"echo:".to_vec();
                    out.extend_from_slice(&b);
                    Bytes::from(out)
                })
            }));
            Ok(tonic::Response::new(echoed))
        })
    }
}

impl<B> Service<http::Request<B>> for TestService
where
    B: hyper::body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Raw)
                .apply_max_message_size_config(Some(LIMIT), Some(LIMIT));
            let resp = match req.uri().path() {
                "/test.Test/Unary" => grpc.unary(Unary, req).await,
                "/test.Test/Count" => grpc.server_streaming(Count, req).await,
                "/test.Test/Sum" => grpc.client_streaming(Sum, req).await,
                "/test.Test/Echo" => grpc.streaming(Echo, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

async fn start_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming(TestService, incoming)
            .await
            .unwrap();
    });
    port
}

// === The client: tonic's channel, pointed at a node's proxy ===

/// A gRPC client whose requests go to `proxy` with `:authority` = service.
async fn client(
    proxy: SocketAddr,
    service: &str,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin(format!("http://{service}").parse().unwrap())
        .connect()
        .await
        .expect("connect to the proxy");
    tonic::client::Grpc::new(channel)
        .max_decoding_message_size(LIMIT)
        .max_encoding_message_size(LIMIT)
}

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/test.Test/{method}").parse().unwrap()
}

async fn unary(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    msg: impl Into<Bytes>,
    timeout: Option<Duration>,
) -> Result<Bytes, Status> {
    grpc.ready().await.expect("ready");
    let mut req = tonic::Request::new(msg.into());
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    grpc.unary(req, path("Unary"), Raw)
        .await
        .map(|r| r.into_inner())
}

/// Every kind of call through `proxy` to the `rpc` service.
async fn exercise(proxy: SocketAddr, label: &str) {
    let mut grpc = client(proxy, "rpc").await;

    // Unary, ok.
    let got = unary(&mut grpc, "ping", None).await.expect("unary ok");
    assert_eq!(got, "ping", "{label}");

    // Unary errors: Trailers-Only responses; code and message intact.
    let err = unary(&mut grpc, "fail:5:widget 42 is missing", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{label}: {err:?}");
    assert_eq!(err.message(), "widget 42 is missing", "{label}");
    let err = unary(&mut grpc, "fail:9:präconditions: ünmet", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{label}: {err:?}");
    assert_eq!(err.message(), "präconditions: ünmet", "{label}");

    // Server streaming.
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(tonic::Request::new(Bytes::from("50")), path("Count"), Raw)
        .await
        .expect("server streaming")
        .into_inner();
    let mut items = Vec::new();
    while let Some(m) = stream.message().await.expect("stream item") {
        items.push(m);
    }
    assert_eq!(items.len(), 50, "{label}");
    assert_eq!(items[49], "item-49");

    // Client streaming.
    grpc.ready().await.unwrap();
    let sent = futures::stream::iter((0..100).map(|i| Bytes::from(vec![b'x'; i])));
    let got = grpc
        .client_streaming(tonic::Request::new(sent), path("Sum"), Raw)
        .await
        .expect("client streaming")
        .into_inner();
    assert_eq!(got, format!("100 {}", (0..100).sum::<usize>()), "{label}");

    // Bidirectional: each answer arrives before the next request is sent.
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let requests = tokio_stream_from(rx);
    let mut answers = grpc
        .streaming(tonic::Request::new(requests), path("Echo"), Raw)
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..10 {
        tx.send(Bytes::from(format!("m{i}"))).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("answer in time")
            .expect("answer")
            .expect("not ended");
        assert_eq!(answer, format!("echo:m{i}"), "{label}");
    }
    drop(tx);
    assert!(answers.message().await.expect("clean end").is_none());

    // A deadline the server cannot meet.
    let err = unary(&mut grpc, "sleep:3000", Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{label}: {err:?}"
    );

    // A 4 MiB message each way.
    let big: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let got = unary(&mut grpc, big.clone(), None).await.expect("4 MiB");
    assert_eq!(got.len(), big.len(), "{label}");
    assert!(got == big, "{label}: 4 MiB differs");
}

/// An mpsc receiver as a stream (without a tokio-stream dependency).
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// A Python interpreter with grpcio (Debian's python3-grpcio).
fn grpcio_python() -> String {
    let candidates = [
        std::env::var("WEFT_TEST_PYTHON").ok(),
        Some("/usr/bin/python3".into()),
        Some("python3".into()),
    ];
    for python in candidates.into_iter().flatten() {
        let ok = std::process::Command::new(&python)
            .args(["-c", "import grpc"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return python;
        }
    }
    panic!("no python3 with grpcio: apt-get install python3-grpcio (or set WEFT_TEST_PYTHON)");
}

/// grpcio's C core client: strict about Trailers-Only responses (a status in
/// headers that do not end the stream reads as UNKNOWN "Stream removed").
async fn grpcio_client(proxy: SocketAddr, label: &str) {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/grpc_client.py");
    let out = tokio::process::Command::new(grpcio_python())
        .arg(&script)
        .arg(proxy.to_string())
        .arg("rpc")
        .output()
        .await
        .expect("run the grpcio client");
    assert!(
        out.status.success(),
        "{label}: grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    assert_eq!(seen["ok"], "ping", "{label}: {seen}");
    assert_eq!(
        seen["error"],
        serde_json::json!(["NOT_FOUND", "widget 42 is missing"]),
        "{label}: {seen}"
    );
    assert_eq!(seen["deadline"], "DEADLINE_EXCEEDED", "{label}: {seen}");
    assert_eq!(
        seen["stream"],
        serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"]),
        "{label}: {seen}"
    );
    assert_eq!(seen["sum"], "10 45", "{label}: {seen}");
}

/// The raw form of a gRPC error: one HEADERS frame that ends the stream.
async fn trailers_only_is_one_frame(proxy: SocketAddr, label: &str) {
    use http_body_util::Full;
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let msg = b"fail:5:gone";
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(msg);
    let req = http::Request::post("http://rpc/test.Test/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(
        resp.headers()["grpc-status"],
        "5",
        "{label}: {:?}",
        resp.headers()
    );
    assert!(
        hyper::body::Body::is_end_stream(resp.body()),
        "{label}: the error status must come in a HEADERS frame that ends the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_crosses_the_mesh_intact_on_both_paths() {
    let c = TestCluster::start(2).await;
    let port = start_server().await;
    register_everywhere(&c, 0, "rpc", port, "http").await;
    for (node, label) in [(1, "remote path"), (0, "local path")] {
        let proxy = c.nodes[node].proxy;
        trailers_only_is_one_frame(proxy, label).await;
        exercise(proxy, label).await;
        grpcio_client(proxy, label).await;
    }
}
