//! Privilege separation, the gosu/su-exec pattern built into the init: who the supervised
//! command (`run --user`) and the `op` processes (`--op-user`) run as, the socket handed to
//! that user, and the start-up check that `op` is execute-only when nothing else separates
//! it from the command.
//!
//! Users and groups are looked up in `/etc/passwd` and `/etc/group` directly, as gosu does,
//! not through NSS: the image's binary is statically linked, where glibc's `getpwnam` would
//! need shared NSS modules at run time. A `USER[:GROUP]` gets initgroups semantics (its
//! primary group plus every group in `/etc/group` that lists it) and `HOME` from its passwd
//! entry, `/` when it has none. op-bridge itself keeps its own identity; only the command's
//! process drops to the user, between fork and exec.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const PASSWD: &str = "/etc/passwd";
pub const GROUP: &str = "/etc/group";

/// Why a user could not be resolved or the socket could not be handed to it.
#[derive(Debug, thiserror::Error)]
pub enum PrivsepError {
    #[error("invalid user '{0}' (expected USER[:GROUP], names or numbers)")]
    Invalid(String),
    #[error("no user '{0}' in {PASSWD}")]
    UnknownUser(String),
    #[error("no group '{0}' in {GROUP}")]
    UnknownGroup(String),
    #[error("cannot read {path}: {source}")]
    Read { path: &'static str, source: io::Error },
    #[error("running as uid {uid} needs op-bridge to run as root (it runs as uid {ours})")]
    NotRoot { uid: u32, ours: u32 },
    #[error("cannot give uid {uid} the socket {path}: {source}")]
    Socket { path: PathBuf, uid: u32, source: io::Error },
    #[error(
        "uid {uid} cannot reach the socket {socket}: directory {dir} is not searchable by it \
         (choose a --socket in a directory that user can reach)"
    )]
    Unreachable { socket: PathBuf, dir: PathBuf, uid: u32 },
}

/// A resolved `USER[:GROUP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included), set with setgroups.
    pub groups: Vec<u32>,
    pub home: PathBuf,
    /// No group was given and the uid has no passwd entry: the gid is op-bridge's own, as
    /// with gosu and `docker run --user`.
    pub gid_defaulted: bool,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// `name:password:uid:gid:gecos:home:shell` lines; comments, NIS `+`/`-` lines and
/// malformed lines are skipped, as libc does.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0].is_empty() || fields[0].starts_with(['#', '+', '-']) {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

/// `name:password:gid:member,member` lines.
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || fields[0].is_empty() || fields[0].starts_with(['#', '+', '-']) {
            return None;
        }
        let members = fields[3].split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
        Some(GroupEntry { name: fields[0], gid: fields[2].parse().ok()?, members })
    })
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

impl Identity {
    /// Resolves `USER[:GROUP]` against the texts of `/etc/passwd` and `/etc/group`. A name
    /// is looked up first, then a number (which need not have an entry). `default_gid` is
    /// the group of a bare uid that has no passwd entry.
    pub fn resolve_in(spec: &str, passwd: &str, group: &str, default_gid: u32) -> Result<Identity, PrivsepError> {
        let (user, group_arg) = match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        };
        if user.is_empty() || group_arg.is_some_and(str::is_empty) {
            return Err(PrivsepError::Invalid(spec.to_string()));
        }
        let entry = match passwd_entries(passwd).find(|e| e.name == user) {
            Some(entry) => Some(entry),
            None if is_number(user) => {
                let uid: u32 = user.parse().map_err(|_| PrivsepError::Invalid(spec.to_string()))?;
                passwd_entries(passwd).find(|e| e.uid == uid)
            }
            None => return Err(PrivsepError::UnknownUser(user.to_string())),
        };
        let uid = match &entry {
            Some(entry) => entry.uid,
            None => user.parse().map_err(|_| PrivsepError::Invalid(spec.to_string()))?,
        };
        let gid = match group_arg {
            Some(name) => match group_entries(group).find(|g| g.name == name) {
                Some(found) => found.gid,
                None if is_number(name) => name.parse().map_err(|_| PrivsepError::Invalid(spec.to_string()))?,
                None => return Err(PrivsepError::UnknownGroup(name.to_string())),
            },
            None => entry.as_ref().map_or(default_gid, |e| e.gid),
        };
        // initgroups(name, gid): the primary group, then every group listing the name.
        let mut groups = vec![gid];
        if let Some(entry) = &entry {
            for found in group_entries(group).filter(|g| g.members.contains(&entry.name)) {
                if !groups.contains(&found.gid) {
                    groups.push(found.gid);
                }
            }
        }
        let home = match &entry {
            Some(entry) if !entry.home.is_empty() => PathBuf::from(entry.home),
            _ => PathBuf::from("/"),
        };
        Ok(Identity { uid, gid, groups, home, gid_defaulted: group_arg.is_none() && entry.is_none() })
    }

    /// Resolves `USER[:GROUP]` against this system's files.
    pub fn resolve(spec: &str) -> Result<Identity, PrivsepError> {
        let read = |path: &'static str| match std::fs::read_to_string(path) {
            Ok(text) => Ok(text),
            // A minimal image may have no group file; numbers still work.
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(PrivsepError::Read { path, source }),
        };
        Identity::resolve_in(spec, &read(PASSWD)?, &read(GROUP)?, nix::unistd::getgid().as_raw())
    }

    /// Whether op-bridge already runs as this uid: then there is nothing to switch, as under
    /// Kubernetes `runAsUser` or `docker run --user` with an image whose entrypoint says
    /// `--user node`, whatever group the platform chose.
    pub fn is_current(&self) -> bool {
        nix::unistd::getuid().as_raw() == self.uid
    }
}

