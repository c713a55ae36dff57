//! The socket protocol: request and reply types, their parsing and encoding, and the limits.
//!
//! # Wire format
//!
//! Requests are lines terminated by `\n` (`\r\n` accepted). The command word is
//! case-insensitive, names are case-insensitive and stored upper-case. A connection may send
//! any number of requests and may pipeline them.
//!
//! ```text
//! PING                      -> OK pong
//! LIST                      -> OK NAME1,NAME2,...        (sorted)
//! GET NAME|op://ref         -> OK value                  | ERR unknown ref: NAME
//! SET NAME URI VALUE        -> OK                        | ERR message
//! DELETE NAME               -> OK                        | ERR unknown ref: NAME
//! REFRESH                   -> OK refreshed N            | ERR message
//! STATUS                    -> OK {json}                 (one line, never a value)
//! HELLO 2                   -> OK 2                      (switches this connection to version 2)
//! ```
//!
//! A GET for a name op-bridge does not hold answers `ERR unknown ref: NAME`; for a name it
//! holds without a value (its resolution failed or its item was deleted) the reply goes on
//! with ` (not available: REASON)`. Clients may rely on these two prefixes
//! ([`UNKNOWN_REF`], [`NOT_AVAILABLE`]). A SET that was accepted but could not be stored in
//! 1Password within its wait answers `ERR pending: …` ([`PENDING`]): it stays queued and will
//! be stored. With `--cache`, one whose journal write also failed answers `ERR not journaled:
//! …` ([`NOT_JOURNALED`]): it stays queued while op-bridge runs, but a restart before
//! 1Password stores it loses it. Any other ERR to a SET means nothing changed.
//!
//! In `SET`, `URI` is an `op://` reference with spaces written as `%20` (any `%XX` escape is
//! decoded), or `-` for "the reference already registered for NAME".
//!
//! Version 2 frames every value so it may hold any byte: a GET reply is
//! `OK <len>\n<len bytes>\n` and a SET is `SET NAME URI <len>\n<len bytes>\n`. Version 1 never
//! truncates: a GET whose value holds `\r`, `\n` or NUL answers `ERR … use HELLO 2`.
//!
//! Limits: a request line is at most [`MAX_LINE`] bytes and a framed value at most
//! [`MAX_VALUE`] bytes. Exceeding either, or closing mid-request, is a fatal error for the
//! connection (the reader cannot resynchronise); malformed commands and invalid UTF-8 are not.

use std::fmt;
use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::locked::{append_wiping, extend_zeroizing};

/// Longest request line, terminator excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest framed value (version 2).
pub const MAX_VALUE: usize = 1024 * 1024;
/// Longest secret name.
pub const MAX_NAME: usize = 128;
/// Start of the ERR text for a name or reference op-bridge does not hold.
pub const UNKNOWN_REF: &str = "unknown ref: ";
/// Marks an `UNKNOWN_REF` answer for a registered name that has no value right now.
pub const NOT_AVAILABLE: &str = " (not available: ";
/// Start of the ERR text of a SET that was accepted and queued but not stored in 1Password
/// within its wait: it will be stored (clients exit 75, not 1).
pub const PENDING: &str = "pending: ";
/// Start of the ERR text of a SET that was queued but neither stored in 1Password within its
/// wait nor journaled (`--cache` could not be written): not durable (clients exit 74).
pub const NOT_JOURNALED: &str = "not journaled: ";
/// Start of the ERR text of a request refused for load (too many connections, too many bytes
/// in flight): nothing was done, and asking again later may succeed.
pub const BUSY: &str = "busy: ";
/// Highest protocol version this build speaks.
pub const LATEST_VERSION: Version = Version::V2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }
}

/// One client request. `Debug` never shows a SET value.
pub enum Request {
    Hello(u32),
    Ping,
    List,
    Refresh,
    Status,
    /// The environment that points a process at the egress proxy (`op-bridge proxy-env`).
    ProxyEnv,
    /// A secret name (upper-cased) or an `op://` reference.
    Get(String),
    Delete(String),
    Set {
        name: String,
        uri: Option<String>,
        value: Zeroizing<Vec<u8>>,
    },
}

