//! The broker: the store, the backend and the rules that connect them (resolution, refresh,
//! SET and DELETE policy, STATUS). Socket connections and the init both drive it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tokio::sync::{Mutex, broadcast};

use crate::backend::{Backend, BackendError, ErrorKind, Value, WriteOptions};
use crate::locked::lock_stats;
use crate::protocol::{NOT_AVAILABLE, NOT_JOURNALED, PENDING, UNKNOWN_REF};
use crate::proxy::bindings::Bindings;
use crate::reference::SecretRef;
use crate::store::{Applied, SecretStore, Source, State};
use crate::writeback::{Origin, SetOutcome, WriteBack};

/// How long a SET waits for its write to reach the backend before answering that it is
/// still being retried (below the client's default 10 s timeout).
pub const DEFAULT_SET_WAIT: Duration = Duration::from_secs(8);
/// Least time between the starts of two SET-driven write cycles of one item: short enough
/// that a second SET in a row is still stored within [`DEFAULT_SET_WAIT`].
pub const DEFAULT_SET_INTERVAL: Duration = Duration::from_secs(5);

/// Policy switches of the broker.
#[derive(Debug, Clone)]
pub struct BrokerPolicy {
    /// Refuse SET and DELETE.
    pub read_only: bool,
    /// Let SET target any reference, including names not registered at start.
    pub allow_set_any: bool,
    /// Let a write create a missing item.
    pub create_items: bool,
    /// How long a SET waits for 1Password before answering "accepted, not stored yet".
    pub set_wait: Duration,
    /// Least time between the starts of two SET-driven write cycles of one item.
    pub set_interval: Duration,
}

impl Default for BrokerPolicy {
    fn default() -> BrokerPolicy {
        BrokerPolicy {
            read_only: false,
            allow_set_any: false,
            create_items: false,
            set_wait: DEFAULT_SET_WAIT,
            set_interval: DEFAULT_SET_INTERVAL,
        }
    }
}

/// What one resolution pass did.
#[derive(Debug, Default)]
pub struct ResolveReport {
    pub total: usize,
    pub resolved: usize,
    /// Names whose value changed (first resolution counts as a change).
    pub changed: Vec<String>,
    /// Names dropped because 1Password no longer has them.
    pub dropped: Vec<String>,
    /// Names that could not be resolved, with the reason (value kept if there was one).
    pub failed: Vec<(String, BackendError)>,
    /// Names whose local value is newer than 1Password's answer: a write-back was pending, or
    /// the value was captured or SET while the pass ran. They keep the local value.
    pub deferred: Vec<String>,
    pub elapsed: Duration,
}

impl ResolveReport {
    /// The longest delay 1Password stated in a 429 during the pass, if any.
    pub fn stated_delay(&self) -> Option<Duration> {
        self.failed
            .iter()
            .filter_map(|(_, err)| match err.kind {
                ErrorKind::RateLimited(Some(delay)) => Some(delay),
                _ => None,
            })
            .max()
    }

