//! The tunnel codec: the only module that touches bincode.
