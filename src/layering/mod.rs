//! Layering: from a closure graph to a list of layers (`stevedore layers`).
//!
//! Which store paths share a layer decides how well images cache. nixpkgs offers three ways to
//! decide, and each is here with the same results on the same graph:
//!
//! - `popularity`: `referencesByPopularity`'s contest (now the `popularity_contest` step of
//!   `flatten-references-graph`) followed by `limit_layers`, the pipeline nixpkgs'
//!   `streamLayeredImage` used by default until `auto` replaced it;
//! - `auto`: nixpkgs' `auto-layer.py`, the current default: the largest paths head layers of their
//!   own, and everything else is grouped by the set of heads that use it;
//! - `pipeline`: a `layeringPipeline`, the list of steps `flatten-references-graph` applies.
//!
//! `dominator` is our own strategy (see [`dominator_layers`]).

use crate::nixstore::ClosureGraph;
use anyhow::{bail, Result};
use std::collections::HashSet;

mod popularity;
mod pipeline;
mod auto;
mod dominator;
pub use popularity::*;
pub use pipeline::*;
use auto::*;
use dominator::*;

#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// nixpkgs' popularity contest, then `limit_layers` to the budget.
    Popularity,
    /// nixpkgs' auto-layer.
    Auto,
    /// A nixpkgs layeringPipeline (which sets its own limits).
    Pipeline(Pipeline),
    /// Dominator-tree grouping (ours).
    Dominator,
}

/// What [`plan_layers`] needs besides the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    pub strategy: Strategy,
    /// nixpkgs' maxLayers: the whole image's budget.
    pub max_layers: usize,
    /// Layers of the base image (fromImage).
    pub base_layers: usize,
    /// Plan only the closure of these paths; empty means the whole graph.
    pub roots: Vec<String>,
    /// Paths left out of every layer (nixpkgs' excludePaths); unknown ones are ignored.
    pub exclude: Vec<String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { strategy: Strategy::Auto, max_layers: 100, base_layers: 0, roots: vec![], exclude: vec![] }
    }
}

impl PlanOptions {
    /// Layers left for store paths: nixpkgs takes the base image's layers and one customisation
    /// layer off maxLayers, and needs at least one left.
    pub fn store_layer_budget(&self) -> Result<usize> {
        let used = self.base_layers.saturating_add(1);
        if self.max_layers <= used {
            let base = if self.base_layers > 0 { format!("the base image has {} layers, ", self.base_layers) } else { String::new() };
            bail!(
                "maxLayers {} is too low: at least {} are needed ({base}1 is kept for the customisation layer and at least 1 is needed for the store paths)",
                self.max_layers,
                used.saturating_add(1)
            );
        }
        Ok(self.max_layers - used)
    }
}

/// Plans the store layers of an image: a list of layers, bottom first, each a list of store
/// paths. The same graph and options always give the same plan, whatever order the graph was
/// read in.
pub fn plan_layers(graph: &ClosureGraph, opts: &PlanOptions) -> Result<Vec<Vec<String>>> {
    let budget = opts.store_layer_budget()?;
    let restricted;
    let graph = if opts.roots.is_empty() {
        graph
    } else {
        restricted = graph.closure_of(&opts.roots)?;
        &restricted
    };
    let mut excluded = vec![false; graph.len()];
    for p in &opts.exclude {
        if let Some(i) = graph.index_of(p) {
            excluded[i as usize] = true;
        }
    }
    let layers = match &opts.strategy {
        Strategy::Popularity => {
            let pipeline = Pipeline(vec![Step::PopularityContest, Step::LimitLayers(budget)]);
            pipeline.run(graph, &excluded)?
        }
        Strategy::Pipeline(p) => p.run(graph, &excluded)?,
        Strategy::Auto => auto_layers(graph, budget, &excluded),
        Strategy::Dominator => dominator_layers(graph, budget, &excluded),
    };
    Ok(layers.into_iter().map(|l| l.into_iter().map(|i| graph.path(i).to_string()).collect()).collect())
}

// ---------------------------------------------------------------------------------------------
// Sharing report

/// Bytes of a layer: the sum of its paths' narSize.
pub fn layer_bytes(graph: &ClosureGraph, layer: &[String]) -> u64 {
    layer.iter().filter_map(|p| graph.index_of(p)).map(|i| graph.node(i).nar_size).sum()
}

