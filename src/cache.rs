//! The sealed restart cache and the write-back journal (DESIGN §10): one file that lets a
//! restart cost no 1Password call and a `kill -9` lose no rotation. This module is a store:
//! it reads, seals and writes the file; the daemon decides when (`daemon::recovery`).
//!
//! File layout: `OPBCACHE` · version byte · 16-byte salt · 24-byte nonce · XChaCha20-Poly1305
//! ciphertext of a JSON document (the header is the associated data, so it cannot be
//! altered either). The key is HKDF-SHA256 of the 1Password token in use
//! (`OP_SERVICE_ACCOUNT_TOKEN`, else `OP_CONNECT_TOKEN`, from the environment or its `_FILE`; see
//! [`crate::token`]) with the file's salt: the file gives
//! nothing to anyone who does not already hold that token. Without a token (the file backend)
//! there is no cache: a key derived from nothing would protect nothing.
//!
//! The document holds the values of the last resolution (with when it happened), the journal
//! (every accepted write-back not yet stored in 1Password, sealed before it is acknowledged and
//! replayed at the next start) and, for each watched reference, the value op-bridge last knew
//! 1Password held (the base of the start-up three-way comparison of a watched file). Each
//! change rewrites the file atomically, mode 0600. A file that cannot be opened (another
//! token, cut short, another version, not a cache) is never overwritten: it is renamed
//! `PATH.unreadable-<unix time>` (0600) with whatever journal it holds, and a new file takes
//! its place; one that cannot even be moved aside is left alone and nothing is written for
//! the rest of the run. Plaintext copies (the JSON, base64 text, decoded values) are zeroized
//! after use.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use serde_json::{Value as Json, json};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::backend::Value;
use crate::reference::SecretRef;
use crate::scrub::scrub;
use crate::store::SecretStore;

const MAGIC: &[u8; 8] = b"OPBCACHE";
const VERSION: u8 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = MAGIC.len() + 1 + SALT_LEN + NONCE_LEN;
const HKDF_INFO: &[u8] = b"op-bridge sealed cache v1";
/// Largest cache file read (values are at most 1 MiB each; this is far beyond any real use).
const MAX_FILE: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0} is not an op-bridge cache file")]
    NotACache(PathBuf),
    #[error("{path} has format version {found}; this op-bridge reads version {VERSION}")]
    Version { path: PathBuf, found: u8 },
    #[error("{0} cannot be opened with this token (another token, or altered)")]
    Sealed(PathBuf),
    #[error("{0} holds a malformed document")]
    Malformed(PathBuf),
    /// An unreadable file was renamed out of the way (never overwritten).
    #[error("{reason}; kept as {} with any write-backs it journaled, and replaced by a new cache", kept.display())]
    SetAside { reason: Box<CacheError>, kept: PathBuf },
    /// An unreadable file that could not be renamed: it is left alone and nothing is written.
    #[error("{0}")]
    LeftAlone(String),
}

/// `--cache`, `--cache-fresh`, `--cache-max-stale`.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub path: PathBuf,
    /// Younger than this: used at start with no 1Password call.
    pub fresh: Duration,
    /// Older than `fresh` but younger than this: used only while 1Password is unavailable.
    pub max_stale: Duration,
}

/// One cached value.
pub struct CachedSecret {
    pub name: String,
    pub reference: String,
    pub value: Value,
}

/// One journaled write-back.
#[derive(Clone)]
pub struct JournalEntry {
    pub name: String,
    pub reference: SecretRef,
    pub generation: u64,
    pub value: Value,
}

/// What a cache file held.
pub struct Snapshot {
    /// When the values were last resolved from 1Password.
    pub written: SystemTime,
    pub secrets: Vec<CachedSecret>,
    pub journal: Vec<JournalEntry>,
    /// The bound secrets' placeholders (NAME → placeholder), kept so that a restart hands
    /// out the same ones.
    pub placeholders: BTreeMap<String, String>,
}

