//! What the daemon does with the sealed cache (`--cache`): the start-up resolution from it,
//! the replay of the write-back journal, and keeping the file in step afterwards. The cache
//! module is the store; this is the policy that drives it.
//!
//! The journal is compared with what 1Password holds, read for the journaled references at
//! replay, never with the cache's own copy of a value (which may be the journaled value
//! itself). What is journaled is what is served: before the replay is queued, the journaled
//! value goes into the store under the name that points at its reference now, so GET and
//! `run --export` hand out the newest value, not 1Password's older one. Entries are keyed by
//! reference: a journaled value is written to its own reference and never served or cached
//! under a name that was moved to another one.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::ErrorKind;
use crate::cache::{Journal, SealedCache};
use crate::store::Source;
use crate::writeback::Origin;

use super::broker::{Broker, ResolveReport};

/// Backoff of the background refresh after a stale start: from 2 s up to this.
const STALE_RETRY_MAX: Duration = Duration::from_secs(60);

fn unavailable(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::RateLimited(_) | ErrorKind::Timeout | ErrorKind::Transient)
}

/// Attaches the journal to the write-back queue before anything is resolved, so every answer
/// from 1Password (the start-up resolution included) is noted as the watched files' base.
pub fn attach(broker: &Broker, cache: &Arc<SealedCache>, watched: &[crate::watch::WatchSpec]) {
    cache.track_held(watched.iter().map(|w| w.reference.clone()));
    broker.writeback.attach_journal(Journal::new(cache.clone()));
}

/// The start-up resolution with the cache (hook of `Service::start`).
///
/// - a fresh cache that covers every registered reference: its values, no 1Password call;
/// - otherwise resolve; if every failure is 1Password being unavailable and the cache is
///   within `--cache-max-stale`, the failed names are served from it as `stale` and a
///   background task refreshes them as soon as 1Password answers;
/// - an authentication failure, or a not-found of a name not in `tolerated`, deletes the
///   cached values (never the journal) and falls back to nothing (the caller fails closed as
///   without a cache).
pub async fn resolve_at_start(
    broker: &Arc<Broker>,
    cache: Option<&Arc<SealedCache>>,
    tolerated: &[String],
) -> ResolveReport {
    let Some(cache) = cache else { return broker.resolve_all().await };
    let snapshot = cache.load().unwrap_or_else(|err| {
        tracing::warn!("sealed cache not used: {err}");
        None
    });
    let registered = broker.store.references();
    if let Some(snapshot) = &snapshot {
        let age = snapshot.age();
        let all_cached = registered.iter().all(|(name, r)| snapshot.value(name, r).is_some());
        if age < cache.options().fresh && all_cached {
            let started = std::time::Instant::now();
            let mut report = ResolveReport { total: registered.len(), ..ResolveReport::default() };
            for (name, r) in &registered {
                if let Some(value) = snapshot.value(name, r) {
                    broker.store.set_value(name, value);
                    report.resolved += 1;
                    report.changed.push(name.clone());
                }
            }
            report.elapsed = started.elapsed();
            tracing::info!(
                "start-up: {} secrets from the sealed cache ({}s old, fresh for {}s): no 1Password call",
                report.resolved,
                age.as_secs(),
                cache.options().fresh.as_secs()
            );
            return report;
        }
    }
    let mut report = broker.resolve_all().await;
    let refused = report.failed.iter().any(|(name, err)| {
        err.kind == ErrorKind::Auth || (err.kind == ErrorKind::NotFound && !tolerated.contains(name))
    });
    if refused {
        cache.delete();
        return report;
    }
    if report.failed.is_empty() {
        cache.save_resolved();
        return report;
    }
    let Some(snapshot) = snapshot.filter(|s| s.age() <= cache.options().max_stale) else { return report };
    if !report.failed.iter().all(|(_, err)| unavailable(err.kind)) {
        return report;
    }
    let age = snapshot.age().as_secs();
    let mut served = Vec::new();
    report.failed.retain(|(name, err)| {
        let cached = broker.store.reference(name).and_then(|r| snapshot.value(name, &r));
        match cached {
            Some(value) => {
                broker.store.set_value(name, value);
                broker.store.mark_failed(
                    name,
                    format!("stale: served from the sealed cache ({age}s old); 1Password unavailable: {}", err.message),
                );
                served.push(name.clone());
                false
            }
            None => true,
        }
    });
    if !served.is_empty() {
        report.resolved += served.len();
        tracing::warn!(
            "1Password unavailable: {} served from the sealed cache ({age}s old) as stale; refreshing in the background",
            served.join(", ")
        );
        tokio::spawn(refresh_until_available(broker.clone(), cache.clone()));
    }
    report
}

