//! The `connect` backend: 1Password Connect's REST API (the published OpenAPI spec, API 1.7),
//! spoken directly over HTTP/1.1 keep-alive — no `op` process at all.
//!
//! A reference's vault and item are turned into ids once (a 26-character id is used as it is;
//! a name goes through `filter=name eq "…"` / `filter=title eq "…"`, compared without regard to
//! case as the CLI does) and the ids are cached for the life of the process. Each pass then
//! costs one full-item GET per item, every field of that item taken from the one answer. A
//! title that matches several items is an error naming the reference, never a guess.
//!
//! Writes are one RFC 6902 PATCH per item carrying every field: `replace` of
//! `/fields/{id}/value`, or `add` of a new field to `/fields` (and of its section to
//! `/sections`). The value travels only in the request body: never in a URL, a header or a log.
//! Connect's PATCH knows only add/remove/replace (no `test`) and no `If-Match`, so the item's
//! version cannot guard the write; patching single field values means an edit of any other
//! field in between is kept, and only the same field edited concurrently is last-writer-wins.
//!
//! The bearer token is read from `OP_CONNECT_TOKEN`, lives in a header value marked sensitive,
//! and is never formatted into a message. Redirects are not followed, so it can never be sent
//! to another host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value as Json, json};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::{
    Backend, BackendError, BoxFuture, ErrorKind, FieldWrite, ItemWriteResult, Pauses, RetryPolicy, Value, WriteOptions,
    check_text_field, check_writable, value_text,
};
use crate::locked::extend_zeroizing;
use crate::reference::SecretRef;
use crate::scrub::scrub;
use crate::time::parse_rfc3339;

/// Largest response body read (a big item with many fields is well under this).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Longest server message kept for errors and STATUS.
const MAX_MESSAGE: usize = 300;
/// STATUS must answer promptly even when Connect does not.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest `/health` answer read.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// How to reach a Connect server.
pub struct ConnectOptions {
    /// `http://…` or `https://…`, the server's base URL (without `/v1`).
    pub host: String,
    pub token: Zeroizing<String>,
    /// Deadline of one request, from sending it to the last byte of the answer.
    pub timeout: Duration,
    /// Most requests in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

/// Why the backend could not be set up (all reported before any request is made).
#[derive(Debug, thiserror::Error)]
pub enum ConnectSetupError {
    #[error("OP_CONNECT_HOST must be an http:// or https:// URL (got '{0}')")]
    BadHost(String),
    #[error("OP_CONNECT_TOKEN is not set, empty, or not a valid HTTP header value")]
    BadToken,
    #[error("cannot load CA certificates from {path}: {reason}")]
    Certificates { path: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

pub struct Connect {
    /// Base URL without a trailing slash; `shown` is the same without any user info.
    base: String,
    shown: String,
    http: reqwest::Client,
    auth: HeaderValue,
    timeout: Duration,
    retry: RetryPolicy,
    pauses: Pauses,
    permits: Semaphore,
    /// Vault name → id. Held across a lookup so two items of one vault look it up once.
    vaults: tokio::sync::Mutex<HashMap<String, String>>,
    /// (vault id, item title) → item id.
    items: Mutex<HashMap<(String, String), String>>,
    /// The last `/health` answer and when it came (the lock is held across the request, so
    /// concurrent STATUS requests share one).
    health: tokio::sync::Mutex<Option<(std::time::Instant, Json)>>,
}

/// One answer: the status, the body (zeroized on drop: item JSON carries values) and the
/// delay a 429 asked for.
struct Reply {
    status: StatusCode,
    body: Value,
    retry_after: Option<Duration>,
}

impl Connect {
    pub fn new(options: ConnectOptions) -> Result<Connect, ConnectSetupError> {
        let host = options.host.trim().trim_end_matches('/').to_string();
        // A password in user info is not repeated in the error.
        let bad =
            || ConnectSetupError::BadHost(if host.contains('@') { "<with user info>".into() } else { host.clone() });
        let mut url = reqwest::Url::parse(&host).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad());
        }
        let https = url.scheme() == "https";
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let shown = url.as_str().trim_end_matches('/').to_string();

        if options.token.trim().is_empty() {
            return Err(ConnectSetupError::BadToken);
        }
        let bearer = Zeroizing::new(format!("Bearer {}", options.token.trim()));
        let mut auth = HeaderValue::from_str(&bearer).map_err(|_| ConnectSetupError::BadToken)?;
        auth.set_sensitive(true);

        let mut builder = reqwest::Client::builder()
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("op-bridge/", env!("CARGO_PKG_VERSION")));
        if https {
            let roots = load_roots()?;
            if roots.is_empty() {
                tracing::warn!("no CA certificates found (system bundle or SSL_CERT_FILE): https to Connect will fail");
            }
            builder =
                builder.use_preconfigured_tls(super::tls::client_config(roots).map_err(ConnectSetupError::Client)?);
        }
        let http = builder.build().map_err(|err| ConnectSetupError::Client(error_chain(&err)))?;
        Ok(Connect {
            // Without user info: reqwest would turn it into a Basic header beside the bearer.
            base: shown.clone(),
            shown,
            http,
            auth,
            timeout: options.timeout,
            retry: options.retry,
            pauses: Pauses::default(),
            permits: Semaphore::new(options.concurrency.max(1)),
            vaults: tokio::sync::Mutex::new(HashMap::new()),
            items: Mutex::new(HashMap::new()),
            health: tokio::sync::Mutex::new(None),
        })
    }

