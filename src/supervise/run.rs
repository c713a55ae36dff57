//! `op-bridge run -- CMD`: the init. One process resolves the secrets, serves the socket,
//! spawns and supervises the command, forwards signals, reaps every zombie, and on the
//! command's exit cleans up and exits with its status.
//!
//! Order of events: every signal is blocked and queued from the first instruction of `main`
//! (see [`crate::process`]), so nothing is missed; then the broker (secrets resolved, fail
//! closed), then the child, then op-bridge moves to `/`. Every signal except SIGCHLD goes to
//! the child's process group — SIGSEGV and the real-time signals included; SIGHUP follows
//! `--hup`; SIGTERM, SIGINT and SIGQUIT also start the stop. Job control is dumb-init's:
//! SIGTSTP, SIGTTIN and SIGTTOU are forwarded and then op-bridge stops itself; SIGCONT is
//! forwarded (with the terminal's foreground handed back to the command). On a terminal, a
//! command stopped by Ctrl-Z stops op-bridge too, so the shell gets its prompt back.
//!
//! The stop has one budget, `--grace`, counted from the stop signal (or from the command's
//! own exit): pending write-backs are pushed during it, the command's group gets SIGKILL a
//! little before its end ([`kill_margin`]) and the last flush ends with it.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::child::{self, SpawnError};
use super::privsep::{self, Identity};
use super::pty::Relay;
use crate::cli::{HupMode, RunArgs};
use crate::daemon::{BackendSpec, BrokerConfig, Service, StartError, utf8_env};
use crate::process::{Exit, Process, Reaper};

/// Signal numbers the init loop treats specially (libc's, which are Linux's).
mod sig {
    pub use libc::{SIGCONT, SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGTSTP, SIGTTIN, SIGTTOU, SIGWINCH};
}

/// The part of the grace kept for the last write-back flush after the command is killed:
/// a tenth of the grace, at most half a second.
pub fn kill_margin(grace: Duration) -> Duration {
    (grace / 10).min(Duration::from_millis(500))
}

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
    /// `--allow-missing`: an exported name without a value is left out (with a warning).
    allow_missing: bool,
}

