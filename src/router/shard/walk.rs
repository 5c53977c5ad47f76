//! The statement walker behind [`super::analyse`]: it visits every query
//! of a parsed statement, notes each reference to a sharded table, the keys
//! its scope's WHERE and inner joins' ON restrict it to, and which
//! references are joined on their sharding keys (a union-find over them).
//! `place_statement` turns what it found into a [`super::Placement`]; the
//! walker refuses (`problem`) what it cannot analyse exactly.

use super::{fold_ident, parse_text_array, relation_kind, split_object_name, KeyExpr, Kind};
use crate::sharding::hash::{KeyType, KeyValue};
use crate::sharding::map::{ShardMap, TableRule};
use sqlparser::ast::{
    self, AssignmentTarget, BinaryOperator, CastKind, DataType, Expr, FromTable, JoinConstraint,
    JoinOperator, ObjectName, OnConflictAction, OnInsert, Query, Select, SetExpr, Statement,
    TableFactor, TableObject, TableWithJoins, UnaryOperator, Value, Visit, Visitor,
};
use std::collections::HashSet;
use std::ops::ControlFlow;

/// A reference to a sharded table met by the walker.
pub(super) struct Factor {
    pub(super) table: String,
    pub(super) column: String,
    pub(super) key_type: KeyType,
    /// Keys its rows are restricted to, if any.
    pub(super) keys: Option<Vec<KeyExpr>>,
    /// Queries it is nested in (1: the statement's own SELECT).
    pub(super) depth: usize,
}

/// One FROM entry visible to column references: its name (alias, or the
/// table name) and the sharded factor behind it.
struct Entry {
    name: String,
    factor: Option<usize>,
}

pub(super) struct Walker<'a> {
    map: &'a ShardMap,
    ctes: &'a HashSet<String>,
    pub(super) factors: Vec<Factor>,
    /// Union-find over factors joined on their keys.
    parent: Vec<usize>,
    scopes: Vec<Vec<Entry>>,
    pub(super) problem: Option<String>,
    /// Queries being walked, outermost first.
    nesting: usize,
}

