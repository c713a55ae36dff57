//! Test harness: the built binary, the fake `op`, temp dirs, and daemons that are always
//! killed on drop. Daemon output goes to a file (an unread pipe could block it); failures
//! print the command, status and output. `terminal` drives op-bridge on a pseudo-terminal.
#![allow(dead_code)]

pub mod fixtures;
pub mod memory;
pub mod terminal;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_op-bridge"))
}

pub fn fake_op_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-op/op")
}

/// A temporary directory removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        // Short paths: a socket path must fit in 108 bytes.
        let path = std::env::temp_dir().join(format!("opb-{tag}-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fake `op`'s files: store, control knobs and call log.
pub struct FakeOp {
    pub store: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl FakeOp {
    pub fn new(dir: &TestDir, store: Json) -> FakeOp {
        let fake = FakeOp {
            store: dir.join("store.json"),
            control: dir.join("control.json"),
            log: dir.join("op-calls.jsonl"),
        };
        std::fs::write(&fake.store, serde_json::to_vec_pretty(&store).unwrap()).unwrap();
        fake
    }

    /// Environment variables that point the fake at its files.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("FAKE_OP_STORE".into(), self.store.display().to_string()),
            ("FAKE_OP_CONTROL".into(), self.control.display().to_string()),
            ("FAKE_OP_LOG".into(), self.log.display().to_string()),
        ]
    }

    pub fn control(&self, knobs: Json) {
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&knobs).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }

    pub fn read_store(&self) -> Json {
        serde_json::from_slice(&std::fs::read(&self.store).unwrap()).unwrap()
    }

    pub fn write_store(&self, store: &Json) {
        let tmp = self.store.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(store).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.store).unwrap();
    }

    /// Every call the fake logged so far.
    pub fn calls(&self) -> Vec<Json> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Calls whose argv starts with `words`.
    pub fn calls_of(&self, words: &[&str]) -> Vec<Json> {
        self.calls()
            .into_iter()
            .filter(|c| {
                let argv: Vec<&str> = c["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
                argv.len() >= words.len() && argv[..words.len()] == *words
            })
            .collect()
    }
}

/// A running `op-bridge` (daemon or run), killed on drop.
pub struct Broker {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr_path: PathBuf,
    pub stdout_path: PathBuf,
}

/// Builds an op-bridge command with a clean environment (PATH kept) and output to files.
pub struct BrokerBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    socket: PathBuf,
    dir: PathBuf,
}

impl BrokerBuilder {
    /// `op-bridge daemon --socket DIR/s.sock` (or `run`, by `mode`).
    pub fn new(dir: &TestDir, mode: &str) -> BrokerBuilder {
        let socket = dir.join("s.sock");
        BrokerBuilder {
            args: vec![mode.into(), "--socket".into(), socket.display().to_string()],
            env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
            socket,
            dir: dir.path().to_path_buf(),
        }
    }
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    pub fn envs(mut self, vars: Vec<(String, String)>) -> Self {
        self.env.extend(vars);
        self
    }
    /// Uses the fake op as backend.
    pub fn fake_op(self, fake: &FakeOp) -> Self {
        let path = fake_op_path().display().to_string();
        self.envs(fake.env()).args(["--op-path".to_string(), path])
    }
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(&self.args).env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts it without waiting for readiness.
    pub fn spawn(self) -> Broker {
        let stderr_path = self.dir.join(format!("broker-{}.stderr", fastrand::u32(..)));
        let stdout_path = stderr_path.with_extension("stdout");
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let child = cmd.spawn().unwrap();
        Broker { child, socket: self.socket, stderr_path, stdout_path }
    }

    /// Starts it and waits until the socket answers PING.
    pub fn start(self) -> Broker {
        let mut broker = self.spawn();
        broker.wait_ready(Duration::from_secs(20));
        broker
    }

    /// Runs to completion (for start-up failures), returning the output.
    pub fn output(self) -> Output {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null());
        run_with_timeout(cmd, Duration::from_secs(60))
    }
}

impl Broker {
    pub fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(reply) = raw_exchange(&self.socket, b"PING\n", Duration::from_secs(5))
                && reply.starts_with(b"OK pong")
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("op-bridge exited early with {status}\nstderr:\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "op-bridge not ready after {limit:?}\nstderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for exit; panics (with stderr) after `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "op-bridge did not exit within {limit:?}\nstderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a client subcommand against this broker.
    pub fn client(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        client(&self.socket, args, stdin)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `op-bridge <args> --socket SOCKET` with optional stdin.
pub fn client(socket: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).arg("--socket").arg(socket).env_remove("OP_BRIDGE_SOCKET");
    run_with_input(cmd, stdin, Duration::from_secs(60))
}

pub fn run_with_timeout(cmd: Command, limit: Duration) -> Output {
    run_with_input(cmd, None, limit)
}

pub fn run_with_input(mut cmd: Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let output = child.wait_with_output().unwrap();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    output
}

/// Sends raw bytes, half-closes, and reads everything until EOF or `limit`.
pub fn raw_exchange(socket: &Path, request: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(request)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}

/// Pretty failure text for an Output.
pub fn describe(output: &Output) -> String {
    format!(
        "status: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Polls `check` until it is true or `limit` passes; returns whether it became true.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    check()
}

// ---------------------------------------------------------------- files and processes (as root)

/// `chown` without following a link.
pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// [`chown`] of `path` and everything below it (links themselves, never their targets).
pub fn chown_tree(path: &Path, uid: u32, gid: u32) {
    chown(path, uid, gid);
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid, gid);
        }
    }
}

/// Children of `pid` as listed by the kernel.
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
