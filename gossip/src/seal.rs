//! Sealed gossip transport: every chitchat datagram is authenticated and
//! encrypted with a cluster-wide key before it leaves the node, and every
//! incoming datagram is verified before chitchat ever sees it.
//!
//! # Why a codec detour
//!
//! chitchat's [`Transport`]/[`Socket`] traits only exchange typed
//! [`ChitchatEnvelope`]s; the byte encoding is private to chitchat. To get at
//! the bytes we use chitchat's own public [`chitchat::transport::UdpSocket`] as
//! a codec, over private loopback sockets:
//!
//! ```text
//! send:  envelope -> codec_tx (chitchat UdpSocket) --loopback--> tap
//!        tap bytes -> fragment + seal -> outer socket -> peer
//!
//! recv:  peer -> outer socket -> open/verify -> replay window -> reassemble
//!        plaintext -> replayer --loopback--> codec_rx (chitchat UdpSocket)
//!        fence (chitchat UdpSocket) --loopback--> codec_rx
//!        codec_rx decodes -> RecvOutcome { from_addr: sealed sender, .. } -> channel
//! ```
//!
//! The receive pipeline runs in one spawned task feeding a bounded channel, so
//! [`Socket::recv`] (whose future chitchat drops on every gossip tick) only
//! awaits a cancel-safe channel receive. A supervisor restarts the reader with
//! fresh codec sockets if it ever panics (e.g. a decode bug in chitchat hit by
//! a datagram from a key holder).
//!
//! chitchat's `UdpSocket::recv` silently loops forever on undecodable bytes,
//! so after writing the plaintext the reader writes a tiny, always-decodable
//! "fence" envelope from a third socket: seeing the fence without having seen
//! the plaintext means the plaintext did not decode. A 1 s deadline backs this
//! up, and any doubt resets the codec sockets. Datagrams reaching the codec
//! sockets from any other local address are discarded.
//!
//! # Wire format
//!
//! Every sealed datagram is:
//!
//! ```text
//! +---------+----------------------------------+---------------------------+
//! | version | nonce (12 bytes)                 | ciphertext | tag (16)     |
//! | 1 byte  | ts_ms (48-bit BE) | random (6)   |                           |
//! +---------+----------------------------------+---------------------------+
//! ```
//!
//! - `version` is [`SEAL_VERSION`] (1).
//! - The AEAD is ChaCha20-Poly1305 (ring `LessSafeKey`, 32-byte key); the
//!   13-byte header (version + nonce) is the associated data, so it cannot be
//!   altered either.
//! - `ts_ms` is the sender's unix time in milliseconds. Receivers reject
//!   datagrams whose timestamp is more than [`MAX_CLOCK_SKEW_MS`] (30 s) away
//!   from their own clock, and remember every nonce accepted in the last
//!   [`REPLAY_WINDOW_MS`] (60 s, at most [`REPLAY_WINDOW_CAPACITY`] entries,
//!   oldest evicted first) to reject exact replays at this node. The sealed
//!   route (below) covers replays to the other nodes.
//!
//! The sealed plaintext always starts with the route (who sealed it, for
//! whom: 2 x 18 bytes, IPv6 or IPv4-mapped address and port) and a 10-byte
//! fragment header:
//!
//! ```text
//! | from (18) | to (18) | message id (u64 BE) | index (u8) | count (u8) | chitchat bytes ... |
//! ```
//!
//! `from` is the sender's advertised gossip address and `to` the address it
//! sent to. A receiver drops a datagram sealed for an address that is not
//! its own (advertised or bound), and hands chitchat the sealed `from` as
//! the sender, so chitchat answers the authenticated sender: a captured
//! datagram replayed from a forged source, to this node or any other, makes
//! no node send anything to the forged address.
//!
//! chitchat fills datagrams up to 65,507 bytes, the maximum UDP payload, and
//! sealing adds [`SEAL_OVERHEAD`] + [`ROUTE_LEN`] + [`FRAGMENT_HEADER_LEN`] bytes. A message
//! whose sealed form would exceed the transport's maximum datagram length
//! ([`DEFAULT_MAX_DATAGRAM_LEN`], 65,000 bytes, by default) is split into
//! `count` fragments, each sealed separately (own nonce, own replay check).
//! Receivers reassemble by (source address, message id); incomplete messages
//! expire after [`REASSEMBLY_TIMEOUT`] and at most [`MAX_REASSEMBLIES`] are in
//! progress at once. Unfragmented messages carry `index = 0, count = 1`.
//!
//! # Failure handling
//!
//! Nothing a peer sends can panic the node or stop gossip: rejected datagrams
//! are counted in [`SealStats`] (exported as
//! `weft_gossip_rejected_total{reason}` via [`SealStats::rejected_by_reason`])
//! and dropped. A failed single send (oversized message, unreachable peer) is
//! logged and counted, and reported to chitchat as success, because it is not
//! a broken transport.
//!
//! # Limits
//!
//! - Nonce uniqueness rests on the millisecond timestamp plus 48 random bits,
//!   under one key shared by the whole cluster: two datagrams sealed in the
//!   same millisecond anywhere in the cluster collide with probability 2^-48.
//!   Rotate the key periodically on large, busy clusters.
//! - The replay window is per socket and in memory: it survives reader
//!   restarts, not process restarts (the 30 s timestamp check still applies).
//! - Dropping a socket releases its port asynchronously (the reader task is
//!   aborted); [`SealedTransport`]'s `open` therefore retries a busy address
//!   for up to 1 s before failing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use base64::Engine as _;
use chitchat::transport::{
    RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdpSocket,
};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use tokio::net::UdpSocket as TokioUdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

/// Version byte leading every sealed datagram.
pub const SEAL_VERSION: u8 = 1;
/// Nonce length: 6-byte big-endian unix timestamp (ms) + 6 random bytes.
pub const NONCE_LEN: usize = 12;
/// Sealed header: version byte + nonce. Used as the AEAD associated data.
pub const HEADER_LEN: usize = 1 + NONCE_LEN;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Bytes sealing adds to a plaintext (header + tag): 29.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Fragment header inside the sealed plaintext: message id (8), index (1), count (1).
pub const FRAGMENT_HEADER_LEN: usize = 10;
/// Bytes of the sealed route (sender and recipient addresses) in front of
/// the fragment header.
pub const ROUTE_LEN: usize = 2 * ADDR_LEN;
const ADDR_LEN: usize = 18;
/// Largest UDP payload (IPv4), and the largest datagram chitchat produces.
pub const MAX_UDP_PAYLOAD_LEN: usize = 65_507;
/// Default cap on a sealed datagram; larger messages are fragmented.
pub const DEFAULT_MAX_DATAGRAM_LEN: usize = 65_000;
/// Smallest accepted maximum datagram length (keeps a 65,507-byte message
/// within 255 fragments).
pub const MIN_MAX_DATAGRAM_LEN: usize = 512;
/// Largest accepted difference between a datagram's timestamp and local time.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// How long accepted nonces are remembered.
pub const REPLAY_WINDOW_MS: u64 = 60_000;
/// Maximum number of nonces remembered.
pub const REPLAY_WINDOW_CAPACITY: usize = 100_000;
/// How long an incomplete fragmented message is kept.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Maximum number of fragmented messages being reassembled at once.
pub const MAX_REASSEMBLIES: usize = 64;

