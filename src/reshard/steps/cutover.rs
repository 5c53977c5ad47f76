//! The cutover of a move: the moving buckets held and fenced on the
//! source, catch-up proved, the copy verified, the map switched; and the
//! SQL of the fence (writes to the moving buckets refused) and of the
//! keep triggers (a receiver keeps only the moving buckets' rows).

use super::{
    advance_back_slot, buckets, conn, dirty_keys, first, now_ms, query, quote, round_trip,
    row_hashes, save, unwatch_sql, Ctx, Phase, Proxy, ServerConn, Stop,
};
use std::sync::Arc;
use std::time::Instant;

/// Who holds locks on the moved tables (for messages about lock waits).
pub(super) async fn lock_holders(s: &mut ServerConn, ctx: &Ctx) -> String {
    let names: Vec<String> = ctx.tables.iter().map(|t| quote(&t.sql_name)).collect();
    let rows = query(
        s,
        &format!(
            "SELECT l.pid::text || ' ' || l.mode || ' (' || coalesce(a.backend_type, '') || ', ' || coalesce(a.state, '') || ': ' || left(coalesce(a.query, ''), 60) || ')' \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.granted AND l.pid <> pg_backend_pid() AND l.relation IN (SELECT x::regclass FROM unnest(ARRAY[{}]) x)",
            names.join(", ")
        ),
    )
    .await
    .unwrap_or_default();
    let held: Vec<String> = rows
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    if held.is_empty() {
        String::new()
    } else {
        format!("; locks held by {}", held.join("; "))
    }
}

pub(super) fn fence_sql(ctx: &Ctx) -> String {
    let id = ctx.m.id;
    let mut sql = format!(
        "SET lock_timeout = '1s'; BEGIN; \
         CREATE OR REPLACE FUNCTION shardgate.fence_{id}() RETURNS trigger LANGUAGE plpgsql AS $f$ \
         BEGIN RAISE EXCEPTION 'shardgate: this row''s bucket moved to shard {to} (move {id}); retry the statement through shardgate' \
         USING ERRCODE = '40001'; END $f$;",
        to = ctx.m.to.replace('\'', "")
    );
    let list = buckets::sql_array(&ctx.moving);
    for t in &ctx.tables {
        sql.push_str(&format!(
            " DROP TRIGGER IF EXISTS shardgate_fence_{id}_new ON {n}; \
             DROP TRIGGER IF EXISTS shardgate_fence_{id}_old ON {n}; \
             CREATE TRIGGER shardgate_fence_{id}_new BEFORE INSERT OR UPDATE ON {n} FOR EACH ROW \
               WHEN ({new} = ANY ({list})) EXECUTE FUNCTION shardgate.fence_{id}(); \
             CREATE TRIGGER shardgate_fence_{id}_old BEFORE UPDATE OR DELETE ON {n} FOR EACH ROW \
               WHEN ({old} = ANY ({list})) EXECUTE FUNCTION shardgate.fence_{id}();",
            n = t.sql_name,
            new = t.bucket_of("NEW", ctx.total),
            old = t.bucket_of("OLD", ctx.total),
        ));
    }
    sql.push_str(" COMMIT; RESET lock_timeout");
    sql
}

pub(super) fn unfence_sql(ctx: &Ctx) -> String {
    let id = ctx.m.id;
    let mut sql = String::from("SET lock_timeout = '5s';");
    for t in &ctx.tables {
        sql.push_str(&format!(
            " DROP TRIGGER IF EXISTS shardgate_fence_{id}_new ON {n}; DROP TRIGGER IF EXISTS shardgate_fence_{id}_old ON {n};",
            n = t.sql_name
        ));
    }
    sql.push_str(&unwatch_sql(ctx));
    sql.push_str(&format!(
        " DROP FUNCTION IF EXISTS shardgate.fence_{id}(); RESET lock_timeout"
    ));
    sql
}

