//! Fuzzes the OpenClaw exec-provider request (`op-bridge get` without NAME) and every id in it. The
//! body and its properties live in `op_bridge::fuzzing::exec_request`, which `tests/fuzz_seeds.rs`
//! also runs over the committed seeds and regressions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| op_bridge::fuzzing::exec_request(data));
