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

/// The crt-static binary (as docker/Dockerfile builds it), built once per test binary into
/// `<target>/static`, where every test that needs it finds it (or `OP_BRIDGE_STATIC_BIN`).
pub fn static_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("OP_BRIDGE_STATIC_BIN") {
            return PathBuf::from(path);
        }
        // <target>/debug/deps/TEST-HASH → <target>/static
        let exe = std::env::current_exe().unwrap();
        let target_dir = exe.ancestors().nth(3).unwrap().join("static");
        let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", "op-bridge", "--target", &triple])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg("--manifest-path")
            .arg(repo().join("Cargo.toml"))
            // The explicit --target keeps build scripts and proc macros (host code) dynamic.
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_TARGET_DIR");
        let out = super::run_with_timeout(cmd, std::time::Duration::from_secs(1800));
        assert!(out.status.success(), "static build failed\n{}", super::describe(&out));
        target_dir.join(triple).join("debug/op-bridge")
    })
}
