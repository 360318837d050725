//! The weft node runtime: the actors every node runs and the pieces they share.
//!
//! # Layout
//!
//! - [`router`]: the **Router** actor. It owns the routing table derived from
//!   gossip and publishes immutable [`dataplane::tables::RouterSnapshot`]s
//!   through an `ArcSwap`, so request handlers read the table without a
//!   mailbox round trip.
//! - [`listener`]: the **Listener** actor. It owns the accept loops (the local
//!   Unix socket and the admin address); each connection is a plain tokio task.
//!
//! - [`health_checker`]: the **Health checker** actor. It probes this node's
//!   own instances and publishes their health in gossip.
//! - [`stats_aggregator`]: the **Stats aggregator** actor. It turns request
//!   outcomes into per-service windows and outage episodes, gossips a compact
//!   summary, merges everyone's, and learns each service's retry delay.
//! - [`state_metrics`]: gauges of current state (instances, learned delays)
//!   drawn from those two snapshots at scrape time.
//! - [`dataplane`]: the outbound HTTP proxy, TCP upstreams and the inbound
//!   side of the tunnel; connection tasks read the Router's snapshot. It
//!   sits below the actors: they drive it, and it names none of them.
//! - [`tunnel`]: pooled QUIC connections to peer nodes, and stream IO.
//! - [`access_log`]: one JSON line per proxied request, written off the
//!   request path.
//! - [`caller`]: who calls (`weft-caller`): stamped by the calling node,
//!   checked by the serving one.
//! - [`outcome`]: request outcomes, sent in one bounded channel to statistics.
//! - [`policy`]: pure decision logic (load balancing, a request's attempts,
//!   retries, health, statistics, intentions, routes, limits, concurrency,
//!   rollouts), tested without sockets or sleeps.
//! - [`wire`]: the tunnel codec (heads and body framing), the one module
//!   that touches bincode.
//! - [`supervision`]: the panic guard and restart every actor's handlers
//!   run inside.
//! - [`gossip_writer`]: this node's own gossip keys, written from any task.
//! - [`trace`]: W3C trace context and the spans exported over OTLP.
//! - [`tls`]: node certificates and the mTLS configuration of the tunnel.
//!
//! Actors run on the `actix::System` thread of a multi-thread tokio runtime;
//! connection tasks run on the worker threads.

pub mod access_log;
pub mod caller;
pub mod dataplane;
pub mod gossip_writer;
pub mod health_checker;
pub mod listener;
pub mod outcome;
pub mod policy;
pub mod router;
pub mod state_metrics;
pub mod stats_aggregator;
pub mod supervision;
pub mod tls;
pub mod trace;
pub mod tunnel;
pub mod wire;
