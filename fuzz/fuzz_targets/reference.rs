//! Fuzzes `op://` reference parsing and its Display round trip. The body and its properties live in
//! `op_bridge::fuzzing::reference`, which `tests/fuzz_seeds.rs` also runs over the committed seeds
//! and regressions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| op_bridge::fuzzing::reference(data));
