//! Every `op-bridge` command the agent skill, the README and `docs/` show (and the ones in
//! `docker/`) is one the binary accepts: it parses with the real command line
//! (`Cli::try_parse_from`), and for `run`/`daemon` the options that are checked only after
//! parsing (backend, watch specs, log level, `--on-change`) are valid too. The docs pages are
//! linked from the README and the skill, and their links lead somewhere.
//!
//! Commands are found in fenced code blocks (shell, Dockerfile, JSON5) and in inline code
//! spans that start with `op-bridge `. Shell text is split by a small tokenizer: quotes,
//! backslash escapes and line continuations; `$VAR`, `${VAR}` and `$(…)` become a
//! placeholder word (a command substitution is checked as a command of its own); pipelines,
//! lists and redirections are split off; assignments and wrappers (`env`, `sudo`, `exec`,
//! `until`, `docker exec CONTAINER`, `sh -c SCRIPT`) are stepped over. Syntax it does not
//! know (here-documents, backquotes) fails the test rather than being skipped. A `text` block
//! (a synopsis, a program's output) is shown, not run, and is not checked.

use std::path::{Path, PathBuf};

use clap::Parser;
use op_bridge::cli::{Cli, Command};

/// Where each command was found, for failure messages.
#[derive(Debug)]
struct Found {
    place: String,
    argv: Vec<String>,
}

const PLACEHOLDER: &str = "PLACEHOLDER";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn skill_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("skill/SKILL.md")];
    let mut workflows: Vec<PathBuf> = std::fs::read_dir(repo().join("skill/Workflows"))
        .expect("skill/Workflows exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    workflows.sort();
    files.extend(workflows);
    files
}

// ---- shell tokenizer ------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    /// `|`, `||`, `&&`, `;`, `&`, `(`, `)`: ends a simple command.
    Sep,
    /// A redirection whose target is the next word (`>`, `>>`, `<`).
    Redirect,
}

/// Splits one logical shell line. `subs` collects the text of `$(…)` substitutions.
fn tokenize(line: &str, subs: &mut Vec<String>) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = line.chars().collect();
    let mut toks = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut i = 0;
    let flush = |word: &mut String, in_word: &mut bool, toks: &mut Vec<Tok>| {
        if *in_word {
            toks.push(Tok::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => {
                flush(&mut word, &mut in_word, &mut toks);
                i += 1;
            }
            '#' if !in_word => break,
            '\'' => {
                let end = chars[i + 1..].iter().position(|&c| c == '\'').ok_or("unterminated '")? + i + 1;
                word.extend(&chars[i + 1..end]);
                in_word = true;
                i = end + 1;
            }
            '"' => {
                in_word = true;
                i += 1;
                loop {
                    let c = *chars.get(i).ok_or("unterminated \"")?;
                    match c {
                        '"' => break,
                        '\\' if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) => {
                            word.push(chars[i + 1]);
                            i += 2;
                        }
                        '$' => i = expand(&chars, i, &mut word, subs)?,
                        '`' => return Err("backquotes are not supported; use $(…)".into()),
                        _ => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
            }
            '\\' => {
                word.push(*chars.get(i + 1).ok_or("trailing backslash")?);
                in_word = true;
                i += 2;
            }
            '$' => {
                in_word = true;
                i = expand(&chars, i, &mut word, subs)?;
            }
            '`' => return Err("backquotes are not supported; use $(…)".into()),
            '|' | ';' | '(' | ')' => {
                flush(&mut word, &mut in_word, &mut toks);
                toks.push(Tok::Sep);
                i += if chars.get(i + 1) == Some(&c) { 2 } else { 1 };
            }
            '&' if chars.get(i + 1) == Some(&'>') => {
                flush(&mut word, &mut in_word, &mut toks);
                toks.push(Tok::Redirect);
                i += if chars.get(i + 2) == Some(&'>') { 3 } else { 2 };
            }
            '&' => {
                flush(&mut word, &mut in_word, &mut toks);
                toks.push(Tok::Sep);
                i += if chars.get(i + 1) == Some(&'&') { 2 } else { 1 };
            }
            '<' | '>' => {
                // A word of digits right before is the file descriptor, not an argument.
                if in_word && word.chars().all(|c| c.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                }
                flush(&mut word, &mut in_word, &mut toks);
                if c == '<' && chars.get(i + 1) == Some(&'<') {
                    return Err("here-documents are not supported".into());
                }
                i += 1;
                if chars.get(i) == Some(&'>') {
                    i += 1;
                }
                if chars.get(i) == Some(&'&') {
                    // `>&2`, `2>&1`, `>&-`: no target word.
                    i += 1;
                    while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '-') {
                        i += 1;
                    }
                } else {
                    toks.push(Tok::Redirect);
                }
            }
            _ => {
                word.push(c);
                in_word = true;
                i += 1;
            }
        }
    }
    flush(&mut word, &mut in_word, &mut toks);
    Ok(toks)
}

