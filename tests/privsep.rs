//! Privilege separation (issue 11): `run --user`, `--op-user` and an execute-only `op`.
//!
//! The heart of it is a scanner (Python) that the supervised command runs as the app's uid:
//! it triggers `op-bridge refresh` again and again and, while each refresh runs, reads every
//! `/proc/*/cmdline`, `/proc/*/environ` and the memory of every process it may read, looking
//! for the 1Password token. It also records which `op` processes it saw and whether their
//! environment was readable, so a scan that never overlapped an `op` cannot pass. The
//! execute-only case is checked against a 0755 copy of the same `op`, where the same scan
//! must find the token. Needs root (chown, setpriv, useradd).

mod common;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value as Json, json};

/// The app's uid and gid in these tests (it need not have a passwd entry).
const APP: u32 = 1000;
/// How long each fake `op` call takes: long enough that a scan overlaps it.
const OP_DELAY_MS: u64 = 1500;
/// Refreshes the scanner triggers.
const ROUNDS: u32 = 3;

/// The WARN of the start-up check (src/supervise/privsep.rs).
const EXPOSED_WARNING: &str = "the command's uid, and is readable by it";

const SCANNER: &str = r#"
import json, os, subprocess, sys

needle = open(sys.argv[1], "rb").read().strip()
bridge, rounds, op_path = sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
me = os.getpid()
found, op_pids, op_env_read, op_env_denied = set(), set(), set(), set()
counts = {"scans": 0, "environ_read": 0, "environ_denied": 0, "mem_read": 0, "refresh_failed": 0}

def scan_mem(pid, cmdline):
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError:
        return
    with mem:
        counts["mem_read"] += 1
        for line in maps:
            parts = line.split()
            if len(parts) < 2 or "r" not in parts[1] or line.endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if end - start > 256 << 20:
                continue
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    found.add(("memory", pid, parts[-1], cmdline.decode(errors="replace")))
            except (OSError, OverflowError, ValueError):
                pass

def scan():
    counts["scans"] += 1
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        # `op` itself, or the interpreter running it as a script (argv[1]); not a process
        # that merely names it (op-bridge's own --op-path).
        is_op = op_path in cmdline.split(b"\0")[:2]
        if is_op:
            op_pids.add(pid)
        if needle in cmdline:
            found.add(("cmdline", pid, cmdline.decode(errors="replace")))
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read()
        except PermissionError:
            counts["environ_denied"] += 1
            if is_op:
                op_env_denied.add(pid)
            continue
        except OSError:
            continue
        counts["environ_read"] += 1
        if is_op:
            op_env_read.add(pid)
        if needle in environ:
            found.add(("environ", pid, cmdline.decode(errors="replace")))
        scan_mem(pid, cmdline)

