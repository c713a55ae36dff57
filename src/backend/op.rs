//! The `op` backend: runs the 1Password CLI.
//!
//! Resolution groups references by item: an item asked for once is read with
//! `op read --no-newline` (byte-exact, no trailing newline to strip), an item asked for
//! several times is fetched once with `op item get --format json` and every field taken from
//! that one answer. Calls run concurrently up to a bound, always with a null stdin unless
//! JSON is being fed, and under a timeout after which the CLI is killed.
//!
//! Writes never put the value in argv: the item is read as JSON, the field changed (or
//! created), and the whole item sent to `op item edit` on stdin, because the CLI replaces the
//! item from stdin JSON.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Semaphore;
use zeroize::{Zeroize, Zeroizing};

use super::{
    Backend, BackendError, BoxFuture, ErrorKind, FieldWrite, ItemWriteResult, RetryPolicy, Value, WriteOptions,
    check_text_field, check_writable, parse_retry_after, value_text,
};
use crate::locked::{ZeroizingWriter, extend_zeroizing};
use crate::process::{Process, Reaper};
use crate::reference::SecretRef;

/// Most bytes read from `op`'s stdout (a large item's JSON) and stderr.
const MAX_STDOUT: usize = 16 * 1024 * 1024;
const MAX_STDERR: usize = 64 * 1024;
/// Longest backend message kept for errors and STATUS.
const MAX_MESSAGE: usize = 300;

#[derive(Debug, Clone)]
pub struct OpOptions {
    pub path: PathBuf,
    /// Per-call timeout; a hung `op` is killed.
    pub timeout: Duration,
    /// Most `op` processes running at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// `--op-user`: run `op` under this uid/gid (None: op-bridge's own).
    pub user: Option<RunAs>,
}

/// The identity `op` processes run as, with the home directory its configuration lives in.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

pub struct OpCli {
    options: OpOptions,
    reaper: Reaper,
    permits: Arc<Semaphore>,
}

impl OpCli {
    pub fn new(options: OpOptions, reaper: Reaper) -> OpCli {
        let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
        OpCli { options, reaper, permits }
    }

