//! `op-bridge get` as OpenClaw's exec secret provider: byte-exact OpenClaw requests on
//! stdin, an empty environment and the command's directory as cwd (as OpenClaw runs it),
//! every id form, unknown ids, 512-id batches, and a daemon that is down.

mod common;
use common::*;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

/// What OpenClaw 2026.9.6 wrote to a provider's stdin, captured from the real program
/// (`JSON.stringify({protocolVersion:1,provider,ids})`, no trailing newline).
const CAPTURED_REQUEST: &[u8] = br#"{"protocolVersion":1,"provider":"opb","ids":["op://Dev/api/key","Dev/nope/x"]}"#;

/// The request OpenClaw builds for `ids`: `JSON.stringify` keeps insertion order and adds no
/// whitespace or newline. (The ids here are ASCII, which both encoders escape alike.)
fn openclaw_request(provider: &str, ids: &[String]) -> Vec<u8> {
    let ids: Vec<String> = ids.iter().map(|id| serde_json::to_string(id).unwrap()).collect();
    format!(
        r#"{{"protocolVersion":1,"provider":{},"ids":[{}]}}"#,
        serde_json::to_string(provider).unwrap(),
        ids.join(",")
    )
    .into_bytes()
}

fn opb64(reference: &str) -> String {
    use base64::Engine;
    format!("opb64:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(reference))
}

/// Runs `op-bridge get [args]` the way OpenClaw does: no shell, an empty environment except
/// `OPENCLAW_CLI=1`, cwd = the command's directory, the request on stdin.
fn exec_get(args: &[&str], request: &[u8]) -> Output {
    let bin = bin();
    let mut cmd = Command::new(&bin);
    cmd.arg("get").args(args).env_clear().env("OPENCLAW_CLI", "1").current_dir(bin.parent().unwrap());
    run_with_input(cmd, Some(request), Duration::from_secs(60))
}

/// Parses a successful reply and checks the envelope OpenClaw validates.
fn reply(out: &Output) -> Json {
    assert_eq!(out.status.code(), Some(0), "{}", describe(out));
    let text = std::str::from_utf8(&out.stdout).unwrap();
    let json: Json = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {}", describe(out)));
    assert_eq!(json["protocolVersion"], 1, "{}", describe(out));
    assert!(json["values"].is_object(), "{}", describe(out));
    json
}

struct Fixture {
    _dir: TestDir,
    broker: Broker,
}

impl Fixture {
    fn socket(&self) -> &str {
        self.broker.socket.to_str().unwrap()
    }
}

/// A daemon on the file backend holding secrets in every shape an id can name.
fn daemon(tag: &str, extra: &[(String, String)]) -> Fixture {
    let dir = TestDir::new(tag);
    let vault = json!({
        "Dev": {
            "api": { "key": "sk-live-1", "multi": "line 1\nline \"2\"\t\u{e9}\u{1F511}" },
            "db": { "prod": { "password": "pw/with spaces" } },
        },
        "My Vault": { "item": { "token": "tok-spaced", "empty": "" } },
    });
    std::fs::write(dir.join("vault.json"), serde_json::to_vec(&vault).unwrap()).unwrap();
    let broker = BrokerBuilder::new(&dir, "daemon")
        .arg(format!("--backend=file:{}", dir.join("vault.json").display()))
        .arg("--allow-missing")
        .env("OP_API_KEY_REF", "op://Dev/api/key")
        .env("OP_MULTI_REF", "op://Dev/api/multi")
        .env("OP_DB_REF", "op://Dev/db/prod/password")
        .env("OP_SPACED_REF", "op://My Vault/item/token")
        .env("OP_EMPTY_REF", "op://My Vault/item/empty")
        .env("OP_GONE_REF", "op://Dev/gone/field")
        .envs(extra.to_vec())
        .start();
    Fixture { _dir: dir, broker }
}

#[test]
fn captured_openclaw_request_round_trips() {
    let fx = daemon("exec-captured", &[]);
    let out = exec_get(&["--socket", fx.socket()], CAPTURED_REQUEST);
    let json = reply(&out);
    assert_eq!(json["values"], json!({ "op://Dev/api/key": "sk-live-1" }), "{}", describe(&out));
    assert_eq!(json["errors"]["Dev/nope/x"]["code"], "NOT_FOUND", "{}", describe(&out));
    assert!(out.stderr.is_empty(), "{}", describe(&out));
}

#[test]
fn every_id_form_in_one_batch() {
    let fx = daemon("exec-forms", &[]);
    let resolved = [
        ("API_KEY", "sk-live-1"),
        ("api_key", "sk-live-1"),
        ("op://Dev/api/key", "sk-live-1"),
        ("Dev/api/key", "sk-live-1"),
        ("Dev/api/multi", "line 1\nline \"2\"\t\u{e9}\u{1F511}"),
        ("op://Dev/db/prod/password", "pw/with spaces"),
        ("Dev/db/prod/password", "pw/with spaces"),
        ("db", "pw/with spaces"),
    ];
    let spaced = [opb64("op://My Vault/item/token"), opb64("My Vault/item/token")];
    let not_found = [
        "NOPE".to_string(),
        "op://Dev/api/unregistered".to_string(),
        "Dev/nope/x".to_string(),
        "Dev/db/nope/password".to_string(),
        opb64("op://Dev/other/field"),
        // Valid exec ids that name no secret in any form op-bridge knows.
        "Dev/api".to_string(),
        "aws/secret#json_key".to_string(),
        "opb64:a#b".to_string(),
    ];
    let mut ids: Vec<String> = resolved.iter().map(|(id, _)| id.to_string()).collect();
    ids.extend(spaced.iter().cloned());
    ids.extend(not_found.iter().cloned());
    ids.push("gone".into());
    ids.push("empty".into());
    let out = exec_get(&["--socket", fx.socket()], &openclaw_request("onepassword", &ids));
    let json = reply(&out);
    for (id, value) in resolved {
        assert_eq!(json["values"][id], value, "id {id}: {}", describe(&out));
    }
    for id in &spaced {
        assert_eq!(json["values"][id], "tok-spaced", "id {id}: {}", describe(&out));
    }
    for id in &not_found {
        assert_eq!(json["errors"][id]["code"], "NOT_FOUND", "id {id}: {}", describe(&out));
        assert!(json["values"].get(id).is_none());
    }
    // Registered but never resolved: a provider error with the reason, not a value.
    assert_eq!(json["errors"]["gone"]["code"], "UNAVAILABLE", "{}", describe(&out));
    assert!(json["errors"]["gone"]["message"].as_str().unwrap().contains("GONE"), "{}", describe(&out));
    // OpenClaw rejects empty values, so an empty secret is an error entry, never "".
    assert!(json["values"].get("empty").is_none(), "{}", describe(&out));
    assert!(json["errors"]["empty"]["code"].is_string(), "{}", describe(&out));
    // Every id is answered exactly once.
    let answered = json["values"].as_object().unwrap().len() + json["errors"].as_object().unwrap().len();
    assert_eq!(answered, ids.len(), "{}", describe(&out));
    assert!(out.stderr.is_empty(), "{}", describe(&out));
}

#[test]
fn batch_of_512_ids_in_one_call() {
    let dir = TestDir::new("exec-512");
    let fields: serde_json::Map<String, Json> =
        (0..256).map(|i| (format!("f{i}"), json!(format!("value-{i}")))).collect();
    std::fs::write(dir.join("vault.json"), serde_json::to_vec(&json!({ "bulk": { "item": fields } })).unwrap())
        .unwrap();
    let refs: Vec<(String, String)> =
        (0..256).map(|i| (format!("OP_S{i}_REF"), format!("op://bulk/item/f{i}"))).collect();
    let broker = BrokerBuilder::new(&dir, "daemon")
        .arg(format!("--backend=file:{}", dir.join("vault.json").display()))
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl").display().to_string())
        .envs(refs)
        .start();
    // OpenClaw's limit is 512 ids per provider: 256 names and 256 references.
    let mut ids: Vec<String> = (0..256).map(|i| format!("s{i}")).collect();
    ids.extend((0..256).map(|i| format!("bulk/item/f{i}")));
    let request = openclaw_request("opb", &ids);
    assert!(request.len() <= 256 * 1024, "OpenClaw caps a request at 256 KiB");
    let started = Instant::now();
    let out = exec_get(&["--socket", broker.socket.to_str().unwrap()], &request);
    let elapsed = started.elapsed();
    let json = reply(&out);
    for i in 0..256 {
        assert_eq!(json["values"][format!("s{i}")], format!("value-{i}"), "{}", describe(&out));
        assert_eq!(json["values"][format!("bulk/item/f{i}")], format!("value-{i}"), "{}", describe(&out));
    }
    assert!(json.get("errors").is_none(), "{}", describe(&out));
    // Timing is reported, not asserted (a shared 2-core machine); the opt-in OpenClaw test
    // runs the same batch under OpenClaw's own 5 s timeout.
    eprintln!("512-id batch answered in {elapsed:?}");
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let gets: Vec<Json> =
        audit.lines().filter_map(|l| serde_json::from_str::<Json>(l).ok()).filter(|r| r["command"] == "GET").collect();
    assert_eq!(gets.len(), 512, "every GET is audited:\n{audit}");
    assert!(gets.iter().all(|r| r["pid"] == gets[0]["pid"]), "one client process asked:\n{audit}");
    assert!(!audit.contains("value-1"), "no value in the audit log");
}

#[test]
fn empty_batch_needs_no_daemon() {
    let out =
        exec_get(&["--socket", "/nonexistent/op-bridge.sock"], br#"{"protocolVersion":1,"provider":"opb","ids":[]}"#);
    assert_eq!(reply(&out), json!({ "protocolVersion": 1, "values": {} }));
}

#[test]
fn daemon_down_fails_the_batch_with_a_reason() {
    let dir = TestDir::new("exec-down");
    let socket = dir.join("absent.sock");
    let out = exec_get(&["--socket", socket.to_str().unwrap()], CAPTURED_REQUEST);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach op-bridge") && stderr.contains("absent.sock"), "{}", describe(&out));

    // A daemon that stopped leaves no socket behind; a stale socket file is refused the same.
    let fx = daemon("exec-stopped", &[]);
    let socket = fx.broker.socket.clone();
    drop(fx);
    let out = exec_get(&["--socket", socket.to_str().unwrap()], CAPTURED_REQUEST);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
}

#[test]
fn default_socket_is_used_with_an_empty_environment() {
    // With no --socket, no OP_BRIDGE_SOCKET and no XDG_RUNTIME_DIR, the client uses
    // /run/op-bridge/op-bridge.sock (DESIGN §2). Only checkable when no op-bridge on this
    // machine made /run/op-bridge or the /tmp last resort.
    use op_bridge::socket_path::{LAST_RESORT, RUN_DIR, RUN_SOCKET};
    if std::path::Path::new(RUN_DIR).exists() || std::path::Path::new(LAST_RESORT).exists() {
        eprintln!("skipped: {RUN_DIR} or {LAST_RESORT} exists on this machine");
        return;
    }
    let out = exec_get(&[], CAPTURED_REQUEST);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(RUN_SOCKET), "{}", describe(&out));
}

#[test]
fn malformed_requests_are_usage_errors() {
    let fx = daemon("exec-bad", &[]);
    for request in [&b""[..], b"not json", br#"{"protocolVersion":2,"ids":["a"]}"#, br#"{"protocolVersion":1}"#] {
        let out = exec_get(&["--socket", fx.socket()], request);
        assert_eq!(out.status.code(), Some(2), "{:?}: {}", String::from_utf8_lossy(request), describe(&out));
        assert!(out.stdout.is_empty(), "{}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("exec request"), "{}", describe(&out));
    }
}

#[test]
fn openclaw_rejected_ids_do_not_fail_the_batch() {
    let fx = daemon("exec-invalid", &[]);
    let ids: Vec<String> = vec!["API_KEY".into(), "has space".into(), "Dev/../api/key".into(), "a".repeat(257)];
    let out = exec_get(&["--socket", fx.socket()], &openclaw_request("opb", &ids));
    let json = reply(&out);
    assert_eq!(json["values"]["API_KEY"], "sk-live-1", "{}", describe(&out));
    for id in &ids[1..] {
        assert_eq!(json["errors"][id]["code"], "INVALID_ID", "{id}: {}", describe(&out));
    }
}

#[test]
fn values_never_reach_stderr() {
    let fx = daemon("exec-quiet", &[]);
    let ids: Vec<String> = vec!["API_KEY".into(), "NOPE".into()];
    let out = exec_get(&["--socket", fx.socket()], &openclaw_request("opb", &ids));
    reply(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("sk-live-1"));
    assert!(!fx.broker.stderr().contains("sk-live-1"), "{}", fx.broker.stderr());
}
