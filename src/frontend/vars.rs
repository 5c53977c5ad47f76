//! Session state a client set that must follow it from one server
//! connection to the next in transaction pooling, and must never reach
//! another client.
//!
//! How: the client's state is its startup parameters (those that differ from
//! the pool's defaults) plus the session-level SET/RESET statements it ran,
//! learned from the server's own CommandComplete tags ("SET", "RESET",
//! "DISCARD ALL"). The state has a fingerprint; every server connection
//! records the fingerprint of the state applied to it (0: as connected).
//! At checkout, when the two differ, the proxy runs
//! `SET SESSION AUTHORIZATION DEFAULT; RESET ALL; <client's SETs>` first.
//! A client with no state pays nothing; a connection another client dirtied
//! is cleaned before anyone else sees it.

use crate::sql;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// One session-level change, committed when its transaction commits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Set(String),
    ResetAll,
}

#[derive(Debug, Default)]
pub struct SessionVars {
    /// (name, value) from the startup packet that differ from the pool.
    startup: Vec<(String, String)>,
    /// Session SET statements, one per setting (the latest wins).
    sets: Vec<(String, String)>,
    /// Changes made inside the current transaction.
    pending: Vec<Change>,
    fingerprint: u64,
}

impl SessionVars {
    pub fn new(startup: Vec<(String, String)>) -> SessionVars {
        let mut v = SessionVars {
            startup,
            ..SessionVars::default()
        };
        v.refresh_fingerprint();
        v
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    fn refresh_fingerprint(&mut self) {
        self.fingerprint = if self.startup.is_empty() && self.sets.is_empty() {
            0
        } else {
            let mut h = DefaultHasher::new();
            self.startup.hash(&mut h);
            self.sets.hash(&mut h);
            // Never collide with the pristine state.
            h.finish() | 1
        };
    }

    /// SQL that turns any server connection into this client's state.
    pub fn apply_sql(&self) -> String {
        let mut sql = String::from("SET SESSION AUTHORIZATION DEFAULT; RESET ALL;");
        for (name, value) in &self.startup {
            sql.push_str(&format!(
                " SET {} TO {};",
                quote_name(name),
                quote_literal(value)
            ));
        }
        for (_, stmt) in &self.sets {
            sql.push(' ');
            sql.push_str(stmt);
            sql.push(';');
        }
        sql
    }

    /// A session-changing command completed (its CommandComplete tag was
    /// SET, RESET or DISCARD ALL); `statement` is its text when known.
    pub fn note_command(&mut self, tag: &[u8], statement: Option<&str>) {
        match tag {
            b"DISCARD ALL" => self.pending.push(Change::ResetAll),
            b"SET" | b"RESET" => {
                let Some(stmt) = statement else { return };
                let words = sql::leading_keywords(stmt, 3);
                let word = |i: usize| words.get(i).map(String::as_str);
                match (word(0), word(1)) {
                    // Transaction-scoped: gone at commit or rollback.
                    (Some("SET"), Some("LOCAL")) | (Some("SET"), Some("TRANSACTION")) => {}
                    (Some("RESET"), Some("ALL")) => self.pending.push(Change::ResetAll),
                    _ => self.pending.push(Change::Set(stmt.trim().to_owned())),
                }
            }
            _ => {}
        }
    }

    /// Called at ReadyForQuery. `status` is its transaction status;
    /// `rolled_back` tells whether the transaction that just ended was
    /// rolled back (explicit ROLLBACK or an error in an implicit one).
    /// Returns true when the committed state changed.
    pub fn end_of_request(&mut self, status: u8, rolled_back: bool) -> bool {
        if status != b'I' || self.pending.is_empty() {
            return false;
        }
        let changes = std::mem::take(&mut self.pending);
        if rolled_back {
            return false;
        }
        for c in changes {
            match c {
                Change::ResetAll => {
                    // RESET ALL returns to the session defaults, which for a
                    // real Postgres session include the startup values.
                    self.sets.clear();
                }
                Change::Set(stmt) => self.record(stmt),
            }
        }
        self.refresh_fingerprint();
        true
    }

    fn record(&mut self, stmt: String) {
        let words = sql::leading_keywords(&stmt, 4);
        let (is_reset, name) = match words.first().map(String::as_str) {
            Some("RESET") => (true, words[1..].join(" ")),
            _ => {
                // SET [SESSION] name ... : the setting's name keys the entry.
                let rest: Vec<&String> = words[1..]
                    .iter()
                    .skip_while(|w| w.as_str() == "SESSION")
                    .take_while(|w| w.as_str() != "TO")
                    .collect();
                (
                    false,
                    rest.first().map(|s| s.to_string()).unwrap_or_default(),
                )
            }
        };
        self.sets.retain(|(n, _)| *n != name);
        if is_reset {
            // Back to the startup value if there was one, as Postgres does.
            if let Some((n, v)) = self
                .startup
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(&name))
            {
                let stmt = format!("SET {} TO {}", quote_name(n), quote_literal(v));
                self.sets.push((name, stmt));
            }
        } else {
            self.sets.push((name, stmt));
        }
    }
}

fn quote_name(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

fn quote_literal(v: &str) -> String {
    if v.contains('\\') {
        format!("E'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", v.replace('\'', "''"))
    }
}

/// Startup parameters that are not settings.
pub fn is_setting(name: &str) -> bool {
    !matches!(name, "user" | "database" | "options" | "replication")
}

/// Settings from the `options` startup parameter (`-c name=value` and
/// `--name=value`, backslash-escaped spaces).
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let kv = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("-c").map(str::to_owned)
        };
        if let Some((k, v)) = kv.as_deref().and_then(|kv| kv.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_state_is_pristine() {
        let v = SessionVars::new(vec![]);
        assert_eq!(v.fingerprint(), 0);
    }

    #[test]
    fn set_commits_and_rollback_discards() {
        let mut v = SessionVars::new(vec![]);
        v.note_command(b"SET", Some("SET statement_timeout = 5000"));
        assert!(v.end_of_request(b'I', false));
        assert_ne!(v.fingerprint(), 0);
        assert!(v.apply_sql().ends_with("SET statement_timeout = 5000;"));
        let fp = v.fingerprint();
        v.note_command(b"SET", Some("set search_path to x"));
        assert!(!v.end_of_request(b'T', false));
        assert!(!v.end_of_request(b'I', true));
        assert_eq!(v.fingerprint(), fp);
        v.note_command(b"SET", Some("SET LOCAL work_mem = '1MB'"));
        assert!(!v.end_of_request(b'I', false));
        v.note_command(b"RESET", Some("RESET ALL"));
        v.end_of_request(b'I', false);
        assert_eq!(v.fingerprint(), 0);
    }

    #[test]
    fn later_set_replaces_earlier() {
        let mut v = SessionVars::new(vec![("application_name".into(), "psql".into())]);
        for i in 0..100 {
            v.note_command(b"SET", Some(&format!("SET work_mem = '{i}MB'")));
            v.end_of_request(b'I', false);
        }
        assert_eq!(v.sets.len(), 1);
        v.note_command(b"RESET", Some("reset application_name"));
        v.end_of_request(b'I', false);
        assert!(v.apply_sql().contains("SET \"application_name\" TO 'psql'"));
    }

    #[test]
    fn options_parsing() {
        assert_eq!(
            parse_options("-c geqo=off --statement-timeout=5s -csearch_path=a\\ b"),
            vec![
                ("geqo".into(), "off".into()),
                ("statement_timeout".into(), "5s".into()),
                ("search_path".into(), "a b".into())
            ]
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_name("my.x"), "\"my\".\"x\"");
    }
}
