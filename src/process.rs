//! The reaper: the only code in op-bridge that calls `waitpid`. It lives on the bottom floor
//! because the `op` backend, the daemon and the init all start children through it.
//!
//! Every child op-bridge starts (the `op` CLI, the supervised application) is spawned through
//! [`Reaper::spawn`], which registers the pid before the reaper can see it exit. On every
//! SIGCHLD the reaper collects all exited children with `waitpid(-1, WNOHANG)`, hands each
//! registered child's status to its waiter, and simply reaps the rest: orphans re-parented
//! to op-bridge as PID 1 or as a subreaper. A `waitpid(-1)` loop would steal statuses from
//! `tokio::process::Child`, which is why nothing here uses it.
//!
//! Signals are taken the way dumb-init and tini take them: [`block_signals`] blocks every
//! signal in the main thread before any other thread exists (threads inherit the mask), and
//! one thread ([`start_signal_thread`]) receives them with `sigwaitinfo`. Nothing is ever
//! delivered to a handler, so no signal is lost between start-up and the moment the init
//! loop listens (they queue in a channel), PID 1's "ignore what has no handler" rule never
//! applies, and signals that signal-hook refuses to handle (SIGSEGV, SIGILL, …) can be
//! forwarded like any other. SIGCHLD wakes the reaper; every other signal goes to the one
//! consumer that [`take_signals`] hands them to (the init loop or the daemon loop).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc, watch};

/// The signals that reach op-bridge: taken by one thread, never by a handler.
struct SignalIntake {
    /// Woken on every SIGCHLD (a stored permit covers one that comes before the reaper waits).
    child_exited: Arc<Notify>,
    /// Every other signal, in arrival order, until [`take_signals`] hands the receiver out.
    others_rx: Mutex<Option<mpsc::UnboundedReceiver<i32>>>,
}

static INTAKE: OnceLock<SignalIntake> = OnceLock::new();

/// Why the signal intake could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot block signals: {0}")]
    Block(io::Error),
    #[error("cannot start the signal thread: {0}")]
    Thread(io::Error),
    #[error("signals are not taken by op-bridge's signal thread (start_signal_thread was not called)")]
    NotInstalled,
    #[error("the signal stream was already taken")]
    AlreadyTaken,
}

/// Blocks every signal in the calling thread. Call it first thing in `main`, before any other
/// thread exists: threads started later inherit the mask, so from then on a signal is only
/// ever taken by [`start_signal_thread`]'s thread, and none arriving before that is lost.
pub fn block_signals() -> Result<(), SignalError> {
    // SAFETY: sigset_t is plain data initialised by sigfillset; pthread_sigmask on the calling
    // thread. glibc and musl leave their reserved real-time signals out of the filled set.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        if rc != 0 {
            return Err(SignalError::Block(io::Error::from_raw_os_error(rc)));
        }
    }
    Ok(())
}

/// Unblocks every signal in the calling thread: the client commands, which are not an init,
/// keep the default actions (Ctrl-C ends them). Signals that came while blocked arrive now.
pub fn unblock_signals() {
    // SAFETY: as in block_signals, with an empty set.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Starts the thread that receives every signal (after [`block_signals`], before any other
/// thread). Calling it again does nothing.
pub fn start_signal_thread() -> Result<(), SignalError> {
    if INTAKE.get().is_some() {
        return Ok(());
    }
    block_signals()?;
    // SAFETY: plain data initialised by sigfillset.
    let all = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        all
    };
    let child_exited = Arc::new(Notify::new());
    let (others_tx, others_rx) = mpsc::unbounded_channel();
    let notify = child_exited.clone();
    let wait_set = SigSet(all);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || receive_signals(wait_set, &notify, &others_tx))
        .map_err(SignalError::Thread)?;
    let _ = INTAKE.set(SignalIntake { child_exited, others_rx: Mutex::new(Some(others_rx)) });
    Ok(())
}

/// A `sigset_t` that may move to the signal thread.
struct SigSet(libc::sigset_t);
// SAFETY: a sigset_t is a plain bit array with no pointers.
unsafe impl Send for SigSet {}

fn receive_signals(set: SigSet, child_exited: &Notify, others_tx: &mpsc::UnboundedSender<i32>) {
    loop {
        // SAFETY: sigwaitinfo with a valid set and a null info pointer.
        let number = unsafe { libc::sigwaitinfo(&set.0, std::ptr::null_mut()) };
        if number < 0 {
            continue; // EINTR
        }
        if number == libc::SIGCHLD {
            child_exited.notify_one();
        } else if others_tx.send(number).is_err() {
            // The consumer is gone (op-bridge is exiting); keep draining so nothing piles up.
        }
    }
}

/// How many signals other than a stop [`wait_for_stop`] keeps for later; past this a flood
/// during start-up is dropped (and counted in the log), as the kernel itself keeps one
/// pending instance of each standard signal.
pub const START_QUEUE: usize = 64;

