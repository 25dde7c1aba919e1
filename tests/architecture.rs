//! The broker crate's module graph has no cycle.
//!
//! Goal: keep `src/` layered (issue 16, point 1) — the broker core depends on nothing
//! above it, and the modules above read it through narrow views. Method: read every
//! `src/**/*.rs` of the library (not `main.rs`, the binary's root), drop comments and
//! string literals, and collect each `crate::<module>` path (in `use` lines, `use
//! crate::{a, b}` groups and inline paths) plus each `super::` path that climbs out to the
//! crate root. That gives an edge from the file's top-level module (`broker`, `manifest`,
//! ...) to the named one. A cycle between top-level modules fails the test and prints the
//! graph; so does one inside `src/broker/` that goes through a module above it.
//!
//! Plain `std`, no dependency: this target builds in seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Edges between top-level modules that still close a cycle today, with the reason.
/// This list only shrinks, to empty: an edge that no longer exists fails the test until it
/// is removed here, and a new edge that closes a cycle fails it too.
const ALLOWED: &[(&str, &str, &str)] = &[];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// A library source file and its module path (`["broker", "queue"]` for
/// `src/broker/queue.rs`; `src/broker/mod.rs` is `["broker"]`).
struct Source {
    path: PathBuf,
    module: Vec<String>,
}

fn sources(dir: &Path, module: &[String], out: &mut Vec<Source>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            let mut inner = module.to_vec();
            inner.push(name);
            sources(&path, &inner, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut module = module.to_vec();
            match name.as_str() {
                "mod" => {}
                "lib" | "main" if module.is_empty() => {
                    if name == "main" {
                        continue;
                    }
                }
                _ => module.push(name),
            }
            out.push(Source { path, module });
        }
    }
}

/// The code of a Rust file with comments, string and char literals blanked out, so that a
/// doc link or a message naming `crate::x` is not an edge.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'"' | b'#')) && !ident_byte(b, i) {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): skip only the former.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 3 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.push_str("' '");
                    i = e;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            // Keep UTF-8 intact: copy the whole character.
            let len = utf8_len(c);
            out.push_str(std::str::from_utf8(&b[i..i + len]).unwrap_or(" "));
            i += len;
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

fn ident_byte(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

fn tokens(code: &str) -> Vec<Token> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Token::Ident(code[start..i].to_string()));
            continue;
        }
        out.push(match c {
            b':' if b.get(i + 1) == Some(&b':') => {
                i += 1;
                Token::PathSep
            }
            b'{' => Token::Open,
            b'}' => Token::Close,
            b',' => Token::Comma,
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            _ => Token::Other,
        });
        i += 1;
    }
    out
}

/// The first segments of the paths a `{ ... }` group starting at `toks[open]` names
/// (`{a, b::c, d::{e, f}}` gives `a`, `b`, `d`).
fn group_heads(toks: &[Token], open: usize) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for t in &toks[open..] {
        match t {
            Token::Open => {
                depth += 1;
                if depth == 1 {
                    expect_head = true;
                }
            }
            Token::Close => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Token::Comma if depth == 1 => expect_head = true,
            Token::Ident(name) if depth == 1 && expect_head => {
                heads.push(name.clone());
                expect_head = false;
            }
            _ => {
                if depth == 1 {
                    expect_head = false;
                }
            }
        }
    }
    heads
}