/// Expands `$NAME`, `${…}`, `$(…)` or a special parameter at `chars[i] == '$'` into the
/// placeholder; returns the index after it.
fn expand(chars: &[char], i: usize, word: &mut String, subs: &mut Vec<String>) -> Result<usize, String> {
    let close = |open: char, close: char| -> Result<usize, String> {
        let mut depth = 0;
        for (j, &c) in chars.iter().enumerate().skip(i + 1) {
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(j);
                }
            }
        }
        Err(format!("unterminated ${open}"))
    };
    let next = match chars.get(i + 1) {
        Some('(') => {
            let end = close('(', ')')?;
            subs.push(chars[i + 2..end].iter().collect());
            end + 1
        }
        Some('{') => close('{', '}')? + 1,
        Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
            let mut j = i + 1;
            while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            j
        }
        Some('?' | '$' | '!' | '#' | '@' | '*' | '0'..='9') => i + 2,
        _ => {
            word.push('$');
            return Ok(i + 1);
        }
    };
    word.push_str(PLACEHOLDER);
    Ok(next)
}

fn is_assignment(word: &str) -> bool {
    let Some((name, _)) = word.split_once('=') else { return false };
    !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_op_bridge(word: &str) -> bool {
    word == "op-bridge" || word.ends_with("/op-bridge")
}

/// Steps over assignments and wrappers; returns the argv of an op-bridge command, if this
/// simple command is one. `scripts` collects `sh -c` scripts.
fn op_bridge_argv(words: &[String], scripts: &mut Vec<String>) -> Option<Vec<String>> {
    let mut rest = words;
    loop {
        let first = rest.first()?.as_str();
        match first {
            _ if is_assignment(first) => rest = &rest[1..],
            "sudo" | "exec" | "time" | "nohup" | "until" | "while" | "if" | "then" | "do" | "!" => rest = &rest[1..],
            "env" => {
                rest = &rest[1..];
                while let Some(w) = rest.first() {
                    match w.as_str() {
                        "-i" | "--ignore-environment" => rest = &rest[1..],
                        "-u" => rest = &rest[2.min(rest.len())..],
                        _ if is_assignment(w) => rest = &rest[1..],
                        _ => break,
                    }
                }
            }
            "docker" if rest.get(1).is_some_and(|w| w == "exec") => {
                rest = &rest[2..];
                while let Some(w) = rest.first() {
                    match w.as_str() {
                        "-u" | "--user" | "-e" | "--env" | "-w" | "--workdir" => rest = &rest[2.min(rest.len())..],
                        _ if w.starts_with('-') => rest = &rest[1..],
                        _ => break,
                    }
                }
                rest = rest.get(1..)?; // the container
            }
            // `docker compose [-f FILE…] exec [-T] SERVICE CMD…` (and `docker-compose`).
            "docker" | "docker-compose"
                if rest.iter().take_while(|w| *w != "exec").any(|w| w == "compose" || first == "docker-compose")
                    && rest.iter().any(|w| w == "exec") =>
            {
                rest = &rest[rest.iter().position(|w| w == "exec")? + 1..];
                while let Some(w) = rest.first() {
                    match w.as_str() {
                        "-u" | "--user" | "-e" | "--env" | "-w" | "--workdir" => rest = &rest[2.min(rest.len())..],
                        _ if w.starts_with('-') => rest = &rest[1..],
                        _ => break,
                    }
                }
                rest = rest.get(1..)?; // the service
            }
            "sh" | "bash" if rest.get(1).is_some_and(|w| w == "-c") => {
                scripts.push(rest.get(2)?.clone());
                return None;
            }
            _ if is_op_bridge(first) => {
                let mut argv = vec!["op-bridge".to_string()];
                argv.extend(rest[1..].iter().cloned());
                return Some(argv);
            }
            _ => return None,
        }
    }
}

/// All op-bridge commands on one logical shell line (recursing into `$(…)` and `sh -c`).
fn shell_commands(line: &str, place: &str, out: &mut Vec<Found>) -> Result<usize, String> {
    let mut subs = Vec::new();
    let toks = tokenize(line, &mut subs).map_err(|e| format!("{place}: cannot split `{line}`: {e}"))?;
    let mut found = 0;
    let mut scripts = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut skip_next = false;
    for tok in toks.into_iter().chain([Tok::Sep]) {
        match tok {
            Tok::Word(w) if skip_next => {
                skip_next = false;
                let _ = w;
            }
            Tok::Word(w) => words.push(w),
            Tok::Redirect => skip_next = true,
            Tok::Sep => {
                if let Some(argv) = op_bridge_argv(&words, &mut scripts) {
                    out.push(Found { place: place.to_string(), argv });
                    found += 1;
                }
                words.clear();
            }
        }
    }
    for inner in subs.iter().chain(scripts.iter()) {
        found += shell_commands(inner, place, out)?;
    }
    Ok(found)
}

// ---- documents ------------------------------------------------------------------------

/// A JSON array of strings after `prefix` on this line, e.g. `ENTRYPOINT ["a", "b"]`.
fn json_array(line: &str, prefix: &str) -> Option<Vec<String>> {
    let rest = line.trim().strip_prefix(prefix)?.trim();
    rest.starts_with('[').then(|| serde_json::from_str(rest).unwrap_or_else(|e| panic!("bad array `{line}`: {e}")))
}

/// ENTRYPOINT (+ CMD) and HEALTHCHECK CMD of a Dockerfile or Dockerfile snippet.
fn dockerfile_commands(lines: &[&str], place: &str, out: &mut Vec<Found>) {
    // Join continuation lines so `HEALTHCHECK … \` + `CMD [...]` is one instruction.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in lines {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let entrypoint = instructions.iter().find_map(|l| json_array(l, "ENTRYPOINT"));
    let cmd = instructions.iter().find_map(|l| json_array(l, "CMD"));
    if let Some(entrypoint) = entrypoint.filter(|e| e.first().is_some_and(|w| is_op_bridge(w))) {
        let mut argv = entrypoint;
        argv.extend(cmd.unwrap_or_else(|| panic!("{place}: an op-bridge ENTRYPOINT needs a CMD beside it")));
        argv[0] = "op-bridge".into();
        out.push(Found { place: format!("{place} ENTRYPOINT+CMD"), argv });
    }
    for instruction in &instructions {
        if let Some(at) = instruction.strip_prefix("HEALTHCHECK").and_then(|h| h.find("CMD [")) {
            let argv = json_array(&instruction["HEALTHCHECK".len() + at..], "CMD").unwrap();
            if argv.first().is_some_and(|w| is_op_bridge(w)) {
                let mut argv = argv;
                argv[0] = "op-bridge".into();
                out.push(Found { place: format!("{place} HEALTHCHECK"), argv });
            }
        }
    }
}

/// An OpenClaw exec provider in JSON5: `command: ".../op-bridge"` then `args: [...]`.
fn json5_commands(lines: &[&str], place: &str, out: &mut Vec<Found>) {
    let mut pending = false;
    for line in lines {
        let line = line.trim();
        if line.starts_with("command:") && line.contains("/op-bridge\"") {
            pending = true;
        } else if pending && let Some(args) = json_array(line.trim_end_matches(','), "args:") {
            let mut argv = vec!["op-bridge".to_string()];
            argv.extend(args);
            out.push(Found { place: format!("{place} exec provider"), argv });
            pending = false;
        }
    }
    assert!(!pending, "{place}: an op-bridge exec provider without args");
}

/// Whether a shell line has a word that is op-bridge itself (not inside a longer string),
/// so a command that the extractor failed to recognise cannot slip through unchecked.
fn mentions_op_bridge(line: &str) -> bool {
    let mut subs = Vec::new();
    let words = tokenize(line, &mut subs).unwrap_or_default();
    words.iter().any(|t| matches!(t, Tok::Word(w) if is_op_bridge(w))) || subs.iter().any(|s| mentions_op_bridge(s))
}

/// Whether a line builds or copies the binary (`cargo build --bin op-bridge`, `install …
/// op-bridge DEST`): it names op-bridge as a file, not as a command to check.
fn builds_or_copies(line: &str) -> bool {
    let program = line.split_whitespace().find(|w| !w.contains('='));
    matches!(program, Some("cargo" | "install" | "cp"))
}

/// Every op-bridge command in a Markdown file: fenced blocks and inline code spans.
fn markdown_commands(path: &Path, out: &mut Vec<Found>) {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.strip_prefix(repo()).unwrap().display().to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            let lang = lang.trim().to_ascii_lowercase();
            let start = i + 1;
            let end = (start..lines.len()).find(|&j| lines[j].trim_start().starts_with("```")).expect("closed fence");
            let block = &lines[start..end];
            let place = format!("{name}:{}", start + 1);
            match lang.as_str() {
                "" | "sh" | "bash" | "shell" | "console" => shell_block(block, &name, start, out),
                "dockerfile" => dockerfile_commands(block, &place, out),
                "json5" | "json" => json5_commands(block, &place, out),
                // A synopsis or a program's output: shown, not run.
                "text" => {}
                "yaml" => assert!(
                    !block.iter().any(|l| l.contains("op-bridge")),
                    "{place}: a yaml block naming op-bridge is not checked; show the command in a sh block"
                ),
                other => panic!("{place}: code block language `{other}` is not checked; use sh, dockerfile or json5"),
            }
            i = end + 1;
            continue;
        }
        // Inline code spans outside fences.
        for (k, span) in lines[i].split('`').enumerate() {
            if k % 2 == 1 && span.starts_with("op-bridge ") && !names_a_subcommand(span) {
                let place = format!("{name}:{} inline", i + 1);
                let found = shell_commands(span, &place, out).unwrap_or_else(|e| panic!("{e}"));
                assert!(found > 0, "{place}: `{span}` was not recognised as a command");
            }
        }
        i += 1;
    }
}

