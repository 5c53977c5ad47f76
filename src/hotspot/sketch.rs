//! The heaviest keys of a stream in bounded memory: Space-Saving (Metwally,
//! Agrawal, El Abbadi, "Efficient computation of frequent and top-k
//! elements in data streams", 2005) with a fixed number of counters.
//!
//! Every counted key is either monitored (it has a counter) or not. A new
//! key takes over the counter with the smallest count, inherits that count
//! as its possible overestimate (`error`) and adds its own weight. So a
//! monitored key's true count lies in `[count - error, count]`, and any key
//! whose true count exceeds `total / capacity` is monitored.
//!
//! Written here: the crates that implement Space-Saving either keep every
//! key (unbounded) or have not been maintained for years; the algorithm is
//! thirty lines over an indexed min-heap.

// hashbrown's default hasher (foldhash): the sketch hashes a key per
// counted statement, and SipHash's DoS resistance buys nothing for a map
// that never grows past `capacity`.
use hashbrown::HashMap;
use std::hash::Hash;

#[derive(Debug, Clone, PartialEq)]
pub struct Counter<K> {
    pub key: K,
    /// Counted weight, an overestimate by at most `error`.
    pub count: f64,
    pub error: f64,
}

/// Space-Saving over keys `K` with `capacity` counters.
///
/// Counters stay in their slot; the min-heap orders slot numbers, and
/// `pos` finds a slot in it, so moving a counter in the heap swaps two
/// integers instead of re-hashing two keys.
pub struct SpaceSaving<K> {
    capacity: usize,
    slots: Vec<Counter<K>>,
    /// Slot numbers, a min-heap on their counts.
    heap: Vec<u32>,
    /// Slot -> its position in `heap`.
    pos: Vec<u32>,
    /// Key -> its slot.
    index: HashMap<K, u32>,
    /// All weight ever counted (after decay).
    total: f64,
}