impl Request {
    /// The command word, for logs and the audit trail.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Hello(_) => "HELLO",
            Request::Ping => "PING",
            Request::List => "LIST",
            Request::Refresh => "REFRESH",
            Request::Status => "STATUS",
            Request::ProxyEnv => "PROXYENV",
            Request::Get(_) => "GET",
            Request::Delete(_) => "DELETE",
            Request::Set { .. } => "SET",
        }
    }

    /// The name (or reference) the request is about, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            Request::Get(name) | Request::Delete(name) | Request::Set { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Hello(v) => write!(f, "Hello({v})"),
            Request::Set { name, uri, value } => {
                write!(f, "Set {{ name: {name:?}, uri: {uri:?}, value: [REDACTED; {} bytes] }}", value.len())
            }
            other => write!(f, "{} {:?}", other.command(), other.name().unwrap_or("")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("request line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("value of {0} bytes is larger than the {MAX_VALUE}-byte limit")]
    ValueTooLarge(u64),
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error("request is not valid UTF-8")]
    InvalidUtf8,
    #[error("{0}")]
    Malformed(String),
    #[error("bad frame: {0}")]
    BadFrame(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The server's budget of bytes in flight is spent; the frame was not read.
    #[error("busy: too many bytes in flight; retry later")]
    Busy,
}

impl ProtocolError {
    /// Whether the stream can no longer be trusted to be at a request boundary.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ProtocolError::InvalidUtf8 | ProtocolError::Malformed(_))
    }
}

fn malformed(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed(msg.into())
}

/// Bytes of a request line that need no admission (see [`read_request_admitting`]).
pub const FREE_LINE: usize = 4096;

/// Reads one line (without its terminator) into `buf`. Returns `false` on a clean EOF
/// before any byte. Never buffers more than [`MAX_LINE`] bytes.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Zeroizing<Vec<u8>>,
) -> Result<bool, ProtocolError> {
    read_line_admitting(reader, buf, &mut |_| true).await
}

/// [`read_line`], asking `admit(n)` for every `n` bytes the line grows beyond [`FREE_LINE`].
async fn read_line_admitting<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Zeroizing<Vec<u8>>,
    admit: &mut (dyn FnMut(usize) -> bool + Send),
) -> Result<bool, ProtocolError> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return if buf.is_empty() { Ok(false) } else { Err(ProtocolError::Truncated) };
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], true),
            None => (available, false),
        };
        // +1 leaves room for the '\r' of a maximal "\r\n"-terminated line.
        if buf.len() + chunk.len() > MAX_LINE + 1 {
            return Err(ProtocolError::LineTooLong);
        }
        let beyond_free = (buf.len() + chunk.len()).saturating_sub(FREE_LINE.max(buf.len()));
        if beyond_free > 0 && !admit(beyond_free) {
            return Err(ProtocolError::Busy);
        }
        extend_zeroizing(buf, chunk);
        let used = chunk.len() + usize::from(found);
        reader.consume(used);
        if found {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.len() > MAX_LINE {
        return Err(ProtocolError::LineTooLong);
    }
    Ok(true)
}

/// Reads `len` framed bytes followed by `\n`.
async fn read_frame<R: AsyncBufRead + Unpin>(reader: &mut R, len: u64) -> Result<Zeroizing<Vec<u8>>, ProtocolError> {
    if len > MAX_VALUE as u64 {
        return Err(ProtocolError::ValueTooLarge(len));
    }
    let len = len as usize;
    let mut value = Zeroizing::new(vec![0u8; len]);
    reader.read_exact(&mut value).await.map_err(eof_is_truncation)?;
    let mut terminator = [0u8; 1];
    reader.read_exact(&mut terminator).await.map_err(eof_is_truncation)?;
    if terminator[0] == b'\r' {
        reader.read_exact(&mut terminator).await.map_err(eof_is_truncation)?;
    }
    if terminator[0] != b'\n' {
        return Err(ProtocolError::BadFrame("value not followed by a newline".into()));
    }
    Ok(value)
}

