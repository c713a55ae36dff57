//! Streaming multi-pattern substitution: the proxy's placeholder → value swap (and the
//! reverse swap of an echoed value back into its placeholder).
//!
//! A [`Substituter`] is built once from a set of [`Pattern`]s (a needle, what to do when it
//! is found, and a label naming the secret) and an [`Encoding`] saying how a replacement is
//! written (raw, percent-encoded for a path or query, JSON-escaped for a JSON body). It is
//! immutable and shared between connections; [`Substituter::stream`] gives each body its own
//! [`StreamSubstituter`], which finds a needle split across any chunk boundary while holding
//! back fewer than [`Substituter::max_needle_len`] bytes, so memory stays bounded for any
//! body size. Matching is leftmost-longest and non-overlapping, and any chunking of an input
//! gives exactly the output of the one-shot [`Substituter::apply`]. Every buffer that may
//! hold a value is zeroizing and wiped when it grows; no value reaches `Debug` output.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use zeroize::Zeroizing;

use crate::locked::append_wiping;

/// What to do where a needle is found.
pub enum Action {
    /// Write this value (raw bytes; the [`Encoding`] is applied when written).
    Replace(Zeroizing<Vec<u8>>),
    /// Refuse the whole input: the needle must not go where this input goes.
    Refuse,
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Replace(value) => write!(f, "Replace([REDACTED; {} bytes])", value.len()),
            Action::Refuse => f.write_str("Refuse"),
        }
    }
}

/// One needle to look for, what to do with it, and the name it is reported under.
pub struct Pattern {
    pub needle: Zeroizing<Vec<u8>>,
    pub action: Action,
    /// The secret's name: reported in [`Applied::used`] and [`Refused`], never a value.
    pub label: String,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pattern")
            .field("needle", &format_args!("[REDACTED; {} bytes]", self.needle.len()))
            .field("action", &self.action)
            .field("label", &self.label)
            .finish()
    }
}

/// How a [`Action::Replace`] value is written into the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// As is (headers, text and form bodies whose placeholder sits in plain text).
    Raw,
    /// Percent-encoded, keeping only RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`):
    /// safe in any path segment, query name or query value.
    Percent,
    /// Escaped for the inside of a JSON string (`"`, `\` and control characters); other
    /// bytes, UTF-8 included, are written as they are.
    Json,
}

/// An input was refused: it holds a needle whose action is [`Action::Refuse`] (or, in a
/// header, a value that cannot be written into a header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The label of the pattern that refused it.
    pub label: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused: {} may not be sent here", self.label)
    }
}

impl std::error::Error for Refused {}

/// The output of a whole-buffer substitution and the labels whose values were written.
pub struct Applied {
    pub out: Zeroizing<Vec<u8>>,
    pub used: BTreeSet<String>,
}

impl fmt::Debug for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Applied")
            .field("out", &format_args!("[REDACTED; {} bytes]", self.out.len()))
            .field("used", &self.used)
            .finish()
    }
}

/// The header names whose `Basic` credentials are decoded before substitution.
const BASIC_AUTH_HEADERS: [&str; 2] = ["authorization", "proxy-authorization"];

/// Where a replacement is written, which decides how it is encoded and what it may contain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The substituter's own [`Encoding`].
    Encoded,
    /// The substituter's own encoding, into a header value: a value with a byte a header
    /// cannot carry (control characters but tab, DEL) is refused, never written (it would
    /// split the header or be rejected half-forwarded).
    Header,
    /// Raw bytes, whatever the encoding: inside `Basic` credentials, which base64 carries.
    Raw,
}

/// An immutable set of patterns, searched leftmost-longest (see [`Matches`]).
pub struct Substituter {
    /// The patterns, empty needles dropped; none: everything passes through untouched.
    patterns: Vec<Pattern>,
    /// Each pattern's replacement written with `encoding` (empty for [`Action::Refuse`]).
    encoded: Vec<Zeroizing<Vec<u8>>>,
    encoding: Encoding,
    max_needle_len: usize,
}

