//! The fake OAuth 2.0 server (`tests/fake-oauth/server.py`) served over https with a test CA,
//! seeded with one client and one refresh token; its knobs, events and state; the fake `op`
//! vault item naming it; and the plain HTTP/1.1 client an app uses to call the protected API
//! through op-bridge's route. For the OAuth soak and crash tests and the OAuth benchmark:
//! `mod oauth_support;` next to `mod common;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

/// The OAuth client the server knows and the vault item names.
pub const CLIENT_ID: &str = "soak-app";
pub const CLIENT_SECRET: &str = "soak-client-secret";
/// The token family of the seeded refresh token.
pub const FAMILY: &str = "soak";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A running fake OAuth server, killed on drop.
pub struct OAuthServer {
    child: Child,
    pub port: u16,
    /// The test CA (PEM) that signed the server's certificate: op-bridge's `SSL_CERT_FILE`.
    pub ca: PathBuf,
    /// The refresh token the family starts with (what the vault item is seeded with).
    pub seed: String,
    state: PathBuf,
    control: PathBuf,
    events: PathBuf,
    busy: PathBuf,
    /// The knobs in force besides `hold` (re-written whenever `hold` changes).
    knobs: Mutex<Json>,
}

impl OAuthServer {
    /// Makes the certificates (the fake upstream's: `localhost` and 127.0.0.1) and starts the
    /// server in `dir` with `knobs`, seeded with [`CLIENT_ID`] (HTTP Basic) and one fresh
    /// refresh token.
    pub fn start(dir: &Path, knobs: Json) -> OAuthServer {
        let certs = dir.join("certs");
        super::common::fixtures::make_certs(&certs);
        let seed = format!("rt_seed_{:016x}", fastrand::u64(..));
        let state = dir.join("oauth-state.json");
        let seeded = json!({
            "clients": {CLIENT_ID: {"secret": CLIENT_SECRET, "auth": "basic"}},
            "refresh_tokens": {&seed: {"client": CLIENT_ID, "family": FAMILY, "used_at": null, "successor": null}},
            "families": {FAMILY: {"revoked": false}},
        });
        std::fs::write(&state, seeded.to_string()).unwrap();
        let port_file = dir.join("oauth-port");
        let control = dir.join("oauth-control.json");
        write_control(&control, &knobs, false);
        let mut child = Command::new("python3")
            .arg(repo().join("tests/fake-oauth/server.py"))
            .env("FAKE_OAUTH_STATE", &state)
            .env("FAKE_OAUTH_CONTROL", &control)
            .env("FAKE_OAUTH_EVENTS", dir.join("oauth-events.jsonl"))
            .env("FAKE_OAUTH_BUSY", dir.join("oauth-busy"))
            .env("FAKE_OAUTH_PORT_FILE", &port_file)
            .env("FAKE_OAUTH_CERT", certs.join("leaf.pem"))
            .env("FAKE_OAUTH_KEY", certs.join("leaf.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("oauth-server.stderr")).unwrap())
            .spawn()
            .expect("python3 runs the fake OAuth server");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok()) {
                break port;
            }
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = std::fs::read_to_string(dir.join("oauth-server.stderr")).unwrap_or_default();
                panic!("the fake OAuth server did not start: {stderr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        OAuthServer {
            child,
            port,
            ca: certs.join("ca.pem"),
            seed,
            state,
            control,
            events: dir.join("oauth-events.jsonl"),
            busy: dir.join("oauth-busy"),
            knobs: Mutex::new(knobs),
        }
    }

    /// `https://localhost:PORT/token`.
    pub fn token_url(&self) -> String {
        format!("https://localhost:{}/token", self.port)
    }

    /// `localhost:PORT`: the host the access token is bound to and the route's upstream.
    pub fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// Replaces the knobs (and clears `hold`).
    pub fn set_knobs(&self, knobs: Json) {
        *self.knobs.lock().unwrap() = knobs;
        self.write_knobs(false);
    }

    fn write_knobs(&self, hold: bool) {
        write_control(&self.control, &self.knobs.lock().unwrap(), hold);
    }

    /// The raw event lines (JSON), oldest first; a line still being written is left out.
    pub fn event_text(&self) -> String {
        let mut text = std::fs::read_to_string(&self.events).unwrap_or_default();
        if let Some(end) = text.rfind('\n') {
            text.truncate(end + 1);
        } else {
            text.clear();
        }
        text
    }

    /// Every event, oldest first.
    pub fn events(&self) -> Vec<Json> {
        self.event_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// How many events of kind `event` there are.
    pub fn count(&self, event: &str) -> usize {
        let needle = format!("\"event\": \"{event}\"");
        self.event_text().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Refresh-token grants answered with new tokens.
    pub fn rotations(&self) -> usize {
        self.event_text()
            .lines()
            .filter(|l| l.contains("\"event\": \"issued\"") && l.contains("\"grant\": \"refresh_token\""))
            .count()
    }

    /// The server's state file (every token it issued, and which refresh tokens are spent).
    pub fn state(&self) -> Json {
        serde_json::from_slice(&std::fs::read(&self.state).unwrap()).unwrap()
    }

    /// The refresh tokens of the family not used yet: exactly one (the newest) while the
    /// chain is intact.
    pub fn unused_refresh_tokens(&self) -> Vec<String> {
        let state = self.state();
        state["refresh_tokens"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["family"] == FAMILY && e["used_at"].is_null())
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// The access token issued last (None before the first grant).
    pub fn newest_access_token(&self) -> Option<String> {
        let state = self.state();
        state["access_tokens"]
            .as_object()?
            .iter()
            .max_by(|a, b| a.1["expires_at"].as_f64().partial_cmp(&b.1["expires_at"].as_f64()).unwrap())
            .map(|(t, _)| t.clone())
    }

    /// Every token the server ever issued (refresh and access), for leak scans.
    pub fn all_tokens(&self) -> Vec<String> {
        let state = self.state();
        let mut tokens: Vec<String> = Vec::new();
        for key in ["refresh_tokens", "access_tokens"] {
            tokens.extend(state[key].as_object().unwrap().keys().cloned());
        }
        tokens
    }

    /// Token requests being granted right now.
    fn busy(&self) -> u64 {
        std::fs::read_to_string(&self.busy).ok().and_then(|b| b.trim().parse().ok()).unwrap_or(0)
    }

    /// Brings the client to a moment outside any token exchange: new token requests are held
    /// unanswered, the running grants finish, and `accepted` says the client has taken every
    /// answer it was given (e.g. STATUS counts as many refreshes as the server issued to it). A
    /// client killed now has lost no grant. Call [`OAuthServer::release`] after the kill.
    ///
    /// With a reuse leeway of 0, a kill inside an exchange (the provider granted, the answer
    /// not yet journaled) loses the chain for any client; that is what the leeway is for.
    pub fn quiesce(&self, limit: Duration, mut accepted: impl FnMut() -> bool) -> Result<Duration, String> {
        let started = Instant::now();
        self.hold(limit)?;
        while !accepted() {
            if started.elapsed() > limit {
                return Err(format!("the client had not taken the last token answer {limit:?} after it was sent"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(started.elapsed())
    }

    /// Refresh-token grants issued at or after `since` (Unix seconds).
    pub fn rotations_since(&self, since: f64) -> usize {
        self.events()
            .iter()
            .filter(|e| e["event"] == "issued" && e["grant"] == "refresh_token")
            .filter(|e| e["ts"].as_f64().is_some_and(|ts| ts >= since))
            .count()
    }

    /// Holds new token requests and waits until no grant is running: from now on nothing is
    /// issued until [`OAuthServer::release`].
    pub fn hold(&self, limit: Duration) -> Result<(), String> {
        self.write_knobs(true);
        let deadline = Instant::now() + limit;
        while self.busy() != 0 {
            if Instant::now() > deadline {
                return Err(format!("a token grant was still running after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// When the newest access token expires (Unix seconds).
    pub fn newest_expiry(&self) -> Option<f64> {
        let newest = self.newest_access_token()?;
        self.state()["access_tokens"][&newest]["expires_at"].as_f64()
    }

    /// Lets held token requests go on (a held request whose client died is dropped unissued
    /// when the `check_client` knob is set).
    pub fn release(&self) {
        self.write_knobs(false);
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the server's control file atomically (it is re-read on every request).
fn write_control(path: &Path, knobs: &Json, hold: bool) {
    let mut knobs = knobs.clone();
    knobs["hold"] = json!(hold);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, knobs.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The fake `op` store holding the OAuth client item `op://v/oauth` for `server`.
pub fn vault(server: &OAuthServer) -> Json {
    json!({"v": {"oauth": {
        "token_url": server.token_url(),
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": server.seed,
    }}})
}

/// One `GET path` with `Authorization: Bearer bearer` to `http://addr` on a new connection;
/// the status and the (de-chunked) body. An error when no whole answer came (op-bridge down,
/// or killed mid-answer).
pub fn app_get(addr: &str, path: &str, bearer: &str) -> std::io::Result<(u16, String)> {
    let target = addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    // Generous: a request may wait for a refresh under load.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let cut = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no whole HTTP answer");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(cut)?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(cut)?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let (mut rest, mut decoded) = (body, String::new());
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or_else(cut)?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).map_err(|_| cut())?;
        if size == 0 {
            return Ok((status, decoded));
        }
        decoded.push_str(after.get(..size).ok_or_else(cut)?);
        rest = after.get(size..).and_then(|r| r.strip_prefix("\r\n")).ok_or_else(cut)?;
    }
}
