//! Bucket moves that even out the shards' load: a greedy plan over the
//! measured load of each bucket.
//!
//! Each step takes the most loaded shard and moves the one bucket of it to
//! the least loaded shard that lowers the larger of the two loads the most.
//! It stops when no single move lowers the maximum by more than a hair, or
//! after `max_moves`. Load that belongs to no bucket (tables of the
//! default shard, statements without a sharding key) stays where it is.

/// A bucket to move.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub bucket: u32,
    pub from: usize,
    pub to: usize,
    pub load: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Per shard, before and after.
    pub before: Vec<f64>,
    pub after: Vec<f64>,
}

/// max / mean of the shards' loads (1.0 is perfectly even; 0 load: 1.0).
pub fn skew(loads: &[f64]) -> f64 {
    let n = loads.len().max(1) as f64;
    let mean = loads.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return 1.0;
    }
    loads.iter().cloned().fold(0.0, f64::max) / mean
}

/// `fixed[s]`: load of shard s outside any bucket; `buckets[b]`: the load
/// of bucket b; `owner[b]`: its shard; `usable[s]`: whether shard s may
/// receive buckets.
pub fn rebalance(
    fixed: &[f64],
    buckets: &[f64],
    owner: &[usize],
    usable: &[bool],
    max_moves: usize,
) -> Plan {
    let shards = fixed.len();
    let mut owner = owner.to_vec();
    let mut load = fixed.to_vec();
    for (b, l) in buckets.iter().enumerate() {
        if let Some(s) = owner.get(b) {
            load[*s] += l;
        }
    }
    let before = load.clone();
    let mut steps = Vec::new();
    let total: f64 = load.iter().sum();
    let eps = total * 1e-6;
    while steps.len() < max_moves && shards > 1 {
        let from = argmax(&load);
        let Some(to) = (0..shards)
            .filter(|s| *s != from && usable.get(*s).copied().unwrap_or(true))
            .min_by(|a, b| load[*a].total_cmp(&load[*b]))
        else {
            break;
        };
        let current_max = load[from].max(load[to]);
        // The bucket whose move leaves the smaller of the two maxima.
        let best = (0..buckets.len())
            .filter(|b| owner[*b] == from && buckets[*b] > 0.0)
            .map(|b| (b, (load[from] - buckets[b]).max(load[to] + buckets[b])))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((b, new_max)) = best else { break };
        if new_max >= current_max - eps {
            break;
        }
        load[from] -= buckets[b];
        load[to] += buckets[b];
        owner[b] = to;
        steps.push(Step {
            bucket: b as u32,
            from,
            to,
            load: buckets[b],
        });
    }
    Plan {
        steps,
        before,
        after: load,
    }
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len())
        .max_by(|a, b| v[*a].total_cmp(&v[*b]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_load_off_the_hot_shard() {
        // 3 shards, 6 buckets; shard 0 owns the four heavy ones.
        let buckets = [40.0, 30.0, 20.0, 10.0, 5.0, 5.0];
        let owner = [0, 0, 0, 0, 1, 2];
        let p = rebalance(&[0.0; 3], &buckets, &owner, &[true; 3], 10);
        assert_eq!(p.before, vec![100.0, 5.0, 5.0]);
        assert!(skew(&p.after) < skew(&p.before));
        assert!(skew(&p.after) < 1.3, "{:?}", p);
        let moved: f64 = p.steps.iter().map(|s| s.load).sum();
        assert!(moved > 0.0 && p.steps[0].from == 0);
    }

    #[test]
    fn a_single_hot_bucket_is_not_moved_back_and_forth() {
        // One bucket carries everything: moving it only moves the problem.
        let p = rebalance(&[0.0; 2], &[100.0, 0.0], &[0, 1], &[true; 2], 10);
        assert!(p.steps.is_empty());
        assert_eq!(skew(&p.after), skew(&p.before));
    }

    #[test]
    fn fixed_load_and_unusable_shards_are_respected() {
        let p = rebalance(
            &[50.0, 0.0, 0.0],
            &[10.0, 10.0, 10.0],
            &[0, 0, 0],
            &[true, false, true],
            10,
        );
        assert!(p.steps.iter().all(|s| s.to == 2));
        assert_eq!(p.after[1], 0.0);
    }

    #[test]
    fn skew_of_even_and_uneven() {
        assert_eq!(skew(&[1.0, 1.0, 1.0]), 1.0);
        assert_eq!(skew(&[3.0, 0.0, 0.0]), 3.0);
        assert_eq!(skew(&[0.0, 0.0]), 1.0);
    }
}