/// Deadline for one trip through a loopback codec socket.
const CODEC_TIMEOUT: Duration = Duration::from_secs(1);
/// Capacity of the channel between the reader task and `Socket::recv`.
const INBOX_CAPACITY: usize = 256;
/// Receive buffer size (larger than any UDP payload).
const RECV_BUF_LEN: usize = 65_536;
/// Pause before restarting a panicked reader.
const RESTART_BACKOFF: Duration = Duration::from_millis(50);
/// Pause before retrying after the codec sockets could not be created.
const CODEC_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// How long `open` retries binding a busy address (a previous socket on the
/// same address may still be shutting down its reader task).
const BIND_RETRY_FOR: Duration = Duration::from_millis(1_000);
/// Consecutive non-transient receive errors after which the socket is broken.
const MAX_CONSECUTIVE_RECV_ERRORS: u32 = 16;
/// Minimum interval between two warnings of the same kind.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
const TEST_PANIC_PAYLOAD: &[u8] = b"__weft_seal_test_panic__";

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A cluster key ready for sealing and opening (ChaCha20-Poly1305).
#[derive(Clone)]
pub struct SealKey(LessSafeKey);

impl SealKey {
    /// Builds a key from 32 raw bytes.
    pub fn new(key: &[u8; 32]) -> Self {
        // ChaCha20-Poly1305 takes exactly 32-byte keys, which the type guarantees.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, key)
            .expect("a 32-byte key is always valid for ChaCha20-Poly1305");
        SealKey(LessSafeKey::new(unbound))
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// Why a cluster key string could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The string is not standard base64.
    #[error("gossip key is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The decoded key is not 32 bytes long.
    #[error("gossip key must be 32 bytes, got {0}")]
    Length(usize),
}

/// Decodes a standard-base64 cluster key (surrounding whitespace ignored) into 32 bytes.
pub fn decode_key_base64(encoded: &str) -> Result<[u8; 32], KeyError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.trim())?;
    let len = bytes.len();
    <[u8; 32]>::try_from(bytes).map_err(|_| KeyError::Length(len))
}

// ---------------------------------------------------------------------------
// Seal / open
// ---------------------------------------------------------------------------

/// Why a datagram was rejected by [`open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short or unknown version byte.
    #[error("malformed sealed datagram")]
    Malformed,
    /// Authentication failed: wrong key, tampered or forged.
    #[error("sealed datagram failed authentication")]
    BadSeal,
    /// Authentic, but the timestamp is more than [`MAX_CLOCK_SKEW_MS`] from now.
    #[error("sealed datagram timestamp too far from local time")]
    Stale,
}

impl OpenError {
    /// The metric label of this rejection reason.
    pub fn reason(self) -> &'static str {
        match self {
            OpenError::Malformed => "malformed",
            OpenError::BadSeal => "bad_seal",
            OpenError::Stale => "stale",
        }
    }
}

/// An authenticated, fresh datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The nonce, to be checked against the [`ReplayWindow`].
    pub nonce: [u8; NONCE_LEN],
    /// The sender's timestamp (unix ms).
    pub timestamp_ms: u64,
    /// The decrypted plaintext.
    pub plaintext: Vec<u8>,
}

fn make_nonce<R: RngCore + ?Sized>(now_ms: u64, rng: &mut R) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    // 48-bit millisecond timestamp (good until the year 10889), then 48 random bits.
    let ts = now_ms.to_be_bytes();
    nonce[..TS_LEN].copy_from_slice(&ts[8 - TS_LEN..]);
    rng.fill_bytes(&mut nonce[TS_LEN..]);
    nonce
}

/// Bytes of the nonce that carry the timestamp.
const TS_LEN: usize = 6;

/// Seals `plaintext`: `version | nonce(48-bit ts_ms BE, 6 random bytes) | ciphertext | tag`.
///
/// # Panics
///
/// Only if `plaintext` exceeds ChaCha20-Poly1305's limit (~256 GiB).
pub fn seal<R: RngCore + ?Sized>(
    key: &SealKey,
    plaintext: &[u8],
    now_ms: u64,
    rng: &mut R,
) -> Vec<u8> {
    let nonce = make_nonce(now_ms, rng);
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.push(SEAL_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let (header, body) = out.split_at_mut(HEADER_LEN);
    let tag = key
        .0
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&*header),
            body,
        )
        .expect("gossip plaintexts are far below the AEAD length limit");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Verifies and decrypts a sealed datagram, checking its timestamp against `now_ms`.
///
/// Replays are *not* checked here: feed [`Opened::nonce`] to a [`ReplayWindow`].
pub fn open(key: &SealKey, datagram: &[u8], now_ms: u64) -> Result<Opened, OpenError> {
    if datagram.len() < SEAL_OVERHEAD {
        return Err(OpenError::Malformed);
    }
    let (header, sealed) = datagram
        .split_at_checked(HEADER_LEN)
        .ok_or(OpenError::Malformed)?;
    let (version, nonce_bytes) = header.split_first().ok_or(OpenError::Malformed)?;
    if *version != SEAL_VERSION {
        return Err(OpenError::Malformed);
    }
    let nonce: [u8; NONCE_LEN] = nonce_bytes.try_into().map_err(|_| OpenError::Malformed)?;
    let mut buf = sealed.to_vec();
    let plaintext_len = key
        .0
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header),
            &mut buf,
        )
        .map_err(|_| OpenError::BadSeal)?
        .len();
    buf.truncate(plaintext_len);
    let timestamp_ms = nonce_timestamp_ms(&nonce);
    if timestamp_ms.abs_diff(now_ms) > MAX_CLOCK_SKEW_MS {
        return Err(OpenError::Stale);
    }
    Ok(Opened {
        nonce,
        timestamp_ms,
        plaintext: buf,
    })
}

fn nonce_timestamp_ms(nonce: &[u8; NONCE_LEN]) -> u64 {
    let mut ts = [0u8; 8];
    ts[8 - TS_LEN..].copy_from_slice(&nonce[..TS_LEN]);
    u64::from_be_bytes(ts)
}

/// Current unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------
// Replay window
// ---------------------------------------------------------------------------

/// Remembers the nonces accepted in the last `window_ms`, up to `capacity`
/// (oldest evicted first). Time is passed in, so it is testable without clocks.
#[derive(Debug)]
pub struct ReplayWindow {
    seen: HashSet<[u8; NONCE_LEN]>,
    order: VecDeque<(u64, [u8; NONCE_LEN])>,
    window_ms: u64,
    capacity: usize,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow::new(REPLAY_WINDOW_MS, REPLAY_WINDOW_CAPACITY)
    }
}

impl ReplayWindow {
    /// A window remembering nonces for `window_ms`, at most `capacity` of them.
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        ReplayWindow {
            seen: HashSet::new(),
            order: VecDeque::new(),
            window_ms,
            capacity: capacity.max(1),
        }
    }

    /// Records `nonce` as seen at `now_ms`. Returns `false` if it was already
    /// seen within the window (a replay), `true` if it is new.
    pub fn check_and_insert(&mut self, nonce: [u8; NONCE_LEN], now_ms: u64) -> bool {
        self.evict_expired(now_ms);
        if self.seen.contains(&nonce) {
            return false;
        }
        while self.order.len() >= self.capacity {
            self.pop_oldest();
        }
        self.seen.insert(nonce);
        self.order.push_back((now_ms, nonce));
        true
    }

    /// Number of nonces currently remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn evict_expired(&mut self, now_ms: u64) {
        while let Some(&(seen_at, _)) = self.order.front() {
            if seen_at.saturating_add(self.window_ms) >= now_ms {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, nonce)) = self.order.pop_front() {
            self.seen.remove(&nonce);
        }
    }
}

// ---------------------------------------------------------------------------
// Route
// ---------------------------------------------------------------------------