for _ in range(rounds):
    refresh = subprocess.Popen([bridge, "refresh"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while refresh.poll() is None:
        scan()
    if refresh.returncode != 0:
        counts["refresh_failed"] += 1
scan()
print(json.dumps({"found": sorted(found), "op_pids": sorted(op_pids), "op_environ_read": sorted(op_env_read),
                  "op_environ_denied": sorted(op_env_denied), **counts}), flush=True)
"#;

/// A compiled stand-in for `op`: a script cannot be execute-only (its interpreter must read
/// it). The process that holds the token is this binary; it runs the fake op (Python)
/// without the token and waits for it, so it lives as long as the call.
const OP_STAND_IN: &str = r#"
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid == 0) {
        char **args = calloc(argc + 2, sizeof(char *));
        if (!args) _exit(1);
        unsetenv("OP_SERVICE_ACCOUNT_TOKEN");
        args[0] = PYTHON;
        args[1] = SCRIPT;
        for (int i = 1; i < argc; i++) args[i + 1] = argv[i];
        execv(PYTHON, args);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {}
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}
"#;

fn require_root() {
    // SAFETY: a plain query.
    assert_eq!(unsafe { libc::geteuid() }, 0, "tests/privsep.rs needs root (chown, setpriv, useradd)");
}

/// One scenario's files: the fake op's store, a private copy of the fake op (its path is
/// this test's alone, so the scanner never counts another test's `op`), python3 on PATH,
/// the scanner and the token it looks for.
struct Scene {
    dir: TestDir,
    fake: FakeOp,
    token: String,
    fake_op: PathBuf,
    path_env: String,
}

impl Scene {
    fn new(tag: &str) -> Scene {
        require_root();
        let dir = TestDir::new(tag);
        chmod(dir.path(), 0o755);
        let fake = FakeOp::new(&dir, json!({"AI": {"OpenAI": {"credential": "sk-privsep-value"}}}));
        fake.control(json!({"delay_ms": OP_DELAY_MS}));
        let fake_op = dir.join("fakeop");
        std::fs::copy(fake_op_path(), &fake_op).unwrap();
        chmod(&fake_op, 0o755);
        // The fake's `#!/usr/bin/env python3` must find an interpreter the app's uid can run.
        std::fs::create_dir(dir.join("py")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/python3", dir.join("py/python3")).unwrap();
        let path_env = format!("{}:/usr/local/bin:/usr/bin:/bin", dir.join("py").display());
        let token = format!("ops_privsep_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        std::fs::write(dir.join("needle"), &token).unwrap();
        chmod(&dir.join("needle"), 0o644);
        std::fs::write(dir.join("scan.py"), SCANNER).unwrap();
        chmod(&dir.join("scan.py"), 0o644);
        Scene { dir, fake, token, fake_op, path_env }
    }

    /// The command op-bridge supervises: identity, HOME, the socket's state, one `get`, then
    /// the scanner (whose JSON is the last line of stdout). `op` is recognised by `op_path`.
    fn child_script(&self, op_path: &Path) -> PathBuf {
        let script = format!(
            "set -e\n\
             echo \"uid=$(id -u)\"\n\
             echo \"gid=$(id -g)\"\n\
             echo \"groups=$(id -G)\"\n\
             echo \"home=$HOME\"\n\
             echo \"socket=$(stat -c %u:%g:%a \"$OP_BRIDGE_SOCKET\")\"\n\
             echo \"socket_dir=$(stat -c %g:%a \"$(dirname \"$OP_BRIDGE_SOCKET\")\")\"\n\
             echo \"get=$({bin} get API_KEY)\"\n\
             exec /usr/bin/python3 {dir}/scan.py {dir}/needle {bin} {rounds} {op}\n",
            bin = bin().display(),
            dir = self.dir.path().display(),
            rounds = ROUNDS,
            op = op_path.display(),
        );
        let path = self.dir.join("child.sh");
        std::fs::write(&path, script).unwrap();
        chmod(&path, 0o644);
        path
    }

    /// `op-bridge run` (behind `prefix`, e.g. setpriv) with the fake's environment and the
    /// token, to completion.
    fn run(&self, prefix: &[&str], socket: &Path, op: &Path, extra: &[&str], command: &[&str]) -> Output {
        let (program, before) = match prefix.split_first() {
            Some((program, rest)) => (PathBuf::from(program), rest.iter().map(|s| s.to_string()).collect()),
            None => (bin(), Vec::new()),
        };
        let mut cmd = Command::new(program);
        if !prefix.is_empty() {
            cmd.args(before).arg(bin());
        }
        cmd.args(["run", "--socket"])
            .arg(socket)
            .arg("--op-path")
            .arg(op)
            .args(extra)
            .arg("--")
            .args(command)
            .env_clear()
            .env("PATH", &self.path_env)
            .env("HOME", "/root")
            .env("OP_SERVICE_ACCOUNT_TOKEN", &self.token)
            .env("OP_API_KEY_REF", "op://AI/OpenAI/credential")
            .envs(self.fake.env());
        run_with_timeout(cmd, Duration::from_secs(180))
    }
}

/// Waits until no other scanner runs, on the whole machine, and returns the lock (an flock,
/// released when the file is dropped). Two scanners of the same uid would read each other's
/// memory, and with it each other's needle: the one scanned second would then "find" the
/// first's token in the second's heap. A scanner in another test process (a second `cargo
/// test`, another checkout's) counts as much as one in another thread of this one.
fn scanning() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join("opb-privsep-scanner.lock");
    let lock = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    // SAFETY: flock on a descriptor owned by `lock`, which outlives the call.
    while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "flock {}: {err}", path.display());
    }
    lock
}

/// `key=value` lines of the child's stdout.
fn field(output: &Output, key: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let prefix = format!("{key}=");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= line\n{}", describe(output)))
        .to_string()
}

