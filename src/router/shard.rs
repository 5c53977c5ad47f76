//! Which shards a statement needs.
//!
//! A statement is placed by the tables it names and by the sharding keys
//! that restrict them. Every reference to a sharded table (in FROM, a join,
//! a subquery, a CTE, or as the target of INSERT/UPDATE/DELETE) must be
//! restricted by equality to known keys — a literal, a `$n` parameter, an
//! `IN` list of them, or a join on the sharding key to another restricted
//! reference — in a conjunct of its own scope's WHERE or of an inner join's
//! ON. Only then can the statement run on the keys' shard alone and answer
//! exactly what one unsharded database would. Anything less needs every
//! shard ([`Placement::AllShards`]) or is refused ([`Placement::Unsupported`]).
//!
//! The analysis is conservative by construction: the sharded-table
//! references it understood are counted against every relation the parser
//! found anywhere in the statement; a reference it did not reach makes the
//! statement need every shard rather than trust a partial analysis.

use crate::hotspot::KeyHit;
use crate::sharding::hash::{KeyType, KeyValue};
use crate::sharding::map::{Location, ShardMap, TableRule};
use sqlparser::ast::{
    self, AssignmentTarget, BinaryOperator, CastKind, DataType, Expr, FromTable, JoinConstraint,
    JoinOperator, ObjectName, OnConflictAction, OnInsert, Query, Select, SetExpr, Statement,
    TableFactor, TableObject, TableWithJoins, UnaryOperator, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashSet;
use std::ops::ControlFlow;

/// One value a sharding column is restricted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExpr {
    Value(KeyValue),
    /// NULL: matches no row in a WHERE; an inserted NULL key lives in
    /// bucket 0 (as with `PARTITION BY HASH`).
    Null,
    /// `$n` (0-based index), resolved from Bind.
    Param(usize),
    /// `= ANY($n)`: every element of the array parameter.
    AnyParam(usize),
}

/// References tied together by equalities on their sharding keys: their
/// rows all have one of `keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGroup {
    pub key_type: KeyType,
    pub keys: Vec<KeyExpr>,
    /// The table the keys were found on (for the load counters).
    pub table: std::sync::Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Names no table shardgate places (or only reference tables, read):
    /// any shard answers.
    Anywhere,
    /// Names tables that live on the default shard.
    Default,
    /// The lexical check found no configured table name: Default or
    /// Anywhere, not analysed further (a full analysis tells them apart
    /// when it matters).
    Unmentioned,
    /// Every sharded reference is restricted to `groups`' keys; with
    /// `default_too` the statement also names default-shard tables, so the
    /// keys must live on the default shard.
    Keys {
        groups: Vec<KeyGroup>,
        default_too: bool,
    },
    /// Needs every shard; `what` says why.
    AllShards { what: String, write: bool },
    /// Refused whatever the keys: the message for SQLSTATE 0A000.
    Unsupported(String),
}

/// The parameters of one Bind: type OIDs from Parse (0 = unspecified),
/// format codes and values as the Bind message carries them.
pub struct Params<'a> {
    pub types: &'a [u32],
    pub formats: &'a [i16],
    pub values: &'a [Option<&'a [u8]>],
}

/// Where a placement resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Any shard (prefer the one already held).
    Anywhere,
    Shard(usize),
    /// Several shards; `what` describes the statement for error messages.
    Shards(Vec<usize>, String),
    Refuse(String),
    /// A key in a bucket that a move is cutting over: wait for the next
    /// topology and place the statement again.
    Hold,
}

/// The shard index [`key_shard`] returns for a held bucket.
const HELD: usize = usize::MAX;

impl Placement {
    /// Resolves against the map (and the Bind parameters, if any).
    pub fn resolve(&self, map: &ShardMap, params: Option<&Params>) -> Target {
        self.resolve_noting(map, params, None)
    }

    /// [`Self::resolve`], and with `hit`, the statement's sharding key
    /// when it has exactly one (for the load counters).
    pub fn resolve_noting(
        &self,
        map: &ShardMap,
        params: Option<&Params>,
        hit: Option<&mut Option<KeyHit>>,
    ) -> Target {
        match self {
            Placement::Anywhere => Target::Anywhere,
            Placement::Default | Placement::Unmentioned => Target::Shard(map.default_shard),
            Placement::Unsupported(m) => Target::Refuse(m.clone()),
            Placement::AllShards { what, .. } => {
                Target::Shards((0..shard_count(map)).collect(), what.clone())
            }
            Placement::Keys {
                groups,
                default_too,
            } => {
                // The common case, one key (`WHERE id = $1`): located once,
                // and no list of shards to build.
                if let [g] = groups.as_slice() {
                    if let [k @ (KeyExpr::Value(_) | KeyExpr::Param(_) | KeyExpr::Null)] =
                        g.keys.as_slice()
                    {
                        let Some((at, key)) =
                            key_located(map, g.key_type, k, params, hit.is_some())
                        else {
                            return unreadable_key(map);
                        };
                        if let (Some(hit), Some(key)) = (hit, key) {
                            *hit = Some(KeyHit {
                                table: g.table.clone(),
                                key,
                                bucket: at.bucket,
                            });
                        }
                        let shard = shard_of(map, at);
                        return if *default_too && shard != map.default_shard {
                            Target::Refuse(DEFAULT_TOO.into())
                        } else if shard == HELD {
                            Target::Hold
                        } else {
                            Target::Shard(shard)
                        };
                    }
                }
                let mut shards: Vec<usize> = Vec::new();
                for g in groups {
                    for k in &g.keys {
                        let Some(found) = key_shards(map, g.key_type, k, params) else {
                            return unreadable_key(map);
                        };
                        for shard in found {
                            if !shards.contains(&shard) {
                                shards.push(shard);
                            }
                        }
                    }
                }
                keys_target(map, shards, *default_too)
            }
        }
    }

