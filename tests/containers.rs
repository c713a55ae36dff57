//! The images in `docker/`, built and run under a real OCI engine, driven by the real `docker`
//! CLI the way the docs write the commands.
//!
//! The engine is podman with the runc runtime (Debian's packages; `tests/containers/setup.sh`
//! installs them when missing), rootful, `--cgroup-manager cgroupfs`, no default ulimits, its
//! Docker-compatible API served on a private socket by `podman system service`; `docker` and
//! `docker-compose` talk to it through `DOCKER_HOST`. No registry is reachable: the base image
//! is a debootstrap of Debian bookworm (`tests/containers/base-image.sh`, kept between runs),
//! op-bridge is the static binary built on the host, and `op` is the repo's fake (its store
//! in a mounted directory, the exact token it accepts in its control file, so the token is in
//! no environment but `op`'s). `docker run --rm` through podman's API reports 0, so every
//! exit code is read with `docker inspect` after `docker wait`.
//!
//! A custom harness (`harness = false`): the engine's API server lives exactly as long as the
//! run, and the scenarios run one after another (they share two cores with everything else).
//! `cargo test --test containers -- NAME` runs the scenarios whose name contains NAME.
//! Needs root. `OP_BRIDGE_STATIC_BIN=/path` uses a static binary built elsewhere.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

const BASE_IMAGE: &str = "localhost/opb-bookworm:3";
const OPENCLAW: &str = "op-bridge-openclaw";
const CONNECT: &str = "op-bridge-connect";
const TOKEN: &str = "ops_eyJjb250YWluZXItdGVzdCI6InRva2VuLWZpbGUifQ";
const OPENAI: &str = "sk-openai-original";
const PODMAN_GLOBAL: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Everything a scenario needs: the API socket and a build context with the binaries.
struct Engine {
    dir: TestDir,
    host: String,
    service: Child,
    /// Names made unique to this run (several runs may share the machine).
    tag: String,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Only our own containers (they carry our label) and our own API server.
        let label = format!("label=opb-test={}", self.tag);
        let ids = self.podman(&["ps", "-aq", "--filter", &label]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            self.podman(&["rm", "-f", "-t", "0", id]);
        }
        // SAFETY: kill(2) on the API server we spawned and have not reaped.
        unsafe { libc::kill(self.service.id() as i32, libc::SIGTERM) };
        let _ = self.service.wait();
    }
}