impl fmt::Debug for Substituter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Substituter").field("patterns", &self.patterns).field("encoding", &self.encoding).finish()
    }
}

impl Substituter {
    /// Takes the patterns (cheap: nothing is compiled, so building one per request is fine).
    /// Empty needles are dropped (they would match everywhere); where two patterns share a
    /// needle, the first one wins.
    pub fn new(patterns: Vec<Pattern>, encoding: Encoding) -> Self {
        let patterns: Vec<Pattern> = patterns.into_iter().filter(|p| !p.needle.is_empty()).collect();
        let max_needle_len = patterns.iter().map(|p| p.needle.len()).max().unwrap_or(0);
        let encoded = patterns
            .iter()
            .map(|p| match &p.action {
                Action::Replace(value) => encode(value, encoding),
                Action::Refuse => Zeroizing::new(Vec::new()),
            })
            .collect();
        Substituter { patterns, encoded, encoding, max_needle_len }
    }

    /// Whether there is nothing to look for (every input passes through unchanged).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The longest needle: a stream holds back at most one byte less than this.
    pub fn max_needle_len(&self) -> usize {
        self.max_needle_len
    }

    /// The encoding replacements are written with.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Substitutes in a whole buffer.
    pub fn apply(&self, input: &[u8]) -> Result<Applied, Refused> {
        self.apply_to(input, Target::Encoded)
    }

    /// Substitutes in one header value. In `Authorization` and `Proxy-Authorization`, `Basic`
    /// credentials are decoded, substituted in (raw: base64 carries any byte) and re-encoded;
    /// any other value is substituted as it stands, and a replacement that a header cannot
    /// carry (a control character but tab, or DEL) refuses the header under its label.
    pub fn apply_header(&self, name: &str, value: &[u8]) -> Result<Applied, Refused> {
        if self.is_empty() {
            return Ok(Applied { out: Zeroizing::new(value.to_vec()), used: BTreeSet::new() });
        }
        if BASIC_AUTH_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h))
            && let Some(applied) = self.apply_basic(value)?
        {
            return Ok(applied);
        }
        self.apply_to(value, Target::Header)
    }

    /// A new stream over this substituter, for one body.
    pub fn stream(self: &Arc<Self>) -> StreamSubstituter {
        StreamSubstituter {
            substituter: Arc::clone(self),
            pending: Zeroizing::new(Vec::new()),
            used: BTreeSet::new(),
            refused: None,
        }
    }

    fn apply_to(&self, input: &[u8], target: Target) -> Result<Applied, Refused> {
        let mut out = Zeroizing::new(Vec::with_capacity(input.len()));
        let mut used = BTreeSet::new();
        self.scan(input, true, target, &mut out, &mut used)?;
        Ok(Applied { out, used })
    }

    /// `Basic <base64>` credentials substituted inside; `Ok(None)` when the value is not
    /// well-formed `Basic` credentials (it is then substituted as plain text).
    fn apply_basic(&self, value: &[u8]) -> Result<Option<Applied>, Refused> {
        const SCHEME: &[u8] = b"basic";
        if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return Ok(None);
        }
        let rest = &value[SCHEME.len()..];
        let token_at = rest.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(rest.len());
        if token_at == 0 {
            return Ok(None);
        }
        let token = rest[token_at..].trim_ascii_end();
        let engine = base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
        let mut decoded = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(token.len())]);
        let Ok(n) = engine.decode_slice(token, &mut decoded[..]) else {
            return Ok(None);
        };
        decoded.truncate(n);
        let mut credentials = Zeroizing::new(Vec::with_capacity(decoded.len()));
        let mut used = BTreeSet::new();
        self.scan(&decoded, true, Target::Raw, &mut credentials, &mut used)?;
        if used.is_empty() {
            // Nothing of ours inside: keep the header byte for byte.
            return Ok(Some(Applied { out: Zeroizing::new(value.to_vec()), used }));
        }
        let prefix = &value[..SCHEME.len() + token_at];
        let Some(b64_len) = base64::encoded_len(credentials.len(), true) else {
            return Ok(None);
        };
        let mut out = Zeroizing::new(vec![0u8; prefix.len() + b64_len]);
        out[..prefix.len()].copy_from_slice(prefix);
        let written = engine
            .encode_slice(&credentials[..], &mut out[prefix.len()..])
            .expect("the output was sized with encoded_len");
        out.truncate(prefix.len() + written);
        Ok(Some(Applied { out, used }))
    }

    /// Writes `input` with every confirmed match substituted into `out` and returns how many
    /// bytes of `input` it consumed. With `at_end`, every match is confirmed and everything is
    /// consumed; otherwise a match that more input could lengthen or move is not (the bytes
    /// from where it might start are left for the next call), which is fewer than
    /// `max_needle_len` bytes.
    fn scan(
        &self,
        input: &[u8],
        at_end: bool,
        target: Target,
        out: &mut Zeroizing<Vec<u8>>,
        used: &mut BTreeSet<String>,
    ) -> Result<usize, Refused> {
        if self.is_empty() {
            append_wiping(out, &[input]);
            return Ok(input.len());
        }
        let mut copied_to = 0;
        // Where a match not yet confirmed starts (more input could change it).
        let mut unconfirmed = input.len();
        for (start, end, id) in Matches::new(&self.patterns, input) {
            // Every needle starting here is wholly visible, so leftmost-longest has decided
            // this match as it would on the whole input; a match nearer the end has not.
            if !at_end && start + self.max_needle_len > input.len() {
                unconfirmed = start;
                break;
            }
            let pattern = &self.patterns[id];
            let value: &[u8] = match (&pattern.action, target) {
                (Action::Refuse, _) => return Err(Refused { label: pattern.label.clone() }),
                (Action::Replace(raw), Target::Raw) => raw,
                (Action::Replace(_), Target::Encoded) => &self.encoded[id],
                (Action::Replace(_), Target::Header) => {
                    let value = &self.encoded[id];
                    if value.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
                        return Err(Refused { label: pattern.label.clone() });
                    }
                    value
                }
            };
            append_wiping(out, &[&input[copied_to..start], value]);
            used.insert(pattern.label.clone());
            copied_to = end;
        }
        let consumed = if at_end {
            input.len()
        } else {
            // No match can start before `input.len() - (max - 1)` that is not already decided.
            let undecided = input.len().saturating_sub(self.max_needle_len - 1);
            unconfirmed.min(undecided).max(copied_to)
        };
        append_wiping(out, &[&input[copied_to..consumed]]);
        Ok(consumed)
    }
}

