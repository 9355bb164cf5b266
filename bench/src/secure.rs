//! The `hub-tls` target: hubs started with TLS and token authentication,
//! as a secured deployment runs them, so that their cost is measured beside
//! the plaintext hub's in the same run.
//!
//! The bench makes one CA, one certificate for `localhost`/127.0.0.1, one
//! static token and a policy granting it `publish:*`, `subscribe:*` and
//! `status`, once per process, in a directory of its own under the temp
//! dir. Every call to a `hub-tls` hub goes over TLS (rustls, the client
//! crate's stack) and carries the token, so the hub verifies a TLS session
//! per connection and authenticates and authorizes every call and hello.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use freshness_tests::pki::{Ca, token_line, write};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig};

/// What a secured hub and its clients are given.
pub struct Material {
    /// Where the files live ([`cleanup`] removes them).
    dir: PathBuf,
    /// The CA that signed the hub's certificate.
    ca_pem: String,
    /// `authorization: Bearer …` for every call.
    pub bearer: MetadataValue<Ascii>,
}

impl Material {
    /// Flags that make a started hub serve TLS and require the token.
    pub fn hub_args(&self) -> Vec<std::ffi::OsString> {
        let f = |name: &str| self.dir.join(name).into_os_string();
        vec![
            "--tls-cert".into(),
            f("hub.pem"),
            "--tls-key".into(),
            f("hub.key"),
            "--auth-tokens".into(),
            f("tokens"),
            "--auth-policy".into(),
            f("policy.toml"),
        ]
    }

    /// The clients' TLS settings: trust the bench's CA.
    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
    }
}

/// Removes the files, if they were made (at the end of the bench).
pub fn cleanup() {
    if let Some(m) = MATERIAL.get() {
        let _ = std::fs::remove_dir_all(&m.dir);
    }
}

static MATERIAL: OnceLock<Material> = OnceLock::new();

/// The material, made on first use.
pub fn material() -> Result<&'static Material> {
    if let Some(m) = MATERIAL.get() {
        return Ok(m);
    }
    let made = make().context("making the TLS hub's certificates and token")?;
    Ok(MATERIAL.get_or_init(|| made))
}

fn make() -> Result<Material> {
    let dir = std::env::temp_dir().join(format!("freshness-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca = Ca::new("freshness-bench ca");
    let hub = ca.leaf(None);
    write(&dir, "hub.pem", &hub.cert);
    write(&dir, "hub.key", &hub.key);
    // A token per process: the hub listens on loopback, for this run only.
    let token = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    write(&dir, "tokens", &token_line("bench", &token));
    write(
        &dir,
        "policy.toml",
        "[principals]\nbench = [\"publish:*\", \"subscribe:*\", \"status\"]\n",
    );
    Ok(Material {
        dir,
        ca_pem: ca.pem,
        bearer: format!("Bearer {token}").parse()?,
    })
}