/// Whether an inline span only names a command (`op-bridge run`, as in "`op-bridge run` is
/// the init"), which is prose, not a command line to check.
fn names_a_subcommand(span: &str) -> bool {
    use clap::CommandFactory;
    let words: Vec<&str> = span.split_whitespace().collect();
    matches!(words[..], ["op-bridge", name] if Cli::command().get_subcommands().any(|s| s.get_name() == name))
}

fn shell_block(block: &[&str], name: &str, start: usize, out: &mut Vec<Found>) {
    let mut logical = String::new();
    let mut first_line = start;
    for (k, line) in block.iter().enumerate() {
        if logical.is_empty() {
            first_line = start + k;
        }
        let line = line.strip_prefix("$ ").unwrap_or(line);
        if let Some(head) = line.strip_suffix('\\') {
            logical.push_str(head);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let place = format!("{name}:{}", first_line + 1);
        let found = shell_commands(&logical, &place, out).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            found > 0 || !mentions_op_bridge(&logical) || builds_or_copies(&logical),
            "{place}: `{logical}` names op-bridge but no command was recognised"
        );
        logical.clear();
    }
}

// ---- checking -------------------------------------------------------------------------

/// Parses like the binary does, then the checks `main` and the broker make after parsing.
fn check(found: &Found) -> Result<(), String> {
    let cli = match Cli::try_parse_from(&found.argv) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            return Ok(());
        }
        Err(e) => return Err(e.to_string()),
    };
    let broker = match &cli.command {
        Command::Run(args) => {
            args.on_change.parse::<op_bridge::supervise::run::OnChange>().map_err(|e| e.to_string())?;
            &args.broker
        }
        Command::Daemon(args) => &args.broker,
        _ => return Ok(()),
    };
    broker.log_level.as_deref().unwrap_or("info").parse::<tracing::Level>().map_err(|e| format!("--log-level: {e}"))?;
    op_bridge::config::broker_config(broker).map(|_| ())
}

