//! Hot or not, over time: which keys and shards are hot now, and the
//! moments one becomes hot or stops being hot (logged, and exported as
//! metrics by [`super::live`]).
//!
//! A key or shard becomes hot when it crosses its threshold and stops
//! being hot only once it is clearly below it (90 % of the threshold, or
//! too few recent statements to judge), so a load that hovers at the
//! threshold does not log an event every look.

use super::report::{HotKey, HotRules};
use super::{window_seconds, Snapshot};
use std::collections::HashSet;

/// Below this fraction of its threshold a hot key or shard cools.
const COOL_AT: f64 = 0.9;

/// One shard's load over the last minute.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardHeat {
    pub shard: String,
    pub statements: u64,
    pub qps: f64,
    /// Server time over the mean of all shards (1.0 is an even share).
    pub load_ratio: f64,
}

/// Per shard: statements, QPS and server time over the mean, in the last
/// minute.
pub fn shard_heat(snap: &Snapshot, names: &[String]) -> Vec<ShardHeat> {
    let secs = window_seconds(snap.now_s, false);
    let windows: Vec<_> = (0..names.len())
        .map(|s| {
            snap.shards
                .get(s)
                .map(|w| w.window(snap.now_s, false))
                .unwrap_or_default()
        })
        .collect();
    let mean = windows.iter().map(|w| w.server_us as f64).sum::<f64>() / names.len().max(1) as f64;
    names
        .iter()
        .zip(&windows)
        .map(|(name, w)| ShardHeat {
            shard: name.clone(),
            statements: w.statements,
            qps: w.statements as f64 / secs,
            load_ratio: if mean > 0.0 {
                w.server_us as f64 / mean
            } else {
                0.0
            },
        })
        .collect()
}

/// Something that became hot or stopped being hot.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    KeyHot {
        table: String,
        key: String,
        shard: String,
        share: f64,
        reason: String,
    },
    KeyCooled {
        table: String,
        key: String,
        shard: String,
        share: f64,
    },
    ShardHot {
        shard: String,
        load_ratio: f64,
        qps: f64,
    },
    ShardCooled {
        shard: String,
        load_ratio: f64,
    },
}

impl Change {
    /// Writes the event to the log: becoming hot is a warning.
    pub fn log(&self) {
        match self {
            Change::KeyHot {
                table,
                key,
                shard,
                share,
                reason,
            } => tracing::warn!(%table, %key, %shard, share, %reason, "hot key"),
            Change::KeyCooled {
                table,
                key,
                shard,
                share,
            } => tracing::info!(%table, %key, %shard, share, "key no longer hot"),
            Change::ShardHot {
                shard,
                load_ratio,
                qps,
            } => tracing::warn!(
                %shard,
                load_ratio,
                qps,
                "hot shard: its last minute's server time is {load_ratio:.2} times the mean"
            ),
            Change::ShardCooled { shard, load_ratio } => {
                tracing::info!(%shard, load_ratio, "shard no longer hot")
            }
        }
    }
}

/// The keys and shards that are hot now.
#[derive(Debug, Default)]
pub struct Watcher {
    keys: HashSet<(String, String)>,
    shards: HashSet<String>,
}

impl Watcher {
    pub fn is_hot_key(&self, table: &str, key: &str) -> bool {
        self.keys.contains(&(table.to_owned(), key.to_owned()))
    }

    pub fn hot_key_count(&self) -> usize {
        self.keys.len()
    }

    pub fn is_hot_shard(&self, shard: &str) -> bool {
        self.shards.contains(shard)
    }

