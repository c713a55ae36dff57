//! Least privilege on the socket side (issue 11): clients trust only the real broker, the
//! default socket lives in a directory op-bridge owns, `--allow-uid` works, REFRESH is
//! coalesced and rate-limited, memory is bounded by the in-flight budget, no copy of a value
//! lingers in op-bridge's memory, and a stalled log reader never stops the broker or the init.
//! Most cases need root (to drop to other uids with setpriv, to read a non-dumpable
//! process's memory, to get a private /run); they say so and return when not root.

mod common;
mod core_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use core_support::*;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! needs_root {
    ($name:literal) => {
        if !is_root() {
            eprintln!("skipped: {} needs root", $name);
            return;
        }
    };
}

/// A test dir every uid can enter and write (for servers and files of other uids).
fn open_dir(tag: &str) -> TestDir {
    let dir = TestDir::new(tag);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn file_vault(dir: &TestDir, content: serde_json::Value) -> String {
    let path = dir.join("vault.json");
    std::fs::write(&path, content.to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    format!("--backend=file:{}", path.display())
}

/// `op-bridge ARGS --socket SOCKET` as `uid` (setpriv), with optional stdin.
fn client_as(uid: u32, socket: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups"])
        .arg(bin())
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("OP_BRIDGE_SOCKET");
    run_with_input(cmd, stdin, LIMIT)
}

// ---------------------------------------------------------------- 1. clients verify the server

/// A process of another uid listening on the socket path: it records how many bytes each
/// of `connections` clients sent it.
const IMPOSTOR: &str = r#"
import socket, sys
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen(8)
open(sys.argv[2] + ".ready", "w").close()
for _ in range(int(sys.argv[3])):
    conn, _ = srv.accept()
    conn.settimeout(20)
    n = 0
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            n += len(data)
    except OSError:
        pass
    conn.close()
    with open(sys.argv[2], "a") as f:
        f.write(f"{n}\n")
"#;

#[test]
fn a_client_refuses_a_socket_served_by_another_uid_and_sends_it_nothing() {
    needs_root!("a_client_refuses_a_socket_served_by_another_uid_and_sends_it_nothing");
    let dir = open_dir("g-impostor");
    let socket = dir.join("s.sock");
    let received = dir.join("received");
    let script = dir.join("impostor.py");
    std::fs::write(&script, IMPOSTOR).unwrap();
    let mut impostor = Command::new("setpriv")
        .args(["--reuid", "1000", "--regid", "1000", "--clear-groups", "/usr/bin/python3"])
        .arg(&script)
        .arg(&socket)
        .arg(&received)
        .arg("2")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let ready = eventually(Duration::from_secs(20), || received.with_extension("ready").exists());
    assert!(ready, "the impostor did not start listening");

    let out = client(&socket, &["set", "API_KEY", "-"], Some(b"the-secret-value"));
    assert_eq!(code(&out), Some(3), "{}", describe(&out));
    assert!(stderr_text(&out).contains("uid 1000"), "the refusal should name the server's uid: {}", describe(&out));

    // Control: told to trust uid 1000, the same client does talk to it, so the impostor
    // does count what it receives.
    let out = client(&socket, &["ping", "--timeout", "1s", "--server-uid", "1000"], None);
    assert_eq!(code(&out), Some(3), "the impostor never answers: {}", describe(&out));

    let done = eventually(LIMIT, || matches!(impostor.try_wait(), Ok(Some(_))));
    if !done {
        let _ = impostor.kill();
    }
    let counts = std::fs::read_to_string(&received).unwrap();
    let counts: Vec<usize> = counts.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(counts[0], 0, "the refused server received {} bytes", counts[0]);
    assert!(counts[1] > 0, "the trusted connection sent nothing, so the check above proves nothing");
}

// ---------------------------------------------------------------- 2. default socket path

/// Runs `script` with a private mount namespace whose /run and /tmp are fresh tmpfs mounts
/// (so the shared machine's /run and /tmp are never touched). `$OPB` is the binary, copied
/// into the private /run first: the checkout (and its target/) may itself live under /tmp.
fn in_private_run(script: &str) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--fork", "sh", "-c"])
        .arg(format!(
            "set -e; mount --make-rprivate / ; mount -t tmpfs tmpfs /run; chmod 755 /run; \
             cp \"$OPB\" /run/op-bridge-under-test; OPB=/run/op-bridge-under-test; \
             mount -t tmpfs tmpfs /tmp; chmod 1777 /tmp; {script}"
        ))
        .env("OPB", bin())
        .env_remove("OP_BRIDGE_SOCKET")
        .env_remove("XDG_RUNTIME_DIR");
    run_with_timeout(cmd, LIMIT)
}

/// Shell: start `$OPB daemon` with `$1` as prefix command, wait until `ping` (no --socket)
/// answers, then run `$2`, then stop the daemon.
const WITH_DAEMON: &str = r#"
with_daemon() {
  prefix="$1"; shift; check="$1"; shift
  $prefix "$OPB" daemon --backend "file:$VAULT" --allow-missing "$@" 2>"$LOGDIR/daemon.$$.err" &
  pid=$!
  i=0
  until $prefix "$OPB" ping >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 400 ] || { echo "never ready"; cat "$LOGDIR/daemon.$$.err"; kill $pid; exit 1; }
    sleep 0.05
  done
  eval "$check"
  kill $pid; wait $pid || true
}
"#;

