//! Credential-file watching: turns rewrites of a watched file into write-backs.
//!
//! The parent directory is watched (inotify via `notify`), so atomic rename, truncate+write,
//! in-place writes, and delete-then-create are all seen. A change is captured only when the
//! file is complete and stable: after the writer closed it or renamed it into place, a quiet
//! period (the debounce) has passed, no process still has it open for writing, and its size,
//! mtime and inode did not move while it was read. It is read whole and byte-exact. Bursts
//! are capped: a file rewritten continuously is still captured every [`MAX_DELAY`].
//!
//! Every file operation (read, materialize, rewrite) runs on the [`crate::fsops::Deputy`]:
//! with the app's file permissions under `run --user`, never following a symbolic link,
//! reading only regular files. A link or non-regular file at a watched path refuses the
//! start; one that appears later is refused with a WARN and left alone.
//!
//! The watch survives its directory being deleted, re-created or replaced (tools that reset
//! their config directory): every [`REARM_INTERVAL`], and at once on an event about the
//! directory itself or an inotify queue overflow, each directory's identity is checked; a new
//! one is watched afresh and its files rescanned. The final pass at stop re-reads **every**
//! watched file, not only those with a queued event.
//!
//! At start a missing file is materialized from the value op-bridge serves (mode 0600,
//! atomically): 1Password's, or a journaled write-back not stored yet, which is newer. A file
//! that differs from that value is decided three-way against the base, the value op-bridge
//! last knew 1Password held (kept in the sealed cache, `--cache`): a file still equal to the
//! base is rewritten with the newer value; a file that changed while the value did not is
//! written back; when both changed, the file wins (1Password keeps the replaced value in the
//! item's history; a lost local rotation would be gone) and the conflict is logged. With no
//! base (no `--cache`, or a field op-bridge never saw) it falls back on time: the file is
//! written back only when its mtime is later than the item's last change in 1Password, or
//! 1Password cannot say; this assumes the two clocks agree and that nothing else in the item
//! changed since. Every write op-bridge makes itself (materialization, a refresh or SET
//! that changed the value) is remembered as the last seen content, so it is never echoed back
//! as a change; and the file is rewritten only from a value at least as new (by the store's
//! generation) as the one it holds, and never over a change of its own not yet captured.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::backend::Backend;
use crate::fsops::{self, Deputy, FileError};
use crate::locked::LockedBytes;
use crate::protocol::{MAX_VALUE, normalize_name};
use crate::reference::SecretRef;
use crate::store::SecretStore;
use crate::writeback::Origin;
use crate::writeback::WriteBack;

/// Longest a continuously rewritten file waits before it is captured anyway.
pub const MAX_DELAY: Duration = Duration::from_secs(2);
/// Longest a capture waits for a writer that keeps the file open.
const MAX_OPEN_WAIT: Duration = Duration::from_secs(30);
/// How often each watched directory's identity is checked (deleted, re-created, replaced).
pub const REARM_INTERVAL: Duration = Duration::from_secs(1);

/// `--watch PATH=[NAME=]op://vault/item/[section/]field`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    pub path: PathBuf,
    pub name: String,
    pub reference: SecretRef,
}

impl WatchSpec {
    pub fn parse(spec: &str) -> Result<WatchSpec, String> {
        let bad = |why: &str| format!("--watch {spec}: {why} (expected PATH=[NAME=]op://vault/item/[section/]field)");
        let at = spec.find("=op://").ok_or_else(|| bad("no op:// reference"))?;
        let (head, uri) = (&spec[..at], &spec[at + 1..]);
        let reference = SecretRef::parse(uri).map_err(|e| bad(&e.to_string()))?;
        // PATH=NAME=op://… when the part after the last '=' is a valid name.
        let (path, name) = match head.rsplit_once('=') {
            Some((path, name)) if !path.is_empty() && normalize_name(name).is_ok() => (path, normalize_name(name).ok()),
            _ => (head, None),
        };
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        let path = PathBuf::from(path);
        let name = match name {
            Some(name) => name,
            None => name_from_path(&path)
                .ok_or_else(|| bad("cannot derive a name from the file name; give PATH=NAME=op://…"))?,
        };
        Ok(WatchSpec { path, name, reference })
    }
}