    /// One request, bounded by the semaphore and the timeout; the body is read whole.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: Option<(&str, &str)>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Reply, BackendError> {
        let _permit =
            self.permits.acquire().await.map_err(|_| BackendError::new(ErrorKind::Transient, "shutting down"))?;
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).header(AUTHORIZATION, self.auth.clone());
        if let Some(query) = query {
            request = request.query(&[query]);
        }
        if let Some(body) = body {
            // The body carries the new values: handed over still zeroizing, so the buffer is
            // wiped when the client lets go of it (its own TLS and write buffers are not).
            let body = bytes::Bytes::from_owner(body);
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let exchange = async {
            let mut response = request.send().await?;
            let status = response.status();
            let retry_after =
                response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after_header);
            let mut body = Zeroizing::new(Vec::new());
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_BODY {
                    return Ok(None);
                }
                extend_zeroizing(&mut body, &chunk);
            }
            Ok::<_, reqwest::Error>(Some(Reply { status, body, retry_after }))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(Some(reply))) => Ok(reply),
            Ok(Ok(None)) => Err(BackendError::new(
                ErrorKind::Invalid,
                format!("Connect answered more than {} MiB", MAX_BODY / (1024 * 1024)),
            )),
            Ok(Err(err)) if err.is_timeout() => {
                Err(BackendError::new(ErrorKind::Timeout, format!("Connect did not answer within {:?}", self.timeout)))
            }
            Ok(Err(err)) if super::tls::is_certificate_error(&err) => Err(BackendError::new(
                // Permanent: retrying cannot make the certificate trusted.
                ErrorKind::Auth,
                format!(
                    "Connect at {}: the server's certificate is not trusted ({}); put the certificate of the CA \
                     that signed it, or the server's own self-signed certificate, in a PEM file and name it in \
                     SSL_CERT_FILE",
                    self.shown,
                    certificate_reason(&err)
                ),
            )),
            Ok(Err(err)) => {
                Err(BackendError::new(ErrorKind::Transient, format!("Connect request failed: {}", error_chain(&err))))
            }
            Err(_) => {
                Err(BackendError::new(ErrorKind::Timeout, format!("Connect did not answer within {:?}", self.timeout)))
            }
        }
    }

    /// A GET whose answer must be 2xx, retrying transient failures with backoff when
    /// `retrying` (a write makes one attempt: the write-back queue owns its retries).
    async fn get(
        &self,
        path: &str,
        query: Option<(&str, &str)>,
        what: &str,
        retrying: bool,
    ) -> Result<Value, BackendError> {
        let once = || async { expect_ok(self.send(Method::GET, path, query, None).await?, what, &[]) };
        if retrying { self.retry.run(&self.pauses, what, once).await } else { once().await }
    }

    /// The id of vault `name` (as written when it is an id) and whether it came from the cache.
    async fn vault_id(&self, name: &str, retrying: bool) -> Result<(String, bool), BackendError> {
        if is_id(name) {
            return Ok((name.to_string(), false));
        }
        let what = format!("vault '{name}'");
        let once = || async {
            // Held across one lookup, so items of one vault resolved together look it up once;
            // never across a retry pause (a day-long 429 would hold up every other write).
            let mut cache = self.vaults.lock().await;
            if let Some(id) = cache.get(&name.to_lowercase()) {
                return Ok((id.clone(), true));
            }
            let id = self.lookup("/v1/vaults", "name", name, &what).await?;
            cache.insert(name.to_lowercase(), id.clone());
            Ok((id, false))
        };
        if retrying { self.retry.run(&self.pauses, &what, once).await } else { once().await }
    }

    /// The ids of the vault and item a reference names, and whether either came from the
    /// cache. Names are cached without regard to case, as they are looked up.
    async fn ids(&self, vault: &str, title: &str, retrying: bool) -> Result<(String, String, bool), BackendError> {
        let vault_id = self.vault_id(vault, retrying).await?;
        self.item_ids(vault_id, vault, title, retrying).await
    }

    /// [`ids`](Self::ids) once the vault's id is known.
    async fn item_ids(
        &self,
        (vault_id, vault_cached): (String, bool),
        vault: &str,
        title: &str,
        retrying: bool,
    ) -> Result<(String, String, bool), BackendError> {
        if is_id(title) {
            return Ok((vault_id, title.to_string(), vault_cached));
        }
        let key = (vault_id.clone(), title.to_lowercase());
        if let Some(id) = self.items.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok((vault_id, id.clone(), true));
        }
        let what = format!("op://{vault}/{title}");
        let path = format!("/v1/vaults/{vault_id}/items");
        let once = || self.lookup(&path, "title", title, &what);
        let id = if retrying { self.retry.run(&self.pauses, &what, once).await? } else { once().await? };
        self.items.lock().unwrap_or_else(|e| e.into_inner()).insert(key, id.clone());
        Ok((vault_id, id, vault_cached))
    }

    /// When several titles of one vault are not cached yet, one listing of the vault's items
    /// names them all instead of one filtered lookup each. Titles it leaves unnamed (absent,
    /// or shared by several items) are left to the lookup, which reports them.
    async fn prime_items(&self, vault_id: &str, vault: &str, titles: &[&str]) {
        let uncached: Vec<String> = {
            let cache = self.items.lock().unwrap_or_else(|e| e.into_inner());
            let mut wanted: Vec<String> = titles
                .iter()
                .filter(|t| !is_id(t))
                .map(|t| t.to_lowercase())
                .filter(|t| !cache.contains_key(&(vault_id.to_string(), t.clone())))
                .collect();
            wanted.sort();
            wanted.dedup();
            wanted
        };
        if uncached.len() < 2 {
            return;
        }
        let what = format!("items of vault '{vault}'");
        let Ok(body) = self.get(&format!("/v1/vaults/{vault_id}/items"), None, &what, true).await else { return };
        let mut cache = self.items.lock().unwrap_or_else(|e| e.into_inner());
        for title in uncached {
            if let Ok([id]) = matching_ids(&body, "title", &title, &what).as_deref() {
                cache.insert((vault_id.to_string(), title), id.clone());
            }
        }
    }

    /// Drops the cached ids of a reference's vault and item (they turned out to be gone).
    async fn forget(&self, vault: &str, title: &str) {
        // A vault named by its id has no cache entry: the id is the vault's.
        let cached = self.vaults.lock().await.remove(&vault.to_lowercase());
        let vault_id = cached.or_else(|| is_id(vault).then(|| vault.to_string()));
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.retain(|(v, t), _| !(vault_id.as_deref().is_none_or(|id| id == v) && *t == title.to_lowercase()));
    }

    /// Finds the one entry of a collection whose `attribute` equals `wanted` (case-insensitive).
    /// The server's SCIM filter is asked first; when it finds nothing (a server whose filter
    /// compares case-sensitively), the whole collection is listed and compared here. One
    /// attempt: callers retry around it.
    async fn lookup(&self, path: &str, attribute: &str, wanted: &str, what: &str) -> Result<String, BackendError> {
        let filter = format!("{attribute} eq \"{}\"", wanted.replace('\\', "\\\\").replace('"', "\\\""));
        let mut ids =
            matching_ids(&self.get(path, Some(("filter", &filter)), what, false).await?, attribute, wanted, what)?;
        if ids.is_empty() {
            ids = matching_ids(&self.get(path, None, what, false).await?, attribute, wanted, what)?;
        }
        match ids.as_slice() {
            [id] => Ok(id.clone()),
            [] => Err(BackendError::new(ErrorKind::NotFound, format!("{what}: not found in Connect"))),
            many => Err(BackendError::new(
                ErrorKind::Invalid,
                format!("{what}: {} entries are named '{wanted}'; name it by its id to choose one", many.len()),
            )),
        }
    }

    /// One full-item GET.
    async fn get_item(&self, vault_id: &str, item_id: &str, what: &str, retrying: bool) -> Result<Item, BackendError> {
        let path = format!("/v1/vaults/{vault_id}/items/{item_id}");
        Item::parse(&self.get(&path, None, what, retrying).await?, what)
    }

    /// The full item a reference points into: one GET after the (cached) lookups. Ids from
    /// the cache that are gone (the item was deleted and made again) are looked up once more.
    async fn fetch_item(&self, vault: &str, title: &str, retrying: bool) -> Result<Item, BackendError> {
        let what = format!("op://{vault}/{title}");
        let (vault_id, item_id, cached) = self.ids(vault, title, retrying).await?;
        match self.get_item(&vault_id, &item_id, &what, retrying).await {
            Err(err) if err.kind == ErrorKind::NotFound && cached => {
                self.forget(vault, title).await;
                let (vault_id, item_id, _) = self.ids(vault, title, retrying).await?;
                self.get_item(&vault_id, &item_id, &what, retrying).await
            }
            other => other,
        }
    }

    async fn write_fields(&self, writes: &[FieldWrite], options: WriteOptions) -> ItemWriteResult {
        let Some(first) = writes.first() else { return Ok(Vec::new()) };
        let (vault, title) = first.reference.item_key();
        let what = format!("op://{vault}/{title}");
        let secrets: Vec<&[u8]> = writes.iter().map(|w| w.value.as_slice()).collect();
        // The vault first: a missing vault is never a reason to create an item.
        let (vault_id, _) = self.vault_id(vault, false).await?;
        let item = match self.fetch_item(vault, title, false).await {
            Ok(item) => item,
            Err(err) if err.kind == ErrorKind::NotFound && options.create_item => {
                return self.create_item(writes, &vault_id, &what, &secrets).await;
            }
            Err(err) => return Err(err),
        };
        let mut ops = Ops::default();
        let results = plan(&item, writes, &mut ops);
        if results.iter().all(Result::is_err) {
            return Ok(results);
        }
        let path = format!("/v1/vaults/{}/items/{}", item.vault_id, item.id);
        let reply = self.send(Method::PATCH, &path, None, Some(ops.to_bytes()?)).await?;
        expect_ok(reply, &what, &secrets)?;
        Ok(results)
    }

    /// Creates the item with every field of `writes` (`--create-items`): one POST.
    async fn create_item(
        &self,
        writes: &[FieldWrite],
        vault_id: &str,
        what: &str,
        secrets: &[&[u8]],
    ) -> ItemWriteResult {
        let empty = Item { id: String::new(), vault_id: vault_id.to_string(), json: json!({}) };
        let mut ops = Ops::default();
        let results = plan(&empty, writes, &mut ops);
        if results.iter().all(Result::is_err) {
            return Ok(results);
        }
        // The planned `add`s become the new item's sections and fields.
        // Moved out of the ops and into the document (never copied: only `doc` and `ops` hold
        // the values, and both are scrubbed).
        let (mut sections, mut fields) = (Vec::new(), Vec::new());
        for op in &mut ops.0 {
            let is_section = op.get("path").and_then(Json::as_str) == Some("/sections");
            let value = op.get_mut("value").map(Json::take).unwrap_or(Json::Null);
            if is_section { sections.push(value) } else { fields.push(value) }
        }
        let title = writes[0].reference.item_key().1;
        let mut doc = json!({ "title": title, "category": "API_CREDENTIAL", "vault": {"id": vault_id} });
        doc["sections"] = Json::Array(sections);
        doc["fields"] = Json::Array(fields);
        let body = encode(&doc);
        scrub(&mut doc);
        let reply = self.send(Method::POST, &format!("/v1/vaults/{vault_id}/items"), None, Some(body?)).await?;
        expect_ok(reply, what, secrets)?;
        Ok(results)
    }

    /// `/health`, unauthenticated and short: what STATUS shows about the server.
    /// The server's `/health`. STATUS is a socket client's to ask at will: concurrent callers
    /// share one request (an answer that came after a caller arrived is its answer too), so
    /// many clients cannot make op-bridge open many requests to the Connect server.
    async fn health(&self) -> Json {
        let arrived = std::time::Instant::now();
        let mut cached = self.health.lock().await;
        if let Some((at, answer)) = &*cached
            && *at >= arrived
        {
            return answer.clone();
        }
        let answer = self.ask_health().await;
        *cached = Some((std::time::Instant::now(), answer.clone()));
        answer
    }

    async fn ask_health(&self) -> Json {
        let request = self.http.get(format!("{}/health", self.base)).timeout(HEALTH_TIMEOUT);
        let answer = async {
            let mut response = request.send().await?;
            let status = response.status();
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                bytes.extend_from_slice(&chunk[..chunk.len().min(MAX_HEALTH_BODY - bytes.len())]);
                if bytes.len() >= MAX_HEALTH_BODY {
                    break;
                }
            }
            Ok::<_, reqwest::Error>((status, bytes))
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, answer).await {
            Ok(Ok((status, bytes))) if status.is_success() => {
                serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({"error": "health answer is not JSON"}))
            }
            Ok(Ok((status, _))) => json!({"error": format!("HTTP {}", status.as_u16())}),
            Ok(Err(err)) => json!({"error": error_chain(&err)}),
            Err(_) => json!({"error": format!("no answer within {HEALTH_TIMEOUT:?}")}),
        }
    }
}