/// What two plans share: layers identical in both (same paths in the same order) are stored and
/// pulled once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sharing {
    pub shared_layers: usize,
    pub shared_bytes: u64,
    pub total_bytes: u64,
}

/// Compares `plan` (of `graph`) with `other`: which of `plan`'s layers also appear in `other`.
pub fn sharing(graph: &ClosureGraph, plan: &[Vec<String>], other: &[Vec<String>]) -> Sharing {
    let theirs: HashSet<&Vec<String>> = other.iter().collect();
    let mut s = Sharing::default();
    for layer in plan {
        let bytes = layer_bytes(graph, layer);
        s.total_bytes += bytes;
        if theirs.contains(layer) {
            s.shared_layers += 1;
            s.shared_bytes += bytes;
        }
    }
    s
}

/// Bytes in binary units, one decimal.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixstore::{nix_base32_encode, PathInfo, StorePath};
    use std::collections::HashMap;

    /// A graph from (name, narSize, references by name); hashes are made from the names so that
    /// paths sort by name.
    fn graph(spec: &[(&str, u64, &[&str])]) -> ClosureGraph {
        let path = |name: &str| {
            let mut h = [0u8; 20];
            for (i, b) in name.bytes().enumerate() {
                h[19 - i % 20] ^= b.wrapping_mul(31).wrapping_add(i as u8);
            }
            format!("/nix/store/{}-{name}", nix_base32_encode(&h))
        };
        let infos = spec
            .iter()
            .map(|(name, size, refs)| PathInfo { path: path(name), nar_hash: None, nar_size: *size, closure_size: None, references: refs.iter().map(|r| path(r)).collect() })
            .collect();
        ClosureGraph::from_infos(infos).unwrap()
    }

    fn by_name(g: &ClosureGraph, name: &str) -> String {
        g.nodes().iter().find(|n| n.path.ends_with(&format!("-{name}"))).unwrap().path.clone()
    }

    fn names(plan: &[Vec<String>]) -> Vec<Vec<String>> {
        plan.iter().map(|l| l.iter().map(|p| StorePath::parse(p).unwrap().name).collect()).collect()
    }

    fn plan(g: &ClosureGraph, strategy: Strategy, max_layers: usize) -> Vec<Vec<String>> {
        names(&plan_layers(g, &PlanOptions { strategy, max_layers, ..Default::default() }).unwrap())
    }

    fn pipeline(g: &ClosureGraph, json: &str) -> Vec<Vec<String>> {
        let p = Pipeline::from_json(&serde_json::from_str(json).unwrap()).unwrap();
        plan(g, Strategy::Pipeline(p), 100)
    }

    fn layers(spec: &[&[&str]]) -> Vec<Vec<String>> {
        spec.iter().map(|l| l.iter().map(|s| s.to_string()).collect()).collect()
    }

    // The graph nixpkgs' flatten-references-graph tests use for popularity_contest and split_paths.
    fn contest_graph() -> ClosureGraph {
        graph(&[
            ("Root1", 1, &["A"]),
            ("A", 0, &["B", "D"]),
            ("D", 0, &["E"]),
            ("B", 3, &["D", "F"]),
            ("Root2", 0, &["B"]),
            ("Root3", 0, &["C"]),
            ("C", 0, &[]),
            ("E", 0, &[]),
            ("F", 0, &[]),
            ("X", 5, &[]),
        ])
    }

    #[test]
    fn popularity_contest_orders_as_nixpkgs() {
        let got = pipeline(&contest_graph(), r#"[["popularity_contest"]]"#);
        let want: Vec<Vec<String>> = ["E", "D", "F", "B", "A", "C", "Root1", "Root2", "Root3", "X"].iter().map(|n| vec![n.to_string()]).collect();
        assert_eq!(got, want);
        // referencesByPopularity's documented example: F 9, E 5, D 4, C 3, then B and G at 2.
        let g = graph(&[("A", 0, &["B", "G"]), ("B", 0, &["C", "E"]), ("C", 0, &["D", "E"]), ("D", 0, &["F"]), ("E", 0, &["F"]), ("F", 0, &[]), ("G", 0, &[])]);
        assert_eq!(pipeline(&g, r#"[["popularity_contest"]]"#).concat(), ["F", "E", "D", "C", "B", "G", "A"]);
    }

    #[test]
    fn package_name_moves_the_hash_last() {
        assert_eq!(package_name("/nix/store/abc-foo-1.0"), "foo-1.0-/nix/store/abc");
        assert_eq!(package_name("nodash"), "nodash");
        assert_eq!(package_name("a-"), "-a");
    }

    /// nixpkgs' definition, computed as it does: per path, a map of everything below it to its
    /// count, merged level by level.
    fn naive_popularity(children: &[Vec<u32>]) -> Vec<Vec<u32>> {
        fn contest(v: usize, children: &[Vec<u32>], memo: &mut HashMap<usize, HashMap<usize, Vec<u32>>>) -> HashMap<usize, Vec<u32>> {
            if let Some(m) = memo.get(&v) {
                return m.clone();
            }
            let mut pop: HashMap<usize, Vec<u32>> = HashMap::new();
            for &c in &children[v] {
                big_add(pop.entry(c as usize).or_default(), &[1]);
                for (s, p) in contest(c as usize, children, memo) {
                    let e = pop.entry(s).or_default();
                    big_add(e, &p);
                    big_add(e, &[1]);
                }
            }
            memo.insert(v, pop.clone());
            pop
        }
        let n = children.len();
        let mut virtual_children = children.to_vec();
        let referenced: HashSet<u32> = children.iter().flatten().copied().collect();
        virtual_children.push((0..n as u32).filter(|v| !referenced.contains(v)).collect());
        let top = contest(n, &virtual_children, &mut HashMap::new());
        (0..n).map(|s| top.get(&s).cloned().unwrap_or_default()).collect()
    }

    #[test]
    fn popularity_is_exact_beyond_128_bits_and_across_chunks() {
        let mut seed = 7u64;
        let mut rand = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        for (n, ladder) in [(1, false), (2, false), (40, false), (150, true), (300, true), (600, false)] {
            // Edges go from higher to lower index; a ladder makes walk counts grow like
            // Fibonacci numbers (far past 128 bits at 300 paths).
            let children: Vec<Vec<u32>> = (0..n)
                .map(|i| {
                    let mut c: Vec<u32> = if ladder { [1, 2].iter().filter(|&&d| i >= d).map(|d| (i - d) as u32).collect() } else { vec![] };
                    for _ in 0..rand(4).min(i) {
                        c.push(rand(i) as u32);
                    }
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect();
            // Unique paths (as in any graph), many sharing a name so that ties go to the hash part.
            let paths: Vec<String> = (0..n).map(|i| format!("/s/{:032}-p{}", (i * 7919) % 100_003, i % 7)).collect();
            let names: Vec<&str> = paths.iter().map(String::as_str).collect();
            let naive = naive_popularity(&children);
            if ladder && n >= 300 {
                assert!(naive.iter().any(|p| p.len() > 4), "the ladder should need more than 128 bits");
            }
            let mut want: Vec<u32> = (0..n as u32).collect();
            want.sort_by(|&a, &b| big_cmp(&naive[b as usize], &naive[a as usize]).then_with(|| package_name(names[a as usize]).cmp(&package_name(names[b as usize]))));
            for chunk in [64, 128, 4096] {
                assert_eq!(popularity_order_in_chunks(&children, &names, chunk), want, "n={n} chunk={chunk}");
            }
        }
    }

    #[test]
    fn limit_layers_counts_as_nixpkgs() {
        // maxLayers 5: one layer for customisation, 4 for store paths; the first 3 paths by
        // popularity alone, the rest together.
        let chain = |n: usize| -> ClosureGraph {
            let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
            let spec: Vec<(&str, u64, Vec<&str>)> = (0..n).map(|i| (names[i].as_str(), i as u64, if i > 0 { vec![names[i - 1].as_str()] } else { vec![] })).collect();
            let spec: Vec<(&str, u64, &[&str])> = spec.iter().map(|(a, b, c)| (*a, *b, c.as_slice())).collect();
            graph(&spec)
        };
        for (n, want) in [(0, 0), (1, 1), (3, 3), (4, 4), (5, 4), (9, 4)] {
            let g = chain(n);
            for s in [Strategy::Popularity, Strategy::Auto, Strategy::Dominator] {
                let p = plan(&g, s.clone(), 5);
                assert_eq!(p.len(), want, "{s:?} with {n} paths: {p:?}");
                let mut all: Vec<String> = p.concat();
                all.sort();
                all.dedup();
                assert_eq!(all.len(), n, "{s:?}: every path exactly once");
            }
        }
        let p = plan(&chain(6), Strategy::Popularity, 5);
        assert_eq!(p, layers(&[&["p0"], &["p1"], &["p2"], &["p3", "p4", "p5"]]));
    }

    #[test]
    fn max_layers_must_leave_room() {
        let g = contest_graph();
        for (max, base) in [(0, 0), (1, 0), (3, 2), (100, 99)] {
            let e = plan_layers(&g, &PlanOptions { max_layers: max, base_layers: base, ..Default::default() }).unwrap_err().to_string();
            assert!(e.contains("too low"), "{e}");
        }
        let ok = PlanOptions { max_layers: 4, base_layers: 2, strategy: Strategy::Popularity, ..Default::default() };
        assert_eq!(plan_layers(&g, &ok).unwrap().len(), 1);
    }

    #[test]
    fn auto_layer_groups_by_primaries() {
        let g = graph(&[("a", 100, &["c"]), ("b", 50, &["c"]), ("c", 1, &[]), ("d", 10, &[])]);
        // Room for everything: each path heads its own layer, by closure size.
        assert_eq!(plan(&g, Strategy::Auto, 5), layers(&[&["c"], &["d"], &["b"], &["a"]]));
        // Three groups: adding b as a primary would make four ({a}, {b}, {a,b} for c, {} for d).
        assert_eq!(plan(&g, Strategy::Auto, 4), layers(&[&["b", "d"], &["a", "c"]]));
        // Excluded paths take part, then leave their layers.
        let p = plan_layers(&g, &PlanOptions { exclude: vec![by_name(&g, "a")], max_layers: 4, ..Default::default() }).unwrap();
        assert_eq!(names(&p), layers(&[&["b", "d"], &["c"]]));
    }

    #[test]
    fn pipeline_steps_behave_as_nixpkgs() {
        // nixpkgs' pipe tests: split off B, then B alone and its deps by popularity, merged
        // down to five layers.
        let g = graph(&[
            ("Root1", 0, &["A"]),
            ("A", 0, &["B", "C"]),
            ("B", 0, &["D", "E", "G"]),
            ("E", 0, &["F"]),
            ("Root2", 0, &["B"]),
            ("Root3", 0, &["C"]),
            ("C", 0, &[]),
            ("D", 0, &[]),
            ("F", 0, &[]),
            ("G", 0, &[]),
        ]);
        let (root3, b) = (by_name(&g, "Root3"), by_name(&g, "B"));
        let p = format!(
            r#"[["split_paths", ["{b}"]], ["over", "main", ["pipe", [["subcomponent_in", ["{b}"]], ["over", "rest", ["popularity_contest"]]]]],
                ["flatten"], ["map", ["remove_paths", "{root3}"]], ["limit_layers", 5]]"#
        );
        let got = pipeline(&g, &p);
        assert_eq!(got[..4], layers(&[&["B"], &["F"], &["D"], &["E"]])[..]);
        let mut last = got[4].clone();
        last.sort();
        assert_eq!(last, ["A", "C", "G", "Root1", "Root2"]);
        assert_eq!(got.len(), 5);

        let small = graph(&[("Root1", 0, &["A"]), ("A", 0, &["B"]), ("B", 0, &[]), ("Root2", 0, &[])]);
        assert_eq!(pipeline(&small, r#"[["popularity_contest"], ["limit_layers", 3]]"#), layers(&[&["B"], &["A"], &["Root1", "Root2"]]));
        assert_eq!(pipeline(&small, r#"[["popularity_contest"], ["reverse"], ["limit_layers", 3]]"#), layers(&[&["Root2"], &["Root1"], &["A", "B"]]));
        assert_eq!(pipeline(&small, r#"[["split_every", 3]]"#).len(), 2);
    }

    #[test]
    fn split_paths_parts_and_vertex_order() {
        // nixpkgs' flatten_references_graph test: vertices are ordered by narSize.
        let g = graph(&[("A", 2, &["A", "C"]), ("B", 4, &["C", "D"]), ("C", 6, &["C"]), ("D", 8, &["D"])]);
        let b = by_name(&g, "B");
        assert_eq!(pipeline(&g, &format!(r#"[["split_paths", ["{b}"]]]"#)), layers(&[&["B", "D"], &["C"], &["A"]]));
        assert_eq!(pipeline(&g, &format!(r#"[["split_paths", ["{b}"]], ["over", "main", ["subcomponent_in", ["{b}"]]]]"#)), layers(&[&["B"], &["D"], &["C"], &["A"]]));
        let excluding = |p: &str| {
            let pl = Pipeline::from_json(&serde_json::from_str(&format!(r#"[["split_paths", ["{b}"]]]"#)).unwrap()).unwrap();
            names(&plan_layers(&g, &PlanOptions { strategy: Strategy::Pipeline(pl), exclude: vec![p.to_string()], ..Default::default() }).unwrap())
        };
        assert_eq!(excluding(&by_name(&g, "A")), layers(&[&["B", "C", "D"]]));
        assert_eq!(excluding(&by_name(&g, "D")), layers(&[&["B"], &["C"], &["A"]]));
        // children_of, a split path that is the only root, and one that is not in the graph.
        let c = contest_graph();
        let got = pipeline(&c, &format!(r#"[["split_paths", [{{"children_of": "{}"}}]]]"#, by_name(&c, "A")));
        // A's children B and D, with E and F that only they reach; nothing in common.
        assert_eq!(got.len(), 2);
        let mut main = got[0].clone();
        main.sort();
        assert_eq!(main, ["B", "D", "E", "F"]);
        let single = graph(&[("top", 5, &["x"]), ("x", 1, &[])]);
        assert_eq!(pipeline(&single, &format!(r#"[["split_paths", ["{}"]]]"#, by_name(&single, "top"))), layers(&[&["x", "top"]]));
        assert_eq!(pipeline(&single, r#"[["split_paths", ["/nix/store/00000000000000000000000000000000-none"]]]"#), layers(&[&["x", "top"]]));
    }

    #[test]
    fn pipeline_errors_are_clear() {
        let bad = |json: &str| Pipeline::from_json(&serde_json::from_str(json).unwrap()).unwrap_err().to_string();
        assert!(bad(r#"[["limit_layers"]]"#).contains("step 1 (limit_layers): takes one argument"));
        assert!(bad(r#"[["limit_layers", 0]]"#).contains("at least 1"));
        assert!(bad(r#"[["popularity_contest"], ["frobnicate"]]"#).contains("step 2 (frobnicate): unknown step"));
        assert!(bad(r#"[["over", "main", ["nope"]]]"#).contains("unknown step"));
        assert!(bad(r#"[["split_paths", [{"parents_of": "x"}]]]"#).contains("children_of"));
        assert!(bad(r#"{"a": 1}"#).contains("expected a list of steps"));
        let g = contest_graph();
        let run = |json: &str| {
            let p = Pipeline::from_json(&serde_json::from_str(json).unwrap()).unwrap();
            plan_layers(&g, &PlanOptions { strategy: Strategy::Pipeline(p), ..Default::default() }).unwrap_err().to_string()
        };
        assert!(run(r#"[["limit_layers", 2]]"#).contains("limit_layers needs a list, but the previous step gave a graph"));
        assert!(run(r#"[["split_paths", []], ["over", "main", ["popularity_contest"]]]"#).contains("gave no \"main\" (it gave: rest)"));
        assert!(run(r#"[["flatten"]]"#).contains("flatten needs a list or a dict"));
    }

    #[test]
    fn dominator_tree_and_strategy() {
        // app -> {lib, tool}; tool -> lib; lib -> libc; other -> libc: libc is shared by two
        // roots, so only the virtual root dominates it; tool is app's alone.
        let g = graph(&[("app", 10, &["lib", "tool"]), ("tool", 5, &["lib"]), ("lib", 1000, &["libc"]), ("libc", 2000, &[]), ("other", 1, &["libc"])]);
        let (idom, _) = dominator_tree(&g);
        let id = |n: &str| g.nodes().iter().position(|x| x.path.ends_with(&format!("-{n}"))).unwrap();
        assert_eq!(idom[id("tool")], Some(id("app") as u32));
        assert_eq!(idom[id("lib")], Some(id("app") as u32));
        assert_eq!(idom[id("libc")], None);
        assert_eq!(idom[id("app")], None);
        // Budget 3 (maxLayers 4): the two big paths alone, the rest together.
        let mut p = plan(&g, Strategy::Dominator, 4);
        p[2].sort();
        assert_eq!(p, layers(&[&["libc"], &["lib"], &["app", "other", "tool"]]));
        // Budget 4: app's small group (app, tool: 15 bytes) would have to outweigh lib 5 times.
        let p = plan(&g, Strategy::Dominator, 5);
        assert_eq!(p.len(), 4);
        assert_eq!(p[..2], layers(&[&["libc"], &["lib"]])[..]);
    }
}
