//! The Health checker actor: probes this node's own instances (HTTP GET, TCP
//! connect, or a TTL the service refreshes), applies rise/fall thresholds and
//! publishes each change under `health/<id>` in gossip.
//!
//! Each instance is checked once, by its owner, however many nodes call it.
//! Probes run as tokio tasks; the actor only holds state and decides.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use weft_gossip::{Check, Key, ServiceRecord};

use crate::gossip_writer::GossipWriter;
use crate::policy::health::{Health, HealthState, Thresholds, Ttl};

/// Default probe period.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default probe timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

struct Entry {
    record: ServiceRecord,
    state: HealthState,
    ttl: Option<Ttl>,
    probe: Option<JoinHandle<()>>,
    generation: u64,
}

/// Owns the health of this node's instances.
pub struct HealthChecker {
    entries: HashMap<String, Entry>,
    writer: GossipWriter,
    client: Client<HttpConnector, Empty<Bytes>>,
    thresholds: Thresholds,
    generation: u64,
}

impl HealthChecker {
    /// A checker that publishes through `writer`.
    pub fn new(writer: GossipWriter) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(DEFAULT_TIMEOUT));
        HealthChecker {
            entries: HashMap::new(),
            writer,
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build(connector),
            thresholds: Thresholds::default(),
            generation: 0,
        }
    }

    fn start_probe(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        let Some(check) = entry.record.check.clone() else {
            return;
        };
        self.generation += 1;
        entry.generation = self.generation;
        let generation = self.generation;
        let addr = ctx.address();
        let id = id.to_string();
        let port = entry.record.port;
        let client = self.client.clone();
        let interval = check
            .interval_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_INTERVAL);
        let timeout = check
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_TIMEOUT);
        entry.probe = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(match check.ttl_ms {
                // A TTL is evaluated often enough to notice expiry promptly.
                Some(ttl) => Duration::from_millis((ttl / 4).clamp(50, 1_000)),
                None => interval,
            });
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let passed = probe(&client, &check, port, timeout).await;
                if addr
                    .try_send(ProbeResult {
                        id: id.clone(),
                        generation,
                        passed,
                    })
                    .is_err()
                    && !addr.connected()
                {
                    return;
                }
            }
        }));
    }

    fn publish(&self, id: &str, health: Health) {
        self.writer
            .set(Key::Health(id.to_string()), health.as_str().to_string());
    }
}

/// `None` for a TTL check: the actor evaluates the TTL itself.
async fn probe(
    client: &Client<HttpConnector, Empty<Bytes>>,
    check: &Check,
    port: u16,
    timeout: Duration,
) -> Option<bool> {
    if check.ttl_ms.is_some() {
        return None;
    }
    if let Some(path) = &check.http {
        let uri: hyper::Uri = format!("http://127.0.0.1:{port}{path}").parse().ok()?;
        let req = hyper::Request::get(uri)
            .header("user-agent", "weft-health-check")
            .body(Empty::new())
            .ok()?;
        let resp = tokio::time::timeout(timeout, client.request(req)).await;
        return Some(matches!(resp, Ok(Ok(r)) if r.status().is_success()));
    }
    let conn =
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(("127.0.0.1", port))).await;
    Some(matches!(conn, Ok(Ok(_))))
}

impl Actor for HealthChecker {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for entry in self.entries.values_mut() {
            if let Some(p) = entry.probe.take() {
                p.abort();
            }
        }
    }
}

impl Supervised for HealthChecker {}

/// The full list of local registrations; the checker starts, restarts and
/// stops probes to match it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRegistrations(pub Vec<ServiceRecord>);

impl Handler<SetRegistrations> for HealthChecker {
    type Result = ();

    fn handle(&mut self, msg: SetRegistrations, ctx: &mut Self::Context) {
        let wanted: HashMap<String, ServiceRecord> =
            msg.0.into_iter().map(|r| (r.id.clone(), r)).collect();
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(mut e) = self.entries.remove(&id) {
                if let Some(p) = e.probe.take() {
                    p.abort();
                }
            }
            self.writer.delete(Key::Health(id));
        }
        for (id, record) in wanted {
            if self.entries.get(&id).is_some_and(|e| e.record == record) {
                continue;
            }
            if let Some(mut old) = self.entries.remove(&id) {
                if let Some(p) = old.probe.take() {
                    p.abort();
                }
            }
            let ttl = record
                .check
                .as_ref()
                .and_then(|c| c.ttl_ms)
                .map(|ms| Ttl::new(Duration::from_millis(ms)));
            let has_check = record.check.is_some();
            self.entries.insert(
                id.clone(),
                Entry {
                    record,
                    state: HealthState::new(self.thresholds),
                    ttl,
                    probe: None,
                    generation: 0,
                },
            );
            if has_check {
                // Until the first result the instance is "unknown" (still routable).
                self.publish(&id, Health::Unknown);
                self.start_probe(&id, ctx);
            } else {
                self.writer.delete(Key::Health(id));
            }
        }
    }
}

/// One probe finished (`passed: None` asks the actor to evaluate a TTL).
#[derive(Message)]
#[rtype(result = "()")]
struct ProbeResult {
    id: String,
    generation: u64,
    passed: Option<bool>,
}

impl Handler<ProbeResult> for HealthChecker {
    type Result = ();

    fn handle(&mut self, msg: ProbeResult, _ctx: &mut Self::Context) {
        let Some(entry) = self.entries.get_mut(&msg.id) else {
            return;
        };
        if entry.generation != msg.generation {
            return;
        }
        let passed = match (msg.passed, &entry.ttl) {
            (Some(p), _) => p,
            (None, Some(ttl)) => match ttl.passing(Instant::now()) {
                Some(p) => p,
                None => return,
            },
            (None, None) => return,
        };
        if let Some(changed) = entry.state.observe(passed) {
            tracing::info!(id = %msg.id, service = %entry.record.name, health = changed.as_str(), "health changed");
            self.publish(&msg.id, changed);
        }
    }
}

/// The service refreshed its TTL; answers whether `id` has a TTL check here.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct TtlPass(pub String);

impl Handler<TtlPass> for HealthChecker {
    type Result = bool;

    fn handle(&mut self, msg: TtlPass, _ctx: &mut Self::Context) -> bool {
        let Some(entry) = self.entries.get_mut(&msg.0) else {
            return false;
        };
        let Some(ttl) = entry.ttl.as_mut() else {
            return false;
        };
        ttl.refresh(Instant::now());
        // A refresh is a pass right away; expiry is noticed by the ticker.
        if let Some(changed) = entry.state.observe(true) {
            let id = msg.0.clone();
            let health = changed;
            self.writer
                .set(Key::Health(id), health.as_str().to_string());
        }
        true
    }
}