#[test]
fn the_default_socket_lives_in_an_owner_only_directory_under_run_and_clients_find_it() {
    needs_root!("the_default_socket_lives_in_an_owner_only_directory_under_run_and_clients_find_it");
    // The private /tmp hides the test's own dir: the vault and logs live in /run/t.
    let script = format!(
        r#"mkdir -p /run/t && chmod 755 /run/t && echo '{{"dev":{{"api":{{"key":"k"}}}}}}' > /run/t/vault.json
chmod 644 /run/t/vault.json; VAULT=/run/t/vault.json; LOGDIR=/run/t
{WITH_DAEMON}
with_daemon "" 'echo "root: $(stat -c "%a %U" /run/op-bridge) $(stat -c %F /run/op-bridge/op-bridge.sock)"'
mkdir -p /tmp/xdg && chmod 700 /tmp/xdg
XDG_RUNTIME_DIR=/tmp/xdg with_daemon "" 'echo "xdg: $(stat -c %F /tmp/xdg/op-bridge.sock)"'
rm -rf /run/op-bridge
with_daemon "setpriv --reuid 1000 --regid 1000 --clear-groups" 'echo "uid1000: $(stat -c "%F %u" /tmp/op-bridge.sock) run-dir:$(ls -d /run/op-bridge 2>/dev/null | wc -l)"'
"#
    );
    let out = in_private_run(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.contains("root: 700 root socket"),
        "as root: /run/op-bridge 0700 holding the socket\n{}",
        describe(&out)
    );
    assert!(text.contains("xdg: socket"), "$XDG_RUNTIME_DIR wins\n{}", describe(&out));
    assert!(
        text.contains("uid1000: socket 1000 run-dir:0"),
        "a uid that cannot write /run falls back to /tmp\n{}",
        describe(&out)
    );
}

fn leave_dead_socket(path: &Path, owner: u32) {
    drop(std::os::unix::net::UnixListener::bind(path).unwrap());
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).unwrap();
}

#[test]
fn a_stale_socket_is_replaced_only_when_it_is_ours_to_replace() {
    needs_root!("a_stale_socket_is_replaced_only_when_it_is_ours_to_replace");
    let dir = open_dir("g-stale");
    let backend = file_vault(&dir, json!({"dev": {"api": {"key": "k"}}}));
    let builder = || BrokerBuilder::new(&dir, "daemon").arg(&backend).env("OP_API_REF", "op://dev/api/key");

    // Root, and a dead socket of uid 1000 (a leftover of a daemon that ran as 1000).
    leave_dead_socket(builder().socket(), 1000);
    let broker = builder().start();
    assert_get(&broker.socket, "API", b"k", "after root replaced a dead socket of uid 1000");
    assert_eq!(std::fs::metadata(&broker.socket).unwrap().uid(), 0);
    drop(broker);

    // Uid 1000, and a dead socket of root: not 1000's to judge or remove.
    std::fs::remove_file(builder().socket()).ok();
    leave_dead_socket(builder().socket(), 0);
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.args(["--reuid", "1000", "--regid", "1000", "--clear-groups"]).arg(bin()).args(builder().command().get_args());
    cmd.env_clear().env("OP_API_REF", "op://dev/api/key");
    let out = run_with_timeout(cmd, LIMIT);
    assert_eq!(code(&out), Some(125), "{}", describe(&out));
    assert!(stderr_text(&out).contains("belongs to uid 0"), "{}", describe(&out));
    std::fs::remove_file(builder().socket()).ok();

    // Root, and a live socket of uid 1000: someone serves there; never hijack it.
    let script = dir.join("impostor.py");
    std::fs::write(&script, IMPOSTOR).unwrap();
    let received = dir.join("received");
    let mut impostor = Command::new("setpriv")
        .args(["--reuid", "1000", "--regid", "1000", "--clear-groups", "/usr/bin/python3"])
        .arg(&script)
        .arg(builder().socket())
        .arg(&received)
        .arg("1")
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || received.with_extension("ready").exists()));
    let out = run_with_timeout(builder().command(), LIMIT);
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert_eq!(code(&out), Some(125), "{}", describe(&out));
    assert!(stderr_text(&out).contains("already serving"), "{}", describe(&out));
}

