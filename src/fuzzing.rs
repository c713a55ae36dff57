//! Fuzz target bodies: one function per parser of untrusted input, each taking raw bytes.
//!
//! The libFuzzer targets in `fuzz/` and the seed-corpus test (`tests/fuzz_seeds.rs`) call the
//! same functions, so what CI replays is exactly what the fuzzer explores. Each function
//! returns normally for any input the parser handles correctly, whether it accepts or rejects
//! it; it panics only when the parser panics or when a property stated below fails. Nothing
//! in op-bridge itself calls this module.

use std::collections::HashSet;

use serde_json::Value as Json;
use zeroize::Zeroizing;

use crate::backend::RetryPolicy;
use crate::backend::op::{ItemJson, classify};
use crate::cli::parse_duration;
use crate::exec_provider::{id_to_target, is_valid_exec_id, parse_request};
use crate::protocol::{Version, normalize_name, read_reply, read_request};
use crate::reference::SecretRef;
use crate::time::parse_rfc3339;
use crate::watch::WatchSpec;

/// Most ids of one request, and most references derived from one item, that are checked:
/// enough to reach every branch, few enough that one input stays fast.
const MAX_CHECKED: usize = 16;

/// The socket protocol: every request in the input (both versions), then the input as one
/// reply. No input may panic, allocate beyond the limits, or loop forever.
pub fn protocol(data: &[u8]) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else { return };
    runtime.block_on(async {
        for version in [Version::V1, Version::V2] {
            let mut reader = data;
            let mut line = Zeroizing::new(Vec::new());
            // Each iteration consumes input or ends, so this terminates.
            for _ in 0..data.len() + 1 {
                match read_request(&mut reader, version, &mut line).await {
                    Ok(None) => break,
                    Ok(Some(_)) => {}
                    Err(err) if err.is_fatal() => break,
                    Err(_) => {}
                }
            }
            let _ = read_reply(&mut &data[..], version, true).await;
        }
    });
}

/// The OpenClaw exec-provider request (`op-bridge get` without NAME): the JSON envelope,
/// then every id it carries (and the whole input as one id). Properties: ids come back
/// deduplicated; an id the OpenClaw grammar rejects is `INVALID_ID`; an accepted id maps to
/// a canonical NAME or to an `op://` reference that prints back as itself.
pub fn exec_request(data: &[u8]) {
    if let Ok(ids) = parse_request(data) {
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "ids are deduplicated");
        ids.iter().take(MAX_CHECKED).for_each(|id| check_exec_id(id));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_exec_id(text);
    }
}

fn check_exec_id(id: &str) {
    match id_to_target(id) {
        Ok(target) if target.starts_with("op://") => {
            let parsed = SecretRef::parse(&target).expect("an accepted id maps to a valid reference");
            assert_eq!(parsed.to_string(), target, "the target of {id:?} is canonical");
        }
        Ok(target) => {
            assert_eq!(normalize_name(&target).ok().as_ref(), Some(&target), "the target of {id:?} is a canonical NAME")
        }
        Err(err) => {
            assert!(matches!(err.code, "INVALID_ID" | "NOT_FOUND"), "{id:?}: unexpected code {}", err.code);
            assert!(is_valid_exec_id(id) || err.code == "INVALID_ID", "{id:?} is no exec id, so INVALID_ID");
        }
    }
}

/// `op://` references. Properties: an accepted reference prints back exactly as it was
/// written (so parse(display(parse(x))) == parse(x)), and every name in it is non-empty and
/// holds no '/'.
pub fn reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(parsed) = SecretRef::parse(text) else { return };
    let shown = parsed.to_string();
    assert_eq!(SecretRef::parse(&shown).as_ref(), Ok(&parsed), "parse(display(parse(x))) == parse(x)");
    assert_eq!(shown, text, "an accepted reference prints back as written");
    assert!(parsed.names().iter().all(|n| !n.is_empty() && !n.contains('/')), "{parsed:?}");
}

