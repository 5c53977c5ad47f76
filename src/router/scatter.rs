//! Cross-shard reads: how a SELECT that needs several shards is split into
//! a query every shard runs (phase 1) and the way their rows are combined.
//!
//! Rows are combined in one of two ways:
//!
//! - [`Merge::Concat`]: the shards' rows one after another, then OFFSET and
//!   LIMIT (no ORDER BY, no aggregate, no DISTINCT).
//! - [`Merge::Final`]: a second query (phase 2), run by Postgres on one of
//!   the shard connections over the gathered rows, which it receives as a
//!   typed VALUES list. Postgres itself then orders (with the collation of
//!   the expression, NULLS FIRST/LAST, every type's own comparison),
//!   combines partial aggregates (count → sum of counts, avg → sum of sums
//!   divided by sum of counts with Postgres's own numeric division), groups,
//!   applies HAVING, DISTINCT, OFFSET and LIMIT. Nothing is compared or
//!   computed by the proxy, so the merge cannot disagree with Postgres.
//!
//! What a shard cannot compute on its own rows — a join between sharded
//! tables other than on their sharding keys, a subquery or CTE over a
//! sharded table, a window function, an aggregate that cannot be combined
//! from partial results — is refused with a message naming it (0A000).
//! Columns whose own collation differs from the database default are not
//! detected here (see docs/sharding.md).

use sqlparser::ast::{
    self, Distinct, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    LimitClause, ObjectName, OrderByKind, Query, Select, SelectItem, SetExpr, Statement, Value,
    Visit, VisitMut, Visitor, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashMap;
use std::ops::ControlFlow;

/// How a cross-shard SELECT runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ScatterPlan {
    /// What every shard runs.
    pub shard_sql: String,
    pub merge: Merge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    Concat { offset: u64, limit: Option<u64> },
    Final(FinalPlan),
}

/// Phase 2, in terms of the phase-1 columns `p.c1 .. p.cN`.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalPlan {
    pub projection: Projection,
    pub distinct: bool,
    pub group_by: Vec<String>,
    pub having: Option<String>,
    pub order_by: Vec<String>,
    pub limit: Option<u64>,
    pub offset: u64,
    /// Partial aggregates the `__sg_agg_N` markers stand for.
    pub aggregates: Vec<Partial>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    /// The phase-1 columns except the last `hidden`, under their own names.
    Columns { hidden: usize },
    /// Expressions (with markers) and the column names Postgres would give
    /// the original items.
    Exprs(Vec<(String, String)>),
}

/// How one aggregate of the original query is rebuilt from phase-1
/// columns (1-based positions).
#[derive(Debug, Clone, PartialEq)]
pub enum Partial {
    /// count(...): sum of the shards' counts (0 when no rows).
    Count(usize),
    /// sum(x): sum of partial sums, in the partial's type.
    Sum(usize),
    /// min / max / bool_and / bool_or / every: the same aggregate again.
    Same(&'static str, usize),
    /// avg(x): sum of sums divided by sum of counts.
    Avg { sum: usize, count: usize },
    /// An aggregate over DISTINCT values: phase 1 groups by the value,
    /// phase 2 runs the aggregate as written (with DISTINCT) over it.
    Distinct { func: String, col: usize },
}

impl Partial {
    /// Phase-2 SQL, given the phase-1 column types (format_type names).
    pub fn sql(&self, types: &[String]) -> Result<String, String> {
        let ty = |c: usize| types.get(c - 1).cloned().unwrap_or_else(|| "text".into());
        Ok(match self {
            Partial::Count(c) => format!("coalesce(sum(p.c{c}), 0)::int8"),
            Partial::Sum(c) => format!("sum(p.c{c})::{}", ty(*c)),
            Partial::Same(f, c) => format!("{f}(p.c{c})"),
            Partial::Distinct { func, col } => format!("{func}(DISTINCT p.c{col})"),
            Partial::Avg { sum, count } => {
                let t = ty(*sum);
                let (num, den) = match t.as_str() {
                    "bigint" | "numeric" | "integer" | "smallint" => ("numeric", "numeric"),
                    "double precision" | "real" => ("float8", "float8"),
                    "interval" => ("interval", "float8"),
                    other => return Err(format!("avg over {other} across shards")),
                };
                format!(
                    "(CASE WHEN sum(p.c{count}) = 0 THEN NULL ELSE sum(p.c{sum})::{num} / sum(p.c{count})::{den} END)"
                )
            }
        })
    }
}

/// Aggregates this module can combine; any other aggregate is refused.
const COMBINABLE: &[&str] = &[
    "count", "sum", "min", "max", "avg", "bool_and", "bool_or", "every",
];

/// Postgres's built-in aggregates (user-defined ones are found through the
/// catalog the caller passes in).
const BUILTIN_AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "bool_and",
    "bool_or",
    "every",
    "string_agg",
    "array_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "xmlagg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "any_value",
    "range_agg",
    "range_intersect_agg",
    "json_agg_strict",
    "jsonb_agg_strict",
    "json_objectagg",
    "json_arrayagg",
    "grouping",
];

