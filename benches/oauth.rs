//! What broker-owned OAuth costs the token endpoint and 1Password: `cargo bench --bench oauth`
//! runs op-bridge against the fake OAuth server (`tests/fake-oauth/`) with access tokens of
//! L seconds for N lifetimes (an app calling the API through the proxy all along), counts the
//! token requests (the server's events) and the `op` calls (FAKE_OP_LOG) per lifetime, and
//! states the figures per hour for tokens of 1 hour under the refresh rule (a new token when
//! less than min(L/4, 5 min) is left): a rotation every 55 minutes.
//!
//! These are counts, not timings, so the shared machine's noise does not move them; the one
//! timing shown (the measured interval between rotations) checks the rule.
//! `OPB_OAUTH_BENCH_LIFETIME_S` (default 4) and `OPB_OAUTH_BENCH_LIFETIMES` (default 15) set
//! L and N.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/oauth_support/mod.rs"]
mod oauth_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use oauth_support::*;
use serde_json::{Value as Json, json};

/// The refresh rule's cap on the margin (DESIGN §14).
const MAX_MARGIN_S: f64 = 300.0;
/// 1Password Teams' limit on a service account's writes.
const TEAMS_WRITES_PER_HOUR: f64 = 100.0;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Seconds between rotations for tokens of `lifetime` seconds.
fn interval(lifetime: f64) -> f64 {
    lifetime - (lifetime / 4.0).min(MAX_MARGIN_S)
}

/// What happened in one window of time.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    rotations: usize,
    token_requests: usize,
    op_writes: usize,
    op_reads: usize,
}