    /// One `op` invocation: bounded by the semaphore and the timeout.
    /// `names` are the vault/item/field names the call is about: they are blanked out of the
    /// error text before it is classified, so a name never decides the class.
    pub(super) async fn call(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        names: &[&str],
    ) -> Result<Value, BackendError> {
        let _permit =
            self.permits.acquire().await.map_err(|_| BackendError::new(ErrorKind::Transient, "shutting down"))?;
        let mut command = Command::new(&self.options.path);
        command
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A token read from a file reaches `op` in its own environment only (an environment
        // token is inherited like the rest of op-bridge's environment).
        if let Some(token) = &crate::token::tokens().service_account
            && token.source != crate::token::Source::Env
        {
            command.env(token.kind.var(), token.expose());
        }
        // privsep (--op-user): op runs under its own uid, its config under that user's HOME.
        if let Some(user) = &self.options.user {
            command.uid(user.uid).gid(user.gid).env("HOME", &user.home);
        }
        let (mut child, process) = self.reaper.spawn(&mut command).map_err(|err| {
            BackendError::new(ErrorKind::Invalid, format!("cannot run {}: {err}", self.options.path.display()))
        })?;
        let mut process = KillOnDrop(process);
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let io_error = |err: std::io::Error| BackendError::new(ErrorKind::Transient, format!("op pipe: {err}"));
        let stdin_tx = pipes.0.map(|p| pipe::Sender::from_owned_fd(OwnedFd::from(p))).transpose().map_err(io_error)?;
        let stdout_rx =
            pipes.1.map(|p| pipe::Receiver::from_owned_fd(OwnedFd::from(p))).transpose().map_err(io_error)?;
        let stderr_rx =
            pipes.2.map(|p| pipe::Receiver::from_owned_fd(OwnedFd::from(p))).transpose().map_err(io_error)?;

        let exchange = async {
            let feed = async {
                if let (Some(mut tx), Some(data)) = (stdin_tx, stdin) {
                    // An `op` that exits early closes its stdin; its stderr explains why.
                    let _ = tx.write_all(data).await;
                }
            };
            let (_, out, err) =
                tokio::join!(feed, read_limited(stdout_rx, MAX_STDOUT), read_limited(stderr_rx, MAX_STDERR));
            let exit = process.0.wait().await;
            (out, err, exit)
        };
        let outcome = tokio::time::timeout(self.options.timeout, exchange).await;
        match outcome {
            Ok((out, _, exit)) if exit.success() => Ok(out),
            Ok((_, err, exit)) => Err(classify(&err, &exit.to_string(), names)),
            Err(_) => {
                process.0.signal(Signal::SIGKILL);
                process.0.wait().await;
                Err(BackendError::new(
                    ErrorKind::Timeout,
                    format!("op did not answer within {:?} and was killed", self.options.timeout),
                ))
            }
        }
    }

    /// [`call`](Self::call) with retries of transient failures.
    async fn call_retrying(&self, args: &[&str], what: &str, names: &[&str]) -> Result<Value, BackendError> {
        let mut attempt = 1;
        loop {
            match self.call(args, None, names).await {
                Ok(out) => return Ok(out),
                Err(err) if err.kind.is_permanent() || attempt >= self.options.retry.attempts => return Err(err),
                Err(err) => {
                    let pause = self.options.retry.delay(attempt, err.kind);
                    tracing::warn!(
                        "{what}: {err} ({}); retry {attempt}/{} in {:.1}s",
                        err.kind.label(),
                        self.options.retry.attempts - 1,
                        pause.as_secs_f64()
                    );
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn get_item(&self, vault: &str, item: &str) -> Result<ItemJson, BackendError> {
        let what = format!("op://{vault}/{item}");
        let out = self
            .call_retrying(&["item", "get", item, "--vault", vault, "--format", "json"], &what, &[vault, item])
            .await?;
        ItemJson::parse(&out)
    }

    /// One read-modify-write of an item: `op item get` → change every field of `writes` →
    /// the whole item to `op item edit` on stdin (never a value in argv). The item JSON keeps
    /// the `version` it was read at, so a concurrent edit in between is refused (409) rather
    /// than overwritten; the queue then redoes the cycle.
    async fn write_fields(&self, writes: &[FieldWrite], options: WriteOptions) -> ItemWriteResult {
        let Some(first) = writes.first() else { return Ok(Vec::new()) };
        let (vault, item) = first.reference.item_key();
        let mut names = vec![vault, item];
        names.extend(writes.iter().flat_map(|w| w.reference.field_names()));
        let args = ["item", "get", item, "--vault", vault, "--format", "json"];
        let (mut json, create) = match self.call(&args, None, &names).await {
            Ok(out) => (ItemJson::parse(&out)?, false),
            Err(err)
                if err.kind == ErrorKind::NotFound && options.create_item && !err.message.contains("isn't a vault") =>
            {
                let json = ItemJson(json!({
                    "title": item,
                    "category": "API_CREDENTIAL",
                    "vault": { "name": vault },
                    "sections": [],
                    "fields": [],
                }));
                (json, true)
            }
            Err(err) => return Err(err),
        };
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let outcome = check_writable(&write.reference)
                .and_then(|()| value_text(&write.value))
                .and_then(|text| json.set_field(&write.reference, text));
            results.push(outcome);
        }
        if results.iter().all(Result::is_err) {
            return Ok(results);
        }
        let body = json.to_bytes()?;
        if create {
            self.call(&["item", "create", "--vault", vault], Some(&body), &names).await?;
        } else {
            let id = json.id().unwrap_or(item).to_string();
            self.call(&["item", "edit", &id, "--vault", vault], Some(&body), &names).await?;
        }
        Ok(results)
    }
}

impl Backend for OpCli {
    fn resolve<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>> {
        // Batched: see `op_batch` (issue 13).
        let plan = super::op_batch::Plan { concurrency: self.options.concurrency, retry: self.options.retry };
        Box::pin(super::op_batch::resolve(self, refs, plan))
    }

    fn write_item<'a>(&'a self, writes: &'a [FieldWrite], options: WriteOptions) -> BoxFuture<'a, ItemWriteResult> {
        Box::pin(self.write_fields(writes, options))
    }

    fn updated_at<'a>(&'a self, reference: &'a SecretRef) -> BoxFuture<'a, Result<Option<SystemTime>, BackendError>> {
        Box::pin(async move {
            let (vault, item) = reference.item_key();
            let json = self.get_item(vault, item).await?;
            Ok(json.0.get("updated_at").and_then(Json::as_str).and_then(parse_rfc3339))
        })
    }

    fn describe(&self) -> String {
        format!("op CLI {}", self.options.path.display())
    }
}

/// An `op` process that is killed if its call is abandoned before it exits (the caller's
/// future dropped by a shutdown, or by a timeout further up), so no `op` outlives the pass
/// that started it. After a normal exit, dropping it does nothing.
struct KillOnDrop(Process);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // `signal` does nothing once the reaper has collected the child (no recycled pid).
        self.0.signal(Signal::SIGKILL);
    }
}

/// Reads a pipe to EOF, keeping at most `limit` bytes (the rest is drained and dropped so the
/// writer never blocks).
async fn read_limited(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Value {
    let mut out = Zeroizing::new(Vec::new());
    let Some(mut pipe) = pipe else { return out };
    let mut chunk = Zeroizing::new([0u8; 8192]);
    loop {
        match pipe.read(&mut chunk[..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(out.len());
                extend_zeroizing(&mut out, &chunk[..n.min(room)]);
            }
        }
    }
    out
}

/// Turns `op`'s stderr into a classified error. `op` prints `[ERROR] YYYY/MM/DD HH:MM:SS msg`.
///
/// The CLI's messages are chains of context (`could not read secret 'op://…': could not get
/// item X from vault Y: "X" isn't an item…`) in which vault, item and field names appear, quoted
/// or not. So the names the call was about (`names`) and every quoted string are blanked out
/// first, and the classes are tried in a fixed order of specificity: an HTTP status, then
/// 1Password's own not-found, invalid-reference and authentication wording, then network
/// trouble. A name like "token", "connection" or "eof" can therefore never decide the class.
pub fn classify(stderr: &[u8], exit: &str, names: &[&str]) -> BackendError {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with("[ERROR]"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("");
    let message = strip_op_prefix(line).trim();
    let message: String = if message.is_empty() {
        format!("op failed with {exit} and no error message")
    } else {
        message.chars().take(MAX_MESSAGE).collect()
    };
    BackendError::new(classify_text(&message, names), message)
}

/// The class of an `op` error message (see [`classify`]).
pub fn classify_text(message: &str, names: &[&str]) -> ErrorKind {
    let quoted = blank_quoted(&message.to_ascii_lowercase());
    // Longest first, so a name that contains another is blanked whole.
    let mut names: Vec<String> = names.iter().filter(|n| !n.is_empty()).map(|n| n.to_ascii_lowercase()).collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut lower = quoted.clone();
    for name in &names {
        lower = blank_word(&lower, name);
    }
    // Status codes and single keywords are looked for with the names blanked out; 1Password's
    // multi-word phrases ("does not have a field") only with quoted strings blanked, so a
    // name that is a plain word ("a", "field") cannot break a phrase apart.
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let has_phrase = |needles: &[&str]| needles.iter().any(|n| quoted.contains(n));
    if has(&["(429)", "too many requests", "rate limit"]) {
        return ErrorKind::RateLimited(parse_retry_after(message));
    }
    if has(&["(409)", "conflict"]) {
        return ErrorKind::Conflict;
    }
    if has(&["(401)", "(403)"]) {
        return ErrorKind::Auth;
    }
    if has(&["(404)"]) {
        return ErrorKind::NotFound;
    }
    if has(&["(500)", "(502)", "(503)", "(504)", "internal server error", "bad gateway", "service unavailable"]) {
        return ErrorKind::Transient;
    }
    if has_phrase(&[
        "isn't an item",
        "isn't a vault",
        "isn't a field",
        "isn't a section",
        "does not have a field",
        "does not have a section",
        "no item found",
        "item not found",
        "vault not found",
        "could not find item",
        "could not find vault",
        "doesn't exist",
        "does not exist",
    ]) {
        return ErrorKind::NotFound;
    }
    if has_phrase(&[
        "invalid secret reference",
        "invalid reference",
        "must start with",
        "too few segments",
        "too many segments",
        "empty segment",
        "unknown query parameter",
        "invalid attribute",
        "unknown command",
        "unknown flag",
        "unknown shorthand flag",
        "invalid json",
        "invalid item json",
    ]) {
        return ErrorKind::Invalid;
    }
    if has(&[
        "unauthorized",
        "not authorized",
        "aren't authorized",
        "forbidden",
        "authentication",
        "not currently signed in",
        "sign in",
        "signed in",
        "service account token",
        "invalid token",
        "token is invalid",
        "token has been revoked",
        "token revoked",
        "revoked",
        "session expired",
    ]) {
        return ErrorKind::Auth;
    }
    if has(&["timeout", "timed out", "deadline exceeded"]) {
        return ErrorKind::Timeout;
    }
    // Network trouble and anything unrecognised: transient, retried with backoff.
    ErrorKind::Transient
}

/// Replaces each occurrence of `name` that stands as a whole word (not inside a longer
/// word: "i" must not eat the "i" of "isn't") with a blank.
fn blank_word(text: &str, name: &str) -> String {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(name) {
        let before = rest[..at].chars().next_back().or_else(|| out.chars().next_back());
        let after = rest[at + name.len()..].chars().next();
        let bounded_before = !is_word(before) || !name.starts_with(|c: char| c.is_alphanumeric() || c == '_');
        let bounded_after = !is_word(after) || !name.ends_with(|c: char| c.is_alphanumeric() || c == '_');
        out.push_str(&rest[..at]);
        if bounded_before && bounded_after {
            out.push(' ');
        } else {
            out.push_str(name);
        }
        rest = &rest[at + name.len()..];
    }
    out.push_str(rest);
    out
}

/// Replaces every `'…'` and `"…"` span with a blank: names and references are quoted in
/// `op`'s messages, keywords never are.
fn blank_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // The quote char and where its span started, to restore an unclosed one as text.
    let mut open: Option<(char, usize)> = None;
    for (at, c) in text.char_indices() {
        match open {
            Some((q, _)) if c == q => {
                open = None;
                out.push(' ');
            }
            Some(_) => {}
            // An apostrophe inside a word ("isn't", "aren't") is not a quote.
            None if c == '"' || (c == '\'' && !out.ends_with(|p: char| p.is_ascii_alphabetic())) => {
                open = Some((c, at));
            }
            None => out.push(c),
        }
    }
    if let Some((_, start)) = open {
        out.push_str(&text[start..]);
    }
    out
}

/// Parses the CLI's timestamps (`2026-11-21T12:00:00Z`, `2026-11-21T12:00:00.123+01:00`).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    // A timestamp is ASCII; anything else is not one (and would make the byte offsets
    // below fall inside a character).
    if !text.is_ascii() {
        return None;
    }
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        let kept = &fraction[..digits.min(9)];
        nanos = format!("{kept:0<9}").parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let minutes = rest[1..3].parse::<i64>().ok()? * 60 + rest[4..6].parse::<i64>().ok()?;
            if rest.starts_with('-') { -minutes * 60 } else { minutes * 60 }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let seconds = u64::try_from(seconds).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos))
}

