//! The TLS provider every Freshness program uses, client and server.

/// The rustls crypto provider of every Freshness program, client and
/// server: ring (no C toolchain to build), with X25519 as the preferred key
/// exchange, then P-256, then P-384.
///
/// rustls 0.23's ring provider lists P-384 first, so a rustls client offers
/// a P-384 key share, the server takes the client's order, and both sides
/// pay for P-384, which ring computes with its generic bignum code: about
/// 0.8 ms of CPU per handshake on each side on the reference machine,
/// several times X25519's (BENCHMARKS.md, "TLS handshakes and the key
/// exchange"). rustls marks ring's provider deprecated for its lack of
/// post-quantum key exchange; moving to aws-lc-rs is a feature switch.
#[allow(deprecated)]
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{default_provider, kx_group};
    rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..default_provider()
    }
}

/// Makes [`crypto_provider`] the process's default, which tonic's TLS
/// clients (a hub's peer links, the client crate, the relay, the bench) use,
/// unless the process already installed one of its own. Cheap and
/// idempotent: call it before making a TLS client.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // A race with another installer leaves theirs: fine either way.
        let _ = crypto_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ClientConfig, ClientConnection, NamedGroup, RootCertStore, ServerConfig};
    use rustls::{ServerConnection, crypto::CryptoProvider};

    use super::*;

    /// A rustls client built on the process default (as tonic builds
    /// one) negotiates X25519 with a server of the same provider, after
    /// [`install_crypto_provider`]: in memory, a real handshake.
    #[test]
    fn a_client_on_the_installed_default_negotiates_x25519() {
        install_crypto_provider();
        let default = CryptoProvider::get_default().expect("installed");
        assert_eq!(default.kx_groups[0].name(), NamedGroup::X25519);

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let server = ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut c =
            ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut wire = Vec::new();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking(), "the handshake finished");
        let group = c.negotiated_key_exchange_group().map(|g| g.name());
        assert_eq!(group, Some(NamedGroup::X25519));
    }

    /// What the fix is for: rustls' own ring provider puts P-384 first.
    #[test]
    #[allow(deprecated)]
    fn rustls_ring_default_would_offer_p384_first() {
        let theirs = rustls::crypto::ring::default_provider();
        assert_eq!(theirs.kx_groups[0].name(), NamedGroup::secp384r1);
    }
}