/// The newest state of one broker-owned OAuth client (by NAME): the item's settings and the
/// tokens of the last token response. One record is one sealed write, so a kill never leaves
/// a refresh token without its access token or the other way round.
#[derive(Clone)]
pub struct OAuthRecord {
    /// `op://vault/item`.
    pub item: String,
    /// The item's fields by label (`token_url`, `client_id`, …, `refresh_token`,
    /// `access_token`, `expires_at`), zeroized on drop.
    pub fields: BTreeMap<String, Zeroizing<String>>,
    /// The access token's lifetime in seconds, as the token endpoint stated it.
    pub lifetime_s: u64,
    /// Bumped by every token response; a write-back settles only the record it carried.
    pub seq: u64,
    /// Not yet stored in 1Password: a start takes this record over the item's older copy.
    pub pending: bool,
}

impl Snapshot {
    pub fn age(&self) -> Duration {
        // A timestamp in the future (clock moved back) is treated as too old to trust.
        SystemTime::now().duration_since(self.written).unwrap_or(Duration::MAX)
    }

    /// The cached value of `name`, if it was cached for the same reference.
    pub fn value(&self, name: &str, reference: &SecretRef) -> Option<&Value> {
        let reference = reference.to_string();
        self.secrets.iter().find(|s| s.name == name && s.reference == reference).map(|s| &s.value)
    }
}

/// The cache file and its journal.
pub struct SealedCache {
    options: CacheOptions,
    token: Zeroizing<Vec<u8>>,
    store: Arc<SecretStore>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When the cached values were last resolved (kept across journal-only rewrites).
    written: Option<SystemTime>,
    journal: BTreeMap<String, JournalEntry>,
    /// The bound secrets' placeholders, written with every document.
    placeholders: BTreeMap<String, String>,
    /// The OAuth clients' newest token state, by NAME.
    oauth: BTreeMap<String, OAuthRecord>,
    /// By reference text: the value 1Password was last known to hold, for the tracked ones.
    held: BTreeMap<String, Value>,
    /// `held` as the file had it at start, before this run's first answer from 1Password: the
    /// base a watched file is compared with.
    held_at_load: BTreeMap<String, Value>,
    /// The references whose held value is kept (the watched ones).
    tracked: BTreeSet<String>,
    /// Why nothing may be written this run (an unreadable file that could not be moved aside).
    refused: Option<String>,
}

impl SealedCache {
    /// The cache, or None (with a warning) when there is no token to derive its key from.
    pub fn new(options: CacheOptions, token: Option<&str>, store: Arc<SecretStore>) -> Option<Arc<SealedCache>> {
        let Some(token) = token else {
            tracing::warn!(
                "--cache {} ignored: no 1Password token is set (OP_SERVICE_ACCOUNT_TOKEN[_FILE] or \
                 OP_CONNECT_TOKEN[_FILE]), and the cache is sealed with a key derived from the token",
                options.path.display()
            );
            return None;
        };
        Some(Arc::new(SealedCache {
            options,
            token: Zeroizing::new(token.as_bytes().to_vec()),
            store,
            state: Mutex::new(State::default()),
        }))
    }

    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cipher(&self, salt: &[u8]) -> XChaCha20Poly1305 {
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = Hkdf::<Sha256>::new(Some(salt), &self.token).expand(HKDF_INFO, &mut key[..]);
        XChaCha20Poly1305::new(&(*key).into())
    }

    /// Keeps, from now on, the value 1Password holds for each of `references` (the watched
    /// ones): the base against which a watched file is compared at the next start.
    pub fn track_held(&self, references: impl IntoIterator<Item = SecretRef>) {
        self.state().tracked.extend(references.into_iter().map(|r| r.to_string()));
    }

