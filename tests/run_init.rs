//! `op-bridge run` as a container init: exit codes, signal forwarding and the grace kill,
//! SIGHUP refresh, zombie reaping (as PID 1 of a pid namespace and as a subreaper), the
//! child's environment, Ctrl-C on a terminal, `--on-change`, and failing closed; and the
//! dumb-init parity of issue 12 (every signal, job control, cwd, rlimits, a quiet terminal,
//! no `op` needed when nothing is resolved, the stop budget).
//!
//! PID 1 tests run op-bridge inside `unshare --pid --fork --mount-proc` (needs root, as the
//! suite does here and in CI); signals go to op-bridge's host pid, which a namespace init
//! accepts for every signal it has a handler for. Child scripts find their test directory in
//! `$D` and the op-bridge binary in `$OPB`.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bound for anything that should happen promptly (never a pass/fail on speed).
const PROMPT: Duration = Duration::from_secs(20);

/// Where op-bridge runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// PID 1 of a fresh pid namespace (`unshare --pid --fork --mount-proc`).
    Pid1,
    /// A normal process, reaping orphans as a subreaper.
    Subreaper,
}

/// A running `op-bridge run`, directly or under unshare; everything is killed on drop.
struct Init {
    /// op-bridge itself, or the unshare process in front of it.
    process: Child,
    /// op-bridge's pid as seen from the host.
    pid: i32,
    mode: Mode,
    stderr_path: PathBuf,
    dir: PathBuf,
}

/// Writes DIR/vault.json and returns the `--backend` option pointing at it.
fn write_vault(dir: &TestDir, json: &str) -> String {
    let path = dir.join("vault.json");
    let tmp = dir.join("vault.json.tmp");
    std::fs::write(&tmp, json).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    format!("--backend=file:{}", path.display())
}

/// `op-bridge run --socket DIR/s.sock --backend file:DIR/vault.json`, with `$D` and `$OPB`
/// set for the child's scripts.
fn run_builder(dir: &TestDir, vault: &str) -> BrokerBuilder {
    let backend = write_vault(dir, vault);
    BrokerBuilder::new(dir, "run")
        .arg(backend)
        .env("D", dir.path().display().to_string())
        .env("OPB", bin().display().to_string())
}

fn sh(script: &str) -> Vec<String> {
    vec!["--".into(), "sh".into(), "-c".into(), script.into()]
}

fn bash(script: &str) -> Vec<String> {
    vec!["--".into(), "bash".into(), "-c".into(), script.into()]
}

