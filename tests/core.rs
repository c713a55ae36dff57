//! The "core" issue's acceptance suite: byte-exact values and protocol versions, concurrent
//! and grouped resolution, error classification and retries, the op timeout, refresh and
//! staleness, abuse of the socket, the peer check, socket ownership, secret leaks, shutdown,
//! client exit codes and SET. Every test runs the real binary, against the fake `op` where the
//! backend matters. The timed concurrency test lives alone in `core_concurrency.rs`.

mod common;
mod core_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use core_support::*;
use serde_json::{Value as Json, json};

// ---------------------------------------------------------------- 1. values and versions

#[test]
fn multiline_unicode_value_is_byte_exact_and_never_truncated_in_v1() {
    let dir = TestDir::new("c-bytes");
    let value = "{\n  \"token\": \"h\u{e9}llo w\u{f6}rld \u{2713} \u{1F511}\",\n  \"n\": 1\n}\n";
    let fake = FakeOp::new(&dir, json!({"Private": {"OAuth": {"json": value}, "Pair": {"a": value, "b": "x"}}}));
    let broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
        .env("OP_CRED_REF", "op://Private/OAuth/json")
        .env("OP_PAIR_A_REF", "op://Private/Pair/a")
        .env("OP_PAIR_B_REF", "op://Private/Pair/b")
        .start();
    // Both resolution paths: `op read` (one field of OAuth) and `op inject` (two of Pair).
    assert_eq!(calls_mentioning(&fake, "OAuth").len(), 1, "{:?}", fake.calls());
    assert_eq!(injects_mentioning(&fake, "Pair").len(), 1, "{:?}", fake.calls());
    for name in ["cred", "PAIR_A"] {
        let out = broker.client(&["get", name], None);
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(out.stdout, value.as_bytes(), "get {name}: {}", describe(&out));
    }

    let v1 = raw_exchange(&broker.socket, b"GET CRED\n", PROMPT).unwrap();
    let text = String::from_utf8_lossy(&v1);
    assert!(text.starts_with("ERR ") && text.contains("use HELLO 2"), "v1 GET: {text:?}");
    assert_eq!(text.matches('\n').count(), 1, "v1 GET must answer one line: {text:?}");
    assert!(!text.contains("token"), "v1 GET leaked part of the value: {text:?}");

    let v2 = raw_exchange(&broker.socket, b"HELLO 2\nGET CRED\n", PROMPT).unwrap();
    let mut expected = format!("OK 2\nOK {}\n", value.len()).into_bytes();
    expected.extend_from_slice(value.as_bytes());
    expected.push(b'\n');
    assert_eq!(String::from_utf8_lossy(&v2), String::from_utf8_lossy(&expected));
}

// ---------------------------------------------------------------- 2. concurrency, grouping

#[test]
fn op_calls_overlap_up_to_the_concurrency_bound() {
    // Counts live fake `op` processes instead of timing anything: under CPU load the calls
    // only overlap more, so this proves concurrency (and its bound) on any machine.
    let dir = TestDir::new("c-bound");
    let items: serde_json::Map<String, serde_json::Value> =
        (0..6).map(|i| (format!("Item{i}"), json!({"key": format!("v{i}")}))).collect();
    let fake = FakeOp::new(&dir, json!({ "Private": items }));
    fake.control(json!({"delay_ms": 1000}));
    let mut builder = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake).args(["--concurrency", "3"]);
    for i in 0..6 {
        builder = builder.env(format!("OP_S{i}_REF"), format!("op://Private/Item{i}/key"));
    }
    let mut broker = builder.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut most = 0;
    // Issue 13: six items in at most three batches (one `op inject` each).
    while fake.calls_of(&["inject"]).len() < 3 {
        assert!(Instant::now() < deadline, "resolution did not finish\nstderr:\n{}", broker.stderr());
        most = most.max(fake_op_processes(&fake.store).len());
        std::thread::sleep(Duration::from_millis(20));
    }
    broker.wait_ready(Duration::from_secs(20));
    assert!(most >= 2, "op calls never overlapped (at most {most} at once)");
    assert!(most <= 3, "{most} op calls at once with --concurrency 3");
    assert_get(&broker.socket, "S5", b"v5", "after start");
}

