//! The egress proxy's cost: `cargo bench --bench proxy` prints a markdown table of the
//! latency a proxy adds to a keep-alive HTTPS request (p50/p99, against going direct in the
//! same run) and the requests per second it carries on 8 keep-alive connections, for
//! op-bridge (`--route`: plain HTTP in, HTTPS out; and the forward proxy: CONNECT with TLS
//! intercepted) side by side with mitmproxy (reverse and regular mode) running an equivalent
//! addon that swaps the placeholder in the request headers for the key.
//!
//! The upstream is an HTTPS server inside this process (hyper + rustls, its own CA) that
//! answers 200 only when `Authorization: Bearer <key>` arrived — every proxied request
//! must come back 200, so a column that did not substitute shows as failed, not fast. The
//! client is the same reqwest code for every column; op-bridge's columns run it as the child
//! of `op-bridge run` (the only place the forward proxy's per-start credential is given).
//! mitmproxy comes from PyPI through `tests/fake-upstream/setup.sh --bench` (or `$MITMDUMP`);
//! when it or the proxy is unavailable its column says why instead of a number.
//! Timings on a shared machine are noisy: compare columns of one run, not runs.

#[path = "../tests/upstream_support/mod.rs"]
mod upstream_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value as Json, json};

/// The key the upstream expects, and what clients send in its place.
const KEY: &str = "sk-bench-real-key-0123456789abcdef";
/// Sequential requests timed for the latency figures (after the warm-up).
const LATENCY_REQUESTS: usize = 1000;
const WARMUP_REQUESTS: usize = 100;
/// Connections and duration of the throughput figure.
const CONNECTIONS: usize = 8;
const THROUGHPUT_FOR: Duration = Duration::from_secs(3);
/// Runs per column (reported as median [min–max]).
const RUNS: usize = 3;
/// The child role: set in the environment of the load generator `op-bridge run` starts.
const ROLE_VAR: &str = "OPB_PROXY_BENCH_ROLE";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_op-bridge"))
}

/// One column's figures: each run's p50, p99 and requests/s.
#[derive(Debug, Clone, Default)]
struct Figures {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    rps: Vec<f64>,
    /// Responses other than 200 (the upstream saw no key, or the proxy failed).
    failures: u64,
    requests: u64,
}

impl Figures {
    fn to_json(&self) -> Json {
        json!({"p50_us": self.p50_us, "p99_us": self.p99_us, "rps": self.rps,
               "failures": self.failures, "requests": self.requests})
    }
    fn from_json(j: &Json) -> Figures {
        let list = |k: &str| j[k].as_array().map(|a| a.iter().filter_map(Json::as_f64).collect()).unwrap_or_default();
        Figures {
            p50_us: list("p50_us"),
            p99_us: list("p99_us"),
            rps: list("rps"),
            failures: j["failures"].as_u64().unwrap_or(0),
            requests: j["requests"].as_u64().unwrap_or(0),
        }
    }
}

/// The median of some runs (0 for none).
fn median(runs: &[f64]) -> f64 {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// "median [min–max]" of some runs, each shown by `show`.
fn spread(runs: &[f64], show: impl Fn(f64) -> String) -> String {
    let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = runs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} [{}–{}]", show(median(runs)), show(min), show(max))
}

/// How a client reaches the upstream.
#[derive(Clone)]
struct Target {
    url: String,
    /// The token sent as `Bearer …` (the key direct, a placeholder through a proxy).
    token: String,
    /// A forward proxy URL (with credentials, if any).
    proxy: Option<String>,
    /// PEM certificates the client trusts.
    roots: Vec<u8>,
}

impl Target {
    fn client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(30));
        for cert in reqwest::Certificate::from_pem_bundle(&self.roots).expect("readable PEM roots") {
            builder = builder.add_root_certificate(cert);
        }
        builder = match &self.proxy {
            Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy).expect("a proxy URL")),
            None => builder.no_proxy(),
        };
        builder.build().expect("a reqwest client")
    }
}

async fn one(client: &reqwest::Client, target: &Target) -> bool {
    let sent = client.get(&target.url).header("authorization", format!("Bearer {}", target.token)).send().await;
    match sent {
        Ok(r) => {
            let ok = r.status() == 200;
            ok && r.bytes().await.is_ok()
        }
        Err(_) => false,
    }
}

