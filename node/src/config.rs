//! Node configuration: flags and `WEFT_*` (through clap) over a TOML file over defaults.
//!
//! Everything is validated here, before anything binds, so a mistake is one
//! clear line and exit code 64.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use weft_runtime::access_log::AccessTarget;
use weft_runtime::dataplane::{Limits, RetryPolicy, DEFAULT_BODY_IDLE};

use crate::logging::LogFormat;

use crate::cli::NodeArgs;
use crate::NodeError;

/// Default gossip bind address.
pub const DEFAULT_GOSSIP: &str = "0.0.0.0:7946";
/// Default tunnel bind address.
pub const DEFAULT_TUNNEL: &str = "0.0.0.0:7947";
/// Default outbound proxy address.
pub const DEFAULT_PROXY: &str = "127.0.0.1:4140";
/// Default admin address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9646";
/// Default gossip interval.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(250);
/// How long a draining node waits for in-flight requests by default (under
/// the 30 s an orchestrator usually grants before it kills).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The settings a TOML file may hold (same names as the flags, with `_`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    name: Option<String>,
    cluster: Option<PathBuf>,
    gossip: Option<String>,
    advertise_gossip: Option<String>,
    tunnel: Option<String>,
    advertise_tunnel: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    crl: Option<PathBuf>,
    seeds: Option<Vec<String>>,
    zone: Option<String>,
    bridge: Option<String>,
    bridge_seeds: Option<Vec<String>>,
    proxy: Option<String>,
    admin: Option<String>,
    data_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    gossip_interval: Option<String>,
    retry_policy: Option<String>,
    max_connections: Option<usize>,
    drain_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    worker_threads: Option<usize>,
    log_format: Option<String>,
    access_log: Option<String>,
    otlp_endpoint: Option<String>,
    trace_sampling: Option<f64>,
    log_level: Option<String>,
}

/// A validated node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// Cluster dir, if given.
    pub cluster: Option<PathBuf>,
    /// Gossip bind address.
    pub gossip: SocketAddr,
    /// Gossip address announced to peers; `None` means "this host's primary
    /// address", found at start when the bind address is unspecified.
    pub advertise_gossip: Option<SocketAddr>,
    /// Tunnel bind address.
    pub tunnel: SocketAddr,
    /// Tunnel address announced to peers (`None`: derived at start).
    pub advertise_tunnel: Option<SocketAddr>,
    /// Node certificate and key given by the operator.
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// Revocation lists of the cluster CA (PEM), checked on both ends of
    /// every tunnel and reloaded on SIGHUP.
    pub crl: Option<PathBuf>,
    /// Seeds.
    pub seeds: Vec<String>,
    /// The zone (`None`: the default zone).
    pub zone: Option<String>,
    /// Where this node gossips with other zones' bridges, when it bridges.
    pub bridge: Option<BridgeConfig>,
    /// Proxy address.
    pub proxy: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Local socket path.
    pub socket: PathBuf,
    /// Gossip period.
    pub gossip_interval: Duration,
    /// Default retry wait policy.
    pub retry_policy: RetryPolicy,
    /// Connections open at once per listener.
    pub max_connections: usize,
    /// How long a draining node waits for in-flight requests.
    pub drain_timeout: Duration,
    /// How long a streamed body may move nothing.
    pub body_idle_timeout: Duration,
    /// Runtime worker threads (`None`: one per core).
    pub worker_threads: Option<usize>,
    /// Text or JSON log lines.
    pub log_format: LogFormat,
    /// Where the access log goes, if anywhere.
    pub access_log: Option<AccessTarget>,
    /// Where spans of traced requests go, and how many start a trace.
    pub traces: Option<TraceExport>,
    /// `log_level` from the config file (SIGHUP re-reads it).
    pub log_level: Option<String>,
    /// The config file, re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
}

