//! `op-bridge get` without a NAME: OpenClaw's exec secret-provider protocol.
//!
//! The contract, as OpenClaw 2026.9 implements it (`dist/resolve-*.mjs`, `resolveExecRefs`
//! and `parseExecValues`):
//!
//! - OpenClaw runs the command without a shell, in the command's directory, with an empty
//!   environment except `passEnv`/`env` entries and `OPENCLAW_CLI=1`, and writes
//!   `JSON.stringify({protocolVersion:1,provider:"<alias>",ids:[…]})` to stdin (no trailing
//!   newline), then closes it. The ids are deduplicated; at most 512, at most 256 KiB.
//! - It trims stdout and requires `{"protocolVersion":1,"values":{…}}`; `errors` is optional,
//!   `{"<id>":{"code":"…"}}`. Only the codes `NOT_FOUND` and `AMBIGUOUS_DUPLICATE_KEY` are
//!   shown to the operator; any other code is reported as a provider error for that id. Any
//!   `message` is ignored by OpenClaw but helps a person running the command by hand.
//! - A value must be a non-empty string. An id missing from both maps is "not found".
//! - A non-zero exit, a timeout (5 s by default), more than 1 MiB of stdout plus stderr, or
//!   a reply that is not such an object fails the whole batch.
//!
//! So a non-zero exit is reserved for batches that cannot be served at all (unreadable
//! request, daemon unreachable or refusing us); every per-id problem is an `errors` entry.
//!
//! An id is an OpenClaw exec id (`^[A-Za-z0-9][A-Za-z0-9._:/#-]{0,255}$`, no `.` or `..`
//! segment) naming a secret as a NAME, an `op://` reference, `vault/item/field`,
//! `vault/item/section/field`, or `opb64:<base64url of a reference>` — the forms of
//! OpenClaw's own 1Password plugin (`dist/extensions/onepassword/onepassword-secret-id.js`),
//! decoded with the same checks. All GETs go to the daemon pipelined on one connection, so a
//! batch of 512 ids costs one round trip.
//!
//! The whole answer fits in OpenClaw's 5 s: the default `--timeout` here is
//! [`EXEC_TIMEOUT`] (4 s), and within it a daemon that answers `ERR busy` (connection limit,
//! bytes-in-flight budget) is asked again after a short backoff instead of failing the batch.

use std::io::{IsTerminal, Read, Write};

use base64::Engine;
use serde_json::{Map, Value as Json, json};
use zeroize::Zeroizing;

use crate::cli::ClientArgs;
use crate::client::CommandError;
use crate::protocol::{NOT_AVAILABLE, Reply, Request, UNKNOWN_REF, normalize_name};
use crate::reference::SecretRef;
use crate::scrub::scrub;

/// Largest request accepted on stdin (OpenClaw itself sends at most 256 KiB).
const MAX_REQUEST: u64 = 1024 * 1024;
/// Longest exec id OpenClaw accepts.
const MAX_ID: usize = 256;
/// Longest decoded `opb64:` reference OpenClaw's 1Password plugin accepts.
const MAX_NATIVE_REF: usize = 2048;
const OPB64_PREFIX: &str = "opb64:";

/// Per-id error codes. OpenClaw surfaces `NOT_FOUND` as such and every other code as a
/// provider error for that id.
const NOT_FOUND: &str = "NOT_FOUND";
const INVALID_ID: &str = "INVALID_ID";
const UNAVAILABLE: &str = "UNAVAILABLE";
const INVALID_VALUE: &str = "INVALID_VALUE";

/// Why an id names no GET target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdError {
    /// `INVALID_ID` when OpenClaw itself would reject the id, else `NOT_FOUND`.
    pub code: &'static str,
    pub message: &'static str,
}

fn invalid(message: &'static str) -> IdError {
    IdError { code: INVALID_ID, message }
}

fn unknown(message: &'static str) -> IdError {
    IdError { code: NOT_FOUND, message }
}

/// OpenClaw's exec id grammar (`ref-contract`: `EXEC_SECRET_REF_ID_PATTERN` and the
/// traversal-segment rule).
pub fn is_valid_exec_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_ID
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'#' | b'-'))
        && !id.split('/').any(|segment| segment == "." || segment == "..")
}

