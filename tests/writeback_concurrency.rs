//! Write-back under concurrency: the ways a rotation used to be lost, rolled back or silently
//! dropped, each reproduced with the fake `op` (per-call latency, a per-item slow-down, item
//! versions) and checked end to end: 1Password's store, op-bridge's memory and the watched file.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value as Json, json};

fn get(store: &Json, item: &str, field: &str) -> Option<String> {
    store["Dev"][item][field].as_str().map(str::to_string)
}

fn wait_store(fake: &FakeOp, item: &str, field: &str, want: &str) -> bool {
    eventually(Duration::from_secs(30), || get(&fake.read_store(), item, field).as_deref() == Some(want))
}

fn write_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn watch_arg(path: &Path, reference: &str) -> [String; 2] {
    ["--watch".into(), format!("{}={reference}", path.display())]
}

/// A daemon watching `file` for `reference`, with a short debounce.
fn watching(dir: &TestDir, fake: &FakeOp, file: &Path, reference: &str) -> BrokerBuilder {
    BrokerBuilder::new(dir, "daemon").fake_op(fake).args(watch_arg(file, reference)).args(["--debounce", "100ms"])
}

/// An OAuth item with an access and a refresh token, each watched in its own file.
fn oauth_pair(tag: &str, debounce: &str) -> (TestDir, FakeOp, PathBuf, PathBuf, Broker) {
    let dir = TestDir::new(tag);
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"access": "A0", "refresh": "R0"}}}));
    let (access, refresh) = (dir.join("creds/access"), dir.join("creds/refresh"));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .args(watch_arg(&access, "op://Dev/OAuth/access"))
        .args(watch_arg(&refresh, "op://Dev/OAuth/refresh"))
        .args(["--debounce", debounce])
        .start();
    assert_eq!(std::fs::read_to_string(&access).unwrap(), "A0");
    (dir, fake, access, refresh, broker)
}

fn successful_edits(fake: &FakeOp) -> Vec<Json> {
    fake.calls_of(&["item", "edit"]).into_iter().filter(|c| c["exit"] == 0).collect()
}

