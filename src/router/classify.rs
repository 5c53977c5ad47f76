//! Statement classification for read/write splitting: may this SQL text run
//! on a replica?
//!
//! A statement is read-only only when that is proven: a SELECT/VALUES/TABLE,
//! SHOW or EXPLAIN (without ANALYZE of something that is not itself
//! read-only), with no locking clause, no SELECT INTO, no data-modifying
//! CTE, and only functions, operators and casts the [`Catalog`] knows to be
//! read-only. Everything else — and anything sqlparser cannot parse — is a
//! write and goes to the primary.
//!
//! Two paths keep this off the per-query budget: a lexical fast path proves
//! the common `SELECT cols FROM t WHERE col = literal` shape read-only
//! without parsing, and results of full parses are cached by text (in the
//! catalog, so a catalog refresh also drops them).

use super::catalog::Catalog;
use sqlparser::ast::{
    Expr, Query, Select, Statement, TableFactor, TransactionAccessMode, TransactionIsolationLevel,
    TransactionMode, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// Where a comment hint (`/* shardgate: primary */`) sends a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hint {
    #[default]
    None,
    Primary,
    Replica,
}

/// What routing needs to know about one SQL text (one or more statements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Class {
    /// Something in the text is not proven read-only. (A plain BEGIN is
    /// not counted here but in `plain_begin`.)
    pub write: bool,
    /// A BEGIN / START TRANSACTION without an access mode: read-only only
    /// when the session's `default_transaction_read_only` is on.
    pub plain_begin: bool,
    /// Running the text may commit data: a write outside a transaction
    /// block, COMMIT, END, COMMIT PREPARED. The point at which
    /// read-your-writes learns a new position. (Not SET and other
    /// session-state commands.)
    pub may_commit: bool,
    /// The text declares its transaction read-only (BEGIN READ ONLY, SET
    /// TRANSACTION READ ONLY).
    pub read_only_tx: bool,
    /// The text is exactly one BEGIN / START TRANSACTION with modes any
    /// server accepts (no SERIALIZABLE, which a hot standby refuses): the
    /// proxy may answer it itself and send it with the next statement.
    pub single_begin: bool,
    pub hint: Hint,
}

impl Class {
    pub const WRITE: Class = Class {
        write: true,
        plain_begin: false,
        may_commit: true,
        read_only_tx: false,
        single_begin: false,
        hint: Hint::None,
    };

    /// The class in 7 bits (see [`Class::unpack`]).
    pub fn pack(&self) -> u8 {
        let hint = match self.hint {
            Hint::None => 0,
            Hint::Primary => 1,
            Hint::Replica => 2,
        };
        self.write as u8
            | (self.plain_begin as u8) << 1
            | (self.may_commit as u8) << 2
            | (self.read_only_tx as u8) << 3
            | (self.single_begin as u8) << 4
            | hint << 5
    }

    pub fn unpack(bits: u8) -> Class {
        Class {
            write: bits & 1 != 0,
            plain_begin: bits & 2 != 0,
            may_commit: bits & 4 != 0,
            read_only_tx: bits & 8 != 0,
            single_begin: bits & 16 != 0,
            hint: match bits >> 5 & 3 {
                1 => Hint::Primary,
                2 => Hint::Replica,
                _ => Hint::None,
            },
        }
    }

    /// May this text go to a replica (outside a read-write transaction)?
    pub fn read_only(&self, default_read_only: bool) -> bool {
        !self.write && (!self.plain_begin || default_read_only)
    }
}

/// Leading keywords of statements that always write (or change state only
/// the primary may hold): no need to parse them to send them there.
const WRITE_KEYWORDS: &[&[u8]] = &[
    b"insert",
    b"update",
    b"delete",
    b"merge",
    b"create",
    b"alter",
    b"drop",
    b"truncate",
    b"copy",
    b"grant",
    b"revoke",
    b"vacuum",
    b"analyze",
    b"cluster",
    b"reindex",
    b"lock",
    b"listen",
    b"notify",
    b"unlisten",
    b"call",
    b"do",
    b"comment",
    b"refresh",
    b"prepare",
    b"execute",
    b"deallocate",
    b"discard",
    b"reset",
    b"import",
    b"security",
    b"checkpoint",
];

