//! The receive pipeline: one task per socket reads, opens, replay-checks,
//! routes, reassembles and decodes, feeding a bounded channel; a supervisor
//! restarts it if it panics.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chitchat::transport::RecvOutcome;
use tokio::net::UdpSocket as TokioUdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

use super::codec;
use super::datagram::unix_now_ms;
use super::fragment::parse_routed;
use super::keyring::SharedKeyring;
use super::reassembly::Reassembler;
use super::replay::ReplayWindow;
use super::stats::{bump, SealStats, WarnLimiter};

/// Receive buffer size (larger than any UDP payload).
const RECV_BUF_LEN: usize = 65_536;
/// Pause before restarting a panicked reader.
const RESTART_BACKOFF: Duration = Duration::from_millis(50);
/// Consecutive non-transient receive errors after which the socket is broken.
const MAX_CONSECUTIVE_RECV_ERRORS: u32 = 16;
#[cfg(test)]
pub(super) const TEST_PANIC_PAYLOAD: &[u8] = b"__weft_seal_test_panic__";

/// State shared by the socket and its reader task(s); survives reader restarts.
pub(super) struct ReaderShared {
    pub(super) outer: Arc<TokioUdpSocket>,
    pub(super) keyring: SharedKeyring,
    pub(super) stats: Arc<SealStats>,
    pub(super) replay: Mutex<ReplayWindow>,
    /// This node's addresses a datagram may be sealed for: the advertised
    /// one and the socket's own.
    pub(super) addresses: [SocketAddr; 2],
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum ReaderExit {
    /// `Socket` dropped: stop quietly.
    InboxClosed,
    /// The outer socket is broken: report to chitchat and stop.
    Fatal(anyhow::Error),
}

pub(super) async fn supervise_reader(
    shared: Arc<ReaderShared>,
    inbox: mpsc::Sender<anyhow::Result<RecvOutcome>>,
) {
    loop {
        let mut reader = AbortOnDrop(tokio::spawn(run_reader(shared.clone(), inbox.clone())));
        let exit = (&mut reader.0).await;
        match exit {
            Ok(ReaderExit::InboxClosed) => return,
            Ok(ReaderExit::Fatal(err)) => {
                error!(error = %format!("{err:#}"), "sealed gossip socket broken, stopping");
                let _ = inbox.send(Err(err)).await;
                return;
            }
            Err(join_err) if join_err.is_panic() => {
                let restarts = bump(&shared.stats.reader_restarts);
                let panic = join_err.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string panic>".to_string());
                error!(panic = %message, restarts,
                    "sealed gossip reader panicked; restarting it");
                tokio::time::sleep(RESTART_BACKOFF).await;
            }
            // Cancelled: only happens at runtime shutdown.
            Err(_) => return,
        }
        if inbox.is_closed() {
            return;
        }
    }
}

fn is_transient_recv_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::OutOfMemory
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn run_reader(
    shared: Arc<ReaderShared>,
    inbox: mpsc::Sender<anyhow::Result<RecvOutcome>>,
) -> ReaderExit {
    let mut reassembler = Reassembler::default();
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut warn_limiter = WarnLimiter::default();
    let mut consecutive_errors = 0u32;
    loop {
        let received = tokio::select! {
            received = shared.outer.recv_from(&mut buf) => received,
            () = inbox.closed() => return ReaderExit::InboxClosed,
        };
        let (len, from) = match received {
            Ok(received) => {
                consecutive_errors = 0;
                shared
                    .stats
                    .bytes_received
                    .fetch_add(received.0 as u64, Ordering::Relaxed);
                received
            }
            Err(err) if is_transient_recv_error(&err) => {
                debug!(error = %err, "transient gossip recv error");
                continue;
            }
            Err(err) => {
                consecutive_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_RECV_ERRORS {
                    return ReaderExit::Fatal(
                        anyhow::Error::new(err).context("sealed gossip socket recv failed"),
                    );
                }
                warn!(error = %err, "gossip recv error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(datagram) = buf.get(..len) else {
            continue;
        };
        let Some((sender, message)) =
            accept_datagram(&shared, &mut reassembler, &mut warn_limiter, from, datagram)
        else {
            continue;
        };
        let envelope = match codec::decode(&message) {
            Ok(envelope) => envelope,
            Err(err) => {
                let total = bump(&shared.stats.decode_failures);
                if warn_limiter.allow("decode") {
                    warn!(%from, len = message.len(), decode_failures = total, error = %err,
                        "authentic gossip message could not be decoded by chitchat");
                }
                continue;
            }
        };
        bump(&shared.stats.messages_received);
        // Answers go to the sealed sender, never to an unauthenticated source.
        let outcome = RecvOutcome {
            from_addr: sender,
            envelope,
            num_bytes_received: message.len(),
        };
        if inbox.send(Ok(outcome)).await.is_err() {
            return ReaderExit::InboxClosed;
        }
    }
}

/// Opens, replay-checks, routes and reassembles one datagram. Returns the
/// sealed sender and a whole chitchat message when one is complete.
fn accept_datagram(
    shared: &ReaderShared,
    reassembler: &mut Reassembler,
    warn_limiter: &mut WarnLimiter,
    from: SocketAddr,
    datagram: &[u8],
) -> Option<(SocketAddr, Vec<u8>)> {
    let now_ms = unix_now_ms();
    let opened = match shared.keyring.load().open(datagram, now_ms) {
        Ok(opened) => opened,
        Err(err) => {
            shared.stats.count_open_error(err);
            if warn_limiter.allow(err.reason()) {
                warn!(%from, len = datagram.len(), reason = err.reason(),
                    "rejected gossip datagram (further rejections for 10 s logged at debug)");
            } else {
                debug!(%from, len = datagram.len(), reason = err.reason(), "rejected gossip datagram");
            }
            return None;
        }
    };
    let fresh = shared
        .replay
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .check_and_insert(opened.nonce, now_ms);
    if !fresh {
        bump(&shared.stats.rejected_replay);
        if warn_limiter.allow("replay") {
            warn!(%from, "rejected replayed gossip datagram");
        }
        return None;
    }
    let Some((route, fragment)) = parse_routed(&opened.plaintext) else {
        bump(&shared.stats.rejected_malformed);
        debug!(%from, "rejected gossip datagram with a bad fragment header");
        return None;
    };
    if !shared.addresses.contains(&route.to) {
        bump(&shared.stats.rejected_recipient);
        if warn_limiter.allow("wrong_recipient") {
            warn!(%from, sealed_for = %route.to, this_node = %shared.addresses[0],
                "rejected gossip datagram sealed for another node (a replay, or --seeds naming an address this node does not advertise)");
        }
        return None;
    }
    #[cfg(test)]
    if fragment.payload == TEST_PANIC_PAYLOAD {
        panic!("test-induced sealed reader panic");
    }
    match reassembler.push(route.from, fragment, Instant::now()) {
        Ok(message) => message.map(|m| (route.from, m)),
        Err(err) => {
            bump(&shared.stats.rejected_malformed);
            debug!(%from, error = %err, "rejected gossip fragment");
            None
        }
    }
}
