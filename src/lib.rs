//! op-bridge: a 1Password secret broker and container init for AI-agent containers.
//!
//! It resolves `op://` references once, holds the values in locked, zeroize-on-drop memory,
//! serves them over a Unix socket, writes rotated credentials back to 1Password, and
//! supervises the application as PID 1.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap derive); [`config`]: the translation of broker options
//!   into a `BrokerConfig`; [`commands`]: the client commands.
//! - [`protocol`]: the wire format (requests, replies, framing, limits); knows nothing of
//!   the store. [`client`]: the typed client and the client commands' error type, built on
//!   `protocol` only.
//! - [`bufio`]: the fixed-size, wiped read buffer for streams that carry values.
//! - [`socket_path`]: the default socket path shared by servers and clients.
//! - [`reference`]: `op://` reference parsing.
//! - [`store`]: the secret store; [`locked`]: the locked, zeroizing buffers it keeps values in.
//! - [`backend`]: the `Backend` trait with the `op` CLI, 1Password Connect (REST) and
//!   JSON-file implementations, error classification, the one retry policy and the TLS
//!   trust for Connect; `op` resolves in batches (`backend::op_batch`).
//! - [`daemon`]: the broker, the socket listener (bind, peer check, limits), connections,
//!   the in-flight byte budget, the REFRESH gate, the audit log, and `op-bridge daemon`.
//! - [`process`]: the process-wide primitives every layer may use: the reaper (the only
//!   `waitpid`) and the children it tracks.
//! - [`supervise`]: spawning, signal forwarding, `op-bridge run` (the init), and privilege
//!   separation (`run --user`, `--op-user`, the `op` mode check).
//! - [`watch`]: credential-file watching (capture, debounce, materialization);
//!   [`writeback`]: the per-target write-back queue that never drops a rotation;
//!   [`fsops`]: the thread with the app's file permissions that opens, reads and replaces
//!   watched files without following links.
//! - [`cache`]: the sealed restart cache and the write-back journal, a store the daemon drives
//!   (`daemon::recovery`: start-up from the cache, journal replay); [`refresh`]: the
//!   periodic refresh timer.
//! - [`oauth`]: broker-owned OAuth: the token endpoint client and, per access token, the
//!   refresher that journals each token response before using it and writes it back.
//! - [`proxy`]: agent-blind secrets: bindings, placeholders and the egress proxy that swaps
//!   a placeholder for its value on the way to a host the secret is bound to.
//! - The ground floor every layer may use: [`scrub`] (wiping JSON that carries values),
//!   [`time`] (RFC 3339 timestamps), [`fsutil`] (atomic file writes), [`meter`] (the read
//!   meter the backends count into).
//! - [`token`]: the 1Password tokens, from the environment or a token file, in locked memory.
//! - [`hardening`]: no dumps, not dumpable, memlock reporting.
//! - [`logging`]: the lossy non-blocking writers behind stderr logging and the audit log.
//! - [`fuzzing`]: the fuzz target bodies, shared by `fuzz/` and the seed-corpus test.

pub mod backend;
pub mod bufio;
pub mod cache;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod exec_provider;
pub mod fsops;
pub mod fsutil;
pub mod fuzzing;
pub mod hardening;
pub mod locked;
pub mod logging;
pub mod meter;
pub mod oauth;
pub mod process;
pub mod protocol;
pub mod proxy;
pub mod reference;
pub mod refresh;
pub mod scrub;
pub mod socket_path;
pub mod store;
pub mod supervise;
pub mod time;
pub mod token;
pub mod watch;
pub mod writeback;

/// Exit codes of op-bridge itself (DESIGN §2). `run` otherwise exits with its child's status.
pub mod exit {
    pub const OK: u8 = 0;
    /// A client got `ERR` from the daemon.
    pub const ERR: u8 = 1;
    /// Bad command line.
    pub const USAGE: u8 = 2;
    /// A client could not reach the daemon.
    pub const UNREACHABLE: u8 = 3;
    /// `set`: accepted and queued, but not stored in 1Password yet (it will be; EX_TEMPFAIL).
    pub const PENDING: u8 = 75;
    /// `set`: queued, but neither stored in 1Password yet nor journaled (`--cache` could not be
    /// written): a restart before 1Password answers loses it (EX_IOERR).
    pub const NOT_JOURNALED: u8 = 74;
    /// Required secrets could not be resolved; the child was not started (EX_UNAVAILABLE).
    pub const SECRETS_UNAVAILABLE: u8 = 69;
    /// Pending write-backs could not be stored before exit (EX_TEMPFAIL).
    pub const WRITEBACK_LOST: u8 = 75;
    /// op-bridge itself could not start (socket in use, bad option, …).
    pub const START_FAILED: u8 = 125;
    /// `run`: the command is not executable.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// `run`: the command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// Sleeps until `at`, or forever when there is no deadline (a disabled `select!` timer arm).
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
