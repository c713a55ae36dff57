//! The broker service shared by `op-bridge daemon` and `op-bridge run`: reference discovery,
//! start-up resolution, the socket server, and the daemon's own signal loop.
//!
//! Start-up order matters: a live socket at the path is refused first (so a second daemon
//! fails before it spends a single `op` call), then every reference is resolved, and only
//! then is the socket bound: a client never connects to a broker that cannot answer yet; it
//! gets "unreachable" at once and can retry (entrypoint.sh does).

mod acl;
pub mod audit;
pub mod broker;
pub mod budget;
pub mod connection;
pub mod listener;
pub mod peer;
pub mod recovery;
pub mod refresh;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::connect::{Connect, ConnectOptions};
use crate::backend::file::FileVault;
use crate::backend::op::{OpCli, OpOptions, RunAs};
use crate::backend::{Backend, ErrorKind, RetryPolicy};
use crate::process::Reaper;
use crate::protocol::normalize_name;
use crate::reference::SecretRef;
use crate::store::Source;
use crate::watch::{WatchHandle, WatchOptions, WatchSpec};
use crate::writeback::Unwritten;
use audit::AuditLog;
use broker::{Broker, BrokerPolicy, ResolveReport};
use listener::{BindError, BoundSocket, ServeOptions};
use refresh::RefreshGate;

/// Which backend to use.
#[derive(Debug, Clone)]
pub enum BackendSpec {
    /// The 1Password CLI; `path` None means `which op`.
    Op {
        path: Option<PathBuf>,
        timeout: Duration,
        concurrency: usize,
        retry: RetryPolicy,
        /// `--op-user`: who `op` runs as (None: op-bridge's own uid).
        user: Option<RunAs>,
    },
    File(PathBuf),
    /// A 1Password Connect server at `host`; the token comes from `OP_CONNECT_TOKEN`.
    Connect {
        host: String,
        timeout: Duration,
        concurrency: usize,
        retry: RetryPolicy,
    },
}

/// Everything the broker needs to start.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub socket: PathBuf,
    pub prefix: String,
    pub suffix: String,
    pub backend: BackendSpec,
    pub policy: BrokerPolicy,
    pub serve: ServeOptions,
    pub audit_log: Option<PathBuf>,
    /// Make the audit log blocking: a request waits until its line is written.
    pub audit_log_strict: bool,
    pub pid_file: Option<PathBuf>,
    /// Start even when some references cannot be resolved.
    pub allow_missing: bool,
    /// Credential files to watch and write back.
    pub watches: Vec<WatchSpec>,
    pub watch: WatchOptions,
    /// Sealed restart cache and write-back journal (`--cache`; issue 13).
    pub cache: Option<crate::cache::CacheOptions>,
    /// Timed refresh (`--refresh-interval`, None = off) and the reads/hour it may plan for.
    pub refresh_interval: Option<Duration>,
    pub read_budget: u64,
    /// Bound secrets (`{prefix}NAME_HOSTS`, `--bind`), given out as placeholders.
    pub bindings: crate::proxy::bindings::BindingSpec,
    /// The egress proxy (`--proxy`).
    pub proxy: Option<crate::proxy::ProxyConfig>,
    /// Broker-owned OAuth clients (`{prefix}NAME_OAUTH`, `--oauth`).
    pub oauth: Vec<crate::oauth::OAuthSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A bad option value or environment, or a well-formed value that is wrong here (an
    /// unknown `--user`): exit 2, like every other usage error.
    #[error("{0}")]
    Usage(String),
    #[error("cannot find the 1Password CLI: {0} (install op or pass --op-path)")]
    OpNotFound(String),
    #[error("{0}")]
    Config(String),
    #[error("required secrets could not be resolved: {0}")]
    SecretsUnavailable(String),
    #[error("cannot {action}: {source}")]
    Io { action: String, source: std::io::Error },
}

/// The process environment's `op://` references (the variables discovery looks at), without
/// those that are not UTF-8 (`std::env::vars` would panic on such a variable).
pub fn utf8_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let v = std::os::unix::ffi::OsStringExt::into_vec(v);
            // Only references matter to discovery; every other value (the 1Password token
            // among them) is wiped as it is discarded, so no copy of it outlives this call.
            if !v.starts_with(b"op://") {
                drop(zeroize::Zeroizing::new(v));
                return None;
            }
            Some((k.into_string().ok()?, String::from_utf8(v).ok()?))
        })
        .collect()
}

