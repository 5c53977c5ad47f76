//! COPY FROM STDIN into a sharded table: which rows go to which shard.
//!
//! The client's CopyData stream is cut into rows (text, CSV or binary, as
//! the COPY options say), each row's sharding key is read from its field
//! and the row goes to its shard's COPY unchanged. Lines every shard needs
//! (a CSV header, the binary file header and trailer) go to every shard.
//! A reference table gets every row on every shard. No I/O here.

use crate::sharding::hash::{KeyType, KeyValue};
use crate::sharding::map::{ShardMap, TableRule};
use sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFormat {
    Text {
        delimiter: u8,
        null: Vec<u8>,
    },
    Csv {
        delimiter: u8,
        quote: u8,
        escape: u8,
        null: Vec<u8>,
        header: bool,
    },
    Binary,
}

/// A COPY FROM STDIN into a table shardgate places.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    pub table: String,
    /// The table as the statement names it (for catalog lookups).
    pub table_sql: String,
    /// Sharded: the key column and its type; None for a reference table.
    pub key: Option<(String, KeyType)>,
    /// The column list of the statement (empty: the table's columns).
    pub columns: Vec<String>,
    pub format: CopyFormat,
}

/// The plan for `sql` when it is a COPY FROM STDIN into a sharded or
/// reference table (None otherwise); Err names what is not supported.
pub fn plan_copy(map: &ShardMap, sql: &str) -> Option<Result<CopyPlan, String>> {
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let [Statement::Copy {
        source,
        to,
        target,
        options,
        legacy_options,
        ..
    }] = stmts.as_slice()
    else {
        return None;
    };
    let CopySource::Table {
        table_name,
        columns,
    } = source
    else {
        return None;
    };
    let fold = |i: &sqlparser::ast::Ident| {
        if i.quote_style.is_some() {
            i.value.clone()
        } else {
            i.value.to_lowercase()
        }
    };
    let parts: Vec<String> = table_name
        .0
        .iter()
        .map(|p| p.as_ident().map_or_else(|| p.to_string(), fold))
        .collect();
    let (schema, table) = match parts.as_slice() {
        [t] => (None, t.clone()),
        [.., s, t] => (Some(s.clone()), t.clone()),
        [] => return None,
    };
    let key = match map.table(schema.as_deref(), &table)? {
        TableRule::Sharded { column, key_type } => Some((column.clone(), *key_type)),
        TableRule::Reference => None,
    };
    Some((|| {
        if *to {
            return Err(format!("COPY {table} TO across shards"));
        }
        if !matches!(target, CopyTarget::Stdin) {
            return Err(format!("COPY {table} FROM a file or program across shards"));
        }
        let format = copy_format(options, legacy_options)?;
        Ok(CopyPlan {
            table: table.clone(),
            table_sql: table_name.to_string(),
            key,
            columns: columns.iter().map(fold).collect(),
            format,
        })
    })())
}

