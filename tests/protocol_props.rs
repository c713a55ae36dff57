//! Property tests of the wire protocol: arbitrary bytes never panic or over-allocate, and
//! every request and value survives an encode/parse round trip. (The libFuzzer target in
//! `fuzz/` explores the same parser for longer; this keeps CI exercising it.)

use op_bridge::protocol::{
    MAX_LINE, MAX_VALUE, ProtocolError, Reply, Request, Response, Version, encode_request, encode_response, read_reply,
    read_request,
};
use proptest::prelude::*;
use zeroize::Zeroizing;

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
}

/// Parses every request in `bytes`, stopping at the first fatal error.
fn parse_all(bytes: &[u8], version: Version) -> Vec<Result<Request, ProtocolError>> {
    block_on(async {
        let mut reader = bytes;
        let mut line = Zeroizing::new(Vec::new());
        let mut out = Vec::new();
        loop {
            match read_request(&mut reader, version, &mut line).await {
                Ok(None) => return out,
                Ok(Some(request)) => out.push(Ok(request)),
                Err(err) => {
                    let fatal = err.is_fatal();
                    out.push(Err(err));
                    if fatal {
                        return out;
                    }
                }
            }
        }
    })
}

fn name() -> impl Strategy<Value = String> {
    "[A-Z0-9_][A-Z0-9_.-]{0,40}"
}

fn reference() -> impl Strategy<Value = String> {
    (
        "[A-Za-z0-9 _-]{1,12}",
        "[A-Za-z0-9 _.-]{1,12}",
        proptest::option::of("[A-Za-z0-9 _-]{1,8}"),
        "[A-Za-z0-9_.-]{1,12}",
    )
        .prop_map(|(v, i, s, f)| match s {
            Some(s) => format!("op://{v}/{i}/{s}/{f}"),
            None => format!("op://{v}/{i}/{f}"),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), v2 in any::<bool>()) {
        let version = if v2 { Version::V2 } else { Version::V1 };
        let results = parse_all(&bytes, version);
        // Every request consumed at least its newline, so there are never more results than lines + 1.
        let lines = bytes.iter().filter(|&&b| b == b'\n').count();
        prop_assert!(results.len() <= lines + 1);
    }

    #[test]
    fn command_like_garbage_never_panics(lines in proptest::collection::vec(
        ("(?i)(get|set|delete|list|ping|refresh|status|hello|xyz)", "[ -~\\t]{0,60}"), 0..20)
    ) {
        let mut bytes = Vec::new();
        for (word, rest) in &lines {
            bytes.extend_from_slice(format!("{word} {rest}\n").as_bytes());
        }
        for version in [Version::V1, Version::V2] {
            let _ = parse_all(&bytes, version);
        }
    }

    #[test]
    fn set_round_trips_any_value(name in name(), uri in proptest::option::of(reference()),
                                 value in proptest::collection::vec(any::<u8>(), 1..2048)) {
        let request = Request::Set { name: name.clone(), uri: uri.clone(), value: Zeroizing::new(value.clone()) };
        let wire = encode_request(&request, Version::V2);
        let parsed = parse_all(&wire, Version::V2);
        prop_assert_eq!(parsed.len(), 1);
        match &parsed[0] {
            Ok(Request::Set { name: n, uri: u, value: v }) => {
                prop_assert_eq!(n, &name);
                prop_assert_eq!(u, &uri);
                prop_assert_eq!(&v[..], &value[..]);
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn get_replies_round_trip_any_value(value in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut wire = Vec::new();
        encode_response(&mut wire, &Response::Value(&value), Version::V2);
        let reply = block_on(async { read_reply(&mut &wire[..], Version::V2, true).await });
        match reply {
            Ok(Reply::Value(got)) => prop_assert_eq!(&got[..], &value[..]),
            _ => prop_assert!(false, "framed value did not round trip"),
        }
        // Version 1 sends the value only when it fits on one line, else ERR: never truncated.
        let mut wire = Vec::new();
        encode_response(&mut wire, &Response::Value(&value), Version::V1);
        let reply = block_on(async { read_reply(&mut &wire[..], Version::V1, true).await });
        match reply {
            Ok(Reply::Value(got)) => prop_assert_eq!(&got[..], &value[..]),
            Ok(Reply::Err(msg)) => {
                prop_assert!(value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
                prop_assert!(msg.contains("HELLO 2"));
            }
            _ => prop_assert!(false, "unexpected v1 reply"),
        }
    }

    #[test]
    fn announced_frame_sizes_are_bounded(len in any::<u64>()) {
        let wire = format!("SET A - {len}\n");
        let parsed = parse_all(wire.as_bytes(), Version::V2);
        match &parsed[0] {
            Err(ProtocolError::ValueTooLarge(n)) => prop_assert!(*n > MAX_VALUE as u64),
            Err(ProtocolError::Truncated) => prop_assert!(len <= MAX_VALUE as u64),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

#[test]
fn lines_at_and_past_the_limit() {
    let mut exact = b"PING ".to_vec();
    exact.resize(MAX_LINE, b' ');
    exact.push(b'\n');
    assert!(matches!(parse_all(&exact, Version::V1)[0], Ok(Request::Ping)));
    let mut over = exact.clone();
    over.insert(0, b' ');
    assert!(matches!(parse_all(&over, Version::V1)[0], Err(ProtocolError::LineTooLong)));
}