    /// The placement of two statements run together (one Query string).
    fn and(self, other: Placement) -> Placement {
        use Placement::*;
        match (self, other) {
            (Unsupported(m), _) | (_, Unsupported(m)) => Unsupported(m),
            (AllShards { what, write }, AllShards { write: w2, .. }) => AllShards {
                what,
                write: write || w2,
            },
            (a @ AllShards { .. }, _) | (_, a @ AllShards { .. }) => a,
            (
                Keys {
                    mut groups,
                    default_too,
                },
                Keys {
                    groups: g2,
                    default_too: d2,
                },
            ) => {
                groups.extend(g2);
                Keys {
                    groups,
                    default_too: default_too || d2,
                }
            }
            (Keys { groups, .. }, Default | Unmentioned)
            | (Default | Unmentioned, Keys { groups, .. }) => Keys {
                groups,
                default_too: true,
            },
            (k @ Keys { .. }, Anywhere) | (Anywhere, k @ Keys { .. }) => k,
            (Default, _) | (_, Default) => Default,
            (Unmentioned, _) | (_, Unmentioned) => Unmentioned,
            (Anywhere, Anywhere) => Anywhere,
        }
    }
}

fn shard_count(map: &ShardMap) -> usize {
    map.shards
}

/// A key parameter that cannot be read exactly: any shard may hold it.
fn unreadable_key(map: &ShardMap) -> Target {
    Target::Shards(
        (0..shard_count(map)).collect(),
        "a sharding key parameter that cannot be read".into(),
    )
}

const DEFAULT_TOO: &str = "a statement joining sharded rows on another shard with tables of the default shard is not supported";

/// Where the shards of a statement's keys (HELD for a moving bucket) send
/// it; with `default_too` they must all be the default shard.
fn keys_target(map: &ShardMap, mut shards: Vec<usize>, default_too: bool) -> Target {
    if default_too && !shards.iter().all(|s| *s == map.default_shard) {
        return Target::Refuse(DEFAULT_TOO.into());
    }
    if shards.contains(&HELD) {
        return Target::Hold;
    }
    match shards.as_slice() {
        [] => Target::Shard(map.default_shard),
        [one] => Target::Shard(*one),
        _ => {
            shards.sort_unstable();
            Target::Shards(shards, "keys on several shards".into())
        }
    }
}

/// The shards of one key expression (an array parameter may name
/// several); None when a parameter cannot be read exactly.
fn key_shards(
    map: &ShardMap,
    ty: KeyType,
    k: &KeyExpr,
    params: Option<&Params>,
) -> Option<Vec<usize>> {
    let KeyExpr::AnyParam(i) = k else {
        return key_shard(map, ty, k, params).map(|s| vec![s]);
    };
    let p = params?;
    let value = (*p.values.get(*i)?)?;
    let format = match p.formats {
        [] => 0,
        [one] => *one,
        many => *many.get(*i)?,
    };
    let oid = p.types.get(*i).copied().unwrap_or(0);
    let keys = if format == 0 {
        if !array_param_type_ok(ty, oid) {
            return None;
        }
        parse_text_array(std::str::from_utf8(value).ok()?, ty)?
    } else {
        parse_binary_array(value, ty, oid)?
    };
    let mut shards: Vec<usize> = Vec::new();
    for key in keys.iter().flatten() {
        let s = shard_of(map, map.locate(ty, key));
        if !shards.contains(&s) {
            shards.push(s);
        }
    }
    Some(shards)
}

/// Array types whose text form lists values of the key's type.
fn array_param_type_ok(ty: KeyType, oid: u32) -> bool {
    match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => {
            matches!(oid, 0 | 1005 | 1007 | 1016 | 1231 | 1009 | 1015)
        }
        KeyType::Text | KeyType::Varchar => matches!(oid, 0 | 1009 | 1015),
        KeyType::Uuid => matches!(oid, 0 | 2951 | 1009 | 1015),
    }
}

/// The elements of a one-dimensional array literal (`{1,2,NULL,"a b"}`);
/// None elements are NULLs. None when the text is not such an array.
fn parse_text_array(s: &str, ty: KeyType) -> Option<Vec<Option<KeyValue>>> {
    let inner = s.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut out = Vec::new();
    if inner.trim().is_empty() {
        return Some(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                if *c == '{' || *c == '"' {
                    return None;
                }
                if *c == '\\' {
                    chars.next();
                    item.push(chars.next()?);
                    continue;
                }
                item.push(*c);
                chars.next();
            }
            item = item.trim_end().to_string();
        }
        if !quoted && item.eq_ignore_ascii_case("null") {
            out.push(None);
        } else {
            out.push(Some(ty.parse_text(&item).ok()?));
        }
        match chars.next() {
            Some(',') => continue,
            None => return Some(out),
            Some(_) => return None,
        }
    }
}

/// The elements of a one-dimensional array in binary form.
fn parse_binary_array(b: &[u8], ty: KeyType, oid: u32) -> Option<Vec<Option<KeyValue>>> {
    let int = |at: usize| -> Option<i32> {
        Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let ndim = int(0)?;
    let elem = int(8)? as u32;
    let declared_ok = match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => matches!(oid, 0 | 1005 | 1007 | 1016),
        KeyType::Text | KeyType::Varchar => matches!(oid, 0 | 1009 | 1015),
        KeyType::Uuid => matches!(oid, 0 | 2951),
    };
    if !declared_ok || !binary_param_type_ok(ty, elem) {
        return None;
    }
    if ndim == 0 {
        return Some(Vec::new());
    }
    if ndim != 1 {
        return None;
    }
    let n = int(12)?;
    let mut at = 20;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = int(at)?;
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = b.get(at..at + len as usize)?;
        at += len as usize;
        out.push(Some(ty.parse_binary(v).ok()?));
    }
    Some(out)
}

/// The shard of a location, or [`HELD`] while its bucket is held.
fn shard_of(map: &ShardMap, l: crate::sharding::map::Location) -> usize {
    if map.is_held(l.bucket) {
        HELD
    } else {
        l.shard
    }
}