/// Leftmost-longest, non-overlapping matches of the patterns' needles in a haystack (the
/// first pattern on a tie), as `(start, end, pattern index)`. Each needle is searched with
/// `memmem` straight from its zeroizing buffer: no automaton holds a copy of a needle (in
/// the reverse direction, a value) in memory nobody wipes. A needle's next occurrence is
/// searched again only once the scan has passed it, so the cost is one pass per needle —
/// fine for the few secrets bound to one host.
struct Matches<'a> {
    patterns: &'a [Pattern],
    haystack: &'a [u8],
    /// Where the next match may start (the end of the last one).
    at: usize,
    /// Each needle's first occurrence found at or after some earlier `at`; `None`: no more.
    next: Vec<Option<usize>>,
}

impl<'a> Matches<'a> {
    fn new(patterns: &'a [Pattern], haystack: &'a [u8]) -> Self {
        let next = patterns.iter().map(|p| memchr::memmem::find(haystack, &p.needle)).collect();
        Matches { patterns, haystack, at: 0, next }
    }
}

impl Iterator for Matches<'_> {
    type Item = (usize, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        let mut best: Option<(usize, usize)> = None;
        for (id, pattern) in self.patterns.iter().enumerate() {
            if let Some(start) = self.next[id]
                && start < self.at
            {
                // Overlapped by the last match: look again past it.
                self.next[id] = memchr::memmem::find(&self.haystack[self.at..], &pattern.needle).map(|i| i + self.at);
            }
            let Some(start) = self.next[id] else { continue };
            let better = best.is_none_or(|(best_start, best_id)| {
                start < best_start
                    || (start == best_start && pattern.needle.len() > self.patterns[best_id].needle.len())
            });
            if better {
                best = Some((start, id));
            }
        }
        let (start, id) = best?;
        let end = start + self.patterns[id].needle.len();
        self.at = end;
        Some((start, end, id))
    }
}