#[test]
fn fields_of_one_item_are_fetched_with_one_process() {
    let dir = TestDir::new("c-group");
    let fake = FakeOp::new(
        &dir,
        json!({"Private": {"Multi": {"user": "u1", "pass": "p1", "Sec": {"otp": "s1"}}, "Single": {"key": "k1"}}}),
    );
    let broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
        .env("OP_U_REF", "op://Private/Multi/user")
        .env("OP_P_REF", "op://Private/Multi/pass")
        .env("OP_S_REF", "op://Private/Multi/Sec/otp")
        .env("OP_K_REF", "op://Private/Single/key")
        .start();
    let multi = injects_mentioning(&fake, "Multi");
    assert_eq!(multi.len(), 1, "Multi asked for more than once: {:?}", fake.calls());
    assert_eq!(fake.calls_of(&["read"]).len(), 1, "{:?}", fake.calls());
    for (name, value) in [("U", "u1"), ("P", "p1"), ("S", "s1"), ("K", "k1")] {
        assert_get(&broker.socket, name, value.as_bytes(), "after start");
    }
}

// ---------------------------------------------------------------- 3-5. failures

#[test]
fn not_found_fails_start_without_retry_unless_allowed() {
    let dir = TestDir::new("c-nf");
    let fake = FakeOp::new(&dir, json!({"Private": {"Real": {"key": "k"}}}));
    let builder = || {
        with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
            .env("OP_GONE_REF", "op://Private/Nope/key")
            .env("OP_REAL_REF", "op://Private/Real/key")
    };
    let out = run_with_timeout(builder().command(), Duration::from_secs(30));
    assert_eq!(code(&out), Some(69), "{}", describe(&out));
    let err = stderr_text(&out);
    assert!(err.contains("GONE") && err.contains("isn't an item"), "{err}");
    let asked = calls_mentioning(&fake, "Nope");
    assert_eq!(asked.len(), 1, "a not-found reference was retried: {asked:?}");

    let broker = builder().arg("--allow-missing").start();
    let status = status_of(&broker);
    assert_eq!(state_of(&status, "GONE"), "missing", "{status}");
    assert_eq!(state_of(&status, "REAL"), "ok", "{status}");
    assert_get(&broker.socket, "REAL", b"k", "with --allow-missing");
    let out = broker.client(&["get", "GONE"], None);
    assert_eq!(code(&out), Some(1), "{}", describe(&out));
}

#[test]
fn auth_failures_are_permanent_and_server_errors_retried() {
    let dir = TestDir::new("c-class");
    let fake = FakeOp::new(&dir, json!({"Private": {"Api": {"key": "k"}}}));
    let builder = || {
        with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
            .env("OP_API_REF", "op://Private/Api/key")
            .args(["--retries", "3"])
    };
    fake.control(json!({"auth_fail": true}));
    let out = run_with_timeout(builder().command(), Duration::from_secs(30));
    assert_eq!(code(&out), Some(69), "{}", describe(&out));
    assert!(stderr_text(&out).contains("API") && stderr_text(&out).contains("401"), "{}", describe(&out));
    assert_eq!(fake.calls_of(&["read"]).len(), 1, "an auth failure was retried: {:?}", fake.calls());

    fake.control(json!({"server_error": true}));
    let out = run_with_timeout(builder().command(), Duration::from_secs(30));
    assert_eq!(code(&out), Some(69), "{}", describe(&out));
    assert!(stderr_text(&out).contains("500"), "{}", describe(&out));
    assert_eq!(fake.calls_of(&["read"]).len(), 1 + 3, "a 500 was not retried 3 times: {:?}", fake.calls());
}

#[test]
fn rate_limited_calls_are_retried_after_the_stated_delay() {
    let dir = TestDir::new("c-429");
    let fake = FakeOp::new(&dir, json!({"Private": {"Api": {"key": "k429"}}}));
    fake.control(json!({"rate_limit": 2, "rate_limit_retry_s": 1}));
    let broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake).env("OP_API_REF", "op://Private/Api/key").start();
    assert_get(&broker.socket, "API", b"k429", "after two 429s");
    let stderr = broker.stderr();
    assert!(stderr.contains("retry") && stderr.contains("429"), "no retry logged:\n{stderr}");
    let reads = fake.calls_of(&["read"]);
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert_eq!(reads.iter().filter(|c| c["exit"] == 0).count(), 1, "{reads:?}");
}

