//! TLS on the gRPC port: a rustls server configuration built from PEM files (re-read when they
//! change, see [`Reloadable`]), the check of a connection's client certificate against the
//! current client CA, and the accept loop that hands finished handshakes to tonic.
//!
//! tonic's own `ServerTlsConfig` reads the certificate once; doing the handshake here lets
//! every new connection use the newest certificate, and bounds how long a handshake may take.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::watch::{LoadError, Reloadable};
use crate::config::{ClientAuth, TlsConfig};
use crate::listener::{Connection, Listener};

/// The rustls configuration of the TLS files, and its client-certificate verifier kept apart:
/// rustls does not expose it, and calls on open connections are checked against it.
pub struct TlsServer {
    config: Arc<ServerConfig>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl TlsServer {
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    /// Whether a handshake now would accept `chain` (end entity first): signed by the current
    /// client CA, and valid at this moment.
    pub fn verify_client(&self, chain: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        let (Some(verifier), Some((leaf, intermediates))) =
            (&self.client_verifier, chain.split_first())
        else {
            return Ok(());
        };
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
    }
}

/// The reloadable server configuration, or `None` when TLS is off.
pub fn load(config: &TlsConfig) -> Result<Option<Arc<Reloadable<TlsServer>>>, LoadError> {
    let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
        return Ok(None);
    };
    let mut paths = vec![cert.clone(), key.clone()];
    paths.extend(config.tls_client_ca_file.clone());
    let client_auth = config.client_auth();
    Reloadable::load("TLS certificate", paths, move |files| {
        tls_server(
            &files[0],
            &files[1],
            files.get(2).map(Vec::as_slice),
            client_auth,
        )
    })
    .map(Some)
}

/// A rustls configuration for gRPC (HTTP/2 by ALPN) from PEM bytes.
pub fn tls_server(
    cert_chain: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
    client_auth: ClientAuth,
) -> Result<TlsServer, String> {
    let certs = CertificateDer::pem_slice_iter(cert_chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the certificate file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let (builder, client_verifier) = match client_ca {
        None => (builder.with_no_client_auth(), None),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| format!("client CA: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("client CA certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("no certificate in the client CA file".into());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|e| e.to_string())?;
            (
                builder.with_client_cert_verifier(Arc::clone(&verifier)),
                Some(verifier),
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsServer {
        config: Arc::new(config),
        client_verifier,
    })
}

/// Connections that completed a TLS handshake within `handshake_timeout`, each with the
/// configuration current when it was accepted. Failed handshakes (plaintext clients, unknown
/// client CAs, scanners) are logged at debug level and counted, never passed on.
pub fn incoming(
    mut listener: Listener,
    tls: Arc<Reloadable<TlsServer>>,
    handshake_timeout: Duration,
    stop: CancellationToken,
) -> impl Stream<Item = Result<Connection<TlsStream<TcpStream>>, std::io::Error>> {
    // Each handshake runs in a task of its own, after the accept and within the port's
    // connection cap: silent clients hold a slot each until the handshake timeout, but never
    // stop the accept loop, so the next client is accepted while they wait.
    let (done, ready) = tokio::sync::mpsc::channel(64);
    let limits = listener.limits();
    tokio::spawn(async move {
        loop {
            // Returning drops the listener, which frees the port.
            let (stream, slot) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let acceptor = TlsAcceptor::from(tls.current().config());
            let done = done.clone();
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = done.send(Ok(Connection::new(stream, slot, &limits))).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!(crate::telemetry::TLS_HANDSHAKE_FAILURES).increment(1);
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!(crate::telemetry::TLS_HANDSHAKE_FAILURES).increment(1);
                        tracing::debug!(?peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(ready)
}
