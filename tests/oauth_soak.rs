//! Broker-owned OAuth under abuse, black-box: against the fake OAuth server
//! (`tests/fake-oauth/`: single-use refresh tokens, reuse revokes the family, reuse leeway 0,
//! access tokens of 1 s) op-bridge rotates the refresh token hundreds of times while an app
//! calls the protected API through op-bridge's route, while op-bridge is killed with SIGKILL
//! and restarted and 1Password (the fake `op`) goes down; and a kill between a token response
//! and its 1Password write resumes from the journal. The chain must never break: no reuse, no
//! `invalid_grant`, no 401 for the app, and 1Password ends with the newest refresh token.

mod common;
mod oauth_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use oauth_support::*;
use serde_json::{Value as Json, json};

/// Token server events that mean the refresh-token chain broke.
const CHAIN_BROKEN: [&str; 4] = ["reuse_detected", "reuse_within_leeway", "invalid_grant", "invalid_client"];
/// The soak's goals (the "done when").
const ROTATIONS: usize = 200;
const KILLS: usize = 20;
/// A guard against a hang, far above the ~2–3 minutes the soak takes.
const SOAK_LIMIT: Duration = Duration::from_secs(480);
/// How long token requests may be held while a kill waits for an exchange to finish (see
/// `OAuthServer::quiesce`); past it the kill is put off and tried again later, so the hold
/// never starves the app's token (1 s, and the API's 2 s of tolerance).
const QUIESCE_LIMIT: Duration = Duration::from_secs(1);

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// `op-bridge daemon` with NAME `API` the access token of `op://v/oauth`, bound to the fake
/// server's host, behind the route `http://PROXY/api/…` → the server.
fn daemon(dir: &TestDir, fake: &FakeOp, server: &OAuthServer, cache: &Path) -> BrokerBuilder {
    BrokerBuilder::new(dir, "daemon")
        .fake_op(fake)
        .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_soak_token")
        .env("OP_API_OAUTH", "op://v/oauth")
        .env("OP_API_HOSTS", server.host())
        .env("SSL_CERT_FILE", server.ca.display().to_string())
        .args(["--cache", &cache.display().to_string()])
        .args(["--proxy", "127.0.0.1:0", "--proxy-allow-private"])
        .arg("--route")
        .arg(format!("api=https://{}", server.host()))
}

/// A directory on tmpfs (`/dev/shm`, else the temp dir), removed on drop.
struct JournalDir(std::path::PathBuf);