/// After a stale start: re-resolves with backoff until 1Password answers, then saves.
async fn refresh_until_available(broker: Arc<Broker>, cache: Arc<SealedCache>) {
    let mut pause = Duration::from_secs(2);
    loop {
        tokio::time::sleep(pause.mul_f64(0.75 + fastrand::f64() * 0.5)).await;
        if broker.store.references().is_empty() {
            return; // shut down (the store was cleared)
        }
        let report = broker.resolve_all().await;
        super::log_report("background refresh", &report);
        if !report.failed.iter().any(|(_, err)| unavailable(err.kind)) {
            after_refresh(&cache, &report);
            return;
        }
        if let Some(stated) = report.failed.iter().find_map(|(_, e)| match e.kind {
            ErrorKind::RateLimited(Some(d)) => Some(d),
            _ => None,
        }) {
            pause = stated;
        } else {
            pause = (pause * 2).min(STALE_RETRY_MAX);
        }
    }
}

/// After any refresh: a clean pass is saved; a refused token deletes the cached values.
pub fn after_refresh(cache: &SealedCache, report: &ResolveReport) {
    if report.failed.iter().any(|(_, err)| err.kind == ErrorKind::Auth) {
        cache.delete();
    } else if report.failed.is_empty() {
        cache.save_resolved();
    }
}

/// Once the service is going to start: keeps the file in step with every later change of a
/// value (a socket REFRESH, a stored write-back; the freshness time moves only with a full
/// resolution), then replays the journal. Each entry is checked against what 1Password holds
/// now (one read of the journaled references): one it already has is settled; any other (or
/// any, when 1Password cannot be read) is served at once and queued again.
pub async fn replay_journal(broker: &Arc<Broker>, cache: &Arc<SealedCache>) {
    let mut changes_rx = broker.subscribe_changes();
    let (follower, store) = (cache.clone(), broker.store.clone());
    tokio::spawn(async move {
        loop {
            match changes_rx.recv().await {
                // An empty store was cleared at shutdown: not worth replacing the file with.
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if !store.references().is_empty() {
                        follower.save();
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let Some(journal) = broker.writeback.journal() else { return };
    let pending = journal.pending();
    if pending.is_empty() {
        return;
    }
    let references: Vec<_> = pending.iter().map(|e| e.reference.clone()).collect();
    let held = broker.backend().resolve(&references).await;
    for (entry, held) in pending.iter().zip(held) {
        let (name, reference) = (&entry.name, &entry.reference);
        // Journal entries are keyed by reference: the value belongs to whichever name points
        // at that reference now, and to no other.
        let serving = match broker.store.name_for_reference(reference) {
            Some(current) => Some(current),
            None if !broker.store.contains(name) => {
                broker.store.register(name, Some(reference.clone()), Source::Set);
                Some(name.clone())
            }
            None => None,
        };
        match &held {
            Ok(value) => {
                journal.note_held([(reference, value.as_slice())]);
                if value.as_slice() == entry.value.as_slice() {
                    tracing::info!(name = %name, reference = %reference, "journaled write-back already in 1Password; settled");
                    if let Some(serving) = &serving {
                        broker.store.set_value(serving, value);
                    }
                    journal.settle(reference, entry.generation);
                    continue;
                }
            }
            Err(err) => tracing::info!(
                name = %name,
                reference = %reference,
                "cannot read {reference} to compare with its journaled write-back ({err}); replaying it"
            ),
        }
        match &serving {
            Some(serving) => {
                tracing::info!(name = %serving, reference = %reference, "replaying journaled write-back; serving its value");
                broker.store.set_value(serving, &entry.value);
            }
            None => tracing::warn!(
                name = %name,
                reference = %reference,
                "journaled write-back of {reference}: {name} now points at another reference; the value is stored \
                 to {reference} and served under no name"
            ),
        }
        broker.writeback.submit(serving.as_deref().unwrap_or(name), reference, &entry.value, Origin::Watch);
    }
}
