//! The 1Password tokens op-bridge runs with, and where they came from.
//!
//! A token comes from the environment (`OP_SERVICE_ACCOUNT_TOKEN`, `OP_CONNECT_TOKEN`) or
//! from a file named by `OP_SERVICE_ACCOUNT_TOKEN_FILE` / `OP_CONNECT_TOKEN_FILE` (Docker and
//! Kubernetes secrets mount there, so the token never sits in the container's configuration).
//! [`load`] reads both once at start, before any `op` runs: a file is read bounded, its one
//! trailing newline dropped, and the token kept in locked memory for the life of the process.
//! From here a file token reaches `op` in that process's environment only, Connect as its
//! bearer, and the sealed cache as its key — never the child's environment.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use crate::locked::LockedBytes;

/// Largest token file read (1Password tokens are a few kilobytes at most).
pub const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// Which 1Password token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ServiceAccount,
    Connect,
}

impl Kind {
    /// The environment variable `op` (or Connect's documentation) knows the token by.
    pub fn var(self) -> &'static str {
        match self {
            Kind::ServiceAccount => "OP_SERVICE_ACCOUNT_TOKEN",
            Kind::Connect => "OP_CONNECT_TOKEN",
        }
    }

    /// The variable naming a file that holds the token.
    pub fn file_var(self) -> &'static str {
        match self {
            Kind::ServiceAccount => "OP_SERVICE_ACCOUNT_TOKEN_FILE",
            Kind::Connect => "OP_CONNECT_TOKEN_FILE",
        }
    }
}

/// Where a token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Env,
    File(PathBuf),
}

/// One token, in locked memory. Never printed by `Debug`.
#[derive(Debug)]
pub struct Token {
    pub kind: Kind,
    pub source: Source,
    value: LockedBytes,
}

impl Token {
    /// The token's text (checked to be UTF-8 when it was loaded).
    pub fn expose(&self) -> &str {
        std::str::from_utf8(self.value.expose_secret()).unwrap_or_default()
    }
}

/// The tokens of this process, as loaded at start.
#[derive(Debug, Default)]
pub struct Tokens {
    pub service_account: Option<Token>,
    pub connect: Option<Token>,
}

impl Tokens {
    /// The token the sealed cache's key is derived from: the service account's, else Connect's.
    pub fn cache_key(&self) -> Option<&Token> {
        self.service_account.as_ref().or(self.connect.as_ref())
    }

    /// The tokens that came from files.
    pub fn from_files(&self) -> impl Iterator<Item = (&Token, &Path)> {
        [&self.service_account, &self.connect].into_iter().flatten().filter_map(|t| match &t.source {
            Source::File(path) => Some((t, path.as_path())),
            Source::Env => None,
        })
    }

    /// The tokens that came from the environment.
    pub fn from_env(&self) -> impl Iterator<Item = &Token> {
        [&self.service_account, &self.connect].into_iter().flatten().filter(|t| t.source == Source::Env)
    }
}

