//! Watched credential files are the app's: op-bridge (root, `run --user`) opens, reads,
//! creates and rewrites them as the app's uid could, never follows a link the app can plant,
//! and refuses anything that is not a regular file without blocking.
//!
//! Each scenario is played from the app's side: the supervised command runs as uid 1000 and
//! does what a hostile or merely odd app would (swap its credential file for a symlink to a
//! root-only file, swap its config directory for a symlink to a root-only directory, make a
//! FIFO where its credential file was). The backend is a JSON vault file, so what op-bridge
//! "wrote to 1Password" is read straight from that file. Needs root (chown, setpriv, unshare).
//!
//! Every child script polls for a positive sign that op-bridge has acted (a second watched
//! file's rotation captured, or rewritten), so no pass or fail depends on speed.

mod common;
use common::*;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The app's uid and gid (no passwd entry needed).
const APP: u32 = 1000;
/// What the root-only file holds; it must never reach the app or the vault.
const ROOT_SECRET: &str = "root-only-secret-7f3a";
/// Bound for a whole run (a hang is a failure, never a slow pass).
const RUN_LIMIT: Duration = Duration::from_secs(90);

fn require_root() {
    // SAFETY: a plain query.
    assert_eq!(unsafe { libc::geteuid() }, 0, "tests/watched_files.rs needs root (chown, setpriv, unshare)");
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// One scenario's files: a root-owned test directory (0755) holding the vault (root, 0600), a
/// root-only directory with a root-only secret, and the app's home (uid 1000, 0700).
struct Scene {
    dir: TestDir,
    vault: PathBuf,
    root_only: PathBuf,
    home: PathBuf,
}

impl Scene {
    fn new(tag: &str, vault_fields: &str) -> Scene {
        require_root();
        let dir = TestDir::new(tag);
        chmod(dir.path(), 0o755);
        let vault = dir.join("vault.json");
        std::fs::write(&vault, format!(r#"{{"v":{{"i":{{{vault_fields}}}}}}}"#)).unwrap();
        chmod(&vault, 0o600);
        let root_only = dir.join("rootonly");
        std::fs::create_dir(&root_only).unwrap();
        chmod(&root_only, 0o700);
        std::fs::write(root_only.join("secret"), ROOT_SECRET).unwrap();
        chmod(&root_only.join("secret"), 0o600);
        let home = dir.join("home");
        std::fs::create_dir(&home).unwrap();
        chown(&home, APP, APP);
        chmod(&home, 0o700);
        Scene { dir, vault, root_only, home }
    }

    /// A directory of the app's under its home.
    fn app_dir(&self, name: &str) -> PathBuf {
        let path = self.home.join(name);
        std::fs::create_dir(&path).unwrap();
        chown(&path, APP, APP);
        chmod(&path, 0o700);
        path
    }

    fn vault_text(&self) -> String {
        std::fs::read_to_string(&self.vault).unwrap()
    }

    /// A field of the vault's one item.
    fn vault_field(&self, field: &str) -> String {
        let vault: serde_json::Value = serde_json::from_str(&self.vault_text()).unwrap();
        vault["v"]["i"][field].as_str().unwrap_or_default().to_string()
    }

    /// `op-bridge run --user 1000:1000` with `watches` and `sh -c script` as the app, in a
    /// fresh pid namespace with op-bridge as PID 1, to completion (killed after RUN_LIMIT).
    /// The script finds op-bridge in `$OPB` and the app's home in `$H`.
    fn run(&self, watches: &[String], script: &str) -> Output {
        let direct = self.command(watches, script);
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
            .arg(direct.get_program())
            .args(direct.get_args())
            .env_clear()
            .envs(direct.get_envs().filter_map(|(k, v)| Some((k, v?))));
        run_with_timeout(cmd, RUN_LIMIT)
    }

    /// The `op-bridge run` command line of [`Scene::run`], without the namespace.
    fn command(&self, watches: &[String], script: &str) -> Command {
        let script_path = self.dir.join("child.sh");
        std::fs::write(&script_path, script).unwrap();
        chmod(&script_path, 0o644);
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--socket")
            .arg(self.dir.join("s.sock"))
            .arg(format!("--backend=file:{}", self.vault.display()))
            .args(["--user", &format!("{APP}:{APP}"), "--debounce", "100ms", "--grace", "5s"]);
        for watch in watches {
            cmd.arg("--watch").arg(watch);
        }
        cmd.arg("--")
            .args(["sh", "-e"])
            .arg(&script_path)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("OPB", bin())
            .env("H", &self.home);
        cmd
    }
}

/// The `key=value` line of the child's stdout.
fn field(output: &Output, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    String::from_utf8_lossy(&output.stdout).lines().find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

/// Shell: waits (bounded) until `$OPB get NAME` answers VALUE, else prints `timeout=NAME`
/// and fails the script.
fn await_get(name: &str, value: &str) -> String {
    format!(
        "i=0; until [ \"$($OPB get {name} 2>/dev/null)\" = '{value}' ]; do \
           i=$((i+1)); [ $i -lt 600 ] || {{ echo timeout={name}; exit 9; }}; sleep 0.05; done\n"
    )
}

/// Shell: waits (bounded) until FILE holds VALUE.
fn await_file(file: &str, value: &str) -> String {
    format!(
        "i=0; until [ \"$(cat {file} 2>/dev/null)\" = '{value}' ]; do \
           i=$((i+1)); [ $i -lt 600 ] || {{ echo timeout={file}; exit 9; }}; sleep 0.05; done\n"
    )
}

/// The app swaps its credential file for a symlink to a root-only file. op-bridge must not
/// read it through the link: GET never answers the root file, and it never reaches the vault
/// (1Password), not even in the final pass at exit.
#[test]
fn a_symlink_planted_at_a_watched_path_never_reads_a_root_only_file() {
    let scene = Scene::new("wfl", r#""creds":"c0","other":"o0""#);
    let claude = scene.app_dir(".claude");
    let watches = [
        format!("{}=CREDS=op://v/i/creds", claude.join("creds.json").display()),
        format!("{}=OTHER=op://v/i/other", scene.home.join("other.json").display()),
    ];
    // The second file's rotation is the barrier: it is captured after the symlink was seen.
    let script = format!(
        "cd \"$H/.claude\"\n\
         echo start=$(cat creds.json)\n\
         ln -s {secret} tmp && mv -f tmp creds.json\n\
         sleep 0.3\n\
         printf o1 > \"$H/other.json.tmp\" && mv -f \"$H/other.json.tmp\" \"$H/other.json\"\n\
         {barrier}\
         echo get=$($OPB get CREDS 2>&1 || true)\n",
        secret = scene.root_only.join("secret").display(),
        barrier = await_get("OTHER", "o1"),
    );
    let output = scene.run(&watches, &script);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "start").as_deref(), Some("c0"), "{shown}");
    let get = field(&output, "get").unwrap_or_default();
    assert!(!get.contains(ROOT_SECRET), "GET answered the root-only file: {get}\n{shown}");
    let vault = scene.vault_text();
    assert!(!vault.contains(ROOT_SECRET), "the root-only file reached the vault: {vault}\n{shown}");
    assert_eq!(scene.vault_field("other"), "o1", "the other file's rotation was lost: {vault}\n{shown}");
    assert_eq!(std::fs::read_to_string(scene.root_only.join("secret")).unwrap(), ROOT_SECRET);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("symbolic link"), "the refusal is not logged\n{shown}");
}

/// The app swaps its config directory for a symlink to a root-only directory, then SETs the
/// watched name. op-bridge must not create (or write) the credential file in the root-only
/// directory.
#[test]
fn a_symlinked_watched_directory_never_gets_a_file_written_into_it() {
    let scene = Scene::new("wfd", r#""creds":"c0","other":"o0""#);
    let claude = scene.app_dir(".claude");
    let watches = [
        format!("{}=CREDS=op://v/i/creds", claude.join("creds.json").display()),
        format!("{}=OTHER=op://v/i/other", scene.home.join("other.json").display()),
    ];
    // OTHER's rewrite is the barrier: the watcher handles changes in order, so once other.json
    // holds o1 the rewrite of CREDS has been tried.
    let script = format!(
        "cd \"$H\"\n\
         echo start=$(cat .claude/creds.json)\n\
         mv .claude .claude.old && ln -s {root_only} .claude\n\
         sleep 1.5\n\
         printf c1 | $OPB set CREDS -\n\
         printf o1 | $OPB set OTHER -\n\
         {barrier}\
         echo done=yes\n",
        root_only = scene.root_only.display(),
        barrier = await_file("\"$H/other.json\"", "o1"),
    );
    let output = scene.run(&watches, &script);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "done").as_deref(), Some("yes"), "{shown}");
    let planted = scene.root_only.join("creds.json");
    assert!(!planted.exists(), "op-bridge wrote into the root-only directory through the app's symlink\n{shown}");
    let entries: Vec<_> = std::fs::read_dir(&scene.root_only).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("secret")], "{shown}");
    assert_eq!(scene.vault_field("creds"), "c1", "{shown}");
}