/// Of those, the ones that change only session state: they commit no data
/// (no read-your-writes position to learn after them).
const SESSION_KEYWORDS: &[&[u8]] = &[
    b"reset",
    b"discard",
    b"deallocate",
    b"listen",
    b"unlisten",
    b"lock",
    b"prepare",
];

/// Classifies SQL text (the body of a Query or of a Parse).
pub fn classify(sql: &[u8], catalog: &Catalog) -> Class {
    if fast_select(sql, catalog) {
        // It refuses any comment outside a literal: no hint to read.
        return Class::default();
    }
    let hint = hint(sql);
    if let Some(word) = leading_keyword(sql) {
        if WRITE_KEYWORDS.iter().any(|w| w.eq_ignore_ascii_case(word)) {
            return Class {
                hint,
                may_commit: !SESSION_KEYWORDS
                    .iter()
                    .any(|w| w.eq_ignore_ascii_case(word)),
                ..Class::WRITE
            };
        }
    }
    if let Some(c) = catalog.cached(sql) {
        return c;
    }
    let class = Class {
        hint,
        ..classify_parsed(sql, catalog)
    };
    catalog.remember(sql, class);
    class
}

fn classify_parsed(sql: &[u8], catalog: &Catalog) -> Class {
    let Ok(text) = std::str::from_utf8(sql) else {
        return Class::WRITE;
    };
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, text) else {
        return Class::WRITE;
    };
    let mut class = Class::default();
    // BEGIN; SET TRANSACTION READ ONLY; ... in one text is a read-only
    // transaction.
    let mut pending_begin = false;
    if let [Statement::StartTransaction {
        modes,
        modifier: None,
        statements: inner,
        exception: None,
        ..
    }] = statements.as_slice()
    {
        class.single_begin = inner.is_empty()
            && modes.iter().all(|m| {
                !matches!(
                    m,
                    TransactionMode::IsolationLevel(
                        TransactionIsolationLevel::Serializable
                            | TransactionIsolationLevel::Snapshot
                    )
                )
            });
    }
    for stmt in &statements {
        match stmt {
            Statement::StartTransaction { modes, .. } => match access_mode(modes) {
                Some(TransactionAccessMode::ReadOnly) => class.read_only_tx = true,
                Some(TransactionAccessMode::ReadWrite) => class.write = true,
                None => pending_begin = true,
            },
            Statement::Set(sqlparser::ast::Set::SetTransaction { modes, session, .. }) => {
                match access_mode(modes) {
                    Some(TransactionAccessMode::ReadOnly) if !session => {
                        pending_begin = false;
                        class.read_only_tx = true;
                    }
                    None if !session => {}
                    _ => class.write = true,
                }
            }
            Statement::Commit { .. } => class.may_commit = true,
            Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => {}
            other => {
                if !statement_read_only(other, catalog) {
                    class.write = true;
                    // Session-state commands commit no data; anything else
                    // may (an unknown statement may be COMMIT PREPARED or a
                    // procedure that commits).
                    if !matches!(
                        other,
                        Statement::Set(_)
                            | Statement::Discard { .. }
                            | Statement::Deallocate { .. }
                    ) {
                        class.may_commit = true;
                    }
                }
            }
        }
    }
    class.plain_begin = pending_begin;
    class
}

fn access_mode(modes: &[TransactionMode]) -> Option<TransactionAccessMode> {
    modes.iter().rev().find_map(|m| match m {
        TransactionMode::AccessMode(a) => Some(*a),
        _ => None,
    })
}

fn statement_read_only(stmt: &Statement, catalog: &Catalog) -> bool {
    let top_level_ok = match stmt {
        Statement::Query(_) => true,
        // Except the settings that say whether the server takes writes:
        // drivers ask them to find a primary (JDBC targetServerType, libpq
        // target_session_attrs with servers before 14), and a replica's
        // answer would turn them away.
        Statement::ShowVariable { variable } => !variable.iter().any(|v| {
            v.value.eq_ignore_ascii_case("transaction_read_only")
                || v.value.eq_ignore_ascii_case("in_hot_standby")
        }),
        Statement::ShowVariables { .. } => true,
        Statement::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            let analyze = *analyze
                || options.as_ref().is_some_and(|opts| {
                    opts.iter().any(|o| {
                        o.name.value.eq_ignore_ascii_case("analyze")
                            && !o.arg.as_ref().is_some_and(|a| {
                                let a = a.to_string().to_ascii_lowercase();
                                a == "false" || a == "off" || a == "0"
                            })
                    })
                });
            // EXPLAIN ANALYZE runs the statement. Plain EXPLAIN only plans,
            // but an EXPLAIN of a write stays on the primary too: the plan
            // is the primary's to give.
            let _ = analyze;
            return statement_read_only(statement, catalog);
        }
        _ => false,
    };
    if !top_level_ok {
        return false;
    }
    let mut check = ReadOnlyCheck {
        catalog,
        depth: 0,
        write: false,
    };
    let _ = stmt.visit(&mut check);
    !check.write
}

