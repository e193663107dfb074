//! The module layout's one rule: no module imports one that imports it back, directly or
//! through others. Read from the `crate::` paths in `src/` (the library), so a new `use` that
//! closes a circle fails here, naming the circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`gate::policy`) of a file under `src/`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            // The binary's subcommands are not part of the library graph.
            if path.file_name().is_some_and(|n| n != "cli") {
                files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && path
                .file_name()
                .is_some_and(|n| n != "main.rs" && n != "lib.rs")
        {
            out.push(path);
        }
    }
}

/// Each module's imports of other modules, from `crate::a::b` paths outside `#[cfg(test)]`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut list = Vec::new();
    files(&src, &mut list);
    let modules: BTreeSet<String> = list.iter().map(|f| module_of(&src, f)).collect();
    let mut g = BTreeMap::new();
    for f in &list {
        let me = module_of(&src, f);
        let text = std::fs::read_to_string(f).expect("read");
        // Unit tests may reach anywhere.
        let text = text.split("#[cfg(test)]").next().unwrap_or("");
        let mut deps = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let path: String = text[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            // The longest prefix of the path that names a module.
            let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let target = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| modules.contains(m));
            if let Some(t) = target {
                // A folder's mod.rs re-exporting its children is not an import.
                if t != me && !t.starts_with(&format!("{me}::")) {
                    deps.insert(t);
                }
            }
        }
        g.insert(me, deps);
    }
    g
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    assert!(
        g.contains_key("proxy") && g.contains_key("gate::policy"),
        "{g:?}"
    );
    // Depth-first search for a back edge, reporting the circle.
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|s| s == m) {
            let mut circle = stack[pos..].to_vec();
            circle.push(m.to_owned());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_owned());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(circle) = visit(&g, m, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn config_imports_nothing_of_cbgates() {
    let g = graph();
    for (m, deps) in &g {
        if m == "config" || m.starts_with("config::") {
            let outside: Vec<&String> = deps.iter().filter(|d| !d.starts_with("config")).collect();
            assert!(outside.is_empty(), "{m} imports {outside:?}");
        }
    }
}