/// The clap value parser of `--user` and `--op-user`: the shape only. Names are looked up
/// when the broker starts ([`resolve_user`]), so parsing a command line never depends on the
/// machine it is parsed on.
pub fn check_user_spec(spec: &str) -> Result<String, String> {
    let (user, group) = spec.split_once(':').unwrap_or((spec, "x"));
    if user.is_empty() || group.is_empty() || group.contains(':') {
        return Err(PrivsepError::Invalid(spec.to_string()).to_string());
    }
    Ok(spec.to_string())
}

/// Resolves `--user`/`--op-user` on this system: an unknown user or group, or a switch
/// op-bridge has not the privilege for, is a usage error (exit 2).
pub fn resolve_user(spec: &str) -> Result<Identity, String> {
    let identity = Identity::resolve(spec).map_err(|e| e.to_string())?;
    let ours = nix::unistd::getuid().as_raw();
    if ours != 0 && !identity.is_current() {
        return Err(PrivsepError::NotRoot { uid: identity.uid, ours }.to_string());
    }
    Ok(identity)
}

/// The credentials the command's process switches to between fork and exec, prepared before
/// the fork so that the switch itself allocates nothing.
#[derive(Debug, Clone)]
pub struct Switch {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    /// no_new_privs and an empty capability bounding set (`--allow-privilege-gain` clears it):
    /// a setuid binary in the image cannot give the command back what the switch took.
    lock: bool,
}

/// The highest capability number a kernel may know; dropping an unknown one fails with
/// EINVAL, which is harmless.
const LAST_CAPABILITY: libc::c_ulong = 63;

impl Switch {
    /// None when op-bridge is not root: [`resolve_user`] then only let through its own uid,
    /// and the command simply keeps op-bridge's identity.
    pub fn to(identity: &Identity, lock: bool) -> Option<Switch> {
        (nix::unistd::getuid().as_raw() == 0).then(|| Switch {
            uid: identity.uid,
            gid: identity.gid,
            groups: identity.groups.clone(),
            lock,
        })
    }