impl Backend for Connect {
    fn resolve<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>> {
        Box::pin(async move {
            // Names first (deduplicated without regard to case, cached for the process), then
            // one GET per distinct item, however many references name it and however.
            let mut names: Vec<(&str, &str)> = Vec::new();
            let name_of: Vec<usize> = refs
                .iter()
                .map(|r| {
                    let (vault, item) = r.item_key();
                    let same = |(v, i): &(&str, &str)| {
                        v.to_lowercase() == vault.to_lowercase() && i.to_lowercase() == item.to_lowercase()
                    };
                    names.iter().position(same).unwrap_or_else(|| {
                        names.push((vault, item));
                        names.len() - 1
                    })
                })
                .collect();
            // Each vault once (a missing one is one error for all its items), then the titles.
            let mut vaults: Vec<(&str, Vec<&str>)> = Vec::new();
            for &(vault, item) in &names {
                match vaults.iter_mut().find(|(v, _)| v.to_lowercase() == vault.to_lowercase()) {
                    Some((_, titles)) => titles.push(item),
                    None => vaults.push((vault, vec![item])),
                }
            }
            let mut vault_ids = Vec::with_capacity(vaults.len());
            for (vault, titles) in &vaults {
                let id = self.vault_id(vault, true).await;
                if let Ok((id, _)) = &id {
                    self.prime_items(id, vault, titles).await;
                }
                vault_ids.push(id);
            }
            let ids = futures_util::future::join_all(names.iter().map(|&(vault, item)| {
                let v = vaults.iter().position(|(v, _)| v.to_lowercase() == vault.to_lowercase()).unwrap_or(0);
                let vault_id = vault_ids
                    .get(v)
                    .cloned()
                    .unwrap_or_else(|| Err(BackendError::new(ErrorKind::Transient, "vault not resolved")));
                async move { self.item_ids(vault_id?, vault, item, true).await }
            }))
            .await;
            let mut groups: Vec<((String, String), usize, Vec<usize>)> = Vec::new();
            let mut slots: Vec<Option<Result<Value, BackendError>>> = refs.iter().map(|_| None).collect();
            for (i, &n) in name_of.iter().enumerate() {
                match &ids[n] {
                    Err(err) => slots[i] = Some(Err(err.clone())),
                    Ok((vault_id, item_id, _)) => {
                        let key = (vault_id.clone(), item_id.clone());
                        match groups.iter_mut().find(|(k, _, _)| *k == key) {
                            Some((_, _, indexes)) => indexes.push(i),
                            None => groups.push((key, n, vec![i])),
                        }
                    }
                }
            }
            let jobs = groups.into_iter().map(|((vault_id, item_id), n, indexes)| {
                let (vault, item) = names[n];
                let cached = ids[n].as_ref().is_ok_and(|(_, _, cached)| *cached);
                async move {
                    let what = format!("op://{vault}/{item}");
                    let found = match self.get_item(&vault_id, &item_id, &what, true).await {
                        Err(err) if err.kind == ErrorKind::NotFound && cached => {
                            self.forget(vault, item).await;
                            self.fetch_item(vault, item, true).await
                        }
                        other => other,
                    };
                    let results: Vec<Result<Value, BackendError>> = match found {
                        Ok(found) => indexes.iter().map(|&i| found.field_value(&refs[i])).collect(),
                        Err(err) => indexes.iter().map(|_| Err(err.clone())).collect(),
                    };
                    indexes.into_iter().zip(results).collect::<Vec<_>>()
                }
            });
            for (i, result) in futures_util::future::join_all(jobs).await.into_iter().flatten() {
                slots[i] = Some(result);
            }
            slots
                .into_iter()
                .map(|s| s.unwrap_or_else(|| Err(BackendError::new(ErrorKind::Transient, "not resolved"))))
                .collect()
        })
    }