fn assert_all_parse(found: &[Found]) {
    let failures: Vec<String> = found
        .iter()
        .filter_map(|f| check(f).err().map(|e| format!("{}: {:?}\n    {}", f.place, f.argv, e.trim())))
        .collect();
    assert!(failures.is_empty(), "commands the binary does not accept:\n{}", failures.join("\n"));
}

#[test]
fn skill_has_frontmatter_and_linked_workflows() {
    let skill = std::fs::read_to_string(repo().join("skill/SKILL.md")).unwrap();
    let front = skill.strip_prefix("---\n").and_then(|s| s.split_once("\n---\n")).expect("frontmatter").0;
    for key in ["name:", "description:", "triggers:"] {
        assert!(front.lines().any(|l| l.starts_with(key)), "frontmatter lacks {key}");
    }
    assert!(front.contains("name: op-bridge"));
    assert!(front.lines().filter(|l| l.trim_start().starts_with("- ")).count() >= 3, "triggers are a list");
    let workflows: Vec<PathBuf> = skill_files().into_iter().skip(1).collect();
    assert!(workflows.len() >= 6, "{workflows:?}");
    for workflow in &workflows {
        let link = format!("(Workflows/{})", workflow.file_name().unwrap().to_str().unwrap());
        assert!(skill.contains(&link), "SKILL.md does not link {link}");
    }
    for (at, _) in skill.match_indices("(Workflows/") {
        let target = skill[at + 1..].split(')').next().unwrap();
        assert!(repo().join("skill").join(target).is_file(), "SKILL.md links missing {target}");
    }
}

