//! TLS for the hub's listener and its peer links (rustls, ring, TLS 1.2
//! and 1.3 with rustls's default suites).
//!
//! [`TlsServer`] holds the current `ServerConfig`, built from the
//! certificate, key and (for mTLS) client CA files. A reload builds a new
//! config and swaps it in: new handshakes use it, connections already up
//! keep the session they negotiated, so a rotation drops nothing. A file
//! that does not load keeps the last good config (logged).
//!
//! Transport-agnostic: [`TlsServer::accept`] turns any accepted byte stream
//! into a TLS stream and the identity of its client certificate
//! ([`CertificateIdentity`]: its first URI SAN, else its first DNS SAN),
//! which the acceptor puts into every request's extensions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::CertificateIdentity;

/// A TLS handshake not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of the listener's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA (PEM) that client certificates must chain to; set, a client
    /// without a valid certificate is refused at the handshake.
    pub client_ca: Option<PathBuf>,
}

/// The listener's TLS configuration, reloadable.
#[derive(Debug)]
pub struct TlsServer {
    files: TlsFiles,
    /// The protocols offered by ALPN.
    alpn: &'static [&'static [u8]],
    config: RwLock<Arc<rustls::ServerConfig>>,
}

/// gRPC is HTTP/2 only.
const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// The metrics listener speaks HTTP/1.1.
const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// rustls on ring with X25519 first, as every Freshness program
/// (`freshness_telemetry::crypto_provider`).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(freshness_telemetry::crypto_provider())
}

/// Reads a PEM certificate chain; the error names the file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

fn build(files: &TlsFiles, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, String> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|e| {
            format!(
                "certificate {} and key {} do not make a server identity: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

impl TlsServer {
    /// Loads the files; an error names the file (the hub does not start).
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        Self::load_with(files, ALPN_GRPC)
    }

    /// [`load`](Self::load) for the HTTP/1.1 metrics listener.
    pub fn load_http1(files: TlsFiles) -> Result<Arc<Self>, String> {
        Self::load_with(files, ALPN_HTTP1)
    }

    fn load_with(files: TlsFiles, alpn: &'static [&'static [u8]]) -> Result<Arc<Self>, String> {
        let config = build(&files, alpn)?;
        Ok(Arc::new(Self {
            files,
            alpn,
            config: RwLock::new(Arc::new(config)),
        }))
    }

    /// Reads the files again; new handshakes use them.
    pub fn reload(&self) {
        match build(&self.files, self.alpn) {
            Ok(c) => {
                *self.config.write() = Arc::new(c);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS files not reloaded; keeping the last good ones");
            }
        }
    }

    /// The files to watch.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut f = vec![self.files.cert.clone(), self.files.key.clone()];
        f.extend(self.files.client_ca.clone());
        f
    }

    /// The TLS handshake on an accepted stream (within
    /// [`HANDSHAKE_TIMEOUT`]), and the client certificate's identity when
    /// it presented one.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> std::io::Result<(
        tokio_rustls::server::TlsStream<IO>,
        Option<CertificateIdentity>,
    )>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.read().clone());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| certificate_identity(c.as_ref()));
        Ok((tls, identity.map(|n| CertificateIdentity(n.into()))))
    }
}

/// A certificate's first URI SAN, else its first DNS SAN.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
        })
}

/// Why a peer link's TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The endpoint refused the configuration.
    #[error("{0}")]
    Config(#[source] tonic::transport::Error),
}

/// The client side of a peer link over `https://`: the peer's CA, and this
/// hub's own certificate as its client certificate. Read at each connect,
/// so a rotated certificate is used by the next connection.
pub fn peer_client_config(
    peer_ca: Option<&Path>,
    own: Option<&TlsFiles>,
    domain: &str,
) -> Result<tonic::transport::ClientTlsConfig, PeerTlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| PeerTlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    // tonic's TLS uses the process's default provider: X25519 first.
    freshness_telemetry::install_crypto_provider();
    let mut tls = tonic::transport::ClientTlsConfig::new().domain_name(domain);
    if let Some(ca) = peer_ca {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    if let Some(own) = own {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(&own.cert)?,
            read(&own.key)?,
        ));
    }
    Ok(tls)
}