fn eof_is_truncation(err: io::Error) -> ProtocolError {
    if err.kind() == io::ErrorKind::UnexpectedEof { ProtocolError::Truncated } else { ProtocolError::Io(err) }
}

/// Validates and upper-cases a secret name.
pub fn normalize_name(name: &str) -> Result<String, ProtocolError> {
    if name.is_empty() {
        return Err(malformed("missing name"));
    }
    if name.len() > MAX_NAME {
        return Err(malformed(format!("name longer than {MAX_NAME} characters")));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(malformed("name may only hold letters, digits, '_', '.' and '-'"));
    }
    Ok(name.to_ascii_uppercase())
}

fn normalize_target(arg: &str) -> Result<String, ProtocolError> {
    if arg.starts_with("op://") { Ok(arg.to_string()) } else { normalize_name(arg) }
}

/// Decodes `%XX` escapes in a SET reference token.
pub fn percent_decode(token: &str) -> Result<String, ProtocolError> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = token.get(i + 1..i + 3).ok_or_else(|| malformed("bad %-escape in reference"))?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| malformed("bad %-escape in reference"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ProtocolError::InvalidUtf8)
}

/// Encodes a reference for the SET token: `%`, spaces and control characters are escaped.
pub fn percent_encode(uri: &str) -> String {
    let mut out = String::with_capacity(uri.len());
    for c in uri.chars() {
        if c == '%' || c == ' ' || c.is_control() {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads the next request. `Ok(None)` is a clean end of stream. Non-fatal errors leave the
/// stream at the next request boundary.
pub async fn read_request<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    version: Version,
    line: &mut Zeroizing<Vec<u8>>,
) -> Result<Option<Request>, ProtocolError> {
    read_request_admitting(reader, version, line, &mut |_| true).await
}

/// [`read_request`], asking `admit(len)` before a framed value of `len` bytes is read into
/// memory, and for every byte of a request line beyond [`FREE_LINE`]. A refusal is
/// [`ProtocolError::Busy`]: the rest of the request is left unread, so the connection
/// cannot be resynchronised and must be closed.
pub async fn read_request_admitting<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    version: Version,
    line: &mut Zeroizing<Vec<u8>>,
    admit: &mut (dyn FnMut(usize) -> bool + Send),
) -> Result<Option<Request>, ProtocolError> {
    if !read_line_admitting(reader, line, admit).await? {
        return Ok(None);
    }
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::InvalidUtf8)?;
    let (word, rest) = match text.split_once(' ') {
        Some((word, rest)) => (word, rest),
        None => (text, ""),
    };
    let no_args = |req: Request| {
        if rest.trim().is_empty() {
            Ok(Some(req))
        } else {
            Err(malformed(format!("{} takes no argument", req.command())))
        }
    };
    let upper = word.to_ascii_uppercase();
    match upper.as_str() {
        "PING" => no_args(Request::Ping),
        "LIST" => no_args(Request::List),
        "REFRESH" => no_args(Request::Refresh),
        "STATUS" => no_args(Request::Status),
        "PROXYENV" => no_args(Request::ProxyEnv),
        "HELLO" => {
            let v = rest.trim().parse::<u32>().map_err(|_| malformed("usage: HELLO <version>"))?;
            Ok(Some(Request::Hello(v)))
        }
        "GET" => Ok(Some(Request::Get(normalize_target(rest.trim())?))),
        "DELETE" => Ok(Some(Request::Delete(normalize_name(rest.trim())?))),
        "SET" => {
            // In version 2 the frame is read before anything else is checked, so that a
            // refused SET still leaves the stream at the next request boundary.
            let (head, value) = match version {
                Version::V1 => {
                    let mut parts = rest.splitn(3, ' ');
                    let head = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let raw = parts.next().ok_or_else(|| malformed("usage: SET NAME URI VALUE"))?;
                    if continues_on_next_line(reader) {
                        return Err(ProtocolError::BadFrame(
                            "SET value spans lines; version 1 carries one-line values (send HELLO 2 and a framed SET)"
                                .into(),
                        ));
                    }
                    let mut value = Zeroizing::new(Vec::with_capacity(raw.len()));
                    value.extend_from_slice(raw.as_bytes());
                    (head, value)
                }
                Version::V2 => {
                    let (head, len) = rest.trim_end().rsplit_once(' ').unwrap_or(("", rest));
                    let len =
                        len.parse::<u64>().map_err(|_| ProtocolError::BadFrame("usage: SET NAME URI <len>".into()))?;
                    if len <= MAX_VALUE as u64 && !admit(len as usize) {
                        return Err(ProtocolError::Busy);
                    }
                    let value = read_frame(reader, len).await?;
                    (head.split_once(' ').unwrap_or((head, "")), value)
                }
            };
            let name = normalize_name(head.0)?;
            let uri = match head.1 {
                "" => return Err(malformed("usage: SET NAME URI VALUE (URI may be '-')")),
                "-" => None,
                token => Some(percent_decode(token)?),
            };
            Ok(Some(Request::Set { name, uri, value }))
        }
        _ if word.is_empty() => Err(malformed("empty request")),
        // The word is not echoed: a line that is not a command may be a pasted value (the
        // second line of a multi-line SET), and this text reaches the debug log.
        _ => Err(malformed("unknown command (PING, LIST, GET, SET, DELETE, REFRESH, STATUS, PROXYENV, HELLO)")),
    }
}