    /// The bound secrets' placeholders the file keeps, read without side effects: a missing
    /// or unreadable file gives none (and `load` deals with it).
    pub fn peek_placeholders(&self) -> BTreeMap<String, String> {
        let Ok(file) = std::fs::File::open(&self.options.path) else { return BTreeMap::new() };
        let mut sealed = Vec::new();
        if std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE), &mut sealed).is_err() {
            return BTreeMap::new();
        }
        self.open(&sealed).map(|decoded| decoded.public.placeholders.clone()).unwrap_or_default()
    }

    /// Reads and opens the file. `Ok(None)`: there is none. The journal it holds becomes this
    /// cache's pending journal. A file that exists but cannot be read or opened is moved aside
    /// ([`CacheError::SetAside`]) or, failing that, left alone with writes refused for the run.
    pub fn load(&self) -> Result<Option<Snapshot>, CacheError> {
        let path = &self.options.path;
        let io = |action, source| CacheError::Io { action, path: path.clone(), source };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(self.leave_alone(io("open", err))),
        };
        let mut sealed = Vec::new();
        if let Err(err) = std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE), &mut sealed) {
            return Err(self.leave_alone(io("read", err)));
        }
        let snapshot = match self.open(&sealed) {
            Ok(snapshot) => snapshot,
            Err(err) => return Err(self.set_aside(err)),
        };
        let mut state = self.state();
        state.written = Some(snapshot.public.written);
        state.journal = snapshot.public.journal.iter().map(|e| (e.reference.to_string(), e.clone())).collect();
        state.held = snapshot.held.into_iter().collect();
        state.held_at_load = state.held.clone();
        state.oauth = snapshot.oauth.into_iter().collect();
        drop(state);
        Ok(Some(snapshot.public))
    }

    /// Renames an unreadable file to `PATH.unreadable-<unix time>` (0600) so that nothing it
    /// holds, a journal included, is overwritten by the next write.
    fn set_aside(&self, reason: CacheError) -> CacheError {
        let path = &self.options.path;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut kept = PathBuf::from(format!("{}.unreadable-{now}", path.display()));
        for n in 1.. {
            if std::fs::symlink_metadata(&kept).is_err() {
                break;
            }
            kept = PathBuf::from(format!("{}.unreadable-{now}-{n}", path.display()));
        }
        match std::fs::rename(path, &kept) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600));
                CacheError::SetAside { reason: Box::new(reason), kept }
            }
            Err(err) => self.leave_alone(CacheError::LeftAlone(format!(
                "{reason}; it cannot be moved aside to {} ({err})",
                kept.display()
            ))),
        }
    }

    /// Refuses every write for the rest of the run: the file at the path may hold a journal
    /// op-bridge could not read, and replacing it would lose that journal for good.
    fn leave_alone(&self, reason: CacheError) -> CacheError {
        let why = format!(
            "{reason}; the file is left as it is and no cache or journal is written this run (move it away to \
             let op-bridge write a new one)"
        );
        self.state().refused = Some(why.clone());
        CacheError::LeftAlone(why)
    }

    fn open(&self, sealed: &[u8]) -> Result<Decoded, CacheError> {
        let path = || self.options.path.clone();
        if sealed.len() < HEADER_LEN || &sealed[..MAGIC.len()] != MAGIC {
            return Err(CacheError::NotACache(path()));
        }
        if sealed[MAGIC.len()] != VERSION {
            return Err(CacheError::Version { path: path(), found: sealed[MAGIC.len()] });
        }
        let (header, body) = sealed.split_at(HEADER_LEN);
        let salt = &header[MAGIC.len() + 1..MAGIC.len() + 1 + SALT_LEN];
        let nonce: [u8; NONCE_LEN] =
            header[HEADER_LEN - NONCE_LEN..].try_into().map_err(|_| CacheError::NotACache(path()))?;
        let plain = self
            .cipher(salt)
            .decrypt(&XNonce::from(nonce), Payload { msg: body, aad: header })
            .map(Zeroizing::new)
            .map_err(|_| CacheError::Sealed(path()))?;
        let mut doc: Json = serde_json::from_slice(&plain).map_err(|_| CacheError::Malformed(path()))?;
        let snapshot = decode(&doc).ok_or_else(|| CacheError::Malformed(path()));
        scrub(&mut doc);
        snapshot
    }

    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut salt);
        random(&mut nonce);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        header.extend_from_slice(&salt);
        header.extend_from_slice(&nonce);
        // Encryption into a Vec cannot fail for inputs below the cipher's 256 GiB limit.
        let body =
            self.cipher(&salt).encrypt(&XNonce::from(nonce), Payload { msg: plain, aad: &header }).unwrap_or_default();
        header.extend_from_slice(&body);
        header
    }

    /// The bound secrets' placeholders, written with every document from now on.
    pub fn keep_placeholders(&self, placeholders: BTreeMap<String, String>) {
        self.state().placeholders = placeholders;
    }

    /// Writes the store's current values (and the journal) as a fresh resolution.
    pub fn save_resolved(&self) {
        self.state().written = Some(SystemTime::now());
        self.save();
    }

    /// Rewrites the file from the store and the journal. A failure is logged; a journal
    /// write's caller gets it from [`Journal::record`] instead.
    pub fn save(&self) {
        if let Err(err) = self.try_write() {
            tracing::warn!("sealed cache not written: {err}");
        }
    }

    fn try_write(&self) -> Result<(), CacheError> {
        self.try_write_with(true)
    }

    /// Writes the file (atomic, 0600); without `values`, it holds the journal alone.
    fn try_write_with(&self, values: bool) -> Result<(), CacheError> {
        let path = &self.options.path;
        let engine = base64::engine::general_purpose::STANDARD;
        let state = self.state();
        if let Some(why) = &state.refused {
            return Err(CacheError::LeftAlone(why.clone()));
        }
        let mut secrets = Vec::new();
        for (name, reference) in self.store.references().into_iter().filter(|_| values) {
            if let Some(text) = self.store.with_value(&name, |v| Zeroizing::new(engine.encode(v))) {
                secrets.push(json!({ "name": name, "ref": reference.to_string(), "value": text.as_str() }));
            }
        }
        let journal: Vec<Json> = state
            .journal
            .values()
            .map(|e| {
                let text = Zeroizing::new(engine.encode(&e.value));
                json!({ "name": e.name, "ref": e.reference.to_string(), "generation": e.generation, "value": text.as_str() })
            })
            .collect();
        let held: Vec<Json> = state
            .held
            .iter()
            .filter(|(r, _)| state.tracked.contains(*r))
            .map(|(r, v)| {
                let text = Zeroizing::new(engine.encode(v));
                json!({ "ref": r, "value": text.as_str() })
            })
            .collect();
        let written = state.written.unwrap_or(SystemTime::UNIX_EPOCH);
        let written = written.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut doc =
            json!({ "version": VERSION, "written": written, "secrets": secrets, "journal": journal, "held": held });
        if !state.placeholders.is_empty() {
            doc["placeholders"] = json!(state.placeholders);
        }
        // Pending OAuth records are journal: kept even in a file without values.
        let oauth: serde_json::Map<String, Json> = state
            .oauth
            .iter()
            .filter(|(_, r)| values || r.pending)
            .map(|(name, r)| {
                let fields: serde_json::Map<String, Json> =
                    r.fields.iter().map(|(k, v)| (k.clone(), Json::String(v.as_str().to_string()))).collect();
                let record = json!({ "item": r.item, "fields": fields, "lifetime_s": r.lifetime_s, "seq": r.seq,
                                     "pending": r.pending });
                (name.clone(), record)
            })
            .collect();
        if !oauth.is_empty() {
            doc["oauth"] = Json::Object(oauth);
        }
        let mut plain = crate::locked::ZeroizingWriter::with_capacity(4096);
        let _ = serde_json::to_writer(&mut plain, &doc);
        let plain = plain.0;
        scrub(&mut doc);
        let sealed = self.seal(&plain);
        // Tighten a file someone loosened before replacing it (write_atomic keeps the mode).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        crate::fsutil::write_atomic(path, &sealed, Some(0o600)).map_err(|source| CacheError::Io {
            action: "write",
            path: path.clone(),
            source,
        })
        // `state` is held until here so two writers cannot interleave an older document last.
    }

    /// Forgets the cached values (revoked token, or a reference 1Password no longer has): the
    /// file is removed, unless its journal still holds write-backs not stored in 1Password.
    /// Those are kept (only a newer value may drop one; a restored item or token stores them
    /// at a later start) in a file with no values, dated so that it is never fresh. A file
    /// left alone (unreadable) is not touched.
    pub fn delete(&self) {
        if self.state().refused.is_some() {
            return;
        }
        let journaled = {
            let state = self.state();
            !state.journal.is_empty() || state.oauth.values().any(|r| r.pending)
        };
        if journaled {
            self.state().written = None;
            match self.try_write_with(false) {
                Ok(()) => tracing::warn!(
                    "sealed cache {}: values dropped; its journal of write-backs not yet stored is kept",
                    self.options.path.display()
                ),
                Err(err) => tracing::warn!("sealed cache: cannot drop its values: {err}"),
            }
            return;
        }
        match std::fs::remove_file(&self.options.path) {
            Ok(()) => tracing::warn!("sealed cache {} deleted", self.options.path.display()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!("cannot delete sealed cache {}: {err}", self.options.path.display()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.options.path
    }
}

/// The durable write-back journal, kept in the sealed cache file.
#[derive(Clone)]
pub struct Journal {
    cache: Arc<SealedCache>,
}

impl Journal {
    pub fn new(cache: Arc<SealedCache>) -> Journal {
        Journal { cache }
    }

    /// Seals an accepted write-back to disk (replacing an older one for the same reference)
    /// before it is acknowledged. An error means it is NOT durable: it is still kept in
    /// memory (and in the file, at the next write that succeeds).
    pub fn record(&self, name: &str, reference: &SecretRef, generation: u64, value: &[u8]) -> Result<(), CacheError> {
        let entry = JournalEntry {
            name: name.to_string(),
            reference: reference.clone(),
            generation,
            value: Zeroizing::new(value.to_vec()),
        };
        self.cache.state().journal.insert(reference.to_string(), entry);
        self.cache.try_write()
    }

    /// Drops the entry of `reference` once generation `generation` (or a newer one) is stored.
    pub fn settle(&self, reference: &SecretRef, generation: u64) {
        let removed = {
            let mut state = self.cache.state();
            let key = reference.to_string();
            match state.journal.get(&key) {
                Some(entry) if entry.generation <= generation => state.journal.remove(&key).is_some(),
                _ => false,
            }
        };
        if removed {
            self.cache.save();
        }
    }

    /// Every write-back still waiting for 1Password.
    pub fn pending(&self) -> Vec<JournalEntry> {
        self.cache.state().journal.values().cloned().collect()
    }

    /// Notes what 1Password was just seen to hold (a resolution's answer, a stored write);
    /// the file is rewritten when a tracked reference's value moved.
    pub fn note_held<'a>(&self, held: impl IntoIterator<Item = (&'a SecretRef, &'a [u8])>) {
        let moved = {
            let mut state = self.cache.state();
            let mut moved = false;
            for (reference, value) in held {
                let key = reference.to_string();
                if !state.tracked.contains(&key) || state.held.get(&key).is_some_and(|v| v.as_slice() == value) {
                    continue;
                }
                state.held.insert(key, Zeroizing::new(value.to_vec()));
                moved = true;
            }
            moved
        };
        if moved {
            self.cache.save();
        }
    }

    /// The value op-bridge knew 1Password held for `reference` when this run started, before
    /// 1Password was asked again (tracked references only).
    pub fn held_at_start(&self, reference: &SecretRef) -> Option<Value> {
        self.cache.state().held_at_load.get(&reference.to_string()).cloned()
    }

    /// The OAuth record of `name` the file held (or this run wrote).
    pub fn oauth(&self, name: &str) -> Option<OAuthRecord> {
        self.cache.state().oauth.get(name).cloned()
    }

    /// Seals a token response to disk (fsync'd) before it is used. An error means it is NOT
    /// durable (it is kept in memory and written with the next write that succeeds).
    pub fn record_oauth(&self, name: &str, record: OAuthRecord) -> Result<(), CacheError> {
        self.cache.state().oauth.insert(name.to_string(), record);
        self.cache.try_write()
    }

    /// Marks record `seq` of `name` as stored in 1Password (a newer record stays pending).
    pub fn settle_oauth(&self, name: &str, seq: u64) {
        let settled = match self.cache.state().oauth.get_mut(name) {
            Some(record) if record.seq == seq && record.pending => {
                record.pending = false;
                true
            }
            _ => false,
        };
        if settled {
            self.cache.save();
        }
    }

    /// Forgets the OAuth record of `name` (its grant was refused: the next start reads the item).
    pub fn forget_oauth(&self, name: &str) {
        if self.cache.state().oauth.remove(name).is_some() {
            self.cache.save();
        }
    }
}

/// A decoded document: the public snapshot and the held values.
struct Decoded {
    public: Snapshot,
    held: Vec<(String, Value)>,
    oauth: Vec<(String, OAuthRecord)>,
}

fn decode(doc: &Json) -> Option<Decoded> {
    let engine = base64::engine::general_purpose::STANDARD;
    let value = |v: &Json| -> Option<Value> { engine.decode(v.get("value")?.as_str()?).ok().map(Zeroizing::new) };
    let written = SystemTime::UNIX_EPOCH + Duration::from_secs(doc.get("written")?.as_u64()?);
    let mut secrets = Vec::new();
    for s in doc.get("secrets")?.as_array()? {
        secrets.push(CachedSecret {
            name: s.get("name")?.as_str()?.to_string(),
            reference: s.get("ref")?.as_str()?.to_string(),
            value: value(s)?,
        });
    }
    let mut journal = Vec::new();
    for e in doc.get("journal")?.as_array()? {
        journal.push(JournalEntry {
            name: e.get("name")?.as_str()?.to_string(),
            reference: SecretRef::parse(e.get("ref")?.as_str()?).ok()?,
            generation: e.get("generation")?.as_u64()?,
            value: value(e)?,
        });
    }
    // Absent from files written before the three-way start-up comparison: no history then.
    let mut held = Vec::new();
    for h in doc.get("held").and_then(Json::as_array).map(Vec::as_slice).unwrap_or_default() {
        held.push((h.get("ref")?.as_str()?.to_string(), value(h)?));
    }
    // Absent in files written before bindings existed.
    let placeholders = doc
        .get("placeholders")
        .and_then(Json::as_object)
        .map(|map| map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    // Absent in files written before broker-owned OAuth.
    let mut oauth = Vec::new();
    for (name, r) in doc.get("oauth").and_then(Json::as_object).into_iter().flatten() {
        let fields = r
            .get("fields")?
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), Zeroizing::new(v.as_str()?.to_string()))))
            .collect::<Option<BTreeMap<_, _>>>()?;
        let record = OAuthRecord {
            item: r.get("item")?.as_str()?.to_string(),
            fields,
            lifetime_s: r.get("lifetime_s")?.as_u64()?,
            seq: r.get("seq")?.as_u64()?,
            pending: r.get("pending")?.as_bool()?,
        };
        oauth.push((name.clone(), record));
    }
    Some(Decoded { public: Snapshot { written, secrets, journal, placeholders }, held, oauth })
}

