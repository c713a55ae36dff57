//! Process-wide protections applied before any secret is read: no core dumps, not dumpable
//! (so a same-uid process, the supervised child included, cannot ptrace op-bridge or read
//! its `/proc/<pid>/mem` and `environ`), and enough file descriptors for the connection limit.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::locked::lock_stats;

/// Applies the protections; failures are logged, never fatal.
pub fn harden_process() {
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot clear the dumpable flag: {err}");
    }
    // Only the soft limit: a lowered hard limit could never be raised again for the child
    // without CAP_SYS_RESOURCE (which Docker does not grant root), and the child is owed the
    // limits op-bridge was started with. Not being dumpable already rules out a core file.
    let core_hard = getrlimit(Resource::RLIMIT_CORE).map(|(_, hard)| hard).unwrap_or(0);
    if let Err(err) = setrlimit(Resource::RLIMIT_CORE, 0, core_hard) {
        tracing::warn!("cannot disable core dumps: {err}");
    }
    // Raise the soft descriptor limit to the hard one: each connection is a descriptor.
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

static MEMLOCK_REPORTED: AtomicBool = AtomicBool::new(false);

/// Says once, at start, when some secret pages could not be locked: how much was needed and
/// what RLIMIT_MEMLOCK allows. op-bridge carries on either way.
pub fn report_memlock() {
    let stats = lock_stats();
    if stats.unlocked_bytes == 0 || MEMLOCK_REPORTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let limit = getrlimit(Resource::RLIMIT_MEMLOCK)
        .map(
            |(soft, _)| {
                if soft == nix::libc::RLIM_INFINITY { "unlimited".to_string() } else { format!("{soft} bytes") }
            },
        )
        .unwrap_or_else(|_| "unknown".into());
    tracing::warn!(
        "could not lock all secret memory: needed {} bytes, locked {}, RLIMIT_MEMLOCK is {limit}; \
         secrets stay out of core dumps but may be swapped (raise the limit, e.g. docker run --ulimit memlock=-1)",
        stats.locked_bytes + stats.unlocked_bytes,
        stats.locked_bytes
    );
}