/// Who sealed a datagram and for whom, sealed inside it. The receiver
/// answers the sealed sender, not the datagram's source, and drops what was
/// sealed for another node: a captured datagram replayed from a forged
/// address to any node gets no reply at the forged address (no reflection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The sender's advertised gossip address.
    pub from: SocketAddr,
    /// The address the sender sent to.
    pub to: SocketAddr,
}

impl Route {
    fn encode(&self, out: &mut Vec<u8>) {
        for addr in [self.from, self.to] {
            let ip = match addr.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&addr.port().to_be_bytes());
        }
    }

    fn decode(bytes: &[u8; ROUTE_LEN]) -> Route {
        let addr = |b: &[u8]| {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[..16]);
            let ip = Ipv6Addr::from(ip);
            let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
            SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
        };
        Route {
            from: addr(&bytes[..ADDR_LEN]),
            to: addr(&bytes[ADDR_LEN..]),
        }
    }
}

/// Splits a sealed plaintext into its route and fragment.
pub fn parse_routed(plaintext: &[u8]) -> Option<(Route, Fragment<'_>)> {
    let (route, rest) = plaintext.split_first_chunk::<ROUTE_LEN>()?;
    Some((Route::decode(route), parse_fragment(rest)?))
}

// ---------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------

/// One fragment of a message, as carried in a sealed plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment<'a> {
    /// Random id shared by all fragments of a message.
    pub message_id: u64,
    /// Position of this fragment, `< count`.
    pub index: u8,
    /// Number of fragments of the message, `>= 1`.
    pub count: u8,
    /// This fragment's share of the message bytes.
    pub payload: &'a [u8],
}

impl Fragment<'_> {
    /// Encodes `header | payload`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAGMENT_HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.push(self.index);
        out.push(self.count);
        out.extend_from_slice(self.payload);
        out
    }
}

/// Parses a sealed plaintext into a fragment; `None` if it is too short or
/// its index/count are inconsistent.
pub fn parse_fragment(plaintext: &[u8]) -> Option<Fragment<'_>> {
    let (id_bytes, rest) = plaintext.split_first_chunk::<8>()?;
    let (&[index, count], payload) = rest.split_first_chunk::<2>()?;
    if count == 0 || index >= count {
        return None;
    }
    Some(Fragment {
        message_id: u64::from_be_bytes(*id_bytes),
        index,
        count,
        payload,
    })
}

/// Splits `message` into fragments that each seal to at most
/// `max_datagram_len` bytes, and seals them. Returns `None` if that would
/// take more than 255 fragments.
pub fn seal_message<R: RngCore + ?Sized>(
    key: &SealKey,
    message: &[u8],
    route: Route,
    max_datagram_len: usize,
    now_ms: u64,
    rng: &mut R,
) -> Option<Vec<Vec<u8>>> {
    let max_payload = max_datagram_len
        .saturating_sub(SEAL_OVERHEAD + ROUTE_LEN + FRAGMENT_HEADER_LEN)
        .max(1);
    let count = u8::try_from(message.len().div_ceil(max_payload).max(1)).ok()?;
    let message_id = rng.next_u64();
    let mut chunks: Vec<&[u8]> = message.chunks(max_payload).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let datagrams = chunks
        .into_iter()
        .zip(0u8..)
        .map(|(payload, index)| {
            let fragment = Fragment {
                message_id,
                index,
                count,
                payload,
            }
            .encode();
            let mut plaintext = Vec::with_capacity(ROUTE_LEN + fragment.len());
            route.encode(&mut plaintext);
            plaintext.extend_from_slice(&fragment);
            seal(key, &plaintext, now_ms, rng)
        })
        .collect();
    Some(datagrams)
}

/// Why a fragment could not be reassembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    /// Fragments of one message disagree on the fragment count.
    #[error("fragments disagree on their count")]
    Inconsistent,
    /// The reassembled message would exceed the maximum UDP payload.
    #[error("reassembled message too large")]
    TooLarge,
}

struct Partial {
    started: Instant,
    count: u8,
    parts: Vec<Option<Vec<u8>>>,
    missing: usize,
    bytes: usize,
}

/// Reassembles fragmented messages keyed by (source address, message id).
/// Time is passed in, so it is testable without clocks.
pub struct Reassembler {
    in_progress: HashMap<(SocketAddr, u64), Partial>,
    max_in_progress: usize,
    timeout: Duration,
    max_message_len: usize,
}

impl fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reassembler")
            .field("in_progress", &self.in_progress.len())
            .finish()
    }
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(MAX_REASSEMBLIES, REASSEMBLY_TIMEOUT, MAX_UDP_PAYLOAD_LEN)
    }
}

impl Reassembler {
    /// A reassembler keeping at most `max_in_progress` incomplete messages for
    /// at most `timeout`, and producing messages of at most `max_message_len` bytes.
    pub fn new(max_in_progress: usize, timeout: Duration, max_message_len: usize) -> Self {
        Reassembler {
            in_progress: HashMap::new(),
            max_in_progress: max_in_progress.max(1),
            timeout,
            max_message_len,
        }
    }

    /// Number of incomplete messages currently held.
    pub fn in_progress(&self) -> usize {
        self.in_progress.len()
    }

    /// Adds a fragment received from `from` at `now`. Returns the whole
    /// message once its last fragment arrives.
    pub fn push(
        &mut self,
        from: SocketAddr,
        fragment: Fragment<'_>,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, ReassemblyError> {
        if fragment.payload.len() > self.max_message_len {
            return Err(ReassemblyError::TooLarge);
        }
        if fragment.count <= 1 {
            return Ok(Some(fragment.payload.to_vec()));
        }
        let timeout = self.timeout;
        self.in_progress
            .retain(|_, partial| now.saturating_duration_since(partial.started) <= timeout);
        let key = (from, fragment.message_id);
        if !self.in_progress.contains_key(&key) {
            while self.in_progress.len() >= self.max_in_progress {
                let oldest = self
                    .in_progress
                    .iter()
                    .min_by_key(|(_, partial)| partial.started)
                    .map(|(key, _)| *key);
                match oldest {
                    Some(oldest) => {
                        self.in_progress.remove(&oldest);
                    }
                    None => break,
                }
            }
            let count = usize::from(fragment.count);
            self.in_progress.insert(
                key,
                Partial {
                    started: now,
                    count: fragment.count,
                    parts: vec![None; count],
                    missing: count,
                    bytes: 0,
                },
            );
        }
        let Some(partial) = self.in_progress.get_mut(&key) else {
            return Ok(None);
        };
        if partial.count != fragment.count {
            self.in_progress.remove(&key);
            return Err(ReassemblyError::Inconsistent);
        }
        let Some(slot) = partial.parts.get_mut(usize::from(fragment.index)) else {
            self.in_progress.remove(&key);
            return Err(ReassemblyError::Inconsistent);
        };
        if slot.is_some() {
            // Duplicate fragment: keep the first copy.
            return Ok(None);
        }
        let bytes = partial.bytes.saturating_add(fragment.payload.len());
        if bytes > self.max_message_len {
            self.in_progress.remove(&key);
            return Err(ReassemblyError::TooLarge);
        }
        *slot = Some(fragment.payload.to_vec());
        partial.bytes = bytes;
        partial.missing = partial.missing.saturating_sub(1);
        if partial.missing > 0 {
            return Ok(None);
        }
        let Some(partial) = self.in_progress.remove(&key) else {
            return Ok(None);
        };
        let mut message = Vec::with_capacity(partial.bytes);
        for part in partial.parts.into_iter().flatten() {
            message.extend_from_slice(&part);
        }
        Ok(Some(message))
    }
}