/// The shard of one key; None when a parameter's value cannot be read as
/// the column's type exactly (the caller then assumes any shard).
fn key_shard(map: &ShardMap, ty: KeyType, k: &KeyExpr, params: Option<&Params>) -> Option<usize> {
    key_located(map, ty, k, params, false).map(|(l, _)| shard_of(map, l))
}

/// Where one key lives, and (with `want_value`) the key itself (None for
/// a NULL key); None when a parameter's value cannot be read as the
/// column's type exactly.
fn key_located(
    map: &ShardMap,
    ty: KeyType,
    k: &KeyExpr,
    params: Option<&Params>,
    want_value: bool,
) -> Option<(Location, Option<KeyValue>)> {
    match k {
        KeyExpr::AnyParam(_) => None,
        KeyExpr::Value(v) => Some((map.locate(ty, v), want_value.then(|| v.clone()))),
        KeyExpr::Null => Some((map.null_location(), None)),
        KeyExpr::Param(i) => {
            let p = params?;
            let value = *p.values.get(*i)?;
            let Some(value) = value else {
                return Some((map.null_location(), None));
            };
            let format = match p.formats {
                [] => 0,
                [one] => *one,
                many => *many.get(*i)?,
            };
            let oid = p.types.get(*i).copied().unwrap_or(0);
            let v = if format == 0 {
                let text = std::str::from_utf8(value).ok()?;
                if !text_param_type_ok(ty, oid) {
                    return None;
                }
                ty.parse_text(text).ok()?
            } else {
                if !binary_param_type_ok(ty, oid) {
                    return None;
                }
                ty.parse_binary(value).ok()?
            };
            Some((map.locate(ty, &v), Some(v)))
        }
    }
}

const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const UUID: u32 = 2950;
const NUMERIC: u32 = 1700;
const UNKNOWN: u32 = 705;

/// A text parameter of declared type `oid` compares with the column as its
/// parsed value would (0: the server infers the column's type).
fn text_param_type_ok(ty: KeyType, oid: u32) -> bool {
    match ty {
        // Text that parses as an integer is that integer as numeric too.
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => {
            matches!(
                oid,
                0 | INT2 | INT4 | INT8 | NUMERIC | TEXT | VARCHAR | UNKNOWN
            )
        }
        KeyType::Text | KeyType::Varchar => matches!(oid, 0 | TEXT | VARCHAR | UNKNOWN),
        KeyType::Uuid => matches!(oid, 0 | UUID | TEXT | VARCHAR | UNKNOWN),
    }
}

/// A binary parameter is read by its declared type: only the column's own
/// family is understood.
fn binary_param_type_ok(ty: KeyType, oid: u32) -> bool {
    match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => matches!(oid, 0 | INT2 | INT4 | INT8),
        KeyType::Text | KeyType::Varchar => matches!(oid, 0 | TEXT | VARCHAR),
        KeyType::Uuid => matches!(oid, 0 | UUID),
    }
}

/// A simple-protocol text with its plain literals taken out: integer
/// literals and plain '...' strings become `$1..$n` (returned in order, as
/// a client would bind them in text), so one placement serves every key
/// a statement is sent with. None when the text holds anything whose
/// meaning could change that way (E'' / B'' / X'' / U&'' / dollar-quoted
/// strings, backslashes in strings, `$` parameters, adjacent strings):
/// such texts are placed as they are.
pub fn normalize_literals(sql: &str) -> Option<(String, Vec<String>)> {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut lits: Vec<String> = Vec::new();
    let mut i = 0;
    let mut copied = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    while i < b.len() {
        let c = b[i];
        match c {
            b'$' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|c| *c == b'\n')
                    .map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = sql[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
            }
            b'"' => {
                i = sql[i + 1..].find('"').map_or(b.len(), |p| i + 1 + p + 1);
            }
            b'\'' => {
                if i > 0 && (ident(b[i - 1]) || b[i - 1] == b'&') {
                    // E'...', B'...', X'...', N'...', U&'...' and the like.
                    return None;
                }
                let mut j = i + 1;
                let mut value = String::new();
                loop {
                    let k = sql[j..].find('\'')? + j;
                    value.push_str(&sql[j..k]);
                    if b.get(k + 1) == Some(&b'\'') {
                        value.push('\'');
                        j = k + 2;
                        continue;
                    }
                    j = k + 1;
                    break;
                }
                if value.contains('\\') {
                    return None;
                }
                // 'a' 'b' on two lines is one literal in SQL.
                let next = b[j..]
                    .iter()
                    .position(|c| !c.is_ascii_whitespace())
                    .map(|p| j + p);
                if next.is_some_and(|n| b[n] == b'\'') {
                    return None;
                }
                out.push_str(&sql[copied..i]);
                lits.push(value);
                push_placeholder(&mut out, lits.len());
                i = j;
                copied = j;
            }
            b'0'..=b'9' if i == 0 || !(ident(b[i - 1]) || b[i - 1] == b'.') => {
                let end = b[i..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .map_or(b.len(), |p| i + p);
                if end < b.len() && (ident(b[end]) || b[end] == b'.') {
                    // 1e3, 1.5, 12abc: left as written.
                    i = end;
                    while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                        i += 1;
                    }
                    continue;
                }
                out.push_str(&sql[copied..i]);
                lits.push(sql[i..end].to_string());
                push_placeholder(&mut out, lits.len());
                i = end;
                copied = end;
            }
            _ if ident(c) => {
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied..]);
    Some((out, lits))
}

/// The placement of a whole Query string or Parse text.
pub fn place(map: &ShardMap, sql: &str) -> Placement {
    if unmentioned(map, sql.as_bytes()) {
        return Placement::Unmentioned;
    }
    analyse(map, sql)
}

/// Appends `$n`.
fn push_placeholder(out: &mut String, n: usize) {
    use std::fmt::Write;
    out.push('$');
    let _ = write!(out, "{n}");
}