/// Waits for SIGTERM, SIGINT or SIGQUIT on `signals` (the stream of [`take_signals`]); the
/// start-up of `run` and `daemon` races it, so that a stop never waits for a slow resolution.
/// Every other signal is kept in `queued`, in arrival order, for the caller to handle once
/// start-up is over (`run` delivers them to the command as soon as it exists). A standard
/// signal already queued is not queued twice (the kernel coalesces them the same way);
/// real-time signals are all kept, up to [`START_QUEUE`].
pub async fn wait_for_stop(signals: &mut mpsc::UnboundedReceiver<i32>, queued: &mut Vec<i32>) -> i32 {
    let mut dropped = 0u64;
    while let Some(number) = signals.recv().await {
        if matches!(number, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT) {
            return number;
        }
        let standard = number < libc::SIGRTMIN();
        if (standard && queued.contains(&number)) || queued.len() >= START_QUEUE {
            dropped += 1;
            tracing::debug!("signal {number} during start-up: already queued or queue full ({dropped} dropped)");
            continue;
        }
        tracing::info!("signal {number} during start-up: queued until start-up is over");
        queued.push(number);
    }
    std::future::pending().await
}

/// The signal stream for after start-up: the `queued` signals first, then everything from
/// `signals`, in order.
pub fn requeue(queued: Vec<i32>, mut signals: mpsc::UnboundedReceiver<i32>) -> mpsc::UnboundedReceiver<i32> {
    if queued.is_empty() {
        return signals;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    for number in queued {
        let _ = tx.send(number);
    }
    tokio::spawn(async move {
        while let Some(number) = signals.recv().await {
            if tx.send(number).is_err() {
                break;
            }
        }
    });
    rx
}

/// The stream of every signal op-bridge receives except SIGCHLD (the reaper's), starting
/// with those that arrived before this call. There is one stream; the second call fails.
pub fn take_signals() -> Result<mpsc::UnboundedReceiver<i32>, SignalError> {
    let intake = INTAKE.get().ok_or(SignalError::NotInstalled)?;
    intake.others_rx.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or(SignalError::AlreadyTaken)
}

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
    by_pid: HashMap<i32, (watch::Sender<Option<Exit>>, watch::Sender<u64>)>,
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
    /// Counts the times the child was stopped (SIGTSTP, SIGSTOP, …): job control follows it.
    stops_rx: watch::Receiver<u64>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. Must run inside a tokio
    /// runtime, before any child is spawned.
    pub fn start() -> io::Result<Reaper> {
        let reaper = Reaper { waiters: Arc::default(), orphans: Arc::default() };
        let task = reaper.clone();
        match INTAKE.get() {
            Some(intake) => {
                let child_exited = intake.child_exited.clone();
                tokio::spawn(async move {
                    // Children that exited before the reaper started are collected on the first pass.
                    loop {
                        task.reap_all();
                        child_exited.notified().await;
                    }
                });
            }
            // Library use without the signal thread (unit tests): a SIGCHLD handler instead.
            None => {
                let mut sigchld = signal(SignalKind::child())?;
                tokio::spawn(async move {
                    loop {
                        task.reap_all();
                        if sigchld.recv().await.is_none() {
                            break;
                        }
                    }
                });
            }
        }
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
        let (stops_tx, stops_rx) = watch::channel(0);
        waiters.by_pid.insert(pid, (exit_tx, stops_tx));
        Ok((child, Process { pid: Pid::from_raw(pid), exit_rx, stops_rx }))
    }

    /// Number of children reaped that nobody was waiting for (orphans).
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }

    /// Collects every exited child without blocking.
    pub fn reap_all(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // WUNTRACED: a stopped child is reported too, so the init can follow job control.
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::Stopped(pid, _)) => {
                    if let Some((_, stops_tx)) = waiters.by_pid.get(&pid.as_raw()) {
                        stops_tx.send_modify(|stops| *stops += 1);
                    }
                    continue;
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!("waitpid failed: {err}");
                    return;
                }
            };
            match waiters.by_pid.remove(&pid.as_raw()) {
                Some((exit_tx, _)) => {
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

    /// Sends signal `number` to the child's group; any number the kernel knows, real-time
    /// signals included (nix's `Signal` has no names for those).
    pub fn signal_group_number(&self, number: i32) -> io::Result<()> {
        // SAFETY: kill(2) with a negative pid addresses the child's own process group.
        if unsafe { libc::kill(-self.pid.as_raw(), number) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Sends signal `number` to the child alone (ignored once it has been reaped).
    pub fn signal_number(&self, number: i32) {
        if self.try_exit().is_none() {
            // SAFETY: kill(2) on our own child, which has not been reaped, so its pid is not recycled.
            unsafe { libc::kill(self.pid.as_raw(), number) };
        }
    }

    /// The child's job-control stops, to wait on beside [`Process::wait`].
    pub fn stops(&self) -> Stops {
        let mut stops_rx = self.stops_rx.clone();
        stops_rx.mark_unchanged();
        Stops(stops_rx)
    }
}

/// Job-control stops of one child (see [`Process::stops`]).
pub struct Stops(watch::Receiver<u64>);

impl Stops {
    /// Waits until the child is stopped again; never returns once it has been reaped.
    pub async fn next(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Process {
    /// Whether no process is left in the child's group (signal 0 probes without sending).
    pub fn group_is_empty(&self) -> bool {
        matches!(nix::sys::signal::killpg(self.pid, None), Err(Errno::ESRCH))
    }
}