/// Plans a cross-shard SELECT. `is_aggregate` says whether a function name
/// is an aggregate in this database (user-defined ones included).
pub fn plan(sql: &str, is_aggregate: &dyn Fn(&str) -> bool) -> Result<ScatterPlan, String> {
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|_| "a statement shardgate cannot analyse".to_string())?;
    if stmts.len() != 1 {
        return Err("several statements in one query string across shards".into());
    }
    let Statement::Query(query) = stmts.pop().expect("one") else {
        return Err("a statement other than SELECT across shards".into());
    };
    let query = *query;
    if query.with.is_some() {
        return Err("WITH queries across shards".into());
    }
    if !query.locks.is_empty() {
        return Err("FOR UPDATE/SHARE across shards".into());
    }
    if query.fetch.is_some() {
        return Err("FETCH FIRST across shards".into());
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err(match query.body.as_ref() {
            SetExpr::SetOperation { .. } => "UNION/INTERSECT/EXCEPT over sharded tables".into(),
            _ => "this form of query across shards".into(),
        });
    };
    let select = select.as_ref();
    if select.into.is_some() {
        return Err("SELECT INTO across shards".into());
    }
    if matches!(select.distinct, Some(Distinct::On(_))) {
        return Err("DISTINCT ON across shards".into());
    }
    if has_window(&query) {
        return Err("window functions across shards".into());
    }
    let (limit, offset) = limit_offset(&query)?;
    let order: Vec<ast::OrderByExpr> = match &query.order_by {
        None => Vec::new(),
        Some(o) => match &o.kind {
            OrderByKind::Expressions(e) => e.clone(),
            OrderByKind::All(_) => return Err("ORDER BY ALL".into()),
        },
    };
    let group_by = match &select.group_by {
        GroupByExpr::Expressions(e, mods) if mods.is_empty() => e.clone(),
        _ => return Err("GROUP BY ALL/ROLLUP/CUBE/GROUPING SETS across shards".into()),
    };
    if group_by
        .iter()
        .any(|g| matches!(g, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)))
    {
        return Err("GROUP BY ROLLUP/CUBE/GROUPING SETS across shards".into());
    }
    let mut aggs = Vec::new();
    collect_aggregates(&select.projection, is_aggregate, &mut aggs)?;
    collect_aggregates(&select.having, is_aggregate, &mut aggs)?;
    for o in &order {
        collect_aggregates(&o.expr, is_aggregate, &mut aggs)?;
    }
    let aggregating = !aggs.is_empty() || !group_by.is_empty() || select.having.is_some();
    let distinct = matches!(select.distinct, Some(Distinct::Distinct));
    if aggregating {
        return plan_aggregate(
            &query, select, group_by, aggs, &order, distinct, limit, offset,
        );
    }
    if distinct {
        return plan_distinct(&query, select, &order, limit, offset);
    }
    if order.is_empty() {
        let mut q = query.clone();
        q.limit_clause = limit.map(|l| limit_clause(l + offset));
        return Ok(ScatterPlan {
            shard_sql: q.to_string(),
            merge: Merge::Concat { offset, limit },
        });
    }
    plan_ordered(&query, select, &order, limit, offset)
}

fn has_window(q: &Query) -> bool {
    struct W(bool);
    impl Visitor for W {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = e {
                if f.over.is_some() {
                    self.0 = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut w = W(false);
    let _ = q.visit(&mut w);
    if let SetExpr::Select(s) = q.body.as_ref() {
        if !s.named_window.is_empty() {
            return true;
        }
    }
    w.0
}

fn limit_clause(n: u64) -> LimitClause {
    LimitClause::LimitOffset {
        limit: Some(Expr::value(Value::Number(n.to_string(), false))),
        offset: None,
        limit_by: Vec::new(),
    }
}

/// LIMIT and OFFSET as constants (parameters are refused).
fn limit_offset(q: &Query) -> Result<(Option<u64>, u64), String> {
    let number = |e: &Expr, what: &str| -> Result<Option<u64>, String> {
        match e {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| format!("{what} {n} across shards")),
                Value::Null => Ok(None),
                _ => Err(format!("a {what} that is not a number across shards")),
            },
            _ => Err(format!("a {what} that is not a constant across shards")),
        }
    };
    match &q.limit_clause {
        None => Ok((None, 0)),
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return Err("LIMIT BY".into());
            }
            let l = match limit {
                Some(e) => number(e, "LIMIT")?,
                None => None,
            };
            let o = match offset {
                Some(o) => number(&o.value, "OFFSET")?.unwrap_or(0),
                None => 0,
            };
            Ok((l, o))
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => Err("LIMIT o, n".into()),
    }
}

