//! Every `docker run` example in the README, `docs/`, the skill and `docker/` runs as written, as far
//! as op-bridge is concerned: its `-e` variables go to a real `op-bridge run` (the file
//! backend standing in for 1Password, with a vault holding every reference the examples name),
//! every id of a mounted OpenClaw config must resolve, and every `docker exec` verify line of
//! the same file that calls op-bridge must succeed inside it.
//!
//! "Inside" means what the image provides: op-bridge at `/usr/local/bin/op-bridge`, the
//! socket at `/run/op-bridge/op-bridge.sock` and `OP_BRIDGE_SOCKET` set (docker/Dockerfile's
//! ENV). A private mount namespace (`unshare --mount`, needs root like the PID 1 tests) gives
//! both without touching the machine: a tmpfs on /run and the binary bound over
//! /usr/local/bin. (Not on /tmp: the test's own files may live there, in a clone under /tmp.)

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files of a directory, sorted (a page added later is checked without a change here).
fn markdown_in(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    files
}

/// The files whose examples a user copies: the README, every page of `docs/`, the skill and `docker/`.
fn documents() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    files.extend(markdown_in("docs"));
    files.push(repo().join("skill/SKILL.md"));
    files.extend(markdown_in("skill/Workflows"));
    files.extend(["docker/Dockerfile", "docker/openclaw.json5", "docker/entrypoint.sh"].map(|f| repo().join(f)));
    files
}

/// Logical lines (backslash continuations joined), with comment markers of Dockerfile, shell
/// and JSON5 files removed so that examples in comments count too.
fn logical_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let markdown = path.extension().is_some_and(|e| e == "md");
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut first = 0;
    for (number, raw) in text.lines().enumerate() {
        let mut line = raw.trim();
        if !markdown {
            line = line.trim_start_matches("//").trim_start_matches('#').trim();
        }
        if current.is_empty() {
            first = number + 1;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push((first, std::mem::take(&mut current)));
            }
        }
    }
    lines
}

/// Splits a command line like the shell (quotes and backslashes; `$PWD` is the repository).
fn shell_words(line: &str) -> Vec<String> {
    let line = line.replace("$PWD", repo().to_str().unwrap());
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some(e @ ('"' | '\\' | '$' | '`')) => word.push(e),
                            Some(e) => {
                                word.push('\\');
                                word.push(e);
                            }
                            None => {}
                        },
                        _ => word.push(q),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(e) = chars.next() {
                    word.push(e);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// One `docker run` example: its variables and the host files it mounts.
#[derive(Debug)]
struct DockerRun {
    place: String,
    env: Vec<(String, String)>,
    mounts: Vec<PathBuf>,
}

fn parse_docker_run(place: String, line: &str) -> Option<DockerRun> {
    let words = shell_words(line);
    let start = words.windows(2).position(|w| w[0] == "docker" && w[1] == "run")? + 2;
    let mut run = DockerRun { place, env: Vec::new(), mounts: Vec::new() };
    let mut rest = words[start..].iter();
    while let Some(word) = rest.next() {
        match word.as_str() {
            "-e" | "--env" => {
                let spec = rest.next()?;
                let (key, value) = match spec.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    // `-e NAME` passes the caller's value: any value will do here.
                    None => (spec.clone(), format!("stand-in-{spec}")),
                };
                run.env.push((key, value));
            }
            "-v" | "--volume" => {
                let spec = rest.next()?;
                run.mounts.push(PathBuf::from(spec.split(':').next()?));
            }
            "--name" | "--ulimit" | "-p" | "--user" | "-w" | "--entrypoint" => {
                rest.next();
            }
            flag if flag.starts_with('-') => {}
            // The image: what follows would be its CMD, which op-bridge runs as the child.
            _ => break,
        }
    }
    Some(run)
}

/// The ids of an OpenClaw config's exec SecretRefs (`source: "exec", … id: "…"`).
fn config_ids(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//") && l.contains("source: \"exec\""))
        .filter_map(|l| l.split("id: \"").nth(1)?.split('"').next().map(String::from))
        .collect()
}

/// `docker exec CONTAINER CMD…` lines that call op-bridge: CMD as a shell command.
fn exec_commands(lines: &[(usize, String)]) -> Vec<(usize, String)> {
    lines
        .iter()
        .filter_map(|(number, line)| {
            // A command line starts with it (after an optional prompt); prose that mentions
            // `docker exec -u node` is not a command.
            let line = line.trim_start();
            let mut after = line.strip_prefix("$ ").unwrap_or(line).strip_prefix("docker exec ")?.trim_start();
            // Options before the container (`-u node`, `-i`): the command runs the same.
            while after.starts_with('-') {
                let (flag, rest) = after.split_once(' ')?;
                after = rest.trim_start();
                if matches!(flag, "-u" | "--user" | "-e" | "--env" | "-w" | "--workdir") {
                    after = after.split_once(' ')?.1.trim_start();
                }
            }
            let (_, command) = after.split_once(' ')?;
            command.contains("op-bridge").then(|| (*number, command.trim().to_string()))
        })
        .collect()
}

/// A vault holding a value for each reference (`op://vault/item/field`).
fn vault_for(references: &[String]) -> serde_json::Value {
    let mut vault: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>> = BTreeMap::new();
    for reference in references {
        let parts: Vec<&str> = reference.trim_start_matches("op://").split('/').collect();
        if let [v, i, f] = parts[..] {
            vault.entry(v.into()).or_default().entry(i.into()).or_default().insert(f.into(), format!("value of {f}"));
        }
    }
    serde_json::to_value(vault).unwrap()
}