fn strip_op_prefix(line: &str) -> &str {
    // "[ERROR] 2026/11/21 12:00:00 message" -> "message"
    let Some(rest) = line.strip_prefix("[ERROR] ") else { return line };
    let mut parts = rest.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(date), Some(time), Some(msg)) if date.contains('/') && time.contains(':') => msg,
        _ => rest,
    }
}

/// An item as `op item get --format json` prints it. Its string values are zeroized on drop.
pub struct ItemJson(Json);

impl ItemJson {
    /// Parses what `op item get --format json` printed. Anything but an object with a
    /// `fields` array (or none) is an error, never a panic later.
    pub fn parse(bytes: &[u8]) -> Result<ItemJson, BackendError> {
        let json: Json = serde_json::from_slice(bytes).map_err(|err| {
            BackendError::new(ErrorKind::Transient, format!("op printed an item that is not JSON: {err}"))
        })?;
        let item = ItemJson(json);
        let shape_ok = item.0.is_object()
            && item.0.get("fields").is_none_or(Json::is_array)
            && item.0.get("sections").is_none_or(|s| s.is_array() || s.is_null());
        if !shape_ok {
            return Err(BackendError::new(ErrorKind::Transient, "op printed item JSON of an unexpected shape"));
        }
        Ok(item)
    }

