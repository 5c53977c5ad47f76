//! Session state a client set that must follow it from one server
//! connection to the next in transaction pooling, and must never reach
//! another client.
//!
//! How: the client's state starts as its startup parameters (those that
//! differ from a fresh connection's). When the server reports a
//! session-changing command (CommandComplete `SET`, `RESET`, `DISCARD ALL`),
//! the proxy asks that server, once the transaction is over, which settings
//! are session-level now (`pg_settings` where `source = 'session'`): that is
//! exactly what Postgres kept, after savepoints, rollbacks, `SET LOCAL`
//! and functions with SET clauses. The state has a fingerprint; every
//! server connection records the fingerprint of the state applied to it
//! (0: as connected). At checkout, when the two differ, the proxy runs
//! `SET SESSION AUTHORIZATION DEFAULT; RESET ALL; SET ...` first. A client
//! with no state pays nothing; a connection another client dirtied is
//! cleaned before anyone else sees it.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// The query that reads a connection's session-level settings.
/// `transaction_*` are per transaction (pg_settings lists them with source
/// `session` after a SET TRANSACTION); replaying them would fail on a
/// replica and means nothing outside the transaction.
pub const CAPTURE_SQL: &str = "select name, setting from pg_settings where source = 'session' and name not in ('transaction_read_only', 'transaction_isolation', 'transaction_deferrable')";

/// Fingerprint of a connection whose state is not any client's (forces a
/// reset at the next checkout). Client fingerprints are odd, pristine is 0.
pub const DIRTY: u64 = 2;

#[derive(Debug, Default)]
pub struct SessionVars {
    /// (name, value) from the startup packet that differ from the pool.
    startup: Vec<(String, String)>,
    /// The settings in force, once captured from a server; until then the
    /// startup list is the state.
    current: Option<Vec<(String, String)>>,
    /// A session-changing command completed since the last capture.
    changed: bool,
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

    /// The session's `default_transaction_read_only` is on: a plain BEGIN
    /// opens a read-only transaction.
    pub fn default_read_only(&self) -> bool {
        self.settings().iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("default_transaction_read_only")
                && matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1")
        })
    }

    fn settings(&self) -> &[(String, String)] {
        self.current.as_deref().unwrap_or(&self.startup)
    }

    fn refresh_fingerprint(&mut self) {
        self.fingerprint = if self.settings().is_empty() {
            0
        } else {
            let mut h = DefaultHasher::new();
            self.settings().hash(&mut h);
            h.finish() | 1
        };
    }

    /// SQL that turns any server connection into this client's state.
    /// `set_config` takes a value as the configuration file would, so list
    /// settings (search_path) round-trip from `pg_settings.setting`, which
    /// `SET name TO 'value'` would take as one quoted item.
    pub fn apply_sql(&self) -> String {
        let mut sql = String::from("SET SESSION AUTHORIZATION DEFAULT; RESET ALL;");
        let calls: Vec<String> = self
            .settings()
            .iter()
            .map(|(name, value)| {
                format!(
                    "set_config({}, {}, false)",
                    quote_literal(name),
                    quote_literal(value)
                )
            })
            .collect();
        if !calls.is_empty() {
            sql.push_str(" SELECT ");
            sql.push_str(&calls.join(", "));
            sql.push(';');
        }
        sql
    }

    /// A command completed with this CommandComplete tag.
    pub fn note_command(&mut self, tag: &[u8]) {
        if matches!(tag, b"SET" | b"RESET" | b"DISCARD ALL") {
            self.changed = true;
        }
    }

    /// The server's session settings must be read before the connection
    /// goes back to the pool.
    pub fn needs_capture(&self) -> bool {
        self.changed
    }

    /// Takes the server's session-level settings as the new state. A
    /// startup setting missing from them was RESET; Postgres returns it to
    /// the startup value, so it stays in the state. Returns whether the
    /// connection the rows came from now carries exactly this state.
    pub fn capture(&mut self, mut rows: Vec<(String, String)>) -> bool {
        self.changed = false;
        let mut exact = true;
        for (name, value) in &self.startup {
            if !rows.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                rows.push((name.clone(), value.clone()));
                exact = false;
            }
        }
        rows.sort();
        self.current = Some(rows);
        self.refresh_fingerprint();
        exact
    }
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
        assert_eq!(SessionVars::new(vec![]).fingerprint(), 0);
        assert_ne!(
            SessionVars::new(vec![("a".into(), "b".into())]).fingerprint(),
            0
        );
    }

    #[test]
    fn capture_replaces_state_and_keeps_reset_startup_values() {
        let mut v = SessionVars::new(vec![("application_name".into(), "psql".into())]);
        assert!(!v.needs_capture());
        v.note_command(b"SELECT 1");
        assert!(!v.needs_capture());
        v.note_command(b"SET");
        assert!(v.needs_capture());
        let exact = v.capture(vec![
            ("application_name".into(), "psql".into()),
            ("statement_timeout".into(), "5000".into()),
        ]);
        assert!(exact);
        assert!(!v.needs_capture());
        assert!(v
            .apply_sql()
            .contains("set_config('statement_timeout', '5000', false)"));
        // application_name RESET by the client: Postgres goes back to the
        // startup value, and this connection does not carry it.
        assert!(!v.capture(vec![]));
        assert!(v
            .apply_sql()
            .contains("set_config('application_name', 'psql', false)"));
        let fp = v.fingerprint();
        assert_ne!(fp, DIRTY);
        assert_eq!(fp & 1, 1);
    }

    #[test]
    fn same_settings_same_fingerprint() {
        let mut a = SessionVars::new(vec![]);
        let mut b = SessionVars::new(vec![]);
        a.capture(vec![("x".into(), "1".into()), ("y".into(), "2".into())]);
        b.capture(vec![("y".into(), "2".into()), ("x".into(), "1".into())]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        a.capture(vec![]);
        assert_eq!(a.fingerprint(), 0);
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
    }
}