    /// Takes a new look (`keys`: the heaviest keys, flagged by
    /// [`super::report::hot_keys`] with `rules`) and returns what changed.
    pub fn update(
        &mut self,
        keys: &[HotKey],
        shards: &[ShardHeat],
        rules: &HotRules,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut hot_keys = HashSet::new();
        for k in keys {
            let id = (k.table.clone(), k.key.clone());
            let was = self.keys.contains(&id);
            let stays = was
                && k.share >= COOL_AT * rules.key_share
                && k.shard_statements >= rules.min_statements;
            if k.hot || stays {
                if !was {
                    changes.push(Change::KeyHot {
                        table: k.table.clone(),
                        key: k.key.clone(),
                        shard: k.shard.clone(),
                        share: k.share,
                        reason: k.reason.clone(),
                    });
                }
                hot_keys.insert(id);
            } else if was {
                changes.push(Change::KeyCooled {
                    table: k.table.clone(),
                    key: k.key.clone(),
                    shard: k.shard.clone(),
                    share: k.share,
                });
            }
        }
        // Hot keys that dropped out of the heaviest altogether.
        let mut gone: Vec<_> = self.keys.difference(&hot_keys).cloned().collect();
        gone.retain(|(t, key)| !keys.iter().any(|k| &k.table == t && &k.key == key));
        gone.sort();
        for (table, key) in gone {
            changes.push(Change::KeyCooled {
                table,
                key,
                shard: String::new(),
                share: 0.0,
            });
        }
        self.keys = hot_keys;

        let mut hot_shards = HashSet::new();
        let min = rules.min_statements as u64;
        for s in shards {
            let was = self.shards.contains(&s.shard);
            let judged = shards.len() > 1 && s.statements >= min;
            let hot = judged && s.load_ratio >= rules.shard_load;
            let stays = was && judged && s.load_ratio >= COOL_AT * rules.shard_load;
            if hot || stays {
                if !was {
                    changes.push(Change::ShardHot {
                        shard: s.shard.clone(),
                        load_ratio: s.load_ratio,
                        qps: s.qps,
                    });
                }
                hot_shards.insert(s.shard.clone());
            } else if was {
                changes.push(Change::ShardCooled {
                    shard: s.shard.clone(),
                    load_ratio: s.load_ratio,
                });
            }
        }
        self.shards = hot_shards;
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(share: f64, shard_statements: f64, rules: &HotRules) -> HotKey {
        HotKey {
            table: "t".into(),
            key: "7".into(),
            bucket: 1,
            shard: "s0".into(),
            count: share * shard_statements,
            error: 0.0,
            share,
            shard_statements,
            hot: share >= rules.key_share && shard_statements >= rules.min_statements,
            reason: String::new(),
            suggestions: Vec::new(),
        }
    }

    fn heat(shard: &str, statements: u64, load_ratio: f64) -> ShardHeat {
        ShardHeat {
            shard: shard.into(),
            statements,
            qps: statements as f64 / 60.0,
            load_ratio,
        }
    }

    const RULES: HotRules = HotRules {
        key_share: 0.2,
        min_statements: 100.0,
        shard_load: 1.5,
    };

    #[test]
    fn a_key_becomes_hot_once_and_cools_below_ninety_percent() {
        let mut w = Watcher::default();
        let c = w.update(&[key(0.25, 500.0, &RULES)], &[], &RULES);
        assert!(matches!(&c[..], [Change::KeyHot { key, .. }] if key == "7"));
        assert!(w.is_hot_key("t", "7"));
        // Still hot, and hovering just under the threshold: no event.
        assert!(w.update(&[key(0.3, 500.0, &RULES)], &[], &RULES).is_empty());
        assert!(w
            .update(&[key(0.19, 500.0, &RULES)], &[], &RULES)
            .is_empty());
        assert!(w.is_hot_key("t", "7"));
        let c = w.update(&[key(0.17, 500.0, &RULES)], &[], &RULES);
        assert!(matches!(&c[..], [Change::KeyCooled { .. }]));
        assert!(!w.is_hot_key("t", "7"));
        // Below the threshold again: nothing.
        assert!(w
            .update(&[key(0.19, 500.0, &RULES)], &[], &RULES)
            .is_empty());
    }

    #[test]
    fn a_hot_key_cools_when_its_shard_goes_quiet_or_it_leaves_the_top() {
        let mut w = Watcher::default();
        w.update(&[key(0.5, 500.0, &RULES)], &[], &RULES);
        let c = w.update(&[key(0.5, 50.0, &RULES)], &[], &RULES);
        assert!(matches!(&c[..], [Change::KeyCooled { .. }]), "{c:?}");
        w.update(&[key(0.5, 500.0, &RULES)], &[], &RULES);
        let c = w.update(&[], &[], &RULES);
        assert!(matches!(&c[..], [Change::KeyCooled { key, .. }] if key == "7"));
    }

    #[test]
    fn a_shard_is_hot_over_its_threshold_with_enough_statements() {
        let mut w = Watcher::default();
        let even = [heat("s0", 1000, 1.0), heat("s1", 1000, 1.0)];
        assert!(w.update(&[], &even, &RULES).is_empty());
        // Too few statements to judge.
        assert!(w
            .update(&[], &[heat("s0", 50, 1.9), heat("s1", 5, 0.1)], &RULES)
            .is_empty());
        let c = w.update(&[], &[heat("s0", 1000, 1.6), heat("s1", 400, 0.4)], &RULES);
        assert!(matches!(&c[..], [Change::ShardHot { shard, .. }] if shard == "s0"));
        assert!(w.is_hot_shard("s0") && !w.is_hot_shard("s1"));
        assert!(w
            .update(&[], &[heat("s0", 1000, 1.4), heat("s1", 600, 0.6)], &RULES)
            .is_empty());
        let c = w.update(&[], &even, &RULES);
        assert!(matches!(&c[..], [Change::ShardCooled { shard, .. }] if shard == "s0"));
        // One shard alone is never hot.
        assert!(w.update(&[], &[heat("s0", 5000, 1.0)], &RULES).is_empty());
    }
}
