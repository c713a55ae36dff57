//! What the proxy and OAuth tests share: the test CA and its `localhost` leaf (made by the
//! fake upstream's `--make-certs`), and the Python environment with the HTTP clients.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Makes the test CA and the leaf for `localhost` and 127.0.0.1 in `dir`.
pub fn make_certs(dir: &Path) {
    let out = Command::new("python3")
        .arg(repo().join("tests/fake-upstream/server.py"))
        .arg("--make-certs")
        .arg(dir)
        .output()
        .expect("python3 runs the fake upstream's certificate maker");
    assert!(out.status.success(), "make-certs: {}", String::from_utf8_lossy(&out.stderr));
}

/// The certificates every test of one run shares (made once).
pub fn shared_certs() -> &'static Path {
    static CERTS: OnceLock<PathBuf> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir = std::env::temp_dir().join("opb-proxy-test-certs");
        make_certs(&dir);
        dir
    })
}

/// The clients' python (the venv with requests, httpx and openai; made once).
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("bash").arg(repo().join("tests/fake-upstream/setup.sh")).output().unwrap();
        assert!(out.status.success(), "setup.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_string()
    })
}