/// The scanner's report (the last JSON line of stdout).
fn scan_report(output: &Output) -> Json {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let report: Json =
        serde_json::from_str(line.unwrap_or_else(|| panic!("no scan report\n{}", describe(output)))).unwrap();
    eprintln!("scan report: {report}");
    report
}

fn count(report: &Json, key: &str) -> usize {
    report[key].as_array().map_or(0, Vec::len)
}

#[test]
fn a_command_run_with_user_never_finds_the_token_yet_reads_its_secrets() {
    let scene = Scene::new("psu");
    // The socket in a private directory of root's that holds nothing else open to others:
    // op-bridge must open it to the app's group (search only) for `get` to work.
    let private = scene.dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("owner-only"), b"x").unwrap();
    chmod(&private.join("owner-only"), 0o600);
    chmod(&private, 0o700);
    let socket = private.join("s.sock");
    let child = scene.child_script(&scene.fake_op);
    let user = format!("{APP}:{APP}");
    let scanning = scanning();
    let output = scene.run(&[], &socket, &scene.fake_op, &["--user", &user], &["sh", child.to_str().unwrap()]);
    drop(scanning);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");

    assert_eq!(field(&output, "uid"), APP.to_string(), "{shown}");
    assert_eq!(field(&output, "gid"), APP.to_string(), "{shown}");
    // Not in root's groups: setgroups replaced op-bridge's.
    assert_eq!(field(&output, "groups"), APP.to_string(), "{shown}");
    assert_eq!(field(&output, "get"), "sk-privsep-value", "{shown}");
    // 660 is how stat shows the mask of the POSIX ACL the listener writes for allowed uids
    // (the user's uid is one of them); the owning group's own entry stays empty.
    let socket_mode = field(&output, "socket");
    assert!([format!("{APP}:{APP}:600"), format!("{APP}:{APP}:660")].contains(&socket_mode), "{shown}");
    assert_eq!(field(&output, "socket_dir"), format!("{APP}:710"), "{shown}");

    let report = scan_report(&output);
    assert_eq!(count(&report, "found"), 0, "the token was found: {report}\n{shown}");
    assert!(count(&report, "op_pids") > 0, "the scan never overlapped an op process: {report}");
    assert_eq!(count(&report, "op_environ_read"), 0, "{report}");
    assert!(report["environ_read"].as_u64().unwrap() > 0, "the scan read no environ at all: {report}");
    assert_eq!(report["refresh_failed"], 0, "{report}\n{shown}");
    // The scan overlapped real refreshes: the fake op was called again after start-up.
    assert!(scene.fake.calls().len() > 1, "{shown}");
    assert!(!String::from_utf8_lossy(&output.stderr).contains(EXPOSED_WARNING), "{shown}");
}

