//! Spawning the supervised command: a clean signal state, its own process group (and the
//! terminal's foreground when there is one, so Ctrl-C reaches it), and the 126/127 exit codes
//! of a shell for a command that cannot be executed or found.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

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
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    which::which_in(program, Some(path), cwd).map_err(|_| SpawnError::NotFound(shown))
}

/// Whether op-bridge's process group is the foreground of a terminal on stdin: then the
/// command should get the terminal (see [`spawn`]).
pub fn owns_terminal() -> bool {
    // SAFETY: plain queries of file descriptor 0 and of our own process group.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 && libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp() }
}

/// Spawns `argv` with exactly `env`, through the reaper. With `terminal` (op-bridge owned the
/// terminal's foreground when the first command started), the command joins op-bridge's
/// session in a group of its own and takes the foreground, even from a predecessor that
/// still holds it after exiting; otherwise it gets a session of its own.
pub fn spawn(
    reaper: &Reaper,
    argv: &[OsString],
    env: &[(OsString, OsString)],
    terminal: bool,
) -> Result<Process, SpawnError> {
    let program = argv.first().ok_or_else(|| SpawnError::NotFound(String::new()))?;
    let path = locate(program, env)?;
    let mut command = Command::new(&path);
    command.arg0(program).args(&argv[1..]).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (setpgid, setsid, sigprocmask, tcsetpgrp, signal, getpid).
    unsafe {
        command.pre_exec(move || prepare_child(terminal));
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
fn prepare_child(terminal: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on the current process; all async-signal-safe.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        // Block everything while process group and terminal change hands: tcsetpgrp from a
        // background group would otherwise stop us with SIGTTOU.
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        if terminal {
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
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    Ok(())
}
