//! Replays every committed fuzz seed (`fuzz/seeds/<target>/`) and crash regression
//! (`fuzz/regressions/<target>/`) through the same function the libFuzzer target calls
//! (`op_bridge::fuzzing`), so CI checks each parser's properties without libFuzzer or nightly.

use std::path::{Path, PathBuf};

/// A fuzz target body: raw bytes in, a panic on a failed property.
type Body = fn(&[u8]);

/// Every fuzz target and its body.
const TARGETS: &[(&str, Body)] = &[
    ("protocol", op_bridge::fuzzing::protocol),
    ("exec_request", op_bridge::fuzzing::exec_request),
    ("reference", op_bridge::fuzzing::reference),
    ("watch_spec", op_bridge::fuzzing::watch_spec),
    ("op_output", op_bridge::fuzzing::op_output),
    ("duration", op_bridge::fuzzing::duration),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.expect("readable directory entry").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

fn replay(kind: &str, minimum: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind);
    let mut total = 0;
    for (target, body) in TARGETS {
        for file in files(&root.join(target)) {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            // A panic names the file, so a failing seed can be rerun with `cargo fuzz run`.
            eprintln!("{target}: {}", file.display());
            body(&data);
            total += 1;
        }
    }
    assert!(total >= minimum, "{}: {total} files, expected at least {minimum}", root.display());
}

#[test]
fn every_target_has_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (target, _) in TARGETS {
        assert!(!files(&root.join(target)).is_empty(), "no seeds for {target} in {}", root.display());
    }
}

#[test]
fn seeds_hold_every_property() {
    replay("seeds", TARGETS.len());
}

#[test]
fn crash_regressions_stay_fixed() {
    replay("regressions", 0);
}
