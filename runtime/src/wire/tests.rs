//! Tests of the tunnel codec: round trips, limits, and hostile input.

use proptest::prelude::*;

use super::*;

fn sample_request() -> RequestHead {
    RequestHead {
        version: WIRE_VERSION,
        kind: StreamKind::Http,
        service: "web".into(),
        instance: "web-1@node-a".into(),
        method: "GET".into(),
        uri: "/path?q=1".into(),
        headers: vec![
            ("accept".into(), b"*/*".to_vec()),
            ("x-bin".into(), vec![0xff, 0x00, 0x80]),
        ],
        deadline_ms: 2_500,
        attempt: 1,
        http2: false,
        end_stream: false,
    }
}

fn sample_response() -> ResponseHead {
    ResponseHead {
        status: 502,
        headers: vec![("weft-error".into(), b"upstream-unreachable".to_vec())],
        error: Some("upstream-unreachable".into()),
        end_stream: true,
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

#[test]
fn request_round_trip() {
    let head = sample_request();
    let bytes = encode(&head).unwrap();
    assert_eq!(
        frame_len(bytes[..4].try_into().unwrap()).unwrap(),
        bytes.len() - 4
    );
    match decode::<RequestHead>(&bytes).unwrap() {
        Decoded::Frame { msg, used } => {
            assert_eq!(msg, head);
            assert_eq!(used, bytes.len());
        }
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[test]
fn a_borrowed_head_encodes_as_the_owned_one() {
    let mut headers = http::HeaderMap::new();
    headers.append("accept", "*/*".parse().unwrap());
    headers.append("x-twice", "1".parse().unwrap());
    headers.append("x-twice", "2".parse().unwrap());
    headers.append(
        "x-bin",
        http::HeaderValue::from_bytes(&[0xff, 0x80]).unwrap(),
    );
    let owned = RequestHead {
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..sample_request()
    };
    let borrowed = RequestHeadRef {
        version: owned.version,
        kind: owned.kind,
        service: &owned.service,
        instance: &owned.instance,
        method: &owned.method,
        uri: &owned.uri,
        headers: &headers,
        deadline_ms: owned.deadline_ms,
        attempt: owned.attempt,
        http2: owned.http2,
        end_stream: owned.end_stream,
    };
    assert_eq!(encode(&borrowed).unwrap(), encode(&owned).unwrap());
}

#[test]
fn response_round_trip_leaves_body_alone() {
    let head = sample_response();
    let mut bytes = encode(&head).unwrap();
    let frame_end = bytes.len();
    bytes.extend_from_slice(b"body bytes");
    match decode::<ResponseHead>(&bytes).unwrap() {
        Decoded::Frame { msg, used } => {
            assert_eq!(msg, head);
            assert_eq!(used, frame_end);
        }
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[test]
fn truncated_input_is_incomplete() {
    let bytes = encode(&sample_request()).unwrap();
    for cut in 0..4 {
        assert_eq!(
            decode::<RequestHead>(&bytes[..cut]).unwrap(),
            Decoded::Incomplete { needed: 4 }
        );
    }
    for cut in 4..bytes.len() {
        assert_eq!(
            decode::<RequestHead>(&bytes[..cut]).unwrap(),
            Decoded::Incomplete {
                needed: bytes.len()
            }
        );
    }
}

#[test]
fn oversized_prefix_is_refused_before_reading() {
    let prefix = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
    assert!(matches!(
        frame_len(prefix),
        Err(WireError::TooLarge { len, max }) if len == MAX_FRAME + 1 && max == MAX_FRAME
    ));
    // Only the prefix is present: refused at once rather than asking for
    // a whole frame more (and so never buffering it).
    assert!(matches!(
        decode::<RequestHead>(&prefix),
        Err(WireError::TooLarge { .. })
    ));
    assert!(matches!(
        frame_len([0xff; 4]),
        Err(WireError::TooLarge { .. })
    ));
    assert_eq!(
        frame_len(u32::try_from(MAX_FRAME).unwrap().to_be_bytes()).unwrap(),
        MAX_FRAME
    );
}

#[test]
fn oversized_message_is_refused_on_encode() {
    let mut head = sample_request();
    head.uri = "/".repeat(MAX_FRAME);
    assert!(matches!(
        encode(&head),
        Err(WireError::TooLarge { len, max }) if len > MAX_FRAME && max == MAX_FRAME
    ));
}

#[test]
fn trailing_garbage_inside_frame_is_malformed() {
    let bytes = encode(&sample_request()).unwrap();
    let mut payload = bytes[4..].to_vec();
    payload.extend_from_slice(&[0, 0, 0]);
    assert!(matches!(
        decode::<RequestHead>(&frame(&payload)),
        Err(WireError::Malformed(msg)) if msg.contains("trailing")
    ));
}

#[test]
fn empty_frame_is_malformed() {
    assert!(matches!(
        decode::<RequestHead>(&frame(&[])),
        Err(WireError::Malformed(_))
    ));
}

/// A payload whose head fields are fine up to the headers, for hand-built
/// hostile lengths.
fn head_prefix() -> Vec<u8> {
    // version 1, kind Http, service "a", instance "b", method "", uri "".
    vec![1, 0, 1, b'a', 1, b'b', 0, 0]
}

#[test]
fn huge_header_count_is_refused() {
    let mut payload = head_prefix();
    payload.push(253); // varint marker: u64 follows
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode::<RequestHead>(&frame(&payload)),
        Err(WireError::Malformed(_))
    ));

    let mut payload = head_prefix();
    payload.extend_from_slice(&[251, 1, 1]); // u16 varint: 257 headers
    assert!(matches!(
        decode::<RequestHead>(&frame(&payload)),
        Err(WireError::Malformed(msg)) if msg.contains("headers")
    ));
}

#[test]
fn huge_header_value_length_is_refused() {
    let mut payload = head_prefix();
    payload.extend_from_slice(&[1, 1, b'x', 253]); // one header "x", value length u64
    payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        decode::<RequestHead>(&frame(&payload)),
        Err(WireError::Malformed(msg)) if msg.contains("length field")
    ));
}

#[test]
fn huge_string_length_is_refused() {
    let mut payload = vec![1, 0, 253];
    payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        decode::<RequestHead>(&frame(&payload)),
        Err(WireError::Malformed(msg)) if msg.contains("length field")
    ));
}