// ---------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------

/// Counters of the sealed transport. Shared by every socket a
/// [`SealedTransport`] opens.
#[derive(Debug, Default)]
pub struct SealStats {
    /// Datagrams failing authentication (wrong key, tampered, forged).
    pub rejected_bad_seal: AtomicU64,
    /// Authentic datagrams whose timestamp is too far from local time.
    pub rejected_stale: AtomicU64,
    /// Authentic datagrams whose nonce was already seen.
    pub rejected_replay: AtomicU64,
    /// Too short, bad version, bad fragment header or inconsistent fragments.
    pub rejected_malformed: AtomicU64,
    /// Authentic datagrams sealed for another node's address.
    pub rejected_recipient: AtomicU64,
    /// Authentic messages chitchat could not decode.
    pub decode_failures: AtomicU64,
    /// Messages that could not be sent (encoding failure, oversized, socket error).
    pub send_failures: AtomicU64,
    /// Times the reader task was restarted (panic or codec socket failure).
    pub reader_restarts: AtomicU64,
    /// Sealed datagrams sent.
    pub datagrams_sent: AtomicU64,
    /// Messages that had to be split into several datagrams.
    pub fragmented_messages: AtomicU64,
    /// Messages verified, decoded and handed to chitchat.
    pub messages_received: AtomicU64,
    /// Bytes of sealed datagrams sent (UDP payload).
    pub bytes_sent: AtomicU64,
    /// Bytes of datagrams received on the gossip socket, accepted or not.
    pub bytes_received: AtomicU64,
}

impl SealStats {
    /// Rejections by reason, as `(reason, count)` with reasons `bad_seal`,
    /// `stale`, `replay`, `malformed`, `wrong_recipient` (the
    /// `weft_gossip_rejected_total{reason}` label).
    pub fn rejected_by_reason(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("bad_seal", self.rejected_bad_seal.load(Ordering::Relaxed)),
            ("stale", self.rejected_stale.load(Ordering::Relaxed)),
            ("replay", self.rejected_replay.load(Ordering::Relaxed)),
            ("malformed", self.rejected_malformed.load(Ordering::Relaxed)),
            (
                "wrong_recipient",
                self.rejected_recipient.load(Ordering::Relaxed),
            ),
        ]
    }

    /// Sum of all rejections.
    pub fn rejected_total(&self) -> u64 {
        self.rejected_by_reason().iter().map(|(_, n)| n).sum()
    }

    fn count_open_error(&self, err: OpenError) {
        let counter = match err {
            OpenError::Malformed => &self.rejected_malformed,
            OpenError::BadSeal => &self.rejected_bad_seal,
            OpenError::Stale => &self.rejected_stale,
        };
        bump(counter);
    }
}

fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed).saturating_add(1)
}

/// Rate limits warnings by kind.
#[derive(Default)]
struct WarnLimiter {
    last: HashMap<&'static str, Instant>,
}

