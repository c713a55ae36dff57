//! The fake OAuth 2.0 server (`tests/fake-oauth/server.py`) behaves as documented: single-use
//! refresh tokens with family revocation on reuse, the reuse leeway, both client
//! authentication methods, client_credentials, short-lived access tokens, and its fault
//! knobs. Broker-owned OAuth is tested against it, so the fake itself is checked first.

use std::process::Command;

#[test]
fn the_fake_oauth_server_passes_its_self_test() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake-oauth/selftest.py");
    let out = Command::new("python3").arg(script).output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "self-test failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "unexpected output: {stdout}");
}
