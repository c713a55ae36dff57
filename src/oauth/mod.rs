//! Broker-owned OAuth (DESIGN §14): for each `{prefix}NAME_OAUTH=op://vault/item` (or
//! `--oauth NAME=op://vault/item`) this module owns the client the item describes, gets and
//! refreshes NAME's access token itself, and keeps the item's tokens current in 1Password.
//! NAME is an ordinary secret in the store (source `oauth`): GET, the exec provider and
//! `--export` give it out, or its placeholder when it is bound, and the proxy swaps it in.
//!
//! One [`Refresher`] per NAME is the state machine: `ok` → (ahead of expiry, or a 401 the
//! proxy saw) `refreshing` → `ok`, or `backing_off` (5xx, 429, timeout: capped backoff while
//! the last access token is served) or `failing` (the grant or client was refused: no token
//! request again until a restart). One refresh runs at a time per NAME; a caller that finds
//! one running waits for it and takes its result instead of starting another.
//!
//! Refresh tokens are single-use and a replay revokes the family, so the order is fixed: a
//! token response is sealed in the journal (one record for all its fields, fsync'd) before it
//! is used; then memory takes it, and `refresh_token`, `access_token` and `expires_at` go to
//! the write-back queue together (one read-modify-write of the item); the record is marked
//! settled once 1Password stored them. The old refresh token is dropped the moment the new
//! one arrives, so it is never sent again. A start takes a pending record over the item's
//! older copy and queues its write-back again.

pub mod client;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::backend::{Backend, ErrorKind, RetryPolicy};
use crate::cache::{Journal, OAuthRecord};
use crate::reference::SecretRef;
use crate::store::SecretStore;
use crate::time::{format_rfc3339, parse_rfc3339};
use crate::writeback::{Origin, SetOutcome, WriteBack};
use client::{ClientSettings, Grant, TokenAuth, TokenClient, TokenError};

/// Lifetime assumed when a token response states none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// A new token is fetched when less than min(lifetime / 4, this) is left.
const MAX_MARGIN: Duration = Duration::from_secs(300);
/// Backoff of token requests after 5xx, 429 without a delay, or timeouts.
const BACKOFF: RetryPolicy =
    RetryPolicy { attempts: u32::MAX, base: Duration::from_secs(1), max: Duration::from_secs(60) };
/// A token fetched because the API refused the previous one, and refused in turn within
/// this long (and before its refresh is due), is not replaced again: that refusal is not
/// about the token's age, and each request must not become a token request.
const REFUSED_AGAIN: Duration = Duration::from_secs(30);
/// Token requests made at start before the broker serves anyway (the timer keeps trying),
/// and the time after which no new one is started.
const START_ATTEMPTS: u32 = 3;
const START_BUDGET: Duration = Duration::from_secs(12);

/// The item's fields, by label.
const TOKEN_URL: &str = "token_url";
const CLIENT_ID: &str = "client_id";
const CLIENT_SECRET: &str = "client_secret";
const TOKEN_AUTH: &str = "token_auth";
const REFRESH_TOKEN: &str = "refresh_token";
const SCOPE: &str = "scope";
const AUDIENCE: &str = "audience";
const ACCESS_TOKEN: &str = "access_token";
const EXPIRES_AT: &str = "expires_at";
const FIELDS: &[&str] =
    &[TOKEN_URL, CLIENT_ID, CLIENT_SECRET, TOKEN_AUTH, REFRESH_TOKEN, SCOPE, AUDIENCE, ACCESS_TOKEN, EXPIRES_AT];
/// The client's settings: everything but the tokens.
const SETTINGS: &[&str] = &[TOKEN_URL, CLIENT_ID, CLIENT_SECRET, TOKEN_AUTH, SCOPE, AUDIENCE];

/// One `NAME=op://vault/item` declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSpec {
    pub name: String,
    pub vault: String,
    pub item: String,
}

