//! Broker-owned OAuth end to end, against the fake OAuth 2.0 server (`tests/fake-oauth/`,
//! https with the fake upstream's test CA) and the fake `op`: the client_credentials grant and
//! refresh ahead of expiry, `--cache` required for a refresh token, a kill between a token
//! response and its write to 1Password, refused grants, an unavailable endpoint while the
//! token is valid, the proxy's 401 refresh-and-retry, and that neither token reaches the app
//! or a log line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{Value as Json, json};

const LIMIT: Duration = Duration::from_secs(60);

/// The fake OAuth server over https, killed on drop.
struct TokenServer {
    child: Child,
    port: u16,
    state: PathBuf,
    control: PathBuf,
    events: PathBuf,
}

impl TokenServer {
    /// Clients: `app` (basic, secret s3cret, refresh token `rt_seed` in family f1), `poster`
    /// (post), `machine` (basic, client_credentials); `knobs` are the first control file.
    fn start(dir: &TestDir, knobs: Json) -> TokenServer {
        Self::start_with(dir, knobs, json!({}))
    }

    fn start_with(dir: &TestDir, knobs: Json, access_tokens: Json) -> TokenServer {
        let state = dir.join("oauth-state.json");
        let control = dir.join("oauth-control.json");
        let events = dir.join("oauth-events.jsonl");
        let port_file = dir.join("oauth-port");
        std::fs::write(
            &state,
            json!({
                "clients": {"app": {"secret": "s3cret", "auth": "basic"},
                            "poster": {"secret": "p0st", "auth": "post"},
                            "machine": {"secret": "m4ch", "auth": "basic"}},
                "refresh_tokens": {"rt_seed": {"client": "app", "family": "f1", "used_at": null, "successor": null}},
                "families": {"f1": {"revoked": false}},
                "access_tokens": access_tokens,
            })
            .to_string(),
        )
        .unwrap();
        std::fs::write(&control, knobs.to_string()).unwrap();
        let child = Command::new("python3")
            .arg(fixtures::repo().join("tests/fake-oauth/server.py"))
            .env("FAKE_OAUTH_STATE", &state)
            .env("FAKE_OAUTH_CONTROL", &control)
            .env("FAKE_OAUTH_EVENTS", &events)
            .env("FAKE_OAUTH_PORT_FILE", &port_file)
            .env("FAKE_OAUTH_CERT", fixtures::shared_certs().join("leaf.pem"))
            .env("FAKE_OAUTH_KEY", fixtures::shared_certs().join("leaf.key"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(eventually(LIMIT, || std::fs::read_to_string(&port_file).is_ok_and(|p| !p.is_empty())));
        let port = std::fs::read_to_string(&port_file).unwrap().trim().parse().unwrap();
        TokenServer { child, port, state, control, events }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/token", self.port)
    }

    fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }

    fn knobs(&self, knobs: Json) {
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, knobs.to_string()).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }

    fn events(&self) -> Vec<Json> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }

    fn state(&self) -> Json {
        serde_json::from_slice(&std::fs::read(&self.state).unwrap()).unwrap()
    }

    /// The refresh token of family f1 that has not been used yet (the newest).
    fn newest_refresh_token(&self) -> Option<String> {
        let state = self.state();
        state["refresh_tokens"]
            .as_object()?
            .iter()
            .find(|(_, t)| t["family"] == "f1" && t["used_at"].is_null())
            .map(|(k, _)| k.clone())
    }

    /// Every token the server ever issued or was seeded with.
    fn all_tokens(&self) -> Vec<String> {
        let state = self.state();
        let mut out = Vec::new();
        for kind in ["refresh_tokens", "access_tokens"] {
            out.extend(state[kind].as_object().unwrap().keys().cloned());
        }
        out
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(broker: &Broker) -> Json {
    let out = broker.client(&["status", "--json"], None);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn get(broker: &Broker, name: &str) -> String {
    let out = broker.client(&["get", name], None);
    assert!(out.status.success(), "{}\n{}", describe(&out), broker.stderr());
    String::from_utf8(out.stdout).unwrap().trim_end().to_string()
}

fn item(fake: &FakeOp, title: &str) -> Json {
    fake.read_store()["v"][title].clone()
}

/// A broker on the fake `op`, trusting the test CA, with a 1Password token (the cache key).
fn builder(dir: &TestDir, mode: &str, fake: &FakeOp) -> BrokerBuilder {
    BrokerBuilder::new(dir, mode)
        .fake_op(fake)
        .env("SSL_CERT_FILE", fixtures::shared_certs().join("ca.pem").display().to_string())
        .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_test_token_for_the_cache_key")
        .env("OP_BRIDGE_LOG_LEVEL", "info")
}

#[test]
fn client_credentials_are_fetched_served_refreshed_ahead_of_expiry_and_kept_in_1password() {
    let dir = TestDir::new("oa-cc");
    let server = TokenServer::start(&dir, json!({"access_ttl_s": 4}));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {"svc": {"token_url": server.url(), "client_id": "machine", "client_secret": "m4ch",
                             "scope": "read", "audience": "api://x"}}}),
    );
    let broker = builder(&dir, "daemon", &fake).env("OP_API_OAUTH", "op://v/svc").start();
    let first = get(&broker, "API");
    assert!(first.starts_with("at_"), "GET serves the access token: {first}");
    let issued = server.events();
    let issued = issued.iter().find(|e| e["event"] == "issued").unwrap();
    assert_eq!((issued["grant"].as_str(), issued["scope"].as_str()), (Some("client_credentials"), Some("read")));
    assert_eq!(issued["audience"], "api://x");

    let s = status(&broker);
    let oauth = &s["oauth"]["API"];
    assert_eq!(oauth["item"], "op://v/svc");
    assert_eq!(oauth["grant"], "client_credentials");
    assert_eq!(oauth["state"], "ok");
    assert!(oauth["error"].is_null());
    assert!(oauth["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s["secrets"].as_array().unwrap().iter().find(|x| x["name"] == "API").unwrap()["source"], "oauth");

    // A 4 s token is replaced 1 s before it expires, again and again, with no request made.
    assert!(
        eventually(LIMIT, || status(&broker)["oauth"]["API"]["refreshes"].as_u64().unwrap() >= 3),
        "{}",
        broker.stderr()
    );
    let asked = now();
    let current = get(&broker, "API");
    assert_ne!(current, first);
    let expires = server.state()["access_tokens"][&current]["expires_at"].as_f64();
    assert!(expires.is_some_and(|at| at > asked), "the served token was valid when it was served");
    assert_eq!(server.count("api_unauthorized"), 0);

    // 1Password keeps the access token and its expiry in the same item (created as fields).
    assert!(
        eventually(LIMIT, || {
            let svc = item(&fake, "svc");
            svc["access_token"].as_str().is_some_and(|t| t.starts_with("at_"))
                && svc["expires_at"].as_str().is_some_and(|t| t.ends_with('Z'))
        }),
        "{}",
        broker.stderr()
    );
    // One read-modify-write of the item per token response (never one per field).
    let responses = status(&broker)["oauth"]["API"]["refreshes"].as_u64().unwrap() as usize;
    let edits = fake.calls_of(&["item", "edit"]).iter().filter(|c| c["exit"] == 0).count();
    assert!(edits >= 1 && edits <= responses + 1, "{edits} edits for {responses} responses");
    let stderr = broker.stderr();
    assert!(stderr.contains("oauth API: new access token, expires in 4s"), "{stderr}");
    for token in server.all_tokens() {
        assert!(!stderr.contains(prefix(&token)), "a token prefix is in the log");
        assert!(!serde_json::to_string(&s).unwrap().contains(&token), "a token is in STATUS");
    }
}

#[test]
fn token_auth_post_sends_the_client_in_form_fields_and_basic_is_the_default() {
    let dir = TestDir::new("oa-post");
    let server = TokenServer::start(&dir, json!({"access_ttl_s": 30}));
    // The same client twice: once as its item says (form fields), once with the default
    // (HTTP Basic), which this server refuses for a client registered for form fields.
    let client = |auth: Option<&str>| {
        let mut item = json!({"token_url": server.url(), "client_id": "poster", "client_secret": "p0st"});
        if let Some(auth) = auth {
            item["token_auth"] = json!(auth);
        }
        item
    };
    let fake = FakeOp::new(&dir, json!({"v": {"posted": client(Some("post")), "basic": client(None)}}));
    let broker = builder(&dir, "daemon", &fake)
        .env("OP_POSTED_OAUTH", "op://v/posted")
        .env("OP_BASIC_OAUTH", "op://v/basic")
        .start();
    assert!(get(&broker, "POSTED").starts_with("at_"));
    let failing = eventually(LIMIT, || status(&broker)["oauth"]["BASIC"]["state"] == "failing");
    assert!(failing, "{}", broker.stderr());
    assert_eq!(server.count("issued"), 1, "{:?}", server.events());
    assert_eq!(server.count("invalid_client"), 1, "{:?}", server.events());
}

/// The first 12 characters of a token (the fake server's tokens are `at_`/`rt_` + 32).
fn prefix(token: &str) -> &str {
    token.get(..12).unwrap_or(token)
}

fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn a_refresh_token_grant_without_cache_is_refused_at_start_naming_the_option() {
    let dir = TestDir::new("oa-nocache");
    let server = TokenServer::start(&dir, json!({}));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {"gh": {"token_url": server.url(), "client_id": "app", "client_secret": "s3cret",
                            "refresh_token": "rt_seed"}}}),
    );
    let out = builder(&dir, "daemon", &fake).env("OP_GH_OAUTH", "op://v/gh").output();
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache"), "{}", describe(&out));
    assert!(server.events().is_empty(), "no token request was made");
}