    fn write_item<'a>(&'a self, writes: &'a [FieldWrite], options: WriteOptions) -> BoxFuture<'a, ItemWriteResult> {
        Box::pin(self.write_fields(writes, options))
    }

    fn updated_at<'a>(&'a self, reference: &'a SecretRef) -> BoxFuture<'a, Result<Option<SystemTime>, BackendError>> {
        Box::pin(async move {
            let (vault, item) = reference.item_key();
            let item = self.fetch_item(vault, item, true).await?;
            Ok(item.json.get("updatedAt").and_then(Json::as_str).and_then(parse_rfc3339))
        })
    }

    fn describe(&self) -> String {
        format!("connect {}", self.shown)
    }

    fn pauses(&self) -> Option<&Pauses> {
        Some(&self.pauses)
    }

    fn status(&self) -> BoxFuture<'_, Json> {
        Box::pin(async move { json!({ "kind": "connect", "host": self.shown, "health": self.health().await }) })
    }
}

/// A full item as Connect returns it. Its string values are zeroized on drop.
struct Item {
    id: String,
    vault_id: String,
    json: Json,
}

impl Item {
    fn parse(body: &[u8], what: &str) -> Result<Item, BackendError> {
        let json: Json = serde_json::from_slice(body).map_err(|_| {
            BackendError::new(ErrorKind::Transient, format!("{what}: Connect answered an item that is not JSON"))
        })?;
        let mut item = Item { id: String::new(), vault_id: String::new(), json };
        let text = |j: &Json, key: &str| j.get(key).and_then(Json::as_str).map(str::to_string);
        item.id = text(&item.json, "id").unwrap_or_default();
        item.vault_id = item.json.get("vault").and_then(|v| text(v, "id")).unwrap_or_default();
        let shape_ok = !item.id.is_empty()
            && !item.vault_id.is_empty()
            && item.json.get("fields").is_none_or(|f| f.is_array() || f.is_null())
            && item.json.get("sections").is_none_or(|s| s.is_array() || s.is_null());
        if !shape_ok {
            return Err(BackendError::new(
                ErrorKind::Transient,
                format!("{what}: Connect answered an item of an unexpected shape"),
            ));
        }
        Ok(item)
    }

