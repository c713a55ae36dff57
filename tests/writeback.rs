//! Write-back: every capture pattern, coalescing, no prefixes, outages, 429s, shutdown
//! flushing, materialization, and no value in any `op` argv.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value as Json, json};

const REF: &str = "op://Dev/OAuth/refresh";

fn field(fake: &FakeOp) -> Option<String> {
    fake.read_store()["Dev"]["OAuth"]["refresh"].as_str().map(str::to_string)
}

/// The values the fake received through `item edit` stdin JSON, in order.
fn edited_values(fake: &FakeOp) -> Vec<String> {
    fake.calls_of(&["item", "edit"])
        .iter()
        .filter(|c| c["exit"] == 0)
        .filter_map(|c| c["stdin"].as_str().map(str::to_string))
        .filter_map(|stdin| {
            let item: Json = serde_json::from_str(&stdin).ok()?;
            item["fields"].as_array()?.iter().find(|f| f["label"] == "refresh")?["value"].as_str().map(str::to_string)
        })
        .collect()
}

/// No `op` argv ever holds `secret`.
fn assert_not_in_argv(fake: &FakeOp, secret: &str) {
    for call in fake.calls() {
        assert!(!call["argv"].to_string().contains(secret), "secret in argv: {call}");
    }
}

struct Setup {
    dir: TestDir,
    fake: FakeOp,
    file: std::path::PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TestDir::new(tag);
    let fake = FakeOp::new(&dir, json!({"Dev": {"OAuth": {"refresh": "initial-token", "client_id": "abc"}}}));
    let file = dir.join("data/creds.json");
    Setup { dir, fake, file }
}

fn daemon(s: &Setup) -> BrokerBuilder {
    BrokerBuilder::new(&s.dir, "daemon").fake_op(&s.fake).args([
        "--watch".to_string(),
        format!("{}={REF}", s.file.display()),
        "--debounce".into(),
        "100ms".into(),
    ])
}

fn wait_field(fake: &FakeOp, want: &str) -> bool {
    eventually(Duration::from_secs(15), || field(fake).as_deref() == Some(want))
}

#[test]
fn materialized_file_is_private_and_not_echoed() {
    let s = setup("wb-mat");
    let broker = daemon(&s).start();
    assert_eq!(std::fs::read(&s.file).unwrap(), b"initial-token");
    assert_eq!(std::fs::metadata(&s.file).unwrap().permissions().mode() & 0o777, 0o600);
    std::thread::sleep(Duration::from_millis(800));
    assert!(s.fake.calls_of(&["item", "edit"]).is_empty(), "materialization was echoed: {:?}", s.fake.calls());
    drop(broker);
}

#[test]
fn every_capture_pattern_lands_byte_exact() {
    let s = setup("wb-pat");
    let broker = daemon(&s).start();
    let dir = s.file.parent().unwrap().to_path_buf();

    // Atomic rename.
    let v1 = "{\n  \"refresh_token\": \"rt-1 ü\",\n  \"expires\": 1\n}\n";
    std::fs::write(dir.join("tmp.json"), v1).unwrap();
    std::fs::rename(dir.join("tmp.json"), &s.file).unwrap();
    assert!(wait_field(&s.fake, v1), "rename: {:?}\n{}", field(&s.fake), broker.stderr());

    // Truncate + write.
    let v2 = "rt-2\n\n";
    std::fs::write(&s.file, v2).unwrap();
    assert!(wait_field(&s.fake, v2), "truncate+write: {:?}\n{}", field(&s.fake), broker.stderr());

    // In-place write (no truncation, same length, file kept open briefly).
    let v3 = "rt-3\n\n";
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&s.file).unwrap();
        f.write_all(v3.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    assert!(wait_field(&s.fake, v3), "in-place: {:?}\n{}", field(&s.fake), broker.stderr());

    // Delete, then create.
    std::fs::remove_file(&s.file).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let v4 = "  rt-4 with spaces  ";
    std::fs::write(&s.file, v4).unwrap();
    assert!(wait_field(&s.fake, v4), "delete+create: {:?}\n{}", field(&s.fake), broker.stderr());

    // Other fields of the item survive the whole-item replace.
    assert_eq!(s.fake.read_store()["Dev"]["OAuth"]["client_id"], "abc");
    // GET serves the newest captured value.
    assert_eq!(broker.client(&["get", "CREDS"], None).stdout, v4.as_bytes());
    for v in [v1, v2, v3, v4] {
        assert_not_in_argv(&s.fake, v.trim());
    }
}

