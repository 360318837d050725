//! Who may talk to a node: the tunnel's acceptor checks the caller's
//! identity on top of the TLS handshake, and a node refuses to start with a
//! certificate that is not its own.

mod common;

use std::time::Duration;

use common::*;

/// Dials node `target` with a client certificate and sends a well-formed
/// request head; Ok(bytes) if the node answered anything.
async fn try_tunnel(
    c: &TestCluster,
    target: usize,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let (_endpoint, conn) = connect_as(c, target, cert_pem, key_pem).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    // A member would get an answer (the node's refusal of an unknown
    // instance, at least).
    let head = weft_runtime::wire::RequestHead {
        version: weft_runtime::wire::WIRE_VERSION,
        kind: weft_runtime::wire::StreamKind::Http,
        service: "web".into(),
        instance: "web-n1-1".into(),
        method: "GET".into(),
        uri: "/".into(),
        headers: Vec::new(),
        deadline_ms: 1000,
        attempt: 0,
        http2: false,
        end_stream: true,
    };
    send.write_all(&weft_runtime::wire::encode(&head)?).await?;
    send.finish()?;
    Ok(recv.read_to_end(64 * 1024).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_acceptor_refuses_callers_that_are_not_live_member_nodes() {
    let c = TestCluster::start(2).await;
    let admin = c.nodes[0].admin;
    let cases = [
        // Signed by the cluster CA, but names no node (a CN is not a name).
        (
            ca_signed(&c.cluster_dir, &["db.example.com"], "n2"),
            "no_node_name",
        ),
        // A real node certificate, of a node that is not in the cluster
        // (retired, or stolen and replayed from elsewhere).
        (
            ca_signed(&c.cluster_dir, &["n9.node.weft"], "n9"),
            "not_a_member",
        ),
    ];
    // The same exchange with a member's certificate gets an answer.
    let (cert, key) = ca_signed(&c.cluster_dir, &["n2.node.weft"], "n2");
    let answer = try_tunnel(&c, 0, &cert, &key)
        .await
        .expect("a member is answered");
    assert!(!answer.is_empty());
    for ((cert, key), reason) in cases {
        let outcome = tokio::time::timeout(Duration::from_secs(15), try_tunnel(&c, 0, &cert, &key))
            .await
            .expect("bounded");
        assert!(outcome.is_err(), "{reason}: the node answered: {outcome:?}");
        let counted = wait_for(
            Duration::from_secs(5),
            "the refusal is counted",
            || async move {
                let text = metrics_text(admin).await;
                let label = format!("reason=\"{reason}\"");
                (metric_sum(&text, "weft_tunnel_refused_total", &[&label]) >= 1.0).then_some(())
            },
        )
        .await;
        let _: () = counted;
    }
    // A member's own certificate still works: n2 reaches n1's instances.
    let up = Upstream::start(0, 200).await;
    register_everywhere(&c, 0, "web", up.port, "http").await;
    assert_eq!(proxy_get(c.nodes[1].proxy, "web").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_to_start_with_another_node_s_certificate() {
    let c = TestCluster::new();
    let certs = c.dir.path().join("certs");
    let out = std::process::Command::new(weft_bin())
        .args(["cert", "issue", "n7", "--cluster"])
        .arg(&c.cluster_dir)
        .arg("--out")
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new(weft_bin())
        .args([
            "node",
            "--name",
            "n8",
            "--gossip",
            "127.0.0.1:0",
            "--cluster",
        ])
        .arg(&c.cluster_dir)
        .arg("--cert")
        .arg(certs.join("n7.pem"))
        .arg("--key")
        .arg(certs.join("n7.key"))
        .arg("--data-dir")
        .arg(c.dir.path().join("n8"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("\"n7\"") && err.contains("\"n8\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authenticated_peer_is_held_to_the_tunnel_limits() {
    let c = TestCluster::start(3).await;
    let admin = c.nodes[0].admin;
    // The test speaks as member n3, with a certificate of its own name.
    let (cert, key) = ca_signed(&c.cluster_dir, &["n3.node.weft"], "n3");

    // No unidirectional streams: opening one never completes.
    let (_endpoint, conn) = connect_as(&c, 0, &cert, &key).await.expect("n3 connects");
    let uni = tokio::time::timeout(Duration::from_secs(1), conn.open_uni()).await;
    assert!(uni.is_err(), "a unidirectional stream was allowed");

    // At most 8 connections per peer: of 12 more, some are closed at once.
    let mut held = vec![(_endpoint, conn)];
    for _ in 0..12 {
        held.push(connect_as(&c, 0, &cert, &key).await.expect("handshake"));
    }
    let waits = held
        .iter()
        .map(|(_, conn)| tokio::time::timeout(Duration::from_secs(4), conn.closed()));
    let closed = futures::future::join_all(waits)
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    assert_eq!(closed, 13 - 8, "connections beyond the per-peer cap");
    let text = metrics_text(admin).await;
    let refused = metric_sum(
        &text,
        "weft_tunnel_refused_total",
        &["reason=\"too_many_connections\""],
    );
    assert_eq!(refused, 5.0);
    // Other peers are served meanwhile: n2 reaches an instance on n1.
    let up = Upstream::start(0, 200).await;
    register_everywhere(&c, 0, "web", up.port, "http").await;
    assert_eq!(proxy_get(c.nodes[1].proxy, "web").await, 200);
}

/// `weft keys ...` against one node's socket, as the cluster's operator
/// when `as_operator`, with `stdin` as standard input; stdout on success.
fn keys_cli(
    c: &TestCluster,
    node: usize,
    args: &[&str],
    stdin: &str,
    as_operator: bool,
) -> Result<String, String> {
    use std::io::Write as _;
    let mut cmd = std::process::Command::new(weft_bin());
    cmd.arg("--socket")
        .arg(&c.nodes[node].socket)
        .arg("keys")
        .args(args)
        .env_remove("WEFT_OPERATOR_CERT")
        .env_remove("WEFT_OPERATOR_KEY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if as_operator {
        let (cert, key) = operator(c);
        cmd.env("WEFT_OPERATOR_CERT", cert)
            .env("WEFT_OPERATOR_KEY", key);
    }
    let mut child = cmd.spawn().expect("run weft keys");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// Waits until every running node's `GET /v1/keys` satisfies `ok`.
async fn keys_everywhere(c: &TestCluster, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    for node in &c.nodes {
        let socket = node.socket.clone();
        wait_for(
            Duration::from_secs(20),
            &format!("{}: {what}", node.name),
            || {
                let socket = socket.clone();
                let ok = &ok;
                async move {
                    let (_, body) = get(&socket, "/v1/keys").await.ok()?;
                    ok(&body).then_some(())
                }
            },
        )
        .await;
    }
}

fn key_entry<'a>(list: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    list["keys"].as_array()?.iter().find(|k| k["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gossip_key_rotates_on_a_running_cluster_and_nothing_is_lost() {
    let mut c = TestCluster::start(3).await;
    let upstream = Upstream::start(free_port(), 200).await;
    register_everywhere(&c, 2, "api", upstream.port, "http").await;
    let old_id = get(&c.nodes[0].socket, "/v1/keys").await.unwrap().1["primary"]
        .as_str()
        .unwrap()
        .to_string();

    // Gossip traffic throughout: a registration every 100 ms on n1, and
    // every node's view of the members sampled for anything not alive.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (socket, stop) = (c.nodes[0].socket.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = serde_json::json!({"name": "churn", "port": 40000 + ids.len()});
                let (status, reply) = put_json(&socket, "/v1/services", &body).await.unwrap();
                assert_eq!(status, 200, "{reply}");
                ids.push(reply["id"].as_str().unwrap().to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ids
        })
    };
    let watcher = {
        let sockets: Vec<_> = c.nodes.iter().map(|n| n.socket.clone()).collect();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for socket in &sockets {
                    let (_, body) = get(socket, "/v1/members").await.unwrap();
                    for m in body["members"].as_array().unwrap() {
                        if m["state"] == "dead" || m["state"] == "left" {
                            worst.push(format!("{} {}", m["name"], m["state"]));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            worst
        })
    };

    // Install on n1, use on n2, remove on n3: each change reaches all. The
    // key comes on standard input, never the command line; only an
    // operator's grant changes the keyring.
    let new_key = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
    let on_argv = keys_cli(&c, 0, &["install", new_key], "", true).unwrap_err();
    assert!(on_argv.contains("unexpected argument"), "{on_argv}");
    let not_operator = keys_cli(&c, 0, &["install"], new_key, false).unwrap_err();
    assert!(not_operator.contains("operator"), "{not_operator}");
    let out = keys_cli(&c, 0, &["install"], new_key, true).unwrap();
    assert!(out.contains("granted by operator ops"), "{out}");
    let new_id = out.split_whitespace().nth(1).unwrap().to_string();
    keys_everywhere(&c, "the new key is installed on all 3", |l| {
        key_entry(l, &new_id).is_some_and(|k| k["installed_on"] == 3)
    })
    .await;
    // Removing the primary is refused, with the reason.
    let refused = keys_cli(&c, 2, &["remove", &old_id], "", true).unwrap_err();
    assert!(refused.contains("primary"), "{refused}");

    keys_cli(&c, 1, &["use", &new_id], "", true).unwrap();
    keys_everywhere(&c, "every node seals under the new key", |l| {
        l["primary"] == new_id.as_str()
            && key_entry(l, &new_id).is_some_and(|k| k["primary_on"] == 3)
    })
    .await;
    keys_cli(&c, 2, &["remove", &old_id], "", true).unwrap();
    keys_everywhere(&c, "the old key is gone everywhere", |l| {
        l["keys"].as_array().is_some_and(|k| k.len() == 1)
            && key_entry(l, &new_id).is_some_and(|k| k["installed_on"] == 3)
    })
    .await;
    let table = keys_cli(&c, 0, &["list"], "", false).unwrap();
    assert!(table.contains(&new_id) && table.contains("3/3"), "{table}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ids = churn.await.unwrap();
    let departures = watcher.await.unwrap();
    assert!(
        departures.is_empty(),
        "members lost during rotation: {departures:?}"
    );
    assert!(ids.len() >= 5, "too little gossip traffic: {ids:?}");
    for node in &c.nodes {
        let last = ids.last().unwrap().clone();
        wait_for(
            Duration::from_secs(10),
            "every registration is everywhere",
            || {
                let (socket, last) = (node.socket.clone(), last.clone());
                async move {
                    instance_ids(&socket, "churn")
                        .await?
                        .contains(&last)
                        .then_some(())
                }
            },
        )
        .await;
        let seen = instance_ids(&node.socket, "churn").await.unwrap();
        assert_eq!(seen.len(), ids.len(), "{}", node.name);
        // No datagram failed to open: every node held each key before it was used.
        let metrics = metrics_text(node.admin).await;
        assert_eq!(
            metric_sum(
                &metrics,
                "weft_gossip_rejected_total",
                &["reason=\"bad_seal\""]
            ),
            0.0,
            "{}",
            node.name
        );
        assert_eq!(proxy_get(node.proxy, "api").await, 200);
    }

    // The rotated keyring is kept in the data dir: a restarted node rejoins
    // although the cluster dir still holds the old gossip.key.
    c.restart(1);
    c.wait_converged(3, Duration::from_secs(20)).await;
    let (_, list) = get(&c.nodes[1].socket, "/v1/keys").await.unwrap();
    assert_eq!(list["primary"], new_id.as_str());
    assert_eq!(proxy_get(c.nodes[1].proxy, "api").await, 200);
}

/// `weft cert ...` in the cluster dir; panics unless it succeeds.
fn weft_cert(c: &TestCluster, args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new(weft_bin())
        .arg("cert")
        .args(args)
        .arg("--cluster")
        .arg(&c.cluster_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_node_exchanges_no_request_with_the_cluster() {
    let mut c = TestCluster::new();
    let certs = c.dir.path().join("certs");
    for name in ["n3", "retired"] {
        weft_cert(
            &c,
            &[
                "issue".as_ref(),
                name.as_ref(),
                "--out".as_ref(),
                certs.as_os_str(),
            ],
        );
    }
    // The list starts with a retired certificate; n1 and n2 check it, n3
    // (the node about to be revoked) does not cooperate.
    weft_cert(
        &c,
        &["revoke".as_ref(), certs.join("retired.pem").as_os_str()],
    );
    let crl = c.cluster_dir.join("crl.pem").display().to_string();
    c.add_node_with(&["--crl", &crl]);
    c.add_node_with(&["--crl", &crl]);
    let (n3_cert, n3_key) = (certs.join("n3.pem"), certs.join("n3.key"));
    c.add_node_with(&[
        "--cert",
        n3_cert.to_str().unwrap(),
        "--key",
        n3_key.to_str().unwrap(),
    ]);
    c.wait_converged(3, Duration::from_secs(20)).await;
    let on_n1 = Upstream::start(free_port(), 200).await;
    let on_n2 = Upstream::start(free_port(), 200).await;
    let on_n3 = Upstream::start(free_port(), 200).await;
    register_everywhere(&c, 0, "alpha", on_n1.port, "http").await;
    register_everywhere(&c, 1, "beta", on_n2.port, "http").await;
    register_everywhere(&c, 2, "gamma", on_n3.port, "http").await;
    let (n1, n3) = (&c.nodes[0], &c.nodes[2]);
    assert_eq!(proxy_get(n1.proxy, "gamma").await, 200);
    assert_eq!(proxy_get(n3.proxy, "alpha").await, 200);
    assert_eq!(proxy_get(n1.proxy, "beta").await, 200);
    let connections = |text: &str| metric_sum(text, "weft_tunnel_connections_total", &[]);
    let revoked =
        |text: &str| metric_sum(text, "weft_tunnel_refused_total", &["reason=\"revoked\""]);
    let before = metrics_text(n1.admin).await;

    weft_cert(&c, &["revoke".as_ref(), n3_cert.as_os_str()]);
    c.signal(0, libc::SIGHUP);
    c.signal(1, libc::SIGHUP);
    // n1 closes its tunnels to and from n3 (both were up), and counts them.
    wait_for(
        Duration::from_secs(10),
        "n1 closes n3's tunnels",
        || async { (revoked(&metrics_text(n1.admin).await) >= 2.0).then_some(()) },
    )
    .await;

    let (hits_n1, hits_n3) = (on_n1.hits(), on_n3.hits());
    for _ in 0..3 {
        assert_ne!(
            proxy_get(n1.proxy, "gamma").await,
            200,
            "n1 reached revoked n3"
        );
        assert_ne!(
            proxy_get(n3.proxy, "alpha").await,
            200,
            "revoked n3 reached n1"
        );
    }
    assert_eq!(
        on_n3.hits(),
        hits_n3,
        "a request reached the revoked node's instance"
    );
    assert_eq!(
        on_n1.hits(),
        hits_n1,
        "the revoked node's request reached an instance"
    );
    let after = metrics_text(n1.admin).await;
    assert!(
        revoked(&after) > 2.0,
        "n3's new handshakes are refused as revoked: {}",
        revoked(&after)
    );
    // The healthy tunnel n1 -> n2 stayed up through the reload.
    assert_eq!(proxy_get(n1.proxy, "beta").await, 200);
    let kept = metrics_text(n1.admin).await;
    assert_eq!(connections(&kept), connections(&before), "n1 redialed n2");

    // A node whose own certificate the list revokes does not start.
    let out = std::process::Command::new(weft_bin())
        .args([
            "node",
            "--name",
            "n3",
            "--gossip",
            "127.0.0.1:0",
            "--crl",
            &crl,
            "--cluster",
        ])
        .arg(&c.cluster_dir)
        .arg("--cert")
        .arg(&n3_cert)
        .arg("--key")
        .arg(&n3_key)
        .arg("--data-dir")
        .arg(c.dir.path().join("n3-again"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revokes this node's own certificate"), "{err}");
}

/// Eviction without visiting every host: n5's certificate is revoked where
/// the CA key lives, the list is handed to one node, and one key rotation
/// run on one node cuts n5 out of gossip. The list reaches every node by
/// gossip, the new key reaches only the nodes the tunnel still trusts, the
/// other four lose no request under steady load, n5's datagrams are
/// dropped everywhere, and n5 sees no new registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_node_is_cut_out_of_gossip_by_one_rotation() {
    let mut c = TestCluster::new();
    let certs = c.dir.path().join("certs");
    weft_cert(
        &c,
        &[
            "issue".as_ref(),
            "n5".as_ref(),
            "--out".as_ref(),
            certs.as_os_str(),
        ],
    );
    for _ in 0..4 {
        c.add_node();
    }
    let (n5_cert, n5_key) = (certs.join("n5.pem"), certs.join("n5.key"));
    c.add_node_with(&[
        "--cert",
        n5_cert.to_str().unwrap(),
        "--key",
        n5_key.to_str().unwrap(),
    ]);
    c.wait_converged(5, Duration::from_secs(30)).await;
    let upstream = Upstream::start(free_port(), 200).await;
    register_everywhere(&c, 1, "api", upstream.port, "http").await;

    // Steady load from n1, n3 and n4 to n2's instance throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let proxies: Vec<_> = [0, 2, 3].iter().map(|&i| c.nodes[i].proxy).collect();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for &proxy in &proxies {
                    let (status, error) = proxy_call(proxy, hyper::Method::GET, "api").await;
                    sent += 1;
                    if status != 200 {
                        failed.push(format!("{proxy}: {status} {error:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (sent, failed)
        })
    };

    // Revoke n5 where the CA key lives; hand the list to n1 only.
    weft_cert(&c, &["revoke".as_ref(), n5_cert.as_os_str()]);
    let published = std::process::Command::new(weft_bin())
        .arg("--socket")
        .arg(&c.nodes[0].socket)
        .args(["cert", "publish-crl"])
        .arg(c.cluster_dir.join("crl.pem"))
        .output()
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    for node in &c.nodes[..4] {
        let socket = node.socket.clone();
        wait_for(
            Duration::from_secs(15),
            &format!("{} drops n5", node.name),
            || {
                let socket = socket.clone();
                async move { member_state(&socket, "n5").await.is_none().then_some(()) }
            },
        )
        .await;
    }

    // One rotation, from n1's socket, as the operator.
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for node in &c.nodes[..4] {
            let text = metrics_text(node.admin).await;
            v.push(metric_sum(
                &text,
                "weft_gossip_rejected_total",
                &["reason=\"bad_seal\""],
            ));
        }
        v
    };
    let rotated = keys_cli(&c, 0, &["rotate"], "", true).unwrap();
    assert!(rotated.contains("rotated"), "{rotated}");
    let removed_at = std::time::Instant::now();
    for (node, before) in c.nodes[..4].iter().zip(before) {
        let admin = node.admin;
        wait_for(
            Duration::from_secs(10),
            &format!("{} drops n5's datagrams", node.name),
            || async move {
                let text = metrics_text(admin).await;
                (metric_sum(
                    &text,
                    "weft_gossip_rejected_total",
                    &["reason=\"bad_seal\""],
                ) > before)
                    .then_some(())
            },
        )
        .await;
    }
    let dropped_within = removed_at.elapsed();

    // A registration made now reaches the four, never n5.
    let body = serde_json::json!({"name": "fresh", "port": free_port()});
    let (status, reply) = put_json(&c.nodes[2].socket, "/v1/services", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    for node in &c.nodes[..4] {
        let socket = node.socket.clone();
        wait_for(Duration::from_secs(10), "fresh reaches the four", || {
            let socket = socket.clone();
            async move {
                let ids = instance_ids(&socket, "fresh").await?;
                (!ids.is_empty()).then_some(())
            }
        })
        .await;
    }
    let on_n5 = instance_ids(&c.nodes[4].socket, "fresh").await;
    assert!(
        on_n5.unwrap_or_default().is_empty(),
        "n5 saw a new registration"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = load.await.unwrap();
    assert!(sent > 30, "too little load: {sent}");
    assert!(
        failed.is_empty(),
        "requests lost during the rotation: {failed:?}"
    );
    eprintln!(
        "n5's datagrams dropped by all four within {dropped_within:?}; {sent} requests, none lost"
    );
}