    /// The bounding set first (dropping needs CAP_SETPCAP, which the switch gives up), then
    /// groups, the gid and the uid (after setuid the others are no longer permitted), then
    /// no_new_privs. Runs in the child after fork; only async-signal-safe system calls.
    pub fn apply(&self) -> io::Result<()> {
        // SAFETY: plain system calls on the current process; `groups` outlives the call.
        unsafe {
            if self.lock {
                for capability in 0..=LAST_CAPABILITY {
                    if libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) != 0
                        && *libc::__errno_location() != libc::EINVAL
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if self.lock && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The user a permission check is made for.
struct Checked<'a> {
    uid: u32,
    gid: u32,
    groups: &'a [u32],
}

impl Checked<'_> {
    /// The permission bits (r=4, w=2, x=1) that apply to this user, by the classic owner /
    /// group / other rule. Root is not checked here (it passes every read and search).
    fn bits(&self, meta: &std::fs::Metadata) -> u32 {
        let mode = meta.permissions().mode();
        if meta.uid() == self.uid {
            (mode >> 6) & 7
        } else if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        }
    }

    fn can_read(&self, meta: &std::fs::Metadata) -> bool {
        self.uid == 0 || self.bits(meta) & 4 != 0
    }

    fn can_search(&self, meta: &std::fs::Metadata) -> bool {
        self.uid == 0 || self.bits(meta) & 1 != 0
    }
}

/// Hands the bound socket to `user`: the socket file becomes theirs (mode 0600 stays, so
/// nobody else gets through the file permissions), and every directory above it must let
/// them search. The socket's own directory is opened to their group (search only, 0710)
/// when op-bridge owns it and searching it exposes nothing but the socket (every other
/// entry is owner-only) — the private directory op-bridge creates for it. Any other
/// directory (a home directory, say) is left alone and reported.
pub fn grant_socket(socket: &Path, user: &Identity) -> Result<(), PrivsepError> {
    if user.is_current() {
        return Ok(()); // the socket is theirs already
    }
    let socket_err = |source| PrivsepError::Socket { path: socket.to_path_buf(), uid: user.uid, source };
    // lchown: never follow a link someone may have put in the socket's place.
    std::os::unix::fs::lchown(socket, Some(user.uid), Some(user.gid)).map_err(socket_err)?;
    let checked = Checked { uid: user.uid, gid: user.gid, groups: &user.groups };
    let parent = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let parent = std::fs::canonicalize(parent).map_err(socket_err)?;
    let mut open_parent = false;
    for dir in parent.ancestors() {
        let meta = std::fs::metadata(dir).map_err(socket_err)?;
        if checked.can_search(&meta) {
            continue;
        }
        if dir != parent || meta.uid() != nix::unistd::getuid().as_raw() || !exposes_only(dir, socket.file_name()) {
            return Err(PrivsepError::Unreachable {
                socket: socket.to_path_buf(),
                dir: dir.to_path_buf(),
                uid: user.uid,
            });
        }
        open_parent = true;
    }
    // Only once every directory above is known to be searchable: a refused start changes nothing.
    if open_parent {
        std::os::unix::fs::chown(&parent, None, Some(user.gid)).map_err(socket_err)?;
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o710)).map_err(socket_err)?;
        tracing::info!(dir = %parent.display(), gid = user.gid, "socket directory opened to the command's group (search only, 0710)");
    }
    Ok(())
}

/// Whether search permission on `dir` would give access to nothing but the entry `name`:
/// every other entry is owner-only (a symlink, mode 0777, never is).
fn exposes_only(dir: &Path, name: Option<&OsStr>) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.into_iter().all(|entry| {
        entry.is_ok_and(|entry| {
            Some(entry.file_name().as_os_str()) == name
                || entry.metadata().is_ok_and(|meta| meta.permissions().mode() & 0o077 == 0)
        })
    })
}

/// Whether a process of `uid` (primary group `gid`, supplementary `groups`) could read the
/// file at `path`: every directory above it searchable and the file readable to it. A path
/// that cannot be examined counts as not readable.
pub fn readable_by(path: &Path, uid: u32, gid: u32, groups: &[u32]) -> bool {
    let checked = Checked { uid, gid, groups };
    let Ok(meta) = std::fs::metadata(path) else { return false };
    checked.can_read(&meta)
        && path
            .ancestors()
            .skip(1)
            .filter(|dir| !dir.as_os_str().is_empty())
            .all(|dir| std::fs::metadata(dir).is_ok_and(|meta| checked.can_search(&meta)))
}

/// The first path through which `app` could replace `op` at `path`: the file itself, or a
/// directory above it (on the path as given, and on the path its links resolve to) that the
/// app may write. A sticky directory (`/tmp`) lets nobody replace another user's entry, so
/// only the entry below it counts.
pub fn op_replaceable_by(path: &Path, app: &Identity) -> Option<PathBuf> {
    if app.uid == 0 {
        return None;
    }
    let checked = Checked { uid: app.uid, gid: app.gid, groups: &app.groups };
    let writable = |meta: &std::fs::Metadata| meta.uid() == app.uid || checked.bits(meta) & 2 != 0;
    let mut paths = vec![path.to_path_buf()];
    if let Ok(real) = std::fs::canonicalize(path)
        && real != path
    {
        paths.push(real);
    }
    for candidate in &paths {
        for (depth, step) in candidate.ancestors().enumerate() {
            let Ok(meta) = std::fs::symlink_metadata(step) else { continue };
            let sticky = meta.permissions().mode() & 0o1000 != 0;
            if writable(&meta) && !(depth > 0 && sticky && meta.uid() != app.uid) {
                return Some(step.to_path_buf());
            }
        }
    }
    None
}

