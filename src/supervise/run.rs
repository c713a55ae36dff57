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
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::child::{self, SpawnError};
use super::privsep::{self, Identity};
use super::pty::Relay;
use crate::cli::{HupMode, RunArgs};
use crate::daemon::{BackendSpec, BrokerConfig, Service, StartError, utf8_env};
use crate::process::{Exit, Process, Reaper, Stops};
use crate::refresh::RefreshTimer;

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

/// Run options checked before anything starts: a bad value is a usage error (exit 2).
pub fn check_args(args: &RunArgs) -> Result<(), String> {
    args.on_change.parse::<OnChange>()?;
    parse_exports(&args.export)?;
    Ok(())
}

/// Runs the init; returns op-bridge's exit code. The steps: `prepare` (options, `--user`,
/// warnings), `start` the broker (a stop signal aborts it), `supervise` the command until it
/// ends for good, and `finish` (the terminal, the socket, the last flush).
pub async fn run(config: BrokerConfig, args: RunArgs) -> Result<u8, StartError> {
    let (launcher, startup) = prepare(config, &args)?;
    let mut running = match start(&launcher, startup).await? {
        Started::Running(running) => running,
        Started::Stopped(code) => return Ok(code),
    };
    // The command's own terminal (`--user`) is restored in `finish`, however supervision ends.
    let mut relay = None;
    let ending = supervise(&launcher, &mut running, &mut relay).await;
    finish(running, relay, ending, args.grace).await
}

// ---------------------------------------------------------------- prepare

/// What starting the command (and starting it again) takes, and what a changed secret does
/// to it; settled before anything starts.
struct Launcher<'a> {
    args: &'a RunArgs,
    on_change: OnChange,
    reaper: Reaper,
    child_env: ChildEnv,
    /// `--user`: who the command runs as.
    user: Option<Identity>,
}

/// What starting the broker takes.
struct Startup {
    config: BrokerConfig,
    env: Vec<(String, String)>,
    signals: mpsc::UnboundedReceiver<i32>,
}

/// Checks the options, becomes a subreaper, takes the signals, settles `--user` and gives
/// the start-up warnings; nothing is resolved or spawned yet.
fn prepare(config: BrokerConfig, args: &RunArgs) -> Result<(Launcher<'_>, Startup), StartError> {
    let on_change: OnChange = args.on_change.parse().map_err(StartError::Usage)?;
    if std::process::id() != 1 {
        // Orphans of the child are re-parented to us and reaped, as they would be by PID 1.
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| io_error("become a subreaper")(e.into()))?;
    }
    let signals =
        crate::process::take_signals().map_err(|e| io_error("take signals")(std::io::Error::other(e.to_string())))?;
    let reaper = Reaper::start().map_err(io_error("start the reaper"))?;

    let env = utf8_env();
    crate::daemon::check_discovered_names(env.iter().cloned(), &config.prefix, &config.suffix)
        .map_err(StartError::Usage)?;
    let mut config = crate::daemon::settle_op_path(config, &env);
    let child_env = ChildEnv::new(args, &config).map_err(StartError::Usage)?;
    let user = settle_user(&mut config, args)?;
    warn_of_exposure(&config, user.as_ref());
    Ok((Launcher { args, on_change, reaper, child_env, user }, Startup { config, env, signals }))
}

/// Privilege separation (`--user`): the command's uid may connect, and the watched files are
/// handled as it could handle them.
fn settle_user(config: &mut BrokerConfig, args: &RunArgs) -> Result<Option<Identity>, StartError> {
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
    Ok(user)
}

/// Tells once at start when the command could reach the token: in the environment of the
/// `op` processes, by replacing `op`, or in a token file it can read; and when the token
/// came from the environment, where every `docker exec` sees it.
fn warn_of_exposure(config: &BrokerConfig, user: Option<&Identity>) {
    if let BackendSpec::Op { path, user: op_user, .. } = &config.backend
        // The file that will run: a bare name (`--op-path op`, or the placeholder when nothing
        // needs `op`) is looked up on PATH, not taken as `./op`.
        && let Some(op) = match path {
            Some(path) if path.components().count() > 1 => Some(path.clone()),
            Some(name) => which::which(name).ok(),
            None => which::which("op").ok(),
        }
    {
        privsep::warn_if_op_exposed(&op, op_user.as_ref().map(|u| (u.uid, u.gid)), user.map(|u| u.uid));
        if let Some(user) = user.filter(|u| !u.is_current()) {
            privsep::warn_if_op_replaceable(&op, user);
        }
    }
    match user {
        Some(user) => crate::token::warn_at_run(crate::token::tokens(), user.uid, user.gid, &user.groups),
        None => crate::token::warn_at_run(
            crate::token::tokens(),
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
            &nix::unistd::getgroups().unwrap_or_default().into_iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
        ),
    }
}