/// Walks every node of a statement looking for anything that may write.
struct ReadOnlyCheck<'a> {
    catalog: &'a Catalog,
    depth: usize,
    write: bool,
}

impl ReadOnlyCheck<'_> {
    fn flag(&mut self) -> ControlFlow<()> {
        self.write = true;
        ControlFlow::Break(())
    }

    fn check_function(&mut self, name: &sqlparser::ast::ObjectName) -> ControlFlow<()> {
        let Some(last) = name.0.last().and_then(|p| p.as_ident()) else {
            return self.flag();
        };
        if self.catalog.function_read_only(&last.value) {
            ControlFlow::Continue(())
        } else {
            self.flag()
        }
    }
}

impl Visitor for ReadOnlyCheck<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        self.depth += 1;
        // Any statement nested in a query (INSERT/UPDATE/DELETE/MERGE in a
        // CTE) writes.
        if self.depth > 1 && !matches!(stmt, Statement::Query(_)) {
            return self.flag();
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _stmt: &Statement) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() || query.for_clause.is_some() {
            return self.flag();
        }
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                if !matches!(
                    *cte.query.body,
                    sqlparser::ast::SetExpr::Select(_)
                        | sqlparser::ast::SetExpr::Query(_)
                        | sqlparser::ast::SetExpr::SetOperation { .. }
                        | sqlparser::ast::SetExpr::Values(_)
                        | sqlparser::ast::SetExpr::Table(_)
                ) {
                    return self.flag();
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_some() {
            return self.flag();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => self.check_function(name),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(f) => self.check_function(&f.name),
            Expr::BinaryOp { op, .. } => {
                if self.catalog.operator_read_only(&op.to_string()) {
                    ControlFlow::Continue(())
                } else {
                    self.flag()
                }
            }
            Expr::UnaryOp { op, .. } => {
                if self.catalog.operator_read_only(&op.to_string()) {
                    ControlFlow::Continue(())
                } else {
                    self.flag()
                }
            }
            Expr::Cast { .. } if self.catalog.has_volatile_casts() => self.flag(),
            _ => ControlFlow::Continue(()),
        }
    }
}

/// The bytes a keyword is made of (ASCII letters, digits, underscore), as
/// a table: one load per byte instead of three range checks.
const WORD_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || b == b'_';
        i += 1;
    }
    table
};

/// The first word of the text after whitespace and simple comments; None
/// when it does not start with a word (or with a nested comment).
pub fn leading_keyword(sql: &[u8]) -> Option<&[u8]> {
    // The usual text starts with its keyword (this runs on every
    // statement).
    if sql.first().is_some_and(u8::is_ascii_alphabetic) {
        let len = sql
            .iter()
            .position(|&b| !WORD_BYTE[b as usize])
            .unwrap_or(sql.len());
        return Some(&sql[..len]);
    }
    let mut i = 0;
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        if sql[i..].starts_with(b"--") {
            i += memchr::memchr(b'\n', &sql[i..])? + 1;
        } else if sql[i..].starts_with(b"/*") {
            let end = find_pair(&sql[i + 2..], b'*', b'/')?;
            if find_pair(&sql[i + 2..i + 2 + end], b'/', b'*').is_some() {
                return None;
            }
            i += end + 4;
        } else {
            break;
        }
    }
    let len = sql[i..]
        .iter()
        .take_while(|&&b| WORD_BYTE[b as usize])
        .count();
    (len > 0).then(|| &sql[i..i + len])
}