#[test]
fn a_kill_between_the_token_response_and_1password_resumes_from_the_journal() {
    let dir = TestDir::new("oa-journal");
    let server = TokenServer::start(&dir, json!({"access_ttl_s": 6}));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {"gh": {"token_url": server.url(), "client_id": "app", "client_secret": "s3cret",
                            "refresh_token": "rt_seed"}}}),
    );
    // 1Password refuses every write: the token response can only be in the journal.
    fake.control(json!({"fail_edits": 100000}));
    let cache = dir.join("cache");
    let start = || {
        builder(&dir, "daemon", &fake)
            .env("OP_GH_OAUTH", "op://v/gh")
            .args(["--cache", &cache.display().to_string()])
            .start()
    };
    let broker = start();
    assert_eq!(server.count("issued"), 1, "{}", broker.stderr());
    let journaled = server.newest_refresh_token().unwrap();
    assert!(
        eventually(LIMIT, || fake.calls_of(&["item", "edit"]).iter().any(|c| c["exit"] == 1)),
        "the write to 1Password was tried and failed: {}",
        broker.stderr()
    );
    assert_eq!(item(&fake, "gh")["refresh_token"], "rt_seed", "1Password still has the used token");
    broker.signal(libc::SIGKILL);
    drop(broker);

    // 1Password is healthy again; 1Password's copy (rt_seed) is older than the journal's.
    fake.control(json!({}));
    let broker = start();
    assert!(broker.stderr().contains("resuming from the journal"), "{}", broker.stderr());
    // The 6 s token is refreshed with the journaled refresh token, never with rt_seed.
    assert!(eventually(LIMIT, || server.count("issued") >= 3), "{}\n{:?}", broker.stderr(), server.events());
    assert_eq!(server.count("reuse_detected"), 0, "{:?}", server.events());
    assert_eq!(server.count("invalid_grant"), 0, "{:?}", server.events());
    assert!(server.state()["refresh_tokens"][&journaled]["used_at"].is_f64(), "the journaled token was used");
    // 1Password ends with the newest refresh token, and the access token beside it.
    assert!(
        eventually(LIMIT, || {
            let newest = server.newest_refresh_token();
            let gh = item(&fake, "gh");
            newest.is_some() && gh["refresh_token"].as_str() == newest.as_deref()
        }),
        "{}\n{}",
        broker.stderr(),
        item(&fake, "gh")
    );
    let gh = item(&fake, "gh");
    assert!(gh["access_token"].as_str().unwrap().starts_with("at_"));
    assert_eq!(status(&broker)["oauth"]["GH"]["grant"], "refresh_token");
}

