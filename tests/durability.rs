//! The seams between the write-back journal, the sealed cache, the file watcher and start-up:
//! a rotation accepted before a crash is never dropped, rolled back, served late or stored
//! under another reference, and a cache or journal that cannot be read or written is never
//! silently replaced or reported as durable.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{Value as Json, json};

const TOKEN: &str = "ops_eyJzaWduSW5BZGRyZXNzIjoiZmFrZSJ9durable";
const CREDS_REF: &str = "op://Dev/OAuth/refresh";

struct Setup {
    dir: TestDir,
    fake: FakeOp,
    /// The watched credential file.
    file: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TestDir::new(tag);
    let fake = FakeOp::new(
        &dir,
        json!({"Dev": {
            "OAuth": {"refresh": "C0", "client_id": "abc"},
            "api": {"credential": "key-1"},
            "db": {"password": "db-pw"},
        }}),
    );
    let file = dir.join("data/creds.json");
    Setup { dir, fake, file }
}

fn cache_dir(s: &Setup) -> PathBuf {
    s.dir.join("state")
}

fn cache_path(s: &Setup) -> PathBuf {
    cache_dir(s).join("secrets.cache")
}

/// A broker with the cache, the API secret and (with `watch`) the watched credential file.
fn builder(s: &Setup, mode: &str, watch: bool) -> BrokerBuilder {
    std::fs::create_dir_all(cache_dir(s)).unwrap();
    let b = BrokerBuilder::new(&s.dir, mode)
        .fake_op(&s.fake)
        .args(["--cache".to_string(), cache_path(s).display().to_string(), "--retries".into(), "1".into()])
        .env("OP_SERVICE_ACCOUNT_TOKEN", TOKEN);
    if watch {
        b.args(["--watch".to_string(), format!("{}=CREDS={CREDS_REF}", s.file.display())]).args(["--debounce", "100ms"])
    } else {
        b.env("OP_API_REF", "op://Dev/api/credential")
    }
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

fn stop(mut broker: Broker) {
    broker.signal(libc::SIGTERM);
    broker.wait(Duration::from_secs(30));
}

fn kill9(mut broker: Broker) {
    broker.signal(libc::SIGKILL);
    broker.wait(Duration::from_secs(10));
}

fn creds_in_1password(s: &Setup) -> String {
    s.fake.read_store()["Dev"]["OAuth"]["refresh"].as_str().unwrap_or_default().to_string()
}

fn file_text(s: &Setup) -> String {
    String::from_utf8_lossy(&std::fs::read(&s.file).unwrap_or_default()).into_owned()
}

/// Writes the watched file and dates it in 2000, long before the item's last change in
/// 1Password (clock skew, an edit of another field, a restored backup all look like this).
fn write_dated_long_ago(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
    let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800);
    std::fs::File::options().write(true).open(path).unwrap().set_modified(long_ago).unwrap();
}

/// First start with the watched file in step with 1Password; stopped cleanly.
fn warm_watched(s: &Setup) {
    std::fs::create_dir_all(s.file.parent().unwrap()).unwrap();
    std::fs::write(&s.file, "C0").unwrap();
    let broker = builder(s, "daemon", true).start();
    assert_eq!(get(&broker, "CREDS"), b"C0");
    stop(broker);
    assert!(cache_path(s).exists(), "no cache written");
}

/// A rotation of the watched file captured (and journaled) during an outage, then `kill -9`.
fn rotate_during_outage_then_crash(s: &Setup, rotated: &str) {
    let broker = builder(s, "daemon", true).start();
    s.fake.control(json!({"outage": true}));
    std::fs::write(&s.file, rotated).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || broker.stderr().contains("captured a change")),
        "{}",
        broker.stderr()
    );
    kill9(broker);
}

/// A SET of API accepted during an outage (journaled, not stored), then `kill -9`.
fn set_during_outage_then_crash(s: &Setup, value: &[u8]) {
    let broker = builder(s, "daemon", false).start();
    assert_eq!(get(&broker, "API"), b"key-1");
    s.fake.control(json!({"outage": true}));
    let out = broker.client(&["set", "API", "-"], Some(value));
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    kill9(broker);
}

