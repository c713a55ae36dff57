//! The default socket path, the same for servers and clients (DESIGN §2): `OP_BRIDGE_SOCKET`
//! (handled by clap), else `$XDG_RUNTIME_DIR/op-bridge.sock`, else
//! `/run/op-bridge/op-bridge.sock` in a directory op-bridge creates owner-only, and
//! `/tmp/op-bridge.sock` only when `/run` is not writable. `/tmp` is the last resort because
//! any uid can create a file there first and wait for a client.

use std::path::{Path, PathBuf};

/// The directory op-bridge creates (mode 0700) for its socket under `/run`.
pub const RUN_DIR: &str = "/run/op-bridge";
/// The socket in [`RUN_DIR`].
pub const RUN_SOCKET: &str = "/run/op-bridge/op-bridge.sock";
/// Used only when `/run` cannot hold [`RUN_DIR`].
pub const LAST_RESORT: &str = "/tmp/op-bridge.sock";
/// The socket's file name under `$XDG_RUNTIME_DIR`.
const XDG_NAME: &str = "op-bridge.sock";

fn xdg_socket() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    (dir.is_absolute() && dir.is_dir()).then(|| dir.join(XDG_NAME))
}

fn writable(path: &str) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK).is_ok()
}

/// Where a server binds when no `--socket` is given.
pub fn default_for_server() -> PathBuf {
    if let Some(path) = xdg_socket() {
        return path;
    }
    if Path::new(RUN_DIR).is_dir() || writable("/run") {
        return PathBuf::from(RUN_SOCKET);
    }
    PathBuf::from(LAST_RESORT)
}

/// Where a client connects when no `--socket` is given: the server's choice, seen from a
/// process that may not be allowed to write `/run` itself.
pub fn default_for_client() -> PathBuf {
    if let Some(path) = xdg_socket() {
        return path;
    }
    // `/run/op-bridge` may be closed to this uid (0700); its existence is still visible.
    if std::fs::symlink_metadata(RUN_DIR).is_ok() {
        return PathBuf::from(RUN_SOCKET);
    }
    if std::fs::symlink_metadata(LAST_RESORT).is_ok() {
        return PathBuf::from(LAST_RESORT);
    }
    PathBuf::from(RUN_SOCKET)
}