/// The substitution of one streamed body: push chunks as they come, then finish.
pub struct StreamSubstituter {
    substituter: Arc<Substituter>,
    /// The undecided tail of the input so far: fewer than `max_needle_len` bytes between
    /// calls.
    pending: Zeroizing<Vec<u8>>,
    used: BTreeSet<String>,
    /// Once refused, a stream stays refused: nothing after the refusal is written.
    refused: Option<Refused>,
}

impl fmt::Debug for StreamSubstituter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSubstituter")
            .field("held", &self.pending.len())
            .field("used", &self.used)
            .field("refused", &self.refused)
            .finish()
    }
}

impl StreamSubstituter {
    /// Substitutes in the next chunk; returns what can be sent now (possibly empty), holding
    /// back fewer than `max_needle_len` bytes that a needle might still start in.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Zeroizing<Vec<u8>>, Refused> {
        self.run(chunk, false)
    }

    /// Ends the stream: substitutes in what was held back and returns it.
    pub fn finish(&mut self) -> Result<Zeroizing<Vec<u8>>, Refused> {
        self.run(&[], true)
    }

    /// The labels whose values were written so far.
    pub fn used(&self) -> &BTreeSet<String> {
        &self.used
    }

    /// How many bytes are held back now (always fewer than `max_needle_len`).
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    fn run(&mut self, chunk: &[u8], at_end: bool) -> Result<Zeroizing<Vec<u8>>, Refused> {
        if let Some(refused) = &self.refused {
            return Err(refused.clone());
        }
        let mut out = Zeroizing::new(Vec::with_capacity(self.pending.len() + chunk.len()));
        let scanned = if self.pending.is_empty() {
            // The common case (no needle near the last chunk's end): no copy of the chunk.
            let consumed = self.substituter.scan(chunk, at_end, Target::Encoded, &mut out, &mut self.used);
            consumed.map(|n| append_wiping(&mut self.pending, &[&chunk[n..]]))
        } else {
            append_wiping(&mut self.pending, &[chunk]);
            let consumed = self.substituter.scan(&self.pending, at_end, Target::Encoded, &mut out, &mut self.used);
            // `drain` moves the tail within the same zeroizing allocation.
            consumed.map(|n| drop(self.pending.drain(..n)))
        };
        match scanned {
            Ok(()) => Ok(out),
            Err(refused) => {
                zeroize::Zeroize::zeroize(&mut *self.pending);
                self.refused = Some(refused.clone());
                Err(refused)
            }
        }
    }
}

