//! The Connect backend against the in-repo fake Connect server (tests/fake-connect/server.py,
//! which follows the published OpenAPI spec): resolution by title, id and section with no
//! `op` anywhere, connection reuse and one full-item GET per item, PATCH write-back with a
//! 429 in the way, outages served stale, a wrong token failing closed without leaking, and
//! https through a private CA.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value as Json, json};

const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.connect-TOKEN-4f1d9a";

fn new_id() -> String {
    (0..26).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[fastrand::usize(..36)])).collect()
}

/// A full item as Connect stores it. `fields`: (label, value, section label).
fn item(title: &str, fields: &[(&str, &str, Option<&str>)]) -> Json {
    let mut sections: Vec<Json> = Vec::new();
    let mut out = Vec::new();
    for (label, value, section) in fields {
        let mut field = json!({"id": new_id(), "label": label, "type": "CONCEALED", "value": value});
        if let Some(section) = section {
            let id = match sections.iter().find(|s| s["label"] == *section) {
                Some(s) => s["id"].as_str().unwrap().to_string(),
                None => {
                    let id = new_id();
                    sections.push(json!({"id": id, "label": section}));
                    id
                }
            };
            field["section"] = json!({"id": id});
        }
        out.push(field);
    }
    json!({"id": new_id(), "title": title, "category": "API_CREDENTIAL", "version": 1,
           "updatedAt": "2026-01-01T00:00:00Z", "sections": sections, "fields": out})
}

/// The fake Connect server, killed on drop.
struct FakeConnect {
    child: Child,
    port: u16,
    store: PathBuf,
    control: PathBuf,
    stats: PathBuf,
    stderr: PathBuf,
    tls: bool,
}