/// The start-up check of `run --user`: says once, at WARN, when the app's uid could replace
/// the `op` that op-bridge runs with the token.
pub fn warn_if_op_replaceable(op_path: &Path, app: &Identity) {
    if let Some(weak) = op_replaceable_by(op_path, app) {
        tracing::warn!(
            op = %op_path.display(),
            "{} is writable by uid {}, the command's uid: the command could replace op, which runs with              the 1Password token. Install op and its directories owned by root and not writable by others",
            weak.display(),
            app.uid
        );
    }
}

/// What the start-up check found about the `op` binary.
#[derive(Debug, PartialEq, Eq)]
pub enum OpExposure {
    /// `op` runs under a uid the command does not have, or is unreadable to it.
    Closed,
    /// `op` runs as the command's uid and that uid can read it: each `op` process stays
    /// dumpable, so the command can read its environment (the token).
    Readable,
    /// The command runs as root, which reads every process's environment.
    Root,
}

/// Classifies `op` at `path` when `op` runs as `op_uid` (with `op_gid`, `op_groups`) and the
/// command as `child_uid`. The kernel marks a process non-dumpable when its executable was
/// not readable to it at exec; only then is `/proc/<pid>/environ` closed to the same uid.
pub fn op_exposure(path: &Path, op_uid: u32, op_gid: u32, op_groups: &[u32], child_uid: u32) -> io::Result<OpExposure> {
    if child_uid == 0 {
        return Ok(OpExposure::Root);
    }
    if op_uid != child_uid {
        return Ok(OpExposure::Closed);
    }
    let meta = std::fs::metadata(path)?;
    let checked = Checked { uid: op_uid, gid: op_gid, groups: op_groups };
    Ok(if checked.can_read(&meta) { OpExposure::Readable } else { OpExposure::Closed })
}

