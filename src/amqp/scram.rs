//! SCRAM-SHA-256 (RFC 5802, RFC 7677): the stored credential and the server side of the
//! exchange, as used by the SASL layer in [`super::sasl`].
//!
//! A credential is kept only as salt, iteration count, `StoredKey` and `ServerKey`, written
//! in the RFC 5803 / PostgreSQL form
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64). The same record
//! checks a SASL PLAIN password: derive `SaltedPassword` with PBKDF2 and compare the
//! `StoredKey` it yields. The arithmetic (PBKDF2, HMAC, SHA-256, randomness) is `ring`'s.
//!
//! Invariants: every field read from the client is bounded by [`MAX_SCRAM_MESSAGE_LEN`]
//! before parsing; an unknown user runs the same exchange against a fake salt derived from
//! the name, so the challenge does not reveal which users exist; secrets are never logged.
//!
//! Does not: do SASLprep (names and passwords are compared as UTF-8 bytes), channel
//! binding (`-PLUS`), or SHA-1.

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac, pbkdf2};

pub const MECHANISM_SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// Prefix of a stored credential.
pub const SCHEME: &str = "SCRAM-SHA-256";
/// Iterations used by [`ScramCredential::derive`] (RFC 7677 asks for at least 4096).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Fewest iterations a stored credential may declare.
pub const MIN_ITERATIONS: u32 = 4096;
/// Most iterations a stored credential may declare: bounds the work of one PLAIN check.
pub const MAX_ITERATIONS: u32 = 1_000_000;
/// Largest client SCRAM message accepted.
pub const MAX_SCRAM_MESSAGE_LEN: usize = 1024;
/// Bytes of salt generated for a new credential.
pub const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 18;
const KEY_LEN: usize = 32;

/// A stored SCRAM-SHA-256 credential (no password, no `SaltedPassword`).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredential {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; KEY_LEN],
    pub server_key: [u8; KEY_LEN],
}

impl std::fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramCredential { .. }")
    }
}

/// Why a stored credential string was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error(
        "password hash must look like SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
    )]
    Shape,
    #[error("password hash iterations must be within {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    Iterations,
    #[error("password hash has invalid base64 or key length")]
    Encoding,
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; KEY_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares without an early exit, so timing does not tell how many bytes matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    let rounds = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

impl ScramCredential {
    /// Derives a credential from a password with a fresh random salt.
    pub fn generate(password: &str) -> Result<ScramCredential, ring::error::Unspecified> {
        let mut salt = vec![0u8; SALT_LEN];
        SystemRandom::new().fill(&mut salt)?;
        Ok(Self::derive(password, salt, DEFAULT_ITERATIONS))
    }

