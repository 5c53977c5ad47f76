//! Statements rewritten or checked for running on several shards: whether
//! a multi-shard SELECT can be computed shard by shard
//! ([`scatter_check`]), a statement limited to rows outside some hash
//! buckets ([`exclude_buckets`], used while resharding), and a multi-row
//! write split into one statement per shard ([`split_write`]).

use super::walk::{key_value, Walker};
use super::{
    cte_names, fold_ident, key_shard, relation_kind, split_object_name, Kind, Params, Relations,
};
use crate::sharding::map::{ShardMap, TableRule};
use sqlparser::ast::{
    self, BinaryOperator, Expr, JoinOperator, SetExpr, Statement, TableFactor, TableObject,
    TableWithJoins, Value, Visit,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashSet;
use std::ops::ControlFlow;

/// Whether a SELECT that needs several shards can be computed shard by
/// shard: every sharded table sits in the statement's own FROM (not in a
/// subquery, CTE or derived table), all of them joined on their sharding
/// keys (so each joined row lives on exactly one shard), and no table of
/// the default shard takes part. Err names what stands in the way.
pub fn scatter_check(map: &ShardMap, sql: &str) -> Result<(), String> {
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|_| "a statement shardgate cannot analyse".to_string())?;
    let [stmt @ Statement::Query(_)] = stmts.as_slice() else {
        return Err("a statement other than one SELECT".into());
    };
    let ctes = cte_names(stmt);
    let Relations {
        sharded, unknown, ..
    } = Relations::of(map, &ctes, stmt);
    if let Some(u) = unknown.first() {
        return Err(format!(
            "a query joining sharded tables with {u}, which is not sharded (it lives on the default shard)"
        ));
    }
    let w = Walker::run(map, &ctes, stmt);
    if let Some(p) = w.problem {
        return Err(p);
    }
    if w.factors.len() != sharded.len() {
        return Err(format!(
            "sharded tables ({}) where shardgate cannot split the query",
            sharded.join(", ")
        ));
    }
    if let Some(f) = w.factors.iter().find(|f| f.depth != 1) {
        return Err(format!(
            "a subquery, CTE or derived table over sharded table {} in a query across shards",
            f.table
        ));
    }
    let root = w.find(0);
    if let Some(i) = (0..w.factors.len()).find(|i| w.find(*i) != root) {
        return Err(format!(
            "a join of sharded tables {} and {} that is not on their sharding keys",
            w.factors[root].table, w.factors[i].table
        ));
    }
    if let Statement::Query(q) = stmt {
        if let SetExpr::Select(s) = q.body.as_ref() {
            for twj in &s.from {
                preserved_sides(map, &ctes, twj)?;
            }
        }
    }
    Ok(())
}

/// Every shard joins its own rows: an outer join whose preserved side has
/// no sharded table (a reference table LEFT JOIN a sharded one) would
/// repeat that side's unmatched rows once per shard. Returns whether the
/// FROM item holds a sharded table.
fn preserved_sides(
    map: &ShardMap,
    ctes: &HashSet<String>,
    twj: &TableWithJoins,
) -> Result<bool, String> {
    let factor = |tf: &TableFactor| -> Result<bool, String> {
        Ok(match tf {
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => preserved_sides(map, ctes, table_with_joins)?,
            other => {
                let mut found = false;
                let _ = ast::visit_relations(other, |n| {
                    found |= relation_kind(map, ctes, n) == Kind::Sharded;
                    ControlFlow::<()>::Continue(())
                });
                found
            }
        })
    };
    let mut left = factor(&twj.relation)?;
    for j in &twj.joins {
        let right = factor(&j.relation)?;
        let unsafe_join = match &j.join_operator {
            JoinOperator::Left(_)
            | JoinOperator::LeftOuter(_)
            | JoinOperator::LeftSemi(_)
            | JoinOperator::LeftAnti(_) => !left && right,
            JoinOperator::Right(_)
            | JoinOperator::RightOuter(_)
            | JoinOperator::RightSemi(_)
            | JoinOperator::RightAnti(_) => left && !right,
            JoinOperator::FullOuter(_) => left != right,
            _ => false,
        };
        if unsafe_join {
            return Err(
                "an outer join that keeps every row of a table that is not sharded (a reference table) while joining a sharded one"
                    .into(),
            );
        }
        left |= right;
    }
    Ok(left)
}

