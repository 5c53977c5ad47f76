//! Lexical helpers over SQL text that do not need a parser: splitting a
//! multi-statement string and reading leading keywords, aware of quotes,
//! dollar quotes and comments. Used off the hot path (only when a server
//! reports a session-changing command) and by the router.

/// Byte offset just past the quoted/commented region starting at `i`, or
/// `None` if `bytes[i]` does not start one.
fn skip_special(bytes: &[u8], i: usize) -> Option<usize> {
    let b = bytes[i];
    let next = bytes.get(i + 1).copied();
    match b {
        b'\'' | b'"' => {
            // E'...' strings honour backslash escapes.
            let escapes = b == b'\''
                && i > 0
                && (bytes[i - 1] == b'E' || bytes[i - 1] == b'e')
                && (i < 2 || !bytes[i - 2].is_ascii_alphanumeric());
            let mut j = i + 1;
            while j < bytes.len() {
                if escapes && bytes[j] == b'\\' {
                    j += 2;
                    continue;
                }
                if bytes[j] == b {
                    if bytes.get(j + 1) == Some(&b) {
                        j += 2;
                        continue;
                    }
                    return Some(j + 1);
                }
                j += 1;
            }
            Some(bytes.len())
        }
        b'-' if next == Some(b'-') => Some(
            bytes[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(bytes.len(), |p| i + p + 1),
        ),
        b'/' if next == Some(b'*') => {
            let mut depth = 0usize;
            let mut j = i;
            while j + 1 < bytes.len() {
                if bytes[j] == b'/' && bytes[j + 1] == b'*' {
                    depth += 1;
                    j += 2;
                } else if bytes[j] == b'*' && bytes[j + 1] == b'/' {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        return Some(j);
                    }
                } else {
                    j += 1;
                }
            }
            Some(bytes.len())
        }
        b'$' if i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') => {
            let close = bytes[i + 1..].iter().position(|&c| c == b'$')? + i + 1;
            let tag = &bytes[i..=close];
            if !tag[1..tag.len() - 1]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'_')
                || tag.get(1).is_some_and(|c| c.is_ascii_digit())
            {
                return None;
            }
            let body = &bytes[close + 1..];
            Some(
                body.windows(tag.len())
                    .position(|w| w == tag)
                    .map_or(bytes.len(), |p| close + 1 + p + tag.len()),
            )
        }
        _ => None,
    }
}

/// Splits on top-level semicolons; empty statements are dropped.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(end) = skip_special(bytes, i) {
            i = end;
            continue;
        }
        if bytes[i] == b';' {
            push_nonempty(&mut out, &sql[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    push_nonempty(&mut out, &sql[start..]);
    out
}

fn push_nonempty<'a>(out: &mut Vec<&'a str>, stmt: &'a str) {
    if !strip_leading(stmt).is_empty() {
        out.push(stmt.trim());
    }
}

/// The text with leading whitespace and comments removed.
pub fn strip_leading(sql: &str) -> &str {
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            i += 1;
        } else if (bytes[i] == b'-' && bytes.get(i + 1) == Some(&b'-'))
            || (bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*'))
        {
            i = skip_special(bytes, i).unwrap_or(bytes.len());
        } else {
            break;
        }
    }
    &sql[i..]
}

/// The first `n` words (runs of letters, digits and `_`), upper-cased,
/// skipping leading comments. Stops early at anything else.
pub fn leading_keywords(sql: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let mut rest = strip_leading(sql);
    while out.len() < n {
        let len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        if len == 0 {
            break;
        }
        out.push(rest[..len].to_ascii_uppercase());
        rest = strip_leading(&rest[len..]);
    }
    out
}

/// True if `sql` starts with SET or RESET (any form): cheap pre-check.
pub fn starts_with_set_or_reset(sql: &str) -> bool {
    let s = strip_leading(sql).as_bytes();
    let word = |w: &[u8]| {
        s.len() >= w.len()
            && s[..w.len()].eq_ignore_ascii_case(w)
            && s.get(w.len())
                .is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'_')
    };
    word(b"SET") || word(b"RESET")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_respecting_quotes_and_comments() {
        let sql = "select 'a;b'; select \"x;\" ; -- c;\n select $$;$$; select $t$ ; $t$;/* ; /* ; */ */ select E'\\';'";
        assert_eq!(
            split_statements(sql),
            vec![
                "select 'a;b'",
                "select \"x;\"",
                "-- c;\n select $$;$$",
                "select $t$ ; $t$",
                "/* ; /* ; */ */ select E'\\';'"
            ]
        );
        assert!(split_statements(" ; ;").is_empty());
        assert_eq!(split_statements("select $1; select 2").len(), 2);
    }

    #[test]
    fn keywords() {
        assert_eq!(
            leading_keywords("/* x */ set local work_mem = 1", 3),
            vec!["SET", "LOCAL", "WORK_MEM"]
        );
        assert!(starts_with_set_or_reset("  -- hi\nRESET all"));
        assert!(!starts_with_set_or_reset("settle"));
        assert!(!starts_with_set_or_reset("select 1"));
    }
}
