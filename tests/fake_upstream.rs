//! The fake HTTPS upstream the proxy tests stand on (`tests/fake-upstream/`), checked on its
//! own, direct: it speaks TLS only to clients trusting its test CA, logs where the expected
//! key arrived, streams SSE event by event, streams uploads and downloads, answers the
//! OpenAI-compatible endpoints only for the expected key, and the real Python clients reach it.

mod upstream_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use upstream_support::*;

const KEY: &str = "sk-real-0123456789abcdef";

/// A temporary directory removed on drop.
struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("opb-up-{tag}-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn client_trusting(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn json(r: reqwest::Response) -> Json {
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn the_upstream_speaks_https_to_clients_trusting_its_ca_and_keeps_connections_alive() {
    let dir = Dir::new("tls");
    let up = FakeUpstream::start(&dir.0, KEY, &[]);
    let client = client_trusting(&up.ca);
    for host in ["localhost", "127.0.0.1", "[::1]"] {
        let url = format!("https://{host}:{}/echo?x=1", up.port);
        // ::1 may be absent in a container; the names bound to 127.0.0.1 must work.
        match client.post(&url).body("hello").send().await {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                let echo: Json = json(r).await;
                assert_eq!((echo["method"].as_str(), echo["query"].as_str()), (Some("POST"), Some("x=1")));
                assert_eq!(echo["body"], "hello");
            }
            Err(e) => assert!(host == "[::1]", "{url}: {e:?}"),
        }
    }
    let first = up.requests().len();
    for _ in 0..3 {
        client.get(up.url("/echo")).send().await.unwrap().bytes().await.unwrap();
    }
    let conns: Vec<u64> = up.requests()[first..].iter().map(|r| r["conn"].as_u64().unwrap()).collect();
    assert!(conns.windows(2).all(|w| w[0] == w[1]), "one kept-alive connection: {conns:?}");

    let untrusting = reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).build().unwrap();
    let err = untrusting.get(up.url("/echo")).send().await.expect_err("no CA, no connection");
    assert!(err.is_connect(), "{err:?}");
}