impl OAuthSpec {
    /// `op://vault/item` for `name` (already normalized).
    pub fn parse(name: &str, text: &str) -> Result<OAuthSpec, String> {
        let rest = text.trim().strip_prefix("op://").ok_or_else(|| format!("{name}: expected op://vault/item"))?;
        match rest.split('/').collect::<Vec<_>>()[..] {
            [vault, item] if !vault.is_empty() && !item.is_empty() && !rest.contains('?') => {
                Ok(OAuthSpec { name: name.to_string(), vault: vault.to_string(), item: item.to_string() })
            }
            _ => Err(format!("{name}: expected op://vault/item (an item, not a field), got '{}'", text.trim())),
        }
    }

    pub fn item_text(&self) -> String {
        format!("op://{}/{}", self.vault, self.item)
    }

    fn field(&self, label: &str) -> SecretRef {
        SecretRef {
            vault: self.vault.clone(),
            item: self.item.clone(),
            section: None,
            field: label.to_string(),
            query: None,
        }
    }
}

/// Why the OAuth clients could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration the broker must refuse (no `--cache` for a refresh token, a bad item).
    #[error("{0}")]
    Config(String),
    /// The item could not be read and nothing journaled stands in for it.
    #[error("{0}")]
    Unavailable(String),
}

/// What the clients work with.
pub struct Context {
    pub store: Arc<SecretStore>,
    pub writeback: Arc<WriteBack>,
    pub backend: Arc<dyn Backend>,
    /// The sealed journal (`--cache`); a refresh token grant needs it.
    pub journal: Option<Journal>,
    /// Start without the clients whose item cannot be read (`--allow-missing`).
    pub allow_missing: bool,
}

/// Every OAuth client of the process.
#[derive(Default)]
pub struct OAuth {
    clients: BTreeMap<String, Arc<Refresher>>,
}

impl OAuth {
    /// Reads each item (or its pending journal record), gets a token where none is valid,
    /// and starts each client's timer.
    pub async fn start(specs: &[OAuthSpec], context: Context) -> Result<OAuth, StartError> {
        if specs.is_empty() {
            return Ok(OAuth::default());
        }
        let http = Arc::new(TokenClient::new().map_err(StartError::Config)?);
        let mut clients = BTreeMap::new();
        for spec in specs {
            let refresher = match Refresher::load(spec, &context, http.clone()).await {
                Ok(refresher) => Arc::new(refresher),
                Err(StartError::Unavailable(why)) if context.allow_missing => {
                    tracing::warn!(name = %spec.name, "oauth {}: not started: {why}", spec.name);
                    continue;
                }
                Err(err) => return Err(err),
            };
            clients.insert(spec.name.clone(), refresher);
        }
        // Side by side: one slow endpoint does not hold up the others' first tokens.
        futures_util::future::join_all(clients.values().map(|c| c.first_token())).await;
        for client in clients.values() {
            tokio::spawn(client.clone().run());
        }
        Ok(OAuth { clients })
    }

    /// Whether `name` is a broker-owned access token.
    pub fn owns(&self, name: &str) -> bool {
        self.clients.contains_key(name)
    }

    /// Why `name` cannot be used now (its grant was refused, or its token expired while the
    /// endpoint is unavailable); None when it can.
    pub fn unusable(&self, name: &str) -> Option<String> {
        self.clients.get(name)?.unusable()
    }

    /// The proxy saw the API refuse `name`'s token (the value of generation `seen`): one
    /// refresh, shared with any running one. Returns whether a newer token is there now.
    pub async fn refresh_rejected(&self, name: &str, seen: u64) -> bool {
        match self.clients.get(name) {
            Some(client) => client.refresh_rejected(seen).await,
            None => false,
        }
    }

    /// STATUS's `oauth` object, by NAME; never a token.
    pub fn status(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> =
            self.clients.iter().map(|(name, client)| (name.clone(), client.status())).collect();
        serde_json::Value::Object(map)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantKind {
    RefreshToken,
    ClientCredentials,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ok,
    Refreshing,
    BackingOff,
    Failing,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Ok => "ok",
            Phase::Refreshing => "refreshing",
            Phase::BackingOff => "backing_off",
            Phase::Failing => "failing",
        }
    }
}

