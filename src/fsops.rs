//! Operations on the app's watched files, done with the app's hands: the [`Deputy`] thread
//! that performs them, and the no-follow opens, reads and atomic replacements it runs.
//!
//! A watched credential file belongs to the supervised app, and the app can rename, link or
//! replace anything in its own directories at any moment. So op-bridge never follows a
//! symbolic link there, and under `run --user` it never reads or writes a file the app could
//! not: every operation runs on one dedicated thread whose filesystem credentials (fsuid,
//! fsgid, supplementary groups; per thread in Linux) are the app's, which also drops the
//! thread's capabilities that would bypass file permissions. The directory of a watched file
//! is opened component by component from `/` with `O_NOFOLLOW` (a directory the app swapped
//! for a symlink is refused, not entered), the file itself with `O_NOFOLLOW | O_NONBLOCK`
//! (a FIFO cannot stall the open), and its type is checked on the opened descriptor: only a
//! regular file is read. Replacing a file writes a temporary file in the same opened
//! directory, made by the app's uid (mode 0600 unless the old file had another), fsyncs it
//! and `renameat`s it into place. The thread keeps all of this off the async workers.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use zeroize::Zeroizing;

use crate::locked::extend_zeroizing;

/// Whose filesystem credentials the deputy thread takes: the app's (`run --user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
}

/// Why a watched file was not read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "{path} is a symbolic link (to {target}); op-bridge does not follow links at a watched path \
         (watch the file itself: --watch {target}=…)"
    )]
    Symlink { path: PathBuf, target: String },
    #[error("{path} is not a regular file (it is a {kind}); refused, not read or written")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{dir} is not a directory op-bridge may enter: {component} is a symbolic link or not a directory")]
    DirectoryLink { dir: PathBuf, component: PathBuf },
    #[error("{path} is larger than {max} bytes; not written back")]
    TooLarge { path: PathBuf, max: usize },
    #[error("{path} changed while being read")]
    Changed { path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the file worker thread is gone")]
    DeputyGone,
}

impl FileError {
    /// A refusal (link, FIFO, device, symlinked directory): retrying changes nothing until
    /// the path changes again.
    pub fn is_refusal(&self) -> bool {
        matches!(self, FileError::Symlink { .. } | FileError::NotRegular { .. } | FileError::DirectoryLink { .. })
    }

    fn io(action: &'static str, path: &Path, source: impl Into<std::io::Error>) -> FileError {
        FileError::Io { action, path: path.to_path_buf(), source: source.into() }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread that does every watched-file operation, with the app's filesystem
/// credentials when an [`Owner`] is given. Dropping the last clone ends the thread.
#[derive(Clone)]
pub struct Deputy {
    jobs_tx: std::sync::mpsc::Sender<Job>,
}

impl Deputy {
    /// Starts the thread and, with `owner`, switches its filesystem credentials; fails when
    /// the switch did not take.
    pub fn start(owner: Option<Owner>) -> Result<Deputy, String> {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("op-bridge-files".into())
            .spawn(move || {
                let assumed = owner.as_ref().map_or(Ok(()), assume);
                let ok = assumed.is_ok();
                let _ = ready_tx.send(assumed);
                if ok {
                    while let Ok(job) = jobs_rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|e| format!("cannot start the file worker thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Deputy { jobs_tx }),
            Ok(Err(err)) => Err(format!("cannot take the app's file permissions for watched files: {err}")),
            Err(_) => Err("the file worker thread died at start".into()),
        }
    }

    /// Runs `job` on the deputy thread; None when the thread is gone (a job panicked).
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done_tx.send(job());
        });
        self.jobs_tx.send(job).ok()?;
        done_rx.await.ok()
    }
}

/// Gives the calling thread `owner`'s filesystem identity. Raw syscalls on purpose: Linux
/// keeps credentials per thread, and glibc's `setgroups` would change every thread of the
/// process. Moving the fsuid away from 0 clears the thread's file capabilities
/// (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_CHOWN…), so the kernel checks
/// permissions exactly as for the app.
fn assume(owner: &Owner) -> std::io::Result<()> {
    // SAFETY: setgroups(2) reads `groups.len()` gids from a live slice.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, owner.groups.len(), owner.groups.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: setfsgid/setfsuid take an id by value. They return the previous id and never
    // an error, so each is read back (an invalid id, -1, changes nothing and returns it).
    let (gid, uid) = unsafe {
        libc::syscall(libc::SYS_setfsgid, owner.gid);
        libc::syscall(libc::SYS_setfsuid, owner.uid);
        (libc::syscall(libc::SYS_setfsgid, u32::MAX), libc::syscall(libc::SYS_setfsuid, u32::MAX))
    };
    if (uid, gid) != (i64::from(owner.uid), i64::from(owner.gid)) {
        return Err(std::io::Error::other(format!("filesystem ids are {uid}:{gid}, not {}:{}", owner.uid, owner.gid)));
    }
    // A change of fsuid resets the process's dumpable flag to fs.suid_dumpable, which a host
    // may have set to 1: clear it again (hardening's promise holds for the whole process).
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)
}

fn kind_of(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symbolic link",
        _ => "special file",
    }
}