#[test]
fn validate_accepts_a_good_head() {
    sample_request().validate().unwrap();
}

#[test]
fn validate_rejects_bad_heads() {
    let mut head = sample_request();
    head.version = 9;
    assert!(matches!(
        head.validate(),
        Err(WireError::UnsupportedVersion(9))
    ));

    for (service, instance) in [
        ("", "i"),
        ("s", ""),
        ("wéb", "i"),
        ("s", "a b"),
        ("s\n", "i"),
    ] {
        let mut head = sample_request();
        head.service = service.into();
        head.instance = instance.into();
        assert!(
            matches!(head.validate(), Err(WireError::Invalid(_))),
            "{service:?}/{instance:?} accepted"
        );
    }

    for name in ["", "Accept", "bad header", "x:y", "caf\u{e9}"] {
        let mut head = sample_request();
        head.headers = vec![(name.into(), b"v".to_vec())];
        assert!(
            matches!(head.validate(), Err(WireError::Invalid(_))),
            "header name {name:?} accepted"
        );
    }

    let mut head = sample_request();
    head.headers = vec![("x".into(), Vec::new()); MAX_HEADERS + 1];
    assert!(matches!(head.validate(), Err(WireError::Invalid(_))));
    head.headers.pop();
    head.validate().unwrap();
}

#[test]
fn max_headers_round_trip() {
    let mut head = sample_request();
    head.headers = vec![("x".into(), b"1".to_vec()); MAX_HEADERS];
    let bytes = encode(&head).unwrap();
    assert!(matches!(
        decode::<RequestHead>(&bytes).unwrap(),
        Decoded::Frame { msg, .. } if msg == head
    ));
}

#[test]
fn errors_read_clearly() {
    let err = frame_len([0, 1, 0x20, 0x01]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "frame of 73729 bytes exceeds the limit of 73728 bytes"
    );
}

#[test]
fn the_largest_head_http_admits_fits_a_frame() {
    // MAX_HEADERS headers whose names and values add up to MAX_HEAD_BYTES,
    // the worst case for the length varints.
    let mut head = sample_request();
    let per = MAX_HEAD_BYTES / MAX_HEADERS;
    head.uri = String::new();
    head.headers = (0..MAX_HEADERS)
        .map(|i| {
            let name = format!("x-h{i:04}");
            let value = vec![b'v'; per - name.len()];
            (name, value)
        })
        .collect();
    let bytes = encode(&head).expect("a head at the HTTP limit encodes");
    assert!(bytes.len() <= PREFIX_LEN + MAX_FRAME);
    assert!(matches!(
        decode::<RequestHead>(&bytes).unwrap(),
        Decoded::Frame { msg, .. } if msg == head
    ));
}

