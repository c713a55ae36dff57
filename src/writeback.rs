//! The write-back queue: one worker per 1Password target, so no rotation is ever lost.
//!
//! Each target holds at most one pending value: a newer submission replaces an unsent older
//! one (a burst of rewrites costs a handful of writes). A failed write is retried with
//! backoff and jitter, honouring a 429's stated delay, until it succeeds; nothing pending is
//! dropped while the process lives (SET submissions that fail permanently are the exception:
//! their client was told). On shutdown, [`WriteBack::flush`] retries without the long pauses
//! until a deadline, and reports by name and target — never by value — what it could not store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::backend::{Backend, BackendError, ErrorKind, RetryPolicy, WriteOptions};
use crate::reference::SecretRef;
use crate::store::SecretStore;

/// Backoff of write-back retries: from half a second up to this cap.
const RETRY: RetryPolicy =
    RetryPolicy { attempts: u32::MAX, base: Duration::from_millis(500), max: Duration::from_secs(30) };
/// Longest pause between retries while flushing at shutdown.
const FLUSH_PAUSE: Duration = Duration::from_millis(300);

/// Who asked for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A watched file changed.
    Watch,
    /// A socket client's SET (it waits for the answer).
    Set,
}

struct Pending {
    generation: u64,
    origin: Origin,
    value: Zeroizing<Vec<u8>>,
}

#[derive(Default)]
struct TargetState {
    pending: Option<Pending>,
    /// Generation being written right now.
    in_flight: Option<u64>,
    next_generation: u64,
    attempts: u32,
    last_error: Option<String>,
    writes: u64,
    last_write: Option<SystemTime>,
}

/// The outcome of a write for the generations that waited on it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    None,
    /// Every generation up to this one is stored (or superseded by a stored one).
    Stored(u64),
    /// This generation failed permanently and was dropped.
    Refused(u64, String),
}

struct Target {
    name: String,
    reference: SecretRef,
    state: Mutex<TargetState>,
    wake: Notify,
    outcome_tx: watch::Sender<Outcome>,
}

impl Target {
    fn lock(&self) -> std::sync::MutexGuard<'_, TargetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A write that could not be stored before exit.
#[derive(Debug, Clone)]
pub struct Unwritten {
    pub name: String,
    pub reference: String,
    pub reason: String,
}

pub struct WriteBack {
    backend: Arc<dyn Backend>,
    store: Arc<SecretStore>,
    options: WriteOptions,
    changes_tx: broadcast::Sender<Vec<String>>,
    targets: Mutex<BTreeMap<String, Arc<Target>>>,
    flushing: CancellationToken,
    /// Durable journal (issue 13, `--cache`): accepted writes are sealed to disk until stored.
    journal: std::sync::OnceLock<crate::cache::Journal>,
}

impl WriteBack {
    pub fn new(
        backend: Arc<dyn Backend>,
        store: Arc<SecretStore>,
        options: WriteOptions,
        changes_tx: broadcast::Sender<Vec<String>>,
    ) -> Arc<WriteBack> {
        Arc::new(WriteBack {
            backend,
            store,
            options,
            changes_tx,
            targets: Mutex::new(BTreeMap::new()),
            flushing: CancellationToken::new(),
            journal: std::sync::OnceLock::new(),
        })
    }

    fn targets(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Target>>> {
        self.targets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The target's worker, started on first use.
    fn target(self: &Arc<Self>, name: &str, reference: &SecretRef) -> Arc<Target> {
        let key = reference.to_string();
        let mut targets = self.targets();
        if let Some(target) = targets.get(&key) {
            return target.clone();
        }
        let target = Arc::new(Target {
            name: name.to_string(),
            reference: reference.clone(),
            state: Mutex::new(TargetState::default()),
            wake: Notify::new(),
            outcome_tx: watch::channel(Outcome::None).0,
        });
        targets.insert(key, target.clone());
        let queue = self.clone();
        let worker = target.clone();
        tokio::spawn(async move { queue.work(worker).await });
        target
    }

    /// Journals every accepted write from now on (issue 13; set once, at start).
    pub fn attach_journal(&self, journal: crate::cache::Journal) {
        let _ = self.journal.set(journal);
    }

    /// Queues `value` for `reference`, replacing any unsent older value. Returns the
    /// submission's generation.
    pub fn submit(self: &Arc<Self>, name: &str, reference: &SecretRef, value: &[u8], origin: Origin) -> u64 {
        let target = self.target(name, reference);
        let generation = {
            let mut state = target.lock();
            state.next_generation += 1;
            let generation = state.next_generation;
            // Journal hook (issue 13): sealed to disk before the write is acknowledged.
            if let Some(journal) = self.journal.get() {
                journal.record(name, reference, generation, value);
            }
            let replaced = state.pending.replace(Pending { generation, origin, value: Zeroizing::new(value.to_vec()) });
            if replaced.is_some() {
                tracing::debug!(name, reference = %reference, "newer value replaces an unsent one");
            }
            generation
        };
        target.wake.notify_one();
        generation
    }

    /// Waits until generation `generation` of `reference` is stored (or superseded by a
    /// stored newer one), fails permanently, or `limit` passes.
    pub async fn wait_stored(&self, reference: &SecretRef, generation: u64, limit: Duration) -> Result<(), String> {
        let Some(target) = self.targets().get(&reference.to_string()).cloned() else {
            return Err("no such write-back target".into());
        };
        let mut outcome_rx = target.outcome_tx.subscribe();
        let wait = async {
            loop {
                match &*outcome_rx.borrow_and_update() {
                    Outcome::Stored(done) if *done >= generation => return Ok(()),
                    Outcome::Refused(g, reason) if *g == generation => return Err(reason.clone()),
                    _ => {}
                }
                if outcome_rx.changed().await.is_err() {
                    return Err("write-back worker stopped".into());
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "not stored in 1Password yet ({}); op-bridge keeps retrying",
                target.lock().last_error.clone().unwrap_or_else(|| "still writing".into())
            )),
        }
    }

    /// Whether `name` has a write that is queued or in flight (a refresh must not overwrite
    /// the newer local value with 1Password's older one).
    pub fn is_pending(&self, name: &str) -> bool {
        self.targets().values().any(|t| {
            t.name == name && {
                let state = t.lock();
                state.pending.is_some() || state.in_flight.is_some()
            }
        })
    }

    async fn work(self: Arc<Self>, target: Arc<Target>) {
        loop {
            let job = {
                let mut state = target.lock();
                let job = state.pending.take();
                if let Some(job) = &job {
                    state.in_flight = Some(job.generation);
                }
                job
            };
            let Some(job) = job else {
                target.wake.notified().await;
                continue;
            };
            let writes = [crate::backend::FieldWrite { reference: target.reference.clone(), value: job.value.clone() }];
            let result = match self.backend.write_item(&writes, self.options).await {
                Ok(mut fields) => fields.pop().unwrap_or(Ok(())),
                Err(err) => Err(err),
            };
            let pause = self.finish(&target, job, result);
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.flushing.cancelled() => tokio::time::sleep(pause.min(FLUSH_PAUSE)).await,
                }
            }
        }
    }