    fn fields(&self) -> &[Json] {
        self.json.get("fields").and_then(Json::as_array).map(Vec::as_slice).unwrap_or(&[])
    }

    fn sections(&self) -> &[Json] {
        self.json.get("sections").and_then(Json::as_array).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The id of the section named `name` (by label or id; exact first, then any case).
    fn section_id(&self, name: &str) -> Option<String> {
        find_named(self.sections(), name).and_then(|s| s.get("id")).and_then(Json::as_str).map(str::to_string)
    }

    /// The field a reference names: by label or id (exact first, then without regard to
    /// case), within its section when it names one.
    fn find_field(&self, r: &SecretRef) -> Option<&Json> {
        let section = match &r.section {
            Some(name) => Some(self.section_id(name)?),
            None => None,
        };
        let in_section = |f: &Json| match &section {
            None => true,
            Some(id) => f.get("section").and_then(|s| s.get("id")).and_then(Json::as_str) == Some(id.as_str()),
        };
        let fields = self.fields();
        super::find_field(fields, &r.field, in_section).map(|i| &fields[i])
    }

    fn field_value(&self, r: &SecretRef) -> Result<Value, BackendError> {
        let field = self.find_field(r).ok_or_else(|| {
            let place = r.section.as_ref().map(|s| format!(" in section '{s}'")).unwrap_or_default();
            BackendError::new(ErrorKind::NotFound, format!("{r}: the item has no field '{}'{place}", r.field))
        })?;
        let key = match r.query.as_deref() {
            None => "value",
            Some(q) if matches!(q.to_ascii_lowercase().as_str(), "attribute=otp" | "attribute=totp") => "totp",
            Some(q) => {
                return Err(BackendError::new(
                    ErrorKind::Invalid,
                    format!("{r}: '?{q}' is not supported by the Connect backend"),
                ));
            }
        };
        let value = field.get(key).and_then(Json::as_str);
        if key == "totp" && value.is_none() {
            return Err(BackendError::new(ErrorKind::Invalid, format!("{r}: the field has no one-time password")));
        }
        Ok(Zeroizing::new(value.unwrap_or("").as_bytes().to_vec()))
    }

    /// Adds to `ops` what stores `value` in the field `r` names: a `replace` of its value, or
    /// an `add` of a new concealed field (and of its section when that is new too).
    fn patch_ops(&self, r: &SecretRef, value: &str, ops: &mut Ops) -> Result<(), BackendError> {
        if let Some(field) = self.find_field(r) {
            let kind = field.get("type").and_then(Json::as_str).unwrap_or("");
            check_text_field(r, kind)?;
            let Some(id) = field.get("id").and_then(Json::as_str) else {
                return Err(BackendError::new(ErrorKind::Invalid, format!("{r}: the field has no id")));
            };
            ops.0.push(
                json!({"op": "replace", "path": format!("/fields/{}/value", pointer_escape(id)), "value": value}),
            );
            return Ok(());
        }
        let mut field = json!({"type": "CONCEALED", "label": r.field, "value": value});
        if let Some(section) = &r.section {
            let id = match self.section_id(section).or_else(|| ops.new_section(section)) {
                Some(id) => id,
                None => {
                    let id = section_id_for(section, ops.0.len());
                    ops.0.push(json!({"op": "add", "path": "/sections", "value": {"id": id, "label": section}}));
                    id
                }
            };
            field["section"] = json!({ "id": id });
        }
        // Moved in, not copied: `json!` would serialize a copy of the value and leave this one.
        let mut op = json!({"op": "add", "path": "/fields"});
        op["value"] = field;
        ops.0.push(op);
        Ok(())
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        scrub(&mut self.json);
    }
}

/// The operations of one PATCH; zeroized on drop (they carry the new values).
#[derive(Default)]
struct Ops(Vec<Json>);

impl Ops {
    /// The id of a section this PATCH already adds.
    fn new_section(&self, label: &str) -> Option<String> {
        self.0
            .iter()
            .filter(|op| op.get("path").and_then(Json::as_str) == Some("/sections"))
            .filter_map(|op| op.get("value"))
            .find(|s| s.get("label").and_then(Json::as_str) == Some(label))
            .and_then(|s| s.get("id"))
            .and_then(Json::as_str)
            .map(str::to_string)
    }

    fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        encode(&self.0)
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(scrub);
    }
}

/// A request body: JSON written once into a buffer that is handed to the request as it is
/// (no second copy; a failed encoding leaves nothing behind).
fn encode(value: &impl serde::Serialize) -> Result<Zeroizing<Vec<u8>>, BackendError> {
    let mut out = crate::locked::ZeroizingWriter::with_capacity(1024);
    serde_json::to_writer(&mut out, value)
        .map_err(|err| BackendError::new(ErrorKind::Invalid, format!("cannot encode the request: {err}")))?;
    Ok(out.0)
}

/// The patch operations for every write that `item` accepts; one result per write, in order.
fn plan(item: &Item, writes: &[FieldWrite], ops: &mut Ops) -> Vec<Result<(), BackendError>> {
    writes
        .iter()
        .map(|write| {
            check_writable(&write.reference)
                .and_then(|()| value_text(&write.value))
                .and_then(|text| item.patch_ops(&write.reference, text, ops))
        })
        .collect()
}

/// A 2xx answer's body, or the answer classified as an error. `secrets` (the values being
/// written) are blanked out of the server's message, in case it ever quotes one.
fn expect_ok(reply: Reply, what: &str, secrets: &[&[u8]]) -> Result<Value, BackendError> {
    if reply.status.is_success() {
        return Ok(reply.body);
    }
    let message = serde_json::from_slice::<Json>(&reply.body)
        .ok()
        .and_then(|j| j.get("message").and_then(Json::as_str).map(str::to_string))
        .unwrap_or_default();
    // Values are blanked in the raw message, before it is cleaned and cut: a value that spans
    // the cut or holds a control character would otherwise survive in part.
    let mut message = Zeroizing::new(message);
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        if let Ok(text) = std::str::from_utf8(secret) {
            *message = message.replace(text, "<value>");
        }
    }
    let message: String = message.chars().filter(|c| !c.is_control()).take(MAX_MESSAGE).collect();
    let kind = classify_status(reply.status, reply.retry_after.or_else(|| super::parse_retry_after(&message)));
    let code = reply.status.as_u16();
    let text = if message.is_empty() {
        format!("{what}: Connect answered {code}")
    } else {
        format!("{what}: Connect answered {code}: {message}")
    };
    Err(BackendError::new(kind, text))
}

