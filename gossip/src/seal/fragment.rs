//! The sealed plaintext: the route (who sealed it, for whom), the fragment
//! header, and the split of a large message into sealed fragments.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use rand::RngCore;

use super::datagram::{seal, SEAL_OVERHEAD};
use super::key::SealKey;

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
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::seal::datagram::open;
    use crate::seal::reassembly::Reassembler;
    use crate::seal::test_support::*;

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
}