/// The lexical shortcut of [`place`]: true when `sql` names no configured
/// table (and is no index DDL, which may name only the index), so it is
/// [`Placement::Unmentioned`] without a parse.
pub fn unmentioned(map: &ShardMap, sql: &[u8]) -> bool {
    unmentioned_given(map, sql, mentioned(map, sql))
}

/// [`unmentioned`] when [`mentioned`] is already known.
pub fn unmentioned_given(map: &ShardMap, sql: &[u8], mentioned: bool) -> bool {
    // Index DDL may name only the index, not its table; without tables
    // there is nothing it could name.
    !mentioned && (!map.has_tables() || !sql.windows(5).any(|w| w.eq_ignore_ascii_case(b"index")))
}

/// Whether `sql` names a configured table (a word, any case).
pub fn mentioned(map: &ShardMap, sql: &[u8]) -> bool {
    map.has_tables() && map.mentions_table(sql)
}

/// The placement from a full parse (no lexical shortcut).
pub fn analyse(map: &ShardMap, sql: &str) -> Placement {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(_) => {
            let tables = map.mentioned_tables(sql);
            if tables.is_empty() {
                return Placement::Default;
            }
            return Placement::Unsupported(format!(
                "shardgate cannot analyse this statement, and it names the sharded or reference table(s) {}; add a /* shardgate: shard=N */ or /* shardgate: key=K */ hint",
                tables.join(", ")
            ));
        }
    };
    statements
        .iter()
        .map(|s| place_statement(map, s))
        .reduce(Placement::and)
        .unwrap_or(Placement::Anywhere)
}

/// How one relation name is placed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sharded,
    Reference,
    Unknown,
    Cte,
}

fn relation_kind(map: &ShardMap, ctes: &HashSet<String>, name: &ObjectName) -> Kind {
    let (schema, table) = split_object_name(name);
    if schema.is_none() && ctes.contains(&table) {
        return Kind::Cte;
    }
    match map.table(schema.as_deref(), &table) {
        Some(TableRule::Sharded { .. }) => Kind::Sharded,
        Some(TableRule::Reference) => Kind::Reference,
        None => Kind::Unknown,
    }
}

fn fold_ident(i: &ast::Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

fn split_object_name(name: &ObjectName) -> (Option<String>, String) {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p.as_ident() {
            Some(i) => fold_ident(i),
            None => p.to_string(),
        })
        .collect();
    match parts.as_slice() {
        [] => (None, String::new()),
        [t] => (None, t.clone()),
        [.., s, t] => (Some(s.clone()), t.clone()),
    }
}

fn place_statement(map: &ShardMap, stmt: &Statement) -> Placement {
    if let Statement::Explain { statement, .. } = stmt {
        return place_statement(map, statement);
    }
    let ctes = cte_names(stmt);
    if let Some(clash) = ctes.iter().find(|c| map.table(None, c).is_some()) {
        return Placement::Unsupported(format!(
            "a WITH query named like the sharded or reference table {clash} is not supported"
        ));
    }
    let rels = Relations::of(map, &ctes, stmt);
    let (sharded, reference, unknown) = (rels.sharded.len(), rels.reference, rels.unknown.len());
    let written = written_tables(map, &ctes, stmt);
    let data_statement = matches!(
        stmt,
        Statement::Query(_) | Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
    );
    // DDL that names a configured table where the parser does not see a
    // relation (DROP TABLE t, ALTER TABLE t RENAME ...), and index DDL
    // (an index of a sharded table exists on every shard): every shard.
    // An index of a default-shard table then fails on the other shards,
    // an error rather than a half-applied change.
    if !data_statement && sharded == 0 && reference == 0 {
        let named = map.mentioned_tables(&stmt.to_string());
        let index_ddl = matches!(
            stmt,
            Statement::Drop {
                object_type: ast::ObjectType::Index,
                ..
            } | Statement::AlterIndex { .. }
        );
        if !named.is_empty() || index_ddl {
            return Placement::AllShards {
                what: format!("{} on every shard", statement_kind(stmt)),
                write: true,
            };
        }
    }
    if written.contains(&Kind::Reference) || (!data_statement && reference > 0) {
        if sharded > 0 {
            return Placement::Unsupported(
                "a statement that writes a reference table and reads sharded tables is not supported"
                    .into(),
            );
        }
        return Placement::AllShards {
            what: "a write to a reference table".into(),
            write: true,
        };
    }
    if sharded == 0 {
        return if unknown > 0 {
            Placement::Default
        } else {
            Placement::Anywhere
        };
    }
    if !data_statement {
        return Placement::AllShards {
            what: format!("{} on a sharded table", statement_kind(stmt)),
            write: true,
        };
    }
    let w = Walker::run(map, &ctes, stmt);
    if let Some(p) = w.problem {
        return Placement::Unsupported(p);
    }
    let write = !matches!(stmt, Statement::Query(_)) || !written.is_empty();
    if w.factors.len() != sharded {
        return Placement::AllShards {
            what: "sharded tables without a usable sharding key".into(),
            write,
        };
    }
    // Every group of key-joined references needs keys.
    let mut groups: Vec<(usize, KeyGroup)> = Vec::new();
    for i in 0..w.factors.len() {
        let root = w.find(i);
        if groups.iter().any(|(r, _)| *r == root) {
            continue;
        }
        let members: Vec<usize> = (0..w.factors.len())
            .filter(|j| w.find(*j) == root)
            .collect();
        let best = members
            .iter()
            .filter_map(|m| w.factors[*m].keys.as_ref())
            .min_by_key(|k| k.len());
        let Some(keys) = best else {
            let f = &w.factors[root];
            return Placement::AllShards {
                what: format!(
                    "table {} without an equality on its sharding column {}",
                    f.table, f.column
                ),
                write,
            };
        };
        groups.push((
            root,
            KeyGroup {
                key_type: w.factors[root].key_type,
                keys: keys.clone(),
                table: w.factors[root].table.as_str().into(),
            },
        ));
    }
    Placement::Keys {
        groups: groups.into_iter().map(|(_, g)| g).collect(),
        default_too: unknown > 0,
    }
}

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

