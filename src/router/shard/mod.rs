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
//!
//! This module holds the placement and the keys' shards; `walk` holds the
//! walker that finds the references and their keys, `rewrite` the checks
//! and rewrites for statements that run on several shards.

use crate::hotspot::KeyHit;
use crate::sharding::hash::{KeyType, KeyValue};
use crate::sharding::map::{Location, ShardMap, TableRule};
use sqlparser::ast::{
    self, FromTable, ObjectName, Query, Statement, TableFactor, TableObject, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashSet;
use std::ops::ControlFlow;

mod rewrite;
mod walk;

pub use rewrite::{exclude_buckets, scatter_check, split_write, WritePart};
use walk::Walker;

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