    fn to_bytes(&self) -> Result<Value, BackendError> {
        let mut out = ZeroizingWriter::with_capacity(4096);
        serde_json::to_writer(&mut out, &self.0)
            .map_err(|err| BackendError::new(ErrorKind::Invalid, format!("cannot encode item: {err}")))?;
        Ok(out.0)
    }

    fn id(&self) -> Option<&str> {
        self.0.get("id").and_then(Json::as_str).filter(|id| !id.is_empty())
    }

    /// Index of the field a reference names: by label or id, within the named section (by
    /// label or id) when the reference has one. Exact match first, then case-insensitive.
    fn find_field(&self, r: &SecretRef) -> Option<usize> {
        let fields = self.0.get("fields")?.as_array()?;
        let section_ok = |f: &Json| match &r.section {
            None => true,
            Some(want) => f.get("section").is_some_and(|s| {
                [s.get("label"), s.get("id")].into_iter().flatten().filter_map(Json::as_str).any(|v| v == want)
            }),
        };
        let name_of = |f: &Json, key: &str| f.get(key).and_then(Json::as_str).map(str::to_string);
        let matches = |exact: bool| {
            fields.iter().position(|f| {
                section_ok(f)
                    && [name_of(f, "label"), name_of(f, "id")]
                        .into_iter()
                        .flatten()
                        .any(|n| if exact { n == r.field } else { n.eq_ignore_ascii_case(&r.field) })
            })
        };
        matches(true).or_else(|| matches(false))
    }

