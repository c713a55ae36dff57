//! How the `op` CLI's failures are classified: its stderr turned into a [`BackendError`] of
//! the right [`ErrorKind`], for single calls (`op.rs`) and batches (`op_batch.rs`) alike.

use super::{BackendError, ErrorKind, parse_retry_after};

/// Longest backend message kept for errors and STATUS.
const MAX_MESSAGE: usize = 300;

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

fn strip_op_prefix(line: &str) -> &str {
    // "[ERROR] 2026/11/21 12:00:00 message" -> "message"
    let Some(rest) = line.strip_prefix("[ERROR] ") else { return line };
    let mut parts = rest.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(date), Some(time), Some(msg)) if date.contains('/') && time.contains(':') => msg,
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::SecretRef;
    use std::time::Duration;

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
}
