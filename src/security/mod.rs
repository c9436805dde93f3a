//! Who is calling: TLS on the gRPC port, and the identity of each call from a bearer token
//! (JWT or static) or a client certificate. What an identity may do is `domain::access`.

pub mod jwt;
pub mod static_file;
pub mod tls;
pub mod watch;

use std::sync::Arc;

use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};
use x509_cert::der::Decode;

use crate::config::{AuthConfig, ClientAuth, TlsConfig};
use crate::domain::{CredentialKind, Identity, Role, Scope, Subject};
use crate::error::Error;
use crate::listener::TlsConnectionInfo;
use watch::{LoadError, Reloadable};

/// Establishes the identity of each call.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Mode>,
    /// The TLS files in use, against whose client CA a connection's certificate is checked.
    tls: Option<Arc<Reloadable<tls::TlsServer>>>,
}

enum Mode {
    /// `AUTH_DISABLED`: everyone is an admin of every building.
    Disabled,
    Enabled {
        jwt: Option<(Arc<Reloadable<jwt::KeySet>>, jwt::Expectations)>,
        statics: Option<Arc<Reloadable<static_file::StaticIdentities>>>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "no authentication configured: set AUTH_JWKS_FILE and/or AUTH_STATIC_FILE, or \
         AUTH_DISABLED=true for local development"
    )]
    NothingConfigured,
    #[error("AUTH_DISABLED=true cannot be combined with AUTH_JWKS_FILE or AUTH_STATIC_FILE")]
    Contradictory,
    #[error(
        "TLS_CLIENT_AUTH=required needs TLS_CLIENT_CA_FILE: without a client CA no client \
         certificate is asked for, so none would be required"
    )]
    ClientAuthWithoutCa,
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl Authenticator {
    /// Loads the configured key set and static identities and starts watching them for changes.
    /// `tls_server` is the gRPC port's TLS, whose client CA certificates are checked against.
    pub fn load(
        config: &AuthConfig,
        tls: &TlsConfig,
        tls_server: Option<Arc<Reloadable<tls::TlsServer>>>,
        stop: &CancellationToken,
    ) -> Result<Self, SetupError> {
        if tls.tls_client_auth == Some(ClientAuth::Required) && tls.tls_client_ca_file.is_none() {
            return Err(SetupError::ClientAuthWithoutCa);
        }
        let configured = config.auth_jwks_file.is_some() || config.auth_static_file.is_some();
        if config.auth_disabled {
            if configured {
                return Err(SetupError::Contradictory);
            }
            return Ok(Self {
                inner: Arc::new(Mode::Disabled),
                tls: tls_server,
            });
        }
        if !configured {
            return Err(SetupError::NothingConfigured);
        }
        let interval = config.credentials_reload_interval;
        let jwt = match (
            &config.auth_jwks_file,
            &config.auth_jwt_issuer,
            &config.auth_jwt_audience,
        ) {
            (Some(path), Some(issuer), Some(audience)) => {
                let keys = Reloadable::load_grants("JWKS", vec![path.clone()], |files| {
                    jwt::KeySet::parse(&files[0])
                })?;
                // Emptied later, it refuses every JWT; empty at start, it is a mistake.
                if keys.current().is_empty() {
                    return Err(SetupError::Load(LoadError::Invalid {
                        what: "JWKS",
                        paths: path.display().to_string(),
                        message: "no RS256 or ES256 key in the key set".into(),
                    }));
                }
                Arc::clone(&keys).watch(interval, stop.clone());
                let expect = jwt::Expectations {
                    issuer: issuer.clone(),
                    audience: audience.clone(),
                    leeway: config.auth_jwt_leeway,
                };
                Some((keys, expect))
            }
            // clap's `requires_all` makes the issuer and audience present with a JWKS file.
            _ => None,
        };
        let statics = match &config.auth_static_file {
            Some(path) => {
                let statics =
                    Reloadable::load_grants("static identities", vec![path.clone()], |files| {
                        static_file::StaticIdentities::parse(&files[0])
                    })?;
                if statics.current().has_certificates() && tls.tls_client_ca_file.is_none() {
                    tracing::warn!(
                        "AUTH_STATIC_FILE maps certificate subjects, but TLS_CLIENT_CA_FILE is not \
                         set: no client certificate is ever requested, so those entries never match"
                    );
                }
                Arc::clone(&statics).watch(interval, stop.clone());
                Some(statics)
            }
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Mode::Enabled { jwt, statics }),
            tls: tls_server,
        })
    }

    pub fn is_disabled(&self) -> bool {
        matches!(*self.inner, Mode::Disabled)
    }

    /// The identity of a call from its metadata and the connection's client certificate chain.
    /// The chain is verified again, against the current client CA and clock: the handshake's
    /// verdict does not outlive a CA rotation or the certificate's expiry. A bearer token, when
    /// sent, decides alone: a bad token is refused even with a good certificate, so a caller
    /// never silently acts as someone other than it asked to be.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Identity, Error> {
        if let (Some(tls), Some(chain)) = (&self.tls, peer_certs) {
            // Also under a token: the connection itself would no longer be accepted.
            tls.current().verify_client(chain).map_err(|e| {
                Error::Unauthenticated(format!("client certificate no longer verifies: {e}"))
            })?;
        }
        let (jwt, statics) = match &*self.inner {
            Mode::Disabled => return Ok(anonymous_admin()),
            Mode::Enabled { jwt, statics } => (jwt, statics),
        };
        if let Some(value) = metadata.get("authorization") {
            let token = bearer_token(value.as_bytes()).ok_or_else(|| {
                Error::Unauthenticated("authorization is not `Bearer <token>`".into())
            })?;
            if let Some(who) = statics
                .as_ref()
                .and_then(|s| s.current().by_token(token).cloned())
            {
                return Ok(who);
            }
            return match jwt {
                Some((keys, expect)) => jwt::verify(&keys.current(), expect, token)
                    .map_err(|e| Error::Unauthenticated(format!("JWT: {e}"))),
                None => Err(Error::Unauthenticated("unknown static token".into())),
            };
        }
        if let (Some(statics), Some(leaf)) = (statics, peer_certs.and_then(<[_]>::first)) {
            let subject = certificate_subject(leaf)
                .ok_or_else(|| Error::Unauthenticated("unreadable client certificate".into()))?;
            return statics
                .current()
                .by_certificate_subject(&subject)
                .cloned()
                .ok_or_else(|| {
                    Error::Unauthenticated(format!("client certificate {subject:?} is not listed"))
                });
        }
        Err(Error::Unauthenticated(
            "no bearer token or client certificate".into(),
        ))
    }
}

