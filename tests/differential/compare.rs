//! Comparing shardgate's answer with the oracle's, and tallying the
//! verdicts. A 0A000 refusal by shardgate is allowed; any other difference
//! — other rows, other columns, another error, an error where the oracle
//! answers — is a failure.

use super::corpus::Case;
use super::run::Outcome;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Relative tolerance for float4/float8 columns only: sums and averages of
/// floats depend on the order of summation, which differs between one
/// server and a merge over shards. Everything else compares exactly.
const FLOAT_TOLERANCE: f64 = 1e-9;

pub enum Verdict {
    /// The same rows (or the same SQLSTATE, for a query that fails on one
    /// Postgres too).
    Equal,
    /// shardgate's 0A000, with its message.
    Refused(String),
    /// What differed.
    Failed(String),
}

/// Whether two values of a float column are equal within the tolerance.
fn floats_equal(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => {
            x == y
                || (x.is_nan() && y.is_nan())
                || (x - y).abs() <= FLOAT_TOLERANCE * x.abs().max(y.abs())
        }
        _ => false,
    }
}

fn rows_equal(a: &[Option<String>], b: &[Option<String>], floats: &[bool]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).enumerate().all(|(i, (x, y))| match (x, y) {
            (Some(x), Some(y)) if x != y => floats.get(i) == Some(&true) && floats_equal(x, y),
            _ => x == y,
        })
}

/// Sort key for multiset comparison: exact columns first, float columns
/// (which may differ in the last bits) by value after them.
fn sort_rows(rows: &mut [Vec<Option<String>>], floats: &[bool]) {
    let key = |r: &Vec<Option<String>>| {
        let exact: Vec<Option<String>> = r
            .iter()
            .enumerate()
            .filter(|(i, _)| floats.get(*i) != Some(&true))
            .map(|(_, v)| v.clone())
            .collect();
        let approx: Vec<Option<i64>> = r
            .iter()
            .enumerate()
            .filter(|(i, _)| floats.get(*i) == Some(&true))
            .map(|(_, v)| {
                v.as_ref()
                    .and_then(|s| s.parse::<f64>().ok())
                    .map(total_order_key)
            })
            .collect();
        (exact, approx)
    };
    rows.sort_by_cached_key(key);
}

/// An integer that sorts as `f64::total_cmp` orders the floats.
fn total_order_key(f: f64) -> i64 {
    let bits = f.to_bits() as i64;
    bits ^ (((bits >> 63) as u64) >> 1) as i64
}

pub fn compare(case: &Case, proxy: &Outcome, oracle: &Outcome) -> Verdict {
    match (proxy, oracle) {
        // shardgate's own refusal. A 0A000 with another message is
        // Postgres's (or shardgate imitating it, e.g. "cached plan must not
        // change result type"): a failure when the oracle answers.
        (Outcome::Error { code, message }, _)
            if code == "0A000" && message.starts_with("shardgate") =>
        {
            Verdict::Refused(message.clone())
        }
        (Outcome::Error { code: p, message }, Outcome::Error { code: o, .. }) => {
            if p == o {
                Verdict::Equal
            } else {
                Verdict::Failed(format!(
                    "proxy failed with {p} ({message}); the oracle with {o}"
                ))
            }
        }
        (Outcome::Error { code, message }, Outcome::Rows { rows, .. }) => Verdict::Failed(format!(
            "proxy failed with {code} ({message}); the oracle answered {} rows",
            rows.len()
        )),
        (Outcome::Rows { rows, .. }, Outcome::Error { code, message }) => Verdict::Failed(format!(
            "proxy answered {} rows; the oracle failed with {code} ({message})",
            rows.len()
        )),
        (
            Outcome::Rows {
                columns: pc,
                rows: pr,
                ..
            },
            Outcome::Rows {
                columns: oc,
                rows: or,
                floats,
            },
        ) => {
            if pc != oc {
                return Verdict::Failed(format!("columns: proxy {pc:?}, oracle {oc:?}"));
            }
            let (mut pr, mut or) = (pr.clone(), or.clone());
            if !case.ordered {
                sort_rows(&mut pr, floats);
                sort_rows(&mut or, floats);
            }
            let first_diff = (0..pr.len().max(or.len())).find(|i| match (pr.get(*i), or.get(*i)) {
                (Some(a), Some(b)) => !rows_equal(a, b, floats),
                _ => true,
            });
            match first_diff {
                None => Verdict::Equal,
                Some(_) if !case.ordered => Verdict::Failed(format!(
                    "{} rows from the proxy, {} from the oracle (as multisets):\n      only from the proxy:  {}\n      only from the oracle: {}",
                    pr.len(),
                    or.len(),
                    show_rows(&multiset_minus(&pr, &or)),
                    show_rows(&multiset_minus(&or, &pr)),
                )),
                Some(i) => Verdict::Failed(format!(
                    "{} rows from the proxy, {} from the oracle (ordered); first difference at row {i}:\n      proxy:  {}\n      oracle: {}",
                    pr.len(),
                    or.len(),
                    show_rows(&pr[i.min(pr.len())..]),
                    show_rows(&or[i.min(or.len())..]),
                )),
            }
        }
    }
}