fn status(broker: &Broker) -> Json {
    let out = broker.client(&["status", "--json"], None);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn two_fields_of_one_item_are_both_kept() {
    let (_dir, fake, access, refresh, broker) = oauth_pair("wbc-two", "100ms");
    // Every op call takes 700 ms from here on, so both captures land while one write runs;
    // and no version check saves a read-modify-write that overwrites another.
    fake.control(json!({"delay_ms": 700, "no_version_check": true}));
    let edits_before = successful_edits(&fake).len();
    write_file(&access, "A1");
    std::thread::sleep(Duration::from_millis(30));
    write_file(&refresh, "R1");
    assert!(wait_store(&fake, "OAuth", "access", "A1"), "access lost: {}", fake.read_store());
    assert!(wait_store(&fake, "OAuth", "refresh", "R1"), "refresh lost: {}", fake.read_store());
    // Both values stay: a later edit must not have erased either.
    std::thread::sleep(Duration::from_millis(2500));
    let store = fake.read_store();
    assert_eq!(get(&store, "OAuth", "access").as_deref(), Some("A1"), "{store}");
    assert_eq!(get(&store, "OAuth", "refresh").as_deref(), Some("R1"), "{store}");
    let edits = successful_edits(&fake).len() - edits_before;
    assert!(edits <= 2, "two fields rotated together cost {edits} edits");
    assert_eq!(broker.client(&["get", "ACCESS"], None).stdout, b"A1");
    assert_eq!(broker.client(&["get", "REFRESH"], None).stdout, b"R1");
}

#[test]
fn two_fields_rotated_within_50ms_cost_one_edit() {
    let (_dir, fake, access, refresh, broker) = oauth_pair("wbc-one", "200ms");
    let edits_before = successful_edits(&fake).len();
    write_file(&access, "A1");
    std::thread::sleep(Duration::from_millis(40));
    write_file(&refresh, "R1");
    assert!(wait_store(&fake, "OAuth", "access", "A1"), "{}", fake.read_store());
    assert!(wait_store(&fake, "OAuth", "refresh", "R1"), "{}", fake.read_store());
    std::thread::sleep(Duration::from_millis(1000));
    let edits = &successful_edits(&fake)[edits_before..];
    assert_eq!(edits.len(), 1, "expected one edit carrying both fields: {edits:?}\n{}", broker.stderr());
}

#[test]
fn a_refresh_that_read_the_old_value_never_rolls_a_rotation_back() {
    let dir = TestDir::new("wbc-roll");
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"refresh": "C0"}, "Slow": {"key": "k"}}}));
    let file = dir.join("creds/refresh");
    let mut broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .env("OP_SLOW_REF", "op://Dev/Slow/key")
        .args(watch_arg(&file, "op://Dev/OAuth/refresh"))
        .args(["--debounce", "100ms"])
        .start();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "C0");
    fake.control(json!({"item_delay_ms": {"Slow": 6000}}));
    let reads_before = fake.calls().len();
    let socket = broker.socket.clone();
    let refresh = std::thread::spawn(move || client(&socket, &["refresh"], None));
    // The refresh has read OAuth (C0) once the fake logged that call.
    let read_oauth =
        || fake.calls()[reads_before..].iter().any(|c| c["argv"].to_string().contains("OAuth") && c["exit"] == 0);
    assert!(eventually(Duration::from_secs(20), read_oauth), "the refresh never read OAuth: {:?}", fake.calls());
    write_file(&file, "C1");
    assert!(wait_store(&fake, "OAuth", "refresh", "C1"), "{}", broker.stderr());
    // The fake logs a call when it ends, just after it changed the store.
    assert!(eventually(Duration::from_secs(10), || !successful_edits(&fake).is_empty()));
    let stored_at = successful_edits(&fake).last().map(|c| c["ts"].as_f64().unwrap()).unwrap();
    let out = refresh.join().unwrap();
    let slow_done = fake
        .calls()
        .iter()
        .filter(|c| c["argv"].to_string().contains("Slow"))
        .filter_map(|c| c["ts"].as_f64())
        .fold(0.0, f64::max);
    assert!(slow_done > stored_at, "inconclusive: the slow read ended before the rotation was stored");
    assert!(out.status.success(), "{}", describe(&out));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "C1", "the refresh rolled the file back\n{}", broker.stderr());
    assert_eq!(broker.client(&["get", "REFRESH"], None).stdout, b"C1", "the refresh rolled memory back");
    assert_eq!(get(&fake.read_store(), "OAuth", "refresh").as_deref(), Some("C1"));

    // And the next start agrees: nothing is written back over C1.
    fake.control(json!({}));
    broker.signal(libc::SIGTERM);
    assert!(broker.wait(Duration::from_secs(20)).success(), "{}", broker.stderr());
    let _again = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .env("OP_SLOW_REF", "op://Dev/Slow/key")
        .args(watch_arg(&file, "op://Dev/OAuth/refresh"))
        .args(["--debounce", "100ms"])
        .start();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(get(&fake.read_store(), "OAuth", "refresh").as_deref(), Some("C1"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "C1");
}

#[test]
fn writes_after_the_watched_directory_is_deleted_and_made_again_are_stored() {
    let dir = TestDir::new("wbc-rmdir");
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"refresh": "C0"}}}));
    let config = dir.join("config");
    let file = config.join("creds.json");
    let broker = watching(&dir, &fake, &file, "op://Dev/OAuth/refresh").start();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "C0");
    std::fs::remove_dir_all(&config).unwrap();
    std::fs::create_dir(&config).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    write_file(&file, "after-reset-1");
    assert!(wait_store(&fake, "OAuth", "refresh", "after-reset-1"), "{}", broker.stderr());
    // Replaced by rename, then written: still followed.
    std::fs::rename(&config, dir.join("config.old")).unwrap();
    std::fs::create_dir(&config).unwrap();
    write_file(&file, "after-reset-2");
    assert!(wait_store(&fake, "OAuth", "refresh", "after-reset-2"), "{}", broker.stderr());
    // And a later plain rewrite is still seen.
    std::thread::sleep(Duration::from_millis(300));
    write_file(&file, "after-reset-3");
    assert!(wait_store(&fake, "OAuth", "refresh", "after-reset-3"), "{}", broker.stderr());
    // Reset and written at once, again and again: the new directory usually gets the old
    // inode number back, so only the events about the directory itself tell it changed.
    for cycle in 0..3 {
        std::fs::remove_dir_all(&config).unwrap();
        std::fs::create_dir(&config).unwrap();
        let value = format!("cycle-{cycle}");
        write_file(&file, &value);
        assert!(wait_store(&fake, "OAuth", "refresh", &value), "{}", broker.stderr());
    }
}