/// `run` with the proxy: NAME bound to the fake server's host, the child told to run `script`.
fn run_bound(dir: &TestDir, fake: &FakeOp, server: &TokenServer, names: &[&str], script: &str) -> BrokerBuilder {
    run_bound_with(dir, fake, server, names, &[], script)
}

/// [`run_bound`] with more options for op-bridge.
fn run_bound_with(
    dir: &TestDir,
    fake: &FakeOp,
    server: &TokenServer,
    names: &[&str],
    options: &[&str],
    script: &str,
) -> BrokerBuilder {
    let mut b = builder(dir, "run", fake)
        .args(options.iter().copied())
        .args(["--proxy", "127.0.0.1:0", "--proxy-allow-private"])
        .args(["--cache", &dir.join("cache").display().to_string()]);
    for name in names {
        b = b.env(format!("OP_{name}_HOSTS"), server.host()).args(["--export", name]);
    }
    b.args(["--", "sh", "-c", script])
}

#[test]
fn a_refused_grant_or_client_fails_loudly_and_the_proxy_answers_503() {
    let dir = TestDir::new("oa-refused");
    let server = TokenServer::start(&dir, json!({}));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {
            "gh": {"token_url": server.url(), "client_id": "app", "client_secret": "s3cret",
                   "refresh_token": "rt_unknown_or_revoked"},
            "svc": {"token_url": server.url(), "client_id": "machine", "client_secret": "wrong"},
        }}),
    );
    let script = format!(
        "for n in GH SVC; do eval v=\\$$n; curl -s -o {dir}/body-$n -w \"$n %{{http_code}}\\n\" \
         -H \"Authorization: Bearer $v\" https://{host}/api/me; done; sleep 1",
        dir = dir.path().display(),
        host = server.host()
    );
    let out = run_with_timeout(
        run_bound(&dir, &fake, &server, &["GH", "SVC"], &script)
            .env("OP_GH_OAUTH", "op://v/gh")
            .env("OP_SVC_OAUTH", "op://v/svc")
            .command(),
        Duration::from_secs(120),
    );
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("GH 503") && stdout.contains("SVC 503"), "{}", describe(&out));
    let body = std::fs::read_to_string(dir.join("body-GH")).unwrap();
    assert!(body.contains("GH") && body.contains("OAuth grant") && body.contains("refused"), "{body}");
    assert!(body.contains("invalid_grant"), "{body}");
    assert!(std::fs::read_to_string(dir.join("body-SVC")).unwrap().contains("invalid_client"));
    for (name, item) in [("GH", "op://v/gh"), ("SVC", "op://v/svc")] {
        let line = stderr.lines().find(|l| l.contains("ERROR") && l.contains(&format!("oauth {name} ({item})")));
        assert!(line.is_some(), "one ERROR naming {name} and {item}: {stderr}");
    }
    // One request each: a refused grant is never asked again.
    assert_eq!(server.count("invalid_grant"), 1, "{:?}", server.events());
    assert_eq!(server.count("invalid_client"), 1, "{:?}", server.events());
    assert_eq!(server.count("api_ok") + server.count("api_unauthorized"), 0, "nothing reached the API");
}