/// The table names (without schema, case-folded) a statement reads.
pub fn relation_names(sql: &str) -> Vec<String> {
    let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    for s in &stmts {
        let _ = ast::visit_relations(s, |n| {
            let (_, t) = split_object_name(n);
            if !names.contains(&t) {
                names.push(t);
            }
            ControlFlow::<()>::Continue(())
        });
    }
    names
}

/// Every relation a statement names, by kind.
struct Relations {
    sharded: Vec<String>,
    reference: usize,
    unknown: Vec<String>,
}

impl Relations {
    fn of(map: &ShardMap, ctes: &HashSet<String>, stmt: &Statement) -> Relations {
        let mut r = Relations {
            sharded: Vec::new(),
            reference: 0,
            unknown: Vec::new(),
        };
        let _ = ast::visit_relations(stmt, |name| {
            match relation_kind(map, ctes, name) {
                Kind::Sharded => r.sharded.push(name.to_string()),
                Kind::Reference => r.reference += 1,
                Kind::Unknown => r.unknown.push(name.to_string()),
                Kind::Cte => {}
            }
            ControlFlow::<()>::Continue(())
        });
        r
    }
}

fn statement_kind(stmt: &Statement) -> String {
    let text = stmt.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    words.join(" ").to_uppercase()
}