#[test]
fn hung_op_is_killed_after_the_timeout() {
    let dir = TestDir::new("c-hang");
    let fake = FakeOp::new(&dir, json!({"Private": {"Api": {"key": "k"}}}));
    fake.control(json!({"hang": true}));
    let builder = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
        .env("OP_API_REF", "op://Private/Api/key")
        .args(["--op-timeout", "1s", "--retries", "1"]);
    let started = Instant::now();
    let out = run_with_timeout(builder.command(), Duration::from_secs(30));
    let elapsed = started.elapsed();
    assert_eq!(code(&out), Some(69), "{}", describe(&out));
    assert!(elapsed < Duration::from_secs(15), "start took {elapsed:?}: {}", describe(&out));
    let err = stderr_text(&out).to_lowercase();
    assert!(err.contains("timeout") || err.contains("did not answer"), "{err}");
    assert!(err.contains("api"), "the error does not name the secret: {err}");
    assert_eq!(fake.calls_of(&["read"]).len(), 1, "{:?}", fake.calls());
    let left = || fake_op_processes(&fake.store);
    assert!(eventually(Duration::from_secs(5), || left().is_empty()), "fake op still running: {:?}", left());
}

#[test]
fn op_gets_a_null_stdin_for_reads() {
    let dir = TestDir::new("c-stdin");
    let fake = FakeOp::new(&dir, json!({"Private": {"One": {"a": "1"}, "Two": {"a": "2", "b": "3"}}}));
    let broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
        .env("OP_ONE_REF", "op://Private/One/a")
        .env("OP_TWO_A_REF", "op://Private/Two/a")
        .env("OP_TWO_B_REF", "op://Private/Two/b")
        .start();
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "{}", describe(&out));
    let calls = fake.calls();
    assert_eq!(fake.calls_of(&["read"]).len(), 2, "{calls:?}");
    // Issue 13: a batch is fed its template (references only, never a value).
    assert_eq!(fake.calls_of(&["inject"]).len(), 2, "{calls:?}");
    for call in &calls {
        if argv_of(call)[0] != "inject" {
            assert_eq!(call["stdin_devnull"], true, "op was not given /dev/null as stdin: {call}");
        }
    }
}

// ---------------------------------------------------------------- 7. refresh

#[test]
fn refresh_and_sighup_pick_up_changes_serve_stale_and_drop_deleted() {
    let dir = TestDir::new("c-refresh");
    let mut store = json!({"Private": {"Api": {"key": "v1"}, "Other": {"key": "o1"}}});
    let fake = FakeOp::new(&dir, store.clone());
    let broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
        .env("OP_API_REF", "op://Private/Api/key")
        .env("OP_OTHER_REF", "op://Private/Other/key")
        .args(["--retries", "1"])
        // Each REFRESH here must reach 1Password; clients are rate-limited by default.
        .args(["--refresh-min-interval", "0"])
        .start();
    assert_get(&broker.socket, "API", b"v1", "at start");

    store["Private"]["Api"]["key"] = json!("v2");
    fake.write_store(&store);
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert_get(&broker.socket, "API", b"v2", "after REFRESH");

    store["Private"]["Api"]["key"] = json!("v3");
    fake.write_store(&store);
    broker.signal(libc::SIGHUP);
    let got_v3 = eventually(Duration::from_secs(10), || broker.client(&["get", "API"], None).stdout == b"v3");
    assert!(got_v3, "SIGHUP did not re-resolve\nstderr:\n{}", broker.stderr());

    fake.control(json!({"outage": true}));
    let out = broker.client(&["refresh"], None);
    assert_eq!(code(&out), Some(1), "refresh during an outage: {}", describe(&out));
    let err = stderr_text(&out);
    assert!(err.contains("API") && err.contains("OTHER"), "refresh error does not name the secrets: {err}");
    assert_get(&broker.socket, "API", b"v3", "after a failed refresh");
    let status = status_of(&broker);
    assert_eq!(state_of(&status, "API"), "stale", "{status}");
    assert_eq!(state_of(&status, "OTHER"), "stale", "{status}");

    fake.control(json!({}));
    store["Private"].as_object_mut().unwrap().remove("Api");
    fake.write_store(&store);
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "refresh after a deletion: {}", describe(&out));
    let out = broker.client(&["get", "API"], None);
    assert_eq!(code(&out), Some(1), "deleted item still served: {}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert_get(&broker.socket, "OTHER", b"o1", "after the other item was deleted");
    let status = status_of(&broker);
    assert_eq!(state_of(&status, "API"), "missing", "{status}");
    assert_eq!(state_of(&status, "OTHER"), "ok", "{status}");
}

