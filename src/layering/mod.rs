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

use crate::util::kind;
use crate::nixstore::ClosureGraph;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

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
// Popularity

/// nixpkgs' popularity contest on a DAG given as children lists: paths ordered by popularity,
/// most popular first, equal ones by [`package_name`].
///
/// nixpkgs expands the graph into a tree from the paths nobody references and adds up counters
/// level by level. That works out to: the popularity of `s` is the sum, over every `x` that is
/// `s` or reaches `s`, of the number of distinct walks from a root to `x`. Walk counts grow
/// exponentially with depth, so the sums are exact big integers (Python's ints), computed with
/// ancestor bitsets and per-byte lookup tables instead of nixpkgs' per-path dictionaries.
fn popularity_order(children: &[Vec<u32>], names: &[&str]) -> Vec<u32> {
    popularity_order_in_chunks(children, names, 4096)
}

/// [`popularity_order`], holding ancestor bitsets `chunk` columns at a time (bounded memory).
fn popularity_order_in_chunks(children: &[Vec<u32>], names: &[&str], chunk: usize) -> Vec<u32> {
    let n = children.len();
    let mut parents = vec![Vec::new(); n];
    for (s, cs) in children.iter().enumerate() {
        for &c in cs {
            parents[c as usize].push(s as u32);
        }
    }
    // Roots first.
    let mut pending: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut topo: Vec<u32> = (0..n as u32).filter(|&i| pending[i as usize] == 0).collect();
    let mut head = 0;
    while head < topo.len() {
        let s = topo[head] as usize;
        head += 1;
        for &c in &children[s] {
            pending[c as usize] -= 1;
            if pending[c as usize] == 0 {
                topo.push(c);
            }
        }
    }
    // Closure graphs are acyclic; should a cycle get here anyway, its paths go last, as the
    // paths nixpkgs finds "missing" from the contest do.
    let reachable = topo.len();
    let mut missing: Vec<u32> = (0..n as u32).filter(|&i| pending[i as usize] != 0).collect();
    missing.sort_by(|&a, &b| names[a as usize].cmp(names[b as usize]));

    // Walks from the roots to each path.
    let mut walks: Vec<Vec<u32>> = vec![Vec::new(); n];
    for &s in &topo[..reachable] {
        let s = s as usize;
        if parents[s].is_empty() {
            walks[s] = vec![1];
        } else {
            let mut acc = Vec::new();
            for &p in &parents[s] {
                big_add(&mut acc, &walks[p as usize]);
            }
            walks[s] = acc;
        }
    }
    let limbs = walks.iter().map(Vec::len).max().unwrap_or(0).max(1);

    // sums[s * limbs + j]: the sum of limb j of walks over the ancestors of s (and s). Limbs
    // are 32 bits, so even n of them fit a u64 and carries wait until the end.
    let mut sums = vec![0u64; n * limbs];
    let mut pos = vec![usize::MAX; n];
    for (i, &s) in topo.iter().enumerate() {
        pos[s as usize] = i;
    }
    let width = reachable.min(chunk).div_ceil(64).max(1);
    let mut bits = vec![0u64; reachable * width];
    let mut table = vec![0u64; width * 8 * 256];
    for start in (0..reachable).step_by(chunk) {
        let end = (start + chunk).min(reachable);
        // Row r: which of topo[start..end] are ancestors of topo[r] (or it). Parents come
        // earlier in topo order, so rows before `start` are empty and skipped.
        for r in start..reachable {
            let (done, rest) = bits.split_at_mut(r * width);
            let row = &mut rest[..width];
            row.fill(0);
            if r < end {
                let k = r - start;
                row[k / 64] |= 1 << (k % 64);
            }
            for &p in &parents[topo[r] as usize] {
                let pr = pos[p as usize];
                if pr >= start {
                    for (w, &v) in row.iter_mut().zip(&done[pr * width..pr * width + width]) {
                        *w |= v;
                    }
                }
            }
        }
        let blocks = (end - start).div_ceil(8);
        for j in 0..limbs {
            for b in 0..blocks {
                let t = &mut table[b * 256..b * 256 + 256];
                for mask in 1..256usize {
                    let k = start + b * 8 + mask.trailing_zeros() as usize;
                    let v = if k < end { walks[topo[k] as usize].get(j).copied().unwrap_or(0) as u64 } else { 0 };
                    t[mask] = t[mask & (mask - 1)] + v;
                }
            }
            for r in start..reachable {
                let row = &bits[r * width..r * width + width];
                let mut sum = 0u64;
                for b in 0..blocks {
                    let byte = (row[b / 8] >> ((b % 8) * 8)) & 0xff;
                    sum += table[b * 256 + byte as usize];
                }
                sums[topo[r] as usize * limbs + j] += sum;
            }
        }
    }
    let popularity: Vec<Vec<u32>> = (0..n).map(|s| big_from_limb_sums(&sums[s * limbs..(s + 1) * limbs])).collect();
    let keys: Vec<String> = names.iter().map(|p| package_name(p)).collect();
    let mut order: Vec<u32> = topo[..reachable].to_vec();
    order.sort_by(|&a, &b| big_cmp(&popularity[b as usize], &popularity[a as usize]).then_with(|| keys[a as usize].cmp(&keys[b as usize])));
    order.extend(missing);
    order
}

