//! The 1Password token from a file (`OP_SERVICE_ACCOUNT_TOKEN_FILE`, `OP_CONNECT_TOKEN_FILE`):
//! read once at start with its trailing newline dropped, handed to `op` in its own environment
//! (the fake `op` accepts only the exact token: `FAKE_OP_TOKEN`), used as Connect's bearer and
//! as the sealed cache's key, never put in the child's environment; clear start errors for a
//! bad file; warnings for a file the child could read and for a token in the environment.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const TOKEN: &str = "ops_eyJmaWxlLXRva2VuLXRlc3QiOnRydWV9";
const VALUE: &str = "db-secret-value";
/// The one-time WARN of `run` for a token in the environment.
const ENV_WARNING: &str = "in the environment: a container's configuration keeps it";
/// The WARN for a token file the command's uid can read.
const READABLE_WARNING: &str = "names a file the command's uid";

struct Setup {
    dir: TestDir,
    fake: FakeOp,
}

fn setup(tag: &str) -> Setup {
    let dir = TestDir::new(tag);
    let fake = FakeOp::new(&dir, json!({"Dev": {"db": {"password": VALUE}}}));
    Setup { dir, fake }
}

/// Writes the token file (as a Docker or Kubernetes secret would: with a trailing newline).
fn token_file(s: &Setup, content: &[u8], mode: u32) -> PathBuf {
    let path = s.dir.join("op-token");
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `op-bridge MODE` with the fake `op`, which accepts only the exact TOKEN.
fn builder(s: &Setup, mode: &str) -> BrokerBuilder {
    BrokerBuilder::new(&s.dir, mode)
        .fake_op(&s.fake)
        .args(["--retries", "1"])
        .env("FAKE_OP_TOKEN", TOKEN)
        .env("OP_DB_REF", "op://Dev/db/password")
}

fn with_file(b: BrokerBuilder, path: &Path) -> BrokerBuilder {
    b.env("OP_SERVICE_ACCOUNT_TOKEN_FILE", path.display().to_string())
}

fn stop(mut broker: Broker) {
    broker.signal(libc::SIGTERM);
    broker.wait(Duration::from_secs(30));
}

#[test]
fn a_token_file_reaches_op_intact_and_never_the_childs_environment() {
    let s = setup("tokf-run");
    let file = token_file(&s, format!("{TOKEN}\n").as_bytes(), 0o600);
    let env_dump = s.dir.join("child.environ");
    let script = format!("cat /proc/self/environ > {} && op-bridge get DB", env_dump.display());
    let mut b = with_file(builder(&s, "run"), &file).args(["--", "sh", "-c", &script]);
    // `op-bridge get` inside the child: the test binary's directory on PATH.
    let path = format!("{}:{}", bin().parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    b = b.env("PATH", path);
    let out = run_with_timeout(b.command(), Duration::from_secs(60));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), VALUE, "{}", describe(&out));

    // op got the token (the fake refuses anything else), in its environment.
    let calls = s.fake.calls();
    assert!(!calls.is_empty() && calls.iter().all(|c| c["env_token"] == true && c["exit"] == 0), "{calls:?}");
    // The child got neither the token nor a variable for it.
    let environ = std::fs::read(&env_dump).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    // (FAKE_OP_TOKEN, the fake's own knob, is the test's copy, passed down like any variable.)
    let leaked: Vec<&str> =
        environ.split('\0').filter(|kv| kv.contains(TOKEN) && !kv.starts_with("FAKE_OP_TOKEN=")).collect();
    assert!(leaked.is_empty(), "the token is in the child's environment: {leaked:?}");
    assert!(!environ.split('\0').any(|kv| kv.starts_with("OP_SERVICE_ACCOUNT_TOKEN=")), "{environ}");
    // Nothing logs it, and the token-from-environment warning is not given.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(TOKEN), "{stderr}");
    assert!(!stderr.contains(ENV_WARNING), "{stderr}");
}