impl FakeConnect {
    fn start(dir: &TestDir, vaults: Json, tls: Option<(&Path, &Path)>) -> FakeConnect {
        let store = dir.join("connect-store.json");
        std::fs::write(&store, serde_json::to_vec_pretty(&json!({ "vaults": vaults })).unwrap()).unwrap();
        let (control, stats, port_file, stderr) =
            (dir.join("connect-control.json"), dir.join("connect-stats.json"), dir.join("port"), dir.join("fake.err"));
        let mut cmd = Command::new("python3");
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-connect/server.py"))
            .env("FAKE_CONNECT_STORE", &store)
            .env("FAKE_CONNECT_TOKEN", TOKEN)
            .env("FAKE_CONNECT_CONTROL", &control)
            .env("FAKE_CONNECT_STATS", &stats)
            .env("FAKE_CONNECT_PORT_FILE", &port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some((cert, key)) = tls {
            cmd.env("FAKE_CONNECT_CERT", cert).env("FAKE_CONNECT_KEY", key);
        }
        let child = cmd.spawn().expect("python3 runs the fake Connect server");
        let mut fake = FakeConnect { child, port: 0, store, control, stats, stderr, tls: tls.is_some() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while fake.port == 0 {
            fake.port = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
            assert!(
                Instant::now() < deadline,
                "fake Connect did not start: {}",
                std::fs::read_to_string(&fake.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fake
    }

    fn host(&self) -> String {
        if self.tls { format!("https://localhost:{}", self.port) } else { format!("http://127.0.0.1:{}", self.port) }
    }

    fn control(&self, knobs: Json) {
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&knobs).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }

    fn stats(&self) -> Json {
        serde_json::from_slice(&std::fs::read(&self.stats).unwrap()).unwrap()
    }

    fn route(&self, name: &str) -> u64 {
        self.stats()["by_route"][name].as_u64().unwrap_or(0)
    }

    fn store(&self) -> Json {
        serde_json::from_slice(&std::fs::read(&self.store).unwrap()).unwrap()
    }

    fn write_store(&self, store: &Json) {
        let tmp = self.store.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(store).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.store).unwrap();
    }

    /// The value of field `label` (no section) of item `title` in the vault named `vault`.
    fn field_in(&self, vault: &str, title: &str, label: &str) -> Option<String> {
        let store = self.store();
        let vault = store["vaults"].as_array()?.iter().find(|v| v["name"] == vault)?.clone();
        let item = vault["items"].as_array()?.iter().find(|i| i["title"] == title)?.clone();
        let field = item["fields"].as_array()?.iter().find(|f| f["label"] == label)?.clone();
        field["value"].as_str().map(str::to_string)
    }

    /// The value of field `label` (in section `section`, by label) of item `title`.
    fn field(&self, title: &str, section: Option<&str>, label: &str) -> Option<String> {
        let store = self.store();
        let item = store["vaults"][0]["items"].as_array()?.iter().find(|i| i["title"] == title)?.clone();
        let section_id = match section {
            Some(s) => Some(item["sections"].as_array()?.iter().find(|x| x["label"] == s)?["id"].clone()),
            None => None,
        };
        let field = item["fields"]
            .as_array()?
            .iter()
            .find(|f| f["label"] == label && section_id.as_ref().is_none_or(|id| f["section"]["id"] == *id))?;
        field["value"].as_str().map(str::to_string)
    }
}

impl Drop for FakeConnect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory for PATH that holds no `op` (nor anything else).
fn empty_path(dir: &TestDir) -> String {
    let path = dir.join("empty-bin");
    std::fs::create_dir_all(&path).unwrap();
    path.display().to_string()
}

/// `op-bridge daemon` against `fake`, with no `op` on PATH and no --backend (chosen from the
/// environment).
fn daemon(dir: &TestDir, fake: &FakeConnect, refs: &[(&str, String)]) -> BrokerBuilder {
    // These tests refresh several times in a row: no client rate limit.
    let mut builder = BrokerBuilder::new(dir, "daemon")
        .env("PATH", empty_path(dir))
        .env("OP_CONNECT_HOST", fake.host())
        .env("OP_CONNECT_TOKEN", TOKEN)
        .args(["--refresh-min-interval", "0"]);
    for (name, reference) in refs {
        builder = builder.env(format!("OP_{name}_REF"), reference.clone());
    }
    builder
}

fn get(broker: &Broker, name: &str) -> Vec<u8> {
    let out = broker.client(&["get", name], None);
    assert!(out.status.success(), "get {name}: {}\n{}", describe(&out), broker.stderr());
    out.stdout
}

fn status(broker: &Broker) -> Json {
    let out = broker.client(&["status", "--json"], None);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn state_of(status: &Json, name: &str) -> String {
    let secrets = status["secrets"].as_array().unwrap();
    secrets.iter().find(|s| s["name"] == name).map(|s| s["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

#[test]
fn refs_by_title_id_and_section_resolve_byte_exact_over_reused_connections() {
    let dir = TestDir::new("cn-res");
    let multi = "{\n  \"access\": \"a\\nb\",\n  \"refresh\": \"r\"\n}\n";
    let mut items = vec![
        item("GitHub", &[("token", "ghp_exact ", None), ("credential", multi, Some("OAuth"))]),
        item("Ünïcode Item", &[("password", "pässwörd\ttab", None)]),
    ];
    for i in 0..18 {
        items.push(item(&format!("svc-{i}"), &[("api_key", &format!("key-{i}"), None)]));
    }
    let vault_id = new_id();
    let (gh_id, gh_field) = (items[0]["id"].as_str().unwrap().to_string(), items[0]["fields"][0]["id"].clone());
    let fake = FakeConnect::start(&dir, json!([{"id": vault_id, "name": "Prod Vault", "items": items}]), None);

    let mut refs = vec![
        ("GH", "op://prod vault/GITHUB/token".to_string()),
        ("GH_BY_ID", format!("op://{vault_id}/{gh_id}/{}", gh_field.as_str().unwrap())),
        ("CRED", "op://Prod Vault/github/oauth/credential".to_string()),
        ("UNI", "op://Prod Vault/ünïcode item/password".to_string()),
    ];
    for i in 0..18 {
        refs.push((Box::leak(format!("SVC{i}").into_boxed_str()), format!("op://Prod Vault/svc-{i}/api_key")));
    }
    let broker = daemon(&dir, &fake, &refs).args(["--concurrency", "4"]).start();
    assert!(broker.stderr().contains("using 1Password Connect"), "{}", broker.stderr());

    assert_eq!(get(&broker, "GH"), b"ghp_exact ");
    assert_eq!(get(&broker, "GH_BY_ID"), b"ghp_exact ");
    assert_eq!(get(&broker, "CRED"), multi.as_bytes());
    assert_eq!(get(&broker, "UNI"), "pässwörd\ttab".as_bytes());
    for i in [0, 17] {
        assert_eq!(get(&broker, &format!("SVC{i}")), format!("key-{i}").as_bytes());
    }

    // 20 items (one named by title in two cases and by ids): one vault lookup, one listing of
    // its items for all the titles, one full-item GET per item.
    let by_route = fake.stats()["by_route"].clone();
    assert_eq!((fake.route("vaults"), fake.route("items"), fake.route("item")), (1, 1, 20), "{by_route}");

    // A refresh reuses the cached ids and the open connections: one GET per item, no lookups.
    let lookups = fake.route("vaults") + fake.route("items");
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(fake.route("item"), 40);
    let stats = fake.stats();
    let (requests, connections) = (stats["requests"].as_u64().unwrap(), stats["connections"].as_u64().unwrap());
    assert_eq!(requests, 42);
    assert!(stats["max_in_flight"].as_u64().unwrap() <= 4, "more requests at once than --concurrency 4: {stats}");
    assert!(connections * 4 <= requests, "{connections} connections for {requests} requests: no keep-alive");
    assert_eq!(fake.route("vaults") + fake.route("items"), lookups, "ids were looked up again");
}

#[test]
fn a_title_matching_several_items_is_an_error_naming_the_reference() {
    let dir = TestDir::new("cn-dup");
    let items = json!([
        item("Shared", &[("k", "1", None)]),
        item("shared", &[("k", "2", None)]),
        item("Other", &[("k", "3", None)])
    ]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), None);
    let refs = [("K", "op://V/Shared/k".to_string()), ("OTHER", "op://V/Other/k".to_string())];
    let out = daemon(&dir, &fake, &refs).output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("op://V/Shared") && stderr.contains("2 entries"), "{stderr}");
}

#[test]
fn a_watched_change_is_patched_byte_exact_through_429s() {
    let dir = TestDir::new("cn-wb");
    let oauth = item("OAuth", &[("refresh_token", "initial", None), ("client_id", "cid", None)]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "Dev", "items": [oauth]}]), None);
    let (existing, fresh) = (dir.join("creds/refresh"), dir.join("creds/access"));
    let broker = daemon(&dir, &fake, &[])
        .args(["--debounce", "100ms", "--watch"])
        .arg(format!("{}=REFRESH=op://Dev/OAuth/refresh_token", existing.display()))
        .arg("--watch")
        .arg(format!("{}=ACCESS=op://Dev/OAuth/Tokens/access_token", fresh.display()))
        .start();
    assert_eq!(std::fs::read(&existing).unwrap(), b"initial", "materialized from Connect");

    fake.control(json!({"rules": [{"status": 429, "count": 2, "method": "PATCH", "retry_after": 1}]}));
    let rotated = "{\"refresh\": \"rot-Ω\",\n \"n\": 1}\n";
    std::fs::write(&existing, rotated).unwrap();
    std::fs::write(&fresh, "new-access-token").unwrap();
    let stored = eventually(Duration::from_secs(30), || {
        fake.field("OAuth", None, "refresh_token").as_deref() == Some(rotated)
            && fake.field("OAuth", Some("Tokens"), "access_token").as_deref() == Some("new-access-token")
    });
    assert!(stored, "{}\n{}", fake.store(), broker.stderr());
    assert_eq!(fake.field("OAuth", None, "client_id").as_deref(), Some("cid"), "another field was touched");

    // The fake logs a request after it has answered: wait for the successful PATCH's line.
    let logged =
        || fake.stats()["log"].as_array().unwrap().iter().any(|r| r["method"] == "PATCH" && r["status"] == 200);
    assert!(eventually(Duration::from_secs(5), logged));
    let log = fake.stats()["log"].clone();
    let patches: Vec<&Json> = log.as_array().unwrap().iter().filter(|r| r["method"] == "PATCH").collect();
    assert!(patches.iter().filter(|p| p["status"] == 429).count() == 2, "{patches:?}");
    assert!(patches.iter().any(|p| p["status"] == 200), "{patches:?}");
    // Retry-After: 1 was honoured (a lower bound: sleeping never ends early). Each watched
    // field may have its own PATCH, so only the first success is measured: whichever target
    // it belongs to, it comes after a wait of its own 429's delay.
    let ts = |status: u64| patches.iter().find(|p| p["status"] == status).unwrap()["ts"].as_f64().unwrap();
    let waited = ts(200) - ts(429);
    assert!(waited >= 0.95, "stored {waited:.2}s after a 429 that said 1s: {patches:?}");
    for secret in ["rot-", "new-access-token"] {
        assert!(!log.to_string().contains(secret), "a value in a URL or header: {log}");
        assert!(!broker.stderr().contains(secret), "a value in the log");
    }
}

#[test]
fn an_outage_serves_stale_and_an_upstream_change_is_picked_up() {
    let dir = TestDir::new("cn-out");
    let items = json!([item("Api", &[("key", "v1", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), None);
    let broker = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())]).args(["--retries", "2"]).start();
    assert_eq!(get(&broker, "KEY"), b"v1");

    fake.control(json!({"outage": true}));
    let _ = broker.client(&["refresh"], None);
    let st = status(&broker);
    assert_eq!(state_of(&st, "KEY"), "stale", "{st}");
    assert_eq!(get(&broker, "KEY"), b"v1");

    let mut store = fake.store();
    store["vaults"][0]["items"][0]["fields"][0]["value"] = json!("v2");
    fake.write_store(&store);
    // Connections dropped mid-request are retried.
    fake.control(json!({"drop": 1}));
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "{}\n{}", describe(&out), broker.stderr());
    assert_eq!(get(&broker, "KEY"), b"v2");
    assert_eq!(state_of(&status(&broker), "KEY"), "ok");
    assert!(fake.stats()["log"].as_array().unwrap().iter().any(|r| r["status"] == "dropped"));

    let text = broker.client(&["status"], None);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let expected = format!("connect {}: health 1Password Connect API 1.7.1, sync ACTIVE", fake.host());
    assert!(text.contains(&expected), "{text}");
}

#[test]
fn a_wrong_token_exits_69_and_the_token_leaks_nowhere() {
    let dir = TestDir::new("cn-tok");
    let items = json!([item("Api", &[("key", "value-1", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), None);
    let wrong = "opc-WRONG-token-7c1e55";
    let out = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())])
        .env("OP_CONNECT_TOKEN", wrong)
        .args(["--log-level", "trace"])
        .output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("401"), "{text}");
    assert!(!text.contains(wrong), "token in the output: {text}");
    assert_eq!(fake.route("item"), 0);

