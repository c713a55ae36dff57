//! Spawning the supervised command: a clean signal state, its own process group (and the
//! terminal's foreground when there is one, so Ctrl-C reaches it), and the 126/127 exit codes
//! of a shell for a command that cannot be executed or found.
//!
//! The command starts as if op-bridge were not there: with the resource limits op-bridge was
//! started with (not its hardened ones, see [`save_start_limits`]) and in op-bridge's original
//! working directory, even after op-bridge itself has moved to `/` ([`leave_working_directory`]).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::privsep::{Identity, Switch};
use super::pty::Attach;
use crate::process::{Process, Reaper};

/// Why the command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("{program}: cannot execute: {source}")]
    NotExecutable { program: String, source: io::Error },
}

impl SpawnError {
    /// The shell's convention: 127 not found, 126 found but not executable.
    pub fn exit_code(&self) -> u8 {
        match self {
            SpawnError::NotFound(_) => crate::exit::NOT_FOUND,
            SpawnError::NotExecutable { .. } => crate::exit::NOT_EXECUTABLE,
        }
    }
}

/// Finds `program` on the child's PATH (a name with a '/' is used as given).
fn locate(program: &OsStr, env: &[(OsString, OsString)]) -> Result<PathBuf, SpawnError> {
    let shown = program.to_string_lossy().into_owned();
    if program.as_encoded_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let cwd = start_dir().unwrap_or_else(|| PathBuf::from("/"));
    which::which_in(program, Some(path), cwd).map_err(|_| SpawnError::NotFound(shown))
}

/// Every limit `getrlimit` knows on Linux (RLIMIT_CPU … RLIMIT_RTTIME).
const RESOURCE_LIMITS: libc::c_int = 16;

/// One saved limit: (resource, soft, hard).
type SavedLimit = (libc::c_int, libc::rlim_t, libc::rlim_t);

static START_LIMITS: OnceLock<Vec<SavedLimit>> = OnceLock::new();
static START_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Records op-bridge's resource limits as it was started, before hardening lowers some
/// (RLIMIT_CORE) and raises others (RLIMIT_NOFILE): every command gets these back.
pub fn save_start_limits() {
    let saved = (0..RESOURCE_LIMITS)
        .filter_map(|resource| {
            // SAFETY: getrlimit writes one rlimit struct; an unknown resource fails with EINVAL.
            unsafe {
                let mut limit: libc::rlimit = std::mem::zeroed();
                (libc::getrlimit(resource as _, &mut limit) == 0).then_some((resource, limit.rlim_cur, limit.rlim_max))
            }
        })
        .collect();
    let _ = START_LIMITS.set(saved);
}

/// Moves op-bridge to `/` so that it holds no reference to the directory it was started in
/// (a volume can then be unmounted), as dumb-init does; commands still start in that
/// directory. Call it after the first command has been spawned.
pub fn leave_working_directory() {
    if let Ok(dir) = std::env::current_dir() {
        let _ = START_DIR.set(dir);
    }
    if let Err(err) = std::env::set_current_dir("/") {
        tracing::warn!("cannot change to /: {err}");
    }
}

/// The directory commands start in: op-bridge's original working directory.
fn start_dir() -> Option<PathBuf> {
    START_DIR.get().cloned().or_else(|| std::env::current_dir().ok())
}

/// Whether op-bridge's process group is the foreground of a terminal on stdin: then the
/// command should get the terminal (see [`spawn`]).
pub fn owns_terminal() -> bool {
    // SAFETY: plain queries of file descriptor 0 and of our own process group.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 && libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp() }
}

/// Gives the terminal on stdin to process group `group` (op-bridge must be in its session;
/// SIGTTOU cannot stop op-bridge, every signal being blocked in it).
pub fn give_terminal(group: i32) {
    // SAFETY: tcsetpgrp on file descriptor 0; failure (no terminal) is harmless.
    unsafe { libc::tcsetpgrp(libc::STDIN_FILENO, group) };
}

