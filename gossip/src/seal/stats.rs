//! Counters of the sealed transport, and rate-limited warnings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::datagram::OpenError;

/// Minimum interval between two warnings of the same kind.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Counters of the sealed transport. Shared by every socket a
/// [`SealedTransport`](super::SealedTransport) opens.
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
    /// Times the reader task was restarted (after a panic).
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
    /// The `weft_gossip_rejected_total{reason}` labels, in the order of
    /// [`SealStats::rejected_by_reason`].
    pub const REASONS: &'static [&'static str] = &[
        "bad_seal",
        "stale",
        "replay",
        "malformed",
        "wrong_recipient",
        "undecodable",
    ];

    /// Rejections by reason, as `(reason, count)`: datagrams that failed
    /// authentication, came too late or twice, were malformed or sealed
    /// for another node, and authentic messages that gossip refused to
    /// decode (a delta that breaks its rules; see `third_party/chitchat`).
    pub fn rejected_by_reason(&self) -> Vec<(&'static str, u64)> {
        let counts = [
            &self.rejected_bad_seal,
            &self.rejected_stale,
            &self.rejected_replay,
            &self.rejected_malformed,
            &self.rejected_recipient,
            &self.decode_failures,
        ];
        Self::REASONS
            .iter()
            .zip(counts)
            .map(|(reason, n)| (*reason, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Sum of all rejections.
    pub fn rejected_total(&self) -> u64 {
        self.rejected_by_reason().iter().map(|(_, n)| n).sum()
    }

    pub(super) fn count_open_error(&self, err: OpenError) {
        let counter = match err {
            OpenError::Malformed => &self.rejected_malformed,
            OpenError::BadSeal => &self.rejected_bad_seal,
            OpenError::Stale => &self.rejected_stale,
        };
        bump(counter);
    }
}

pub(super) fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed).saturating_add(1)
}

/// Rate limits warnings by kind.
#[derive(Default)]
pub(super) struct WarnLimiter {
    last: HashMap<&'static str, Instant>,
}

impl WarnLimiter {
    pub(super) fn allow(&mut self, kind: &'static str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
                ("wrong_recipient", 0),
                ("undecodable", 0)
            ]
        );
        assert_eq!(stats.rejected_total(), 5);
    }
}