    // The right token, traced: not in the log, STATUS, the argv, nor anything the fake logged.
    let broker = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())]).args(["--log-level", "trace"]).start();
    assert_eq!(get(&broker, "KEY"), b"value-1");
    let st = status(&broker).to_string();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", broker.pid())).unwrap();
    let secret_part = "connect-TOKEN-4f1d9a";
    assert!(!st.contains(secret_part), "{st}");
    assert!(!String::from_utf8_lossy(&cmdline).contains(secret_part));
    assert!(!broker.stderr().contains(secret_part), "token in the trace log");
    assert!(!fake.stats().to_string().contains(secret_part));
    assert!(broker.stderr().lines().count() > 5, "the trace log is not empty");
}

/// A private CA and a certificate for localhost/127.0.0.1 signed by it.
fn private_ca(dir: &TestDir) -> (PathBuf, PathBuf, PathBuf) {
    let (ca_key, ca, key, csr, cert, ext) = (
        dir.join("ca.key"),
        dir.join("ca.pem"),
        dir.join("srv.key"),
        dir.join("srv.csr"),
        dir.join("srv.pem"),
        dir.join("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let p = |p: &PathBuf| p.display().to_string();
    let steps: Vec<Vec<String>> = vec![
        vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=op-bridge test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &p(&ca_key),
            "-out",
            &p(&ca),
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p(&key),
            "-out",
            &p(&csr),
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        vec![
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&ca),
            "-CAkey",
            &p(&ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&ext),
            "-out",
            &p(&cert),
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    for args in steps {
        let out = Command::new("openssl").args(&args).current_dir(dir.path()).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    }
    (ca, cert, key)
}

#[test]
fn https_through_a_private_ca_works_with_ssl_cert_file_and_is_refused_without() {
    let dir = TestDir::new("cn-tls");
    let (ca, cert, key) = private_ca(&dir);
    let items = json!([item("Api", &[("key", "over-tls", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), Some((&cert, &key)));

    let out = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())]).args(["--retries", "1"]).output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert_eq!(fake.stats()["requests"], 0, "a request got through an untrusted connection");

    let broker =
        daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())]).env("SSL_CERT_FILE", ca.display().to_string()).start();
    assert_eq!(get(&broker, "KEY"), b"over-tls");
    assert_eq!(fake.route("item"), 1);
}