/// `credentials.json` → `CREDENTIALS`, `oauth-token` → `OAUTH_TOKEN`.
fn name_from_path(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?.trim_start_matches('.');
    let name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    normalize_name(&name).ok()
}

/// What the watcher needs of the broker, and nothing more: the store, the write-back queue,
/// the backend (to ask when an item last changed) and the notifications of changed names.
#[derive(Clone)]
pub struct WatchContext {
    pub store: Arc<SecretStore>,
    pub writeback: Arc<WriteBack>,
    pub backend: Arc<dyn Backend>,
    /// Names whose value changed in memory (a refresh, a stored SET).
    pub changes_tx: tokio::sync::broadcast::Sender<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Quiet period after the last change before a capture.
    pub debounce: Duration,
    /// Write a missing watched file from 1Password at start.
    pub materialize: bool,
    /// `run --user`: whose file permissions every watched-file operation runs with.
    pub owner: Option<crate::fsops::Owner>,
}

struct FileState {
    spec: WatchSpec,
    /// What the file held when op-bridge last read or wrote it.
    last_seen: Option<LockedBytes>,
    /// When the next capture is due.
    due: Option<Instant>,
    /// First change of the current burst (for [`MAX_DELAY`]).
    burst_start: Option<Instant>,
    /// A write was seen without the matching close: a writer may still be at work.
    writer_open: bool,
    /// Store generation of the value the file holds, as far as op-bridge knows.
    file_generation: u64,
}

impl FileState {
    fn seen(&self, content: &[u8]) -> bool {
        self.last_seen.as_ref().is_some_and(|v| v.expose_secret() == content)
    }
}

/// The running watcher; [`WatchHandle::stop`] captures what is due and ends it.
pub struct WatchHandle {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl WatchHandle {
    /// Captures pending changes immediately (shutdown), then stops watching.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Reads the watched file on the deputy (see [`crate::fsops::read_regular`]).
async fn read_stable(deputy: &Deputy, path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, FileError> {
    let path = path.to_path_buf();
    deputy.run(move || fsops::read_regular(&path, MAX_VALUE)).await.unwrap_or(Err(FileError::DeputyGone))
}

/// Replaces the watched file on the deputy (see [`crate::fsops::replace`]), mode 0600 when new.
async fn write_file(deputy: &Deputy, path: &Path, value: &[u8]) -> Result<(), FileError> {
    let (path, value) = (path.to_path_buf(), Zeroizing::new(value.to_vec()));
    deputy.run(move || fsops::replace(&path, &value, 0o600)).await.unwrap_or(Err(FileError::DeputyGone))
}

/// Whether any process has `path` open for writing (scans `/proc/*/fd`; processes we may
/// not inspect are skipped).
fn open_for_writing(path: &Path) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    for proc in procs.flatten() {
        if !proc.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).ok().as_deref() != Some(path) {
                continue;
            }
            let info = std::fs::read_to_string(proc.path().join("fdinfo").join(fd.file_name())).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                return true;
            }
        }
    }
    false
}

/// The absolute path of a watched file with its parent directory resolved (events carry
/// the watched directory's path).
fn canonical_target(path: &Path) -> Result<PathBuf, String> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let parent = parent.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", parent.display()))?;
    let name = path.file_name().ok_or_else(|| format!("{} has no file name", path.display()))?;
    Ok(parent.join(name))
}

/// Syncs each watched file with the store (materialize, write back, or keep 1Password's
/// newer value), then watches them.
pub async fn start(
    specs: &[WatchSpec],
    broker: WatchContext,
    options: WatchOptions,
) -> Result<Option<WatchHandle>, String> {
    if specs.is_empty() {
        return Ok(None);
    }
    let deputy = Deputy::start(options.owner.clone())?;
    let mut states = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut spec = spec.clone();
        let path = spec.path.clone();
        // As the app: its directories are created by its uid, or not at all.
        spec.path = deputy.run(move || canonical_target(&path)).await.ok_or("the file worker thread is gone")??;
        states.push(initial_sync(spec, &broker, &options, &deputy).await?);
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event| {
        let _ = events_tx.send(event);
    })
    .map_err(|e| format!("cannot start the file watcher: {e}"))?;
    let mut dirs = Directories { watcher, armed: BTreeMap::new() };
    for state in &states {
        let Some(dir) = state.spec.path.parent() else { continue };
        if !dirs.armed.contains_key(dir) {
            dirs.watch(dir).map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        }
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(event_loop(states, dirs, events_rx, broker, options, deputy, stop.clone()));
    Ok(Some(WatchHandle { stop, task }))
}

