//! The one place that turns a hub address into a tonic endpoint, so that the
//! subscriber, the publisher and `freshctl` connect the same way.

use std::path::Path;
use std::time::Duration;

use freshness::pb::hub_client::HubClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A hub address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hub address {url:?}: {reason}")]
pub struct InvalidAddress {
    /// The address as given.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Builds the endpoint of a hub at `url` (`http://host:port`; a bare
/// `host:port` gets `http://`).
///
/// HTTP/2 keepalive pings detect a connection that died without a FIN (a
/// crashed machine, a dropped route) within seconds instead of the kernel's
/// minutes.
pub(crate) fn endpoint(url: &str, connect_timeout: Duration) -> Result<Endpoint, InvalidAddress> {
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let invalid = |reason: String| InvalidAddress {
        url: url.to_owned(),
        reason,
    };
    if !full.starts_with("http://") && !full.starts_with("https://") {
        return Err(invalid("the scheme must be http or https".into()));
    }
    let endpoint = Endpoint::from_shared(full).map_err(|e| invalid(e.to_string()))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// How a client proves itself to a secured hub and checks the hub: the CA
/// that signed the hub's certificate, a client certificate (mTLS) and a
/// bearer token (a JWT or a static token). All optional; TLS is used for
/// `https://` addresses.
#[derive(Clone, Default)]
pub struct Credentials {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    token: Option<String>,
    token_file: Option<std::path::PathBuf>,
    domain: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or the key.
        f.debug_struct("Credentials")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.identity.is_some())
            .field("token", &self.token.is_some())
            .field("token_file", &self.token_file)
            .field("domain", &self.domain)
            .finish()
    }
}

impl Credentials {
    /// No TLS settings and no token.
    pub fn new() -> Self {
        Self::default()
    }

    /// The CA (PEM) the hub's certificate must chain to.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(pem.into());
        self
    }

    /// A client certificate chain and its key (PEM), for a hub that
    /// requires them (mTLS).
    pub fn client_identity_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// A bearer token sent with every call.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self.token_file = None;
        self
    }

    /// A file holding the bearer token (a mounted Secret), read again for
    /// every connection, so a rotated token is used from the next one on.
    pub fn bearer_token_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self.token = None;
        self
    }

    /// The name the hub's certificate must carry, when it is not the
    /// address's host.
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// Reads the CA, certificate and key files given (certificate and key
    /// together); the error names the file.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, std::io::Error> {
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let mut c = Self::new();
        if let Some(ca) = ca {
            c = c.ca_pem(read(ca)?);
        }
        match (cert, key) {
            (Some(cert), Some(key)) => c = c.client_identity_pem(read(cert)?, read(key)?),
            (None, None) => {}
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a client certificate and its key go together",
                ));
            }
        }
        Ok(c)
    }

    /// Whether a TLS setting is given.
    fn has_tls(&self) -> bool {
        self.ca.is_some() || self.identity.is_some() || self.domain.is_some()
    }
}

/// Applies `credentials`' TLS settings to the endpoint of `url`: TLS for
/// an `https://` address (a TLS setting on an `http://` one is an error,
/// rather than credentials sent in the clear).
pub(crate) fn secure(
    endpoint: Endpoint,
    url: &str,
    credentials: &Credentials,
) -> Result<Endpoint, InvalidAddress> {
    let invalid = |reason: String| InvalidAddress {
        url: url.to_owned(),
        reason,
    };
    if endpoint.uri().scheme_str() != Some("https") {
        if credentials.has_tls() {
            return Err(invalid(
                "TLS settings (CA, certificate) need an https:// address".into(),
            ));
        }
        return Ok(endpoint);
    }
    // tonic's TLS uses the process's default provider: X25519 first, unless
    // the application installed its own.
    freshness_telemetry::install_crypto_provider();
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &credentials.ca {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = &credentials.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(d) = &credentials.domain {
        tls = tls.domain_name(d.clone());
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| invalid(format!("TLS: {}", crate::error_chain(&e))))
}

/// Adds the bearer token to every call.
#[derive(Clone, Debug, Default)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The token's header, or why it cannot be one.
    pub(crate) fn new(url: &str, credentials: &Credentials) -> Result<Self, InvalidAddress> {
        let from_file;
        let token = match &credentials.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| InvalidAddress {
                    url: url.to_owned(),
                    reason: format!("token file {}: {e}", path.display()),
                })?;
                from_file = text.trim().to_owned();
                Some(&from_file)
            }
            None => credentials.token.as_ref(),
        };
        match token {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| InvalidAddress {
                    url: url.to_owned(),
                    reason: "the bearer token has characters a header cannot carry".into(),
                }),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A hub client on `channel` that sends the token.
pub(crate) type Client = HubClient<InterceptedService<Channel, Bearer>>;

/// A connection to a hub and the token its calls carry.
#[derive(Clone, Debug)]
pub(crate) struct HubChannel {
    pub(crate) channel: Channel,
    pub(crate) bearer: Bearer,
}

impl HubChannel {
    /// A client over this connection.
    pub(crate) fn client(&self) -> Client {
        HubClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

/// The endpoints of a list of hubs (the replicas of one region) given as
/// one comma-separated string, `http://a:50051,http://b:50051`, in order,
/// each with its address as given and `credentials`' TLS settings.
pub(crate) fn endpoints(
    urls: &str,
    connect_timeout: Duration,
    credentials: &Credentials,
) -> Result<Vec<(String, Endpoint)>, InvalidAddress> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err(InvalidAddress {
            url: urls.to_owned(),
            reason: "no hub address".into(),
        });
    }
    list.into_iter()
        .map(|u| {
            let e = secure(endpoint(u, connect_timeout)?, u, credentials)?;
            Ok((u.to_owned(), e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_urls_and_bare_addresses() {
        let t = Duration::from_secs(1);
        assert_eq!(
            endpoint("http://127.0.0.1:50051", t)
                .unwrap()
                .uri()
                .port_u16(),
            Some(50051)
        );
        assert_eq!(
            endpoint("localhost:7", t).unwrap().uri().to_string(),
            "http://localhost:7/"
        );
        assert!(endpoint("ftp://x:1", t).is_err());
        assert!(endpoint("http://", t).is_err());
        assert!(endpoint("http://exa mple:1", t).is_err());
    }

    #[test]
    fn a_list_of_hubs_is_comma_separated() {
        let t = Duration::from_secs(1);
        let list = endpoints("http://a:1, b:2,", t, &Credentials::default()).unwrap();
        let urls: Vec<&str> = list.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(urls, ["http://a:1", "b:2"]);
        assert!(endpoints(" , ", t, &Credentials::default()).is_err());
        let bad = endpoints("http://a:1,ftp://b:2", t, &Credentials::default()).unwrap_err();
        assert_eq!(bad.url, "ftp://b:2");
    }
}
