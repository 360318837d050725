//! The keyring: every installed cluster key. Datagrams open under any of
//! them and are sealed under the primary, so a key can be rotated on a
//! running cluster: install the new key everywhere, make it the primary,
//! then remove the old one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::datagram::{open, OpenError, Opened};
use super::key::SealKey;

/// A keyring shared by the transport and whoever rotates it: swapping it
/// takes effect for the next datagram sealed or opened.
pub type SharedKeyring = Arc<ArcSwap<Keyring>>;

/// A short public name of a key: the first 4 bytes of its SHA-256, in hex.
/// It names the key in `weft keys list` and `DELETE /v1/keys/{id}` without
/// showing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 4]);

impl KeyId {
    /// The id of a raw key.
    pub fn of(key: &[u8; 32]) -> KeyId {
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest.as_ref()[..4]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A string that is not 8 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key id is 8 hex digits, got {0:?}")]
pub struct BadKeyId(String);

impl FromStr for KeyId {
    type Err = BadKeyId;

    fn from_str(s: &str) -> Result<KeyId, BadKeyId> {
        let bad = || BadKeyId(s.chars().take(16).collect());
        if s.len() != 8 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 4];
        for (byte, pair) in id.iter_mut().zip(s.as_bytes().chunks(2)) {
            let hex = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
        }
        Ok(KeyId(id))
    }
}

/// The installed keys, primary first. Never empty.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<(KeyId, SealKey)>,
}

impl Keyring {
    /// A keyring sealing under `primary` and also opening under `others`
    /// (duplicates of the primary or of each other are dropped).
    pub fn new(primary: &[u8; 32], others: &[[u8; 32]]) -> Keyring {
        let mut keys: Vec<(KeyId, SealKey)> = Vec::with_capacity(1 + others.len());
        for key in std::iter::once(primary).chain(others) {
            let id = KeyId::of(key);
            if keys.iter().all(|(known, _)| *known != id) {
                keys.push((id, SealKey::new(key)));
            }
        }
        Keyring { keys }
    }

    /// A keyring of one key, in a handle the transport can share.
    pub fn shared(primary: &[u8; 32]) -> SharedKeyring {
        Arc::new(ArcSwap::from_pointee(Keyring::new(primary, &[])))
    }

    /// The key every datagram is sealed under.
    pub fn primary(&self) -> &SealKey {
        &self.keys[0].1
    }

    /// The primary key's id.
    pub fn primary_id(&self) -> KeyId {
        self.keys[0].0
    }

    /// The ids of every installed key, primary first.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }

    /// Opens `datagram` under the first installed key that authenticates
    /// it, the primary first. A datagram no key opens is
    /// [`OpenError::BadSeal`].
    pub fn open(&self, datagram: &[u8], now_ms: u64) -> Result<Opened, OpenError> {
        let mut result = Err(OpenError::BadSeal);
        for (_, key) in &self.keys {
            result = open(key, datagram, now_ms);
            if result != Err(OpenError::BadSeal) {
                break;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::seal::datagram::seal;

    const NOW: u64 = 1_700_000_000_000;
    const OLD: [u8; 32] = [1; 32];
    const NEW: [u8; 32] = [2; 32];

    fn sealed_under(key: &[u8; 32]) -> Vec<u8> {
        seal(
            &SealKey::new(key),
            b"gossip",
            NOW,
            &mut StdRng::seed_from_u64(1),
        )
    }

    #[test]
    fn opens_under_any_installed_key_and_seals_under_the_primary() {
        let ring = Keyring::new(&NEW, &[OLD, NEW]);
        assert_eq!(ring.ids().count(), 2, "the duplicate primary is dropped");
        assert_eq!(ring.primary_id(), KeyId::of(&NEW));
        for key in [OLD, NEW] {
            let opened = ring.open(&sealed_under(&key), NOW).unwrap();
            assert_eq!(opened.plaintext, b"gossip");
        }
        let sealed = seal(ring.primary(), b"x", NOW, &mut StdRng::seed_from_u64(2));
        assert!(Keyring::new(&NEW, &[]).open(&sealed, NOW).is_ok());
        assert_eq!(
            Keyring::new(&OLD, &[]).open(&sealed, NOW),
            Err(OpenError::BadSeal)
        );
    }

    #[test]
    fn a_removed_key_no_longer_opens() {
        let ring = Keyring::new(&NEW, &[]);
        assert_eq!(ring.open(&sealed_under(&OLD), NOW), Err(OpenError::BadSeal));
        // Stale is reported as such under the key that authenticates it.
        assert_eq!(
            ring.open(&sealed_under(&NEW), NOW + 60_000),
            Err(OpenError::Stale)
        );
    }

    #[test]
    fn key_ids_print_and_parse() {
        let id = KeyId::of(&OLD);
        let text = id.to_string();
        assert_eq!(text.len(), 8);
        assert_eq!(text.parse::<KeyId>(), Ok(id));
        for bad in ["", "abc", "zzzzzzzz", "0123456789", "ééééé"] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }
}
