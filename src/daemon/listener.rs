//! The Unix socket: safe binding, the peer check, and the accept loop with its limits.
//!
//! Binding refuses to replace a live socket (another daemon answers on it), a symlink or any
//! non-socket file, and removes a stale socket left by a killed daemon only when it is ours
//! to remove: owned by our uid, or we are root and nothing answers on it. A socket of another
//! uid that we cannot probe (we are not root) is refused with its owner named. The socket is
//! created owner-only; `--allow-uid` uids get a POSIX ACL entry on it (and search on the
//! directory op-bridge manages), so the kernel lets exactly them connect. Every connection's
//! peer uid (SO_PEERCRED) must still be allowed; connections beyond the limit, or beyond the
//! peer uid's share of it (see [`Shares`]), get `ERR busy` and are closed, so a flood never
//! stalls the accept loop and never locks root out.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::audit::AuditLog;
use super::broker::Broker;
use super::budget::{ByteBudget, Shares};
use super::connection::{Connection, Limits, Shared};
use super::peer::Peer;
use super::refresh::RefreshGate;
use crate::socket_path::RUN_DIR;

/// Longest path a `sockaddr_un` holds.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another op-bridge is already serving on {0}; stop it or choose another --socket")]
    AlreadyServing(PathBuf),
    #[error("refusing to replace {path}: it is {kind}, not a socket")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("socket path {0} is longer than {MAX_SOCKET_PATH} bytes")]
    PathTooLong(PathBuf),
    #[error(
        "refusing to replace {path}: it belongs to uid {owner}, and only root may decide whether another \
         uid's socket is stale; remove it or choose another --socket"
    )]
    ForeignSocket { path: PathBuf, owner: u32 },
    #[error("refusing to use socket directory {path}: {why}")]
    UnsafeDirectory { path: PathBuf, why: String },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

/// A bound socket that removes its file on drop, if the file is still this socket.
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BoundSocket {
    /// Removes the socket file if it is still this socket (not one another daemon put there).
    pub fn remove_file(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove_file();
    }
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a special file"
    }
}

/// Binds `path` owner-only, after checking what is there now.
pub fn bind(path: &Path) -> Result<BoundSocket, BindError> {
    bind_allowing(path, &[])
}

/// Creates op-bridge's own socket directory under `/run` (0700), or checks the one that is
/// there: a real directory, owned by us or root, writable by nobody else.
fn prepare_run_dir(dir: &Path) -> Result<(), BindError> {
    let unsafe_dir = |why: String| BindError::UnsafeDirectory { path: dir.to_path_buf(), why };
    match std::fs::symlink_metadata(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(dir).map_err(|source| BindError::Io {
                action: "create socket directory",
                path: dir.to_path_buf(),
                source,
            })?;
            Ok(())
        }
        Err(source) => Err(BindError::Io { action: "inspect socket directory", path: dir.to_path_buf(), source }),
        Ok(meta) if !meta.file_type().is_dir() => Err(unsafe_dir(format!("it is {}", file_kind(&meta)))),
        Ok(meta) if meta.uid() != nix::unistd::geteuid().as_raw() && meta.uid() != 0 => {
            Err(unsafe_dir(format!("it belongs to uid {}", meta.uid())))
        }
        Ok(meta) if meta.mode() & 0o022 != 0 => {
            Err(unsafe_dir(format!("it is writable by others (mode {:o})", meta.mode() & 0o7777)))
        }
        Ok(_) => Ok(()),
    }
}