/// A bridge's second gossip pool, between zones (`--bridge`,
/// `--bridge-seeds`).
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeConfig {
    /// UDP address to bind.
    pub listen: SocketAddr,
    /// Other bridges' addresses.
    pub seeds: Vec<String>,
}

impl BridgeConfig {
    /// From the flags, else the file's `bridge` and `bridge_seeds`.
    fn resolve(
        args: &NodeArgs,
        (listen, seeds): (Option<String>, Option<Vec<String>>),
        zone: Option<&str>,
    ) -> Result<Option<Self>, NodeError> {
        let Some(listen) = args.bridge.clone().or(listen) else {
            return Ok(None);
        };
        let listen = addr("--bridge", &listen)?;
        if zone.is_none() {
            return Err(NodeError::Config(
                "--bridge needs --zone: a bridge offers its zone's services under the zone's name"
                    .into(),
            ));
        }
        let seeds = seed_list(args.bridge_seeds.clone().or(seeds))?;
        Ok(Some(BridgeConfig { listen, seeds }))
    }
}

/// Span export over OTLP (`--otlp-endpoint`, `--trace-sampling`).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceExport {
    /// The collector's OTLP/gRPC address.
    pub endpoint: http::Uri,
    /// Share of untraced requests that start a trace.
    pub sampling: f64,
}

/// Requests without a trace that start one when none is configured: as
/// Istio's default, 1%.
pub const DEFAULT_TRACE_SAMPLING: f64 = 0.01;

impl TraceExport {
    fn resolve(args: &NodeArgs, file: &FileConfig) -> Result<Option<Self>, NodeError> {
        let sampling = args
            .trace_sampling
            .or(file.trace_sampling)
            .unwrap_or(DEFAULT_TRACE_SAMPLING);
        if !(0.0..=1.0).contains(&sampling) {
            return Err(NodeError::Config(format!(
                "--trace-sampling {sampling} must be between 0 and 1"
            )));
        }
        let Some(raw) = args
            .otlp_endpoint
            .as_deref()
            .or(file.otlp_endpoint.as_deref())
        else {
            return Ok(None);
        };
        let bad = |why: &str| NodeError::Config(format!("--otlp-endpoint {raw:?}: {why}"));
        let endpoint: http::Uri = raw.parse().map_err(|e| bad(&format!("{e}")))?;
        if !matches!(endpoint.scheme_str(), Some("http" | "https")) || endpoint.host().is_none() {
            return Err(bad("give a URL such as http://127.0.0.1:4317"));
        }
        Ok(Some(TraceExport { endpoint, sampling }))
    }
}

/// What SIGHUP may change in a running node, read again from the config
/// file; flags and `WEFT_*` still win over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reloadable {
    /// The log level (`None`: `RUST_LOG` or the default).
    pub log_level: Option<String>,
    /// The access log target.
    pub access_log: Option<AccessTarget>,
}