/// The app makes a FIFO where its credential file was, rotates another watched file and
/// exits. op-bridge (PID 1) still captures the other rotation, still answers PING, and exits
/// with the app's status: the FIFO is refused without blocking anything.
#[test]
fn a_fifo_made_at_a_watched_path_while_running_blocks_nothing() {
    let scene = Scene::new("wff", r#""a":"a0","b":"b0""#);
    let watches = [
        format!("{}=A=op://v/i/a", scene.home.join("a.json").display()),
        format!("{}=B=op://v/i/b", scene.home.join("b.json").display()),
    ];
    let script = format!(
        "cd \"$H\"\n\
         echo start=$(cat a.json)\n\
         rm a.json && mkfifo a.json\n\
         sleep 0.3\n\
         printf b1 > b.json.tmp && mv -f b.json.tmp b.json\n\
         {barrier}\
         echo ping=$($OPB ping 2>&1)\n\
         exit 7\n",
        barrier = await_get("B", "b1"),
    );
    let output = scene.run(&watches, &script);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(7), "{shown}");
    assert_eq!(field(&output, "start").as_deref(), Some("a0"), "{shown}");
    assert!(field(&output, "ping").is_some_and(|p| p.contains("pong")), "{shown}");
    assert_eq!(scene.vault_field("b"), "b1", "{shown}");
    assert!(std::fs::symlink_metadata(scene.home.join("a.json")).unwrap().file_type().is_fifo(), "{shown}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a regular file"), "the refusal is not logged\n{shown}");
}

