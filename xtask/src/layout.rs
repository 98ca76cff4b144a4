//! The layout's rule, checked: inside each library crate no module imports
//! a module that imports it back (directly or round a longer circle).
//!
//! A module is a top-level module of the crate (`agent/src/enforce/*` is
//! `enforce`); an edge is any `crate::<module>` path, or a `use crate::{…}`
//! group naming it, in the code (not comments) before its `#[cfg(test)]`
//! part. Tests may
//! reach anywhere; production code may not go round in circles.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The library crates whose modules are checked.
const CRATES: &[&str] = &["agent", "aggregator", "contract", "tally"];

/// module → the modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module graph of the crate whose sources are under `src`.
fn graph(src: &Path) -> std::io::Result<Graph> {
    let mut graph = Graph::new();
    for file in rust_files(src)? {
        let rel = file.strip_prefix(src).unwrap_or(&file);
        let module = top_module(rel);
        let text = fs::read_to_string(&file)?;
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let names = graph.entry(module.clone()).or_default();
        for named in crate_paths(&code) {
            if named != module {
                names.insert(named);
            }
        }
    }
    Ok(graph)
}

/// Every circle of `graph`, each as the modules round it (first repeated
/// at the end); empty when there is none.
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        walk(graph, start, &mut path, &mut seen, &mut found);
    }
    found
}

fn walk(
    graph: &Graph,
    at: &str,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<Vec<String>>,
    found: &mut Vec<Vec<String>>,
) {
    for next in graph.get(at).into_iter().flatten() {
        if next == &path[0] {
            // Report each circle once, from its smallest module.
            let mut key = path.clone();
            let min = key
                .iter()
                .enumerate()
                .min_by_key(|(_, m)| *m)
                .map_or(0, |(i, _)| i);
            key.rotate_left(min);
            if seen.insert(key.clone()) {
                key.push(key[0].clone());
                found.push(key);
            }
        } else if !path.contains(next) && next > &path[0] {
            path.push(next.clone());
            walk(graph, next, path, seen, found);
            path.pop();
        }
    }
}

/// `enforce/cgroup.rs` → `enforce`; `lib.rs`/`main.rs` → `lib`/`main`.
fn top_module(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules a piece of code names through `crate::`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the names at depth 0.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            out.extend(first_segment(&item));
        } else {
            out.extend(first_segment(rest));
        }
    }
    out
}

fn first_segment(text: &str) -> Option<String> {
    let name: String = text
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty() && name != "self").then_some(name)
}

fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_and_plain_paths_are_both_edges() {
        let code = "use crate::{a::B, c, d::{e, f}};\nfn x() { crate::g::h(); }";
        let names: Vec<String> = crate_paths(code).into_iter().collect();
        assert_eq!(names, ["a", "c", "d", "g"]);
    }

    #[test]
    fn a_circle_is_found_once_and_a_line_is_not_a_circle() {
        let mut g = Graph::new();
        g.entry("a".into()).or_default().insert("b".into());
        g.entry("b".into()).or_default().insert("c".into());
        g.entry("c".into()).or_default().insert("a".into());
        g.entry("d".into()).or_default().insert("a".into());
        assert_eq!(circles(&g), vec![vec!["a", "b", "c", "a"]]);
        g.get_mut("c").unwrap().clear();
        assert!(circles(&g).is_empty());
    }

    /// The repository itself: no crate's modules go round in a circle.
    #[test]
    fn no_module_imports_a_module_that_imports_it_back() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut all = Vec::new();
        for krate in CRATES {
            let g = graph(&root.join(krate).join("src")).unwrap();
            assert!(
                g.len() > 1 || *krate == "contract",
                "{krate}: no modules read"
            );
            for c in circles(&g) {
                all.push(format!("{krate}: {}", c.join(" → ")));
            }
        }
        assert!(all.is_empty(), "import circles:\n{}", all.join("\n"));
    }
}