/// `(state, ppid)` from /proc/PID/stat, if the process exists.
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; the fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Init {
    fn start(builder: BrokerBuilder, mode: Mode, dir: &TestDir) -> Init {
        Init::start_command(builder.command(), mode, dir)
    }

    /// Starts `direct` (an op-bridge command line) in `mode`.
    fn start_command(direct: Command, mode: Mode, dir: &TestDir) -> Init {
        let mut command = match mode {
            Mode::Subreaper => direct,
            Mode::Pid1 => {
                let mut command = Command::new("unshare");
                // --kill-child: if the test kills unshare, the namespace (and all in it) dies.
                if let Some(dir) = direct.get_current_dir() {
                    command.current_dir(dir);
                }
                command
                    .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                    .arg(direct.get_program())
                    .args(direct.get_args())
                    .env_clear();
                for (key, value) in direct.get_envs() {
                    if let Some(value) = value {
                        command.env(key, value);
                    }
                }
                command
            }
        };
        let stderr_path = dir.join(&format!("op-bridge-{}.stderr", fastrand::u32(..)));
        command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(stderr_path.with_extension("stdout")).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let process = command.spawn().unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut init = Init { pid: process.id() as i32, process, mode, stderr_path, dir: dir.path().to_path_buf() };
        if mode == Mode::Pid1 {
            // A short run may be over before its pid is seen; it is only needed for signals.
            let unshare = init.pid;
            let found = eventually(PROMPT, || match children_of(unshare).first() {
                Some(&pid) => {
                    init.pid = pid;
                    true
                }
                None => init.process.try_wait().ok().flatten().is_some(),
            });
            assert!(found, "unshare started no child\n{}", init.diagnostics());
        }
        init
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on op-bridge, which this test started and which is alive or a zombie
        // of ours (its pid cannot be recycled before we wait for it).
        let rc = unsafe { libc::kill(self.pid, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed\n{}", self.pid, self.diagnostics());
    }

    fn stderr(&self) -> String {
        read(&self.stderr_path)
    }

    /// op-bridge's stderr plus every small text file of the test directory.
    fn diagnostics(&self) -> String {
        let mut text = format!("mode: {:?}\n--- op-bridge stderr ---\n{}", self.mode, self.stderr());
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            paths.sort();
            for path in paths {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.ends_with(".stderr") || name.ends_with(".sock") || name.ends_with(".py") {
                    continue;
                }
                if let Ok(text_of) = std::fs::read_to_string(&path)
                    && text_of.len() < 4096
                {
                    text.push_str(&format!("--- {name} ---\n{text_of}\n"));
                }
            }
        }
        text
    }

    /// Waits for exit; panics with diagnostics after `limit`.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "op-bridge did not exit within {limit:?}\n{}", self.diagnostics());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit and returns the exit code (a signal death is a failure).
    fn code(&mut self, limit: Duration) -> i32 {
        let status = self.wait(limit);
        status.code().unwrap_or_else(|| panic!("op-bridge died of {:?}\n{}", status.signal(), self.diagnostics()))
    }

    /// Waits until DIR/name exists.
    fn await_file(&mut self, name: &str) -> String {
        let path = self.dir.join(name);
        let deadline = Instant::now() + PROMPT;
        loop {
            if path.exists() {
                return read(&path);
            }
            if let Some(status) = self.process.try_wait().unwrap() {
                panic!("op-bridge exited with {status} before {name} appeared\n{}", self.diagnostics());
            }
            assert!(Instant::now() < deadline, "{name} did not appear within {PROMPT:?}\n{}", self.diagnostics());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `check` holds for the content of DIR/name.
    fn await_content(&mut self, name: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let path = self.dir.join(name);
        let deadline = Instant::now() + PROMPT;
        loop {
            let text = read(&path);
            if check(&text) {
                return text;
            }
            if let Some(status) = self.process.try_wait().unwrap() {
                panic!("op-bridge exited with {status} while waiting for {what} in {name}\n{}", self.diagnostics());
            }
            assert!(Instant::now() < deadline, "no {what} in {name} within {PROMPT:?}\n{}", self.diagnostics());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("s.sock")
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        if self.process.try_wait().ok().flatten().is_some() {
            return;
        }
        // A subreaper's command would survive op-bridge's SIGKILL: kill its group first. As
        // PID 1, op-bridge's death takes the whole namespace with it.
        if self.mode == Mode::Subreaper {
            for child in children_of(self.pid) {
                // SAFETY: kill(2) on the process group led by op-bridge's child.
                unsafe { libc::kill(-child, libc::SIGKILL) };
            }
        }
        // SAFETY: kill(2) on a process we started and have not reaped (or its namespace init).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

const EMPTY_VAULT: &str = r#"{"vault":{"item":{"a":"one"}}}"#;

/// Runs CMD to completion in `mode` and returns op-bridge's exit code and diagnostics.
fn run_to_end(mode: Mode, command: Vec<String>, tag: &str) -> (i32, String) {
    let dir = TestDir::new(tag);
    std::fs::write(dir.join("noexec"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(dir.join("noexec"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let command: Vec<String> =
        command.into_iter().map(|a| a.replace("$NOEXEC", &dir.join("noexec").display().to_string())).collect();
    let mut init = Init::start(run_builder(&dir, EMPTY_VAULT).args(command), mode, &dir);
    let code = init.code(PROMPT);
    let mut diagnostics = init.diagnostics();
    if dir.join("s.sock").exists() {
        diagnostics.insert_str(0, "(socket file left behind) ");
        return (-1, diagnostics);
    }
    (code, diagnostics)
}

fn check_exit_codes(mode: Mode) {
    let cases: Vec<(Vec<String>, i32)> = vec![
        (sh("exit 0"), 0),
        (sh("exit 3"), 3),
        (sh("exit 255"), 255),
        (sh("kill -TERM $$; sleep 5"), 143),
        (sh("kill -KILL $$; sleep 5"), 137),
        (vec!["--".into(), "opb-no-such-command-xyz".into()], 127),
        (vec!["--".into(), "/nonexistent/dir/cmd".into()], 127),
        (vec!["--".into(), "$NOEXEC".into()], 126),
    ];
    let mut failures = Vec::new();
    for (command, expected) in cases {
        let shown = command[1..].join(" ");
        let (code, diagnostics) = run_to_end(mode, command, "codes");
        if code != expected {
            failures.push(format!("`{shown}`: expected {expected}, got {code}\n{diagnostics}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n=====\n"));
}

#[test]
fn exit_codes_pass_through_as_pid1() {
    check_exit_codes(Mode::Pid1);
}

#[test]
fn exit_codes_pass_through_as_subreaper() {
    check_exit_codes(Mode::Subreaper);
}

#[test]
fn sigterm_reaches_trapping_child_as_pid1() {
    let dir = TestDir::new("term");
    let script = r#"trap 'echo TERM >> "$D/trapped"; exit 42' TERM; touch "$D/ready"; while :; do sleep 0.05; done"#;
    let mut init = Init::start(run_builder(&dir, EMPTY_VAULT).args(sh(script)), Mode::Pid1, &dir);
    init.await_file("ready");
    init.signal(libc::SIGTERM);
    let code = init.code(PROMPT);
    assert_eq!(code, 42, "expected the trap's exit code\n{}", init.diagnostics());
    assert_eq!(read(&dir.join("trapped")), "TERM\n", "{}", init.diagnostics());
}

#[test]
fn child_ignoring_sigterm_is_killed_after_grace_as_pid1() {
    let dir = TestDir::new("grace");
    // An ignored signal stays ignored across exec, so `sleep` ignores it too.
    let script = r#"trap '' TERM; touch "$D/ready"; while :; do sleep 0.05; done"#;
    let builder = run_builder(&dir, EMPTY_VAULT).args(["--grace", "1s"]).args(sh(script));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    init.await_file("ready");
    let sent = Instant::now();
    init.signal(libc::SIGTERM);
    let code = init.code(Duration::from_secs(10));
    assert_eq!(code, 137, "expected SIGKILL after the grace period\n{}", init.diagnostics());
    // Not a speed check: SIGKILL must not come before the grace period.
    assert!(sent.elapsed() >= Duration::from_millis(900), "killed before the grace period\n{}", init.diagnostics());
}

#[test]
fn signals_reach_the_child_as_pid1() {
    let dir = TestDir::new("sigs");
    let script = r#"
        rec() { echo "$1" >> "$D/signals"; }
        trap 'rec INT' INT; trap 'rec QUIT' QUIT; trap 'rec USR1' USR1
        trap 'rec USR2' USR2; trap 'rec WINCH' WINCH
        touch "$D/ready"
        while [ ! -e "$D/done" ]; do sleep 0.05; done
        exit 7"#;
    // INT and QUIT start the grace timer: make it long enough not to matter.
    let builder = run_builder(&dir, EMPTY_VAULT).args(["--grace", "60s"]).args(bash(script));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    init.await_file("ready");
    let signals = [
        (libc::SIGUSR1, "USR1"),
        (libc::SIGUSR2, "USR2"),
        (libc::SIGWINCH, "WINCH"),
        (libc::SIGINT, "INT"),
        (libc::SIGQUIT, "QUIT"),
    ];
    for (number, name) in signals {
        init.signal(number);
        init.await_content("signals", name, |text| text.lines().any(|l| l == name));
    }
    std::fs::write(dir.join("done"), "").unwrap();
    let code = init.code(PROMPT);
    assert_eq!(code, 7, "{}", init.diagnostics());
    let seen: Vec<String> = read(&dir.join("signals")).lines().map(String::from).collect();
    assert_eq!(seen, ["USR1", "USR2", "WINCH", "INT", "QUIT"], "each signal exactly once\n{}", init.diagnostics());
}

/// SIGHUP with `--hup MODE`: whether the value is refreshed and whether the child sees it.
fn check_hup(hup: &str, refreshes: bool, forwards: bool) {
    let dir = TestDir::new("hup");
    let script = r#"
        trap 'echo HUP >> "$D/hup"' HUP
        touch "$D/ready"
        while [ ! -e "$D/go" ]; do sleep 0.05; done
        "$OPB" get A > "$D/got" 2> "$D/get.err"; echo $? > "$D/get.rc"
        exit 0"#;
    let builder = run_builder(&dir, r#"{"vault":{"item":{"a":"one"}}}"#)
        .env("OP_A_REF", "op://vault/item/a")
        .args(["--hup", hup])
        .args(sh(script));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    init.await_file("ready");
    write_vault(&dir, r#"{"vault":{"item":{"a":"two"}}}"#);
    init.signal(libc::SIGHUP);
    let expected = if refreshes { "two" } else { "one" };
    if refreshes {
        let refreshed = eventually(PROMPT, || client(&init.socket(), &["get", "A"], None).stdout == b"two");
        assert!(refreshed, "SIGHUP did not re-resolve A\n{}", init.diagnostics());
    }
    if forwards {
        init.await_file("hup");
    } else {
        // The child would have seen a forwarded SIGHUP before the refresh finished (op-bridge
        // forwards synchronously); give a late one a moment anyway.
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::write(dir.join("go"), "").unwrap();
    let code = init.code(PROMPT);
    assert_eq!(code, 0, "{}", init.diagnostics());
    assert_eq!(read(&dir.join("get.rc")).trim(), "0", "op-bridge get failed inside the child\n{}", init.diagnostics());
    assert_eq!(read(&dir.join("got")), expected, "value seen by the child\n{}", init.diagnostics());
    assert_eq!(dir.join("hup").exists(), forwards, "SIGHUP forwarded to the child?\n{}", init.diagnostics());
}

#[test]
fn sighup_refreshes_and_is_not_forwarded_as_pid1() {
    check_hup("refresh", true, false);
}

#[test]
fn sighup_forwarded_with_hup_forward_as_pid1() {
    check_hup("forward", false, true);
}

#[test]
fn sighup_refreshes_and_forwards_with_hup_both_as_pid1() {
    check_hup("both", true, true);
}

#[test]
fn thousand_orphans_leave_no_zombie_as_pid1() {
    let dir = TestDir::new("orphans");
    // Each `(sleep 0.01 &)` subshell exits at once, so its sleep is re-parented to PID 1.
    // Then the child counts zombies in the namespace until none are left (or 10 s pass).
    let script = r#"
        i=0
        while [ $i -lt 1000 ]; do (sleep 0.01 &); i=$((i+1)); done
        n=0
        while :; do
            z=$(cat /proc/[0-9]*/stat 2>/dev/null | sed -n 's/^.*) \(.\) .*$/\1/p' | grep -c Z)
            [ "$z" -eq 0 ] && break
            n=$((n+1)); [ $n -ge 100 ] && break
            sleep 0.1
        done
        echo "$z" > "$D/zombies"
        echo $(cat /proc/[0-9]*/stat 2>/dev/null | wc -l) > "$D/processes"
        exit 5"#;
    let builder = run_builder(&dir, EMPTY_VAULT).args(["--log-level", "debug"]).args(sh(script));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    let code = init.code(Duration::from_secs(50));
    assert_eq!(read(&dir.join("zombies")).trim(), "0", "zombies left in the namespace\n{}", init.diagnostics());
    assert_eq!(code, 5, "exit code of the child\n{}", init.diagnostics());
}

#[test]
fn thousand_orphans_leave_no_zombie_as_subreaper() {
    let dir = TestDir::new("orphans-sr");
    // A last, long-lived orphan shows where the others went.
    let script = r#"
        i=0
        while [ $i -lt 1000 ]; do (sleep 0.01 &); i=$((i+1)); done
        (sleep 60 & echo $! > "$D/sentinel.tmp"; mv "$D/sentinel.tmp" "$D/sentinel.pid")
        touch "$D/spawned"
        while [ ! -e "$D/done" ]; do sleep 0.05; done
        exit 6"#;
    let mut init = Init::start(run_builder(&dir, EMPTY_VAULT).args(sh(script)), Mode::Subreaper, &dir);
    init.await_file("spawned");
    let sentinel: i32 = read(&dir.join("sentinel.pid")).trim().parse().expect("sentinel.pid");
    let adopted = eventually(PROMPT, || proc_state(sentinel).is_some_and(|(_, ppid)| ppid == init.pid));
    assert!(adopted, "orphans are not re-parented to op-bridge: {:?}\n{}", proc_state(sentinel), init.diagnostics());
    // Zombies whose parent is op-bridge: orphans it has not reaped.
    let zombies = |pid: i32| -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&p| proc_state(p).is_some_and(|(state, ppid)| state == 'Z' && ppid == pid))
            .collect()
    };
    let clean = eventually(PROMPT, || zombies(init.pid).is_empty());
    let left = zombies(init.pid);
    assert!(
        clean,
        "{} zombies of op-bridge left, e.g. {:?}\n{}",
        left.len(),
        &left[..left.len().min(10)],
        init.diagnostics()
    );
    std::fs::write(dir.join("done"), "").unwrap();
    assert_eq!(init.code(PROMPT), 6, "{}", init.diagnostics());
}

#[test]
fn orphans_are_reparented_to_the_subreaper_and_reaped() {
    let dir = TestDir::new("subreaper");
    let script = r#"
        (sh -c 'echo $$ > "$D/orphan.tmp"; mv "$D/orphan.tmp" "$D/orphan.pid"; while [ ! -e "$D/release" ]; do sleep 0.05; done' &)
        while [ ! -e "$D/done" ]; do sleep 0.05; done
        exit 0"#;
    let mut init = Init::start(run_builder(&dir, EMPTY_VAULT).args(sh(script)), Mode::Subreaper, &dir);
    let orphan: i32 = init.await_file("orphan.pid").trim().parse().unwrap();
    let parent = eventually(PROMPT, || proc_state(orphan).is_some_and(|(_, ppid)| ppid == init.pid));
    assert!(
        parent,
        "orphan {orphan} has parent {:?}, not op-bridge {}\n{}",
        proc_state(orphan),
        init.pid,
        init.diagnostics()
    );
    // PPid in /proc/PID/status says the same.
    let status = read(Path::new(&format!("/proc/{orphan}/status")));
    assert!(status.lines().any(|l| l == format!("PPid:\t{}", init.pid)), "{status}\n{}", init.diagnostics());
    std::fs::write(dir.join("release"), "").unwrap();
    // Gone, not a zombie (a recycled pid would have another parent).
    let reaped = eventually(PROMPT, || proc_state(orphan).is_none_or(|(_, ppid)| ppid != init.pid));
    assert!(reaped, "orphan {orphan} not reaped: {:?}\n{}", proc_state(orphan), init.diagnostics());
    std::fs::write(dir.join("done"), "").unwrap();
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
}

const ENV_VAULT: &str = r#"{"vault":{"item":{"key":"k-secret-1","pass":"p-secret-2","other":"o-secret-3"}}}"#;

/// Runs `env` as the command with three refs and both tokens; returns its environment.
fn child_env(options: &[&str]) -> (Vec<(String, String)>, String, PathBuf) {
    let dir = TestDir::new("env");
    let builder = run_builder(&dir, ENV_VAULT)
        .env("OP_API_KEY_REF", "op://vault/item/key")
        .env("OP_DB_PASS_REF", "op://vault/item/pass")
        .env("OP_OTHER_REF", "op://vault/item/other")
        .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_fake_token")
        .env("OP_CONNECT_TOKEN", "connect_fake_token")
        .env("OP_SESSION_my_team", "session_fake_token")
        .env("KEEP_ME", "kept")
        .args(options.iter().copied())
        .args(sh(r#"env > "$D/env.tmp" && mv "$D/env.tmp" "$D/env.txt""#));
    let socket = builder.socket().to_path_buf();
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    let code = init.code(PROMPT);
    let diagnostics = init.diagnostics();
    assert_eq!(code, 0, "{diagnostics}");
    let env = read(&dir.join("env.txt"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (env, diagnostics, socket)
}

fn lookup<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

const HIDDEN: &[&str] = &[
    "OP_SERVICE_ACCOUNT_TOKEN",
    "OP_CONNECT_TOKEN",
    "OP_SESSION_my_team",
    "OP_API_KEY_REF",
    "OP_DB_PASS_REF",
    "OP_OTHER_REF",
];

#[test]
fn exports_by_name_and_strips_tokens() {
    let (env, diag, socket) = child_env(&["--export", "API_KEY", "--export", "DB_PASS=DATABASE_PASSWORD"]);
    assert_eq!(lookup(&env, "API_KEY"), Some("k-secret-1"), "{env:?}\n{diag}");
    assert_eq!(lookup(&env, "DATABASE_PASSWORD"), Some("p-secret-2"), "{env:?}\n{diag}");
    assert_eq!(lookup(&env, "DB_PASS"), None, "exported under its VAR only\n{env:?}");
    assert_eq!(lookup(&env, "OTHER"), None, "not exported\n{env:?}");
    assert!(!env.iter().any(|(_, v)| v.contains("o-secret-3")), "unexported value leaked\n{env:?}");
    for key in HIDDEN {
        assert_eq!(lookup(&env, key), None, "{key} must not reach the child\n{env:?}");
    }
    assert_eq!(lookup(&env, "KEEP_ME"), Some("kept"), "{env:?}");
    assert_eq!(lookup(&env, "OP_BRIDGE_SOCKET"), Some(socket.to_str().unwrap()), "{env:?}\n{diag}");
}

#[test]
fn export_all_exports_every_secret() {
    let (env, diag, socket) = child_env(&["--export-all"]);
    assert_eq!(lookup(&env, "API_KEY"), Some("k-secret-1"), "{env:?}\n{diag}");
    assert_eq!(lookup(&env, "DB_PASS"), Some("p-secret-2"), "{env:?}\n{diag}");
    assert_eq!(lookup(&env, "OTHER"), Some("o-secret-3"), "{env:?}\n{diag}");
    for key in HIDDEN {
        assert_eq!(lookup(&env, key), None, "{key} must not reach the child\n{env:?}");
    }
    assert_eq!(lookup(&env, "OP_BRIDGE_SOCKET"), Some(socket.to_str().unwrap()), "{env:?}");
}

#[test]
fn keep_token_keeps_token_and_refs() {
    let (env, diag, socket) = child_env(&["--keep-token", "--export", "API_KEY"]);
    assert_eq!(lookup(&env, "API_KEY"), Some("k-secret-1"), "{env:?}\n{diag}");
    assert_eq!(lookup(&env, "OP_SERVICE_ACCOUNT_TOKEN"), Some("ops_fake_token"), "{env:?}\n{diag}");
    assert_eq!(lookup(&env, "OP_CONNECT_TOKEN"), Some("connect_fake_token"), "{env:?}");
    assert_eq!(lookup(&env, "OP_SESSION_my_team"), Some("session_fake_token"), "{env:?}");
    assert_eq!(lookup(&env, "OP_API_KEY_REF"), Some("op://vault/item/key"), "{env:?}");
    assert_eq!(lookup(&env, "OP_OTHER_REF"), Some("op://vault/item/other"), "{env:?}");
    assert_eq!(lookup(&env, "OTHER"), None, "{env:?}");
    assert_eq!(lookup(&env, "OP_BRIDGE_SOCKET"), Some(socket.to_str().unwrap()), "{env:?}");
}

/// Drives `op-bridge run … -- sleep 100` on a pseudo-terminal (argv: the command line),
/// types Ctrl-C once the command owns the terminal's foreground, and prints the exit status.
/// With PTY_BETWEEN set, that shell command runs first (it makes op-bridge restart the
/// command), and Ctrl-C waits for the restarted command to own the foreground.
const PTY_DRIVER: &str = r#"
import os, pty, select, subprocess, sys, time
argv = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
out = b""
def drain(timeout):
    global out
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return True
    try:
        data = os.read(fd, 4096)
    except OSError:
        return False
    out += data
    return bool(data)
def await_foreground(log_word, old, limit):
    deadline = time.time() + limit
    while time.time() < deadline:
        if not drain(0.05):
            return None
        try:
            group = os.tcgetpgrp(fd)
        except OSError:
            continue
        # The foreground group changes from op-bridge's to the command's own.
        if group != pid and group != old and log_word in out:
            return group
    return None
first = await_foreground(b"started", None, 20)
print("FOREGROUND", first is not None, flush=True)
between = os.environ.get("PTY_BETWEEN")
if first is not None and between:
    done = subprocess.run(["sh", "-c", between], capture_output=True)
    print("BETWEEN", done.returncode, done.stdout, done.stderr, flush=True)
    second = await_foreground(b"restarted", first, 10)
    print("FOREGROUND AFTER RESTART", second is not None, flush=True)
os.write(fd, b"\x03")
deadline = time.time() + 10
status = None
while time.time() < deadline:
    drain(0.05)
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = os.waitstatus_to_exitcode(st)
        break
if status is None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print("OUTPUT", out.decode(errors="replace"), flush=True)
print("STATUS", status, flush=True)
"#;

/// Ctrl-C on a terminal ends `op-bridge run -- sleep 100` with 130; with `restart`, after
/// a changing refresh has restarted the command.
fn check_ctrl_c(mode: Mode, restart: bool) {
    let dir = TestDir::new("pty");
    std::fs::write(dir.join("drive_pty.py"), PTY_DRIVER).unwrap();
    let backend = write_vault(&dir, EMPTY_VAULT);
    let mut cmd = Command::new("python3");
    cmd.arg(dir.join("drive_pty.py"));
    if mode == Mode::Pid1 {
        cmd.args(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]);
    }
    cmd.arg(bin())
        .args(["run", "--socket"])
        .arg(dir.join("s.sock"))
        .arg(backend)
        .args(["--grace", "30s"])
        // The driver follows the "started" log line (run logs warnings only by default).
        .args(["--log-level", "info"])
        .env_remove("OP_BRIDGE_SOCKET");
    if restart {
        std::fs::write(dir.join("vault2.json"), r#"{"vault":{"item":{"a":"two"}}}"#).unwrap();
        let between = format!(
            "mv {dir}/vault2.json {dir}/vault.json && {bin} refresh --socket {dir}/s.sock",
            dir = dir.path().display(),
            bin = bin().display()
        );
        cmd.args(["--export", "A", "--on-change", "restart"])
            .env("OP_A_REF", "op://vault/item/a")
            .env("PTY_BETWEEN", between);
    }
    cmd.args(["--", "sleep", "100"]);
    let output = run_with_timeout(cmd, Duration::from_secs(50));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "pty driver failed\n{}", describe(&output));
    assert!(
        stdout.contains("FOREGROUND True"),
        "the command never got the terminal's foreground\n{}",
        describe(&output)
    );
    if restart {
        assert!(
            stdout.contains("FOREGROUND AFTER RESTART True"),
            "the restarted command did not get the terminal's foreground\n{}",
            describe(&output)
        );
    }
    assert!(stdout.contains("STATUS 130\n"), "Ctrl-C should end op-bridge with 130\n{}", describe(&output));
}

#[test]
fn ctrl_c_on_a_terminal_exits_130() {
    check_ctrl_c(Mode::Subreaper, false);
}

#[test]
fn ctrl_c_on_a_terminal_exits_130_as_pid1() {
    check_ctrl_c(Mode::Pid1, false);
}

#[test]
fn ctrl_c_on_a_terminal_works_after_a_restart_as_pid1() {
    check_ctrl_c(Mode::Pid1, true);
}

fn refresh(init: &Init) {
    let out = client(&init.socket(), &["refresh"], None);
    assert!(out.status.success(), "refresh failed: {}\n{}", describe(&out), init.diagnostics());
}

/// `start PID VALUE` / `stop PID` lines of the restart log.
fn restart_log(dir: &TestDir) -> Vec<(String, String, String)> {
    read(&dir.join("log"))
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let word = parts.next().unwrap_or_default().to_string();
            let pid = parts.next().unwrap_or_default().to_string();
            (word, pid, parts.next().unwrap_or_default().to_string())
        })
        .collect()
}

fn count(dir: &TestDir, word: &str) -> usize {
    restart_log(dir).iter().filter(|(w, _, _)| w == word).count()
}

#[test]
fn on_change_restart_restarts_once_per_changing_refresh_as_pid1() {
    let dir = TestDir::new("restart");
    let vault = |a: &str, b: &str| format!(r#"{{"vault":{{"item":{{"a":"{a}","b":"{b}"}}}}}}"#);
    // The trap is set before "start" is written, so a stop always finds it.
    let script = r#"
        trap 'echo "stop $$" >> "$D/log"; exit 0' TERM
        echo "start $$ $A" >> "$D/log"
        while :; do sleep 0.05; done"#;
    let builder = run_builder(&dir, &vault("v0", "b0"))
        .env("OP_A_REF", "op://vault/item/a")
        .env("OP_B_REF", "op://vault/item/b")
        .args(["--export", "A", "--on-change", "restart", "--grace", "10s"])
        // Several REFRESH in a row must each reach the backend (clients are rate-limited).
        .args(["--refresh-min-interval", "0"])
        .args(sh(script));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    init.await_content("log", "first start", |t| t.lines().count() == 1);
    const CHANGES: usize = 3;
    for i in 1..=CHANGES {
        write_vault(&dir, &vault(&format!("v{i}"), "b0"));
        refresh(&init);
        init.await_content("log", &format!("start number {}", i + 1), |_| count(&dir, "start") == i + 1);
    }
    // A refresh that changes nothing exported: nothing happens.
    refresh(&init);
    write_vault(&dir, &vault(&format!("v{CHANGES}"), "b1"));
    refresh(&init);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(count(&dir, "start"), CHANGES + 1, "unchanged exports restarted the child\n{}", init.diagnostics());

    init.signal(libc::SIGTERM);
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
    let log = restart_log(&dir);
    assert_eq!(log.len(), 2 * (CHANGES + 1), "{log:?}\n{}", init.diagnostics());
    for (i, pair) in log.chunks(2).enumerate() {
        let (start, stop) = (&pair[0], &pair[1]);
        assert!(
            start.0 == "start" && stop.0 == "stop" && start.1 == stop.1,
            "starts and stops must alternate (one child at a time): {log:?}\n{}",
            init.diagnostics()
        );
        assert_eq!(start.2, format!("v{i}"), "child {i} got the value of its refresh: {log:?}");
    }
}

#[test]
fn on_change_signal_sends_the_signal_instead_as_pid1() {
    let dir = TestDir::new("onsig");
    let vault = |a: &str, b: &str| format!(r#"{{"vault":{{"item":{{"a":"{a}","b":"{b}"}}}}}}"#);
    let script = r#"
        trap 'echo "usr1 $$" >> "$D/log"' USR1
        trap 'echo "stop $$" >> "$D/log"; exit 0' TERM
        echo "start $$" >> "$D/log"
        while :; do sleep 0.05; done"#;
    let builder = run_builder(&dir, &vault("v0", "b0"))
        .env("OP_A_REF", "op://vault/item/a")
        .env("OP_B_REF", "op://vault/item/b")
        .args(["--export", "A", "--on-change", "signal:USR1"])
        .args(sh(script));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    init.await_content("log", "start", |t| t.lines().count() == 1);
    write_vault(&dir, &vault("v1", "b0"));
    refresh(&init);
    init.await_content("log", "usr1", |_| count(&dir, "usr1") == 1);
    // Unchanged exports: no signal.
    refresh(&init);
    write_vault(&dir, &vault("v1", "b1"));
    refresh(&init);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(count(&dir, "usr1"), 1, "{}", init.diagnostics());
    assert_eq!(count(&dir, "start"), 1, "signal:USR1 must not restart\n{}", init.diagnostics());
    init.signal(libc::SIGTERM);
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
}

#[test]
fn unresolvable_required_secrets_fail_closed_as_pid1() {
    let dir = TestDir::new("missing");
    let builder = run_builder(&dir, r#"{"vault":{"item":{"a":"good-value"}}}"#)
        .env("OP_GOOD_REF", "op://vault/item/a")
        .env("OP_MISSING_FIELD_REF", "op://vault/item/nope")
        .env("OP_MISSING_ITEM_REF", "op://vault/noitem/x")
        .args(sh(r#"touch "$D/started""#));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    let code = init.code(PROMPT);
    let stderr = init.stderr();
    assert_eq!(code, 69, "{}", init.diagnostics());
    assert!(!dir.join("started").exists(), "the child was started\n{}", init.diagnostics());
    for name in ["MISSING_FIELD", "MISSING_ITEM"] {
        assert!(stderr.contains(name), "{name} not named in stderr\n{}", init.diagnostics());
    }
    assert!(!stderr.contains("good-value"), "a secret value in stderr\n{stderr}");
    assert!(!dir.join("s.sock").exists(), "socket left behind\n{}", init.diagnostics());
}

#[test]
fn non_utf8_environment_passes_through_as_pid1() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = TestDir::new("bytes");
    let mut command = run_builder(&dir, EMPTY_VAULT)
        .env("OP_A_REF", "op://vault/item/a")
        .args(["--export", "A"])
        .args(sh(r#"printf '%s' "$RAW" > "$D/raw"; printf '%s' "$A" > "$D/a""#))
        .command();
    // Containers do carry such variables; they are not op-bridge's business.
    command.env("RAW", OsStr::from_bytes(b"caf\xe9"));
    let mut init = Init::start_command(command, Mode::Pid1, &dir);
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
    assert_eq!(std::fs::read(dir.join("raw")).unwrap_or_default(), b"caf\xe9", "{}", init.diagnostics());
    assert_eq!(read(&dir.join("a")), "one", "{}", init.diagnostics());
}

#[test]
fn restart_keeps_the_command_when_an_exported_secret_disappears_as_pid1() {
    let dir = TestDir::new("dropped");
    let script = r#"
        trap 'echo "stop $$" >> "$D/log"; exit 0' TERM
        echo "start $$ $A" >> "$D/log"
        while :; do sleep 0.05; done"#;
    let builder = run_builder(&dir, r#"{"vault":{"item":{"a":"v0"}}}"#)
        .env("OP_A_REF", "op://vault/item/a")
        .args(["--export", "A", "--on-change", "restart", "--grace", "10s"])
        // Several REFRESH in a row must each reach the backend (clients are rate-limited).
        .args(["--refresh-min-interval", "0"])
        .args(sh(script));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    init.await_content("log", "first start", |t| t.lines().count() == 1);
    // The item's field is deleted: a restart could not give the command its variable.
    write_vault(&dir, r#"{"vault":{"item":{"b":"x"}}}"#);
    refresh(&init);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(init.process.try_wait().unwrap().is_none(), "op-bridge exited\n{}", init.diagnostics());
    assert_eq!(restart_log(&dir).len(), 1, "the command was stopped\n{}", init.diagnostics());
    // Once the secret is back (changed), the restart happens.
    write_vault(&dir, r#"{"vault":{"item":{"a":"v1"}}}"#);
    refresh(&init);
    init.await_content("log", "restart", |_| count(&dir, "start") == 2);
    init.signal(libc::SIGTERM);
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
    let log = restart_log(&dir);
    assert_eq!(log.iter().map(|l| l.2.as_str()).collect::<Vec<_>>(), ["v0", "", "v1", ""], "{log:?}");
}

#[test]
fn child_gets_clean_signal_state_and_its_own_session() {
    use std::os::unix::process::CommandExt;
    let dir = TestDir::new("sigstate");
    let mut command =
        run_builder(&dir, EMPTY_VAULT).args(["--", "cat", "/proc/self/status", "/proc/self/stat"]).command();
    // op-bridge starts with signals blocked and ignored (none of them ones it handles); the
    // command must not inherit either.
    // SAFETY: only sigprocmask and signal, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGRTMIN() + 3);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGRTMIN() + 4, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut init = Init::start_command(command, Mode::Subreaper, &dir);
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
    let out = read(&init.stderr_path.with_extension("stdout"));
    for field in ["SigBlk", "SigIgn"] {
        let line = out.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap_or_default();
        assert_eq!(line, format!("{field}:\t0000000000000000"), "{out}\n{}", init.diagnostics());
    }
    // /proc/self/stat: pid (comm) state ppid pgrp session …
    let stat = out.lines().last().unwrap_or_default();
    let fields: Vec<&str> = stat[stat.rfind(')').map_or(0, |i| i + 2)..].split_whitespace().collect();
    let pid = stat.split_whitespace().next().unwrap_or_default();
    assert!(fields.len() > 3, "{out}");
    assert_eq!(
        (fields[1], fields[2], fields[3]),
        (init.pid.to_string().as_str(), pid, pid),
        "ppid, pgrp, session: {stat}"
    );
}

#[test]
fn group_members_left_after_the_child_are_killed_after_grace() {
    let dir = TestDir::new("leftover");
    // The background sleep inherits the ignored SIGTERM and outlives the main command.
    let script = r#"trap '' TERM; (sleep 300 & echo $! > "$D/left.tmp"; mv "$D/left.tmp" "$D/left.pid"); exit 4"#;
    let builder = run_builder(&dir, EMPTY_VAULT).args(["--grace", "1s"]).args(sh(script));
    let mut init = Init::start(builder, Mode::Subreaper, &dir);
    let code = init.code(Duration::from_secs(15));
    assert_eq!(code, 4, "{}", init.diagnostics());
    let left: i32 = read(&dir.join("left.pid")).trim().parse().expect("left.pid");
    // Killed: gone, or a zombie waiting for whoever inherited it after op-bridge exited.
    let killed = eventually(PROMPT, || proc_state(left).is_none_or(|(state, _)| state == 'Z'));
    assert!(killed, "leftover {left} still running: {:?}\n{}", proc_state(left), init.diagnostics());
}

// ---- dumb-init parity (issue 12) ------------------------------------------------------

/// A bash loop that records every signal it is sent by number and waits without any child
/// process (an external `sleep` in the group would be stopped by SIGTSTP or killed by the
/// rest): `read -t` on a FIFO nobody writes.
const RECORD_EVERY_SIGNAL: &str = r#"
    for s in $SIGNALS; do trap "echo $s >> \"\$D/signals\"" "$s"; done
    mkfifo "$D/never"; exec 9<>"$D/never"
    touch "$D/ready"
    while [ ! -e "$D/done" ]; do read -t 0.05 -u 9 || :; done
    exit 7"#;

#[test]
fn every_signal_reaches_the_child_as_pid1() {
    let dir = TestDir::new("allsigs");
    // 1–31 except KILL and STOP (uncatchable) and CHLD (the reaper's), and a real-time one.
    let rt = libc::SIGRTMIN() + 6;
    let numbers: Vec<i32> =
        (1..=31).filter(|&n| ![libc::SIGKILL, libc::SIGSTOP, libc::SIGCHLD].contains(&n)).chain([rt]).collect();
    let list = numbers.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ");
    // --hup forward: SIGHUP is the child's too. INT, QUIT and TERM start the stop: a long grace.
    let builder = run_builder(&dir, EMPTY_VAULT)
        .args(["--hup", "forward", "--grace", "120s"])
        .env("SIGNALS", list)
        .args(bash(RECORD_EVERY_SIGNAL));
    let mut init = Init::start(builder, Mode::Pid1, &dir);
    init.await_file("ready");
    for &number in &numbers {
        init.signal(number);
        let word = number.to_string();
        init.await_content("signals", &format!("signal {number}"), |text| text.lines().any(|l| l == word));
    }
    std::fs::write(dir.join("done"), "").unwrap();
    assert_eq!(init.code(PROMPT), 7, "{}", init.diagnostics());
    let seen: Vec<i32> = read(&dir.join("signals")).lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(seen, numbers, "each signal exactly once, in order\n{}", init.diagnostics());
}

#[test]
fn op_bridge_leaves_its_working_directory_as_pid1() {
    let dir = TestDir::new("cwd");
    let start = dir.join("start");
    std::fs::create_dir(&start).unwrap();
    let script = r#"pwd > "$D/pwd.tmp"; mv "$D/pwd.tmp" "$D/pwd"; while [ ! -e "$D/done" ]; do sleep 0.05; done"#;
    let mut command = run_builder(&dir, EMPTY_VAULT).args(sh(script)).command();
    command.current_dir(&start);
    let mut init = Init::start_command(command, Mode::Pid1, &dir);
    let pwd = init.await_file("pwd");
    assert_eq!(pwd.trim(), start.to_str().unwrap(), "the command starts where op-bridge was started");
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", init.pid)).unwrap();
    std::fs::write(dir.join("done"), "").unwrap();
    assert_eq!(cwd, Path::new("/"), "op-bridge must hold no reference to its start directory\n{}", init.diagnostics());
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
}

/// Runs argv on a new pseudo-terminal, types `PTY_INPUT` (Python escapes) and prints
/// everything the terminal shows until the process exits.
const PTY_SHOW: &str = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
os.write(fd, os.environ["PTY_INPUT"].encode().decode("unicode_escape").encode())
out = b""
deadline = time.time() + 30
while time.time() < deadline:
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        out += data
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print("OUTPUT", repr(out.decode(errors="replace")), flush=True)
print("STATUS", status, flush=True)
"#;

#[test]
fn a_terminal_shows_only_the_programs_output() {
    let dir = TestDir::new("tac");
    std::fs::write(dir.join("show.py"), PTY_SHOW).unwrap();
    let backend = write_vault(&dir, EMPTY_VAULT);
    let mut cmd = Command::new("python3");
    cmd.arg(dir.join("show.py"))
        .arg(bin())
        .args(["run", "--socket"])
        .arg(dir.join("s.sock"))
        .arg(backend)
        .args(["--", "tac"])
        .env_remove("OP_BRIDGE_SOCKET")
        .env_remove("OP_BRIDGE_LOG_LEVEL")
        .env("PTY_INPUT", r"one\ntwo\n\x04");
    let output = run_with_timeout(cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("STATUS 0\n"), "{}", describe(&output));
    let shown = stdout.lines().find_map(|l| l.strip_prefix("OUTPUT ")).unwrap_or_default();
    // The terminal echoes what was typed, then tac prints it reversed; nothing else.
    assert_eq!(shown, r"'one\r\ntwo\r\ntwo\r\none\r\n'", "{}", describe(&output));
}

/// Ctrl-Z on the terminal gives the shell its prompt back; `fg` resumes the command.
#[test]
fn ctrl_z_returns_the_prompt_and_fg_resumes() {
    let dir = TestDir::new("ctrlz");
    let backend = write_vault(&dir, EMPTY_VAULT);
    let job = format!(
        r#"{bin} run --socket {dir}/s.sock {backend} -- sh -c 'echo READY; read x; echo "GOT $x"'"#,
        bin = bin().display(),
        dir = dir.path().display()
    );
    let mut python = Command::new("python3");
    python.env_remove("OP_BRIDGE_SOCKET");
    terminal::assert_ctrl_z_and_fg_work(&dir, python, &job);
}

#[test]
fn nothing_to_resolve_needs_no_op_cli() {
    let dir = TestDir::new("noop");
    let path = "/usr/sbin:/usr/bin:/sbin:/bin";
    assert!(which_in_path("op", path).is_none(), "this test needs a PATH without op");
    let builder = BrokerBuilder::new(&dir, "run").env("PATH", path).args(sh("exit 3"));
    let output = builder.output();
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
}

fn which_in_path(program: &str, path: &str) -> Option<PathBuf> {
    path.split(':').map(|d| Path::new(d).join(program)).find(|p| p.exists())
}

/// The command's `ulimit -Sc` and `ulimit -Hc` when op-bridge is started (as `uid`, if given)
/// with a core limit of 1024/2048 KiB.
fn child_core_limits(uid: Option<u32>) -> (String, String) {
    use std::os::unix::process::CommandExt;
    let dir = TestDir::new("rlim");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = r#"echo "$(ulimit -Sc) $(ulimit -Hc)" > "$D/core.tmp"; mv "$D/core.tmp" "$D/core""#;
    let direct = run_builder(&dir, EMPTY_VAULT).args(bash(script)).command();
    let mut command = match uid {
        None => direct,
        Some(uid) => {
            let mut wrapped = Command::new("setpriv");
            wrapped
                .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
                .arg(direct.get_program())
                .args(direct.get_args())
                .env_clear()
                .envs(direct.get_envs().filter_map(|(k, v)| Some((k, v?))));
            wrapped
        }
    };
    // SAFETY: setrlimit only, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 1024 * 1024, rlim_max: 2048 * 1024 };
            libc::setrlimit(libc::RLIMIT_CORE, &limit);
            Ok(())
        });
    }
    let mut init = Init::start_command(command, Mode::Subreaper, &dir);
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
    let text = read(&dir.join("core"));
    let mut words = text.split_whitespace().map(String::from);
    (words.next().unwrap_or_default(), words.next().unwrap_or_default())
}

#[test]
fn the_command_gets_the_callers_core_limit() {
    assert_eq!(child_core_limits(None), ("1024".to_string(), "2048".to_string()), "as root");
    assert_eq!(child_core_limits(Some(1000)), ("1024".to_string(), "2048".to_string()), "as uid 1000");
}

/// A stop whose command ignores SIGTERM while a write-back is pending (1Password is down):
/// op-bridge is gone within --grace plus a second; with `recovers`, 1Password comes back
/// during the grace and the write-back is stored.
fn check_stop_budget(recovers: bool) {
    let dir = TestDir::new("budget");
    let fake = FakeOp::new(&dir, serde_json::json!({"vault": {"item": {"cred": "old"}}}));
    // Room for the retries once 1Password is back: a busy machine (CI runs these tests in
    // parallel on two cores) can take seconds to start the two `op` processes of a write.
    let grace = Duration::from_secs(if recovers { 8 } else { 4 });
    let script = r#"trap '' TERM
        while [ ! -e "$D/go" ]; do sleep 0.05; done
        printf new-value > "$D/cred.tmp"; mv "$D/cred.tmp" "$D/cred"
        while :; do sleep 0.05; done"#;
    let watch = format!("--watch={}=CRED=op://vault/item/cred", dir.join("cred").display());
    let builder = BrokerBuilder::new(&dir, "run")
        .fake_op(&fake)
        .env("D", dir.path().display().to_string())
        .args([
            watch.as_str(),
            "--debounce",
            "50ms",
            "--grace",
            &format!("{}s", grace.as_secs()),
            "--log-level",
            "info",
        ])
        .args(sh(script));
    let mut init = Init::start(builder, Mode::Subreaper, &dir);
    init.await_file("cred");
    fake.control(serde_json::json!({"outage": true}));
    let calls_before = fake.calls().len();
    std::fs::write(dir.join("go"), "").unwrap();
    let failed = eventually(PROMPT, || fake.calls().iter().skip(calls_before).any(|c| c["exit"] == 1));
    assert!(failed, "the write-back never met the outage\n{}", init.diagnostics());
    let sent = Instant::now();
    init.signal(libc::SIGTERM);
    if recovers {
        std::thread::sleep(Duration::from_secs(1));
        fake.control(serde_json::json!({}));
    }
    let code = init.code(PROMPT);
    let took = sent.elapsed();
    eprintln!("stop with --grace {grace:?}, 1Password {}: {took:?}", if recovers { "back after 1 s" } else { "down" });
    assert_eq!(code, 137, "the command ignored SIGTERM and was killed\n{}", init.diagnostics());
    // The issue's bound: the whole stop fits in the grace, plus a second for this machine.
    assert!(took < grace + Duration::from_secs(1), "stop took {took:?} (grace {grace:?})\n{}", init.diagnostics());
    let stored = fake.read_store()["vault"]["item"]["cred"].clone();
    if recovers {
        assert_eq!(stored, "new-value", "the write-back must be stored\n{}", init.diagnostics());
    } else {
        assert_eq!(stored, "old");
        assert!(
            init.stderr().contains("write-back NOT stored"),
            "a lost write-back is reported\n{}",
            init.diagnostics()
        );
    }
}

#[test]
fn a_stop_flushes_write_backs_within_the_grace() {
    check_stop_budget(true);
}

#[test]
fn a_stop_that_cannot_flush_still_ends_within_the_grace() {
    check_stop_budget(false);
}

#[test]
fn allow_missing_leaves_a_missing_export_out() {
    let dir = TestDir::new("missing");
    let builder = run_builder(&dir, EMPTY_VAULT)
        .env("OP_GONE_REF", "op://vault/item/nope")
        .env("OP_A_REF", "op://vault/item/a")
        .args(["--allow-missing", "--export", "GONE", "--export", "A"])
        .args(sh(r#"echo "A=$A GONE=${GONE-unset}" > "$D/seen""#));
    let mut init = Init::start(builder, Mode::Subreaper, &dir);
    assert_eq!(init.code(PROMPT), 0, "{}", init.diagnostics());
    assert_eq!(read(&dir.join("seen")), "A=one GONE=unset\n", "{}", init.diagnostics());
    assert!(init.stderr().contains("GONE is left out"), "a warning names it\n{}", init.diagnostics());
}

#[test]
fn two_variables_for_one_name_are_refused() {
    let dir = TestDir::new("dupname");
    let output = run_builder(&dir, EMPTY_VAULT)
        .env("OP_api_REF", "op://vault/item/a")
        .env("OP_API_REF", "op://vault/item/a")
        .args(sh("exit 0"))
        .output();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(stderr.contains("OP_API_REF and OP_api_REF"), "both variables are named\n{}", describe(&output));
}

#[test]
fn every_bad_option_value_exits_2() {
    let dir = TestDir::new("badopt");
    let cases: &[&[&str]] = &[
        &["--on-change", "sometimes"],
        &["--on-change", "signal:NOPE"],
        &["--export", "A=B=C"],
        &["--grace", "ten"],
        &["--log-level", "loud"],
        &["--backend", "vault"],
        &["--hup", "maybe"],
        &["--watch", "no-equals-sign"],
        &["--concurrency", "0"],
    ];
    let mut failures = Vec::new();
    for case in cases {
        let output = run_builder(&dir, EMPTY_VAULT).args(case.iter().copied()).args(sh("exit 0")).output();
        if output.status.code() != Some(2) {
            failures.push(format!("{case:?}: {}", describe(&output)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// dumb-init's job control, without a terminal: SIGTSTP is forwarded and op-bridge stops
/// itself; SIGCONT resumes it and is forwarded. (The command's group has no parent in its
/// session, so the kernel discards a default-action SIGTSTP there: the command records it.)
#[test]
fn sigtstp_is_forwarded_and_stops_op_bridge_and_sigcont_resumes_it() {
    let dir = TestDir::new("tstp");
    let builder = run_builder(&dir, EMPTY_VAULT)
        .env("SIGNALS", format!("{} {}", libc::SIGTSTP, libc::SIGCONT))
        .args(bash(RECORD_EVERY_SIGNAL));
    let mut init = Init::start(builder, Mode::Subreaper, &dir);
    init.await_file("ready");
    let state = |pid: i32| proc_state(pid).map(|(state, _)| state);
    init.signal(libc::SIGTSTP);
    let stopped = eventually(PROMPT, || state(init.pid) == Some('T'));
    assert!(stopped, "op-bridge did not stop itself: {:?}\n{}", state(init.pid), init.diagnostics());
    let tstp = libc::SIGTSTP.to_string();
    init.await_content("signals", "SIGTSTP", |text| text.lines().any(|l| l == tstp));
    init.signal(libc::SIGCONT);
    let resumed = eventually(PROMPT, || state(init.pid) != Some('T'));
    assert!(resumed, "op-bridge did not resume\n{}", init.diagnostics());
    let cont = libc::SIGCONT.to_string();
    init.await_content("signals", "SIGCONT", |text| text.lines().any(|l| l == cont));
    std::fs::write(dir.join("done"), "").unwrap();
    assert_eq!(init.code(PROMPT), 7, "{}", init.diagnostics());
    let seen: Vec<String> = read(&dir.join("signals")).lines().map(String::from).collect();
    assert_eq!(seen, [tstp, cont], "each forwarded exactly once\n{}", init.diagnostics());
}
