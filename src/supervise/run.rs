//! `op-bridge run -- CMD`: the init. One process resolves the secrets, serves the socket,
//! spawns and supervises the command, forwards signals, reaps every zombie, and on the
//! command's exit cleans up and exits with its status.
//!
//! Order of events: signal handlers and the reaper first (so nothing is missed), then the
//! broker (secrets resolved, fail closed), then the child. Every catchable signal except
//! SIGCHLD goes to the child's process group; SIGHUP follows `--hup`; SIGTERM, SIGINT and
//! SIGQUIT also start the grace timer, after which the group is killed. When the main child
//! exits, the rest of its group gets SIGTERM, then SIGKILL after the grace.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use signal_hook::consts::signal as sig;
use signal_hook_tokio::Signals;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::child::{self, SpawnError};
use crate::process::{Exit, Process, Reaper};
use crate::cli::{HupMode, RunArgs};
use crate::daemon::{BrokerConfig, Service, StartError, utf8_env};

/// Signals forwarded to the child. SIGCHLD is the reaper's; SIGKILL and SIGSTOP cannot be
/// caught; SIGPIPE, SIGSEGV, SIGBUS, SIGFPE and SIGILL are about op-bridge itself.
const FORWARDED: &[i32] = &[
    sig::SIGHUP,
    sig::SIGINT,
    sig::SIGQUIT,
    sig::SIGTERM,
    sig::SIGUSR1,
    sig::SIGUSR2,
    sig::SIGALRM,
    sig::SIGCONT,
    sig::SIGTSTP,
    sig::SIGTTIN,
    sig::SIGTTOU,
    sig::SIGURG,
    sig::SIGXCPU,
    sig::SIGXFSZ,
    sig::SIGVTALRM,
    sig::SIGPROF,
    sig::SIGWINCH,
    sig::SIGIO,
    libc::SIGPWR,
    sig::SIGSYS,
    sig::SIGTRAP,
    sig::SIGABRT,
];

/// What a refresh that changes an exported value does to the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnChange {
    None,
    Restart,
    Signal(Signal),
}

impl std::str::FromStr for OnChange {
    type Err = String;
    fn from_str(text: &str) -> Result<OnChange, String> {
        match text {
            "none" => Ok(OnChange::None),
            "restart" => Ok(OnChange::Restart),
            other => {
                let name = other
                    .strip_prefix("signal:")
                    .ok_or_else(|| format!("invalid --on-change '{other}' (none, restart or signal:SIG)"))?;
                let upper = name.to_ascii_uppercase();
                let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
                full.parse::<Signal>()
                    .map(OnChange::Signal)
                    .map_err(|_| format!("unknown signal '{name}' in --on-change"))
            }
        }
    }
}

/// `--export NAME[=VAR]` parsed.
#[derive(Debug, Clone)]
struct Export {
    name: String,
    var: String,
}

fn parse_exports(specs: &[String]) -> Result<Vec<Export>, String> {
    specs
        .iter()
        .map(|spec| {
            let (name, var) = spec.split_once('=').unwrap_or((spec, spec));
            let name = crate::protocol::normalize_name(name).map_err(|e| format!("--export {spec}: {e}"))?;
            if var.is_empty() || var.contains('\0') || var.contains('=') {
                return Err(format!("--export {spec}: invalid variable name"));
            }
            Ok(Export { name, var: var.to_string() })
        })
        .collect()
}

/// Everything the child's environment is built from.
struct ChildEnv {
    base: Vec<(OsString, OsString)>,
    exports: Vec<Export>,
    export_all: bool,
}

impl ChildEnv {
    fn new(args: &RunArgs, config: &BrokerConfig) -> Result<ChildEnv, String> {
        let hidden = |key: &str| {
            !args.keep_token
                && (key == "OP_SERVICE_ACCOUNT_TOKEN"
                    || key == "OP_CONNECT_TOKEN"
                    || (key.starts_with(&config.prefix)
                        && key.ends_with(&config.suffix)
                        && key.len() > config.prefix.len() + config.suffix.len()))
        };
        let mut base: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| k.to_str().is_none_or(|k| !hidden(k) && k != "OP_BRIDGE_SOCKET"))
            .collect();
        // `op-bridge get` inside the child finds the broker without configuration.
        base.push(("OP_BRIDGE_SOCKET".into(), absolute(&config.socket).into_os_string()));
        Ok(ChildEnv { base, exports: parse_exports(&args.export)?, export_all: args.export_all })
    }

    /// Names whose values the child's environment carries.
    fn exported_names(&self, service: &Service) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.exports.iter().map(|e| e.name.clone()).collect();
        if self.export_all {
            names.extend(service.broker.store.names());
        }
        names
    }

    /// Why the child's environment cannot be built now (an exported secret has no value),
    /// checked without copying any value.
    fn unavailable(&self, service: &Service) -> Option<String> {
        let store = &service.broker.store;
        let missing: Vec<&str> = self
            .exports
            .iter()
            .filter(|e| store.with_value(&e.name, |_| ()).is_none())
            .map(|e| e.name.as_str())
            .collect();
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    /// The environment with the current values of the exported secrets.
    fn build(&self, service: &Service) -> Result<SecretEnv, String> {
        let mut env = self.base.clone();
        let mut put = |var: &str, name: &str| -> Result<(), String> {
            // Zeroizing until it is handed to the environment, so a refused value leaves no copy.
            let mut value = service
                .broker
                .store
                .with_value(name, |v| zeroize::Zeroizing::new(v.to_vec()))
                .ok_or_else(|| format!("exported secret {name} is not available"))?;
            if value.contains(&0) {
                return Err(format!(
                    "exported secret {name} contains a NUL byte and cannot be an environment variable"
                ));
            }
            env.retain(|(k, _)| k != var);
            env.push((var.into(), OsString::from_vec(std::mem::take(&mut *value))));
            Ok(())
        };
        if self.export_all {
            for name in service.broker.store.names() {
                put(&name, &name)?;
            }
        }
        for export in &self.exports {
            put(&export.var, &export.name)?;
        }
        Ok(SecretEnv(env))
    }
}