/// Inside a transaction block: may this text end it with a commit?
/// (COMMIT or END, or several statements, which are not looked into.)
/// Procedures and DO blocks cannot commit inside a transaction block.
pub fn may_end_transaction(sql: &[u8]) -> bool {
    may_end_transaction_after(leading_keyword(sql), sql)
}

/// [`may_end_transaction`], given the text's [`leading_keyword`] (which a
/// caller looking at every statement has found already).
pub fn may_end_transaction_after(first: Option<&[u8]>, sql: &[u8]) -> bool {
    let Some(word) = first else {
        return true;
    };
    if word.eq_ignore_ascii_case(b"commit") || word.eq_ignore_ascii_case(b"end") {
        return true;
    }
    // A second statement after a semicolon (quotes are not tracked here:
    // a semicolon in a literal only costs a position probe).
    match memchr::memchr(b';', sql) {
        Some(at) => !sql[at + 1..].iter().all(|b| b.is_ascii_whitespace()),
        None => false,
    }
}

/// A `/* shardgate: primary */` or `/* shardgate: replica */` comment.
pub fn hint(sql: &[u8]) -> Hint {
    for comment in block_comments(sql) {
        let Some(body) = shardgate_comment(comment) else {
            continue;
        };
        let word = body
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map_or(&[][..], |start| {
                let rest = &body[start..];
                let len = rest.iter().take_while(|b| b.is_ascii_alphabetic()).count();
                &rest[..len]
            });
        if word.eq_ignore_ascii_case(b"primary") {
            return Hint::Primary;
        }
        if word.eq_ignore_ascii_case(b"replica") {
            return Hint::Replica;
        }
    }
    Hint::None
}

/// The bodies of the `/* ... */` comments in `sql`, in order (an
/// unterminated one runs to the end). Quotes are not tracked: a `/*`
/// inside a literal counts, which at worst reads a hint the author wrote
/// there. Nesting is not followed either: a nested comment's body ends at
/// its first `*/`. This runs on every statement, so it searches with
/// memchr instead of building a substring searcher per call.
pub fn block_comments(sql: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = sql;
    std::iter::from_fn(move || {
        let start = find_pair(rest, b'/', b'*')?;
        let body = &rest[start + 2..];
        let end = find_pair(body, b'*', b'/').unwrap_or(body.len());
        rest = &body[(end + 2).min(body.len())..];
        Some(&body[..end])
    })
}

/// The text after `shardgate:` in a comment body, if it has one.
pub fn shardgate_comment(comment: &[u8]) -> Option<&[u8]> {
    const TAG: &[u8] = b"shardgate:";
    let mut from = 0;
    while let Some(at) = memchr::memchr(b's', &comment[from..]) {
        let at = from + at;
        if comment[at..].starts_with(TAG) {
            return Some(&comment[at + TAG.len()..]);
        }
        from = at + 1;
    }
    None
}

/// The position of the two-byte sequence `a b` in `s`.
fn find_pair(s: &[u8], a: u8, b: u8) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = memchr::memchr(a, &s[from..]) {
        let at = from + at;
        if s.get(at + 1) == Some(&b) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

// Byte classes of the fast path's scanner (one table lookup per byte).
const OTHER: u8 = 0;
const SKIP: u8 = 1;
const WORD: u8 = 2;
const DASH_SLASH: u8 = 3;
const QUOTE: u8 = 4;
const DOLLAR: u8 = 5;
const SEMICOLON: u8 = 6;
const BYTE_CLASS: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = match c {
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b'.' | b'=' | b'<' | b'>' | b'!' | b'+'
            | b'*' | b'%' | b'|' => SKIP,
            b'-' | b'/' => DASH_SLASH,
            b'\'' => QUOTE,
            b'$' => DOLLAR,
            b';' => SEMICOLON,
            b'_' => WORD,
            _ if c.is_ascii_alphanumeric() => WORD,
            _ => OTHER,
        };
        b += 1;
    }
    t
};

