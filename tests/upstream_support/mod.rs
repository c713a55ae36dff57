//! The fake HTTPS upstream (`tests/fake-upstream/server.py`) and the real Python clients
//! (`tests/fake-upstream/clients.py` in the venv `setup.sh` makes), for the proxy's tests and
//! benchmark: `mod upstream_support;` in a test binary. Independent of `common`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value as Json;

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-upstream")
}

/// A running fake upstream, killed on drop.
pub struct FakeUpstream {
    child: Child,
    pub port: u16,
    /// The test CA's certificate (PEM): trust it to reach the upstream.
    pub ca: PathBuf,
    /// One JSON line per request (see server.py's docs).
    pub log: PathBuf,
    pub key: String,
}

impl FakeUpstream {
    /// Starts the upstream in `dir` (certificates in `dir/certs`, log `dir/upstream.jsonl`),
    /// expecting `key` as the real value and also reporting where each of `watch` appears.
    pub fn start(dir: &Path, key: &str, watch: &[&str]) -> FakeUpstream {
        let log = dir.join("upstream.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(fixture_dir().join("server.py"))
            .arg("--certs")
            .arg(dir.join("certs"))
            .arg("--log")
            .arg(&log)
            .env("FAKE_UPSTREAM_KEY", key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("upstream.stderr")).unwrap());
        for w in watch {
            cmd.arg("--watch").arg(w);
        }
        let mut child = cmd.spawn().expect("python3 runs the fake upstream");
        let stdout = child.stdout.take().unwrap();
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = line_tx.send(line);
        });
        // Generous: the first start makes the certificates with openssl on a busy machine.
        let line = line_rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let ready: Json = serde_json::from_str(&line).unwrap_or_else(|_| {
            let _ = child.kill();
            let stderr = std::fs::read_to_string(dir.join("upstream.stderr")).unwrap_or_default();
            panic!("fake upstream did not start: {line:?}\n{stderr}")
        });
        FakeUpstream {
            child,
            port: ready["port"].as_u64().unwrap() as u16,
            ca: PathBuf::from(ready["ca"].as_str().unwrap()),
            log,
            key: key.to_string(),
        }
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// The requests answered so far, oldest first.
    pub fn requests(&self) -> Vec<Json> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The venv's python with requests, httpx and openai (made once by setup.sh; panics with its
/// output if that fails, e.g. without access to PyPI).
pub fn venv_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(fixture_dir().join("setup.sh"))
                .env("CARGO_TARGET_DIR", target_dir())
                .output()
                .expect("bash runs setup.sh");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "setup.sh failed: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        })
        .clone()
}

/// The cargo target dir (the parent of `CARGO_TARGET_TMPDIR`, which cargo gives tests and
/// benches).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf()
}

/// `clients.py ARGS` in the venv with extra environment; returns its JSON and the raw output.
pub fn run_client(args: &[&str], env: &[(&str, &str)]) -> (Json, Output) {
    let mut cmd = Command::new(venv_python());
    cmd.arg(fixture_dir().join("clients.py")).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the venv's python runs clients.py");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "clients.py {args:?} printed no JSON: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (json, out)
}

/// The `/download` pattern: byte i is i % 251.
pub fn download_pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}