impl<K: Hash + Eq + Clone> SpaceSaving<K> {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, u32::MAX as usize);
        SpaceSaving {
            capacity,
            slots: Vec::with_capacity(capacity),
            heap: Vec::with_capacity(capacity),
            pos: Vec::with_capacity(capacity),
            index: HashMap::with_capacity(capacity),
            total: 0.0,
        }
    }

    /// Counts `weight` more for `key`.
    pub fn add(&mut self, key: &K, weight: f64) {
        self.total += weight;
        if let Some(&slot) = self.index.get(key) {
            self.slots[slot as usize].count += weight;
            self.sift_down(self.pos[slot as usize] as usize);
            return;
        }
        if self.slots.len() < self.capacity {
            let slot = self.slots.len() as u32;
            self.slots.push(Counter {
                key: key.clone(),
                count: weight,
                error: 0.0,
            });
            self.heap.push(slot);
            self.pos.push(slot);
            self.index.insert(key.clone(), slot);
            self.sift_up(slot as usize);
            return;
        }
        // Take over the smallest counter.
        let slot = self.heap[0];
        let min = self.slots[slot as usize].count;
        let old = std::mem::replace(
            &mut self.slots[slot as usize],
            Counter {
                key: key.clone(),
                count: min + weight,
                error: min,
            },
        );
        self.index.remove(&old.key);
        self.index.insert(key.clone(), slot);
        self.sift_down(0);
    }

    /// Multiplies every count by `factor` (0 < factor ≤ 1): old load fades,
    /// so the sketch follows what is hot now.
    pub fn decay(&mut self, factor: f64) {
        for c in &mut self.slots {
            c.count *= factor;
            c.error *= factor;
        }
        self.total *= factor;
    }

    pub fn total(&self) -> f64 {
        self.total
    }

    /// The largest possible count of a key that has no counter.
    pub fn unmonitored_bound(&self) -> f64 {
        if self.slots.len() < self.capacity {
            0.0
        } else {
            self.count_at(0)
        }
    }

    /// The monitored keys, heaviest first.
    pub fn top(&self, n: usize) -> Vec<Counter<K>> {
        let mut all = self.slots.clone();
        all.sort_by(|a, b| b.count.total_cmp(&a.count));
        all.truncate(n);
        all
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The count of the counter at heap position `at`.
    fn count_at(&self, at: usize) -> f64 {
        self.slots[self.heap[at] as usize].count
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.count_at(parent) <= self.count_at(at) {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        let len = self.heap.len();
        loop {
            let (l, r) = (2 * at + 1, 2 * at + 2);
            let mut smallest = at;
            if l < len && self.count_at(l) < self.count_at(smallest) {
                smallest = l;
            }
            if r < len && self.count_at(r) < self.count_at(smallest) {
                smallest = r;
            }
            if smallest == at {
                return;
            }
            self.swap(at, smallest);
            at = smallest;
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a] as usize] = a as u32;
        self.pos[self.heap[b] as usize] = b as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_while_keys_fit() {
        let mut s = SpaceSaving::new(4);
        for (k, n) in [(1, 5), (2, 3), (3, 9)] {
            for _ in 0..n {
                s.add(&k, 1.0);
            }
        }
        let top = s.top(10);
        assert_eq!(top.iter().map(|c| c.key).collect::<Vec<_>>(), [3, 1, 2]);
        assert_eq!(top[0].count, 9.0);
        assert!(top.iter().all(|c| c.error == 0.0));
        assert_eq!(s.total(), 17.0);
    }

    #[test]
    fn heavy_keys_survive_a_long_tail_with_bounded_error() {
        // Key 0 takes 20% of the stream, key 1 10%, the rest is a tail of
        // 100,000 distinct keys seen once each.
        let mut s = SpaceSaving::new(64);
        let mut truth = [0.0f64; 2];
        let mut tail = 1_000_000u64;
        for i in 0..200_000u64 {
            let key = match i % 10 {
                0 | 1 => 0,
                2 => 1,
                _ => {
                    tail += 1;
                    tail
                }
            };
            if key < 2 {
                truth[key as usize] += 1.0;
            }
            s.add(&key, 1.0);
        }
        let top = s.top(2);
        assert_eq!((top[0].key, top[1].key), (0, 1));
        for c in &top {
            let t = truth[c.key as usize];
            assert!(c.count >= t && c.count - c.error <= t, "{c:?} vs {t}");
            // The error is at most total / capacity.
            assert!(c.error <= s.total() / 64.0);
        }
        assert_eq!(s.len(), 64);
    }

    #[test]
    fn memory_stays_bounded_under_millions_of_keys() {
        let mut s = SpaceSaving::new(128);
        for i in 0..2_000_000u64 {
            s.add(&i, 1.0);
        }
        assert_eq!(s.len(), 128);
        assert_eq!(s.index.len(), 128);
        assert!(s.slots.capacity() <= 128 && s.heap.capacity() <= 128);
        assert!(s.pos.capacity() <= 128 && s.index.capacity() < 512);
        assert_eq!(s.total(), 2_000_000.0);
    }

    #[test]
    fn random_streams_keep_the_bounds_and_the_heap_consistent() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for capacity in [1, 2, 7, 64] {
            let mut s = SpaceSaving::new(capacity);
            let mut truth: std::collections::HashMap<u32, f64> = Default::default();
            for _ in 0..5000 {
                // Skewed: small keys far more often.
                let range = rng.gen_range(1..200u32);
                let k = rng.gen_range(0..range);
                let w = f64::from(rng.gen_range(1..4u8));
                s.add(&k, w);
                *truth.entry(k).or_default() += w;
            }
            for (i, &slot) in s.heap.iter().enumerate() {
                assert_eq!(s.pos[slot as usize] as usize, i);
                if i > 0 {
                    assert!(s.count_at((i - 1) / 2) <= s.count_at(i));
                }
            }
            for (k, &slot) in &s.index {
                assert_eq!(&s.slots[slot as usize].key, k);
            }
            let bound = s.unmonitored_bound();
            for (k, t) in &truth {
                match s.index.get(k) {
                    Some(&slot) => {
                        let c = &s.slots[slot as usize];
                        assert!(c.count - c.error <= *t && *t <= c.count, "{c:?} vs {t}");
                    }
                    None => assert!(*t <= bound, "{k}: {t} > {bound}"),
                }
            }
        }
    }

    #[test]
    fn decay_scales_counts_and_the_heap_stays_ordered() {
        let mut s = SpaceSaving::new(3);
        for k in [1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 4] {
            s.add(&k, 1.0);
        }
        s.decay(0.5);
        assert_eq!(s.total(), 5.5);
        s.add(&2, 10.0);
        assert_eq!(s.top(1)[0].key, 2);
        for i in 1..s.heap.len() {
            assert!(s.count_at((i - 1) / 2) <= s.count_at(i));
            assert_eq!(s.pos[s.heap[i] as usize] as usize, i);
        }
    }
}
