//! The write-back queue: one worker per 1Password **item**, so no rotation is ever lost.
//!
//! OAuth access and refresh tokens usually live as two fields of one item, and both the CLI and
//! Connect replace or patch whole items. So writes are serialised per item: the item's worker
//! takes every field change pending at that moment and stores them in one read-modify-write
//! ([`Backend::write_item`]); two fields rotated together cost one edit and neither erases the
//! other. A concurrent edit elsewhere is refused by the item version (a `Conflict`), and the
//! cycle is simply redone on a fresh read.
//!
//! Each field holds at most one pending value: a newer one replaces an unsent older one (a
//! burst of rewrites costs a handful of writes), and a SET whose value was replaced so is
//! answered by the value that replaced it. SETs are also bounded in time, since the
//! application's uid may send them in a loop and the account allows few writes an hour: a
//! cycle carrying only SETs starts no sooner than `set_interval` after the item's previous
//! cycle started, so the SETs that come meanwhile share one read-modify-write. A change
//! captured from a watched file is not held back (the watcher has its own debounce) and takes
//! the waiting SETs with it; a flush at shutdown holds nothing back.
//!
//! Only a newer value for the same field ever drops one: a failed write is retried with
//! backoff and jitter (honouring a 429's delay) until it succeeds, permanent failures
//! included, which are reported as `failing` and logged at ERROR. The one exception is a
//! SET, whose client is waiting: a permanent refusal is its answer, and a value from a
//! watched file that the SET had replaced becomes pending again. On shutdown,
//! [`WriteBack::flush`] retries without the long pauses until a deadline and reports by name
//! and target — never by value — what it could not store.
//!
//! With `--cache`, a [`Journal`] is attached: every accepted value is sealed to disk before
//! `submit` returns (so before a SET is acknowledged or a capture is considered taken), and
//! settled once it is stored or refused, so `kill -9` during an outage loses nothing. A value
//! whose journal write failed is still queued, but it is not durable: `submit` says so, the
//! field shows `not_journaled` in STATUS, and the log says so at ERROR. The queue also tells
//! the journal what 1Password holds once a write is stored (the base of the watcher's
//! start-up comparison).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::backend::{Backend, BackendError, ErrorKind, FieldWrite, RetryPolicy, WriteOptions};
use crate::cache::Journal;
use crate::reference::SecretRef;
use crate::store::SecretStore;

/// Backoff of write-back retries after a transient failure: from half a second up to 30 s.
const RETRY: RetryPolicy =
    RetryPolicy { attempts: u32::MAX, base: Duration::from_millis(500), max: Duration::from_secs(30) };
/// Backoff after a permanent failure (missing item, auth): it is retried all the same, since
/// dropping a rotation is worse, but slowly, so it does not burn the account's quota.
const RETRY_PERMANENT: RetryPolicy =
    RetryPolicy { attempts: u32::MAX, base: Duration::from_secs(5), max: Duration::from_secs(300) };
/// How long an idle item worker waits after the first change before it writes: fields rotated
/// together (an access and a refresh token) are captured a few milliseconds apart, and this
/// lets one edit carry them all.
const GATHER: Duration = Duration::from_millis(150);
/// Pause before redoing a read-modify-write that met a concurrent edit.
const CONFLICT_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between retries while flushing at shutdown.
const FLUSH_PAUSE: Duration = Duration::from_millis(300);
/// Most SETs remembered per field as replaced by a newer value not yet stored, and most
/// refusals kept for waiting SETs (each entry lives only as long as its SET's wait matters).
const HISTORY: usize = 1024;

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

/// One field of an item, as the queue sees it.
struct FieldState {
    name: String,
    reference: SecretRef,
    pending: Option<Pending>,
    /// A watched file's value that a SET replaced before it was stored: if the SET is
    /// refused, this one is pending again (only a newer value may drop a value).
    fallback: Option<Pending>,
    /// Generation being written right now.
    in_flight: Option<u64>,
    /// Every generation up to this one is stored (or was superseded by a stored one).
    stored: u64,
    /// SET generations refused, with the reason (their clients are told).
    refused: Vec<(u64, Arc<str>)>,
    /// SET generations replaced by a newer value before they were sent, with that value's
    /// generation: a SET shares the fate of the value that replaced it.
    superseded: Vec<(u64, u64)>,
    attempts: u32,
    last_error: Option<String>,
    writes: u64,
    last_write: Option<SystemTime>,
    /// Why the pending value could not be journaled (it would not survive a restart).
    not_journaled: Option<String>,
}

