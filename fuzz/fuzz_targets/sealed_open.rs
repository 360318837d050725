//! Sealed gossip on receipt: raw datagrams are opened under the keyring,
//! and plaintexts sealed under the cluster key (what a key holder could
//! send) go through the route and fragment parser and the reassembler.
//! Nothing panics, and a reassembled message is never over the UDP limit.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;
use weft_gossip::seal::{parse_routed, seal, Keyring, Reassembler, MAX_UDP_PAYLOAD_LEN};

const KEY: [u8; 32] = [7; 32];
const NOW: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let ring = Keyring::new(&KEY, &[[8; 32]]);
    let _ = ring.open(data, NOW);

    // The input as a run of up to 8 plaintexts: a length byte, then that
    // many bytes (enough for any fragment pattern the reassembler keeps).
    let mut reassembler = Reassembler::new(4, Duration::from_secs(2), MAX_UDP_PAYLOAD_LEN);
    // Seeded, so a crash replays exactly.
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let mut rest = data;
    for _ in 0..8 {
        let Some((&len, tail)) = rest.split_first() else {
            break;
        };
        let len = usize::from(len).min(tail.len());
        let (plaintext, tail) = tail.split_at(len);
        rest = tail;
        let datagram = seal(ring.primary(), plaintext, NOW, &mut rng);
        let opened = ring.open(&datagram, NOW).expect("a datagram sealed under the primary opens");
        assert_eq!(opened.plaintext, plaintext);
        if let Some((route, fragment)) = parse_routed(&opened.plaintext) {
            if let Ok(Some(message)) = reassembler.push(route.from, fragment, now) {
                assert!(message.len() <= MAX_UDP_PAYLOAD_LEN);
            }
        }
        assert!(reassembler.in_progress() <= 4);
    }
});
