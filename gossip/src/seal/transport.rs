//! The chitchat [`Transport`]: sockets that seal on send and hand chitchat
//! only what opened, from the sealed sender.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::ChitchatEnvelope;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::UdpSocket as TokioUdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::codec::Encoder;
use super::datagram::unix_now_ms;
use super::fragment::{
    seal_message, Route, DEFAULT_MAX_DATAGRAM_LEN, MAX_UDP_PAYLOAD_LEN, MIN_MAX_DATAGRAM_LEN,
};
use super::keyring::{Keyring, SharedKeyring};
use super::reader::{supervise_reader, ReaderShared};
use super::replay::ReplayWindow;
use super::stats::{bump, SealStats, WarnLimiter};

/// Capacity of the channel between the reader task and `Socket::recv`.
const INBOX_CAPACITY: usize = 256;
/// How long `open` retries binding a busy address (a previous socket on the
/// same address may still be shutting down its reader task).
const BIND_RETRY_FOR: Duration = Duration::from_millis(1_000);

/// A chitchat [`Transport`] sealing every datagram with a cluster key.
#[derive(Clone)]
pub struct SealedTransport {
    keyring: SharedKeyring,
    stats: Arc<SealStats>,
    max_datagram_len: usize,
    advertised: Option<SocketAddr>,
}

impl fmt::Debug for SealedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedTransport")
            .field("max_datagram_len", &self.max_datagram_len)
            .finish_non_exhaustive()
    }
}

impl SealedTransport {
    /// A transport sealing with the 32-byte cluster `key` (a keyring of one).
    pub fn new(key: [u8; 32]) -> Self {
        SealedTransport::with_keyring(Keyring::shared(&key))
    }

    /// A transport sealing under the keyring's primary and opening under
    /// any of its keys, as the keyring is at each datagram: swap it to
    /// rotate keys without restarting gossip.
    pub fn with_keyring(keyring: SharedKeyring) -> Self {
        SealedTransport {
            keyring,
            stats: Arc::new(SealStats::default()),
            max_datagram_len: DEFAULT_MAX_DATAGRAM_LEN,
            advertised: None,
        }
    }

    /// The address peers reach this node at (its advertised gossip
    /// address): sealed as the sender of every datagram, and accepted as a
    /// datagram's recipient besides the socket's own address.
    pub fn with_advertised(mut self, addr: SocketAddr) -> Self {
        self.advertised = Some(addr);
        self
    }

    /// Caps sealed datagrams at `len` bytes (clamped to
    /// [`MIN_MAX_DATAGRAM_LEN`]..=[`MAX_UDP_PAYLOAD_LEN`]); larger messages
    /// are fragmented. E.g. ~1,400 avoids IP fragmentation.
    pub fn with_max_datagram_len(mut self, len: usize) -> Self {
        self.max_datagram_len = len.clamp(MIN_MAX_DATAGRAM_LEN, MAX_UDP_PAYLOAD_LEN);
        self
    }

    /// The keyring this transport seals and opens with.
    pub fn keyring(&self) -> SharedKeyring {
        self.keyring.clone()
    }

    /// The counters of every socket this transport opens.
    pub fn stats(&self) -> Arc<SealStats> {
        self.stats.clone()
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = bind_outer(listen_addr)
            .await
            .with_context(|| format!("failed to bind sealed gossip socket to {listen_addr}/UDP"))?;
        let local_addr = outer
            .local_addr()
            .with_context(|| format!("failed to read address of gossip socket {listen_addr}"))?;
        let me = self.advertised.unwrap_or(local_addr);
        let shared = Arc::new(ReaderShared {
            outer: Arc::new(outer),
            keyring: self.keyring.clone(),
            stats: self.stats.clone(),
            replay: Mutex::new(ReplayWindow::default()),
            addresses: [me, local_addr],
        });
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        let supervisor = tokio::spawn(supervise_reader(shared.clone(), inbox_tx));
        Ok(Box::new(SealedSocket {
            outer: shared.outer.clone(),
            local_addr,
            me,
            keyring: self.keyring.clone(),
            stats: self.stats.clone(),
            max_datagram_len: self.max_datagram_len,
            encoder: Encoder::default(),
            rng: StdRng::from_entropy(),
            inbox: inbox_rx,
            supervisor,
            warn_limiter: WarnLimiter::default(),
        }))
    }
}