/// Maps an exec-provider id to a GET target: an upper-cased NAME or a canonical `op://`
/// reference.
pub fn id_to_target(id: &str) -> Result<String, IdError> {
    if !is_valid_exec_id(id) {
        return Err(invalid("not an OpenClaw exec id: ^[A-Za-z0-9][A-Za-z0-9._:/#-]{0,255}$, no '.' or '..' segment"));
    }
    if let Some(payload) = id.strip_prefix(OPB64_PREFIX) {
        return reference_target(&decode_opb64(payload)?);
    }
    if id.contains('/') {
        return reference_target(id);
    }
    normalize_name(id).map_err(|_| unknown("not a secret name ([A-Za-z0-9_.-], at most 128) nor a reference"))
}

/// Decodes an `opb64:` payload exactly as OpenClaw's 1Password plugin does: unpadded
/// base64url that re-encodes to itself, holding a printable-ASCII reference.
fn decode_opb64(payload: &str) -> Result<String, IdError> {
    let malformed = || unknown("opb64 payload is not canonical unpadded base64url of a UTF-8 reference");
    if payload.is_empty() || !payload.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(malformed());
    }
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let bytes = engine.decode(payload).map_err(|_| malformed())?;
    // Rejects the non-zero trailing bits a lenient decoder would accept.
    if engine.encode(&bytes) != payload {
        return Err(malformed());
    }
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    if text.len() > MAX_NATIVE_REF {
        return Err(unknown("opb64 reference is longer than 2048 bytes"));
    }
    if text.trim() != text || text.starts_with('/') || text.contains('\\') {
        return Err(unknown("opb64 reference has surrounding whitespace, a leading '/' or a backslash"));
    }
    if !text.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(unknown("opb64 reference is not printable ASCII"));
    }
    if text.split('/').any(|segment| segment == "." || segment == "..") {
        return Err(unknown("opb64 reference has a '.' or '..' segment"));
    }
    Ok(text)
}

/// `op://vault/item/[section/]field[?query]` or the same without `op://`.
fn reference_target(text: &str) -> Result<String, IdError> {
    let reference = if text.starts_with("op://") { text.to_string() } else { format!("op://{text}") };
    SecretRef::parse(&reference)
        .map(|r| r.to_string())
        .map_err(|_| unknown("expected op://vault/item/[section/]field or vault/item/[section/]field"))
}

/// Reads the request from stdin, answers it on stdout.
pub async fn serve_stdin(args: &ClientArgs) -> Result<(), CommandError> {
    let stdin = std::io::stdin();
    // Without this a person typing `op-bridge get` would wait on a silent terminal.
    if stdin.is_terminal() {
        return Err(CommandError::Usage(
            "usage: op-bridge get NAME — without NAME, get reads an OpenClaw exec-provider request \
             ({\"protocolVersion\":1,\"ids\":[...]}) from stdin"
                .into(),
        ));
    }
    let mut input = Vec::new();
    stdin
        .lock()
        .take(MAX_REQUEST + 1)
        .read_to_end(&mut input)
        .map_err(|e| CommandError::Io(format!("cannot read the exec-provider request from stdin: {e}")))?;
    if input.len() as u64 > MAX_REQUEST {
        return Err(CommandError::Usage(format!("exec-provider request larger than {MAX_REQUEST} bytes")));
    }
    let ids = parse_request(&input)?;
    let output = answer(args, &ids).await?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&output)
        .and_then(|()| stdout.flush())
        .map_err(|e| CommandError::Io(format!("cannot write to stdout: {e}")))
}

/// Extracts the ids of a request (deduplicated, order kept).
pub fn parse_request(input: &[u8]) -> Result<Vec<String>, CommandError> {
    let usage = |why: &str| {
        CommandError::Usage(format!(
            "{why}; `op-bridge get` without NAME expects an OpenClaw exec request on stdin: \
             {{\"protocolVersion\":1,\"ids\":[...]}}"
        ))
    };
    let request: Json = serde_json::from_slice(input).map_err(|_| usage("stdin is not JSON"))?;
    match request.get("protocolVersion").and_then(Json::as_u64) {
        Some(1) => {}
        Some(v) => return Err(usage(&format!("unsupported protocolVersion {v}"))),
        None => return Err(usage("missing protocolVersion")),
    }
    let ids = request.get("ids").and_then(Json::as_array).ok_or_else(|| usage("missing ids"))?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let id = id.as_str().ok_or_else(|| usage("ids must be strings"))?;
        if seen.insert(id) {
            out.push(id.to_string());
        }
    }
    Ok(out)
}

fn error_entry(code: &str, message: &str) -> Json {
    json!({ "code": code, "message": message })
}