impl NodeConfig {
    /// Merges flags/env (`args`), the optional file and defaults, then validates.
    pub fn resolve(args: &NodeArgs, socket: Option<&Path>) -> Result<Self, NodeError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let live = Reloadable::from_settings(args, &file)?;
        let traces = TraceExport::resolve(args, &file)?;
        let name = args.name.clone().or(file.name).unwrap_or_else(host_name);
        weft_gossip::keys::validate_name(&name).map_err(|_| {
            NodeError::Config(format!(
                "--name {name:?} must match [a-z0-9][a-z0-9-]{{0,62}}"
            ))
        })?;
        let gossip = addr(
            "--gossip",
            args.gossip
                .as_deref()
                .or(file.gossip.as_deref())
                .unwrap_or(DEFAULT_GOSSIP),
        )?;
        let advertise_gossip = match args
            .advertise_gossip
            .as_deref()
            .or(file.advertise_gossip.as_deref())
        {
            Some(a) => {
                let a = addr("--advertise-gossip", a)?;
                if a.ip().is_unspecified() || a.port() == 0 {
                    return Err(NodeError::Config(format!(
                        "--advertise-gossip {a} must be a concrete address and port"
                    )));
                }
                Some(a)
            }
            None if gossip.ip().is_unspecified() => None,
            None => Some(gossip),
        };
        let tunnel = addr(
            "--tunnel",
            args.tunnel
                .as_deref()
                .or(file.tunnel.as_deref())
                .unwrap_or(DEFAULT_TUNNEL),
        )?;
        let advertise_tunnel = match args
            .advertise_tunnel
            .as_deref()
            .or(file.advertise_tunnel.as_deref())
        {
            Some(a) => {
                let a = addr("--advertise-tunnel", a)?;
                if a.ip().is_unspecified() || a.port() == 0 {
                    return Err(NodeError::Config(format!(
                        "--advertise-tunnel {a} must be a concrete address and port"
                    )));
                }
                Some(a)
            }
            None if tunnel.ip().is_unspecified() => None,
            None => Some(tunnel),
        };
        let cert_key = match (
            args.cert.clone().or(file.cert),
            args.key.clone().or(file.key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(NodeError::Config(
                    "--cert and --key must be given together".into(),
                ))
            }
        };
        let proxy = addr(
            "--proxy",
            args.proxy
                .as_deref()
                .or(file.proxy.as_deref())
                .unwrap_or(DEFAULT_PROXY),
        )?;
        let admin = addr(
            "--admin",
            args.admin
                .as_deref()
                .or(file.admin.as_deref())
                .unwrap_or(DEFAULT_ADMIN),
        )?;
        let seeds = seed_list(args.seeds.clone().or(file.seeds))?;
        let zone = args.zone.clone().or(file.zone);
        if let Some(zone) = &zone {
            weft_gossip::keys::validate_name(zone).map_err(|_| {
                NodeError::Config(format!(
                    "--zone {zone:?} must match [a-z0-9][a-z0-9-]{{0,62}}"
                ))
            })?;
        }
        let bridge =
            BridgeConfig::resolve(args, (file.bridge, file.bridge_seeds), zone.as_deref())?;
        let gossip_interval = duration(
            "--gossip-interval",
            args.gossip_interval
                .as_deref()
                .or(file.gossip_interval.as_deref()),
            DEFAULT_GOSSIP_INTERVAL,
        )?;
        if gossip_interval < Duration::from_millis(10) || gossip_interval > Duration::from_secs(10)
        {
            return Err(NodeError::Config(format!(
                "--gossip-interval {gossip_interval:?} must be between 10ms and 10s"
            )));
        }
        let retry_policy = match args
            .retry_policy
            .as_deref()
            .or(file.retry_policy.as_deref())
        {
            None => RetryPolicy::Learned,
            Some(p) => RetryPolicy::parse(p).ok_or_else(|| {
                NodeError::Config(format!(
                    "--retry-policy {p:?} must be \"learned\", \"exponential\" or \"none\""
                ))
            })?,
        };
        let max_connections = args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(Limits::default().max_connections);
        if max_connections == 0 {
            return Err(NodeError::Config(
                "--max-connections must be at least 1".into(),
            ));
        }
        let drain_timeout = duration(
            "--drain-timeout",
            args.drain_timeout
                .as_deref()
                .or(file.drain_timeout.as_deref()),
            DEFAULT_DRAIN_TIMEOUT,
        )?;
        let body_idle_timeout = duration(
            "--body-idle-timeout",
            args.body_idle_timeout
                .as_deref()
                .or(file.body_idle_timeout.as_deref()),
            DEFAULT_BODY_IDLE,
        )?;
        if body_idle_timeout.is_zero() {
            return Err(NodeError::Config(
                "--body-idle-timeout must be longer than 0".into(),
            ));
        }
        let worker_threads = args.worker_threads.or(file.worker_threads);
        if worker_threads == Some(0) {
            return Err(NodeError::Config(
                "--worker-threads must be at least 1".into(),
            ));
        }
        let log_format = match args.log_format.as_deref().or(file.log_format.as_deref()) {
            None => LogFormat::Text,
            Some(f) => LogFormat::parse(f).ok_or_else(|| {
                NodeError::Config(format!("--log-format {f:?} must be \"text\" or \"json\""))
            })?,
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./weft-data").join(&name));
        let socket = socket
            .map(Path::to_path_buf)
            .or(file.socket)
            .unwrap_or_else(|| data_dir.join("weft.sock"));
        Ok(NodeConfig {
            name,
            cluster: args.cluster.clone().or(file.cluster),
            gossip,
            advertise_gossip,
            tunnel,
            advertise_tunnel,
            cert_key,
            crl: args.crl.clone().or(file.crl),
            seeds,
            zone,
            bridge,
            proxy,
            admin,
            data_dir,
            socket,
            gossip_interval,
            retry_policy,
            max_connections,
            drain_timeout,
            body_idle_timeout,
            worker_threads,
            log_format,
            access_log: live.access_log,
            traces,
            log_level: live.log_level,
            config_file: args.config.clone(),
        })
    }