#[test]
fn connect_without_a_host_is_a_usage_error() {
    let dir = TestDir::new("cn-use");
    let out = BrokerBuilder::new(&dir, "daemon").args(["--backend", "connect"]).env("OP_CONNECT_TOKEN", TOKEN).output();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OP_CONNECT_HOST"));
}

#[test]
fn an_item_made_again_under_a_new_id_is_found_by_its_title() {
    let dir = TestDir::new("cn-new");
    let items = json!([item("Api", &[("key", "old", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), None);
    let broker = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())]).start();
    assert_eq!(get(&broker, "KEY"), b"old");

    let mut store = fake.store();
    store["vaults"][0]["items"] = json!([item("Api", &[("key", "remade", None)])]);
    fake.write_store(&store);
    let out = broker.client(&["refresh"], None);
    assert!(out.status.success(), "{}\n{}", describe(&out), broker.stderr());
    assert_eq!(get(&broker, "KEY"), b"remade");
    assert_eq!(state_of(&status(&broker), "KEY"), "ok");
}

#[test]
fn a_request_that_outlives_op_timeout_fails_as_a_timeout() {
    let dir = TestDir::new("cn-slow");
    let items = json!([item("Api", &[("key", "v", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), None);
    fake.control(json!({"latency_ms": 5000}));
    let out = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())])
        .args(["--op-timeout", "300ms", "--retries", "1"])
        .output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not answer within 300ms"), "{}", describe(&out));
}