    /// One line naming every failure, for errors and replies (no values, only names).
    pub fn failure_summary(&self) -> String {
        self.failed
            .iter()
            .map(|(name, err)| format!("{name} ({}: {})", err.kind.label(), err.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

pub struct Broker {
    pub store: Arc<SecretStore>,
    pub writeback: Arc<WriteBack>,
    backend: Arc<dyn Backend>,
    policy: BrokerPolicy,
    /// One resolution pass at a time (SIGHUP and REFRESH may overlap).
    refresh_lock: Mutex<()>,
    started: Instant,
    last_refresh: std::sync::Mutex<Option<(SystemTime, String)>>,
    /// Names whose values changed in a resolution pass (for `run --on-change`).
    changes_tx: broadcast::Sender<Vec<String>>,
    /// Bound secrets and their placeholders (set once at start).
    bindings: std::sync::OnceLock<Bindings>,
    /// The proxy's STATUS section (set once the proxy listens).
    proxy_status: std::sync::OnceLock<serde_json::Value>,
    /// PROXYENV's answer: the variables that point a process at the proxy.
    proxy_env: std::sync::OnceLock<Vec<(String, zeroize::Zeroizing<String>)>>,
}

impl Broker {
    pub fn new(backend: Arc<dyn Backend>, policy: BrokerPolicy) -> Broker {
        let store = Arc::new(SecretStore::new());
        let changes_tx = broadcast::channel(16).0;
        let options = WriteOptions { create_item: policy.create_items };
        let writeback =
            WriteBack::new(backend.clone(), store.clone(), options, policy.set_interval, changes_tx.clone());
        Broker {
            store,
            writeback,
            backend,
            policy,
            refresh_lock: Mutex::new(()),
            started: Instant::now(),
            last_refresh: std::sync::Mutex::new(None),
            changes_tx,
            bindings: std::sync::OnceLock::new(),
            proxy_status: std::sync::OnceLock::new(),
            proxy_env: std::sync::OnceLock::new(),
        }
    }

    /// Sets the bindings (once, at start, before anything is served).
    pub fn set_bindings(&self, bindings: Bindings) {
        let _ = self.bindings.set(bindings);
    }

    /// The bound secrets (none before [`Broker::set_bindings`]).
    pub fn bindings(&self) -> &Bindings {
        static NONE: std::sync::OnceLock<Bindings> = std::sync::OnceLock::new();
        self.bindings.get().unwrap_or_else(|| NONE.get_or_init(Bindings::default))
    }

    /// Sets what STATUS says about the proxy (once, when it listens).
    pub fn set_proxy_status(&self, status: serde_json::Value) {
        let _ = self.proxy_status.set(status);
    }

    /// Sets PROXYENV's answer (once, when the proxy listens).
    pub fn set_proxy_env(&self, vars: Vec<(String, zeroize::Zeroizing<String>)>) {
        let _ = self.proxy_env.set(vars);
    }

    /// The variables that point a process at the proxy (None without `--proxy`).
    pub fn proxy_env(&self) -> Option<&[(String, zeroize::Zeroizing<String>)]> {
        self.proxy_env.get().map(Vec::as_slice)
    }

    /// What a reader is given for `name` (GET, the exec provider, `--export`): the placeholder
    /// of a bound secret, else the value.
    pub fn give_out<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        match self.bindings().placeholder_for(name) {
            Some(placeholder) => self.store.with_value(name, |_| ()).map(|()| f(placeholder.as_bytes())),
            None => self.store.with_value(name, f),
        }
    }

    /// The name a GET target stands for (a name, or the name registered for a reference).
    pub fn target_name(&self, target: &str) -> Option<String> {
        if target.starts_with("op://") {
            self.store.name_for_reference(&SecretRef::parse(target).ok()?)
        } else {
            Some(target.to_string())
        }
    }

    pub fn policy(&self) -> &BrokerPolicy {
        &self.policy
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Resolves every registered reference once (concurrency and retries are the backend's).
    /// Not-found drops a value; other failures keep the last good value and mark it stale.
    pub async fn resolve_all(&self) -> ResolveReport {
        let _guard = match self.refresh_lock.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // A pass is running: if it is paused on a long retry delay, it gives up (its
                // names keep their values, marked stale) and this newer pass asks afresh.
                if let Some(pauses) = self.backend.pauses() {
                    pauses.interrupt();
                }
                self.refresh_lock.lock().await
            }
        };
        let started = Instant::now();
        // A name whose newer local value is still on its way to 1Password is not asked for:
        // 1Password's answer would be older, and asking would spend a rate-limited read.
        let (registered, deferred): (Vec<_>, Vec<_>) =
            self.store.references().into_iter().partition(|(name, _)| !self.writeback.is_pending(name));
        // Noted before 1Password is asked: an answer is applied only to a slot nobody wrote
        // since (a capture or SET during the pass is newer than what 1Password returned).
        let seen = self.store.generations();
        let refs: Vec<SecretRef> = registered.iter().map(|(_, r)| r.clone()).collect();
        let results = self.backend.resolve(&refs).await;
        let mut report = ResolveReport {
            total: refs.len(),
            deferred: deferred.into_iter().map(|(name, _)| name).collect(),
            ..ResolveReport::default()
        };
        // What 1Password holds now: the journal's base for watched files (`--cache`).
        self.writeback.note_held(
            registered.iter().zip(&results).filter_map(|((_, r), result)| Some((r, result.as_ref().ok()?.as_slice()))),
        );
        for ((name, _), result) in registered.into_iter().zip(results) {
            let seen = seen.get(&name).copied().unwrap_or(0);
            match result {
                Ok(value) => match self.store.apply_resolved(&name, &value, seen) {
                    Applied::Changed => {
                        report.resolved += 1;
                        report.changed.push(name);
                    }
                    Applied::Unchanged => report.resolved += 1,
                    Applied::Superseded => report.deferred.push(name),
                },
                Err(err) if err.kind == ErrorKind::NotFound => {
                    if self.store.drop_value(&name, format!("not found: {}", err.message), seen) {
                        report.dropped.push(name.clone());
                    }
                    report.failed.push((name, err));
                }
                Err(err) => {
                    self.store.mark_failed(&name, format!("{}: {}", err.kind.label(), err.message));
                    report.failed.push((name, err));
                }
            }
        }
        report.elapsed = started.elapsed();
        let summary =
            format!("resolved {}/{} secrets in {:.2}s", report.resolved, report.total, report.elapsed.as_secs_f64());
        *self.last_refresh.lock().unwrap_or_else(|e| e.into_inner()) = Some((SystemTime::now(), summary));
        if !report.changed.is_empty() || !report.dropped.is_empty() {
            let mut names = report.changed.clone();
            names.extend(report.dropped.iter().cloned());
            // Nobody listening (daemon mode) is fine.
            let _ = self.changes_tx.send(names);
        }
        report
    }

    /// Notifications of names whose values changed in a resolution pass.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Vec<String>> {
        self.changes_tx.subscribe()
    }

    /// The narrow handle the file watcher works with.
    pub fn watch_context(&self) -> crate::watch::WatchContext {
        crate::watch::WatchContext {
            store: self.store.clone(),
            writeback: self.writeback.clone(),
            backend: self.backend.clone(),
            changes_tx: self.changes_tx.clone(),
        }
    }

    /// GET: the value of a name, or of the name registered for an `op://` reference.
    pub fn lookup<R>(&self, target: &str, f: impl FnOnce(&[u8]) -> R) -> Result<R, String> {
        let name: std::borrow::Cow<'_, str> = if target.starts_with("op://") {
            let reference = SecretRef::parse(target).map_err(|e| e.to_string())?;
            self.store.name_for_reference(&reference).ok_or_else(|| format!("{UNKNOWN_REF}{target}"))?.into()
        } else {
            target.into()
        };
        if let Some(out) = self.give_out(&name, f) {
            return Ok(out);
        }
        match self.store.missing_reason(&name) {
            Some(reason) => Err(format!("{UNKNOWN_REF}{name}{NOT_AVAILABLE}{reason})")),
            None => Err(format!("{UNKNOWN_REF}{name}")),
        }
    }

    /// SET: the value goes through the write-back queue to the backend first; memory is
    /// updated when the backend has it, so memory never holds a value 1Password lacks. Three
    /// answers: stored (Ok), refused for good (nothing changed), or accepted but not stored
    /// within the wait (an `ERR pending: …` reply: it stays queued and will be stored).
    pub async fn set(&self, name: &str, uri: Option<&str>, value: Value) -> Result<(), String> {
        if self.policy.read_only {
            return Err("read-only: SET is refused (--read-only)".into());
        }
        if value.is_empty() {
            return Err("refusing to store an empty value".into());
        }
        let registered = self.store.reference(name);
        let given = uri.map(SecretRef::parse).transpose().map_err(|e| e.to_string())?;
        let target = match (registered, given) {
            (Some(reg), Some(given)) if reg != given && !self.policy.allow_set_any => {
                return Err(format!(
                    "{name} is registered to {reg}; refusing to write to {given} (see --allow-set-any)"
                ));
            }
            (None, Some(given)) if !self.policy.allow_set_any => {
                return Err(format!(
                    "{name} is not a registered secret; refusing to write to {given} (see --allow-set-any)"
                ));
            }
            (_, Some(given)) => given,
            (Some(reg), None) => reg,
            (None, None) => return Err(format!("{name} has no registered reference; give one")),
        };
        crate::backend::check_writable(&target).map_err(|e| e.message)?;
        if !self.store.register(name, Some(target.clone()), Source::Set) {
            // Registered to another reference, and --allow-set-any let the SET through:
            // the name now follows the reference it was written to.
            self.store.remove(name);
            self.store.register(name, Some(target.clone()), Source::Set);
        }
        let submission = self.writeback.submit(name, &target, &value, Origin::Set);
        match self.writeback.wait_stored(&target, submission.generation, self.policy.set_wait).await {
            SetOutcome::Stored => {
                tracing::info!(name, reference = %target, "stored new value");
                Ok(())
            }
            SetOutcome::Refused(reason) => Err(format!("write to {target} refused: {reason}")),
            SetOutcome::Pending(reason) if submission.not_journaled.is_some() => {
                let why = submission.not_journaled.unwrap_or_default();
                tracing::error!(name, reference = %target, "SET accepted but not stored yet ({reason}) and NOT journaled");
                Err(format!(
                    "{NOT_JOURNALED}accepted, not stored in 1Password yet ({reason}) and not journaled ({why}); \
                     op-bridge keeps retrying while it runs, but a restart before 1Password stores it loses it"
                ))
            }
            SetOutcome::Pending(reason) => {
                tracing::warn!(name, reference = %target, "SET accepted but not stored yet: {reason}");
                Err(format!(
                    "{PENDING}accepted, not stored in 1Password yet ({reason}); op-bridge keeps retrying and \
                     will store it"
                ))
            }
        }
    }

    /// DELETE: forgets a name in memory only; 1Password is never touched.
    pub fn delete(&self, name: &str) -> Result<(), String> {
        if self.policy.read_only {
            return Err("read-only: DELETE is refused (--read-only)".into());
        }
        if self.store.remove(name) { Ok(()) } else { Err(format!("{UNKNOWN_REF}{name}")) }
    }

    /// STATUS: names, states, ages and errors as one JSON object; never a value.
    pub async fn status(&self) -> serde_json::Value {
        let slots = self.store.status();
        let count = |state| slots.iter().filter(|s| s.state == state).count();
        let locks = lock_stats();
        let last = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": crate::protocol::LATEST_VERSION.number(),
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "backend": self.backend.describe(),
            "backend_status": self.backend.status().await,
            "read_only": self.policy.read_only,
            "counts": { "total": slots.len(), "ok": count(State::Ok), "stale": count(State::Stale), "missing": count(State::Missing) },
            "secrets": slots,
            "bindings": self.bindings().status(),
            "proxy": self.proxy_status.get(),
            "memory": { "locked_bytes": locks.locked_bytes, "unlocked_bytes": locks.unlocked_bytes },
            "writeback": self.writeback.status(),
            "logging": crate::logging::status(),
            "refresh": crate::refresh::status(),
            "last_refresh": last.map(|(at, summary)| json!({
                "age_s": SystemTime::now().duration_since(at).map(|d| d.as_secs()).unwrap_or(0),
                "summary": summary,
            })),
        })
    }
}