    /// The parts a SIGHUP reloads, from the config file as it is now.
    pub fn reload(&self, args: &NodeArgs) -> Result<Reloadable, NodeError> {
        let file = match &self.config_file {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        Reloadable::from_settings(args, &file)
    }
}

impl Reloadable {
    /// The live settings from the flags and the file (flags win).
    fn from_settings(args: &NodeArgs, file: &FileConfig) -> Result<Self, NodeError> {
        if let Some(level) = &file.log_level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| NodeError::Config(format!("--config: log_level {level:?}: {e}")))?;
        }
        Ok(Reloadable {
            log_level: file.log_level.clone(),
            access_log: args
                .access_log
                .as_deref()
                .or(file.access_log.as_deref())
                .map(AccessTarget::parse),
        })
    }
}

/// A duration setting (`given` by flag, environment or file), else `default`.
fn duration(flag: &str, given: Option<&str>, default: Duration) -> Result<Duration, NodeError> {
    match given {
        Some(raw) => {
            parse_duration(raw).map_err(|e| NodeError::Config(format!("{flag} {raw:?}: {e}")))
        }
        None => Ok(default),
    }
}

/// The default node name: this host's name, made a valid DNS label.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "node".to_string()
    } else {
        name
    }
}

fn load_file(path: &Path) -> Result<FileConfig, NodeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NodeError::Config(format!("--config {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().trim().to_string();
        // Point at the offending line: the message alone may not name the key.
        let at = e
            .span()
            .map(|span| {
                let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                format!(" at line {line_no} `{line}`")
            })
            .unwrap_or_default();
        NodeError::Config(format!("--config {}: {msg}{at}", path.display()))
    })
}

fn addr(flag: &str, raw: &str) -> Result<SocketAddr, NodeError> {
    raw.parse()
        .map_err(|_| NodeError::Config(format!("{flag} {raw:?} is not an IP:port address")))
}

/// Seed addresses, trimmed, each checked.
fn seed_list(seeds: Option<Vec<String>>) -> Result<Vec<String>, NodeError> {
    let seeds: Vec<String> = seeds
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for seed in &seeds {
        validate_seed(seed)?;
    }
    Ok(seeds)
}

fn validate_seed(seed: &str) -> Result<(), NodeError> {
    let ok = match seed.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(NodeError::Config(format!(
            "--seeds entry {seed:?} must be host:port"
        )))
    }
}