#[test]
fn create_items_makes_a_missing_item_with_its_field_in_one_post() {
    let dir = TestDir::new("cn-new-item");
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "Dev", "items": []}]), None);
    let file = dir.join("creds/token");
    let broker = daemon(&dir, &fake, &[])
        .args(["--debounce", "100ms", "--create-items", "--watch"])
        .arg(format!("{}=TOKEN=op://Dev/Fresh Item/OAuth/token", file.display()))
        .start();
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "first-token").unwrap();
    let stored = eventually(Duration::from_secs(20), || {
        fake.field("Fresh Item", Some("OAuth"), "token").as_deref() == Some("first-token")
    });
    assert!(stored, "{}\n{}", fake.store(), broker.stderr());
    // The fake counts a request after it has answered.
    assert!(eventually(Duration::from_secs(5), || fake.route("create") == 1), "{}", fake.stats());
    assert!(!fake.stats()["log"].to_string().contains("first-token"));
}

/// A 429 whose `Retry-After` says a day, met while a write looks up a vault's id, must not
/// stall the backend: a SET to another (already known) vault is stored meanwhile, and the
/// flush at stop cuts the pause short and stores the first write before the grace is out.
#[test]
fn a_long_retry_after_in_an_id_lookup_holds_up_neither_other_sets_nor_the_stop() {
    let dir = TestDir::new("cn-429");
    let vaults = json!([
        {"id": new_id(), "name": "V", "items": [item("Api", &[("key", "v1", None)])]},
        {"id": new_id(), "name": "W", "items": [item("Other", &[("token", "t1", None)])]},
    ]);
    let fake = FakeConnect::start(&dir, vaults, None);
    let mut broker =
        daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())]).args(["--allow-set-any", "--grace", "30s"]).start();
    assert_eq!(get(&broker, "KEY"), b"v1");

    // The next two lookups of vault W by name are answered "come back tomorrow".
    fake.control(json!({"rules": [{"status": 429, "count": 2, "method": "GET", "path_contains": "/v1/vaults",
                                   "query_contains": "name eq \"W\"", "retry_after": 86400}]}));
    let socket = broker.socket.clone();
    let first = std::thread::spawn(move || {
        client(&socket, &["set", "OTHER", "op://W/Other/token", "-"], Some(b"rotated-in-w"))
    });
    let limited = || fake.stats()["log"].as_array().unwrap().iter().any(|r| r["status"] == 429);
    assert!(eventually(Duration::from_secs(20), limited), "{}\n{}", fake.stats(), broker.stderr());

    // Vault V's id is known: its SET owes nothing to the paused lookup of W.
    let out = broker.client(&["set", "KEY", "-"], Some(b"v2-while-w-waits"));
    assert!(out.status.success(), "{}\n{}", describe(&out), broker.stderr());
    assert_eq!(fake.field_in("V", "Api", "key").as_deref(), Some("v2-while-w-waits"));
    let first = first.join().unwrap();
    assert_eq!(first.status.code(), Some(75), "the SET in W is pending: {}\n{}", describe(&first), broker.stderr());

    // The stop's flush does not wait out the day: it retries, and the 429s are spent.
    broker.signal(libc::SIGTERM);
    let status = broker.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", broker.stderr());
    assert_eq!(fake.field_in("W", "Other", "token").as_deref(), Some("rotated-in-w"));
}

