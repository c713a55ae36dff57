//! Job control on a pseudo-terminal: an interactive bash runs `op-bridge run` as a job, and
//! Ctrl-Z and `fg` work for it as for any other program.

use std::process::Command;
use std::time::Duration;

use super::{TestDir, describe, run_with_timeout};

/// An interactive bash on a pseudo-terminal: runs `$JOB`, presses Ctrl-Z once the command
/// prints READY, expects the prompt back, then `fg` and a line for the command. Prints
/// `STEP True|False` for each step and, at the end or on the first failed step, the output.
const PTY_JOB_CONTROL: &str = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.environ["PS1"] = "PROMPT> "
    os.execvp("bash", ["bash", "--norc", "--noprofile", "-i"])
out = b""
def wait_for(needle, start, limit=20):
    global out
    deadline = time.time() + limit
    while time.time() < deadline:
        at = out.find(needle, start)
        if at >= 0:
            return at + len(needle)
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                out += os.read(fd, 4096)
            except OSError:
                return -1
    return -1
def kill_session():
    # Everything on this terminal: bash (the session leader), op-bridge and its command.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == pid:
                    os.kill(int(entry), 9)
            except OSError:
                pass
def report(step, at):
    print(step, at >= 0, flush=True)
    if at < 0:
        print("OUTPUT", repr(out.decode(errors="replace")), flush=True)
        kill_session()
        sys.exit(0)
    return at
at = report("PROMPT", wait_for(b"PROMPT> ", 0))
os.write(fd, os.environ["JOB"].encode() + b"\n")
at = report("READY", wait_for(b"READY\r\n", at))
time.sleep(0.3)
os.write(fd, b"\x1a")
at = report("STOPPED_PROMPT", wait_for(b"PROMPT> ", at))
os.write(fd, b"fg\n")
time.sleep(0.5)
os.write(fd, b"hello\n")
at = report("RESUMED", wait_for(b"GOT hello", at))
at = report("PROMPT_AGAIN", wait_for(b"PROMPT> ", at))
os.write(fd, b"echo EXIT=$?\n")
at = report("EXIT0", wait_for(b"EXIT=0", at))
os.write(fd, b"exit\n")
os.waitpid(pid, 0)
print("OUTPUT", repr(out.decode(errors="replace")), flush=True)
"#;

/// The steps [`PTY_JOB_CONTROL`] reports, in order.
const STEPS: [&str; 6] = ["PROMPT", "READY", "STOPPED_PROMPT", "RESUMED", "PROMPT_AGAIN", "EXIT0"];

/// Runs `job` (a command line that prints READY, reads a line and prints `GOT <line>`) as a
/// job of an interactive bash on a new pseudo-terminal, driven by `python` (python3 with the
/// environment the job needs; the script goes in `dir`), and checks every step: Ctrl-Z gives
/// the prompt back, `fg` resumes the command, which reads its line, and the job exits 0.
pub fn assert_ctrl_z_and_fg_work(dir: &TestDir, mut python: Command, job: &str) {
    std::fs::write(dir.join("job.py"), PTY_JOB_CONTROL).unwrap();
    python.arg(dir.join("job.py")).env("JOB", job);
    let output = run_with_timeout(python, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for step in STEPS {
        assert!(stdout.contains(&format!("{step} True")), "step {step} failed\n{}", describe(&output));
    }
}
