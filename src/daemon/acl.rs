//! POSIX access ACLs (the `system.posix_acl_access` extended attribute, as `setfacl -m
//! u:UID:rw` writes it), so that `--allow-uid` uids can reach an owner-only socket without
//! opening it to anyone else. The SO_PEERCRED check at accept stays the authority; the ACL
//! only lets the kernel deliver the connection.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const XATTR: &[u8] = b"system.posix_acl_access\0";
const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

/// Read, write, execute bits of an ACL entry.
pub const READ_WRITE: u16 = 0o6;
pub const SEARCH: u16 = 0o1;

/// Grants `perm` to each of `uids` on `path`, keeping the owner/group/other bits of its mode.
/// Fails with `Unsupported` where the filesystem has no POSIX ACLs.
pub fn grant_users(path: &Path, uids: &[u32], perm: u16) -> io::Result<()> {
    let mode = std::fs::symlink_metadata(path)?.mode();
    let bits = |shift: u32| ((mode >> shift) & 0o7) as u16;
    let mut users: Vec<u32> = uids.to_vec();
    users.sort_unstable();
    users.dedup();
    let mut entries = vec![(USER_OBJ, bits(6), UNDEFINED_ID)];
    entries.extend(users.iter().map(|&uid| (USER, perm, uid)));
    entries.push((GROUP_OBJ, bits(3), UNDEFINED_ID));
    // The mask caps every named entry; it must let `perm` through.
    entries.push((MASK, bits(3) | perm, UNDEFINED_ID));
    entries.push((OTHER, bits(0), UNDEFINED_ID));
    let mut value = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        value.extend_from_slice(&tag.to_le_bytes());
        value.extend_from_slice(&perm.to_le_bytes());
        value.extend_from_slice(&id.to_le_bytes());
    }
    let mut c_path = path.as_os_str().as_bytes().to_vec();
    if c_path.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    c_path.push(0);
    // SAFETY: both names are NUL-terminated and `value` is valid for its length.
    let rc = unsafe {
        libc::lsetxattr(c_path.as_ptr().cast(), XATTR.as_ptr().cast(), value.as_ptr().cast(), value.len(), 0)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
