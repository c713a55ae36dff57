//! Docker packaging. The static binary the image ships (`-C target-feature=+crt-static`) has
//! no ELF interpreter and runs in an empty root with an empty environment: a temp dir
//! holding only the binary, entered with `unshare --mount --fork chroot`. And
//! `docker/entrypoint.sh`, the background-daemon fallback, waits for the socket, strips the
//! token and the references, and `exec`s the application — or fails without starting it.
//!
//! The test builds that binary itself, with the same RUSTFLAGS and target as
//! `docker/Dockerfile` but the dev profile: optimisation does not change how it links, and
//! a release build (LTO, one codegen unit) would cost CI twice the time. Its target dir is
//! `static/` inside this test's target dir, so the nested cargo never waits on the lock of
//! the outer one. Set `OP_BRIDGE_STATIC_BIN=/path/to/op-bridge` to check a binary built
//! elsewhere instead (e.g. one copied out of the image). Needs root (chroot).

mod common;
use common::*;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `env -i unshare --mount --fork --kill-child chroot ROOT ARGS…`
fn in_empty_root(root: &Path, args: &[&str]) -> Command {
    let unshare = which::which("unshare").expect("unshare (util-linux) is needed");
    let chroot = which::which("chroot").expect("chroot (coreutils) is needed");
    let mut cmd = Command::new(unshare);
    cmd.env_clear().args(["--mount", "--fork", "--kill-child"]).arg(chroot).arg(root).args(args);
    cmd
}

/// A temp dir holding only a copy of the static binary, as `/op-bridge`.
fn empty_root(tag: &str) -> TestDir {
    let root = TestDir::new(tag);
    std::fs::copy(fixtures::static_binary(), root.join("op-bridge")).unwrap();
    root
}

fn run(cmd: Command, stdin: Option<&[u8]>) -> Output {
    run_with_input(cmd, stdin, Duration::from_secs(60))
}

/// Whether an ELF file has a PT_INTERP program header (a dynamic loader to run it).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    assert!(elf.len() > 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2 && elf[5] == 1, "not a 64-bit LE ELF");
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

#[test]
fn binary_is_statically_linked() {
    let binary = fixtures::static_binary();
    let elf = std::fs::read(binary).unwrap();
    assert!(!has_interpreter(&elf), "{} has an ELF interpreter", binary.display());
    assert!(has_interpreter(&std::fs::read(bin()).unwrap()), "the check must see the ordinary build as dynamic");
    let ldd = run(
        {
            let mut cmd = Command::new("ldd");
            cmd.arg(binary);
            cmd
        },
        None,
    );
    let text = format!("{}{}", String::from_utf8_lossy(&ldd.stdout), String::from_utf8_lossy(&ldd.stderr));
    assert!(text.contains("statically linked") || text.contains("not a dynamic executable"), "ldd: {text}");
}

#[test]
fn runs_in_an_empty_root_with_an_empty_environment() {
    let root = empty_root("static-root");
    let out = run(in_empty_root(root.path(), &["/op-bridge", "--version"]), None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("op-bridge "), "{}", describe(&out));

    let request = br#"{"protocolVersion":1,"provider":"opb","ids":["API_KEY"]}"#;
    let out = run(in_empty_root(root.path(), &["/op-bridge", "get", "--socket", "/nope"]), Some(request));
    assert_eq!(out.status.code(), Some(3), "daemon unreachable: {}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nope"), "{}", describe(&out));

    let out = run(in_empty_root(root.path(), &["/op-bridge", "ping", "--socket", "/nope"]), None);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

/// A daemon running in the empty root, killed (with unshare's child) on drop.
struct RootDaemon(Child);