fn is_type(mode: u32, kind: SFlag) -> bool {
    mode & SFlag::S_IFMT.bits() == kind.bits()
}

/// Opens the absolute directory `dir` from `/`, one component at a time, refusing any
/// component that is a symbolic link or not a directory.
pub fn open_dir(dir: &Path) -> Result<OwnedFd, FileError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd = nix::fcntl::open("/", flags, Mode::empty()).map_err(|e| FileError::io("open", Path::new("/"), e))?;
    let mut walked = PathBuf::from("/");
    for component in dir.components() {
        match component {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => {
                walked.push(name);
                let refused = || FileError::DirectoryLink { dir: dir.to_path_buf(), component: walked.clone() };
                let next = match nix::fcntl::openat(&fd, name, flags, Mode::empty()) {
                    Ok(next) => next,
                    Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => return Err(refused()),
                    Err(err) => return Err(FileError::io("open", &walked, err)),
                };
                // O_PATH|O_NOFOLLOW may hand back the link itself rather than fail.
                let stat = nix::sys::stat::fstat(&next).map_err(|e| FileError::io("stat", &walked, e))?;
                if !is_type(stat.st_mode, SFlag::S_IFDIR) {
                    return Err(refused());
                }
                fd = next;
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(FileError::DirectoryLink { dir: dir.to_path_buf(), component: walked });
            }
        }
    }
    Ok(fd)
}

/// `path`'s directory and file name.
fn split(path: &Path) -> Result<(&Path, &OsStr), FileError> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if dir.is_absolute() => Ok((dir, name)),
        _ => Err(FileError::io("open", path, std::io::Error::other("not an absolute file path"))),
    }
}

/// What is at `name` in `dir`, without following a link: None when nothing is.
fn lstat_at(dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<Option<nix::sys::stat::FileStat>, FileError> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(err) => Err(FileError::io("stat", path, err)),
    }
}

/// Refuses anything at `path` that is not a regular file (a link names its target).
fn check_regular(dir: &OwnedFd, name: &OsStr, path: &Path, mode: u32) -> Result<(), FileError> {
    if is_type(mode, SFlag::S_IFLNK) {
        let target = nix::fcntl::readlinkat(dir, name).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
        return Err(FileError::Symlink { path: path.to_path_buf(), target });
    }
    if !is_type(mode, SFlag::S_IFREG) {
        return Err(FileError::NotRegular { path: path.to_path_buf(), kind: kind_of(mode) });
    }
    Ok(())
}