#[test]
fn every_skill_command_parses() {
    let mut found = Vec::new();
    for file in skill_files() {
        let before = found.len();
        markdown_commands(&file, &mut found);
        assert!(found.len() > before, "{} shows no op-bridge command", file.display());
    }
    let subcommands: std::collections::BTreeSet<&str> =
        found.iter().filter_map(|f| f.argv.get(1)).map(|s| s.as_str()).collect();
    for expected in ["run", "daemon", "get", "set", "delete", "list", "ping", "refresh", "status"] {
        assert!(subcommands.contains(expected), "the skill never shows `op-bridge {expected}`: {subcommands:?}");
    }
    assert!(found.len() >= 40, "only {} commands found: {found:#?}", found.len());
    if std::env::var_os("SKILL_COMMANDS").is_some() {
        found.iter().for_each(|f| eprintln!("{}: {:?}", f.place, f.argv));
    }
    assert_all_parse(&found);
}

/// The user documentation: the README and every page of `docs/`.
fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    files.extend(pages);
    files
}

#[test]
fn every_docs_command_parses() {
    let mut found = Vec::new();
    let files = doc_files();
    assert!(files.len() >= 10, "README and the docs/ pages: {files:?}");
    for file in &files {
        markdown_commands(file, &mut found);
    }
    for page in ["README.md", "docs/commands.md", "docs/containers.md", "docs/troubleshooting.md"] {
        assert!(found.iter().any(|f| f.place.starts_with(page)), "no op-bridge command found in {page}");
    }
    assert!(found.len() >= 25, "only {} commands found: {found:#?}", found.len());
    if std::env::var_os("SKILL_COMMANDS").is_some() {
        found.iter().for_each(|f| eprintln!("{}: {:?}", f.place, f.argv));
    }
    assert_all_parse(&found);
}

/// Every page of `docs/` is linked from the README and from the skill, and every relative
/// link in them leads to a file (a `#anchor` to a heading of that file).
#[test]
fn docs_pages_are_linked_and_links_resolve() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let skill = std::fs::read_to_string(repo().join("skill/SKILL.md")).unwrap();
    for page in doc_files().into_iter().skip(1) {
        let name = page.file_name().unwrap().to_str().unwrap();
        assert!(readme.contains(&format!("(docs/{name})")), "README.md does not link docs/{name}");
        assert!(skill.contains(&format!("(../docs/{name})")), "skill/SKILL.md does not link docs/{name}");
    }
    let mut sources = doc_files();
    sources.extend(skill_files());
    for source in sources {
        let text = std::fs::read_to_string(&source).unwrap();
        for (at, _) in text.match_indices("](") {
            let target = text[at + 2..].split(')').next().unwrap();
            if target.starts_with("http") || target.contains(' ') {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() { source.clone() } else { source.parent().unwrap().join(file) };
            assert!(path.exists(), "{}: link to missing {target}", source.display());
            if !anchor.is_empty() {
                let target_text = std::fs::read_to_string(&path).unwrap();
                let anchors: Vec<String> =
                    target_text.lines().filter(|l| l.starts_with('#')).map(github_anchor).collect();
                assert!(
                    anchors.iter().any(|a| a == anchor),
                    "{}: no heading for #{anchor} in {file}",
                    source.display()
                );
            }
        }
    }
}

