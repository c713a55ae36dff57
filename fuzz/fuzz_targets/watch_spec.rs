//! Fuzzes `--watch PATH=[NAME=]op://…` specs. The body and its properties live in
//! `op_bridge::fuzzing::watch_spec`, which `tests/fuzz_seeds.rs` also runs over the committed seeds
//! and regressions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| op_bridge::fuzzing::watch_spec(data));
