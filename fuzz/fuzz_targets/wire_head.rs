//! The tunnel's head decoder: any bytes a peer sends as the first frame of a
//! stream decode to a head, ask for more, or are an error; never a panic,
//! never an allocation beyond the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_runtime::wire::{decode, encode, Decoded, RequestHead, ResponseHead, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Frame { msg, used }) = decode::<RequestHead>(data) {
        assert!(used <= data.len() && used <= MAX_FRAME + 4);
        // What decoded encodes again, to the same head.
        let again = encode(&msg).expect("a decoded head encodes");
        match decode::<RequestHead>(&again) {
            Ok(Decoded::Frame { msg: back, .. }) => assert_eq!(back, msg),
            other => panic!("re-encoded head did not decode: {other:?}"),
        }
    }
    let _ = decode::<ResponseHead>(data);
});