/// A self-signed certificate made the usual way (`openssl req -x509`, which marks it CA:TRUE)
/// for localhost/127.0.0.1: (certificate, key).
fn self_signed(dir: &TestDir) -> (PathBuf, PathBuf) {
    self_signed_for(dir, "DNS:localhost,IP:127.0.0.1")
}

/// [`self_signed`] for the names `san` (an openssl subjectAltName value).
fn self_signed_for(dir: &TestDir, san: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("self.pem"), dir.join("self.key"));
    let args = [
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        &format!("subjectAltName={san}"),
        "-keyout",
        &key.display().to_string(),
        "-out",
        &cert.display().to_string(),
    ];
    let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    let text = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&cert).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"), "{}", describe(&text));
    (cert, key)
}

#[test]
fn a_self_signed_server_certificate_in_ssl_cert_file_is_trusted() {
    let dir = TestDir::new("cn-self");
    let (cert, key) = self_signed(&dir);
    let items = json!([item("Api", &[("key", "over-self-signed-tls", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), Some((&cert, &key)));
    let broker = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())])
        .env("SSL_CERT_FILE", cert.display().to_string())
        .start();
    assert_eq!(get(&broker, "KEY"), b"over-self-signed-tls");
}

#[test]
fn a_certificate_refused_is_a_permanent_failure_that_says_what_to_do() {
    let dir = TestDir::new("cn-cert");
    let (cert, key) = self_signed(&dir);
    let other_dir = TestDir::new("cn-cert2");
    let (other, _) = self_signed(&other_dir);
    let items = json!([item("Api", &[("key", "v", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), Some((&cert, &key)));
    // Not trusted (another self-signed certificate is): refused, not retried, and the message
    // names the remedy.
    let out = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())])
        .env("SSL_CERT_FILE", other.display().to_string())
        .args(["--retries", "4"])
        .output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SSL_CERT_FILE"), "{stderr}");
    assert!(!stderr.contains("retry 1/"), "a certificate failure was retried: {stderr}");
    assert!(!stderr.contains("(transient)"), "{stderr}");
    assert_eq!(fake.stats()["requests"], 0, "a request got through an untrusted connection");
}

#[test]
fn a_self_signed_certificate_for_another_name_is_refused() {
    let dir = TestDir::new("cn-name");
    let (cert, key) = self_signed_for(&dir, "DNS:connect.example");
    let items = json!([item("Api", &[("key", "v", None)])]);
    let fake = FakeConnect::start(&dir, json!([{"id": new_id(), "name": "V", "items": items}]), Some((&cert, &key)));
    let out = daemon(&dir, &fake, &[("KEY", "op://V/Api/key".into())])
        .env("SSL_CERT_FILE", cert.display().to_string())
        .output();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not trusted"), "{}", describe(&out));
    assert_eq!(fake.stats()["requests"], 0, "a request got through to a server of another name");
}
