//! Reassembly of fragmented messages, bounded in count, size and time.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::fragment::{Fragment, MAX_UDP_PAYLOAD_LEN};

/// How long an incomplete fragmented message is kept.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Maximum number of fragmented messages being reassembled at once.
pub const MAX_REASSEMBLIES: usize = 64;

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

#[cfg(test)]
mod tests {

    use proptest::prelude::*;

    use super::*;
    use crate::seal::fragment::parse_fragment;
    use crate::seal::test_support::*;

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

    proptest! {
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
}