/// One shard's part of a cross-shard SELECT (`sql`, which passed
/// [`scatter_check`]) while it holds copies of `buckets` that it does not
/// own (a bucket move is under way): every sharded table of the top-level
/// FROM gets a WHERE conjunct that leaves out the rows of those buckets,
/// so no row is read from two shards. A NULL-extended row of an outer
/// join keeps passing (the conjunct is true for a NULL key). Err when the
/// statement is not of the shape [`scatter_check`] lets through.
pub fn exclude_buckets(map: &ShardMap, sql: &str, buckets: &[u32]) -> Result<String, String> {
    let cannot =
        || "a statement whose sharded tables shardgate cannot filter by bucket".to_string();
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|_| cannot())?;
    let [stmt] = stmts.as_mut_slice() else {
        return Err(cannot());
    };
    let ctes = cte_names(stmt);
    let Statement::Query(q) = stmt else {
        return Err(cannot());
    };
    let SetExpr::Select(select) = q.body.as_mut() else {
        return Err(cannot());
    };
    let list: Vec<String> = buckets.iter().map(u32::to_string).collect();
    let mut conjuncts = Vec::new();
    let mut factor = |tf: &TableFactor| -> Result<(), String> {
        let TableFactor::Table { name, alias, .. } = tf else {
            return Ok(());
        };
        let (schema, table) = split_object_name(name);
        if ctes.contains(&table) && schema.is_none() {
            return Ok(());
        }
        let Some(TableRule::Sharded { column, key_type }) = map.table(schema.as_deref(), &table)
        else {
            return Ok(());
        };
        let qualifier = match alias {
            Some(a) => a.name.to_string(),
            None => name.to_string(),
        };
        let column = format!("{qualifier}.\"{}\"", column.replace('"', "\"\""));
        let bucket =
            crate::sharding::hash::bucket_sql_installed(map.hash, *key_type, &column, map.buckets);
        conjuncts.push(format!(
            "COALESCE(NOT ({bucket} = ANY ('{{{}}}'::int8[])), true)",
            list.join(",")
        ));
        Ok(())
    };
    fn walk(
        twj: &TableWithJoins,
        f: &mut dyn FnMut(&TableFactor) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut one = |tf: &TableFactor| match tf {
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => walk(table_with_joins, f),
            other => f(other),
        };
        one(&twj.relation)?;
        for j in &twj.joins {
            one(&j.relation)?;
        }
        Ok(())
    }
    for twj in &select.from {
        walk(twj, &mut factor)?;
    }
    if conjuncts.is_empty() {
        return Err(cannot());
    }
    let mut filter = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&conjuncts.join(" AND "))
        .and_then(|mut p| p.parse_expr())
        .map_err(|_| cannot())?;
    if let Some(w) = select.selection.take() {
        filter = Expr::BinaryOp {
            left: Box::new(Expr::Nested(Box::new(w))),
            op: BinaryOperator::And,
            right: Box::new(filter),
        };
    }
    select.selection = Some(filter);
    Ok(stmt.to_string())
}

/// One shard's part of a write that spans shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePart {
    pub shard: usize,
    pub sql: String,
    /// The client's parameters this part uses, in its own `$1..` order
    /// (0-based indexes into the client's Bind); None: all of them, as
    /// numbered by the client.
    pub params: Option<Vec<usize>>,
}