/// Spawns `argv` with exactly `env`, through the reaper. With `terminal` (op-bridge owned the
/// terminal's foreground when the first command started), the command joins op-bridge's
/// session in a group of its own and takes the foreground, even from a predecessor that
/// still holds it after exiting; otherwise it gets a session of its own. With `user`
/// (`run --user`) the command runs as that user, with `HOME` from its passwd entry, and
/// with `lock_privileges` it can never gain privileges again (see [`Switch`]). With `pty`,
/// the command gets a session of its own on op-bridge's pty instead of the terminal.
pub fn spawn(
    reaper: &Reaper,
    argv: &[OsString],
    env: &[(OsString, OsString)],
    terminal: bool,
    user: Option<&Identity>,
    lock_privileges: bool,
    pty: Option<Attach>,
) -> Result<Process, SpawnError> {
    let program = argv.first().ok_or_else(|| SpawnError::NotFound(String::new()))?;
    let path = locate(program, env)?;
    let mut command = Command::new(&path);
    command.arg0(program).args(&argv[1..]).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(user) = user {
        // gosu's rule: HOME is the user's, whatever the environment said.
        command.env("HOME", &user.home);
    }
    if let Some(dir) = start_dir() {
        command.current_dir(dir);
    }
    let switch = user.and_then(|user| Switch::to(user, lock_privileges));
    let limits: &'static [SavedLimit] = START_LIMITS.get().map(Vec::as_slice).unwrap_or(&[]);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (setpgid, setsid, sigprocmask, tcsetpgrp, signal, getpid, setrlimit, prctl, setgroups,
    // setgid, setuid) on data prepared before the fork.
    unsafe {
        command.pre_exec(move || prepare_child(terminal, pty.as_ref(), limits, switch.as_ref()));
    }
    let shown = program.to_string_lossy().into_owned();
    match reaper.spawn(&mut command) {
        Ok((_child, process)) => Ok(process),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(SpawnError::NotFound(shown)),
        Err(source) => Err(SpawnError::NotExecutable { program: shown, source }),
    }
}

/// Linux's signal numbers (`_NSIG - 1`) and the size of its `sigset_t` in bytes.
const KERNEL_SIGNALS: libc::c_int = 64;
const KERNEL_SIGSET_BYTES: libc::size_t = 8;

/// Runs in the child between fork and exec.
fn prepare_child(
    terminal: bool,
    pty: Option<&Attach>,
    limits: &[SavedLimit],
    switch: Option<&Switch>,
) -> io::Result<()> {
    // SAFETY: plain syscalls on the current process; all async-signal-safe.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        // Block everything while process group and terminal change hands: tcsetpgrp from a
        // background group would otherwise stop us with SIGTTOU.
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        if let Some(pty) = pty {
            // A terminal of its own (`run --user` on a terminal): never root's.
            pty.apply()?;
        } else if terminal {
            // op-bridge owns the terminal: the child gets its own group and the foreground, so
            // the terminal's Ctrl-C, Ctrl-\ and window changes reach it. After a restart the
            // foreground still names the previous command's (dead) group, so it is not
            // compared with ours here.
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::tcsetpgrp(libc::STDIN_FILENO, libc::getpid());
        } else if libc::setsid() < 0 && libc::setpgid(0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Default dispositions: an ignored signal would stay ignored across exec. The raw
        // syscall, because glibc's signal() refuses its reserved signals 32 and 33, which
        // op-bridge may have inherited ignored. An all-zero kernel sigaction is SIG_DFL with
        // no flags and an empty mask whatever the architecture's field order.
        let default_action = [0u64; 4];
        for sig in 1..=KERNEL_SIGNALS {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default_action.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    KERNEL_SIGSET_BYTES,
                );
            }
        }
        // The limits op-bridge was started with (hardening lowers soft limits only, so
        // this never needs a privilege).
        for &(resource, soft, hard) in limits {
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            libc::setrlimit(resource as _, &limit);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    // Last, so everything above still runs with op-bridge's privileges (tcsetpgrp, setsid).
    if let Some(switch) = switch {
        switch.apply()?;
    }
    Ok(())
}