/// Finds `{prefix}{NAME}{suffix}=op://…` variables. Returns (NAME, reference text).
pub fn discover(env: impl IntoIterator<Item = (String, String)>, prefix: &str, suffix: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = env
        .into_iter()
        .filter(|(key, value)| {
            key.len() > prefix.len() + suffix.len()
                && key.starts_with(prefix)
                && key.ends_with(suffix)
                && value.starts_with("op://")
                // `{prefix}NAME_OAUTH` names an OAuth client's item, not a value (an empty
                // suffix would otherwise take it for one).
                && (suffix.ends_with("_OAUTH") || !key.ends_with("_OAUTH"))
        })
        .map(|(key, value)| (key[prefix.len()..key.len() - suffix.len()].to_ascii_uppercase(), value))
        .collect();
    found.sort();
    found
}

/// Refuses two variables that name the same secret once upper-cased (`OP_api_REF` and
/// `OP_API_REF`): which one wins would be an accident of ordering.
pub fn check_discovered_names(
    env: impl IntoIterator<Item = (String, String)>,
    prefix: &str,
    suffix: &str,
) -> Result<(), String> {
    let mut by_name: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (key, value) in env {
        let found = discover([(key.clone(), value)], prefix, suffix);
        if let Some((name, _)) = found.into_iter().next() {
            by_name.entry(name).or_default().push(key);
        }
    }
    let clashes: Vec<String> = by_name
        .into_iter()
        .filter(|(_, keys)| keys.len() > 1)
        .map(|(name, mut keys)| {
            keys.sort();
            format!("{} all name secret {name}", keys.join(" and "))
        })
        .collect();
    match clashes.is_empty() {
        true => Ok(()),
        false => Err(format!("ambiguous references: {}; keep one of each", clashes.join("; "))),
    }
}

/// A missing `op` is an error only when something needs it: with no reference to resolve, no
/// file to watch and no OAuth item to read, the broker starts without one (a SET then fails with "cannot run op").
pub fn settle_op_path(mut config: BrokerConfig, env: &[(String, String)]) -> BrokerConfig {
    if let BackendSpec::Op { path: path @ None, .. } = &mut config.backend {
        // PATH is searched once; the backend and `run`'s mode check use what was found.
        match which::which("op") {
            Ok(found) => *path = Some(found),
            Err(_)
                if config.watches.is_empty()
                    && config.oauth.is_empty()
                    && discover(env.iter().cloned(), &config.prefix, &config.suffix).is_empty() =>
            {
                tracing::debug!("no 1Password CLI on PATH and nothing to resolve; starting without it");
                *path = Some(PathBuf::from("op"));
            }
            // Left unset: building the backend reports the missing CLI.
            Err(_) => {}
        }
    }
    config
}

/// Refuses to start when another broker answers on `path` (before any `op` call is spent).
fn refuse_live_socket(path: &Path) -> Result<(), StartError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(BindError::AlreadyServing(path.to_path_buf()).into());
    }
    Ok(())
}

fn build_backend(spec: &BackendSpec, reaper: &Reaper) -> Result<Arc<dyn Backend>, StartError> {
    Ok(match spec {
        BackendSpec::File(path) => Arc::new(FileVault::new(path.clone())),
        BackendSpec::Op { path, timeout, concurrency, retry, user } => {
            let path = match path {
                Some(path) => path.clone(),
                None => which::which("op").map_err(|e| StartError::OpNotFound(e.to_string()))?,
            };
            let options =
                OpOptions { path, timeout: *timeout, concurrency: *concurrency, retry: *retry, user: user.clone() };
            Arc::new(OpCli::new(options, reaper.clone()))
        }
        BackendSpec::Connect { host, timeout, concurrency, retry } => {
            // Taken here, not carried in the (Debug, Clone) configuration.
            let token = zeroize::Zeroizing::new(
                crate::token::tokens().connect.as_ref().map(|t| t.expose()).unwrap_or_default().to_string(),
            );
            let options = ConnectOptions {
                host: host.clone(),
                token,
                timeout: *timeout,
                concurrency: *concurrency,
                retry: *retry,
            };
            Arc::new(Connect::new(options).map_err(|e| StartError::Config(e.to_string()))?)
        }
    })
}