fn copy_format(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Result<CopyFormat, String> {
    let mut kind = "text".to_string();
    let mut delimiter = None;
    let mut null = None;
    let mut header = false;
    let mut quote = b'"';
    let mut escape = None;
    for o in options {
        match o {
            CopyOption::Format(f) => kind = f.value.to_lowercase(),
            CopyOption::Delimiter(c) if c.is_ascii() => delimiter = Some(*c as u8),
            CopyOption::Null(s) => null = Some(s.as_bytes().to_vec()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) if c.is_ascii() => quote = *c as u8,
            CopyOption::Escape(c) if c.is_ascii() => escape = Some(*c as u8),
            CopyOption::Freeze(_)
            | CopyOption::ForceNotNull(_)
            | CopyOption::ForceNull(_)
            | CopyOption::ForceQuote(_) => {}
            other => return Err(format!("the COPY option {other} across shards")),
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Binary => kind = "binary".into(),
            CopyLegacyOption::Delimiter(c) if c.is_ascii() => delimiter = Some(*c as u8),
            CopyLegacyOption::Null(s) => null = Some(s.as_bytes().to_vec()),
            CopyLegacyOption::Csv(csv) => {
                kind = "csv".into();
                for c in csv {
                    match c {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(q) if q.is_ascii() => quote = *q as u8,
                        CopyLegacyCsvOption::Escape(e) if e.is_ascii() => escape = Some(*e as u8),
                        CopyLegacyCsvOption::ForceNotNull(_)
                        | CopyLegacyCsvOption::ForceQuote(_) => {}
                        other => return Err(format!("the COPY option {other} across shards")),
                    }
                }
            }
            other => return Err(format!("the COPY option {other} across shards")),
        }
    }
    match kind.as_str() {
        "text" => Ok(CopyFormat::Text {
            delimiter: delimiter.unwrap_or(b'\t'),
            null: null.unwrap_or_else(|| b"\\N".to_vec()),
        }),
        "csv" => Ok(CopyFormat::Csv {
            delimiter: delimiter.unwrap_or(b','),
            quote,
            escape: escape.unwrap_or(quote),
            null: null.unwrap_or_default(),
            header,
        }),
        "binary" => Ok(CopyFormat::Binary),
        other => Err(format!("COPY format {other}")),
    }
}

/// Where a piece of the stream goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// To every shard (a header, the binary trailer, a reference row).
    All(&'a [u8]),
    /// A row for the key's shard.
    Row(&'a [u8], Option<KeyValue>),
}

/// Cuts a COPY stream into rows and reads their keys.
pub struct RowSplitter {
    format: CopyFormat,
    /// The key's field number in a row, and its type (None: reference).
    key: Option<(usize, KeyType)>,
    buf: Vec<u8>,
    /// The CSV header line or the binary file header is still to come.
    header: bool,
    done: bool,
}

/// The binary COPY signature.
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl RowSplitter {
    pub fn new(format: CopyFormat, key: Option<(usize, KeyType)>) -> RowSplitter {
        let header = matches!(
            format,
            CopyFormat::Csv { header: true, .. } | CopyFormat::Binary
        );
        RowSplitter {
            format,
            key,
            buf: Vec::new(),
            header,
            done: false,
        }
    }

    /// Adds client data and hands out every complete piece.
    pub fn push(&mut self, data: &[u8], out: &mut dyn FnMut(Piece)) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        let used = self.cut(false, out)?;
        self.buf.drain(..used);
        Ok(())
    }

    /// The stream ended: the rest is one last row (text and CSV may end
    /// without a newline).
    pub fn finish(&mut self, out: &mut dyn FnMut(Piece)) -> Result<(), String> {
        let used = self.cut(true, out)?;
        self.buf.drain(..used);
        if !self.buf.is_empty() && !self.done {
            return Err("COPY data ended in the middle of a row".into());
        }
        Ok(())
    }

    fn cut(&mut self, end: bool, out: &mut dyn FnMut(Piece)) -> Result<usize, String> {
        let mut at = 0;
        loop {
            if self.done {
                return Ok(self.buf.len());
            }
            let rest = &self.buf[at..];
            if rest.is_empty() {
                return Ok(at);
            }
            let n = match &self.format {
                CopyFormat::Binary => {
                    if self.header {
                        let Some(n) = binary_header_len(rest)? else {
                            return Ok(at);
                        };
                        out(Piece::All(&rest[..n]));
                        self.header = false;
                        n
                    } else {
                        let Some((n, fields)) = binary_tuple(rest)? else {
                            return Ok(at);
                        };
                        match fields {
                            None => {
                                out(Piece::All(&rest[..n]));
                                self.done = true;
                            }
                            Some(fields) => self.emit_row(&rest[..n], &fields, out)?,
                        }
                        n
                    }
                }
                CopyFormat::Text { .. } | CopyFormat::Csv { .. } => {
                    let Some(n) = self.line_len(rest, end) else {
                        return Ok(at);
                    };
                    let line = &rest[..n];
                    let content = trim_newline(line);
                    if matches!(self.format, CopyFormat::Text { .. }) && content == b"\\." {
                        // End-of-data marker: nothing after it counts.
                        self.done = true;
                        return Ok(self.buf.len());
                    }
                    if self.header {
                        out(Piece::All(line));
                        self.header = false;
                    } else {
                        let fields = self.text_fields(content)?;
                        self.emit_row(line, &fields, out)?;
                    }
                    n
                }
            };
            at += n;
        }
    }

    fn emit_row(
        &self,
        row: &[u8],
        fields: &[Option<Vec<u8>>],
        out: &mut dyn FnMut(Piece),
    ) -> Result<(), String> {
        let Some((pos, ty)) = self.key else {
            out(Piece::All(row));
            return Ok(());
        };
        let field = fields.get(pos).ok_or_else(|| {
            format!(
                "a COPY row has {} fields; the sharding key is field {}",
                fields.len(),
                pos + 1
            )
        })?;
        let key = match field {
            None => None,
            Some(v) => Some(
                match self.format {
                    CopyFormat::Binary => ty.parse_binary(v),
                    _ => ty.parse_text(&String::from_utf8_lossy(v)),
                }
                .map_err(|e| format!("sharding key in COPY data: {e}"))?,
            ),
        };
        out(Piece::Row(row, key));
        Ok(())
    }

    /// Length of the next line including its newline; at the end of the
    /// stream, the rest.
    fn line_len(&self, rest: &[u8], end: bool) -> Option<usize> {
        let mut i = 0;
        let mut in_quotes = false;
        while i < rest.len() {
            let c = rest[i];
            match &self.format {
                CopyFormat::Text { .. } => {
                    if c == b'\\' {
                        i += 2;
                        continue;
                    }
                }
                CopyFormat::Csv { quote, escape, .. } => {
                    if in_quotes && c == *escape && escape != quote && i + 1 < rest.len() {
                        i += 2;
                        continue;
                    }
                    if c == *quote {
                        if in_quotes && escape == quote && rest.get(i + 1) == Some(quote) {
                            i += 2;
                            continue;
                        }
                        in_quotes = !in_quotes;
                    }
                }
                CopyFormat::Binary => {}
            }
            if c == b'\n' && !in_quotes {
                return Some(i + 1);
            }
            i += 1;
        }
        (end && !rest.is_empty()).then_some(rest.len())
    }

    /// The fields of a text or CSV line (None: NULL), decoded.
    fn text_fields(&self, line: &[u8]) -> Result<Vec<Option<Vec<u8>>>, String> {
        let mut fields = Vec::new();
        match &self.format {
            CopyFormat::Text { delimiter, null } => {
                let mut raw = Vec::new();
                let mut i = 0;
                let finish = |raw: &mut Vec<u8>, fields: &mut Vec<Option<Vec<u8>>>| {
                    let f = std::mem::take(raw);
                    fields.push(if f == *null {
                        None
                    } else {
                        Some(unescape_text(&f))
                    });
                };
                while i < line.len() {
                    let c = line[i];
                    if c == b'\\' && i + 1 < line.len() {
                        raw.extend_from_slice(&line[i..i + 2]);
                        i += 2;
                        continue;
                    }
                    if c == *delimiter {
                        finish(&mut raw, &mut fields);
                    } else {
                        raw.push(c);
                    }
                    i += 1;
                }
                finish(&mut raw, &mut fields);
            }
            CopyFormat::Csv {
                delimiter,
                quote,
                escape,
                null,
                ..
            } => {
                let mut value = Vec::new();
                let mut quoted_any = false;
                let mut in_quotes = false;
                let mut i = 0;
                let push =
                    |value: &mut Vec<u8>, quoted: bool, fields: &mut Vec<Option<Vec<u8>>>| {
                        let v = std::mem::take(value);
                        fields.push(if !quoted && v == *null { None } else { Some(v) });
                    };
                while i < line.len() {
                    let c = line[i];
                    if in_quotes {
                        // "" (or the escape character before a quote or
                        // itself) stands for the character.
                        if c == *escape && line.get(i + 1) == Some(quote) {
                            value.push(*quote);
                            i += 2;
                            continue;
                        }
                        if c == *escape && escape != quote && line.get(i + 1) == Some(escape) {
                            value.push(*escape);
                            i += 2;
                            continue;
                        }
                        if c == *quote {
                            in_quotes = false;
                        } else {
                            value.push(c);
                        }
                    } else if c == *quote {
                        in_quotes = true;
                        quoted_any = true;
                    } else if c == *delimiter {
                        push(&mut value, quoted_any, &mut fields);
                        quoted_any = false;
                    } else {
                        value.push(c);
                    }
                    i += 1;
                }
                if in_quotes {
                    return Err("unterminated CSV quoted field".into());
                }
                push(&mut value, quoted_any, &mut fields);
            }
            CopyFormat::Binary => {}
        }
        Ok(fields)
    }
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// COPY text escapes: `\b \f \n \r \t \v`, octal `\NNN`, hex `\xHH`, and
/// a backslash before any other character stands for that character.
fn unescape_text(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'\\' || i + 1 >= f.len() {
            out.push(f[i]);
            i += 1;
            continue;
        }
        let c = f[i + 1];
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (c - b'0') as u32;
                let mut k = 0;
                while k < 2 && i < f.len() && (b'0'..=b'7').contains(&f[i]) {
                    v = v * 8 + (f[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            b'x' if i < f.len() && f[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 && i < f.len() && f[i].is_ascii_hexdigit() {
                    v = v * 16 + (f[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    out
}

/// Length of the binary file header, once it is all here.
fn binary_header_len(b: &[u8]) -> Result<Option<usize>, String> {
    if b.len() < 19 {
        return Ok(None);
    }
    if &b[..11] != BINARY_SIGNATURE {
        return Err("COPY BINARY data without the PGCOPY signature".into());
    }
    let ext = u32::from_be_bytes([b[15], b[16], b[17], b[18]]) as usize;
    Ok((b.len() >= 19 + ext).then_some(19 + ext))
}

/// One binary tuple once it is all here: its length and fields (None
/// fields: the -1 trailer).
#[allow(clippy::type_complexity)]
fn binary_tuple(b: &[u8]) -> Result<Option<(usize, Option<Vec<Option<Vec<u8>>>>)>, String> {
    if b.len() < 2 {
        return Ok(None);
    }
    let n = i16::from_be_bytes([b[0], b[1]]);
    if n == -1 {
        return Ok(Some((2, None)));
    }
    if n < 0 {
        return Err("malformed COPY BINARY tuple".into());
    }
    let mut at = 2;
    let mut fields = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let Some(len) = b.get(at..at + 4) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        if len < 0 {
            fields.push(None);
            continue;
        }
        let Some(v) = b.get(at..at + len as usize) else {
            return Ok(None);
        };
        fields.push(Some(v.to_vec()));
        at += len as usize;
    }
    Ok(Some((at, Some(fields))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(format: CopyFormat, key: Option<(usize, KeyType)>, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = RowSplitter::new(format, key);
        let mut out = Vec::new();
        let mut f = |p: Piece| {
            out.push(match p {
                Piece::All(b) => format!("all:{}", String::from_utf8_lossy(b).escape_debug()),
                Piece::Row(b, k) => format!(
                    "row:{}:{}",
                    String::from_utf8_lossy(b).escape_debug(),
                    k.map_or("NULL".into(), |k| k.to_string())
                ),
            })
        };
        for c in chunks {
            s.push(c, &mut f).unwrap();
        }
        s.finish(&mut f).unwrap();
        out
    }

    #[test]
    fn text_rows_cut_anywhere() {
        let text = CopyFormat::Text {
            delimiter: b'\t',
            null: b"\\N".to_vec(),
        };
        let rows = split(
            text.clone(),
            Some((1, KeyType::Int8)),
            &[b"a\\tb\t4", b"2\nx\t\\N\n", b"y\t7"],
        );
        assert_eq!(
            rows,
            vec![
                "row:a\\\\tb\\t42\\n:42",
                "row:x\\t\\\\N\\n:NULL",
                "row:y\\t7:7"
            ]
        );
        let rows = split(text, Some((0, KeyType::Text)), &[b"a\\\\b\t1\n\\.\n"]);
        assert_eq!(rows, vec!["row:a\\\\\\\\b\\t1\\n:a\\b"]);
    }

    #[test]
    fn csv_quotes_span_lines_and_headers_go_everywhere() {
        let csv = CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
            header: true,
        };
        let rows = split(
            csv,
            Some((1, KeyType::Text)),
            &[b"id,name\n1,\"multi\nline \"\"q\"\"\"\n2,", b"\n3,\"\"\n"],
        );
        assert_eq!(
            rows,
            vec![
                "all:id,name\\n",
                "row:1,\\\"multi\\nline \\\"\\\"q\\\"\\\"\\\"\\n:multi\nline \"q\"",
                "row:2,\\n:NULL",
                "row:3,\\\"\\\"\\n:",
            ]
        );
    }

    #[test]
    fn binary_tuples_and_trailer() {
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        for k in [5i64, 6] {
            data.extend_from_slice(&1i16.to_be_bytes());
            data.extend_from_slice(&8i32.to_be_bytes());
            data.extend_from_slice(&k.to_be_bytes());
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let chunks: Vec<&[u8]> = data.chunks(5).collect();
        let mut s = RowSplitter::new(CopyFormat::Binary, Some((0, KeyType::Int8)));
        let mut keys = Vec::new();
        let mut all = 0;
        for c in &chunks {
            s.push(c, &mut |p| match p {
                Piece::All(_) => all += 1,
                Piece::Row(_, k) => keys.push(k),
            })
            .unwrap();
        }
        assert_eq!(keys, vec![Some(KeyValue::Int(5)), Some(KeyValue::Int(6))]);
        assert_eq!(all, 2, "header and trailer");
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape_text(b"a\\tb\\101\\x41\\\\"), b"a\tbAA\\");
    }
}
