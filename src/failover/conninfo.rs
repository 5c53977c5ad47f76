//! libpq connection strings (`host=127.0.0.1 port=5432 user=rep
//! passfile='/x y'`), as replicas keep them in `primary_conninfo`.
//!
//! Repointing a replica changes its host and port and must keep every other
//! key exactly (passfile, sslmode, application_name, ...). Written by hand:
//! tokio-postgres parses this format but only into the keys it knows and
//! cannot write it back.

/// The key/value pairs of `s`, in order; None when it is not a valid
/// keyword/value connection string.
pub fn parse(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Formats pairs as a connection string (every value quoted).
pub fn format(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = v.replace('\\', "\\\\").replace('\'', "\\'");
            format!("{k}='{v}'")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `conninfo` pointed at `addr` (`host:port`), other keys kept. `hostaddr`
/// is dropped: it would override the new host.
pub fn repoint(conninfo: &str, addr: &str) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let mut pairs: Vec<_> = parse(conninfo)?
        .into_iter()
        .filter(|(k, _)| k != "host" && k != "port" && k != "hostaddr")
        .collect();
    pairs.insert(0, ("port".into(), port.into()));
    pairs.insert(0, ("host".into(), host.into()));
    Some(format(&pairs))
}

/// The value of `key`.
pub fn get(conninfo: &str, key: &str) -> Option<String> {
    parse(conninfo)?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_pg_basebackup_writes() {
        let s = "user=postgres passfile='/var/lib/postgresql/.pgpass' channel_binding=prefer \
                 host=127.0.0.1 port=5433 sslmode=prefer application_name='a b\\'c'";
        let p = parse(s).unwrap();
        assert_eq!(
            p[1],
            ("passfile".into(), "/var/lib/postgresql/.pgpass".into())
        );
        assert_eq!(get(s, "application_name").as_deref(), Some("a b'c"));
        let moved = repoint(s, "127.0.0.1:6000").unwrap();
        assert_eq!(get(&moved, "host").as_deref(), Some("127.0.0.1"));
        assert_eq!(get(&moved, "port").as_deref(), Some("6000"));
        assert_eq!(get(&moved, "application_name").as_deref(), Some("a b'c"));
        assert_eq!(parse(&moved).unwrap().len(), p.len());
        assert_eq!(parse(" host = x  port=1 ").unwrap().len(), 2);
        assert!(parse("host").is_none());
        assert!(parse("host='x").is_none());
        assert_eq!(parse("").unwrap(), vec![]);
    }
}