/// RUNS times: latency on one keep-alive connection, then requests/s on CONNECTIONS of them.
async fn measure(target: &Target) -> Figures {
    let mut figures = Figures::default();
    for _ in 0..RUNS {
        measure_once(target, &mut figures).await;
    }
    figures
}

async fn measure_once(target: &Target, figures: &mut Figures) {
    let client = target.client();
    for _ in 0..WARMUP_REQUESTS {
        figures.failures += u64::from(!one(&client, target).await);
    }
    let mut times = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        let started = Instant::now();
        figures.failures += u64::from(!one(&client, target).await);
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    figures.p50_us.push(times[times.len() / 2]);
    figures.p99_us.push(times[times.len() * 99 / 100]);
    figures.requests += (WARMUP_REQUESTS + LATENCY_REQUESTS) as u64;

    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + THROUGHPUT_FOR;
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (target, done, failed) = (target.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                let client = target.client();
                while Instant::now() < deadline {
                    if one(&client, &target).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    figures.rps.push(done as f64 / elapsed);
    figures.failures += failed;
    figures.requests += done + failed;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

// ---- the upstream -------------------------------------------------------------------------

/// Serves HTTPS on 127.0.0.1:0 with the fixture's certificates: 200 "ok" for the key, 401
/// otherwise. Returns its port and a counter of 401s.
async fn upstream(certs: &Path) -> (u16, Arc<AtomicU64>) {
    let chain = vec![CertificateDer::from_pem_file(certs.join("leaf.pem")).expect("leaf.pem")];
    let key = PrivateKeyDer::from_pem_file(certs.join("leaf.key")).expect("leaf.key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let refused = Arc::new(AtomicU64::new(0));
    let counter = refused.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            let (acceptor, refused) = (acceptor.clone(), refused.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let refused = refused.clone();
                    async move {
                        let ok = req
                            .headers()
                            .get("authorization")
                            .is_some_and(|v| v.as_bytes() == format!("Bearer {KEY}").as_bytes());
                        let status = if ok { 200 } else { 401 };
                        if !ok {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok::<_, std::convert::Infallible>(
                            Response::builder().status(status).body(Full::new(Bytes::from_static(b"ok\n"))).unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    (port, counter)
}

// ---- the columns --------------------------------------------------------------------------

struct Column {
    name: &'static str,
    figures: Result<Figures, String>,
}

/// A free loopback port (bound and released; mitmproxy takes no port 0 it would tell us).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// op-bridge's two columns, measured by a child of `op-bridge run`.
fn op_bridge_columns(dir: &Path, up_port: u16, up_ca: &Path) -> Result<(Figures, Figures), String> {
    let vault = dir.join("vault.json");
    std::fs::write(&vault, json!({"v": {"api": {"key": KEY}}}).to_string()).unwrap();
    let out = Command::new(bin())
        .arg("run")
        .arg("--backend")
        .arg(format!("file:{}", vault.display()))
        .arg("--socket")
        .arg(dir.join("opb.sock"))
        .args(["--proxy", "127.0.0.1:0", "--proxy-allow-private", "--export", "API"])
        .arg("--route")
        .arg(format!("up=https://localhost:{up_port}"))
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .env("OP_API_REF", "op://v/api/key")
        .env("OP_API_HOSTS", format!("localhost:{up_port}"))
        // op-bridge verifies the upstream with the system roots and SSL_CERT_FILE.
        .env("SSL_CERT_FILE", up_ca)
        .env(ROLE_VAR, "load")
        .env("OPB_BENCH_UPSTREAM_PORT", up_port.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run op-bridge: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let Some(results) = line.and_then(|l| serde_json::from_str::<Json>(l).ok()) else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!("op-bridge run --proxy gave no figures ({}): {}", out.status, tail.join(" | ")));
    };
    if let Some(error) = results["error"].as_str() {
        return Err(error.to_string());
    }
    Ok((Figures::from_json(&results["route"]), Figures::from_json(&results["forward"])))
}

/// The load generator inside `op-bridge run`: the placeholder in `API`, the proxy (with its
/// credential) in HTTPS_PROXY, the bundle with op-bridge's CA in SSL_CERT_FILE.
fn child_role() {
    let result = (|| -> Result<Json, String> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("the child has no {name}"));
        let placeholder = var("API")?;
        if placeholder == KEY {
            return Err("the child was given the key itself, not a placeholder".into());
        }
        let proxy = var("HTTPS_PROXY")?;
        let bundle = std::fs::read(var("SSL_CERT_FILE")?).map_err(|e| format!("SSL_CERT_FILE: {e}"))?;
        let port = var("OPB_BENCH_UPSTREAM_PORT")?;
        let addr = proxy.rsplit('@').next().unwrap_or(&proxy).trim_start_matches("http://").trim_end_matches('/');
        let route = Target {
            url: format!("http://{addr}/up/bench"),
            token: placeholder.clone(),
            proxy: None,
            roots: bundle.clone(),
        };
        let forward = Target {
            url: format!("https://localhost:{port}/bench"),
            token: placeholder,
            proxy: Some(proxy.clone()),
            roots: bundle,
        };
        let rt = runtime();
        let route = rt.block_on(measure(&route));
        let forward = rt.block_on(measure(&forward));
        Ok(json!({"route": route.to_json(), "forward": forward.to_json()}))
    })();
    let line = match result {
        Ok(j) => j,
        Err(e) => json!({"error": e}),
    };
    println!("{line}");
}

/// mitmdump from $MITMDUMP, or the bench venv (made by setup.sh --bench from PyPI).
fn mitmdump() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("MITMDUMP") {
        return Ok(PathBuf::from(path));
    }
    let out = Command::new("bash")
        .arg(upstream_support::fixture_dir().join("setup.sh"))
        .arg("--bench")
        .env("CARGO_TARGET_DIR", upstream_support::target_dir())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run setup.sh: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    if !out.status.success() || lines.len() < 2 {
        return Err("mitmproxy unavailable (setup.sh --bench failed: no PyPI access or no Python >= 3.12)".into());
    }
    Ok(PathBuf::from(lines[lines.len() - 2]))
}

const MITM_ADDON: &str = r#"
import os
PLACEHOLDER, KEY = os.environ["BENCH_PLACEHOLDER"], os.environ["BENCH_KEY"]

def request(flow):
    for name, value in list(flow.request.headers.items()):
        if PLACEHOLDER in value:
            flow.request.headers[name] = value.replace(PLACEHOLDER, KEY)
"#;

/// A running mitmdump, killed on drop.
struct Mitm(std::process::Child);
impl Drop for Mitm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_mitm(mitmdump: &Path, dir: &Path, mode: &str, port: u16, up_ca: &Path) -> Result<Mitm, String> {
    let addon = dir.join("addon.py");
    std::fs::write(&addon, MITM_ADDON).unwrap();
    let confdir = dir.join("mitm-conf");
    std::fs::create_dir_all(&confdir).unwrap();
    let child = Command::new(mitmdump)
        .args(["-q", "--listen-host", "127.0.0.1", "--listen-port", &port.to_string(), "--mode", mode])
        .arg("-s")
        .arg(&addon)
        .arg("--set")
        .arg(format!("confdir={}", confdir.display()))
        .arg("--set")
        .arg(format!("ssl_verify_upstream_trusted_ca={}", up_ca.display()))
        .env("BENCH_PLACEHOLDER", "opb_bench_placeholder_0123456789")
        .env("BENCH_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("mitm-{port}.log"))).unwrap())
        .spawn()
        .map_err(|e| format!("cannot start mitmdump: {e}"))?;
    let mitm = Mitm(child);
    if !wait_port(port, Duration::from_secs(60)) {
        return Err(format!("mitmdump ({mode}) did not listen within 60 s"));
    }
    Ok(mitm)
}

fn mitm_columns(dir: &Path, up_port: u16, up_ca: &Path, rt: &tokio::runtime::Runtime) -> [Result<Figures, String>; 2] {
    let mitmdump = match mitmdump() {
        Ok(m) => m,
        Err(e) => return [Err(e.clone()), Err(e)],
    };
    let placeholder = "opb_bench_placeholder_0123456789".to_string();
    let reverse = (|| {
        let port = free_port();
        let _mitm = start_mitm(&mitmdump, dir, &format!("reverse:https://localhost:{up_port}"), port, up_ca)?;
        let target = Target {
            url: format!("http://127.0.0.1:{port}/bench"),
            token: placeholder.clone(),
            proxy: None,
            roots: vec![],
        };
        Ok(rt.block_on(measure(&target)))
    })();
    let regular = (|| {
        let port = free_port();
        let _mitm = start_mitm(&mitmdump, dir, "regular", port, up_ca)?;
        let ca = dir.join("mitm-conf/mitmproxy-ca-cert.pem");
        let roots = std::fs::read(&ca).map_err(|e| format!("mitmproxy's CA {}: {e}", ca.display()))?;
        let target = Target {
            url: format!("https://localhost:{up_port}/bench"),
            token: placeholder.clone(),
            proxy: Some(format!("http://127.0.0.1:{port}")),
            roots,
        };
        Ok(rt.block_on(measure(&target)))
    })();
    [reverse, regular]
}

fn main() {
    if std::env::var(ROLE_VAR).as_deref() == Ok("load") {
        return child_role();
    }
    // `cargo bench` passes --bench; `cargo test --benches` runs this without it: nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("opb-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = dir.join("certs");
    let made = Command::new("python3")
        .arg(upstream_support::fixture_dir().join("server.py"))
        .arg("--make-certs")
        .arg(&certs)
        .status()
        .expect("python3 makes the test certificates");
    assert!(made.success(), "server.py --make-certs failed");
    let up_ca = certs.join("ca.pem");
    let rt = runtime();
    let (up_port, refused) = rt.block_on(upstream(&certs));
    let roots = std::fs::read(&up_ca).unwrap();

    eprintln!("proxy bench: direct…");
    let direct = Target { url: format!("https://localhost:{up_port}/bench"), token: KEY.into(), proxy: None, roots };
    let direct = rt.block_on(measure(&direct));
    eprintln!("proxy bench: op-bridge…");
    let (route, forward) = match op_bridge_columns(&dir, up_port, &up_ca) {
        Ok((r, f)) => (Ok(r), Ok(f)),
        Err(e) => (Err(e.clone()), Err(e)),
    };
    eprintln!("proxy bench: mitmproxy…");
    let [mitm_reverse, mitm_regular] = mitm_columns(&dir, up_port, &up_ca, &rt);
    let columns = [
        Column { name: "op-bridge route (http → https)", figures: route },
        Column { name: "op-bridge forward proxy (CONNECT, TLS intercepted)", figures: forward },
        Column { name: "mitmproxy reverse mode (http → https, addon)", figures: mitm_reverse },
        Column { name: "mitmproxy regular mode (CONNECT, TLS intercepted, addon)", figures: mitm_regular },
    ];

    println!("\n## Egress proxy: added latency and throughput\n");
    println!(
        "Keep-alive HTTPS to a local upstream (hyper + rustls) that answers 200 only for the real key; the \
         client sends a placeholder through each proxy. Latency over {LATENCY_REQUESTS} sequential requests on \
         one connection after {WARMUP_REQUESTS} warm-up; throughput on {CONNECTIONS} connections for {} s; \
         median [min–max] of {RUNS} runs on this machine ({} CPUs); compare rows, not runs.\n",
        THROUGHPUT_FOR.as_secs(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("| path | p50 | p99 | added p50 | added p99 | req/s, {CONNECTIONS} conns | non-200 |");
    println!("|---|---|---|---|---|---|---|");
    let ms = |us: f64| format!("{:.2}", us / 1000.0);
    let added = |us: f64| format!("{:+.2} ms", us / 1000.0);
    let rps = |r: f64| format!("{r:.0}");
    println!(
        "| direct (no proxy) | {} ms | {} ms | – | – | {} | {} |",
        spread(&direct.p50_us, ms),
        spread(&direct.p99_us, ms),
        spread(&direct.rps, rps),
        direct.failures
    );
    for column in &columns {
        match &column.figures {
            Ok(f) => println!(
                "| {} | {} ms | {} ms | {} | {} | {} | {}{} |",
                column.name,
                spread(&f.p50_us, ms),
                spread(&f.p99_us, ms),
                added(median(&f.p50_us) - median(&direct.p50_us)),
                added(median(&f.p99_us) - median(&direct.p99_us)),
                spread(&f.rps, rps),
                f.failures,
                if f.failures > 0 { " (FAILED: the key did not arrive)" } else { "" }
            ),
            Err(why) => println!("| {} | skipped: {why} | | | | | |", column.name),
        }
    }
    println!("\nUpstream 401s (requests that reached it without the key): {}", refused.load(Ordering::Relaxed));
    let _ = std::fs::remove_dir_all(&dir);
}
