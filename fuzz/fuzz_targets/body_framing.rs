//! The tunnel's body framing: bytes fed in the pieces the decoder asks for
//! (cut at the sizes the input's first bytes choose) give events or one
//! error, and the decoder never buffers more than a frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weft_runtime::wire::body::BodyDecoder;
use weft_runtime::wire::MAX_FRAME;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1);
    let mut decoder = BodyDecoder::new();
    let mut rest = Bytes::copy_from_slice(stream);
    while !rest.is_empty() && !decoder.is_done() {
        let take = decoder.wants().min(cut).min(rest.len());
        if take == 0 {
            break;
        }
        if decoder.feed(rest.split_to(take)).is_err() {
            return;
        }
        assert!(decoder.buffered() <= MAX_FRAME + 4, "buffered {}", decoder.buffered());
    }
});
