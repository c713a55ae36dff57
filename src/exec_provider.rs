//! `op-bridge get` without a NAME: OpenClaw's exec secret-provider protocol.
//!
//! OpenClaw writes one JSON object to stdin (no trailing newline) and closes it:
//! `{"protocolVersion":1,"provider":"<alias>","ids":["…"]}`. We answer on stdout with
//! `{"protocolVersion":1,"values":{"<id>":"<value>"},"errors":{"<id>":{"code":"NOT_FOUND"}}}`
//! and exit 0; a non-zero exit fails the whole batch, so it is reserved for requests that
//! cannot be served at all (unreadable request, daemon unreachable).
//!
//! Ids may be a NAME, an `op://` reference, `vault/item/field`, `vault/item/section/field`,
//! or `opb64:<base64url of a reference>`. All GETs go to the daemon pipelined on one
//! connection, so a batch of 512 ids costs one round trip.

use std::io::{Read, Write};

use base64::Engine;
use serde_json::{Map, Value as Json, json};
use zeroize::Zeroizing;

use crate::backend::op::scrub;
use crate::cli::ClientArgs;
use crate::client::Client;
use crate::commands::CommandError;
use crate::protocol::{Reply, Request, normalize_name};

/// Largest request accepted on stdin.
const MAX_REQUEST: u64 = 1024 * 1024;
/// Longest id, as OpenClaw validates them.
const MAX_ID: usize = 256;

/// Maps an exec-provider id to a GET target (a NAME or an `op://` reference).
pub fn id_to_target(id: &str) -> Result<String, &'static str> {
    if id.is_empty() || id.len() > MAX_ID {
        return Err("id must be 1 to 256 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'#' | b'-')) {
        return Err("id may only hold [A-Za-z0-9._:/#-]");
    }
    if let Some(encoded) = id.strip_prefix("opb64:") {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|_| "opb64 id is not base64url")?;
        let text = String::from_utf8(bytes).map_err(|_| "opb64 id is not UTF-8")?;
        let reference = if text.starts_with("op://") { text } else { format!("op://{text}") };
        return crate::reference::SecretRef::parse(&reference)
            .map(|r| r.to_string())
            .map_err(|_| "opb64 id is not a valid reference");
    }
    if id.starts_with("op://") {
        return crate::reference::SecretRef::parse(id).map(|r| r.to_string()).map_err(|_| "invalid op:// reference");
    }
    if id.contains('/') {
        let reference = format!("op://{id}");
        return crate::reference::SecretRef::parse(&reference)
            .map(|r| r.to_string())
            .map_err(|_| "expected vault/item/[section/]field");
    }
    normalize_name(id).map_err(|_| "invalid secret name")
}

/// Reads the request from stdin, answers it on stdout.
pub async fn serve_stdin(args: &ClientArgs) -> Result<(), CommandError> {
    let mut input = Vec::new();
    std::io::stdin()
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

/// Resolves `ids` through the daemon and encodes the exec-provider reply.
pub async fn answer(args: &ClientArgs, ids: &[String]) -> Result<Zeroizing<Vec<u8>>, CommandError> {
    let mut errors = Map::new();
    let mut asked: Vec<(&String, Request)> = Vec::with_capacity(ids.len());
    for id in ids {
        match id_to_target(id) {
            Ok(target) => asked.push((id, Request::Get(target))),
            Err(why) => {
                errors.insert(id.clone(), json!({ "code": "INVALID_ID", "message": why }));
            }
        }
    }
    let mut values = Map::new();
    if !asked.is_empty() {
        let requests: Vec<Request> = asked.iter_mut().map(|(_, r)| std::mem::replace(r, Request::Ping)).collect();
        let replies = Client::connect(&args.socket, args.timeout).await?.call_many(&requests).await?;
        for ((id, _), reply) in asked.iter().zip(replies) {
            match reply {
                Reply::Value(bytes) if bytes.is_empty() => {
                    errors.insert((*id).clone(), json!({ "code": "EMPTY_VALUE" }));
                }
                Reply::Value(bytes) => match std::str::from_utf8(&bytes) {
                    Ok(text) => {
                        values.insert((*id).clone(), Json::String(text.to_string()));
                    }
                    Err(_) => {
                        errors
                            .insert((*id).clone(), json!({ "code": "INVALID_VALUE", "message": "value is not UTF-8" }));
                    }
                },
                Reply::Err(_) | Reply::Ok(_) => {
                    errors.insert((*id).clone(), json!({ "code": "NOT_FOUND" }));
                }
            }
        }
    }
    let mut reply = json!({ "protocolVersion": 1, "values": values });
    if !errors.is_empty() {
        reply["errors"] = Json::Object(errors);
    }
    let mut out = Zeroizing::new(Vec::with_capacity(4096));
    let encoded = serde_json::to_writer(&mut *out, &reply);
    scrub(&mut reply);
    encoded.map_err(|e| CommandError::Io(format!("cannot encode the reply: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_to_targets() {
        assert_eq!(id_to_target("api_key").unwrap(), "API_KEY");
        assert_eq!(id_to_target("op://v/i/f").unwrap(), "op://v/i/f");
        assert_eq!(id_to_target("v/i/f").unwrap(), "op://v/i/f");
        assert_eq!(id_to_target("v/i/s/f").unwrap(), "op://v/i/s/f");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("op://My Vault/item/field");
        assert_eq!(id_to_target(&format!("opb64:{b64}")).unwrap(), "op://My Vault/item/field");
        assert!(id_to_target("has space").is_err());
        assert!(id_to_target(&"a".repeat(257)).is_err());
        assert!(id_to_target("v/i").is_err());
    }

    #[test]
    fn requests_parse_and_dedupe() {
        let ids = parse_request(br#"{"protocolVersion":1,"provider":"op","ids":["a","b","a"]}"#).unwrap();
        assert_eq!(ids, vec!["a", "b"]);
        assert!(parse_request(b"{}").is_err());
        assert!(parse_request(b"garbage").is_err());
        assert!(parse_request(br#"{"protocolVersion":2,"ids":[]}"#).is_err());
    }
}