#[test]
fn a_rotation_journaled_before_kill_9_is_stored_after_a_restart_within_cache_fresh() {
    let s = setup("dur-replay");
    warm_watched(&s);
    rotate_during_outage_then_crash(&s, "C1-rotated");
    s.fake.control(json!({}));
    let _ = std::fs::remove_file(&s.fake.log);

    let broker = builder(&s, "daemon", true).start();
    assert!(
        eventually(Duration::from_secs(30), || creds_in_1password(&s) == "C1-rotated"),
        "the journaled rotation was dropped; 1Password holds {:?}\n{}",
        creds_in_1password(&s),
        broker.stderr()
    );
    assert_eq!(file_text(&s), "C1-rotated");
    assert_eq!(get(&broker, "CREDS"), b"C1-rotated");
    // Within --cache-fresh the only read is the one comparing the journal with 1Password.
    let reads = s.fake.calls().iter().filter(|c| matches!(c["argv"][0].as_str(), Some("read" | "inject"))).count();
    assert_eq!(reads, 1, "{:?}", s.fake.calls());
}

#[test]
fn an_unreadable_cache_file_is_moved_aside_and_never_overwritten() {
    let s = setup("dur-aside");
    let broker = builder(&s, "daemon", false).start();
    stop(broker);
    let good = std::fs::read(cache_path(&s)).unwrap();

    let mut truncated = good.clone();
    truncated.pop();
    let mut other_version = good.clone();
    other_version[8] = 9;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("another token", good.clone(), "ops_a_new_token"),
        ("one byte short", truncated, TOKEN),
        ("another version", other_version, TOKEN),
        ("garbage", b"not a cache at all\n".to_vec(), TOKEN),
    ];
    for (case, bytes, token) in cases {
        std::fs::write(cache_path(&s), &bytes).unwrap();
        let broker = builder(&s, "daemon", false).env("OP_SERVICE_ACCOUNT_TOKEN", token).start();
        assert_eq!(get(&broker, "API"), b"key-1", "{case}");
        stop(broker);
        let aside: Vec<PathBuf> = std::fs::read_dir(cache_dir(&s))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("secrets.cache.unreadable-"))
            .collect();
        assert_eq!(aside.len(), 1, "{case}: the unreadable file was not moved aside: {aside:?}");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes, "{case}: the file kept aside was altered");
        let mode = std::fs::metadata(&aside[0]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{case}");
        let log = std::fs::read_dir(s.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "stderr"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect::<String>();
        assert!(log.contains(&aside[0].display().to_string()), "{case}: the log does not name {aside:?}\n{log}");
        assert_ne!(std::fs::read(cache_path(&s)).unwrap(), bytes, "{case}: no new cache written");
        std::fs::remove_file(&aside[0]).unwrap();
        for old in std::fs::read_dir(s.dir.path()).unwrap().map(|e| e.unwrap().path()) {
            if old.extension().is_some_and(|e| e == "stderr") {
                std::fs::remove_file(old).unwrap();
            }
        }
    }
}

#[test]
fn a_cache_path_that_cannot_be_read_is_left_alone_and_nothing_is_journaled() {
    let s = setup("dur-leftalone");
    // Not a file op-bridge can read (nor move aside without losing track of it): a directory.
    std::fs::create_dir_all(cache_path(&s)).unwrap();
    std::fs::write(cache_path(&s).join("keep"), "kept").unwrap();
    let broker = builder(&s, "daemon", false).start();
    assert_eq!(get(&broker, "API"), b"key-1");
    assert!(broker.stderr().contains("left as it is"), "{}", broker.stderr());
    s.fake.control(json!({"outage": true}));
    let out = broker.client(&["set", "API", "-"], Some(b"rotated"));
    assert_eq!(out.status.code(), Some(74), "{}", describe(&out));
    stop(broker);
    assert_eq!(std::fs::read_to_string(cache_path(&s).join("keep")).unwrap(), "kept");
    assert_eq!(std::fs::read_dir(cache_dir(&s)).unwrap().count(), 1, "something was written beside it");
}

