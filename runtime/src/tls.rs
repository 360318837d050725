//! Node identity: certificates signed by the cluster CA, and the mTLS configs of the QUIC tunnel.
