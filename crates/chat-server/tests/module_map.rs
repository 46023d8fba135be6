//! The library's module map: every import points down.
//!
//! Reads `src/` (the library; `main.rs` is a crate of its own), finds every
//! path a module names inside the crate (`use crate::…`, `super::…`, a
//! child module's items, and `crate::…` inside macro calls), and checks
//! two things:
//!
//! - no two modules (files) reach each other, however indirectly: the
//!   graph of references has no cycle;
//! - the README's map is true: it lists every top-level module once, top
//!   to bottom, and every reference between two of them goes from a line
//!   to a line below it.
//!
//! Test code (`#[cfg(test)]`) may reach anywhere and is left out.
//!
//! `cargo test -p chat-server --test module_map -- --nocapture` prints the
//! top-level graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// A module's path inside the crate: `[]` is the root, `["publish", "log"]`
/// is `crate::publish::log`.
type ModPath = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library source file, by its module path.
fn modules() -> BTreeMap<ModPath, PathBuf> {
    fn walk(dir: &Path, at: &ModPath, out: &mut BTreeMap<ModPath, PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut inner = at.clone();
                inner.push(name);
                walk(&path, &inner, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut module = at.clone();
                match stem {
                    "lib" if at.is_empty() => {}
                    "main" if at.is_empty() => continue,
                    "mod" => {}
                    _ => module.push(stem.to_owned()),
                }
                out.insert(module, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &Vec::new(), &mut out);
    out
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string().trim() == "test")
    })
}

/// Collects the paths one file names.
struct Refs<'a> {
    here: &'a ModPath,
    known: &'a BTreeMap<ModPath, PathBuf>,
    found: BTreeSet<ModPath>,
}