fn random(buf: &mut [u8]) {
    // Without the kernel's generator no cache file is worth writing; an all-zero salt and
    // nonce would still be unique per key only by luck, so mix in fastrand as a last resort.
    if getrandom::fill(buf).is_err() {
        buf.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Source;

    fn cache(dir: &Path, token: &str) -> (Arc<SealedCache>, Arc<SecretStore>) {
        let store = Arc::new(SecretStore::new());
        let options = CacheOptions {
            path: dir.join("cache"),
            fresh: Duration::from_secs(600),
            max_stale: Duration::from_secs(86_400),
        };
        (SealedCache::new(options, Some(token), store.clone()).unwrap(), store)
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("opb-cache-unit-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn values_round_trip_sealed_and_only_under_the_same_token() {
        let dir = tempdir();
        let (cache, store) = cache(&dir, "ops_token_one");
        let r = SecretRef::parse("op://vault/item/password").unwrap();
        store.register("PW", Some(r.clone()), Source::Env);
        store.set_value("PW", "multi\nline ü\0".as_bytes());
        cache.save_resolved();
        let raw = std::fs::read(cache.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(cache.path()).unwrap().permissions().mode() & 0o777, 0o600);
        for plain in [&b"multi"[..], b"password", b"vault", b"PW", b"ops_token_one"] {
            assert!(!raw.windows(plain.len()).any(|w| w == plain), "{:?} in the file", String::from_utf8_lossy(plain));
        }
        let snapshot = cache.load().unwrap().unwrap();
        assert_eq!(snapshot.value("PW", &r).unwrap().as_slice(), "multi\nline ü\0".as_bytes());
        assert!(snapshot.age() < Duration::from_secs(60));

        // Unreadable files are moved aside, byte for byte, never left in the way or lost.
        let (other, _) = self::cache(&dir, "ops_token_two");
        let kept = match other.load() {
            Err(CacheError::SetAside { reason, kept }) if matches!(*reason, CacheError::Sealed(_)) => kept,
            other => panic!("{:?}", other.err()),
        };
        assert_eq!(std::fs::read(&kept).unwrap(), raw);
        assert!(!cache.path().exists());
        let mut tampered = raw.clone();
        *tampered.last_mut().unwrap() ^= 1;
        std::fs::write(cache.path(), &tampered).unwrap();
        assert!(
            matches!(cache.load(), Err(CacheError::SetAside { reason, .. }) if matches!(*reason, CacheError::Sealed(_)))
        );
        std::fs::write(cache.path(), b"OPBCACHE\x09").unwrap();
        assert!(matches!(cache.load(), Err(CacheError::SetAside { .. })));
        let aside = std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "cache").count();
        assert_eq!(aside, 3, "each unreadable file is kept under its own name");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn journal_records_settles_and_survives_a_reload() {
        let dir = tempdir();
        let (cache, _) = cache(&dir, "tok");
        let journal = Journal::new(cache.clone());
        let a = SecretRef::parse("op://v/i/a").unwrap();
        let b = SecretRef::parse("op://v/i/b").unwrap();
        journal.record("A", &a, 1, b"one").unwrap();
        journal.record("A", &a, 2, b"two").unwrap();
        journal.record("B", &b, 1, b"bee").unwrap();
        journal.settle(&a, 1);
        assert_eq!(journal.pending().len(), 2, "an older generation does not settle a newer one");

        let (reopened, _) = self::cache(&dir, "tok");
        let snapshot = reopened.load().unwrap().unwrap();
        assert_eq!(snapshot.journal.len(), 2);
        let pending = Journal::new(reopened.clone()).pending();
        let a_entry = pending.iter().find(|e| e.name == "A").unwrap();
        assert_eq!((a_entry.generation, a_entry.value.as_slice()), (2, &b"two"[..]));

        journal.settle(&a, 2);
        journal.settle(&b, 5);
        assert!(journal.pending().is_empty());
        let (reopened, _) = self::cache(&dir, "tok");
        assert!(reopened.load().unwrap().unwrap().journal.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_base_of_tracked_references_survives_a_reload_and_only_theirs() {
        let dir = tempdir();
        let (cache, _) = cache(&dir, "tok");
        let watched = SecretRef::parse("op://v/i/watched").unwrap();
        let other = SecretRef::parse("op://v/i/other").unwrap();
        cache.track_held([watched.clone()]);
        let journal = Journal::new(cache.clone());
        journal.note_held([(&watched, &b"held-1"[..]), (&other, &b"not-kept"[..])]);
        assert!(journal.held_at_start(&watched).is_none(), "the base at start does not move during the run");

        let (reopened, _) = self::cache(&dir, "tok");
        reopened.track_held([watched.clone()]);
        reopened.load().unwrap().unwrap();
        let journal = Journal::new(reopened.clone());
        assert_eq!(journal.held_at_start(&watched).unwrap().as_slice(), b"held-1");
        assert!(journal.held_at_start(&other).is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_oauth_record_is_one_sealed_write_and_a_pending_one_outlives_dropped_values() {
        let dir = tempdir();
        let (cache, _) = cache(&dir, "tok");
        let journal = Journal::new(cache.clone());
        let fields: BTreeMap<String, Zeroizing<String>> = [("refresh_token", "rt_2"), ("access_token", "at_2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Zeroizing::new(v.to_string())))
            .collect();
        let record = OAuthRecord { item: "op://v/i".into(), fields, lifetime_s: 60, seq: 2, pending: true };
        journal.record_oauth("GH", record).unwrap();
        let raw = std::fs::read(cache.path()).unwrap();
        assert!(!raw.windows(4).any(|w| w == b"rt_2" || w == b"at_2"), "sealed");

        // Values dropped (a revoked 1Password token): the pending record stays.
        cache.delete();
        let (reopened, _) = self::cache(&dir, "tok");
        reopened.load().unwrap().unwrap();
        let kept = Journal::new(reopened.clone()).oauth("GH").unwrap();
        assert_eq!((kept.seq, kept.pending, kept.fields["refresh_token"].as_str()), (2, true, "rt_2"));
        assert_eq!(kept.fields["access_token"].as_str(), "at_2", "both tokens come back together");

        // Only the record a write carried is settled.
        let journal = Journal::new(reopened.clone());
        journal.settle_oauth("GH", 1);
        assert!(journal.oauth("GH").unwrap().pending);
        journal.settle_oauth("GH", 2);
        let (again, _) = self::cache(&dir, "tok");
        again.load().unwrap().unwrap();
        assert!(!Journal::new(again).oauth("GH").unwrap().pending);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_token_means_no_cache() {
        let options =
            CacheOptions { path: "/nonexistent/cache".into(), fresh: Duration::ZERO, max_stale: Duration::ZERO };
        assert!(SealedCache::new(options, None, Arc::new(SecretStore::new())).is_none());
    }
}