/// The child's environment, exported values included; every value is zeroized on drop
/// (`Command` keeps its own copy until the spawn returns; that one is freed as is).
struct SecretEnv(Vec<(OsString, OsString)>);

impl std::ops::Deref for SecretEnv {
    type Target = [(OsString, OsString)];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for SecretEnv {
    fn drop(&mut self) {
        for (_, value) in self.0.drain(..) {
            zeroize::Zeroize::zeroize(&mut value.into_vec());
        }
    }
}

/// Builds the environment with the current values and spawns the command; the environment
/// copy is zeroized as soon as the child has it.
fn spawn_command(
    reaper: &Reaper,
    args: &RunArgs,
    child_env: &ChildEnv,
    service: &Service,
    terminal: bool,
) -> Result<Result<Process, SpawnError>, StartError> {
    let env = child_env.build(service).map_err(StartError::SecretsUnavailable)?;
    Ok(child::spawn(reaper, &args.command, &env, terminal))
}

fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    }
}

fn signal_name(number: i32) -> String {
    Signal::try_from(number).map(|s| s.to_string()).unwrap_or_else(|_| format!("signal {number}"))
}

/// The supervised child and the state of stopping it.
struct Supervised {
    process: Process,
    /// When the group gets SIGKILL (set once a stop has begun).
    kill_at: Option<Instant>,
}

impl Supervised {
    fn forward(&self, number: i32) {
        if let Ok(signal) = Signal::try_from(number)
            && let Err(err) = self.process.signal_group(signal)
        {
            // The group may already be gone; the child itself is still signalled directly.
            tracing::debug!("forwarding {signal} to the group failed ({err}); signalling the child");
            self.process.signal(signal);
        }
    }

    fn begin_stop(&mut self, signal: Signal, grace: Duration) {
        self.forward(signal as i32);
        if self.kill_at.is_none() {
            self.kill_at = Some(Instant::now() + grace);
        }
    }
}

