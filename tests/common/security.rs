//! Credentials made by the tests: RSA and EC signing keys with their JWKS, JWTs, a private CA
//! with server and client certificates (rcgen), and static-identity files. Nothing is read from
//! the repository: every key exists only for one test run. Also what the `security_*` tests
//! share: a service with authentication on, its static tokens, and calls that carry a token.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use thermostat::config::ServeConfig;
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

use super::{put, setpoint, TestApp};

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "thermostat";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A JWT signing key and its public JWK.
pub struct SigningKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Value,
    /// For the algorithm-confusion attack: the public key bytes an attacker knows.
    pub public_der: Vec<u8>,
}

impl SigningKey {
    pub fn rsa(kid: &str) -> Self {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let der = key.to_pkcs1_der().expect("PKCS#1");
        let public = key.to_public_key();
        let public_der = rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_der(&public)
            .expect("public PKCS#1")
            .into_vec();
        Self {
            kid: kid.into(),
            algorithm: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: json!({
                "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                "n": b64(&public.n().to_bytes_be()),
                "e": b64(&public.e().to_bytes_be()),
            }),
            public_der,
        }
    }

    pub fn ec(kid: &str) -> Self {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
        let point = pair.public_key_raw().to_vec(); // 0x04 || x || y
        Self {
            kid: kid.into(),
            algorithm: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({
                "kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256", "use": "sig",
                "x": b64(&point[1..33]),
                "y": b64(&point[33..65]),
            }),
            public_der: point,
        }
    }

    /// A signed token with these claims, naming this key by `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

/// Valid claims for `sub` with `role` over `buildings`, expiring in an hour.
pub fn claims(sub: &str, role: &str, buildings: &[&str]) -> Value {
    json!({
        "sub": sub, "role": role, "buildings": buildings,
        "iss": ISSUER, "aud": AUDIENCE,
        "iat": now(), "nbf": now() - 5, "exp": now() + 3600,
    })
}

/// An unsigned JWT (`alg: none`), as an attacker would write one.
pub fn unsigned(claims: &Value) -> String {
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// An HS256 token "signed" with the verifier's public key as the HMAC secret: the classic
/// algorithm-confusion attack on verifiers that take the algorithm from the token.
pub fn hmac_with_public_key(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&key.public_der)).expect("sign")
}

/// `token` with its payload replaced by `claims` and the original signature kept.
pub fn tampered(token: &str, claims: &Value) -> String {
    let mut parts = token.split('.');
    let header = parts.next().expect("header");
    let _payload = parts.next();
    let signature = parts.next().expect("signature");
    format!(
        "{header}.{}.{signature}",
        b64(claims.to_string().as_bytes())
    )
}

/// A certificate authority for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// `params`, valid until `not_after` (whole seconds).
fn until(mut params: CertificateParams, not_after: SystemTime) -> CertificateParams {
    let since_epoch = not_after.duration_since(UNIX_EPOCH).expect("clock");
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params
}

/// A PEM certificate and its PEM private key.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Pem {
        self.sign(Self::server_params())
    }

    /// The same, valid until `not_after` (whole seconds).
    pub fn server_until(&self, not_after: SystemTime) -> Pem {
        self.sign(until(Self::server_params(), not_after))
    }

    fn server_params() -> CertificateParams {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "thermostat");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params
    }

    /// A client certificate whose subject is `CN=<cn>`.
    pub fn client(&self, cn: &str) -> Pem {
        self.sign(Self::client_params(cn))
    }

    /// The same, valid until `not_after` (whole seconds).
    pub fn client_until(&self, cn: &str, not_after: SystemTime) -> Pem {
        self.sign(until(Self::client_params(cn), not_after))
    }

    fn client_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params
    }

    fn sign(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// One entry of a static-identities file.
pub enum StaticEntry<'a> {
    Token {
        token: &'a str,
        subject: &'a str,
        role: &'a str,
        buildings: &'a [&'a str],
    },
    Certificate {
        subject: &'a str,
        role: &'a str,
        buildings: &'a [&'a str],
    },
}