/// nixpkgs' tie-break key: the path with its first dash-separated part (store dir and hash)
/// moved to the end, so equally popular paths sort by name.
pub fn package_name(path: &str) -> String {
    match path.split_once('-') {
        Some((first, rest)) => format!("{rest}-{first}"),
        None => path.to_string(),
    }
}

fn big_add(acc: &mut Vec<u32>, x: &[u32]) {
    if acc.len() < x.len() {
        acc.resize(x.len(), 0);
    }
    let mut carry = 0u64;
    for (i, a) in acc.iter_mut().enumerate() {
        let s = *a as u64 + x.get(i).copied().unwrap_or(0) as u64 + carry;
        *a = s as u32;
        carry = s >> 32;
        if i >= x.len() && carry == 0 {
            break;
        }
    }
    if carry > 0 {
        acc.push(carry as u32);
    }
}

fn big_from_limb_sums(sums: &[u64]) -> Vec<u32> {
    let mut out = Vec::with_capacity(sums.len() + 2);
    let mut carry = 0u128;
    for &s in sums {
        let t = s as u128 + carry;
        out.push(t as u32);
        carry = t >> 32;
    }
    while carry > 0 {
        out.push(carry as u32);
        carry >>= 32;
    }
    while out.last() == Some(&0) {
        out.pop();
    }
    out
}

fn big_cmp(a: &[u32], b: &[u32]) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.iter().rev().cmp(b.iter().rev()))
}

// ---------------------------------------------------------------------------------------------
// Pipelines

/// A nixpkgs layeringPipeline: steps applied in turn, each to the previous result, starting
/// from the whole graph; nested lists and dicts of graphs are flattened into layers at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline(Vec<Step>);

#[derive(Debug, Clone, PartialEq)]
enum Step {
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
enum SplitSpec {
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