impl WarnLimiter {
    fn allow(&mut self, kind: &'static str) -> bool {
        let now = Instant::now();
        match self.last.get(kind) {
            Some(last) if now.saturating_duration_since(*last) < WARN_INTERVAL => false,
            _ => {
                self.last.insert(kind, now);
                true
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------

/// A chitchat [`Transport`] sealing every datagram with a cluster key.
#[derive(Clone)]
pub struct SealedTransport {
    key: Arc<SealKey>,
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
    /// A transport sealing with the 32-byte cluster `key`.
    pub fn new(key: [u8; 32]) -> Self {
        SealedTransport {
            key: Arc::new(SealKey::new(&key)),
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
        let encoder = Encoder::open()
            .await
            .context("failed to open the gossip send codec")?;
        let me = self.advertised.unwrap_or(local_addr);
        let shared = Arc::new(ReaderShared {
            outer: Arc::new(outer),
            key: self.key.clone(),
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
            key: self.key.clone(),
            stats: self.stats.clone(),
            max_datagram_len: self.max_datagram_len,
            encoder,
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

fn loopback_any() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Encodes envelopes to bytes via a chitchat `UdpSocket` and a loopback tap.
struct Encoder {
    codec_tx: ChitchatUdpSocket,
    codec_tx_addr: SocketAddr,
    tap: TokioUdpSocket,
    tap_addr: SocketAddr,
    buf: Vec<u8>,
}

impl Encoder {
    async fn open() -> anyhow::Result<Encoder> {
        let codec_tx = ChitchatUdpSocket::open(loopback_any()).await?;
        let codec_tx_addr = codec_tx.local_addr()?;
        let tap = TokioUdpSocket::bind(loopback_any()).await?;
        let tap_addr = tap.local_addr()?;
        Ok(Encoder {
            codec_tx,
            codec_tx_addr,
            tap,
            tap_addr,
            buf: vec![0u8; RECV_BUF_LEN],
        })
    }

    /// Encodes `envelope`; the bytes are `self.buf[..len]`.
    async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<usize> {
        // Drop anything left over from an interrupted earlier encode.
        while self.tap.try_recv_from(&mut self.buf).is_ok() {}
        self.codec_tx
            .send(self.tap_addr, envelope)
            .await
            .context("chitchat could not encode the message")?;
        let deadline = tokio::time::Instant::now() + CODEC_TIMEOUT;
        loop {
            let (len, from) = tokio::time::timeout_at(deadline, self.tap.recv_from(&mut self.buf))
                .await
                .context("timed out reading the encoded message back")?
                .context("failed to read the encoded message back")?;
            if from == self.codec_tx_addr {
                return Ok(len);
            }
            debug!(%from, "discarding foreign datagram on the gossip encode tap");
        }
    }
}

/// State shared by the socket and its reader task(s); survives reader restarts.
struct ReaderShared {
    outer: Arc<TokioUdpSocket>,
    key: Arc<SealKey>,
    stats: Arc<SealStats>,
    replay: Mutex<ReplayWindow>,
    /// This node's addresses a datagram may be sealed for: the advertised
    /// one and the socket's own.
    addresses: [SocketAddr; 2],
}

struct SealedSocket {
    outer: Arc<TokioUdpSocket>,
    local_addr: SocketAddr,
    /// The sender address sealed into every datagram.
    me: SocketAddr,
    key: Arc<SealKey>,
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

    async fn reset_encoder(&mut self) {
        match Encoder::open().await {
            Ok(encoder) => self.encoder = encoder,
            Err(err) => warn!(error = %err, "failed to reset the gossip send codec"),
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
        let len = match self.encoder.encode(envelope).await {
            Ok(len) => len,
            Err(err) => {
                let timed_out = err.is::<tokio::time::error::Elapsed>();
                self.send_failed(to, "encode", &format_args!("{err:#}"));
                if timed_out {
                    self.reset_encoder().await;
                }
                return Ok(FAILED);
            }
        };
        let Some(plaintext) = self.encoder.buf.get(..len) else {
            self.send_failed(to, "encode", &"encoded length out of range");
            return Ok(FAILED);
        };
        let route = Route { from: self.me, to };
        let datagrams = seal_message(
            &self.key,
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

// ---------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------

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
    /// The loopback codec sockets could not be created: retry later.
    Codec(anyhow::Error),
}

async fn supervise_reader(
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
            Ok(ReaderExit::Codec(err)) => {
                let restarts = bump(&shared.stats.reader_restarts);
                warn!(error = %format!("{err:#}"), restarts, "gossip decode codec unavailable, retrying");
                tokio::time::sleep(CODEC_RETRY_BACKOFF).await;
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
                    "sealed gossip reader panicked; restarting with fresh codec sockets");
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
    let mut decoder = match Decoder::open().await {
        Ok(decoder) => decoder,
        Err(err) => return ReaderExit::Codec(err),
    };
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
        let (decoded, reset) = decoder.decode(&message).await;
        if reset {
            decoder = match Decoder::open().await {
                Ok(decoder) => decoder,
                Err(err) => return ReaderExit::Codec(err),
            };
        }
        let Some(outcome) = decoded else {
            let total = bump(&shared.stats.decode_failures);
            if warn_limiter.allow("decode") {
                warn!(%from, len = message.len(), decode_failures = total,
                    "authentic gossip message could not be decoded by chitchat");
            }
            continue;
        };
        bump(&shared.stats.messages_received);
        // Answers go to the sealed sender, never to an unauthenticated source.
        let outcome = RecvOutcome {
            from_addr: sender,
            envelope: outcome.envelope,
            num_bytes_received: outcome.num_bytes_received,
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
    let opened = match open(&shared.key, datagram, now_ms) {
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

/// Decodes bytes to envelopes via a chitchat `UdpSocket` (`codec_rx`), fed by
/// `replayer`, with a `fence` envelope marking the end of each attempt.
struct Decoder {
    replayer: TokioUdpSocket,
    replayer_addr: SocketAddr,
    fence: ChitchatUdpSocket,
    fence_addr: SocketAddr,
    codec_rx: ChitchatUdpSocket,
    codec_rx_addr: SocketAddr,
}

fn fence_envelope() -> ChitchatEnvelope {
    ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::BadCluster,
    }
}

impl Decoder {
    async fn open() -> anyhow::Result<Decoder> {
        let replayer = TokioUdpSocket::bind(loopback_any()).await?;
        let replayer_addr = replayer.local_addr()?;
        let fence = ChitchatUdpSocket::open(loopback_any()).await?;
        let fence_addr = fence.local_addr()?;
        let codec_rx = ChitchatUdpSocket::open(loopback_any()).await?;
        let codec_rx_addr = codec_rx.local_addr()?;
        Ok(Decoder {
            replayer,
            replayer_addr,
            fence,
            fence_addr,
            codec_rx,
            codec_rx_addr,
        })
    }

    /// Returns the decoded message (if it decoded) and whether the codec
    /// sockets must be replaced (their queue may hold leftovers).
    async fn decode(&mut self, message: &[u8]) -> (Option<RecvOutcome>, bool) {
        if let Err(err) = self.replayer.send_to(message, self.codec_rx_addr).await {
            debug!(error = %err, "failed to replay gossip message to the codec");
            return (None, true);
        }
        if let Err(err) = self.fence.send(self.codec_rx_addr, fence_envelope()).await {
            debug!(error = %err, "failed to send the codec fence");
            return (None, true);
        }
        let deadline = tokio::time::Instant::now() + CODEC_TIMEOUT;
        let mut decoded = None;
        loop {
            match tokio::time::timeout_at(deadline, self.codec_rx.recv()).await {
                Err(_elapsed) => return (decoded, true),
                Ok(Err(err)) => {
                    debug!(error = %err, "gossip decode codec failed");
                    return (decoded, true);
                }
                Ok(Ok(outcome)) if outcome.from_addr == self.fence_addr => {
                    // Fence before the message means it did not decode; a
                    // late (reordered) message could then be mistaken for
                    // the next one, so start over with fresh sockets.
                    let reset = decoded.is_none();
                    return (decoded, reset);
                }
                Ok(Ok(outcome)) if outcome.from_addr == self.replayer_addr && decoded.is_none() => {
                    decoded = Some(outcome);
                }
                Ok(Ok(outcome)) => {
                    debug!(from = %outcome.from_addr, "discarding foreign datagram on the gossip decode codec");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use std::future::Future;

    use chitchat::{
        spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    };
    use proptest::prelude::*;
    use rand::{Rng, RngCore};

    use super::*;

    const KEY: [u8; 32] = [7u8; 32];
    const NOW: u64 = 1_700_000_000_000;

    fn key() -> SealKey {
        SealKey::new(&KEY)
    }

    const ROUTE: Route = Route {
        from: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1),
        to: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 2),
    };

    fn rng() -> StdRng {
        StdRng::seed_from_u64(42)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    // ---- pure helpers ---------------------------------------------------

    #[test]
    fn seal_open_round_trip() {
        let sealed = seal(&key(), b"hello gossip", NOW, &mut rng());
        assert_eq!(sealed.len(), SEAL_OVERHEAD + 12);
        assert_eq!(sealed[0], SEAL_VERSION);
        assert_eq!(&sealed[1..7], &NOW.to_be_bytes()[2..]);
        let opened = open(&key(), &sealed, NOW + 5).unwrap();
        assert_eq!(opened.plaintext, b"hello gossip");
        assert_eq!(opened.timestamp_ms, NOW);
        assert_eq!(&opened.nonce[..], &sealed[1..13]);
        // Empty plaintexts work too.
        let sealed = seal(&key(), b"", NOW, &mut rng());
        assert_eq!(open(&key(), &sealed, NOW).unwrap().plaintext, b"");
    }

    #[test]
    fn every_tampered_byte_is_rejected() {
        let sealed = seal(&key(), b"some chitchat bytes", NOW, &mut rng());
        for i in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            let err = open(&key(), &tampered, NOW).unwrap_err();
            if i == 0 {
                assert_eq!(err, OpenError::Malformed);
            } else {
                // Includes the timestamp bytes: the header is authenticated.
                assert_eq!(err, OpenError::BadSeal, "byte {i}");
            }
        }
    }

    #[test]
    fn wrong_key_is_rejected() {
        let sealed = seal(&key(), b"secret", NOW, &mut rng());
        let other = SealKey::new(&[8u8; 32]);
        assert_eq!(open(&other, &sealed, NOW), Err(OpenError::BadSeal));
    }

    #[test]
    fn stale_timestamps_are_rejected() {
        let sealed = seal(&key(), b"x", NOW, &mut rng());
        assert!(open(&key(), &sealed, NOW + MAX_CLOCK_SKEW_MS).is_ok());
        assert!(open(&key(), &sealed, NOW - MAX_CLOCK_SKEW_MS).is_ok());
        assert_eq!(
            open(&key(), &sealed, NOW + MAX_CLOCK_SKEW_MS + 1),
            Err(OpenError::Stale)
        );
        assert_eq!(
            open(&key(), &sealed, NOW - MAX_CLOCK_SKEW_MS - 1),
            Err(OpenError::Stale)
        );
        assert_eq!(open(&key(), &sealed, 0), Err(OpenError::Stale));
        assert_eq!(open(&key(), &sealed, u64::MAX), Err(OpenError::Stale));
    }

    #[test]
    fn truncated_and_bad_version_are_malformed() {
        let sealed = seal(&key(), b"abc", NOW, &mut rng());
        for len in 0..SEAL_OVERHEAD {
            assert_eq!(open(&key(), &sealed[..len], NOW), Err(OpenError::Malformed));
        }
        // Long enough but cut: authentication fails.
        assert_eq!(
            open(&key(), &sealed[..sealed.len() - 1], NOW),
            Err(OpenError::BadSeal)
        );
        let mut bad_version = sealed.clone();
        bad_version[0] = 2;
        assert_eq!(open(&key(), &bad_version, NOW), Err(OpenError::Malformed));
    }

    #[test]
    fn replayed_nonce_is_rejected() {
        let sealed = seal(&key(), b"syn", NOW, &mut rng());
        let mut window = ReplayWindow::default();
        let opened = open(&key(), &sealed, NOW).unwrap();
        assert!(window.check_and_insert(opened.nonce, NOW));
        let again = open(&key(), &sealed, NOW + 1_000).unwrap();
        assert!(!window.check_and_insert(again.nonce, NOW + 1_000));
        // Still remembered at the edge of the window, when the timestamp
        // could still pass the skew check (sender 30 s ahead).
        assert!(!window.check_and_insert(again.nonce, NOW + REPLAY_WINDOW_MS));
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn replay_window_expires_and_is_bounded() {
        let mut window = ReplayWindow::new(1_000, 3);
        let n = |i: u8| [i; NONCE_LEN];
        assert!(window.check_and_insert(n(1), 0));
        assert!(window.check_and_insert(n(2), 500));
        assert!(!window.check_and_insert(n(1), 1_000));
        // n(1) expires after 1 s.
        assert!(window.check_and_insert(n(1), 1_001));
        assert!(!window.check_and_insert(n(2), 1_001));
        // Capacity 3: the oldest is evicted.
        assert!(window.check_and_insert(n(3), 1_002));
        assert!(window.check_and_insert(n(4), 1_003));
        assert_eq!(window.len(), 3);
        assert!(window.check_and_insert(n(2), 1_004));
        assert!(!window.check_and_insert(n(4), 1_004));
        assert!(window.len() <= 3);
    }

    #[test]
    fn default_replay_window_is_bounded() {
        let mut window = ReplayWindow::default();
        for i in 0..(REPLAY_WINDOW_CAPACITY as u64 + 10) {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..8].copy_from_slice(&i.to_be_bytes());
            assert!(window.check_and_insert(nonce, NOW));
        }
        assert_eq!(window.len(), REPLAY_WINDOW_CAPACITY);
    }

    #[test]
    fn fragment_header_round_trip_and_validation() {
        let fragment = Fragment {
            message_id: 0xdead_beef,
            index: 1,
            count: 3,
            payload: b"abc",
        };
        let encoded = fragment.encode();
        assert_eq!(encoded.len(), FRAGMENT_HEADER_LEN + 3);
        assert_eq!(parse_fragment(&encoded), Some(fragment));
        for len in 0..FRAGMENT_HEADER_LEN {
            assert_eq!(parse_fragment(&encoded[..len]), None);
        }
        let bad_count = Fragment {
            count: 0,
            index: 0,
            ..fragment
        }
        .encode();
        assert_eq!(parse_fragment(&bad_count), None);
        let bad_index = Fragment {
            count: 2,
            index: 2,
            ..fragment
        }
        .encode();
        assert_eq!(parse_fragment(&bad_index), None);
    }

    fn open_all(datagrams: &[Vec<u8>], from: SocketAddr) -> Option<Vec<u8>> {
        let mut reassembler = Reassembler::default();
        let mut out = None;
        for datagram in datagrams {
            let opened = open(&key(), datagram, NOW).unwrap();
            let (_, fragment) = parse_routed(&opened.plaintext).unwrap();
            if let Some(message) = reassembler.push(from, fragment, Instant::now()).unwrap() {
                assert!(out.is_none());
                out = Some(message);
            }
        }
        assert_eq!(reassembler.in_progress(), 0);
        out
    }

    #[test]
    fn seal_message_fragments_only_when_needed() {
        let mut rng = rng();
        let small = vec![1u8; 1_000];
        let datagrams = seal_message(
            &key(),
            &small,
            ROUTE,
            DEFAULT_MAX_DATAGRAM_LEN,
            NOW,
            &mut rng,
        )
        .unwrap();
        assert_eq!(datagrams.len(), 1);
        assert_eq!(open_all(&datagrams, addr(1)).unwrap(), small);

        let largest: Vec<u8> = (0..MAX_UDP_PAYLOAD_LEN).map(|i| (i % 251) as u8).collect();
        let datagrams = seal_message(
            &key(),
            &largest,
            ROUTE,
            DEFAULT_MAX_DATAGRAM_LEN,
            NOW,
            &mut rng,
        )
        .unwrap();
        assert_eq!(datagrams.len(), 2);
        assert!(datagrams
            .iter()
            .all(|d| d.len() <= DEFAULT_MAX_DATAGRAM_LEN));
        assert_eq!(open_all(&datagrams, addr(1)).unwrap(), largest);

        // Exactly at the limit: one datagram.
        let exact =
            vec![0u8; DEFAULT_MAX_DATAGRAM_LEN - SEAL_OVERHEAD - ROUTE_LEN - FRAGMENT_HEADER_LEN];
        let datagrams = seal_message(
            &key(),
            &exact,
            ROUTE,
            DEFAULT_MAX_DATAGRAM_LEN,
            NOW,
            &mut rng,
        )
        .unwrap();
        assert_eq!(datagrams.len(), 1);
        assert_eq!(datagrams[0].len(), DEFAULT_MAX_DATAGRAM_LEN);

        let datagrams =
            seal_message(&key(), &largest, ROUTE, MIN_MAX_DATAGRAM_LEN, NOW, &mut rng).unwrap();
        assert!(datagrams.len() <= 255);
        assert!(datagrams.iter().all(|d| d.len() <= MIN_MAX_DATAGRAM_LEN));
        assert_eq!(open_all(&datagrams, addr(1)).unwrap(), largest);

        let empty =
            seal_message(&key(), &[], ROUTE, DEFAULT_MAX_DATAGRAM_LEN, NOW, &mut rng).unwrap();
        assert_eq!(empty.len(), 1);
        assert_eq!(open_all(&empty, addr(1)).unwrap(), Vec::<u8>::new());

        // More than 255 fragments: refused.
        assert!(seal_message(&key(), &vec![0u8; 300 * 100], ROUTE, 100, NOW, &mut rng).is_none());
    }

    fn fragments_of(message: &[u8], max_payload: usize) -> Vec<(u8, u8, Vec<u8>)> {
        let chunks: Vec<&[u8]> = message.chunks(max_payload).collect();
        let count = chunks.len() as u8;
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| (i as u8, count, c.to_vec()))
            .collect()
    }

    #[test]
    fn reassembler_handles_order_duplicates_and_sources() {
        let t0 = Instant::now();
        let message: Vec<u8> = (0..100u8).collect();
        let frags = fragments_of(&message, 30);
        assert_eq!(frags.len(), 4);
        let mut r = Reassembler::default();
        let frag = |i: usize| Fragment {
            message_id: 9,
            index: frags[i].0,
            count: frags[i].1,
            payload: &frags[i].2,
        };
        // Out of order, with a duplicate, and another source interleaved.
        assert_eq!(r.push(addr(1), frag(3), t0), Ok(None));
        assert_eq!(r.push(addr(2), frag(0), t0), Ok(None));
        assert_eq!(r.push(addr(1), frag(1), t0), Ok(None));
        assert_eq!(r.push(addr(1), frag(1), t0), Ok(None));
        assert_eq!(r.push(addr(1), frag(0), t0), Ok(None));
        assert_eq!(r.push(addr(1), frag(2), t0), Ok(Some(message.clone())));
        assert_eq!(r.in_progress(), 1); // addr(2)'s partial message
                                        // Inconsistent count.
        let wrong = Fragment {
            count: 5,
            ..frag(1)
        };
        assert_eq!(
            r.push(addr(2), wrong, t0),
            Err(ReassemblyError::Inconsistent)
        );
        assert_eq!(r.in_progress(), 0);
    }

    #[test]
    fn reassembler_expires_and_is_bounded() {
        let t0 = Instant::now();
        let mut r = Reassembler::default();
        let frag = |id: u64| Fragment {
            message_id: id,
            index: 0,
            count: 2,
            payload: b"x",
        };
        for id in 0..(MAX_REASSEMBLIES as u64 * 2) {
            assert_eq!(
                r.push(addr(1), frag(id), t0 + Duration::from_millis(id)),
                Ok(None)
            );
            assert!(r.in_progress() <= MAX_REASSEMBLIES);
        }
        assert_eq!(r.in_progress(), MAX_REASSEMBLIES);
        // The oldest were evicted: completing id 0 starts a new partial.
        let second = Fragment {
            index: 1,
            ..frag(0)
        };
        assert_eq!(
            r.push(addr(1), second, t0 + Duration::from_millis(200)),
            Ok(None)
        );
        // The newest completes.
        let newest = MAX_REASSEMBLIES as u64 * 2 - 1;
        let second = Fragment {
            index: 1,
            ..frag(newest)
        };
        assert_eq!(
            r.push(addr(1), second, t0 + Duration::from_millis(200)),
            Ok(Some(b"xx".to_vec()))
        );
        // After the timeout everything incomplete is gone.
        let later = t0 + Duration::from_millis(200) + REASSEMBLY_TIMEOUT + Duration::from_millis(1);
        let _ = r.push(addr(9), frag(1), later);
        assert_eq!(r.in_progress(), 1);
        // A message larger than the maximum is refused.
        let mut small = Reassembler::new(4, REASSEMBLY_TIMEOUT, 3);
        assert_eq!(
            small.push(
                addr(1),
                Fragment {
                    payload: b"ab",
                    ..frag(5)
                },
                t0
            ),
            Ok(None)
        );
        assert_eq!(
            small.push(
                addr(1),
                Fragment {
                    index: 1,
                    payload: b"cd",
                    ..frag(5)
                },
                t0
            ),
            Err(ReassemblyError::TooLarge)
        );
    }

    #[test]
    fn stats_by_reason() {
        let stats = SealStats::default();
        stats.count_open_error(OpenError::BadSeal);
        stats.count_open_error(OpenError::BadSeal);
        stats.count_open_error(OpenError::Stale);
        bump(&stats.rejected_replay);
        stats.count_open_error(OpenError::Malformed);
        assert_eq!(
            stats.rejected_by_reason(),
            vec![
                ("bad_seal", 2),
                ("stale", 1),
                ("replay", 1),
                ("malformed", 1),
                ("wrong_recipient", 0)
            ]
        );
        assert_eq!(stats.rejected_total(), 5);
    }

    #[test]
    fn base64_keys() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(KEY);
        assert_eq!(decode_key_base64(&format!(" {encoded}\n")).unwrap(), KEY);
        assert!(matches!(
            decode_key_base64("AAAA"),
            Err(KeyError::Length(3))
        ));
        assert!(matches!(decode_key_base64("!!"), Err(KeyError::Base64(_))));
    }

    proptest! {
        #[test]
        fn open_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let result = open(&key(), &bytes, NOW);
            if bytes.len() < SEAL_OVERHEAD || bytes.first() != Some(&SEAL_VERSION) {
                prop_assert_eq!(result, Err(OpenError::Malformed));
            } else {
                prop_assert_eq!(result, Err(OpenError::BadSeal));
            }
            let _ = parse_fragment(&bytes);
        }

        #[test]
        fn open_never_panics_on_mutated_datagrams(
            plaintext in proptest::collection::vec(any::<u8>(), 0..100),
            cut in 0usize..200,
            flip in 0usize..200,
        ) {
            let sealed = seal(&key(), &plaintext, NOW, &mut rng());
            let mut mutated = sealed[..cut.min(sealed.len())].to_vec();
            if let Some(b) = mutated.get_mut(flip) {
                *b ^= 0x80;
            }
            if mutated != sealed {
                prop_assert!(open(&key(), &mutated, NOW).is_err());
            }
        }

        #[test]
        fn reassembler_never_panics(
            frags in proptest::collection::vec((any::<u8>(), 0u8..4, 0u8..4, proptest::collection::vec(any::<u8>(), 0..20)), 0..50)
        ) {
            let mut r = Reassembler::new(4, REASSEMBLY_TIMEOUT, 64);
            let now = Instant::now();
            for (id, index, count, payload) in &frags {
                let plaintext = Fragment { message_id: u64::from(*id % 3), index: *index, count: *count, payload }.encode();
                if let Some(fragment) = parse_fragment(&plaintext) {
                    if let Ok(Some(message)) = r.push(addr(1), fragment, now) {
                        prop_assert!(message.len() <= 64);
                    }
                }
                prop_assert!(r.in_progress() <= 4);
            }
        }
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

        // Larger than a UDP datagram: chitchat's codec cannot even emit it.
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
        let encoded = {
            let mut encoder = Encoder::open().await.unwrap();
            let len = encoder.encode(syn("weft".into())).await.unwrap();
            encoder.buf[..len].to_vec()
        };
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
        let encoded = {
            let mut encoder = Encoder::open().await.unwrap();
            let len = encoder.encode(syn("weft".into())).await.unwrap();
            encoder.buf[..len].to_vec()
        };
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
        while (stats.rejected_total() < 4 || stats.decode_failures.load(Ordering::Relaxed) < 1)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            stats.rejected_by_reason(),
            vec![
                ("bad_seal", 1),
                ("stale", 1),
                ("replay", 1),
                ("malformed", 1),
                ("wrong_recipient", 0)
            ]
        );
        assert_eq!(stats.decode_failures.load(Ordering::Relaxed), 1);
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

    // ---- end to end with chitchat --------------------------------------

    const GOSSIP_INTERVAL: Duration = Duration::from_millis(100);
    const CLUSTER: &str = "weft-seal-test";

    fn free_addr() -> SocketAddr {
        let socket = std::net::UdpSocket::bind(loopback_any()).unwrap();
        socket.local_addr().unwrap()
    }

    struct Node {
        handle: ChitchatHandle,
        id: ChitchatId,
        stats: Arc<SealStats>,
    }

    async fn start_node(name: &str, seeds: &[SocketAddr], transport: SealedTransport) -> Node {
        let listen_addr = free_addr();
        let id = ChitchatId::new(name.to_string(), 1, listen_addr);
        let config = ChitchatConfig {
            chitchat_id: id.clone(),
            cluster_id: CLUSTER.to_string(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr,
            seed_nodes: seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                initial_interval: GOSSIP_INTERVAL,
                dead_node_grace_period: Duration::from_secs(15 * 60),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        };
        let stats = transport.stats();
        let handle = spawn_chitchat(config, Vec::new(), &transport)
            .await
            .unwrap();
        Node { handle, id, stats }
    }

    async fn start_cluster(transport: impl Fn() -> SealedTransport) -> Vec<Node> {
        let first = start_node("node-1", &[], transport()).await;
        let seed = first.id.gossip_advertise_addr;
        let second = start_node("node-2", &[seed], transport()).await;
        let third = start_node("node-3", &[seed], transport()).await;
        vec![first, second, third]
    }

    async fn wait_for<F, Fut>(what: &str, within: Duration, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        loop {
            if condition().await {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn value_on(observer: &Node, owner: &ChitchatId, key: &str) -> Option<String> {
        observer
            .handle
            .with_chitchat(|c| {
                c.node_state(owner)
                    .and_then(|s| s.get(key))
                    .map(str::to_string)
            })
            .await
    }

    async fn set(node: &Node, key: &str, value: &str) {
        node.handle
            .with_chitchat(|c| c.self_node_state().set(key, value))
            .await;
    }

    async fn all_see(nodes: &[Node], owner: &ChitchatId, key: &str, value: &str) -> bool {
        for node in nodes {
            if value_on(node, owner, key).await.as_deref() != Some(value) {
                return false;
            }
        }
        true
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cluster_converges_and_foreign_key_never_joins() {
        let nodes = start_cluster(|| SealedTransport::new(KEY)).await;
        set(&nodes[0], "k", "v").await;
        let owner = nodes[0].id.clone();
        wait_for("k=v on every node", Duration::from_secs(20), || {
            all_see(&nodes, &owner, "k", "v")
        })
        .await;
        for node in &nodes {
            assert_eq!(
                node.stats.rejected_total(),
                0,
                "{:?}",
                node.stats.rejected_by_reason()
            );
            assert!(node.stats.messages_received.load(Ordering::Relaxed) > 0);
        }

        let intruder = start_node(
            "intruder",
            &[
                nodes[0].id.gossip_advertise_addr,
                nodes[1].id.gossip_advertise_addr,
            ],
            SealedTransport::new([0x42; 32]),
        )
        .await;
        set(&intruder, "evil", "1").await;
        let first_stats = nodes[0].stats.clone();
        let second_stats = nodes[1].stats.clone();
        wait_for("bad_seal rejections", Duration::from_secs(20), || {
            let done = first_stats.rejected_bad_seal.load(Ordering::Relaxed) >= 10
                && second_stats.rejected_bad_seal.load(Ordering::Relaxed) >= 10;
            async move { done }
        })
        .await;
        // Meanwhile the cluster kept working.
        set(&nodes[2], "k3", "v3").await;
        let owner3 = nodes[2].id.clone();
        wait_for("k3 on every node", Duration::from_secs(20), || {
            all_see(&nodes, &owner3, "k3", "v3")
        })
        .await;
        for node in &nodes {
            let members = node
                .handle
                .with_chitchat(|c| c.node_states().keys().cloned().collect::<Vec<_>>())
                .await;
            assert!(
                !members.contains(&intruder.id),
                "intruder joined {:?}",
                node.id
            );
            assert_eq!(members.len(), 3);
            assert_eq!(value_on(node, &intruder.id, "evil").await, None);
        }
        let intruder_view = intruder
            .handle
            .with_chitchat(|c| c.node_states().len())
            .await;
        assert_eq!(intruder_view, 1, "intruder learnt nothing");
        assert_eq!(intruder.stats.messages_received.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn garbage_flood_is_rejected_and_cluster_still_converges() {
        let nodes = start_cluster(|| SealedTransport::new(KEY)).await;
        set(&nodes[0], "k", "v").await;
        let owner = nodes[0].id.clone();
        wait_for("k=v on every node", Duration::from_secs(20), || {
            all_see(&nodes, &owner, "k", "v")
        })
        .await;

        let target = nodes[0].id.gossip_advertise_addr;
        let stats = nodes[0].stats.clone();
        let before = stats.rejected_total();
        let attacker = TokioUdpSocket::bind(loopback_any()).await.unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        const GARBAGE: u64 = 20_000;
        let mut payload = vec![0u8; 1_500];
        for i in 0..GARBAGE {
            let len = rng.gen_range(0..payload.len());
            rng.fill_bytes(&mut payload[..len]);
            if i % 2 == 0 {
                if let Some(b) = payload.first_mut() {
                    *b = SEAL_VERSION; // looks sealed: must fail authentication
                }
            }
            attacker.send_to(&payload[..len], target).await.unwrap();
            if i % 64 == 63 {
                // Pace the flood so the kernel buffer does not drop it all.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        wait_for("garbage rejected", Duration::from_secs(20), || {
            let done = stats.rejected_total() - before >= GARBAGE;
            async move { done }
        })
        .await;
        let rejected = stats.rejected_total() - before;
        assert_eq!(rejected, GARBAGE, "{:?}", stats.rejected_by_reason());
        assert!(stats.rejected_bad_seal.load(Ordering::Relaxed) > 0);
        assert!(stats.rejected_malformed.load(Ordering::Relaxed) > 0);
        assert_eq!(stats.reader_restarts.load(Ordering::Relaxed), 0);

        set(&nodes[0], "after", "flood").await;
        wait_for(
            "cluster converges after flood",
            Duration::from_secs(20),
            || all_see(&nodes, &owner, "after", "flood"),
        )
        .await;
    }

    /// A value of about `len` bytes that chitchat's zstd blocks cannot shrink:
    /// characters of all UTF-8 lengths, weighted so that byte values come out
    /// near uniform.
    fn incompressible_value(rng: &mut StdRng, len: usize) -> String {
        let mut value = String::new();
        while value.len() < len {
            let pick = rng.gen_range(0..179u32);
            let c = if pick < 128 {
                char::from_u32(rng.gen_range(0..0x80))
            } else if pick < 158 {
                char::from_u32(rng.gen_range(0x80..0x800))
            } else if pick < 174 {
                char::from_u32(rng.gen_range(0x800..0x10000))
            } else {
                char::from_u32(rng.gen_range(0x10000..0x110000))
            };
            if let Some(c) = c {
                value.push(c);
            }
        }
        value
    }

    async fn large_values_propagate_with(transport: impl Fn() -> SealedTransport) -> Vec<Node> {
        let nodes = start_cluster(transport).await;
        let mut rng = StdRng::seed_from_u64(11);
        // 200 KiB in 400 values of 512 bytes. chitchat fills a delta until the
        // next key-value does not fit, so a full datagram is short of 65,507
        // bytes by less than one key-value: with ~530-byte key-values every
        // full datagram exceeds 65,000 bytes once sealed (with 1 KiB values it
        // lands just below, and nothing is fragmented).
        let values: Vec<(String, String)> = (0..400)
            .map(|i| (format!("big/{i:03}"), incompressible_value(&mut rng, 512)))
            .collect();
        nodes[0]
            .handle
            .with_chitchat(|c| {
                for (k, v) in &values {
                    c.self_node_state().set(k, v);
                }
            })
            .await;
        let owner = nodes[0].id.clone();
        wait_for(
            "400 large values on every node",
            Duration::from_secs(30),
            || async {
                for node in &nodes[1..] {
                    let complete = node
                        .handle
                        .with_chitchat(|c| {
                            c.node_state(&owner).is_some_and(|state| {
                                values.iter().all(|(k, v)| state.get(k) == Some(v.as_str()))
                            })
                        })
                        .await;
                    if !complete {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        for node in &nodes {
            assert_eq!(
                node.stats.rejected_total(),
                0,
                "{:?}",
                node.stats.rejected_by_reason()
            );
            assert_eq!(node.stats.decode_failures.load(Ordering::Relaxed), 0);
        }
        nodes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn large_values_propagate() {
        let nodes = large_values_propagate_with(|| SealedTransport::new(KEY)).await;
        let fragmented: u64 = nodes
            .iter()
            .map(|n| n.stats.fragmented_messages.load(Ordering::Relaxed))
            .sum();
        assert!(
            fragmented > 0,
            "chitchat never filled a datagram past 65,000 bytes"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn large_values_propagate_in_small_datagrams() {
        let nodes =
            large_values_propagate_with(|| SealedTransport::new(KEY).with_max_datagram_len(1_400))
                .await;
        let fragmented: u64 = nodes
            .iter()
            .map(|n| n.stats.fragmented_messages.load(Ordering::Relaxed))
            .sum();
        assert!(fragmented > 0);
    }
}