fn function_name(f: &ast::Function) -> String {
    f.name
        .0
        .last()
        .and_then(|p| p.as_ident())
        .map(|i| i.value.to_lowercase())
        .unwrap_or_default()
}

/// The aggregate calls in `node` (outside subqueries), by their text.
fn collect_aggregates<V: Visit>(
    node: &V,
    is_aggregate: &dyn Fn(&str) -> bool,
    out: &mut Vec<ast::Function>,
) -> Result<(), String> {
    struct C<'a> {
        is_aggregate: &'a dyn Fn(&str) -> bool,
        out: &'a mut Vec<ast::Function>,
        depth: usize,
        error: Option<String>,
        inside_aggregate: usize,
    }
    impl Visitor for C<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if self.depth > 0 {
                return ControlFlow::Continue(());
            }
            if let Expr::Function(f) = e {
                let name = function_name(f);
                let aggregate =
                    BUILTIN_AGGREGATES.contains(&name.as_str()) || (self.is_aggregate)(&name);
                if aggregate {
                    if self.inside_aggregate > 0 {
                        self.error = Some("nested aggregates".into());
                        return ControlFlow::Break(());
                    }
                    if !COMBINABLE.contains(&name.as_str()) {
                        self.error = Some(format!("the aggregate {name}() across shards"));
                        return ControlFlow::Break(());
                    }
                    if !f.within_group.is_empty() {
                        self.error = Some(format!("{name}() WITHIN GROUP across shards"));
                        return ControlFlow::Break(());
                    }
                    if let FunctionArguments::List(l) = &f.args {
                        if !l.clauses.is_empty() {
                            self.error = Some(format!("{name}() with ORDER BY across shards"));
                            return ControlFlow::Break(());
                        }
                    }
                    if !self.out.iter().any(|o| o.to_string() == f.to_string()) {
                        self.out.push(f.clone());
                    }
                    self.inside_aggregate += 1;
                }
            }
            ControlFlow::Continue(())
        }
        fn post_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if self.depth == 0 {
                if let Expr::Function(f) = e {
                    if self.out.iter().any(|o| o.to_string() == f.to_string()) {
                        self.inside_aggregate = self.inside_aggregate.saturating_sub(1);
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut c = C {
        is_aggregate,
        out,
        depth: 0,
        error: None,
        inside_aggregate: 0,
    };
    let _ = node.visit(&mut c);
    match c.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The single argument of an aggregate (None for `count(*)`), and whether
/// it is DISTINCT.
fn aggregate_arg(f: &ast::Function) -> Result<(Option<Expr>, bool), String> {
    let name = function_name(f);
    let FunctionArguments::List(list) = &f.args else {
        return Err(format!("{name}() without arguments"));
    };
    let distinct = matches!(
        list.duplicate_treatment,
        Some(ast::DuplicateTreatment::Distinct)
    );
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] if name == "count" && !distinct => {
            Ok((None, false))
        }
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => Ok((Some(e.clone()), distinct)),
        _ => Err(format!("{name}() with these arguments across shards")),
    }
}

fn p_col(i: usize) -> Expr {
    Expr::CompoundIdentifier(vec![Ident::new("p"), Ident::new(format!("c{i}"))])
}

fn marker(i: usize) -> Expr {
    Expr::Identifier(Ident::new(format!("__sg_agg_{i}")))
}

/// Replaces, top-down, every subexpression whose text is a key of `subst`.
fn substitute<V: VisitMut>(node: &mut V, subst: &HashMap<String, Expr>) {
    struct S<'a>(&'a HashMap<String, Expr>, usize);
    impl VisitorMut for S<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
            self.1 += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
            self.1 -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            if self.1 == 0 {
                if let Some(r) = self.0.get(&e.to_string()) {
                    *e = r.clone();
                }
            }
            ControlFlow::Continue(())
        }
    }
    let _ = node.visit(&mut S(subst, 0));
}