// === Properties ===

fn arb_headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    proptest::collection::vec(
        ("\\PC{0,16}", proptest::collection::vec(any::<u8>(), 0..32)),
        0..16,
    )
}

fn arb_request() -> impl Strategy<Value = RequestHead> {
    (
        any::<u8>(),
        prop_oneof![Just(StreamKind::Http), Just(StreamKind::Tcp)],
        "\\PC{0,32}",
        "\\PC{0,32}",
        "\\PC{0,8}",
        "\\PC{0,64}",
        arb_headers(),
        any::<u32>(),
        any::<u8>(),
    )
        .prop_map(
            |(version, kind, service, instance, method, uri, headers, deadline_ms, attempt)| {
                RequestHead {
                    version,
                    kind,
                    service,
                    instance,
                    method,
                    uri,
                    headers,
                    deadline_ms,
                    attempt,
                    http2: attempt % 2 == 0,
                    end_stream: attempt % 3 == 0,
                }
            },
        )
}

fn arb_response() -> impl Strategy<Value = ResponseHead> {
    (
        any::<u16>(),
        arb_headers(),
        proptest::option::of("\\PC{0,32}"),
    )
        .prop_map(|(status, headers, error)| ResponseHead {
            status,
            end_stream: status % 2 == 0,
            headers,
            error,
        })
}

proptest! {
    #[test]
    fn request_heads_round_trip(head in arb_request()) {
        let bytes = encode(&head).unwrap();
        prop_assert_eq!(
            decode::<RequestHead>(&bytes).unwrap(),
            Decoded::Frame { msg: head, used: bytes.len() }
        );
    }

    #[test]
    fn response_heads_round_trip(head in arb_response()) {
        let bytes = encode(&head).unwrap();
        prop_assert_eq!(
            decode::<ResponseHead>(&bytes).unwrap(),
            Decoded::Frame { msg: head, used: bytes.len() }
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_decode_is_sane::<RequestHead>(&bytes)?;
        check_decode_is_sane::<ResponseHead>(&bytes)?;
        check_decode_is_sane::<RequestHead>(&frame(&bytes))?;
        check_decode_is_sane::<ResponseHead>(&frame(&bytes))?;
    }

    #[test]
    fn mutated_frames_never_panic(
        head in arb_request(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = encode(&head).unwrap();
        let n = bytes.len();
        for (at, value) in flips {
            // Leave the prefix alone so the payload decoder gets exercised.
            let i = 4 + at.index(n - 4);
            bytes[i] = value;
        }
        check_decode_is_sane::<RequestHead>(&bytes)?;
        if let Ok(Decoded::Frame { msg, .. }) = decode::<RequestHead>(&bytes) {
            // Whatever decodes must not panic validation either.
            let _ = msg.validate();
        }
    }
}

fn check_decode_is_sane<T: DeserializeOwned + std::fmt::Debug>(
    bytes: &[u8],
) -> Result<(), TestCaseError> {
    match decode::<T>(bytes) {
        Ok(Decoded::Frame { used, .. }) => prop_assert!(used <= bytes.len() && used >= 4),
        Ok(Decoded::Incomplete { needed }) => {
            prop_assert!(needed > bytes.len() && needed <= 4 + MAX_FRAME)
        }
        Err(_) => {}
    }
    Ok(())
}

#[test]
fn tunnel_versions_name_their_alpn_and_what_they_carry() {
    for v in TunnelVersion::SPOKEN {
        assert_eq!(TunnelVersion::from_alpn(v.alpn()), Some(v));
    }
    assert_eq!(TunnelVersion::SPOKEN[0], TunnelVersion::V2, "newest first");
    assert_eq!(TunnelVersion::from_alpn(b"weft/9"), None);
    assert!(!TunnelVersion::V1.carries(StreamKind::Tap));
    assert!(TunnelVersion::V2.carries(StreamKind::Tap));
    for kind in [StreamKind::Http, StreamKind::Tcp, StreamKind::Key] {
        assert!(TunnelVersion::V1.carries(kind) && TunnelVersion::V2.carries(kind));
    }
}