// ---------------------------------------------------------------- 8. abuse

#[test]
fn abusive_clients_never_stall_the_server() {
    let dir = TestDir::new("c-abuse");
    let fake = FakeOp::new(&dir, json!({"Private": {"Api": {"key": "abuse-ok"}}}));
    let broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake).env("OP_API_REF", "op://Private/Api/key").start();
    let socket = broker.socket.clone();
    let check = |when: &str| assert_get(&socket, "API", b"abuse-ok", when);

    // 1 MiB without a newline: ERR, then the connection is closed.
    let mut stream = connect(&socket);
    let _ = stream.write_all(&vec![b'A'; 1024 * 1024]);
    let (reply, closed) = read_until_closed(&mut stream);
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("ERR "), "oversized line: {text:?}");
    assert!(closed, "connection left open after an oversized line");
    drop(stream);
    check("after a 1 MiB line");

    // A framed value over the limit: ERR, then the connection is closed.
    let mut stream = connect(&socket);
    stream.write_all(b"HELLO 2\nSET API - 2000000\n").unwrap();
    let _ = stream.write_all(&vec![b'v'; 64 * 1024]);
    let (reply, closed) = read_until_closed(&mut stream);
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("OK 2\nERR "), "oversized frame: {text:?}");
    assert!(closed, "connection left open after an oversized frame");
    drop(stream);
    check("after an oversized frame");

    // A client that connects and never writes.
    let silent = connect(&socket);
    check("while a silent client is connected");

    // Invalid UTF-8: ERR, and the connection stays usable.
    let mut stream = connect(&socket);
    stream.write_all(b"GET \xff\xfe\xfd\nPING\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = Vec::new();
    reader.read_until(b'\n', &mut first).unwrap();
    assert!(first.starts_with(b"ERR "), "invalid UTF-8: {:?}", String::from_utf8_lossy(&first));
    let mut second = Vec::new();
    reader.read_until(b'\n', &mut second).unwrap();
    assert_eq!(String::from_utf8_lossy(&second), "OK pong\n", "connection unusable after invalid UTF-8");
    check("after invalid UTF-8");

    // 500 connections held open.
    let held: Vec<UnixStream> = (0..500).map(|_| connect(&socket)).collect();
    check("while 500 connections are held open");
    for mut conn in held.iter().step_by(50) {
        conn.write_all(b"PING\n").unwrap();
        let mut line = Vec::new();
        BufReader::new(conn).read_until(b'\n', &mut line).unwrap();
        assert_eq!(String::from_utf8_lossy(&line), "OK pong\n", "a held connection was not served");
    }
    drop(held);
    drop(silent);
    check("after the held connections closed");
}

#[test]
fn clients_that_never_read_replies_do_not_hold_connections_forever() {
    let dir = TestDir::new("c-noread");
    let backend = file_backend(&dir);
    let broker = BrokerBuilder::new(&dir, "daemon")
        .arg(&backend)
        .args(["--max-connections", "2", "--request-timeout", "1s"])
        .env("OP_API_REF", "op://dev/api/key")
        .start();
    // Two clients fill every connection slot, pipelining PINGs and never reading a reply.
    let hogs: Vec<UnixStream> = (0..2).map(|_| connect(&broker.socket)).collect();
    let writers: Vec<_> = hogs
        .iter()
        .map(|hog| {
            let mut stream = hog.try_clone().unwrap();
            std::thread::spawn(move || {
                let flood = b"PING\n".repeat(400_000);
                let _ = stream.write_all(&flood);
            })
        })
        .collect();
    let served = eventually(Duration::from_secs(15), || {
        let out = client_within(&broker.socket, &["get", "API"], None, PROMPT);
        out.status.success() && out.stdout == b"k"
    });
    assert!(served, "clients that never read kept every connection slot\nstderr:\n{}", broker.stderr());
    for writer in writers {
        writer.join().unwrap();
    }
    drop(hogs);
}