/// The rows of `a` not matched by a row of `b`, counting duplicates;
/// values compare exactly.
fn multiset_minus(
    a: &[Vec<Option<String>>],
    b: &[Vec<Option<String>>],
) -> Vec<Vec<Option<String>>> {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    let mut left = Vec::new();
    let mut j = 0;
    for row in &a {
        while j < b.len() && b[j] < *row {
            j += 1;
        }
        if j < b.len() && b[j] == *row {
            j += 1;
        } else {
            left.push(row.clone());
        }
    }
    left
}

fn show_rows(rows: &[Vec<Option<String>>]) -> String {
    if rows.is_empty() {
        return "(no more rows)".into();
    }
    let shown: Vec<String> = rows
        .iter()
        .take(3)
        .map(|r| {
            let cells: Vec<&str> = r.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
            format!("({})", cells.join(", "))
        })
        .collect();
    let more = if rows.len() > 3 {
        format!(" … {} more", rows.len() - 3)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(" "))
}

/// What happened to every run of the corpus.
#[derive(Default)]
pub struct Tally {
    pub runs: usize,
    pub equal: usize,
    pub refused: Vec<(String, String)>,
    pub failed: Vec<String>,
    /// Queries the oracle failed though the corpus did not expect it.
    pub corpus_errors: Vec<String>,
    /// category -> (queries, runs answered equal, runs refused)
    pub by_category: BTreeMap<&'static str, (usize, usize, usize)>,
}

impl Tally {
    pub fn record(&mut self, case: &Case, protocol: &str, verdict: Verdict) {
        self.runs += 1;
        let entry = self.by_category.entry(case.category).or_default();
        let mut label = format!("[{} · {protocol}] {}", case.category, case.sql);
        if !case.params.is_empty() {
            let _ = write!(label, "  -- params {:?}", case.params);
        }
        match verdict {
            Verdict::Equal => {
                self.equal += 1;
                entry.1 += 1;
            }
            Verdict::Refused(m) => {
                self.refused.push((label, m));
                entry.2 += 1;
            }
            Verdict::Failed(diff) => self.failed.push(format!("{label}\n    {diff}")),
        }
    }

    pub fn report(&self, queries: usize, seconds: f64) -> String {
        let mut r = String::new();
        let _ = writeln!(
            r,
            "differential: {queries} queries, {} runs (simple + extended protocol) in {seconds:.1}s: {} equal, {} refused (0A000), {} FAILED",
            self.runs,
            self.equal,
            self.refused.len(),
            self.failed.len()
        );
        let _ = writeln!(r, "\nby category (queries / runs equal / runs refused):");
        for (cat, (q, eq, re)) in &self.by_category {
            let _ = writeln!(r, "  {cat:<22} {q:>4} / {eq:>4} / {re:>4}");
        }
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, m) in &self.refused {
            *reasons.entry(m).or_default() += 1;
        }
        let _ = writeln!(r, "\nrefusals by message:");
        for (m, n) in &reasons {
            let _ = writeln!(r, "  {n:>4} × {m}");
        }
        let _ = writeln!(r, "\nrefused runs:");
        for (label, m) in &self.refused {
            let _ = writeln!(r, "  {label}\n    -> {m}");
        }
        if !self.corpus_errors.is_empty() {
            let _ = writeln!(r, "\nCORPUS ERRORS (the oracle failed):");
            for e in &self.corpus_errors {
                let _ = writeln!(r, "  {e}");
            }
        }
        if !self.failed.is_empty() {
            let _ = writeln!(r, "\nFAILED (wrong answer or an error other than 0A000):");
            for f in &self.failed {
                let _ = writeln!(r, "  {f}");
            }
        }
        r
    }
}