/// Builds the compiled `op` stand-in at `path`, root-owned with `mode`.
fn build_op_stand_in(scene: &Scene, path: &Path, mode: u32) {
    let source = scene.dir.join("op.c");
    std::fs::write(&source, OP_STAND_IN).unwrap();
    let output = Command::new("gcc")
        .arg("-O1")
        .arg(r#"-DPYTHON="/usr/bin/python3""#)
        .arg(format!(r#"-DSCRIPT="{}""#, scene.fake_op.display()))
        .arg("-o")
        .arg(path)
        .arg(&source)
        .output()
        .unwrap();
    assert!(output.status.success(), "gcc failed\n{}", describe(&output));
    chown(path, 0, 0);
    chmod(path, mode);
}

/// Everything as the app's uid, `op` being the compiled stand-in with `mode`: returns the
/// run's output and the scanner's report.
fn same_uid_run(tag: &str, mode: u32) -> (Output, Json) {
    let scene = Scene::new(tag);
    std::fs::create_dir(scene.dir.join("bin")).unwrap();
    let op = scene.dir.join("bin/op");
    chown_tree(scene.dir.path(), APP, APP);
    build_op_stand_in(&scene, &op, mode);
    let child = scene.child_script(&op);
    let socket = scene.dir.join("s.sock");
    let setpriv = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"];
    let scanning = scanning();
    let output = scene.run(&setpriv, &socket, &op, &[], &["sh", child.to_str().unwrap()]);
    drop(scanning);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert_eq!(field(&output, "uid"), APP.to_string());
    assert_eq!(field(&output, "get"), "sk-privsep-value");
    let report = scan_report(&output);
    assert!(count(&report, "op_pids") > 0, "the scan never overlapped an op process: {report}");
    (output, report)
}

#[test]
fn an_execute_only_op_hides_the_token_from_the_same_uid() {
    let (output, report) = same_uid_run("psx", 0o111);
    let shown = describe(&output);
    assert_eq!(count(&report, "found"), 0, "the token was found: {report}\n{shown}");
    assert_eq!(count(&report, "op_environ_read"), 0, "{report}");
    assert!(count(&report, "op_environ_denied") > 0, "{report}");
    assert!(report["environ_read"].as_u64().unwrap() > 0, "the scan read no environ at all: {report}");
    assert!(!String::from_utf8_lossy(&output.stderr).contains(EXPOSED_WARNING), "{shown}");
}

/// The control: the same `op` readable (0755) leaves its environment, token included, open
/// to the same uid — what the issue reports — and op-bridge says so once at start.
#[test]
fn a_readable_op_exposes_the_token_to_the_same_uid_and_is_warned_about_once() {
    let (output, report) = same_uid_run("psr", 0o755);
    let shown = describe(&output);
    assert!(count(&report, "op_environ_read") > 0, "{report}");
    let found = report["found"].as_array().unwrap();
    assert!(found.iter().any(|f| f[0] == "environ"), "a readable op's environ did not show the token: {report}");
    assert_eq!(String::from_utf8_lossy(&output.stderr).matches(EXPOSED_WARNING).count(), 1, "{shown}");
}

/// A throwaway user (with its own group) that is also a member of a second group.
const NAMED_USER: &str = "opbridge-ps";
const EXTRA_GROUP: &str = "opbridge-psx";

fn named_user() -> (u32, u32, u32) {
    static CREATE: Mutex<()> = Mutex::new(());
    let _guard = CREATE.lock().unwrap();
    let exists = |db: &str, name: &str| Command::new("getent").args([db, name]).output().unwrap().status.success();
    let check = |cmd: &mut Command| {
        let output = cmd.output().unwrap();
        assert!(output.status.success(), "{}", describe(&output));
    };
    if !exists("group", EXTRA_GROUP) {
        check(Command::new("groupadd").arg(EXTRA_GROUP));
    }
    if !exists("passwd", NAMED_USER) {
        check(
            Command::new("useradd")
                .args(["-M", "-U", "-d", "/home/opbridge-ps", "-s", "/usr/sbin/nologin"])
                .arg(NAMED_USER),
        );
    }
    check(Command::new("usermod").args(["-a", "-G", EXTRA_GROUP, NAMED_USER]));
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, NAMED_USER]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let extra = Command::new("getent").args(["group", EXTRA_GROUP]).output().unwrap();
    let extra: u32 = String::from_utf8_lossy(&extra.stdout).split(':').nth(2).unwrap().trim().parse().unwrap();
    (id("-u"), id("-g"), extra)
}

#[test]
fn a_user_name_gets_its_groups_and_home_like_gosu() {
    let (uid, gid, extra) = named_user();
    let scene = Scene::new("psn");
    scene.fake.control(json!({}));
    let script = "echo uid=$(id -u); echo gid=$(id -g); echo groups=$(id -G); echo home=$HOME; echo user=${USER-unset}";
    let socket = scene.dir.join("s.sock");
    let output = scene.run(&[], &socket, &scene.fake_op, &["--user", NAMED_USER], &["sh", "-c", script]);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "uid"), uid.to_string(), "{shown}");
    assert_eq!(field(&output, "gid"), gid.to_string(), "{shown}");
    let mut groups: Vec<u32> = field(&output, "groups").split_whitespace().map(|g| g.parse().unwrap()).collect();
    groups.sort();
    let mut expected = vec![gid, extra];
    expected.sort();
    assert_eq!(groups, expected, "{shown}");
    // HOME is the user's even though the environment said /root; USER is left alone (gosu).
    assert_eq!(field(&output, "home"), "/home/opbridge-ps", "{shown}");
    assert_eq!(field(&output, "user"), "unset", "{shown}");
}