async fn bind_outer(addr: SocketAddr) -> io::Result<TokioUdpSocket> {
    let give_up_at = Instant::now() + BIND_RETRY_FOR;
    loop {
        match TokioUdpSocket::bind(addr).await {
            Ok(socket) => return Ok(socket),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse && Instant::now() < give_up_at => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

struct SealedSocket {
    outer: Arc<TokioUdpSocket>,
    local_addr: SocketAddr,
    /// The sender address sealed into every datagram.
    me: SocketAddr,
    keyring: SharedKeyring,
    stats: Arc<SealStats>,
    max_datagram_len: usize,
    encoder: Encoder,
    rng: StdRng,
    inbox: mpsc::Receiver<anyhow::Result<RecvOutcome>>,
    supervisor: JoinHandle<()>,
    warn_limiter: WarnLimiter,
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        // Dropping the supervisor's future aborts the reader, which releases
        // the last handle on the outer socket (and so the port).
        self.supervisor.abort();
    }
}

impl SealedSocket {
    fn send_failed(&mut self, to: SocketAddr, what: &'static str, err: &dyn fmt::Display) {
        let total = bump(&self.stats.send_failures);
        if self.warn_limiter.allow(what) {
            warn!(%to, error = %err, send_failures = total, "sealed gossip send failed: {what}");
        } else {
            debug!(%to, error = %err, "sealed gossip send failed: {what}");
        }
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        const FAILED: SendOutcome = SendOutcome { num_bytes_sent: 0 };
        let plaintext = self.encoder.encode(&envelope);
        let len = plaintext.len();
        // chitchat sizes its messages to one UDP payload; receivers
        // reassemble no more.
        if len > MAX_UDP_PAYLOAD_LEN {
            self.send_failed(to, "too large", &format_args!("{len} bytes"));
            return Ok(FAILED);
        }
        let route = Route { from: self.me, to };
        let datagrams = seal_message(
            self.keyring.load().primary(),
            plaintext,
            route,
            self.max_datagram_len,
            unix_now_ms(),
            &mut self.rng,
        );
        let Some(datagrams) = datagrams else {
            self.send_failed(to, "too large", &format_args!("{len} bytes"));
            return Ok(FAILED);
        };
        if datagrams.len() > 1 {
            bump(&self.stats.fragmented_messages);
        }
        for datagram in &datagrams {
            if let Err(err) = self.outer.send_to(datagram, to).await {
                // A UDP send error concerns this datagram/destination only
                // (EMSGSIZE, unreachable, ...): never kill the gossip loop.
                self.send_failed(to, "socket", &err);
                return Ok(FAILED);
            }
            bump(&self.stats.datagrams_sent);
            self.stats
                .bytes_sent
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        }
        Ok(SendOutcome {
            num_bytes_sent: len,
        })
    }

    /// Cancel-safe: only awaits the reader task's channel.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        match self.inbox.recv().await {
            Some(outcome) => outcome,
            None => Err(anyhow::anyhow!(
                "sealed gossip reader on {} stopped",
                self.local_addr
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use chitchat::{ChitchatMessage, ProtocolVersion};

    use super::*;
    use crate::seal::key::SealKey;

    fn loopback_any() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
    use crate::seal::reader::TEST_PANIC_PAYLOAD;

    const KEY: [u8; 32] = [7u8; 32];

    fn key() -> SealKey {
        SealKey::new(&KEY)
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(42)
    }

    // ---- transport level ------------------------------------------------

    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::BadCluster,
        }
    }

    fn syn(cluster_id: String) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::Syn {
                cluster_id,
                digest: Default::default(),
            },
        }
    }

    async fn open_pair(transport: &SealedTransport) -> (Box<dyn Socket>, Box<dyn Socket>) {
        let a = transport.open(loopback_any()).await.unwrap();
        let b = transport.open(loopback_any()).await.unwrap();
        (a, b)
    }

    async fn recv_within(socket: &mut Box<dyn Socket>, within: Duration) -> Option<RecvOutcome> {
        tokio::time::timeout(within, socket.recv())
            .await
            .ok()
            .map(|r| r.unwrap())
    }

    #[tokio::test]
    async fn sockets_exchange_envelopes() {
        let transport = SealedTransport::new(KEY);
        let (mut a, mut b) = open_pair(&transport).await;
        let a_addr = a.local_addr().unwrap();
        let b_addr = b.local_addr().unwrap();
        let outcome = a.send(b_addr, syn("weft".into())).await.unwrap();
        assert!(outcome.num_bytes_sent > 0);
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.from_addr, a_addr);
        assert_eq!(received.envelope, syn("weft".into()));
        assert_eq!(received.num_bytes_received, outcome.num_bytes_sent);

        b.send(a_addr, bad_cluster()).await.unwrap();
        let received = recv_within(&mut a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.from_addr, b_addr);
        assert_eq!(received.envelope, bad_cluster());
        assert_eq!(transport.stats().rejected_total(), 0);
    }

    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let transport = SealedTransport::new(KEY);
        let (mut a, mut b) = open_pair(&transport).await;
        let b_addr = b.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            for i in 0..50 {
                a.send(b_addr, syn(format!("c{i}"))).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            a
        });
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 50 && tokio::time::Instant::now() < deadline {
            // Like chitchat's select!: the recv future is dropped constantly.
            if let Ok(outcome) = tokio::time::timeout(Duration::from_micros(300), b.recv()).await {
                got.push(outcome.unwrap().envelope);
            }
        }
        let _a = sender.await.unwrap();
        let expected: Vec<_> = (0..50).map(|i| syn(format!("c{i}"))).collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn large_messages_are_fragmented_and_oversized_ones_counted() {
        let transport = SealedTransport::new(KEY);
        let (mut a, mut b) = open_pair(&transport).await;
        let b_addr = b.local_addr().unwrap();
        let big = syn("x".repeat(65_000));
        let sent = a.send(b_addr, syn("x".repeat(65_000))).await.unwrap();
        assert!(sent.num_bytes_sent > DEFAULT_MAX_DATAGRAM_LEN);
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.envelope, big);
        assert_eq!(received.num_bytes_received, sent.num_bytes_sent);
        assert_eq!(
            transport
                .stats()
                .fragmented_messages
                .load(Ordering::Relaxed),
            1
        );

        // Larger than a UDP payload: no receiver would reassemble it.
        // The send is counted as failed, but reported Ok so gossip goes on.
        let too_big = a.send(b_addr, syn("y".repeat(65_535))).await.unwrap();
        assert_eq!(too_big.num_bytes_sent, 0);
        assert_eq!(transport.stats().send_failures.load(Ordering::Relaxed), 1);
        // The socket still works.
        a.send(b_addr, bad_cluster()).await.unwrap();
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.envelope, bad_cluster());
    }

    #[tokio::test]
    async fn small_max_datagram_len_fragments_everything() {
        let transport = SealedTransport::new(KEY).with_max_datagram_len(1_400);
        let (mut a, mut b) = open_pair(&transport).await;
        let b_addr = b.local_addr().unwrap();
        a.send(b_addr, syn("z".repeat(20_000))).await.unwrap();
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.envelope, syn("z".repeat(20_000)));
        assert!(transport.stats().datagrams_sent.load(Ordering::Relaxed) >= 15);
    }

    #[tokio::test]
    async fn a_replay_from_a_forged_address_gets_no_reply_there() {
        // a sealed a SYN for b; an attacker captured it and sends it, from
        // its own address, to b and to another node c.
        let transport = SealedTransport::new(KEY);
        let stats = transport.stats();
        let mut b = transport.open(loopback_any()).await.unwrap();
        let mut c = transport.open(loopback_any()).await.unwrap();
        let (b_addr, c_addr) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let a_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let attacker = TokioUdpSocket::bind(loopback_any()).await.unwrap();
        let encoded = { Encoder::default().encode(&syn("weft".into())).to_vec() };
        let route = Route {
            from: a_addr,
            to: b_addr,
        };
        let captured = seal_message(
            &key(),
            &encoded,
            route,
            DEFAULT_MAX_DATAGRAM_LEN,
            unix_now_ms(),
            &mut rng(),
        )
        .unwrap();
        // c drops what was sealed for b: it never reaches c's chitchat.
        attacker.send_to(&captured[0], c_addr).await.unwrap();
        assert!(recv_within(&mut c, Duration::from_millis(300))
            .await
            .is_none());
        assert_eq!(stats.rejected_recipient.load(Ordering::Relaxed), 1);
        // b takes it once, as from a (the sealed sender): chitchat answers
        // a, never the address the datagram came from.
        attacker.send_to(&captured[0], b_addr).await.unwrap();
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.from_addr, a_addr);
        assert_ne!(received.from_addr, attacker.local_addr().unwrap());
    }

    #[tokio::test]
    async fn replayed_and_foreign_datagrams_never_reach_chitchat() {
        let transport = SealedTransport::new(KEY);
        let stats = transport.stats();
        let mut b = transport.open(loopback_any()).await.unwrap();
        let b_addr = b.local_addr().unwrap();
        let attacker = TokioUdpSocket::bind(loopback_any()).await.unwrap();
        let attacker_addr = attacker.local_addr().unwrap();
        // One rng: reusing a seed within the same millisecond would reuse
        // the nonce, which the replay window (rightly) rejects.
        let mut rng = rng();

        // A valid sealed message, delivered twice: the second is a replay.
        let encoded = { Encoder::default().encode(&syn("weft".into())).to_vec() };
        let datagrams = seal_message(
            &key(),
            &encoded,
            Route {
                from: attacker_addr,
                to: b_addr,
            },
            DEFAULT_MAX_DATAGRAM_LEN,
            unix_now_ms(),
            &mut rng,
        )
        .unwrap();
        attacker.send_to(&datagrams[0], b_addr).await.unwrap();
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.envelope, syn("weft".into()));
        assert_eq!(received.from_addr, attacker.local_addr().unwrap());
        attacker.send_to(&datagrams[0], b_addr).await.unwrap();
        // Stale, wrong key, raw chitchat bytes, and an authentic undecodable message.
        let stale = seal_message(
            &key(),
            &encoded,
            Route {
                from: attacker_addr,
                to: b_addr,
            },
            DEFAULT_MAX_DATAGRAM_LEN,
            unix_now_ms() - 60_000,
            &mut rng,
        )
        .unwrap();
        attacker.send_to(&stale[0], b_addr).await.unwrap();
        let foreign = seal_message(
            &SealKey::new(&[1u8; 32]),
            &encoded,
            Route {
                from: attacker_addr,
                to: b_addr,
            },
            DEFAULT_MAX_DATAGRAM_LEN,
            unix_now_ms(),
            &mut rng,
        )
        .unwrap();
        attacker.send_to(&foreign[0], b_addr).await.unwrap();
        attacker.send_to(&encoded, b_addr).await.unwrap();
        let junk = seal_message(
            &key(),
            b"not chitchat",
            Route {
                from: attacker_addr,
                to: b_addr,
            },
            DEFAULT_MAX_DATAGRAM_LEN,
            unix_now_ms(),
            &mut rng,
        )
        .unwrap();
        attacker.send_to(&junk[0], b_addr).await.unwrap();

        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.rejected_total() < 5 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            stats.rejected_by_reason(),
            vec![
                ("bad_seal", 1),
                ("stale", 1),
                ("replay", 1),
                ("malformed", 1),
                ("wrong_recipient", 0),
                ("undecodable", 1)
            ]
        );
        assert!(recv_within(&mut b, Duration::from_millis(200))
            .await
            .is_none());

        // And the socket still delivers afterwards.
        let mut a = transport.open(loopback_any()).await.unwrap();
        a.send(b_addr, bad_cluster()).await.unwrap();
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.envelope, bad_cluster());
    }

    #[tokio::test]
    async fn reader_panic_is_supervised() {
        let transport = SealedTransport::new(KEY);
        let stats = transport.stats();
        let (mut a, mut b) = open_pair(&transport).await;
        let b_addr = b.local_addr().unwrap();
        let attacker = TokioUdpSocket::bind(loopback_any()).await.unwrap();
        let poison = seal_message(
            &key(),
            TEST_PANIC_PAYLOAD,
            Route {
                from: attacker.local_addr().unwrap(),
                to: b_addr,
            },
            DEFAULT_MAX_DATAGRAM_LEN,
            unix_now_ms(),
            &mut rng(),
        )
        .unwrap();
        attacker.send_to(&poison[0], b_addr).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.reader_restarts.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.reader_restarts.load(Ordering::Relaxed), 1);
        // Replay protection survived the restart.
        attacker.send_to(&poison[0], b_addr).await.unwrap();
        a.send(b_addr, bad_cluster()).await.unwrap();
        let received = recv_within(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(received.envelope, bad_cluster());
        assert_eq!(stats.reader_restarts.load(Ordering::Relaxed), 1);
        assert_eq!(stats.rejected_replay.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn busy_address_is_an_error_and_drop_frees_it() {
        let transport = SealedTransport::new(KEY);
        let socket = transport.open(loopback_any()).await.unwrap();
        let bound = socket.local_addr().unwrap();
        let err = transport.open(bound).await.err().expect("address is busy");
        assert!(format!("{err:#}").contains(&bound.to_string()), "{err:#}");
        drop(socket);
        // The reader task is aborted asynchronously; open retries briefly.
        let again = transport.open(bound).await.unwrap();
        assert_eq!(again.local_addr().unwrap(), bound);
    }
}