/// The start error for an I/O failure while doing `action`.
fn io_error(action: &'static str) -> impl Fn(std::io::Error) -> StartError {
    move |source| StartError::Io { action: action.to_string(), source }
}

impl Launcher<'_> {
    /// Builds the environment with the current values and spawns the command; the environment
    /// copy is zeroized as soon as the child has it.
    fn spawn(
        &self,
        service: &Service,
        terminal: bool,
        relay: Option<&Relay>,
    ) -> Result<Result<Process, SpawnError>, StartError> {
        let env = self.child_env.build(service).map_err(StartError::SecretsUnavailable)?;
        let attach = relay.map(Relay::attach);
        let lock_privileges = !self.args.allow_privilege_gain;
        Ok(child::spawn(&self.reaper, &self.args.command, &env, terminal, self.user.as_ref(), lock_privileges, attach))
    }
}

// ---------------------------------------------------------------- start

/// How [`start`] ended.
enum Started {
    Running(Running),
    /// A stop signal came first: op-bridge exits with this code and never starts the command.
    Stopped(u8),
}

/// The broker serving the socket while the command runs, and what the supervisor waits on.
struct Running {
    service: Arc<Service>,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    _refresh_timer: Option<RefreshTimer>,
    /// Every signal but SIGCHLD, those that came during start-up first.
    signals: mpsc::UnboundedReceiver<i32>,
    /// Names whose values a refresh changed.
    changes: broadcast::Receiver<Vec<String>>,
    /// When the stop ends: counted from the stop signal, or from the command's own exit.
    stop_deadline: Option<Instant>,
}

/// Starts the broker: resolves the secrets (a stop signal aborts a slow start-up), lets the
/// command's uid reach the socket, serves it and starts the refresh timer.
async fn start(launcher: &Launcher<'_>, startup: Startup) -> Result<Started, StartError> {
    let Startup { config, env, mut signals } = startup;
    // Other signals wait for the command: the supervisor takes them first, as if they came
    // just after it started.
    let mut queued = Vec::new();
    let service = tokio::select! {
        started = Service::start(&config, &launcher.reaper, env) => Arc::new(started?),
        number = crate::process::wait_for_stop(&mut signals, &mut queued) => {
            tracing::warn!("{} during start-up; exiting without starting the command", signal_name(number));
            return Ok(Started::Stopped(u8::try_from(128 + number).unwrap_or(255)));
        }
    };
    let signals = crate::process::requeue(queued, signals);
    if let Some(user) = &launcher.user {
        privsep::grant_socket(service.socket_path(), user).map_err(|e| StartError::Config(e.to_string()))?;
    }
    let shutdown = CancellationToken::new();
    let server = {
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { service.serve(shutdown).await })
    };
    let changes = service.broker.subscribe_changes();
    let refresh_timer = crate::refresh::start(service.clone(), config.refresh_interval, config.read_budget);
    Ok(Started::Running(Running {
        service,
        shutdown,
        server,
        _refresh_timer: refresh_timer,
        signals,
        changes,
        stop_deadline: None,
    }))
}

// ---------------------------------------------------------------- supervise

/// How supervision ended.
enum Ending {
    /// The command exited, and no restart followed.
    Exited(Exit),
    /// The command could not be started, or restarted.
    NotStarted(SpawnError),
}

/// Starts the command, on a pty of its own when it runs as another uid on root's terminal
/// (kept in `relay` for [`finish`]), and supervises it until it ends for good.
async fn supervise(
    launcher: &Launcher<'_>,
    running: &mut Running,
    relay: &mut Option<Relay>,
) -> Result<Ending, StartError> {
    // Decided once: a restarted command takes the terminal back from its predecessor.
    let terminal = child::owns_terminal();
    // A command that runs as another uid never shares root's terminal (TIOCSTI could type
    // into root's shell): it gets a pty of its own, relayed (see supervise::pty).
    if terminal && launcher.user.as_ref().is_some_and(|u| !u.is_current() && nix::unistd::getuid().is_root()) {
        let user = launcher.user.as_ref().map(|u| (u.uid, u.gid)).unwrap_or_default();
        *relay = Some(Relay::open(user.0, user.1).map_err(io_error("open a terminal for the command"))?);
    }
    let relay = relay.as_ref();
    // The command joins op-bridge's terminal only without a pty of its own.
    let terminal = terminal && relay.is_none();
    let process = match launcher.spawn(&running.service, terminal, relay)? {
        Ok(process) => process,
        Err(err) => {
            tracing::error!("{err}");
            return Ok(Ending::NotStarted(err));
        }
    };
    if let Some(relay) = relay {
        relay.set_command(process.pid().as_raw());
    }
    // Option paths are absolute by now (config::broker_config); the command keeps its
    // own working directory.
    child::leave_working_directory();
    tracing::info!(pid = process.pid().as_raw(), "started {}", launcher.args.command[0].to_string_lossy());
    let supervisor = Supervisor {
        launcher,
        running,
        relay,
        terminal,
        child: Supervised::new(process),
        stopping: false,
        restarting: false,
        restart_queued: false,
        changes_open: true,
        resumed_early: 0,
    };
    supervisor.supervise().await
}