#[test]
fn an_unknown_user_or_group_is_a_usage_error() {
    let scene = Scene::new("psq");
    let socket = scene.dir.join("s.sock");
    for (spec, message) in [
        ("no-such-user-opb", "no user 'no-such-user-opb'"),
        ("1000:no-such-group-opb", "no group 'no-such-group-opb'"),
        ("1000:", "invalid user"),
    ] {
        let output = scene.run(&[], &socket, &scene.fake_op, &["--user", spec], &["true"]);
        let shown = describe(&output);
        assert_eq!(output.status.code(), Some(2), "--user {spec}: {shown}");
        assert!(String::from_utf8_lossy(&output.stderr).contains(message), "--user {spec}: {shown}");
        assert!(scene.fake.calls().is_empty(), "op was called for --user {spec}");
    }
}

#[test]
fn a_socket_directory_the_user_cannot_search_is_left_alone_when_opening_it_would_expose_more() {
    let scene = Scene::new("psd");
    scene.fake.control(json!({}));
    let shared = scene.dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    // A file others may read: searching the directory would give the app its contents.
    std::fs::write(shared.join("other-file"), b"not the socket").unwrap();
    chmod(&shared.join("other-file"), 0o644);
    chmod(&shared, 0o700);
    let user = format!("{APP}:{APP}");
    let output = scene.run(&[], &shared.join("s.sock"), &scene.fake_op, &["--user", &user], &["true"]);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(125), "{shown}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not searchable by it"), "{shown}");
    let meta = std::fs::metadata(&shared).unwrap();
    assert_eq!((meta.gid(), meta.permissions().mode() & 0o777), (0, 0o700), "the directory was changed");

    // The socket's own directory could be opened, but one above it is closed: nothing changes.
    let closed = scene.dir.join("closed");
    let inner = closed.join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    chmod(&inner, 0o700);
    chmod(&closed, 0o700);
    let output = scene.run(&[], &inner.join("s.sock"), &scene.fake_op, &["--user", &user], &["true"]);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(125), "{shown}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("directory {} is not", closed.display())),
        "{shown}"
    );
    let meta = std::fs::metadata(&inner).unwrap();
    assert_eq!((meta.gid(), meta.permissions().mode() & 0o777), (0, 0o700), "the inner directory was changed");
}

#[test]
fn op_user_runs_op_under_that_uid_and_home() {
    let scene = Scene::new("pso");
    scene.fake.control(json!({}));
    // A recording `op`: who it ran as and with which HOME, then the fake.
    let op = scene.dir.join("op-recording");
    std::fs::write(
        &op,
        format!(
            "#!/bin/sh\necho \"$(id -u):$(id -g):$HOME\" >> {dir}/op-ids\nexec /usr/bin/python3 {fake} \"$@\"\n",
            dir = scene.dir.path().display(),
            fake = scene.fake_op.display()
        ),
    )
    .unwrap();
    chmod(&op, 0o755);
    chown_tree(scene.dir.path(), APP, APP);
    let socket = scene.dir.join("s.sock");
    let op_user = format!("{APP}:{APP}");
    let script = format!("{} get API_KEY", bin().display());
    let output = scene.run(&[], &socket, &op, &["--op-user", &op_user], &["sh", "-c", &script]);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "sk-privsep-value", "{shown}");
    let ids = std::fs::read_to_string(scene.dir.join("op-ids")).unwrap();
    assert!(!ids.is_empty());
    // uid 1000 has a passwd entry on some hosts and not on others: HOME is its home or "/".
    for line in ids.lines() {
        assert!(line.starts_with(&format!("{APP}:{APP}:")), "op ran as {line}\n{shown}");
        assert_ne!(line, format!("{APP}:{APP}:/root"), "op kept op-bridge's HOME\n{shown}");
    }
}

/// Kubernetes `runAsUser: 1000` with an image whose entrypoint says `--user node`: op-bridge
/// is not root, the uid is already right (the group need not be), nothing is switched.
#[test]
fn a_non_root_op_bridge_accepts_only_its_own_uid() {
    let scene = Scene::new("psk");
    scene.fake.control(json!({}));
    chown_tree(scene.dir.path(), APP, APP);
    let socket = scene.dir.join("s.sock");
    let setpriv = ["setpriv", "--reuid", "1000", "--regid", "1234", "--clear-groups"];
    let own = format!("{APP}:{APP}");
    let output = scene.run(
        &setpriv,
        &socket,
        &scene.fake_op,
        &["--user", &own],
        &["sh", "-c", "echo uid=$(id -u) gid=$(id -g)"],
    );
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "uid"), "1000 gid=1234", "{shown}");

    // --op-user naming op-bridge's own uid switches nothing either (no setgid to a group
    // op-bridge is not in).
    let output = scene.run(&setpriv, &socket, &scene.fake_op, &["--op-user", &own], &["true"]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));

    let output = scene.run(&setpriv, &socket, &scene.fake_op, &["--user", "1001"], &["true"]);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(2), "{shown}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs op-bridge to run as root"), "{shown}");
}

