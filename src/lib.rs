//! op-bridge: a 1Password secret broker and container init for AI-agent containers.
//!
//! It resolves `op://` references once, holds the values in locked, zeroize-on-drop memory,
//! serves them over a Unix socket, writes rotated credentials back to 1Password, and
//! supervises the application as PID 1.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap derive); [`commands`]: the client commands and the
//!   translation of options into configuration.
//! - [`protocol`]: the wire format (requests, replies, framing, limits); knows nothing of
//!   the store. [`client`]: the typed client, built on `protocol` only.
//! - [`reference`]: `op://` reference parsing.
//! - [`store`]: the secret store; [`locked`]: the locked, zeroizing buffers it keeps values in.
//! - [`backend`]: the `Backend` trait with the `op` CLI and JSON-file implementations,
//!   error classification and retry policy.
//! - [`daemon`]: the broker, the socket listener (bind, peer check, limits), connections,
//!   the audit log, and `op-bridge daemon`.
//! - [`supervise`]: the reaper (the only `waitpid`), spawning and signal forwarding, and
//!   `op-bridge run`.
//! - [`watch`]: credential-file watching (capture, debounce, materialization);
//!   [`writeback`]: the per-target write-back queue that never drops a rotation.
//! - [`hardening`]: no dumps, not dumpable, memlock reporting.
//! - [`fuzzing`]: the fuzz target bodies, shared by `fuzz/` and the seed-corpus test.

pub mod backend;
pub mod cli;
pub mod client;
pub mod commands;
pub mod daemon;
pub mod exec_provider;
pub mod fuzzing;
pub mod hardening;
pub mod locked;
pub mod protocol;
pub mod reference;
pub mod store;
pub mod supervise;
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
