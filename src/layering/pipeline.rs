//! layeringPipeline: the steps of nixpkgs' `flatten-references-graph` (subcomponents, splits,
//! limits, popularity, reversal, flattening), parsed from their JSON and evaluated on the graph.

use crate::nixstore::ClosureGraph;
use crate::util::kind;
use super::popularity_order;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;

// Pipelines

/// A nixpkgs layeringPipeline: steps applied in turn, each to the previous result, starting
/// from the whole graph; nested lists and dicts of graphs are flattened into layers at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline(pub(super) Vec<Step>);

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    PopularityContest,
    SubcomponentIn(Vec<String>),
    SubcomponentOut(Vec<String>),
    SplitPaths(Vec<SplitSpec>),
    SplitEvery(usize),
    LimitLayers(usize),
    RemovePaths(Vec<String>),
    Reverse,
    Flatten,
    Over(String, Box<Step>),
    Map(Box<Step>),
    Pipe(Pipeline),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum SplitSpec {
    Path(String),
    ChildrenOf(Vec<String>),
}

impl Pipeline {
    /// Parses the JSON form of a layeringPipeline, e.g.
    /// `[["split_paths", ["/nix/store/…-app"]], ["over", "rest", ["popularity_contest"]]]`.
    pub fn from_json(value: &Value) -> Result<Pipeline> {
        parse_steps(value, "pipeline")
    }

    /// Parses `--pipeline`: JSON text, or the name of a file holding it.
    pub fn from_arg(arg: &str) -> Result<Pipeline> {
        let text = if arg.trim_start().starts_with('[') {
            arg.to_string()
        } else {
            let bytes = crate::util::limits::read_limited(std::path::Path::new(arg), crate::util::limits::INPUT_LIMIT).context("the pipeline")?;
            String::from_utf8(bytes).map_err(|_| anyhow!("pipeline {arg}: not UTF-8"))?
        };
        let value: Value = crate::util::limits::parse_json(text.as_bytes(), crate::util::limits::INPUT_VALUES).context("pipeline")?;
        Self::from_json(&value)
    }

    pub(super) fn run(&self, graph: &ClosureGraph, excluded: &[bool]) -> Result<Vec<Vec<u32>>> {
        let base = base_graph(graph, excluded);
        let result = eval_pipeline(self, Val::Graph(base), graph)?;
        let mut graphs = Vec::new();
        match result {
            // nixpkgs cannot flatten a lone graph; one layer holding it is what was meant.
            Val::Graph(g) => graphs.push(g),
            v => flatten_into(v, &mut graphs),
        }
        Ok(graphs.into_iter().filter(|g| !g.nodes.is_empty()).map(|g| g.nodes).collect())
    }
}

pub(super) fn parse_steps(value: &Value, at: &str) -> Result<Pipeline> {
    let Value::Array(steps) = value else { bail!("{at}: expected a list of steps, got {}", kind(value)) };
    let steps = steps.iter().enumerate().map(|(i, s)| parse_step(s, &format!("{at} step {}", i + 1))).collect::<Result<_>>()?;
    Ok(Pipeline(steps))
}