    fn run(&self, graph: &ClosureGraph, excluded: &[bool]) -> Result<Vec<Vec<u32>>> {
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

fn parse_steps(value: &Value, at: &str) -> Result<Pipeline> {
    let Value::Array(steps) = value else { bail!("{at}: expected a list of steps, got {}", kind(value)) };
    let steps = steps.iter().enumerate().map(|(i, s)| parse_step(s, &format!("{at} step {}", i + 1))).collect::<Result<_>>()?;
    Ok(Pipeline(steps))
}

fn parse_step(value: &Value, at: &str) -> Result<Step> {
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
struct Graph {
    nodes: Vec<u32>,
    edges: Vec<(u32, u32)>,
}

impl Graph {
    /// Successors of each vertex, ascending (igraph returns neighbours by vertex id).
    fn children(&self) -> Vec<Vec<u32>> {
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

    fn parents(&self) -> Vec<Vec<u32>> {
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
    fn induced(&self, keep: &[bool]) -> Graph {
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
    fn locator<'a>(&self, graph: &'a ClosureGraph) -> impl Fn(&str) -> Option<usize> + 'a {
        let ids: HashMap<u32, usize> = self.nodes.iter().enumerate().rev().map(|(i, &n)| (n, i)).collect();
        move |p| ids.get(&graph.index_of(p)?).copied()
    }

    fn find_all(&self, graph: &ClosureGraph, paths: &[String]) -> Vec<usize> {
        let find = self.locator(graph);
        paths.iter().filter_map(|p| find(p)).collect()
    }

    /// igraph's `a + b` for two graphs: the disjoint union, a's vertices then b's.
    fn append(&mut self, other: Graph) {
        let off = self.nodes.len() as u32;
        self.nodes.extend(other.nodes);
        self.edges.extend(other.edges.into_iter().map(|(s, t)| (s + off, t + off)));
    }
}

/// Marks everything reachable from `from` along `adj` (the starting vertices included).
fn reach(adj: &[Vec<u32>], from: impl IntoIterator<Item = usize>) -> Vec<bool> {
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
fn base_graph(graph: &ClosureGraph, excluded: &[bool]) -> Graph {
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
enum Val {
    Graph(Graph),
    List(Vec<Val>),
    Dict(Vec<(String, Val)>),
}

impl Val {
    fn kind(&self) -> &'static str {
        match self {
            Val::Graph(_) => "a graph",
            Val::List(_) => "a list",
            Val::Dict(_) => "a dict",
        }
    }
}

fn eval_pipeline(p: &Pipeline, mut v: Val, graph: &ClosureGraph) -> Result<Val> {
    for step in &p.0 {
        v = eval_step(step, v, graph)?;
    }
    Ok(v)
}

fn step_name(step: &Step) -> &'static str {
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

fn eval_step(step: &Step, v: Val, graph: &ClosureGraph) -> Result<Val> {
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

fn flatten_into(v: Val, out: &mut Vec<Graph>) {
    match v {
        Val::Graph(g) => out.push(g),
        Val::List(l) => l.into_iter().for_each(|x| flatten_into(x, out)),
        Val::Dict(d) => d.into_iter().for_each(|(_, x)| flatten_into(x, out)),
    }
}

/// nixpkgs' split_paths: the given paths and what only they reach (`main`), what they share
/// with the rest of the graph (`common`), and the rest (`rest`); edges into the split paths are
/// cut in all three, and empty parts are left out.
fn split_paths(g: Graph, specs: &[SplitSpec], graph: &ClosureGraph) -> Val {
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

// ---------------------------------------------------------------------------------------------
// auto-layer

/// nixpkgs' auto-layer: take paths largest first (ties: the later path in Nix's order); each
/// becomes a "primary" heading a layer, and every path is grouped by the set of primaries it
/// belongs to: its own, or, for a dependency of a primary, those primaries whose dependency it
/// is and that nothing else reaches it around. Stops before the number of distinct groups would
/// exceed `limit`. Layers are ordered by the size of their closure, paths within a layer by
/// name then hash. Excluded paths take part, and are left out of the layers at the end.
fn auto_layers(graph: &ClosureGraph, limit: usize, excluded: &[bool]) -> Vec<Vec<u32>> {
    let n = graph.len();
    if n == 0 {
        return vec![];
    }
    let mut by_size: Vec<u32> = (0..n as u32).collect();
    by_size.sort_by(|&a, &b| graph.node(b).nar_size.cmp(&graph.node(a).nar_size).then(b.cmp(&a)));

    // Groups are sets of primaries (by rank, ascending), interned; every path starts in the
    // empty group.
    let mut sets: Vec<Vec<u32>> = vec![vec![]];
    let mut set_ids: HashMap<Vec<u32>, u32> = HashMap::from([(vec![], 0)]);
    let mut group = vec![0u32; n];
    let mut members = vec![n];
    let mut distinct = 1usize;
    let mut primaries: Vec<u32> = Vec::new();
    let (mut dep_mark, mut user_mark) = (vec![u32::MAX; n], vec![u32::MAX; n]);
    let mut intern = |s: Vec<u32>, sets: &mut Vec<Vec<u32>>, members: &mut Vec<usize>| -> u32 {
        *set_ids.entry(s.clone()).or_insert_with(|| {
            sets.push(s);
            members.push(0);
            (sets.len() - 1) as u32
        })
    };
    for (rank, &new) in by_size.iter().enumerate() {
        let rank = rank as u32;
        let deps = mark_reachable(new, rank, &mut dep_mark, |v| &graph.node(v).references);
        mark_reachable(new, rank, &mut user_mark, |v| graph.users(v));
        let mut changes: Vec<(u32, u32)> = Vec::with_capacity(deps.len() + 1);
        let own = intern(vec![rank], &mut sets, &mut members);
        changes.push((new, own));
        let mut moved: HashMap<u32, u32> = HashMap::new();
        for &d in &deps {
            let old = group[d as usize];
            let to = match moved.get(&old) {
                Some(&to) => to,
                None => {
                    let mut s: Vec<u32> = sets[old as usize].iter().copied().filter(|&p| user_mark[primaries[p as usize] as usize] != rank).collect();
                    if !s.iter().any(|&p| dep_mark[primaries[p as usize] as usize] == rank) {
                        s.push(rank);
                    }
                    let to = intern(s, &mut sets, &mut members);
                    moved.insert(old, to);
                    to
                }
            };
            changes.push((d, to));
        }
        // Apply, and undo if the groups now outnumber the limit.
        let mut apply = |changes: &[(u32, u32)], group: &mut Vec<u32>, members: &mut Vec<usize>| {
            for &(v, to) in changes {
                let from = std::mem::replace(&mut group[v as usize], to);
                members[from as usize] -= 1;
                distinct -= (members[from as usize] == 0) as usize;
                distinct += (members[to as usize] == 0) as usize;
                members[to as usize] += 1;
            }
            distinct
        };
        let previous: Vec<(u32, u32)> = changes.iter().rev().map(|&(v, _)| (v, group[v as usize])).collect();
        if apply(&changes, &mut group, &mut members) > limit {
            apply(&previous, &mut group, &mut members);
            break;
        }
        primaries.push(new);
    }

    let mut layers: HashMap<u32, Vec<u32>> = HashMap::new();
    for v in 0..n as u32 {
        layers.entry(group[v as usize]).or_default().push(v);
    }
    let mut layers: Vec<(u64, Vec<u32>)> = layers
        .into_values()
        .map(|mut paths| {
            paths.sort_by(|&a, &b| path_key(graph.path(a)).cmp(&path_key(graph.path(b))));
            let closure = graph.closure_mask(paths.iter().copied());
            let size = (0..n).filter(|&i| closure[i]).map(|i| graph.node(i as u32).nar_size).sum();
            (size, paths)
        })
        .collect();
    // nixpkgs leaves equal closure sizes in hash-set order; we order them by their paths.
    layers.sort_by(|(sa, pa), (sb, pb)| {
        sa.cmp(sb).then_with(|| pa.iter().map(|&i| path_key(graph.path(i))).cmp(pb.iter().map(|&i| path_key(graph.path(i)))))
    });
    layers.into_iter().map(|(_, paths)| paths.into_iter().filter(|&i| !excluded[i as usize]).collect::<Vec<_>>()).filter(|l| !l.is_empty()).collect()
}

/// auto-layer's sort key: the name after the first dash, then what precedes it.
fn path_key(path: &str) -> (&str, &str) {
    match path.split_once('-') {
        Some((hash, name)) => (name, hash),
        None => ("", path),
    }
}

/// Marks (with `stamp`) what `from` reaches along `next`, itself excluded, and lists it.
fn mark_reachable<'a>(from: u32, stamp: u32, mark: &mut [u32], next: impl Fn(u32) -> &'a [u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo: Vec<u32> = next(from).to_vec();
    while let Some(v) = todo.pop() {
        if v != from && mark[v as usize] != stamp {
            mark[v as usize] = stamp;
            out.push(v);
            todo.extend_from_slice(next(v));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Dominator (ours)

/// How much a group of small paths must outweigh the smallest path with a layer of its own
/// before it takes that layer: groups are less likely than single paths to be identical in
/// another image, and 1/5 did best on the sharing benchmark (bench/layers.sh).
const GROUP_WEIGHT: u64 = 5;

/// Our strategy, for sharing between related images at a fixed budget.
///
/// A layer is shared only if another image has exactly the same paths in it. A path alone is
/// such a layer wherever the path appears, and narSize, unlike popularity or what uses a path,
/// is the same in every image, so the largest paths get layers of their own and are picked the
/// same way in every image. What is left, the many small paths, is grouped along the dominator
/// tree of the graph (from a virtual root above the paths nobody references, as nixery does):
/// each small path joins the nearest dominator that heads a group, so a group is a path and what
/// only it pulls in, and a change to one small path breaks one group instead of one big rest
/// layer. A group takes the place of the smallest single path when its bytes are over
/// [`GROUP_WEIGHT`] times that path's; what no group takes forms the last layer.
fn dominator_layers(graph: &ClosureGraph, budget: usize, excluded: &[bool]) -> Vec<Vec<u32>> {
    let n = graph.len();
    if n == 0 {
        return vec![];
    }
    let size = |v: usize| if excluded[v] { 0 } else { graph.node(v as u32).nar_size };
    let (idom, users_first) = dominator_tree(graph);
    let mut by_size: Vec<u32> = (0..n as u32).filter(|&v| !excluded[v as usize]).collect();
    by_size.sort_by(|&a, &b| size(b as usize).cmp(&size(a as usize)).then(a.cmp(&b)));
    // One layer is kept for whatever no single path or group takes.
    let slots = budget.saturating_sub(1);
    let mut singles = slots.min(by_size.len());
    let mut is_single = vec![false; n];
    for &v in &by_size[..singles] {
        is_single[v as usize] = true;
    }
    // weight[v]: bytes of the non-single paths v dominates (itself included).
    let mut weight = vec![0u64; n];
    let heads = loop {
        weight.iter_mut().for_each(|w| *w = 0);
        for &v in users_first.iter().rev() {
            let v = v as usize;
            if !is_single[v] {
                weight[v] += size(v);
            }
            if let Some(d) = idom[v] {
                weight[d as usize] += weight[v];
            }
        }
        let groups = slots - singles;
        let mut candidates: Vec<u32> = (0..n as u32).filter(|&v| !is_single[v as usize] && weight[v as usize] > 0).collect();
        candidates.sort_by(|&a, &b| weight[b as usize].cmp(&weight[a as usize]).then(a.cmp(&b)));
        let trade = singles > 0
            && candidates.get(groups).is_some_and(|&next| weight[next as usize] > GROUP_WEIGHT.saturating_mul(size(by_size[singles - 1] as usize)));
        if !trade {
            candidates.truncate(groups);
            break candidates;
        }
        singles -= 1;
        is_single[by_size[singles] as usize] = false;
    };
    let mut is_head = vec![false; n];
    for &h in &heads {
        is_head[h as usize] = true;
    }
    // Dominators come before what they dominate in users-first order.
    let mut group_of = vec![u32::MAX; n];
    for &v in &users_first {
        let v = v as usize;
        group_of[v] = if is_head[v] { v as u32 } else { idom[v].map_or(u32::MAX, |d| group_of[d as usize]) };
    }
    let mut members: HashMap<u32, Vec<u32>> = HashMap::new();
    for v in 0..n {
        if !is_single[v] && !excluded[v] {
            members.entry(group_of[v]).or_default().push(v as u32);
        }
    }
    // Bottom first: layers whose head comes later in users-first order hold dependencies.
    let mut rank = vec![0usize; n];
    for (i, &v) in users_first.iter().enumerate() {
        rank[v as usize] = i;
    }
    let mut layers: Vec<(usize, Vec<u32>)> = by_size[..singles].iter().map(|&v| (rank[v as usize], vec![v])).collect();
    let rest = members.remove(&u32::MAX);
    layers.extend(members.into_iter().map(|(h, m)| (rank[h as usize], m)));
    layers.sort_by_key(|l| std::cmp::Reverse(l.0));
    let mut layers: Vec<Vec<u32>> = layers.into_iter().map(|(_, m)| m).collect();
    layers.extend(rest);
    layers
}

/// Immediate dominators from a virtual root above the paths nobody references (`None`: the
/// virtual root), and the order they were found in (users before what they use). On a DAG one
/// pass in that order suffices: a path's dominator is the common dominator of all its users.
fn dominator_tree(graph: &ClosureGraph) -> (Vec<Option<u32>>, Vec<u32>) {
    let n = graph.len();
    let mut users_first = graph.topological_order();
    users_first.reverse();
    let mut idom: Vec<Option<u32>> = vec![None; n];
    let mut depth = vec![0u32; n];
    for &v in &users_first {
        let mut users = graph.users(v).iter().copied();
        let d = match users.next() {
            None => None,
            Some(first) => {
                let mut d = Some(first);
                for u in users {
                    d = common_dominator(&idom, &depth, d, Some(u));
                }
                d
            }
        };
        idom[v as usize] = d;
        depth[v as usize] = d.map_or(1, |d| depth[d as usize] + 1);
    }
    (idom, users_first)
}

fn common_dominator(idom: &[Option<u32>], depth: &[u32], mut a: Option<u32>, mut b: Option<u32>) -> Option<u32> {
    let depth_of = |x: Option<u32>| x.map_or(0, |x| depth[x as usize]);
    while a != b {
        if depth_of(a) >= depth_of(b) {
            a = a.and_then(|x| idom[x as usize]);
        } else {
            b = b.and_then(|x| idom[x as usize]);
        }
    }
    a
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