    /// The value of the field `r` names (the fuzz target reads fields through it; resolution
    /// itself goes through `op_batch`).
    pub fn field_value(&self, r: &SecretRef) -> Result<Value, BackendError> {
        let index = self.find_field(r).ok_or_else(|| {
            BackendError::new(
                ErrorKind::NotFound,
                format!("item '{}/{}' does not have a field '{}'", r.vault, r.item, r.field),
            )
        })?;
        let value = self.0.get("fields").and_then(|f| f.get(index)).and_then(|f| f.get("value"));
        let value = value.and_then(Json::as_str).unwrap_or("");
        Ok(Zeroizing::new(value.as_bytes().to_vec()))
    }

    pub fn set_field(&mut self, r: &SecretRef, value: &str) -> Result<(), BackendError> {
        if let Some(index) = self.find_field(r) {
            let field = self.0.get_mut("fields").and_then(|f| f.get_mut(index)).and_then(Json::as_object_mut);
            let Some(field) = field else {
                return Err(BackendError::new(ErrorKind::Invalid, format!("{r}: the field is not an object")));
            };
            let kind = field.get("type").and_then(Json::as_str).unwrap_or("");
            check_text_field(r, kind)?;
            if let Some(Json::String(old)) = field.get_mut("value") {
                old.zeroize();
            }
            field.insert("value".into(), Json::String(value.to_string()));
            return Ok(());
        }
        let mut field = json!({ "type": "CONCEALED", "label": r.field, "value": value });
        if let Some(section) = &r.section {
            field["section"] = self.ensure_section(section);
        }
        match self.0.get_mut("fields").and_then(Json::as_array_mut) {
            Some(fields) => fields.push(field),
            None => self.0["fields"] = Json::Array(vec![field]),
        }
        Ok(())
    }

    fn ensure_section(&mut self, label: &str) -> Json {
        let sections = self.0.get("sections").and_then(Json::as_array).cloned().unwrap_or_default();
        if let Some(found) = sections.iter().find(|s| {
            s.get("label").and_then(Json::as_str) == Some(label) || s.get("id").and_then(Json::as_str) == Some(label)
        }) {
            return found.clone();
        }
        let id: String = label.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
        let section = json!({ "id": if id.is_empty() { "section".to_string() } else { id }, "label": label });
        match self.0.get_mut("sections").and_then(Json::as_array_mut) {
            Some(list) => list.push(section.clone()),
            None => self.0["sections"] = Json::Array(vec![section.clone()]),
        }
        section
    }
}