impl FieldState {
    fn is_pending(&self) -> bool {
        self.pending.is_some() || self.in_flight.is_some() || self.fallback.is_some()
    }

    /// Refuses SET `generation`, and every SET that a refused value had replaced.
    fn refuse(&mut self, generation: u64, reason: String) {
        let reason: Arc<str> = reason.into();
        let mut due = vec![generation];
        while let Some(refused) = due.pop() {
            self.superseded.retain(|&(older, by)| {
                if by == refused {
                    due.push(older);
                }
                by != refused
            });
            self.refused.push((refused, reason.clone()));
        }
        // Waiters read this within --set-wait; keep a bounded history only.
        let excess = self.refused.len().saturating_sub(HISTORY);
        self.refused.drain(..excess);
    }

    /// SET `older` was replaced by generation `by` before it was sent: once `by` is stored
    /// it counts as stored (`stored` passes it), and if `by` is refused, so is `older`.
    fn supersede(&mut self, older: u64, by: u64) {
        self.superseded.push((older, by));
        let excess = self.superseded.len().saturating_sub(HISTORY);
        self.superseded.drain(..excess);
    }
}

/// The fields of one item and the worker's bookkeeping.
#[derive(Default)]
struct ItemState {
    /// By reference text.
    fields: BTreeMap<String, FieldState>,
    next_generation: u64,
}

struct ItemQueue {
    vault: String,
    item: String,
    state: Mutex<ItemState>,
    wake: Notify,
    /// A SET arrived: its client is waiting, so a backoff pause ends early.
    set_wake: Notify,
    /// Bumped after every write attempt; waiters then re-check their field.
    progress_tx: watch::Sender<u64>,
}

impl ItemQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, ItemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What became of a SET's value within its wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOutcome {
    /// 1Password has it (or a newer value that replaced it).
    Stored,
    /// 1Password refused it for good; nothing changed.
    Refused(String),
    /// Still queued (outage, 429…): it will be stored when 1Password answers.
    Pending(String),
}

/// An accepted submission.
#[derive(Debug, Clone)]
pub struct Submission {
    pub generation: u64,
    /// Why the value could not be journaled (`--cache`): it is queued, but not durable.
    pub not_journaled: Option<String>,
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
    /// Least time between the starts of two SET-driven cycles of one item.
    set_interval: Duration,
    changes_tx: broadcast::Sender<Vec<String>>,
    /// By (vault, item).
    items: Mutex<BTreeMap<(String, String), Arc<ItemQueue>>>,
    flushing: CancellationToken,
    /// The durable journal (`--cache`), attached once at start.
    journal: std::sync::OnceLock<Journal>,
}

impl WriteBack {
    pub fn new(
        backend: Arc<dyn Backend>,
        store: Arc<SecretStore>,
        options: WriteOptions,
        set_interval: Duration,
        changes_tx: broadcast::Sender<Vec<String>>,
    ) -> Arc<WriteBack> {
        Arc::new(WriteBack {
            backend,
            store,
            options,
            set_interval,
            changes_tx,
            items: Mutex::new(BTreeMap::new()),
            flushing: CancellationToken::new(),
            journal: std::sync::OnceLock::new(),
        })
    }

    /// Journals every accepted write from now on (set once, at start, with `--cache`).
    pub fn attach_journal(&self, journal: Journal) {
        let _ = self.journal.set(journal);
    }

