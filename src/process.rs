//! The reaper: the only code in op-bridge that calls `waitpid`. It lives on the bottom floor
//! because the `op` backend, the daemon and the init all start children through it.
//!
//! Every child op-bridge starts (the `op` CLI, the supervised application) is spawned through
//! [`Reaper::spawn`], which registers the pid before the reaper can see it exit. On every
//! SIGCHLD the reaper collects all exited children with `waitpid(-1, WNOHANG)`, hands each
//! registered child's status to its waiter, and simply reaps the rest: orphans re-parented
//! to op-bridge as PID 1 or as a subreaper. A `waitpid(-1)` loop would steal statuses from
//! `tokio::process::Child`, which is why nothing here uses it.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell convention: the exit code, or 128+N for death by signal N.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(code) => code,
            Exit::Signal(sig) => 128 + sig,
        }
    }

    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(sig) => match Signal::try_from(*sig) {
                Ok(s) => write!(f, "signal {} ({s})", sig),
                Err(_) => write!(f, "signal {sig}"),
            },
        }
    }
}

#[derive(Default)]
struct Waiters {
    by_pid: HashMap<i32, watch::Sender<Option<Exit>>>,
}

/// Shared handle to the process-wide reaper.
#[derive(Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
    orphans: Arc<AtomicU64>,
}

/// A child started through the reaper. Dropping it neither waits nor kills.
pub struct Process {
    pid: Pid,
    exit_rx: watch::Receiver<Option<Exit>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. Must run inside a tokio
    /// runtime, before any child is spawned.
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper { waiters: Arc::default(), orphans: Arc::default() };
        let task = reaper.clone();
        tokio::spawn(async move {
            // Children that exited before the handler existed are collected on the first pass.
            loop {
                task.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `command`, registering the child before its exit can be reaped. The caller must
    /// never call `wait` on the returned `Child`; use the [`Process`] instead.
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, Process)> {
        // Holding the lock across spawn means reap_all cannot collect this child before its
        // waiter exists (and cannot race std's own waitpid on an exec failure).
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let child = command.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        waiters.by_pid.insert(pid, exit_tx);
        Ok((child, Process { pid: Pid::from_raw(pid), exit_rx }))
    }

    /// Number of children reaped that nobody was waiting for (orphans).
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }

    /// Collects every exited child without blocking.
    pub fn reap_all(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!("waitpid failed: {err}");
                    return;
                }
            };
            match waiters.by_pid.remove(&pid.as_raw()) {
                Some(exit_tx) => {
                    let _ = exit_tx.send(Some(exit));
                }
                None => {
                    self.orphans.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(pid = pid.as_raw(), %exit, "reaped orphan");
                }
            }
        }
    }
}

impl Process {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits for the exit status delivered by the reaper.
    pub async fn wait(&mut self) -> Exit {
        loop {
            if let Some(exit) = *self.exit_rx.borrow_and_update() {
                return exit;
            }
            if self.exit_rx.changed().await.is_err() {
                // The sender only goes away after sending, so this is unreachable in practice;
                // report a generic failure rather than hanging.
                return self.exit_rx.borrow().unwrap_or(Exit::Code(255));
            }
        }
    }

    /// The exit status if the child has already been reaped.
    pub fn try_exit(&self) -> Option<Exit> {
        *self.exit_rx.borrow()
    }

    /// Sends `signal` to the child (ignored once it has been reaped, so a recycled pid is
    /// never hit).
    pub fn signal(&self, signal: Signal) {
        if self.try_exit().is_none() {
            let _ = kill(self.pid, signal);
        }
    }

    /// Sends `signal` to the child's process group (the child leads its own group).
    pub fn signal_group(&self, signal: Signal) -> nix::Result<()> {
        killpg(self.pid, signal)
    }
}

impl Process {
    /// Whether no process is left in the child's group (signal 0 probes without sending).
    pub fn group_is_empty(&self) -> bool {
        matches!(nix::sys::signal::killpg(self.pid, None), Err(Errno::ESRCH))
    }
}