#[tokio::test]
async fn the_log_says_where_the_expected_key_and_watched_strings_arrived() {
    let dir = Dir::new("log");
    let up = FakeUpstream::start(&dir.0, KEY, &["PLACEHOLDER_X"]);
    let client = client_trusting(&up.ca);
    client.get(up.url("/echo")).header("x-api-key", KEY).send().await.unwrap();
    client.get(up.url(&format!("/echo?key={KEY}&ph=PLACEHOLDER_X"))).send().await.unwrap();
    client.get(up.url("/echo")).basic_auth("user", Some(KEY)).send().await.unwrap();
    // A body whose key straddles the server's 64 KiB read boundary.
    let mut body = vec![b'a'; 65536 - 5];
    body.extend_from_slice(format!(r#"{{"key":"{KEY}"}}"#).as_bytes());
    client.post(up.url("/upload")).body(body).send().await.unwrap();
    client.get(up.url(&format!("/{KEY}/echo"))).bearer_auth(KEY).send().await.unwrap();
    client.get(up.url("/echo")).header("x-other", "nothing").send().await.unwrap();

    let places: Vec<Json> = up.requests().iter().map(|r| r["key_at"].clone()).collect();
    assert_eq!(
        places,
        [
            serde_json::json!(["header:x-api-key"]),
            serde_json::json!(["query"]),
            serde_json::json!(["basic:authorization"]),
            serde_json::json!(["body"]),
            serde_json::json!(["path", "header:authorization"]),
            serde_json::json!([]),
        ]
    );
    let requests = up.requests();
    assert_eq!(requests[1]["watch_at"]["PLACEHOLDER_X"], serde_json::json!(["query"]));
    assert_eq!(requests[0]["watch_at"]["PLACEHOLDER_X"], serde_json::json!([]));
    assert_eq!(requests[4]["status"], 404);
}

#[tokio::test]
async fn echo_can_send_the_key_back_in_a_header_and_the_body() {
    let dir = Dir::new("leak");
    let up = FakeUpstream::start(&dir.0, KEY, &[]);
    let r = client_trusting(&up.ca).get(up.url("/echo?leak=1")).send().await.unwrap();
    assert_eq!(r.headers()["x-echoed-key"], KEY);
    let echo: Json = json(r).await;
    assert_eq!(echo["key"], KEY);
    let r = client_trusting(&up.ca).get(up.url("/echo")).send().await.unwrap();
    assert!(r.headers().get("x-echoed-key").is_none());
}

#[tokio::test]
async fn sse_sends_20_events_100_ms_apart_each_as_it_is_made() {
    let dir = Dir::new("sse");
    let up = FakeUpstream::start(&dir.0, KEY, &[]);
    let mut r = client_trusting(&up.ca).get(up.url("/sse")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let data: Json = serde_json::from_str(event.trim().strip_prefix("data: ").unwrap()).unwrap();
            arrivals.push((now(), data));
        }
    }
    assert_eq!(arrivals.len(), 20);
    let sent: Vec<f64> = arrivals.iter().map(|(_, d)| d["sent"].as_f64().unwrap()).collect();
    assert!(sent.windows(2).all(|w| w[1] - w[0] >= 0.099), "sent 100 ms apart (sleeps): {sent:?}");
    // Streamed, not buffered: the first event was here before the last one was made.
    assert!(arrivals[0].0 < sent[19], "first arrived {} after the last was sent {}", arrivals[0].0, sent[19]);
}

#[tokio::test]
async fn the_openai_endpoints_answer_only_the_expected_key() {
    let dir = Dir::new("openai");
    let up = FakeUpstream::start(&dir.0, KEY, &[]);
    let client = client_trusting(&up.ca);
    for auth in [None, Some("Bearer sk-wrong"), Some(&*format!("Bearer {KEY}x")), Some(KEY)] {
        let mut req = client.get(up.url("/v1/models"));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let body: Json = json(r).await;
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(!body.to_string().contains(KEY));
    }
    let models = json(client.get(up.url("/v1/models")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(models["data"][0]["id"], "fake-model");
    let chat = serde_json::json!({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]});
    let r = client
        .post(up.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client.post(up.url("/v1/chat/completions")).bearer_auth(KEY).header("content-type", "application/json");
    let answer = json(r.body(chat.to_string()).send().await.unwrap()).await;
    assert_eq!(answer["choices"][0]["message"]["content"], "Hello from the fake upstream.");
    let mut streaming = chat.clone();
    streaming["stream"] = true.into();
    let r = client
        .post(up.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(streaming.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let said: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Json>(d).unwrap()["choices"][0]["delta"]["content"].as_str().map(String::from)
        })
        .collect();
    assert_eq!(said, "Hello from the fake upstream.");
    let statuses: Vec<u64> = up.requests().iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [401, 401, 401, 401, 200, 401, 200, 200]);
}

#[tokio::test]
async fn uploads_and_downloads_stream_and_hash_any_size() {
    let dir = Dir::new("bulk");
    let up = FakeUpstream::start(&dir.0, KEY, &[]);
    let client = client_trusting(&up.ca);
    const N: usize = 8 << 20;
    for chunked in ["0", "1"] {
        let r = client.get(up.url(&format!("/download?bytes={N}&chunked={chunked}"))).send().await.unwrap();
        let body = r.bytes().await.unwrap();
        assert!(body.len() == N && body[..] == download_pattern(N)[..], "chunked={chunked}");
    }
    // A chunked request body (curl streams a file that way when told to).
    let blob = dir.0.join("blob");
    let data: Vec<u8> = (0..N).map(|_| fastrand::u8(..)).collect();
    std::fs::write(&blob, &data).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&up.ca)
        .args(["-H", "Transfer-Encoding: chunked", "--data-binary"])
        .arg(format!("@{}", blob.display()))
        .arg(up.url("/upload"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Json = serde_json::from_slice(&out.stdout).unwrap();
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!((answer["len"].as_u64(), answer["sha256"].as_str()), (Some(N as u64), Some(&*digest)));
    let logged = up.requests().pop().unwrap();
    let chunked = logged["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("transfer-encoding"));
    assert!(chunked, "the upload was sent chunked: {logged}");
}

/// The real Python clients (requests, httpx, the openai SDK) reach the upstream direct,
/// trusting its CA: the same modes the proxy tests run through op-bridge.
#[test]
fn the_python_clients_reach_the_upstream_direct() {
    let dir = Dir::new("py");
    let up = FakeUpstream::start(&dir.0, KEY, &[]);
    let ca = up.ca.to_str().unwrap();
    for client in ["requests", "httpx"] {
        let url = up.url("/echo");
        let (out, raw) = run_client(
            &[
                client,
                "POST",
                &url,
                "--ca",
                ca,
                "-H",
                &format!("x-api-key: {KEY}"),
                "--json",
                r#"{"a":1}"#,
                "--repeat",
                "3",
            ],
            &[],
        );
        assert!(raw.status.success(), "{client}: {out}");
        assert_eq!(out["statuses"], serde_json::json!([200, 200, 200]), "{client}");
        let echo: Json = serde_json::from_str(out["results"][0]["body"].as_str().unwrap()).unwrap();
        assert_eq!(echo["headers"]["content-type"], "application/json");
        let url = up.url("/sse?n=3&interval_ms=10");
        let (out, _) = run_client(&[client, "GET", &url, "--ca", ca, "--events"], &[]);
        assert_eq!(out["results"][0]["events"].as_array().map(Vec::len), Some(3), "{client}: {out}");
        let url = up.url("/download?bytes=1000000");
        let (out, _) = run_client(&[client, "GET", &url, "--ca", ca, "--download"], &[]);
        assert_eq!(out["results"][0]["body_len"], 1_000_000, "{client}: {out}");
        let url = up.url("/upload");
        let (out, _) = run_client(&[client, "POST", &url, "--ca", ca, "--upload-bytes", "1000000"], &[]);
        let answer: Json = serde_json::from_str(out["results"][0]["body"].as_str().unwrap()).unwrap();
        assert_eq!(answer["len"], 1_000_000, "{client}: {out}");
    }
    let base = up.url("/v1");
    for (api, stream) in [("chat", false), ("chat", true), ("responses", false), ("responses", true)] {
        let mut args = vec!["openai", "--base-url", &base, "--api-key", KEY, "--ca", ca, "--api", api];
        if stream {
            args.push("--stream");
        }
        let (out, raw) = run_client(&args, &[]);
        assert!(raw.status.success(), "{api} stream={stream}: {out}");
        assert_eq!(out["results"][0]["text"], "Hello from the fake upstream.", "{api} stream={stream}");
    }
    let (out, raw) = run_client(&["openai", "--base-url", &base, "--api-key", "sk-wrong", "--ca", ca], &[]);
    assert!(!raw.status.success());
    assert!(out["error"].as_str().unwrap().starts_with("AuthenticationError"), "{out}");
    assert_eq!(out["statuses"], serde_json::json!([401]));
}
