//! Concurrent resolution, in a test binary of its own so that no other test competes for the
//! CPU while it measures (see `core.rs` for the rest of the "core" suite).

mod common;
mod core_support;

use common::*;
use core_support::*;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

/// The fastest of a few serial `op read` calls with the test's knobs: what one call costs on
/// this machine now, fake start-up included.
fn one_call_cost(dir: &TestDir, fake: &FakeOp) -> Duration {
    (0..3)
        .map(|_| {
            let mut cmd = Command::new(fake_op_path());
            cmd.args(["read", "--no-newline", "op://Private/Item00/key"]).envs(fake.env());
            cmd.env("FAKE_OP_LOG", dir.join("baseline.jsonl"));
            if let Some(python) = fast_python_dir() {
                cmd.env("PATH", format!("{}:{}", python.display(), std::env::var("PATH").unwrap_or_default()));
            }
            let started = Instant::now();
            let out = run_with_timeout(cmd, Duration::from_secs(30));
            assert!(out.status.success(), "{}", describe(&out));
            started.elapsed()
        })
        .min()
        .unwrap()
}

#[test]
fn twenty_items_resolve_concurrently() {
    let dir = TestDir::new("c-conc");
    let items: serde_json::Map<String, Json> =
        (0..20).map(|i| (format!("Item{i:02}"), json!({"key": format!("value-{i}")}))).collect();
    let fake = FakeOp::new(&dir, json!({ "Private": items }));
    fake.control(json!({"delay_ms": 100}));
    let call = one_call_cost(&dir, &fake);
    let mut builder = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake);
    for i in 0..20 {
        builder = builder.env(format!("OP_S{i:02}_REF"), format!("op://Private/Item{i:02}/key"));
    }
    let broker = builder.start();
    // Log lines are written by a background thread: the summary may trail readiness.
    eventually(Duration::from_secs(10), || resolved_seconds(&broker.stderr(), "20/20").is_some());
    let stderr = broker.stderr();
    let seconds = resolved_seconds(&stderr, "20/20").unwrap_or_else(|| panic!("no summary line:\n{stderr}"));
    eprintln!("20 refs resolved in {seconds}s; one serial call costs {call:?}");
    // Serial resolution costs at least 20 × 100 ms, and in fact 20 calls' worth of the fake's
    // start-up too, which on a loaded machine is more than the 100 ms delay: the bound is the
    // larger of the two, so that it still fails every serial implementation.
    let serial = (20.0 * 0.1f64).max(0.75 * 20.0 * call.as_secs_f64());
    assert!(seconds < serial, "resolution was not concurrent: {seconds}s (serial ≈ {serial:.2}s)\n{stderr}");
    // Issue 13: 20 items in at most `--concurrency` (8) batched processes.
    assert!(fake.calls().len() <= 8, "{:?}", fake.calls());
    assert!(fake.calls_of(&["item"]).is_empty(), "{:?}", fake.calls());
    for i in [0, 7, 19] {
        assert_get(&broker.socket, &format!("S{i:02}"), format!("value-{i}").as_bytes(), "after start");
    }
}