/// Binds `path` owner-only and lets `allow_uids` connect too (see the module notes).
pub fn bind_allowing(path: &Path, allow_uids: &[u32]) -> Result<BoundSocket, BindError> {
    let io_err = |action, source| BindError::Io { action, path: path.to_path_buf(), source };
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(BindError::PathTooLong(path.to_path_buf()));
    }
    let managed_dir = path.parent().filter(|dir| *dir == Path::new(RUN_DIR));
    if let Some(dir) = managed_dir {
        prepare_run_dir(dir)?;
    }
    let own_uid = nix::unistd::geteuid().as_raw();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Only root can probe (and remove) another uid's socket for sure; a non-root
            // daemon would get EACCES, or remove a live server's file from under it.
            if meta.uid() != own_uid && own_uid != 0 {
                return Err(BindError::ForeignSocket { path: path.to_path_buf(), owner: meta.uid() });
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(BindError::AlreadyServing(path.to_path_buf())),
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), owner = meta.uid(), "removing stale socket");
                    std::fs::remove_file(path).map_err(|e| io_err("remove stale socket", e))?;
                }
                Err(err) => return Err(io_err("probe existing socket", err)),
            }
        }
        Ok(meta) => return Err(BindError::NotASocket { path: path.to_path_buf(), kind: file_kind(&meta) }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_err("inspect", err)),
    }
    // The umask makes the socket owner-only from the moment it exists; chmod afterwards
    // would leave a window where any local user could connect.
    let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old_mask);
    let listener = bound.map_err(|e| io_err("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| io_err("chmod", e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_err("inspect", e))?;
    let bound = BoundSocket { listener, path: path.to_path_buf(), identity: (meta.dev(), meta.ino()) };
    let others: Vec<u32> = allow_uids.iter().copied().filter(|&uid| uid != own_uid && uid != 0).collect();
    if !others.is_empty() {
        open_to(path, managed_dir, &others).map_err(|e| io_err("grant --allow-uid access to", e))?;
    }
    Ok(bound)
}

/// Lets `uids` connect to the socket (and search its managed directory) by ACL; where the
/// filesystem has no ACLs, the socket is made connectable by every uid instead (a WARN says
/// so) and the peer check alone keeps the others out.
fn open_to(path: &Path, managed_dir: Option<&Path>, uids: &[u32]) -> io::Result<()> {
    let granted = super::acl::grant_users(path, uids, super::acl::READ_WRITE).and_then(|()| match managed_dir {
        Some(dir) => super::acl::grant_users(dir, uids, super::acl::SEARCH),
        None => Ok(()),
    });
    match granted {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            tracing::warn!(
                path = %path.display(),
                "the filesystem has no POSIX ACLs: the socket is open to every uid for --allow-uid, \
                 and only the peer check refuses the uids that are not allowed"
            );
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
            if let Some(dir) = managed_dir {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
            }
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// Settings of the accept loop.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Uids allowed to connect besides op-bridge's own uid and root.
    pub allow_uids: Vec<u32>,
    pub max_connections: usize,
    pub limits: Limits,
    /// How long shutdown waits for open connections to finish.
    pub drain: Duration,
    /// Clients cause at most one resolution pass per this interval (REFRESH).
    pub refresh_min_interval: Duration,
    /// Bytes of framed values and replies in flight across all connections.
    pub max_inflight_bytes: usize,
}

/// Accepts connections until `shutdown`, then drains them (bounded by `drain`).
pub async fn serve(
    listener: &UnixListener,
    broker: Arc<Broker>,
    audit: Option<Arc<AuditLog>>,
    refresh: Arc<RefreshGate>,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    // The effective uid, as at bind and in the client's check of the server.
    let own_uid = nix::unistd::geteuid().as_raw();
    // Per-uid shares: the app's uid can never take the room root's health check needs.
    let connections = Shares::new(options.max_connections, own_uid, &options.allow_uids);
    let shared = Shared { budget: ByteBudget::new(options.max_inflight_bytes, own_uid, &options.allow_uids), refresh };
    let tracker = TaskTracker::new();
    let mut refusals = Throttled::default();
    let mut busy = Throttled::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = match Peer::of(&stream, audit.is_some()) {
            Ok(peer) => peer,
            Err(err) => {
                tracing::warn!("cannot read peer credentials: {err}");
                continue;
            }
        };
        if peer.uid != own_uid && peer.uid != 0 && !options.allow_uids.contains(&peer.uid) {
            if let Some(left_out) = refusals.allow() {
                tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "refused connection from a uid that is not allowed{}",
                    since(left_out, "refused")
                );
            }
            if let Some(audit) = &audit {
                audit.record(&peer, "CONNECT", None, "denied");
            }
            refuse(stream, format!("ERR permission denied: uid {} is not allowed\n", peer.uid));
            continue;
        }
        let Some(permit) = connections.try_take(peer.uid, 1) else {
            if let Some(left_out) = busy.allow() {
                tracing::warn!(
                    max = options.max_connections,
                    "connection limit reached; refusing a connection{}",
                    since(left_out, "turned away")
                );
            }
            refuse(stream, format!("ERR {}too many connections\n", crate::protocol::BUSY));
            continue;
        };
        let connection =
            Connection::new(stream, peer, broker.clone(), audit.clone(), options.limits.clone(), shared.clone());
        let cancel = shutdown.clone();
        tracker.spawn(async move {
            connection.run(cancel).await;
            drop(permit);
        });
    }
    if refusals.left_out > 0 {
        tracing::warn!("{} more refused connections from uids that are not allowed were not logged", refusals.left_out);
    }
    if busy.left_out > 0 {
        tracing::warn!("{} more connections turned away at the connection limit were not logged", busy.left_out);
    }
    tracker.close();
    if tokio::time::timeout(options.drain, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "connections still open after the drain period; closing them");
    }
}

/// How often a WARN that a flood repeats may be written.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A WARN that a flood of connections could repeat without end, written at most once per
/// [`WARN_EVERY`] so that the log keeps its real lines; the occurrences left out are counted
/// on the next line written, and at the end of the accept loop.
#[derive(Default)]
struct Throttled {
    last: Option<tokio::time::Instant>,
    left_out: u64,
}

impl Throttled {
    /// Whether a line may be written now: then the number left out before it.
    fn allow(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < WARN_EVERY) {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

fn since(left_out: u64, what: &str) -> String {
    match left_out {
        0 => String::new(),
        n => format!(" ({n} more {what} since the last line)"),
    }
}

/// Answers a refused connection without letting a slow peer hold the accept loop.
fn refuse(mut stream: UnixStream, message: String) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(message.as_bytes())).await;
    });
}
