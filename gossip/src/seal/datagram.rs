//! Sealing and opening one datagram: `version | nonce | ciphertext | tag`.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use ring::aead::{Aad, Nonce};

use super::key::SealKey;

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
/// Largest accepted difference between a datagram's timestamp and local time.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

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
    /// The nonce, to be checked against the [`ReplayWindow`](super::ReplayWindow).
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
/// Replays are *not* checked here: feed [`Opened::nonce`] to a [`ReplayWindow`](super::ReplayWindow).
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::seal::fragment::parse_fragment;
    use crate::seal::test_support::*;

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
    }
}
