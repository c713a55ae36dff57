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

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Semaphore;
use zeroize::{Zeroize, Zeroizing};

use super::{
    Backend, BackendError, BoxFuture, ErrorKind, RetryPolicy, Value, WriteOptions, parse_retry_after, value_text,
};
use crate::locked::extend_zeroizing;
use crate::reference::SecretRef;
use crate::supervise::{Process, Reaper};

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
    async fn call(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Value, BackendError> {
        let _permit =
            self.permits.acquire().await.map_err(|_| BackendError::new(ErrorKind::Transient, "shutting down"))?;
        let mut command = Command::new(&self.options.path);
        command
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
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
            Ok((_, err, exit)) => Err(classify(&err, &exit.to_string())),
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
    async fn call_retrying(&self, args: &[&str], what: &str) -> Result<Value, BackendError> {
        let mut attempt = 1;
        loop {
            match self.call(args, None).await {
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

    async fn read_one(&self, reference: &SecretRef) -> Result<Value, BackendError> {
        let uri = reference.to_string();
        self.call_retrying(&["read", "--no-newline", &uri], &uri).await
    }

    async fn get_item(&self, vault: &str, item: &str) -> Result<ItemJson, BackendError> {
        let what = format!("op://{vault}/{item}");
        let out = self.call_retrying(&["item", "get", item, "--vault", vault, "--format", "json"], &what).await?;
        ItemJson::parse(&out)
    }

    /// Resolves several fields of one item from a single `op item get`.
    async fn read_item_fields(&self, refs: &[&SecretRef]) -> Vec<Result<Value, BackendError>> {
        let (vault, item) = refs[0].item_key();
        match self.get_item(vault, item).await {
            Ok(json) => refs.iter().map(|r| json.field_value(r)).collect(),
            Err(err) => refs.iter().map(|_| Err(err.clone())).collect(),
        }
    }

    async fn write_field(&self, reference: &SecretRef, value: &str, options: WriteOptions) -> Result<(), BackendError> {
        let (vault, item) = reference.item_key();
        let args = ["item", "get", item, "--vault", vault, "--format", "json"];
        match self.call(&args, None).await {
            Ok(out) => {
                let mut json = ItemJson::parse(&out)?;
                json.set_field(reference, value)?;
                let id = json.id().unwrap_or(item).to_string();
                let body = json.to_bytes()?;
                self.call(&["item", "edit", &id, "--vault", vault], Some(&body)).await.map(drop)
            }
            Err(err)
                if err.kind == ErrorKind::NotFound && options.create_item && !err.message.contains("isn't a vault") =>
            {
                let mut json = ItemJson(json!({
                    "title": item,
                    "category": "API_CREDENTIAL",
                    "vault": { "name": vault },
                    "sections": [],
                    "fields": [],
                }));
                json.set_field(reference, value)?;
                let body = json.to_bytes()?;
                self.call(&["item", "create", "--vault", vault], Some(&body)).await.map(drop)
            }
            Err(err) => Err(err),
        }
    }
}

impl Backend for OpCli {
    fn resolve<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>> {
        Box::pin(async move {
            // Group by item so each item is asked for once; references with a query
            // (`?attribute=otp`) need `op read` and are not grouped.
            let mut groups: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
            let mut singles = Vec::new();
            for (i, r) in refs.iter().enumerate() {
                if r.query.is_some() {
                    singles.push(vec![i]);
                } else {
                    groups.entry(r.item_key()).or_default().push(i);
                }
            }
            let batches: Vec<Vec<usize>> = groups.into_values().chain(singles).collect();
            let jobs = batches.into_iter().map(|indexes| async move {
                let results = if indexes.len() == 1 {
                    vec![self.read_one(&refs[indexes[0]]).await]
                } else {
                    let group: Vec<&SecretRef> = indexes.iter().map(|&i| &refs[i]).collect();
                    self.read_item_fields(&group).await
                };
                indexes.into_iter().zip(results).collect::<Vec<_>>()
            });
            let mut slots: Vec<Option<Result<Value, BackendError>>> = refs.iter().map(|_| None).collect();
            for (i, result) in futures_util::future::join_all(jobs).await.into_iter().flatten() {
                slots[i] = Some(result);
            }
            slots
                .into_iter()
                .map(|s| s.unwrap_or_else(|| Err(BackendError::new(ErrorKind::Transient, "not resolved"))))
                .collect()
        })
    }

    fn write<'a>(
        &'a self,
        reference: &'a SecretRef,
        value: &'a [u8],
        options: WriteOptions,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let text = value_text(value)?;
            self.write_field(reference, text, options).await
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
pub fn classify(stderr: &[u8], exit: &str) -> BackendError {
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
    let lower = message.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let kind = if has(&["(429)", "too many requests", "rate limit"]) {
        ErrorKind::RateLimited(parse_retry_after(&message))
    } else if has(&[
        "(500)",
        "(502)",
        "(503)",
        "(504)",
        "dial tcp",
        "no such host",
        "connection",
        "timeout",
        "timed out",
        "eof",
        "temporar",
    ]) {
        ErrorKind::Transient
    } else if has(&[
        "(401)",
        "(403)",
        "unauthorized",
        "not authorized",
        "aren't authorized",
        "forbidden",
        "authenticat",
        "signed in",
        "sign in",
        "service account",
        "token",
    ]) {
        ErrorKind::Auth
    } else if has(&[
        "isn't an item",
        "isn't a vault",
        "isn't a field",
        "does not have a field",
        "not found",
        "could not find",
        "no item",
        "doesn't exist",
        "does not exist",
    ]) {
        ErrorKind::NotFound
    } else if has(&[
        "invalid",
        "unknown command",
        "unknown flag",
        "must start with",
        "too few segments",
        "too many segments",
    ]) {
        ErrorKind::Invalid
    } else {
        ErrorKind::Transient
    };
    BackendError::new(kind, message)
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
struct ItemJson(Json);

impl ItemJson {
    fn parse(bytes: &[u8]) -> Result<ItemJson, BackendError> {
        serde_json::from_slice(bytes).map(ItemJson).map_err(|err| {
            BackendError::new(ErrorKind::Transient, format!("op printed an item that is not JSON: {err}"))
        })
    }

    fn to_bytes(&self) -> Result<Value, BackendError> {
        let mut out = Zeroizing::new(Vec::with_capacity(4096));
        serde_json::to_writer(&mut *out, &self.0)
            .map_err(|err| BackendError::new(ErrorKind::Invalid, format!("cannot encode item: {err}")))?;
        Ok(out)
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

    fn field_value(&self, r: &SecretRef) -> Result<Value, BackendError> {
        let index = self.find_field(r).ok_or_else(|| {
            BackendError::new(
                ErrorKind::NotFound,
                format!("item '{}/{}' does not have a field '{}'", r.vault, r.item, r.field),
            )
        })?;
        let value = self.0["fields"][index].get("value").and_then(Json::as_str).unwrap_or("");
        Ok(Zeroizing::new(value.as_bytes().to_vec()))
    }

    fn set_field(&mut self, r: &SecretRef, value: &str) -> Result<(), BackendError> {
        if let Some(index) = self.find_field(r) {
            self.0["fields"][index]["value"] = Json::String(value.to_string());
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
        let cases: &[(&str, ErrorKind)] = &[
            (
                "[ERROR] 2026/11/21 12:00:00 could not read secret 'op://v/i/f': \"i\" isn't an item in the \"v\" vault.",
                ErrorKind::NotFound,
            ),
            ("[ERROR] 2026/11/21 12:00:00 \"v\" isn't a vault in this account.", ErrorKind::NotFound),
            ("[ERROR] 2026/11/21 12:00:00 item 'v/i' does not have a field 'f'", ErrorKind::NotFound),
            ("[ERROR] 2026/11/21 12:00:00 invalid secret reference 'x': must start with \"op://\"", ErrorKind::Invalid),
            (
                "[ERROR] 2026/11/21 12:00:00 (401) Unauthorized: You aren't authorized to perform this action.",
                ErrorKind::Auth,
            ),
            ("[ERROR] 2026/11/21 12:00:00 (500) Internal Server Error", ErrorKind::Transient),
            ("[ERROR] 2026/11/21 12:00:00 Get \"https://x\": dial tcp: lookup x: no such host", ErrorKind::Transient),
            (
                "[ERROR] 2026/11/21 12:00:00 (429) Too Many Requests: Please retry in 3 seconds.",
                ErrorKind::RateLimited(Some(Duration::from_secs(3))),
            ),
            ("", ErrorKind::Transient),
        ];
        for (stderr, kind) in cases {
            let err = classify(stderr.as_bytes(), "exit code 1");
            assert_eq!(err.kind, *kind, "{stderr}");
            assert!(!err.message.starts_with("[ERROR]"));
        }
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
