//! The crate's modules build on each other in layers: protocol constants, then the
//! codec, the value types, the handshake, the connection, the ops and the uploads.
//! This test reads every `crate::` reference in `src/` and fails on any import circle,
//! naming it, so that a new dependency that closes one is seen when it is added.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn modules() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_none_or(|e| e != "rs") || name == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Code under `#[cfg(test)]` may reach anywhere; only the library counts.
        let library = text.split("#[cfg(test)]").next().unwrap();
        let mut uses = BTreeSet::new();
        for (i, _) in library.match_indices("crate::") {
            let rest = &library[i + "crate::".len()..];
            let dep: String =
                rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
            if !dep.is_empty() && dep != name {
                uses.insert(dep);
            }
        }
        graph.insert(name, uses);
    }
    graph
}

/// A circle through `node`, if there is one, as the list of modules along it.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|n| n == node).unwrap();
                let mut found = stack[from..].to_vec();
                found.push(node.to_string());
                return Some(found);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(graph, dep, marks, stack) {
                return Some(found);
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph.keys().find_map(|n| visit(graph, n, &mut marks, &mut Vec::new()))
}

#[test]
fn the_modules_import_each_other_without_a_circle() {
    let graph = modules();
    assert!(graph.contains_key("connection") && graph.contains_key("protocol"), "read the modules: {graph:?}");
    if let Some(found) = circle(&graph) {
        panic!("rust-store's modules import each other in a circle: {}", found.join(" -> "));
    }
    assert!(graph["protocol"].is_empty(), "protocol depends on nothing: {:?}", graph["protocol"]);
}

#[test]
fn the_circle_check_finds_a_circle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(circle(&graph).unwrap(), ["a", "b", "c", "a"]);
}
