//! File-system helpers every layer may use: writing a file atomically (vault files, the
//! sealed cache). Watched credential files, which are the app's, go through [`crate::fsops`].

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Replaces `path` with `bytes` atomically: temporary file beside it, fsync, rename. The new
/// file keeps the old file's mode, or gets `mode` (default 0600) when there was none. Run as
/// root (`run --user`), it also keeps the old file's owner, or takes the directory's: the
/// app's credential file must stay the app's.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).ok().or(mode).unwrap_or(0o600);
    // privsep: the owner the file keeps (only root can give a file away).
    let owner = if nix::unistd::getuid().is_root() {
        std::fs::symlink_metadata(path).or_else(|_| std::fs::metadata(dir)).ok().map(|m| (m.uid(), m.gid()))
    } else {
        None
    };
    let tmp = dir.join(format!(".{name}.op-bridge-{}-{}", std::process::id(), fastrand::u64(..)));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