impl<'a> Walker<'a> {
    /// Walks `stmt`, registering its sharded references and their keys.
    pub(super) fn run(
        map: &'a ShardMap,
        ctes: &'a HashSet<String>,
        stmt: &Statement,
    ) -> Walker<'a> {
        let mut w = Walker {
            map,
            ctes,
            factors: Vec::new(),
            parent: Vec::new(),
            scopes: Vec::new(),
            problem: None,
            nesting: 0,
        };
        w.statement(stmt);
        w
    }

    pub(super) fn find(&self, mut i: usize) -> usize {
        while self.parent[i] != i {
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[rb] = ra;
        }
    }

    fn refuse(&mut self, message: String) {
        if self.problem.is_none() {
            self.problem = Some(message);
        }
    }

    fn statement(&mut self, stmt: &Statement) {
        match stmt {
            Statement::Query(q) => self.query(q),
            Statement::Insert(i) => self.insert(i),
            Statement::Update(u) => self.update(u),
            Statement::Delete(d) => self.delete(d),
            // Counted as relations but not understood: every shard.
            _ => {}
        }
    }

    fn query(&mut self, q: &Query) {
        self.nesting += 1;
        self.query_body(q);
        self.nesting -= 1;
    }

    fn query_body(&mut self, q: &Query) {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.query(&cte.query);
            }
        }
        self.set_expr(&q.body);
        if let Some(order) = &q.order_by {
            self.nested(order);
        }
        if let Some(limit) = &q.limit_clause {
            self.nested(limit);
        }
    }

    fn set_expr(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(s) => self.select(s),
            SetExpr::Query(q) => self.query(q),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            SetExpr::Values(v) => self.nested(v),
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) => self.statement(s),
            SetExpr::Merge(_) | SetExpr::Table(_) => {}
        }
    }

    /// Walks the queries nested in `node` (not inside each other: each is
    /// walked once, with the current scopes visible for correlation).
    fn nested<V: Visit>(&mut self, node: &V) {
        for q in top_level_queries(node) {
            self.query(&q);
        }
    }

    /// Registers a FROM entry; returns the ON conjuncts of inner joins and
    /// the lateral subqueries to walk once the scope is complete.
    fn add_from_entry(
        &mut self,
        twj: &TableWithJoins,
        entries: &mut Vec<Entry>,
        conjuncts: &mut Vec<Expr>,
        later: &mut Vec<Query>,
        on_exprs: &mut Vec<JoinOperator>,
    ) {
        self.factor(&twj.relation, entries, conjuncts, later, on_exprs);
        for j in &twj.joins {
            self.factor(&j.relation, entries, conjuncts, later, on_exprs);
            match &j.join_operator {
                JoinOperator::Join(JoinConstraint::On(e))
                | JoinOperator::Inner(JoinConstraint::On(e)) => split_and(e, conjuncts),
                _ => {}
            }
            on_exprs.push(j.join_operator.clone());
        }
    }

    fn factor(
        &mut self,
        tf: &TableFactor,
        entries: &mut Vec<Entry>,
        conjuncts: &mut Vec<Expr>,
        later: &mut Vec<Query>,
        on_exprs: &mut Vec<JoinOperator>,
    ) {
        match tf {
            TableFactor::Table { name, alias, .. } => {
                let (_, table) = split_object_name(name);
                let entry_name = alias
                    .as_ref()
                    .map(|a| fold_ident(&a.name))
                    .unwrap_or_else(|| table.clone());
                let factor = self.sharded_factor(name);
                entries.push(Entry {
                    name: entry_name,
                    factor,
                });
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                if *lateral {
                    later.push((**subquery).clone());
                } else {
                    // Cannot see this scope's other entries.
                    self.query(subquery);
                }
                entries.push(Entry {
                    name: alias
                        .as_ref()
                        .map(|a| fold_ident(&a.name))
                        .unwrap_or_default(),
                    factor: None,
                });
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.add_from_entry(table_with_joins, entries, conjuncts, later, on_exprs),
            // Table functions and the rest: relations inside are not
            // reached, so the count check sends the statement everywhere.
            _ => {}
        }
    }

    fn sharded_factor(&mut self, name: &ObjectName) -> Option<usize> {
        if relation_kind(self.map, self.ctes, name) != Kind::Sharded {
            return None;
        }
        let (schema, table) = split_object_name(name);
        let Some(TableRule::Sharded { column, key_type }) =
            self.map.table(schema.as_deref(), &table)
        else {
            return None;
        };
        self.factors.push(Factor {
            table,
            column: column.clone(),
            key_type: *key_type,
            keys: None,
            depth: self.nesting,
        });
        self.parent.push(self.factors.len() - 1);
        Some(self.factors.len() - 1)
    }

    /// A scope: FROM entries, WHERE (and inner-join ON) conjuncts, and the
    /// subqueries of its expressions.
    fn scope(
        &mut self,
        from: &[TableWithJoins],
        selection: Option<&Expr>,
        extra_entries: Vec<Entry>,
        nested: &mut dyn FnMut(&mut Self),
    ) {
        let mut entries = extra_entries;
        let mut conjuncts = Vec::new();
        let mut later = Vec::new();
        let mut joins = Vec::new();
        for twj in from {
            self.add_from_entry(twj, &mut entries, &mut conjuncts, &mut later, &mut joins);
        }
        if let Some(s) = selection {
            split_and(s, &mut conjuncts);
        }
        self.scopes.push(entries);
        for q in &later {
            self.query(q);
        }
        for c in &conjuncts {
            self.conjunct(c);
        }
        for j in &joins {
            self.nested(j);
        }
        if let Some(s) = selection {
            self.nested(s);
        }
        nested(self);
        self.scopes.pop();
    }

    fn select(&mut self, s: &Select) {
        self.scope(&s.from, s.selection.as_ref(), Vec::new(), &mut |w| {
            w.nested(&s.projection);
            w.nested(&s.group_by);
            w.nested(&s.having);
            w.nested(&s.qualify);
        });
    }

    fn insert(&mut self, i: &ast::Insert) {
        let TableObject::TableName(name) = &i.table else {
            return;
        };
        let Some(f) = self.sharded_factor(name) else {
            // Not sharded: the source (VALUES subqueries or a SELECT) is
            // what may touch sharded tables.
            if let Some(src) = &i.source {
                self.query(src);
            }
            self.nested(&i.on);
            self.nested(&i.returning);
            return;
        };
        let (table, column) = (
            self.factors[f].table.clone(),
            self.factors[f].column.clone(),
        );
        let Some(pos) = i.columns.iter().position(|c| {
            c.0.last()
                .and_then(|p| p.as_ident())
                .is_some_and(|id| fold_ident(id) == column)
        }) else {
            return self.refuse(format!(
                "INSERT into sharded table {table} must list its sharding column {column}"
            ));
        };
        let Some(src) = &i.source else {
            return self.refuse(format!("INSERT into sharded table {table} needs VALUES"));
        };
        let SetExpr::Values(values) = src.body.as_ref() else {
            return self.refuse(format!(
                "INSERT ... SELECT into sharded table {table} is not supported; insert the rows with VALUES"
            ));
        };
        if src.with.is_some() {
            self.refuse(format!(
                "INSERT with WITH into sharded table {table} is not supported"
            ));
        }
        let ty = self.factors[f].key_type;
        let mut keys = Vec::new();
        for row in &values.rows {
            match row.content.get(pos).and_then(|e| key_value(e, ty)) {
                Some(k) => keys.push(k),
                None => {
                    return self.refuse(format!(
                        "INSERT into sharded table {table}: the sharding column {column} must be a constant or a $n parameter in every row"
                    ))
                }
            }
        }
        self.factors[f].keys = Some(keys);
        self.nested(values);
        if let Some(OnInsert::OnConflict(c)) = &i.on {
            if let OnConflictAction::DoUpdate(u) = &c.action {
                if assigns_column(&u.assignments, &column) {
                    return self.refuse(format!(
                        "ON CONFLICT DO UPDATE of the sharding column {column} of {table} is not supported"
                    ));
                }
            }
        }
        let alias = i
            .table_alias
            .as_ref()
            .map(|a| fold_ident(&a.alias))
            .unwrap_or(table);
        self.scopes.push(vec![Entry {
            name: alias,
            factor: Some(f),
        }]);
        self.nested(&i.on);
        self.nested(&i.returning);
        self.scopes.pop();
    }

    fn update(&mut self, u: &ast::Update) {
        let from: Vec<TableWithJoins> = match &u.from {
            Some(ast::UpdateTableFromKind::AfterSet(t))
            | Some(ast::UpdateTableFromKind::BeforeSet(t)) => t.clone(),
            None => Vec::new(),
        };
        let mut all = vec![u.table.clone()];
        all.extend(from);
        let before = self.factors.len();
        self.scope(&all, u.selection.as_ref(), Vec::new(), &mut |w| {
            w.nested(&u.assignments);
            w.nested(&u.returning);
        });
        // The target is the first factor registered, if it is sharded.
        if let TableFactor::Table { name, .. } = &u.table.relation {
            if relation_kind(self.map, self.ctes, name) == Kind::Sharded
                && self.factors.len() > before
            {
                let f = &self.factors[before];
                if assigns_column(&u.assignments, &f.column) {
                    let msg = format!(
                        "UPDATE of the sharding column {} of table {} is not supported (it could move the row to another shard); delete the row and insert it again",
                        f.column, f.table
                    );
                    self.refuse(msg);
                }
            }
        }
    }

    fn delete(&mut self, d: &ast::Delete) {
        let mut all = match &d.from {
            FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t.clone(),
        };
        if let Some(using) = &d.using {
            all.extend(using.iter().cloned());
        }
        self.scope(&all, d.selection.as_ref(), Vec::new(), &mut |w| {
            w.nested(&d.returning);
        });
    }

    /// Learns from one conjunct: a key restriction or a key join.
    fn conjunct(&mut self, e: &Expr) {
        match e {
            Expr::Nested(inner) => self.conjunct(inner),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                let (l, r) = (self.key_column(left), self.key_column(right));
                match (l, r) {
                    (Some(a), Some(b)) => {
                        if compatible(self.factors[a].key_type, self.factors[b].key_type) {
                            self.union(a, b);
                        }
                    }
                    (Some(f), None) => self.restrict(f, right, std::slice::from_ref(&**right)),
                    (None, Some(f)) => self.restrict(f, left, std::slice::from_ref(&**left)),
                    (None, None) => {}
                }
            }
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } => {
                let Some(f) = self.key_column(left) else {
                    return;
                };
                let ty = self.factors[f].key_type;
                let keys = match right.as_ref() {
                    Expr::Value(v) => match &v.value {
                        Value::Placeholder(p) => p
                            .strip_prefix('$')
                            .and_then(|n| n.parse::<usize>().ok())
                            .and_then(|n| n.checked_sub(1))
                            .map(|n| vec![KeyExpr::AnyParam(n)]),
                        Value::SingleQuotedString(s) => parse_text_array(s, ty).map(|vals| {
                            vals.into_iter()
                                .map(|v| v.map_or(KeyExpr::Null, KeyExpr::Value))
                                .collect()
                        }),
                        _ => None,
                    },
                    Expr::Array(a) => a.elem.iter().map(|e| key_value(e, ty)).collect(),
                    _ => None,
                };
                if let Some(keys) = keys {
                    self.set_keys(f, keys);
                }
            }
            Expr::In {
                expr,
                target: ast::InTarget::List(list),
                negated: false,
                ..
            } => {
                if let Some(f) = self.key_column(expr) {
                    self.restrict(f, expr, list);
                }
            }
            _ => {}
        }
    }

    fn restrict(&mut self, f: usize, _column: &Expr, values: &[Expr]) {
        let ty = self.factors[f].key_type;
        let keys: Option<Vec<KeyExpr>> = values.iter().map(|v| key_value(v, ty)).collect();
        if let Some(keys) = keys {
            self.set_keys(f, keys);
        }
    }

    /// Restricts factor `f` to `keys` (keeping the smaller of two
    /// restrictions: both hold).
    fn set_keys(&mut self, f: usize, keys: Vec<KeyExpr>) {
        let slot = &mut self.factors[f].keys;
        if slot.as_ref().is_none_or(|k| keys.len() < k.len()) {
            *slot = Some(keys);
        }
    }

    /// The sharded factor whose sharding column `e` names, if any.
    fn key_column(&self, e: &Expr) -> Option<usize> {
        match e {
            Expr::Nested(inner) => self.key_column(inner),
            Expr::Identifier(id) => {
                // Unqualified: only the innermost scope, and only when one
                // sharded entry there has a sharding column of that name.
                let col = fold_ident(id);
                let scope = self.scopes.last()?;
                let mut hits = scope
                    .iter()
                    .filter_map(|e| e.factor)
                    .filter(|f| self.factors[*f].column == col);
                let first = hits.next()?;
                hits.next().is_none().then_some(first)
            }
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let col = fold_ident(&parts[parts.len() - 1]);
                let qualifier = fold_ident(&parts[parts.len() - 2]);
                for scope in self.scopes.iter().rev() {
                    let found: Vec<&Entry> = scope.iter().filter(|e| e.name == qualifier).collect();
                    match found.as_slice() {
                        [] => continue,
                        [one] => {
                            let f = one.factor?;
                            return (self.factors[f].column == col).then_some(f);
                        }
                        _ => return None,
                    }
                }
                None
            }
            _ => None,
        }
    }
}