/// The `errors` entry for a GET the daemon refused: a name or reference it does not hold is
/// `NOT_FOUND`; one it holds without a value (its resolution failed) is `UNAVAILABLE` with
/// the daemon's reason, which names the secret and the failure, never a value (DESIGN §7).
fn refusal_entry(message: &str) -> Json {
    if message.starts_with(UNKNOWN_REF) && !message.contains(NOT_AVAILABLE) {
        json!({ "code": NOT_FOUND })
    } else {
        error_entry(UNAVAILABLE, message)
    }
}

/// The exec provider's default `--timeout`: below OpenClaw's 5 s, with room to start up.
pub const EXEC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// First pause before asking a busy daemon again; it doubles up to [`BUSY_PAUSE_MAX`].
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
const BUSY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(400);

fn is_busy(message: &str) -> bool {
    message.starts_with(crate::protocol::BUSY)
}

/// Sends the GETs, asking again while the daemon says `busy` and the budget lasts. Replies
/// other than `busy` are kept from the first attempt that got them; only busy ones are re-sent.
async fn get_all(args: &ClientArgs, targets: &[String]) -> Result<Vec<Reply>, CommandError> {
    let budget = args.timeout.unwrap_or(EXEC_TIMEOUT);
    let deadline = tokio::time::Instant::now() + budget;
    let mut replies: Vec<Option<Reply>> = targets.iter().map(|_| None).collect();
    let mut pause = BUSY_PAUSE;
    loop {
        let todo: Vec<usize> = (0..targets.len()).filter(|&i| replies[i].is_none()).collect();
        let batch: Vec<Request> = todo.iter().map(|&i| Request::Get(targets[i].clone())).collect();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = async {
            crate::client::Client::connect_trusting(&args.socket, left, args.server_uid).await?.call_many(&batch).await
        };
        let busy_left = match attempt.await {
            Ok(got) => {
                for (&i, reply) in todo.iter().zip(got) {
                    if !matches!(&reply, Reply::Err(message) if is_busy(message)) {
                        replies[i] = Some(reply);
                    }
                }
                replies.iter().any(Option::is_none)
            }
            Err(crate::client::ClientError::Refused(message)) if is_busy(&message) => true,
            Err(err) => return Err(err.into()),
        };
        let now = tokio::time::Instant::now();
        if !busy_left {
            break;
        }
        if now + pause >= deadline {
            // Out of budget: what is still busy is reported per id, the batch itself stands.
            break;
        }
        tracing::debug!("daemon busy; asking again in {pause:?}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(BUSY_PAUSE_MAX);
    }
    Ok(replies
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Reply::Err(format!("{}op-bridge is overloaded", crate::protocol::BUSY))))
        .collect())
}

/// Resolves `ids` through the daemon and encodes the exec-provider reply (one JSON object
/// and a newline; OpenClaw trims stdout).
pub async fn answer(args: &ClientArgs, ids: &[String]) -> Result<Zeroizing<Vec<u8>>, CommandError> {
    let mut errors = Map::new();
    let mut asked: Vec<&String> = Vec::with_capacity(ids.len());
    let mut targets: Vec<String> = Vec::with_capacity(ids.len());
    for id in ids {
        match id_to_target(id) {
            Ok(target) => {
                asked.push(id);
                targets.push(target);
            }
            Err(why) => {
                errors.insert(id.clone(), error_entry(why.code, why.message));
            }
        }
    }
    let mut values = Map::new();
    if !targets.is_empty() {
        let replies = get_all(args, &targets).await?;
        for (id, reply) in asked.into_iter().zip(replies) {
            match reply {
                // OpenClaw requires a non-empty string for every credential.
                Reply::Value(bytes) if bytes.is_empty() => {
                    errors.insert(id.clone(), error_entry(INVALID_VALUE, "the value is empty"));
                }
                Reply::Value(bytes) => match std::str::from_utf8(&bytes) {
                    Ok(text) => {
                        values.insert(id.clone(), Json::String(text.to_string()));
                    }
                    Err(_) => {
                        errors.insert(id.clone(), error_entry(INVALID_VALUE, "the value is not UTF-8"));
                    }
                },
                Reply::Err(message) => {
                    errors.insert(id.clone(), refusal_entry(&message));
                }
                Reply::Ok(_) => {
                    errors.insert(id.clone(), error_entry(UNAVAILABLE, "GET answered without a value"));
                }
            }
        }
    }
    let mut reply = json!({ "protocolVersion": 1, "values": values });
    if !errors.is_empty() {
        reply["errors"] = Json::Object(errors);
    }
    let encoded = encode_zeroizing(&reply);
    scrub(&mut reply);
    encoded
}