#[test]
fn status_shows_a_refused_grant_as_failing() {
    let dir = TestDir::new("oa-failing");
    let server = TokenServer::start(&dir, json!({}));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {"gh": {"token_url": server.url(), "client_id": "app", "client_secret": "s3cret",
                            "refresh_token": "rt_unknown"}}}),
    );
    let broker = builder(&dir, "daemon", &fake)
        .env("OP_GH_OAUTH", "op://v/gh")
        .args(["--cache", &dir.join("cache").display().to_string()])
        .start();
    let s = status(&broker);
    assert_eq!(s["oauth"]["GH"]["state"], "failing", "{s}");
    assert!(s["oauth"]["GH"]["error"].as_str().unwrap().contains("invalid_grant"), "{s}");
    let out = broker.client(&["get", "GH"], None);
    assert!(!out.status.success(), "no access token to give: {}", describe(&out));
    let out = broker.client(&["delete", "GH"], None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("OAuth"), "{}", describe(&out));
}

/// A token the server accepts for 10 minutes, in the item with an expiry that puts its
/// refresh `DUE` after the start (1 h lifetime assumed: refreshed 5 min before it expires).
fn seeded(dir: &TestDir) -> (TokenServer, FakeOp, String) {
    let token = format!("at_seeded_{:016x}", fastrand::u64(..));
    let server =
        TokenServer::start_with(dir, json!({}), json!({ &token: {"client": "machine", "expires_at": now() + 600.0} }));
    let expires = op_bridge::time::format_rfc3339(SystemTime::now() + Duration::from_secs(300) + DUE);
    let fake = FakeOp::new(
        dir,
        json!({"v": {"svc": {"token_url": server.url(), "client_id": "machine", "client_secret": "m4ch",
                             "access_token": token, "expires_at": expires}}}),
    );
    (server, fake, token)
}

/// When the seeded token's refresh is due: time for the app to start calling first.
const DUE: Duration = Duration::from_secs(20);

/// The child: API calls through the proxy every 0.2 s until `stop` exists; prints each status.
fn calling_app(server: &TokenServer, stop: &Path) -> String {
    format!(
        r#"exec "{py}" - <<'EOF'
import os, time, requests
s = requests.Session()
while not os.path.exists("{stop}"):
    r = s.get("https://{host}/api/me", headers={{"Authorization": "Bearer " + os.environ["SVC"]}})
    print(r.status_code, flush=True)
    time.sleep(0.2)
EOF
"#,
        py = fixtures::python(),
        stop = stop.display(),
        host = server.host(),
    )
}

fn app_statuses(broker: &Broker) -> Vec<String> {
    broker.stdout().lines().map(str::to_string).collect()
}

/// Starts the calling app on a seeded token and, once it calls, turns `knobs` on before the
/// refresh is due.
fn app_calling_when_the_refresh_fails(dir: &TestDir, knobs: Json) -> (TokenServer, Broker, PathBuf, String) {
    let (server, fake, seeded) = seeded(dir);
    let stop = dir.join("stop");
    let mut broker = run_bound(dir, &fake, &server, &["SVC"], &calling_app(&server, &stop))
        .env("OP_SVC_OAUTH", "op://v/svc")
        .spawn();
    broker.wait_ready(LIMIT);
    assert!(eventually(LIMIT, || !app_statuses(&broker).is_empty()), "{}", broker.stderr());
    server.knobs(knobs);
    assert_eq!(
        status(&broker)["oauth"]["SVC"]["refreshes"],
        0,
        "the app took longer than {DUE:?} to start: the refresh was not made under the fault"
    );
    (server, broker, stop, seeded)
}

