//! End-to-end data plane: real nodes, real HTTP through the outbound proxy,
//! real QUIC between nodes, real upstream servers on loopback.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Deterministic bytes for body `i`.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn sha(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// An HTTP/1.1 + h2c upstream: `/hello` says who it is, `/echo` echoes the body
/// and its hash, `/bytes/N` streams N pattern bytes in 64 KiB chunks.
async fn upstream(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer(name, req).await)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

async fn answer(name: &str, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let version = format!("{:?}", req.version());
    let host = req
        .headers()
        .get("host")
        .map(|h| h.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    if path == "/hello" {
        let text = format!("hello from {name} via {version} host={host}");
        return Response::new(Full::new(Bytes::from(text)).boxed());
    }
    if path == "/echo" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut resp = Response::new(Full::new(body.clone()).boxed());
        resp.headers_mut()
            .insert("x-sha256", hex(&sha(&body)).parse().unwrap());
        return resp;
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let total: usize = n.parse().unwrap_or(0);
        let chunks = futures_chunks(total);
        return Response::new(StreamBody::new(chunks).boxed());
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(b"not found")).boxed());
    *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
    resp
}

fn futures_chunks(
    total: usize,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let chunk = Bytes::from(pattern(64 * 1024));
    futures::stream::unfold(0usize, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = (total - sent).min(chunk.len());
            Some((Ok(Frame::data(chunk.slice(..n))), sent + n))
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A hyper HTTP/1.1 client connection to a node's proxy.
async fn proxy_client(proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(proxy: SocketAddr, req: Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, Bytes) {
    let mut sender = proxy_client(proxy).await;
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn get(uri: &str, host: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(uri);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_reaches_an_instance_on_another_node() {
    let c = TestCluster::start(3).await;
    let port = upstream("n2-web").await;
    register_everywhere(&c, 1, "web", port, "http").await;
    let proxy = c.nodes[0].proxy;

    // Absolute-form, as `curl -x` sends it.
    let (status, headers, body) = send(proxy, get("http://web/hello", None)).await;
    assert_eq!(status, 200, "{headers:?} {body:?}");
    assert_eq!(body, "hello from n2-web via HTTP/1.1 host=web");
    // Origin-form with a Host header (port stripped).
    let (status, _, body) = send(proxy, get("/hello", Some("web:80"))).await;
    assert_eq!(status, 200);
    assert!(body.starts_with(b"hello from n2-web"));

    // POST bodies arrive intact and the response streams back.
    let payload = pattern(3 * 1024 * 1024 + 17);
    let req = Request::post("http://web/echo")
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let (status, headers, body) = send(proxy, req).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-sha256"], hex(&sha(&payload)));
    assert_eq!(sha(&body), sha(&payload));

    // 32 MiB streamed from the instance arrive intact.
    let n = 32 * 1024 * 1024;
    let (status, _, body) = send(proxy, get("http://web/bytes/33554432", None)).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), n);
    let mut expect = Vec::with_capacity(n);
    while expect.len() < n {
        let take = (n - expect.len()).min(64 * 1024);
        expect.extend_from_slice(&pattern(64 * 1024)[..take]);
    }
    assert_eq!(sha(&body), sha(&expect));

    // The local path: n2 calling its own instance.
    let (status, _, body) = send(c.nodes[1].proxy, get("http://web/hello", None)).await;
    assert_eq!(status, 200);
    assert!(body.starts_with(b"hello from n2-web"));
}

/// The first requests to a peer arrive together (a client opening its
/// pool, a deploy's first burst): they share one handshake rather than
/// each dialing the peer, which would refuse all but a few.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_on_a_cold_tunnel_pool_shares_one_connection() {
    let c = TestCluster::start(2).await;
    let port = upstream("n2-web").await;
    register_everywhere(&c, 1, "web", port, "http").await;
    let proxy = c.nodes[0].proxy;
    let burst: Vec<_> = (0..64)
        .map(|_| tokio::spawn(async move { send(proxy, get("http://web/hello", None)).await }))
        .collect();
    for request in burst {
        let (status, headers, body) = request.await.unwrap();
        assert_eq!(status, 200, "{headers:?} {body:?}");
    }
    let text = metrics_text(c.nodes[0].admin).await;
    assert_eq!(
        metric_sum(&text, "weft_tunnel_connections_total", &[]),
        1.0,
        "one handshake for the whole burst"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_round_trips_through_the_tunnel() {
    let c = TestCluster::start(2).await;
    let port = upstream("grpc-ish").await;
    register_everywhere(&c, 1, "rpc", port, "http").await;
    let stream = tokio::net::TcpStream::connect(c.nodes[0].proxy)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::get("http://rpc/hello")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            body.starts_with(b"hello from grpc-ish via HTTP/2"),
            "{body:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mesh_errors_carry_weft_error() {
    let c = TestCluster::start(2).await;
    let proxy = c.nodes[0].proxy;
    let (status, headers, _) = send(proxy, get("http://nosuch/", None)).await;
    assert_eq!(status, 503);
    assert_eq!(headers["weft-error"], "unknown-service");

    // An instance whose process is gone: its node answers upstream-unreachable.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    register_everywhere(&c, 1, "gone", dead_port, "http").await;
    let (status, headers, _) = send(proxy, get("http://gone/x", None)).await;
    assert_eq!(status, 502);
    assert_eq!(headers["weft-error"], "upstream-unreachable");
    // Same on the local path.
    let (status, headers, _) = send(c.nodes[1].proxy, get("http://gone/x", None)).await;
    assert_eq!(status, 502);
    assert_eq!(headers["weft-error"], "upstream-unreachable");

    // A TCP-only service is not an HTTP destination.
    register_everywhere(&c, 1, "raw", dead_port, "tcp").await;
    let (status, headers, _) = send(proxy, get("http://raw/", None)).await;
    assert_eq!(status, 503);
    assert_eq!(headers["weft-error"], "no-healthy-instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_upstream_carries_a_mebibyte_with_half_close() {
    let c = TestCluster::start(3).await;
    // An echo server on n3's host.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    register_everywhere(&c, 2, "echo", echo_port, "tcp").await;
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let (status, body) = put_json(
        &c.nodes[0].socket,
        "/v1/upstreams",
        &serde_json::json!({"service": "echo", "listen": listen.to_string()}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let stream = wait_for(Duration::from_secs(5), "upstream port open", || async {
        tokio::net::TcpStream::connect(listen).await.ok()
    })
    .await;
    let payload = pattern(1024 * 1024);
    let (mut r, mut w) = stream.into_split();
    let writer = {
        let payload = payload.clone();
        tokio::spawn(async move {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap(); // half-close: the echo must still answer
        })
    };
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
        .await
        .expect("echo finished")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert_eq!(sha(&got), sha(&payload));

    // A second upstream on the same address for a bad body is refused clearly.
    let (status, body) = put_json(
        &c.nodes[0].socket,
        "/v1/upstreams",
        &serde_json::json!({"service": "echo", "listen": "nope"}),
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("listen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quic_client_without_a_cluster_certificate_is_refused() {
    use std::sync::Arc;
    let c = TestCluster::start(1).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Trust the cluster CA (so the server is verified) but present a self-signed cert.
    let ca_pem = std::fs::read(c.cluster_dir.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&ca_pem) {
        roots.add(cert).unwrap();
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["n1.node.weft".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"weft/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let attempt = async {
        let conn = endpoint.connect(c.nodes[0].tunnel, "n1.node.weft")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"\0\0\0\x10hello-hello-hello").await?;
        send.finish()?;
        let buf = recv.read_to_end(1024).await?;
        Ok::<_, Box<dyn std::error::Error>>(buf)
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("bounded");
    assert!(outcome.is_err(), "a stranger got an answer: {outcome:?}");
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// An instance that sends its response head and part of the body, then
/// stalls with the connection open: the mesh resets the body after
/// `--body-idle-timeout` (the client sees it cut short, not a hang), counts
/// it as its own limit, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_after_the_idle_timeout() {
    let stalling = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = stalling.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = stalling.accept().await {
            let mut head = [0u8; 4096];
            let _ = conn.read(&mut head).await;
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nearly")
                .await;
            held.push(conn);
        }
    });
    let mut c = TestCluster::new();
    for _ in 0..2 {
        c.add_node_with(&["--body-idle-timeout", "1s"]);
    }
    c.wait_converged(2, Duration::from_secs(15)).await;
    register_everywhere(&c, 1, "stall", port, "http").await;
    let web = Upstream::start(0, 200).await;
    register_everywhere(&c, 1, "web", web.port, "http").await;

    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "-x"])
        .arg(format!("http://{}", c.nodes[0].proxy))
        .arg("http://stall/")
        .output()
        .await
        .expect("curl");
    // 18: the body ended short of its length; 28 would be curl's own timeout.
    assert_eq!(
        out.status.code(),
        Some(18),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"early");

    let mut idle = 0.0;
    for node in &c.nodes {
        let text = metrics_text(node.admin).await;
        idle += metric_sum(&text, "weft_limit_refused_total", &["limit=\"body_idle\""]);
    }
    assert!(idle >= 1.0, "the cut is counted as the mesh's limit");
    assert_eq!(proxy_get(c.nodes[0].proxy, "web").await, 200);
}
