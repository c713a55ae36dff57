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

use super::op_batch::{OpRunner, Plan};
pub use super::op_errors::{classify, classify_text};
use super::{
    Backend, BackendError, BoxFuture, ErrorKind, FieldWrite, ItemWriteResult, Pauses, RetryPolicy, Value, WriteOptions,
    check_text_field, check_writable, value_text,
};
use crate::locked::{ZeroizingWriter, extend_zeroizing};
use crate::process::{Process, Reaper};
use crate::reference::SecretRef;
use crate::scrub::scrub;
use crate::time::parse_rfc3339;

/// Most bytes read from `op`'s stdout (a large item's JSON) and stderr.
const MAX_STDOUT: usize = 16 * 1024 * 1024;
const MAX_STDERR: usize = 64 * 1024;

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
    pauses: Pauses,
}

impl OpCli {
    pub fn new(options: OpOptions, reaper: Reaper) -> OpCli {
        let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
        OpCli { options, reaper, permits, pauses: Pauses::default() }
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
        self.options.retry.run(&self.pauses, what, || self.call(args, None, names)).await
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
        let plan = Plan { concurrency: self.options.concurrency, retry: self.options.retry, pauses: &self.pauses };
        Box::pin(super::op_batch::resolve(self, refs, plan))
    }

    fn read_item_fields<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>> {
        Box::pin(async move {
            let Some(first) = refs.first() else { return Vec::new() };
            // One `op item get` instead of a batch that narrows down each missing field.
            match self.get_item(&first.vault, &first.item).await {
                Ok(item) => refs.iter().map(|r| item.field_value(r)).collect(),
                Err(err) => refs.iter().map(|_| Err(err.clone())).collect(),
            }
        })
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

    fn pauses(&self) -> Option<&Pauses> {
        Some(&self.pauses)
    }
}

impl OpRunner for OpCli {
    fn run<'a>(
        &'a self,
        args: &'a [&'a str],
        stdin: Option<&'a [u8]>,
        names: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Value, BackendError>> {
        Box::pin(self.call(args, stdin, names))
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
        let in_section = |f: &Json| match &r.section {
            None => true,
            Some(want) => f.get("section").is_some_and(|s| {
                [s.get("label"), s.get("id")].into_iter().flatten().filter_map(Json::as_str).any(|v| v == want)
            }),
        };
        super::find_field(fields, &r.field, in_section)
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

#[cfg(test)]
mod tests {
    use super::*;

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
