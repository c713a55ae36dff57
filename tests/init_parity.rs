//! The rough edges of issue 12 outside the init loop: a daemon that stops at once while it is
//! still resolving and accepts no client before it can answer, `entrypoint.sh` bounded by
//! its stated seconds and stripping references with a custom prefix, the exec provider's
//! busy retry within OpenClaw's 5 s, and `status` showing write-backs that fail.

mod common;
use common::*;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

const PROMPT: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A daemon whose only secret takes 30 s to resolve (the fake `op` sleeps).
fn slow_daemon(dir: &TestDir) -> (Broker, FakeOp) {
    let fake = FakeOp::new(dir, json!({"vault": {"item": {"a": "one"}}}));
    fake.control(json!({"delay_ms": 30000}));
    let broker = BrokerBuilder::new(dir, "daemon").fake_op(&fake).env("OP_A_REF", "op://vault/item/a").spawn();
    (broker, fake)
}

#[test]
fn a_starting_daemon_accepts_no_client_and_stops_at_once() {
    let dir = TestDir::new("dstart");
    let (mut broker, _fake) = slow_daemon(&dir);
    let pid = broker.pid();
    assert!(eventually(PROMPT, || !children_of(pid).is_empty()), "op never started\n{}", broker.stderr());
    // A client is told at once that nobody answers yet, rather than waiting for its timeout.
    let asked = Instant::now();
    let out = broker.client(&["ping", "--timeout", "30s"], None);
    let waited = asked.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(waited < Duration::from_secs(10), "ping waited {waited:?} on a daemon that cannot answer");
    let sent = Instant::now();
    broker.signal(libc::SIGTERM);
    let status = broker.wait(PROMPT);
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", broker.stderr());
    // Resolution would take 30 s; the issue's bound is 1 s, with slack for this machine.
    assert!(took < Duration::from_secs(5), "SIGTERM during start-up took {took:?}\n{}", broker.stderr());
    eprintln!("daemon exit after SIGTERM during start-up: {took:?}");
}

/// A directory with `op-bridge` in it, to put first on PATH for entrypoint.sh.
fn bin_dir(dir: &TestDir) -> PathBuf {
    let path = dir.join("bin");
    std::fs::create_dir_all(&path).unwrap();
    std::os::unix::fs::symlink(bin(), path.join("op-bridge")).unwrap();
    path
}

fn entrypoint(dir: &TestDir, extra_env: &[(&str, String)], command: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    let path = format!("{}:{}", bin_dir(dir).display(), std::env::var("PATH").unwrap_or_default());
    cmd.arg(repo().join("docker/entrypoint.sh"))
        .args(command)
        .env_clear()
        .env("PATH", path)
        .env("OP_BRIDGE_SOCKET", dir.join("s.sock"))
        .env("OP_BRIDGE_PID_FILE", dir.join("daemon.pid"));
    for (key, value) in extra_env {
        cmd.env(key, value);
    }
    cmd
}

#[test]
fn entrypoint_gives_up_within_its_timeout() {
    let dir = TestDir::new("epslow");
    let fake = FakeOp::new(&dir, json!({"vault": {"item": {"a": "one"}}}));
    fake.control(json!({"delay_ms": 30000}));
    let mut env: Vec<(&str, String)> = fake.env().into_iter().map(|(k, v)| (leak(k), v)).collect();
    env.push(("OP_BRIDGE_OP_PATH", fake_op_path().display().to_string()));
    env.push(("OP_A_REF", "op://vault/item/a".into()));
    env.push(("OP_BRIDGE_START_TIMEOUT", "2".into()));
    let started = Instant::now();
    let out = run_with_timeout(entrypoint(&dir, &env, &["true"]), Duration::from_secs(60));
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    // The issue's bound is 3 s (it took 22 s before); slack for this machine.
    assert!(took < Duration::from_secs(6), "gave up after {took:?}\n{}", describe(&out));
    eprintln!("entrypoint with OP_BRIDGE_START_TIMEOUT=2 gave up after {took:?}");
}

fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// Kills the daemon entrypoint.sh left running in the background (its pid file).
struct DaemonFile(PathBuf);