/// What tells one directory from another at the same path: device, inode and (where the
/// filesystem records it) birth time. A directory deleted and made again may get the same
/// inode number back, so the events about the directory itself are the main signal (see
/// [`Directories::forget`]); this catches a replacement whose events were lost.
type Identity = (u64, u64, Option<std::time::SystemTime>);

fn identity(dir: &Path) -> Option<Identity> {
    // A symlink where the directory was is the app's doing: not the directory, not watched.
    std::fs::symlink_metadata(dir).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino(), m.created().ok()))
}

/// The watched directories and the identity each watch was armed on.
struct Directories {
    watcher: notify::RecommendedWatcher,
    /// None: the directory is missing (or could not be watched) and is retried.
    armed: BTreeMap<PathBuf, Option<Identity>>,
}

impl Directories {
    fn watch(&mut self, dir: &Path) -> notify::Result<()> {
        let before = identity(dir);
        let result = match before {
            Some(_) => self.watcher.watch(dir, RecursiveMode::NonRecursive),
            None => Err(notify::Error::generic("missing, or not a directory")),
        };
        self.armed.insert(dir.to_path_buf(), result.as_ref().ok().and(before));
        result
    }

    /// The watch on `dir` is gone (the directory itself was deleted or moved away): re-arm it
    /// whatever its identity looks like now.
    fn forget(&mut self, dir: &Path) {
        if let Some(armed) = self.armed.get_mut(dir) {
            *armed = None;
        }
    }

    /// Re-arms every directory whose identity changed; returns the ones re-armed (their files
    /// must be rescanned: writes made before the new watch existed produced no event).
    fn rearm(&mut self) -> Vec<PathBuf> {
        let changed: Vec<PathBuf> =
            self.armed.iter().filter(|(dir, armed)| identity(dir) != **armed).map(|(d, _)| d.clone()).collect();
        let mut rearmed = Vec::new();
        for dir in changed {
            // The old watch follows the old inode (or is gone with it).
            let _ = self.watcher.unwatch(&dir);
            match self.watch(&dir) {
                Ok(()) => {
                    tracing::warn!(dir = %dir.display(), "watched directory was deleted or replaced; watching it again");
                    rearmed.push(dir);
                }
                Err(err) => {
                    self.armed.insert(dir.clone(), None);
                    tracing::debug!(dir = %dir.display(), "watched directory not available yet: {err}");
                }
            }
        }
        rearmed
    }
}