#[test]
fn a_journal_write_that_fails_is_not_acknowledged_as_durable() {
    let s = setup("dur-nojournal");
    let broker = builder(&s, "daemon", false).start();
    assert_eq!(get(&broker, "API"), b"key-1");
    s.fake.control(json!({"outage": true}));
    // The cache's directory becomes a plain file: every write of the journal now fails.
    std::fs::rename(cache_dir(&s), s.dir.join("state.moved")).unwrap();
    std::fs::write(cache_dir(&s), "not a directory").unwrap();

    let out = broker.client(&["set", "API", "-"], Some(b"rotated-not-journaled"));
    assert_eq!(out.status.code(), Some(74), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("not journaled") && said.contains("keeps retrying"), "{said}");
    let st = status(&broker);
    let target = st["writeback"]["targets"].as_array().unwrap().iter().find(|t| t["name"] == "API").unwrap().clone();
    assert!(target["not_journaled"].is_string(), "{st}");
    assert_eq!(st["writeback"]["not_journaled"], 1, "{st}");
    let text = broker.client(&["status"], None);
    assert!(String::from_utf8_lossy(&text.stdout).contains("NOT journaled: 1"), "{}", describe(&text));
    let log = broker.stderr();
    assert!(log.contains("NOT journaled") && log.contains("op://Dev/api/credential"), "{log}");
    assert!(!log.contains("rotated-not-journaled") && !st.to_string().contains("rotated-not-journaled"));

    // Once 1Password takes it, it is stored all the same.
    s.fake.control(json!({}));
    let stored = || s.fake.read_store()["Dev"]["api"]["credential"] == "rotated-not-journaled";
    assert!(eventually(Duration::from_secs(30), stored), "{}", broker.stderr());
}

#[test]
fn a_full_filesystem_under_the_journal_is_reported_never_acknowledged_as_durable() {
    let s = setup("dur-diskfull");
    // The cache's directory is a tiny tmpfs of the broker's own mount namespace.
    let plain = builder(&s, "daemon", false).command();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$0\" && exec \"$@\""])
        .arg(cache_dir(&s))
        .arg(plain.get_program())
        .args(plain.get_args())
        .env_clear()
        .envs(plain.get_envs().filter_map(|(k, v)| Some((k, v?))));
    let stderr_path = s.dir.join("diskfull.stderr");
    let stdout_path = s.dir.join("diskfull.stdout");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut broker = Broker { child: cmd.spawn().unwrap(), socket: s.dir.join("s.sock"), stderr_path, stdout_path };
    broker.wait_ready(Duration::from_secs(20));
    assert_eq!(get(&broker, "API"), b"key-1");
    // Fill what the cache file left free (seen through the broker's root).
    let inside = PathBuf::from(format!("/proc/{}/root{}", broker.pid(), cache_dir(&s).display()));
    assert!(inside.join("secrets.cache").exists(), "no cache on the tmpfs\n{}", broker.stderr());
    let mut filler = std::fs::File::create(inside.join("filler")).unwrap();
    while std::io::Write::write_all(&mut filler, &[0u8; 4096]).is_ok() {}
    drop(filler);

    s.fake.control(json!({"outage": true}));
    let out = broker.client(&["set", "API", "-"], Some(b"rotated-disk-full"));
    assert_eq!(out.status.code(), Some(74), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not journaled"), "{}", describe(&out));
    assert!(broker.stderr().contains("NOT journaled"), "{}", broker.stderr());
    assert_eq!(status(&broker)["writeback"]["not_journaled"], 1);

    // Space again and 1Password back: stored, and journaled values are durable again.
    std::fs::remove_file(inside.join("filler")).unwrap();
    s.fake.control(json!({}));
    let stored = || s.fake.read_store()["Dev"]["api"]["credential"] == "rotated-disk-full";
    assert!(eventually(Duration::from_secs(30), stored), "{}", broker.stderr());
    assert!(eventually(Duration::from_secs(10), || status(&broker)["writeback"]["not_journaled"] == 0));
}

#[test]
fn a_pending_journaled_rotation_wins_over_1password_at_start_whatever_the_item_time() {
    let s = setup("dur-pendwins");
    warm_watched(&s);
    rotate_during_outage_then_crash(&s, "C1-pending");
    // The file looks older than the item; 1Password still refuses writes, so the replay
    // stays pending while the restart decides.
    write_dated_long_ago(&s.file, "C1-pending");
    s.fake.control(json!({"fail_edits": 1000}));

    let broker = builder(&s, "daemon", true).args(["--cache-fresh", "0s"]).start();
    assert_eq!(file_text(&s), "C1-pending", "the app would start on 1Password's older value\n{}", broker.stderr());
    assert_eq!(get(&broker, "CREDS"), b"C1-pending");
    s.fake.control(json!({}));
    assert!(eventually(Duration::from_secs(30), || creds_in_1password(&s) == "C1-pending"), "{}", broker.stderr());
}

#[test]
fn a_file_rotated_while_op_bridge_was_down_is_written_back_although_it_looks_older() {
    let s = setup("dur-fileonly");
    warm_watched(&s);
    write_dated_long_ago(&s.file, "C2-local");

    let broker = builder(&s, "daemon", true).args(["--cache-fresh", "0s"]).start();
    assert_eq!(file_text(&s), "C2-local", "a local rotation was rolled back\n{}", broker.stderr());
    assert!(eventually(Duration::from_secs(30), || creds_in_1password(&s) == "C2-local"), "{}", broker.stderr());
}

