//! Certificates, keys and token lines made for one test (rcgen), shared by
//! the hub's security tests and the relay's and agent's tests against a
//! secured hub.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType, date_time_ymd,
};

/// A certificate authority made for one test.
pub struct Ca {
    /// Its certificate, PEM.
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate.
    pub cert: String,
    /// Its key.
    pub key: String,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `localhost` and 127.0.0.1 (a hub's), with `uri`
    /// as its first URI SAN when given (its principal as a client).
    pub fn leaf(&self, uri: Option<&str>) -> Leaf {
        self.leaf_valid(uri, None)
    }

    /// As [`leaf`](Self::leaf), valid only in 2020 when `expired`.
    pub fn leaf_valid(&self, uri: Option<&str>, expired: Option<()>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        if expired.is_some() {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `dir/name` whole then renames it into place, as a
/// Secret update is: a reader never sees half a file.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

/// A line of the hub's static token file: `name` authenticated by `token`.
pub fn token_line(name: &str, token: &str) -> String {
    format!("{name} {}\n", freshness_hub::auth::token_hash(token))
}

/// A hub configuration serving TLS with a certificate from a new CA, the
/// static `tokens` and `policy`, its files in `dir`; returns the CA.
pub fn secure_config(
    dir: &Path,
    config: &mut freshness_hub::Config,
    policy: &str,
    tokens: &str,
) -> Ca {
    let ca = Ca::new("test ca");
    let hub = ca.leaf(None);
    config.tls_cert = Some(write(dir, "hub.pem", &hub.cert));
    config.tls_key = Some(write(dir, "hub.key", &hub.key));
    write(dir, "ca.pem", &ca.pem);
    config.auth_policy = Some(write(dir, "policy.toml", policy));
    config.auth_tokens = Some(write(dir, "tokens", tokens));
    ca
}