/// On the receiving side of a stream whose publication cannot filter by
/// bucket (murmur3): a trigger that fires only for replicated changes
/// (`ENABLE REPLICA`) and keeps the rows of the moving buckets. A change
/// to a row the receiver does not have is skipped by the apply itself; an
/// update that takes a row out of the moving buckets is not applied, so
/// the verification finds it rather than a row being left twice.
pub(super) fn keep_sql(ctx: &Ctx) -> String {
    let id = ctx.m.id;
    let list = buckets::sql_array(&ctx.moving);
    let mut sql = String::from("SET lock_timeout = '5s';");
    for (i, t) in ctx.unfilterable() {
        sql.push_str(&format!(
            " CREATE OR REPLACE FUNCTION shardgate.keep_{id}_{i}() RETURNS trigger LANGUAGE plpgsql AS $f$ \
             BEGIN IF {b} = ANY ({list}) THEN RETURN NEW; END IF; RETURN NULL; END $f$; \
             DROP TRIGGER IF EXISTS shardgate_keep_{id} ON {n}; \
             CREATE TRIGGER shardgate_keep_{id} BEFORE INSERT OR UPDATE ON {n} FOR EACH ROW \
               EXECUTE FUNCTION shardgate.keep_{id}_{i}(); \
             ALTER TABLE {n} ENABLE REPLICA TRIGGER shardgate_keep_{id};",
            b = t.bucket_of("NEW", ctx.total),
            n = t.sql_name,
        ));
    }
    sql.push_str(" RESET lock_timeout");
    sql
}

/// Drops the [`keep_sql`] triggers (after the streams are gone).
pub(super) fn unkeep_sql(ctx: &Ctx) -> String {
    let id = ctx.m.id;
    let mut sql = String::from("SET lock_timeout = '5s';");
    for (i, t) in ctx.unfilterable() {
        sql.push_str(&format!(
            " DROP TRIGGER IF EXISTS shardgate_keep_{id} ON {n}; DROP FUNCTION IF EXISTS shardgate.keep_{id}_{i}();",
            n = t.sql_name
        ));
    }
    sql.push_str(" RESET lock_timeout");
    sql
}

/// Drops the fence triggers again (the cutover did not happen).
async fn release(s: &mut ServerConn, ctx: &Ctx) -> Result<(), String> {
    let _ = query(s, "ROLLBACK").await;
    query(s, &unfence_sql(ctx)).await.map(|_| ())
}