/// Command words a request line may start with.
const COMMANDS: [&[u8]; 9] =
    [b"PING", b"LIST", b"GET", b"SET", b"DELETE", b"REFRESH", b"STATUS", b"PROXYENV", b"HELLO"];

/// Whether bytes already received after a version-1 SET line are the rest of its value (a
/// multi-line value pasted into a line protocol) rather than the next request. Only what has
/// arrived is looked at, without waiting, so this is best effort: it catches a paste or a
/// pipelined write (the next line came with this one); a line that arrives later cannot be
/// told from a new request.
fn continues_on_next_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> bool {
    use futures_util::FutureExt;
    let Some(Ok(next)) = reader.fill_buf().now_or_never() else { return false };
    if next.is_empty() {
        return false;
    }
    let end = next.iter().position(|&b| matches!(b, b' ' | b'\r' | b'\n')).unwrap_or(next.len());
    let word = &next[..end];
    let complete = end < next.len();
    !COMMANDS.iter().any(|c| {
        if complete {
            word.eq_ignore_ascii_case(c)
        } else {
            c.len() >= word.len() && c[..word.len()].eq_ignore_ascii_case(word)
        }
    })
}

/// Encodes a request for the wire (version 2 framing for SET values when `version` is V2).
pub fn encode_request(request: &Request, version: Version) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::new());
    match request {
        Request::Set { name, uri, value } => {
            let uri = uri.as_deref().map(percent_encode).unwrap_or_else(|| "-".to_string());
            match version {
                Version::V1 => {
                    out.reserve(name.len() + uri.len() + value.len() + 8);
                    out.extend_from_slice(format!("SET {name} {uri} ").as_bytes());
                    out.extend_from_slice(value);
                    out.push(b'\n');
                }
                Version::V2 => {
                    let head = format!("SET {name} {uri} {}\n", value.len());
                    out.reserve(head.len() + value.len() + 1);
                    out.extend_from_slice(head.as_bytes());
                    out.extend_from_slice(value);
                    out.push(b'\n');
                }
            }
        }
        Request::Hello(v) => out.extend_from_slice(format!("HELLO {v}\n").as_bytes()),
        Request::Get(name) => out.extend_from_slice(format!("GET {name}\n").as_bytes()),
        Request::Delete(name) => out.extend_from_slice(format!("DELETE {name}\n").as_bytes()),
        other => out.extend_from_slice(format!("{}\n", other.command()).as_bytes()),
    }
    out
}