pub fn static_file(entries: &[StaticEntry<'_>]) -> String {
    let mut tokens = Vec::new();
    let mut certificates = Vec::new();
    for entry in entries {
        match entry {
            StaticEntry::Token {
                token,
                subject,
                role,
                buildings,
            } => tokens.push(json!({
                "sha256": thermostat::security::static_file::hash_token(token),
                "subject": subject, "role": role, "buildings": buildings,
            })),
            StaticEntry::Certificate {
                subject,
                role,
                buildings,
            } => certificates.push(json!({
                "subject": subject, "role": role, "buildings": buildings,
            })),
        }
    }
    json!({ "tokens": tokens, "certificates": certificates }).to_string()
}

/// Writes `contents` to `dir/name` and returns the path. The file is replaced whole, as a
/// Kubernetes Secret is: a reload never sees it half-written, which would grant nothing.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    let next = dir.join(format!(".{name}.next"));
    std::fs::write(&next, contents).expect("write credential file");
    std::fs::rename(&next, &path).expect("replace credential file");
    path
}

/// The signing keys, made once per test binary: RSA key generation is the slow part.
pub fn keys() -> &'static (SigningKey, SigningKey) {
    static KEYS: OnceLock<(SigningKey, SigningKey)> = OnceLock::new();
    KEYS.get_or_init(|| (SigningKey::rsa("rsa-1"), SigningKey::ec("ec-1")))
}

/// The static tokens of the matrix: (token, subject, role, buildings).
pub const STATIC: &[(&str, &str, &str, &[&str])] = &[
    ("t-viewer-north", "viewer-north", "viewer", &["north"]),
    ("t-operator-north", "operator-north", "operator", &["north"]),
    ("t-operator-south", "operator-south", "operator", &["south"]),
    ("t-admin-north", "admin-north", "admin", &["north"]),
    ("t-viewer-all", "viewer-all", "viewer", &["*"]),
    ("t-operator-all", "operator-all", "operator", &["*"]),
    ("t-admin-all", "admin-all", "admin", &["*"]),
    ("t-operator-none", "operator-none", "operator", &[]),
];

pub fn static_entries() -> Vec<StaticEntry<'static>> {
    STATIC
        .iter()
        .map(|(token, subject, role, buildings)| StaticEntry::Token {
            token,
            subject,
            role,
            buildings,
        })
        .collect()
}

/// A service with authentication on: the JWKS of [`keys`], the static tokens of [`STATIC`],
/// plus whatever `tweak` changes. Credential files live in the returned directory.
pub async fn secure_app(
    tweak: impl FnOnce(&mut ServeConfig, &Path),
) -> (tempfile::TempDir, TestApp) {
    let tempdir = tempfile::tempdir().expect("tempdir");
    let dir = tempdir.path();
    let (rsa, ec) = keys();
    let mut config = TestApp::fresh_config().await;
    config.auth.auth_disabled = false;
    config.auth.auth_jwks_file = Some(write(dir, "jwks.json", &jwks(&[rsa, ec])));
    config.auth.auth_jwt_issuer = Some(ISSUER.into());
    config.auth.auth_jwt_audience = Some(AUDIENCE.into());
    config.auth.auth_static_file = Some(write(
        dir,
        "identities.json",
        &static_file(&static_entries()),
    ));
    config.auth.credentials_reload_interval = Duration::from_millis(100);
    tweak(&mut config, dir);
    (tempdir, TestApp::spawn_with(config).await)
}

pub fn authorized<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header value"),
        );
    }
    request
}

/// A Put of a setpoint with the usual deltas, as the holder of `token`.
pub async fn put_as(
    client: &mut SetpointServiceClient<Channel>,
    token: &str,
    sensor: &str,
    building: &str,
    desired: f64,
) -> Result<pb::Setpoint, tonic::Status> {
    let request = authorized(put(setpoint(sensor, building, desired), None), Some(token));
    client
        .put_setpoint(request)
        .await
        .map(tonic::Response::into_inner)
}

pub fn code<T>(result: &Result<T, tonic::Status>) -> Code {
    result
        .as_ref()
        .map_or_else(tonic::Status::code, |_| Code::Ok)
}