impl ChildEnv {
    fn new(args: &RunArgs, config: &BrokerConfig) -> Result<ChildEnv, String> {
        let hidden = |key: &str| {
            !args.keep_token
                && (key == "OP_SERVICE_ACCOUNT_TOKEN"
                    || key == "OP_CONNECT_TOKEN"
                    // `op signin` sessions are as good as the token.
                    || key.starts_with("OP_SESSION_")
                    || (key.starts_with(&config.prefix)
                        && key.ends_with(&config.suffix)
                        && key.len() > config.prefix.len() + config.suffix.len()))
        };
        let mut base: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter_map(|(k, v)| {
                if k.to_str().is_none_or(|k| !hidden(k) && k != "OP_BRIDGE_SOCKET") {
                    return Some((k, v));
                }
                // A stripped token is wiped, not just left out.
                drop(zeroize::Zeroizing::new(v.into_vec()));
                None
            })
            .collect();
        // `op-bridge get` inside the child finds the broker without configuration.
        // The socket path is absolute already (config::broker_config).
        base.push(("OP_BRIDGE_SOCKET".into(), config.socket.clone().into_os_string()));
        Ok(ChildEnv {
            base,
            exports: parse_exports(&args.export)?,
            export_all: args.export_all,
            allow_missing: config.allow_missing,
        })
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
        if self.allow_missing {
            return None;
        }
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
            let Some(mut value) = service.broker.give_out(name, |v| zeroize::Zeroizing::new(v.to_vec())) else {
                if self.allow_missing {
                    tracing::warn!(name, "exported secret {name} has no value; {var} is left out (--allow-missing)");
                    return Ok(());
                }
                return Err(format!("exported secret {name} is not available"));
            };
            if value.contains(&0) {
                return Err(format!(
                    "exported secret {name} contains a NUL byte and cannot be an environment variable"
                ));
            }
            if service.broker.bindings().is_raw(name) {
                tracing::info!(name, "bound secret {name} exported raw as {var} (--allow-raw)");
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
        if let Some(proxy) = service.proxy_info() {
            let user_no_proxy = env
                .iter()
                .find(|(k, _)| k == "NO_PROXY" || k == "no_proxy")
                .and_then(|(_, v)| v.to_str())
                .unwrap_or("")
                .to_string();
            for (var, value) in crate::proxy::server::child_env(proxy, service.broker.bindings(), &user_no_proxy) {
                env.retain(|(k, _)| k.as_os_str() != var);
                env.push((var.into(), value.into()));
            }
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
    user: Option<&Identity>,
    pty: Option<&Relay>,
) -> Result<Result<Process, SpawnError>, StartError> {
    let env = child_env.build(service).map_err(StartError::SecretsUnavailable)?;
    let attach = pty.map(Relay::attach);
    Ok(child::spawn(reaper, &args.command, &env, terminal, user, !args.allow_privilege_gain, attach))
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
        if let Err(err) = self.process.signal_group_number(number) {
            // The group may already be gone; the child itself is still signalled directly.
            tracing::debug!("forwarding {} to the group failed ({err}); signalling the child", signal_name(number));
            self.process.signal_number(number);
        }
    }

    fn begin_stop(&mut self, number: i32, grace: Duration) {
        self.forward(number);
        if self.kill_at.is_none() {
            self.kill_at = Some(Instant::now() + grace - kill_margin(grace));
        }
    }

    /// Resumes the command after op-bridge itself was continued: the terminal's foreground
    /// goes back to it when op-bridge holds it (`fg`, not `bg`), then SIGCONT.
    fn resume(&self, terminal: bool) {
        if terminal && child::owns_terminal() {
            child::give_terminal(self.process.pid().as_raw());
        }
        self.forward(sig::SIGCONT);
    }
}

/// Stops op-bridge itself, as a shell job does on Ctrl-Z; returns once it is continued. PID 1
/// cannot be stopped (the kernel ignores SIGSTOP sent to it from inside its namespace), so
/// then it returns false at once.
fn suspend_self() -> bool {
    if std::process::id() == 1 {
        return false;
    }
    tracing::debug!("stopping op-bridge itself (job control)");
    // The calling thread stops on its way back from kill(2), and the others with it: the
    // return means SIGCONT has arrived (it is still queued for the signal loop).
    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
    true
}

/// [`suspend_self`] with the real terminal's settings put back while op-bridge is stopped,
/// when the command has a pty of its own (raw mode would otherwise outlive op-bridge's job).
fn suspend_relaying(relay: Option<&Relay>) -> bool {
    if let Some(relay) = relay {
        relay.restore();
    }
    let suspended = suspend_self();
    if let Some(relay) = relay {
        relay.enter_raw();
        relay.resize();
    }
    suspended
}

/// Whether `pid` is stopped right now (job control), according to /proc; true when unknown.
fn is_stopped(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat.rfind(')').and_then(|at| stat[at + 1..].split_whitespace().next()).is_none_or(|state| state == "T")
}

/// Run options checked before anything starts: a bad value is a usage error (exit 2).
pub fn check_args(args: &RunArgs) -> Result<(), String> {
    args.on_change.parse::<OnChange>()?;
    parse_exports(&args.export)?;
    Ok(())
}

/// Runs the init; returns op-bridge's exit code.
pub async fn run(config: BrokerConfig, args: RunArgs) -> Result<u8, StartError> {
    let config_err = |e: String| StartError::Config(e);
    let on_change: OnChange = args.on_change.parse().map_err(StartError::Usage)?;
    let io_err = |action: &str| {
        let action = action.to_string();
        move |source| StartError::Io { action: action.clone(), source }
    };
    if std::process::id() != 1 {
        // Orphans of the child are re-parented to us and reaped, as they would be by PID 1.
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| io_err("become a subreaper")(e.into()))?;
    }
    let mut signals =
        crate::process::take_signals().map_err(|e| io_err("take signals")(std::io::Error::other(e.to_string())))?;
    let reaper = Reaper::start().map_err(io_err("start the reaper"))?;

    let env = utf8_env();
    crate::daemon::check_discovered_names(env.iter().cloned(), &config.prefix, &config.suffix)
        .map_err(StartError::Usage)?;
    let mut config = crate::daemon::settle_op_path(config, &env);
    let child_env = ChildEnv::new(&args, &config).map_err(StartError::Usage)?;

    // Privilege separation (--user): the command's uid may connect; tell once at start when
    // it could read the token from the environment of the `op` processes.
    let user = args.user.as_deref().map(privsep::resolve_user).transpose().map_err(StartError::Usage)?;
    if let Some(user) = &user {
        config.serve.allow_uids.push(user.uid);
        // Watched files are the app's: root reads and writes them only as the app could.
        if nix::unistd::geteuid().is_root() && user.uid != 0 {
            config.watch.owner =
                Some(crate::fsops::Owner { uid: user.uid, gid: user.gid, groups: user.groups.clone() });
        }
        if user.gid_defaulted && user.gid == 0 && user.uid != 0 {
            tracing::warn!(
                "--user {}: no passwd entry and no group given, so the command runs with gid 0 (as with gosu); give one: --user {}:GID",
                user.uid,
                user.uid
            );
        }
    }
    if let BackendSpec::Op { path, user: op_user, .. } = &config.backend
        // The file that will run: a bare name (`--op-path op`, or the placeholder when nothing
        // needs `op`) is looked up on PATH, not taken as `./op`.
        && let Some(op) = match path {
            Some(path) if path.components().count() > 1 => Some(path.clone()),
            Some(name) => which::which(name).ok(),
            None => which::which("op").ok(),
        }
    {
        privsep::warn_if_op_exposed(&op, op_user.as_ref().map(|u| (u.uid, u.gid)), user.as_ref().map(|u| u.uid));
        if let Some(user) = user.as_ref().filter(|u| !u.is_current()) {
            privsep::warn_if_op_replaceable(&op, user);
        }
    }
    match &user {
        Some(user) => crate::token::warn_at_run(crate::token::tokens(), user.uid, user.gid, &user.groups),
        None => crate::token::warn_at_run(
            crate::token::tokens(),
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
            &nix::unistd::getgroups().unwrap_or_default().into_iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
        ),
    }

    // Resolve secrets, but let a stop signal abort a slow start-up. Other signals wait for
    // the command: the loop below takes them first, as if they came just after it started.
    let mut queued = Vec::new();
    let service = tokio::select! {
        started = Service::start(&config, &reaper, env) => Arc::new(started?),
        number = crate::process::wait_for_stop(&mut signals, &mut queued) => {
            tracing::warn!("{} during start-up; exiting without starting the command", signal_name(number));
            return Ok(u8::try_from(128 + number).unwrap_or(255));
        }
    };
    let mut signals = crate::process::requeue(queued, signals);
    if let Some(user) = &user {
        privsep::grant_socket(service.socket_path(), user).map_err(|e| config_err(e.to_string()))?;
    }
    let shutdown = CancellationToken::new();
    let server = {
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { service.serve(shutdown).await })
    };
    let mut changes = service.broker.subscribe_changes();
    let _refresh_timer = crate::refresh::start(service.clone(), config.refresh_interval, config.read_budget);
    // When the stop ends: counted from the stop signal, or from the command's own exit.
    let mut stop_deadline: Option<Instant> = None;