/// Why a token could not be loaded. Names the variable and the file, never the content.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{var} and {file_var} are both set: set only one")]
    Both { var: &'static str, file_var: &'static str },
    #[error("{file_var}: cannot read {path}: {source}")]
    Unreadable { file_var: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{file_var}: {path} is not a regular file")]
    NotAFile { file_var: &'static str, path: PathBuf },
    #[error("{file_var}: {path} is empty")]
    Empty { file_var: &'static str, path: PathBuf },
    #[error("{file_var}: {path} is larger than {MAX_TOKEN_FILE} bytes; it does not hold a 1Password token")]
    TooLarge { file_var: &'static str, path: PathBuf },
    #[error("{file_var}: {path} holds more than one line, a NUL byte, or text that is not UTF-8")]
    Malformed { file_var: &'static str, path: PathBuf },
}

static TOKENS: OnceLock<Tokens> = OnceLock::new();

/// Reads the tokens from the environment and the token files; called once at start.
/// Later calls (and [`tokens`] before any call) see the first result.
pub fn load() -> Result<&'static Tokens, TokenError> {
    if let Some(tokens) = TOKENS.get() {
        return Ok(tokens);
    }
    let tokens = Tokens { service_account: load_one(Kind::ServiceAccount)?, connect: load_one(Kind::Connect)? };
    Ok(TOKENS.get_or_init(|| tokens))
}

/// The tokens loaded at start (none when [`load`] was never called).
pub fn tokens() -> &'static Tokens {
    static NONE: Tokens = Tokens { service_account: None, connect: None };
    TOKENS.get().unwrap_or(&NONE)
}

fn load_one(kind: Kind) -> Result<Option<Token>, TokenError> {
    let env = std::env::var_os(kind.var())
        .map(|v| Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(v)))
        .filter(|v| !v.is_empty());
    let file = std::env::var_os(kind.file_var()).filter(|v| !v.is_empty()).map(PathBuf::from);
    match (env, file) {
        (Some(_), Some(_)) => Err(TokenError::Both { var: kind.var(), file_var: kind.file_var() }),
        (None, Some(path)) => {
            // Absolute, as every path of the configuration (`run` moves to / later).
            let path = std::env::current_dir().map(|dir| dir.join(&path)).unwrap_or(path);
            let value = read_token_file(&path, kind.file_var())?;
            Ok(Some(Token { kind, source: Source::File(path), value }))
        }
        (Some(value), None) => Ok(Some(Token { kind, source: Source::Env, value: LockedBytes::new(&value) })),
        (None, None) => Ok(None),
    }
}

/// Reads one token file: bounded, one trailing newline (`\n` or `\r\n`) dropped, one line of
/// UTF-8 without NUL (it becomes an environment value and an HTTP header).
pub fn read_token_file(path: &Path, file_var: &'static str) -> Result<LockedBytes, TokenError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = |source| TokenError::Unreadable { file_var, path: path.to_path_buf(), source };
    // Non-blocking: a FIFO in the file's place must not hang the start.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile { file_var, path: path.to_path_buf() });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_TOKEN_FILE as usize + 1));
    // Reserved up front, so the read never reallocates and leaves a copy behind.
    file.take(MAX_TOKEN_FILE + 1).read_to_end(&mut buf).map_err(unreadable)?;
    if buf.len() as u64 > MAX_TOKEN_FILE {
        return Err(TokenError::TooLarge { file_var, path: path.to_path_buf() });
    }
    let mut text: &[u8] = &buf;
    if let Some(rest) = text.strip_suffix(b"\n") {
        text = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    if text.is_empty() {
        return Err(TokenError::Empty { file_var, path: path.to_path_buf() });
    }
    if text.contains(&b'\n') || text.contains(&b'\r') || text.contains(&0) || std::str::from_utf8(text).is_err() {
        return Err(TokenError::Malformed { file_var, path: path.to_path_buf() });
    }
    Ok(LockedBytes::new(text))
}

/// `run`'s start-up warnings about the tokens: a token file the command's uid could read
/// (uid, gid, supplementary groups), and — once — a token taken from the environment, where
/// the container's configuration keeps it for every `docker exec`.
pub fn warn_at_run(tokens: &Tokens, child_uid: u32, child_gid: u32, child_groups: &[u32]) {
    for (token, path) in tokens.from_files() {
        if crate::supervise::privsep::readable_by(path, child_uid, child_gid, child_groups) {
            tracing::warn!(
                file = %path.display(),
                "{} names a file the command's uid {child_uid} can read: the command can read the 1Password \
                 token from it. Make it readable by op-bridge's user only (chmod 0400, owned by root when \
                 op-bridge runs as root with --user)",
                token.kind.file_var()
            );
        }
    }
    let from_env: Vec<&str> = tokens.from_env().map(|t| t.kind.var()).collect();
    if !from_env.is_empty() {
        let vars = from_env.join(" and ");
        let files: Vec<&str> = tokens.from_env().map(|t| t.kind.file_var()).collect();
        tracing::warn!(
            "the 1Password token came from {vars} in the environment: a container's configuration keeps it \
             (docker inspect shows it, every docker exec process inherits it). Mount it as a file (a Docker or \
             Kubernetes secret) and set {} instead",
            files.join(" / ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("opb-token-unit-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read(content: &[u8]) -> Result<Vec<u8>, String> {
        let dir = dir();
        let path = dir.join("token");
        std::fs::write(&path, content).unwrap();
        let result = read_token_file(&path, "OP_SERVICE_ACCOUNT_TOKEN_FILE")
            .map(|v| v.expose_secret().to_vec())
            .map_err(|e| e.to_string());
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[test]
    fn one_trailing_newline_is_dropped() {
        assert_eq!(read(b"ops_abc\n").unwrap(), b"ops_abc");
        assert_eq!(read(b"ops_abc\r\n").unwrap(), b"ops_abc");
        assert_eq!(read(b"ops_abc").unwrap(), b"ops_abc");
        assert_eq!(read(b"  ops abc ").unwrap(), b"  ops abc ");
    }

    #[test]
    fn bad_files_are_clear_errors_without_content() {
        for (content, want) in [
            (&b""[..], "is empty"),
            (b"\n", "is empty"),
            (b"ops_a\nops_b\n", "more than one line"),
            (b"ops_a\n\n", "more than one line"),
            (b"ops\0a", "NUL"),
            (b"ops\xffa", "UTF-8"),
        ] {
            let err = read(content).unwrap_err();
            assert!(err.contains(want), "{content:?}: {err}");
            assert!(err.starts_with("OP_SERVICE_ACCOUNT_TOKEN_FILE: "), "{err}");
            assert!(!err.contains("ops_a"), "{err}");
        }
        let big = vec![b'a'; MAX_TOKEN_FILE as usize + 1];
        assert!(read(&big).unwrap_err().contains("larger than"));
        assert_eq!(read(&big[..MAX_TOKEN_FILE as usize]).unwrap().len(), MAX_TOKEN_FILE as usize);
    }

    #[test]
    fn missing_file_and_directory() {
        let dir = dir();
        let err = read_token_file(&dir.join("nope"), "OP_CONNECT_TOKEN_FILE").unwrap_err().to_string();
        assert!(err.starts_with("OP_CONNECT_TOKEN_FILE: cannot read ") && err.contains("nope"), "{err}");
        let err = read_token_file(&dir, "OP_CONNECT_TOKEN_FILE").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