/// The error class of an HTTP status, as the CLI's errors are classified.
pub fn classify_status(status: StatusCode, retry_after: Option<Duration>) -> ErrorKind {
    match status.as_u16() {
        401 | 403 => ErrorKind::Auth,
        404 | 410 => ErrorKind::NotFound,
        409 | 412 => ErrorKind::Conflict,
        429 => ErrorKind::RateLimited(retry_after),
        408 | 504 => ErrorKind::Timeout,
        400 | 405 | 413 | 415 | 422 => ErrorKind::Invalid,
        _ => ErrorKind::Transient,
    }
}

/// `Retry-After` as seconds (the HTTP-date form is left to the backoff).
pub fn parse_retry_after_header(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s).min(super::MAX_RETRY_AFTER))
}

/// The ids of the entries of a collection answer whose `attribute` equals `wanted`.
fn matching_ids(body: &[u8], attribute: &str, wanted: &str, what: &str) -> Result<Vec<String>, BackendError> {
    let list: Json = serde_json::from_slice(body).map_err(|_| {
        BackendError::new(ErrorKind::Transient, format!("{what}: Connect answered a list that is not JSON"))
    })?;
    let Some(list) = list.as_array() else {
        return Err(BackendError::new(
            ErrorKind::Transient,
            format!("{what}: Connect answered something else than a list"),
        ));
    };
    let wanted = wanted.to_lowercase();
    Ok(list
        .iter()
        .filter(|e| e.get(attribute).and_then(Json::as_str).is_some_and(|n| n.to_lowercase() == wanted))
        .filter_map(|e| e.get("id").and_then(Json::as_str).map(str::to_string))
        .collect())
}

/// The entry of `list` whose label or id is `name`: exact first, then without regard to case.
fn find_named<'a>(list: &'a [Json], name: &str) -> Option<&'a Json> {
    let names = |e: &'a Json| [e.get("label"), e.get("id")].into_iter().flatten().filter_map(Json::as_str);
    list.iter()
        .find(|e| names(e).any(|n| n == name))
        .or_else(|| list.iter().find(|e| names(e).any(|n| n.to_lowercase() == name.to_lowercase())))
}

/// Connect's ids: 26 characters of `[a-z0-9]`.
pub fn is_id(text: &str) -> bool {
    text.len() == 26 && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// RFC 6901 escaping of one pointer segment.
fn pointer_escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// An id for a new section: its label's letters and digits, made unique by `salt`.
fn section_id_for(label: &str, salt: usize) -> String {
    let base: String = label.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    let base = if base.is_empty() { "section".to_string() } else { base };
    format!("{base}{salt}")
}

/// An error and its causes on one line ("error sending request: connection refused").
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.chars().take(MAX_MESSAGE).collect()
}

/// The system's CA bundle (the first found) and `SSL_CERT_FILE`: both are trusted, since a
/// private CA for Connect must not cost the public roots a proxy may need.
pub(crate) fn load_roots() -> Result<Vec<CertificateDer<'static>>, ConnectSetupError> {
    let mut roots = Vec::new();
    if let Some(path) = super::tls::SYSTEM_BUNDLES.iter().find(|p| std::path::Path::new(p).is_file()) {
        match std::fs::read(path).map(|pem| pem_certificates(&pem)) {
            Ok(Ok(certs)) => roots.extend(certs),
            Ok(Err(err)) => tracing::warn!("ignoring the system CA bundle {path}: {err}"),
            Err(err) => tracing::warn!("ignoring the system CA bundle {path}: {err}"),
        }
    }
    if let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) {
        let shown = path.to_string_lossy().into_owned();
        let pem = std::fs::read(&path)
            .map_err(|err| ConnectSetupError::Certificates { path: shown.clone(), reason: err.to_string() })?;
        let certs =
            pem_certificates(&pem).map_err(|reason| ConnectSetupError::Certificates { path: shown.clone(), reason })?;
        if certs.is_empty() {
            return Err(ConnectSetupError::Certificates { path: shown, reason: "no PEM certificate in it".into() });
        }
        roots.extend(certs);
    }
    Ok(roots)
}

/// Every certificate of a PEM bundle, as DER.
fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|err| err.to_string())
}

