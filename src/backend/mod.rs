//! Where secrets come from and where write-backs go: the [`Backend`] trait, its errors and
//! the retry policy shared by every caller.
//!
//! Three implementations: [`op::OpCli`] runs the real 1Password CLI (production),
//! [`connect::Connect`] speaks a 1Password Connect server's REST API (fleets), and
//! [`file::FileVault`] reads a JSON vault file (development, demos, CI). Errors are classified
//! as permanent (not found, invalid reference, authentication: never retried) or transient
//! (network, 5xx, 429, timeout: retried with backoff and jitter, honouring a stated delay).

pub mod connect;
pub mod file;
pub mod op;
mod op_batch;
mod op_errors;
mod retry;
pub(crate) mod tls;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use crate::reference::SecretRef;

pub use retry::{MAX_RETRY_AFTER, Pauses, RetryPolicy};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A secret value on its way between a backend and the store; zeroized on drop.
pub type Value = Zeroizing<Vec<u8>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The vault, item or field does not exist.
    NotFound,
    /// The reference or request is malformed.
    Invalid,
    /// The token is missing, invalid or lacks access.
    Auth,
    /// 429 Too Many Requests, with the delay 1Password asked for when it said one.
    RateLimited(Option<Duration>),
    /// The item changed between our read and our write (its version moved): redo the
    /// read-modify-write at once.
    Conflict,
    /// The CLI did not answer in time and was killed.
    Timeout,
    /// Network trouble, 5xx, or anything unrecognised.
    Transient,
}

impl ErrorKind {
    /// Permanent failures are never retried.
    pub fn is_permanent(self) -> bool {
        matches!(self, ErrorKind::NotFound | ErrorKind::Invalid | ErrorKind::Auth)
    }

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Auth => "auth",
            ErrorKind::RateLimited(_) => "rate limited",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Transient => "transient",
        }
    }
}

/// A backend failure. The message comes from the backend's own error text and never holds a
/// secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub kind: ErrorKind,
    pub message: String,
}

impl BackendError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> BackendError {
        BackendError { kind, message: message.into() }
    }
}

/// How a write-back target should be treated when the item or field is missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Create the item when it does not exist (fields are always created when missing).
    pub create_item: bool,
}

/// One field of an item write: where, and the new value (zeroized on drop).
pub struct FieldWrite {
    pub reference: SecretRef,
    pub value: Value,
}

/// What an item write did: `Err` when nothing was stored (the whole item failed: not found,
/// auth, outage, conflict…); otherwise one entry per field, in order, `Ok` for stored and `Err`
/// for a field the backend refused on its own (e.g. not a text field). Refused fields are left
/// out of the edit; the others are stored.
pub type ItemWriteResult = Result<Vec<Result<(), BackendError>>, BackendError>;

pub trait Backend: Send + Sync {
    /// Resolves every reference; one result per input, in order. Implementations retry
    /// transient failures themselves and never fetch the same item twice in one call where
    /// they can avoid it.
    fn resolve<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>>;

    /// Reads fields that all belong to one item, with one read of the item where the backend
    /// can (a missing field is that field's `NotFound`, not a reason to read again). The
    /// default resolves them as references.
    fn read_item_fields<'a>(&'a self, refs: &'a [SecretRef]) -> BoxFuture<'a, Vec<Result<Value, BackendError>>> {
        self.resolve(refs)
    }

    /// Stores every field of `writes` in one read-modify-write of their item (all writes name
    /// the same vault and item). One attempt; the write-back queue owns retrying. Where the
    /// backend has item versions, a concurrent edit is detected and reported as
    /// [`ErrorKind::Conflict`] (or redone), never silently overwritten.
    fn write_item<'a>(&'a self, writes: &'a [FieldWrite], options: WriteOptions) -> BoxFuture<'a, ItemWriteResult>;

    /// When the item holding `reference` last changed in the backend, if the backend can tell
    /// (used at start to decide whether a watched file or 1Password holds the newer value).
    fn updated_at<'a>(&'a self, reference: &'a SecretRef) -> BoxFuture<'a, Result<Option<SystemTime>, BackendError>>;

    /// A short description for logs and STATUS ("op CLI /usr/bin/op", "file vault.json").
    fn describe(&self) -> String;

