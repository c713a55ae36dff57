//! The house has no import circles: every `src/**/*.rs` is read for `crate::…` and `super::…`
//! paths (in `use` lines and inline), each resolved to the file of the longest module it
//! names, and the file-level graph must be acyclic once the edges in [`KNOWN_EDGES`] are left
//! out. The list is empty: `src/` has no circle. An edge put there must say who removes it,
//! and an allowed edge that no longer exists fails the test, so the list can only shrink.
//!
//! Unit-test modules (`#[cfg(test)] mod tests`, at a file's end) are not part of the graph,
//! and paths in comments are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges (importer, imported) allowed for now, each removed by the engineer named.
const KNOWN_EDGES: &[(&str, &str)] = &[];

/// Every module file under `src/`: module path ("backend::op", "" for the crate root) → file
/// name relative to `src/`.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().to_string_lossy().into_owned();
            if rel == "main.rs" {
                continue;
            }
            let module =
                rel.trim_end_matches(".rs").trim_end_matches("/mod").trim_end_matches("lib").replace('/', "::");
            out.insert(module.trim_end_matches("::").to_string(), rel);
        }
    }
    out
}

/// The source without comments and without the trailing unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The paths a file names: each `crate::a::b…` or `super::a…` as segments, with brace
/// groups (`use crate::x::{a, b::c}`) expanded one level per brace.
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(root) {
            let at = from + found;
            let before = code[..at].chars().next_back();
            let after = &code[at + root.len()..];
            from = at + root.len();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut supers = 0;
            let mut tail = after;
            if root == "super::" {
                supers = 1;
                while let Some(t) = tail.strip_prefix("super::") {
                    supers += 1;
                    tail = t;
                }
            }
            let head = if root == "crate::" { "crate".to_string() } else { format!("super{supers}") };
            for path in expand(tail) {
                out.push((head.clone(), path));
            }
        }
    }
    out
}

/// `a::b::{c, d::e}` → [[a, b, c], [a, b, d, e]]; `a::b` → [[a, b]].
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(group.len());
            let mut parts = Vec::new();
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group[..end].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        parts.push(&group[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            parts.push(&group[start..end]);
            let mut out = Vec::new();
            for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
                for tail in expand(part) {
                    let mut path = prefix.clone();
                    path.extend(tail);
                    out.push(path);
                }
            }
            if out.is_empty() {
                out.push(prefix);
            }
            return out;
        }
        let len = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if len == 0 {
            return vec![prefix];
        }
        prefix.push(rest[..len].to_string());
        rest = &rest[len..];
        match rest.strip_prefix("::") {
            Some(more) => rest = more,
            None => return vec![prefix],
        }
    }
}

/// The file-level import graph: importer file → imported files.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        let here: Vec<String> =
            if module.is_empty() { Vec::new() } else { module.split("::").map(String::from).collect() };
        for (head, path) in paths(&code(&text)) {
            let mut base = match head.as_str() {
                "crate" => Vec::new(),
                supers => {
                    let n: usize = supers.trim_start_matches("super").parse().unwrap();
                    // In a file, `super` is the parent of the file's own module.
                    here[..here.len().saturating_sub(n)].to_vec()
                }
            };
            let mut target = base.join("::");
            for segment in path {
                base.push(segment);
                let candidate = base.join("::");
                if modules.contains_key(&candidate) {
                    target = candidate;
                } else {
                    break;
                }
            }
            if let Some(to) = modules.get(&target)
                && to != file
            {
                edges.entry(file.clone()).or_default().insert(to.clone());
            }
        }
        edges.entry(file.clone()).or_default();
    }
    edges
}

/// The strongly connected components with more than one file (Tarjan).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let low = s.low[v].min(s.low[w.as_str()]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w.as_str()) {
                let low = s.low[v].min(s.index[w.as_str()]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn describe(edges: &BTreeMap<String, BTreeSet<String>>, component: &[String]) -> String {
    let mut text = format!("circle of {} files:\n", component.len());
    for from in component {
        for to in edges[from].iter().filter(|to| component.contains(to)) {
            text.push_str(&format!("    {from} -> {to}\n"));
        }
    }
    text
}

#[test]
fn the_import_graph_of_src_has_no_circle_but_the_known_edges() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges = graph(&src);
    let mut problems = Vec::new();
    for (from, to) in KNOWN_EDGES {
        let present = edges.get_mut(*from).is_some_and(|set| set.remove(*to));
        if !present {
            problems.push(format!("allowed edge {from} -> {to} no longer exists: remove it from KNOWN_EDGES"));
        }
    }
    for component in circles(&edges) {
        problems.push(describe(&edges, &component));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_parser_finds_grouped_nested_and_relative_paths() {
    let found = paths("use crate::backend::{op::OpCli, Backend};\nlet x = super::super::store::f();\n");
    let shown: Vec<String> = found.iter().map(|(h, p)| format!("{h}:{}", p.join("::"))).collect();
    assert_eq!(shown, ["crate:backend::op::OpCli", "crate:backend::Backend", "super2:store::f"]);
    assert!(paths("// use crate::daemon;\n").is_empty() || code("// use crate::daemon;\n").trim().is_empty());
}