    /// Books the result of one write; returns the pause before the next attempt, if any.
    fn finish(&self, target: &Target, job: Pending, result: Result<(), BackendError>) -> Option<Duration> {
        let mut state = target.lock();
        state.in_flight = None;
        match result {
            Ok(()) => {
                state.attempts = 0;
                state.last_error = None;
                state.writes += 1;
                state.last_write = Some(SystemTime::now());
                // Memory follows 1Password unless a newer value is already queued.
                let newest = state.pending.is_none();
                drop(state);
                tracing::info!(name = %target.name, reference = %target.reference, "write-back stored");
                // Journal hook (issue 13): stored, so no longer needs replaying.
                if let Some(journal) = self.journal.get() {
                    journal.settle(&target.reference, job.generation);
                }
                if newest && self.store.set_value(&target.name, &job.value) {
                    let _ = self.changes_tx.send(vec![target.name.clone()]);
                }
                target.outcome_tx.send_replace(Outcome::Stored(job.generation));
                None
            }
            Err(err) if job.origin == Origin::Set && err.kind.is_permanent() => {
                state.last_error = Some(format!("{}: {}", err.kind.label(), err.message));
                drop(state);
                tracing::warn!(name = %target.name, reference = %target.reference, "SET refused by the backend: {err}");
                // Journal hook (issue 13): refused for good, and its client was told.
                if let Some(journal) = self.journal.get() {
                    journal.settle(&target.reference, job.generation);
                }
                target.outcome_tx.send_replace(Outcome::Refused(job.generation, err.message));
                None
            }
            Err(err) => {
                state.attempts += 1;
                state.last_error = Some(format!("{}: {}", err.kind.label(), err.message));
                if state.pending.is_none() {
                    state.pending = Some(job);
                }
                let attempt = state.attempts;
                drop(state);
                let pause = retry_pause(attempt, err.kind);
                tracing::warn!(
                    name = %target.name,
                    reference = %target.reference,
                    attempt,
                    "write-back failed: {err}; retrying in {:.1}s",
                    pause.as_secs_f64()
                );
                Some(pause)
            }
        }
    }

    /// Retries pending writes without long pauses until all are stored or `deadline`;
    /// returns what could not be stored.
    pub async fn flush(&self, deadline: Instant) -> Vec<Unwritten> {
        self.flushing.cancel();
        loop {
            let unwritten: Vec<Unwritten> = self
                .targets()
                .values()
                .filter_map(|t| {
                    let state = t.lock();
                    (state.pending.is_some() || state.in_flight.is_some()).then(|| Unwritten {
                        name: t.name.clone(),
                        reference: t.reference.to_string(),
                        reason: state.last_error.clone().unwrap_or_else(|| "write still in progress".into()),
                    })
                })
                .collect();
            if unwritten.is_empty() || Instant::now() >= deadline {
                return unwritten;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// STATUS view: every target with its queue state; never a value.
    pub fn status(&self) -> serde_json::Value {
        let now = SystemTime::now();
        let targets: Vec<serde_json::Value> = self
            .targets()
            .values()
            .map(|t| {
                let state = t.lock();
                json!({
                    "name": t.name,
                    "ref": t.reference.to_string(),
                    "pending": state.pending.is_some(),
                    "in_flight": state.in_flight.is_some(),
                    "failed_attempts": state.attempts,
                    "last_error": state.last_error,
                    "writes": state.writes,
                    "last_write_age_s": state.last_write.and_then(|t| now.duration_since(t).ok()).map(|d| d.as_secs()),
                })
            })
            .collect();
        let pending = targets.iter().filter(|t| t["pending"] == true || t["in_flight"] == true).count();
        let failing = targets.iter().filter(|t| t["failed_attempts"].as_u64().unwrap_or(0) > 0).count();
        json!({ "pending": pending, "failing": failing, "targets": targets })
    }
}

fn retry_pause(attempt: u32, kind: ErrorKind) -> Duration {
    RETRY.delay(attempt, kind)
}
