//! SCRAM-SHA-256 (RFC 5802/7677) server side, without channel binding, in
//! the form Postgres uses (the user name in the SCRAM messages is ignored;
//! the startup packet's user counts).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";
const ITERATIONS: u32 = 4096;

/// The stored form of a password: what Postgres keeps in pg_authid.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

impl ScramSecret {
    pub fn from_password(password: &str) -> ScramSecret {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::derive(password, salt, ITERATIONS)
    }

    pub fn derive(password: &str, salt: Vec<u8>, iterations: u32) -> ScramSecret {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramSecret {
            iterations,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<ScramSecret> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A secret nobody can log in with, so an unknown user goes through the
    /// same exchange as a known one and learns nothing from it.
    pub fn mock(user: &str) -> ScramSecret {
        let salt = Sha256::digest(user.as_bytes())[..16].to_vec();
        ScramSecret {
            iterations: ITERATIONS,
            salt,
            stored_key: [0xAA; 32],
            server_key: [0x55; 32],
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("wrong password")]
    WrongPassword,
}

/// Server state after the client-first message.
pub struct ServerFirst {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

impl ServerFirst {
    /// Handles client-first (`n,,n=user,r=nonce`); returns the state and
    /// the server-first message to send.
    pub fn start(client_first: &[u8], secret: &ScramSecret) -> Result<ServerFirst, ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        let (cb_flag, rest) = text.split_once(',').ok_or(ScramError::Malformed)?;
        match cb_flag {
            "n" | "y" => {}
            _ if cb_flag.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed)?;
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(ScramError::Malformed);
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed)?;
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&secret.salt),
            secret.iterations
        );
        Ok(ServerFirst {
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
            gs2_header: format!("{cb_flag},{authzid},"),
        })
    }

    pub fn message(&self) -> &str {
        &self.server_first
    }

    /// Checks client-final (`c=...,r=...,p=proof`); returns server-final.
    pub fn finish(self, client_final: &[u8], secret: &ScramSecret) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = B64
            .decode(channel.ok_or(ScramError::Malformed)?)
            .map_err(|_| ScramError::Malformed)?;
        if channel != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed)?
            .try_into()
            .map_err(|_| ScramError::Malformed)?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        // Constant-time comparison: the proof must not leak by timing.
        let diff = stored
            .iter()
            .zip(secret.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(client_pw: &str, secret: &ScramSecret) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let state = ServerFirst::start(client.message(), secret)?;
        client
            .update(state.message().as_bytes())
            .map_err(|_| ScramError::Malformed)?;
        let server_final = state.finish(client.message(), secret)?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed)
    }

    #[test]
    fn real_client_logs_in() {
        let secret = ScramSecret::from_password("hunter2");
        assert_eq!(exchange("hunter2", &secret), Ok(()));
        assert_eq!(exchange("hunter3", &secret), Err(ScramError::WrongPassword));
        assert_eq!(
            exchange("hunter2", &ScramSecret::mock("x")),
            Err(ScramError::WrongPassword)
        );
    }

    #[test]
    fn parses_postgres_secret() {
        let s = ScramSecret::derive("pw", b"0123456789abcdef".to_vec(), 4096);
        let text = format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            s.iterations,
            B64.encode(&s.salt),
            B64.encode(s.stored_key),
            B64.encode(s.server_key)
        );
        assert_eq!(ScramSecret::parse(&text), Some(s.clone()));
        assert_eq!(exchange("pw", &s), Ok(()));
        assert!(ScramSecret::parse("SCRAM-SHA-256$x").is_none());
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        let secret = ScramSecret::mock("u");
        for msg in [
            &b""[..],
            b"n",
            b"x,,n=,r=a",
            b"p=tls-server-end-point,,n=,r=a",
            b"\xff\xfe",
        ] {
            assert!(ServerFirst::start(msg, &secret).is_err());
        }
        let st = ServerFirst::start(b"n,,n=,r=abc", &secret).unwrap();
        assert!(st.finish(b"c=biws,r=wrong,p=AAAA", &secret).is_err());
    }
}