impl Engine {
    fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.args(args)
            .env("DOCKER_HOST", &self.host)
            // No buildx here: the classic builder, which podman's API serves.
            .env("DOCKER_BUILDKIT", "0")
            .env("DOCKER_CONFIG", self.dir.join("docker-config"));
        cmd
    }

    fn docker(&self, args: &[&str]) -> Output {
        run_with_timeout(self.docker_cmd(args), Duration::from_secs(600))
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(out.status.success(), "docker {args:?} failed\n{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn podman(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("podman");
        cmd.args(PODMAN_GLOBAL).args(args);
        run_with_timeout(cmd, Duration::from_secs(300))
    }

    fn name(&self, what: &str) -> String {
        format!("opb-{what}-{}", self.tag)
    }

    /// The exit code the container's main process ended with (after it ended).
    fn exit_code(&self, container: &str) -> i64 {
        self.docker_ok(&["wait", container]);
        self.docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", container]).parse().unwrap()
    }

    fn logs(&self, container: &str) -> String {
        let out = self.docker(&["logs", container]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

/// Runs a script that must succeed (setup steps).
fn script(path: &Path, args: &[&str], limit: Duration) {
    let mut cmd = Command::new("bash");
    cmd.arg(path).args(args);
    let out = run_with_timeout(cmd, limit);
    assert!(out.status.success(), "{} failed\n{}", path.display(), describe(&out));
}

fn copy_into(from: &Path, to: &Path, mode: u32) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} → {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn write_mode(path: &Path, content: impl AsRef<[u8]>, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn start_engine() -> Engine {
    assert_eq!(unsafe { libc::geteuid() }, 0, "tests/containers.rs needs root (podman, rootful)");
    let started = Instant::now();
    script(&repo().join("tests/containers/setup.sh"), &[], Duration::from_secs(900));
    script(&repo().join("tests/containers/base-image.sh"), &[BASE_IMAGE], Duration::from_secs(1200));
    eprintln!("containers: engine and base image ready after {:?}", started.elapsed());
    let dir = TestDir::new("ctr");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("podman.sock");
    let host = format!("unix://{}", socket.display());
    let service = Command::new("podman")
        .args(PODMAN_GLOBAL)
        .args(["system", "service", "--time=0", &host])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("service.log")).unwrap())
        .spawn()
        .expect("podman runs");
    let tag = format!("{}-{}", std::process::id(), fastrand::u32(..10_000));
    let engine = Engine { dir, host, service, tag };
    assert!(
        eventually(Duration::from_secs(30), || engine.docker(&["version"]).status.success()),
        "podman's API never answered\n{}",
        std::fs::read_to_string(engine.dir.join("service.log")).unwrap_or_default()
    );

    // The build context: the repository's docker/ files, the binary built on the host and
    // the fake `op`, laid out as the offline build command in docker/Dockerfile wants.
    let ctx = engine.dir.join("ctx");
    for file in ["Dockerfile", "Dockerfile.connect", "entrypoint.sh", "compose.fleet.yml", "kubernetes.yml"] {
        copy_into(&repo().join("docker").join(file), &ctx.join("docker").join(file), 0o644);
    }
    copy_into(&repo().join(".dockerignore"), &ctx.join(".dockerignore"), 0o644);
    let binary = fixtures::static_binary();
    eprintln!("containers: static binary ready after {:?}", started.elapsed());
    copy_into(binary, &ctx.join("docker/dist/op-bridge"), 0o755);
    copy_into(&repo().join("tests/fake-op/op"), &ctx.join("docker/dist/op"), 0o755);
    engine
}

impl Engine {
    fn ctx(&self) -> PathBuf {
        self.dir.join("ctx")
    }

    /// `docker build` as docker/Dockerfile documents the offline build (run from the context).
    fn build(&self, extra: &[&str]) -> Output {
        let base = format!("BASE_IMAGE={BASE_IMAGE}");
        let mut args = vec!["build", "--build-arg", &base];
        args.extend_from_slice(extra);
        args.push(".");
        let mut cmd = self.docker_cmd(&args);
        cmd.current_dir(self.ctx());
        run_with_timeout(cmd, Duration::from_secs(900))
    }
}

/// A fake 1Password: the store and control file in a directory mounted at /fake (root-only).
struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new(engine: &Engine, what: &str) -> Fake {
        let dir = engine.dir.join(&format!("fake-{what}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let fake = Fake { dir };
        fake.write_store(&json!({"AI": {
            "OpenAI": {"credential": OPENAI},
            "Anthropic": {"credential": "sk-ant-original"},
            "OpenClaw": {"gateway-token": "gw-original"}
        }}));
        fake.control(json!({}));
        fake
    }

    fn write_store(&self, store: &Json) {
        let tmp = self.dir.join("store.json.tmp");
        write_mode(&tmp, serde_json::to_vec_pretty(store).unwrap(), 0o600);
        std::fs::rename(tmp, self.dir.join("store.json")).unwrap();
    }

    fn store(&self) -> Json {
        serde_json::from_slice(&std::fs::read(self.dir.join("store.json")).unwrap()).unwrap()
    }

    /// Knobs plus the one token this 1Password accepts.
    fn control(&self, mut knobs: Json) {
        knobs["token"] = json!(TOKEN);
        let tmp = self.dir.join("control.json.tmp");
        write_mode(&tmp, serde_json::to_vec(&knobs).unwrap(), 0o600);
        std::fs::rename(tmp, self.dir.join("control.json")).unwrap();
    }

    fn run_args(&self) -> Vec<String> {
        vec![
            "-v".into(),
            format!("{}:/fake", self.dir.display()),
            "-e".into(),
            "FAKE_OP_STORE=/fake/store.json".into(),
            "-e".into(),
            "FAKE_OP_CONTROL=/fake/control.json".into(),
        ]
    }
}

/// The token file, as the README has users make it: root's, mode 0400, trailing newline.
fn token_file(engine: &Engine) -> PathBuf {
    let path = engine.dir.join("op-token");
    if !path.exists() {
        write_mode(&path, format!("{TOKEN}\n"), 0o400);
    }
    path
}

/// The README's `docker run` (token file, references), with the fake's mounts, a label for
/// clean-up and `extra` (more options, then the image and command).
fn readme_run(engine: &Engine, name: &str, fake: &Fake, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        name.into(),
        "--label".into(),
        format!("opb-test={}", engine.tag),
        "-v".into(),
        format!("{}:/run/secrets/op-token:ro", token_file(engine).display()),
        "-e".into(),
        "OP_SERVICE_ACCOUNT_TOKEN_FILE=/run/secrets/op-token".into(),
        "-e".into(),
        "OP_OPENAI_API_KEY_REF=op://AI/OpenAI/credential".into(),
        "-e".into(),
        "OP_ANTHROPIC_API_KEY_REF=op://AI/Anthropic/credential".into(),
        "-e".into(),
        "OP_GATEWAY_TOKEN_REF=op://AI/OpenClaw/gateway-token".into(),
    ];
    args.extend(fake.run_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The application stand-in: records who it runs as and what `op-bridge get` gave it at
/// once, then waits; on SIGTERM it exits 42 (so a stop's exit code is visibly the app's).
const APP: &str = "id -un > /state/user; op-bridge get OPENAI_API_KEY > /state/at-start; \
                   echo $? > /state/at-start.rc; trap 'exit 42' TERM; while :; do sleep 0.2; done";

fn state_dir(engine: &Engine, what: &str) -> PathBuf {
    let dir = engine.dir.join(&format!("state-{what}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).unwrap();
    dir
}

fn wait_for_file(path: &Path, engine: &Engine, name: &str) -> String {
    assert!(
        eventually(Duration::from_secs(60), || path.exists()),
        "{} never appeared\n{}",
        path.display(),
        engine.logs(name)
    );
    std::thread::sleep(Duration::from_millis(200));
    std::fs::read_to_string(path).unwrap()
}

/// Starts the README's container with the app stand-in, and waits until the app ran.
fn start_app(engine: &Engine, what: &str, fake: &Fake, extra: &[&str]) -> (String, PathBuf) {
    let name = engine.name(what);
    let state = state_dir(engine, what);
    let needle = engine.dir.join("needle");
    write_mode(&needle.join("token"), TOKEN, 0o444);
    let mut more: Vec<String> = vec![
        "-v".into(),
        format!("{}:/state", state.display()),
        "-v".into(),
        format!("{}:/needle:ro", needle.display()),
        "-v".into(),
        format!("{}:/t:ro", repo().join("tests/containers").display()),
    ];
    more.extend(extra.iter().map(|s| s.to_string()));
    more.extend([OPENCLAW.to_string(), "sh".into(), "-c".into(), APP.into()]);
    let args = readme_run(engine, &name, fake, &strs(&more));
    engine.docker_ok(&strs(&args));
    wait_for_file(&state.join("at-start.rc"), engine, &name);
    (name, state)
}

// ---- the scenarios ----------------------------------------------------------------------

fn images_build_offline_at_every_stage(engine: &Engine) {
    for (file, tag, op) in [("docker/Dockerfile", OPENCLAW, true), ("docker/Dockerfile.connect", CONNECT, false)] {
        for target in ["bin", "runtime"] {
            let mut args = vec!["-f", file, "--build-arg", "OP_BRIDGE_FROM=host"];
            if op {
                args.extend(["--build-arg", "OP_FROM=host-op"]);
            }
            let bin_tag = format!("{tag}-bin");
            args.extend(["--target", target, "-t", if target == "bin" { &bin_tag } else { tag }]);
            let out = engine.build(&args);
            assert!(out.status.success(), "build {file} --target {target}\n{}", describe(&out));
        }
    }
    // The runtime image keeps the HEALTHCHECK, and op is execute-only and root's.
    // (podman's Docker API leaves it out of `docker inspect`; podman shows it.)
    let health = engine.podman(&["image", "inspect", "--format", "{{json .HealthCheck}}", OPENCLAW]);
    let health = String::from_utf8_lossy(&health.stdout);
    assert!(health.contains("op-bridge") && health.contains("ping"), "no HEALTHCHECK: {health}");
    let name = engine.name("modes");
    let out = engine.docker_ok(&[
        "run",
        "--name",
        &name,
        "--label",
        &format!("opb-test={}", engine.tag),
        "--entrypoint",
        "stat",
        OPENCLAW,
        "-c",
        "%a %u %n",
        "/usr/local/bin/op",
        "/usr/local/bin/op-bridge",
    ]);
    assert_eq!(out, "111 0 /usr/local/bin/op\n555 1000 /usr/local/bin/op-bridge", "{out}");
}

fn readme_run_with_a_token_file_resolves_first_and_no_process_of_node_sees_the_token(engine: &Engine) {
    let fake = Fake::new(engine, "scan");
    let (name, state) = start_app(engine, "scan", &fake, &[]);
    assert_eq!(std::fs::read_to_string(state.join("user")).unwrap().trim(), "node");
    assert_eq!(std::fs::read_to_string(state.join("at-start.rc")).unwrap().trim(), "0", "{}", engine.logs(&name));
    assert_eq!(std::fs::read_to_string(state.join("at-start")).unwrap(), OPENAI);
    assert!(!engine.logs(&name).contains("in the environment: a container's configuration"), "{}", engine.logs(&name));
    let found = scan(engine, &name, &fake);
    assert!(found.is_empty(), "the token was found: {found:?}");

    // The old way, `-e OP_SERVICE_ACCOUNT_TOKEN`: the same scan finds it in the environment of
    // the `docker exec` process (the scan can fail), and op-bridge warns.
    let old = engine.name("scan-env");
    let state = state_dir(engine, "scan-env");
    let mut args = readme_run(engine, &old, &fake, &[]);
    // Drop the file and pass the token in the container's configuration instead.
    let at = args.iter().position(|a| a.starts_with("OP_SERVICE_ACCOUNT_TOKEN_FILE")).unwrap();
    args[at] = format!("OP_SERVICE_ACCOUNT_TOKEN={TOKEN}");
    args.extend(
        [
            "-v",
            &format!("{}:/state", state.display()),
            "-v",
            &format!("{}:/needle:ro", engine.dir.join("needle").display()),
            "-v",
            &format!("{}:/t:ro", repo().join("tests/containers").display()),
            OPENCLAW,
            "sh",
            "-c",
            APP,
        ]
        .map(String::from),
    );
    engine.docker_ok(&strs(&args));
    wait_for_file(&state.join("at-start.rc"), engine, &old);
    let found = scan(engine, &old, &fake);
    assert!(
        found.iter().any(|f| f[0] == "environ"),
        "the scan missed the token in docker exec's environment: {found:?}"
    );
    assert!(engine.logs(&old).contains("OP_SERVICE_ACCOUNT_TOKEN_FILE"), "no warning\n{}", engine.logs(&old));
}

/// While a `docker exec -u node` process runs, scans as node every readable
/// /proc/*/environ and cmdline (refreshing meanwhile, so `op` runs); returns what it found.
fn scan(engine: &Engine, name: &str, fake: &Fake) -> Vec<Json> {
    fake.control(json!({"process_ms": 400}));
    let mut exec = engine.docker_cmd(&["exec", "-u", "node", name, "sleep", "20"]);
    let mut sleeper = exec.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let out = engine.docker(&["exec", "-u", "node", name, "python3", "/t/scan-proc.py", "/needle/token", "6"]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    fake.control(json!({}));
    assert!(out.status.success(), "scan failed\n{}", describe(&out));
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    // The scan read more than its own environment: the app's and the other exec's at least.
    assert!(report["environ_read"].as_array().unwrap().len() >= 2, "{report}");
    report["found"].as_array().unwrap().clone()
}

fn exec_get_hup_refresh_and_a_rotation_just_before_stop(engine: &Engine) {
    let fake = Fake::new(engine, "life");
    let (name, _) = start_app(engine, "life", &fake, &[]);
    // `docker exec -u node … op-bridge get NAME`
    assert_eq!(engine.docker_ok(&["exec", "-u", "node", &name, "op-bridge", "get", "OPENAI_API_KEY"]), OPENAI);
    // `docker kill -s HUP` picks up a change made in 1Password.
    let mut store = fake.store();
    store["AI"]["OpenAI"]["credential"] = json!("sk-openai-changed-upstream");
    fake.write_store(&store);
    engine.docker_ok(&["kill", "-s", "HUP", &name]);
    assert!(
        eventually(Duration::from_secs(30), || {
            engine.docker(&["exec", "-u", "node", &name, "op-bridge", "get", "OPENAI_API_KEY"]).stdout
                == b"sk-openai-changed-upstream"
        }),
        "HUP did not refresh\n{}",
        engine.logs(&name)
    );
    // A rotation accepted just before `docker stop` (1Password slow to store it) reaches
    // 1Password, and the container's exit code is the app's.
    fake.control(json!({"slow_edit_ms": 3000}));
    let mut set = engine.docker_cmd(&["exec", "-i", "-u", "node", &name, "op-bridge", "set", "OPENAI_API_KEY", "-"]);
    let mut set = set.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::io::Write::write_all(set.stdin.as_mut().unwrap(), b"sk-rotated-before-stop").unwrap();
    drop(set.stdin.take());
    std::thread::sleep(Duration::from_millis(1500));
    engine.docker_ok(&["stop", "-t", "60", &name]);
    let _ = set.wait();
    assert_eq!(engine.exit_code(&name), 42, "{}", engine.logs(&name));
    assert_eq!(fake.store()["AI"]["OpenAI"]["credential"], "sk-rotated-before-stop", "{}", engine.logs(&name));
}

fn exit_codes_7_and_139_pass_through(engine: &Engine) {
    let fake = Fake::new(engine, "codes");
    for (code, command) in [(7, "exit 7"), (139, "kill -SEGV $$")] {
        let name = engine.name(&format!("code{code}"));
        let args = readme_run(engine, &name, &fake, &[OPENCLAW, "sh", "-c", command]);
        engine.docker_ok(&strs(&args));
        assert_eq!(engine.exit_code(&name), code, "{}", engine.logs(&name));
    }
}

fn healthcheck_passes(engine: &Engine) {
    let fake = Fake::new(engine, "health");
    let (name, _) = start_app(engine, "health", &fake, &[]);
    // The image's HEALTHCHECK allows 3 failures in a row (a loaded machine can make one
    // `podman exec` outlast its 5 s timeout); it must pass within as many tries.
    let mut last = None;
    for _ in 0..3 {
        let out = engine.podman(&["healthcheck", "run", &name]);
        if out.status.success() {
            return;
        }
        last = Some(out);
    }
    panic!("healthcheck failed 3 times\n{}\n{}", describe(&last.unwrap()), engine.logs(&name));
}

fn no_zombies_after_a_burst_of_orphans(engine: &Engine) {
    let fake = Fake::new(engine, "zombies");
    let name = engine.name("zombies");
    let burst = "for i in $(seq 60); do sh -c 'sleep 0.3 & exit 0'; done; touch /tmp/burst-done; \
                 while :; do sleep 1; done";
    let args = readme_run(engine, &name, &fake, &[OPENCLAW, "sh", "-c", burst]);
    engine.docker_ok(&strs(&args));
    assert!(eventually(Duration::from_secs(60), || engine
        .docker(&["exec", &name, "test", "-e", "/tmp/burst-done"])
        .status
        .success()));
    let zombies = || {
        let ps = engine.docker_ok(&["exec", &name, "ps", "-eo", "stat=,pid=,ppid=,comm="]);
        ps.lines().filter(|l| l.trim_start().starts_with('Z')).map(String::from).collect::<Vec<_>>()
    };
    assert!(eventually(Duration::from_secs(20), || zombies().is_empty()), "zombies: {:?}", zombies());
    let ps = engine.docker_ok(&["exec", &name, "ps", "-eo", "pid=,comm="]);
    assert!(!ps.contains("sleep 0.3"), "{ps}");
}

fn the_classic_entrypoint_sh_pattern(engine: &Engine) {
    let fake = Fake::new(engine, "classic");
    let name = engine.name("classic");
    let app = "op-bridge get OPENAI_API_KEY && echo && env";
    let args = readme_run(
        engine,
        &name,
        &fake,
        &["--init", "--entrypoint", "/usr/local/bin/op-bridge-entrypoint.sh", OPENCLAW, "sh", "-c", app],
    );
    engine.docker_ok(&strs(&args));
    assert_eq!(engine.exit_code(&name), 0, "{}", engine.logs(&name));
    let logs = engine.logs(&name);
    assert!(logs.lines().any(|l| l == OPENAI), "{logs}");
    assert!(!logs.contains("_REF=op://") && !logs.contains(TOKEN), "{logs}");
}

fn kubernetes_manifest_runs_with_podman_kube_play(engine: &Engine) {
    let fake = Fake::new(engine, "k8s");
    // podman 4.3's Secret volumes write each `data` value as its base64 text, not decoded
    // (and ignore defaultMode): the Secret's value is chosen so that text is the token.
    let k8s_token = "b3BzX2s4c19zZWNyZXRfdm9sdW1lX3Rva2Vu";
    let mut control: Json = serde_json::from_slice(&std::fs::read(fake.dir.join("control.json")).unwrap()).unwrap();
    control["token"] = json!(k8s_token);
    // The manifest's image plus the fake 1Password and a stand-in `openclaw`.
    let ctx = engine.dir.join("k8s-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(fake.dir.join("store.json"), ctx.join("store.json")).unwrap();
    std::fs::write(ctx.join("control.json"), serde_json::to_vec(&control).unwrap()).unwrap();
    write_mode(&ctx.join("openclaw"), "#!/bin/sh\nexec sleep infinity\n", 0o755);
    copy_into(&repo().join("tests/containers/k8s-test.Dockerfile"), &ctx.join("Dockerfile"), 0o644);
    let image = format!("localhost/opb-test-k8s:{}", engine.tag);
    let mut cmd = engine.docker_cmd(&["build", "--build-arg", &format!("IMAGE={OPENCLAW}"), "-t", &image, "."]);
    cmd.current_dir(&ctx);
    let out = run_with_timeout(cmd, Duration::from_secs(600));
    assert!(out.status.success(), "{}", describe(&out));

    let manifest = std::fs::read_to_string(repo().join("docker/kubernetes.yml")).unwrap();
    assert!(manifest.contains("image: op-bridge-openclaw\n"), "the manifest's image line moved");
    let pod = format!("openclaw-{}", engine.tag.replace('-', ""));
    let secret = format!("op-bridge-token-{}", engine.tag.replace('-', ""));
    let manifest = manifest
        .replace("image: op-bridge-openclaw\n", &format!("image: {image}\n"))
        .replace("name: openclaw\nspec:", &format!("name: {pod}\nspec:"))
        .replace("secretName: op-bridge-token", &format!("secretName: {secret}"));
    let data = k8s_token;
    let yaml =
        format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: {secret}\ndata:\n  token: {data}\n---\n{manifest}");
    let file = engine.dir.join("kube.yml");
    write_mode(&file, yaml, 0o600);
    let played = engine.podman(&["kube", "play", file.to_str().unwrap()]);
    let container = format!("{pod}-openclaw");
    let cleanup = || {
        engine.podman(&["kube", "down", file.to_str().unwrap()]);
        engine.podman(&["secret", "rm", &secret]);
        // podman keeps a Secret volume as a named volume.
        engine.podman(&["volume", "rm", "-f", &secret]);
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(played.status.success(), "kube play\n{}", describe(&played));
        let get = || engine.podman(&["exec", "-u", "node", &container, "op-bridge", "get", "OPENAI_API_KEY"]);
        assert!(
            eventually(Duration::from_secs(60), || get().stdout == OPENAI.as_bytes()),
            "{}\n{}",
            describe(&get()),
            describe(&engine.podman(&["logs", &container]))
        );
        // With defaultMode 0400 node cannot read the token file; where the engine ignores it
        // (podman 4.3), op-bridge says so at start.
        let read = engine.podman(&["exec", "-u", "node", &container, "cat", "/run/secrets/op-bridge/token"]);
        let logs = describe(&engine.podman(&["logs", &container]));
        let warned = logs.contains("names a file the command's uid 1000 can read");
        assert_eq!(read.status.success(), warned, "{}\n{logs}", describe(&read));
        let scan =
            engine.podman(&["exec", "-u", "node", &container, "sh", "-c", "cat /proc/*/environ /proc/*/cmdline"]);
        assert!(!String::from_utf8_lossy(&scan.stdout).contains(k8s_token), "the token is in an environment");
    }));
    cleanup();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn the_compose_fleet_resolves_through_connect_and_shares_a_rotation(engine: &Engine) {
    let ctx = engine.ctx();
    // The fake Connect server's image.
    let fc = engine.dir.join("fc-ctx");
    copy_into(&repo().join("tests/fake-connect/server.py"), &fc.join("server.py"), 0o644);
    copy_into(&repo().join("tests/containers/fake-connect.Dockerfile"), &fc.join("Dockerfile"), 0o644);
    let fc_image = format!("localhost/opb-fake-connect:{}", engine.tag);
    let mut cmd =
        engine.docker_cmd(&["build", "--build-arg", &format!("BASE_IMAGE={BASE_IMAGE}"), "-t", &fc_image, "."]);
    cmd.current_dir(&fc);
    let out = run_with_timeout(cmd, Duration::from_secs(600));
    assert!(out.status.success(), "{}", describe(&out));

    // Its store: the vault with the agents' items, in a directory the test reads.
    let data = engine.dir.join("connect-data");
    std::fs::create_dir_all(&data).unwrap();
    let item = |id: &str, title: &str, value: &str| {
        json!({"id": id, "title": title, "version": 1, "category": "API_CREDENTIAL",
               "vault": {"id": "vaultai0000000000000000000"},
               "fields": [{"id": "credential", "label": "credential", "type": "CONCEALED", "value": value}]})
    };
    let store = json!({"vaults": [{"id": "vaultai0000000000000000000", "name": "AI", "items": [
        item("itemopenai0000000000000000", "OpenAI", OPENAI),
        item("itemoauth00000000000000000", "Agent 1 OAuth", "oauth-original"),
    ]}]});
    write_mode(&data.join("store.json"), serde_json::to_vec_pretty(&store).unwrap(), 0o644);
    let connect_value = || -> Json {
        let store: Json = serde_json::from_slice(&std::fs::read(data.join("store.json")).unwrap()).unwrap();
        store["vaults"][0]["items"][0]["fields"][0]["value"].clone()
    };

    // The Compose file as documented: the token file next to it, root's; connect-api's
    // credentials file (unused by the fake) must exist to be mounted.
    write_mode(&ctx.join("docker/connect-token"), format!("{TOKEN}\n"), 0o400);
    write_mode(&ctx.join("docker/1password-credentials.json"), "{}", 0o644);
    // The test's overrides: the fake in place of 1Password's two images, an app that stays up.
    let overrides = format!(
        "services:\n  connect-api:\n    image: {fc_image}\n    environment:\n      FAKE_CONNECT_STORE: /data/store.json\n      \
         FAKE_CONNECT_TOKEN: \"{TOKEN}\"\n    volumes:\n      - {data}:/data\n  connect-sync:\n    image: {fc_image}\n    \
         command: [\"sleep\", \"infinity\"]\n  agent-1:\n    command: [\"sleep\", \"infinity\"]\n  agent-2:\n    \
         command: [\"sleep\", \"infinity\"]\n",
        data = data.display()
    );
    write_mode(&ctx.join("docker/compose.test.yml"), overrides, 0o644);
    let project = format!("opbfleet{}", engine.tag.replace('-', ""));
    let compose = |args: &[&str]| {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["-p", &project, "-f", "docker/compose.fleet.yml", "-f", "docker/compose.test.yml"])
            .args(args)
            .current_dir(&ctx)
            .env("DOCKER_HOST", &engine.host);
        run_with_timeout(cmd, Duration::from_secs(300))
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let up = compose(&["up", "-d", "--no-build"]);
        assert!(up.status.success(), "compose up\n{}", describe(&up));
        let id = |service: &str| {
            let out = compose(&["ps", "-q", service]);
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let (agent1, agent2) = (id("agent-1"), id("agent-2"));
        let get =
            |agent: &str| engine.docker(&["exec", "-u", "node", agent, "op-bridge", "get", "OPENAI_API_KEY"]).stdout;
        for agent in [&agent1, &agent2] {
            assert!(
                eventually(Duration::from_secs(90), || get(agent) == OPENAI.as_bytes()),
                "{agent} did not resolve\n{}",
                engine.logs(agent)
            );
        }
        for agent in [&agent1, &agent2] {
            let logs = engine.logs(agent);
            assert!(!logs.contains("names a file the command's uid"), "{logs}");
            let read = engine.docker(&["exec", "-u", "node", agent, "cat", "/run/secrets/connect-token"]);
            assert!(!read.status.success(), "node reads the Connect token: {}", describe(&read));
        }
        // A rotation in agent-1 reaches Connect …
        let mut set =
            engine.docker_cmd(&["exec", "-i", "-u", "node", &agent1, "op-bridge", "set", "OPENAI_API_KEY", "-"]);
        let set = run_with_input(
            std::mem::replace(&mut set, Command::new("true")),
            Some(b"sk-rotated-by-agent-1"),
            Duration::from_secs(60),
        );
        assert!(set.status.success(), "{}", describe(&set));
        assert!(
            eventually(Duration::from_secs(30), || connect_value() == "sk-rotated-by-agent-1"),
            "Connect has {}",
            connect_value()
        );
        // … and agent-2 sees it after a refresh.
        assert!(
            eventually(Duration::from_secs(60), || {
                engine.docker(&["kill", "-s", "HUP", &agent2]);
                std::thread::sleep(Duration::from_secs(1));
                get(&agent2) == b"sk-rotated-by-agent-1"
            }),
            "agent-2 did not see the rotation\n{}",
            engine.logs(&agent2)
        );
    }));
    let down = compose(&["down", "-v", "-t", "5"]);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert!(down.status.success(), "compose down\n{}", describe(&down));
}

type Scenario = (&'static str, fn(&Engine));

const SCENARIOS: &[Scenario] = &[
    ("images_build_offline_at_every_stage", images_build_offline_at_every_stage),
    (
        "readme_run_with_a_token_file_resolves_first_and_no_process_of_node_sees_the_token",
        readme_run_with_a_token_file_resolves_first_and_no_process_of_node_sees_the_token,
    ),
    ("exec_get_hup_refresh_and_a_rotation_just_before_stop", exec_get_hup_refresh_and_a_rotation_just_before_stop),
    ("exit_codes_7_and_139_pass_through", exit_codes_7_and_139_pass_through),
    ("healthcheck_passes", healthcheck_passes),
    ("no_zombies_after_a_burst_of_orphans", no_zombies_after_a_burst_of_orphans),
    ("the_classic_entrypoint_sh_pattern", the_classic_entrypoint_sh_pattern),
    ("kubernetes_manifest_runs_with_podman_kube_play", kubernetes_manifest_runs_with_podman_kube_play),
    (
        "the_compose_fleet_resolves_through_connect_and_shares_a_rotation",
        the_compose_fleet_resolves_through_connect_and_shares_a_rotation,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in SCENARIOS {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    if chosen.is_empty() {
        println!("running 0 tests");
        return;
    }
    let started = Instant::now();
    let engine = start_engine();
    // Every other scenario runs the images the first one builds.
    let build_first = !chosen.iter().any(|(name, _)| *name == SCENARIOS[0].0);
    let mut failed = Vec::new();
    println!("running {} tests", chosen.len());
    if build_first {
        images_build_offline_at_every_stage(&engine);
    }
    for (name, scenario) in &chosen {
        let began = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&engine)));
        println!("test {name} ... {} ({:.1?})", if outcome.is_ok() { "ok" } else { "FAILED" }, began.elapsed());
        if outcome.is_err() {
            failed.push(*name);
        }
    }
    drop(engine);
    println!(
        "\ntest result: {}. {} passed; {} failed; finished in {:.1?}",
        if failed.is_empty() { "ok" } else { "FAILED" },
        chosen.len() - failed.len(),
        failed.len(),
        started.elapsed()
    );
    if !failed.is_empty() {
        println!("failures: {failed:?}");
        std::process::exit(101);
    }
}
