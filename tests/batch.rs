//! Batched resolution (issue 13): few `op` processes per pass, byte-exact values, a bad
//! reference narrowed down to its own error, and the periodic refresh.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value as Json, json};

/// 20 items of one field each, with values that exercise the template's framing.
fn twenty_items() -> (Json, Vec<(String, String, String)>) {
    let mut vault = serde_json::Map::new();
    let mut refs = Vec::new();
    for i in 0..20 {
        let value = match i % 4 {
            0 => format!("{{\"access\":\"a{i}\",\n \"refresh\":\"r{i}\"}}\n"),
            1 => format!("ünïcödé €{i} 😀\r\n\n"),
            2 => format!("{{{{ op://Dev/item{i}/f }}}} not a marker"),
            _ => format!("plain-{i}"),
        };
        vault.insert(format!("item{i}"), json!({ "f": value }));
        refs.push((format!("S{i}"), format!("op://Dev/item{i}/f"), value));
    }
    (json!({ "Dev": vault }), refs)
}

fn get(broker: &Broker, name: &str) -> Vec<u8> {
    let out = broker.client(&["get", name], None);
    assert!(out.status.success(), "get {name}: {}", describe(&out));
    out.stdout
}

#[test]
fn twenty_refs_resolve_in_at_most_concurrency_processes_byte_exact() {
    let dir = TestDir::new("batch20");
    let (store, refs) = twenty_items();
    let fake = FakeOp::new(&dir, store);
    let mut builder = BrokerBuilder::new(&dir, "daemon").fake_op(&fake).args(["--concurrency", "4"]);
    for (name, reference, _) in &refs {
        builder = builder.env(format!("OP_{name}_REF"), reference.clone());
    }
    let broker = builder.start();
    let calls = fake.calls();
    assert!(calls.len() <= 4, "{} op processes for 20 items with --concurrency 4: {calls:?}", calls.len());
    assert!(calls.iter().all(|c| c["argv"][0] == "inject" && c["exit"] == 0), "{calls:?}");
    // Every reference read exactly once.
    let templated: usize = calls.iter().map(|c| c["stdin"].as_str().unwrap().matches("{{ op://").count()).sum();
    assert_eq!(templated, 20);
    for (name, _, value) in &refs {
        assert_eq!(get(&broker, name), value.as_bytes(), "{name}");
    }
}

#[test]
fn a_failing_reference_inside_a_batch_gets_its_own_reason_and_the_others_resolve() {
    let dir = TestDir::new("batchbad");
    let fake = FakeOp::new(&dir, json!({"Dev": {"a": {"f": "va", "g": "vg"}, "b": {"f": "vb"}, "c": {"f": "vc"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .args(["--concurrency", "1", "--allow-missing"])
        .env("OP_A_REF", "op://Dev/a/f")
        .env("OP_G_REF", "op://Dev/a/g")
        .env("OP_GONE_REF", "op://Dev/gone/f")
        .env("OP_NOFIELD_REF", "op://Dev/b/nope")
        .env("OP_B_REF", "op://Dev/b/f")
        .env("OP_C_REF", "op://Dev/c/f")
        .start();
    for (name, value) in [("A", "va"), ("G", "vg"), ("B", "vb"), ("C", "vc")] {
        assert_eq!(get(&broker, name), value.as_bytes(), "{name}");
    }
    let out = broker.client(&["status", "--json"], None);
    let status: Json = serde_json::from_slice(&out.stdout).unwrap();
    let secret = |name: &str| status["secrets"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
    let gone = secret("GONE");
    assert_eq!(gone["state"], "missing");
    assert!(gone["error"].as_str().unwrap().contains("isn't an item"), "{gone}");
    let nofield = secret("NOFIELD");
    assert!(nofield["error"].as_str().unwrap().contains("does not have a field 'nope'"), "{nofield}");
    let stderr = broker.stderr();
    assert!(stderr.contains("GONE") && stderr.contains("NOFIELD"), "{stderr}");
}

#[test]
fn refresh_interval_picks_up_a_changed_value_without_sighup() {
    let dir = TestDir::new("batchtick");
    let fake = FakeOp::new(&dir, json!({"Dev": {"a": {"f": "old"}, "b": {"f": "other"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .args(["--refresh-interval", "1s"])
        .env("OP_A_REF", "op://Dev/a/f")
        .env("OP_B_REF", "op://Dev/b/f")
        .start();
    assert_eq!(get(&broker, "A"), b"old");
    let mut store = fake.read_store();
    store["Dev"]["a"]["f"] = json!("new");
    fake.write_store(&store);
    assert!(
        eventually(Duration::from_secs(30), || get(&broker, "A") == b"new"),
        "the timer never picked up the change\n{}",
        broker.stderr()
    );
    let out = broker.client(&["status", "--json"], None);
    let status: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["refresh"]["next_refresh_s"].is_u64(), "{status}");
    assert!(status["refresh"]["reads_last_hour"].as_u64().unwrap() >= 4, "{status}");
}

#[test]
fn a_refresh_interval_over_the_read_budget_is_warned_about() {
    let dir = TestDir::new("batchbudget");
    let fake = FakeOp::new(&dir, json!({"Dev": {"a": {"f": "1"}, "b": {"f": "2"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .args(["--refresh-interval", "1m", "--read-budget", "100"])
        .env("OP_A_REF", "op://Dev/a/f")
        .env("OP_B_REF", "op://Dev/b/f")
        .start();
    // 2 items every minute = 120 reads/hour > 100.
    assert!(eventually(Duration::from_secs(5), || broker.stderr().contains("--read-budget")), "{}", broker.stderr());
}