#[test]
fn an_unavailable_token_endpoint_backs_off_while_the_valid_token_keeps_the_app_working() {
    let dir = TestDir::new("oa-5xx");
    let (server, mut broker, stop, seeded) =
        app_calling_when_the_refresh_fails(&dir, json!({"server_error": 2, "rate_limit": 1, "retry_after_s": 2}));
    let mut seen_backing_off = false;
    let refreshed = eventually(LIMIT, || {
        let s = status(&broker);
        seen_backing_off |= s["oauth"]["SVC"]["state"] == "backing_off";
        s["oauth"]["SVC"]["refreshes"] == 1
    });
    assert!(refreshed, "{}\n{:?}", broker.stderr(), server.events());
    let calls = app_statuses(&broker).len();
    assert!(eventually(LIMIT, || app_statuses(&broker).len() >= calls + 3));
    std::fs::write(&stop, "").unwrap();
    assert!(broker.wait(LIMIT).success(), "{}", broker.stderr());
    let events = server.events();
    let kinds: Vec<&str> =
        events.iter().map(|e| e["event"].as_str().unwrap()).filter(|e| !e.starts_with("api")).collect();
    assert_eq!(kinds, ["server_error", "server_error", "rate_limited", "issued"], "{events:?}");
    // Retry-After: 2 was honoured.
    let at = |kind: &str| events.iter().find(|e| e["event"] == kind).unwrap()["ts"].as_f64().unwrap();
    assert!(at("issued") - at("rate_limited") >= 2.0, "{events:?}");
    // The app called all along, before, during and after the failures, and never failed.
    let first_fault = at("server_error");
    let during = events.iter().filter(|e| e["event"] == "api_ok" && e["ts"].as_f64().unwrap() > first_fault).count();
    assert!(during >= 5, "{events:?}");
    let statuses = app_statuses(&broker);
    assert!(statuses.iter().all(|s| s == "200"), "the app's calls all succeed: {statuses:?}");
    assert!(seen_backing_off || broker.stderr().contains("retrying in"), "{}", broker.stderr());
    assert!(!broker.stderr().contains(&seeded), "the token is not in the log");
}

#[test]
fn a_token_endpoint_that_times_out_backs_off_while_the_valid_token_keeps_the_app_working() {
    let dir = TestDir::new("oa-slow");
    let (server, mut broker, stop, _) = app_calling_when_the_refresh_fails(&dir, json!({"slow_ms": 12000}));
    assert!(
        eventually(LIMIT, || {
            let s = status(&broker);
            s["oauth"]["SVC"]["state"] == "backing_off"
                && s["oauth"]["SVC"]["error"].as_str().is_some_and(|e| e.contains("did not answer within 10s"))
        }),
        "{}",
        broker.stderr()
    );
    let timed_out = app_statuses(&broker).len();
    server.knobs(json!({}));
    assert!(eventually(LIMIT, || status(&broker)["oauth"]["SVC"]["refreshes"] == 1), "{}", broker.stderr());
    assert_eq!(status(&broker)["oauth"]["SVC"]["state"], "ok");
    std::fs::write(&stop, "").unwrap();
    assert!(broker.wait(LIMIT).success(), "{}", broker.stderr());
    let statuses = app_statuses(&broker);
    assert!(timed_out >= 10, "the app kept calling during the 10 s timeout: {statuses:?}");
    assert!(statuses.iter().all(|s| s == "200"), "{statuses:?}");
}

