//! Logging that never blocks the broker or the init: stderr and the audit log are written by
//! a background thread through a bounded queue (tracing-appender's `non_blocking`). When the
//! reader of stderr stalls (a full pipe nobody drains), new lines are dropped and counted
//! instead of freezing PID 1; the counts are shown in STATUS (`logging`). Only
//! `--audit-log-strict` makes the audit log wait for its writer.
//!
//! The writer threads are flushed at process exit (an `atexit` hook), with tracing-appender's
//! own bounded wait, so the last lines of a clean shutdown are not lost — unless that writer
//! already dropped lines (its reader stalled): then nothing is waited for.

use std::io::Write;
use std::sync::{Mutex, Once, OnceLock};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines queued per writer before new ones are dropped (a line is a few hundred bytes).
const QUEUED_LINES: usize = 4096;

static STDERR_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
static AUDIT_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
static GUARDS: Mutex<Vec<(Sink, WorkerGuard)>> = Mutex::new(Vec::new());
static FLUSH_AT_EXIT: Once = Once::new();

/// Which log a writer feeds, for the dropped-lines counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Stderr,
    Audit,
}

/// A lossy, non-blocking writer to `target`; its worker thread lives until process exit.
pub fn non_blocking<W: Write + Send + 'static>(sink: Sink, target: W) -> NonBlocking {
    let name = match sink {
        Sink::Stderr => "op-bridge-log",
        Sink::Audit => "op-bridge-audit",
    };
    let (writer, guard) =
        NonBlockingBuilder::default().lossy(true).buffered_lines_limit(QUEUED_LINES).thread_name(name).finish(target);
    let counter = match sink {
        Sink::Stderr => &STDERR_DROPPED,
        Sink::Audit => &AUDIT_DROPPED,
    };
    let _ = counter.set(writer.error_counter());
    GUARDS.lock().unwrap_or_else(|e| e.into_inner()).push((sink, guard));
    FLUSH_AT_EXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe { libc::atexit(flush_at_exit) };
    });
    writer
}

extern "C" fn flush_at_exit() {
    let guards = std::mem::take(&mut *GUARDS.lock().unwrap_or_else(|e| e.into_inner()));
    for (sink, guard) in guards {
        if dropped_lines(sink) == 0 {
            // Waits (bounded) for the worker to write what is queued.
            drop(guard);
        } else {
            // A reader that stalled: the queue is (or was) full, and tracing-appender's guard
            // then reports with `println!`, which blocks on a stalled stdout or panics on a
            // closed one. What is queued is lost; exiting is what matters.
            std::mem::forget(guard);
        }
    }
}

/// Lines dropped so far because a log's reader was not keeping up.
pub fn dropped_lines(sink: Sink) -> usize {
    let counter = match sink {
        Sink::Stderr => &STDERR_DROPPED,
        Sink::Audit => &AUDIT_DROPPED,
    };
    counter.get().map(ErrorCounter::dropped_lines).unwrap_or(0)
}

/// The `logging` object of STATUS.
pub fn status() -> serde_json::Value {
    let stderr = dropped_lines(Sink::Stderr);
    let audit = dropped_lines(Sink::Audit);
    serde_json::json!({
        "dropped": stderr + audit,
        "stderr_dropped": stderr,
        "audit_dropped": audit,
    })
}