    /// Derives a credential from a password, salt and iteration count.
    pub fn derive(password: &str, salt: Vec<u8>, iterations: u32) -> ScramCredential {
        let salted = salted_password(password, &salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        ScramCredential {
            iterations,
            salt,
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one this credential was derived from (SASL PLAIN).
    pub fn verify_password(&self, password: &str) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        constant_time_eq(&sha256(&client_key), &self.stored_key)
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Result<ScramCredential, CredentialError> {
        let mut parts = s.split('$');
        let (Some(SCHEME), Some(params), Some(keys), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::Shape);
        };
        let (iterations, salt) = params.split_once(':').ok_or(CredentialError::Shape)?;
        let (stored, server) = keys.split_once(':').ok_or(CredentialError::Shape)?;
        let iterations: u32 = iterations.parse().map_err(|_| CredentialError::Shape)?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(CredentialError::Iterations);
        }
        let key = |k: &str| -> Result<[u8; KEY_LEN], CredentialError> {
            let bytes = B64.decode(k).map_err(|_| CredentialError::Encoding)?;
            bytes.try_into().map_err(|_| CredentialError::Encoding)
        };
        let salt = B64.decode(salt).map_err(|_| CredentialError::Encoding)?;
        if salt.is_empty() {
            return Err(CredentialError::Encoding);
        }
        Ok(ScramCredential {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }
}

impl std::fmt::Display for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{SCHEME}${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Why a SCRAM exchange failed; all are reported to the client as `auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramFailure {
    Malformed,
    ChannelBindingUnsupported,
    BadProof,
}

/// The server's state between its first message and the client's final one.
#[derive(Clone)]
pub struct ScramServer {
    username: String,
    /// `None` for an unknown user: the exchange runs to the end and then fails.
    credential: Option<ScramCredential>,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramServer")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Un-escapes a SCRAM `saslname` (`=2C` is `,`, `=3D` is `=`).
fn saslname(s: &str) -> Result<String, ScramFailure> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 3) {
            Some("2C") => out.push(','),
            Some("3D") => out.push('='),
            _ => return Err(ScramFailure::Malformed),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A fake salt for unknown users: stable per name within this process, unguessable.
fn fake_salt(username: &str) -> Vec<u8> {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        let _ = SystemRandom::new().fill(&mut k);
        k
    });
    hmac_sha256(key, username.as_bytes())[..SALT_LEN].to_vec()
}

impl ScramServer {
    /// Reads the client-first message; returns the state and the server-first message.
    /// `lookup` finds the stored credential of a user name.
    pub fn start(
        client_first: &[u8],
        lookup: impl FnOnce(&str) -> Option<ScramCredential>,
    ) -> Result<(ScramServer, String), ScramFailure> {
        if client_first.len() > MAX_SCRAM_MESSAGE_LEN {
            return Err(ScramFailure::Malformed);
        }
        let text = std::str::from_utf8(client_first).map_err(|_| ScramFailure::Malformed)?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut fields = text.splitn(3, ',');
        let (Some(cbind), Some(authzid), Some(bare)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(ScramFailure::Malformed);
        };
        match cbind {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(ScramFailure::ChannelBindingUnsupported),
            _ => return Err(ScramFailure::Malformed),
        }
        let mut attrs = bare.split(',');
        let username = attrs
            .next()
            .and_then(|a| a.strip_prefix("n="))
            .ok_or(ScramFailure::Malformed)
            .and_then(saslname)?;
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramFailure::Malformed)?;
        if username.is_empty() {
            return Err(ScramFailure::Malformed);
        }
        if let Some(z) = authzid.strip_prefix("a=") {
            if saslname(z)? != username {
                return Err(ScramFailure::Malformed);
            }
        } else if !authzid.is_empty() {
            return Err(ScramFailure::Malformed);
        }
        let credential = lookup(&username);
        let (salt, iterations) = match &credential {
            Some(c) => (c.salt.clone(), c.iterations),
            None => (fake_salt(&username), DEFAULT_ITERATIONS),
        };
        let mut server_nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut server_nonce)
            .map_err(|_| ScramFailure::Malformed)?;
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(salt));
        let gs2_header = format!("{cbind},{authzid},");
        let state = ScramServer {
            username,
            credential,
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((state, server_first))
    }

    /// The user named in the client-first message.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Checks the client-final message; on success returns the server-final message.
    pub fn finish(&self, client_final: &[u8]) -> Result<String, ScramFailure> {
        if client_final.len() > MAX_SCRAM_MESSAGE_LEN {
            return Err(ScramFailure::Malformed);
        }
        let text = std::str::from_utf8(client_final).map_err(|_| ScramFailure::Malformed)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramFailure::Malformed)?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramFailure::Malformed)?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramFailure::Malformed)?;
        if binding != B64.encode(&self.gs2_header) || nonce != self.nonce {
            return Err(ScramFailure::Malformed);
        }
        let proof = B64.decode(proof).map_err(|_| ScramFailure::Malformed)?;
        let Some(credential) = &self.credential else {
            return Err(ScramFailure::BadProof);
        };
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac_sha256(&credential.stored_key, auth_message.as_bytes());
        if proof.len() != KEY_LEN {
            return Err(ScramFailure::BadProof);
        }
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        if !constant_time_eq(&sha256(&client_key), &credential.stored_key) {
            return Err(ScramFailure::BadProof);
        }
        let server_signature = hmac_sha256(&credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: user "user", password "pencil".
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_FINAL_NO_PROOF: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_PROOF: &str = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_credential() -> ScramCredential {
        ScramCredential::derive("pencil", B64.decode(RFC_SALT).unwrap(), 4096)
    }

    #[test]
    fn rfc7677_exchange_verifies() {
        let (mut server, _) =
            ScramServer::start(RFC_CLIENT_FIRST.as_bytes(), |_| Some(rfc_credential())).unwrap();
        // Replay the RFC's server nonce and first message so the proof matches.
        server.nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into();
        server.server_first = format!("r={},s={RFC_SALT},i=4096", server.nonce);
        let client_final = format!("{RFC_FINAL_NO_PROOF},p={RFC_PROOF}");
        assert_eq!(
            server.finish(client_final.as_bytes()).unwrap(),
            RFC_SERVER_FINAL
        );
        let wrong = format!("{RFC_FINAL_NO_PROOF},p={}", B64.encode([7u8; 32]));
        assert_eq!(server.finish(wrong.as_bytes()), Err(ScramFailure::BadProof));
    }

    #[test]
    fn credential_round_trips_and_checks_plain_passwords() {
        let c = ScramCredential::generate("s3cret").unwrap();
        let parsed = ScramCredential::parse(&c.to_string()).unwrap();
        assert_eq!(parsed, c);
        assert!(parsed.verify_password("s3cret"));
        assert!(!parsed.verify_password("s3cret "));
        assert!(!format!("{c:?}").contains(&B64.encode(c.stored_key)));
    }

    #[test]
    fn malformed_credentials_are_rejected() {
        assert_eq!(
            ScramCredential::parse("plain:x"),
            Err(CredentialError::Shape)
        );
        assert_eq!(
            ScramCredential::parse("SCRAM-SHA-256$10:AAAA$AAAA:AAAA"),
            Err(CredentialError::Iterations)
        );
        assert_eq!(
            ScramCredential::parse("SCRAM-SHA-256$4096:AAAA$AAAA:AAAA"),
            Err(CredentialError::Encoding)
        );
    }

    #[test]
    fn unknown_users_get_a_stable_fake_challenge_and_fail() {
        let (a, first_a) = ScramServer::start(b"n,,n=ghost,r=abc", |_| None).unwrap();
        let (_, first_b) = ScramServer::start(b"n,,n=ghost,r=abc", |_| None).unwrap();
        let salt = |s: &str| s.split(',').nth(1).map(str::to_owned);
        assert_eq!(salt(&first_a), salt(&first_b));
        let fin = format!("c=biws,r={},p={}", a.nonce, B64.encode([0u8; 32]));
        assert_eq!(a.finish(fin.as_bytes()), Err(ScramFailure::BadProof));
    }

    #[test]
    fn bad_client_first_messages_are_malformed() {
        for m in [
            &b"x,,n=a,r=b"[..],
            b"n,,r=b",
            b"n,,n=a",
            b"n,,n=a=zz,r=b",
            b"n,a=other,n=a,r=b",
        ] {
            assert_eq!(
                ScramServer::start(m, |_| None).map(|_| ()),
                Err(ScramFailure::Malformed),
                "{}",
                String::from_utf8_lossy(m)
            );
        }
        assert_eq!(
            ScramServer::start(b"p=tls-unique,,n=a,r=b", |_| None).map(|_| ()),
            Err(ScramFailure::ChannelBindingUnsupported)
        );
    }
}