/// A FIFO at a watched path before start: op-bridge refuses to start, promptly and clearly
/// (exit 125), instead of hanging before its socket exists with SIGTERM ignored.
#[test]
fn a_fifo_at_a_watched_path_at_start_is_refused_without_hanging() {
    let scene = Scene::new("wfs", r#""a":"a0""#);
    let fifo = scene.home.join("a.json");
    mkfifo(&fifo);
    chown(&fifo, APP, APP);
    let watches = [format!("{}=A=op://v/i/a", fifo.display())];
    let output = scene.run(&watches, "echo child=ran\n");
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(125), "{shown}");
    assert_eq!(field(&output, "child"), None, "{shown}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&fifo.display().to_string()) && stderr.contains("not a regular file"), "{shown}");
}

/// A watched path that is a symlink at start is refused with a clear error naming where it
/// points: rotations made by an app that replaces the file atomically would land beside the
/// link, not in its target, and a link is the app's to re-point at any time.
#[test]
fn a_symlinked_watched_file_is_refused_at_start_naming_its_target() {
    let scene = Scene::new("wfy", r#""creds":"c0""#);
    let real = scene.app_dir("real");
    std::fs::write(real.join("creds.json"), "c0").unwrap();
    chown(&real.join("creds.json"), APP, APP);
    let link = scene.home.join("creds.json");
    std::os::unix::fs::symlink("real/creds.json", &link).unwrap();
    chown(&link, APP, APP);
    let watches = [format!("{}=CREDS=op://v/i/creds", link.display())];
    let output = scene.run(&watches, "echo child=ran\n");
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(125), "{shown}");
    assert_eq!(field(&output, "child"), None, "{shown}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("symbolic link") && stderr.contains("real/creds.json"), "{shown}");
    assert_eq!(std::fs::read_to_string(real.join("creds.json")).unwrap(), "c0");
}

/// Materialized and rewritten files are the app's (uid, gid, 0600), made as the app: a file
/// op-bridge creates in the app's directory is never root's.
#[test]
fn files_op_bridge_creates_for_the_app_are_the_apps() {
    let scene = Scene::new("wfo", r#""creds":"c0""#);
    let claude = scene.app_dir(".claude");
    let creds = claude.join("creds.json");
    let watches = [format!("{}=CREDS=op://v/i/creds", creds.display())];
    let script = format!(
        "echo owner=$(stat -c %u:%g:%a \"$H/.claude/creds.json\")\n\
         printf c1 | $OPB set CREDS -\n\
         {barrier}\
         echo owner2=$(stat -c %u:%g:%a \"$H/.claude/creds.json\")\n",
        barrier = await_file("\"$H/.claude/creds.json\"", "c1"),
    );
    let output = scene.run(&watches, &script);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "owner"), Some(format!("{APP}:{APP}:600")), "{shown}");
    assert_eq!(field(&output, "owner2"), Some(format!("{APP}:{APP}:600")), "{shown}");
    let meta = std::fs::metadata(&creds).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (APP, APP));
}