// ---------------------------------------------------------------- 9. peer uid

fn run_as_nobody(socket: &Path) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin())
        .arg("ping")
        .arg("--socket")
        .arg(socket);
    run_with_timeout(cmd, Duration::from_secs(10))
}

fn open_socket_to_all(socket: &Path) {
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
}

#[test]
fn peer_uid_is_checked() {
    if nix_getuid() != 0 {
        eprintln!("skipped: peer_uid_is_checked needs root");
        return;
    }
    let dir = TestDir::new("c-peer");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("vault.json"), r#"{"dev":{"api":{"key":"k"}}}"#).unwrap();
    let backend = format!("--backend=file:{}", dir.join("vault.json").display());
    let broker = BrokerBuilder::new(&dir, "daemon").arg(&backend).env("OP_API_REF", "op://dev/api/key").start();
    let mode = std::fs::metadata(&broker.socket).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "socket mode is {mode:o}");

    // The file mode alone keeps other uids out.
    let out = run_as_nobody(&broker.socket);
    assert_eq!(code(&out), Some(3), "uid 65534 connected through a 0600 socket: {}", describe(&out));

    // With the file mode opened up, SO_PEERCRED must still refuse.
    open_socket_to_all(&broker.socket);
    let out = run_as_nobody(&broker.socket);
    assert!(!out.status.success(), "uid 65534 was let in: {}", describe(&out));
    assert!(stderr_text(&out).contains("permission denied"), "{}", describe(&out));
    assert_get(&broker.socket, "API", b"k", "after a refused peer");

    let dir2 = TestDir::new("c-peer2");
    std::fs::set_permissions(dir2.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let allowed = BrokerBuilder::new(&dir2, "daemon")
        .arg(&backend)
        .args(["--allow-uid", "65534"])
        .env("OP_API_REF", "op://dev/api/key")
        .start();
    open_socket_to_all(&allowed.socket);
    let out = run_as_nobody(&allowed.socket);
    assert!(out.status.success(), "--allow-uid 65534 did not let it in: {}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pong");
}

// ---------------------------------------------------------------- 10. socket ownership

#[test]
fn second_daemon_is_refused_and_stale_socket_replaced() {
    let dir = TestDir::new("c-sock");
    let backend = file_backend(&dir);
    let builder = || BrokerBuilder::new(&dir, "daemon").arg(&backend).env("OP_API_REF", "op://dev/api/key");
    let mut first = builder().start();
    let out = run_with_timeout(builder().command(), Duration::from_secs(20));
    assert_eq!(code(&out), Some(125), "{}", describe(&out));
    assert!(stderr_text(&out).contains("already serving"), "{}", describe(&out));
    assert_get(&first.socket, "API", b"k", "after a second daemon was refused");

    first.signal(libc::SIGKILL);
    first.wait(Duration::from_secs(10));
    assert!(first.socket.exists(), "SIGKILL should leave the socket file behind");
    let second = builder().start();
    assert_get(&second.socket, "API", b"k", "from the daemon that replaced a stale socket");
}

#[test]
fn regular_file_or_symlink_at_socket_path_is_left_alone() {
    let dir = TestDir::new("c-nosock");
    let backend = file_backend(&dir);
    let builder = || BrokerBuilder::new(&dir, "daemon").arg(&backend).env("OP_API_REF", "op://dev/api/key");
    let socket = builder().socket().to_path_buf();

    std::fs::write(&socket, b"precious").unwrap();
    let out = run_with_timeout(builder().command(), Duration::from_secs(20));
    assert_eq!(code(&out), Some(125), "{}", describe(&out));
    assert!(stderr_text(&out).contains("not a socket"), "{}", describe(&out));
    assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
    std::fs::remove_file(&socket).unwrap();

    let target = dir.join("target.txt");
    std::fs::write(&target, b"target").unwrap();
    std::os::unix::fs::symlink(&target, &socket).unwrap();
    let out = run_with_timeout(builder().command(), Duration::from_secs(20));
    assert_eq!(code(&out), Some(125), "{}", describe(&out));
    assert!(stderr_text(&out).contains("symlink"), "{}", describe(&out));
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(&socket).unwrap(), target);
    assert_eq!(std::fs::read(&target).unwrap(), b"target");
}