async fn initial_sync(
    spec: WatchSpec,
    broker: &WatchContext,
    options: &WatchOptions,
    deputy: &Deputy,
) -> Result<FileState, String> {
    let resolved = broker.store.with_value_generation(&spec.name, |v, g| (Zeroizing::new(v.to_vec()), g));
    let mut state =
        FileState { spec, last_seen: None, due: None, burst_start: None, writer_open: false, file_generation: 0 };
    let (name, path) = (state.spec.name.clone(), state.spec.path.clone());
    match read_stable(deputy, &path).await {
        Ok(None) => match resolved {
            Some((value, generation)) if options.materialize && !value.is_empty() => {
                write_file(deputy, &path, &value)
                    .await
                    .map_err(|e| format!("cannot materialize {}: {e}", path.display()))?;
                tracing::info!(name, path = %path.display(), "materialized watched file from the backend");
                state.last_seen = Some(LockedBytes::new(&value));
                state.file_generation = generation;
            }
            _ => tracing::info!(name, path = %path.display(), "watched file does not exist yet"),
        },
        Ok(Some(content)) if content.is_empty() => {
            tracing::warn!(name, path = %path.display(), "watched file is empty; not written back");
        }
        Ok(Some(content)) => {
            match resolved {
                Some((value, generation)) if value[..] == content[..] => state.file_generation = generation,
                Some((value, generation)) if !file_wins(&state.spec, &content, &value, broker).await => {
                    // The served value is newer (1Password's, rotated by a replica or a person, or
                    // a journaled write-back not stored yet): keep it, bring the file up.
                    write_file(deputy, &path, &value)
                        .await
                        .map_err(|e| format!("cannot rewrite {}: {e}", path.display()))?;
                    state.last_seen = Some(LockedBytes::new(&value));
                    state.file_generation = generation;
                    return Ok(state);
                }
                _ => {
                    tracing::info!(name, path = %path.display(), "watched file is newer than the backend; writing it back");
                    let (_, generation) = broker.store.set_value_generation(&name, &content);
                    state.file_generation = generation;
                    broker.writeback.submit(&name, &state.spec.reference, &content, Origin::Watch);
                }
            }
            state.last_seen = Some(LockedBytes::new(&content));
        }
        // A link, FIFO, socket or device where the app's credential file belongs: refused at
        // start, loudly, rather than served or written back.
        Err(err) if err.is_refusal() => return Err(format!("--watch {}: {err}", path.display())),
        Err(err) => {
            tracing::warn!(name, "{err}; will retry on the next change");
            state.due = Some(Instant::now() + options.debounce);
        }
    }
    Ok(state)
}

/// Whether a watched file that differs from the value served at start (`current`:
/// 1Password's, or a journaled write-back not stored yet) is the newer one, decided
/// three-way against the base when there is one, else by time.
async fn file_wins(spec: &WatchSpec, file: &[u8], current: &[u8], broker: &WatchContext) -> bool {
    let Some(base) = broker.writeback.held_at_start(&spec.reference) else { return file_is_newer(spec, broker).await };
    let (name, path) = (&spec.name, spec.path.display());
    if file == base.as_slice() {
        tracing::info!(name, path = %path, "watched file unchanged since op-bridge last synced it; the newer value replaces it");
        false
    } else if current == base.as_slice() {
        tracing::info!(name, path = %path, "watched file changed while op-bridge was not watching; writing it back");
        true
    } else {
        tracing::warn!(
            name,
            path = %path,
            "watched file and {} both changed since op-bridge last synced them; the file wins (1Password keeps the \
             value it replaces in the item's history)",
            spec.reference
        );
        true
    }
}

/// Without a base: whether the file's mtime is later (to the second) than the item's last
/// change in 1Password. When 1Password cannot say, the file wins: 1Password keeps an item's
/// history, a lost local rotation is gone.
async fn file_is_newer(spec: &WatchSpec, broker: &WatchContext) -> bool {
    let seconds = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).ok();
    let modified = std::fs::metadata(&spec.path).and_then(|m| m.modified()).ok().and_then(seconds);
    let updated = match broker.backend.updated_at(&spec.reference).await {
        Ok(updated) => updated.and_then(seconds),
        Err(err) => {
            tracing::warn!(name = %spec.name, "cannot tell when {} last changed ({err}); the watched file wins", spec.reference);
            None
        }
    };
    match (modified, updated) {
        (Some(modified), Some(updated)) if modified <= updated => {
            tracing::warn!(
                name = %spec.name,
                path = %spec.path.display(),
                file_modified = modified,
                item_updated = updated,
                "watched file differs from 1Password and is older (file modified at {modified}, item updated at \
                 {updated}, seconds since the epoch); keeping 1Password's value and rewriting the file"
            );
            false
        }
        _ => true,
    }
}

