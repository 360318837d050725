//! The `weft` command line as a user meets it: exit codes and one-line errors.

mod common;

use std::process::Command;

use common::weft_bin;

fn weft(args: &[&str]) -> std::process::Output {
    Command::new(weft_bin())
        .args(args)
        .env_remove("WEFT_SOCKET")
        .env_remove("WEFT_NAME")
        .output()
        .expect("run weft")
}

fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "expected one line, got {err:?}");
    err
}

#[test]
fn bad_flags_exit_64_with_one_line() {
    let out = weft(&["node", "--name", "Bad Name", "--gossip", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(one_line_error(&out).contains("--name"));

    let out = weft(&["node", "--name", "n1", "--admin", "nowhere"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(one_line_error(&out).contains("--admin"));

    let out = weft(&["node", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(one_line_error(&out).contains("--no-such-flag"));

    let out = weft(&[
        "register",
        "web",
        "--port",
        "80",
        "--protocol",
        "tcp",
        "--check-tcp",
        "--ttl",
        "5s",
    ]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn bad_config_file_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weft.toml");
    std::fs::write(&cfg, "name = \"n1\"\nproxy = 4140\n").unwrap();
    let out = weft(&["node", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(one_line_error(&out).contains("proxy"));
}

#[test]
fn client_without_a_node_says_which_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("missing.sock");
    let out = weft(&["--socket", sock.to_str().unwrap(), "services"]);
    assert_eq!(out.status.code(), Some(69));
    let err = one_line_error(&out);
    assert!(err.contains("missing.sock"), "{err}");
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    assert!(weft(&["init", "--dir", c.to_str().unwrap()])
        .status
        .success());
    let out = weft(&["init", "--dir", c.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(one_line_error(&out).contains("--force"));
    assert!(weft(&["init", "--dir", c.to_str().unwrap(), "--force"])
        .status
        .success());
}

#[test]
fn help_lists_every_command() {
    let out = weft(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "init",
        "node",
        "register",
        "deregister",
        "services",
        "members",
        "health",
    ] {
        assert!(help.contains(cmd), "--help lacks {cmd}");
    }
}

#[test]
fn version_names_the_protocols_it_speaks() {
    let out = weft(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("weft {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    for line in [
        "tunnel weft/2, weft/1 (heads v2)",
        "gossip records schema 1 (reads 1..=1)",
        "gossip datagrams sealed v1",
        "stats summaries v1",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}
