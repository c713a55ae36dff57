//! Reading another process's memory, as a hostile reader would: every readable mapping of
//! `/proc/PID/maps` through `/proc/PID/mem` (root reads any process's memory, a non-dumpable
//! one included, with CAP_SYS_PTRACE). The scans that prove a value is gone use it.

use std::os::unix::fs::FileExt;

/// Calls `each` with the contents of every readable mapping of `pid` that can be read.
pub fn each_mapping(pid: i32, mut each: impl FnMut(&[u8])) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut region = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut region, start).is_ok() {
            each(&region);
        }
    }
}

/// Counts occurrences of `needle` in the memory of `pid`.
pub fn copies_in_memory(pid: i32, needle: &[u8]) -> usize {
    let mut count = 0;
    each_mapping(pid, |region| count += region.windows(needle.len()).filter(|w| *w == needle).count());
    count
}