/// The anchor GitHub gives a Markdown heading: lower case, spaces to `-`, punctuation other
/// than `-` and `_` dropped.
fn github_anchor(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn docker_files_commands_parse() {
    let mut found = Vec::new();
    let dockerfile = std::fs::read_to_string(repo().join("docker/Dockerfile")).unwrap();
    dockerfile_commands(&dockerfile.lines().collect::<Vec<_>>(), "docker/Dockerfile", &mut found);
    let config = std::fs::read_to_string(repo().join("docker/openclaw.json5")).unwrap();
    json5_commands(&config.lines().collect::<Vec<_>>(), "docker/openclaw.json5", &mut found);
    let script = std::fs::read_to_string(repo().join("docker/entrypoint.sh")).unwrap();
    let script_lines: Vec<&str> = script.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    shell_block(&script_lines, "docker/entrypoint.sh", 0, &mut found);
    let places: Vec<&str> = found.iter().map(|f| f.place.as_str()).collect();
    for expected in ["ENTRYPOINT+CMD", "HEALTHCHECK", "exec provider", "entrypoint.sh"] {
        assert!(places.iter().any(|p| p.contains(expected)), "no command from {expected}: {places:?}");
    }
    assert_all_parse(&found);
}

#[test]
fn the_checker_rejects_what_the_binary_rejects() {
    let mut found = Vec::new();
    for line in [
        "op-bridge get --bogus",
        "op-bridge delete",
        "op-bridge run -- ",
        "OP_X_REF=op://v/i/f op-bridge daemon --backend nope",
        "op-bridge run --on-change sometimes -- true",
        "op-bridge daemon --watch /tmp/x=op://v/i",
        "op-bridge status --timeout soon",
    ] {
        shell_commands(line, "self-test", &mut found).unwrap();
    }
    assert_eq!(found.len(), 7);
    for f in &found {
        assert!(check(f).is_err(), "{:?} should be rejected", f.argv);
    }
}

#[test]
fn the_tokenizer_splits_like_a_shell() {
    let mut found = Vec::new();
    let line = r#"A=1 env -i B=2 op-bridge get "a b" 'c d' e\ f --socket "$HOME/s.sock" 2>&1 >/dev/null | cat; X="$(op-bridge list)" && docker exec -it -u 1000 claw op-bridge ping # op-bridge nope"#;
    assert_eq!(shell_commands(line, "t", &mut found).unwrap(), 3);
    let argvs: Vec<Vec<&str>> = found.iter().map(|f| f.argv.iter().map(String::as_str).collect()).collect();
    assert_eq!(argvs[0], ["op-bridge", "get", "a b", "c d", "e f", "--socket", "PLACEHOLDER/s.sock"]);
    assert_eq!(argvs[1], ["op-bridge", "ping"]);
    assert_eq!(argvs[2], ["op-bridge", "list"]);
    let mut found = Vec::new();
    shell_commands(r#"docker exec c sh -c 'printf %s "{}" | env -i op-bridge get --socket /s'"#, "t", &mut found)
        .unwrap();
    assert_eq!(found[0].argv, ["op-bridge", "get", "--socket", "/s"]);
    assert!(tokenize("cat <<EOF", &mut Vec::new()).is_err());
    assert!(tokenize("echo `op-bridge list`", &mut Vec::new()).is_err());
}

/// The repository root holds only what a user expects (a test run once committed its
/// `fake.pid` and `out-*.txt` there). Tracked files only, so a local scratch file does not
/// fail the suite; outside a git checkout there is nothing to check.
#[test]
fn repository_root_holds_only_what_a_user_expects() {
    let Ok(out) = std::process::Command::new("git").arg("-C").arg(repo()).args(["ls-files", "--", "."]).output() else {
        eprintln!("git not found: root contents not checked");
        return;
    };
    if !out.status.success() {
        eprintln!("not a git checkout: root contents not checked");
        return;
    }
    const EXPECTED: &[&str] = &[
        "Cargo.toml",
        "Cargo.lock",
        "README.md",
        "CHANGELOG.md",
        "LICENSE",
        "src",
        "tests",
        "docs",
        "docker",
        "skill",
        "examples",
        "benches",
        "fuzz",
    ];
    let listing = String::from_utf8_lossy(&out.stdout);
    let unexpected: std::collections::BTreeSet<&str> = listing
        .lines()
        .map(|path| path.split('/').next().unwrap())
        .filter(|top| !EXPECTED.contains(top))
        // Dotfiles (.gitignore, .ci) and tool configuration (rustfmt.toml, clippy.toml, …).
        .filter(|top| !top.starts_with('.') && !top.ends_with(".toml"))
        .collect();
    assert!(unexpected.is_empty(), "unexpected files at the repository root: {unexpected:?}");
}
