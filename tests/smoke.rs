mod common;
use common::*;
use serde_json::json;

#[test]
fn file_backend_round_trip() {
    let dir = TestDir::new("smoke");
    std::fs::write(dir.join("vault.json"), r#"{"dev":{"api":{"key":"sk-1"}}}"#).unwrap();
    let broker = BrokerBuilder::new(&dir, "daemon")
        .arg(format!("--backend=file:{}", dir.join("vault.json").display()))
        .env("OP_API_KEY_REF", "op://dev/api/key")
        .start();
    let out = broker.client(&["get", "API_KEY"], None);
    assert_eq!(out.stdout, b"sk-1", "{}", describe(&out));
}

#[test]
fn fake_op_round_trip() {
    let dir = TestDir::new("smoke-op");
    let fake = FakeOp::new(&dir, json!({"Private": {"GitHub": {"token": "ghp_1", "user": "me"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .env("OP_GH_REF", "op://Private/GitHub/token")
        .env("OP_GH_USER_REF", "op://Private/GitHub/user")
        .start();
    let out = broker.client(&["get", "gh"], None);
    assert_eq!(out.stdout, b"ghp_1", "{}", describe(&out));
    // Both fields of one item in one batched `op inject` (issue 13).
    assert_eq!(fake.calls_of(&["inject"]).len(), 1, "{:?}", fake.calls());
    assert_eq!(fake.calls().len(), 1, "{:?}", fake.calls());
}
