//! Helpers shared by the `core_*` test binaries (on top of `common`).
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value as Json;

/// Generous bound for a client that must answer "promptly".
pub const PROMPT: Duration = Duration::from_secs(5);

/// Runs a client command against `socket`, killed after `limit`.
pub fn client_within(socket: &Path, args: &[&str], stdin: Option<&[u8]>, limit: Duration) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).arg("--socket").arg(socket).env_remove("OP_BRIDGE_SOCKET");
    run_with_input(cmd, stdin, limit)
}

/// Asserts that `get NAME` answers `expected` within [`PROMPT`].
pub fn assert_get(socket: &Path, name: &str, expected: &[u8], when: &str) {
    let started = Instant::now();
    let out = client_within(socket, &["get", name], None, PROMPT);
    assert!(
        out.status.success() && out.stdout == expected,
        "get {name} {when} (after {:?}): expected {:?}\n{}",
        started.elapsed(),
        String::from_utf8_lossy(expected),
        describe(&out)
    );
}

pub fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `status --json` as JSON.
pub fn status_of(broker: &Broker) -> Json {
    let out = broker.client(&["status", "--json"], None);
    assert!(out.status.success(), "status --json: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", describe(&out)))
}

/// The state STATUS gives a name ("ok", "stale", "missing").
pub fn state_of(status: &Json, name: &str) -> String {
    status["secrets"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == name))
        .and_then(|s| s["state"].as_str())
        .unwrap_or_else(|| panic!("{name} not in STATUS: {status}"))
        .to_string()
}

pub fn argv_of(call: &Json) -> Vec<String> {
    call["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

/// Calls whose argv mentions `needle` anywhere.
pub fn calls_mentioning(fake: &FakeOp, needle: &str) -> Vec<Json> {
    fake.calls().into_iter().filter(|c| argv_of(c).iter().any(|a| a.contains(needle))).collect()
}

/// A random tag for distinctive secret values.
pub fn tag() -> String {
    (0..12).map(|_| fastrand::alphanumeric()).collect()
}

/// Pids of fake `op` processes started for this test's store (found by their environment).
pub fn fake_op_processes(store: &Path) -> Vec<i32> {
    let marker = format!("FAKE_OP_STORE={}", store.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // The script is argv[0] or argv[1] (after its interpreter); the daemon only names it
        // later, in `--op-path`.
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !cmdline.split(|&b| b == 0).take(2).any(|arg| arg.ends_with(b"fake-op/op")) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ.split(|&b| b == 0).any(|var| var == marker.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Reads until EOF, a reset, or the stream's read timeout. Returns the bytes and whether the
/// peer closed the connection (EOF or reset, as opposed to a timeout).
pub fn read_until_closed(stream: &mut UnixStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (out, false);
            }
            Err(_) => return (out, true),
        }
    }
}

pub fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream.set_read_timeout(Some(PROMPT)).unwrap();
    stream.set_write_timeout(Some(PROMPT)).unwrap();
    stream
}

/// The seconds in the daemon's "resolved N/M secrets in X.XXs" line.
pub fn resolved_seconds(stderr: &str, counts: &str) -> Option<f64> {
    let needle = format!("resolved {counts} secrets in ");
    let at = stderr.find(&needle)? + needle.len();
    let rest = &stderr[at..];
    let end = rest.find('s')?;
    rest[..end].parse().ok()
}

/// A directory whose `python3` is the real interpreter, to put first on the daemon's PATH: a
/// version-manager shim (pyenv) costs more per `op` call than the fake's own work, which would
/// drown the latency the tests set with `delay_ms`.
pub fn fast_python_dir() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().ok()?;
        let exe = std::path::PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        if !out.status.success() || !exe.is_absolute() {
            return None;
        }
        // One shared directory (not one per run); the link is replaced atomically.
        let dir = std::env::temp_dir().join(format!("opb-python-{}", nix_getuid()));
        std::fs::create_dir_all(&dir).ok()?;
        let link = dir.join("python3");
        if std::fs::read_link(&link).ok().as_deref() != Some(exe.as_path()) {
            let tmp = dir.join(format!("python3.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&exe, &tmp).ok()?;
            std::fs::rename(&tmp, &link).ok()?;
        }
        Some(dir)
    })
    .as_deref()
}

/// `BrokerBuilder::fake_op`, with the fast interpreter first on PATH when there is one.
pub fn with_fake(builder: BrokerBuilder, fake: &FakeOp) -> BrokerBuilder {
    let builder = builder.fake_op(fake);
    match fast_python_dir() {
        Some(dir) => {
            let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
            builder.env("PATH", path)
        }
        None => builder,
    }
}

pub fn nix_getuid() -> u32 {
    // SAFETY: getuid(2) cannot fail.
    unsafe { libc::getuid() }
}

pub fn file_backend(dir: &TestDir) -> String {
    std::fs::write(dir.join("vault.json"), r#"{"dev":{"api":{"key":"k"}}}"#).unwrap();
    format!("--backend=file:{}", dir.join("vault.json").display())
}
