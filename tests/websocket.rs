//! WebSocket through the mesh (an HTTP/1.1 upgrade) with a real client and
//! server (tokio-tungstenite) on both ends: text, binary, 10 MiB, ping/pong,
//! the close handshake; on the remote path and the local path.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

const BIG: usize = 10 * 1024 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(2 * BIG))
        .max_frame_size(Some(2 * BIG))
}

/// An echo server: every text or binary message comes back; a close is
/// answered with the same code and reason.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config())).await
                else {
                    return;
                };
                // tungstenite answers pings and closes itself.
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

async fn exercise(proxy: SocketAddr, label: &str) {
    // The app connects to its node's proxy and names the service as Host.
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async_with_config("ws://chat/room", stream, Some(config()))
            .await
            .unwrap_or_else(|e| panic!("{label}: handshake failed: {e}"));
    assert_eq!(resp.status(), 101, "{label}");

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("hello"), "{label}");

    let binary: Vec<u8> = (0..1000u32).map(|i| (i % 256) as u8).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(binary), "{label}");

    let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    match next(&mut ws).await {
        Message::Binary(got) => assert!(got[..] == big[..], "{label}: 10 MiB differs"),
        other => panic!("{label}: expected binary, got {other:?}"),
    }

    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into()),
        "{label}"
    );

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::Normal, "{label}");
            assert_eq!(frame.reason, "bye", "{label}");
        }
        other => panic!("{label}: expected the close reply, got {other:?}"),
    }
    // After the close handshake the server closes the connection.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("connection ends after close");
    assert!(end.is_none() || end.is_some_and(|r| r.is_err()), "{label}");
}

async fn next<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("a message in time")
        .expect("connection open")
        .expect("valid message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_cross_the_mesh_on_both_paths() {
    let c = TestCluster::start(2).await;
    let port = echo_server().await;
    register_everywhere(&c, 0, "chat", port, "http").await;
    exercise(c.nodes[1].proxy, "remote path").await;
    exercise(c.nodes[0].proxy, "local path").await;
}
