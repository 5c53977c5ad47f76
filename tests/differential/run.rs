//! Running one query, in the simple or the extended protocol, and
//! reading its answer as text: column names, which columns are floats,
//! rows (None = NULL) — or the error's SQLSTATE and message.

use super::corpus::Param;
use std::fmt::Write as _;
use std::time::Duration;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// One query's result: column names, which columns are floats, rows as
/// text (None = NULL) — or the error.
#[derive(Debug, Clone)]
pub enum Outcome {
    Rows {
        columns: Vec<String>,
        floats: Vec<bool>,
        rows: Vec<Vec<Option<String>>>,
    },
    Error {
        code: String,
        message: String,
    },
}

fn error_outcome(e: &tokio_postgres::Error) -> Outcome {
    Outcome::Error {
        code: e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| format!("no code: {e}")),
        message: e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string()),
    }
}

/// Simple protocol: every value arrives as text. Which columns are floats
/// is not in the simple protocol's row description; the caller supplies
/// it (from the oracle's extended run of the same query).
pub async fn run_simple(c: &Client, sql: &str) -> Outcome {
    let messages = match tokio::time::timeout(QUERY_TIMEOUT, c.simple_query(sql)).await {
        Err(_) => return timed_out(),
        Ok(Err(e)) => return error_outcome(&e),
        Ok(Ok(m)) => m,
    };
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
            _ => {}
        }
    }
    Outcome::Rows {
        floats: vec![false; columns.len()],
        columns,
        rows,
    }
}

/// Extended protocol (Parse/Describe, then Bind/Execute; tokio-postgres
/// asks for binary results). Values are decoded to text for the types the
/// corpus reads often and kept as hex otherwise — both sides decode alike,
/// so equal bytes give equal text.
pub async fn run_extended(c: &Client, sql: &str, params: &[Param]) -> Outcome {
    let run = async {
        let stmt = c.prepare(sql).await?;
        let boxed: Vec<Box<dyn ToSql + Sync + Send>> = params
            .iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    Param::Int8(v) => Box::new(*v),
                    Param::Int4(v) => Box::new(*v),
                    Param::Text(v) => Box::new(v.clone()),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = boxed
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = c.query(&stmt, &refs).await?;
        Ok::<_, tokio_postgres::Error>((stmt, rows))
    };
    let (stmt, rows) = match tokio::time::timeout(QUERY_TIMEOUT, run).await {
        Err(_) => return timed_out(),
        Ok(Err(e)) => return error_outcome(&e),
        Ok(Ok(r)) => r,
    };
    let columns = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
    let floats = stmt
        .columns()
        .iter()
        .map(|c| matches!(*c.type_(), Type::FLOAT4 | Type::FLOAT8))
        .collect();
    let rows = rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, AsText>(i).0)
                .collect::<Vec<_>>()
        })
        .collect();
    Outcome::Rows {
        columns,
        floats,
        rows,
    }
}

fn timed_out() -> Outcome {
    Outcome::Error {
        code: "timeout".into(),
        message: format!("no answer within {QUERY_TIMEOUT:?}"),
    }
}

/// Any binary result value, as text.
struct AsText(Option<String>);

impl<'a> FromSql<'a> for AsText {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<AsText, Box<dyn std::error::Error + Sync + Send>> {
        let be = |n: usize| -> Result<[u8; 8], Box<dyn std::error::Error + Sync + Send>> {
            let mut b = [0u8; 8];
            if raw.len() != n {
                return Err(format!("{ty}: {} bytes", raw.len()).into());
            }
            b[8 - n..].copy_from_slice(raw);
            Ok(b)
        };
        let text = match *ty {
            Type::BOOL => (if raw.first() == Some(&1) { "t" } else { "f" }).to_owned(),
            Type::INT2 => (i64::from_be_bytes(be(2)?) as i16).to_string(),
            Type::INT4 => (i64::from_be_bytes(be(4)?) as i32).to_string(),
            Type::INT8 => i64::from_be_bytes(be(8)?).to_string(),
            Type::FLOAT4 => f32::from_be_bytes(raw.try_into()?).to_string(),
            Type::FLOAT8 => f64::from_be_bytes(raw.try_into()?).to_string(),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                String::from_utf8(raw.to_vec())?
            }
            Type::NUMERIC => numeric_text(raw).ok_or("malformed numeric")?,
            _ => {
                let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                format!("\\x{hex}")
            }
        };
        Ok(AsText(Some(text)))
    }

    fn from_sql_null(_: &Type) -> Result<AsText, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AsText(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A binary numeric (base-10000 digits, weight, sign, display scale) as
/// Postgres writes it in text.
fn numeric_text(raw: &[u8]) -> Option<String> {
    let word =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*raw.get(i)?, *raw.get(i + 1)?])) };
    let ndigits = word(0)? as usize;
    let weight = word(2)? as i16 as i32;
    let sign = word(4)?;
    let dscale = word(6)? as usize;
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => {}
    }
    let digit = |i: i32| -> u16 {
        if i >= 0 && (i as usize) < ndigits {
            word(8 + 2 * i as usize).unwrap_or(0)
        } else {
            0
        }
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                write!(s, "{}", digit(0)).ok()?;
            } else {
                write!(s, "{:04}", digit(i)).ok()?;
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut i = weight + 1;
        while frac.len() < dscale {
            write!(frac, "{:04}", digit(i)).ok()?;
            i += 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}