/// The lexical fast path: `SELECT` followed only by words, numbers, plain
/// string literals, `$n` parameters, commas, dots and the operators
/// `= <> != < > <= >= + - * / % ||` — no parentheses (so no function call or
/// subquery), no casts, no comments, no FOR (locking) or INTO, one
/// statement. Such a text calls no function other than the operators'
/// (which the catalog vouches for) and is read-only.
pub fn fast_select(sql: &[u8], catalog: &Catalog) -> bool {
    if !catalog.plain_operators_read_only() {
        return false;
    }
    let mut i = 0;
    while i < sql.len() && sql[i].is_ascii_whitespace() {
        i += 1;
    }
    if sql.len() < i + 7
        || !sql[i..i + 6].eq_ignore_ascii_case(b"select")
        || !sql[i + 6].is_ascii_whitespace()
    {
        return false;
    }
    let rest = &sql[i + 6..];
    match quick_scan(rest) {
        Some(fast) => fast,
        None => scan_select(rest),
    }
}

/// One bit per byte class: `1 << BYTE_CLASS[b]`.
const CLASS_BIT: [u8; 256] = {
    let mut t = [0; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = 1 << BYTE_CLASS[b];
        b += 1;
    }
    t
};

/// Which byte classes a text holds (one bit per class), in one pass
/// without branches per byte: the usual text holds only words, spaces
/// and operators.
fn classes_present(s: &[u8]) -> u8 {
    let mut chunks = s.chunks_exact(8);
    let mut seen = 0;
    for c in &mut chunks {
        seen |= c.iter().fold(0, |seen, &b| seen | CLASS_BIT[b as usize]);
    }
    chunks
        .remainder()
        .iter()
        .fold(seen, |seen, &b| seen | CLASS_BIT[b as usize])
}

/// Calls `each` with the position of every `f`, `F`, `i` and `I` in `s`
/// (and perhaps of a few other bytes after one: the caller checks the
/// byte), eight bytes at a time, until `each` returns false. The first
/// letters of FOR and INTO are rare in the texts the fast path sees, so
/// this is a few instructions per byte where a search per letter pays a
/// call per hit.
fn each_f_or_i(s: &[u8], mut each: impl FnMut(usize) -> bool) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each zero byte of `v` is set (and maybe of bytes
    // after one: a borrow).
    let zeros = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut find = |base: usize, chunk: [u8; 8]| {
        // `| 0x20` lowercases letters (and turns padding, 0, into a space).
        let v = u64::from_le_bytes(chunk) | 0x2020_2020_2020_2020;
        let mut hits = zeros(v ^ (ONES * b'f' as u64)) | zeros(v ^ (ONES * b'i' as u64));
        while hits != 0 {
            let at = base + (hits.trailing_zeros() / 8) as usize;
            hits &= hits - 1;
            if at < s.len() && !each(at) {
                return false;
            }
        }
        true
    };
    let mut chunks = s.chunks_exact(8);
    let mut base = 0;
    for c in &mut chunks {
        if !find(base, c.try_into().expect("eight bytes")) {
            return false;
        }
        base += 8;
    }
    let tail = chunks.remainder();
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    tail.is_empty() || find(base, last)
}

/// [`scan_select`]'s answer for a text without string literals, found
/// with one pass over its byte classes and a look at the few `$`, `-`,
/// `/`, `f` and `i` bytes in it rather than a step per byte. This runs for
/// every simple-protocol read (texts with literals miss the class cache)
/// and saves about a fifth of a pgbench select's classification
/// instructions. None: the text holds a literal, a `;` before its end or
/// a byte outside the fast path, for `scan_select` to decide.
fn quick_scan(rest: &[u8]) -> Option<bool> {
    // One statement: a `;` only at the end (then only whitespace).
    let end = rest
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |p| p + 1);
    let body = match rest[..end].last() {
        Some(b';') => &rest[..end - 1],
        _ => &rest[..end],
    };
    let seen = classes_present(body);
    if seen & (1 << OTHER | 1 << QUOTE | 1 << SEMICOLON) != 0 {
        return None;
    }
    let word = |k: usize| body.get(k).is_some_and(|&b| BYTE_CLASS[b as usize] == WORD);
    if seen & 1 << DOLLAR != 0
        && memchr::memchr_iter(b'$', body)
            .any(|at| !body.get(at + 1).is_some_and(u8::is_ascii_digit))
    {
        return Some(false);
    }
    if seen & 1 << DASH_SLASH != 0
        && memchr::memchr2_iter(b'-', b'/', body)
            .any(|at| matches!(body.get(at + 1), Some(b'-') | Some(b'*')))
    {
        return Some(false);
    }
    // FOR or INTO as a whole word, any case. After `$n` digits it is a
    // word of its own to the exact scanner: left to it (rare).
    let ends_word = |at: usize, tail: &[u8]| {
        body.len() > at + tail.len()
            && body[at + 1..=at + tail.len()]
                .iter()
                .zip(tail)
                .all(|(b, t)| b | 0x20 == *t)
            && !word(at + 1 + tail.len())
    };
    let mut defer = false;
    let clean = each_f_or_i(body, |at| {
        let whole = match body[at] | 0x20 {
            b'f' => ends_word(at, b"or"),
            b'i' => ends_word(at, b"nto"),
            _ => false,
        };
        if !whole {
            return true;
        }
        if at > 0 && word(at - 1) {
            defer |= body[at - 1].is_ascii_digit();
            return true;
        }
        false
    });
    if !clean {
        return Some(false);
    }
    if defer {
        return None;
    }
    Some(true)
}