/// Runs the init; returns op-bridge's exit code.
pub async fn run(config: BrokerConfig, args: RunArgs) -> Result<u8, StartError> {
    let config_err = |e: String| StartError::Config(e);
    let on_change: OnChange = args.on_change.parse().map_err(config_err)?;
    let io_err = |action: &str| {
        let action = action.to_string();
        move |source| StartError::Io { action: action.clone(), source }
    };
    if std::process::id() != 1 {
        // Orphans of the child are re-parented to us and reaped, as they would be by PID 1.
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| io_err("become a subreaper")(e.into()))?;
    }
    let mut signals = Signals::new(FORWARDED).map_err(io_err("install signal handlers"))?;
    let reaper = Reaper::start().map_err(io_err("install SIGCHLD handler"))?;

    let child_env = ChildEnv::new(&args, &config).map_err(config_err)?;

    // Resolve secrets, but let a stop signal abort a slow start-up.
    let service = tokio::select! {
        started = Service::start(&config, &reaper, utf8_env()) => Arc::new(started?),
        number = wait_for_stop(&mut signals) => {
            tracing::warn!("{} during start-up; exiting without starting the command", signal_name(number));
            return Ok(u8::try_from(128 + number).unwrap_or(255));
        }
    };
    let shutdown = CancellationToken::new();
    let server = {
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { service.serve(shutdown).await })
    };
    let mut changes = service.broker.subscribe_changes();

    // Decided once: a restarted command takes the terminal back from its predecessor.
    let terminal = child::owns_terminal();
    let outcome = async {
        let process = match spawn_command(&reaper, &args, &child_env, &service, terminal)? {
            Ok(process) => process,
            Err(err) => {
                tracing::error!("{err}");
                return Ok(Err(err));
            }
        };
        tracing::info!(pid = process.pid().as_raw(), "started {}", args.command[0].to_string_lossy());
        let mut child = Supervised { process, kill_at: None };
        let mut stopping = false;
        let mut restart_queued = false;
        let mut restarting = false;
        let mut changes_open = true;
        loop {
            let kill_at = child.kill_at;
            tokio::select! {
                Some(number) = signals.next() => match number {
                    sig::SIGHUP => {
                        if matches!(args.hup, HupMode::Refresh | HupMode::Both) {
                            let service = service.clone();
                            tokio::spawn(async move { service.refresh().await });
                        }
                        if matches!(args.hup, HupMode::Forward | HupMode::Both) {
                            child.forward(number);
                        }
                    }
                    sig::SIGTERM | sig::SIGINT | sig::SIGQUIT => {
                        tracing::info!("{}: stopping the command (grace {:?})", signal_name(number), args.grace);
                        stopping = true;
                        child.begin_stop(Signal::try_from(number).unwrap_or(Signal::SIGTERM), args.grace);
                    }
                    other => child.forward(other),
                },
                exit = child.process.wait() => {
                    if restarting && !stopping {
                        reap_group(&child.process, args.grace).await;
                        let process = match spawn_command(&reaper, &args, &child_env, &service, terminal)? {
                            Ok(process) => process,
                            Err(err) => {
                                tracing::error!("restart failed: {err}");
                                return Ok(Err(err));
                            }
                        };
                        tracing::info!(pid = process.pid().as_raw(), "restarted the command after a secret changed (old one ended with {exit})");
                        child = Supervised { process, kill_at: None };
                        restarting = false;
                        if std::mem::take(&mut restart_queued) && child_env.unavailable(&service).is_none() {
                            restarting = true;
                            child.begin_stop(Signal::SIGTERM, args.grace);
                        }
                        continue;
                    }
                    tracing::info!("command ended with {exit}");
                    reap_group(&child.process, args.grace).await;
                    return Ok(Ok(exit));
                }
                changed = changes.recv(), if changes_open => {
                    let exported = child_env.exported_names(&service);
                    let changed = match changed {
                        Ok(changed) => changed,
                        // Missed notifications (the loop was busy restarting): assume the worst.
                        Err(broadcast::error::RecvError::Lagged(_)) => exported.iter().cloned().collect(),
                        Err(broadcast::error::RecvError::Closed) => {
                            changes_open = false;
                            continue;
                        }
                    };
                    let hit: Vec<&String> = changed.iter().filter(|n| exported.contains(*n)).collect();
                    if hit.is_empty() || stopping {
                        continue;
                    }
                    match on_change {
                        OnChange::None => tracing::info!("exported secrets changed ({hit:?}); --on-change none"),
                        OnChange::Signal(signal) => {
                            tracing::info!("exported secrets changed ({hit:?}); sending {signal}");
                            child.forward(signal as i32);
                        }
                        OnChange::Restart if restarting => restart_queued = true,
                        OnChange::Restart => match child_env.unavailable(&service) {
                            // A secret that was dropped (deleted in the backend) cannot be given
                            // to a new command: keep the running one rather than stop it.
                            Some(missing) => tracing::error!(
                                "exported secrets changed ({hit:?}) but {missing} has no value; not restarting the command"
                            ),
                            None => {
                                tracing::info!("exported secrets changed ({hit:?}); restarting the command");
                                restarting = true;
                                child.begin_stop(Signal::SIGTERM, args.grace);
                            }
                        },
                    }
                }
                _ = crate::sleep_until(kill_at) => {
                    tracing::warn!("grace period over; killing the command's process group");
                    child.forward(sig::SIGKILL);
                    child.kill_at = None;
                }
            }
        }
    }
    .await;

    shutdown.cancel();
    let _ = server.await;
    // The command's status is kept even when write-backs are lost; the log names them.
    service.flush(args.grace).await;
    let code = match outcome {
        Ok(Ok(exit)) => exit_code(exit),
        Ok(Err(spawn_err)) => spawn_err.exit_code(),
        Err(err) => {
            service.close();
            return Err(err);
        }
    };
    service.close();
    Ok(code)
}

fn exit_code(exit: Exit) -> u8 {
    u8::try_from(exit.code()).unwrap_or(255)
}

async fn wait_for_stop(signals: &mut Signals) -> i32 {
    while let Some(number) = signals.next().await {
        if matches!(number, sig::SIGTERM | sig::SIGINT | sig::SIGQUIT) {
            return number;
        }
    }
    std::future::pending().await
}

/// After the main child exits: SIGTERM to what is left of its group, SIGKILL after `grace`.
async fn reap_group(process: &Process, grace: Duration) {
    if process.signal_group(Signal::SIGTERM).is_err() {
        return; // nobody left in the group
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if process.group_is_empty() {
            return;
        }
    }
    tracing::warn!("processes left in the command's group after the grace period; killing them");
    let _ = process.signal_group(Signal::SIGKILL);
}