/// The TLS library's reason for refusing a certificate ("UnknownIssuer", "Expired", …),
/// without the transport's layers of context.
fn certificate_reason(err: &(dyn std::error::Error + 'static)) -> String {
    let chain = error_chain(err);
    match chain.find("invalid peer certificate: ") {
        Some(at) => chain[at + "invalid peer certificate: ".len()..].to_string(),
        None => chain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(json: Json) -> Item {
        Item::parse(&serde_json::to_vec(&json).unwrap(), "test").unwrap()
    }

    #[test]
    fn statuses_are_classified_like_the_cli() {
        let s = |code| StatusCode::from_u16(code).unwrap();
        assert_eq!(classify_status(s(401), None), ErrorKind::Auth);
        assert_eq!(classify_status(s(403), None), ErrorKind::Auth);
        assert_eq!(classify_status(s(404), None), ErrorKind::NotFound);
        assert_eq!(classify_status(s(400), None), ErrorKind::Invalid);
        let wait = Some(Duration::from_secs(2));
        assert_eq!(classify_status(s(429), wait), ErrorKind::RateLimited(wait));
        for code in [500, 502, 503] {
            assert_eq!(classify_status(s(code), None), ErrorKind::Transient);
        }
        assert_eq!(parse_retry_after_header(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after_header("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn ids_are_recognised() {
        assert!(is_id("abcdefghijklmnopqrstuvwxy2"));
        assert!(!is_id("Abcdefghijklmnopqrstuvwxy2"));
        assert!(!is_id("Private"));
    }

    #[test]
    fn fields_are_found_by_label_id_and_section_label() {
        let item = item(json!({
            "id": "i", "vault": {"id": "v"},
            "sections": [{"id": "s1", "label": "OAuth"}],
            "fields": [
                {"id": "password", "label": "password", "type": "CONCEALED", "value": "top"},
                {"id": "f2", "label": "token", "type": "CONCEALED", "section": {"id": "s1"}, "value": "sec"},
                {"id": "f3", "label": "token", "type": "STRING", "value": "plain"},
            ]
        }));
        let get = |r: &str| item.field_value(&SecretRef::parse(r).unwrap()).map(|v| v.to_vec());
        assert_eq!(get("op://v/i/password").unwrap(), b"top");
        assert_eq!(get("op://v/i/OAuth/token").unwrap(), b"sec");
        assert_eq!(get("op://v/i/oauth/TOKEN").unwrap(), b"sec");
        assert_eq!(get("op://v/i/s1/f2").unwrap(), b"sec");
        assert_eq!(get("op://v/i/nope").unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(get("op://v/i/Other/token").unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn patches_replace_existing_and_add_new_fields() {
        let item = item(json!({
            "id": "i", "vault": {"id": "v"}, "sections": [],
            "fields": [{"id": "a/b", "label": "a", "type": "STRING", "value": "1"},
                       {"id": "otp", "label": "otp", "type": "OTP", "value": "seed"}]
        }));
        let mut ops = Ops::default();
        item.patch_ops(&SecretRef::parse("op://v/i/a").unwrap(), "2", &mut ops).unwrap();
        item.patch_ops(&SecretRef::parse("op://v/i/OAuth/refresh").unwrap(), "r", &mut ops).unwrap();
        item.patch_ops(&SecretRef::parse("op://v/i/OAuth/access").unwrap(), "x", &mut ops).unwrap();
        let refused = item.patch_ops(&SecretRef::parse("op://v/i/otp").unwrap(), "n", &mut ops).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Invalid);
        assert_eq!(ops.0[0], json!({"op": "replace", "path": "/fields/a~1b/value", "value": "2"}));
        assert_eq!(ops.0[1]["path"], "/sections");
        let section = ops.0[1]["value"]["id"].clone();
        assert_eq!(ops.0[2]["value"]["section"]["id"], section);
        assert_eq!(ops.0[3]["value"]["section"]["id"], section, "one new section, shared");
        assert_eq!(ops.0.len(), 4);
    }

    #[test]
    fn malformed_items_are_errors() {
        for bad in ["[]", "{}", "{\"id\":\"i\"}", "{\"id\":\"i\",\"vault\":{\"id\":\"v\"},\"fields\":3}", "nope"] {
            assert!(Item::parse(bad.as_bytes(), "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_hosts_and_tokens_are_refused_without_echoing_the_token() {
        let options = |host: &str, token: &str| ConnectOptions {
            host: host.into(),
            token: Zeroizing::new(token.into()),
            timeout: Duration::from_secs(1),
            concurrency: 1,
            retry: RetryPolicy::default(),
        };
        assert!(matches!(Connect::new(options("connect:8080", "t")), Err(ConnectSetupError::BadHost(_))));
        // A token that cannot be a header is refused, and neither the message nor the Debug
        // form of the error carries it.
        let err = Connect::new(options("http://c:8080", "sec\nret")).err().unwrap();
        assert!(matches!(err, ConnectSetupError::BadToken), "{err}");
        assert!(!format!("{err} {err:?}").contains("sec"), "{err:?}");
        let ok = Connect::new(options("http://user:pw@c:8080/", "t")).unwrap();
        assert_eq!(ok.describe(), "connect http://c:8080");
    }
}
