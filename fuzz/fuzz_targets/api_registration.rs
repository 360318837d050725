//! The registration API's parser: any JSON body a local client sends is a
//! record or an error naming a field; a record it accepts is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_gossip::keys::{validate_id, validate_name};
use weft_gossip::registration::parse_registration;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match parse_registration(&body, "n1") {
        Ok(record) => {
            assert!(validate_name(&record.name).is_ok());
            assert!(validate_id(&record.id).is_ok());
            assert_ne!(record.port, 0);
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