impl Drop for ItemJson {
    fn drop(&mut self) {
        scrub(&mut self.0);
    }
}

/// Zeroizes every string in a JSON tree (item JSON carries every field's value).
pub fn scrub(value: &mut Json) {
    match value {
        Json::String(s) => s.zeroize(),
        Json::Array(items) => items.iter_mut().for_each(scrub),
        Json::Object(map) => map.values_mut().for_each(scrub),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_op_errors() {
        let none: &[&str] = &[];
        let cases: &[(&str, &[&str], ErrorKind)] = &[
            (
                "could not read secret 'op://v/i/f': could not get item i from vault v: \"i\" isn't an item in the \"v\" vault. Specify the item with its UUID, name, or domain.",
                &["v", "i", "f"],
                ErrorKind::NotFound,
            ),
            ("\"v\" isn't a vault in this account. Specify the vault with its ID or name.", none, ErrorKind::NotFound),
            ("item 'v/i' does not have a field 'f'", none, ErrorKind::NotFound),
            ("could not read secret 'op://v/i/s/f': item 'v/i' does not have a section 's'", none, ErrorKind::NotFound),
            ("invalid secret reference 'x': secret reference must start with \"op://\"", none, ErrorKind::Invalid),
            ("could not read secret 'op://v/i/f?attribute=x': invalid attribute 'x'", none, ErrorKind::Invalid),
            ("(401) Unauthorized: You aren't authorized to perform this action.", none, ErrorKind::Auth),
            ("(403) Forbidden: You don't have permission to access this vault.", none, ErrorKind::Auth),
            ("You are not currently signed in. Please run `op signin --help` for instructions", none, ErrorKind::Auth),
            ("authorization failed: service account token has been revoked", none, ErrorKind::Auth),
            ("(500) Internal Server Error: an internal error occurred, please try again", none, ErrorKind::Transient),
            ("(502) Bad Gateway", none, ErrorKind::Transient),
            ("(503) Service Unavailable", none, ErrorKind::Transient),
            (
                "Get \"https://my.1password.com/api/v2/vault/items\": dial tcp: lookup my.1password.com: no such host",
                none,
                ErrorKind::Transient,
            ),
            ("Post \"https://my.1password.com/api/v1/x\": EOF", none, ErrorKind::Transient),
            ("Get \"https://x\": dial tcp 1.2.3.4:443: i/o timeout", none, ErrorKind::Timeout),
            ("Get \"https://x\": context deadline exceeded", none, ErrorKind::Timeout),
            (
                "(429) Too Many Requests: You've reached the maximum number of requests. Please retry in 3 seconds.",
                none,
                ErrorKind::RateLimited(Some(Duration::from_secs(3))),
            ),
            ("(409) Conflict: the item was changed by someone else", none, ErrorKind::Conflict),
        ];
        for (message, names, kind) in cases {
            let stderr = format!("[ERROR] 2026/11/21 12:00:00 {message}\n");
            let err = classify(stderr.as_bytes(), "exit code 1", names);
            assert_eq!(err.kind, *kind, "{message}");
            assert!(!err.message.starts_with("[ERROR]"));
        }
        assert_eq!(classify(b"", "exit code 1", none).kind, ErrorKind::Transient);
    }

    #[test]
    fn a_name_never_decides_the_class() {
        // Names that hold keywords of other classes, quoted and unquoted, as `op` prints them.
        for word in ["token", "connection", "eof", "timeout", "unauthorized", "invalid", "conflict", "(500)"] {
            let r = SecretRef::parse(&format!("op://vault/{word}/refresh_token")).unwrap();
            let missing_field = format!("item 'vault/{word}' does not have a field 'refresh_token'");
            assert_eq!(classify_text(&missing_field, &r.names()), ErrorKind::NotFound, "{word}");
            let missing_item = format!(
                "could not read secret 'op://vault/{word}/refresh_token': could not get item {word} from vault vault: \"{word}\" isn't an item in the \"vault\" vault."
            );
            assert_eq!(classify_text(&missing_item, &r.names()), ErrorKind::NotFound, "{word}");
            let outage = format!(
                "could not get item {word} from vault vault: Get \"https://my.1password.com/x\": dial tcp: lookup my.1password.com: no such host"
            );
            assert_eq!(classify_text(&outage, &r.names()), ErrorKind::Transient, "{word}");
            let auth = format!("could not get item {word} from vault vault: (401) Unauthorized");
            assert_eq!(classify_text(&auth, &r.names()), ErrorKind::Auth, "{word}");
        }
    }

    #[test]
    fn a_name_that_is_a_plain_word_never_breaks_a_phrase() {
        for word in ["a", "field", "have", "not", "item", "an"] {
            let r = SecretRef::parse(&format!("op://v/{word}/{word}")).unwrap();
            let missing_field = format!("item 'v/{word}' does not have a field '{word}'");
            assert_eq!(classify_text(&missing_field, &r.names()), ErrorKind::NotFound, "{word}");
            let missing_item =
                format!("could not get item {word} from vault v: \"{word}\" isn't an item in the \"v\" vault.");
            assert_eq!(classify_text(&missing_item, &r.names()), ErrorKind::NotFound, "{word}");
        }
    }

    #[test]
    fn rfc3339_timestamps_parse() {
        let t = |s| parse_rfc3339(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis());
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(t("2024-01-01T00:00:00Z"), Some(1_704_067_200_000));
        assert_eq!(t("2024-01-01T01:00:00.5+01:00"), Some(1_704_067_200_500));
        assert_eq!(t("2024-02-30"), None);
        assert_eq!(t("garbage"), None);
        // Found by the op_output fuzz target: multi-byte characters where the offset goes.
        assert_eq!(t("2024-01-01T00:00:00é1234"), None);
        assert_eq!(t("2026-11-21T12:00:00\u{fffd}\u{fffd}"), None);
    }

    #[test]
    fn non_object_item_json_is_an_error() {
        for bad in ["[]", "\"x\"", "1", "null", "{\"fields\": 3}", "{\"fields\": {}}"] {
            assert!(ItemJson::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        let mut item =
            ItemJson::parse(br#"{"fields": ["x", {"label": "a", "type": "OTP", "value": "seed"}]}"#).unwrap();
        let r = SecretRef::parse("op://v/i/a").unwrap();
        assert_eq!(item.set_field(&r, "new").unwrap_err().kind, ErrorKind::Invalid);
        assert_eq!(item.field_value(&r).unwrap().as_slice(), b"seed");
    }

    #[test]
    fn item_fields_are_found_by_label_id_and_section() {
        let item = ItemJson(json!({
            "id": "abc", "sections": [{"id": "s1", "label": "Security"}],
            "fields": [
                {"id": "password", "label": "password", "value": "top"},
                {"id": "x1", "label": "token", "section": {"id": "s1", "label": "Security"}, "value": "sec"},
            ]
        }));
        let get = |r: &str| item.field_value(&SecretRef::parse(r).unwrap()).map(|v| v.to_vec());
        assert_eq!(get("op://v/i/password").unwrap(), b"top");
        assert_eq!(get("op://v/i/Security/token").unwrap(), b"sec");
        assert_eq!(get("op://v/i/s1/x1").unwrap(), b"sec");
        assert_eq!(get("op://v/i/nope").unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn set_field_updates_or_creates() {
        let mut item = ItemJson(json!({"id": "abc", "fields": [{"id": "a", "label": "a", "value": "1"}]}));
        item.set_field(&SecretRef::parse("op://v/i/a").unwrap(), "2").unwrap();
        item.set_field(&SecretRef::parse("op://v/i/OAuth/refresh").unwrap(), "r").unwrap();
        assert_eq!(item.0["fields"][0]["value"], "2");
        assert_eq!(item.0["fields"][1]["label"], "refresh");
        assert_eq!(item.0["fields"][1]["section"]["label"], "OAuth");
        assert_eq!(item.0["sections"][0]["label"], "OAuth");
    }
}