/// Encodes `reply` into a buffer sized exactly beforehand, so that growing it never leaves
/// an unzeroized copy of the values behind.
fn encode_zeroizing(reply: &Json) -> Result<Zeroizing<Vec<u8>>, CommandError> {
    let fail = |e: serde_json::Error| CommandError::Io(format!("cannot encode the reply: {e}"));
    let mut out = crate::locked::ZeroizingWriter::with_capacity(4096);
    serde_json::to_writer(&mut out, reply).map_err(fail)?;
    let mut out = out.0;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opb64(text: &str) -> String {
        format!("opb64:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text))
    }

    #[test]
    fn ids_map_to_targets() {
        assert_eq!(id_to_target("api_key").unwrap(), "API_KEY");
        assert_eq!(id_to_target("Api.Key-2").unwrap(), "API.KEY-2");
        assert_eq!(id_to_target("op://v/i/f").unwrap(), "op://v/i/f");
        assert_eq!(id_to_target("v/i/f").unwrap(), "op://v/i/f");
        assert_eq!(id_to_target("v/i/s/f").unwrap(), "op://v/i/s/f");
        assert_eq!(id_to_target(&opb64("op://My Vault/item/field")).unwrap(), "op://My Vault/item/field");
        assert_eq!(id_to_target(&opb64("My Vault/item/sec/field")).unwrap(), "op://My Vault/item/sec/field");
        let otp = opb64("v/i/one-time password?attribute=otp");
        assert_eq!(id_to_target(&otp).unwrap(), "op://v/i/one-time password?attribute=otp");
        let longest = format!("a{}", "b".repeat(255));
        assert_eq!(id_to_target(&longest).unwrap_err().code, NOT_FOUND, "a valid id, but too long for a NAME");
    }

    #[test]
    fn ids_openclaw_rejects_are_invalid() {
        let padded = format!("{}=", opb64("v/i/f1"));
        for id in ["", "has space", "-lead", "_lead", "/abs/i/f", "v/./i/f", "v/../f", "a?b", &padded] {
            assert_eq!(id_to_target(id).unwrap_err().code, INVALID_ID, "{id:?}");
        }
        assert_eq!(id_to_target(&"a".repeat(257)).unwrap_err().code, INVALID_ID);
        assert!(is_valid_exec_id(&"a".repeat(256)));
    }

    #[test]
    fn well_formed_ids_naming_nothing_are_not_found() {
        for id in [
            "v/i".to_string(),
            "a/b/c/d/e".to_string(),
            "aws:key".to_string(),
            "opb64:".to_string(),
            "opb64:a#b".to_string(),
            "opb64:dh".to_string(),
            opb64(" v/i/f"),
            opb64("/v/i/f"),
            opb64("v\\i/f/g"),
            opb64("v/../f"),
            opb64("v/i/caf\u{e9}"),
            opb64("v/i"),
        ] {
            let err = id_to_target(&id).unwrap_err();
            assert_ne!(err.code, INVALID_ID, "{id:?} is a valid exec id ({err:?})");
        }
        // "dg" decodes to "v"; "dh" has non-zero trailing bits, so it is not canonical.
        assert_eq!(decode_opb64("dg").unwrap(), "v");
    }

    #[test]
    fn requests_parse_and_dedupe() {
        let ids = parse_request(br#"{"protocolVersion":1,"provider":"op","ids":["a","b","a"]}"#).unwrap();
        assert_eq!(ids, vec!["a", "b"]);
        assert!(parse_request(b"{}").is_err());
        assert!(parse_request(b"").is_err());
        assert!(parse_request(b"garbage").is_err());
        assert!(parse_request(br#"{"protocolVersion":2,"ids":[]}"#).is_err());
        assert!(parse_request(br#"{"protocolVersion":1,"ids":[1]}"#).is_err());
        assert_eq!(parse_request(br#"{"protocolVersion":1,"ids":[]}"#).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn refusals_map_to_codes() {
        assert_eq!(refusal_entry("unknown ref: X"), json!({ "code": "NOT_FOUND" }));
        assert_eq!(refusal_entry("unknown ref: X (not available: 429)")["code"], "UNAVAILABLE");
    }

    #[test]
    fn encoding_is_one_line() {
        let out = encode_zeroizing(&json!({ "protocolVersion": 1, "values": { "a": "x\ny" } })).unwrap();
        assert_eq!(&out[..], b"{\"protocolVersion\":1,\"values\":{\"a\":\"x\\ny\"}}\n");
    }
}