/// The identity every call has when authentication is off.
fn anonymous_admin() -> Identity {
    Identity {
        subject: Subject {
            kind: CredentialKind::Anonymous,
            name: "anonymous".into(),
        },
        role: Role::Admin,
        scope: Scope::All,
    }
}

/// `Bearer <token>`, the scheme case-insensitive as RFC 6750 allows.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A certificate's subject as RFC 4514 text (`CN=gateway-7,O=Acme`).
pub fn certificate_subject(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    Some(cert.tbs_certificate.subject.to_string())
}

/// The certificates the caller presented on its TLS connection.
fn peer_certs<T>(request: &Request<T>) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    let info = request.extensions().get::<TlsConnectionInfo>()?;
    info.peer_certs()
}

/// What a call authenticated with, kept so that a long-lived stream can check it again: a
/// subscription must end when its token expires or is revoked, or its certificate delisted.
#[derive(Clone)]
pub struct Credentials {
    auth: Authenticator,
    /// Only the `authorization` entry of the call's metadata.
    metadata: MetadataMap,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Credentials {
    /// The credentials `request` carries, to be checked with `auth`.
    pub fn of<T>(request: &Request<T>, auth: Authenticator) -> Self {
        let mut metadata = MetadataMap::new();
        if let Some(value) = request.metadata().get("authorization") {
            metadata.insert("authorization", value.clone());
        }
        Self {
            auth,
            metadata,
            certs: peer_certs(request),
        }
    }

    /// The identity these credentials give now, with the current keys and identity files.
    pub fn authenticate(&self) -> Result<Identity, Error> {
        self.auth
            .authenticate(&self.metadata, self.certs.as_deref().map(Vec::as_slice))
    }
}

/// Authenticates every call of the services it wraps and puts the [`Identity`] into the
/// request's extensions, where handlers find it with [`identity`].
impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certs = peer_certs(&request);
        match self.authenticate(request.metadata(), certs.as_deref().map(Vec::as_slice)) {
            Ok(who) => {
                request.extensions_mut().insert(who);
                Ok(request)
            }
            Err(e) => {
                metrics::counter!(crate::telemetry::AUTH_FAILURES, "code" => "unauthenticated")
                    .increment(1);
                Err(e.into())
            }
        }
    }
}

/// The caller's identity, as the interceptor found it.
pub fn identity<T>(request: &Request<T>) -> Result<Identity, Error> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        // Only reachable if a service were registered without the interceptor: refuse.
        .ok_or_else(|| Error::Unauthenticated("no identity on the request".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"bearer abc "), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"abc"), None);
    }
}