/// Names of every WITH query in the statement.
fn cte_names(stmt: &Statement) -> HashSet<String> {
    struct V(HashSet<String>);
    impl Visitor for V {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(with) = &q.with {
                for cte in &with.cte_tables {
                    self.0.insert(fold_ident(&cte.alias.name));
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = V(HashSet::new());
    let _ = stmt.visit(&mut v);
    v.0
}

/// The kinds of the tables the statement (or a data-modifying CTE in it)
/// writes.
fn written_tables(map: &ShardMap, ctes: &HashSet<String>, stmt: &Statement) -> Vec<Kind> {
    struct V<'a> {
        map: &'a ShardMap,
        ctes: &'a HashSet<String>,
        kinds: Vec<Kind>,
    }
    impl Visitor for V<'_> {
        type Break = ();
        fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
            let target = match s {
                Statement::Insert(i) => match &i.table {
                    TableObject::TableName(n) => Some(n.clone()),
                    _ => None,
                },
                Statement::Update(u) => match &u.table.relation {
                    TableFactor::Table { name, .. } => Some(name.clone()),
                    _ => None,
                },
                Statement::Delete(d) => match &d.from {
                    FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => {
                        t.first().and_then(|t| match &t.relation {
                            TableFactor::Table { name, .. } => Some(name.clone()),
                            _ => None,
                        })
                    }
                },
                _ => None,
            };
            if let Some(n) = target {
                self.kinds.push(relation_kind(self.map, self.ctes, &n));
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = V {
        map,
        ctes,
        kinds: Vec::new(),
    };
    let _ = stmt.visit(&mut v);
    v.kinds
}

/// A reference to a sharded table met by the walker.
struct Factor {
    table: String,
    column: String,
    key_type: KeyType,
    /// Keys its rows are restricted to, if any.
    keys: Option<Vec<KeyExpr>>,
    /// Queries it is nested in (1: the statement's own SELECT).
    depth: usize,
}

/// One FROM entry visible to column references: its name (alias, or the
/// table name) and the sharded factor behind it.
struct Entry {
    name: String,
    factor: Option<usize>,
}

struct Walker<'a> {
    map: &'a ShardMap,
    ctes: &'a HashSet<String>,
    factors: Vec<Factor>,
    /// Union-find over factors joined on their keys.
    parent: Vec<usize>,
    scopes: Vec<Vec<Entry>>,
    problem: Option<String>,
    /// Queries being walked, outermost first.
    nesting: usize,
}

impl<'a> Walker<'a> {
    /// Walks `stmt`, registering its sharded references and their keys.
    fn run(map: &'a ShardMap, ctes: &'a HashSet<String>, stmt: &Statement) -> Walker<'a> {
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

    fn find(&self, mut i: usize) -> usize {
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
fn key_value(e: &Expr, ty: KeyType) -> Option<KeyExpr> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn map() -> ShardMap {
        let text = r#"
[[users]]
name = "app"
password = "app"
[[shards]]
name = "a"
primary = "127.0.0.1:1"
[[shards]]
name = "b"
primary = "127.0.0.1:2"
[[shards]]
name = "c"
primary = "127.0.0.1:3"
[sharding]
buckets = 1024
reference_tables = ["countries"]
[[sharding.tables]]
name = "orders"
column = "customer_id"
type = "int8"
[[sharding.tables]]
name = "items"
column = "customer_id"
type = "int4"
[[sharding.tables]]
name = "users"
column = "name"
type = "text"
"#;
        ShardMap::from_config(&Config::parse(text, "t.toml").unwrap()).unwrap()
    }

    #[test]
    fn bucket_exclusion_filters_every_sharded_table_of_the_from() {
        let m = map();
        let x = |sql: &str| exclude_buckets(&m, sql, &[3, 7]);
        let plain = x("SELECT count(*) FROM orders").unwrap();
        assert!(
            plain.contains("WHERE COALESCE(NOT (((hashint8extended(orders.\"customer_id\""),
            "{plain}"
        );
        assert!(plain.contains("= ANY('{3,7}'::INT8[])), true)"), "{plain}");
        // The statement's own WHERE stays, as a conjunct in parentheses.
        let r = x("SELECT o.id FROM orders o WHERE o.total > 5 OR o.total < 0 ORDER BY 1").unwrap();
        assert!(
            r.contains("WHERE (o.total > 5 OR o.total < 0) AND COALESCE"),
            "{r}"
        );
        assert!(r.contains("o.\"customer_id\""), "{r}");
        assert!(r.ends_with("ORDER BY 1"), "{r}");
        // Joined sharded tables each get their conjunct; a reference table
        // none.
        let j = x("SELECT * FROM orders o JOIN items i ON i.customer_id = o.customer_id JOIN countries c ON c.id = o.country").unwrap();
        assert_eq!(j.matches("COALESCE(NOT").count(), 2, "{j}");
        assert!(!j.contains("c.\""), "{j}");
        // Shapes it cannot filter.
        assert!(x("SELECT id FROM orders UNION ALL SELECT id FROM items").is_err());
        assert!(x("SELECT * FROM countries").is_err());
        assert!(x("SELECT * FROM (SELECT * FROM orders) s").is_err());
    }

    fn int(v: i64) -> KeyExpr {
        KeyExpr::Value(KeyValue::Int(v))
    }

    fn keys(p: &Placement) -> Option<Vec<Vec<KeyExpr>>> {
        match p {
            Placement::Keys { groups, .. } => Some(groups.iter().map(|g| g.keys.clone()).collect()),
            _ => None,
        }
    }

    #[test]
    fn single_key_statements() {
        let m = map();
        for (sql, want) in [
            ("SELECT * FROM orders WHERE customer_id = 42", vec![vec![int(42)]]),
            ("select * from orders where customer_id = $1", vec![vec![KeyExpr::Param(0)]]),
            ("select * from orders where customer_id = '42'", vec![vec![int(42)]]),
            ("select * from orders where customer_id = -7::int8 and total > 3", vec![vec![int(-7)]]),
            ("select * from orders where customer_id in (1, 2, $3)", vec![vec![int(1), int(2), KeyExpr::Param(2)]]),
            ("select * from orders o join items i on o.customer_id = i.customer_id where o.customer_id = 7", vec![vec![int(7)]]),
            ("select * from orders o join countries c on c.code = o.country where o.customer_id = 7", vec![vec![int(7)]]),
            ("with x as (select * from orders where customer_id = 5) select * from x", vec![vec![int(5)]]),
            ("select * from orders o where o.customer_id = 5 and exists (select 1 from items i where i.customer_id = o.customer_id)", vec![vec![int(5)]]),
            ("select * from orders, lateral (select * from items where items.customer_id = orders.customer_id) x where orders.customer_id = 3", vec![vec![int(3)]]),
            ("select * from orders where customer_id = 5 union all select * from orders where customer_id = 6", vec![vec![int(5)], vec![int(6)]]),
            ("insert into orders (customer_id, total) values (1, 2), ($1, 3) returning *", vec![vec![int(1), KeyExpr::Param(0)]]),
            ("insert into orders (total, customer_id) values (1, 2) on conflict (id) do update set total = 9", vec![vec![int(2)]]),
            ("update orders set total = total + 1 where customer_id = 1", vec![vec![int(1)]]),
            ("delete from orders where customer_id = 1 returning id", vec![vec![int(1)]]),
            ("select count(*) from users where name = 'ann'", vec![vec![KeyExpr::Value(KeyValue::Text("ann".into()))]]),
            ("explain select * from orders where customer_id = 4", vec![vec![int(4)]]),
            ("begin; select * from orders where customer_id = 4; commit", vec![vec![int(4)]]),
        ] {
            assert_eq!(keys(&place(&m, sql)), Some(want), "{sql}");
        }
    }

    #[test]
    fn statements_that_need_every_shard() {
        let m = map();
        for sql in [
            "select * from orders",
            "select * from orders where customer_id = 1 or total = 2",
            "select * from orders where not (customer_id = 1)",
            "select * from orders o join items i on o.id = i.order_id where o.customer_id = 7",
            "select * from orders where customer_id = 7 and total > (select avg(total) from orders)",
            "select * from orders left join items on orders.customer_id = items.customer_id where orders.customer_id = 5",
            "select * from orders where customer_id = 42.5",
            "select * from orders where customer_id::text = '42'",
            "select * from orders where customer_id = abs(-4)",
            "select * from generate_series(1, 2) g, lateral (select * from orders where customer_id = g) x",
            "select * from users where name = 42",
            "update orders set total = 1",
            "create index on orders (total)",
            "truncate orders",
            "insert into countries values ('x')",
            "update countries set name = 'y'",
            "drop table orders",
            "alter table orders rename column total to amount",
            "drop index orders_total_idx",
        ] {
            assert!(
                matches!(place(&m, sql), Placement::AllShards { .. }),
                "{sql}: {:?}",
                place(&m, sql)
            );
        }
    }

    #[test]
    fn refused_and_unplaced() {
        let m = map();
        for sql in [
            "insert into orders values (1, 2)",
            "insert into orders (total) values (1)",
            "insert into orders (customer_id) values (default)",
            "insert into orders (customer_id) select 1",
            "update orders set customer_id = 2 where customer_id = 1",
            "insert into orders (customer_id) values (1) on conflict (id) do update set customer_id = 3",
            "selec * from orders",
            "table orders",
            "with orders as (select 1) select * from orders",
            "insert into countries select * from orders",
        ] {
            assert!(
                matches!(place(&m, sql), Placement::Unsupported(_)),
                "{sql}: {:?}",
                place(&m, sql)
            );
        }
        assert_eq!(place(&m, "select * from foo"), Placement::Unmentioned);
        assert_eq!(analyse(&m, "select * from foo"), Placement::Default);
        assert_eq!(analyse(&m, "select now(); set x = 1"), Placement::Anywhere);
        assert_eq!(analyse(&m, "select * from countries"), Placement::Anywhere);
        assert_eq!(analyse(&m, "selec * from foo"), Placement::Default);
        assert!(matches!(
            analyse(
                &m,
                "select * from foo join orders using (x) where customer_id = 1"
            ),
            Placement::Keys {
                default_too: true,
                ..
            }
        ));
    }

    #[test]
    fn any_arrays_route_to_the_shards_they_touch() {
        let m = map();
        let p = place(&m, "select * from orders where customer_id = any($1)");
        assert_eq!(keys(&p), Some(vec![vec![KeyExpr::AnyParam(0)]]));
        let shard = |k: i64| m.locate(KeyType::Int8, &KeyValue::Int(k)).shard;
        let b = (2..100).find(|k| shard(*k) != shard(1)).unwrap();
        let text = format!("{{1, {b},NULL}}");
        let t = Params {
            types: &[1016],
            formats: &[],
            values: &[Some(text.as_bytes())],
        };
        let mut want = vec![shard(1), shard(b)];
        want.sort_unstable();
        assert_eq!(
            p.resolve(&m, Some(&t)),
            Target::Shards(want.clone(), "keys on several shards".into())
        );
        // The same array in binary: 1 dim, no NULLs, int8 elements.
        let mut bin = Vec::new();
        for v in [1i32, 0, 20, 2, 1] {
            bin.extend_from_slice(&v.to_be_bytes());
        }
        for k in [1i64, b] {
            bin.extend_from_slice(&8i32.to_be_bytes());
            bin.extend_from_slice(&k.to_be_bytes());
        }
        let bp = Params {
            types: &[1016],
            formats: &[1],
            values: &[Some(&bin)],
        };
        assert_eq!(
            p.resolve(&m, Some(&bp)),
            Target::Shards(want, "keys on several shards".into())
        );
        let one = Params {
            types: &[0],
            formats: &[0],
            values: &[Some(b"{1,1}")],
        };
        assert_eq!(p.resolve(&m, Some(&one)), Target::Shard(shard(1)));
        // A float8[] is not read as integers.
        let f = Params {
            types: &[1022],
            formats: &[1],
            values: &[Some(&bin)],
        };
        assert!(matches!(p.resolve(&m, Some(&f)), Target::Shards(s, _) if s.len() == 3));
        for sql in [
            "select * from orders where customer_id = any('{1,1}')",
            "select * from orders where customer_id = any(array[1, 1])",
        ] {
            assert_eq!(
                place(&m, sql).resolve(&m, None),
                Target::Shard(shard(1)),
                "{sql}"
            );
        }
        assert_eq!(
            parse_text_array(r#"{"a\"b", c ,NULL,"NULL"}"#, KeyType::Text),
            Some(vec![
                Some(KeyValue::Text("a\"b".into())),
                Some(KeyValue::Text("c".into())),
                None,
                Some(KeyValue::Text("NULL".into())),
            ])
        );
    }

    #[test]
    fn literals_come_out_as_parameters() {
        let n = |s: &str| normalize_literals(s);
        assert_eq!(
            n("select * from orders where customer_id = 42 and note = 'it''s' -- 7\n limit 5"),
            Some((
                "select * from orders where customer_id = $1 and note = $2 -- 7\n limit $3".into(),
                vec!["42".into(), "it's".into(), "5".into()]
            ))
        );
        assert_eq!(
            n("select t1.c2 from t1 where x = 1.5 and y = 1e3 /* 9 */ and \"c 3\" = 4"),
            Some((
                "select t1.c2 from t1 where x = 1.5 and y = 1e3 /* 9 */ and \"c 3\" = $1".into(),
                vec!["4".into()]
            ))
        );
        for s in [
            "select E'\\x41'",
            "select $$a$$",
            "select 'a\\b'",
            "select 'a'\n'b'",
            "select $1",
            "select U&'x'",
        ] {
            assert_eq!(n(s), None, "{s}");
        }
        // The same shard from the literal text and from its normalized form.
        let m = map();
        for sql in [
            "select * from orders where customer_id = 123456",
            "select * from orders where customer_id = '123456'",
            "select * from users where name = 'ann'",
            "insert into orders (customer_id, total) values (77, 1), (77, 2)",
        ] {
            let (norm, lits) = n(sql).unwrap();
            let values: Vec<Option<&[u8]>> = lits.iter().map(|l| Some(l.as_bytes())).collect();
            let params = Params {
                types: &[],
                formats: &[],
                values: &values,
            };
            assert_eq!(
                place(&m, &norm).resolve(&m, Some(&params)),
                place(&m, sql).resolve(&m, None),
                "{sql}"
            );
        }
    }

    #[test]
    fn multi_row_inserts_split_by_shard() {
        let m = map();
        let shard = |k: i64| m.locate(KeyType::Int8, &KeyValue::Int(k)).shard;
        let (a, b) = (1i64, (2..100).find(|k| shard(*k) != shard(1)).unwrap());
        let sql =
            format!("insert into orders (customer_id, total) values ({a}, 1), ({b}, 2), ({a}, $1)");
        let e = split_write(
            &m,
            "insert into orders (customer_id) values ($1), (2)",
            &[],
            None,
        )
        .unwrap_err();
        assert!(e.contains("parameter"), "{e}");
        let text = Params {
            types: &[],
            formats: &[],
            values: &[Some(b"9")],
        };
        let parts = split_write(&m, &sql, &[], Some(&text)).unwrap();
        assert_eq!(parts.len(), 2);
        let pa = parts.iter().find(|p| p.shard == shard(a)).unwrap();
        assert_eq!(
            pa.sql,
            format!("INSERT INTO orders (customer_id, total) VALUES ({a}, 1), ({a}, $1)")
        );
        assert_eq!(pa.params, Some(vec![0]));
        let pb = parts.iter().find(|p| p.shard == shard(b)).unwrap();
        assert_eq!(pb.params, Some(vec![]));
        // Parameters renumbered per part.
        let parts = split_write(
            &m,
            "insert into orders (customer_id, total) values ($1, $2), ($3, $4)",
            &[],
            Some(&Params {
                types: &[],
                formats: &[],
                values: &[
                    Some(format!("{a}").as_bytes()),
                    Some(b"1"),
                    Some(format!("{b}").as_bytes()),
                    Some(b"2"),
                ],
            }),
        )
        .unwrap();
        let pb = parts.iter().find(|p| p.shard == shard(b)).unwrap();
        assert_eq!(
            pb.sql,
            "INSERT INTO orders (customer_id, total) VALUES ($1, $2)"
        );
        assert_eq!(pb.params, Some(vec![2, 3]));
        // Other writes run whole on each shard.
        let parts = split_write(&m, "update orders set total = 0", &[0, 1, 2], None).unwrap();
        assert_eq!(parts.len(), 3);
        assert!(parts
            .iter()
            .all(|p| p.params.is_none() && p.sql == "update orders set total = 0"));
    }

    #[test]
    fn what_can_be_computed_shard_by_shard() {
        let m = map();
        for sql in [
            "select * from orders",
            "select count(*) from orders o join items i on o.customer_id = i.customer_id",
            "select * from orders o join countries c on c.code = o.country where o.total > 1",
            "select * from orders o where exists (select 1 from countries c where c.code = o.country)",
            "select * from orders o left join countries c on o.country = c.code",
            "select * from countries c right join orders o on o.country = c.code",
        ] {
            assert_eq!(scatter_check(&m, sql), Ok(()), "{sql}");
        }
        for (sql, what) in [
            (
                "select * from orders o join items i on o.id = i.order_id",
                "not on their sharding keys",
            ),
            (
                "select * from orders where total > (select avg(total) from orders)",
                "subquery",
            ),
            (
                "select count(*) from (select distinct country from orders) x",
                "derived table",
            ),
            ("select * from orders o join foo f on f.id = o.id", "foo"),
            (
                "select * from orders o where o.customer_id in (select customer_id from items)",
                "subquery",
            ),
            (
                "select * from countries c left join orders o on o.country = c.code",
                "outer join",
            ),
            (
                "select * from orders o right join countries c on o.country = c.code",
                "outer join",
            ),
            (
                "select * from orders o full join countries c on o.country = c.code",
                "outer join",
            ),
        ] {
            let e = scatter_check(&m, sql).unwrap_err();
            assert!(e.contains(what), "{sql}: {e}");
        }
    }

    #[test]
    fn resolution_by_literal_text_and_binary_parameters() {
        let m = map();
        let p = place(&m, "select * from orders where customer_id = $1");
        let by_literal =
            place(&m, "select * from orders where customer_id = 123456").resolve(&m, None);
        let text = Params {
            types: &[],
            formats: &[],
            values: &[Some(b"123456")],
        };
        let bin = 123456i64.to_be_bytes();
        let binary = Params {
            types: &[INT8],
            formats: &[1],
            values: &[Some(&bin)],
        };
        assert_eq!(p.resolve(&m, Some(&text)), by_literal);
        assert_eq!(p.resolve(&m, Some(&binary)), by_literal);
        // A float8 parameter in binary is not an integer's bytes.
        let float = Params {
            types: &[701],
            formats: &[1],
            values: &[Some(&bin)],
        };
        assert!(matches!(p.resolve(&m, Some(&float)), Target::Shards(..)));
        // Keys spread over shards, and the same key twice.
        let spread = place(
            &m,
            "select * from orders where customer_id in (1,2,3,4,5,6,7,8,9,10)",
        );
        assert!(matches!(spread.resolve(&m, None), Target::Shards(s, _) if s.len() > 1));
        let same = place(&m, "select * from orders where customer_id in (5, 5)").resolve(&m, None);
        assert!(matches!(same, Target::Shard(_)));
    }

    #[test]
    fn the_lexical_shortcut_skips_index_ddl_only_when_tables_are_configured() {
        let m = map();
        assert!(unmentioned(&m, b"select 1"));
        assert!(!unmentioned(&m, b"create index i on orders (x)"));
        assert!(!unmentioned(&m, b"drop index i"));
        let none = ShardMap::from_config(
            &Config::parse(
                "[[users]]\nname = \"app\"\npassword = \"app\"\n[[shards]]\nname = \"a\"\nprimary = \"127.0.0.1:1\"\n[sharding]\nbuckets = 8\n",
                "t.toml",
            )
            .unwrap(),
        )
        .unwrap();
        assert!(unmentioned(&none, b"drop index i"));
    }

    #[test]
    fn one_key_resolves_as_a_list_of_one_and_notes_its_key() {
        let mut m = map();
        // A key off the default shard.
        let k = (1..)
            .find(|k| m.locate(KeyType::Int8, &KeyValue::Int(*k)).shard != m.default_shard)
            .unwrap();
        let one = place(&m, &format!("select * from orders where customer_id = {k}"));
        // Two keys take the general path.
        let twice = place(
            &m,
            &format!("select * from orders where customer_id in ({k}, {k})"),
        );
        let at = m.locate(KeyType::Int8, &KeyValue::Int(k));
        let mut hit = None;
        assert_eq!(
            one.resolve_noting(&m, None, Some(&mut hit)),
            Target::Shard(at.shard)
        );
        assert_eq!(twice.resolve(&m, None), Target::Shard(at.shard));
        let hit = hit.unwrap();
        assert_eq!((hit.key, hit.bucket), (KeyValue::Int(k), at.bucket));
        assert_eq!(&*hit.table, "orders");
        // With a default-shard table, a key elsewhere is refused.
        let joined = place(
            &m,
            &format!(
                "select * from orders o join plain p on p.id = o.id where o.customer_id = {k}"
            ),
        );
        assert_eq!(joined.resolve(&m, None), Target::Refuse(DEFAULT_TOO.into()));
        // A bucket being cut over holds the statement.
        m.held = vec![false; m.buckets as usize];
        m.held[at.bucket as usize] = true;
        assert_eq!(one.resolve(&m, None), Target::Hold);
        assert_eq!(twice.resolve(&m, None), Target::Hold);
    }
}
