//! Nodes on separate hosts: each node in a network namespace of its own,
//! joined to the others by veth pairs on a bridge the test creates (and
//! removes), so every node has its own address and uses the default ports
//! (gossip 7946 and tunnel 7947 bound to 0.0.0.0, proxy 4140 and admin 9646
//! on its loopback) and detects the address it advertises, as on real
//! hosts. Needs root and `ip`; skips with a message otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Hosts of the test network: namespaces, veths and a bridge, named after
/// this process so that parallel runs do not collide, removed on drop.
struct Hosts {
    tag: String,
    subnet: String,
    count: usize,
    children: Vec<Child>,
}

impl Hosts {
    /// `count` hosts at `<subnet>.1` .. `<subnet>.count`; the bridge (the
    /// hosts' default route) is `<subnet>.254`. `Err` says why the machine
    /// cannot run this mode.
    fn create(count: usize) -> Result<Hosts, String> {
        if !run_ok("id", &["-u"]).is_ok_and(|uid| uid.trim() == "0") {
            return Err("not root".into());
        }
        let pid = std::process::id();
        let hosts = Hosts {
            tag: format!("w{}", pid % 100_000),
            subnet: format!("10.{}.{}", 200 + pid % 50, pid % 250),
            count,
            children: Vec::new(),
        };
        let bridge = hosts.bridge();
        let subnet = &hosts.subnet;
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=count {
            let (ns, outside, inside) = (hosts.ns(i), hosts.veth(i, 'o'), hosts.veth(i, 'i'));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            let addr = format!("{subnet}.{i}/24");
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let via = format!("{subnet}.254");
            ip(&["-n", &ns, "route", "add", "default", "via", &via])?;
        }
        Ok(hosts)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.tag)
    }

    /// Interface names stay within 15 bytes.
    fn veth(&self, i: usize, side: char) -> String {
        format!("{}{side}{i}", self.tag)
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{i}", self.subnet)
    }

    /// `ip netns exec <host i> program args...`, as a command to run.
    fn on(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Starts a long-running process made by [`Hosts::on`], stopped on drop.
    fn spawn(&mut self, mut command: Command, log: &Path) {
        let out = std::fs::File::create(log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn on host");
        self.children.push(child);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 1..=self.count {
            let _ = ip(&["link", "del", &self.veth(i, 'o')]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

fn run_ok(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run_ok("ip", args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_separate_hosts_use_the_default_ports_and_find_their_addresses() {
    let mut hosts = match Hosts::create(3) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("skipped: separate hosts need root, `ip` and network namespaces ({why})");
            return;
        }
    };
    for tool in ["curl", "python3"] {
        if run_ok(tool, &["--version"]).is_err() {
            eprintln!("skipped: separate hosts need {tool}");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = init_cluster(dir.path());
    let seed = format!("{}:7946", hosts.addr(1));
    let sockets: Vec<PathBuf> = (1..=3)
        .map(|i| dir.path().join(format!("h{i}")).join("weft.sock"))
        .collect();
    for i in 1..=3 {
        let data = dir.path().join(format!("h{i}"));
        let mut node = hosts.on(i, weft_bin());
        node.args(["node", "--name", &format!("h{i}"), "--seeds", &seed])
            .arg("--cluster")
            .arg(&cluster)
            .arg("--data-dir")
            .arg(&data)
            .arg("--socket")
            .arg(&sockets[i - 1])
            .env("RUST_LOG", "info");
        hosts.spawn(node, &dir.path().join(format!("h{i}.log")));
    }
    // Each node found its own address and advertises the default ports.
    for socket in &sockets {
        wait_for(Duration::from_secs(30), "three hosts alive", || async {
            let (_, body) = get(socket, "/v1/members").await.ok()?;
            let members = body["members"].as_array()?;
            let alive = members.iter().filter(|m| m["state"] == "alive").count();
            (alive == 3).then_some(())
        })
        .await;
    }
    let (_, body) = get(&sockets[0], "/v1/members").await.expect("members");
    for i in 1..=3 {
        let m = body["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == format!("h{i}")))
            .unwrap_or_else(|| panic!("h{i} in {body}"));
        assert_eq!(m["gossip_addr"], format!("{}:7946", hosts.addr(i)), "{m}");
        assert_eq!(m["tunnel_addr"], format!("{}:7947", hosts.addr(i)), "{m}");
    }

    // An instance on host 3, called through host 1's proxy on its default
    // port: the request crosses the hosts' network in the QUIC tunnel.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).expect("www");
    let token = format!("served on h3 for {}", std::process::id());
    std::fs::write(www.join("hello.txt"), &token).expect("file");
    let mut server = hosts.on(3, "python3");
    server
        .args([
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&www);
    hosts.spawn(server, &dir.path().join("http.log"));
    let (status, reply) = put_json(
        &sockets[2],
        "/v1/services",
        &serde_json::json!({"name": "web", "port": 8080, "check": {"http": "/hello.txt", "interval_ms": 200}}),
    )
    .await
    .expect("register");
    assert_eq!(status, 200, "{reply}");
    let answer = wait_for(
        Duration::from_secs(30),
        "h1's proxy answers for web",
        || async {
            let out = hosts
                .on(1, "curl")
                .args([
                    "-s",
                    "-f",
                    "-m",
                    "5",
                    "-H",
                    "Host: web",
                    "http://127.0.0.1:4140/hello.txt",
                ])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    assert_eq!(answer, token);
    // The admin port is the default one, on the host's own loopback.
    let metrics = hosts
        .on(1, "curl")
        .args(["-s", "-f", "-m", "5", "http://127.0.0.1:9646/metrics"])
        .output()
        .expect("curl metrics");
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("weft_tunnel_connections_total"),
        "h1 opened a tunnel to h3: {text:.300}"
    );
}