/// `value` written with `encoding`.
fn encode(value: &[u8], encoding: Encoding) -> Zeroizing<Vec<u8>> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Zeroizing::new(Vec::with_capacity(value.len() * 3));
    for &b in value {
        match encoding {
            Encoding::Raw => out.push(b),
            Encoding::Percent => {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b);
                } else {
                    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
                }
            }
            Encoding::Json => match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                0..0x20 => out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 15)],
                ]),
                _ => out.push(b),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn replace(needle: &str, value: &str, label: &str) -> Pattern {
        Pattern {
            needle: Zeroizing::new(needle.as_bytes().to_vec()),
            action: Action::Replace(Zeroizing::new(value.as_bytes().to_vec())),
            label: label.to_string(),
        }
    }

    fn refuse(needle: &str, label: &str) -> Pattern {
        Pattern { needle: Zeroizing::new(needle.as_bytes().to_vec()), action: Action::Refuse, label: label.to_string() }
    }

    fn sub(patterns: Vec<Pattern>, encoding: Encoding) -> Arc<Substituter> {
        Arc::new(Substituter::new(patterns, encoding))
    }

    fn applied(s: &Substituter, input: &[u8]) -> (Vec<u8>, Vec<String>) {
        let a = s.apply(input).unwrap();
        (a.out.to_vec(), a.used.into_iter().collect())
    }

    fn streamed(s: &Arc<Substituter>, chunks: &[&[u8]]) -> Result<(Vec<u8>, Vec<String>), Refused> {
        let mut stream = s.stream();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&stream.push(chunk)?);
            assert!(stream.held() < s.max_needle_len().max(1), "held {} bytes", stream.held());
        }
        out.extend_from_slice(&stream.finish()?);
        Ok((out, stream.used().iter().cloned().collect()))
    }

    #[test]
    fn every_occurrence_is_replaced_and_the_labels_used_are_reported() {
        let s = sub(
            vec![replace("PH_A", "alpha", "A"), replace("PH_B", "beta", "B"), replace("PH_C", "c", "C")],
            Encoding::Raw,
        );
        let (out, used) = applied(&s, b"x PH_A y PH_B PH_A z");
        assert_eq!(out, b"x alpha y beta alpha z");
        assert_eq!(used, ["A", "B"]);
        assert_eq!(applied(&s, b"nothing here"), (b"nothing here".to_vec(), vec![]));
        assert_eq!(applied(&s, b""), (vec![], vec![]));
    }

    #[test]
    fn the_longest_needle_wins_at_a_position_and_the_leftmost_position_first() {
        let s = sub(
            vec![replace("abc", "1", "short"), replace("abcdef", "2", "long"), replace("cde", "3", "mid")],
            Encoding::Raw,
        );
        assert_eq!(applied(&s, b"abcdef abcde xcdex").0, b"2 1de x3x");
    }

    #[test]
    fn a_refused_needle_refuses_the_whole_input_by_label() {
        let s = sub(vec![replace("PH_A", "alpha", "A"), refuse("PH_X", "OTHER")], Encoding::Raw);
        assert_eq!(s.apply(b"PH_A then PH_X").unwrap_err(), Refused { label: "OTHER".into() });
        let mut stream = s.stream();
        assert!(stream.push(b"ok PH_A PH_").is_ok());
        assert_eq!(stream.push(b"X more").unwrap_err().label, "OTHER");
        assert_eq!(stream.push(b"later").unwrap_err().label, "OTHER", "a refused stream stays refused");
        assert_eq!(stream.finish().unwrap_err().label, "OTHER");
    }

    #[test]
    fn a_needle_split_across_every_boundary_is_found() {
        let s = sub(vec![replace("PLACEHOLDER_0123", "the-real-value", "K")], Encoding::Raw);
        let input = b"head PLACEHOLDER_0123 tail";
        for cut in 0..=input.len() {
            let (out, used) = streamed(&s, &[&input[..cut], &input[cut..]]).unwrap();
            assert_eq!(out, b"head the-real-value tail", "cut at {cut}");
            assert_eq!(used, ["K"]);
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(streamed(&s, &bytes).unwrap().0, b"head the-real-value tail");
    }

    #[test]
    fn a_stream_holds_back_less_than_the_longest_needle_for_any_body_size() {
        let s = sub(vec![replace("PH_0123456789", "v", "K")], Encoding::Raw);
        let mut stream = s.stream();
        let chunk = vec![b'P'; 64 * 1024];
        let mut sent = 0;
        for _ in 0..64 {
            sent += stream.push(&chunk).unwrap().len();
            assert!(stream.held() < s.max_needle_len());
        }
        sent += stream.finish().unwrap().len();
        assert_eq!(sent, 64 * chunk.len());
    }

    #[test]
    fn values_are_written_with_the_chosen_encoding() {
        let value = "a b/c?d&e=f%g~h.i-j_k\"l\\m\nn\u{1}o\u{e9}";
        let percent = sub(vec![replace("PH", value, "K")], Encoding::Percent);
        assert_eq!(
            String::from_utf8(applied(&percent, b"/x/PH?q=PH").0).unwrap(),
            "/x/a%20b%2Fc%3Fd%26e%3Df%25g~h.i-j_k%22l%5Cm%0An%01o%C3%A9?q=a%20b%2Fc%3Fd%26e%3Df%25g~h.i-j_k%22l%5Cm%0An%01o%C3%A9"
        );
        let json = sub(vec![replace("PH", value, "K")], Encoding::Json);
        let body = applied(&json, br#"{"key":"PH"}"#).0;
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["key"], value, "the JSON body decodes to the value");
        let raw = sub(vec![replace("PH", value, "K")], Encoding::Raw);
        assert_eq!(applied(&raw, b"PH").0, value.as_bytes());
    }

    #[test]
    fn basic_credentials_are_decoded_substituted_and_reencoded() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let s = sub(vec![replace("PH_USER", "alice", "U"), replace("PH_PASS", "s3cr:t", "P")], Encoding::Percent);
        let header = format!("Basic {}", b64.encode("PH_USER:PH_PASS"));
        let a = s.apply_header("Authorization", header.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(a.out.to_vec()).unwrap(), format!("Basic {}", b64.encode("alice:s3cr:t")));
        assert_eq!(a.used.into_iter().collect::<Vec<_>>(), ["P", "U"]);
        // Any case of the header and scheme, unpadded base64, extra spaces.
        let unpadded = format!("bAsIc   {}", base64::engine::general_purpose::STANDARD_NO_PAD.encode("x:PH_PASS"));
        let a = s.apply_header("proxy-authorization", unpadded.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(a.out.to_vec()).unwrap(), format!("bAsIc   {}", b64.encode("x:s3cr:t")));
        // Credentials without a placeholder are kept byte for byte.
        let untouched = format!("Basic {}", base64::engine::general_purpose::STANDARD_NO_PAD.encode("x:y1"));
        assert_eq!(s.apply_header("Authorization", untouched.as_bytes()).unwrap().out.as_slice(), untouched.as_bytes());
        // Not base64: substituted as text. Other headers: as text.
        assert_eq!(s.apply_header("Authorization", b"Basic PH_PASS!").unwrap().out.as_slice(), b"Basic s3cr%3At!");
        assert_eq!(s.apply_header("Authorization", b"Bearer PH_PASS").unwrap().out.as_slice(), b"Bearer s3cr%3At");
        let other = format!("Basic {}", b64.encode("PH_USER:PH_PASS"));
        assert_eq!(s.apply_header("x-other", other.as_bytes()).unwrap().out.as_slice(), other.as_bytes());
        // A refused needle inside Basic credentials refuses the header.
        let r = sub(vec![refuse("PH_X", "X")], Encoding::Raw);
        let hidden = format!("Basic {}", b64.encode("u:PH_X"));
        assert_eq!(r.apply_header("Authorization", hidden.as_bytes()).unwrap_err().label, "X");
    }

    #[test]
    fn a_value_a_header_cannot_carry_refuses_the_header_not_the_body() {
        let s = sub(vec![replace("PH", "evil\r\nX-Injected: 1", "K")], Encoding::Raw);
        assert_eq!(s.apply_header("x-api-key", b"PH").unwrap_err().label, "K");
        assert!(s.apply(b"PH").is_ok());
        let tab = sub(vec![replace("PH", "a\tb", "K")], Encoding::Raw);
        assert_eq!(tab.apply_header("x-api-key", b"PH").unwrap().out.as_slice(), b"a\tb");
        // In Basic credentials any byte is fine: base64 carries it.
        let b64 = base64::engine::general_purpose::STANDARD;
        let basic = format!("Basic {}", b64.encode("u:PH"));
        let a = s.apply_header("Authorization", basic.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(a.out.to_vec()).unwrap(),
            format!("Basic {}", b64.encode("u:evil\r\nX-Injected: 1"))
        );
    }

    #[test]
    fn no_patterns_or_empty_needles_pass_everything_through() {
        let s = sub(vec![replace("", "x", "E")], Encoding::Raw);
        assert!(s.is_empty());
        assert_eq!(s.max_needle_len(), 0);
        assert_eq!(applied(&s, b"abc").0, b"abc");
        assert_eq!(s.apply_header("Authorization", b"Basic !!").unwrap().out.as_slice(), b"Basic !!");
        assert_eq!(streamed(&s, &[b"ab", b"", b"c"]).unwrap().0, b"abc");
    }

    #[test]
    fn debug_output_never_shows_a_needle_or_a_value() {
        let s = sub(vec![replace("NEEDLE_SECRET", "VALUE_SECRET", "K")], Encoding::Raw);
        let mut stream = s.stream();
        let _ = stream.push(b"xx NEEDLE_SEC");
        let shown = format!("{s:?} {stream:?} {:?}", s.apply(b"NEEDLE_SECRET").unwrap());
        assert!(!shown.contains("SECRET") && !shown.contains("SEC\""), "{shown}");
        assert!(shown.contains("\"K\""), "{shown}");
    }

    /// Leftmost-longest, non-overlapping, first pattern on a tie: the definition `apply`
    /// must meet, written the slow obvious way.
    fn reference(patterns: &[(Vec<u8>, Option<Vec<u8>>)], input: &[u8]) -> Result<Vec<u8>, usize> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < input.len() {
            let mut best: Option<usize> = None;
            for (i, (needle, _)) in patterns.iter().enumerate() {
                if !needle.is_empty()
                    && input[at..].starts_with(needle)
                    && best.is_none_or(|b| patterns[b].0.len() < needle.len())
                {
                    best = Some(i);
                }
            }
            match best {
                Some(i) => match &patterns[i].1 {
                    Some(value) => {
                        out.extend_from_slice(value);
                        at += patterns[i].0.len();
                    }
                    None => return Err(i),
                },
                None => {
                    out.push(input[at]);
                    at += 1;
                }
            }
        }
        Ok(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_chunking_gives_the_one_shot_output(
            specs in prop::collection::vec(("[ab]{1,5}", prop::option::weighted(0.85, "[xyz]{0,3}")), 1..5),
            input in "[abx]{0,60}",
            cuts in prop::collection::vec(0usize..61, 0..8),
        ) {
            let patterns: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                specs.iter().map(|(n, v)| (n.clone().into_bytes(), v.clone().map(String::into_bytes))).collect();
            let build = || patterns.iter().enumerate().map(|(i, (n, v))| match v {
                Some(v) => replace(std::str::from_utf8(n).unwrap(), std::str::from_utf8(v).unwrap(), &format!("L{i}")),
                None => refuse(std::str::from_utf8(n).unwrap(), &format!("L{i}")),
            }).collect::<Vec<_>>();
            let s = sub(build(), Encoding::Raw);
            let input = input.into_bytes();
            let one_shot = s.apply(&input).map(|a| a.out.to_vec());
            // `apply` agrees with the obvious definition; a refusal names some refusing
            // pattern with that needle (the first of equal needles).
            match (&one_shot, reference(&patterns, &input)) {
                (Ok(out), Ok(expected)) => prop_assert_eq!(out, &expected),
                (Err(refused), Err(i)) => prop_assert_eq!(&refused.label, &format!("L{i}")),
                (got, want) => prop_assert!(false, "apply {:?}, reference {:?}", got, want),
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in cuts {
                chunks.push(&input[from..cut]);
                from = cut;
            }
            chunks.push(&input[from..]);
            let streamed = streamed(&s, &chunks);
            match (one_shot, streamed) {
                (Ok(out), Ok((streamed, used))) => {
                    prop_assert_eq!(out, streamed);
                    prop_assert_eq!(s.apply(&input).unwrap().used.into_iter().collect::<Vec<_>>(), used);
                }
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "one-shot {:?}, streamed {:?}", a.map(|_| ()), b.map(|_| ())),
            }
        }
    }
}