/// The mutable part of a client.
struct Tokens {
    phase: Phase,
    /// The newest refresh token (the only one ever sent).
    refresh_token: Option<Zeroizing<String>>,
    expires_at: Option<SystemTime>,
    lifetime: Duration,
    refreshes: u64,
    error: Option<String>,
    /// When the next attempt may be made after a failure.
    retry_at: Option<Instant>,
    failures: u32,
    /// The journal record's sequence number.
    seq: u64,
    /// The generation of the last token a 401 made us fetch, and when (see [`REFUSED_AGAIN`]).
    from_rejection: Option<(u64, Instant)>,
}

/// One OAuth client: its settings, its tokens and the one refresh that may run.
struct Refresher {
    spec: OAuthSpec,
    settings: ClientSettings,
    /// The settings as the item's fields, kept in every journal record.
    setting_fields: BTreeMap<String, Zeroizing<String>>,
    grant: GrantKind,
    store: Arc<SecretStore>,
    writeback: Arc<WriteBack>,
    journal: Option<Journal>,
    http: Arc<TokenClient>,
    /// Held for the whole of a refresh: one at a time.
    refreshing: tokio::sync::Mutex<()>,
    tokens: Mutex<Tokens>,
    /// Wakes the timer when its deadline moved.
    wake: Notify,
}

fn margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(MAX_MARGIN)
}

