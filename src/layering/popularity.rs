//! nixpkgs' popularity contest (`referencesByPopularity`, the `popularity_contest` step), with
//! Python's arbitrary-precision sums reproduced so ties break as they do there.

use std::cmp::Ordering;

// Popularity

/// nixpkgs' popularity contest on a DAG given as children lists: paths ordered by popularity,
/// most popular first, equal ones by [`package_name`].
///
/// nixpkgs expands the graph into a tree from the paths nobody references and adds up counters
/// level by level. That works out to: the popularity of `s` is the sum, over every `x` that is
/// `s` or reaches `s`, of the number of distinct walks from a root to `x`. Walk counts grow
/// exponentially with depth, so the sums are exact big integers (Python's ints), computed with
/// ancestor bitsets and per-byte lookup tables instead of nixpkgs' per-path dictionaries.
pub(super) fn popularity_order(children: &[Vec<u32>], names: &[&str]) -> Vec<u32> {
    popularity_order_in_chunks(children, names, 4096)
}

/// [`popularity_order`], holding ancestor bitsets `chunk` columns at a time (bounded memory).
pub(super) fn popularity_order_in_chunks(children: &[Vec<u32>], names: &[&str], chunk: usize) -> Vec<u32> {
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

pub(super) fn big_add(acc: &mut Vec<u32>, x: &[u32]) {
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

pub(super) fn big_from_limb_sums(sums: &[u64]) -> Vec<u32> {
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

pub(super) fn big_cmp(a: &[u32], b: &[u32]) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.iter().rev().cmp(b.iter().rev()))
}