pub(super) fn parse_step(value: &Value, at: &str) -> Result<Step> {
    let Value::Array(items) = value else { bail!("{at}: expected [\"name\", args...], got {}", kind(value)) };
    let Some(Value::String(name)) = items.first() else { bail!("{at}: expected [\"name\", args...]: the first item must be the step's name") };
    let args = &items[1..];
    let at = format!("{at} ({name})");
    let want = |n: usize, what: &str| -> Result<()> {
        if args.len() != n {
            bail!("{at}: takes {what}, got {} argument{}", args.len(), if args.len() == 1 { "" } else { "s" });
        }
        Ok(())
    };
    let paths = |v: &Value, single_ok: bool| -> Result<Vec<String>> {
        match v {
            Value::String(s) if single_ok => Ok(vec![s.clone()]),
            Value::Array(a) => a.iter().map(|x| x.as_str().map(String::from).ok_or_else(|| anyhow!("{at}: expected store paths, got {}", kind(x)))).collect(),
            v => bail!("{at}: expected a list of store paths, got {}", kind(v)),
        }
    };
    let count = |v: &Value| -> Result<usize> {
        v.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| anyhow!("{at}: expected a whole number of at least 1, got {v}"))
    };
    Ok(match name.as_str() {
        "popularity_contest" => {
            want(0, "no arguments")?;
            Step::PopularityContest
        }
        "reverse" => {
            want(0, "no arguments")?;
            Step::Reverse
        }
        "flatten" => {
            want(0, "no arguments")?;
            Step::Flatten
        }
        "subcomponent_in" | "subcomponent_out" => {
            want(1, "one argument, a list of store paths")?;
            let p = paths(&args[0], false)?;
            if name == "subcomponent_in" {
                Step::SubcomponentIn(p)
            } else {
                Step::SubcomponentOut(p)
            }
        }
        "remove_paths" => {
            want(1, "one argument, a store path or a list of them")?;
            Step::RemovePaths(paths(&args[0], true)?)
        }
        "split_paths" => {
            want(1, "one argument, a list of store paths or {\"children_of\": paths}")?;
            let Value::Array(specs) = &args[0] else { bail!("{at}: expected a list, got {}", kind(&args[0])) };
            let specs = specs
                .iter()
                .map(|s| match s {
                    Value::String(p) => Ok(SplitSpec::Path(p.clone())),
                    Value::Object(o) if o.len() == 1 && o.contains_key("children_of") => Ok(SplitSpec::ChildrenOf(paths(&o["children_of"], true)?)),
                    v => bail!("{at}: expected a store path or {{\"children_of\": paths}}, got {v}"),
                })
                .collect::<Result<_>>()?;
            Step::SplitPaths(specs)
        }
        "split_every" => {
            want(1, "one argument, a count")?;
            Step::SplitEvery(count(&args[0])?)
        }
        "limit_layers" => {
            want(1, "one argument, the most layers to keep")?;
            Step::LimitLayers(count(&args[0])?)
        }
        "over" => {
            want(2, "two arguments, a key and a step")?;
            let Value::String(key) = &args[0] else { bail!("{at}: the key must be a string, got {}", kind(&args[0])) };
            Step::Over(key.clone(), Box::new(parse_step(&args[1], &format!("{at} > step"))?))
        }
        "map" => {
            want(1, "one argument, a step")?;
            Step::Map(Box::new(parse_step(&args[0], &format!("{at} > step"))?))
        }
        "pipe" => {
            want(1, "one argument, a list of steps")?;
            Step::Pipe(parse_steps(&args[0], &at)?)
        }
        other => bail!(
            "{at}: unknown step {other:?} (known: popularity_contest, subcomponent_in, subcomponent_out, split_paths, split_every, limit_layers, remove_paths, reverse, flatten, over, map, pipe)"
        ),
    })
}

/// A graph as flatten-references-graph's igraph graphs: vertices in order (graph node ids) and
/// edges between vertex positions. Vertex order matters: it is the order of paths in a layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Graph {
    pub(super) nodes: Vec<u32>,
    pub(super) edges: Vec<(u32, u32)>,
}

impl Graph {
    /// Successors of each vertex, ascending (igraph returns neighbours by vertex id).
    pub(super) fn children(&self) -> Vec<Vec<u32>> {
        let mut c = vec![Vec::new(); self.nodes.len()];
        for &(s, t) in &self.edges {
            c[s as usize].push(t);
        }
        for l in &mut c {
            l.sort_unstable();
            l.dedup();
        }
        c
    }

    pub(super) fn parents(&self) -> Vec<Vec<u32>> {
        let mut p = vec![Vec::new(); self.nodes.len()];
        for &(s, t) in &self.edges {
            p[t as usize].push(s);
        }
        for l in &mut p {
            l.sort_unstable();
            l.dedup();
        }
        p
    }

    /// The vertices kept, in their order, and the edges between them (igraph's
    /// induced_subgraph keeps vertex order).
    pub(super) fn induced(&self, keep: &[bool]) -> Graph {
        let mut at = vec![u32::MAX; self.nodes.len()];
        let mut nodes = Vec::new();
        for (i, &n) in self.nodes.iter().enumerate() {
            if keep[i] {
                at[i] = nodes.len() as u32;
                nodes.push(n);
            }
        }
        let edges = self.edges.iter().filter(|&&(s, t)| keep[s as usize] && keep[t as usize]).map(|&(s, t)| (at[s as usize], at[t as usize])).collect();
        Graph { nodes, edges }
    }

    /// Looks paths up as igraph's find by name does (the first vertex with that name).
    pub(super) fn locator<'a>(&self, graph: &'a ClosureGraph) -> impl Fn(&str) -> Option<usize> + 'a {
        let ids: HashMap<u32, usize> = self.nodes.iter().enumerate().rev().map(|(i, &n)| (n, i)).collect();
        move |p| ids.get(&graph.index_of(p)?).copied()
    }

    pub(super) fn find_all(&self, graph: &ClosureGraph, paths: &[String]) -> Vec<usize> {
        let find = self.locator(graph);
        paths.iter().filter_map(|p| find(p)).collect()
    }

    /// igraph's `a + b` for two graphs: the disjoint union, a's vertices then b's.
    pub(super) fn append(&mut self, other: Graph) {
        let off = self.nodes.len() as u32;
        self.nodes.extend(other.nodes);
        self.edges.extend(other.edges.into_iter().map(|(s, t)| (s + off, t + off)));
    }
}

