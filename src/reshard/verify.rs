//! Verification of a move: per-bucket checksums of the moving rows on
//! source and target, and the write watch that records which keys the
//! source wrote meanwhile (compared row by row at the cutover).

use super::buckets;
use super::steps::{ident, Ctx};
use crate::backend::conn::ServerConn;
use crate::failover::{cell, query, quote};
use std::collections::HashMap;

/// Bucket checksums that differ, as messages.
pub(super) fn differences(a: &Sums, b: &Sums) -> Vec<String> {
    let zero = (0, 0);
    let mut bad: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k).unwrap_or(&zero) != b.get(*k).unwrap_or(&zero))
        .map(|(table, bucket)| {
            let rows = |m: &Sums| m.get(&(table.clone(), *bucket)).map_or(0, |v| v.0);
            format!(
                "bucket {bucket} of {table} (source {} rows, target {} rows)",
                rows(a),
                rows(b)
            )
        })
        .collect();
    bad.sort();
    bad.dedup();
    bad
}

/// Per (table, bucket): row count and the sum of the rows' hashes.
pub(super) type Sums = HashMap<(String, u64), (u64, u128)>;

/// The hash of one row as the checksums sum it: 60 bits of `md5(row)`.
pub(super) const ROW_HASH: &str = "('x' || left(md5(t::text), 15))::bit(60)::bigint";

/// Per (table, key) of the given keys present on `c`: (bucket, row hash).
pub(super) async fn row_hashes(
    c: &mut ServerConn,
    ctx: &Ctx,
    keys: &[String],
) -> Result<HashMap<(String, String), (u64, u128)>, String> {
    let mut out = HashMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let list: Vec<String> = keys.iter().map(|k| quote(k)).collect();
    for t in &ctx.tables {
        let rows = query(
            c,
            &format!(
                "SELECT {col}::text, {b}, {ROW_HASH} FROM {n} t WHERE {col} = ANY (ARRAY[{list}]::{ty}[])",
                col = format_args!("t.{}", ident(&t.column)),
                b = t.bucket_of("t", ctx.total),
                n = t.sql_name,
                list = list.join(","),
                ty = t.key_type.sql_name(),
            ),
        )
        .await?;
        for r in rows {
            out.insert(
                (t.name.clone(), cell(&r, 0).unwrap_or_default()),
                (cell(&r, 1).unwrap_or(0), cell(&r, 2).unwrap_or(0)),
            );
        }
    }
    Ok(out)
}

/// The keys the watch saw written.
pub(super) async fn dirty_keys(s: &mut ServerConn, ctx: &Ctx) -> Result<Vec<String>, String> {
    let rows = query(
        s,
        &format!(
            "SELECT key FROM shardgate.move_dirty WHERE move_id = {}",
            ctx.m.id
        ),
    )
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect())
}

/// A trigger on each moved table that records, in
/// `shardgate.move_dirty`, the moving buckets written on the source (it
/// waits, at most 1 s, for writes already running on the table, so every
/// write after it is recorded).
pub(super) fn watch_sql(ctx: &Ctx) -> String {
    let id = ctx.m.id;
    let mut sql = String::from(
        "SET lock_timeout = '1s'; BEGIN; \
         CREATE TABLE IF NOT EXISTS shardgate.move_dirty (move_id bigint, key text, PRIMARY KEY (move_id, key));",
    );
    let list = buckets::sql_array(&ctx.moving);
    for (i, t) in ctx.tables.iter().enumerate() {
        // Only rows of the moving buckets reach the functions (WHEN).
        for (side, row, events) in [
            ("new", "NEW", "INSERT OR UPDATE"),
            ("old", "OLD", "UPDATE OR DELETE"),
        ] {
            let b = t.bucket_of(row, ctx.total);
            let key = format!("{row}.{}::text", ident(&t.column));
            sql.push_str(&format!(
                // SECURITY DEFINER: the application's login writes the
                // rows; only the superuser that created the watch may write
                // shardgate.move_dirty.
                " CREATE OR REPLACE FUNCTION shardgate.watch_{id}_{i}_{side}() RETURNS trigger LANGUAGE plpgsql \
                 SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$ \
                 BEGIN \
                   IF NOT EXISTS (SELECT 1 FROM shardgate.move_dirty WHERE move_id = {id} AND key = {key}) THEN \
                     INSERT INTO shardgate.move_dirty VALUES ({id}, {key}) ON CONFLICT DO NOTHING; \
                   END IF; \
                   RETURN NULL; \
                 END $f$; \
                 DROP TRIGGER IF EXISTS shardgate_watch_{id}_{side} ON {n}; \
                 CREATE TRIGGER shardgate_watch_{id}_{side} AFTER {events} ON {n} FOR EACH ROW \
                   WHEN ({b} = ANY ({list})) EXECUTE FUNCTION shardgate.watch_{id}_{i}_{side}();",
                n = t.sql_name,
            ));
        }
    }
    sql.push_str(" COMMIT; RESET lock_timeout");
    sql
}

/// Drops the write watch (triggers, functions, recorded buckets).
pub(super) fn unwatch_sql(ctx: &Ctx) -> String {
    let id = ctx.m.id;
    let mut sql = String::new();
    for (i, t) in ctx.tables.iter().enumerate() {
        for side in ["new", "old"] {
            sql.push_str(&format!(
                " DROP TRIGGER IF EXISTS shardgate_watch_{id}_{side} ON {n}; DROP FUNCTION IF EXISTS shardgate.watch_{id}_{i}_{side}();",
                n = t.sql_name
            ));
        }
    }
    sql.push_str(&format!(
        " DO $d$ BEGIN IF to_regclass('shardgate.move_dirty') IS NOT NULL THEN DELETE FROM shardgate.move_dirty WHERE move_id = {id}; END IF; END $d$;"
    ));
    sql
}

/// Per bucket: (rows, checksum) of the moving buckets of every table.
pub(super) async fn checksums(
    c: &mut ServerConn,
    ctx: &Ctx,
    which: &[u32],
) -> Result<Sums, String> {
    let mut out = HashMap::new();
    if which.is_empty() {
        return Ok(out);
    }
    for t in &ctx.tables {
        let rows = query(
            c,
            &format!(
                "SELECT {b}, count(*), sum({ROW_HASH})::text \
                 FROM {n} t WHERE {b} = ANY ({list}) GROUP BY 1",
                b = t.bucket_of("t", ctx.total),
                n = t.sql_name,
                list = buckets::sql_array(which)
            ),
        )
        .await?;
        for r in rows {
            out.insert(
                (t.name.clone(), cell(&r, 0).unwrap_or(0)),
                (cell(&r, 1).unwrap_or(0), cell(&r, 2).unwrap_or(0)),
            );
        }
    }
    Ok(out)
}