#[test]
fn a_value_changed_only_in_1password_replaces_an_untouched_file_that_looks_newer() {
    let s = setup("dur-remoteonly");
    warm_watched(&s);
    let mut store = s.fake.read_store();
    store["Dev"]["OAuth"]["refresh"] = json!("C3-remote");
    s.fake.write_store(&store);
    // The untouched file is rewritten with its own content: its mtime is now, after the item's.
    std::fs::write(&s.file, "C0").unwrap();

    let broker = builder(&s, "daemon", true).args(["--cache-fresh", "0s"]).start();
    assert_eq!(file_text(&s), "C3-remote", "{}", broker.stderr());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(creds_in_1password(&s), "C3-remote", "the old file value rolled 1Password back");
    assert_eq!(get(&broker, "CREDS"), b"C3-remote");
}

#[test]
fn when_both_the_file_and_1password_changed_the_file_wins_and_the_conflict_is_logged() {
    let s = setup("dur-conflict");
    warm_watched(&s);
    let mut store = s.fake.read_store();
    store["Dev"]["OAuth"]["refresh"] = json!("C3-remote");
    s.fake.write_store(&store);
    write_dated_long_ago(&s.file, "C2-local");

    let broker = builder(&s, "daemon", true).args(["--cache-fresh", "0s"]).start();
    assert_eq!(file_text(&s), "C2-local", "{}", broker.stderr());
    assert!(eventually(Duration::from_secs(30), || creds_in_1password(&s) == "C2-local"), "{}", broker.stderr());
    let log = broker.stderr();
    assert!(log.contains("both changed"), "{log}");
    assert!(!log.contains("C2-local") && !log.contains("C3-remote"), "{log}");
}

#[test]
fn a_journaled_set_is_served_at_start_before_the_replay_lands() {
    let s = setup("dur-serve");
    set_during_outage_then_crash(&s, b"rotated-single-use");
    // Still down: the replay cannot land, the fresh cache starts the broker.
    let broker = builder(&s, "daemon", false).start();
    assert_eq!(get(&broker, "API"), b"rotated-single-use", "{}", broker.stderr());
    stop(broker);

    let out = builder(&s, "run", false)
        .args(["--grace", "1s", "--export", "API", "--", "sh", "-c", "printf %s \"$API\""])
        .output();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rotated-single-use", "{}", describe(&out));
}

#[test]
fn a_journaled_value_whose_name_is_no_longer_configured_is_stored_and_served_under_that_name() {
    let s = setup("dur-unnamed");
    set_during_outage_then_crash(&s, b"api-rotated");
    s.fake.control(json!({}));
    let broker = BrokerBuilder::new(&s.dir, "daemon")
        .fake_op(&s.fake)
        .args(["--cache".to_string(), cache_path(&s).display().to_string(), "--retries".into(), "1".into()])
        .env("OP_SERVICE_ACCOUNT_TOKEN", TOKEN)
        .env("OP_DB_REF", "op://Dev/db/password")
        .start();
    assert_eq!(get(&broker, "API"), b"api-rotated");
    let stored = || s.fake.read_store()["Dev"]["api"]["credential"] == "api-rotated";
    assert!(eventually(Duration::from_secs(30), stored), "{}", broker.stderr());
}

#[test]
fn a_journaled_value_never_crosses_to_the_reference_a_name_now_points_at() {
    let s = setup("dur-cross");
    set_during_outage_then_crash(&s, b"api-rotated");
    s.fake.control(json!({}));

    // The operator points API at another reference before the restart.
    let broker = builder(&s, "daemon", false).env("OP_API_REF", "op://Dev/db/password").start();
    let stored = || s.fake.read_store()["Dev"]["api"]["credential"] == "api-rotated";
    assert!(eventually(Duration::from_secs(30), stored), "the journaled value was lost\n{}", broker.stderr());
    for _ in 0..10 {
        assert_eq!(get(&broker, "API"), b"db-pw", "served under the new reference\n{}", broker.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.fake.read_store()["Dev"]["db"]["password"], "db-pw");
    stop(broker);
    let broker = builder(&s, "daemon", false).env("OP_API_REF", "op://Dev/db/password").start();
    assert_eq!(get(&broker, "API"), b"db-pw", "cached under the new reference");
}