// ---------------------------------------------------------------- 3. --allow-uid

#[test]
fn allow_uid_lets_exactly_the_listed_uids_read() {
    needs_root!("allow_uid_lets_exactly_the_listed_uids_read");
    let dir = TestDir::new("g-allow");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let backend = file_vault(&dir, json!({"dev": {"api": {"key": "k-allowed"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .arg(&backend)
        .args(["--allow-uid", "1000"])
        .env("OP_API_REF", "op://dev/api/key")
        .start();
    let out = client_as(1000, &broker.socket, &["get", "API"], None);
    assert!(out.status.success(), "--allow-uid 1000 did not let uid 1000 read: {}", describe(&out));
    assert_eq!(out.stdout, b"k-allowed");

    let out = client_as(1001, &broker.socket, &["get", "API"], None);
    assert!(!out.status.success(), "uid 1001 read a value: {}", describe(&out));
    assert!(out.stdout.is_empty());
    let mode = std::fs::metadata(&broker.socket).unwrap().mode() & 0o7777;
    assert_eq!(mode & 0o007, 0, "the socket must stay closed to other uids (mode {mode:o})");
}

// ---------------------------------------------------------------- 4. REFRESH coalescing

#[test]
fn client_refreshes_and_sighup_are_coalesced_and_rate_limited() {
    let dir = TestDir::new("g-refresh");
    let fake =
        FakeOp::new(&dir, json!({"Private": {"A": {"key": "a"}, "B": {"key": "b"}, "C": {"user": "u", "pass": "p"}}}));
    // Slow enough that the parallel REFRESHes arrive while one is running.
    fake.control(json!({"delay_ms": 300}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .env("OP_A_REF", "op://Private/A/key")
        .env("OP_B_REF", "op://Private/B/key")
        .env("OP_USER_REF", "op://Private/C/user")
        .env("OP_PASS_REF", "op://Private/C/pass")
        .args(["--refresh-min-interval", "2s"])
        .start();
    let per_pass = fake.calls().len();
    assert!(per_pass > 0);

    let socket = broker.socket.clone();
    let parallel: Vec<_> = (0..60)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || raw_exchange(&socket, b"REFRESH\n", LIMIT).unwrap())
        })
        .collect();
    let mut replies: Vec<String> = Vec::new();
    for handle in parallel {
        replies.extend(String::from_utf8(handle.join().unwrap()).unwrap().lines().map(str::to_string));
    }
    assert_eq!(replies.len(), 60, "{replies:?}");
    assert!(replies.iter().all(|r| r.starts_with("OK refreshed 4")), "{replies:?}");
    assert!(!replies.iter().any(|r| r.contains("ago")), "an older pass answered: {replies:?}");
    let spent = fake.calls().len() - per_pass;
    eprintln!("measured: 60 client REFRESH cost {spent} op calls; one refresh costs {per_pass}");
    assert!(spent <= 2 * per_pass, "60 REFRESH cost {spent} op calls ({per_pass} per refresh)");

    // Pipelined on one connection, each REFRESH arrives once the one before is answered, so
    // each gets its own pass, one interval apart: still one pass per interval.
    let before = fake.calls().len();
    let started = std::time::Instant::now();
    let pipelined = raw_exchange(&socket, "REFRESH\n".repeat(3).as_bytes(), LIMIT).unwrap();
    let pipelined: Vec<String> = String::from_utf8(pipelined).unwrap().lines().map(str::to_string).collect();
    assert_eq!(pipelined.len(), 3, "{pipelined:?}");
    assert!(pipelined.iter().all(|r| r.starts_with("OK refreshed 4")), "{pipelined:?}");
    let spent = fake.calls().len() - before;
    assert!(spent <= 3 * per_pass, "3 pipelined REFRESH cost {spent} op calls ({per_pass} per refresh)");
    assert!(started.elapsed() >= Duration::from_secs(4), "two intervals of 2s were not waited out");

    // SIGHUP goes through the same gate: inside the interval it gets a trailing pass.
    let before = fake.calls().len();
    broker.signal(libc::SIGHUP);
    let refreshed = eventually(LIMIT, || fake.calls().len() >= before + per_pass);
    assert!(refreshed, "SIGHUP inside the client interval did not refresh\nstderr:\n{}", broker.stderr());
}

// ---------------------------------------------------------------- 5. in-flight budget

fn vm_hwm_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn many_large_frames_stay_within_the_budget_and_ping_still_answers() {
    let dir = TestDir::new("g-budget");
    let backend = file_vault(&dir, json!({"dev": {"api": {"key": "k"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon")
        .arg(&backend)
        .env("OP_API_REF", "op://dev/api/key")
        .args(["--max-connections", "1024"])
        .start();
    const FRAME: usize = 1024 * 1024;
    let mut request = format!("HELLO 2\nSET FLOOD - {FRAME}\n").into_bytes();
    request.extend(std::iter::repeat_n(b'x', FRAME));
    request.push(b'\n');
    let request = Arc::new(request);
    let barrier = Arc::new(std::sync::Barrier::new(301));
    let senders: Vec<_> = (0..300)
        .map(|_| {
            let (socket, request, barrier) = (broker.socket.clone(), request.clone(), barrier.clone());
            std::thread::spawn(move || {
                let stream = UnixStream::connect(&socket);
                barrier.wait();
                let mut stream = stream.ok()?;
                stream.set_read_timeout(Some(LIMIT)).ok()?;
                // The server may close before the whole frame is sent: that is the point.
                let _ = stream.write_all(&request);
                let mut reply = String::new();
                let _ = stream.read_to_string(&mut reply);
                Some(reply)
            })
        })
        .collect();
    barrier.wait();
    let during = raw_exchange(&broker.socket, b"PING\n", LIMIT).unwrap();
    assert_eq!(during, b"OK pong\n", "PING during the flood");
    let replies: Vec<String> = senders.into_iter().filter_map(|h| h.join().unwrap()).collect();
    assert!(replies.iter().any(|r| r.contains("busy")), "no frame was refused as busy: {:?}", &replies[..3]);
    let after = raw_exchange(&broker.socket, b"PING\n", LIMIT).unwrap();
    assert_eq!(after, b"OK pong\n", "PING after the flood");
    let hwm = vm_hwm_kb(broker.pid());
    let busy = replies.iter().filter(|r| r.contains("busy")).count();
    eprintln!("measured: 300 x 1 MiB SET frames: VmHWM {} kB, {busy} refused as busy", hwm);
    assert!(hwm < 128 * 1024, "op-bridge's peak RSS was {} MB", hwm / 1024);
}

// ---------------------------------------------------------------- 6. no lingering copies

#[test]
fn no_copy_of_a_value_remains_after_gets_and_delete() {
    needs_root!("no_copy_of_a_value_remains_after_gets_and_delete");
    let dir = TestDir::new("g-linger");
    let value: String = (0..32).map(|_| fastrand::alphanumeric()).collect();
    let backend = file_vault(&dir, json!({"dev": {"api": {"key": value}}}));
    let broker = BrokerBuilder::new(&dir, "daemon").arg(&backend).env("OP_API_REF", "op://dev/api/key").start();

    // 600 pipelined GETs in version 1, and eight connections pipelining 600 each in
    // version 2 at once (how an OpenClaw batch and its neighbours arrive).
    let replies = raw_exchange(&broker.socket, "GET API\n".repeat(600).as_bytes(), LIMIT).unwrap();
    let served = replies.windows(value.len()).filter(|w| *w == value.as_bytes()).count();
    assert_eq!(served, 600);
    let parallel: Vec<_> = (0..8)
        .map(|_| {
            let socket = broker.socket.clone();
            let pipeline = format!("HELLO 2\n{}", "GET API\n".repeat(600));
            std::thread::spawn(move || raw_exchange(&socket, pipeline.as_bytes(), LIMIT).unwrap())
        })
        .collect();
    for handle in parallel {
        let replies = handle.join().unwrap();
        assert_eq!(replies.windows(value.len()).filter(|w| *w == value.as_bytes()).count(), 600);
    }
    let batch = br#"{"protocolVersion":1,"provider":"op","ids":["API","dev/api/key","API"]}"#;
    let out = broker.client(&["get"], Some(batch));
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&value), "{}", describe(&out));

    let held = memory::copies_in_memory(broker.pid(), value.as_bytes());
    assert!(held >= 1, "the scan must find the value while it is held, or it proves nothing");
    let out = broker.client(&["delete", "API"], None);
    assert!(out.status.success(), "{}", describe(&out));
    let left = memory::copies_in_memory(broker.pid(), value.as_bytes());
    eprintln!("measured: copies of the value in op-bridge's memory: {held} while held, {left} after DELETE");
    assert_eq!(left, 0, "{left} copies of the value remain in op-bridge's memory after DELETE");
}

// ---------------------------------------------------------------- 7. logs never block

/// Answers `count` PINGs on separate connections, then one pipeline of `count` more.
fn ping_many(socket: &Path, count: usize) {
    for i in 0..count {
        let reply = raw_exchange(socket, b"PING\n", LIMIT).unwrap();
        assert_eq!(reply, b"OK pong\n", "PING {i} got {:?}", String::from_utf8_lossy(&reply));
    }
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all("PING\n".repeat(count).as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    for i in 0..count {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "OK pong\n", "pipelined PING {i}");
    }
}

/// Starts `builder` with stderr on a pipe this test never reads.
fn spawn_with_stalled_stderr(builder: BrokerBuilder) -> (std::process::Child, std::process::ChildStderr) {
    let mut cmd = builder.command();
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    (child, stderr)
}

fn wait_ready(socket: &Path) {
    let ready = eventually(LIMIT, || raw_exchange(socket, b"PING\n", LIMIT).is_ok_and(|r| r == b"OK pong\n"));
    assert!(ready, "not ready");
}

#[test]
fn a_stalled_stderr_never_stops_the_broker_or_the_init() {
    let dir = TestDir::new("g-stall");
    let backend = file_vault(&dir, json!({"dev": {"api": {"key": "k"}}}));
    let chatty = ["--log-level", "trace", "--audit-log", "-"];
    let builder = BrokerBuilder::new(&dir, "daemon").arg(&backend).args(chatty).env("OP_API_REF", "op://dev/api/key");
    let socket = builder.socket().to_path_buf();
    let (mut daemon, _stalled) = spawn_with_stalled_stderr(builder);
    wait_ready(&socket);
    ping_many(&socket, 2000);
    let status = raw_exchange(&socket, b"STATUS\n", LIMIT).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status[3..]).unwrap();
    assert!(status["logging"]["dropped"].as_u64().unwrap() > 0, "dropped lines must be counted: {status}");
    eprintln!("measured: 4,000 PINGs with stderr stalled; STATUS logging = {}", status["logging"]);
    let _ = daemon.kill();
    let _ = daemon.wait();

    let dir = TestDir::new("g-stall-run");
    let backend = file_vault(&dir, json!({"dev": {"api": {"key": "k"}}}));
    let marker = dir.join("got-term");
    let trapped = dir.join("trap-set");
    // The child says when its trap is set: a SIGTERM before that (a slow start under load)
    // would kill it before it can leave the marker, which is no failure of op-bridge. Its
    // own stderr is not the stalled pipe: dash reports a `sleep` killed by the forwarded
    // SIGTERM ("Terminated") on stderr, and would block there instead of running the trap.
    let child = format!(
        "exec 2>/dev/null; trap 'echo term > {}; exit 0' TERM; : > {}; while :; do sleep 0.05; done",
        marker.display(),
        trapped.display()
    );
    let builder = BrokerBuilder::new(&dir, "run")
        .arg(&backend)
        .args(chatty)
        .env("OP_API_REF", "op://dev/api/key")
        .args(["--", "sh", "-c", &child]);
    let socket = builder.socket().to_path_buf();
    let (mut init, _stalled) = spawn_with_stalled_stderr(builder);
    wait_ready(&socket);
    ping_many(&socket, 2000);
    assert!(eventually(LIMIT, || trapped.exists()), "the child never started");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(init.id() as i32, libc::SIGTERM) };
    let forwarded = eventually(LIMIT, || marker.exists());
    let exited = eventually(LIMIT, || matches!(init.try_wait(), Ok(Some(_))));
    let _ = init.kill();
    let _ = init.wait();
    assert!(forwarded, "SIGTERM did not reach the child while stderr was stalled");
    assert!(exited, "op-bridge run did not exit after its child did");
}