/// Marks everything reachable from `from` along `adj` (the starting vertices included).
pub(super) fn reach(adj: &[Vec<u32>], from: impl IntoIterator<Item = usize>) -> Vec<bool> {
    let mut seen = vec![false; adj.len()];
    let mut todo: Vec<usize> = from.into_iter().collect();
    while let Some(v) = todo.pop() {
        if !std::mem::replace(&mut seen[v], true) {
            todo.extend(adj[v].iter().map(|&c| c as usize));
        }
    }
    seen
}

/// The graph flatten-references-graph starts from: excluded paths and references to them
/// dropped, self-references dropped, vertices in Nix's order (by path) stably sorted by
/// narSize.
pub(super) fn base_graph(graph: &ClosureGraph, excluded: &[bool]) -> Graph {
    let mut nodes: Vec<u32> = (0..graph.len() as u32).filter(|&i| !excluded[i as usize]).collect();
    nodes.sort_by_key(|&i| graph.node(i).nar_size);
    let mut at = vec![u32::MAX; graph.len()];
    for (v, &i) in nodes.iter().enumerate() {
        at[i as usize] = v as u32;
    }
    let mut edges = Vec::new();
    for (v, &i) in nodes.iter().enumerate() {
        for &r in &graph.node(i).references {
            if !excluded[r as usize] {
                edges.push((v as u32, at[r as usize]));
            }
        }
    }
    Graph { nodes, edges }
}

/// Intermediate results: graphs, lists of them and dicts (`main`/`common`/`rest`) of them.
#[derive(Debug, Clone)]
pub(super) enum Val {
    Graph(Graph),
    List(Vec<Val>),
    Dict(Vec<(String, Val)>),
}

impl Val {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Val::Graph(_) => "a graph",
            Val::List(_) => "a list",
            Val::Dict(_) => "a dict",
        }
    }
}

pub(super) fn eval_pipeline(p: &Pipeline, mut v: Val, graph: &ClosureGraph) -> Result<Val> {
    for step in &p.0 {
        v = eval_step(step, v, graph)?;
    }
    Ok(v)
}

pub(super) fn step_name(step: &Step) -> &'static str {
    match step {
        Step::PopularityContest => "popularity_contest",
        Step::SubcomponentIn(_) => "subcomponent_in",
        Step::SubcomponentOut(_) => "subcomponent_out",
        Step::SplitPaths(_) => "split_paths",
        Step::SplitEvery(_) => "split_every",
        Step::LimitLayers(_) => "limit_layers",
        Step::RemovePaths(_) => "remove_paths",
        Step::Reverse => "reverse",
        Step::Flatten => "flatten",
        Step::Over(..) => "over",
        Step::Map(_) => "map",
        Step::Pipe(_) => "pipe",
    }
}

