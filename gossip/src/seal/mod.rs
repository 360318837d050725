//! Sealed gossip transport: every chitchat datagram is authenticated and
//! encrypted with a cluster-wide key before it leaves the node, and every
//! incoming datagram is verified before chitchat ever sees it.
//!
//! # Pipeline
//!
//! chitchat's [`Transport`]/[`Socket`] traits exchange typed
//! [`ChitchatEnvelope`]s; the sealed socket encodes each one with
//! chitchat's own encoding (public in the patched copy) and seals it:
//!
//! ```text
//! send:  envelope -> chitchat bytes -> fragment + seal -> outer socket -> peer
//!
//! recv:  peer -> outer socket -> open/verify -> replay window -> reassemble
//!        plaintext -> chitchat decode -> RecvOutcome { from_addr: sealed sender, .. } -> channel
//! ```
//!
//! The receive pipeline runs in one spawned task feeding a bounded channel, so
//! [`Socket::recv`] (whose future chitchat drops on every gossip tick) only
//! awaits a cancel-safe channel receive. A supervisor restarts the reader if
//! it ever panics (e.g. a decode bug in chitchat hit by a datagram from a key
//! holder). Authentic bytes that do not decode are dropped and counted.
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

//!
//! # Layout
//!
//! - [`key`]: the cluster key and its base64 form; [`keyring`]: the installed
//!   keys (open under any, seal under the primary), swappable at run time.
//! - [`datagram`]: seal and open one datagram, the nonce and its timestamp.
//! - [`replay`]: the window of recently accepted nonces.
//! - [`fragment`]: the sealed plaintext (route, fragment header) and the split
//!   of large messages; [`reassembly`]: putting fragments back together.
//! - `codec`: chitchat's byte encoding of envelopes, called in place.
//! - [`transport`]: the chitchat [`Transport`] and its sockets (send side).
//! - `reader`: the receive pipeline and its supervisor.
//! - [`stats`]: counters exported as metrics.
//!
//! The end-to-end tests with real chitchat nodes are in `gossip/tests/sealed_cluster.rs`.

mod codec;
pub mod datagram;
pub mod fragment;
pub mod key;
pub mod keyring;
mod reader;
pub mod reassembly;
pub mod replay;
pub mod stats;
pub mod transport;

pub use datagram::{
    open, seal, unix_now_ms, OpenError, Opened, HEADER_LEN, MAX_CLOCK_SKEW_MS, NONCE_LEN,
    SEAL_OVERHEAD, SEAL_VERSION, TAG_LEN,
};
pub use fragment::{
    parse_fragment, parse_routed, seal_message, Fragment, Route, DEFAULT_MAX_DATAGRAM_LEN,
    FRAGMENT_HEADER_LEN, MAX_UDP_PAYLOAD_LEN, MIN_MAX_DATAGRAM_LEN, ROUTE_LEN,
};
pub use key::{decode_key_base64, KeyError, SealKey};
pub use keyring::{KeyId, Keyring, SharedKeyring};
pub use reassembly::{Reassembler, ReassemblyError, MAX_REASSEMBLIES, REASSEMBLY_TIMEOUT};
pub use replay::{ReplayWindow, REPLAY_WINDOW_CAPACITY, REPLAY_WINDOW_MS};
pub use stats::SealStats;
pub use transport::SealedTransport;

/// What the seal modules' unit tests share: a key, a clock, a seeded rng.
#[cfg(test)]
mod test_support {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::fragment::Route;
    use super::key::SealKey;

    pub const KEY: [u8; 32] = [7u8; 32];
    pub const NOW: u64 = 1_700_000_000_000;
    pub const ROUTE: Route = Route {
        from: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1),
        to: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 2),
    };

    pub fn key() -> SealKey {
        SealKey::new(&KEY)
    }

    pub fn rng() -> StdRng {
        StdRng::seed_from_u64(42)
    }

    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }
}

#[cfg(doc)]
use chitchat::{
    transport::{Socket, Transport},
    ChitchatEnvelope,
};
