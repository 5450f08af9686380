//! nixpkgs' `auto-layer.py`: the largest paths head layers of their own, the rest grouped by the
//! set of heads that reach them.

use crate::nixstore::ClosureGraph;
use std::collections::HashMap;

// auto-layer

/// nixpkgs' auto-layer: take paths largest first (ties: the later path in Nix's order); each
/// becomes a "primary" heading a layer, and every path is grouped by the set of primaries it
/// belongs to: its own, or, for a dependency of a primary, those primaries whose dependency it
/// is and that nothing else reaches it around. Stops before the number of distinct groups would
/// exceed `limit`. Layers are ordered by the size of their closure, paths within a layer by
/// name then hash. Excluded paths take part, and are left out of the layers at the end.
pub(super) fn auto_layers(graph: &ClosureGraph, limit: usize, excluded: &[bool]) -> Vec<Vec<u32>> {
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
pub(super) fn path_key(path: &str) -> (&str, &str) {
    match path.split_once('-') {
        Some((hash, name)) => (name, hash),
        None => ("", path),
    }
}

/// Marks (with `stamp`) what `from` reaches along `next`, itself excluded, and lists it.
pub(super) fn mark_reachable<'a>(from: u32, stamp: u32, mark: &mut [u32], next: impl Fn(u32) -> &'a [u32]) -> Vec<u32> {
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
