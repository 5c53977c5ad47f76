//! Bucket sets as operators write them: `"0-127"`, `"5"`, lists of those.

use crate::config::BucketSpec;

/// The buckets of range texts (`"0-127"`, `"5"`), sorted, without
/// duplicates; Err names the bad text.
pub fn parse(ranges: &[String], total: u32) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for r in ranges {
        for part in r.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = BucketSpec::Range(part.to_owned()).range()?;
            if hi >= total {
                return Err(format!(
                    "bucket {hi} is out of range: there are {total} buckets (0-{})",
                    total.saturating_sub(1)
                ));
            }
            out.extend(lo..=hi);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Sorted buckets as compact ranges (`[1, 2, 3, 7]` -> `["1-3", "7"]`).
pub fn ranges(buckets: &[u32]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buckets.len() {
        let lo = buckets[i];
        let mut hi = lo;
        while i + 1 < buckets.len() && buckets[i + 1] == hi + 1 {
            i += 1;
            hi = buckets[i];
        }
        out.push(if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        });
        i += 1;
    }
    out
}

/// A SQL array literal of the buckets (`'{1,2,3}'::int8[]`).
pub fn sql_array(buckets: &[u32]) -> String {
    let items: Vec<String> = buckets.iter().map(u32::to_string).collect();
    format!("'{{{}}}'::int8[]", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip() {
        let b = parse(&["7".into(), "1-3, 2-4".into()], 8).unwrap();
        assert_eq!(b, vec![1, 2, 3, 4, 7]);
        assert_eq!(ranges(&b), vec!["1-4".to_string(), "7".to_string()]);
        assert_eq!(parse(&ranges(&b), 8).unwrap(), b);
        assert!(parse(&["3-9".into()], 8)
            .unwrap_err()
            .contains("out of range"));
        assert!(parse(&["x".into()], 8).is_err());
        assert_eq!(sql_array(&[1, 5]), "'{1,5}'::int8[]");
    }

    #[test]
    fn a_new_shard_takes_its_fair_share_from_the_end_of_each_range() {
        let owner: Vec<u16> = (0..64).map(|b| if b < 32 { 0 } else { 1 }).collect();
        let take = crate::reshard::Reshard::fair_share(&owner, 2);
        assert_eq!(take.len(), 21);
        assert_eq!(
            ranges(&take),
            vec!["21-31".to_string(), "54-63".to_string()]
        );
        // Uneven owners: the largest gives most.
        let owner: Vec<u16> = (0..90).map(|b| if b < 60 { 0 } else { 1 }).collect();
        let take = crate::reshard::Reshard::fair_share(&owner, 2);
        assert_eq!(take.len(), 30);
        assert!(take.iter().all(|b| *b < 60), "{take:?}");
    }
}