/// The crate-root names a file's code refers to: `crate::x`, and `super::...::x` that climbs
/// to the root (inline `mod name { ... }` blocks count as one level).
fn root_references(source: &Source, text: &str) -> BTreeSet<String> {
    let toks = tokens(&code_only(text));
    let mut refs = BTreeSet::new();
    // The module path at each point: the file's, plus inline modules open around it.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Token::Open => depth += 1,
            Token::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Token::Ident(kw) if kw == "mod" => {
                if let (Some(Token::Ident(name)), Some(Token::Open)) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Token::Ident(kw) if kw == "crate" || kw == "super" => {
                let preceded_by_sep = i > 0 && toks[i - 1] == Token::PathSep;
                if !preceded_by_sep && toks.get(i + 1) == Some(&Token::PathSep) {
                    let mut level = source.module.len() + inline.len();
                    let mut j = i;
                    if kw == "crate" {
                        level = 0;
                        j += 2;
                    } else {
                        while toks.get(j) == Some(&Token::Ident("super".into()))
                            && toks.get(j + 1) == Some(&Token::PathSep)
                        {
                            level = level.saturating_sub(1);
                            j += 2;
                        }
                    }
                    if level == 0 {
                        match toks.get(j) {
                            Some(Token::Ident(name)) => {
                                refs.insert(name.clone());
                            }
                            Some(Token::Open) => refs.extend(group_heads(&toks, j)),
                            _ => {}
                        }
                    }
                    i = j;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

struct Crate {
    /// Top-level module → the top-level modules it names.
    top: Graph,
    /// Inside `src/broker/`: `broker::<file>` nodes and top-level modules, for the sub-check.
    broker: Graph,
}

fn read_crate() -> Crate {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &[], &mut files);
    let top_level: BTreeSet<String> = files
        .iter()
        .filter_map(|s| s.module.first().cloned())
        .collect();
    let mut top = Graph::new();
    let mut broker = Graph::new();
    for file in &files {
        let Some(own) = file.module.first() else {
            continue;
        };
        let text = fs::read_to_string(&file.path).expect("source file");
        let refs: BTreeSet<String> = root_references(file, &text)
            .into_iter()
            .filter(|r| top_level.contains(r) && r != own)
            .collect();
        top.entry(own.clone())
            .or_default()
            .extend(refs.iter().cloned());
        if own == "broker" {
            let node = match file.module.get(1) {
                Some(sub) => format!("broker::{sub}"),
                None => "broker".to_string(),
            };
            broker.entry(node).or_default().extend(refs);
        } else {
            // A module above naming the broker core: point at the core as a whole.
            if refs.contains("broker") {
                broker
                    .entry(own.clone())
                    .or_default()
                    .insert("broker".to_string());
            }
            let entry = broker.entry(own.clone()).or_default();
            entry.extend(refs.into_iter().filter(|r| r != "broker"));
        }
    }
    // Every broker file is part of the core: `broker` reaches each of them and back.
    let subs: Vec<String> = broker
        .keys()
        .filter(|k| k.starts_with("broker::"))
        .cloned()
        .collect();
    for sub in subs {
        broker
            .entry("broker".to_string())
            .or_default()
            .insert(sub.clone());
    }
    Crate { top, broker }
}

/// Strongly connected components with more than one node (Tarjan's algorithm).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
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
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found.sort();
    s.found
}

fn render(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(from, to)| {
            let to: Vec<&str> = to.iter().map(String::as_str).collect();
            format!("  {from} -> {}\n", to.join(", "))
        })
        .collect()
}

fn without_allowed(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    for (from, to, _) in ALLOWED {
        // In the broker sub-graph an allowed `broker -> x` covers each `broker::<file> -> x`.
        for (node, set) in g.iter_mut() {
            let inside = node == from || (*from == "broker" && node.starts_with("broker::"));
            if inside {
                set.remove(*to);
            }
        }
    }
    g
}

#[test]
fn top_level_modules_form_no_cycle() {
    let crate_ = read_crate();
    let left = cycles(&without_allowed(&crate_.top));
    assert!(
        left.is_empty(),
        "import cycles between top-level modules of src/: {left:?}\n\
         module graph (file's module -> modules it names through crate::):\n{}",
        render(&crate_.top)
    );
}

#[test]
fn broker_core_reaches_nothing_above_it_in_a_cycle() {
    let crate_ = read_crate();
    let left = cycles(&without_allowed(&crate_.broker));
    assert!(
        left.is_empty(),
        "cycles through src/broker/ files and the modules above: {left:?}\n\
         graph (broker::<file> and top-level modules):\n{}",
        render(&crate_.broker)
    );
}

#[test]
fn allow_list_names_only_edges_that_exist() {
    let crate_ = read_crate();
    let stale: Vec<_> = ALLOWED
        .iter()
        .filter(|(from, to, _)| !crate_.top.get(*from).is_some_and(|s| s.contains(*to)))
        .map(|(from, to, _)| format!("{from} -> {to}"))
        .collect();
    assert!(
        stale.is_empty(),
        "ALLOWED names edges the code no longer has; remove them: {stale:?}\nmodule graph:\n{}",
        render(&crate_.top)
    );
}

#[test]
fn the_scanner_sees_groups_inline_paths_and_super() {
    let file = Source {
        path: PathBuf::from("src/a/b.rs"),
        module: vec!["a".into(), "b".into()],
    };
    let text = r#"
        //! Doc naming [`crate::doc_only`].
        use crate::{x, y::{z, w}, q::r as s};
        use super::super::up;
        use super::sibling;
        fn f() { let _ = crate::inline::thing(); let _ = "crate::in_string"; let _c = '{'; }
        mod tests { use super::super::still_a; }
    "#;
    let refs = root_references(&file, text);
    let want: BTreeSet<String> = ["x", "y", "q", "up", "inline"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
}
