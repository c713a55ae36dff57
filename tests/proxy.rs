//! Agent-blind secrets end to end: bindings and placeholders (GET, exec provider, `--export`,
//! STATUS, `--allow-raw`, `--cache`) and the egress proxy, driven by real clients (curl,
//! Python's `requests` and `httpx`, the official `openai` SDK) against the fake HTTPS
//! upstream in `tests/fake-upstream/` with its own test CA. The Python venv is made once by
//! `tests/fake-upstream/setup.sh` (pip, from PyPI).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value as Json, json};

const LIMIT: Duration = Duration::from_secs(60);

fn random_key() -> String {
    format!("sk-real-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The fake upstream, killed on drop.
struct Upstream {
    child: Child,
    port: u16,
    ca: PathBuf,
    log: PathBuf,
}

impl Upstream {
    fn start(dir: &TestDir, key: &str) -> Upstream {
        let log = dir.join("upstream.jsonl");
        let certs = std::env::temp_dir().join("opb-proxy-test-certs");
        let mut child = Command::new("python3")
            .arg(fixtures::repo().join("tests/fake-upstream/server.py"))
            .arg("--certs")
            .arg(&certs)
            .arg("--log")
            .arg(&log)
            .env("FAKE_UPSTREAM_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ready: Json = serde_json::from_str(&line).unwrap_or_else(|_| panic!("upstream did not start: {line:?}"));
        Upstream {
            child,
            port: ready["port"].as_u64().unwrap() as u16,
            ca: PathBuf::from(ready["ca"].as_str().unwrap()),
            log,
        }
    }

    /// Every request the upstream received.
    fn received(&self) -> Vec<Json> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file vault holding API and OTHER (both `key`).
fn vault(dir: &TestDir, key: &str) -> String {
    let path = dir.join("vault.json");
    std::fs::write(&path, json!({"v": {"api": {"key": key}, "other": {"key": "other-value-not-sent"}}}).to_string())
        .unwrap();
    format!("file:{}", path.display())
}

/// A broker with API bound to the upstream (as `localhost:PORT`) and OTHER bound elsewhere.
fn builder(dir: &TestDir, mode: &str, key: &str, upstream: &Upstream) -> BrokerBuilder {
    BrokerBuilder::new(dir, mode)
        .arg("--backend")
        .arg(vault(dir, key))
        .env("OP_API_REF", "op://v/api/key")
        .env("OP_OTHER_REF", "op://v/other/key")
        .env("OP_API_HOSTS", format!("localhost:{}", upstream.port))
        .env("OP_OTHER_HOSTS", "other.test")
        .env("SSL_CERT_FILE", upstream.ca.display().to_string())
        .args(["--audit-log", &dir.join("audit.jsonl").display().to_string()])
}

fn audit_lines(dir: &TestDir) -> Vec<Json> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn status(broker: &Broker) -> Json {
    let out = broker.client(&["status", "--json"], None);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// GET NAME's answer, as text.
fn get(broker: &Broker, name: &str) -> String {
    String::from_utf8(broker.client(&["get", name], None).stdout).unwrap()
}

/// Runs `op-bridge run … -- sh -c SCRIPT` to completion; returns (status, stdout, stderr).
fn run_child(builder: BrokerBuilder, script: &str) -> (std::process::ExitStatus, String, String) {
    let out = run_with_timeout(builder.args(["--", "sh", "-c", script]).command(), Duration::from_secs(120));
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// [`run_child`] for a command that must succeed; returns its stdout and stderr.
fn run_ok(builder: BrokerBuilder, script: &str) -> (String, String) {
    let (code, stdout, stderr) = run_child(builder, script);
    assert!(code.success(), "the command failed: {code:?}\n{stdout}\n{stderr}");
    (stdout, stderr)
}

/// A test's directory, a random key, and the fake upstream that expects that key.
fn scene(tag: &str) -> (TestDir, String, Upstream) {
    let dir = TestDir::new(tag);
    let key = random_key();
    let upstream = Upstream::start(&dir, &key);
    (dir, key, upstream)
}

/// The egress proxy on an ephemeral loopback port, allowed to reach the upstream on loopback.
const PROXY: [&str; 3] = ["--proxy", "127.0.0.1:0", "--proxy-allow-private"];

fn places(record: &Json) -> Vec<String> {
    record["key_at"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

#[test]
fn clients_send_placeholders_and_the_upstream_gets_the_value() {
    let (dir, key, upstream) = scene("px-subst");
    let py = fixtures::python();
    let script = format!(
        r#"set -e
env > "{env}"
base="https://localhost:{port}"
curl -sS -o /dev/null "$base/echo?tag=bearer" -H "Authorization: Bearer $API"
curl -sS -o /dev/null "$base/echo?tag=xapikey" -H "x-api-key: $API"
curl -sS -o /dev/null "$base/echo?tag=query&key=$API"
curl -sS -o /dev/null -u "user:$API" "$base/echo?tag=basic"
curl -sS -o /dev/null "$base/echo?tag=json" -H 'content-type: application/json' -d "{{\"api_key\": \"$API\", \"n\": 1}}"
"{py}" - <<'EOF'
import os, requests, httpx
key = os.environ["API"]
base = "https://localhost:{port}"
r = requests.post(base + "/echo?tag=requests-form", data={{"key": key}}, headers={{"Authorization": "Bearer " + key}})
assert r.status_code == 200, r.text
with httpx.Client() as c:
    r = c.post(base + "/echo?tag=httpx-json", json={{"key": key}}, headers={{"x-api-key": key}})
    assert r.status_code == 200, r.text
EOF
"#,
        env = dir.join("child.env").display(),
        port = upstream.port,
    );
    let broker = builder(&dir, "run", &key, &upstream).args(PROXY).arg("--export").arg("API");
    run_ok(broker, &script);

    let received = upstream.received();
    let by_tag = |tag: &str| {
        received
            .iter()
            .find(|r| r["query"].as_str().unwrap_or("").contains(&format!("tag={tag}")))
            .unwrap_or_else(|| panic!("upstream never got tag={tag}: {received:#?}"))
    };
    assert!(places(by_tag("bearer")).contains(&"header:authorization".to_string()), "{:?}", by_tag("bearer"));
    assert!(places(by_tag("xapikey")).contains(&"header:x-api-key".to_string()));
    assert!(places(by_tag("query")).contains(&"query".to_string()));
    assert!(places(by_tag("basic")).contains(&"basic:authorization".to_string()));
    assert!(places(by_tag("json")).contains(&"body".to_string()));
    assert!(places(by_tag("requests-form")).contains(&"body".to_string()));
    assert!(places(by_tag("requests-form")).contains(&"header:authorization".to_string()));
    assert!(places(by_tag("httpx-json")).contains(&"body".to_string()));

    // The child's environment holds the placeholder and the proxy settings, never the value.
    let env = std::fs::read_to_string(dir.join("child.env")).unwrap();
    assert!(!env.contains(&key), "the child's environment holds the value");
    let placeholder = env.lines().find_map(|l| l.strip_prefix("API=")).unwrap();
    assert!(placeholder.starts_with("opb_") && placeholder.len() == 36, "{placeholder}");
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "NO_PROXY",
        "NODE_USE_ENV_PROXY",
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    ] {
        assert!(env.lines().any(|l| l.starts_with(&format!("{var}="))), "{var} missing from the child's environment");
    }
    let no_proxy = env.lines().find_map(|l| l.strip_prefix("NO_PROXY=")).unwrap();
    assert!(!no_proxy.split(',').any(|h| h == "localhost"), "a bound host is in NO_PROXY: {no_proxy}");
    assert!(no_proxy.split(',').any(|h| h == "127.0.0.1"), "loopback is not kept direct: {no_proxy}");

    // One audit line per proxied request, names but never the value.
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(!audit.contains(&key) && !audit.contains(placeholder));
    let proxied: Vec<Json> =
        audit_lines(&dir).into_iter().filter(|l| l["command"] == "PROXY" && l["status"] == 200).collect();
    assert_eq!(proxied.len(), 7, "{proxied:#?}");
    assert!(proxied.iter().all(|l| l["names"] == json!(["API"]) && l["path"] == "/echo"));
}

#[test]
fn get_exec_provider_status_and_allow_raw() {
    let (dir, key, upstream) = scene("px-get");
    let broker = builder(&dir, "daemon", &key, &upstream).start();
    let placeholder = get(&broker, "API");
    assert!(placeholder.starts_with("opb_"), "{placeholder}");
    assert_eq!(broker.client(&["get", "op://v/api/key"], None).stdout, placeholder.as_bytes());
    let exec =
        broker.client(&["get"], Some(br#"{"protocolVersion":1,"provider":"opb","ids":["API","op://v/api/key"]}"#));
    let exec: Json = serde_json::from_slice(&exec.stdout).unwrap();
    assert_eq!(exec["values"]["API"], placeholder.as_str());
    assert_eq!(exec["values"]["op://v/api/key"], placeholder.as_str());
    let status = status(&broker);
    let bindings = status["bindings"].as_array().unwrap();
    assert_eq!(bindings.len(), 2);
    assert_eq!(bindings[0]["name"], "API");
    assert_eq!(bindings[0]["hosts"], json!([format!("localhost:{}", upstream.port)]));
    let text = status.to_string();
    assert!(!text.contains(&key) && !text.contains(&placeholder), "STATUS shows a value or placeholder");
    drop(broker);

    // A fixed prefix for tools that check a key's shape.
    let broker = builder(&dir, "daemon", &key, &upstream).args(["--placeholder-prefix", "API=sk-proj-"]).start();
    let prefixed = get(&broker, "API");
    assert!(prefixed.starts_with("sk-proj-opb_") && prefixed.len() == "sk-proj-".len() + 36, "{prefixed}");
    drop(broker);

    // --allow-raw: the value, and an audit line saying it was a raw read of a bound secret.
    let broker = builder(&dir, "daemon", &key, &upstream).args(["--allow-raw", "API"]).start();
    assert_eq!(broker.client(&["get", "API"], None).stdout, key.as_bytes());
    assert!(broker.client(&["get", "OTHER"], None).stdout.starts_with(b"opb_"));
    assert!(
        eventually(Duration::from_secs(5), || audit_lines(&dir)
            .iter()
            .any(|l| l["name"] == "API" && l["result"] == "ok raw-bound")),
        "no audit line for the raw read: {:?}",
        audit_lines(&dir)
    );
}

#[test]
fn placeholders_survive_a_restart_with_cache() {
    let (dir, key, upstream) = scene("px-cache");
    let cache = dir.join("cache.bin").display().to_string();
    let start = || {
        builder(&dir, "daemon", &key, &upstream)
            .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_test_token")
            .args(["--cache", &cache])
            .start()
    };
    let broker = start();
    let first = broker.client(&["get", "API"], None).stdout;
    drop(broker);
    let broker = start();
    let second = broker.client(&["get", "API"], None).stdout;
    assert!(first.starts_with(b"opb_"));
    assert_eq!(first, second, "the placeholder changed across a restart with --cache");
    drop(broker);
    // Without the cache, a new start makes a new placeholder.
    let broker = builder(&dir, "daemon", &key, &upstream).start();
    assert_ne!(broker.client(&["get", "API"], None).stdout, first);
}

/// The proxy's address from STATUS.
fn proxy_addr(broker: &Broker) -> String {
    status(broker)["proxy"]["listen"].as_str().unwrap().to_string()
}

#[test]
fn openai_sdk_through_a_route_with_no_proxy_environment() {
    let (dir, key, upstream) = scene("px-route");
    let broker = builder(&dir, "daemon", &key, &upstream)
        .args(PROXY)
        .arg("--route")
        .arg(format!("openai=https://localhost:{}/v1", upstream.port))
        .start();
    let addr = proxy_addr(&broker);
    let placeholder = get(&broker, "API");
    let script = r#"
import os, sys, openai
client = openai.OpenAI(api_key=os.environ["KEY"], base_url=os.environ["BASE"], max_retries=0)
r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
print(r.choices[0].message.content)
chunks = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True)
print("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
"#;
    // A clean environment: no proxy variables, no CA bundle; only the base URL and the
    // placeholder.
    let mut cmd = Command::new(fixtures::python());
    cmd.args(["-c", script])
        .env_clear()
        .env("KEY", &placeholder)
        .env("BASE", format!("http://{addr}/openai"))
        .env("PATH", std::env::var("PATH").unwrap());
    let out = run_with_timeout(cmd, LIMIT);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.contains("Hello from the fake upstream")), "{text}");
    let received = upstream.received();
    assert!(
        received.iter().all(|r| r["status"] == 200 && places(r).contains(&"header:authorization".to_string())),
        "{received:#?}"
    );
}

#[test]
fn refusals_unbound_placeholder_credential_and_private_addresses() {
    let (dir, key, upstream) = scene("px-refuse");
    let script = format!(
        r#"
base="https://localhost:{port}"
echo "unbound $(curl -sS -o /dev/null -w '%{{http_code}}' "$base/echo?tag=unbound" -H "Authorization: Bearer $OTHER")"
echo "unbound-body $(curl -sS -o /dev/null -w '%{{http_code}}' "$base/echo?tag=unbound-body" -d "k=$OTHER")"
noauth="http://${{HTTPS_PROXY##*@}}"
echo "nocred $(curl -sS -o /dev/null -w '%{{http_code}}' --proxy "$noauth" "$base/echo?tag=nocred")"
echo "nocred-http $(curl -sS -o /dev/null -w '%{{http_code}}' --proxy "$noauth" "http://localhost:{port}/echo")"
echo "plain-http $(curl -sS -o /dev/null -w '%{{http_code}}' "http://localhost:{port}/echo" -H "Authorization: Bearer $API")"
"{py}" - <<'EOF'
import os, requests
def body():
    yield b"x" * (2 << 20)
    yield ("k=" + os.environ["OTHER"]).encode()
r = requests.post("https://localhost:{port}/upload?tag=streamed-unbound", data=body())
print("streamed-unbound", r.status_code)
EOF
"#,
        py = fixtures::python(),
        port = upstream.port
    );
    let broker = builder(&dir, "run", &key, &upstream).args(PROXY).args(["--export", "API", "--export", "OTHER"]);
    let (stdout, stderr) = run_ok(broker, &script);
    // curl prints 000 for a CONNECT answered 407 (the tunnel failed), or the 407 itself.
    for (tag, expect) in
        [("unbound", "403"), ("unbound-body", "403"), ("plain-http", "403"), ("streamed-unbound", "403")]
    {
        assert!(stdout.lines().any(|l| l == format!("{tag} {expect}")), "{tag}: {stdout}\n{stderr}");
    }
    assert!(stdout.lines().any(|l| l == "nocred 000" || l == "nocred 407"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "nocred-http 407"), "{stdout}");
    // The upstream answered nothing: the streamed refusal reached it as an aborted request.
    assert!(
        upstream.received().iter().all(|r| r["status"] != 200),
        "the upstream served a refused request: {:#?}",
        upstream.received()
    );
    assert!(upstream.received().iter().all(|r| places(r).is_empty()), "{:#?}", upstream.received());
    let audit = audit_lines(&dir);
    assert!(
        audit.iter().any(|l| l["status"] == 403
            && l["names"] == json!(["OTHER"])
            && l["host"] == format!("localhost:{}", upstream.port)),
        "{audit:#?}"
    );
    assert!(audit.iter().any(|l| l["status"] == 407), "{audit:#?}");

    // Without --proxy-allow-private: a name resolving to 127.0.0.1, and 127.0.0.1 itself.
    let dir = TestDir::new("px-private");
    let script = format!(
        r#"
echo "name $(curl -sS -o /dev/null -w '%{{http_code}}' "https://localhost:{port}/echo" -H "Authorization: Bearer $API")"
echo "tunnel $(curl -sS -o /dev/null -w '%{{http_code}}' --noproxy '' "https://127.0.0.1:{port}/echo")"
"#,
        port = upstream.port
    );
    let broker = builder(&dir, "run", &key, &upstream).args(["--proxy", "127.0.0.1:0", "--export", "API"]);
    let (stdout, stderr) = run_ok(broker, &script);
    assert!(stdout.lines().any(|l| l == "name 403"), "{stdout}\n{stderr}");
    // A tunnel refused before it is established: curl reports 403 or 000.
    assert!(stdout.lines().any(|l| l == "tunnel 403" || l == "tunnel 000"), "{stdout}");
    assert!(upstream.received().is_empty(), "{:#?}", upstream.received());
    let audit = audit_lines(&dir);
    assert!(audit.iter().filter(|l| l["status"] == 403).count() >= 2, "{audit:#?}");
}

#[test]
fn sse_streams_event_by_event_and_echoes_are_reversed() {
    let (dir, key, upstream) = scene("px-sse");
    let script = format!(
        r#"set -e
"{py}" - <<'EOF'
import os, time, json, requests
base = "https://localhost:{port}"
key = os.environ["API"]
r = requests.get(base + "/sse?n=20&interval_ms=100", headers={{"Authorization": "Bearer " + key}}, stream=True)
events = []
for line in r.iter_lines():
    if line.startswith(b"data: "):
        events.append((time.time(), json.loads(line[6:])))
assert len(events) == 20, events
first_at, first = events[0]
last_sent = events[-1][1]["sent"]
print("first-before-last", first_at < last_sent)
r = requests.get(base + "/echo?leak=1", headers={{"Authorization": "Bearer " + key}})
print("echo-header", r.headers.get("x-echoed-key") == key)
print("echo-body", r.json()["key"] == key)
EOF
"#,
        py = fixtures::python(),
        port = upstream.port
    );
    let broker = builder(&dir, "run", &key, &upstream).args(PROXY).args(["--export", "API"]);
    let (stdout, stderr) = run_ok(broker, &script);
    for line in ["first-before-last True", "echo-header True", "echo-body True"] {
        assert!(stdout.lines().any(|l| l == line), "{line}: {stdout}\n{stderr}");
    }
    assert!(!stdout.contains(&key));
}

/// Peak resident memory of `pid` (VmHWM), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap()
}

#[test]
fn large_upload_and_download_stream_with_bounded_memory() {
    let (dir, key, upstream) = scene("px-large");
    let broker = builder(&dir, "daemon", &key, &upstream)
        .args(PROXY)
        .arg("--route")
        .arg(format!("up=https://localhost:{}", upstream.port))
        .start();
    let addr = proxy_addr(&broker);
    let placeholder = get(&broker, "API");
    let before = peak_rss_kib(broker.pid());
    let script = r#"
import os, hashlib, requests
base, key = os.environ["BASE"], os.environ["KEY"]
size = 200 * 1024 * 1024
def gen():
    block = bytes(i % 251 for i in range(1 << 16))
    marked = key.encode() + block[len(key):]
    for i in range(size // len(block)):
        yield marked if i in (0, size // len(block) - 1) else block
r = requests.post(base + "/upload", data=gen(), headers={"Authorization": "Bearer " + key})
assert r.status_code == 200, r.text
# The placeholder in the body became the (longer) value, twice.
assert r.json()["len"] == size + 2 * (int(os.environ["REAL_LEN"]) - len(key)), r.text
h = hashlib.sha256(); n = 0
with requests.get(base + "/download?bytes=%d" % size, headers={"Authorization": "Bearer " + key}, stream=True) as r:
    for chunk in r.iter_content(1 << 16):
        h.update(chunk); n += len(chunk)
assert n == size, n
print("ok")
"#;
    let mut cmd = Command::new(fixtures::python());
    cmd.args(["-c", script])
        .env("KEY", &placeholder)
        .env("BASE", format!("http://{addr}/up"))
        .env("REAL_LEN", key.len().to_string());
    let out = run_with_timeout(cmd, Duration::from_secs(600));
    assert!(out.status.success(), "{}", describe(&out));
    let peak = peak_rss_kib(broker.pid());
    eprintln!("measured: op-bridge peak RSS {} KiB before, {} KiB after 200 MB up + 200 MB down", before, peak);
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB: the transfer was buffered");
    let received = upstream.received();
    assert!(received.iter().all(|r| r["status"] == 200 && places(r).contains(&"header:authorization".to_string())));
    assert!(places(&received[0]).contains(&"body".to_string()), "{:?}", received[0]);
}

#[test]
fn the_childs_memory_never_holds_the_value_after_100_requests() {
    if !nix_is_root() {
        eprintln!("skipped: reading another process's memory needs root");
        return;
    }
    let (dir, key, upstream) = scene("px-mem");
    let ready = dir.join("ready");
    let done = dir.join("done");
    let script = format!(
        r#"exec "{py}" - <<'EOF'
import os, time, requests
key = os.environ["API"]
s = requests.Session()
for i in range(100):
    r = s.post("https://localhost:{port}/echo?leak=1", json={{"key": key, "i": i}}, headers={{"Authorization": "Bearer " + key}})
    assert r.status_code == 200, r.text
    body = r.text
open("{ready}", "w").write(str(os.getpid()))
while not os.path.exists("{done}"):
    time.sleep(0.05)
EOF
"#,
        py = fixtures::python(),
        port = upstream.port,
        ready = ready.display(),
        done = done.display(),
    );
    let builder =
        builder(&dir, "run", &key, &upstream).args(PROXY).args(["--export", "API"]).args(["--", "sh", "-c", &script]);
    let mut broker = builder.spawn();
    assert!(
        eventually(Duration::from_secs(120), || std::fs::read_to_string(&ready).is_ok_and(|p| !p.is_empty())),
        "{}",
        broker.stderr()
    );
    let pid: i32 = std::fs::read_to_string(&ready).unwrap().trim().parse().unwrap();
    let in_child = memory::copies_in_memory(pid, key.as_bytes());
    let placeholder_in_child = memory::copies_in_memory(pid, b"opb_");
    std::fs::write(&done, "").unwrap();
    broker.wait(LIMIT);
    let received = upstream.received();
    assert_eq!(received.iter().filter(|r| places(r).contains(&"header:authorization".to_string())).count(), 100);
    // Keep-alive and pooled: 100 requests over a handful of upstream connections.
    let conns: std::collections::BTreeSet<String> = received.iter().map(|r| r["conn"].to_string()).collect();
    eprintln!("measured: 100 proxied requests used {} upstream connection(s)", conns.len());
    assert!(conns.len() <= 5, "upstream connections are not reused: {}", conns.len());
    eprintln!("measured: the value appears {in_child} times in the child's memory after 100 proxied requests");
    assert!(placeholder_in_child > 0, "the scan must see the placeholder the child holds, or it proves nothing");
    assert_eq!(in_child, 0, "the child's memory holds the value");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn daemon_users_get_the_environment_from_proxy_env() {
    let (dir, key, upstream) = scene("px-env");
    let broker = builder(&dir, "daemon", &key, &upstream).args(PROXY).start();
    let out = broker.client(&["proxy-env"], None);
    assert!(out.status.success(), "{}", describe(&out));
    let exports = String::from_utf8(out.stdout).unwrap();
    assert!(!exports.contains(&key));
    for var in ["HTTPS_PROXY", "http_proxy", "NO_PROXY", "NODE_USE_ENV_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"] {
        assert!(exports.contains(&format!("export {var}='")), "{var}: {exports}");
    }
    let script = format!(
        "{exports}\nAPI=$(\"{bin}\" get API --socket \"{socket}\")\ncurl -sS -o /dev/null -w '%{{http_code}}' https://localhost:{port}/echo -H \"Authorization: Bearer $API\"",
        bin = bin().display(),
        socket = broker.socket.display(),
        port = upstream.port
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]).env_clear().env("PATH", std::env::var("PATH").unwrap());
    let out = run_with_timeout(cmd, LIMIT);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", describe(&out));
    assert!(places(&upstream.received()[0]).contains(&"header:authorization".to_string()));
    // Without --proxy, PROXYENV is an error (exit 1), not an empty environment.
    drop(broker);
    let broker = builder(&dir, "daemon", &key, &upstream).start();
    assert_eq!(broker.client(&["proxy-env"], None).status.code(), Some(1));
}

#[test]
fn unbound_hosts_are_tunnelled_or_refused_with_egress_bound_only() {
    let (dir, key, upstream) = scene("px-egress");
    // 127.0.0.1 is not bound (API is bound to localhost): a tunnel, untouched, so the
    // upstream sees the placeholder, never the value.
    let script = format!(
        r#"echo "tunnel $(curl -sS -o /dev/null -w '%{{http_code}}' --noproxy '' "https://127.0.0.1:{port}/echo" -H "Authorization: Bearer $API")""#,
        port = upstream.port
    );
    let broker = builder(&dir, "run", &key, &upstream).args(PROXY).args(["--export", "API"]);
    let (stdout, stderr) = run_ok(broker, &script);
    assert!(stdout.lines().any(|l| l == "tunnel 200"), "{stdout}\n{stderr}");
    let received = upstream.received();
    assert_eq!(received.len(), 1);
    assert!(places(&received[0]).is_empty(), "a tunnelled request carried the value: {received:#?}");
    let audit = audit_lines(&dir);
    assert!(audit.iter().any(|l| l["note"] == "tunnel" && l["status"] == 200), "{audit:#?}");

    let dir = TestDir::new("px-egress2");
    let broker = builder(&dir, "run", &key, &upstream).args(PROXY).args(["--egress", "bound-only", "--export", "API"]);
    let (stdout, _) = run_ok(broker, &script);
    assert!(stdout.lines().any(|l| l == "tunnel 000" || l == "tunnel 403"), "{stdout}");
    assert_eq!(upstream.received().len(), 1, "the refused tunnel reached the upstream");
    assert!(audit_lines(&dir).iter().any(|l| l["note"] == "egress bound-only" && l["status"] == 403));
}

#[test]
fn the_proxy_is_bounded_header_size_and_connections() {
    use std::io::{Read, Write};
    let (dir, key, upstream) = scene("px-bounds");
    let broker = builder(&dir, "daemon", &key, &upstream).args(PROXY).args(["--proxy-max-connections", "2"]).start();
    let addr = proxy_addr(&broker);
    // A request head past 64 KiB is answered with an error and the connection closed.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!("GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(200 * 1024));
    let _ = stream.write_all(head.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Two idle connections fill the limit; a third is closed at once. The proxy counts a
    // connection once it has accepted it, which a loaded machine can delay: until then a
    // third is served (and closed), so the test asks again until the limit shows.
    let held: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let refused = eventually(Duration::from_secs(10), || {
        let Ok(mut third) = std::net::TcpStream::connect(&addr) else { return false };
        third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = third.write_all(b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let mut buf = Vec::new();
        let _ = third.read_to_end(&mut buf);
        buf.is_empty()
    });
    assert!(refused, "connections past the limit were served\n{}", broker.stderr());
    let logged = eventually(Duration::from_secs(10), || broker.stderr().contains("--proxy-max-connections reached"));
    assert!(logged, "the refusal is logged\n{}", broker.stderr());
    drop(held);
    // Once they are gone, the proxy serves again.
    assert!(eventually(Duration::from_secs(10), || {
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else { return false };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf.starts_with(b"HTTP/1.1 404")
    }));
}

#[test]
fn upstream_tls_is_verified() {
    let (dir, key, upstream) = scene("px-verify");
    // op-bridge does not trust the upstream's test CA here (no SSL_CERT_FILE for it): the
    // intercepted request fails with 502 and nothing is sent.
    let script = format!(
        r#"echo "code $(curl -sS -o /dev/null -w '%{{http_code}}' "https://localhost:{port}/echo" -H "Authorization: Bearer $API")""#,
        port = upstream.port
    );
    let broker = BrokerBuilder::new(&dir, "run")
        .arg("--backend")
        .arg(vault(&dir, &key))
        .env("OP_API_REF", "op://v/api/key")
        .env("OP_API_HOSTS", format!("localhost:{}", upstream.port))
        .args(PROXY)
        .args(["--export", "API"]);
    let (stdout, stderr) = run_ok(broker, &script);
    assert!(stdout.lines().any(|l| l == "code 502"), "{stdout}\n{stderr}");
    assert!(upstream.received().is_empty(), "{:#?}", upstream.received());
}

#[test]
fn idle_connections_are_closed_and_the_proxy_listens_on_loopback_only() {
    use std::io::Read;
    let (dir, key, upstream) = scene("px-idle");
    let broker =
        builder(&dir, "daemon", &key, &upstream).args(["--proxy", "127.0.0.1:0", "--proxy-idle-timeout", "1s"]).start();
    let addr = proxy_addr(&broker);
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf);
    let kept = started.elapsed();
    assert!(kept >= Duration::from_millis(900), "closed before the idle timeout: {kept:?}");
    assert!(kept < Duration::from_secs(15), "an idle connection was kept {kept:?}");
    drop(broker);

    let out = builder(&dir, "daemon", &key, &upstream).args(["--proxy", "0.0.0.0:0"]).output();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"), "{}", describe(&out));
}

#[test]
fn an_idle_tunnel_is_closed() {
    use std::io::{Read, Write};
    let (dir, key, upstream) = scene("px-tunidle");
    let broker = builder(&dir, "daemon", &key, &upstream).args(PROXY).args(["--proxy-idle-timeout", "1s"]).start();
    let env: Json = serde_json::from_slice(&broker.client(&["proxy-env", "--json"], None).stdout).unwrap();
    let url = env["HTTPS_PROXY"].as_str().unwrap();
    let (credential, addr) = url.trim_start_matches("http://").split_once('@').unwrap();
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(credential);
    let mut tunnel = std::net::TcpStream::connect(addr).unwrap();
    tunnel.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // 127.0.0.1 is not bound: a tunnel to the upstream, which then says nothing.
    let connect = format!(
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n",
        port = upstream.port
    );
    tunnel.write_all(connect.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    tunnel.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest);
    let kept = started.elapsed();
    assert!(kept >= Duration::from_millis(900), "closed before the idle timeout: {kept:?}");
    assert!(kept < Duration::from_secs(20), "an idle tunnel was kept {kept:?}");
}