pub(super) fn eval_step(step: &Step, v: Val, graph: &ClosureGraph) -> Result<Val> {
    let name = step_name(step);
    let wrong = |v: &Val, want: &str| anyhow!("pipeline: {name} needs {want}, but the previous step gave {}", v.kind());
    let as_graph = |v: Val| match v {
        Val::Graph(g) => Ok(g),
        v => Err(wrong(&v, "a graph")),
    };
    let as_list = |v: Val| match v {
        Val::List(l) => Ok(l),
        v => Err(wrong(&v, "a list")),
    };
    Ok(match step {
        Step::PopularityContest => {
            let g = as_graph(v)?;
            let names: Vec<&str> = g.nodes.iter().map(|&i| graph.path(i)).collect();
            let order = popularity_order(&g.children(), &names);
            Val::List(order.into_iter().map(|i| Val::Graph(Graph { nodes: vec![g.nodes[i as usize]], edges: vec![] })).collect())
        }
        Step::SubcomponentIn(paths) | Step::SubcomponentOut(paths) => {
            let g = as_graph(v)?;
            let adj = if matches!(step, Step::SubcomponentIn(_)) { g.parents() } else { g.children() };
            let main = reach(&adj, g.find_all(graph, paths));
            let rest: Vec<bool> = main.iter().map(|m| !m).collect();
            Val::Dict(vec![("main".into(), Val::Graph(g.induced(&main))), ("rest".into(), Val::Graph(g.induced(&rest)))])
        }
        Step::SplitPaths(specs) => split_paths(as_graph(v)?, specs, graph),
        Step::SplitEvery(count) => {
            let g = as_graph(v)?;
            let mut parts: Vec<Graph> = g.nodes.chunks(*count).map(|c| Graph { nodes: c.to_vec(), edges: vec![] }).collect();
            for &(s, t) in &g.edges {
                let (cs, ct) = (s as usize / count, t as usize / count);
                if cs == ct {
                    let off = (cs * count) as u32;
                    parts[cs].edges.push((s - off, t - off));
                }
            }
            Val::List(parts.into_iter().map(Val::Graph).collect())
        }
        Step::LimitLayers(max) => {
            let mut list = as_list(v)?;
            let rest = list.split_off((max - 1).min(list.len()));
            // nixpkgs merges the rest onto an empty graph, so there is always a last
            // (possibly empty) graph; empty layers are dropped at the end.
            let mut merged = Graph::default();
            for item in rest {
                match item {
                    Val::Graph(g) => merged.append(g),
                    v => bail!("pipeline: limit_layers can only merge graphs, but the list holds {}", v.kind()),
                }
            }
            list.push(Val::Graph(merged));
            Val::List(list)
        }
        Step::RemovePaths(paths) => {
            let g = as_graph(v)?;
            let mut keep = vec![true; g.nodes.len()];
            for i in g.find_all(graph, paths) {
                keep[i] = false;
            }
            Val::Graph(g.induced(&keep))
        }
        Step::Reverse => {
            let mut l = as_list(v)?;
            l.reverse();
            Val::List(l)
        }
        Step::Flatten => {
            if let Val::Graph(_) = v {
                return Err(wrong(&v, "a list or a dict"));
            }
            let mut graphs = Vec::new();
            flatten_into(v, &mut graphs);
            Val::List(graphs.into_iter().map(Val::Graph).collect())
        }
        Step::Over(key, inner) => {
            let Val::Dict(mut entries) = v else { return Err(wrong(&v, "a dict")) };
            let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
            let Some(at) = entries.iter().position(|(k, _)| k == key) else {
                bail!("pipeline: over {key:?}: the previous step gave no {key:?} (it gave: {})", keys.join(", "))
            };
            let old = std::mem::replace(&mut entries[at].1, Val::List(vec![]));
            entries[at].1 = eval_step(inner, old, graph)?;
            Val::Dict(entries)
        }
        Step::Map(inner) => Val::List(as_list(v)?.into_iter().map(|x| eval_step(inner, x, graph)).collect::<Result<_>>()?),
        Step::Pipe(p) => eval_pipeline(p, v, graph)?,
    })
}

pub(super) fn flatten_into(v: Val, out: &mut Vec<Graph>) {
    match v {
        Val::Graph(g) => out.push(g),
        Val::List(l) => l.into_iter().for_each(|x| flatten_into(x, out)),
        Val::Dict(d) => d.into_iter().for_each(|(_, x)| flatten_into(x, out)),
    }
}

/// nixpkgs' split_paths: the given paths and what only they reach (`main`), what they share
/// with the rest of the graph (`common`), and the rest (`rest`); edges into the split paths are
/// cut in all three, and empty parts are left out.
pub(super) fn split_paths(g: Graph, specs: &[SplitSpec], graph: &ClosureGraph) -> Val {
    let children = g.children();
    let find = g.locator(graph);
    let mut split = Vec::new();
    for spec in specs {
        match spec {
            SplitSpec::Path(p) => split.extend(find(p)),
            SplitSpec::ChildrenOf(ps) => {
                for p in ps {
                    if let Some(v) = find(p) {
                        split.extend(children[v].iter().map(|&c| c as usize));
                    }
                }
            }
        }
    }
    if split.is_empty() {
        return Val::Dict(vec![("rest".into(), Val::Graph(g))]);
    }
    let n = g.nodes.len();
    let mut is_split = vec![false; n];
    for &s in &split {
        is_split[s] = true;
    }
    let parents = g.parents();
    let roots: Vec<usize> = (0..n).filter(|&v| parents[v].is_empty()).collect();
    if let [root] = roots[..] {
        if is_split[root] {
            return Val::Dict(vec![("main".into(), Val::Graph(g))]);
        }
    }
    let split_off = reach(&children, split.iter().copied());
    let cut = Graph { nodes: g.nodes.clone(), edges: g.edges.iter().copied().filter(|&(_, t)| !is_split[t as usize]).collect() };
    // With several roots nixpkgs links them from a made-up root, whose edges into split paths
    // are cut like any other.
    let starts = roots.into_iter().filter(|&r| !is_split[r]);
    let rest_with_common = reach(&cut.children(), starts);
    let common: Vec<bool> = (0..n).map(|v| split_off[v] && rest_with_common[v]).collect();
    let main: Vec<bool> = (0..n).map(|v| split_off[v] && !common[v]).collect();
    let rest: Vec<bool> = (0..n).map(|v| rest_with_common[v] && !common[v]).collect();
    let parts = [("main", main), ("common", common), ("rest", rest)];
    Val::Dict(parts.into_iter().map(|(k, keep)| (k.to_string(), Val::Graph(cut.induced(&keep)))).filter(|(_, v)| matches!(v, Val::Graph(g) if !g.nodes.is_empty())).collect())
}