/// The exact scanner of the fast path, over the text after `SELECT `.
fn scan_select(sql: &[u8]) -> bool {
    let mut i = 0;
    while i < sql.len() {
        match BYTE_CLASS[sql[i] as usize] {
            SKIP => i += 1,
            DASH_SLASH => {
                // -- and /* start comments (which may hold a hint).
                if matches!(sql.get(i + 1), Some(b'-') | Some(b'*')) {
                    return false;
                }
                i += 1;
            }
            QUOTE => {
                // A plain literal; a prefixed one (E'', U&'', B'') may need
                // escape rules this scanner does not apply.
                if i > 0 && (sql[i - 1].is_ascii_alphanumeric() || sql[i - 1] == b'&') {
                    return false;
                }
                i += 1;
                loop {
                    match memchr::memchr(b'\'', &sql[i..]) {
                        None => return false,
                        Some(at) if sql.get(i + at + 1) == Some(&b'\'') => i += at + 2,
                        Some(at) => {
                            i += at + 1;
                            break;
                        }
                    }
                }
            }
            DOLLAR => {
                let digits = sql[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                if digits == 0 {
                    return false;
                }
                i += 1 + digits;
            }
            SEMICOLON => {
                return sql[i + 1..].iter().all(|c| c.is_ascii_whitespace());
            }
            WORD => {
                let start = i;
                while i < sql.len() && BYTE_CLASS[sql[i] as usize] == WORD {
                    i += 1;
                }
                // FOR or INTO, any case: a word byte is alphanumeric or
                // `_`, and `| 0x20` lowercases exactly its letters.
                let lower = |k: usize| sql[start + k] | 0x20;
                let stop = match i - start {
                    3 => [lower(0), lower(1), lower(2)] == *b"for",
                    4 => [lower(0), lower(1), lower(2), lower(3)] == *b"into",
                    _ => false,
                };
                if stop {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ro(sql: &str) -> bool {
        let cat = Catalog::for_tests();
        classify(sql.as_bytes(), &cat).read_only(false)
    }

    fn fast(sql: &str) -> bool {
        fast_select(sql.as_bytes(), &Catalog::for_tests())
    }

    #[test]
    fn reads() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            "select 1",
            "SELECT a, b FROM t WHERE x = $1 AND y <> 'it''s'",
            "select count(*) from t",
            "select * from t join u on t.id = u.id where t.x in (1, 2, 3) order by 1 limit 5",
            "with x as (select 1) select * from x",
            "select * from generate_series(1, 3)",
            "select now(), random(), lower('A')",
            "show work_mem",
            "explain select * from t",
            "explain analyze select 1",
            "values (1), (2)",
            "select 1 union all select 2",
            "begin read only; select 1; commit",
            "begin; set transaction read only; select 1",
            "start transaction isolation level repeatable read, read only",
            "select x::text from t",
            "/* shardgate: replica */ select 1",
        ] {
            assert!(ro(sql), "should be read-only: {sql}");
        }
    }

    #[test]
    fn writes() {
        for sql in [
            "insert into t values (1)",
            "update t set a = 1",
            "delete from t",
            "merge into t using u on t.id = u.id when matched then delete",
            "create table t (a int)",
            "select * from t for update",
            "select * from t for share",
            "select * from (select * from t for update) s",
            "with d as (delete from t returning *) select * from d",
            "with i as (insert into t values (1) returning *) select * from i",
            "select * into t2 from t",
            "select nextval('s')",
            "select setval('s', 1)",
            "select currval('s')",
            "select pg_advisory_lock(1)",
            "select pg_try_advisory_xact_lock(1)",
            "select set_config('a.b', 'c', false)",
            "select pg_notify('c', 'x')",
            "select txid_current()",
            "select my_unknown_function()",
            "select * from my_unknown_srf()",
            "explain analyze insert into t values (1)",
            "explain (analyze) delete from t",
            "explain insert into t values (1)",
            "listen c",
            "notify c",
            "show transaction_read_only",
            "SHOW in_hot_standby",
            "copy t from stdin",
            "lock table t",
            "begin",
            "begin read write",
            "select 1; insert into t values (1)",
            "this is not sql",
            "set work_mem = '1MB'",
            "call p()",
            "do $$ begin perform 1; end $$",
            "prepare p as select 1",
            "execute p",
            "declare c cursor for select 1",
            "vacuum t",
            "select 1 for update",
        ] {
            assert!(!ro(sql), "should go to the primary: {sql}");
        }
    }

    #[test]
    fn plain_begin_follows_the_session_default() {
        let cat = Catalog::for_tests();
        let c = classify(b"BEGIN", &cat);
        assert!(c.plain_begin && !c.write);
        assert!(!c.read_only(false));
        assert!(c.read_only(true));
        assert!(classify(b"commit", &cat).may_commit);
        assert!(!classify(b"rollback", &cat).may_commit);
        assert!(classify(b"insert into t values (1)", &cat).may_commit);
        assert!(!classify(b"select 1", &cat).may_commit);
        assert!(!classify(b"set work_mem = '1MB'", &cat).may_commit);
        assert!(!classify(b"reset all", &cat).may_commit);
        assert!(!classify(b"discard all", &cat).may_commit);
        assert!(classify(b"set work_mem = '1MB'", &cat).write);
    }

    #[test]
    fn keywords_and_transaction_ends() {
        assert_eq!(
            leading_keyword(b"  /* c */ -- x\n INSERT into"),
            Some(&b"INSERT"[..])
        );
        assert_eq!(leading_keyword(b"/* a /* b */ */ select"), None);
        assert_eq!(leading_keyword(b"(select 1)"), None);
        assert_eq!(leading_keyword(b"UPDATE t"), Some(&b"UPDATE"[..]));
        assert_eq!(leading_keyword(b"end;"), Some(&b"end"[..]));
        assert_eq!(leading_keyword(b"a_1"), Some(&b"a_1"[..]));
        assert_eq!(leading_keyword(b""), None);
        assert_eq!(leading_keyword(b"  "), None);
        for b in 0..=255u8 {
            let word = b.is_ascii_alphanumeric() || b == b'_';
            assert_eq!(WORD_BYTE[b as usize], word, "byte {b}");
        }
        assert_eq!(leading_keyword("sélect".as_bytes()), Some(&b"s"[..]));
        assert!(may_end_transaction(b"END;"));
        assert!(may_end_transaction(b"commit"));
        assert!(may_end_transaction(b"update t set a = 1; commit"));
        assert!(!may_end_transaction(b"UPDATE t SET a = 1;"));
        assert!(!may_end_transaction(b"rollback"));
        let cat = Catalog::for_tests();
        assert!(classify(b"END", &cat).may_commit);
        assert!(classify(b"commit prepared 'x'", &cat).may_commit);
    }

    #[test]
    fn single_begin() {
        let cat = Catalog::for_tests();
        for sql in [
            "BEGIN",
            "begin;",
            "START TRANSACTION",
            "begin read only",
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
        ] {
            assert!(classify(sql.as_bytes(), &cat).single_begin, "{sql}");
        }
        for sql in [
            "begin; select 1",
            "begin isolation level serializable",
            "select 1",
            "commit",
        ] {
            assert!(!classify(sql.as_bytes(), &cat).single_begin, "{sql}");
        }
        assert!(classify(b"set transaction read only", &cat).read_only_tx);
        assert!(classify(b"begin read only", &cat).read_only_tx);
        assert!(!classify(b"begin", &cat).read_only_tx);
    }

    #[test]
    fn hints() {
        assert_eq!(hint(b"/* shardgate: primary */ select 1"), Hint::Primary);
        assert_eq!(hint(b"select 1 /*shardgate:Replica*/"), Hint::Replica);
        assert_eq!(
            hint(b"/* other */ select /* shardgate: replica */ 1"),
            Hint::Replica
        );
        assert_eq!(hint(b"select 'shardgate: primary'"), Hint::None);
        assert_eq!(hint(b"/* shardgate: bogus */ select 1"), Hint::None);
        assert_eq!(hint(b"/* unterminated shardgate: primary"), Hint::Primary);
        assert_eq!(hint(b"/* a */ /* b */ /*shardgate:primary"), Hint::Primary);
        assert_eq!(hint(b"/ * shardgate: primary */"), Hint::None);
    }

    #[test]
    fn comment_bodies() {
        let all = |s: &str| {
            block_comments(s.as_bytes())
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("select 1"), Vec::<String>::new());
        assert_eq!(all("/* a */ select /*b*/ 1 /* c"), [" a ", "b", " c"]);
        assert_eq!(all("/**/x/*/ y */"), ["", "/ y "]);
        assert_eq!(all("a / b * c */ d /"), Vec::<String>::new());
        assert_eq!(all("/*"), [""]);
        assert_eq!(shardgate_comment(b" sshardgate: x"), Some(&b" x"[..]));
        assert_eq!(shardgate_comment(b" shardgate x"), None);
    }

    #[test]
    fn fast_path_shapes() {
        assert!(fast(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"
        ));
        assert!(fast("select a from t where b = $1 and c >= 'x' || 'y'"));
        assert!(!fast("select f(1)"));
        assert!(!fast("select a from t for update"));
        assert!(!fast("select a into b from t"));
        assert!(!fast("SELECT a FROM t FOR SHARE"));
        assert!(!fast("select a InTo b from t"));
        assert!(!fast("select a from t fOr no key update"));
        // Words that only start or end like them are plain names.
        assert!(fast("select fort, intox, _for, for_ from t"));
        assert!(fast("select a from t where x = 'for update'"));
        assert!(!fast("select a::int from t"));
        assert!(!fast("select E'\\'' from t"));
        assert!(!fast("select 1; delete from t"));
        assert!(!fast("select 1 -- c"));
        assert!(!fast("select a ~ 'x' from t"));
        assert!(!fast("select 'unterminated"));
        assert!(!fast("selectx 1"));
        // The same texts are still classified (by the parser) correctly.
        assert!(ro("select a::int from t"));
        assert!(!ro("select 1; delete from t"));
    }

    #[test]
    fn quick_scan_edges() {
        assert!(fast("SELECT abalance FROM t WHERE aid = $1;  \n"));
        assert!(!fast("select $1for update"));
        assert!(!fast("select a from t where b = $x"));
        assert!(!fast("select a from t where b = $"));
        assert!(!fast("select a /* c */ from t"));
        assert!(!fast("select a from t;;"));
        assert!(!fast("select a from t for"));
        assert!(!fast("for select"));
        assert!(fast("select a - b / c from t -"));
        assert!(fast("select 1for, a2into from t"));
        assert!(fast("select ;"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// The quick scan answers exactly as the byte-by-byte scanner, on
        /// texts built from the pieces that matter to either.
        #[test]
        fn quick_scan_agrees_with_the_exact_scanner(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    " ", "\t", "a", "F", "for", "FoR", "into", "iNTO", "fo", "int", "_", "1",
                    "$", "$1", "-", "--", "/", "/*", "*", ";", "'", "''", "E", "&", ",", ".",
                    "=", "(", "::", "\u{e9}", "\n",
                ]),
                0..10,
            )
        ) {
            let rest = format!(" {}", pieces.concat());
            if let Some(quick) = quick_scan(rest.as_bytes()) {
                proptest::prop_assert_eq!(quick, scan_select(rest.as_bytes()), "{:?}", rest);
            }
        }
    }

    #[test]
    fn unknown_catalog_sends_everything_with_functions_to_the_primary() {
        let cat = Catalog::unloaded();
        assert!(!classify(b"select lower('a')", &cat).read_only(false));
        assert!(!classify(b"select a from t where b = 1", &cat).read_only(false));
    }
}