/// A server reply.
pub enum Response<'a> {
    /// `OK` alone.
    Ok,
    /// `OK <text>`; text must be one line.
    Text(String),
    /// A secret value (GET).
    Value(&'a [u8]),
    /// `ERR <message>`.
    Err(String),
}

/// Appends one encoded reply to `out`. Values are framed in version 2; in version 1 a value
/// that cannot be sent on one line becomes an ERR (never a truncated value). When `out` must
/// grow, its old allocation is wiped first (it may hold earlier values of a pipeline).
pub fn encode_response(out: &mut Vec<u8>, response: &Response<'_>, version: Version) {
    match response {
        Response::Ok => append_wiping(out, &[b"OK\n"]),
        Response::Text(text) => append_wiping(out, &[b"OK ", one_line(text).as_bytes(), b"\n"]),
        Response::Err(text) => append_wiping(out, &[b"ERR ", one_line(text).as_bytes(), b"\n"]),
        Response::Value(value) => match version {
            Version::V2 => append_wiping(out, &[format!("OK {}\n", value.len()).as_bytes(), value, b"\n"]),
            Version::V1 if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) => {
                append_wiping(out, &[b"ERR value contains a line break or NUL byte; use HELLO 2 for framed values\n"])
            }
            Version::V1 => append_wiping(out, &[b"OK ", value, b"\n"]),
        },
    }
}

/// Writes one reply (see [`encode_response`]); the temporary copy of a value is zeroized.
pub async fn write_response<W: AsyncWrite + Unpin>(
    writer: &mut W,
    response: &Response<'_>,
    version: Version,
) -> io::Result<()> {
    let mut out = Zeroizing::new(Vec::new());
    encode_response(&mut out, response, version);
    writer.write_all(&out).await
}

fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(['\r', '\n']) { text.replace(['\r', '\n'], " ").into() } else { text.into() }
}

/// A reply as a client sees it.
pub enum Reply {
    /// `OK` with its text (empty for a bare `OK`).
    Ok(String),
    Value(Zeroizing<Vec<u8>>),
    Err(String),
}