#[test]
fn bad_token_files_fail_the_start_clearly_before_any_op_call() {
    let s = setup("tokf-bad");
    let missing = s.dir.join("no-such-token");
    let empty = token_file(&s, b"\n", 0o600);
    let empty_path = s.dir.join("empty-token");
    std::fs::rename(&empty, &empty_path).unwrap();
    let two_lines = s.dir.join("two-lines");
    std::fs::write(&two_lines, format!("{TOKEN}\nsecond-line-text\n")).unwrap();
    let big = s.dir.join("big-token");
    std::fs::write(&big, vec![b'x'; 200 * 1024]).unwrap();
    let cases: [(&Path, &str); 5] = [
        (&missing, "cannot read"),
        (&empty_path, "is empty"),
        (&two_lines, "more than one line"),
        (&big, "larger than"),
        (s.dir.path(), "not a regular file"),
    ];
    for (path, want) in cases {
        for mode in ["daemon", "run"] {
            let mut b = with_file(builder(&s, mode), path);
            if mode == "run" {
                b = b.args(["--", "true"]);
            }
            let out = run_with_timeout(b.command(), Duration::from_secs(30));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(125), "{mode} {}: {}", path.display(), describe(&out));
            assert!(
                stderr.contains("OP_SERVICE_ACCOUNT_TOKEN_FILE") && stderr.contains(want),
                "{mode} {}: {stderr}",
                path.display()
            );
            assert!(stderr.contains(&path.display().to_string()), "{stderr}");
            assert!(!stderr.contains(TOKEN) && !stderr.contains("second-line-text"), "{stderr}");
        }
    }
    // Both the variable and the file: ambiguous, refused.
    let file = token_file(&s, TOKEN.as_bytes(), 0o600);
    let out = run_with_timeout(
        with_file(builder(&s, "daemon"), &file).env("OP_SERVICE_ACCOUNT_TOKEN", TOKEN).command(),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("are both set"), "{}", describe(&out));
    assert!(s.fake.calls().is_empty(), "op was called: {:?}", s.fake.calls());
}

#[test]
fn a_token_file_the_commands_uid_can_read_is_a_warning() {
    let s = setup("tokf-warn");
    // The test directory must be searchable by uid 1000 for the check to matter.
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        let file = token_file(&s, TOKEN.as_bytes(), mode);
        let b = with_file(builder(&s, "run"), &file).args(["--user", "1000:1000", "--", "true"]);
        let out = run_with_timeout(b.command(), Duration::from_secs(60));
        assert!(out.status.success(), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.contains(READABLE_WARNING), warned, "mode {mode:o}: {stderr}");
        if warned {
            assert!(stderr.contains(&file.display().to_string()), "{stderr}");
        }
        assert!(!stderr.contains(TOKEN), "{stderr}");
    }
}

