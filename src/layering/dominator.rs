//! Our own strategy: paths grouped under their immediate dominator in the reference graph, so a
//! layer holds what only one part of the closure needs.

use crate::nixstore::ClosureGraph;
use std::collections::HashMap;

// Dominator (ours)

/// How much a group of small paths must outweigh the smallest path with a layer of its own
/// before it takes that layer: groups are less likely than single paths to be identical in
/// another image, and 1/5 did best on the sharing benchmark (bench/layers.sh).
pub(super) const GROUP_WEIGHT: u64 = 5;

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
pub(super) fn dominator_layers(graph: &ClosureGraph, budget: usize, excluded: &[bool]) -> Vec<Vec<u32>> {
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
pub(super) fn dominator_tree(graph: &ClosureGraph) -> (Vec<Option<u32>>, Vec<u32>) {
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

pub(super) fn common_dominator(idom: &[Option<u32>], depth: &[u32], mut a: Option<u32>, mut b: Option<u32>) -> Option<u32> {
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