#[test]
fn a_burst_of_rewrites_is_coalesced() {
    let s = setup("wb-burst");
    let broker = daemon(&s).start();
    let start = std::time::Instant::now();
    for i in 0..200 {
        std::fs::write(&s.file, format!("burst-token-{i:03}")).unwrap();
        std::thread::sleep(Duration::from_millis(8));
    }
    let spent = start.elapsed();
    assert!(wait_field(&s.fake, "burst-token-199"), "{:?}\n{}", field(&s.fake), broker.stderr());
    std::thread::sleep(Duration::from_millis(500));
    let edits = s.fake.calls_of(&["item", "edit"]).len();
    assert!(edits <= 10, "{edits} edits for 200 rewrites in {spent:?}");
    assert_eq!(field(&s.fake).as_deref(), Some("burst-token-199"));
}

#[test]
fn a_slowly_written_file_is_never_sent_as_a_prefix() {
    let s = setup("wb-prefix");
    let broker = daemon(&s).start();
    let mut versions = Vec::new();
    for round in 0..2 {
        let body: String = (0..256 * 1024 / 16).map(|i| format!("\"k{round}-{i:07}\":1,\n")).collect();
        let value = format!("{{\n{}\"end\":{round}}}\n", body);
        assert!(value.len() >= 256 * 1024);
        let mut f = std::fs::File::create(&s.file).unwrap();
        for (i, chunk) in value.as_bytes().chunks(4096).enumerate() {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            // Some pauses are longer than the debounce: only "still open for writing" and
            // the missing close event tell the watcher the file is not complete.
            std::thread::sleep(Duration::from_millis(if i % 8 == 7 { 250 } else { 5 }));
        }
        drop(f);
        versions.push(value);
        assert!(
            wait_field(&s.fake, versions.last().unwrap()),
            "round {round}: stored {} bytes\n{}",
            field(&s.fake).map(|v| v.len()).unwrap_or(0),
            broker.stderr()
        );
    }
    for sent in edited_values(&s.fake) {
        assert!(versions.contains(&sent), "a write of {} bytes was not a complete version", sent.len());
    }
}

#[test]
fn rotations_during_an_outage_are_stored_after_recovery() {
    let s = setup("wb-outage");
    let broker = daemon(&s).start();
    s.fake.control(json!({"outage": true}));
    for i in 1..=3 {
        std::fs::write(&s.file, format!("rotation-{i}")).unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(field(&s.fake).as_deref(), Some("initial-token"));
    let status = broker.client(&["status", "--json"], None);
    let status: Json = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["writeback"]["pending"], 1, "{status}");
    assert!(!status.to_string().contains("rotation-"), "STATUS shows a value");
    s.fake.control(json!({}));
    assert!(wait_field(&s.fake, "rotation-3"), "{:?}\n{}", field(&s.fake), broker.stderr());
    assert_not_in_argv(&s.fake, "rotation-");
    assert!(!broker.stderr().contains("rotation-"));
}

#[test]
fn a_429_waits_as_told() {
    let s = setup("wb-429");
    let broker = daemon(&s).start();
    s.fake.control(json!({"rate_limit": 1, "rate_limit_retry_s": 2}));
    std::fs::write(&s.file, "after-429").unwrap();
    assert!(wait_field(&s.fake, "after-429"), "{}", broker.stderr());
    let calls = s.fake.calls();
    let limited = calls.iter().position(|c| c["exit"] == 1).expect("a call got the 429");
    let retried = &calls[limited + 1];
    let waited = retried["ts"].as_f64().unwrap() - calls[limited]["ts"].as_f64().unwrap();
    assert!(waited >= 1.9, "retried after {waited:.2}s, 429 said 2s");
}

#[test]
fn sigterm_flushes_a_pending_write_before_exit() {
    let s = setup("wb-flush");
    let mut broker = daemon(&s).start();
    // The first write attempts fail, so the value is pending when SIGTERM arrives.
    s.fake.control(json!({"fail_edits": 2}));
    std::fs::write(&s.file, "pending-at-exit").unwrap();
    assert!(eventually(Duration::from_secs(10), || !s.fake.calls_of(&["item", "edit"]).is_empty()));
    broker.signal(libc::SIGTERM);
    let status = broker.wait(Duration::from_secs(20));
    assert!(status.success(), "{status}\n{}", broker.stderr());
    assert_eq!(field(&s.fake).as_deref(), Some("pending-at-exit"), "{}", broker.stderr());
}