/// Runs `run`'s op-bridge part with the verify `commands` as the child; returns failures.
fn check(run: &DockerRun, commands: &[(String, String)]) -> Vec<String> {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("docs-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(bin(), dir.join("bin/op-bridge")).unwrap();
    let references: Vec<String> =
        run.env.iter().filter(|(_, v)| v.starts_with("op://")).map(|(_, v)| v.clone()).collect();
    std::fs::write(dir.join("vault.json"), vault_for(&references).to_string()).unwrap();
    let ids: Vec<String> = run
        .mounts
        .iter()
        .filter(|m| m.extension().is_some_and(|e| e == "json5") && m.exists())
        .flat_map(|m| config_ids(m))
        .collect();
    // A token file (`-e OP_…_TOKEN_FILE=PATH` with PATH mounted from the host): a stand-in
    // token in a file of our own, as `-e NAME` gets a stand-in value.
    let env: Vec<(String, String)> = run
        .env
        .iter()
        .map(|(k, v)| {
            if !k.ends_with("_TOKEN_FILE") {
                return (k.clone(), v.clone());
            }
            let file = dir.join(k.to_ascii_lowercase());
            std::fs::write(&file, format!("stand-in-{k}\n")).unwrap();
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
            (k.clone(), file.display().to_string())
        })
        .collect();
    // The child: every verify line, then the mounted config's ids as OpenClaw would ask.
    let mut script = String::from("cd /\n");
    for (place, command) in commands {
        script.push_str(&format!("( {command} ) >> \"$OUT/verify.log\" 2>&1 || echo {place} >> \"$OUT/failed\"\n"));
    }
    let request = serde_json::json!({"protocolVersion": 1, "provider": "onepassword", "ids": ids}).to_string();
    std::fs::write(dir.join("request.json"), &request).unwrap();
    script.push_str(
        "env -i /usr/local/bin/op-bridge get --socket /run/op-bridge/op-bridge.sock < \"$OUT/request.json\" > \"$OUT/ids.json\"\n",
    );
    std::fs::write(dir.join("child.sh"), script).unwrap();
    let namespace = r#"mount -t tmpfs tmpfs /run && mount --bind "$OUT/bin" /usr/local/bin && exec /usr/local/bin/op-bridge run -- sh "$OUT/child.sh""#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", namespace])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("OUT", &dir)
        .env("OP_BRIDGE_SOCKET", "/run/op-bridge/op-bridge.sock")
        .env("OP_BRIDGE_BACKEND", format!("file:{}", dir.join("vault.json").display()))
        .envs(env.iter().map(|(k, v)| (k, v)));
    let output = run_with_timeout(cmd, Duration::from_secs(60));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let mut failures = Vec::new();
    let context = || format!("{}\nverify log:\n{}", describe(&output), read("verify.log"));
    if !output.status.success() {
        failures.push(format!("{}: op-bridge run failed\n{}", run.place, context()));
    }
    for failed in read("failed").lines() {
        failures.push(format!("{}: verify line {failed} failed\n{}", run.place, context()));
    }
    if !ids.is_empty() {
        let reply: serde_json::Value = serde_json::from_str(&read("ids.json")).unwrap_or_default();
        for id in &ids {
            if reply["values"][id].as_str().is_none() {
                failures.push(format!("{}: config id {id} does not resolve: {reply}\n{}", run.place, context()));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    failures
}

/// Verify lines meant to run inside the container as OpenClaw runs op-bridge (`… | env -i
/// …op-bridge get …`), wherever they are, labelled with their file and line.
fn openclaw_style_lines() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for path in documents() {
        let name = path.strip_prefix(repo()).unwrap().display().to_string();
        for (number, line) in logical_lines(&path) {
            if line.contains("| env -i ") && line.contains("op-bridge get") && !line.contains("docker exec") {
                found.push((format!("{name}:{number}"), line));
            }
        }
    }
    found
}

#[test]
fn docker_examples_run_as_written() {
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut checked_in = Vec::new();
    let anywhere = openclaw_style_lines();
    assert!(!anywhere.is_empty(), "the skill's troubleshooting has an `env -i` verify line");
    for path in documents() {
        let name = path.strip_prefix(repo()).unwrap().display().to_string();
        let lines = logical_lines(&path);
        let mut commands: Vec<(String, String)> =
            exec_commands(&lines).into_iter().map(|(n, c)| (format!("{name}:{n}"), c)).collect();
        commands.extend(anywhere.iter().cloned());
        for (number, line) in &lines {
            if !line.contains("docker run ") {
                continue;
            }
            let Some(run) = parse_docker_run(format!("{name}:{number}"), line) else { continue };
            checked += 1;
            checked_in.push(name.clone());
            failures.extend(check(&run, &commands));
        }
    }
    assert!(checked >= 3, "expected the README's, the skill's and the Dockerfile's docker run examples");
    for page in ["README.md", "docs/containers.md"] {
        assert!(checked_in.iter().any(|p| p == page), "{page} has no docker run example any more: {checked_in:?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n=====\n"));
}

#[test]
fn shell_words_split_like_sh() {
    assert_eq!(shell_words(r#"a 'b c' "d \"e\"" f\ g"#), ["a", "b c", "d \"e\"", "f g"]);
    assert_eq!(shell_words(r#"sh -c 'printf %s "{\"x\":1}" | y'"#), ["sh", "-c", r#"printf %s "{\"x\":1}" | y"#]);
}
