//! Periodic refresh (`--refresh-interval`) and the read meter behind STATUS's
//! `reads_last_hour`.
//!
//! The timer re-resolves every secret through the same path as SIGHUP (so the same batches,
//! the same cache update and the same change notifications), every interval ± 10% so a fleet
//! started together does not hit 1Password together. A 429 that states a delay pushes the
//! next pass back by at least that delay. The meter counts item reads as the `op` backend
//! spends them (start-up, SIGHUP, REFRESH and timer alike): it is process-wide because the
//! quota it tracks is the token's, not one caller's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::BoxFuture;
use crate::meter::READS;

/// The hour over which the refresh budget is counted.
const HOUR: Duration = Duration::from_secs(3600);

/// When the timer's next pass is due (None: no timer).
static NEXT_REFRESH: Mutex<Option<Instant>> = Mutex::new(None);

/// STATUS facts: seconds to the next timed refresh (null without a timer) and item reads
/// spent in the last hour.
pub fn status() -> serde_json::Value {
    let next = *NEXT_REFRESH.lock().unwrap_or_else(|e| e.into_inner());
    json!({
        "next_refresh_s": next.map(|at| at.saturating_duration_since(Instant::now()).as_secs()),
        "reads_last_hour": READS.last_hour(),
    })
}

/// Warns when refreshing `items` items every `interval` would spend more than `budget` reads
/// an hour (start-up and SIGHUP come on top).
pub fn check_budget(interval: Duration, items: usize, budget: u64) {
    if interval.is_zero() {
        return;
    }
    let per_hour = (items as f64 * HOUR.as_secs_f64() / interval.as_secs_f64()).ceil() as u64;
    if per_hour > budget {
        tracing::warn!(
            "--refresh-interval {:?} with {items} items spends about {per_hour} reads/hour, over the \
             --read-budget of {budget}: 1Password will answer 429 and every op-bridge on this token will stall",
            interval
        );
    }
}

/// A running timer; stops when dropped.
pub struct RefreshTimer {
    stop: CancellationToken,
}

impl Drop for RefreshTimer {
    fn drop(&mut self) {
        self.stop.cancel();
        *NEXT_REFRESH.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// What the timer drives: the daemon's refresh pass (the daemon implements it, so this
/// module does not know the daemon).
pub trait Refresh: Send + Sync + 'static {
    /// How many distinct items one pass reads.
    fn items(&self) -> usize;
    /// Runs one pass; returns the longest delay 1Password stated in a 429, if any.
    fn refresh_pass(&self) -> BoxFuture<'_, Option<Duration>>;
}

/// Starts the timer when `interval` is set; keep the handle as long as it should run.
pub fn start(service: Arc<impl Refresh>, interval: Option<Duration>, budget: u64) -> Option<RefreshTimer> {
    let interval = interval.filter(|d| !d.is_zero())?;
    check_budget(interval, service.items(), budget);
    let stop = CancellationToken::new();
    let timer = RefreshTimer { stop: stop.clone() };
    tokio::spawn(async move {
        let mut pause = jittered(interval);
        loop {
            let due = Instant::now() + pause;
            *NEXT_REFRESH.lock().unwrap_or_else(|e| e.into_inner()) = Some(due);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            let stated = service.refresh_pass().await;
            pause = next_pause(interval, stated);
        }
    });
    Some(timer)
}

/// The pause before the next pass: the jittered interval, or longer when 1Password answered
/// 429 and said how long to wait.
fn next_pause(interval: Duration, stated: Option<Duration>) -> Duration {
    jittered(interval).max(stated.unwrap_or_default())
}

/// `interval` ± 10%.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11), "{d:?}");
        }
    }

    #[test]
    fn a_stated_429_delay_pushes_the_next_pass_back() {
        assert!(next_pause(Duration::from_secs(10), None) <= Duration::from_secs(11));
        assert_eq!(next_pause(Duration::from_secs(10), Some(Duration::from_secs(120))), Duration::from_secs(120));
    }
}