/// Whether two key types hash equal values alike (all integers do).
fn compatible(a: KeyType, b: KeyType) -> bool {
    let family = |t: KeyType| match t {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => 0,
        KeyType::Text | KeyType::Varchar => 1,
        KeyType::Uuid => 2,
    };
    family(a) == family(b)
}

fn assigns_column(assignments: &[ast::Assignment], column: &str) -> bool {
    assignments.iter().any(|a| {
        let names: Vec<&ObjectName> = match &a.target {
            AssignmentTarget::ColumnName(n) => vec![n],
            AssignmentTarget::Tuple(t) => t.iter().collect(),
        };
        names.iter().any(|n| {
            n.0.last()
                .and_then(|p| p.as_ident())
                .is_some_and(|id| fold_ident(id) == column)
        })
    })
}

/// A sharding-key value: a literal of the column's type (possibly cast to
/// a type that cannot change it) or a parameter.
pub(super) fn key_value(e: &Expr, ty: KeyType) -> Option<KeyExpr> {
    let int = matches!(ty, KeyType::Int2 | KeyType::Int4 | KeyType::Int8);
    match e {
        Expr::Nested(inner) => key_value(inner, ty),
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => {
                let n: usize = p.strip_prefix('$')?.parse().ok()?;
                Some(KeyExpr::Param(n.checked_sub(1)?))
            }
            Value::Null => Some(KeyExpr::Null),
            Value::Number(n, _) if int => ty.parse_text(n).ok().map(KeyExpr::Value),
            Value::SingleQuotedString(s) => ty.parse_text(s).ok().map(KeyExpr::Value),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } if int => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => ty.parse_text(&format!("-{n}")).ok().map(KeyExpr::Value),
                _ => None,
            },
            // `-7::int8` is `-(7::int8)`.
            other => match key_value(other, ty)? {
                KeyExpr::Value(KeyValue::Int(n)) => {
                    Some(KeyExpr::Value(KeyValue::Int(n.checked_neg()?)))
                }
                _ => None,
            },
        },
        Expr::Cast {
            kind: CastKind::Cast | CastKind::DoubleColon,
            expr,
            data_type,
            format: None,
        } => {
            let keeps = match data_type {
                DataType::SmallInt(_)
                | DataType::Int2(_)
                | DataType::Int(_)
                | DataType::Int4(_)
                | DataType::Integer(_)
                | DataType::BigInt(_)
                | DataType::Int8(_) => int,
                DataType::Text | DataType::Varchar(None) | DataType::CharacterVarying(None) => {
                    matches!(ty, KeyType::Text | KeyType::Varchar)
                }
                DataType::Uuid => ty == KeyType::Uuid,
                _ => false,
            };
            if !keeps {
                return None;
            }
            // A narrowing cast keeps the value or fails the statement on
            // every shard alike.
            key_value(expr, ty)
        }
        _ => None,
    }
}

fn split_and(e: &Expr, out: &mut Vec<Expr>) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            split_and(left, out);
            split_and(right, out);
        }
        Expr::Nested(inner)
            if matches!(
                **inner,
                Expr::BinaryOp {
                    op: BinaryOperator::And,
                    ..
                }
            ) =>
        {
            split_and(inner, out)
        }
        other => out.push(other.clone()),
    }
}

/// The outermost queries inside `node`.
fn top_level_queries<V: Visit>(node: &V) -> Vec<Query> {
    struct C {
        depth: usize,
        found: Vec<Query>,
    }
    impl Visitor for C {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if self.depth == 0 {
                self.found.push(q.clone());
            }
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
    }
    let mut c = C {
        depth: 0,
        found: Vec::new(),
    };
    let _ = node.visit(&mut c);
    c.found
}