/// The init loop: the command, and the state of stopping and restarting it. One method per
/// event; only an exit can end the loop.
struct Supervisor<'a> {
    launcher: &'a Launcher<'a>,
    running: &'a mut Running,
    relay: Option<&'a Relay>,
    /// The command joins op-bridge's terminal (no pty of its own).
    terminal: bool,
    child: Supervised,
    /// A stop signal came: the command is on its way out, for good.
    stopping: bool,
    /// A changed secret is restarting the command: it has been asked to stop.
    restarting: bool,
    /// Another change came during a restart: restart once more after it.
    restart_queued: bool,
    changes_open: bool,
    /// SIGCONTs already acted on when op-bridge resumed from its own stop.
    resumed_early: u32,
}

impl Supervisor<'_> {
    /// Waits for the next event until the command has ended for good.
    async fn supervise(mut self) -> Result<Ending, StartError> {
        loop {
            let kill_at = self.child.kill_at;
            tokio::select! {
                Some(number) = self.running.signals.recv() => self.on_signal(number),
                // Ctrl-Z stopped the command (it holds the terminal's foreground): stop too, so
                // the shell that started op-bridge sees its job stop and gives the prompt back.
                _ = self.child.stops.next(), if self.terminal || self.relay.is_some() => self.on_stopped(),
                exit = self.child.process.wait() => {
                    if let ControlFlow::Break(ending) = self.on_exit(exit).await? {
                        return Ok(ending);
                    }
                }
                changed = self.running.changes.recv(), if self.changes_open => self.on_change(changed),
                _ = crate::sleep_until(kill_at) => self.on_kill_deadline(),
            }
        }
    }

    /// A signal to op-bridge: most go on to the command's group (see the module's paragraph).
    fn on_signal(&mut self, number: i32) {
        match number {
            sig::SIGHUP => {
                if matches!(self.launcher.args.hup, HupMode::Refresh | HupMode::Both) {
                    self.running.service.request_refresh();
                }
                if matches!(self.launcher.args.hup, HupMode::Forward | HupMode::Both) {
                    self.child.forward(number);
                }
            }
            sig::SIGTERM | sig::SIGINT | sig::SIGQUIT => self.stop(number),
            sig::SIGWINCH if self.relay.is_some() => {
                if let Some(relay) = self.relay {
                    relay.resize();
                }
            }
            sig::SIGTSTP | sig::SIGTTIN | sig::SIGTTOU => {
                self.child.forward(number);
                if suspend_relaying(self.relay) {
                    self.child.resume(self.terminal);
                    self.resumed_early += 1;
                }
            }
            sig::SIGCONT if self.resumed_early > 0 => self.resumed_early -= 1,
            sig::SIGCONT => self.child.resume(self.terminal),
            other => self.child.forward(other),
        }
    }

    /// A stop signal: forwarded, and the stop's budget starts (once).
    fn stop(&mut self, number: i32) {
        let grace = self.launcher.args.grace;
        tracing::info!("{}: stopping the command (grace {:?})", signal_name(number), grace);
        if !self.stopping {
            self.stopping = true;
            let deadline = *self.running.stop_deadline.get_or_insert(Instant::now() + grace);
            // Pending write-backs are pushed while the command winds down (the watcher keeps
            // capturing until the command is gone).
            let writeback = self.running.service.broker.writeback.clone();
            tokio::spawn(async move { writeback.flush(deadline).await });
        }
        self.child.begin_stop(number, grace);
    }

    /// The command stopped (job control): op-bridge stops with it, as its shell's job.
    fn on_stopped(&mut self) {
        if is_stopped(self.child.process.pid().as_raw()) && suspend_relaying(self.relay) {
            self.child.resume(self.terminal);
            self.resumed_early += 1;
        }
    }

    /// The command exited: the end, unless a changed secret is restarting it.
    async fn on_exit(&mut self, exit: Exit) -> Result<ControlFlow<Ending>, StartError> {
        if self.restarting && !self.stopping {
            return self.restart(exit).await;
        }
        tracing::info!("command ended with {exit}");
        let grace = self.launcher.args.grace;
        let deadline = *self.running.stop_deadline.get_or_insert(Instant::now() + grace);
        reap_group(&self.child.process, deadline - kill_margin(grace)).await;
        Ok(ControlFlow::Break(Ending::Exited(exit)))
    }

    /// Starts the command again once the one a changed secret stopped has exited.
    async fn restart(&mut self, exit: Exit) -> Result<ControlFlow<Ending>, StartError> {
        reap_group(&self.child.process, Instant::now() + self.launcher.args.grace).await;
        let process = match self.launcher.spawn(&self.running.service, self.terminal, self.relay)? {
            Ok(process) => process,
            Err(err) => {
                tracing::error!("restart failed: {err}");
                return Ok(ControlFlow::Break(Ending::NotStarted(err)));
            }
        };
        if let Some(relay) = self.relay {
            relay.set_command(process.pid().as_raw());
        }
        tracing::info!(
            pid = process.pid().as_raw(),
            "restarted the command after a secret changed (old one ended with {exit})"
        );
        self.child = Supervised::new(process);
        self.restarting = false;
        if std::mem::take(&mut self.restart_queued)
            && self.launcher.child_env.unavailable(&self.running.service).is_none()
        {
            self.begin_restart();
        }
        Ok(ControlFlow::Continue(()))
    }

    /// A refresh changed values: what `--on-change` says, for those the command was given.
    fn on_change(&mut self, changed: Result<Vec<String>, broadcast::error::RecvError>) {
        let service = &self.running.service;
        let exported = self.launcher.child_env.exported_names(service);
        let changed = match changed {
            Ok(changed) => changed,
            // Missed notifications (the loop was busy restarting): assume the worst.
            Err(broadcast::error::RecvError::Lagged(_)) => exported.iter().cloned().collect(),
            Err(broadcast::error::RecvError::Closed) => {
                self.changes_open = false;
                return;
            }
        };
        let hit: Vec<&String> = changed.iter().filter(|n| exported.contains(*n)).collect();
        if hit.is_empty() || self.stopping {
            return;
        }
        match self.launcher.on_change {
            OnChange::None => tracing::info!("exported secrets changed ({hit:?}); --on-change none"),
            OnChange::Signal(signal) => {
                tracing::info!("exported secrets changed ({hit:?}); sending {signal}");
                self.child.forward(signal as i32);
            }
            OnChange::Restart if self.restarting => self.restart_queued = true,
            OnChange::Restart => match self.launcher.child_env.unavailable(service) {
                // A secret that was dropped (deleted in the backend) cannot be given to a new
                // command: keep the running one rather than stop it.
                Some(missing) => tracing::error!(
                    "exported secrets changed ({hit:?}) but {missing} has no value; not restarting the command"
                ),
                None => {
                    tracing::info!("exported secrets changed ({hit:?}); restarting the command");
                    self.begin_restart();
                }
            },
        }
    }

    /// The stop's grace is over: SIGKILL to the command's group.
    fn on_kill_deadline(&mut self) {
        tracing::warn!("grace period over; killing the command's process group");
        self.child.forward(sig::SIGKILL);
        self.child.kill_at = None;
    }

    fn begin_restart(&mut self) {
        self.restarting = true;
        self.child.begin_stop(sig::SIGTERM, self.launcher.args.grace);
    }
}

