//! Fuzzes request parsing and framing (both protocol versions) and reply parsing: no input
//! may panic, allocate beyond the limits, or loop forever. The body lives in
//! `op_bridge::fuzzing::protocol`, which `tests/fuzz_seeds.rs` also runs over the committed
//! seeds and regressions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| op_bridge::fuzzing::protocol(data));
