//! Client authentication: the server side of SCRAM-SHA-256 and MD5, driven
//! by the frontend during startup. Secrets derive from the user entries in
//! the config; a plain password is turned into a SCRAM secret once per
//! config load (PBKDF2 is deliberately slow), never per connection.
//!
//! Hand-written because no maintained crate implements the *server* side of
//! Postgres's SCRAM exchange; the primitives (HMAC, SHA-256, PBKDF2, MD5)
//! come from the RustCrypto crates. The server side of the proxy's own
//! connections uses `postgres-protocol`'s client implementation.

pub mod md5;
pub mod scram;

use crate::config::{AuthMethod, UserConfig};
use std::collections::HashMap;
use std::sync::Arc;

/// What a login as one user is checked against.
#[derive(Debug, Clone)]
pub enum Verifier {
    Trust,
    Md5 { hash: String },
    Scram(scram::ScramSecret),
}

/// All users' verifiers, built once per config (re)load.
#[derive(Debug, Default)]
pub struct AuthTable {
    users: HashMap<String, Arc<Verifier>>,
}

impl AuthTable {
    pub fn build(users: &[UserConfig]) -> AuthTable {
        let users = users
            .iter()
            .map(|u| (u.name.clone(), Arc::new(verifier_for(u))))
            .collect();
        AuthTable { users }
    }

    pub fn get(&self, user: &str) -> Option<Arc<Verifier>> {
        self.users.get(user).cloned()
    }
}

fn verifier_for(u: &UserConfig) -> Verifier {
    let password = u.password.as_deref().unwrap_or_default();
    match u.auth {
        AuthMethod::Trust => Verifier::Trust,
        AuthMethod::Md5 => Verifier::Md5 {
            hash: if crate::config::is_md5_hash(password) {
                password.to_owned()
            } else {
                md5::password_hash(&u.name, password)
            },
        },
        AuthMethod::ScramSha256 => Verifier::Scram(
            scram::ScramSecret::parse(password)
                .unwrap_or_else(|| scram::ScramSecret::from_password(password)),
        ),
    }
}