fn signal_name(number: i32) -> String {
    Signal::try_from(number).map(|s| s.to_string()).unwrap_or_else(|_| format!("signal {number}"))
}

/// The supervised child and the state of stopping it.
struct Supervised {
    process: Process,
    /// Its job-control stops.
    stops: Stops,
    /// When the group gets SIGKILL (set once a stop has begun).
    kill_at: Option<Instant>,
}

impl Supervised {
    fn new(process: Process) -> Supervised {
        let stops = process.stops();
        Supervised { process, stops, kill_at: None }
    }

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

// ---------------------------------------------------------------- finish

/// After the command: the pty's last output, the socket server's shutdown, the last flush of
/// write-backs, the secrets wiped; returns op-bridge's exit code.
async fn finish(
    running: Running,
    relay: Option<Relay>,
    ending: Result<Ending, StartError>,
    grace: Duration,
) -> Result<u8, StartError> {
    if let Some(relay) = relay {
        relay.finish();
    }
    running.shutdown.cancel();
    let _ = running.server.await;
    // The command's status is kept even when write-backs are lost; the log names them. The
    // flush gets what is left of the stop's budget.
    let deadline = running.stop_deadline.unwrap_or_else(|| Instant::now() + grace);
    running.service.flush(deadline.saturating_duration_since(Instant::now())).await;
    running.service.close();
    Ok(match ending? {
        Ending::Exited(exit) => exit_code(exit),
        Ending::NotStarted(err) => err.exit_code(),
    })
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