/// Reads the whole regular file at the absolute `path` (at most `max` bytes) if it is
/// stable; None when it does not exist. Never follows a link, never blocks on a FIFO.
pub fn read_regular(path: &Path, max: usize) -> Result<Option<Zeroizing<Vec<u8>>>, FileError> {
    let (dir_path, name) = split(path)?;
    let dir = match open_dir(dir_path) {
        Ok(dir) => dir,
        Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let Some(before) = lstat_at(&dir, name, path)? else { return Ok(None) };
    check_regular(&dir, name, path, before.st_mode)?;
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let fd = match nix::fcntl::openat(&dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        // Swapped between the stat and the open: a link (ELOOP) or a socket (ENXIO).
        Err(nix::errno::Errno::ELOOP) => {
            return Err(FileError::Symlink { path: path.to_path_buf(), target: String::new() });
        }
        Err(nix::errno::Errno::ENXIO) => {
            return Err(FileError::NotRegular { path: path.to_path_buf(), kind: "socket" });
        }
        Err(err) => return Err(FileError::io("open", path, err)),
    };
    let mut file = std::fs::File::from(fd);
    let opened = file.metadata().map_err(|e| FileError::io("stat", path, e))?;
    check_regular(&dir, name, path, opened.mode())?;
    if opened.len() > max as u64 {
        return Err(FileError::TooLarge { path: path.to_path_buf(), max });
    }
    let mut content = Zeroizing::new(Vec::with_capacity(opened.len() as usize));
    let mut chunk = Zeroizing::new([0u8; 16 * 1024]);
    loop {
        match file.read(&mut chunk[..]) {
            Ok(0) => break,
            Ok(n) if content.len() + n <= max => extend_zeroizing(&mut content, &chunk[..n]),
            Ok(_) => return Err(FileError::TooLarge { path: path.to_path_buf(), max }),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(FileError::io("read", path, err)),
        }
    }
    let after = file.metadata().map_err(|e| FileError::io("stat", path, e))?;
    let identity = |m: &std::fs::Metadata| (m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.dev());
    // The name must still be this file, unchanged, and wholly read.
    let named = lstat_at(&dir, name, path)?.map(|s| (s.st_ino, s.st_dev));
    if identity(&opened) != identity(&after)
        || content.len() as u64 != after.len()
        || (before.st_ino, before.st_dev) != (opened.ino(), opened.dev())
        || named != Some((after.ino(), after.dev()))
    {
        return Err(FileError::Changed { path: path.to_path_buf() });
    }
    Ok(Some(content))
}

/// Replaces the regular file at the absolute `path` with `bytes`, atomically, without
/// following a link: a temporary file in the same opened directory, fsync, `renameat`. The
/// new file keeps the old one's mode, or gets `mode`. Its owner is whoever the calling
/// thread is (the app's uid on the [`Deputy`]); a root thread without an app identity keeps
/// the old file's owner, or gives it the directory's. Anything at `path` that is not a
/// regular file is refused and left alone.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let (dir_path, name) = split(path)?;
    let dir = open_dir(dir_path)?;
    let old = lstat_at(&dir, name, path)?;
    if let Some(old) = &old {
        check_regular(&dir, name, path, old.st_mode)?;
    }
    let mode = old.as_ref().map_or(mode, |s| s.st_mode & 0o7777);
    let fs_root = nix::unistd::geteuid().is_root() && fsuid_is_root();
    let owner = match (&old, fs_root) {
        (Some(old), true) => Some((old.st_uid, old.st_gid)),
        (None, true) => nix::sys::stat::fstat(&dir).ok().map(|s| (s.st_uid, s.st_gid)),
        (_, false) => None,
    };
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".op-bridge-{}-{}", std::process::id(), fastrand::u64(..)));
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(&dir, tmp.as_os_str(), flags, Mode::from_bits_truncate(mode & 0o777))
        .map_err(|e| FileError::io("create a temporary file beside", path, e))?;
    let mut file = std::fs::File::from(fd);
    let written = (|| -> std::io::Result<()> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        nix::fcntl::renameat(&dir, tmp.as_os_str(), &dir, name)?;
        Ok(())
    })();
    if let Err(err) = written {
        let _ = nix::unistd::unlinkat(&dir, tmp.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(FileError::io("write", path, err));
    }
    // The rename is durable once the directory is; an O_PATH descriptor cannot be fsynced.
    if let Ok(sync) =
        nix::fcntl::openat(&dir, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
    {
        let _ = nix::unistd::fsync(sync.as_fd());
    }
    Ok(())
}

/// Whether the calling thread's filesystem uid is 0 (not so on the app's [`Deputy`]).
fn fsuid_is_root() -> bool {
    // SAFETY: setfsuid(-1) changes nothing and returns the current fsuid.
    unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("opb-fsops-{tag}-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        dir.canonicalize().unwrap()
    }

    #[test]
    fn a_regular_file_is_read_and_replaced_and_links_and_fifos_are_refused() {
        let dir = temp_dir("unit");
        let path = dir.join("creds.json");
        assert!(read_regular(&path, 64).unwrap().is_none());
        replace(&path, b"one", 0o600).unwrap();
        assert_eq!(&read_regular(&path, 64).unwrap().unwrap()[..], b"one");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(read_regular(&path, 2), Err(FileError::TooLarge { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        replace(&path, b"one", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640, "the old mode is kept");

        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = read_regular(&link, 64).unwrap_err();
        assert!(err.is_refusal() && err.to_string().contains("creds.json"), "{err}");
        assert!(replace(&link, b"two", 0o600).unwrap_err().is_refusal());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");

        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let err = read_regular(&fifo, 64).unwrap_err();
        assert!(matches!(err, FileError::NotRegular { kind: "FIFO", .. }), "{err}");
        let socket = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = read_regular(&socket, 64).unwrap_err();
        assert!(matches!(err, FileError::NotRegular { kind: "socket", .. }), "{err}");
        let err = read_regular(Path::new("/dev/null"), 64).unwrap_err();
        assert!(matches!(err, FileError::NotRegular { kind: "character device", .. }), "{err}");

        let linked_dir = dir.join("d");
        std::os::unix::fs::symlink(&dir, &linked_dir).unwrap();
        assert!(read_regular(&linked_dir.join("creds.json"), 64).unwrap_err().is_refusal());
        assert!(replace(&linked_dir.join("new.json"), b"x", 0o600).unwrap_err().is_refusal());
        assert!(!dir.join("new.json").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
