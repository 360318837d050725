//! The cluster key and its text form.

use std::fmt;

use base64::Engine as _;
use ring::aead::{LessSafeKey, UnboundKey, CHACHA20_POLY1305};

/// A cluster key ready for sealing and opening (ChaCha20-Poly1305).
#[derive(Clone)]
pub struct SealKey(pub(super) LessSafeKey);

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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];

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
}
