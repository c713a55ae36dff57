//! The one retry policy of the backends: which failures are retried, how long to pause
//! (exponential backoff with jitter, a 429's stated delay first, never past
//! [`MAX_RETRY_AFTER`]), and [`Pauses`], the handle that ends pauses early.
//!
//! A pause is never taken while a lock is held (callers retry around whole attempts), and it
//! ends early when the daemon stops (the write-back flush then retries on its own short
//! schedule) or when newer work supersedes the operation paused: the operation then gives up
//! with its last error instead of waiting out a delay that may be a day long.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{BackendError, ErrorKind};

/// Longest stated 429 delay honoured, and the longest pause after jitter. 1Password's longest
/// limits are daily, so a larger figure is garbage; capped, it can never overflow the retry
/// arithmetic (a `Duration` sum that overflows panics, and a panic in PID 1 aborts the
/// container).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Exponential backoff with jitter; a stated 429 delay wins.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total attempts for one operation (1 = no retry).
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy { attempts: 4, base: Duration::from_millis(250), max: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The pause before retry number `attempt` (1-based) after `kind`: "equal jitter" (half
    /// fixed, half random) so concurrent callers spread out but never retry immediately.
    pub fn delay(&self, attempt: u32, kind: ErrorKind) -> Duration {
        if let ErrorKind::RateLimited(Some(stated)) = kind {
            // 1Password said when; add up to 10% so a crowd of clients does not return at
            // once, and cap the sum: the jitter must not carry a day's delay past the cap.
            let stated = stated.min(MAX_RETRY_AFTER);
            return (stated + stated.mul_f64(fastrand::f64() * 0.1)).min(MAX_RETRY_AFTER);
        }
        let exp = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(self.max);
        exp / 2 + exp.mul_f64(fastrand::f64() * 0.5)
    }

    /// Runs `attempt` until it succeeds, fails permanently, runs out of attempts, or a pause
    /// is ended by `pauses`; returns the last outcome. `what` names the operation in the log.
    pub async fn run<T, F, Fut>(&self, pauses: &Pauses, what: &str, mut attempt: F) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let mut number = 1;
        loop {
            let err = match attempt().await {
                Ok(out) => return Ok(out),
                Err(err) if err.kind.is_permanent() || number >= self.attempts => return Err(err),
                Err(err) => err,
            };
            let pause = self.delay(number, err.kind);
            tracing::warn!(
                "{what}: {err} ({}); retry {number}/{} in {:.1}s",
                err.kind.label(),
                self.attempts - 1,
                pause.as_secs_f64()
            );
            if !pauses.pause(pause).await {
                tracing::warn!("{what}: retry pause cut short (stopping, or newer work); giving up: {err}");
                return Err(err);
            }
            number += 1;
        }
    }
}

/// Ends retry pauses early. One per backend, shared by all its operations.
#[derive(Debug, Default)]
pub struct Pauses {
    /// Wakes the pauses under way (newer work).
    interrupt: Notify,
    /// Set at stop: every pause, now and later, ends at once.
    stopping: CancellationToken,
}

impl Pauses {
    /// Ends the pauses under way now (newer work would otherwise wait behind them); later
    /// pauses are taken as usual.
    pub fn interrupt(&self) {
        self.interrupt.notify_waiters();
    }

    /// Ends every pause, now and from now on (the daemon is stopping).
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    /// Waits `pause`; false when it was ended early.
    pub async fn pause(&self, pause: Duration) -> bool {
        let interrupted = self.interrupt.notified();
        tokio::select! {
            _ = tokio::time::sleep(pause) => !self.stopping.is_cancelled(),
            _ = interrupted => false,
            _ = self.stopping.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn day_long() -> BackendError {
        BackendError::new(ErrorKind::RateLimited(Some(MAX_RETRY_AFTER)), "(429) retry in 24 hours")
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_stated_delay() {
        let policy = RetryPolicy { attempts: 5, base: Duration::from_millis(100), max: Duration::from_secs(1) };
        for attempt in 1..8 {
            let d = policy.delay(attempt, ErrorKind::Transient);
            let exp = Duration::from_millis(100 * (1u64 << (attempt - 1))).min(Duration::from_secs(1));
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?} vs {exp:?}");
        }
        let d = policy.delay(1, ErrorKind::RateLimited(Some(Duration::from_secs(2))));
        assert!(d >= Duration::from_secs(2) && d <= Duration::from_millis(2200));
    }

    #[test]
    fn a_stated_delay_stays_under_the_cap_after_jitter() {
        let policy = RetryPolicy::default();
        for _ in 0..100 {
            let d = policy.delay(1, ErrorKind::RateLimited(Some(MAX_RETRY_AFTER)));
            assert!(d <= MAX_RETRY_AFTER, "{d:?}");
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_permanent_ones_are_not() {
        let policy = RetryPolicy { attempts: 3, base: Duration::from_millis(10), max: Duration::from_millis(10) };
        let pauses = Pauses::default();
        let calls = AtomicU32::new(0);
        let out = policy
            .run(&pauses, "t", || async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 2 { Err(BackendError::new(ErrorKind::Transient, "x")) } else { Ok(n) }
            })
            .await;
        assert_eq!(out.unwrap(), 2);
        calls.store(0, Ordering::SeqCst);
        let out: Result<(), _> = policy
            .run(&pauses, "t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(BackendError::new(ErrorKind::NotFound, "gone"))
            })
            .await;
        assert_eq!(out.unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn stop_and_newer_work_end_a_day_long_pause_with_the_last_error() {
        let policy = RetryPolicy::default();
        for stop in [true, false] {
            let pauses = Arc::new(Pauses::default());
            let calls = Arc::new(AtomicU32::new(0));
            let run = {
                let (pauses, calls) = (pauses.clone(), calls.clone());
                tokio::spawn(async move {
                    let out: Result<(), _> = policy
                        .run(&pauses, "t", || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            async { Err(day_long()) }
                        })
                        .await;
                    out
                })
            };
            // An interrupt only ends pauses under way, so it is repeated until the operation
            // has reached its pause; a generous bound against a hang (uncut, it lasts a day).
            let cut = async {
                loop {
                    if stop {
                        pauses.stop()
                    } else {
                        pauses.interrupt()
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let err = tokio::select! {
                out = run => out.unwrap().unwrap_err(),
                _ = cut => unreachable!(),
                _ = tokio::time::sleep(Duration::from_secs(30)) => panic!("the pause was not cut"),
            };
            assert!(matches!(err.kind, ErrorKind::RateLimited(_)));
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            // After a stop, a pause ends at once; after an interrupt, pauses are taken again.
            assert_eq!(pauses.pause(Duration::from_millis(10)).await, !stop);
        }
    }
}
