//! Bearer JWTs verified against a JSON Web Key Set file.
//!
//! Only RS256 (RSA keys) and ES256 (P-256 keys) are accepted, and each key only with its own
//! algorithm: the algorithm is taken from the key, never from the token, which is what defeats
//! `alg: none` and the RS256-to-HS256 confusion (an HMAC "signed" with the public key).

use std::collections::HashSet;
use std::time::Duration;

use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations,
    PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::watch::Parsed;
use crate::domain::{CredentialKind, Identity, Role, Scope};

/// One usable key of the set.
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

impl Key {
    /// The key an entry of the set describes; `None` for a key meant for something else.
    fn from_entry(entry: serde_json::Value) -> Result<Option<Self>, String> {
        let jwk: Jwk = serde_json::from_value(entry).map_err(|e| e.to_string())?;
        let kid = jwk.common.key_id.clone();
        if !verifies_signatures(&jwk.common) {
            tracing::warn!(
                ?kid,
                "JWKS key ignored: its `use` or `key_ops` does not allow verifying signatures"
            );
            return Ok(None);
        }
        let declared = jwk.common.key_algorithm;
        let algorithm = match (&jwk.algorithm, declared) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => {
                tracing::warn!(
                    ?kid,
                    ?declared,
                    "JWKS key ignored: only RS256 and ES256 (P-256) keys are used"
                );
                return Ok(None);
            }
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        Ok(Some(Self {
            kid,
            algorithm,
            key,
        }))
    }
}

/// The usable keys of a JWKS file.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

/// A JWKS document, its keys read one by one so that one bad key does not hide the others.
#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Parses a JWKS document. Keys of other types, algorithms or uses are ignored with a
    /// warning (a shared key set may hold keys for other services); keys that do not load are
    /// skipped, and reported.
    pub fn parse(json: &[u8]) -> Result<Parsed<Self>, String> {
        let document: Document =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let (mut keys, mut skipped) = (Vec::new(), Vec::new());
        for (index, entry) in document.keys.into_iter().enumerate() {
            let kid = entry.get("kid").cloned().unwrap_or_default();
            match Key::from_entry(entry) {
                Ok(Some(key)) => keys.push(key),
                Ok(None) => {}
                Err(e) => skipped.push(format!("key {index} (kid {kid}): {e}")),
            }
        }
        if keys.is_empty() {
            tracing::warn!("the key set has no usable RS256 or ES256 key: every JWT is refused");
        }
        Ok(Parsed {
            value: Self { keys },
            skipped,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key a token names with `kid`; without a `kid`, the only key of a one-key set.
    fn find(&self, kid: Option<&str>) -> Result<&Key, String> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| format!("no key with kid {kid:?}")),
            None if self.keys.len() == 1 => Ok(&self.keys[0]),
            None => Err("token has no kid and the key set has several keys".into()),
        }
    }
}

/// Whether a key may verify signatures (RFC 7517, 4.2 and 4.3): a key published for encryption
/// must not also vouch for tokens. Without `use` and `key_ops` a key may do anything.
fn verifies_signatures(common: &CommonParameters) -> bool {
    let usable = match &common.public_key_use {
        None | Some(PublicKeyUse::Signature) => true,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_)) => false,
    };
    let allowed = common
        .key_operations
        .as_ref()
        .is_none_or(|ops| ops.contains(&KeyOperations::Verify));
    usable && allowed
}

/// Claims beyond the registered ones that jsonwebtoken checks (`exp`, `nbf`, `iss`, `aud`).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    role: String,
    #[serde(default)]
    buildings: Vec<String>,
}

/// What a token must satisfy besides a valid signature.
pub struct Expectations {
    pub issuer: String,
    pub audience: String,
    pub leeway: Duration,
}

/// Verifies `token` and returns the identity its claims describe. The error explains the
/// rejection for the log; callers only ever see UNAUTHENTICATED.
pub fn verify(keys: &KeySet, expect: &Expectations, token: &str) -> Result<Identity, String> {
    // An unknown `alg` (including "none") fails here, before any key is looked at.
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
    let key = keys.find(header.kid.as_deref())?;
    if header.alg != key.algorithm {
        return Err(format!(
            "token alg {:?} but key {:?} is {:?}",
            header.alg, key.kid, key.algorithm
        ));
    }
    let mut validation = Validation::new(key.algorithm);
    validation.set_issuer(&[&expect.issuer]);
    validation.set_audience(&[&expect.audience]);
    validation.leeway = expect.leeway.as_secs();
    validation.validate_nbf = true;
    validation.required_spec_claims = ["exp", "iss", "aud", "sub"]
        .into_iter()
        .map(str::to_owned)
        .collect::<HashSet<_>>();
    let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
        .map_err(|e| format!("rejected: {e}"))?
        .claims;
    let role = Role::parse(&claims.role).map_err(|e| e.to_string())?;
    let scope = Scope::parse(&claims.buildings).map_err(|e| e.to_string())?;
    Identity::new(CredentialKind::Jwt, claims.sub, role, scope).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 public key (RFC 7517, appendix A.1) with `kid` and extra members.
    fn ec_key(kid: &str, extra: &str) -> String {
        format!(
            r#"{{"kty": "EC", "crv": "P-256", "kid": "{kid}",
                "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
                "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"{extra}}}"#
        )
    }

    #[test]
    fn only_keys_meant_for_verifying_signatures_are_used() {
        let cases = [
            ("plain", "", true),
            ("sig", r#", "use": "sig""#, true),
            ("verify", r#", "key_ops": ["verify"]"#, true),
            ("sign-verify", r#", "key_ops": ["sign", "verify"]"#, true),
            ("enc", r#", "use": "enc""#, false),
            ("other-use", r#", "use": "tls""#, false),
            ("encrypt", r#", "key_ops": ["encrypt"]"#, false),
            ("no-ops", r#", "key_ops": []"#, false),
        ];
        let keys: Vec<String> = cases
            .iter()
            .map(|(kid, extra, _)| ec_key(kid, extra))
            .collect();
        let json = format!(r#"{{"keys": [{}]}}"#, keys.join(","));
        let set = KeySet::parse(json.as_bytes()).expect("parses").value;
        for (kid, _, used) in cases {
            assert_eq!(set.find(Some(kid)).is_ok(), used, "{kid}");
        }
    }

    #[test]
    fn a_key_that_does_not_load_is_skipped_and_named_and_the_others_are_used() {
        let broken = r#"{"kty": "RSA", "kid": "rsa-1", "n": "!!", "e": "AQAB"}"#;
        let unknown = r#"{"kty": "XYZ", "kid": "odd"}"#;
        let json = format!(
            r#"{{"keys": [{broken}, {}, {unknown}]}}"#,
            ec_key("ec-1", "")
        );
        let parsed = KeySet::parse(json.as_bytes()).expect("parses");
        assert!(parsed.value.find(Some("ec-1")).is_ok());
        assert!(parsed.value.find(Some("rsa-1")).is_err());
        assert_eq!(parsed.skipped.len(), 2, "{:?}", parsed.skipped);
        assert!(parsed.skipped[0].starts_with(r#"key 0 (kid "rsa-1")"#));
        assert!(parsed.skipped[1].starts_with(r#"key 2 (kid "odd")"#));

        let empty = KeySet::parse(br#"{"keys": []}"#).expect("parses");
        assert!(empty.value.is_empty() && empty.skipped.is_empty());
        assert!(KeySet::parse(b"{ not json").is_err());
        assert!(KeySet::parse(br#"{"keys": {}}"#).is_err());
    }
}