/// Reads one reply. `expect_value` says the request was a GET, whose reply is framed in
/// version 2 and raw in version 1.
pub async fn read_reply<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    version: Version,
    expect_value: bool,
) -> Result<Reply, ProtocolError> {
    let mut line = Zeroizing::new(Vec::new());
    if !read_line(reader, &mut line).await? {
        return Err(ProtocolError::Truncated);
    }
    if let Some(rest) = line.strip_prefix(b"ERR") {
        let text = String::from_utf8_lossy(rest.strip_prefix(b" ").unwrap_or(rest)).into_owned();
        return Ok(Reply::Err(text));
    }
    let rest = match line.as_slice() {
        b"OK" => &b""[..],
        other => other.strip_prefix(b"OK ").ok_or_else(|| malformed("reply is neither OK nor ERR"))?,
    };
    if !expect_value {
        return Ok(Reply::Ok(String::from_utf8_lossy(rest).into_owned()));
    }
    match version {
        Version::V1 => {
            let mut value = Zeroizing::new(Vec::with_capacity(rest.len()));
            value.extend_from_slice(rest);
            Ok(Reply::Value(value))
        }
        Version::V2 => {
            let len = std::str::from_utf8(rest)
                .ok()
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| malformed("framed reply without a length"))?;
            Ok(Reply::Value(read_frame(reader, len).await?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8], version: Version) -> Result<Option<Request>, ProtocolError> {
        let mut reader = bytes;
        let mut line = Zeroizing::new(Vec::new());
        read_request(&mut reader, version, &mut line).await
    }

    async fn parse_all(bytes: &[u8], version: Version) -> Vec<Result<String, String>> {
        let mut reader = bytes;
        let mut line = Zeroizing::new(Vec::new());
        let mut out = Vec::new();
        loop {
            match read_request(&mut reader, version, &mut line).await {
                Ok(None) => break,
                Ok(Some(req)) => out.push(Ok(format!("{req:?}"))),
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e.to_string()));
                    if fatal {
                        break;
                    }
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn simple_commands_are_case_insensitive() {
        let got = parse_all(b"ping\r\nList\nREFRESH\nstatus\nget api_key\nDelete x.y-z\nhello 2\n", Version::V1).await;
        let want = [
            "PING \"\"",
            "LIST \"\"",
            "REFRESH \"\"",
            "STATUS \"\"",
            "GET \"API_KEY\"",
            "DELETE \"X.Y-Z\"",
            "Hello(2)",
        ];
        assert_eq!(got, want.iter().map(|s| Ok(s.to_string())).collect::<Vec<_>>());
    }

    #[test]
    fn busy_errors_carry_the_busy_prefix() {
        assert!(ProtocolError::Busy.to_string().starts_with(BUSY));
    }

    #[tokio::test]
    async fn v1_set_whose_value_spans_lines_is_refused_whole() {
        let got = parse_all(b"SET token - first line\nsecond line\nPING\n", Version::V1).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].as_ref().unwrap_err().contains("spans lines"), "{got:?}");
        // A SET followed by real requests (pipelined) is fine, whatever their case.
        let got = parse_all(b"SET token - one\nget token\nPI", Version::V1).await;
        assert!(got[0].as_ref().is_ok_and(|s| s.starts_with("Set")), "{got:?}");
        assert!(got[1].as_ref().is_ok_and(|s| s.starts_with("GET")), "{got:?}");
    }

    #[tokio::test]
    async fn get_accepts_references_with_spaces() {
        let Some(Request::Get(target)) = parse(b"GET op://My Vault/item/field\n", Version::V1).await.unwrap() else {
            panic!("expected GET");
        };
        assert_eq!(target, "op://My Vault/item/field");
    }

    #[tokio::test]
    async fn v1_set_keeps_spaces_in_value() {
        let req = parse(b"SET token op://v/i/f  two  spaces \n", Version::V1).await.unwrap().unwrap();
        let Request::Set { name, uri, value } = req else { panic!("expected SET") };
        assert_eq!(name, "TOKEN");
        assert_eq!(uri.as_deref(), Some("op://v/i/f"));
        assert_eq!(&value[..], b" two  spaces ");
    }

    #[tokio::test]
    async fn v2_set_reads_framed_value_with_any_byte() {
        let req =
            parse(b"SET creds op://My%20Vault/i/f 7\n{\n\0\xff}\r\n\nPING\n", Version::V2).await.unwrap().unwrap();
        let Request::Set { uri, value, .. } = req else { panic!("expected SET") };
        assert_eq!(uri.as_deref(), Some("op://My Vault/i/f"));
        assert_eq!(&value[..], b"{\n\0\xff}\r\n");
        let none = parse(b"SET creds - 3\nabc\n", Version::V2).await.unwrap().unwrap();
        assert!(matches!(none, Request::Set { uri: None, .. }));
    }

    #[tokio::test]
    async fn malformed_input_is_recoverable_and_reported() {
        let got =
            parse_all(b"\nFOO bar\nGET\nGET bad name!\nPING extra\n\xff\xfe\nHELLO x\nSET a\nPING\n", Version::V1)
                .await;
        assert_eq!(got.len(), 9);
        assert!(got[..8].iter().all(|r| r.is_err()), "{got:?}");
        assert_eq!(got[5], Err("request is not valid UTF-8".to_string()));
        assert_eq!(got[8], Ok("PING \"\"".to_string()));
    }

    #[tokio::test]
    async fn oversized_line_is_fatal_without_buffering_it_all() {
        let mut big = vec![b'A'; MAX_LINE + 2];
        big.push(b'\n');
        let got = parse_all(&big, Version::V1).await;
        assert_eq!(got, vec![Err(ProtocolError::LineTooLong.to_string())]);
        // Exactly at the limit is fine.
        let mut ok = b"GET ".to_vec();
        ok.extend(std::iter::repeat_n(b'A', MAX_LINE - 4));
        ok.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&ok, Version::V1).await, Err(ProtocolError::Malformed(_))));
    }

    #[tokio::test]
    async fn oversized_or_cut_frames_are_fatal() {
        let huge = format!("SET a - {}\n", 10u64 << 30);
        assert!(matches!(parse(huge.as_bytes(), Version::V2).await, Err(ProtocolError::ValueTooLarge(_))));
        assert!(matches!(parse(b"SET a - 10\nabc", Version::V2).await, Err(ProtocolError::Truncated)));
        assert!(matches!(parse(b"SET a - 3\nabcX", Version::V2).await, Err(ProtocolError::BadFrame(_))));
        assert!(matches!(parse(b"SET a - x\nabc\n", Version::V2).await, Err(ProtocolError::BadFrame(_))));
        // A refused SET (bad name) still consumes its frame.
        let got = parse_all(b"SET bad! - 4\nPING\nPING\n", Version::V2).await;
        assert_eq!(got.len(), 2);
        assert!(got[0].is_err() && got[1].is_ok());
        assert!(matches!(parse(b"PING", Version::V1).await, Err(ProtocolError::Truncated)));
    }

    #[tokio::test]
    async fn admission_is_asked_for_frames_and_long_lines_only() {
        let mut asked = Vec::new();
        let mut line = Zeroizing::new(Vec::new());
        let mut wire: &[u8] = b"SET a - 5\nhello\nPING\n";
        let mut yes = |n: usize| {
            asked.push(n);
            true
        };
        assert!(read_request_admitting(&mut wire, Version::V2, &mut line, &mut yes).await.unwrap().is_some());
        assert!(read_request_admitting(&mut wire, Version::V2, &mut line, &mut yes).await.unwrap().is_some());
        assert_eq!(asked, [5]);

        let mut refused = |_| false;
        let mut wire: &[u8] = b"SET a - 5\nhello\n";
        let got = read_request_admitting(&mut wire, Version::V2, &mut line, &mut refused).await;
        assert!(matches!(got, Err(ProtocolError::Busy)), "{got:?}");
        assert_eq!(wire, b"hello\n", "a refused frame is left unread");

        let long = format!("GET {}\n", "A".repeat(FREE_LINE + 100));
        let mut wire = long.as_bytes();
        let got = read_request_admitting(&mut wire, Version::V1, &mut line, &mut refused).await;
        assert!(matches!(got, Err(ProtocolError::Busy)), "{got:?}");
        let mut total = 0;
        let mut count = |n: usize| {
            total += n;
            true
        };
        let mut wire = long.as_bytes();
        let _ = read_request_admitting(&mut wire, Version::V1, &mut line, &mut count).await;
        assert_eq!(total, long.len() - 1 - FREE_LINE, "exactly the bytes beyond the free part");
    }

    #[tokio::test]
    async fn values_round_trip_through_encode_and_reply() {
        let value: &[u8] = b"{\"a\": \"\xc3\xa9\"}\n";
        for version in [Version::V1, Version::V2] {
            let mut wire = Vec::new();
            write_response(&mut wire, &Response::Value(value), version).await.unwrap();
            let mut reader = &wire[..];
            let reply = read_reply(&mut reader, version, true).await.unwrap();
            match (version, reply) {
                (Version::V2, Reply::Value(got)) => assert_eq!(&got[..], value),
                (Version::V1, Reply::Err(msg)) => assert!(msg.contains("HELLO 2")),
                _ => panic!("unexpected reply for {version:?}"),
            }
        }
        let req =
            Request::Set { name: "A".into(), uri: Some("op://v w/i/f".into()), value: Zeroizing::new(value.to_vec()) };
        let wire = encode_request(&req, Version::V2);
        let Some(Request::Set { uri, value: got, .. }) = parse(&wire, Version::V2).await.unwrap() else { panic!() };
        assert_eq!(uri.as_deref(), Some("op://v w/i/f"));
        assert_eq!(&got[..], value);
    }

    #[test]
    fn debug_never_shows_set_value() {
        let req = Request::Set { name: "A".into(), uri: None, value: Zeroizing::new(b"hunter2".to_vec()) };
        assert!(!format!("{req:?}").contains("hunter2"));
    }
}