/// The start-up check of `run`: says once, at WARN, when the command can read the
/// environment of the `op` processes, with the fix. `op_user` is the (uid, gid) of
/// `--op-user`, `child_uid` the uid of `--user`; either absent means op-bridge's own.
pub fn warn_if_op_exposed(op_path: &Path, op_user: Option<(u32, u32)>, child_uid: Option<u32>) {
    let ours = nix::unistd::getuid().as_raw();
    let (op_uid, op_gid, op_groups) = match op_user {
        // std's Command::uid() clears the supplementary groups.
        Some((uid, gid)) => (uid, gid, vec![gid]),
        None => (
            ours,
            nix::unistd::getgid().as_raw(),
            nix::unistd::getgroups().unwrap_or_default().into_iter().map(|g| g.as_raw()).collect(),
        ),
    };
    let child_uid = child_uid.unwrap_or(ours);
    match op_exposure(op_path, op_uid, op_gid, &op_groups, child_uid) {
        Ok(OpExposure::Closed) => {}
        Ok(OpExposure::Readable) => tracing::warn!(
            op = %op_path.display(),
            "op runs as uid {op_uid}, the command's uid, and is readable by it: the command can read the \
             1Password token from /proc/<op pid>/environ. Install op execute-only, owned by root: \
             chmod 0111 {path} && chown root:root {path} (or run op-bridge as root with --user)",
            path = op_path.display()
        ),
        Ok(OpExposure::Root) => tracing::warn!(
            "the command runs as root and can read every process's environment, op's 1Password token \
             included: run it as its own user with --user USER"
        ),
        Err(err) => tracing::warn!(op = %op_path.display(), "cannot check the mode of op: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        node:x:1000:1000::/home/node:/bin/sh\n\
        broken line\n\
        svc:x:1001:1001::/srv/svc:/usr/sbin/nologin\n\
        nohome:x:1002:1002:::/bin/sh\n\
        +nis::::::\n";
    const GROUP_TEXT: &str = "root:x:0:\n\
        node:x:1000:\n\
        svc:x:1001:\n\
        docker:x:999:svc,node\n\
        audio:x:29: node , other\n\
        unrelated:x:50:svc\n";

    fn resolve(spec: &str) -> Result<Identity, PrivsepError> {
        Identity::resolve_in(spec, PASSWD_TEXT, GROUP_TEXT, 77)
    }

    #[test]
    fn a_name_gets_its_entry_groups_and_home() {
        let node = resolve("node").unwrap();
        assert_eq!((node.uid, node.gid, node.home.as_path()), (1000, 1000, Path::new("/home/node")));
        assert_eq!(node.groups, vec![1000, 999, 29]);
        assert!(!node.gid_defaulted);
    }

    #[test]
    fn a_number_with_an_entry_is_that_user() {
        let svc = resolve("1001").unwrap();
        assert_eq!((svc.uid, svc.gid), (1001, 1001));
        assert_eq!(svc.groups, vec![1001, 999, 50]);
        assert_eq!(svc.home, Path::new("/srv/svc"));
    }

    #[test]
    fn a_number_without_an_entry_gets_the_default_group_and_root_home() {
        let bare = resolve("4242").unwrap();
        assert_eq!((bare.uid, bare.gid, bare.groups.clone()), (4242, 77, vec![77]));
        assert_eq!(bare.home, Path::new("/"));
        assert!(bare.gid_defaulted);
        let both = resolve("4242:4343").unwrap();
        assert_eq!((both.uid, both.gid, both.groups), (4242, 4343, vec![4343]));
        assert!(!both.gid_defaulted);
    }

    #[test]
    fn an_explicit_group_replaces_the_primary_one_and_keeps_memberships() {
        let node = resolve("node:docker").unwrap();
        assert_eq!((node.uid, node.gid), (1000, 999));
        assert_eq!(node.groups, vec![999, 29]);
        let numeric = resolve("1000:1000").unwrap();
        assert_eq!((numeric.uid, numeric.gid), (1000, 1000));
        assert_eq!(numeric.groups, vec![1000, 999, 29]);
    }

    #[test]
    fn an_empty_home_is_root() {
        assert_eq!(resolve("nohome").unwrap().home, Path::new("/"));
    }

    #[test]
    fn unknown_or_malformed_specs_are_refused() {
        assert!(matches!(resolve("nobody-here"), Err(PrivsepError::UnknownUser(u)) if u == "nobody-here"));
        assert!(matches!(resolve("node:nogroup"), Err(PrivsepError::UnknownGroup(g)) if g == "nogroup"));
        for bad in ["", ":", "node:", ":node", "99999999999"] {
            assert!(resolve(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(resolve("+nis"), Err(PrivsepError::UnknownUser(_))));
    }

    #[test]
    fn the_command_line_checks_only_the_shape() {
        for good in ["node", "1000", "1000:1000", "node:docker", "nobody-on-this-host"] {
            assert_eq!(check_user_spec(good).as_deref(), Ok(good));
        }
        for bad in ["", ":", "node:", ":node", "a:b:c"] {
            assert!(check_user_spec(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn meta_with_mode(dir: &Path, name: &str, mode: u32) -> std::fs::Metadata {
        let path = dir.join(name);
        std::fs::write(&path, b"x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::fs::metadata(&path).unwrap()
    }

    #[test]
    fn exposure_follows_uid_and_read_permission() {
        let dir = std::env::temp_dir().join(format!("opb-privsep-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let readable = dir.join("readable");
        let execute_only = dir.join("execute-only");
        meta_with_mode(&dir, "readable", 0o755);
        meta_with_mode(&dir, "execute-only", 0o111);
        let owner = std::fs::metadata(&readable).unwrap().uid();
        let other = if owner == 4242 { 4343 } else { 4242 };

        assert_eq!(op_exposure(&readable, other, other, &[], other).unwrap(), OpExposure::Readable);
        assert_eq!(op_exposure(&execute_only, other, other, &[], other).unwrap(), OpExposure::Closed);
        // op under another uid than the command: the command cannot read its environ.
        assert_eq!(op_exposure(&readable, 0, 0, &[], other).unwrap(), OpExposure::Closed);
        assert_eq!(op_exposure(&execute_only, 0, 0, &[], 0).unwrap(), OpExposure::Root);
        assert!(op_exposure(&dir.join("missing"), other, other, &[], other).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn permission_bits_pick_owner_group_or_other() {
        let dir = std::env::temp_dir().join(format!("opb-privsep-bits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let meta = meta_with_mode(&dir, "f", 0o741);
        let (uid, gid) = (meta.uid(), meta.gid());
        let stranger = uid.wrapping_add(4242);
        assert_eq!(Checked { uid, gid, groups: &[] }.bits(&meta), 7);
        assert_eq!(Checked { uid: stranger, gid, groups: &[] }.bits(&meta), 4);
        assert_eq!(Checked { uid: stranger, gid: stranger, groups: &[gid] }.bits(&meta), 4);
        assert_eq!(Checked { uid: stranger, gid: stranger, groups: &[] }.bits(&meta), 1);
        assert!(!Checked { uid: stranger, gid: stranger, groups: &[] }.can_read(&meta));
        assert!(Checked { uid: 0, gid: stranger, groups: &[] }.can_read(&meta));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