    /// The attached journal, if any (`--cache`).
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.get()
    }

    /// Seals `pending` in the journal; `Some(reason)` when that failed (not durable).
    fn journal_record(&self, name: &str, reference: &SecretRef, pending: &Pending) -> Option<String> {
        let journal = self.journal.get()?;
        let err = journal.record(name, reference, pending.generation, &pending.value).err()?;
        tracing::error!(
            name,
            reference = %reference,
            "write-back NOT journaled: {err}; it is queued and retried while op-bridge runs, but a restart \
             before 1Password stores it loses it"
        );
        Some(err.to_string())
    }

    /// Notes what 1Password holds (a resolution's answers) for the journal's records.
    pub fn note_held<'a>(&self, held: impl IntoIterator<Item = (&'a SecretRef, &'a [u8])>) {
        if let Some(journal) = self.journal.get() {
            journal.note_held(held);
        }
    }

    /// The value op-bridge knew 1Password held for a watched `reference` when this run started
    /// (`--cache` only: without it there is no record across restarts).
    pub fn held_at_start(&self, reference: &SecretRef) -> Option<Zeroizing<Vec<u8>>> {
        self.journal.get()?.held_at_start(reference)
    }

    fn journal_settle(&self, reference: &SecretRef, generation: u64) {
        if let Some(journal) = self.journal.get() {
            journal.settle(reference, generation);
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Arc<ItemQueue>>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The item's queue, its worker started on first use.
    fn queue(self: &Arc<Self>, reference: &SecretRef) -> Arc<ItemQueue> {
        let key = (reference.vault.clone(), reference.item.clone());
        let mut items = self.items();
        if let Some(queue) = items.get(&key) {
            return queue.clone();
        }
        let queue = Arc::new(ItemQueue {
            vault: key.0.clone(),
            item: key.1.clone(),
            state: Mutex::new(ItemState::default()),
            wake: Notify::new(),
            set_wake: Notify::new(),
            progress_tx: watch::channel(0).0,
        });
        items.insert(key, queue.clone());
        let worker = (self.clone(), queue.clone());
        tokio::spawn(async move { worker.0.work(worker.1).await });
        queue
    }

    /// Queues `value` for `reference`, replacing any unsent older value of that field.
    /// Returns the submission's generation and whether it was journaled.
    pub fn submit(self: &Arc<Self>, name: &str, reference: &SecretRef, value: &[u8], origin: Origin) -> Submission {
        let queue = self.queue(reference);
        let submission = {
            let mut state = queue.lock();
            state.next_generation += 1;
            let generation = state.next_generation;
            let field = state.fields.entry(reference.to_string()).or_insert_with(|| FieldState {
                name: name.to_string(),
                reference: reference.clone(),
                pending: None,
                fallback: None,
                in_flight: None,
                stored: 0,
                refused: Vec::new(),
                superseded: Vec::new(),
                attempts: 0,
                last_error: None,
                writes: 0,
                last_write: None,
                not_journaled: None,
            });
            field.name = name.to_string();
            let new = Pending { generation, origin, value: Zeroizing::new(value.to_vec()) };
            // Sealed to disk before the submission counts as accepted.
            field.not_journaled = self.journal_record(name, reference, &new);
            let not_journaled = field.not_journaled.clone();
            match field.pending.replace(new) {
                // A SET that replaces a watched file's value keeps it as the fallback.
                Some(old) if old.origin == Origin::Watch && origin == Origin::Set => field.fallback = Some(old),
                Some(old) => {
                    if old.origin == Origin::Set {
                        field.supersede(old.generation, generation);
                    }
                    tracing::debug!(name, reference = %reference, "newer value replaces an unsent one");
                }
                None => {}
            }
            if origin == Origin::Watch {
                // A newer value from the file: an older one kept for a SET's sake is moot.
                field.fallback = None;
            }
            Submission { generation, not_journaled }
        };
        queue.wake.notify_one();
        if origin == Origin::Set {
            queue.set_wake.notify_one();
        }
        submission
    }

    /// Waits until generation `generation` of `reference` is stored (or superseded by a
    /// stored newer one), is refused, or `limit` passes.
    pub async fn wait_stored(&self, reference: &SecretRef, generation: u64, limit: Duration) -> SetOutcome {
        let key = (reference.vault.clone(), reference.item.clone());
        let Some(queue) = self.items().get(&key).cloned() else {
            return SetOutcome::Refused("no such write-back target".into());
        };
        let field_key = reference.to_string();
        let mut progress_rx = queue.progress_tx.subscribe();
        let check = |queue: &ItemQueue| -> Option<SetOutcome> {
            let state = queue.lock();
            let field = state.fields.get(&field_key)?;
            if let Some((_, reason)) = field.refused.iter().find(|(g, _)| *g == generation) {
                return Some(SetOutcome::Refused(reason.to_string()));
            }
            (field.stored >= generation).then_some(SetOutcome::Stored)
        };
        let wait = async {
            loop {
                progress_rx.borrow_and_update();
                if let Some(outcome) = check(&queue) {
                    return outcome;
                }
                if progress_rx.changed().await.is_err() {
                    return SetOutcome::Pending("write-back worker stopped".into());
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let state = queue.lock();
                let reason = state.fields.get(&field_key).and_then(|f| f.last_error.clone());
                SetOutcome::Pending(reason.unwrap_or_else(|| "still writing".into()))
            }
        }
    }

    /// Whether `name` has a value that is queued, in flight or held back for a SET (a refresh
    /// must not overwrite the newer local value with 1Password's older one). A write to a
    /// reference `name` no longer points at (a replayed journal entry of the reference the
    /// name was moved away from) is not that name's value and does not count.
    pub fn is_pending(&self, name: &str) -> bool {
        let current = self.store.reference(name);
        self.items().values().any(|queue| {
            queue
                .lock()
                .fields
                .values()
                .any(|f| f.name == name && current.as_ref().is_none_or(|r| *r == f.reference) && f.is_pending())
        })
    }

    async fn work(self: Arc<Self>, queue: Arc<ItemQueue>) {
        // When the item's last cycle started: the next SET-driven one waits for the interval.
        let mut last_cycle: Option<Instant> = None;
        loop {
            let idle = !queue.lock().fields.values().any(|f| f.pending.is_some());
            if idle {
                // A submission made since the check left a permit: nothing is missed.
                queue.wake.notified().await;
            }
            if let Some(last) = last_cycle {
                self.wait_set_interval(&queue, last + self.set_interval).await;
            }
            tokio::time::sleep(GATHER).await;
            // Every field change pending right now goes into this one read-modify-write.
            let jobs: Vec<(String, Pending)> = {
                let mut state = queue.lock();
                state
                    .fields
                    .iter_mut()
                    .filter_map(|(key, field)| {
                        let job = field.pending.take()?;
                        field.in_flight = Some(job.generation);
                        Some((key.clone(), job))
                    })
                    .collect()
            };
            if jobs.is_empty() {
                continue;
            }
            last_cycle = Some(Instant::now());
            let writes: Vec<FieldWrite> = {
                let state = queue.lock();
                jobs.iter()
                    .map(|(key, job)| FieldWrite {
                        reference: state.fields[key].reference.clone(),
                        value: job.value.clone(),
                    })
                    .collect()
            };
            let result = self.backend.write_item(&writes, self.options).await;
            drop(writes);
            let pause = self.finish(&queue, jobs, result);
            queue.progress_tx.send_modify(|n| *n += 1);
            if let Some(pause) = pause {
                let resume = Instant::now() + pause;
                tokio::select! {
                    _ = tokio::time::sleep_until(resume) => {}
                    // A SET's client is waiting: retry sooner, but no sooner than the SET
                    // interval allows (a failing capture must not let SETs through unbounded).
                    _ = queue.set_wake.notified() => {
                        let sooner = last_cycle.map_or(resume, |last| resume.min(last + self.set_interval));
                        tokio::select! {
                            _ = tokio::time::sleep_until(sooner) => {}
                            _ = self.flushing.cancelled() => {}
                        }
                    }
                    _ = self.flushing.cancelled() => tokio::time::sleep(pause.min(FLUSH_PAUSE)).await,
                }
            }
        }
    }

    /// Holds a cycle that carries only SETs until `until`, so SETs in a loop cost one write per
    /// interval. A value of any other origin (a captured change has the watcher's own
    /// debounce) or a flush ends the wait.
    async fn wait_set_interval(&self, queue: &ItemQueue, until: Instant) {
        loop {
            let unheld =
                queue.lock().fields.values().any(|f| f.pending.as_ref().is_some_and(|p| p.origin != Origin::Set));
            if unheld || self.flushing.is_cancelled() || Instant::now() >= until {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                _ = queue.wake.notified() => {}
                _ = self.flushing.cancelled() => return,
            }
        }
    }

    /// Books the result of one item write; returns the pause before the next attempt, if any.
    fn finish(
        &self,
        queue: &ItemQueue,
        jobs: Vec<(String, Pending)>,
        result: Result<Vec<Result<(), BackendError>>, BackendError>,
    ) -> Option<Duration> {
        let results: Vec<Result<(), BackendError>> = match result {
            Ok(per_field) if per_field.len() == jobs.len() => per_field,
            Ok(_) => {
                let err = BackendError::new(ErrorKind::Transient, "backend answered for the wrong number of fields");
                jobs.iter().map(|_| Err(err.clone())).collect()
            }
            Err(err) => jobs.iter().map(|_| Err(err.clone())).collect(),
        };
        let mut pause: Option<Duration> = None;
        let mut changed = Vec::new();
        let mut state = queue.lock();
        for ((key, job), result) in jobs.into_iter().zip(results) {
            let Some(field) = state.fields.get_mut(&key) else { continue };
            field.in_flight = None;
            match result {
                Ok(()) => {
                    field.attempts = 0;
                    field.last_error = None;
                    field.writes += 1;
                    field.last_write = Some(SystemTime::now());
                    field.stored = field.stored.max(job.generation);
                    let stored = field.stored;
                    field.superseded.retain(|&(older, _)| older > stored);
                    if field.fallback.as_ref().is_some_and(|f| f.generation < job.generation) {
                        field.fallback = None;
                    }
                    tracing::info!(name = %field.name, reference = %field.reference, "write-back stored");
                    if let Some(journal) = self.journal.get() {
                        journal.note_held([(&field.reference, job.value.as_slice())]);
                    }
                    self.journal_settle(&field.reference, job.generation);
                    if field.pending.is_none() {
                        field.not_journaled = None;
                    }
                    // Memory follows 1Password unless a newer value is already queued, and only
                    // under a name that still points at this reference.
                    let current = self.store.reference(&field.name).is_none_or(|r| r == field.reference);
                    if field.pending.is_none() && current && self.store.set_value(&field.name, &job.value) {
                        changed.push(field.name.clone());
                    }
                }
                Err(err) if job.origin == Origin::Set && err.kind.is_permanent() => {
                    tracing::warn!(name = %field.name, reference = %field.reference, "SET refused by the backend: {err}");
                    field.refuse(job.generation, err.message.clone());
                    self.journal_settle(&field.reference, job.generation);
                    if field.pending.is_none() {
                        // The watched file's value the SET had replaced is due again (and
                        // journaled again: the journal keeps one value per reference).
                        field.pending = field.fallback.take();
                        if let Some(restored) = &field.pending {
                            field.not_journaled = self.journal_record(&field.name, &field.reference, restored);
                            pause = Some(pause.unwrap_or(Duration::ZERO));
                        }
                    }
                }
                Err(err) => {
                    field.attempts += 1;
                    field.last_error = Some(format!("{}: {}", err.kind.label(), err.message));
                    let kind = err.kind;
                    match &field.pending {
                        None => field.pending = Some(job),
                        // A SET arrived while this file value was being written: if the SET
                        // is refused, this value is due again.
                        Some(newer) if newer.origin == Origin::Set && job.origin == Origin::Watch => {
                            if field.fallback.as_ref().is_none_or(|f| f.generation < job.generation) {
                                field.fallback = Some(job);
                            }
                        }
                        Some(newer) if job.origin == Origin::Set => {
                            let by = newer.generation;
                            field.supersede(job.generation, by);
                        }
                        // A newer value replaces this one.
                        Some(_) => {}
                    }
                    let wait = match kind {
                        ErrorKind::Conflict => CONFLICT_PAUSE,
                        kind if kind.is_permanent() => RETRY_PERMANENT.delay(field.attempts, kind),
                        kind => RETRY.delay(field.attempts, kind),
                    };
                    if kind.is_permanent() {
                        tracing::error!(
                            name = %field.name,
                            reference = %field.reference,
                            attempt = field.attempts,
                            "write-back failing: {err}; the value is kept and retried in {:.0}s",
                            wait.as_secs_f64()
                        );
                    } else {
                        tracing::warn!(
                            name = %field.name,
                            reference = %field.reference,
                            attempt = field.attempts,
                            "write-back failed: {err}; retrying in {:.1}s",
                            wait.as_secs_f64()
                        );
                    }
                    pause = Some(pause.map_or(wait, |p| p.min(wait)));
                }
            }
        }
        drop(state);
        if !changed.is_empty() {
            let _ = self.changes_tx.send(changed);
        }
        pause
    }

    /// Retries pending writes without long pauses until all are stored or `deadline`;
    /// returns what could not be stored.
    pub async fn flush(&self, deadline: Instant) -> Vec<Unwritten> {
        self.flushing.cancel();
        // A backend operation paused for a long stated delay gives up now; this loop retries
        // on its own short schedule.
        if let Some(pauses) = self.backend.pauses() {
            pauses.stop();
        }
        loop {
            let unwritten: Vec<Unwritten> = self
                .items()
                .values()
                .flat_map(|queue| {
                    let state = queue.lock();
                    state
                        .fields
                        .values()
                        .filter(|f| f.is_pending())
                        .map(|f| Unwritten {
                            name: f.name.clone(),
                            reference: f.reference.to_string(),
                            reason: f.last_error.clone().unwrap_or_else(|| "write still in progress".into()),
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            if unwritten.is_empty() || Instant::now() >= deadline {
                return unwritten;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// STATUS view: every field with its queue state; never a value.
    pub fn status(&self) -> serde_json::Value {
        let now = SystemTime::now();
        let targets: Vec<serde_json::Value> = self
            .items()
            .values()
            .flat_map(|queue| {
                let state = queue.lock();
                state
                    .fields
                    .values()
                    .map(|f| {
                        json!({
                            "name": f.name,
                            "ref": f.reference.to_string(),
                            "item": format!("op://{}/{}", queue.vault, queue.item),
                            "pending": f.pending.is_some() || f.fallback.is_some(),
                            "in_flight": f.in_flight.is_some(),
                            "failing": f.attempts > 0,
                            "failed_attempts": f.attempts,
                            "last_error": f.last_error,
                            "writes": f.writes,
                            "last_write_age_s": f.last_write.and_then(|t| now.duration_since(t).ok()).map(|d| d.as_secs()),
                            "not_journaled": f.not_journaled.as_ref().filter(|_| f.is_pending()),
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let pending = targets.iter().filter(|t| t["pending"] == true || t["in_flight"] == true).count();
        let failing = targets.iter().filter(|t| t["failing"] == true).count();
        let not_journaled = targets.iter().filter(|t| t["not_journaled"].is_string()).count();
        json!({ "pending": pending, "failing": failing, "not_journaled": not_journaled, "targets": targets })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::backend::{BoxFuture, ItemWriteResult, Value};

    /// One write call as the backend saw it: (field, value) per field.
    type Call = Vec<(String, Vec<u8>)>;

    /// A backend whose writes wait for the test to open a gate, then answer as scripted.
    struct Scripted {
        calls: Mutex<Vec<Call>>,
        outcomes: Mutex<VecDeque<Option<ErrorKind>>>,
        gate: Semaphore,
    }

    impl Backend for Scripted {
        fn resolve<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>> {
            Box::pin(async move { refs.iter().map(|_| Err(BackendError::new(ErrorKind::NotFound, "x"))).collect() })
        }

        fn write_item<'a>(&'a self, writes: &'a [FieldWrite], _: WriteOptions) -> BoxFuture<'a, ItemWriteResult> {
            Box::pin(async move {
                let call = writes.iter().map(|w| (w.reference.field.clone(), w.value.to_vec())).collect();
                self.calls.lock().unwrap().push(call);
                self.gate.acquire().await.unwrap().forget();
                match self.outcomes.lock().unwrap().pop_front().flatten() {
                    None => Ok(writes.iter().map(|_| Ok(())).collect()),
                    Some(kind) => Err(BackendError::new(kind, "scripted failure")),
                }
            })
        }

        fn updated_at<'a>(&'a self, _: &'a SecretRef) -> BoxFuture<'a, Result<Option<SystemTime>, BackendError>> {
            Box::pin(async { Ok(None) })
        }

        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    fn setup(outcomes: &[Option<ErrorKind>]) -> (Arc<Scripted>, Arc<SecretStore>, Arc<WriteBack>) {
        setup_with_interval(outcomes, Duration::ZERO)
    }

    fn setup_with_interval(
        outcomes: &[Option<ErrorKind>],
        set_interval: Duration,
    ) -> (Arc<Scripted>, Arc<SecretStore>, Arc<WriteBack>) {
        let backend =
            Arc::new(Scripted { calls: Mutex::default(), outcomes: Mutex::default(), gate: Semaphore::new(0) });
        backend.outcomes.lock().unwrap().extend(outcomes.iter().copied());
        let store = Arc::new(SecretStore::new());
        let queue = WriteBack::new(
            backend.clone(),
            store.clone(),
            WriteOptions::default(),
            set_interval,
            broadcast::channel(8).0,
        );
        (backend, store, queue)
    }

    fn field(name: &str) -> SecretRef {
        SecretRef::parse(&format!("op://v/item/{name}")).unwrap()
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn fields_pending_together_go_in_one_write() {
        let (backend, _store, queue) = setup(&[]);
        queue.submit("A", &field("a"), b"a1", Origin::Watch);
        until("the first write", || backend.calls.lock().unwrap().len() == 1).await;
        // While the first write runs, two more fields of the item change.
        queue.submit("B", &field("b"), b"b1", Origin::Watch);
        queue.submit("C", &field("c"), b"c1", Origin::Watch);
        queue.submit("B", &field("b"), b"b2", Origin::Watch);
        backend.gate.add_permits(10);
        let flushed = queue.flush(Instant::now() + Duration::from_secs(5)).await;
        assert!(flushed.is_empty());
        let calls = backend.calls.lock().unwrap().clone();
        let expect = |pairs: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
            pairs.iter().map(|(f, v)| (f.to_string(), v.as_bytes().to_vec())).collect()
        };
        assert_eq!(calls, vec![expect(&[("a", "a1")]), expect(&[("b", "b2"), ("c", "c1")])]);
    }

    #[tokio::test]
    async fn a_refused_set_brings_back_the_capture_it_replaced_in_flight() {
        // The capture fails (item missing), the SET meanwhile is refused, the capture is
        // written again and, once the item exists, stored.
        let (backend, store, queue) = setup(&[Some(ErrorKind::NotFound), Some(ErrorKind::NotFound), None]);
        store.set_value("A", b"captured");
        queue.submit("A", &field("a"), b"captured", Origin::Watch);
        until("the capture's write", || backend.calls.lock().unwrap().len() == 1).await;
        let generation = queue.submit("A", &field("a"), b"set-value", Origin::Set).generation;
        backend.gate.add_permits(2);
        let outcome = queue.wait_stored(&field("a"), generation, Duration::from_secs(5)).await;
        assert!(matches!(outcome, SetOutcome::Refused(_)), "{outcome:?}");
        assert!(queue.is_pending("A"), "the capture was dropped with the refused SET");
        backend.gate.add_permits(1);
        assert!(queue.flush(Instant::now() + Duration::from_secs(5)).await.is_empty());
        let calls = backend.calls.lock().unwrap().clone();
        let values: Vec<&[u8]> = calls.iter().map(|c| c[0].1.as_slice()).collect();
        assert_eq!(values, vec![&b"captured"[..], b"set-value", b"captured"]);
        assert_eq!(store.with_value("A", |v| v.to_vec()).unwrap(), b"captured");
    }

    #[tokio::test]
    async fn a_failing_value_is_only_dropped_by_a_newer_one() {
        let (backend, store, queue) = setup(&[Some(ErrorKind::Transient)]);
        queue.submit("A", &field("a"), b"v1", Origin::Watch);
        until("the first write", || backend.calls.lock().unwrap().len() == 1).await;
        queue.submit("A", &field("a"), b"v2", Origin::Watch);
        backend.gate.add_permits(10);
        assert!(queue.flush(Instant::now() + Duration::from_secs(5)).await.is_empty());
        let calls = backend.calls.lock().unwrap().clone();
        let values: Vec<&[u8]> = calls.iter().map(|c| c[0].1.as_slice()).collect();
        assert_eq!(values, vec![&b"v1"[..], b"v2"], "v1 failed and must not be retried after v2 replaced it");
        assert_eq!(store.with_value("A", |v| v.to_vec()).unwrap(), b"v2");
    }

    #[tokio::test]
    async fn a_permanent_failure_of_a_capture_stays_pending_and_failing() {
        let (backend, _store, queue) = setup(&[Some(ErrorKind::NotFound); 8]);
        queue.submit("A", &field("a"), b"v1", Origin::Watch);
        backend.gate.add_permits(1);
        until("the failure", || queue.status()["failing"] == 1).await;
        assert!(queue.is_pending("A"));
        let unwritten = queue.flush(Instant::now() + Duration::from_millis(200)).await;
        assert_eq!(unwritten.len(), 1);
        assert_eq!(unwritten[0].reference, "op://v/item/a");
        assert!(!format!("{unwritten:?}").contains("v1"));
    }

    fn written(backend: &Scripted) -> Vec<Vec<u8>> {
        backend.calls.lock().unwrap().iter().map(|c| c[0].1.clone()).collect()
    }

    #[tokio::test]
    async fn a_set_replaced_before_it_was_sent_is_answered_by_the_value_that_replaced_it() {
        let (backend, _store, queue) = setup(&[]);
        queue.submit("A", &field("a"), b"a1", Origin::Set);
        until("the first write", || backend.calls.lock().unwrap().len() == 1).await;
        let replaced = queue.submit("A", &field("a"), b"a2", Origin::Set).generation;
        let newest = queue.submit("A", &field("a"), b"a3", Origin::Set).generation;
        backend.gate.add_permits(10);
        let limit = Duration::from_secs(5);
        assert_eq!(queue.wait_stored(&field("a"), replaced, limit).await, SetOutcome::Stored);
        assert_eq!(queue.wait_stored(&field("a"), newest, limit).await, SetOutcome::Stored);
        assert_eq!(written(&backend), vec![b"a1".to_vec(), b"a3".to_vec()]);
    }

    #[tokio::test]
    async fn a_set_replaced_by_a_refused_one_is_refused_too() {
        let (backend, _store, queue) = setup(&[None, Some(ErrorKind::NotFound)]);
        queue.submit("A", &field("a"), b"a1", Origin::Set);
        until("the first write", || backend.calls.lock().unwrap().len() == 1).await;
        let first = queue.submit("A", &field("a"), b"a2", Origin::Set).generation;
        let second = queue.submit("A", &field("a"), b"a3", Origin::Set).generation;
        let newest = queue.submit("A", &field("a"), b"a4", Origin::Set).generation;
        backend.gate.add_permits(10);
        let limit = Duration::from_secs(5);
        for generation in [first, second, newest] {
            let outcome = queue.wait_stored(&field("a"), generation, limit).await;
            assert!(matches!(outcome, SetOutcome::Refused(_)), "generation {generation}: {outcome:?}");
        }
    }

    #[tokio::test]
    async fn sets_within_the_interval_share_one_write_at_its_end() {
        let (backend, store, queue) = setup_with_interval(&[], Duration::from_secs(3));
        backend.gate.add_permits(100);
        let first = queue.submit("A", &field("a"), b"a1", Origin::Set).generation;
        assert_eq!(queue.wait_stored(&field("a"), first, Duration::from_secs(5)).await, SetOutcome::Stored);
        // Each SET waits briefly and is told it is not stored yet, as a client with a short
        // --set-wait would be.
        let mut generations = Vec::new();
        for value in [&b"a2"[..], b"a3", b"a4"] {
            let generation = queue.submit("A", &field("a"), value, Origin::Set).generation;
            let outcome = queue.wait_stored(&field("a"), generation, Duration::from_millis(200)).await;
            assert!(matches!(outcome, SetOutcome::Pending(_)), "{outcome:?}");
            generations.push(generation);
        }
        for generation in generations {
            assert_eq!(queue.wait_stored(&field("a"), generation, Duration::from_secs(10)).await, SetOutcome::Stored);
        }
        assert_eq!(written(&backend), vec![b"a1".to_vec(), b"a4".to_vec()]);
        assert_eq!(store.with_value("A", |v| v.to_vec()).unwrap(), b"a4");
    }

    #[tokio::test]
    async fn a_capture_takes_the_sets_waiting_for_the_interval_with_it() {
        let (backend, _store, queue) = setup_with_interval(&[], Duration::from_secs(600));
        backend.gate.add_permits(100);
        let first = queue.submit("A", &field("a"), b"a1", Origin::Set).generation;
        assert_eq!(queue.wait_stored(&field("a"), first, Duration::from_secs(5)).await, SetOutcome::Stored);
        let waiting = queue.submit("A", &field("a"), b"a2", Origin::Set).generation;
        queue.submit("B", &field("b"), b"b1", Origin::Watch);
        // Within 10 s, not 600: the capture is not held back, and the SET goes with it.
        assert_eq!(queue.wait_stored(&field("a"), waiting, Duration::from_secs(10)).await, SetOutcome::Stored);
        let calls = backend.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[1].len(), 2, "one read-modify-write for the SET and the capture: {calls:?}");
    }

    #[tokio::test]
    async fn a_set_during_a_retry_backoff_does_not_bring_the_retry_before_the_interval() {
        // The capture fails for good: its retry waits 2.5-5 s.
        let (backend, _store, queue) = setup_with_interval(&[Some(ErrorKind::NotFound)], Duration::from_secs(600));
        backend.gate.add_permits(100);
        queue.submit("A", &field("a"), b"a1", Origin::Watch);
        until("the failure", || queue.status()["failing"] == 1).await;
        let generation = queue.submit("B", &field("b"), b"b1", Origin::Set).generation;
        let outcome = queue.wait_stored(&field("b"), generation, Duration::from_secs(1)).await;
        assert!(matches!(outcome, SetOutcome::Pending(_)), "{outcome:?}");
        assert_eq!(backend.calls.lock().unwrap().len(), 1, "the SET cut the retry's backoff short");
        // The retry, when it comes, carries the SET.
        assert_eq!(queue.wait_stored(&field("b"), generation, Duration::from_secs(10)).await, SetOutcome::Stored);
        assert_eq!(backend.calls.lock().unwrap()[1].len(), 2);
    }

    #[tokio::test]
    async fn a_flush_does_not_wait_for_the_set_interval() {
        let (backend, _store, queue) = setup_with_interval(&[], Duration::from_secs(600));
        backend.gate.add_permits(100);
        let first = queue.submit("A", &field("a"), b"a1", Origin::Set).generation;
        assert_eq!(queue.wait_stored(&field("a"), first, Duration::from_secs(5)).await, SetOutcome::Stored);
        queue.submit("A", &field("a"), b"a2", Origin::Set);
        assert!(queue.flush(Instant::now() + Duration::from_secs(10)).await.is_empty());
        assert_eq!(written(&backend), vec![b"a1".to_vec(), b"a2".to_vec()]);
    }
}
