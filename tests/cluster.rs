//! End-to-end: real `weft node` processes on 127.0.0.1 forming a gossip
//! cluster, driven through their Unix sockets.

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_deregistration_propagate() {
    let c = TestCluster::start(3).await;
    let (n1, n3) = (&c.nodes[0].socket, &c.nodes[2].socket);
    let (status, body) = put_json(n1, "/v1/services", &json!({"name": "web", "port": 8080}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(id, "web-n1-8080");

    wait_for(WITHIN, "n3 lists web on n1", || async {
        let (_, body) = get(n3, "/v1/services").await.ok()?;
        let inst = body["services"]["web"].as_array()?.first()?.clone();
        (inst["node"] == "n1" && inst["port"] == 8080 && inst["protocol"] == "http").then_some(())
    })
    .await;

    // The health view on another node shows the instance and every member.
    let (_, health) = get(&c.nodes[1].socket, "/v1/health").await.unwrap();
    assert_eq!(health["node"], "n2");
    assert_eq!(health["members"].as_array().unwrap().len(), 3);
    wait_for(WITHIN, "n2 health lists web", || async {
        let (_, h) = get(&c.nodes[1].socket, "/v1/health").await.ok()?;
        (h["services"]["web"]["instances"].as_array()?.len() == 1).then_some(())
    })
    .await;

    let (status, _) = delete(n1, &format!("/v1/services/{id}")).await.unwrap();
    assert_eq!(status, 200);
    for node in &c.nodes {
        wait_for(WITHIN, &format!("{} drops web", node.name), || async {
            instance_ids(&node.socket, "web")
                .await?
                .is_empty()
                .then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registering_an_id_replaces_it() {
    let c = TestCluster::start(2).await;
    let n1 = &c.nodes[0].socket;
    for port in [7000, 7001] {
        let (status, _) = put_json(
            n1,
            "/v1/services",
            &json!({"name": "api", "id": "api-1", "port": port}),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    wait_for(WITHIN, "n2 sees api-1 on port 7001 only", || async {
        let (_, body) = get(&c.nodes[1].socket, "/v1/services").await.ok()?;
        let list = body["services"]["api"].as_array()?.clone();
        (list.len() == 1 && list[0]["port"] == 7001).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_at_most_256_registrations_and_says_so() {
    let c = TestCluster::start(1).await;
    let s = &c.nodes[0].socket;
    for i in 0..256 {
        let body = json!({"name": "many", "id": format!("many-{i}"), "port": 7000 + i});
        let (status, reply) = put_json(s, "/v1/services", &body).await.unwrap();
        assert_eq!(status, 200, "registration {i}: {reply}");
    }
    let one_more = json!({"name": "many", "id": "many-256", "port": 9000});
    let (status, reply) = put_json(s, "/v1/services", &one_more).await.unwrap();
    assert_eq!(status, 409, "{reply}");
    let msg = reply["error"].as_str().unwrap_or_default();
    assert!(msg.contains("256 registrations"), "{msg}");
    // Replacing one that exists is not one more; after a removal there is room.
    let again = json!({"name": "many", "id": "many-0", "port": 9001});
    assert_eq!(put_json(s, "/v1/services", &again).await.unwrap().0, 200);
    assert_eq!(delete(s, "/v1/services/many-1").await.unwrap().0, 200);
    assert_eq!(put_json(s, "/v1/services", &one_more).await.unwrap().0, 200);
    wait_for(
        WITHIN,
        "the catalog lists 256 instances of many",
        || async {
            let (_, listed) = get(s, "/v1/services").await.ok()?;
            let ids: Vec<&str> = listed["services"]["many"]
                .as_array()?
                .iter()
                .filter_map(|i| i["id"].as_str())
                .collect();
            (ids.len() == 256 && ids.contains(&"many-256") && !ids.contains(&"many-1"))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_node_keeps_serving() {
    let c = TestCluster::start(1).await;
    let s = &c.nodes[0].socket;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "JSON"),
        (b"[]".to_vec(), 400, "object"),
        (br#"{"port": 80}"#.to_vec(), 400, "name"),
        (br#"{"name": "web"}"#.to_vec(), 400, "port"),
        (br#"{"name": "web", "port": 0}"#.to_vec(), 400, "port"),
        (br#"{"name": "web", "port": 65536}"#.to_vec(), 400, "port"),
        (br#"{"name": "web", "port": "80"}"#.to_vec(), 400, "port"),
        (
            br#"{"name": "Not_Valid", "port": 80}"#.to_vec(),
            400,
            "name",
        ),
        (
            br#"{"name": "web", "port": 80, "protocol": "udp"}"#.to_vec(),
            400,
            "protocol",
        ),
        (
            "{\"name\": \"w\u{e9}b\", \"port\": 80}".as_bytes().to_vec(),
            400,
            "name",
        ),
        (vec![b' '; 70 * 1024], 413, "exceeds"),
    ];
    for (body, want, needle) in cases {
        let (status, reply) = request(s, Method::PUT, "/v1/services", body.clone())
            .await
            .unwrap();
        assert_eq!(
            status,
            want,
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        let msg = reply["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        );
    }
    let (status, _) = delete(s, "/v1/services/nope").await.unwrap();
    assert_eq!(status, 404);
    let (status, _) = get(s, "/v1/nothing").await.unwrap();
    assert_eq!(status, 404);

    // Raw garbage on the socket does not hurt the node.
    use tokio::io::AsyncWriteExt;
    for junk in [&b"\x00\xff\xfe garbage\r\n\r\n"[..], &[0u8; 100_000][..]] {
        if let Ok(mut raw) = tokio::net::UnixStream::connect(s).await {
            let _ = raw.write_all(junk).await;
        }
    }

    // The admin address serves reads and refuses writes.
    let admin = c.nodes[0].admin;
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::put("/v1/services")
        .header("host", "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"name":"web","port":80}"#,
        )))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 405);
    // A fresh connection: the refused PUT's body was not read, so the server
    // may close the first one.
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/v1/members")
        .header("host", "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    // A page whose DNS name was rebound to the admin address reads nothing.
    sender.ready().await.unwrap();
    let req = hyper::Request::get("/v1/members")
        .header("host", "weft.attacker.example")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 421);

    // Still serving, and nothing invalid was registered.
    let (status, body) = get(s, "/v1/services").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["services"], json!({}));
    let (status, _) = put_json(s, "/v1/services", &json!({"name": "web", "port": 80}))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_is_reported_dead_by_the_survivors() {
    let mut c = TestCluster::start(3).await;
    put_json(
        &c.nodes[2].socket,
        "/v1/services",
        &json!({"name": "db", "port": 5432, "protocol": "tcp"}),
    )
    .await
    .unwrap();
    wait_for(WITHIN, "n1 lists db", || async {
        (instance_ids(&c.nodes[0].socket, "db").await?.len() == 1).then_some(())
    })
    .await;
    c.kill9(2);
    for i in 0..2 {
        let s = c.nodes[i].socket.clone();
        wait_for(
            WITHIN,
            &format!("{} reports n3 dead", c.nodes[i].name),
            || async { (member_state(&s, "n3").await? == "dead").then_some(()) },
        )
        .await;
        wait_for(WITHIN, "db leaves the catalog", || async {
            instance_ids(&s, "db").await?.is_empty().then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_gracefully_and_withdraws_services() {
    let mut c = TestCluster::start(3).await;
    put_json(
        &c.nodes[1].socket,
        "/v1/services",
        &json!({"name": "api", "port": 9000}),
    )
    .await
    .unwrap();
    for i in [0, 2] {
        let s = c.nodes[i].socket.clone();
        wait_for(WITHIN, "api listed", || async {
            (instance_ids(&s, "api").await?.len() == 1).then_some(())
        })
        .await;
    }
    let status = c.signal_and_wait(1, libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "graceful leave exits 0, got {status:?}");
    for i in [0, 2] {
        let s = c.nodes[i].socket.clone();
        wait_for(WITHIN, "n2 shown as left", || async {
            (member_state(&s, "n2").await? == "left").then_some(())
        })
        .await;
        assert!(instance_ids(&s, "api").await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_re_announces_its_registrations() {
    let mut c = TestCluster::start(2).await;
    let (status, _) = put_json(
        &c.nodes[1].socket,
        "/v1/services",
        &json!({"name": "cache", "port": 6379, "id": "cache-a"}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    c.kill9(1);
    let n1 = c.nodes[0].socket.clone();
    wait_for(WITHIN, "cache gone with its node", || async {
        instance_ids(&n1, "cache").await?.is_empty().then_some(())
    })
    .await;
    c.restart(1);
    wait_for(WITHIN, "cache re-announced", || async {
        (instance_ids(&n1, "cache").await? == vec!["cache-a".to_string()]).then_some(())
    })
    .await;
    assert_eq!(member_state(&n1, "n2").await.unwrap(), "alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_clusters_key_never_joins() {
    let mut c = TestCluster::start(2).await;
    let other = c.dir.path().join("other-cluster");
    let out = std::process::Command::new(weft_bin())
        .args(["init", "--dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let i = c.add_node_in(&other);
    let s = c.nodes[i].socket.clone();
    wait_for(WITHIN, "outsider is up", || async {
        get(&s, "/v1/members").await.ok()
    })
    .await;
    put_json(&s, "/v1/services", &json!({"name": "evil", "port": 666}))
        .await
        .unwrap();
    // Give gossip many rounds to (wrongly) spread the outsider.
    let n1 = c.nodes[0].socket.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let (_, body) = get(&n1, "/v1/members").await.unwrap();
        assert_eq!(
            body["members"].as_array().unwrap().len(),
            2,
            "outsider joined: {body}"
        );
        assert!(instance_ids(&n1, "evil").await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
