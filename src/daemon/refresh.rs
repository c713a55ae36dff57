//! REFRESH from socket clients, coalesced and rate-limited, so that no client can spend the
//! account's 1Password quota: a REFRESH that arrives while one is running joins it (and gets
//! its result), and clients cause at most one resolution pass per `min_interval`; within it
//! they get the last result, marked as such. SIGHUP and the refresh timer do not come here
//! and are never limited.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::broker::{Broker, ResolveReport};

/// The reply of the last pass: `Ok(text)` for `OK text`, `Err(text)` for `ERR text`.
type Outcome = Result<String, String>;

pub struct RefreshGate {
    broker: Arc<Broker>,
    min_interval: Duration,
    /// Held for the whole pass, so callers that arrive meanwhile queue behind it.
    last: Mutex<Option<(Instant, Outcome)>>,
    /// Passes finished; a caller that sees it move while waiting joined a pass.
    passes: AtomicU64,
}

impl RefreshGate {
    pub fn new(broker: Arc<Broker>, min_interval: Duration) -> Arc<RefreshGate> {
        Arc::new(RefreshGate { broker, min_interval, last: Mutex::new(None), passes: AtomicU64::new(0) })
    }

    /// A client's REFRESH: a new pass, the one in progress, or the last result.
    pub async fn refresh(&self) -> Outcome {
        let seen = self.passes.load(Ordering::Acquire);
        let mut last = self.last.lock().await;
        if let Some((at, outcome)) = last.as_ref() {
            if self.passes.load(Ordering::Acquire) != seen {
                return outcome.clone();
            }
            let age = at.elapsed();
            if age < self.min_interval {
                let note = format!(
                    " (result of a refresh {}s ago; clients may refresh at most once every {}s)",
                    age.as_secs(),
                    self.min_interval.as_secs_f64()
                );
                return match outcome {
                    Ok(text) => Ok(format!("{text}{note}")),
                    Err(text) => Err(format!("{text}{note}")),
                };
            }
        }
        let report = self.broker.resolve_all().await;
        super::log_report("refresh", &report);
        let outcome = reply_for(&report);
        *last = Some((Instant::now(), outcome.clone()));
        self.passes.fetch_add(1, Ordering::AcqRel);
        outcome
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