impl Refs<'_> {
    /// Records `segments` (as written) if it names something in this crate.
    fn record(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let mut absolute: ModPath = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.here.clone(),
            "super" => {
                let mut at = self.here.clone();
                let mut rest = segments;
                while rest.first().is_some_and(|s| s == "super") {
                    at.pop();
                    rest = &rest[1..];
                }
                at.extend(rest.iter().cloned());
                return self.resolve(at);
            }
            child => {
                let mut as_child = self.here.clone();
                as_child.push(child.to_owned());
                if !self.known.contains_key(&as_child) {
                    return; // another crate, or a local name
                }
                self.here.clone()
            }
        };
        let skip = usize::from(first == "crate" || first == "self");
        absolute.extend(segments[skip..].iter().cloned());
        self.resolve(absolute);
    }

    /// The deepest module file along `path`.
    fn resolve(&mut self, path: ModPath) {
        let mut target = path;
        while !self.known.contains_key(&target) {
            target.pop();
        }
        if &target != self.here {
            self.found.insert(target);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.record(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.record(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.record(&prefix.clone()),
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_cfg_test(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_cfg_test(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_cfg_test(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.record(&segments);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // `crate::a::b` inside a macro call (`select!`, `matches!`, …).
        let tokens: Vec<proc_macro2::TokenTree> = flatten(mac.tokens.clone());
        let mut i = 0;
        while i < tokens.len() {
            if let proc_macro2::TokenTree::Ident(id) = &tokens[i]
                && (id == "crate" || id == "super")
            {
                let mut segments = vec![id.to_string()];
                let colon = |k: usize| matches!(tokens.get(k), Some(proc_macro2::TokenTree::Punct(p)) if p.as_char() == ':');
                let mut j = i + 1;
                while colon(j)
                    && colon(j + 1)
                    && let Some(proc_macro2::TokenTree::Ident(next)) = tokens.get(j + 2)
                {
                    segments.push(next.to_string());
                    j += 3;
                }
                if segments.len() > 1 {
                    self.record(&segments);
                }
                i = j;
            } else {
                i += 1;
            }
        }
        syn::visit::visit_macro(self, mac);
    }
}

fn flatten(stream: proc_macro2::TokenStream) -> Vec<proc_macro2::TokenTree> {
    let mut out = Vec::new();
    for tree in stream {
        match tree {
            proc_macro2::TokenTree::Group(g) => out.extend(flatten(g.stream())),
            other => out.push(other),
        }
    }
    out
}

/// Which modules each module names. Modules declared `#[cfg(test)]` in
/// files of their own (`mod tests;`) are left out, as test code is.
fn graph() -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mut known = modules();
    let parsed: BTreeMap<ModPath, syn::File> = known
        .iter()
        .map(|(module, path)| {
            let text = std::fs::read_to_string(path).expect("read source");
            let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (module.clone(), file)
        })
        .collect();
    let test_only: Vec<ModPath> = parsed
        .iter()
        .flat_map(|(module, file)| {
            file.items.iter().filter_map(move |item| match item {
                syn::Item::Mod(m) if m.content.is_none() && is_cfg_test(&m.attrs) => {
                    let mut path = module.clone();
                    path.push(m.ident.to_string());
                    Some(path)
                }
                _ => None,
            })
        })
        .collect();
    known.retain(|module, _| !test_only.iter().any(|t| module.starts_with(t)));
    let mut graph = BTreeMap::new();
    for (module, file) in &parsed {
        if !known.contains_key(module) {
            continue;
        }
        let mut refs = Refs {
            here: module,
            known: &known,
            found: BTreeSet::new(),
        };
        refs.visit_file(file);
        graph.insert(module.clone(), refs.found);
    }
    graph
}

fn name(module: &ModPath) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

/// A cycle in `graph`, if it has one.
fn find_cycle<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<N: Ord + Clone>(
        node: &N,
        graph: &BTreeMap<N, BTreeSet<N>>,
        marks: &mut BTreeMap<N, Mark>,
        stack: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|n| n == node).unwrap();
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.clone());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.clone(), Mark::Open);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn no_module_reaches_back_to_one_that_reaches_it() {
    let graph = graph();
    assert!(graph.len() > 20, "the crate has {} modules?", graph.len());
    if let Some(cycle) = find_cycle(&graph) {
        let cycle: Vec<String> = cycle.iter().map(name).collect();
        panic!("an import cycle: {}", cycle.join(" → "));
    }
}

/// The README's map: its top-level modules, line by line, top to bottom.
fn readme_map() -> Vec<Vec<String>> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(readme).expect("README.md");
    let marker = "<!-- module map";
    let at = text.find(marker).expect("the README has a module map");
    let block = &text[at..];
    let start = block.find("```text\n").expect("the map is a text block") + "```text\n".len();
    let end = block[start..].find("```").expect("the map's block ends") + start;
    block[start..end]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            line.split_whitespace()
                .take_while(|t| t.ends_with('/') || t.ends_with(".rs"))
                .map(|t| t.trim_end_matches('/').trim_end_matches(".rs").to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|names| !names.is_empty())
        .collect()
}

#[test]
fn the_readme_map_is_true_every_arrow_points_down() {
    let graph = graph();
    let lines = readme_map();
    let mut level: BTreeMap<String, usize> = BTreeMap::new();
    for (i, names) in lines.iter().enumerate() {
        for name in names {
            let name = if name == "lib" { "crate" } else { name };
            assert!(
                level.insert(name.to_owned(), i).is_none(),
                "the README's map lists {name} twice"
            );
        }
    }
    // Top-level modules, and what each names outside itself.
    let top = |m: &ModPath| m.first().cloned().unwrap_or_else(|| "crate".to_owned());
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &graph {
        let entry = edges.entry(top(from)).or_default();
        for to in tos {
            if top(to) != top(from) {
                entry.insert(top(to));
            }
        }
    }
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        if from != "crate" {
            println!(
                "{from:>12} → {}",
                tos.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let Some(&above) = level.get(from) else {
            wrong.push(format!("{from} is not on the README's map"));
            continue;
        };
        for to in tos {
            match level.get(to) {
                Some(&below) if below > above => {}
                Some(_) => wrong.push(format!("{from} → {to} points up or sideways")),
                None => wrong.push(format!("{to} is not on the README's map")),
            }
        }
    }
    for name in level.keys() {
        if name != "main" && !edges.contains_key(name) {
            wrong.push(format!(
                "the README's map lists {name}, which is not a module"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
