//! Small JSON state files in the data dir (registrations, upstreams), written
//! atomically so a crash never leaves a half-written file behind.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::NodeError;

/// Reads `path`; a missing file is the default value, a corrupt one an error.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, NodeError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| NodeError::Config(format!("{} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(NodeError::Io(format!("{}: {e}", path.display()))),
    }
}

/// Replaces `path` with `value` as pretty JSON (mode 0600).
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), NodeError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| NodeError::Io(e.to_string()))?;
    weft_runtime::tls::write_atomic(path, &text, 0o600)
        .map_err(|e| NodeError::Io(format!("cannot save {}: {e}", path.display())))
}