// ---------------------------------------------------------------- 11. leaks

#[test]
fn secret_values_never_leak() {
    let dir = TestDir::new("c-leak");
    let tag = tag();
    let api = format!("S3CRET-API-{tag}");
    let multi_a = format!("S3CRET-MA-{tag}\nsecond line\n");
    let multi_b = format!("S3CRET-MB-{tag}");
    let mut store = json!({"Private": {"Api": {"key": api}, "Multi": {"a": multi_a, "b": multi_b}}});
    let fake = FakeOp::new(&dir, store.clone());
    let audit = dir.join("audit.jsonl");
    let broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
        .env("OP_API_REF", "op://Private/Api/key")
        .env("OP_MULTI_A_REF", "op://Private/Multi/a")
        .env("OP_MULTI_B_REF", "op://Private/Multi/b")
        .args(["--log-level", "trace", "--allow-set-any", "--retries", "1", "--refresh-min-interval", "0"])
        .arg(format!("--audit-log={}", audit.display()))
        .start();
    let mut shown = Vec::<(String, Vec<u8>)>::new();
    let mut run = |args: &[&str], stdin: Option<&[u8]>, keep_stdout: bool| {
        let out = broker.client(args, stdin);
        if keep_stdout {
            shown.push((format!("stdout of {args:?}"), out.stdout.clone()));
        }
        shown.push((format!("stderr of {args:?}"), out.stderr.clone()));
        out
    };

    assert_eq!(run(&["get", "API"], None, false).stdout, api.as_bytes());
    assert_eq!(run(&["get", "MULTI_A"], None, false).stdout, multi_a.as_bytes());
    assert_eq!(run(&["get", "op://Private/Multi/b"], None, false).stdout, multi_b.as_bytes());
    assert_eq!(code(&run(&["get", "NOPE"], None, true)), Some(1));
    assert!(run(&["list"], None, true).status.success());
    assert!(run(&["status"], None, true).status.success());
    assert!(run(&["status", "--json"], None, true).status.success());

    store["Private"]["Api"]["key"] = json!(format!("S3CRET-NEW-{tag}"));
    fake.write_store(&store);
    assert!(run(&["refresh"], None, true).status.success());

    let set_value = format!("S3CRET-SET-{tag}\n{{\"x\": 1}}\n");
    let out = run(&["set", "API"], Some(set_value.as_bytes()), true);
    assert!(out.status.success(), "{}", describe(&out));
    let out = run(&["set", "EXTRA", "op://Private/Multi/extra"], Some(format!("S3CRET-X-{tag}").as_bytes()), true);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(run(&["delete", "MULTI_B"], None, true).status.success());

    fake.control(json!({"outage": true}));
    assert_eq!(code(&run(&["refresh"], None, true)), Some(1));
    assert!(run(&["status", "--json"], None, true).status.success());
    fake.control(json!({}));

    shown.push(("daemon stderr".into(), broker.stderr().into_bytes()));
    shown.push(("daemon stdout".into(), broker.stdout().into_bytes()));
    shown.push(("audit log".into(), std::fs::read(&audit).unwrap_or_default()));
    for call in fake.calls() {
        shown.push((format!("op argv {:?}", call["argv"]), call["argv"].to_string().into_bytes()));
    }
    assert!(broker.stderr().contains("TRACE"), "trace logging is not on:\n{}", broker.stderr());
    for (what, bytes) in &shown {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(&tag), "a secret value leaked into {what}:\n{text}");
    }
    // The writes did reach the store (so the checks above saw real traffic).
    let stored = fake.read_store();
    assert_eq!(stored["Private"]["Api"]["key"], json!(set_value));
    assert_eq!(stored["Private"]["Multi"]["extra"], json!(format!("S3CRET-X-{tag}")));
}