/// `--watch PATH=[NAME=]op://…`. Properties: an accepted spec has a path, a canonical NAME
/// and a reference that re-parses to itself, and the spec written out in full
/// (`PATH=NAME=REF`) parses to the same spec.
pub fn watch_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = WatchSpec::parse(text) else { return };
    assert!(!spec.path.as_os_str().is_empty(), "{text:?}: empty path accepted");
    assert_eq!(normalize_name(&spec.name).ok().as_ref(), Some(&spec.name), "{text:?}: the name is canonical");
    assert_eq!(SecretRef::parse(&spec.reference.to_string()).as_ref(), Ok(&spec.reference));
    let full = format!("{}={}={}", spec.path.display(), spec.name, spec.reference);
    assert_eq!(WatchSpec::parse(&full).as_ref(), Ok(&spec), "{text:?} written out as {full:?}");
}

/// Whatever `op` prints: the input as `op item get --format json` output, then as stderr.
///
/// As item JSON: anything but an object is an error; for references derived from the
/// item's own labels, ids and sections (and a few fixed ones) a field is read, written and
/// read again, and a write that succeeded is read back. The `updated_at` timestamp is parsed.
/// As stderr: the error is classified with names taken from its own words (so blanking a name
/// meets every position), the retry pause computed from its class (a 429's stated delay), and
/// the whole text is parsed as a timestamp.
pub fn op_output(data: &[u8]) {
    let json: Option<Json> = serde_json::from_slice(data).ok();
    if let Ok(mut item) = ItemJson::parse(data) {
        let json = json.as_ref().expect("an accepted item is JSON");
        assert!(json.is_object(), "only an object is an item");
        for reference in derived_refs(json) {
            let _ = item.field_value(&reference);
            if item.set_field(&reference, "fuzz-written").is_ok() {
                let read = item.field_value(&reference).expect("a written field can be read back");
                assert_eq!(read.as_slice(), b"fuzz-written", "{reference} reads back what was written");
            }
        }
        if let Some(stamp) = json.get("updated_at").and_then(Json::as_str) {
            let _ = parse_rfc3339(stamp);
        }
    }
    let text = String::from_utf8_lossy(data);
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | ':'))
        .filter(|w| !w.is_empty())
        .take(4)
        .collect();
    let error = classify(data, "exit status: 1", &words);
    // A stated 429 delay goes straight into the retry pause.
    let _ = RetryPolicy::default().delay(1, error.kind);
    let _ = parse_rfc3339(&text);
}

/// References into an item built from its fields' labels and ids and their sections' labels
/// and ids, as a user would write them, plus fixed ones for fields and sections that may not
/// exist yet.
fn derived_refs(item: &Json) -> Vec<SecretRef> {
    let mut texts = vec!["op://v/i/password".to_string(), "op://v/i/New Section/new field".to_string()];
    let fields = item.get("fields").and_then(Json::as_array).map(Vec::as_slice).unwrap_or_default();
    for field in fields.iter().take(MAX_CHECKED) {
        let names = |value: Option<&Json>| -> Vec<String> {
            ["label", "id"]
                .iter()
                .filter_map(|key| value.and_then(|v| v.get(key)).and_then(Json::as_str).map(str::to_string))
                .collect()
        };
        for name in names(Some(field)) {
            texts.push(format!("op://v/i/{name}"));
            for section in names(field.get("section")) {
                texts.push(format!("op://v/i/{section}/{name}"));
            }
        }
    }
    texts.iter().filter_map(|text| SecretRef::parse(text).ok()).take(4 * MAX_CHECKED).collect()
}

/// Durations of the command line (`500ms`, `10s`, `2m`, `1h`): no input panics. (No
/// round-trip property: the value goes through an `f64`, so `1234ms` may come back a
/// nanosecond short, which is harmless for a timeout.)
pub fn duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_duration(text);
}