impl JournalDir {
    fn new() -> JournalDir {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let path = base.join(format!("opb-oauth-journal-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&path).unwrap();
        JournalDir(path)
    }
}

impl Drop for JournalDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sets a flag when dropped: a panicking loop still stops the threads that wait for it.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Whether `broker` has taken every token answer the server issued since it was spawned (at
/// `spawned`): STATUS counts a refresh once its answer is journaled and in use.
fn took_every_answer(broker: &Broker, server: &OAuthServer, spawned: f64) -> bool {
    let out = broker.client(&["status", "--json"], None);
    let Ok(status) = serde_json::from_slice::<Json>(&out.stdout) else { return false };
    status["oauth"]["API"]["refreshes"].as_u64() == Some(server.rotations_since(spawned) as u64)
}

fn status(broker: &Broker) -> Json {
    let out = broker.client(&["status", "--json"], None);
    assert!(out.status.success(), "STATUS failed: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The proxy's address and API's placeholder of a broker that is ready.
fn proxy_and_placeholder(broker: &Broker) -> (String, String) {
    let addr = status(broker)["proxy"]["listen"].as_str().expect("STATUS names the proxy's address").to_string();
    let out = broker.client(&["get", "API"], None);
    assert!(out.status.success(), "GET API failed: {}", describe(&out));
    (addr, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

/// What the app threads saw.
#[derive(Default)]
struct App {
    addr: Mutex<Option<String>>,
    stop: AtomicBool,
    ok: AtomicU64,
    /// No answer: op-bridge down, restarting, or killed mid-request (the app retries).
    unanswered: AtomicU64,
    /// Answers other than 200 (status, body).
    failures: Mutex<Vec<(u16, String)>>,
}

/// Calls `GET /api/api/soak` through the route with the placeholder until told to stop.
fn app_loop(app: Arc<App>, placeholder: String, id: usize) {
    let mut n = 0u64;
    while !app.stop.load(Ordering::SeqCst) {
        let addr = app.addr.lock().unwrap().clone();
        let Some(addr) = addr else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        n += 1;
        match app_get(&addr, &format!("/api/api/soak-{id}-{n}"), &placeholder) {
            Ok((200, body)) if body.contains("\"ok\": true") => {
                app.ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok((status, body)) => app.failures.lock().unwrap().push((status, body)),
            Err(_) => {
                app.unanswered.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Takes 1Password down (the fake `op`'s `outage`) for 1–3 s every 2–5 s until told to stop;
/// returns the outages as (start, end) Unix times.
fn outage_loop(fake: &FakeOp, stop: &AtomicBool) -> Vec<(f64, f64)> {
    let mut outages = Vec::new();
    let pause = |lo: u64, hi: u64| {
        let until = Instant::now() + Duration::from_millis(fastrand::u64(lo..hi));
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    loop {
        pause(2000, 5000);
        if stop.load(Ordering::SeqCst) {
            return outages;
        }
        let start = now_unix();
        fake.control(json!({"outage": true}));
        pause(1000, 3000);
        fake.control(json!({}));
        outages.push((start, now_unix()));
    }
}

/// Copies the test's files (logs, events, state, the fake vault) where a failure can be read
/// after the test dir is removed; returns that path for the failure message.
fn keep(dir: &TestDir) -> String {
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir.path().file_name().unwrap());
    let _ = std::process::Command::new("cp").arg("-a").arg(dir.path()).arg(&kept).status();
    kept.display().to_string()
}

/// Every broker log file in `dir`, to scan for tokens.
fn broker_logs(dir: &TestDir) -> Vec<(String, String)> {
    std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("broker-"))
        .map(|p| (p.display().to_string(), std::fs::read_to_string(&p).unwrap_or_default()))
        .collect()
}

#[test]
fn two_hundred_rotations_survive_kill_9_restarts_and_1password_outages() {
    let dir = TestDir::new("oauth-soak");
    // The API tolerates 2 s of clock skew past expiry (expires_in stays 1 s, so op-bridge still
    // rotates every 0.75 s): a 401 then means op-bridge served a token long dead or not its
    // newest, not that this machine took more than the 0.25 s margin to grant and fsync.
    let server = OAuthServer::start(
        dir.path(),
        json!({"access_ttl_s": 1, "api_leeway_s": 2, "reuse_leeway_s": 0, "check_client": true}),
    );
    let fake = FakeOp::new(&dir, vault(&server));
    // The journal on tmpfs: its fsync then costs nothing, and a kill -9 loses no more than on
    // a disk (the page cache outlives the process). On a disk, builds beside the test made
    // one fsync take ~4 s, longer than a 1 s token and the API's tolerance.
    let journal_dir = JournalDir::new();
    let cache = journal_dir.0.join("cache.bin");
    let started = Instant::now();

    let mut spawned = now_unix();
    let mut broker = daemon(&dir, &fake, &server, &cache).start();
    let (addr, placeholder) = proxy_and_placeholder(&broker);
    assert!(
        placeholder.starts_with("opb_") && !placeholder.contains(&server.seed),
        "API is bound: GET must give its placeholder, not a token"
    );
    let app = Arc::new(App { addr: Mutex::new(Some(addr)), ..App::default() });
    let apps: Vec<_> = (0..2)
        .map(|id| {
            let (app, placeholder) = (app.clone(), placeholder.clone());
            std::thread::spawn(move || app_loop(app, placeholder, id))
        })
        .collect();

    let outage_stop = AtomicBool::new(false);
    let (kills, longest_quiesce, put_off, outages) = std::thread::scope(|scope| {
        let outages = scope.spawn(|| outage_loop(&fake, &outage_stop));
        let _stop_outages = StopOnDrop(&outage_stop);
        let mut kills = 0;
        let mut longest_quiesce = Duration::ZERO;
        let mut put_off = 0;
        while server.rotations() < ROTATIONS || kills < KILLS {
            assert!(
                started.elapsed() < SOAK_LIMIT,
                "soak not done after {SOAK_LIMIT:?}: {} rotations, {kills} kills\nlast stderr:\n{}",
                server.rotations(),
                broker.stderr()
            );
            // A broken chain stops the rotations: say so now rather than at the time limit.
            for bad in CHAIN_BROKEN {
                assert_eq!(
                    server.count(bad),
                    0,
                    "the token server recorded {bad}: the chain broke; kept in {}",
                    keep(&dir)
                );
            }
            std::thread::sleep(Duration::from_millis(fastrand::u64(200..4000)));
            match server.quiesce(QUIESCE_LIMIT, || took_every_answer(&broker, &server, spawned)) {
                Ok(waited) => longest_quiesce = longest_quiesce.max(waited),
                Err(_) => {
                    server.release();
                    put_off += 1;
                    continue;
                }
            }
            *app.addr.lock().unwrap() = None;
            broker.signal(libc::SIGKILL);
            broker.wait(Duration::from_secs(30));
            kills += 1;
            server.release();
            spawned = now_unix();
            broker = daemon(&dir, &fake, &server, &cache).start();
            let (addr, again) = proxy_and_placeholder(&broker);
            assert_eq!(again, placeholder, "the placeholder changed across a restart with --cache");
            *app.addr.lock().unwrap() = Some(addr);
        }
        outage_stop.store(true, Ordering::SeqCst);
        (kills, longest_quiesce, put_off, outages.join().unwrap())
    });
    fake.control(json!({}));

    // The end: outside any exchange, the app stopped, then a graceful stop that flushes the
    // write-back queue.
    let quiet = eventually(SOAK_LIMIT, || {
        server.quiesce(QUIESCE_LIMIT, || took_every_answer(&broker, &server, spawned)).is_ok() || {
            server.release();
            false
        }
    });
    assert!(quiet, "op-bridge never took every token answer\nstderr:\n{}", broker.stderr());
    app.stop.store(true, Ordering::SeqCst);
    for thread in apps {
        thread.join().unwrap();
    }
    broker.signal(libc::SIGTERM);
    broker.wait(Duration::from_secs(120));
    let elapsed = started.elapsed();

    let rotations = server.rotations();
    let events = server.events();
    let in_outage = events
        .iter()
        .filter(|e| e["event"] == "issued")
        .filter(|e| {
            let ts = e["ts"].as_f64().unwrap();
            outages.iter().any(|(start, end)| (*start..=*end).contains(&ts))
        })
        .count();
    let edits = fake.calls_of(&["item", "edit"]);
    let written = edits.iter().filter(|c| c["exit"] == 0).count();
    let failures = app.failures.lock().unwrap().clone();
    println!(
        "soak: {rotations} rotations in {:.0} s, {kills} kills (longest wait for an exchange to finish: {} ms; \
         {put_off} put off as one took longer than {QUIESCE_LIMIT:?}), \
         {} outages of 1Password ({in_outage} rotations during one), 1Password writes: {written} ({} attempts), \
         app: {} answered 200, {} unanswered during restarts, {} other answers; server: {} 401s retried by the proxy, \
         {} requests from a killed op-bridge dropped unissued",
        elapsed.as_secs_f64(),
        longest_quiesce.as_millis(),
        outages.len(),
        edits.len(),
        app.ok.load(Ordering::SeqCst),
        app.unanswered.load(Ordering::SeqCst),
        failures.len(),
        server.count("api_unauthorized"),
        server.count("client_gone"),
    );

    let bad_events: Vec<&str> = CHAIN_BROKEN.into_iter().filter(|bad| server.count(bad) > 0).collect();
    if !bad_events.is_empty() || !failures.is_empty() {
        panic!(
            "events that break the chain: {bad_events:?}; answers other than 200 the app got: {} (the first: {:?}); \
             logs, events and state kept in {}",
            failures.len(),
            &failures[..failures.len().min(5)],
            keep(&dir)
        );
    }
    assert!(app.ok.load(Ordering::SeqCst) > 0, "the app never got through");
    assert!(in_outage > 0, "no rotation happened while 1Password was down: {outages:?}");

    let unused = server.unused_refresh_tokens();
    assert_eq!(unused.len(), 1, "the family should have exactly one unused refresh token");
    let item = &fake.read_store()["v"]["oauth"];
    assert!(
        item["refresh_token"] == unused[0].as_str(),
        "1Password does not hold the newest refresh token the server issued ({} rotations)",
        rotations
    );
    assert!(
        Some(item["access_token"].as_str().unwrap_or_default().to_string()) == server.newest_access_token(),
        "1Password does not hold the newest access token"
    );
    assert!(
        item["expires_at"].as_str().is_some_and(|t| t.len() >= 20 && t.contains('T')),
        "no RFC 3339 expires_at in 1Password"
    );

    let tokens = server.all_tokens();
    for (path, text) in broker_logs(&dir) {
        for token in &tokens {
            assert!(!text.contains(&token[..12]), "a token (or its prefix) is in op-bridge's log {path}");
        }
    }
}

/// `op-bridge daemon` with `API` the (unbound) access token of `op://v/oauth`: GET serves it.
fn unbound_daemon(dir: &TestDir, fake: &FakeOp, server: &OAuthServer, cache: &Path) -> BrokerBuilder {
    BrokerBuilder::new(dir, "daemon")
        .fake_op(fake)
        .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_crash_token")
        .env("OP_API_OAUTH", "op://v/oauth")
        .env("SSL_CERT_FILE", server.ca.display().to_string())
        .args(["--cache", &cache.display().to_string()])
}

fn get_api(broker: &Broker) -> String {
    let out = broker.client(&["get", "API"], None);
    assert!(out.status.success(), "GET API failed: {}", describe(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_kill_after_a_token_response_before_its_1password_write_resumes_from_the_journal() {
    let dir = TestDir::new("oauth-crash");
    let server = OAuthServer::start(dir.path(), json!({"access_ttl_s": 4, "reuse_leeway_s": 0, "check_client": true}));
    let fake = FakeOp::new(&dir, vault(&server));
    let cache = dir.join("cache.bin");
    // 1Password takes no write: every token response stays between op-bridge and 1Password.
    fake.control(json!({"fail_edits": 1_000_000}));
    let mut broker = unbound_daemon(&dir, &fake, &server, &cache).start();

    // op-bridge serves the access token it was given (so its response was journaled), and has
    // tried and failed to store it in 1Password.
    assert!(
        eventually(Duration::from_secs(30), || server.rotations() >= 1
            && server.newest_access_token().is_some_and(|t| get_api(&broker) == t)),
        "op-bridge does not serve the token it was issued\nstderr:\n{}",
        broker.stderr()
    );
    assert!(
        eventually(Duration::from_secs(30), || fake.calls_of(&["item", "edit"]).iter().any(|c| c["exit"] != 0)),
        "op-bridge never tried to store the tokens\nstderr:\n{}",
        broker.stderr()
    );
    // Killed outside a token exchange (a kill inside one loses the chain with no leeway, for
    // any client): no grant runs, and op-bridge serves the newest access token.
    server.hold(Duration::from_secs(30)).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || server.newest_access_token().is_some_and(|t| get_api(&broker) == t)),
        "op-bridge does not serve the newest token it was issued"
    );
    broker.signal(libc::SIGKILL);
    broker.wait(Duration::from_secs(30));
    server.release();
    let rotations = server.rotations();
    assert_eq!(
        fake.read_store()["v"]["oauth"]["refresh_token"],
        server.seed.as_str(),
        "1Password took a write it should have refused"
    );

    // Restart once the journaled token is due (less than a quarter of its 4 s left), reading
    // 1Password at start (--cache-fresh 0s) while it still holds the spent seed token and
    // still refuses writes: the refresh must present the journaled refresh token.
    let due = server.newest_expiry().unwrap() - 0.5;
    let wait = due - now_unix();
    if wait > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
    let broker = unbound_daemon(&dir, &fake, &server, &cache).args(["--cache-fresh", "0s"]).start();
    assert!(
        eventually(Duration::from_secs(30), || server.rotations() > rotations),
        "no refresh after the restart\nstderr:\n{}",
        broker.stderr()
    );
    for bad in CHAIN_BROKEN {
        assert_eq!(
            server.count(bad),
            0,
            "the token server recorded {bad}: the restart sent a spent refresh token\nstderr:\n{}",
            broker.stderr()
        );
    }
    assert!(
        eventually(Duration::from_secs(30), || server.newest_access_token().is_some_and(|t| get_api(&broker) == t)),
        "op-bridge does not serve the token of its refresh after the restart"
    );

    // 1Password back: it ends with the newest tokens.
    fake.control(json!({}));
    let stored = || {
        let item = fake.read_store()["v"]["oauth"].clone();
        let unused = server.unused_refresh_tokens();
        unused.len() == 1
            && item["refresh_token"] == unused[0].as_str()
            && server.newest_access_token().is_some_and(|t| item["access_token"] == t.as_str())
    };
    assert!(
        eventually(Duration::from_secs(60), stored),
        "1Password does not end with the newest tokens: {}\nstderr:\n{}",
        fake.read_store(),
        broker.stderr()
    );
}