/// A column reference left in a phase-2 expression (other than `p.cN`,
/// markers, and references inside subqueries): the original referred to
/// something phase 2 does not have.
fn leftover_column(e: &Expr) -> Option<String> {
    struct L(Option<String>, usize);
    impl Visitor for L {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.1 += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.1 -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if self.1 > 0 {
                return ControlFlow::Continue(());
            }
            match e {
                Expr::Identifier(i) if !i.value.starts_with("__sg_agg_") => {
                    self.0 = Some(i.value.clone());
                    ControlFlow::Break(())
                }
                Expr::CompoundIdentifier(parts)
                    if !(parts.len() == 2
                        && parts[0].value == "p"
                        && parts[1].value.starts_with('c')) =>
                {
                    self.0 = Some(e.to_string());
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        }
    }
    let mut l = L(None, 0);
    let _ = e.visit(&mut l);
    l.0
}

/// The column name Postgres gives an unaliased select item (its
/// FigureColname rules, for the forms that matter here).
pub fn column_name(e: &Expr) -> String {
    fn inner(e: &Expr) -> Option<String> {
        match e {
            Expr::Identifier(i) => Some(fold(i)),
            Expr::CompoundIdentifier(p) => p.last().map(fold),
            Expr::Function(f) => Some(function_name(f)),
            Expr::Nested(e) => inner(e),
            Expr::Cast {
                expr, data_type, ..
            } => inner(expr).or_else(|| {
                let t = data_type.to_string().to_lowercase();
                let t = t.split('(').next().unwrap_or(&t).trim().to_string();
                Some(match t.as_str() {
                    "int" | "integer" => "int4".into(),
                    "bigint" => "int8".into(),
                    "smallint" => "int2".into(),
                    "double precision" => "float8".into(),
                    "real" => "float4".into(),
                    "boolean" => "bool".into(),
                    "character varying" => "varchar".into(),
                    other => other.rsplit('.').next().unwrap_or(other).to_string(),
                })
            }),
            Expr::Case { .. } => Some("case".into()),
            Expr::Exists { .. } => Some("exists".into()),
            _ => None,
        }
    }
    inner(e).unwrap_or_else(|| "?column?".into())
}

fn fold(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

/// A select item's expression and output name (wildcards refused).
fn item(i: &SelectItem) -> Result<(Expr, String, bool), String> {
    match i {
        SelectItem::UnnamedExpr(e) => Ok((e.clone(), column_name(e), false)),
        SelectItem::ExprWithAlias { expr, alias } => Ok((expr.clone(), fold(alias), true)),
        _ => Err("SELECT * with GROUP BY or aggregates across shards".into()),
    }
}

fn order_suffix(o: &ast::OrderByExpr) -> String {
    let mut s = String::new();
    match o.options.sort {
        Some(ast::OrderBySort::Desc) => s.push_str(" DESC"),
        Some(ast::OrderBySort::Asc) => s.push_str(" ASC"),
        _ => {}
    }
    match o.options.nulls_first {
        Some(true) => s.push_str(" NULLS FIRST"),
        Some(false) => s.push_str(" NULLS LAST"),
        None => {}
    }
    s
}

/// A COLLATE written on an ORDER BY expression (phase 2 must apply it
/// again: values do not carry their collation).
fn order_collation(e: &Expr) -> Option<&ObjectName> {
    match e {
        Expr::Collate { collation, .. } => Some(collation),
        Expr::Nested(e) => order_collation(e),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_aggregate(
    query: &Query,
    select: &Select,
    group_by: Vec<Expr>,
    aggs: Vec<ast::Function>,
    order: &[ast::OrderByExpr],
    distinct: bool,
    limit: Option<u64>,
    offset: u64,
) -> Result<ScatterPlan, String> {
    let items: Vec<(Expr, String, bool)> = select
        .projection
        .iter()
        .map(item)
        .collect::<Result<_, _>>()?;
    // GROUP BY 1 / GROUP BY alias name the select items.
    let mut keys = Vec::new();
    for g in group_by {
        let resolved = match &g {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => {
                    let i: usize = n.parse().map_err(|_| "GROUP BY position".to_string())?;
                    items
                        .get(i.wrapping_sub(1))
                        .map(|it| it.0.clone())
                        .ok_or("GROUP BY position out of range")?
                }
                _ => g.clone(),
            },
            Expr::Identifier(id) => match items.iter().find(|it| it.2 && it.1 == fold(id)) {
                Some(it) if it.0.to_string() != g.to_string() => {
                    return Err(format!(
                        "GROUP BY {} naming a select alias across shards",
                        id.value
                    ))
                }
                _ => g.clone(),
            },
            _ => g.clone(),
        };
        if leftover_aggregate(&resolved, &aggs) {
            return Err("aggregates in GROUP BY".into());
        }
        if !keys
            .iter()
            .any(|k: &Expr| k.to_string() == resolved.to_string())
        {
            keys.push(resolved);
        }
    }
    // Phase-1 columns: group keys, DISTINCT aggregate arguments, partials.
    let mut phase1: Vec<Expr> = keys.clone();
    let mut subst: HashMap<String, Expr> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        subst.insert(k.to_string(), p_col(i + 1));
    }
    let mut partials = Vec::new();
    let mut group1 = keys.clone();
    for f in &aggs {
        let name = function_name(f);
        let (arg, is_distinct) = aggregate_arg(f)?;
        if f.filter.is_some() && is_distinct {
            return Err(format!("{name}(DISTINCT ...) FILTER across shards"));
        }
        let partial = if is_distinct {
            let arg = arg.expect("distinct has an argument");
            let col = match phase1.iter().position(|e| e.to_string() == arg.to_string()) {
                Some(i) => i + 1,
                None => {
                    phase1.push(arg.clone());
                    group1.push(arg.clone());
                    phase1.len()
                }
            };
            if f.filter.is_some() {
                return Err(format!("{name}(DISTINCT ...) FILTER across shards"));
            }
            Partial::Distinct {
                func: name.clone(),
                col,
            }
        } else {
            let mut add = |e: Expr| {
                phase1.push(e);
                phase1.len()
            };
            let call = |fname: &str, arg: Option<&Expr>| -> Expr {
                let mut g = f.clone();
                g.name = ObjectName::from(vec![Ident::new(fname)]);
                if let (Some(a), FunctionArguments::List(l)) = (arg, &mut g.args) {
                    l.args = vec![FunctionArg::Unnamed(FunctionArgExpr::Expr(a.clone()))];
                }
                Expr::Function(g)
            };
            match name.as_str() {
                "count" => Partial::Count(add(Expr::Function(f.clone()))),
                "sum" => Partial::Sum(add(Expr::Function(f.clone()))),
                "min" | "max" | "bool_and" | "bool_or" | "every" => {
                    let same: &'static str =
                        COMBINABLE.iter().find(|c| **c == name).expect("combinable");
                    Partial::Same(same, add(Expr::Function(f.clone())))
                }
                "avg" => {
                    let a = arg.ok_or("avg(*)")?;
                    let sum = add(call("sum", Some(&a)));
                    let count = add(call("count", Some(&a)));
                    Partial::Avg { sum, count }
                }
                other => return Err(format!("the aggregate {other}() across shards")),
            }
        };
        subst.insert(f.to_string(), marker(partials.len()));
        partials.push(partial);
    }
    // Phase 2 expressions.
    let mut exprs = Vec::new();
    for (e, name, _) in &items {
        let mut e = e.clone();
        substitute(&mut e, &subst);
        if let Some(c) = leftover_column(&e) {
            return Err(format!(
                "column {c} is neither grouped nor aggregated (or GROUP BY a key it depends on) across shards"
            ));
        }
        exprs.push((e.to_string(), name.clone()));
    }
    let having = match &select.having {
        Some(h) => {
            let mut h = h.clone();
            substitute(&mut h, &subst);
            if let Some(c) = leftover_column(&h) {
                return Err(format!(
                    "HAVING refers to {c}, which is not grouped, across shards"
                ));
            }
            Some(h.to_string())
        }
        None => None,
    };
    let mut order_by = Vec::new();
    for o in order {
        let text = match &o.expr {
            Expr::Value(v) if matches!(v.value, Value::Number(..)) => o.expr.to_string(),
            Expr::Identifier(id) if items.iter().any(|it| it.1 == fold(id)) => {
                quote_ident(&fold(id))
            }
            e => {
                let mut e = e.clone();
                substitute(&mut e, &subst);
                if let Some(c) = leftover_column(&e) {
                    return Err(format!("ORDER BY {c}, which is not grouped, across shards"));
                }
                e.to_string()
            }
        };
        order_by.push(format!("{text}{}", order_suffix(o)));
    }
    // Phase 1.
    let mut s = select.clone();
    s.projection = phase1
        .iter()
        .map(|e| SelectItem::UnnamedExpr(e.clone()))
        .collect();
    s.group_by = GroupByExpr::Expressions(group1, Vec::new());
    s.having = None;
    s.distinct = None;
    let mut q = query.clone();
    *q.body = SetExpr::Select(Box::new(s));
    q.order_by = None;
    q.limit_clause = None;
    Ok(ScatterPlan {
        shard_sql: q.to_string(),
        merge: Merge::Final(FinalPlan {
            projection: Projection::Exprs(exprs),
            distinct,
            group_by: (1..=keys.len()).map(|i| format!("p.c{i}")).collect(),
            having,
            order_by,
            limit,
            offset,
            aggregates: partials,
        }),
    })
}

fn leftover_aggregate(e: &Expr, aggs: &[ast::Function]) -> bool {
    let text = e.to_string();
    aggs.iter().any(|a| text.contains(&a.to_string()))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn plan_distinct(
    query: &Query,
    select: &Select,
    order: &[ast::OrderByExpr],
    limit: Option<u64>,
    offset: u64,
) -> Result<ScatterPlan, String> {
    let items: Vec<(Expr, String, bool)> = select
        .projection
        .iter()
        .map(item)
        .collect::<Result<_, _>>()
        .map_err(|_| "SELECT DISTINCT * across shards".to_string())?;
    let mut order_by = Vec::new();
    for o in order {
        let pos = match &o.expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n.parse::<usize>().ok(),
                _ => None,
            },
            Expr::Identifier(id) => items.iter().position(|it| it.1 == fold(id)).map(|i| i + 1),
            e => items
                .iter()
                .position(|it| it.0.to_string() == strip_collate(e).to_string())
                .map(|i| i + 1),
        };
        let Some(pos) = pos.filter(|p| *p >= 1 && *p <= items.len()) else {
            return Err("ORDER BY an expression not in the SELECT DISTINCT list".into());
        };
        order_by.push(format!("{}{}", collated(pos, &o.expr), order_suffix(o)));
    }
    let mut q = query.clone();
    q.order_by = None;
    q.limit_clause = None;
    Ok(ScatterPlan {
        shard_sql: q.to_string(),
        merge: Merge::Final(FinalPlan {
            projection: Projection::Columns { hidden: 0 },
            distinct: true,
            group_by: Vec::new(),
            having: None,
            order_by,
            limit,
            offset,
            aggregates: Vec::new(),
        }),
    })
}

fn strip_collate(e: &Expr) -> &Expr {
    match e {
        Expr::Collate { expr, .. } => expr,
        Expr::Nested(inner) => strip_collate(inner),
        other => other,
    }
}

fn collated(pos: usize, e: &Expr) -> String {
    match order_collation(e) {
        Some(c) => format!("p.c{pos} COLLATE {c}"),
        None => format!("p.c{pos}"),
    }
}

fn plan_ordered(
    query: &Query,
    select: &Select,
    order: &[ast::OrderByExpr],
    limit: Option<u64>,
    offset: u64,
) -> Result<ScatterPlan, String> {
    let aliases: Vec<Option<String>> = select
        .projection
        .iter()
        .map(|i| match i {
            SelectItem::ExprWithAlias { alias, .. } => Some(fold(alias)),
            _ => None,
        })
        .collect();
    let explicit_items = select.projection.iter().all(|i| {
        matches!(
            i,
            SelectItem::UnnamedExpr(_) | SelectItem::ExprWithAlias { .. }
        )
    });
    let mut hidden: Vec<Expr> = Vec::new();
    // Each ORDER BY item: a visible position, or a hidden column index.
    enum Key {
        Visible(usize),
        Hidden(usize),
    }
    let mut keys = Vec::new();
    for o in order {
        let key = match &o.expr {
            Expr::Value(v) if matches!(v.value, Value::Number(..)) => {
                let Value::Number(n, _) = &v.value else {
                    unreachable!()
                };
                let p: usize = n.parse().map_err(|_| "ORDER BY position".to_string())?;
                if !explicit_items || p == 0 || p > select.projection.len() {
                    return Err("ORDER BY a position with SELECT * across shards".into());
                }
                Key::Visible(p)
            }
            Expr::Identifier(id) if aliases.iter().any(|a| a.as_deref() == Some(&fold(id))) => {
                let p = aliases
                    .iter()
                    .position(|a| a.as_deref() == Some(&fold(id)))
                    .expect("found");
                Key::Visible(p + 1)
            }
            e => {
                hidden.push(strip_collate(e).clone());
                Key::Hidden(hidden.len() - 1)
            }
        };
        keys.push(key);
    }
    let n_hidden = hidden.len();
    let order_by = keys
        .iter()
        .zip(order)
        .map(|(k, o)| {
            let col = match k {
                Key::Visible(p) => format!("{p}"),
                Key::Hidden(h) => format!("-{}", n_hidden - h),
            };
            // Resolved to a column at run time (negative: from the end).
            format!("{{{col}}}{}{}", collation_suffix(&o.expr), order_suffix(o))
        })
        .collect();
    let mut s = select.clone();
    for (i, h) in hidden.into_iter().enumerate() {
        s.projection.push(SelectItem::ExprWithAlias {
            expr: h,
            alias: Ident::new(format!("__sg_o{i}")),
        });
    }
    let mut q = query.clone();
    *q.body = SetExpr::Select(Box::new(s));
    q.limit_clause = limit.map(|l| limit_clause(l + offset));
    Ok(ScatterPlan {
        shard_sql: q.to_string(),
        merge: Merge::Final(FinalPlan {
            projection: Projection::Columns { hidden: n_hidden },
            distinct: false,
            group_by: Vec::new(),
            having: None,
            order_by,
            limit,
            offset,
            aggregates: Vec::new(),
        }),
    })
}

fn collation_suffix(e: &Expr) -> String {
    match order_collation(e) {
        Some(c) => format!(" COLLATE {c}"),
        None => String::new(),
    }
}

impl FinalPlan {
    /// The phase-2 SQL over `rows` (a FROM item aliased `p` with columns
    /// c1..cN), given the phase-1 column names and type names.
    pub fn sql(&self, rows: &str, names: &[String], types: &[String]) -> Result<String, String> {
        let n = names.len();
        let resolve = |s: &str| -> String {
            // "{3}" -> p.c3, "{-1}" -> the last column.
            let mut out = String::new();
            let mut rest = s;
            while let Some(start) = rest.find('{') {
                out.push_str(&rest[..start]);
                let end = rest[start..].find('}').map_or(rest.len(), |e| start + e);
                let k: i64 = rest[start + 1..end].parse().unwrap_or(1);
                let col = if k < 0 {
                    (n as i64 + 1 + k) as usize
                } else {
                    k as usize
                };
                out.push_str(&format!("p.c{col}"));
                rest = &rest[(end + 1).min(rest.len())..];
            }
            out.push_str(rest);
            out
        };
        let mut agg_sql = Vec::new();
        for a in &self.aggregates {
            agg_sql.push(a.sql(types)?);
        }
        let unmark = |s: &str| -> String {
            let mut s = s.to_string();
            for (i, a) in agg_sql.iter().enumerate().rev() {
                s = s.replace(&format!("__sg_agg_{i}"), a);
            }
            s
        };
        let projection = match &self.projection {
            Projection::Columns { hidden } => (1..=n - hidden)
                .map(|i| format!("p.c{i} AS {}", quote_ident(&names[i - 1])))
                .collect::<Vec<_>>()
                .join(", "),
            Projection::Exprs(e) => e
                .iter()
                .map(|(sql, name)| format!("{} AS {}", unmark(sql), quote_ident(name)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let mut sql = format!(
            "SELECT {}{projection} FROM {rows}",
            if self.distinct { "DISTINCT " } else { "" }
        );
        if !self.group_by.is_empty() {
            sql.push_str(&format!(" GROUP BY {}", self.group_by.join(", ")));
        }
        if let Some(h) = &self.having {
            sql.push_str(&format!(" HAVING {}", unmark(h)));
        }
        if !self.order_by.is_empty() {
            let items: Vec<String> = self.order_by.iter().map(|o| unmark(&resolve(o))).collect();
            sql.push_str(&format!(" ORDER BY {}", items.join(", ")));
        }
        if let Some(l) = self.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        if self.offset > 0 {
            sql.push_str(&format!(" OFFSET {}", self.offset));
        }
        Ok(sql)
    }
}

/// The phase-2 FROM item for gathered text rows: a VALUES list cast to the
/// phase-1 types (every type reads its own text output exactly), or an
/// empty typed row set.
pub fn rows_sql(rows: &[Vec<Option<String>>], types: &[String]) -> String {
    let cols: Vec<String> = (1..=types.len()).map(|i| format!("c{i}")).collect();
    let casts: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("v.c{}::{t} AS c{}", i + 1, i + 1))
        .collect();
    if rows.is_empty() || types.is_empty() {
        let nulls: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("NULL::{t} AS c{}", i + 1))
            .collect();
        return format!("(SELECT {} WHERE false) AS p", nulls.join(", "));
    }
    let mut values = String::new();
    for (r, row) in rows.iter().enumerate() {
        if r > 0 {
            values.push_str(", ");
        }
        values.push('(');
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                values.push_str(", ");
            }
            match v {
                None => values.push_str("NULL::text"),
                Some(s) => {
                    values.push_str("E'");
                    for ch in s.chars() {
                        match ch {
                            '\'' => values.push_str("\\'"),
                            '\\' => values.push_str("\\\\"),
                            c => values.push(c),
                        }
                    }
                    values.push('\'');
                }
            }
        }
        values.push(')');
    }
    format!(
        "(SELECT {} FROM (VALUES {values}) AS v({})) AS p",
        casts.join(", "),
        cols.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_udas(_: &str) -> bool {
        false
    }

    fn p(sql: &str) -> Result<ScatterPlan, String> {
        plan(sql, &no_udas)
    }

    #[test]
    fn concatenation_pushes_limit_plus_offset() {
        let s = p("select a, b from t where x > 1 limit 10 offset 5").unwrap();
        assert_eq!(s.shard_sql, "SELECT a, b FROM t WHERE x > 1 LIMIT 15");
        assert_eq!(
            s.merge,
            Merge::Concat {
                offset: 5,
                limit: Some(10)
            }
        );
    }

    #[test]
    fn order_by_adds_hidden_columns() {
        let s = p("select a, b as bee from t order by c desc nulls first, bee, 1 limit 3").unwrap();
        assert_eq!(
            s.shard_sql,
            "SELECT a, b AS bee, c AS __sg_o0 FROM t ORDER BY c DESC NULLS FIRST, bee, 1 LIMIT 3"
        );
        let Merge::Final(f) = s.merge else { panic!() };
        let sql = f
            .sql("R", &["a".into(), "bee".into(), "__sg_o0".into()], &[])
            .unwrap();
        assert_eq!(
            sql,
            "SELECT p.c1 AS \"a\", p.c2 AS \"bee\" FROM R ORDER BY p.c3 DESC NULLS FIRST, p.c2, p.c1 LIMIT 3"
        );
        let s = p("select * from t order by name collate \"C\"").unwrap();
        assert_eq!(
            s.shard_sql,
            "SELECT *, name AS __sg_o0 FROM t ORDER BY name COLLATE \"C\""
        );
        let Merge::Final(f) = s.merge else { panic!() };
        let sql = f
            .sql("R", &["x".into(), "name".into(), "__sg_o0".into()], &[])
            .unwrap();
        assert!(sql.ends_with("ORDER BY p.c3 COLLATE \"C\""), "{sql}");
    }

    #[test]
    fn aggregates_split_into_partials() {
        let s = p("select country, count(*), avg(score) as a, count(distinct name) from t where x = 1 group by country having sum(n) > 2 order by 2 desc, country").unwrap();
        assert_eq!(
            s.shard_sql,
            "SELECT country, count(*), sum(score), count(score), name, sum(n) FROM t WHERE x = 1 GROUP BY country, name"
        );
        let Merge::Final(f) = s.merge else { panic!() };
        let types: Vec<String> = ["text", "bigint", "numeric", "bigint", "text", "bigint"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let sql = f.sql("R", &[], &types).unwrap();
        assert_eq!(
            sql,
            "SELECT p.c1 AS \"country\", coalesce(sum(p.c2), 0)::int8 AS \"count\", (CASE WHEN sum(p.c4) = 0 THEN NULL ELSE sum(p.c3)::numeric / sum(p.c4)::numeric END) AS \"a\", count(DISTINCT p.c5) AS \"count\" FROM R GROUP BY p.c1 HAVING sum(p.c6)::bigint > 2 ORDER BY 2 DESC, \"country\""
        );
        // GROUP BY an expression and by position.
        let s = p("select date_trunc('day', at) d, max(v) from t group by 1").unwrap();
        assert_eq!(
            s.shard_sql,
            "SELECT date_trunc('day', at), max(v) FROM t GROUP BY date_trunc('day', at)"
        );
    }

    #[test]
    fn refusals_name_the_feature() {
        for (sql, what) in [
            ("select a, row_number() over () from t", "window"),
            ("select a from t union all select a from u", "UNION"),
            ("select distinct on (a) a from t", "DISTINCT ON"),
            ("select string_agg(a, ',') from t", "string_agg"),
            ("select a, count(*) from t group by rollup (a)", "ROLLUP"),
            ("select a, b, count(*) from t group by a", "neither grouped"),
            ("select * from t limit $1", "LIMIT"),
            ("with x as (select 1) select * from x", "WITH"),
            ("select a from t for update", "FOR UPDATE"),
            ("select count(*) from t group by a having b > 1", "HAVING"),
        ] {
            let e = p(sql).unwrap_err();
            assert!(e.contains(what), "{sql}: {e}");
        }
        let uda = |n: &str| n == "my_agg";
        assert!(plan("select my_agg(x) from t", &uda)
            .unwrap_err()
            .contains("my_agg"));
    }

    #[test]
    fn rows_are_quoted_and_typed() {
        let r = rows_sql(
            &[vec![Some("it's \\ x".into()), None]],
            &["text".into(), "integer".into()],
        );
        assert_eq!(
            r,
            "(SELECT v.c1::text AS c1, v.c2::integer AS c2 FROM (VALUES (E'it\\'s \\\\ x', NULL::text)) AS v(c1, c2)) AS p"
        );
        assert_eq!(
            rows_sql(&[], &["bigint".into()]),
            "(SELECT NULL::bigint AS c1 WHERE false) AS p"
        );
    }

    #[test]
    fn column_names_follow_postgres() {
        let e = |s: &str| {
            let q = Parser::parse_sql(&PostgreSqlDialect {}, &format!("select {s}")).unwrap();
            let Statement::Query(q) = &q[0] else { panic!() };
            let SetExpr::Select(sel) = q.body.as_ref() else {
                panic!()
            };
            let SelectItem::UnnamedExpr(e) = &sel.projection[0] else {
                panic!()
            };
            column_name(e)
        };
        assert_eq!(e("count(*)"), "count");
        assert_eq!(e("t.Name"), "name");
        assert_eq!(e("x::text"), "x");
        assert_eq!(e("1::int"), "int4");
        assert_eq!(e("a + 1"), "?column?");
        assert_eq!(e("case when a then 1 end"), "case");
    }
}