/// gosu's rule for a bare uid with no passwd entry: op-bridge's own gid (root's, here), which
/// op-bridge points out.
#[test]
fn a_bare_uid_without_a_group_gets_op_bridges_gid_and_a_warning() {
    let scene = Scene::new("psg");
    scene.fake.control(json!({}));
    let uid = "4242";
    assert!(!Command::new("getent").args(["passwd", uid]).output().unwrap().status.success(), "uid {uid} exists");
    let socket = scene.dir.join("s.sock");
    let script = "echo ids=$(id -u):$(id -g):$(id -G); echo home=$HOME";
    let output = scene.run(&[], &socket, &scene.fake_op, &["--user", uid], &["sh", "-c", script]);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "ids"), "4242:0:0", "{shown}");
    assert_eq!(field(&output, "home"), "/", "{shown}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("runs with gid 0"), "{shown}");
}

/// The image: op-bridge is PID 1 as root and starts OpenClaw as `node`; `op` is root's and
/// execute-only, in the Dockerfile's text (tests/containers.rs builds and runs the image).
#[test]
fn the_image_runs_op_bridge_as_root_the_app_as_node_and_op_execute_only() {
    let dockerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/Dockerfile")).unwrap();
    let runtime = dockerfile.split("AS runtime").nth(1).expect("a runtime stage");
    let lines: Vec<&str> = runtime.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    // From the stage the build arguments choose (the official image or the context's `op`).
    let op_copy = lines.iter().find(|l| l.starts_with("COPY --from=op-binary ")).expect("op is copied");
    assert!(op_copy.contains("--chown=0:0") && op_copy.contains("--chmod=0111"), "{op_copy}");
    let last_user = lines.iter().rev().find(|l| l.starts_with("USER ")).expect("a USER");
    assert_eq!(*last_user, "USER root");
    let entrypoint = lines.iter().find(|l| l.starts_with("ENTRYPOINT ")).expect("an ENTRYPOINT");
    assert_eq!(*entrypoint, r#"ENTRYPOINT ["op-bridge", "run", "--user", "node", "--"]"#);
}

/// `--watch` under `--user`: op-bridge (root) writes the app's credential files, which must
/// stay the app's — a root-owned 0600 file would lock the app out of its own OAuth token.
#[test]
fn a_watched_file_written_by_a_root_op_bridge_stays_the_users() {
    let scene = Scene::new("psw");
    scene.fake.control(json!({}));
    let home = scene.dir.join("home");
    std::fs::create_dir(&home).unwrap();
    chown(&home, APP, APP);
    chmod(&home, 0o700);
    let creds = home.join("creds.json");
    let socket = scene.dir.join("s.sock");
    let user = format!("{APP}:{APP}");
    let watch = format!("{}=CREDS=op://AI/OpenAI/credential", creds.display());
    let script =
        format!("echo read=$(cat {0}); echo owner=$(stat -c %u:%g:%a {0}); printf rotated > {0}", creds.display());
    let output = scene.run(&[], &socket, &scene.fake_op, &["--user", &user, "--watch", &watch], &["sh", "-c", &script]);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "read"), "sk-privsep-value", "{shown}");
    assert_eq!(field(&output, "owner"), format!("{APP}:{APP}:600"), "{shown}");
    assert_eq!(std::fs::read_to_string(&creds).unwrap(), "rotated", "{shown}");
}

/// Replacing a file keeps its owner as well as its mode (op-bridge as root rewriting a file
/// of the app's when a refresh changes a watched value).
#[test]
fn an_atomic_rewrite_keeps_the_files_owner() {
    require_root();
    let dir = TestDir::new("psa");
    let path = dir.join("creds.json");
    std::fs::write(&path, b"old").unwrap();
    chown(&path, 4242, 4343);
    chmod(&path, 0o640);
    op_bridge::fsutil::write_atomic(&path, b"new", Some(0o600)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.permissions().mode() & 0o777), (4242, 4343, 0o640));
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
}
