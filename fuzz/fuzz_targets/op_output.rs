//! Fuzzes what `op` prints: item JSON (read and write of derived fields) and error text
//! (classification). The body and its properties live in `op_bridge::fuzzing::op_output`, which
//! `tests/fuzz_seeds.rs` also runs over the committed seeds and regressions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| op_bridge::fuzzing::op_output(data));