/// Parses `250ms`, `2s`, `1m`, `1h` or a bare number of milliseconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (num, unit) = raw.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number with a unit such as 250ms, 2s, 1m".to_string())?;
    let ms = match unit {
        "" | "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("unknown unit {unit:?}; use ms, s, m or h")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| "duration too large".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(name: &str) -> NodeArgs {
        NodeArgs {
            name: Some(name.into()),
            gossip: Some("127.0.0.1:7946".into()),
            ..NodeArgs::default()
        }
    }

    #[test]
    fn defaults_apply() {
        let cfg = NodeConfig::resolve(&args("n1"), None).unwrap();
        assert_eq!(cfg.proxy.to_string(), DEFAULT_PROXY);
        assert_eq!(cfg.admin.to_string(), DEFAULT_ADMIN);
        assert_eq!(cfg.tunnel.to_string(), DEFAULT_TUNNEL);
        assert_eq!(cfg.data_dir, PathBuf::from("./weft-data/n1"));
        assert_eq!(cfg.socket, PathBuf::from("./weft-data/n1/weft.sock"));
        assert_eq!(cfg.gossip_interval, Duration::from_millis(250));
        assert_eq!(cfg.advertise_gossip, Some(cfg.gossip));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let mut a = args("N1");
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("--name"), "{err}");
        a = args("n1");
        a.admin = Some("localhost".into());
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("--admin"), "{err}");
        a = args("n1");
        a.seeds = Some(vec!["nope".into()]);
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("--seeds"), "{err}");
        a = args("n1");
        a.gossip_interval = Some("5 parsecs".into());
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("--gossip-interval"), "{err}");
        a = args("n1");
        a.advertise_gossip = Some("0.0.0.0:7946".into());
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("--advertise-gossip"), "{err}");
        a = args("n1");
        a.gossip = Some("0.0.0.0:7946".into());
        assert_eq!(
            NodeConfig::resolve(&a, None).unwrap().advertise_gossip,
            None
        );
        let cfg = NodeConfig::resolve(&NodeArgs::default(), None).unwrap();
        assert_eq!(cfg.name, host_name());
        assert!(weft_gossip::keys::validate_name(&cfg.name).is_ok());
    }

    #[test]
    fn a_bridge_needs_a_zone() {
        let mut a = args("n1");
        a.bridge = Some("127.0.0.1:7948".into());
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("--bridge needs --zone"), "{err}");
        a.zone = Some("Eu".into());
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("--zone"), "{err}");
        a.zone = Some("eu".into());
        a.bridge_seeds = Some(vec!["10.0.0.2:7948".into(), " ".into()]);
        let cfg = NodeConfig::resolve(&a, None).unwrap();
        let bridge = cfg.bridge.expect("a bridge");
        assert_eq!(bridge.listen.to_string(), "127.0.0.1:7948");
        assert_eq!(bridge.seeds, ["10.0.0.2:7948"]);
        assert_eq!(cfg.zone.as_deref(), Some("eu"));
    }

    #[test]
    fn file_fills_gaps_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.toml");
        std::fs::write(
            &path,
            "name = \"from-file\"\nadmin = \"127.0.0.1:9999\"\nseeds = [\"127.0.0.1:7000\"]\ngossip = \"127.0.0.1:7001\"\n",
        )
        .unwrap();
        let mut a = NodeArgs {
            config: Some(path.clone()),
            ..NodeArgs::default()
        };
        let cfg = NodeConfig::resolve(&a, None).unwrap();
        assert_eq!(cfg.name, "from-file");
        assert_eq!(cfg.admin.to_string(), "127.0.0.1:9999");
        assert_eq!(cfg.seeds, vec!["127.0.0.1:7000".to_string()]);
        a.name = Some("flag".into());
        assert_eq!(NodeConfig::resolve(&a, None).unwrap().name, "flag");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.toml");
        std::fs::write(&path, "nmae = \"typo\"\n").unwrap();
        let a = NodeArgs {
            config: Some(path),
            ..NodeArgs::default()
        };
        let err = NodeConfig::resolve(&a, None).unwrap_err().to_string();
        assert!(err.contains("nmae"), "{err}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_millis(40)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
