//! Process supervision: spawning, signal forwarding, the init loop of `op-bridge run`, and
//! privilege separation (`run --user`). The reaper (the one `waitpid`) and the signalling of
//! children live in [`crate::process`].

pub mod child;
pub mod privsep;
pub mod pty;
pub mod run;

/// Sends SIGHUP to `pid` (the `refresh --pid-file` fallback).
pub fn send_hangup(pid: i32) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
}