/// A started broker: secrets resolved, socket bound, ready to serve.
pub struct Service {
    pub broker: Arc<Broker>,
    socket: BoundSocket,
    audit: Option<Arc<AuditLog>>,
    serve: ServeOptions,
    pid_file: Option<PathBuf>,
    watcher: std::sync::Mutex<Option<WatchHandle>>,
    cache: Option<Arc<crate::cache::SealedCache>>,
    /// The egress proxy (`--proxy`) and its listener, taken by `serve`.
    proxy: Option<Arc<crate::proxy::server::Proxy>>,
    proxy_listener: std::sync::Mutex<Option<tokio::net::TcpListener>>,
    /// REFRESH and SIGHUP: coalesced, at most one pass per `--refresh-min-interval`.
    refresh_gate: Arc<RefreshGate>,
}

impl Service {
    /// Binds, discovers and resolves. `env` is the environment to discover references in.
    pub async fn start(
        config: &BrokerConfig,
        reaper: &Reaper,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Service, StartError> {
        refuse_live_socket(&config.socket)?;
        let audit =
            match &config.audit_log {
                Some(path) => Some(Arc::new(AuditLog::open(path, config.audit_log_strict).map_err(|source| {
                    StartError::Io { action: format!("open audit log {}", path.display()), source }
                })?)),
                None => None,
            };
        let backend = build_backend(&config.backend, reaper)?;
        let broker = Arc::new(Broker::new(backend, config.policy.clone()));

        let mut invalid = Vec::new();
        for (name, text) in discover(env, &config.prefix, &config.suffix) {
            let registered = normalize_name(&name)
                .map_err(|e| e.to_string())
                .and_then(|name| SecretRef::parse(&text).map(|r| (name, r)).map_err(|e| e.to_string()));
            match registered {
                Ok((name, reference)) => {
                    broker.store.register(&name, Some(reference), Source::Env);
                }
                Err(err) => invalid.push(format!("{name} ({err})")),
            }
        }
        if !invalid.is_empty() && !config.allow_missing {
            return Err(StartError::SecretsUnavailable(invalid.join("; ")));
        }
        for bad in &invalid {
            tracing::warn!("skipping invalid reference: {bad}");
        }
        for spec in &config.oauth {
            if broker.store.contains(&spec.name) {
                return Err(StartError::Config(format!(
                    "{} is declared as an OAuth access token ({}) and as a reference; keep one",
                    spec.name,
                    spec.item_text()
                )));
            }
            broker.store.register(&spec.name, None, Source::OAuth);
        }
        for watch in &config.watches {
            if !broker.store.register(&watch.name, Some(watch.reference.clone()), Source::Watch) {
                return Err(StartError::Config(format!(
                    "--watch names {} for {}, but {} is already registered to another reference",
                    watch.name, watch.reference, watch.name
                )));
            }
        }

        // Sealed cache (issue 13): a fresh cache answers without 1Password; a stale one only
        // while 1Password is unavailable.
        let token = crate::token::tokens().cache_key();
        let cache = config.cache.clone().and_then(|options| {
            crate::cache::SealedCache::new(options, token.map(|t| t.expose()), broker.store.clone())
        });
        // Placeholders are made before anything is resolved or cached, from those the cache
        // kept, so a restart with --cache hands out the same ones.
        let kept = cache.as_ref().map(|c| c.peek_placeholders()).unwrap_or_default();
        let bindings = crate::proxy::bindings::Bindings::new(&config.bindings, &kept).map_err(StartError::Config)?;
        for binding in bindings.iter() {
            if !broker.store.contains(&binding.name) {
                tracing::warn!(name = %binding.name, "{} is bound to hosts but names no secret", binding.name);
            }
        }
        if let Some(cache) = &cache {
            cache.keep_placeholders(bindings.placeholders());
        }
        broker.set_bindings(bindings);
        if let Some(cache) = &cache {
            recovery::attach(&broker, cache, &config.watches);
        }
        let watched: Vec<String> = config.watches.iter().map(|w| w.name.clone()).collect();
        let mut report = recovery::resolve_at_start(&broker, cache.as_ref(), &watched).await;
        log_report("start-up", &report);
        // A watched credential that 1Password does not have yet is not an error: its first
        // write-back creates it.
        report
            .failed
            .retain(|(name, err)| !(err.kind == ErrorKind::NotFound && config.watches.iter().any(|w| &w.name == name)));
        if !report.failed.is_empty() && !config.allow_missing {
            return Err(StartError::SecretsUnavailable(report.failure_summary()));
        }
        // Before the watcher's start-up comparison and before the socket: what is journaled
        // is what the watched files are compared with and what GET and `run --export` serve.
        if let Some(cache) = &cache {
            recovery::replay_journal(&broker, cache).await;
        }
        // After the journal replay (the item's fields may have write-backs of their own) and
        // before the socket: GET and `run --export` find the access token there.
        let context = crate::oauth::Context {
            store: broker.store.clone(),
            writeback: broker.writeback.clone(),
            backend: broker.backend().clone(),
            journal: cache.as_ref().map(|c| crate::cache::Journal::new(c.clone())),
            allow_missing: config.allow_missing,
        };
        let oauth = crate::oauth::OAuth::start(&config.oauth, context).await.map_err(|err| match err {
            crate::oauth::StartError::Config(why) => StartError::Config(why),
            crate::oauth::StartError::Unavailable(why) => StartError::SecretsUnavailable(why),
        })?;
        broker.set_oauth(oauth);
        let watcher = crate::watch::start(&config.watches, broker.watch_context(), config.watch.clone())
            .await
            .map_err(StartError::Config)?;
        // Bound only now that every answer is ready (issue 12: no client waits on a broker
        // that is still resolving). The allowed uids get their ACL on the socket here.
        let socket = listener::bind_allowing(&config.socket, &config.serve.allow_uids)?;
        if let Some(path) = &config.pid_file {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .map_err(|source| StartError::Io { action: format!("write pid file {}", path.display()), source })?;
        }
        let (proxy, proxy_listener) = match &config.proxy {
            Some(proxy) => {
                let (proxy, listener) =
                    crate::proxy::server::Proxy::start(broker.clone(), proxy.clone(), audit.clone())
                        .await
                        .map_err(StartError::Config)?;
                (Some(proxy), Some(listener))
            }
            None => (None, None),
        };
        crate::hardening::report_memlock();
        let refresh_gate = RefreshGate::new(broker.clone(), cache.clone(), config.serve.refresh_min_interval);
        Ok(Service {
            proxy,
            proxy_listener: std::sync::Mutex::new(proxy_listener),
            refresh_gate,
            broker,
            socket,
            audit,
            serve: config.serve.clone(),
            pid_file: config.pid_file.clone(),
            watcher: std::sync::Mutex::new(watcher),
            cache,
        })
    }

    /// What the child needs to use the proxy (None without `--proxy`).
    pub fn proxy_info(&self) -> Option<&crate::proxy::server::ProxyInfo> {
        self.proxy.as_ref().map(|p| &p.info)
    }

    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// Serves until `shutdown` is cancelled and open connections have drained.
    pub async fn serve(&self, shutdown: CancellationToken) {
        tracing::info!(socket = %self.socket.path().display(), "serving");
        let proxy_listener = self.proxy_listener.lock().unwrap_or_else(|e| e.into_inner()).take();
        let proxy = async {
            if let (Some(proxy), Some(listener)) = (&self.proxy, proxy_listener) {
                proxy.clone().serve(listener, shutdown.clone()).await;
            }
        };
        let socket = listener::serve(
            &self.socket.listener,
            self.broker.clone(),
            self.audit.clone(),
            self.refresh_gate.clone(),
            self.serve.clone(),
            shutdown.clone(),
        );
        tokio::join!(socket, proxy);
    }

    /// SIGHUP: a refresh through the same gate as REFRESH (see [`RefreshGate`]), so that a
    /// flood of signals costs at most one pass per interval plus one trailing pass.
    pub fn request_refresh(&self) {
        self.refresh_gate.request();
    }

    /// Re-resolves everything (the refresh timer) and logs what happened.
    pub async fn refresh(&self) -> ResolveReport {
        let report = self.broker.resolve_all().await;
        log_report("refresh", &report);
        if let Some(cache) = &self.cache {
            recovery::after_refresh(cache, &report);
        }
        report
    }

    /// Shutdown, part one: captures what the watched files still hold, then gives pending
    /// write-backs until `grace` to reach the backend. Returns (and logs, loudly, by name and
    /// target) what could not be stored.
    pub async fn flush(&self, grace: Duration) -> Vec<Unwritten> {
        let watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(watcher) = watcher {
            watcher.stop().await;
        }
        let unwritten = self.broker.writeback.flush(tokio::time::Instant::now() + grace).await;
        for lost in &unwritten {
            tracing::error!(
                name = %lost.name,
                reference = %lost.reference,
                "write-back NOT stored before exit: {} -> {} ({})",
                lost.name,
                lost.reference,
                lost.reason
            );
        }
        unwritten
    }

    /// Shutdown, part two: zeroizes every secret, removes the socket file (if it is still
    /// ours) and the pid file. Safe while other tasks still hold the service (a refresh
    /// started by SIGHUP may still be running).
    pub fn close(&self) {
        self.broker.store.clear();
        self.socket.remove_file();
        if let Some(path) = &self.pid_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl crate::refresh::Refresh for Service {
    fn items(&self) -> usize {
        let items: std::collections::BTreeSet<(String, String)> =
            self.broker.store.references().into_iter().map(|(_, r)| (r.vault, r.item)).collect();
        items.len()
    }

    fn refresh_pass(&self) -> crate::backend::BoxFuture<'_, Option<Duration>> {
        Box::pin(async move { self.refresh().await.stated_delay() })
    }
}

/// Logs a resolution pass: the summary line, then each failure by name (never a value).
pub fn log_report(what: &str, report: &ResolveReport) {
    let line = format!("resolved {}/{} secrets in {:.2}s", report.resolved, report.total, report.elapsed.as_secs_f64());
    if report.failed.is_empty() {
        tracing::info!("{what}: {line}");
    } else {
        tracing::warn!("{what}: {line}");
    }
    for (name, err) in &report.failed {
        tracing::warn!(name, kind = err.kind.label(), "{what}: {name} not resolved: {}", err.message);
    }
    for name in &report.deferred {
        tracing::info!(name, "{what}: {name} kept its local value (write-back pending)");
    }
    for name in &report.dropped {
        tracing::warn!(name, "{what}: {name} no longer exists in the backend; dropped");
    }
}

/// `op-bridge daemon`: serve until SIGTERM/SIGINT (also during start-up); SIGHUP re-resolves.
pub async fn run_daemon(config: BrokerConfig, grace: Duration) -> Result<u8, StartError> {
    let mut signals = crate::process::take_signals()
        .map_err(|e| StartError::Io { action: "take signals".into(), source: std::io::Error::other(e.to_string()) })?;
    let reaper = Reaper::start().map_err(|source| StartError::Io { action: "start the reaper".into(), source })?;
    let env = utf8_env();
    check_discovered_names(env.iter().cloned(), &config.prefix, &config.suffix).map_err(StartError::Usage)?;
    let config = settle_op_path(config, &env);

    let mut queued = Vec::new();
    let service = tokio::select! {
        started = Service::start(&config, &reaper, env) => Arc::new(started?),
        number = crate::process::wait_for_stop(&mut signals, &mut queued) => {
            tracing::warn!("signal {number} during start-up; exiting");
            return Ok(u8::try_from(128 + number).unwrap_or(255));
        }
    };
    let mut signals = crate::process::requeue(queued, signals);
    let shutdown = CancellationToken::new();
    let server = {
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { service.serve(shutdown).await })
    };
    let _refresh_timer = crate::refresh::start(service.clone(), config.refresh_interval, config.read_budget);
    while let Some(number) = signals.recv().await {
        match number {
            libc::SIGHUP => service.request_refresh(),
            libc::SIGTERM => {
                tracing::info!("SIGTERM: shutting down");
                break;
            }
            libc::SIGINT => {
                tracing::info!("SIGINT: shutting down");
                break;
            }
            // As during start-up (and as SIGQUIT's default action did): a stop.
            libc::SIGQUIT => {
                tracing::info!("SIGQUIT: shutting down");
                break;
            }
            // The daemon has no child: job-control signals suspend it as they would by default.
            libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU if std::process::id() != 1 => {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            }
            other => tracing::debug!("signal {other} ignored"),
        }
    }
    let stop_deadline = tokio::time::Instant::now() + grace;
    shutdown.cancel();
    let _ = server.await;
    let unwritten = service.flush(stop_deadline.saturating_duration_since(tokio::time::Instant::now())).await;
    service.close();
    tracing::info!("stopped");
    Ok(if unwritten.is_empty() { crate::exit::OK } else { crate::exit::WRITEBACK_LOST })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_uses_prefix_suffix_and_op_scheme() {
        let env = [
            ("OP_API_KEY_REF", "op://v/i/f"),
            ("OP_lower_REF", "op://v/i/g"),
            ("OP_PLAIN_REF", "not-a-ref"),
            ("OP__REF", "op://v/i/h"),
            ("OTHER_REF", "op://v/i/x"),
            ("OP_SERVICE_ACCOUNT_TOKEN", "ops_x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let found = discover(env, "OP_", "_REF");
        assert_eq!(found, vec![("API_KEY".into(), "op://v/i/f".into()), ("LOWER".into(), "op://v/i/g".into())]);
    }
}