#[test]
fn the_final_pass_reads_every_watched_file() {
    let dir = TestDir::new("wbc-final");
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"refresh": "C0"}}}));
    let config = dir.join("config");
    let file = config.join("creds.json");
    let mut broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .args(watch_arg(&file, "op://Dev/OAuth/refresh"))
        .args(["--debounce", "5s"])
        .start();
    // The directory is swapped and the new file written: no event reaches the old watch.
    std::fs::rename(&config, dir.join("config.old")).unwrap();
    std::fs::create_dir(&config).unwrap();
    write_file(&file, "written-just-before-stop");
    broker.signal(libc::SIGTERM);
    let status = broker.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", broker.stderr());
    assert_eq!(get(&fake.read_store(), "OAuth", "refresh").as_deref(), Some("written-just-before-stop"));
}

#[test]
fn a_watch_on_a_field_that_does_not_exist_yet_starts_and_creates_it() {
    let dir = TestDir::new("wbc-newf");
    let fake = FakeOp::new(&dir, json!({"Dev": {"oauth": {"client_id": "abc"}}}));
    let file = dir.join("creds/refresh_token");
    let broker = watching(&dir, &fake, &file, "op://Dev/oauth/refresh_token").start();
    assert!(!file.exists());
    write_file(&file, "first-refresh-token");
    assert!(wait_store(&fake, "oauth", "refresh_token", "first-refresh-token"), "{}", broker.stderr());
    assert_eq!(get(&fake.read_store(), "oauth", "client_id").as_deref(), Some("abc"));
}

#[test]
fn set_to_a_reference_with_a_query_is_refused_and_changes_nothing() {
    let dir = TestDir::new("wbc-query");
    let fake = FakeOp::new(&dir, json!({"Dev": {"Login": {"password": "hunter2-original"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .env("OP_PWTYPE_REF", "op://Dev/Login/password?attribute=type")
        .start();
    let out = broker.client(&["set", "PWTYPE", "-"], Some(b"overwritten"));
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("query"), "{}", describe(&out));
    let out = broker.client(&["set", "PWTYPE", "op://Dev/Login/password?attribute=otp", "-"], Some(b"x"));
    assert!(!out.status.success(), "{}", describe(&out));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(&fake.read_store(), "Login", "password").as_deref(), Some("hunter2-original"));
    assert!(successful_edits(&fake).is_empty(), "{:?}", fake.calls());
}

/// Sets the file's mtime (seconds since the epoch) with touch(1).
fn set_mtime(path: &Path, epoch_seconds: u64) {
    let out =
        std::process::Command::new("touch").arg("-m").arg("-d").arg(format!("@{epoch_seconds}")).arg(path).output();
    assert!(out.unwrap().status.success());
}

#[test]
fn a_restart_with_a_stale_watched_file_keeps_1passwords_newer_value() {
    let dir = TestDir::new("wbc-stale");
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"refresh": "C0"}}}));
    let file: PathBuf = dir.join("creds/refresh");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    // The file was written an hour ago; 1Password was rotated since (by another replica).
    std::fs::write(&file, "stale-local").unwrap();
    let an_hour_ago = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 3600;
    set_mtime(&file, an_hour_ago);
    let edit = std::process::Command::new(fake_op_path())
        .args(["item", "edit", "OAuth", "--vault", "Dev", "refresh=rotated-elsewhere"])
        .envs(fake.env())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(edit.status.success(), "{edit:?}");
    let edits_before = successful_edits(&fake).len();
    let broker = watching(&dir, &fake, &file, "op://Dev/OAuth/refresh").start();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(get(&fake.read_store(), "OAuth", "refresh").as_deref(), Some("rotated-elsewhere"));
    assert_eq!(successful_edits(&fake).len(), edits_before, "the stale file was written back");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "rotated-elsewhere");
    assert_eq!(broker.client(&["get", "REFRESH"], None).stdout, b"rotated-elsewhere");
    let log = broker.stderr();
    assert!(log.contains("older") && !log.contains("stale-local"), "{log}");
}

#[test]
fn a_watched_file_newer_than_1password_is_written_back_at_start() {
    let dir = TestDir::new("wbc-newer");
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"refresh": "C0"}}}));
    let file: PathBuf = dir.join("creds/refresh");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    // Rotated locally while op-bridge was down (the fake's item was last updated in 2024).
    std::fs::write(&file, "rotated-while-down").unwrap();
    let _broker = watching(&dir, &fake, &file, "op://Dev/OAuth/refresh").start();
    assert!(wait_store(&fake, "OAuth", "refresh", "rotated-while-down"));
}