impl Refresher {
    fn tokens(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client from its pending journal record, else from the item (else from a settled
    /// record when 1Password cannot be read).
    async fn load(spec: &OAuthSpec, context: &Context, http: Arc<TokenClient>) -> Result<Refresher, StartError> {
        let name = &spec.name;
        let item = spec.item_text();
        let record = context.journal.as_ref().and_then(|j| j.oauth(name)).filter(|r| r.item == item);
        let (fields, lifetime, seq, replay) = match record {
            Some(record) if record.pending => {
                tracing::info!(
                    name = %name,
                    "oauth {name}: resuming from the journal: the last token response is not in 1Password yet"
                );
                (record.fields, Duration::from_secs(record.lifetime_s.max(1)), record.seq, true)
            }
            record => match read_item(spec, context.backend.as_ref()).await {
                Ok(fields) => (fields, DEFAULT_LIFETIME, record.as_ref().map_or(0, |r| r.seq), false),
                Err(err) => match record {
                    Some(record) => {
                        tracing::warn!(
                            name = %name,
                            "oauth {name}: {item} cannot be read ({err}); using the journaled copy of it"
                        );
                        (record.fields, Duration::from_secs(record.lifetime_s.max(1)), record.seq, false)
                    }
                    None => {
                        return Err(StartError::Unavailable(format!("{name}: cannot read OAuth item {item}: {err}")));
                    }
                },
            },
        };
        let text = |label: &str| fields.get(label).map(|v| v.as_str()).filter(|v| !v.trim().is_empty());
        let bad = |why: String| StartError::Config(format!("{name}_OAUTH ({item}): {why}"));
        let token_url =
            client::check_token_url(text(TOKEN_URL).ok_or_else(|| bad("the item has no token_url".into()))?)
                .map_err(bad)?;
        let settings = ClientSettings {
            token_url,
            client_id: text(CLIENT_ID).ok_or_else(|| bad("the item has no client_id".into()))?.trim().to_string(),
            client_secret: text(CLIENT_SECRET).map(|s| Zeroizing::new(s.to_string())),
            auth: TokenAuth::parse(text(TOKEN_AUTH)).map_err(bad)?,
            scope: text(SCOPE).map(|s| s.trim().to_string()),
            audience: text(AUDIENCE).map(|s| s.trim().to_string()),
        };
        let refresh_token = text(REFRESH_TOKEN).map(|t| Zeroizing::new(t.trim().to_string()));
        let grant = if refresh_token.is_some() { GrantKind::RefreshToken } else { GrantKind::ClientCredentials };
        if grant == GrantKind::RefreshToken && context.journal.is_none() {
            return Err(StartError::Config(format!(
                "{name}_OAUTH ({item}) holds a refresh_token: its rotations must be journaled before they are \
                 used, so it needs --cache PATH (and a 1Password token, which keys the cache)"
            )));
        }
        let expires_at = text(EXPIRES_AT).and_then(|t| parse_rfc3339(t.trim()));
        if let Some(access) = text(ACCESS_TOKEN) {
            context.store.set_value(name, access.trim().as_bytes());
        }
        let setting_fields = SETTINGS
            .iter()
            .filter_map(|label| Some((label.to_string(), Zeroizing::new(text(label)?.to_string()))))
            .collect();
        let refresher = Refresher {
            spec: spec.clone(),
            settings,
            setting_fields,
            grant,
            store: context.store.clone(),
            writeback: context.writeback.clone(),
            journal: context.journal.clone(),
            http,
            refreshing: tokio::sync::Mutex::new(()),
            tokens: Mutex::new(Tokens {
                phase: Phase::Ok,
                refresh_token,
                expires_at: expires_at.filter(|_| text(ACCESS_TOKEN).is_some()),
                lifetime,
                refreshes: 0,
                error: None,
                retry_at: None,
                failures: 0,
                seq,
                from_rejection: None,
            }),
            wake: Notify::new(),
        };
        if replay {
            // The journaled response is the newest: it goes to 1Password again.
            refresher.write_back(&fields, seq);
        }
        Ok(refresher)
    }

    /// When the next token is due (None: never, the grant was refused).
    fn due(&self) -> Option<Instant> {
        let tokens = self.tokens();
        if tokens.phase == Phase::Failing {
            return None;
        }
        if let Some(at) = tokens.retry_at {
            return Some(at);
        }
        let Some(expires_at) = tokens.expires_at else { return Some(Instant::now()) };
        let left = expires_at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        Some(Instant::now() + left.saturating_sub(margin(tokens.lifetime)))
    }

    /// At start: a token now when none is valid, retried a little before the broker serves. A
    /// token that is still valid is served at once; the timer replaces it when it is due.
    async fn first_token(&self) {
        let deadline = Instant::now() + START_BUDGET;
        for _ in 0..START_ATTEMPTS {
            if Instant::now() >= deadline {
                return;
            }
            let valid = self.tokens().expires_at.is_some_and(|at| at > SystemTime::now());
            if valid || self.due().is_none() {
                return;
            }
            if self.refresh(None).await {
                return;
            }
            let wait = self.tokens().retry_at.map(|at| at.saturating_duration_since(Instant::now()));
            match wait {
                Some(wait) if wait <= Duration::from_secs(3) => tokio::time::sleep(wait).await,
                _ => return,
            }
        }
    }

    /// The timer: refreshes when due, and again after a failure's backoff.
    async fn run(self: Arc<Self>) {
        loop {
            let due = self.due();
            // A token that arrives meanwhile (a 401's refresh) makes this one moot.
            let seen = self.store.generation(&self.spec.name);
            tokio::select! {
                _ = crate::sleep_until(due) => {
                    self.refresh(Some(seen)).await;
                }
                _ = self.wake.notified() => {}
            }
        }
    }

    fn unusable(&self) -> Option<String> {
        let tokens = self.tokens();
        let name = &self.spec.name;
        match tokens.phase {
            Phase::Failing => Some(format!(
                "the OAuth grant of {name} was refused by its token endpoint ({}); it needs a new {} in {} \
                 and a restart",
                tokens.error.as_deref().unwrap_or("refused"),
                if self.grant == GrantKind::RefreshToken { "refresh_token" } else { "client_id/client_secret" },
                self.spec.item_text()
            )),
            Phase::BackingOff if tokens.expires_at.is_none_or(|at| at <= SystemTime::now()) => Some(format!(
                "{name} has no valid access token: its token endpoint is unavailable ({})",
                tokens.error.as_deref().unwrap_or("unavailable")
            )),
            _ => None,
        }
    }

    async fn refresh_rejected(&self, seen: u64) -> bool {
        let name = &self.spec.name;
        // A token past its refresh point is replaced whatever refused it.
        let not_due = self.due().is_some_and(|due| due > Instant::now());
        let refused_again =
            self.tokens().from_rejection.is_some_and(|(g, at)| g == seen && at.elapsed() < REFUSED_AGAIN);
        if refused_again && not_due {
            tracing::debug!(name = %name, "oauth {name}: the API refused a token fetched after a refusal; not refreshing");
            return false;
        }
        tracing::info!(name = %name, "oauth {name}: the API refused the access token; refreshing");
        if self.refresh(Some(seen)).await {
            let current = self.store.generation(name);
            if current != seen {
                self.tokens().from_rejection = Some((current, Instant::now()));
                return true;
            }
        }
        false
    }

    /// One refresh (or the result of the one running). `seen`: the generation of the token
    /// the caller found wanting; a newer one there already is the answer. Returns whether a
    /// new token was obtained.
    async fn refresh(&self, seen: Option<u64>) -> bool {
        let _one = self.refreshing.lock().await;
        let name = &self.spec.name;
        if seen.is_some_and(|seen| self.store.generation(name) != seen) {
            return true;
        }
        let presented = {
            let mut tokens = self.tokens();
            if tokens.phase == Phase::Failing {
                return false;
            }
            tokens.phase = Phase::Refreshing;
            tokens.refresh_token.clone()
        };
        let grant = match (&self.grant, &presented) {
            (GrantKind::RefreshToken, Some(token)) => Grant::RefreshToken(token.as_str()),
            _ => Grant::ClientCredentials,
        };
        // The lifetime counts from when the request was sent, not from when the answer came:
        // the endpoint started the clock in between, and a late answer must not make op-bridge
        // think the token lives longer than it does.
        let sent = SystemTime::now();
        let answer = self.http.request(&self.settings, grant).await;
        drop(presented);
        match answer {
            Ok(response) => {
                self.accept(response, sent);
                true
            }
            Err(TokenError::Refused(why)) => {
                {
                    let mut tokens = self.tokens();
                    tokens.phase = Phase::Failing;
                    tokens.error = Some(why.clone());
                    tokens.retry_at = None;
                }
                tracing::error!(
                    name = %name,
                    item = %self.spec.item_text(),
                    "oauth {name} ({}): the token endpoint refused the grant ({why}); no further token requests \
                     until restart",
                    self.spec.item_text()
                );
                self.store.mark_failed(name, format!("OAuth grant refused: {why}"));
                if let Some(journal) = &self.journal {
                    // A refused chain is dead: the next start reads the item (a new token put there).
                    journal.forget_oauth(name);
                }
                false
            }
            Err(err) => {
                let (kind, stated) = match &err {
                    TokenError::RateLimited { retry_after, .. } => (ErrorKind::RateLimited(*retry_after), *retry_after),
                    _ => (ErrorKind::Transient, None),
                };
                let wait = {
                    let mut tokens = self.tokens();
                    tokens.failures += 1;
                    let wait = BACKOFF.delay(tokens.failures, kind).max(stated.unwrap_or(Duration::ZERO));
                    tokens.phase = Phase::BackingOff;
                    tokens.error = Some(err.to_string());
                    tokens.retry_at = Some(Instant::now() + wait);
                    wait
                };
                tracing::warn!(
                    name = %name,
                    "oauth {name}: token request failed: {err}; the current access token is served meanwhile; \
                     retrying in {:.1}s",
                    wait.as_secs_f64()
                );
                false
            }
        }
    }

    /// A token response: journaled, then used, then queued for 1Password.
    fn accept(&self, response: client::TokenResponse, sent: SystemTime) {
        let name = &self.spec.name;
        let lifetime = Duration::from_secs(response.expires_in.unwrap_or(DEFAULT_LIFETIME.as_secs()).max(1));
        let expires_at = sent + lifetime;
        let refresh_token = match self.grant {
            // Providers that do not rotate keep the one they were given.
            GrantKind::RefreshToken => response.refresh_token.or_else(|| self.tokens().refresh_token.clone()),
            GrantKind::ClientCredentials => None,
        };
        let seq = self.tokens().seq + 1;
        let mut fields = self.setting_fields.clone();
        if let Some(token) = &refresh_token {
            fields.insert(REFRESH_TOKEN.into(), token.clone());
        }
        fields.insert(ACCESS_TOKEN.into(), response.access_token.clone());
        fields.insert(EXPIRES_AT.into(), Zeroizing::new(format_rfc3339(expires_at)));
        // Sealed before anything else sees it: a kill from here on resumes from this record.
        if let Some(journal) = &self.journal {
            let record = OAuthRecord {
                item: self.spec.item_text(),
                fields: fields.clone(),
                lifetime_s: lifetime.as_secs(),
                seq,
                pending: true,
            };
            if let Err(err) = journal.record_oauth(name, record) {
                tracing::error!(
                    name = %name,
                    "oauth {name}: token response NOT journaled ({err}); it is used and written to 1Password, \
                     but a restart before 1Password stores it loses the new refresh token"
                );
            }
        }
        {
            let mut tokens = self.tokens();
            tokens.refresh_token = refresh_token;
            tokens.expires_at = Some(expires_at);
            tokens.lifetime = lifetime;
            tokens.refreshes += 1;
            tokens.phase = Phase::Ok;
            tokens.error = None;
            tokens.retry_at = None;
            tokens.failures = 0;
            tokens.seq = seq;
        }
        self.store.set_value(name, response.access_token.as_bytes());
        self.write_back(&fields, seq);
        self.wake.notify_one();
        tracing::info!(name = %name, "oauth {name}: new access token, expires in {}s", lifetime.as_secs());
    }

    /// Queues the tokens of record `seq` for 1Password (one read-modify-write of the item),
    /// and settles the record once all of them are stored.
    fn write_back(&self, fields: &BTreeMap<String, Zeroizing<String>>, seq: u64) {
        let name = &self.spec.name;
        let mut submitted = Vec::new();
        for label in [REFRESH_TOKEN, ACCESS_TOKEN, EXPIRES_AT] {
            let Some(value) = fields.get(label) else { continue };
            let reference = self.spec.field(label);
            let submission = self.writeback.submit(name, &reference, value.as_bytes(), Origin::OAuth);
            submitted.push((reference, submission.generation));
        }
        let Some(journal) = self.journal.clone() else { return };
        let writeback = self.writeback.clone();
        let name = name.clone();
        tokio::spawn(async move {
            for (reference, generation) in submitted {
                loop {
                    match writeback.wait_stored(&reference, generation, Duration::from_secs(3600)).await {
                        SetOutcome::Stored => break,
                        // Only a SET is ever refused; an OAuth write is retried until stored.
                        SetOutcome::Refused(_) => return,
                        SetOutcome::Pending(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            }
            journal.settle_oauth(&name, seq);
        });
    }

    fn status(&self) -> serde_json::Value {
        let tokens = self.tokens();
        json!({
            "item": self.spec.item_text(),
            "grant": match self.grant { GrantKind::RefreshToken => "refresh_token", GrantKind::ClientCredentials => "client_credentials" },
            "state": tokens.phase.label(),
            "expires_at": tokens.expires_at.map(format_rfc3339),
            "refreshes": tokens.refreshes,
            "error": tokens.error,
        })
    }
}

/// The item's fields by label (absent fields left out).
async fn read_item(
    spec: &OAuthSpec,
    backend: &dyn Backend,
) -> Result<BTreeMap<String, Zeroizing<String>>, crate::backend::BackendError> {
    let refs: Vec<SecretRef> = FIELDS.iter().map(|label| spec.field(label)).collect();
    let results = backend.read_item_fields(&refs).await;
    let mut fields = BTreeMap::new();
    for (label, result) in FIELDS.iter().zip(results) {
        match result {
            Ok(value) => {
                let text = String::from_utf8(value.to_vec()).map_err(|_| {
                    crate::backend::BackendError::new(ErrorKind::Invalid, format!("field {label} is not text"))
                })?;
                fields.insert(label.to_string(), Zeroizing::new(text));
            }
            Err(err) if err.kind == ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_an_item_not_a_field() {
        let spec = OAuthSpec::parse("GH", "op://Agents/GitHub App").unwrap();
        assert_eq!((spec.vault.as_str(), spec.item.as_str()), ("Agents", "GitHub App"));
        assert_eq!(spec.field("refresh_token").to_string(), "op://Agents/GitHub App/refresh_token");
        for bad in ["op://v", "op://v/i/f", "op:///i", "https://v/i", "op://v/i?x=1"] {
            assert!(OAuthSpec::parse("GH", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_margin_is_a_quarter_of_the_lifetime_capped_at_five_minutes() {
        assert_eq!(margin(Duration::from_secs(8)), Duration::from_secs(2));
        assert_eq!(margin(Duration::from_secs(3600)), Duration::from_secs(300));
    }
}