#[test]
fn a_write_that_cannot_be_stored_is_reported_at_exit() {
    let s = setup("wb-lost");
    let mut broker = daemon(&s).args(["--grace", "1s"]).start();
    s.fake.control(json!({"outage": true}));
    std::fs::write(&s.file, "lost-token-value").unwrap();
    assert!(eventually(Duration::from_secs(10), || broker.stderr().contains("write-back failed")));
    broker.signal(libc::SIGTERM);
    let status = broker.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(75), "{}", broker.stderr());
    let stderr = broker.stderr();
    assert!(stderr.contains("NOT stored") && stderr.contains("CREDS") && stderr.contains(REF), "{stderr}");
    assert!(!stderr.contains("lost-token-value"));
}

#[test]
fn run_keeps_the_child_status_and_reports_unwritten() {
    let s = setup("wb-run");
    s.fake.control(json!({}));
    let script = format!("sleep 0.3; printf run-token > '{}'; sleep 0.6; exit 7", s.file.display());
    let mut broker = BrokerBuilder::new(&s.dir, "run")
        .fake_op(&s.fake)
        .args(["--watch".to_string(), format!("{}={REF}", s.file.display()), "--debounce".into(), "100ms".into()])
        .args(["--grace", "1s", "--", "sh", "-c"])
        .arg(script)
        .spawn();
    // Let materialization happen, then take 1Password down.
    assert!(eventually(Duration::from_secs(10), || Path::new(&s.file).exists()));
    s.fake.control(json!({"outage": true}));
    let status = broker.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(7), "{}", broker.stderr());
    let stderr = broker.stderr();
    assert!(stderr.contains("NOT stored") && stderr.contains(REF), "{stderr}");
}

#[test]
fn set_is_limited_to_the_registered_reference() {
    let s = setup("wb-set");
    s.fake.write_store(&json!({"Dev": {"OAuth": {"refresh": "initial-token"}, "Other": {"f": "x"}}}));
    let broker = daemon(&s).start();
    let out = broker.client(&["set", "CREDS", "op://Dev/Other/f", "-"], Some(b"nope"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(s.fake.read_store()["Dev"]["Other"]["f"], "x");
    let out = broker.client(&["set", "CREDS"], Some(b"via-set\nline2"));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(field(&s.fake).as_deref(), Some("via-set\nline2"));
    // The watched file follows the SET, without echoing it back as a change.
    assert!(eventually(Duration::from_secs(5), || std::fs::read(&s.file).ok().as_deref() == Some(b"via-set\nline2")));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.fake.calls_of(&["item", "edit"]).len(), 1);
    assert_not_in_argv(&s.fake, "via-set");

    let read_only = TestDir::new("wb-ro");
    let ro = BrokerBuilder::new(&read_only, "daemon").fake_op(&s.fake).arg("--read-only").env("OP_X_REF", REF).start();
    let out = ro.client(&["set", "X"], Some(b"v"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let out = ro.client(&["delete", "X"], None);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

#[test]
fn a_refresh_never_replaces_or_rereads_a_pending_rotation() {
    let s = setup("wb-pendref");
    let broker = daemon(&s).start();
    let reads = || s.fake.calls_of(&["read", "--no-newline", REF]).len();
    assert_eq!(reads(), 1, "start-up reads the watched reference once");
    // Writes fail (reads work), so the rotation stays pending through the refresh.
    s.fake.control(json!({"fail_edits": 1000}));
    std::fs::write(&s.file, "pending-rotation").unwrap();
    assert!(eventually(Duration::from_secs(10), || !s.fake.calls_of(&["item", "edit"]).is_empty()));
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(reads(), 1, "a pending name was asked for again");
    assert_eq!(broker.client(&["get", "CREDS"], None).stdout, b"pending-rotation");
    assert!(broker.stderr().contains("kept its local value (write-back pending)"), "{}", broker.stderr());
    s.fake.control(json!({}));
    assert!(wait_field(&s.fake, "pending-rotation"), "{}", broker.stderr());
}