async fn event_loop(
    mut states: Vec<FileState>,
    mut dirs: Directories,
    mut events_rx: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    broker: WatchContext,
    options: WatchOptions,
    deputy: Deputy,
    stop: CancellationToken,
) {
    let index: HashMap<PathBuf, usize> = states.iter().enumerate().map(|(i, s)| (s.spec.path.clone(), i)).collect();
    let mut changes_rx = broker.changes_tx.subscribe();
    let mut rearm_tick = tokio::time::interval(REARM_INTERVAL);
    rearm_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_due = states.iter().filter_map(|s| s.due).min();
        tokio::select! {
            event = events_rx.recv() => match event {
                Some(Ok(event)) => {
                    let about_a_directory = event.paths.iter().any(|p| dirs.armed.contains_key(p));
                    if about_a_directory && matches!(event.kind, EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))) {
                        for path in &event.paths {
                            dirs.forget(path);
                        }
                    }
                    if event.need_rescan() {
                        tracing::warn!("file watcher lost events (queue overflow); rescanning every watched file");
                        let all: Vec<PathBuf> = dirs.armed.keys().cloned().collect();
                        all.iter().for_each(|dir| dirs.forget(dir));
                        rescan(&mut states, |_| true);
                    }
                    if about_a_directory || event.need_rescan() {
                        let rearmed = dirs.rearm();
                        rescan(&mut states, |dir| rearmed.iter().any(|d| d == dir));
                    }
                    on_event(&mut states, &index, &event, &options);
                }
                Some(Err(err)) => tracing::warn!("file watcher error: {err}"),
                None => break,
            },
            _ = rearm_tick.tick() => {
                let rearmed = dirs.rearm();
                rescan(&mut states, |dir| rearmed.iter().any(|d| d == dir));
            }
            _ = crate::sleep_until(next_due) => {
                let now = Instant::now();
                for state in states.iter_mut().filter(|s| s.due.is_some_and(|d| d <= now)) {
                    capture(state, &broker, &options, &deputy, false).await;
                }
            }
            changed = changes_rx.recv() => {
                if let Ok(names) = changed {
                    for state in states.iter_mut().filter(|s| names.contains(&s.spec.name)) {
                        rewrite_from_store(state, &broker, &deputy).await;
                    }
                }
            }
            _ = stop.cancelled() => {
                // Shutdown: every watched file is read once more, event or not (an event may
                // have been lost with a replaced directory); in `run` the command has exited,
                // in `daemon` this is the last chance.
                for state in states.iter_mut() {
                    capture(state, &broker, &options, &deputy, true).await;
                }
                break;
            }
        }
    }
}

/// Schedules an immediate capture check of every watched file whose directory `which` picks.
fn rescan(states: &mut [FileState], which: impl Fn(&Path) -> bool) {
    let now = Instant::now();
    for state in states.iter_mut().filter(|s| s.spec.path.parent().is_some_and(&which)) {
        state.due = Some(now);
        state.burst_start.get_or_insert(now);
    }
}

fn on_event(states: &mut [FileState], index: &HashMap<PathBuf, usize>, event: &notify::Event, options: &WatchOptions) {
    let now = Instant::now();
    for (position, path) in event.paths.iter().enumerate() {
        let Some(&i) = index.get(path) else { continue };
        let state = &mut states[i];
        // A rename with both ends: the first path is the source, the second the destination.
        let renamed_away = matches!(event.kind, EventKind::Modify(ModifyKind::Name(RenameMode::From)))
            || (matches!(event.kind, EventKind::Modify(ModifyKind::Name(RenameMode::Both))) && position == 0);
        let complete = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any))
        ) || (matches!(event.kind, EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            && position == 1);
        let writing =
            matches!(event.kind, EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any));
        if renamed_away || matches!(event.kind, EventKind::Remove(_)) {
            // Gone (or about to be replaced): nothing to capture until it comes back.
            state.due = None;
            state.writer_open = false;
            state.burst_start = None;
            continue;
        }
        if !(complete || writing) {
            continue;
        }
        let burst_start = *state.burst_start.get_or_insert(now);
        state.writer_open = writing && !complete;
        let quiet = now + options.debounce;
        state.due = Some(if complete { quiet.min(burst_start + MAX_DELAY).max(now) } else { quiet });
    }
}