// ---------------------------------------------------------------- 12-13. shutdown, exit codes

#[test]
fn sigterm_exits_zero_and_removes_socket_and_pid_file() {
    let dir = TestDir::new("c-term");
    let backend = file_backend(&dir);
    let pid_file = dir.join("op-bridge.pid");
    let mut broker = BrokerBuilder::new(&dir, "daemon")
        .arg(&backend)
        .arg(format!("--pid-file={}", pid_file.display()))
        .env("OP_API_REF", "op://dev/api/key")
        .start();
    let written = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(written.trim(), broker.pid().to_string());
    // An idle connection must not keep the daemon from stopping.
    let _idle = connect(&broker.socket);
    broker.signal(libc::SIGTERM);
    let status = broker.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}\nstderr:\n{}", broker.stderr());
    assert!(!broker.socket.exists(), "socket left behind");
    assert!(!pid_file.exists(), "pid file left behind");
}

#[test]
fn sigterm_during_a_refresh_still_cleans_up() {
    let dir = TestDir::new("c-termhup");
    let fake = FakeOp::new(&dir, json!({"Private": {"Api": {"key": "k"}}}));
    let pid_file = dir.join("op-bridge.pid");
    let mut broker = with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
        .arg(format!("--pid-file={}", pid_file.display()))
        .env("OP_API_REF", "op://Private/Api/key")
        .start();
    fake.control(json!({"hang": true}));
    broker.signal(libc::SIGHUP);
    // SIGTERM while the SIGHUP refresh is still waiting for a hung `op`.
    let started = || fake_op_processes(&fake.store).len() == 1;
    assert!(eventually(Duration::from_secs(10), started), "the SIGHUP refresh did not start");
    broker.signal(libc::SIGTERM);
    let status = broker.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{status}\nstderr:\n{}", broker.stderr());
    let left = || fake_op_processes(&fake.store);
    assert!(eventually(Duration::from_secs(5), || left().is_empty()), "op outlived the daemon: {:?}", left());
    assert!(!broker.socket.exists(), "socket left behind\nstderr:\n{}", broker.stderr());
    assert!(!pid_file.exists(), "pid file left behind\nstderr:\n{}", broker.stderr());
}

#[test]
fn client_exit_codes() {
    let dir = TestDir::new("c-exit");
    let backend = file_backend(&dir);
    let broker = BrokerBuilder::new(&dir, "daemon").arg(&backend).env("OP_API_REF", "op://dev/api/key").start();
    let out = broker.client(&["get", "API"], None);
    assert_eq!(code(&out), Some(0), "{}", describe(&out));
    let out = broker.client(&["get", "UNKNOWN"], None);
    assert_eq!(code(&out), Some(1), "{}", describe(&out));
    assert!(stderr_text(&out).contains("unknown ref: UNKNOWN"), "{}", describe(&out));
    let out = broker.client(&["get", "a", "b", "c"], None);
    assert_eq!(code(&out), Some(2), "{}", describe(&out));
    let out = client(&dir.join("nothing-here.sock"), &["get", "API"], None);
    assert_eq!(code(&out), Some(3), "{}", describe(&out));
    let out = client(&dir.join("nothing-here.sock"), &["ping"], None);
    assert_eq!(code(&out), Some(3), "{}", describe(&out));
}

// ---------------------------------------------------------------- 14. SET

