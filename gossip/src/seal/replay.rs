//! The replay window: nonces accepted recently, so an exact replay is dropped.

use std::collections::{HashSet, VecDeque};

use super::datagram::NONCE_LEN;

/// How long accepted nonces are remembered.
pub const REPLAY_WINDOW_MS: u64 = 60_000;
/// Maximum number of nonces remembered.
pub const REPLAY_WINDOW_CAPACITY: usize = 100_000;

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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::seal::datagram::{open, seal};
    use crate::seal::test_support::*;

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
}
