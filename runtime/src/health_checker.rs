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
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_gossip::{Check, Health, Key, ServiceRecord};

use crate::gossip_writer::GossipWriter;
use crate::policy::health::{HealthState, Thresholds, Ttl};
use crate::supervision::{guard, Named};

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
    /// The source of truth: every registration, in order.
    registrations: watch::Receiver<Vec<ServiceRecord>>,
    /// The task forwarding registration changes; it outlives restarts.
    following: bool,
    writer: GossipWriter,
    client: Client<HttpConnector, Empty<Bytes>>,
    thresholds: Thresholds,
    generation: u64,
}

impl HealthChecker {
    /// A checker of the instances in `registrations`, publishing through
    /// `writer`.
    pub fn new(writer: GossipWriter, registrations: watch::Receiver<Vec<ServiceRecord>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(DEFAULT_TIMEOUT));
        HealthChecker {
            entries: HashMap::new(),
            registrations,
            following: false,
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

    /// Also after a restart: the checks are rebuilt from the registrations.
    fn started(&mut self, ctx: &mut Self::Context) {
        let current = self.registrations.borrow().clone();
        guard(self, ctx, |this, ctx| this.set_registrations(current, ctx));
        if std::mem::replace(&mut self.following, true) {
            return;
        }
        let mut changes = self.registrations.clone();
        changes.mark_unchanged();
        let addr = ctx.address();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let current = changes.borrow_and_update().clone();
                addr.do_send(SetRegistrations(current));
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for entry in self.entries.values_mut() {
            if let Some(p) = entry.probe.take() {
                p.abort();
            }
        }
    }
}

impl Named for HealthChecker {
    const NAME: &'static str = "health_checker";
}

crate::supervision::handle_crash!(HealthChecker);

/// The probes were aborted when the actor stopped; `started` rebuilds them
/// from the registrations, each instance `unknown` until its first result.
impl Supervised for HealthChecker {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.entries.clear();
    }
}

/// The full list of local registrations; the checker starts, restarts and
/// stops probes to match it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRegistrations(pub Vec<ServiceRecord>);

impl Handler<SetRegistrations> for HealthChecker {
    type Result = ();

    fn handle(&mut self, msg: SetRegistrations, ctx: &mut Self::Context) {
        guard(self, ctx, |this, ctx| this.set_registrations(msg.0, ctx));
    }
}

impl HealthChecker {
    fn set_registrations(&mut self, records: Vec<ServiceRecord>, ctx: &mut Context<Self>) {
        let wanted: HashMap<String, ServiceRecord> =
            records.into_iter().map(|r| (r.id.clone(), r)).collect();
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

    fn handle(&mut self, msg: ProbeResult, ctx: &mut Self::Context) {
        guard(self, ctx, |this, _| this.probe_result(msg));
    }
}

impl HealthChecker {
    fn probe_result(&mut self, msg: ProbeResult) {
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

    fn handle(&mut self, msg: TtlPass, ctx: &mut Self::Context) -> bool {
        guard(self, ctx, |this, _| this.ttl_pass(&msg.0)).unwrap_or(false)
    }
}

impl HealthChecker {
    fn ttl_pass(&mut self, id: &str) -> bool {
        let Some(entry) = self.entries.get_mut(id) else {
            return false;
        };
        let Some(ttl) = entry.ttl.as_mut() else {
            return false;
        };
        ttl.refresh(Instant::now());
        // A refresh is a pass right away; expiry is noticed by the ticker.
        if let Some(changed) = entry.state.observe(true) {
            self.publish(id, changed);
        }
        true
    }
}