    // Decided once: a restarted command takes the terminal back from its predecessor.
    let terminal = child::owns_terminal();
    // A command that runs as another uid never shares root's terminal (TIOCSTI could type
    // into root's shell): it gets a pty of its own, relayed (see supervise::pty).
    let mut relay: Option<Relay> = None;
    let outcome = async {
        if terminal && user.as_ref().is_some_and(|u| !u.is_current() && nix::unistd::getuid().is_root()) {
            let user = user.as_ref().map(|u| (u.uid, u.gid)).unwrap_or_default();
            relay = Some(Relay::open(user.0, user.1).map_err(io_err("open a terminal for the command"))?);
        }
        let relay = relay.as_ref();
        // The command joins op-bridge's terminal only without a pty of its own.
        let terminal = terminal && relay.is_none();
        let process = match spawn_command(&reaper, &args, &child_env, &service, terminal, user.as_ref(), relay)? {
            Ok(process) => process,
            Err(err) => {
                tracing::error!("{err}");
                return Ok(Err(err));
            }
        };
        if let Some(relay) = relay {
            relay.set_command(process.pid().as_raw());
        }
        // Option paths are absolute by now (config::broker_config); the command keeps its
        // own working directory.
        child::leave_working_directory();
        tracing::info!(pid = process.pid().as_raw(), "started {}", args.command[0].to_string_lossy());
        let mut child = Supervised { process, kill_at: None };
        let mut stops = child.process.stops();
        let mut stopping = false;
        let mut restart_queued = false;
        let mut restarting = false;
        let mut changes_open = true;
        // SIGCONTs already acted on when op-bridge resumed from its own stop.
        let mut resumed_early = 0u32;
        loop {
            let kill_at = child.kill_at;
            tokio::select! {
                Some(number) = signals.recv() => match number {
                    sig::SIGHUP => {
                        if matches!(args.hup, HupMode::Refresh | HupMode::Both) {
                            service.request_refresh();
                        }
                        if matches!(args.hup, HupMode::Forward | HupMode::Both) {
                            child.forward(number);
                        }
                    }
                    sig::SIGTERM | sig::SIGINT | sig::SIGQUIT => {
                        tracing::info!("{}: stopping the command (grace {:?})", signal_name(number), args.grace);
                        if !stopping {
                            stopping = true;
                            let deadline = *stop_deadline.get_or_insert(Instant::now() + args.grace);
                            // Pending write-backs are pushed while the command winds down (the
                            // watcher keeps capturing until the command is gone).
                            let writeback = service.broker.writeback.clone();
                            tokio::spawn(async move { writeback.flush(deadline).await });
                        }
                        child.begin_stop(number, args.grace);
                    }
                    sig::SIGWINCH if relay.is_some() => {
                        if let Some(relay) = relay {
                            relay.resize();
                        }
                    }
                    sig::SIGTSTP | sig::SIGTTIN | sig::SIGTTOU => {
                        child.forward(number);
                        if suspend_relaying(relay) {
                            child.resume(terminal);
                            resumed_early += 1;
                        }
                    }
                    sig::SIGCONT if resumed_early > 0 => resumed_early -= 1,
                    sig::SIGCONT => child.resume(terminal),
                    other => child.forward(other),
                },
                // Ctrl-Z stopped the command (it holds the terminal's foreground): stop too, so
                // the shell that started op-bridge sees its job stop and gives the prompt back.
                _ = stops.next(), if terminal || relay.is_some() => {
                    if is_stopped(child.process.pid().as_raw()) && suspend_relaying(relay) {
                        child.resume(terminal);
                        resumed_early += 1;
                    }
                }
                exit = child.process.wait() => {
                    if restarting && !stopping {
                        reap_group(&child.process, Instant::now() + args.grace).await;
                        let process = match spawn_command(&reaper, &args, &child_env, &service, terminal, user.as_ref(), relay)? {
                            Ok(process) => process,
                            Err(err) => {
                                tracing::error!("restart failed: {err}");
                                return Ok(Err(err));
                            }
                        };
                        if let Some(relay) = relay {
                            relay.set_command(process.pid().as_raw());
                        }
                        tracing::info!(pid = process.pid().as_raw(), "restarted the command after a secret changed (old one ended with {exit})");
                        child = Supervised { process, kill_at: None };
                        stops = child.process.stops();
                        restarting = false;
                        if std::mem::take(&mut restart_queued) && child_env.unavailable(&service).is_none() {
                            restarting = true;
                            child.begin_stop(sig::SIGTERM, args.grace);
                        }
                        continue;
                    }
                    tracing::info!("command ended with {exit}");
                    let deadline = *stop_deadline.get_or_insert(Instant::now() + args.grace);
                    reap_group(&child.process, deadline - kill_margin(args.grace)).await;
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
                                child.begin_stop(sig::SIGTERM, args.grace);
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
    if let Some(relay) = relay.take() {
        relay.finish();
    }

    shutdown.cancel();
    let _ = server.await;
    // The command's status is kept even when write-backs are lost; the log names them. The
    // flush gets what is left of the stop's budget.
    let deadline = stop_deadline.unwrap_or_else(|| Instant::now() + args.grace);
    service.flush(deadline.saturating_duration_since(Instant::now())).await;
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

/// After the main child exits: SIGTERM to what is left of its group, SIGKILL at `kill_at`.
async fn reap_group(process: &Process, kill_at: Instant) {
    if process.signal_group(Signal::SIGTERM).is_err() {
        return; // nobody left in the group
    }
    while Instant::now() < kill_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if process.group_is_empty() {
            return;
        }
    }
    tracing::warn!("processes left in the command's group after the grace period; killing them");
    let _ = process.signal_group(Signal::SIGKILL);
}
