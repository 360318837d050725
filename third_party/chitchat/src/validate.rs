//! Checks on what a peer sends, applied while a message is decoded, so
//! that nothing a datagram carries can panic the node that applies it
//! (a weft patch; see PATCHES.md).

/// Longest node id accepted from a peer (a DNS name's length).
pub const MAX_NODE_ID_LEN: usize = 253;
/// Longest key accepted from a peer.
pub const MAX_KEY_LEN: usize = 1024;
/// Most node incarnations a node keeps (live, dead and not yet forgotten).
pub const MAX_NODES: usize = 16_384;
/// Most keys (deleted ones included) a node keeps for one peer: a key past
/// it is not stored, so a peer cannot grow every node's memory without
/// bound (its state is then incomplete, which a signature check notices).
pub const MAX_KEYS_PER_NODE: usize = 8192;

/// A node id is 1 to [`MAX_NODE_ID_LEN`] printable ASCII characters.
pub(crate) fn node_id(id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !id.is_empty() && id.len() <= MAX_NODE_ID_LEN,
        "node id of {} bytes",
        id.len()
    );
    anyhow::ensure!(
        id.bytes().all(|b| b.is_ascii_graphic()),
        "node id is not printable ASCII"
    );
    Ok(())
}

/// A key is at most [`MAX_KEY_LEN`] printable ASCII characters: key
/// listeners slice keys by bytes, which panics inside a multi-byte
/// character.
pub(crate) fn key(key: &str) -> anyhow::Result<()> {
    anyhow::ensure!(key.len() <= MAX_KEY_LEN, "key of {} bytes", key.len());
    anyhow::ensure!(
        key.bytes().all(|b| b.is_ascii_graphic()),
        "key is not printable ASCII"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn refuses_what_would_panic_or_grow() {
        assert!(super::node_id("node-1").is_ok());
        assert!(super::node_id("").is_err());
        assert!(super::node_id("é").is_err());
        assert!(super::node_id(&"a".repeat(254)).is_err());
        assert!(super::key("svc/web-1").is_ok());
        assert!(super::key("").is_ok());
        assert!(super::key("ékey").is_err());
        assert!(super::key("a b").is_err());
        assert!(super::key(&"k".repeat(1025)).is_err());
    }
}
