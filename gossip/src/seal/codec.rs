//! chitchat's byte encoding of its messages, called in place: envelopes to
//! bytes before sealing, bytes to envelopes after opening (the encoding is
//! public in the patched chitchat, `third_party/chitchat/PATCHES.md`).

use chitchat::ChitchatEnvelope;

/// Encodes envelopes into one reused buffer.
#[derive(Default)]
pub(super) struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// The bytes of `envelope`, valid until the next call.
    pub(super) fn encode(&mut self, envelope: &ChitchatEnvelope) -> &[u8] {
        self.buf.clear();
        envelope.serialize(&mut self.buf);
        &self.buf
    }
}

/// The envelope `message` holds, or why it holds none (bytes only a key
/// holder could have sealed, so worth a warning, rate limited).
pub(super) fn decode(message: &[u8]) -> anyhow::Result<ChitchatEnvelope> {
    let mut rest = message;
    ChitchatEnvelope::deserialize(&mut rest)
}