#[test]
fn a_refused_set_leaves_an_earlier_capture_of_the_same_target_pending() {
    let dir = TestDir::new("wbc-refused");
    // The item does not exist (and --create-items is off): every write to it is refused.
    let fake = FakeOp::new(&dir, json!({"Dev": {"Other": {"x": "1"}}}));
    let file = dir.join("creds/token");
    let mut broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .args(watch_arg(&file, "op://Dev/Gone/token"))
        .args(["--debounce", "100ms", "--grace", "2s"])
        .start();
    write_file(&file, "captured-rotation");
    let captured_tried = || fake.calls_of(&["item", "get"]).iter().any(|c| c["argv"].to_string().contains("Gone"));
    assert!(eventually(Duration::from_secs(20), captured_tried), "{}", broker.stderr());
    let out = broker.client(&["set", "TOKEN", "-"], Some(b"set-by-client"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    // The captured change is still pending, reported as failing, and in memory.
    let state = status(&broker);
    let target = &state["writeback"]["targets"][0];
    assert!(target["pending"].as_bool().unwrap() || target["in_flight"].as_bool().unwrap(), "{state}");
    assert_eq!(target["failing"], true, "{state}");
    assert!(state["writeback"]["failing"].as_u64().unwrap() >= 1, "{state}");
    assert_eq!(broker.client(&["get", "TOKEN"], None).stdout, b"captured-rotation");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "captured-rotation");
    broker.signal(libc::SIGTERM);
    let exit = broker.wait(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(75), "{}", broker.stderr());
    let log = broker.stderr();
    assert!(log.contains("ERROR") && log.contains("op://Dev/Gone/token"), "{log}");
    assert!(!log.contains("captured-rotation") && !log.contains("set-by-client"), "a value reached the log");
}

#[test]
fn a_set_that_is_queued_but_not_stored_says_so() {
    let dir = TestDir::new("wbc-pend");
    let fake = FakeOp::new(&dir, json!({"Dev": {"API": {"key": "k0"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .env("OP_KEY_REF", "op://Dev/API/key")
        .args(["--set-wait", "1s"])
        .start();
    fake.control(json!({"outage": true}));
    let out = broker.client(&["set", "KEY", "-"], Some(b"k1"));
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not stored"), "{}", describe(&out));
    fake.control(json!({}));
    assert!(wait_store(&fake, "API", "key", "k1"), "{}", broker.stderr());
    assert!(eventually(Duration::from_secs(10), || broker.client(&["get", "KEY"], None).stdout == b"k1"));
}

#[test]
fn a_concurrent_edit_elsewhere_is_not_overwritten() {
    let dir = TestDir::new("wbc-conflict");
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"refresh": "R0", "note": "n0"}}}));
    let file = dir.join("creds/refresh");
    let broker = watching(&dir, &fake, &file, "op://Dev/OAuth/refresh").start();
    // Another client edits the note between op-bridge's read of the item and its write.
    fake.control(json!({"concurrent_edit": {"item": "OAuth", "assign": "note=n1"}}));
    write_file(&file, "R1");
    assert!(wait_store(&fake, "OAuth", "refresh", "R1"), "{}", broker.stderr());
    assert_eq!(get(&fake.read_store(), "OAuth", "note").as_deref(), Some("n1"), "the other edit was overwritten");
    let conflicts = fake.calls_of(&["item", "edit"]).iter().filter(|c| c["exit"] == 1).count();
    assert!(conflicts >= 1, "inconclusive: no edit met the concurrent change: {:?}", fake.calls());
}

#[test]
fn a_v1_set_whose_value_spans_lines_is_refused_never_half_stored() {
    let dir = TestDir::new("wbc-v1");
    let fake = FakeOp::new(&dir, json!({"Dev": {"API": {"key": "k0"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon").fake_op(&fake).env("OP_KEY_REF", "op://Dev/API/key").start();
    let reply = raw_exchange(&broker.socket, b"SET KEY - first-line\nsecond-line\n", Duration::from_secs(10)).unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("ERR") && reply.contains("spans lines"), "{reply}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(broker.client(&["get", "KEY"], None).stdout, b"k0");
    assert_eq!(get(&fake.read_store(), "API", "key").as_deref(), Some("k0"));
    assert!(successful_edits(&fake).is_empty(), "{:?}", fake.calls());
}
