//! Refreshes that anyone but the operator's timer asks for — a client's REFRESH and SIGHUP —
//! coalesced and rate-limited, so that neither a client nor the app's `kill -HUP` can spend
//! the account's 1Password quota.
//!
//! Passes start at most once per `min_interval` (start to start), one at a time. Every
//! request is answered by a pass that *began after it arrived*: a request that comes while a
//! pass runs, or within the interval, waits for the one trailing pass that starts when the
//! interval is over, and every request waiting by then shares it. So a flood costs at most
//! one pass per interval, and no answer is ever an older pass's. The refresh timer does not
//! come here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use super::broker::{Broker, ResolveReport};
use crate::cache::SealedCache;

/// The reply of a pass: `Ok(text)` for `OK text`, `Err(text)` for `ERR text`.
type Outcome = Result<String, String>;

pub struct RefreshGate {
    broker: Arc<Broker>,
    cache: Option<Arc<SealedCache>>,
    min_interval: Duration,
    /// Held by the task that waits out the interval and runs the next pass: one at a time.
    runner: Arc<Mutex<Option<Instant>>>,
    /// Passes started so far; a request arriving now needs pass number `started + 1` or later.
    started: AtomicU64,
    /// The number of the last pass finished, and its reply.
    finished: watch::Sender<(u64, Option<Outcome>)>,
    /// The highest pass number a signal-requested refresh is already waiting for.
    signal_wants: AtomicU64,
}

impl RefreshGate {
    pub fn new(broker: Arc<Broker>, cache: Option<Arc<SealedCache>>, min_interval: Duration) -> Arc<RefreshGate> {
        Arc::new(RefreshGate {
            broker,
            cache,
            min_interval,
            runner: Arc::new(Mutex::new(None)),
            started: AtomicU64::new(0),
            finished: watch::channel((0, None)).0,
            signal_wants: AtomicU64::new(0),
        })
    }

    /// A client's REFRESH: the reply of a pass that began after this call.
    pub async fn refresh(self: &Arc<Self>) -> Outcome {
        let want = self.started.load(Ordering::Acquire) + 1;
        self.wait_for_pass(want).await
    }

    /// A SIGHUP: a pass that begins after now, in the background. A signal that a waiting
    /// request already covers (no pass has started since) adds nothing.
    pub fn request(self: &Arc<Self>) {
        let want = self.started.load(Ordering::Acquire) + 1;
        if self.signal_wants.fetch_max(want, Ordering::AcqRel) >= want {
            tracing::debug!("SIGHUP: a refresh is already due; coalesced");
            return;
        }
        let gate = self.clone();
        tokio::spawn(async move { gate.wait_for_pass(want).await });
    }

    async fn wait_for_pass(self: &Arc<Self>, want: u64) -> Outcome {
        let mut finished = self.finished.subscribe();
        loop {
            if let (done, Some(outcome)) = &*finished.borrow_and_update()
                && *done >= want
            {
                return outcome.clone();
            }
            // No pass it can use has started and nobody is preparing one: this request starts
            // the next. The runner drops its lock before publishing, so a request woken by the
            // publication finds it free.
            if self.started.load(Ordering::Acquire) < want
                && let Ok(runner) = self.runner.clone().try_lock_owned()
            {
                let gate = self.clone();
                // A task of its own: a client that hangs up does not cancel the pass others wait for.
                tokio::spawn(async move { gate.run_pass(runner).await });
            }
            if finished.changed().await.is_err() {
                return Err("refresh gate closed".into());
            }
        }
    }

    async fn run_pass(&self, mut runner: tokio::sync::OwnedMutexGuard<Option<Instant>>) {
        if let Some(last) = *runner {
            tokio::time::sleep_until(last + self.min_interval).await;
        }
        *runner = Some(Instant::now());
        let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let report = self.broker.resolve_all().await;
        super::log_report("refresh", &report);
        if let Some(cache) = &self.cache {
            super::recovery::after_refresh(cache, &report);
        }
        let outcome = reply_for(&report);
        drop(runner);
        self.finished.send_replace((number, Some(outcome)));
    }
}

/// The REFRESH reply for a pass: a deleted item is not an error (its name is dropped).
fn reply_for(report: &ResolveReport) -> Outcome {
    if report.failed.iter().all(|(_, e)| e.kind == crate::backend::ErrorKind::NotFound) {
        Ok(format!("refreshed {}", report.resolved))
    } else {
        Err(format!(
            "refreshed {} of {}; kept last values for: {}",
            report.resolved,
            report.total,
            report.failure_summary()
        ))
    }
}