async fn capture(
    state: &mut FileState,
    broker: &WatchContext,
    options: &WatchOptions,
    deputy: &Deputy,
    final_pass: bool,
) {
    let now = Instant::now();
    let name = state.spec.name.clone();
    let path = state.spec.path.clone();
    let burst_age = state.burst_start.map(|s| now - s).unwrap_or_default();
    if !final_pass
        && state.writer_open
        && burst_age < MAX_OPEN_WAIT
        && deputy
            .run({
                let path = path.clone();
                move || open_for_writing(&path)
            })
            .await
            .unwrap_or(false)
    {
        state.due = Some(now + options.debounce);
        return;
    }
    let content = match read_stable(deputy, &path).await {
        Ok(Some(content)) => content,
        Ok(None) => {
            state.due = None;
            return;
        }
        Err(err) if err.is_refusal() => {
            tracing::warn!(name, "{err}");
            state.due = None;
            state.burst_start = None;
            state.writer_open = false;
            return;
        }
        Err(err) if !final_pass && burst_age < MAX_OPEN_WAIT => {
            tracing::debug!(name, "{err}; capture postponed");
            state.due = Some(now + options.debounce);
            return;
        }
        Err(err) => {
            tracing::warn!(name, "{err}");
            state.due = None;
            return;
        }
    };
    state.due = None;
    state.burst_start = None;
    state.writer_open = false;
    if content.is_empty() {
        tracing::warn!(name, path = %path.display(), "watched file is empty; not written back");
        return;
    }
    if state.seen(&content) {
        return;
    }
    state.last_seen = Some(LockedBytes::new(&content));
    let (_, generation) = broker.store.set_value_generation(&name, &content);
    state.file_generation = generation;
    broker.writeback.submit(&name, &state.spec.reference, &content, Origin::Watch);
    tracing::info!(name, path = %path.display(), bytes = content.len(), "captured a change; queued for write-back");
}

/// A refresh or SET changed the value in memory: bring the file up to date, but only from a
/// value newer than the one the file holds, and never over a local change not yet captured
/// or still on its way to 1Password (that one is newer).
async fn rewrite_from_store(state: &mut FileState, broker: &WatchContext, deputy: &Deputy) {
    let name = &state.spec.name;
    if broker.writeback.is_pending(name) || state.due.is_some() {
        return;
    }
    let Some((value, generation)) = broker.store.with_value_generation(name, |v, g| (Zeroizing::new(v.to_vec()), g))
    else {
        return;
    };
    if value.is_empty() || generation <= state.file_generation || state.seen(&value) {
        return;
    }
    // The file must still hold what op-bridge last saw; otherwise it changed under us and
    // that change is captured instead.
    match read_stable(deputy, &state.spec.path).await {
        Ok(Some(content)) if !state.seen(&content) => {
            state.due = Some(Instant::now());
            return;
        }
        Err(_) => {
            state.due = Some(Instant::now());
            return;
        }
        Ok(_) => {}
    }
    match write_file(deputy, &state.spec.path, &value).await {
        Ok(()) => {
            state.last_seen = Some(LockedBytes::new(&value));
            state.file_generation = generation;
            tracing::info!(name, path = %state.spec.path.display(), "rewrote watched file with the new value");
        }
        Err(err) => tracing::warn!(name, "cannot rewrite {}: {err}", state.spec.path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_name() {
        let s = WatchSpec::parse("/data/creds.json=op://Dev/OAuth/refresh").unwrap();
        assert_eq!((s.path.to_str().unwrap(), s.name.as_str()), ("/data/creds.json", "CREDS"));
        let s = WatchSpec::parse("/a=b/.credentials.json=claude=op://Dev/Claude/Section/creds").unwrap();
        assert_eq!((s.path.to_str().unwrap(), s.name.as_str()), ("/a=b/.credentials.json", "CLAUDE"));
        assert_eq!(s.reference.section.as_deref(), Some("Section"));
        let s = WatchSpec::parse("/x/oauth-token=op://v/i/f").unwrap();
        assert_eq!(s.name, "OAUTH_TOKEN");
        assert!(WatchSpec::parse("/x/y").is_err());
        assert!(WatchSpec::parse("=op://v/i/f").is_err());
        assert!(WatchSpec::parse("/x/y=op://v/i").is_err());
    }
}