/// The deputy thread has the app's permissions and nothing more: with the app's identity it
/// can neither read a root-only file (even one in the app's own directory) nor create a file
/// in a root-only directory, files it creates are the app's, and the rest of the process
/// keeps root's groups. The same operations as root succeed (the check can fail).
#[test]
fn the_file_deputy_can_do_only_what_the_app_can() {
    use op_bridge::fsops::{Deputy, Owner, read_regular, replace};
    let scene = Scene::new("wfp", r#""creds":"c0""#);
    let in_app_dir = scene.home.join("left-by-root.json");
    std::fs::write(&in_app_dir, "root's").unwrap();
    chmod(&in_app_dir, 0o600);
    let secret = scene.root_only.join("secret");
    let made = scene.home.join("made.json");
    let groups_before = nix::unistd::getgroups().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();

    let app = Deputy::start(Some(Owner { uid: APP, gid: APP, groups: vec![APP] })).unwrap();
    let (a, b, c, d) = (secret.clone(), in_app_dir.clone(), scene.root_only.join("new.json"), made.clone());
    let results = runtime.block_on(app.run(move || {
        (
            read_regular(&a, 1024).map(|v| v.is_some()),
            read_regular(&b, 1024).map(|v| v.is_some()),
            replace(&c, b"x", 0o600),
            replace(&d, b"mine", 0o600),
        )
    }));
    let (root_file, left_by_root, into_root_dir, into_app_dir) = results.unwrap();
    assert!(root_file.is_err_and(|e| e.to_string().contains("ermission denied")), "read a root-only file");
    assert!(left_by_root.is_err_and(|e| e.to_string().contains("ermission denied")), "read root's 0600 file");
    assert!(into_root_dir.is_err(), "created a file in a root-only directory");
    assert!(!scene.root_only.join("new.json").exists());
    into_app_dir.unwrap();
    let meta = std::fs::metadata(&made).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (APP, APP, 0o600));
    assert_eq!(nix::unistd::getgroups().unwrap(), groups_before, "the deputy changed the process's groups");

    let root = Deputy::start(None).unwrap();
    let read = runtime.block_on(root.run(move || read_regular(&secret, 1024).map(|v| v.map(|v| v.to_vec()))));
    assert_eq!(read.unwrap().unwrap().unwrap(), ROOT_SECRET.as_bytes());
}

/// A FIFO made at a watched path, then SIGTERM: op-bridge still stops (the child gets the
/// signal, op-bridge exits with its status) instead of hanging in the final pass.
#[test]
fn sigterm_still_stops_op_bridge_after_a_fifo_appears_at_a_watched_path() {
    let scene = Scene::new("wft", r#""a":"a0""#);
    let watches = [format!("{}=A=op://v/i/a", scene.home.join("a.json").display())];
    let ready = scene.home.join("ready");
    let script = format!(
        "cd \"$H\"\n\
         rm a.json && mkfifo a.json\n\
         sleep 0.5\n\
         $OPB ping > {ready}.tmp && mv {ready}.tmp {ready}\n\
         exec sleep 1000\n",
        ready = ready.display(),
    );
    let stderr_path = scene.dir.join("op-bridge.stderr");
    let mut child = Killed(
        scene
            .command(&watches, &script)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let shown = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let mut status = None;
    let ready_seen = eventually(RUN_LIMIT, || {
        status = child.try_wait().unwrap();
        ready.exists() || status.is_some()
    });
    assert!(ready_seen && status.is_none(), "the child never got to PING ({status:?})\n{}", shown());
    // SAFETY: kill(2) on op-bridge, our child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopped = eventually(RUN_LIMIT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(stopped, "op-bridge did not stop on SIGTERM\n{}", shown());
    assert_eq!(status.unwrap().code(), Some(128 + libc::SIGTERM), "{}", shown());
}

/// An op-bridge (not PID 1) killed on drop with its children (a subreaper's command would
/// outlive it).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = self.0.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            // SAFETY: kill(2) on a child of our op-bridge, which is alive and not reaped, so
            // the pid is still that child's.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A symlink in the directories of a `--watch` path that exists at start is the operator's
/// configuration: it is resolved once, and rotations in the real directory are captured.
#[test]
fn a_directory_link_in_the_watch_path_at_start_is_resolved_once() {
    let scene = Scene::new("wfr", r#""creds":"c0""#);
    let claude = scene.app_dir(".claude");
    let link = scene.home.join("cfg");
    std::os::unix::fs::symlink(".claude", &link).unwrap();
    let watches = [format!("{}=CREDS=op://v/i/creds", link.join("creds.json").display())];
    let script = format!(
        "echo start=$(cat \"$H/.claude/creds.json\")\n\
         printf c1 > \"$H/.claude/tmp\" && mv -f \"$H/.claude/tmp\" \"$H/.claude/creds.json\"\n\
         {barrier}",
        barrier = await_get("CREDS", "c1"),
    );
    let output = scene.run(&watches, &script);
    let shown = describe(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert_eq!(field(&output, "start").as_deref(), Some("c0"), "{shown}");
    assert_eq!(scene.vault_field("creds"), "c1", "{shown}");
    assert!(claude.join("creds.json").is_file() && link.is_symlink());
}
