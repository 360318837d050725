//! The command line: one binary, `weft`, for the node and its clients.

use std::path::PathBuf;
use std::sync::LazyLock;

use clap::{Args, Parser, Subcommand};

/// `weft --version`: the release and the protocol versions it speaks, so
/// an operator can tell which nodes of a rolling upgrade talk to which.
static LONG_VERSION: LazyLock<String> = LazyLock::new(|| {
    let tunnels: Vec<String> = weft_runtime::wire::TunnelVersion::SPOKEN
        .iter()
        .map(ToString::to_string)
        .collect();
    format!(
        "{}\ntunnel {} (heads v{})\ngossip records schema {} (reads {}..={})\ngossip datagrams sealed v{}\nstats summaries v{}",
        env!("CARGO_PKG_VERSION"),
        tunnels.join(", "),
        weft_runtime::wire::WIRE_VERSION,
        weft_gossip::SCHEMA,
        weft_gossip::records::OLDEST_SCHEMA,
        weft_gossip::SCHEMA,
        weft_gossip::seal::SEAL_VERSION,
        weft_runtime::policy::stats::WIRE_VERSION,
    )
});

/// weft: a service mesh without a control plane.
#[derive(Debug, Parser)]
#[command(name = "weft", version, long_version = LONG_VERSION.as_str(), about, long_about = None)]
pub struct Cli {
    /// The local node's socket (client commands).
    #[arg(long, global = true, env = "WEFT_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// weft's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a cluster: CA (ca.pem, ca.key) and gossip key, once per cluster.
    Init {
        /// Directory to write the cluster files into.
        #[arg(long, default_value = "./weft-cluster", value_name = "DIR")]
        dir: PathBuf,
        /// Overwrite an existing cluster.
        #[arg(long)]
        force: bool,
    },
    /// Run a node.
    Node(Box<NodeArgs>),
    /// Certificates of the cluster CA: issue (nodes, operators), revoke, publish the revocation list.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Open a local TCP port that reaches a service anywhere in the mesh.
    Upstream {
        /// Service to reach.
        service: String,
        /// Local address to listen on, e.g. 127.0.0.1:15432.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Allow an address beyond loopback: anyone who reaches it reaches
        /// the service, without mTLS.
        #[arg(long)]
        public: bool,
    },
    /// The gossip keyring, cluster-wide: rotate (or install, use, remove), as an operator.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Who may call whom: the cluster's intentions. Changes are signed by
    /// an operator certificate and reach every node by gossip.
    #[command(subcommand)]
    Intentions(IntentionsCommand),
    /// Split a service's traffic by instance tag across the cluster (`weft
    /// route payments v1=90 v2=10`), `--clear` it, or list every route.
    /// Changes are signed by an operator certificate and reach every node
    /// by gossip.
    Route(RouteArgs),
    /// Limit a service's requests across the cluster: `weft limit api
    /// 300/s` (all callers on all nodes together), `--caller web` for one
    /// caller's; over it, 429 `weft-error: rate-limited`. Without a
    /// service, list the limits and this node's share of each.
    Limit(LimitArgs),
    /// Roll a new version out by itself: `weft rollout api --to v2` moves
    /// api's traffic to the instances tagged v2 step by step (5, 25, 50,
    /// 100 %) while their error rate and p99, measured by the whole
    /// cluster, stay within bounds of the stable tag's, and back at once
    /// when they do not. `weft rollout status` shows where each stands;
    /// `--clear` ends one. Changes are signed by an operator certificate.
    Rollout(RolloutArgs),
    /// Register a local service instance with the node.
    Register(RegisterArgs),
    /// Remove a registration by id.
    Deregister {
        /// Instance id.
        id: String,
    },
    /// List the cluster-wide catalog.
    Services {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the cluster's members.
    Members {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a whole mesh on this machine: 3 nodes, demo services, traffic,
    /// the live health table and the dashboard; Ctrl-C stops it.
    Demo {
        /// Stop after this long, e.g. 30s [default: until Ctrl-C].
        #[arg(long = "for", value_name = "DURATION")]
        run_for: Option<String>,
    },
    /// Show who calls whom: every (caller, service) edge of the cluster
    /// with its rps, success, latency and retries.
    Edges {
        /// Only the edges to or from this service.
        service: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream live requests from every node of the cluster as they happen,
    /// one line each (time, caller, service, instance, method, path,
    /// status, latency, attempts); Ctrl-C stops.
    Tap {
        /// Only requests to this service.
        service: Option<String>,
        /// Only requests from this calling service (`-`: the shared proxy).
        #[arg(long)]
        caller: Option<String>,
        /// Only these statuses: a class such as 5xx, or a code such as 503.
        #[arg(long)]
        status: Option<String>,
        /// Print each line as the node sends it (JSON).
        #[arg(long)]
        json: bool,
    },
    /// Show members and per-service health.
    Health {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Redraw every second.
        #[arg(long)]
        watch: bool,
    },
}

/// `weft keys ...`: each change made on one node reaches every node.
/// Changes are signed by an operator certificate (`weft cert issue
/// --operator NAME`), here where its key is; nodes adopt no other.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Every key, by id, with how many live members hold it and seal with it.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install a new key (base64, 32 bytes; e.g. `openssl rand -base64 32`)
    /// on every node: gossip opens under it from now on. The key is read
    /// from --key-file, else from standard input (never from the command
    /// line, where any local user could read it).
    Install {
        /// A file holding the key, base64.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Seal gossip under an installed key (refused until every live member
    /// holds it).
    Use {
        /// The key's id from `weft keys list`.
        key: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Remove a key (refused while it is the primary anywhere).
    Remove {
        /// The key's id from `weft keys list`.
        key: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// The whole rotation: a new random key installed on every member,
    /// made the primary everywhere, and the old primary removed, each step
    /// once the last reached every live member. After `weft cert
    /// publish-crl`, a revoked node is no member: it never gets the new key
    /// and its gossip is dropped everywhere once the old key is removed.
    Rotate {
        #[command(flatten)]
        operator: OperatorArgs,
    },
}

/// `weft intentions ...`. SOURCE is a service, `-` (the shared proxy's
/// anonymous caller) or `*`; DEST is a service or `*`. The most specific
/// rule decides (exact source and destination, then `*` to a service,
/// then a service to `*`, then `*` to `*`), else the cluster default.
#[derive(Debug, Subcommand)]
pub enum IntentionsCommand {
    /// The rules and the default, as this node holds them.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let SOURCE call DEST.
    Allow {
        /// Calling service, `-` or `*`.
        source: String,
        /// Called service or `*`.
        destination: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Refuse SOURCE's calls to DEST (403, `weft-error: forbidden`).
    Deny {
        /// Calling service, `-` or `*`.
        source: String,
        /// Called service or `*`.
        destination: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Remove the rule of SOURCE -> DEST.
    Remove {
        /// The rule's source.
        source: String,
        /// The rule's destination.
        destination: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Set what a call no rule matches gets: allow or deny.
    Default {
        /// allow or deny.
        action: String,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// What a call from SOURCE to DEST gets now, and which rule says so.
    Check {
        /// Calling service or `-`.
        source: String,
        /// Called service.
        destination: String,
    },
}

/// Flags of `weft route`.
#[derive(Debug, Args)]
pub struct RouteArgs {
    /// The service to split; without it, every route is listed.
    pub service: Option<String>,
    /// TAG=WEIGHT pairs, e.g. v1=90 v2=10 (weights are relative).
    pub splits: Vec<String>,
    /// Remove the service's route: any of its instances again.
    #[arg(long, conflicts_with = "splits")]
    pub clear: bool,
    /// Print JSON (when listing).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub signing: Signing,
}

/// `weft limit [SERVICE RATE [--caller C] | SERVICE --clear [--caller C]]`
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// The service to limit; without it, every limit is listed.
    pub service: Option<String>,
    /// Requests admitted across the cluster, COUNT/s or COUNT/m (e.g.
    /// 300/s).
    #[arg(conflicts_with = "clear")]
    pub rate: Option<String>,
    /// Limit only this calling service's requests (its own limit, beside
    /// the service-wide one); `-` is the shared proxy's callers, which name
    /// no service.
    #[arg(long, value_name = "SERVICE")]
    pub caller: Option<String>,
    /// Remove the limit.
    #[arg(long)]
    pub clear: bool,
    /// Print JSON (when listing).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub signing: Signing,
}

/// `weft rollout [status | SERVICE --to TAG [...] | SERVICE --clear]`
#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The service to roll out; `status` or nothing shows every rollout.
    pub service: Option<String>,
    /// The canary's tag.
    #[arg(long, value_name = "TAG", conflicts_with = "clear")]
    pub to: Option<String>,
    /// The tag that serves now (default: the heaviest other tag of the
    /// service's route, else the one other tag its instances carry).
    #[arg(long, value_name = "TAG", conflicts_with = "clear")]
    pub from: Option<String>,
    /// The canary's share at each step, in percent [default: 5,25,50,100].
    #[arg(long, value_name = "PCT,...", conflicts_with = "clear")]
    pub steps: Option<String>,
    /// How long each step lasts before it is judged [default: 30s].
    #[arg(long, value_name = "DURATION", conflicts_with = "clear")]
    pub interval: Option<String>,
    /// Roll back when the canary fails more than this share of its
    /// requests [default: 1%].
    #[arg(long, value_name = "PCT", conflicts_with = "clear")]
    pub max_error_rate: Option<String>,
    /// Roll back when the canary's p99 is over this many times the stable
    /// tag's [default: 1.5x].
    #[arg(long, value_name = "RATIO", conflicts_with = "clear")]
    pub max_p99: Option<String>,
    /// End the service's rollout: it follows its route again.
    #[arg(long)]
    pub clear: bool,
    /// Print JSON (with `status`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub signing: Signing,
}

/// The operator certificate that signs a change, for commands that also
/// list without one.
#[derive(Debug, Args)]
pub struct Signing {
    /// Operator certificate that signs a change (from `weft cert issue
    /// --operator NAME`).
    #[arg(long, env = "WEFT_OPERATOR_CERT", value_name = "FILE")]
    pub operator_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "WEFT_OPERATOR_KEY", value_name = "FILE")]
    pub operator_key: Option<PathBuf>,
}

impl Signing {
    /// The operator's certificate and key, or what is missing for `what`.
    pub fn operator(&self, what: &str) -> Result<OperatorArgs, String> {
        match (&self.operator_cert, &self.operator_key) {
            (Some(cert), Some(key)) => Ok(OperatorArgs {
                operator_cert: cert.clone(),
                operator_key: key.clone(),
            }),
            _ => Err(format!(
                "a {what} change is signed: give --operator-cert and --operator-key (or WEFT_OPERATOR_CERT, WEFT_OPERATOR_KEY)"
            )),
        }
    }
}

/// The operator certificate that signs a cluster config change.
#[derive(Debug, Args, Clone)]
pub struct OperatorArgs {
    /// Operator certificate (from `weft cert issue --operator NAME`).
    #[arg(long, env = "WEFT_OPERATOR_CERT", value_name = "FILE")]
    pub operator_cert: PathBuf,
    /// Its private key.
    #[arg(long, env = "WEFT_OPERATOR_KEY", value_name = "FILE")]
    pub operator_key: PathBuf,
}

/// `weft cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a certificate for node NAME (run where ca.key lives; hand the
    /// node only ca.pem, gossip.key and its own cert and key), or with
    /// --operator for operator NAME, whose key signs cluster config
    /// changes (`weft keys`).
    Issue {
        /// Node (or operator) name.
        name: String,
        /// Issue an operator certificate (`NAME.operator.weft`, client use
        /// only) instead of a node's.
        #[arg(long)]
        operator: bool,
        /// Cluster directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        cluster: PathBuf,
        /// Directory to write NAME.pem and NAME.key into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Hand a node a revocation list (from `weft cert revoke`): it adopts
    /// it, closes the tunnels of the nodes it revokes, and passes it on by
    /// gossip, so every node adopts it (no visit to each host).
    PublishCrl {
        /// The list (PEM), e.g. the cluster dir's crl.pem.
        crl: PathBuf,
    },
    /// Revoke a node certificate: adds it to the cluster's revoked.json and
    /// rewrites crl.pem in the cluster dir (then `weft cert publish-crl`,
    /// or copy it to every node's --crl and SIGHUP them).
    Revoke {
        /// The certificate to revoke (PEM).
        cert: PathBuf,
        /// Cluster directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        cluster: PathBuf,
    },
}

/// Flags of `weft node`; each can also come from `WEFT_*` or `--config FILE`.
#[derive(Debug, Args, Default, Clone)]
pub struct NodeArgs {
    /// Node name, unique in the cluster: [a-z0-9][a-z0-9-]{0,62} [default: host name].
    #[arg(long, env = "WEFT_NAME")]
    pub name: Option<String>,
    /// Cluster directory (ca.pem, gossip.key) made by `weft init`.
    #[arg(long, env = "WEFT_CLUSTER", value_name = "DIR")]
    pub cluster: Option<PathBuf>,
    /// Gossip UDP address to bind [default: 0.0.0.0:7946].
    #[arg(long, env = "WEFT_GOSSIP", value_name = "ADDR")]
    pub gossip: Option<String>,
    /// Gossip address other nodes use to reach this one [default: the bound address; bound to 0.0.0.0, this host's address on the route to the first seed given as an IP, else the default route's].
    #[arg(long, env = "WEFT_ADVERTISE_GOSSIP", value_name = "ADDR")]
    pub advertise_gossip: Option<String>,
    /// QUIC tunnel UDP address [default: 0.0.0.0:7947].
    #[arg(long, env = "WEFT_TUNNEL", value_name = "ADDR")]
    pub tunnel: Option<String>,
    /// Tunnel address other nodes use to reach this one [default: the bound address; bound to 0.0.0.0, the gossip address's IP].
    #[arg(long, env = "WEFT_ADVERTISE_TUNNEL", value_name = "ADDR")]
    pub advertise_tunnel: Option<String>,
    /// This node's certificate (from `weft cert issue`) [default: issued at start from the cluster's ca.key].
    #[arg(long, env = "WEFT_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// This node's private key (mode 0600).
    #[arg(long, env = "WEFT_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Revocation list of the cluster CA (PEM, from `weft cert revoke`):
    /// peers whose certificate it lists are refused on both ends; reloaded
    /// on SIGHUP.
    #[arg(long, env = "WEFT_CRL", value_name = "FILE")]
    pub crl: Option<PathBuf>,
    /// Comma-separated seed gossip addresses (host:port).
    #[arg(long, env = "WEFT_SEEDS", value_name = "A,B", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Zone this node gossips in: [a-z0-9][a-z0-9-]{0,62}. Nodes of other
    /// zones are reached through bridges [default: the one default zone].
    #[arg(long, env = "WEFT_ZONE", value_name = "NAME")]
    pub zone: Option<String>,
    /// Make this node a bridge of its zone: it also gossips with the other
    /// zones' bridges on this UDP address, and relays requests between
    /// zones. Needs --zone.
    #[arg(long, env = "WEFT_BRIDGE", value_name = "ADDR")]
    pub bridge: Option<String>,
    /// Comma-separated addresses (host:port) of other bridges' --bridge
    /// sockets, any zone.
    #[arg(
        long,
        env = "WEFT_BRIDGE_SEEDS",
        value_name = "A,B",
        value_delimiter = ','
    )]
    pub bridge_seeds: Option<Vec<String>>,
    /// Outbound HTTP proxy address [default: 127.0.0.1:4140].
    #[arg(long, env = "WEFT_PROXY", value_name = "ADDR")]
    pub proxy: Option<String>,
    /// Admin HTTP address (read-only API, metrics) [default: 127.0.0.1:9646].
    #[arg(long, env = "WEFT_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,
    /// Where the node stores its state [default: ./weft-data/<name>].
    #[arg(long, env = "WEFT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// How a retry to the same instance waits: learned or exponential, or none for no retries [default: learned].
    #[arg(long, env = "WEFT_RETRY_POLICY", value_name = "POLICY")]
    pub retry_policy: Option<String>,
    /// Gossip round period, e.g. 250ms [default: 250ms].
    #[arg(long, env = "WEFT_GOSSIP_INTERVAL", value_name = "DURATION")]
    pub gossip_interval: Option<String>,
    /// Connections open at once per listener: the proxy, each TCP upstream,
    /// tunnel connections from peers [default: 10000].
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// How long a streamed request or response body may move nothing
    /// before its stream is reset, e.g. 30s [default: 5m].
    #[arg(long, env = "WEFT_BODY_IDLE_TIMEOUT", value_name = "DURATION")]
    pub body_idle_timeout: Option<String>,
    /// On SIGTERM, how long in-flight requests may take to finish before the
    /// node leaves anyway, e.g. 20s [default: 20s].
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Threads that carry traffic; 1 costs about a third less CPU per
    /// request below the peak [default: one per core].
    #[arg(long, env = "WEFT_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Log lines as text or json [default: text].
    #[arg(long, env = "WEFT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// One JSON line per proxied request, to this file or `-` (stdout)
    /// [default: off]. SIGHUP reopens it.
    #[arg(long, env = "WEFT_ACCESS_LOG", value_name = "PATH|-")]
    pub access_log: Option<String>,
    /// Export spans of traced requests over OTLP/gRPC to this collector,
    /// e.g. http://127.0.0.1:4317 [default: off; `traceparent` still
    /// passes through].
    #[arg(long, env = "WEFT_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Share of requests arriving without a `traceparent` that start a
    /// trace, 0 to 1 (a sampled `traceparent` is always followed)
    /// [default: 0.01].
    #[arg(long, env = "WEFT_TRACE_SAMPLING", value_name = "RATIO")]
    pub trace_sampling: Option<f64>,
    /// TOML file with any of these settings (flags and WEFT_* win).
    #[arg(long, env = "WEFT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Flags of `weft register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name: [a-z0-9][a-z0-9-]{0,62}.
    pub name: String,
    /// Port of the instance on this host's loopback.
    #[arg(long)]
    pub port: u32,
    /// Instance id [default: <name>-<node>-<port>].
    #[arg(long)]
    pub id: Option<String>,
    /// http or tcp.
    #[arg(long, default_value = "http")]
    pub protocol: String,
    /// HTTP health check: GET this path, expect 2xx.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["check_tcp", "ttl"])]
    pub check_http: Option<String>,
    /// TCP connect health check.
    #[arg(long, conflicts_with = "ttl")]
    pub check_tcp: bool,
    /// TTL check the service refreshes, e.g. 10s.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
    /// Tags (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Open the service's own outbound proxy: requests the app sends
    /// through it reach other services as this one's (`weft-caller`).
    /// Alone, the node picks a port on 127.0.0.1 and prints it.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "auto")]
    pub outbound: Option<String>,
    /// A named upstream, repeatable: a loopback port that reaches SERVICE
    /// (HTTP or TCP, as SERVICE speaks) as this service's calls.
    #[arg(long = "upstream", value_name = "SERVICE=ADDR")]
    pub upstreams: Vec<String>,
}