impl Drop for RootDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serves_secrets_from_an_empty_root() {
    let root = empty_root("static-serve");
    let logs = TestDir::new("static-logs");
    std::fs::write(root.join("vault.json"), br#"{"v":{"i":{"f":"static-ok"}}}"#).unwrap();
    let mut cmd =
        in_empty_root(root.path(), &["/op-bridge", "daemon", "--backend", "file:/vault.json", "--socket", "/s.sock"]);
    cmd.env("OP_API_KEY_REF", "op://v/i/f")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(logs.join("daemon.out")).unwrap())
        .stderr(std::fs::File::create(logs.join("daemon.err")).unwrap());
    let mut daemon = RootDaemon(cmd.spawn().unwrap());
    let log = || std::fs::read_to_string(logs.join("daemon.err")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !raw_exchange(&root.join("s.sock"), b"PING\n", Duration::from_secs(2)).is_ok_and(|r| r.starts_with(b"OK")) {
        assert!(daemon.0.try_wait().unwrap().is_none(), "daemon exited:\n{}", log());
        assert!(Instant::now() < deadline, "daemon not ready:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }

    let request = br#"{"protocolVersion":1,"provider":"opb","ids":["API_KEY","v/i/f","NOPE"]}"#;
    let out = run(in_empty_root(root.path(), &["/op-bridge", "get", "--socket", "/s.sock"]), Some(request));
    assert_eq!(out.status.code(), Some(0), "{}\ndaemon:\n{}", describe(&out), log());
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["values"]["API_KEY"], "static-ok", "{}", describe(&out));
    assert_eq!(reply["values"]["v/i/f"], "static-ok", "{}", describe(&out));
    assert_eq!(reply["errors"]["NOPE"]["code"], "NOT_FOUND", "{}", describe(&out));

    let out = run(in_empty_root(root.path(), &["/op-bridge", "get", "API_KEY", "--socket", "/s.sock"]), None);
    assert_eq!(out.stdout, b"static-ok", "{}", describe(&out));
    drop(daemon);
}

/// Runs `docker/entrypoint.sh APP…` as PID 1 of a new pid namespace, like a container: when
/// it (the app, after `exec`) exits, the kernel kills the background daemon too.
fn entrypoint(dir: &TestDir, env: &[(&str, String)], app: &str) -> Output {
    let unshare = which::which("unshare").expect("unshare (util-linux) is needed");
    let path = format!("{}:/usr/bin:/bin", bin().parent().unwrap().display());
    let mut cmd = Command::new(unshare);
    cmd.args(["--pid", "--fork", "--kill-child", "/bin/sh"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/entrypoint.sh"))
        .args(["/bin/sh", "-c", app])
        .env_clear()
        .env("PATH", path)
        .env("OP_BRIDGE_SOCKET", dir.join("s.sock"))
        .envs(env.iter().map(|(k, v)| (k, v)));
    run(cmd, None)
}

#[test]
fn entrypoint_script_waits_for_the_daemon_and_execs_the_app() {
    let dir = TestDir::new("entrypoint");
    std::fs::write(dir.join("vault.json"), br#"{"v":{"i":{"f":"ep-ok"}}}"#).unwrap();
    let env = [
        ("OP_BRIDGE_BACKEND", format!("file:{}", dir.join("vault.json").display())),
        ("OP_SERVICE_ACCOUNT_TOKEN", "ops_not_for_the_app".to_string()),
        ("OP_API_KEY_REF", "op://v/i/f".to_string()),
    ];
    let out = entrypoint(&dir, &env, "echo pid=$$; env; echo; op-bridge get API_KEY");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("pid=1\n"), "the app replaced the script as PID 1: {}", describe(&out));
    assert!(stdout.ends_with("\nep-ok"), "{}", describe(&out));
    assert!(stdout.contains("OP_BRIDGE_SOCKET="), "{}", describe(&out));
    for stripped in ["OP_SERVICE_ACCOUNT_TOKEN", "OP_API_KEY_REF"] {
        assert!(!stdout.contains(stripped), "{stripped} reached the app: {}", describe(&out));
    }
}

#[test]
fn entrypoint_script_does_not_start_the_app_without_secrets() {
    let dir = TestDir::new("entrypoint-fail");
    let env = [
        ("OP_BRIDGE_BACKEND", format!("file:{}", dir.join("absent.json").display())),
        ("OP_API_KEY_REF", "op://v/i/f".to_string()),
    ];
    let out = entrypoint(&dir, &env, "echo APP STARTED");
    assert_eq!(out.status.code(), Some(op_bridge::exit::SECRETS_UNAVAILABLE.into()), "{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("APP STARTED"), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited with status 69"), "{}", describe(&out));

    let mut cmd = Command::new("/bin/sh");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/entrypoint.sh")).env_clear();
    let out = run(cmd, None);
    assert_eq!(out.status.code(), Some(2), "no command is a usage error: {}", describe(&out));
}
