//! Static identities for small installations: bearer tokens (stored only as SHA-256 hashes)
//! and client-certificate subjects, each mapped to the same claims a JWT carries.
//!
//! ```json
//! {
//!   "tokens": [
//!     {"sha256": "<hex of sha256(token)>", "subject": "bms-west", "role": "operator",
//!      "buildings": ["west"]}
//!   ],
//!   "certificates": [
//!     {"subject": "CN=gateway-7", "role": "viewer", "buildings": ["*"]}
//!   ]
//! }
//! ```
//!
//! SHA-256 without salt is enough here because tokens are long random strings, not passwords
//! that a dictionary could guess; the hash only keeps a leaked file from being a key ring.

use std::collections::HashMap;

use ring::digest::{digest, SHA256};
use serde::Deserialize;

use crate::domain::{Identity, Role, Scope};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    #[serde(default)]
    certificates: Vec<CertificateEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    sha256: String,
    subject: String,
    role: String,
    buildings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateEntry {
    /// The certificate's subject as RFC 4514 text, e.g. `CN=gateway-7,O=Acme`.
    subject: String,
    role: String,
    buildings: Vec<String>,
}

pub struct StaticIdentities {
    tokens: HashMap<[u8; 32], Identity>,
    certificates: HashMap<String, Identity>,
}

impl StaticIdentities {
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let file: File = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let identity = |subject: String, role: &str, buildings: &[String]| {
            let role = Role::parse(role).map_err(|e| format!("{subject:?}: {e}"))?;
            let scope = Scope::parse(buildings).map_err(|e| format!("{subject:?}: {e}"))?;
            Identity::new(subject.clone(), role, scope).map_err(|e| format!("{subject:?}: {e}"))
        };
        let mut tokens = HashMap::new();
        for entry in file.tokens {
            let hash = parse_hash(&entry.sha256)
                .ok_or_else(|| format!("{:?}: sha256 must be 64 hex digits", entry.subject))?;
            let who = identity(entry.subject, &entry.role, &entry.buildings)?;
            if tokens.insert(hash, who).is_some() {
                return Err(format!("token hash {} listed twice", entry.sha256));
            }
        }
        let mut certificates = HashMap::new();
        for entry in file.certificates {
            let who = identity(entry.subject.clone(), &entry.role, &entry.buildings)?;
            if certificates.insert(entry.subject.clone(), who).is_some() {
                return Err(format!(
                    "certificate subject {:?} listed twice",
                    entry.subject
                ));
            }
        }
        Ok(Self {
            tokens,
            certificates,
        })
    }

    pub fn by_token(&self, token: &str) -> Option<&Identity> {
        let hash = digest(&SHA256, token.as_bytes());
        let key: [u8; 32] = hash.as_ref().try_into().ok()?;
        self.tokens.get(&key)
    }

    pub fn by_certificate_subject(&self, subject: &str) -> Option<&Identity> {
        self.certificates.get(subject)
    }

    pub fn has_certificates(&self) -> bool {
        !self.certificates.is_empty()
    }
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The lowercase hex SHA-256 of a token, as the static file stores it.
pub fn hash_token(token: &str) -> String {
    digest(&SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_hash_and_certificates_by_subject() {
        let json = format!(
            r#"{{"tokens": [{{"sha256": "{}", "subject": "bms", "role": "operator", "buildings": ["b1"]}}],
                "certificates": [{{"subject": "CN=gw", "role": "viewer", "buildings": ["*"]}}]}}"#,
            hash_token("s3cret-token")
        );
        let ids = StaticIdentities::parse(json.as_bytes()).expect("parses");
        let who = ids.by_token("s3cret-token").expect("found");
        assert_eq!((who.subject.as_str(), who.role), ("bms", Role::Operator));
        assert!(ids.by_token("s3cret-token ").is_none());
        assert!(
            ids.by_token(&hash_token("s3cret-token")).is_none(),
            "the hash is not the token"
        );
        assert_eq!(
            ids.by_certificate_subject("CN=gw").map(|i| i.role),
            Some(Role::Viewer)
        );
        assert!(ids.by_certificate_subject("CN=other").is_none());
    }

    #[test]
    fn bad_files_are_rejected_with_a_reason() {
        let cases = [
            (
                r#"{"tokens": [{"sha256": "abc", "subject": "s", "role": "viewer", "buildings": []}]}"#,
                "64 hex",
            ),
            (r#"{"tokens": [], "extra": 1}"#, "unknown field"),
            (
                r#"{"certificates": [{"subject": "CN=a", "role": "root", "buildings": ["*"]}]}"#,
                "role",
            ),
            (
                r#"{"certificates": [{"subject": "CN=a", "role": "viewer", "buildings": ["*", "b"]}]}"#,
                "*",
            ),
            (
                r#"{"certificates": [{"subject": "CN=a", "role": "viewer", "buildings": []},
                                  {"subject": "CN=a", "role": "admin", "buildings": []}]}"#,
                "twice",
            ),
        ];
        for (json, expected) in cases {
            let err = StaticIdentities::parse(json.as_bytes()).err().expect(json);
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn hash_matches_sha256sum() {
        // printf %s abc | sha256sum
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
