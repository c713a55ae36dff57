//! Fuzzes request parsing and framing (both protocol versions) and reply parsing: no input
//! may panic, allocate beyond the limits, or loop forever.
#![no_main]

use libfuzzer_sys::fuzz_target;
use op_bridge::protocol::{Version, read_reply, read_request};
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        for version in [Version::V1, Version::V2] {
            let mut reader = data;
            let mut line = Zeroizing::new(Vec::new());
            // Each iteration consumes input or ends, so this terminates.
            for _ in 0..data.len() + 1 {
                match read_request(&mut reader, version, &mut line).await {
                    Ok(None) => break,
                    Ok(Some(_)) => {}
                    Err(err) if err.is_fatal() => break,
                    Err(_) => {}
                }
            }
            let _ = read_reply(&mut &data[..], version, true).await;
        }
    });
});
