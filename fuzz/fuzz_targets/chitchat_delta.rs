//! Gossip deltas on receipt: any run of delta operations a key holder
//! could seal and send is either refused while decoding or applied to a
//! real chitchat state (twice, then gossiped on) without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chitchat::fuzz::apply_delta_ops(data);
});
