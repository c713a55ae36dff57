//! Process supervision: the reaper (the one `waitpid`), spawning, signals and the init loop
//! of `op-bridge run`, and privilege separation (`run --user`). Nothing outside this module
//! calls `waitpid` or `kill`.

pub mod child;
pub mod privsep;
pub mod reaper;
pub mod run;

pub use reaper::{Exit, Process, Reaper};

/// Sends SIGHUP to `pid` (the `refresh --pid-file` fallback).
pub fn send_hangup(pid: i32) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
}