/// Splits a write that needs `shards` into per-shard statements: the rows
/// of a multi-row INSERT go to their own shards (with parameters
/// renumbered); any other write runs unchanged on each shard.
pub fn split_write(
    map: &ShardMap,
    sql: &str,
    shards: &[usize],
    params: Option<&Params>,
) -> Result<Vec<WritePart>, String> {
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|_| "a statement shardgate cannot analyse".to_string())?;
    if stmts.len() != 1 {
        return Err("several statements in one query string across shards".into());
    }
    let stmt = stmts.pop().expect("one");
    let whole = |shards: &[usize]| {
        shards
            .iter()
            .map(|s| WritePart {
                shard: *s,
                sql: sql.to_string(),
                params: None,
            })
            .collect()
    };
    let Statement::Insert(insert) = &stmt else {
        if let Statement::Query(_) = stmt {
            return Err("a data-modifying query across shards".into());
        }
        if let Statement::Explain { .. } = stmt {
            return Err("EXPLAIN of a statement across shards".into());
        }
        if let Statement::Copy { .. } = stmt {
            return Err(
                "COPY across shards through the extended protocol (send the COPY as a simple query)".into(),
            );
        }
        return Ok(whole(shards));
    };
    let TableObject::TableName(name) = &insert.table else {
        return Ok(whole(shards));
    };
    let (schema, table) = split_object_name(name);
    let Some(TableRule::Sharded { column, key_type }) = map.table(schema.as_deref(), &table) else {
        // A reference table (every shard) or a statement placed otherwise.
        return Ok(whole(shards));
    };
    let pos = insert
        .columns
        .iter()
        .position(|c| {
            c.0.last()
                .and_then(|p| p.as_ident())
                .is_some_and(|id| fold_ident(id) == *column)
        })
        .ok_or_else(|| format!("INSERT into sharded table {table} must list {column}"))?;
    let Some(SetExpr::Values(values)) = insert.source.as_ref().map(|s| s.body.as_ref()) else {
        return Err(format!(
            "INSERT ... SELECT into sharded table {table} across shards"
        ));
    };
    if insert.returning.is_some() && has_placeholders(&insert.returning) {
        return Err("RETURNING with parameters across shards".into());
    }
    if has_placeholders(&insert.on) {
        return Err("ON CONFLICT with parameters across shards".into());
    }
    // Rows by shard, in shard order.
    let mut by_shard: Vec<(usize, Vec<usize>)> = Vec::new();
    for (r, row) in values.rows.iter().enumerate() {
        let key = row
            .content
            .get(pos)
            .and_then(|e| key_value(e, *key_type))
            .ok_or_else(|| {
                format!("INSERT into {table}: {column} must be a constant or a $n parameter")
            })?;
        let shard = key_shard(map, *key_type, &key, params)
            .ok_or_else(|| format!("a sharding key parameter of {table} that cannot be read"))?;
        match by_shard.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, rows)) => rows.push(r),
            None => by_shard.push((shard, vec![r])),
        }
    }
    by_shard.sort_by_key(|(s, _)| *s);
    let mut parts = Vec::new();
    for (shard, rows) in by_shard {
        let mut part = stmt.clone();
        let Statement::Insert(ins) = &mut part else {
            unreachable!()
        };
        let Some(src) = ins.source.as_mut() else {
            unreachable!()
        };
        let SetExpr::Values(v) = src.body.as_mut() else {
            unreachable!()
        };
        v.rows = rows.iter().map(|r| values.rows[*r].clone()).collect();
        // Renumber the parameters this part uses: $1.. in order of first use.
        let mut used: Vec<usize> = Vec::new();
        let _ = ast::visit_expressions_mut(&mut part, |e| {
            if let Expr::Value(v) = e {
                if let Value::Placeholder(p) = &mut v.value {
                    if let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                        let i = match used.iter().position(|u| *u == n - 1) {
                            Some(i) => i,
                            None => {
                                used.push(n - 1);
                                used.len() - 1
                            }
                        };
                        *p = format!("${}", i + 1);
                    }
                }
            }
            ControlFlow::<()>::Continue(())
        });
        parts.push(WritePart {
            shard,
            sql: part.to_string(),
            params: Some(used),
        });
    }
    Ok(parts)
}

fn has_placeholders<V: Visit>(node: &V) -> bool {
    let mut found = false;
    let _ = ast::visit_expressions(node, |e| {
        if matches!(e, Expr::Value(v) if matches!(v.value, Value::Placeholder(_))) {
            found = true;
        }
        ControlFlow::<()>::Continue(())
    });
    found
}
