//! The `op-bridge` binary: parse the command line, set up logging, call the library, and
//! decide the exit code.

use std::process::ExitCode;

use clap::Parser;
use op_bridge::cli::{BrokerArgs, Cli, Command, LogFormat};
use op_bridge::daemon::StartError;
use op_bridge::{commands, exit};

fn main() -> ExitCode {
    // The very first thing, while this is the only thread: every thread started later (the
    // runtime's, the logger's) inherits the blocked mask, and as PID 1 no signal that arrives
    // before the init listens is dropped (process.rs). Clients unblock again.
    if let Err(err) = op_bridge::process::block_signals() {
        eprintln!("op-bridge: {err}");
        return ExitCode::from(exit::START_FAILED);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(args) => {
            let grace = args.grace;
            broker_main(
                &args.broker,
                "info",
                |config| async move { op_bridge::daemon::run_daemon(config, grace).await },
            )
        }
        Command::Run(args) => {
            // Bad values of run's own options are usage errors, found before anything starts.
            if let Err(message) = op_bridge::supervise::run::check_args(&args) {
                eprintln!("op-bridge: {message}");
                return ExitCode::from(exit::USAGE);
            }
            // `run` shares the application's terminal: only warnings and errors by default.
            broker_main(&args.broker.clone(), "warn", |config| async move {
                op_bridge::supervise::run::run(config, args).await
            })
        }
        client => client_main(client),
    }
}

fn init_logging(args: &BrokerArgs, default_level: &str) -> Result<(), String> {
    let wanted = args.log_level.as_deref().unwrap_or(default_level);
    let level: tracing::Level =
        wanted.parse().map_err(|_| format!("invalid --log-level '{wanted}' (error, warn, info, debug, trace)"))?;
    // A stalled stderr reader must never freeze PID 1: lines are queued and, when the queue
    // is full, dropped and counted (STATUS `logging.dropped`).
    let stderr = op_bridge::logging::non_blocking(op_bridge::logging::Sink::Stderr, std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Runs `daemon` or `run` on a multi-threaded runtime and maps start-up errors to exit codes.
fn broker_main<F, Fut>(args: &BrokerArgs, default_level: &str, body: F) -> ExitCode
where
    F: FnOnce(op_bridge::daemon::BrokerConfig) -> Fut,
    Fut: std::future::Future<Output = Result<u8, StartError>>,
{
    // Before any other thread: one thread takes every signal (process.rs).
    if let Err(err) = op_bridge::process::start_signal_thread() {
        eprintln!("op-bridge: {err}");
        return ExitCode::from(exit::START_FAILED);
    }
    // The child gets the limits op-bridge was started with, not the hardened ones.
    op_bridge::supervise::child::save_start_limits();
    if let Err(message) = init_logging(args, default_level) {
        eprintln!("op-bridge: {message}");
        return ExitCode::from(exit::USAGE);
    }
    // Before any secret is read or any child exists.
    op_bridge::hardening::harden_process();
    // Once, before the configuration (the backend choice looks at the tokens) and any `op`.
    if let Err(err) = op_bridge::token::load() {
        eprintln!("op-bridge: {err}");
        return ExitCode::from(exit::START_FAILED);
    }
    let config = match op_bridge::config::broker_config(args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("op-bridge: {message}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("op-bridge: cannot start the runtime: {err}");
            return ExitCode::from(exit::START_FAILED);
        }
    };
    match runtime.block_on(body(config)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::from(match err {
                StartError::SecretsUnavailable(_) => exit::SECRETS_UNAVAILABLE,
                StartError::Usage(_) => exit::USAGE,
                _ => exit::START_FAILED,
            })
        }
    }
}

/// Runs a client command on a single-threaded runtime (they are short-lived).
fn client_main(command: Command) -> ExitCode {
    op_bridge::process::unblock_signals();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("op-bridge: cannot start the runtime: {err}");
            return ExitCode::from(exit::UNREACHABLE);
        }
    };
    let result = runtime.block_on(async {
        match &command {
            Command::Get(args) => match &args.name {
                Some(name) => commands::get(&args.client, name).await,
                None => op_bridge::exec_provider::serve_stdin(&args.client).await,
            },
            Command::Set(args) => commands::set(args).await,
            Command::Delete(args) => commands::delete(&args.client, &args.name).await,
            Command::List(args) => commands::list(args).await,
            Command::Ping(args) => commands::ping(args).await,
            Command::Refresh(args) => commands::refresh(args).await,
            Command::Status(args) => commands::status(args).await,
            Command::ProxyEnv(args) => commands::proxy_env(args).await,
            Command::Run(_) | Command::Daemon(_) => unreachable!("handled by broker_main"),
        }
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(err) => {
            eprintln!("op-bridge: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
