//! The sealed restart cache and the write-back journal (issue 13): restarts that cost no
//! 1Password call, a sealed file, stale service during an outage, fail-closed on a revoked
//! token, and a SET that survives `kill -9` during an outage.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use serde_json::{Value as Json, json};

const TOKEN: &str = "ops_eyJzaWduSW5BZGRyZXNzIjoiZmFrZSJ9token";
const VALUE: &str = "multi\nline-sëcret-😀\n";

struct Setup {
    dir: TestDir,
    fake: FakeOp,
}

fn setup(tag: &str) -> Setup {
    let dir = TestDir::new(tag);
    let fake = FakeOp::new(&dir, json!({"Dev": {"db": {"password": VALUE}, "api": {"credential": "key-1"}}}));
    Setup { dir, fake }
}

fn cache_path(s: &Setup) -> String {
    s.dir.join("secrets.cache").display().to_string()
}

fn builder(s: &Setup, mode: &str, token: &str) -> BrokerBuilder {
    BrokerBuilder::new(&s.dir, mode)
        .fake_op(&s.fake)
        .args(["--cache".to_string(), cache_path(s), "--retries".into(), "1".into()])
        .env("OP_SERVICE_ACCOUNT_TOKEN", token)
        .env("OP_DB_REF", "op://Dev/db/password")
        .env("OP_API_REF", "op://Dev/api/credential")
}

fn get(broker: &Broker, name: &str) -> Vec<u8> {
    let out = broker.client(&["get", name], None);
    assert!(out.status.success(), "get {name}: {}", describe(&out));
    out.stdout
}

