//! Hardening: locked memory, no dumps, the audit log, leak searches over every output, and
//! abuse of the socket. Runs as root (CI does); non-root cases drop to uid 65534 with setpriv.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value as Json, json};

const NOBODY: &str = "65534";

fn open_dir_for_nobody(dir: &TestDir) {
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
}

fn status_field(pid: i32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} missing"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// op-bridge started through `setpriv` as uid 65534 (its pid is setpriv's, which execs).
fn as_nobody(dir: &TestDir, builder: BrokerBuilder, prefix: &[&str]) -> Broker {
    let inner = builder.command();
    let mut cmd = Command::new(prefix.first().copied().unwrap_or("setpriv"));
    let mut args: Vec<String> = prefix.iter().skip(1).map(|s| s.to_string()).collect();
    if !prefix.is_empty() {
        args.push("setpriv".into());
    }
    args.extend(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"].map(String::from));
    args.push(inner.get_program().to_string_lossy().into_owned());
    args.extend(inner.get_args().map(|a| a.to_string_lossy().into_owned()));
    cmd.args(args).env_clear().envs(inner.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
    let stderr_path = dir.join("nobody.stderr");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(dir.join("nobody.stdout")).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let child = cmd.spawn().unwrap();
    Broker { child, socket: dir.join("s.sock"), stderr_path, stdout_path: dir.join("nobody.stdout") }
}

fn vault(dir: &TestDir, content: Json) -> String {
    let path = dir.join("vault.json");
    std::fs::write(&path, serde_json::to_vec(&content).unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    format!("--backend=file:{}", path.display())
}

#[test]
fn secrets_are_in_locked_memory_under_the_default_limit() {
    let dir = TestDir::new("hd-lock");
    open_dir_for_nobody(&dir);
    let backend = vault(&dir, json!({"v": {"i": {"a": "alpha-secret", "b": "bravo-secret", "c": "x".repeat(10000)}}}));
    let builder = BrokerBuilder::new(&dir, "daemon")
        .arg(backend)
        .env("OP_A_REF", "op://v/i/a")
        .env("OP_B_REF", "op://v/i/b")
        .env("OP_C_REF", "op://v/i/c");
    let mut broker = as_nobody(&dir, builder, &[]);
    broker.wait_ready(Duration::from_secs(20));
    let locked_kb = status_field(broker.pid(), "VmLck:");
    assert!(locked_kb >= 3 * 4, "VmLck {locked_kb} kB\n{}", broker.stderr());
    let status: Json =
        serde_json::from_slice(&broker.client(&["status", "--json", "--server-uid", NOBODY], None).stdout).unwrap();
    assert!(status["memory"]["locked_bytes"].as_u64().unwrap() >= 5 * 4096, "{status}");
    assert_eq!(status["memory"]["unlocked_bytes"], 0);
    assert!(!broker.stderr().contains("could not lock"));
}

#[test]
fn a_too_small_memlock_limit_is_reported_once_and_serving_goes_on() {
    let dir = TestDir::new("hd-nolock");
    open_dir_for_nobody(&dir);
    let backend = vault(&dir, json!({"v": {"i": {"a": "alpha-secret", "b": "bravo-secret"}}}));
    let builder =
        BrokerBuilder::new(&dir, "daemon").arg(backend).env("OP_A_REF", "op://v/i/a").env("OP_B_REF", "op://v/i/b");
    let mut broker = as_nobody(&dir, builder, &["prlimit", "--memlock=0:0"]);
    broker.wait_ready(Duration::from_secs(20));
    // A root client trusts a server of another uid only when told to.
    assert_eq!(broker.client(&["get", "A", "--server-uid", NOBODY], None).stdout, b"alpha-secret");
    let stderr = broker.stderr();
    assert_eq!(stderr.matches("could not lock all secret memory").count(), 1, "{stderr}");
    assert!(stderr.contains("needed 8192 bytes") && stderr.contains("RLIMIT_MEMLOCK is 0 bytes"), "{stderr}");
    assert_eq!(status_field(broker.pid(), "VmLck:"), 0);
}

#[test]
fn a_same_uid_child_cannot_read_the_brokers_environ_or_memory() {
    let dir = TestDir::new("hd-dump");
    open_dir_for_nobody(&dir);
    let backend = vault(&dir, json!({"v": {"i": {"a": "alpha-secret"}}}));
    let report = dir.join("report");
    let script = format!(
        "r={report}; \
         if cat /proc/$PPID/environ >/dev/null 2>&1; then echo environ-readable >> $r; else echo environ-denied >> $r; fi; \
         if dd if=/proc/$PPID/mem bs=1 count=1 skip=4194304 >/dev/null 2>&1; then echo mem-readable >> $r; else echo mem-denied >> $r; fi; \
         if cat /proc/self/environ >/dev/null 2>&1; then echo own-readable >> $r; fi; \
         grep -q '^Uid:.65534' /proc/$PPID/status && echo same-uid >> $r; exit 0",
        report = report.display()
    );
    let builder = BrokerBuilder::new(&dir, "run")
        .arg(backend)
        .env("OP_A_REF", "op://v/i/a")
        .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_token_value")
        .args(["--", "sh", "-c"])
        .arg(script);
    let mut broker = as_nobody(&dir, builder, &[]);
    let status = broker.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", broker.stderr());
    let report = std::fs::read_to_string(&report).unwrap();
    for want in ["same-uid", "environ-denied", "mem-denied", "own-readable"] {
        assert!(report.lines().any(|l| l == want), "{want} missing from:\n{report}");
    }
}

#[test]
fn the_audit_log_has_a_line_for_every_request_and_no_value() {
    let dir = TestDir::new("hd-audit");
    let backend = vault(&dir, json!({"v": {"i": {"a": "audit-secret-A", "b": "audit-secret-B"}}}));
    let audit = dir.join("audit.jsonl");
    let broker = BrokerBuilder::new(&dir, "daemon")
        .arg(backend)
        .args(["--audit-log".to_string(), audit.display().to_string()])
        .env("OP_A_REF", "op://v/i/a")
        .env("OP_B_REF", "op://v/i/b")
        .start();
    let session: &[u8] = b"PING\nLIST\nGET A\nGET NOPE\nSTATUS\nBOGUS x\nHELLO 2\nGET B\nSET A - 14\naudit-secret-C\nDELETE B\nREFRESH\n";
    let reply = raw_exchange(&broker.socket, session, Duration::from_secs(10)).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply).lines().filter(|l| l.starts_with("OK") || l.starts_with("ERR")).count(),
        11
    );
    // One client command: its pipelined HELLO and the request.
    assert!(broker.client(&["ping"], None).status.success());
    // The audit log is written by a background thread (non-blocking): wait for the last line.
    let mut text = String::new();
    let complete = common::eventually(Duration::from_secs(10), || {
        text = std::fs::read_to_string(&audit).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        lines.iter().filter(|l| l.contains(r#""command":"HELLO""#)).count() >= 2
            && lines.last().is_some_and(|l| l.contains(r#""command":"PING""#))
    });
    assert!(complete, "{text}");
    let all: Vec<Json> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // The harness's readiness probes come first.
    let probes = all.iter().take_while(|l| l["command"] == "PING").count();
    assert!(probes >= 1);
    // The session itself starts with a PING too.
    let lines = &all[probes - 1..];
    let commands: Vec<&str> = lines.iter().map(|l| l["command"].as_str().unwrap()).collect();
    let wanted = [
        "PING", "LIST", "GET", "GET", "STATUS", "INVALID", "HELLO", "GET", "SET", "DELETE", "REFRESH", "HELLO", "PING",
    ];
    assert_eq!(commands, wanted, "{text}");
    for line in lines {
        for key in ["time", "pid", "uid", "gid", "exe", "command", "result"] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
    }
    assert_eq!(lines[2]["name"], "A");
    assert_eq!(lines[3]["result"], "error");
    assert!(lines[12]["exe"].as_str().unwrap().ends_with("op-bridge"), "{}", lines[12]);
    assert!(!text.contains("audit-secret"), "{text}");
    assert_eq!(std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777, 0o600);
}

/// Every output of every command path, searched for every value.
#[test]
fn no_value_leaks_anywhere() {
    let dir = TestDir::new("hd-leak");
    let secrets = ["LEAKCHECK-alpha-7f3a", "LEAKCHECK-bravo-91c2", "LEAKCHECK-charlie-44d0"];
    let fake = FakeOp::new(
        &dir,
        json!({"Vault": {"Alpha": {"password": secrets[0]}, "Bravo": {"token": secrets[1], "other": secrets[2]}}}),
    );
    let watched = dir.join("creds.json");
    let audit = dir.join("audit.jsonl");
    let child_env = dir.join("child.env");
    let mut broker = BrokerBuilder::new(&dir, "run")
        .fake_op(&fake)
        .args(["--log-level", "trace", "--retries", "1", "--debounce", "50ms", "--grace", "2s", "--allow-set-any"])
        .args(["--audit-log".to_string(), audit.display().to_string()])
        .args(["--watch".to_string(), format!("{}=op://Vault/Bravo/other", watched.display())])
        .args(["--export", "ALPHA=APP_ALPHA"])
        .env("OP_ALPHA_REF", "op://Vault/Alpha/password")
        .env("OP_BRAVO_REF", "op://Vault/Bravo/token")
        .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_LEAKCHECK_token")
        .args(["--", "sh", "-c"])
        .arg(format!("env > {}; sleep 30", child_env.display()))
        .spawn();
    broker.wait_ready(Duration::from_secs(20));
    let rotated = "LEAKCHECK-rotated-5be1";
    let set_value = "LEAKCHECK-set-0a9d\nsecond line";
    let mut outputs = Vec::new();
    for args in [&["get", "ALPHA"][..], &["list"], &["status"], &["status", "--json"], &["refresh"], &["get", "NOPE"]] {
        outputs.push(broker.client(args, None));
    }
    outputs.push(broker.client(&["set", "BRAVO"], Some(set_value.as_bytes())));
    std::fs::write(&watched, rotated).unwrap();
    assert!(eventually(Duration::from_secs(10), || fake.read_store()["Vault"]["Bravo"]["other"] == rotated));
    // Failures of op: a refresh and a write during an outage.
    fake.control(json!({"outage": true}));
    outputs.push(broker.client(&["refresh"], None));
    outputs.push(broker.client(&["status", "--json"], None));
    outputs.push(broker.client(&["set", "ALPHA", "op://Vault/Alpha/password"], Some(b"LEAKCHECK-during-outage")));
    outputs.push(broker.client(&["delete", "BRAVO"], None));
    fake.control(json!({}));
    broker.signal(libc::SIGTERM);
    broker.wait(Duration::from_secs(30));

    let mut haystacks = vec![
        ("op-bridge stderr", broker.stderr()),
        ("op-bridge stdout", broker.stdout()),
        ("audit log", std::fs::read_to_string(&audit).unwrap()),
    ];
    for (i, out) in outputs.iter().enumerate() {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // `get ALPHA` prints the value by design; every other stdout and all stderr must not.
        if i != 0 {
            haystacks.push(("client stdout", stdout));
        }
        haystacks.push(("client stderr", String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    for call in fake.calls() {
        haystacks.push(("op argv", call["argv"].to_string()));
    }
    let env = std::fs::read_to_string(&child_env).unwrap();
    let env_without_export: String =
        env.lines().filter(|l| !l.starts_with("APP_ALPHA=")).collect::<Vec<_>>().join("\n");
    haystacks.push(("child environment", env_without_export));
    assert!(env.lines().any(|l| l == format!("APP_ALPHA={}", secrets[0])), "export missing:\n{env}");
    assert!(!env.contains("OP_SERVICE_ACCOUNT_TOKEN") && !env.contains("_REF="), "{env}");
    assert!(broker.stderr().contains("TRACE") || broker.stderr().contains("trace"), "trace level not active");

    let mut all = secrets.to_vec();
    all.extend([rotated, "LEAKCHECK-set-0a9d", "second line", "LEAKCHECK-during-outage", "ops_LEAKCHECK_token"]);
    for (what, text) in &haystacks {
        for secret in &all {
            if *what == "child environment" && *secret == "ops_LEAKCHECK_token" {
                continue;
            }
            assert!(!text.contains(secret), "{secret} found in {what}:\n{text}");
        }
    }
}

fn rss_kb(pid: i32) -> u64 {
    status_field(pid, "VmRSS:")
}

#[test]
fn floods_and_malformed_frames_are_refused_while_serving_goes_on() {
    let dir = TestDir::new("hd-abuse");
    let backend = vault(&dir, json!({"v": {"i": {"a": "abuse-A"}}}));
    let broker = BrokerBuilder::new(&dir, "daemon").arg(backend).env("OP_A_REF", "op://v/i/a").start();
    let socket = broker.socket.clone();
    let rss_before = rss_kb(broker.pid());

    // 10,000 GETs on 200 connections, pipelined in batches.
    let threads: Vec<_> = (0..200)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                stream.write_all(&b"GET A\n".repeat(50)).unwrap();
                let mut reader = BufReader::new(stream);
                let mut ok = 0;
                let mut line = String::new();
                while ok < 50 && reader.read_line(&mut line).unwrap() > 0 {
                    assert_eq!(line, "OK abuse-A\n");
                    ok += 1;
                    line.clear();
                }
                ok
            })
        })
        .collect();
    // A legitimate client is answered during the flood.
    assert_eq!(client(&socket, &["get", "A"], None).stdout, b"abuse-A");
    let answered: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(answered, 10_000);

    // A frame announcing 10 GiB is refused without allocating it.
    let reply = raw_exchange(&socket, b"HELLO 2\nSET A - 10737418240\n", Duration::from_secs(5)).unwrap();
    assert!(String::from_utf8_lossy(&reply).contains("ERR value of 10737418240 bytes"), "{reply:?}");
    // Requests cut off mid-frame and mid-line.
    for cut in [&b"HELLO 2\nSET A - 100\nabc"[..], b"GET A", b"HELLO 2\nSET A op://v/i/a 5\nab\r"] {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(cut).unwrap();
        drop(stream);
    }
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(b"HELLO 2\nSET A - 5\nabcdefgh\n").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("OK 2\nERR bad frame"), "{reply:?}");

    assert_eq!(client(&socket, &["get", "A"], None).stdout, b"abuse-A");
    let rss_after = rss_kb(broker.pid());
    assert!(rss_after < rss_before + 64 * 1024, "RSS grew from {rss_before} kB to {rss_after} kB");
}

#[test]
fn socket_paths_through_symlinks_or_on_files_are_refused() {
    let dir = TestDir::new("hd-path");
    let backend = vault(&dir, json!({"v": {"i": {"a": "A"}}}));
    let target = dir.join("elsewhere.sock");
    std::os::unix::fs::symlink(&target, dir.join("s.sock")).unwrap();
    let out = BrokerBuilder::new(&dir, "daemon").arg(backend.clone()).output();
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a symlink, not a socket"), "{}", describe(&out));
    assert!(std::fs::symlink_metadata(dir.join("s.sock")).unwrap().file_type().is_symlink());
    assert!(!Path::new(&target).exists());

    std::fs::remove_file(dir.join("s.sock")).unwrap();
    std::fs::write(dir.join("s.sock"), "precious").unwrap();
    let out = BrokerBuilder::new(&dir, "daemon").arg(backend).output();
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a regular file, not a socket"), "{}", describe(&out));
    assert_eq!(std::fs::read_to_string(dir.join("s.sock")).unwrap(), "precious");
}