#[test]
fn a_token_in_the_environment_under_run_is_warned_once_naming_the_file_variable() {
    let s = setup("tokf-envwarn");
    let b = builder(&s, "run").env("OP_SERVICE_ACCOUNT_TOKEN", TOKEN).args(["--", "true"]);
    let out = run_with_timeout(b.command(), Duration::from_secs(60));
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches(ENV_WARNING).count(), 1, "{stderr}");
    assert!(stderr.contains("OP_SERVICE_ACCOUNT_TOKEN_FILE"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");
    // The daemon is not a container's init: no such warning there.
    let broker = builder(&s, "daemon").env("OP_SERVICE_ACCOUNT_TOKEN", TOKEN).start();
    stop_and_check(broker, |stderr| assert!(!stderr.contains(ENV_WARNING), "{stderr}"));
}

fn stop_and_check(broker: Broker, check: impl FnOnce(&str)) {
    let stderr_path = broker.stderr_path.clone();
    stop(broker);
    check(&std::fs::read_to_string(stderr_path).unwrap_or_default());
}

#[test]
fn the_sealed_cache_key_is_the_same_from_a_file_or_the_environment() {
    let s = setup("tokf-cache");
    let cache = s.dir.join("secrets.cache").display().to_string();
    let file = token_file(&s, format!("{TOKEN}\n").as_bytes(), 0o600);
    // Written under the file token …
    let broker = with_file(builder(&s, "daemon"), &file).args(["--cache", &cache]).start();
    assert_eq!(broker.client(&["get", "DB"], None).stdout, VALUE.as_bytes());
    stop(broker);
    assert!(Path::new(&cache).exists(), "no cache written");
    // … opened under the same token from the environment, during an outage (stale service).
    s.fake.control(json!({"outage": true}));
    let broker = builder(&s, "daemon")
        .env("OP_SERVICE_ACCOUNT_TOKEN", TOKEN)
        .args(["--cache", &cache, "--cache-fresh", "0s"])
        .start();
    let out = broker.client(&["get", "DB"], None);
    assert_eq!(out.stdout, VALUE.as_bytes(), "{}", describe(&out));
    stop(broker);
    // And back under the file: the cache is still readable (the key did not change).
    let broker = with_file(builder(&s, "daemon"), &file).args(["--cache", &cache, "--cache-fresh", "0s"]).start();
    assert_eq!(broker.client(&["get", "DB"], None).stdout, VALUE.as_bytes());
    stop(broker);
}

/// The fake Connect server on a free port, killed on drop.
struct FakeConnect {
    child: std::process::Child,
    port: u16,
}

impl Drop for FakeConnect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fake_connect(dir: &TestDir, token: &str) -> FakeConnect {
    let item = json!({
        "id": "itemdb0000000000000000000a", "title": "db", "version": 1, "category": "LOGIN",
        "vault": {"id": "vaultdev00000000000000000a"},
        "fields": [{"id": "password", "label": "password", "type": "CONCEALED", "value": VALUE}]
    });
    let store = dir.join("connect-store.json");
    let vaults = json!({"vaults": [{"id": "vaultdev00000000000000000a", "name": "Dev", "items": [item]}]});
    std::fs::write(&store, serde_json::to_vec(&vaults).unwrap()).unwrap();
    let port_file = dir.join("connect-port");
    let child = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-connect/server.py"))
        .env("FAKE_CONNECT_STORE", &store)
        .env("FAKE_CONNECT_TOKEN", token)
        .env("FAKE_CONNECT_PORT_FILE", &port_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs the fake Connect server");
    let mut fake = FakeConnect { child, port: 0 };
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.port == 0 {
        fake.port = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
        assert!(Instant::now() < deadline, "fake Connect did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    fake
}

#[test]
fn a_connect_token_file_is_the_bearer_and_chooses_connect() {
    let s = setup("tokf-connect");
    let connect = fake_connect(&s.dir, TOKEN);
    let file = token_file(&s, format!("{TOKEN}\n").as_bytes(), 0o600);
    // No --backend: OP_CONNECT_HOST plus the token file choose Connect.
    let broker = BrokerBuilder::new(&s.dir, "daemon")
        .env("OP_CONNECT_HOST", format!("http://127.0.0.1:{}", connect.port))
        .env("OP_CONNECT_TOKEN_FILE", file.display().to_string())
        .env("OP_DB_REF", "op://Dev/db/password")
        .start();
    let out = broker.client(&["get", "DB"], None);
    assert_eq!(out.stdout, VALUE.as_bytes(), "{}", describe(&out));
    stop_and_check(broker, |stderr| assert!(!stderr.contains(TOKEN), "{stderr}"));
    // A file with another token is refused by Connect: a failed start, not a silent fallback.
    let wrong = s.dir.join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let out = run_with_timeout(
        BrokerBuilder::new(&s.dir, "daemon")
            .args(["--retries", "1"])
            .env("OP_CONNECT_HOST", format!("http://127.0.0.1:{}", connect.port))
            .env("OP_CONNECT_TOKEN_FILE", wrong.display().to_string())
            .env("OP_DB_REF", "op://Dev/db/password")
            .command(),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
}