fn status(broker: &Broker) -> Json {
    let out = broker.client(&["status", "--json"], None);
    assert!(out.status.success(), "status: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn state(status: &Json, name: &str) -> String {
    let secret = status["secrets"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap();
    secret["state"].as_str().unwrap().to_string()
}

fn stop(mut broker: Broker) {
    broker.signal(libc::SIGTERM);
    broker.wait(Duration::from_secs(30));
}

fn clear_calls(s: &Setup) {
    let _ = std::fs::remove_file(&s.fake.log);
}

/// First start: resolves from 1Password and writes the cache.
fn warm(s: &Setup) {
    let broker = builder(s, "daemon", TOKEN).start();
    assert_eq!(get(&broker, "DB"), VALUE.as_bytes());
    stop(broker);
    assert!(s.dir.join("secrets.cache").exists(), "no cache written");
    clear_calls(s);
}

#[test]
fn a_restart_within_cache_fresh_makes_no_op_call_and_a_crash_loop_costs_nothing() {
    let s = setup("cachefresh");
    warm(&s);
    let broker = builder(&s, "daemon", TOKEN).start();
    assert_eq!(get(&broker, "DB"), VALUE.as_bytes());
    assert_eq!(get(&broker, "API"), b"key-1");
    stop(broker);
    assert!(s.fake.calls().is_empty(), "restart called op: {:?}", s.fake.calls());

    for round in 0..10 {
        let out = builder(&s, "run", TOKEN).args(["--", "sh", "-c", "exit 3"]).output();
        assert_eq!(out.status.code(), Some(3), "round {round}: {}", describe(&out));
    }
    assert!(s.fake.calls().is_empty(), "crash loop called op: {:?}", s.fake.calls());
}

#[test]
fn the_cache_file_is_sealed_and_useless_under_another_token() {
    let s = setup("cachesealed");
    warm(&s);
    let path = s.dir.join("secrets.cache");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let raw = std::fs::read(&path).unwrap();
    for plain in ["sëcret", "multi", "key-1", TOKEN, "password", "credential", "op://", "Dev", "DB"] {
        assert!(!raw.windows(plain.len()).any(|w| w == plain.as_bytes()), "{plain:?} in the cache file");
    }

    let broker = builder(&s, "daemon", "ops_another_token").start();
    assert_eq!(get(&broker, "DB"), VALUE.as_bytes());
    assert!(!s.fake.calls().is_empty(), "another token must resolve from 1Password");
    assert!(broker.stderr().contains("cannot be opened with this token"), "{}", broker.stderr());
    stop(broker);
    // Replaced: the other token now starts from it without a call.
    clear_calls(&s);
    let broker = builder(&s, "daemon", "ops_another_token").start();
    assert_eq!(get(&broker, "DB"), VALUE.as_bytes());
    assert!(s.fake.calls().is_empty(), "{:?}", s.fake.calls());
}

#[test]
fn an_outage_at_start_serves_the_old_cache_as_stale_then_refreshes() {
    let s = setup("cachestale");
    warm(&s);
    s.fake.control(json!({"outage": true}));
    let broker = builder(&s, "daemon", TOKEN).args(["--cache-fresh", "0s"]).start();
    assert_eq!(get(&broker, "DB"), VALUE.as_bytes());
    let st = status(&broker);
    assert_eq!(state(&st, "DB"), "stale", "{st}");
    assert_eq!(state(&st, "API"), "stale", "{st}");

    let mut store = s.fake.read_store();
    store["Dev"]["api"]["credential"] = json!("key-2");
    s.fake.write_store(&store);
    s.fake.control(json!({}));
    assert!(
        eventually(Duration::from_secs(60), || get(&broker, "API") == b"key-2"),
        "not refreshed after the outage\n{}",
        broker.stderr()
    );
    let st = status(&broker);
    assert_eq!(state(&st, "DB"), "ok", "{st}");
}

#[test]
fn an_outage_with_a_cache_past_max_stale_fails_closed() {
    let s = setup("cachetooold");
    warm(&s);
    std::thread::sleep(Duration::from_millis(1100));
    s.fake.control(json!({"outage": true}));
    let out = builder(&s, "daemon", TOKEN).args(["--cache-fresh", "0s", "--cache-max-stale", "1s"]).output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
}

#[test]
fn a_revoked_token_at_start_exits_69_even_with_a_cache() {
    let s = setup("cacherevoked");
    warm(&s);
    s.fake.control(json!({"auth_fail": true}));
    let out = builder(&s, "run", TOKEN).args(["--cache-fresh", "0s", "--", "true"]).output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    assert!(!s.dir.join("secrets.cache").exists(), "the cache must be deleted on an auth failure");
}

#[test]
fn a_set_accepted_during_an_outage_survives_kill_9() {
    let s = setup("cachejournal");
    warm(&s);
    let mut broker = builder(&s, "daemon", TOKEN).start();
    s.fake.control(json!({"outage": true}));
    let out = broker.client(&["set", "API", "-"], Some(b"rotated-during-outage"));
    // The client is told the write is queued and retried (not stored yet).
    assert!(String::from_utf8_lossy(&out.stderr).contains("keeps retrying"), "{}", describe(&out));
    broker.signal(libc::SIGKILL);
    broker.wait(Duration::from_secs(10));
    s.fake.control(json!({}));

    let broker = builder(&s, "daemon", TOKEN).start();
    let stored = || s.fake.read_store()["Dev"]["api"]["credential"] == "rotated-during-outage";
    assert!(eventually(Duration::from_secs(30), stored), "journaled SET lost\n{}", broker.stderr());
    assert!(eventually(Duration::from_secs(10), || get(&broker, "API") == b"rotated-during-outage"));
    for call in s.fake.calls() {
        assert!(!call["argv"].to_string().contains("rotated"), "value in argv: {call}");
    }
    stop(broker);
    // Settled: the next start replays nothing.
    clear_calls(&s);
    let broker = builder(&s, "daemon", TOKEN).start();
    assert!(!broker.stderr().contains("replaying"), "{}", broker.stderr());
    assert!(s.fake.calls_of(&["item", "edit"]).is_empty());
}

#[test]
fn a_reference_gone_from_1password_never_falls_back_to_the_cache() {
    let s = setup("cachegone");
    warm(&s);
    let mut store = s.fake.read_store();
    store["Dev"].as_object_mut().unwrap().remove("api");
    s.fake.write_store(&store);
    let out = builder(&s, "daemon", TOKEN).args(["--cache-fresh", "0s"]).output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("API"), "{}", describe(&out));
    assert!(!s.dir.join("secrets.cache").exists(), "the cache must be deleted on a not-found");
}

#[test]
fn a_refused_start_drops_the_cached_values_but_never_the_journal() {
    let s = setup("cachekeepj");
    warm(&s);
    // A rotation accepted during an outage, journaled, then kill -9.
    let mut broker = builder(&s, "daemon", TOKEN).start();
    s.fake.control(json!({"outage": true}));
    let out = broker.client(&["set", "API", "-"], Some(b"rotated-before-the-crash"));
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    broker.signal(libc::SIGKILL);
    broker.wait(Duration::from_secs(10));
    s.fake.control(json!({}));
    // 1Password answers again, but another reference is gone: the start fails closed.
    let mut store = s.fake.read_store();
    let db = store["Dev"].as_object_mut().unwrap().remove("db").unwrap();
    s.fake.write_store(&store);
    let out = builder(&s, "daemon", TOKEN).args(["--cache-fresh", "0s"]).output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("rotated"), "{}", describe(&out));
    // The operator restores the item: the journaled rotation is still there and is stored.
    store["Dev"]["db"] = db;
    s.fake.write_store(&store);
    let broker = builder(&s, "daemon", TOKEN).start();
    let stored = || s.fake.read_store()["Dev"]["api"]["credential"] == "rotated-before-the-crash";
    assert!(eventually(Duration::from_secs(30), stored), "journaled SET lost\n{}", broker.stderr());
}

#[test]
fn a_value_picked_up_by_refresh_is_what_the_next_restart_serves() {
    let s = setup("cacherefresh");
    warm(&s);
    let broker = builder(&s, "daemon", TOKEN).start();
    let mut store = s.fake.read_store();
    store["Dev"]["api"]["credential"] = json!("key-rotated");
    s.fake.write_store(&store);
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(get(&broker, "API"), b"key-rotated");
    stop(broker);
    clear_calls(&s);
    let broker = builder(&s, "daemon", TOKEN).start();
    assert_eq!(get(&broker, "API"), b"key-rotated");
    assert!(s.fake.calls().is_empty(), "{:?}", s.fake.calls());
}