#[test]
fn a_401_from_a_bound_host_refreshes_the_token_and_retries_the_request_once() {
    let dir = TestDir::new("oa-401");
    let server = TokenServer::start(&dir, json!({"access_ttl_s": 600}));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {"svc": {"token_url": server.url(), "client_id": "machine", "client_secret": "m4ch"}}}),
    );
    // The call first revokes every token issued so far (the server's knob): only the
    // refresh-and-retry can make it succeed, and the retry carries the JSON body again. Then
    // the same again at once: a token just fetched because of a 401 and refused again is not
    // replaced again (the app gets the 401; a refusal that is not about expiry must not turn
    // each request into a token request).
    let control = server.control.display().to_string();
    let script = format!(
        r#"exec "{py}" - <<'EOF'
import json, os, requests
s = requests.Session()
auth = {{"Authorization": "Bearer " + os.environ["SVC"]}}
for method in ("POST", "GET"):
    json.dump({{"access_ttl_s": 600, "revoke_access_tokens": 1}}, open("{control}.tmp", "w"))
    os.replace("{control}.tmp", "{control}")
    r = s.request(method, "https://{host}/api/me", headers=auth, json={{"n": 1}} if method == "POST" else None)
    print(method, r.status_code, r.json().get("body", ""), flush=True)
EOF
"#,
        py = fixtures::python(),
        host = server.host(),
    );
    let out = run_with_timeout(
        run_bound(&dir, &fake, &server, &["SVC"], &script).env("OP_SVC_OAUTH", "op://v/svc").command(),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout.contains(r#"POST 200 {"n": 1}"#), "{}\n{:?}", describe(&out), server.events());
    assert!(stdout.contains("GET 401"), "{}\n{:?}", describe(&out), server.events());
    let events: Vec<String> = server.events().iter().map(|e| e["event"].as_str().unwrap().to_string()).collect();
    // Start-up token; revoked, 401, one new token, the retry's 200; revoked, 401.
    assert_eq!(
        events,
        ["issued", "revoked", "api_unauthorized", "issued", "api_ok", "revoked", "api_unauthorized"],
        "{}",
        describe(&out)
    );
}

/// Which of `tokens` (the fake server's `at_…`/`rt_…`, 35 bytes) occur in any readable
/// mapping of `pid` (root reads any process's memory): one pass over the memory, looking at
/// each `at_`/`rt_`.
fn tokens_in_memory(pid: i32, tokens: &[String]) -> Vec<String> {
    let wanted: std::collections::HashSet<&[u8]> = tokens.iter().map(|t| t.as_bytes()).collect();
    let mut found = std::collections::BTreeSet::new();
    memory::each_mapping(pid, |region| {
        for window in region.windows(35) {
            if window[2] == b'_' && window[1] == b't' && matches!(window[0], b'a' | b'r') && wanted.contains(window) {
                found.insert(String::from_utf8_lossy(window).into_owned());
            }
        }
    });
    found.into_iter().collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_bound_oauth_token_never_reaches_the_app_its_environment_or_a_log_line() {
    if !is_root() {
        eprintln!("skipped: reading another process's memory needs root");
        return;
    }
    let dir = TestDir::new("oa-blind");
    let server = TokenServer::start(&dir, json!({"access_ttl_s": 3}));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {"gh": {"token_url": server.url(), "client_id": "app", "client_secret": "s3cret",
                            "refresh_token": "rt_seed"}}}),
    );
    let ready = dir.join("ready");
    let done = dir.join("done");
    // The app calls the API through the proxy across several rotations, then waits.
    let script = format!(
        r#"exec "{py}" - <<'EOF'
import os, time, requests
s = requests.Session()
codes = []
for i in range(40):
    r = s.post("https://{host}/api/me", json={{"i": i}}, headers={{"Authorization": "Bearer " + os.environ["GH"]}})
    codes.append(r.status_code)
    body = r.text
    time.sleep(0.25)
print(" ".join(map(str, codes)), flush=True)
open("{ready}", "w").write(str(os.getpid()))
while not os.path.exists("{done}"):
    time.sleep(0.05)
EOF
"#,
        py = fixtures::python(),
        host = server.host(),
        ready = ready.display(),
        done = done.display(),
    );
    let audit = dir.join("audit.jsonl").display().to_string();
    let mut broker = run_bound_with(&dir, &fake, &server, &["GH"], &["--audit-log", &audit], &script)
        .env("OP_GH_OAUTH", "op://v/gh")
        .spawn();
    assert!(
        eventually(Duration::from_secs(120), || std::fs::read_to_string(&ready).is_ok_and(|p| !p.is_empty())),
        "{}",
        broker.stderr()
    );
    let pid: i32 = std::fs::read_to_string(&ready).unwrap().trim().parse().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let tokens = server.all_tokens();
    assert!(tokens.len() >= 6, "several rotations happened: {tokens:?}");
    let mut found: Vec<String> =
        tokens_in_memory(pid, &tokens).into_iter().map(|t| format!("memory: {}", prefix(&t))).collect();
    for token in &tokens {
        let needle = token.as_bytes();
        if environ.windows(needle.len()).any(|w| w == needle) {
            found.push(format!("environ: {}", prefix(token)));
        }
    }
    let placeholder_in_child = memory::copies_in_memory(pid, b"opb_");
    // The scan finds a token where one is (this process holds them all).
    assert_eq!(tokens_in_memory(std::process::id() as i32, &tokens[..1]).len(), 1, "the scan finds nothing");
    std::fs::write(&done, "").unwrap();
    assert!(broker.wait(LIMIT).success(), "{}", broker.stderr());
    assert!(found.is_empty(), "tokens reached the app: {found:?}");
    assert!(placeholder_in_child > 0, "the scan must see the placeholder the child holds, or it proves nothing");
    let codes = broker.stdout();
    assert!(codes.split_whitespace().all(|c| c == "200"), "{codes}\n{}\n{:?}", broker.stderr(), server.events());
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
    assert!(audit.lines().count() >= 40, "one audit line per proxied request: {audit}");
    let logs = broker.stderr() + &audit;
    for token in &tokens {
        assert!(!logs.contains(prefix(token)), "a token (or its prefix) is in a log line");
    }
    assert_eq!(server.count("reuse_detected") + server.count("invalid_grant"), 0, "{:?}", server.events());
}