    /// The handle that ends this backend's retry pauses early (stop, newer work); None for a
    /// backend that never pauses.
    fn pauses(&self) -> Option<&Pauses> {
        None
    }

    /// Extra backend facts for STATUS (e.g. a server's health); never a secret.
    fn status(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async { serde_json::Value::Null })
    }
}

/// Refuses a write to a reference that does not name a plain field value: a query
/// (`?attribute=otp`, `?ssh-format=…`) selects a derived view, and writing "it" would
/// overwrite the field itself.
pub fn check_writable(reference: &SecretRef) -> Result<(), BackendError> {
    match &reference.query {
        Some(query) => Err(BackendError::new(
            ErrorKind::Invalid,
            format!("{reference}: cannot write to a reference with a query ('?{query}'); name the field itself"),
        )),
        None => Ok(()),
    }
}

/// Refuses a write to a field whose type is not plain text (see [`is_text_field_type`]).
pub fn check_text_field(reference: &SecretRef, field_type: &str) -> Result<(), BackendError> {
    if is_text_field_type(field_type) {
        return Ok(());
    }
    Err(BackendError::new(
        ErrorKind::Invalid,
        format!(
            "{reference}: refusing to write a field of type {field_type} (only text and concealed fields are written)"
        ),
    ))
}

/// Field types whose value is plain text op-bridge may replace. Everything else (OTP seeds,
/// files, SSH keys, addresses, menus, references…) is refused rather than corrupted.
pub fn is_text_field_type(field_type: &str) -> bool {
    matches!(field_type.to_ascii_uppercase().as_str(), "STRING" | "CONCEALED" | "TEXT" | "PASSWORD" | "")
}

/// A value as text: 1Password fields (and the vault file's JSON strings) hold UTF-8 only.
pub fn value_text(value: &[u8]) -> Result<&str, BackendError> {
    std::str::from_utf8(value)
        .map_err(|_| BackendError::new(ErrorKind::Invalid, "1Password fields hold text; the value is not UTF-8"))
}

/// The index of the field of `fields` named `name` (its label or its id) among those
/// `in_section` accepts: an exact match first, then one without regard to case. The `op` and
/// Connect item finders share it; each says what "in the section" means for its JSON.
pub(crate) fn find_field(
    fields: &[serde_json::Value],
    name: &str,
    in_section: impl Fn(&serde_json::Value) -> bool,
) -> Option<usize> {
    fn names(f: &serde_json::Value) -> Vec<&str> {
        [f.get("label"), f.get("id")].into_iter().flatten().filter_map(serde_json::Value::as_str).collect()
    }
    let wanted = name.to_lowercase();
    fields
        .iter()
        .position(|f| in_section(f) && names(f).contains(&name))
        .or_else(|| fields.iter().position(|f| in_section(f) && names(f).iter().any(|n| n.to_lowercase() == wanted)))
}

/// Parses a delay like "retry in 3 minutes" / "try again in 10 seconds" out of a 429 message,
/// at most [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find("retry in ").map(|i| i + 9).or_else(|| lower.find("try again in ").map(|i| i + 13))?;
    let rest = &lower[at..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let amount: u64 = digits.parse().ok()?;
    let unit = rest[digits.len()..].trim_start();
    let stated = if unit.starts_with("ms") || unit.starts_with("millisecond") {
        Duration::from_millis(amount)
    } else if unit.starts_with('s') {
        Duration::from_secs(amount)
    } else if unit.starts_with('m') {
        Duration::from_secs(amount.saturating_mul(60))
    } else if unit.starts_with('h') {
        Duration::from_secs(amount.saturating_mul(3600))
    } else {
        return None;
    };
    Some(stated.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_from_429_messages() {
        let m = "(429) Too Many Requests: You've reached the maximum number of requests. Please retry in 2 minutes.";
        assert_eq!(parse_retry_after(m), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("retry in 3 seconds"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Try again in 1 hour"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_retry_after("(429) Too Many Requests"), None);
        let absurd = format!("retry in {} hours", u64::MAX);
        assert_eq!(parse_retry_after(&absurd), Some(MAX_RETRY_AFTER));
    }
}
