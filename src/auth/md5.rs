//! MD5 password authentication (server side), as Postgres does it:
//! the stored hash is `md5` + md5(password + user); the client answers a
//! 4-byte salt with `md5` + md5(hex(stored) + salt).

use md5::{Digest, Md5};

pub fn password_hash(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// What a client holding the right password answers to `salt`.
pub fn expected_response(stored_hash: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&stored_hash.as_bytes()[3..]);
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libpq() {
        // The client-side hash postgres-protocol computes must equal ours.
        let salt = [1, 2, 3, 4];
        let client = postgres_protocol::authentication::md5_hash(b"bob", b"pw", salt);
        assert_eq!(client, expected_response(&password_hash("bob", "pw"), salt));
    }
}