/// Holds the moving buckets, fences them on the source, proves catch-up,
/// verifies, switches the map. Returns the next phase.
pub(super) async fn cutover(proxy: &Arc<Proxy>, ctx: &Ctx, held: Instant) -> Result<Phase, Stop> {
    let id = ctx.m.id;
    // Every way out but the switch publishes the buckets unheld again.
    let (retry_phase, switched_phase) = ctx.cutover_phases();
    let back = |why: String| {
        let _ = save(proxy, id, |m| {
            m.phase = retry_phase;
            m.cutover_attempts += 1;
            m.message = why.clone();
        });
        Stop::Retry(why)
    };
    if ctx.aborted(proxy) {
        back("abort requested".into());
        return Err(Stop::Aborted);
    }
    let mut s = conn(proxy, &ctx.source, &ctx.m.database)
        .await
        .map_err(|e| back(format!("cutover: {e}")))?;
    let mut t = conn(proxy, &ctx.target, &ctx.m.database)
        .await
        .map_err(|e| back(format!("cutover: {e}")))?;
    if let Err(e) = query(&mut s, &fence_sql(ctx)).await {
        let _ = release(&mut s, ctx).await;
        return Err(back(format!(
            "cutover: fencing the source failed ({e}); retrying"
        )));
    }
    let within = proxy.config.load().reshard.cutover_timeout;
    match round_trip(&mut s, &mut t, ctx, within).await {
        Ok(true) => {}
        Ok(false) => {
            let _ = release(&mut s, ctx).await;
            return Err(back(format!(
                "cutover: the target did not catch up within {within:?}; released, retrying"
            )));
        }
        Err(e) => {
            let _ = release(&mut s, ctx).await;
            return Err(back(format!("cutover: {e}; released, retrying")));
        }
    }
    // The rows not written since the first verification agreed then and
    // have not changed; the written ones are compared now, key by key,
    // while held (index lookups, not scans).
    let dirty = match dirty_keys(&mut s, ctx).await {
        Ok(d) => d,
        Err(e) => {
            let _ = release(&mut s, ctx).await;
            return Err(back(format!("cutover: {e}; retrying")));
        }
    };
    let (a, b) = match (
        row_hashes(&mut s, ctx, &dirty).await,
        row_hashes(&mut t, ctx, &dirty).await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            let _ = release(&mut s, ctx).await;
            return Err(back(format!(
                "cutover: verification query failed ({e}); retrying"
            )));
        }
    };
    let mut bad: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|(table, key)| {
            let bucket = a
                .get(&(table.clone(), key.clone()))
                .or(b.get(&(table.clone(), key.clone())))
                .map_or(0, |v| v.0);
            format!("bucket {bucket} of {table} (key {key}: source and target differ)")
        })
        .collect();
    bad.sort();
    bad.dedup();
    if !bad.is_empty() {
        let _ = release(&mut s, ctx).await;
        let why = format!(
            "verification failed, nothing was switched: {}",
            bad.join("; ")
        );
        back(why.clone());
        return Err(Stop::Fail(why));
    }
    // Where a move back would replay the target's changes from: every
    // change the target applied for the source is before it, every write
    // of the new owner after it (nothing is routed there yet). The insert
    // position, not the write position: the apply worker commits
    // asynchronously, so its last commit records may not be written yet.
    let back_lsn = if ctx.back {
        String::new()
    } else {
        match query(&mut t, "SELECT pg_current_wal_insert_lsn()::text").await {
            Ok(rows) => first(&rows).unwrap_or_default(),
            Err(e) => {
                let _ = release(&mut s, ctx).await;
                return Err(back(format!("cutover: {e}; retrying")));
            }
        }
    };
    // Moving back: the old owner's fence goes (its copy is current
    // again) before the map names it owner again.
    if ctx.back {
        if let Err(e) = query(&mut t, &unfence_sql(ctx)).await {
            let _ = release(&mut s, ctx).await;
            return Err(back(format!(
                "cutover: unfencing {} failed ({e}); retrying",
                ctx.m.to
            )));
        }
    }
    // Switch: the moving buckets belong to the target from here on.
    let topology = proxy.topology.load();
    let Some(map) = topology.map.as_ref() else {
        let _ = release(&mut s, ctx).await;
        return Err(back("no [sharding] section".into()));
    };
    let Some(to) = topology.shards.iter().position(|x| x.name == ctx.m.to) else {
        let _ = release(&mut s, ctx).await;
        return Err(back("the target shard is gone".into()));
    };
    let mut owner = map.owner.clone();
    for b in &ctx.moving {
        owner[*b as usize] = to as u16;
    }
    let names: Vec<String> = topology.shards.iter().map(|x| x.name.clone()).collect();
    let pause = held.elapsed().as_millis() as u64;
    let r = proxy.failover.update_state(proxy, |st| {
        st.buckets = names
            .iter()
            .enumerate()
            .map(|(i, name)| crate::store::BucketOwner {
                shard: name.clone(),
                buckets: buckets::ranges(
                    &(0..owner.len() as u32)
                        .filter(|b| owner[*b as usize] as usize == i)
                        .collect::<Vec<_>>(),
                ),
            })
            .filter(|o| !o.buckets.is_empty())
            .collect();
        if let Some(m) = st.moves.iter_mut().find(|m| m.id == id) {
            m.phase = switched_phase;
            if ctx.back {
                m.back_pause_ms = pause;
            } else {
                m.switched_unix_ms = now_ms();
                m.pause_ms = pause;
                m.back_lsn = back_lsn;
            }
            m.message.clear();
        }
    });
    if let Err(e) = r {
        let _ = release(&mut s, ctx).await;
        return Err(back(format!(
            "cutover: cannot save the new map ({e}); retrying"
        )));
    }
    crate::metrics::GLOBAL
        .reshard_pause_ms
        .observe(pause as f64 / 1000.0);
    if ctx.back {
        crate::metrics::GLOBAL
            .reshard_moves
            .with_label_values(&["moved_back"])
            .inc();
    } else if let Ok(m) = save(proxy, id, |_| ()) {
        // From here on the reverse slot keeps only the WAL a move back
        // would replay.
        let ctx = Ctx { m, ..ctx.clone() };
        if let Err(e) = advance_back_slot(proxy, &ctx).await {
            tracing::warn!(id, error = %e, "reverse replication slot not advanced");
        }
    }
    tracing::warn!(id, from = %ctx.m.from, to = %ctx.m.to, buckets = %ctx.m.buckets.join(","), pause_ms = pause, back = ctx.back, "bucket move: cut over");
    Ok(switched_phase)
}

/// A cutover the proxy stopped in the middle of: drops the fence and
/// goes back to catching up.
pub(super) async fn interrupted(proxy: &Proxy, ctx: &Ctx) -> Result<Phase, Stop> {
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    release(&mut s, ctx).await?;
    Ok(ctx.cutover_phases().0)
}