#[test]
fn set_writes_through_and_respects_policy() {
    let dir = TestDir::new("c-set");
    let fake = FakeOp::new(&dir, json!({"Private": {"Api": {"key": "old"}, "Other": {"key": "other"}}}));
    let builder = || {
        with_fake(BrokerBuilder::new(&dir, "daemon"), &fake)
            .env("OP_API_REF", "op://Private/Api/key")
            .env("OP_OTHER_REF", "op://Private/Other/key")
    };
    let value = "line one\nline two \u{e9}\n\n";
    {
        let broker = builder().start();
        let out = broker.client(&["set", "api"], Some(value.as_bytes()));
        assert!(out.status.success(), "{}", describe(&out));
        assert_get(&broker.socket, "API", value.as_bytes(), "after SET");
        assert_eq!(fake.read_store()["Private"]["Api"]["key"], json!(value));
        let edits = fake.calls_of(&["item", "edit"]);
        assert_eq!(edits.len(), 1, "{edits:?}");
        assert_eq!(edits[0]["stdin_devnull"], false, "item edit must read the item from stdin");

        // Another reference than the registered one.
        let out = broker.client(&["set", "API", "op://Private/Other/key"], Some(b"hijack"));
        assert_eq!(code(&out), Some(1), "{}", describe(&out));
        assert!(stderr_text(&out).contains("allow-set-any"), "{}", describe(&out));
        assert_eq!(fake.read_store()["Private"]["Other"]["key"], json!("other"));
        assert_get(&broker.socket, "API", value.as_bytes(), "after a refused SET");
    }
    {
        let broker = builder().arg("--allow-set-any").start();
        let out = broker.client(&["set", "API", "op://Private/Other/key"], Some(b"redirected"));
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(fake.read_store()["Private"]["Other"]["key"], json!("redirected"));
    }
    {
        let broker = builder().arg("--read-only").start();
        let edits_before = fake.calls_of(&["item", "edit"]).len();
        let out = broker.client(&["set", "API"], Some(b"nope"));
        assert_eq!(code(&out), Some(1), "{}", describe(&out));
        assert!(stderr_text(&out).contains("read-only"), "{}", describe(&out));
        let out = broker.client(&["delete", "API"], None);
        assert_eq!(code(&out), Some(1), "{}", describe(&out));
        assert!(stderr_text(&out).contains("read-only"), "{}", describe(&out));
        assert_get(&broker.socket, "API", value.as_bytes(), "after refused SET and DELETE");
        assert_eq!(fake.calls_of(&["item", "edit"]).len(), edits_before, "--read-only still wrote");
    }
}

// ---------------------------------------------------------------- client against a version-1 daemon

/// A minimal seed (version 1) daemon: answers HELLO with ERR like the seed did, records every
/// request line, and serves one value.
fn seed_daemon(socket: &Path) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    log.lock().unwrap().push(line.clone());
                    let word = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let reply = match word.as_str() {
                        "PING" => "OK pong".to_string(),
                        "GET" => "OK seed-value".to_string(),
                        "SET" => "OK".to_string(),
                        _ => format!("ERR unknown command: {word}"),
                    };
                    if writeln!(writer, "{reply}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    seen
}

#[test]
fn client_falls_back_to_version_1_without_corrupting_set() {
    let dir = TestDir::new("c-seed");
    let socket = dir.join("seed.sock");
    let seen = seed_daemon(&socket);
    let out = client(&socket, &["get", "API"], None);
    assert_eq!(out.stdout, b"seed-value", "{}", describe(&out));
    let out = client(&socket, &["set", "API"], Some(b"one line value"));
    assert!(out.status.success(), "{}", describe(&out));
    let sets: Vec<String> = seen.lock().unwrap().iter().filter(|l| l.starts_with("SET ")).cloned().collect();
    assert_eq!(sets, ["SET API - one line value"], "a version-1 daemon got a framed SET");
    // A value version 1 cannot carry is refused by the client, not sent in pieces.
    let out = client(&socket, &["set", "API"], Some(b"two\nlines"));
    assert!(!out.status.success(), "{}", describe(&out));
    let lines = seen.lock().unwrap().clone();
    assert!(!lines.iter().any(|l| l.contains("two") || l.contains("lines")), "{lines:?}");
}

/// `op inject` calls whose template mentions `needle` (batched resolution, issue 13).
fn injects_mentioning(fake: &FakeOp, needle: &str) -> Vec<Json> {
    fake.calls_of(&["inject"]).into_iter().filter(|c| c["stdin"].as_str().is_some_and(|s| s.contains(needle))).collect()
}

#[test]
fn sigquit_stops_a_running_daemon_cleanly() {
    let dir = TestDir::new("c-quit");
    let backend = file_backend(&dir);
    let mut broker = BrokerBuilder::new(&dir, "daemon").arg(&backend).env("OP_API_REF", "op://dev/api/key").start();
    broker.signal(libc::SIGQUIT);
    let status = broker.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}\nstderr:\n{}", broker.stderr());
    assert!(!broker.socket.exists(), "socket left behind");
}
