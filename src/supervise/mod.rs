//! Process supervision: spawning, signals and the init loop of `op-bridge run`. The reaper
//! (the one `waitpid`) lives in [`crate::process`]; nothing else calls `waitpid` or `kill`.

pub mod child;
pub mod run;

/// Sends SIGHUP to `pid` (the `refresh --pid-file` fallback).
pub fn send_hangup(pid: i32) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
}
