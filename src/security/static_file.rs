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

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use ring::digest::{digest, SHA256};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::watch::Parsed;
use crate::domain::{CredentialKind, Identity, Role, Scope};

/// The file, its entries read one by one so that one bad entry does not hide the others.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tokens: Vec<serde_json::Value>,
    #[serde(default)]
    certificates: Vec<serde_json::Value>,
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

#[derive(Default)]
pub struct StaticIdentities {
    tokens: HashMap<[u8; 32], Identity>,
    certificates: HashMap<String, Identity>,
}

impl StaticIdentities {
    /// Parses the file. An entry that does not load is skipped and reported; so is every
    /// entry of a token hash or certificate subject listed twice, since which one was meant
    /// cannot be known.
    pub fn parse(json: &[u8]) -> Result<Parsed<Self>, String> {
        let file: File = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut skipped = Vec::new();
        let tokens = entries("token", file.tokens, &mut skipped, |entry: TokenEntry| {
            let hash = parse_hash(&entry.sha256).ok_or("sha256 must be 64 hex digits")?;
            Ok((
                hash,
                identity(
                    CredentialKind::StaticToken,
                    entry.subject,
                    &entry.role,
                    &entry.buildings,
                )?,
            ))
        });
        let certificates = entries(
            "certificate",
            file.certificates,
            &mut skipped,
            |entry: CertificateEntry| {
                let who = identity(
                    CredentialKind::Certificate,
                    entry.subject.clone(),
                    &entry.role,
                    &entry.buildings,
                )?;
                Ok((entry.subject, who))
            },
        );
        Ok(Parsed {
            value: Self {
                tokens,
                certificates,
            },
            skipped,
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

fn identity(
    kind: CredentialKind,
    subject: String,
    role: &str,
    buildings: &[String],
) -> Result<Identity, String> {
    let role = Role::parse(role).map_err(|e| e.to_string())?;
    let scope = Scope::parse(buildings).map_err(|e| e.to_string())?;
    Identity::new(kind, subject, role, scope).map_err(|e| e.to_string())
}

/// The entries of one list by their key; each that does not load is described in `skipped` by
/// its place and subject.
fn entries<E: DeserializeOwned, K: Hash + Eq + Clone>(
    kind: &str,
    list: Vec<serde_json::Value>,
    skipped: &mut Vec<String>,
    load: impl Fn(E) -> Result<(K, Identity), String>,
) -> HashMap<K, Identity> {
    let mut loaded = HashMap::new();
    let mut twice = HashSet::new();
    for (index, entry) in list.into_iter().enumerate() {
        let subject = entry.get("subject").cloned().unwrap_or_default();
        let loading = serde_json::from_value(entry).map_err(|e| e.to_string());
        let why = match loading.and_then(&load) {
            Ok((key, who)) => {
                if loaded.insert(key.clone(), who).is_none() {
                    continue;
                }
                twice.insert(key);
                "listed twice: no entry of it is used".to_owned()
            }
            Err(e) => e,
        };
        skipped.push(format!("{kind} {index} ({subject}): {why}"));
    }
    for key in &twice {
        loaded.remove(key);
    }
    loaded
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
        let parsed = StaticIdentities::parse(json.as_bytes()).expect("parses");
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let ids = parsed.value;
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
    fn bad_entries_are_skipped_with_a_reason_and_the_others_kept() {
        let good = format!(
            r#"{{"sha256": "{}", "subject": "good", "role": "viewer", "buildings": []}}"#,
            hash_token("good-token")
        );
        let twice = format!(
            r#"{{"sha256": "{}", "subject": "again", "role": "admin", "buildings": ["*"]}}"#,
            hash_token("twice-token")
        );
        let cases = [
            (
                format!(
                    r#"{{"tokens": [{good}, {{"sha256": "abc", "subject": "s", "role": "viewer", "buildings": []}}]}}"#
                ),
                r#"token 1 ("s"): sha256 must be 64 hex digits"#,
            ),
            (
                format!(
                    r#"{{"tokens": [{{"sha256": "x", "subject": "s", "role": "viewer"}}, {good}]}}"#
                ),
                r#"token 0 ("s"): missing field `buildings`"#,
            ),
            (
                format!(
                    r#"{{"tokens": [{good}], "certificates": [{{"subject": "CN=a", "role": "root", "buildings": ["*"]}}]}}"#
                ),
                r#"certificate 0 ("CN=a"): role"#,
            ),
            (
                format!(
                    r#"{{"tokens": [{good}], "certificates": [{{"subject": "CN=a", "role": "viewer", "buildings": ["*", "b"]}}]}}"#
                ),
                r#"certificate 0 ("CN=a"): buildings"#,
            ),
            (
                format!(r#"{{"tokens": [{twice}, {good}, {twice}]}}"#),
                r#"token 2 ("again"): listed twice"#,
            ),
        ];
        for (json, expected) in cases {
            let parsed = StaticIdentities::parse(json.as_bytes()).expect(&json);
            assert_eq!(parsed.skipped.len(), 1, "{json}: {:?}", parsed.skipped);
            assert!(
                parsed.skipped[0].starts_with(expected),
                "{:?}",
                parsed.skipped
            );
            assert!(parsed.value.by_token("good-token").is_some(), "{json}");
            assert!(parsed.value.by_token("twice-token").is_none(), "{json}");
            assert!(!parsed.value.has_certificates(), "{json}");
        }
        for json in [
            r#"{"tokens": [], "extra": 1}"#,
            "{ not json",
            r#"{"tokens": {}}"#,
        ] {
            assert!(StaticIdentities::parse(json.as_bytes()).is_err(), "{json}");
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