impl Drop for DaemonFile {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0).unwrap_or_default().trim().parse::<i32>() {
            // SAFETY: kill(2) on the daemon this test started through entrypoint.sh.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn entrypoint_strips_references_with_a_custom_prefix_and_sessions() {
    let dir = TestDir::new("epstrip");
    std::fs::write(dir.join("vault.json"), r#"{"vault":{"item":{"a":"one"}}}"#).unwrap();
    let env = [
        ("OP_BRIDGE_BACKEND", format!("file:{}", dir.join("vault.json").display())),
        ("OP_BRIDGE_PREFIX", "SECRET_".to_string()),
        ("OP_BRIDGE_SUFFIX", "_URI".to_string()),
        ("SECRET_API_URI", "op://vault/item/a".to_string()),
        ("OP_SESSION_team", "session-token".to_string()),
        ("KEEP", "kept".to_string()),
    ];
    let _daemon = DaemonFile(dir.join("daemon.pid"));
    // Output to files: the daemon left in the background keeps inherited pipes open.
    let (out_path, err_path) = (dir.join("app.out"), dir.join("app.err"));
    let status = entrypoint(&dir, &env, &["env"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .status()
        .unwrap();
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let shown = format!("{status}\nstdout:\n{stdout}\nstderr:\n{}", std::fs::read_to_string(&err_path).unwrap());
    assert!(status.success(), "{shown}");
    assert!(stdout.lines().any(|l| l == "KEEP=kept"), "{shown}");
    for hidden in ["SECRET_API_URI=", "OP_SESSION_team="] {
        assert!(!stdout.lines().any(|l| l.starts_with(hidden)), "{hidden} reached the app\n{shown}");
    }
}

const EXEC_REQUEST: &[u8] = br#"{"protocolVersion":1,"provider":"op","ids":["A"]}"#;

fn busy_daemon(dir: &TestDir) -> (Broker, UnixStream) {
    std::fs::write(dir.join("vault.json"), r#"{"vault":{"item":{"a":"one"}}}"#).unwrap();
    let broker = BrokerBuilder::new(dir, "daemon")
        .arg(format!("--backend=file:{}", dir.join("vault.json").display()))
        .env("OP_A_REF", "op://vault/item/a")
        .args(["--max-connections", "1"])
        .start();
    // The one connection the daemon allows, held open: every other client is told `busy`.
    let held = UnixStream::connect(&broker.socket).unwrap();
    let refused = || {
        use std::io::Read;
        let mut other = UnixStream::connect(&broker.socket)?;
        other.set_read_timeout(Some(PROMPT))?;
        let mut reply = Vec::new();
        other.read_to_end(&mut reply)?;
        Ok::<_, std::io::Error>(reply)
    };
    assert!(
        eventually(PROMPT, || refused().is_ok_and(|r| r.starts_with(b"ERR busy"))),
        "the held connection does not make the daemon busy"
    );
    (broker, held)
}

#[test]
fn exec_provider_asks_a_busy_daemon_again() {
    let dir = TestDir::new("execbusy");
    let (broker, held) = busy_daemon(&dir);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(held);
    });
    let out = client(&broker.socket, &["get"], Some(EXEC_REQUEST));
    releaser.join().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["values"]["A"], "one", "{}", describe(&out));
}

#[test]
fn exec_provider_answers_within_openclaws_five_seconds() {
    let dir = TestDir::new("execslow");
    let (broker, _held) = busy_daemon(&dir);
    let asked = Instant::now();
    let out = client(&broker.socket, &["get"], Some(EXEC_REQUEST));
    let took = asked.elapsed();
    // Still busy after the whole budget: a per-id error, not a failed batch, and in time.
    assert!(out.status.success(), "{}", describe(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(reply["errors"]["A"].is_object(), "{}", describe(&out));
    assert!(took < Duration::from_secs(5), "answered after {took:?}: OpenClaw gives up at 5 s");
    eprintln!("exec provider against a daemon busy throughout answered after {took:?}");
}

#[test]
fn status_text_shows_a_failing_write_back() {
    let dir = TestDir::new("stwb");
    let fake = FakeOp::new(&dir, json!({"vault": {"item": {"cred": "old"}}}));
    let file = dir.join("cred");
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .args([format!("--watch={}=CRED=op://vault/item/cred", file.display()), "--debounce=50ms".into()])
        .start();
    assert!(eventually(PROMPT, || file.exists()), "not materialized\n{}", broker.stderr());
    fake.control(json!({"outage": true}));
    write_atomically(&file, "new-value");
    let mut last = String::new();
    let shown = eventually(PROMPT, || {
        let out = broker.client(&["status"], None);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        last.contains("1 failing") && last.lines().any(|l| l.starts_with("CRED") && l.contains("failing"))
    });
    assert!(shown, "status text:\n{last}\nstderr:\n{}", broker.stderr());
    assert!(!last.contains("new-value"), "never a value");
    assert!(last.contains("op://vault/item/cred"), "{last}");
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