fn counts(server: &OAuthServer, fake: &FakeOp, from: f64, to: f64) -> Counts {
    let within = |j: &Json| j["ts"].as_f64().is_some_and(|ts| ts >= from && ts < to);
    let events: Vec<Json> = server.events().into_iter().filter(within).collect();
    let calls: Vec<Json> = fake.calls().into_iter().filter(within).collect();
    let argv0 = |c: &Json, words: &[&str]| {
        let argv: Vec<&str> = c["argv"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
        argv.len() >= words.len() && argv[..words.len()] == *words
    };
    Counts {
        rotations: events.iter().filter(|e| e["event"] == "issued").count(),
        token_requests: events.iter().filter(|e| !e["event"].as_str().unwrap_or("").starts_with("api_")).count(),
        op_writes: calls.iter().filter(|c| argv0(c, &["item", "edit"]) && c["exit"] == 0).count(),
        op_reads: calls.iter().filter(|c| argv0(c, &["item", "get"]) || argv0(c, &["read"])).count(),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this without it: nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let lifetime = env_u64("OPB_OAUTH_BENCH_LIFETIME_S", 4);
    let lifetimes = env_u64("OPB_OAUTH_BENCH_LIFETIMES", 15);
    let dir = TestDir::new("oauth-bench");
    let server = OAuthServer::start(dir.path(), json!({"access_ttl_s": lifetime, "reuse_leeway_s": 0}));
    let fake = FakeOp::new(&dir, vault(&server));
    let started = now_unix();
    let broker = BrokerBuilder::new(&dir, "daemon")
        .fake_op(&fake)
        .env("OP_SERVICE_ACCOUNT_TOKEN", "ops_bench_token")
        .env("OP_API_OAUTH", "op://v/oauth")
        .env("OP_API_HOSTS", server.host())
        .env("SSL_CERT_FILE", server.ca.display().to_string())
        .args(["--cache", &dir.join("cache.bin").display().to_string()])
        .args(["--proxy", "127.0.0.1:0", "--proxy-allow-private"])
        .arg("--route")
        .arg(format!("api=https://{}", server.host()))
        .start();
    let status: Json = serde_json::from_slice(&broker.client(&["status", "--json"], None).stdout).unwrap();
    let addr = status["proxy"]["listen"].as_str().expect("STATUS names the proxy").to_string();
    let placeholder = String::from_utf8(broker.client(&["get", "API"], None).stdout).unwrap().trim().to_string();

    // The app: one API call through the route every 50 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, other) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let app = {
        let (stop, ok, other) = (stop.clone(), ok.clone(), other.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match app_get(&addr, "/api/api/bench", &placeholder) {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                    _ => other.fetch_add(1, Ordering::SeqCst),
                };
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // 1Password holds the newest refresh token the server issued.
    let settled = || {
        let unused = server.unused_refresh_tokens();
        unused.len() == 1 && fake.read_store()["v"]["oauth"]["refresh_token"] == unused[0].as_str()
    };
    // Start-up (the first token and its write) is counted apart from the steady state.
    assert!(
        eventually(Duration::from_secs(60), || server.rotations() >= 1 && settled()),
        "op-bridge did not get and store its first token\n{}",
        broker.stderr()
    );
    let from = now_unix();
    let startup = counts(&server, &fake, started, from);
    std::thread::sleep(Duration::from_secs(lifetime * lifetimes));
    // No grant after `to`; the 1Password calls of the window's rotations are counted until
    // 1Password holds the last one.
    stop.store(true, Ordering::SeqCst);
    app.join().unwrap();
    server.hold(Duration::from_secs(60)).unwrap();
    let to = now_unix();
    assert!(eventually(Duration::from_secs(60), settled), "the last rotation never reached 1Password");
    let stored = now_unix();
    let steady = Counts {
        op_writes: counts(&server, &fake, from, stored).op_writes,
        op_reads: counts(&server, &fake, from, stored).op_reads,
        ..counts(&server, &fake, from, to)
    };
    let errors = ["reuse_detected", "reuse_within_leeway", "invalid_grant", "invalid_client"]
        .iter()
        .map(|e| server.count(e))
        .sum::<usize>();
    drop(broker);

    let (l, n) = (lifetime as f64, (to - from) / lifetime as f64);
    let per_rotation = |x: usize| x as f64 / steady.rotations.max(1) as f64;
    let hourly = 3600.0 / interval(3600.0);
    println!("## Broker-owned OAuth: token requests and 1Password writes\n");
    println!(
        "Measured: access tokens of L = {lifetime} s for {n:.1} lifetimes ({:.0} s), an app calling the API \
         through the proxy every 50 ms ({} answered 200, {} otherwise); the chain: {errors} reuse or \
         invalid_grant events.\n",
        to - from,
        ok.load(Ordering::SeqCst),
        other.load(Ordering::SeqCst)
    );
    println!("| figure | per lifetime (L = {lifetime} s) | per rotation | per hour, L = 1 h |");
    println!("|---|---|---|---|");
    println!("| rotations (refresh-token grants) | {:.2} | 1 | {hourly:.2} |", steady.rotations as f64 / n);
    for (label, x) in [
        ("token endpoint requests", steady.token_requests),
        ("1Password writes (`op item edit`)", steady.op_writes),
        ("1Password reads (`op item get`/`read`)", steady.op_reads),
    ] {
        println!("| {label} | {:.2} | {:.2} | {:.2} |", x as f64 / n, per_rotation(x), per_rotation(x) * hourly);
    }
    println!(
        "\nInterval between rotations: measured {:.2} s at L = {lifetime} s (the rule: L − min(L/4, 5 min) = \
         {:.2} s); at L = 1 h it is {:.0} min, so {hourly:.2} rotations an hour. Start-up (the first token and its \
         write, counted apart): {} token requests, {} writes, {} reads.",
        (to - from) / steady.rotations.max(1) as f64,
        interval(l),
        interval(3600.0) / 60.0,
        startup.token_requests,
        startup.op_writes,
        startup.op_reads
    );
    let writes_hour = per_rotation(steady.op_writes) * hourly;
    println!(
        "\nAgainst 1Password Teams' {TEAMS_WRITES_PER_HOUR:.0} writes an hour per service account: {writes_hour:.2} \
         writes an hour per OAuth item, so about {:.0} items with 1-hour tokens fit under the limit.",
        (TEAMS_WRITES_PER_HOUR / writes_hour.max(f64::EPSILON)).floor()
    );
}