#[test]
fn an_expired_token_while_the_endpoint_is_down_gets_503_naming_it_and_recovers() {
    let dir = TestDir::new("oa-expired");
    let server = TokenServer::start(&dir, json!({"server_error": 1000}));
    let expired = op_bridge::time::format_rfc3339(SystemTime::now() - Duration::from_secs(60));
    let fake = FakeOp::new(
        &dir,
        json!({"v": {"svc": {"token_url": server.url(), "client_id": "machine", "client_secret": "m4ch",
                             "access_token": "at_expired_long_ago_0000000000", "expires_at": expired}}}),
    );
    let go = dir.join("go");
    let script = format!(
        "curl -s -o {dir}/body -w '%{{http_code}}\\n' -H \"Authorization: Bearer $SVC\" https://{host}/api/me; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         curl -s -o /dev/null -w '%{{http_code}}\\n' -H \"Authorization: Bearer $SVC\" https://{host}/api/me",
        dir = dir.path().display(),
        host = server.host(),
        go = go.display(),
    );
    let mut broker = run_bound(&dir, &fake, &server, &["SVC"], &script).env("OP_SVC_OAUTH", "op://v/svc").spawn();
    broker.wait_ready(LIMIT);
    assert!(eventually(LIMIT, || !broker.stdout().is_empty()), "{}", broker.stderr());
    let body = std::fs::read_to_string(dir.join("body")).unwrap();
    assert_eq!(broker.stdout().trim(), "503", "{}", broker.stderr());
    assert!(body.contains("SVC has no valid access token") && body.contains("unavailable"), "{body}");
    assert_eq!(status(&broker)["oauth"]["SVC"]["state"], "backing_off");
    // The endpoint is back: the next attempt gets a token and the app's call succeeds.
    server.knobs(json!({}));
    assert!(eventually(LIMIT, || status(&broker)["oauth"]["SVC"]["refreshes"] == 1), "{}", broker.stderr());
    std::fs::write(&go, "").unwrap();
    assert!(broker.wait(LIMIT).success(), "{}", broker.stderr());
    assert_eq!(broker.stdout().split_whitespace().collect::<Vec<_>>(), ["503", "200"], "{}", broker.stderr());
    assert_eq!(server.count("api_ok"), 1, "the 503 reached no API: {:?}", server.events());
}
