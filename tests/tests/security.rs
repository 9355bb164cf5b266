//! TLS, authentication and per-namespace permissions, over real sockets:
//! certificates and JWTs are made here (rcgen, jsonwebtoken), hubs serve
//! TLS on loopback, clients connect as nodes, writers and peers would.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::pb::{self, hub_client::HubClient};
use freshness_client::{Credentials, Publisher};
use freshness_hub::Config;
use freshness_tests::pki::{Ca, Leaf, token_line, write};
use freshness_tests::{TestHub, bind, hello, publish_request, test_config, wait_for};
use rcgen::KeyPair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A hub's files: its certificate (signed by `ca`), the client CA, the
/// policy and the token file.
struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    config: Config,
}

impl Setup {
    /// TLS with `ca`'s certificate, client certificates from `ca` (mTLS
    /// optional: `mtls`), tokens and `policy`.
    fn new(policy: &str, tokens: &str, mtls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let hub = ca.leaf(None);
        let mut config = test_config();
        config.tls_cert = Some(write(dir.path(), "hub.pem", &hub.cert));
        config.tls_key = Some(write(dir.path(), "hub.key", &hub.key));
        let ca_file = write(dir.path(), "ca.pem", &ca.pem);
        if mtls {
            config.tls_client_ca = Some(ca_file);
        }
        config.auth_policy = Some(write(dir.path(), "policy.toml", policy));
        config.auth_tokens = Some(write(dir.path(), "tokens", tokens));
        Self { dir, ca, config }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A TLS channel to `hub` that trusts `ca`, with a client certificate
/// when given.
async fn tls_channel(
    hub: &TestHub,
    ca: &str,
    client: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    Endpoint::from_shared(format!("https://{}", hub.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A node's stream over `channel`: `Ok` with the stream once welcomed.
async fn subscribe(
    channel: Channel,
    token: Option<&str>,
    hello: pb::Hello,
) -> Result<
    (
        mpsc::Sender<pb::SubscribeRequest>,
        tonic::Streaming<pb::SubscribeResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::SubscribeRequest {
        kind: Some(ReqKind::Hello(hello)),
    })
    .await
    .unwrap();
    let stream = ReceiverStream::new(rx);
    let req = match token {
        Some(t) => with_token(stream, t),
        None => tonic::Request::new(stream),
    };
    let mut inbound = HubClient::new(channel).subscribe(req).await?.into_inner();
    match inbound.message().await?.and_then(|m| m.kind) {
        Some(RespKind::Welcome(_)) => Ok((tx, inbound)),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Reads until an event for `entity` arrives (acking nothing: in-flight
/// room is ample for a test).
async fn expect_event(inbound: &mut tonic::Streaming<pb::SubscribeResponse>, entity: &str) {
    let found = tokio::time::timeout(freshness_tests::WAIT, async {
        loop {
            match inbound.message().await {
                Ok(Some(pb::SubscribeResponse {
                    kind: Some(RespKind::Events(b)),
                })) => {
                    if b.events
                        .iter()
                        .any(|d| d.event.as_ref().is_some_and(|e| e.entity == entity))
                    {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                other => panic!("stream ended before {entity}: {other:?}"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no event for {entity}");
}

/// Status over `channel` as `token`.
async fn status(channel: Channel, token: &str) -> Result<pb::StatusResponse, tonic::Status> {
    HubClient::new(channel)
        .status(with_token(pb::StatusRequest {}, token))
        .await
        .map(tonic::Response::into_inner)
}

const ADMIN: &str = "admin-token";

#[tokio::test]
async fn refused_handshakes_leave_the_hub_serving() {
    let s = Setup::new(
        "[principals]\nadmin = [\"status\"]\n\"spiffe://test/node\" = [\"status\"]\n",
        &token_line("admin", ADMIN),
        true,
    );
    let hub = TestHub::start_with(s.config.clone()).await;
    let good = s.ca.leaf(Some("spiffe://test/node"));

    // A plain-text client.
    let plain = Endpoint::from_shared(hub.url()).unwrap().connect().await;
    if let Ok(ch) = plain {
        let r = HubClient::new(ch).status(pb::StatusRequest {}).await;
        assert!(r.is_err(), "a plain-text call to a TLS hub answered");
    }
    // A client that trusts another CA.
    let other = Ca::new("other ca");
    let wrong_ca = tls_channel(&hub, &other.pem, Some(&good)).await;
    assert!(
        wrong_ca.is_err(),
        "the hub's certificate was trusted by another CA"
    );
    // Under mTLS: no client certificate, an expired one, one of another CA.
    for (what, client) in [
        ("no client certificate", None),
        (
            "an expired client certificate",
            Some(s.ca.leaf_valid(Some("spiffe://test/node"), Some(()))),
        ),
        (
            "a client certificate of another CA",
            Some(other.leaf(Some("spiffe://test/node"))),
        ),
    ] {
        let refused = match tls_channel(&hub, &s.ca.pem, client.as_ref()).await {
            Err(_) => true,
            Ok(ch) => status(ch, ADMIN).await.is_err(),
        };
        assert!(refused, "{what} was accepted");
    }
    // Garbage, and a TLS record cut short, straight on the port.
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x16\x03"[..],
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(freshness_tests::WAIT, tcp.read_to_end(&mut sink)).await;
    }
    // The hub still serves a good client: by its certificate, and by token.
    let ch = tls_channel(&hub, &s.ca.pem, Some(&good)).await.unwrap();
    let by_cert = HubClient::new(ch.clone())
        .status(pb::StatusRequest {})
        .await
        .expect("status by client certificate");
    assert_eq!(by_cert.into_inner().hub_id, "test-hub");
    status(ch, ADMIN).await.expect("status by token");
    hub.stop().await;
}

/// An Ed25519 key for signing JWTs, and its JWKS.
struct JwtKey {
    der: Vec<u8>,
    jwk: serde_json::Value,
}

impl JwtKey {
    fn ed25519(kid: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public_key_raw());
        Self {
            der: key.serialize_der(),
            jwk: serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"}),
        }
    }

    fn es256(kid: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // Uncompressed point: 0x04, x, y.
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Self {
            der: key.serialize_der(),
            jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]), "kid": kid}),
        }
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let (alg, key) = match self.jwk["kty"].as_str() {
            Some("OKP") => (
                jsonwebtoken::Algorithm::EdDSA,
                jsonwebtoken::EncodingKey::from_ed_der(&self.der),
            ),
            _ => (
                jsonwebtoken::Algorithm::ES256,
                jsonwebtoken::EncodingKey::from_ec_der(&self.der),
            ),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = self.jwk["kid"].as_str().map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn jwts_are_checked_and_publish_is_all_or_nothing_within_namespaces() {
    let mut s = Setup::new(
        "[principals]\nwriter = [\"publish:user\"]\n",
        &token_line("writer", "writer-token"),
        false,
    );
    let ed = JwtKey::ed25519("ed");
    let ec = JwtKey::es256("ec");
    let jwks = serde_json::json!({"keys": [ed.jwk, ec.jwk]}).to_string();
    s.config.auth_jwks = Some(write(s.dir.path(), "jwks.json", &jwks));
    s.config.auth_audience = "freshness-test".into();
    let hub = TestHub::start_with(s.config.clone()).await;
    let ch = tls_channel(&hub, &s.ca.pem, None).await.unwrap();
    let client = HubClient::new(ch.clone());
    let publish = |token: &str, events: &[(&str, u64)]| {
        let mut client = client.clone();
        let req = with_token(publish_request(events), token);
        async move { client.publish(req).await }
    };

    let claims = |sub: &str, aud: &str, exp: u64| {
        serde_json::json!({"sub": sub, "aud": aud, "exp": exp, "nbf": now() - 10,
            "permissions": ["publish:price", "status"]})
    };
    let good = ed.sign(&claims("pricing-job", "freshness-test", now() + 600));
    let good_ec = ec.sign(&claims("pricing-job-2", "freshness-test", now() + 600));
    let expired = ed.sign(&claims("pricing-job", "freshness-test", now() - 3600));
    let wrong_aud = ed.sign(&claims("pricing-job", "someone-else", now() + 600));
    let stranger = JwtKey::ed25519("ed");
    let bad_sig = stranger.sign(&claims("pricing-job", "freshness-test", now() + 600));
    for (what, token) in [
        ("expired", &expired),
        ("wrong audience", &wrong_aud),
        ("bad signature", &bad_sig),
        ("unknown static token", &"nope".to_owned()),
    ] {
        let e = publish(token, &[("price:1", 1)]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e:?}");
    }
    let e = HubClient::new(ch.clone())
        .publish(publish_request(&[("price:1", 1)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "no credentials");
    // Valid JWTs, EdDSA and ES256, carry their permissions.
    publish(&good, &[("price:1", 1)]).await.expect("EdDSA JWT");
    publish(&good_ec, &[("price:2", 1)])
        .await
        .expect("ES256 JWT");
    status(ch.clone(), &good)
        .await
        .expect("status carried by the JWT");
    let e = publish(&good, &[("user:9", 1)]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // A static token for `user` publishing `price:1` in a batch: refused,
    // naming the index, and nothing of the batch applied.
    let e = publish(
        "writer-token",
        &[("user:1", 5), ("user:2", 5), ("price:7", 5)],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("\"price\" (event 2)"),
        "{}",
        e.message()
    );
    let r = publish("writer-token", &[("user:1", 5)])
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results[0].outcome,
        pb::PublishOutcome::Applied as i32,
        "user:1 of the refused batch was applied"
    );
    // Status needs `status`, which the writer lacks.
    let e = status(ch, "writer-token").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    hub.stop().await;
}

#[tokio::test]
async fn hellos_outside_a_nodes_namespaces_are_refused_and_revocation_ends_the_stream() {
    let policy = "[principals]\nnode-a = [\"subscribe:user\"]\nnode-b = [\"subscribe:user\"]\nwriter = [\"publish:*\"]\n";
    let s = Setup::new(
        policy,
        &[
            token_line("node-a", "a"),
            token_line("node-b", "b"),
            token_line("writer", "w"),
        ]
        .concat(),
        false,
    );
    let hub = TestHub::start_with(s.config.clone()).await;
    let ch = tls_channel(&hub, &s.ca.pem, None).await.unwrap();
    for namespaces in [&["price"][..], &[], &["user", "price"]] {
        let e = subscribe(ch.clone(), Some("a"), hello("a", namespaces, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{namespaces:?}");
    }
    let (_ta, mut a) = subscribe(ch.clone(), Some("a"), hello("a", &["user"], None))
        .await
        .unwrap();
    let (_tb, mut b) = subscribe(ch.clone(), Some("b"), hello("b", &["user"], None))
        .await
        .unwrap();
    let mut writer = HubClient::new(ch.clone());
    writer
        .publish(with_token(publish_request(&[("user:1", 1)]), "w"))
        .await
        .unwrap();
    expect_event(&mut a, "user:1").await;
    expect_event(&mut b, "user:1").await;

    // Node a loses `subscribe:user`: its stream ends PERMISSION_DENIED.
    write(
        s.dir.path(),
        "policy.toml",
        "[principals]\nnode-b = [\"subscribe:user\"]\nwriter = [\"publish:*\"]\n",
    );
    let revoked_at = tokio::time::Instant::now();
    let end = tokio::time::timeout(freshness_tests::WAIT, async {
        loop {
            match a.message().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked stream did not end");
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    eprintln!(
        "revoked stream ended {:?} after the policy was written",
        revoked_at.elapsed()
    );
    // Node b keeps receiving.
    writer
        .publish(with_token(publish_request(&[("user:2", 1)]), "w"))
        .await
        .unwrap();
    expect_event(&mut b, "user:2").await;
    // And node a cannot come back.
    let e = subscribe(ch, Some("a"), hello("a", &["user"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    hub.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_handshakes_and_drops_no_connection() {
    let s = Setup::new(
        "[principals]\nnode = [\"subscribe:*\", \"status\"]\nwriter = [\"publish:*\"]\n",
        &[token_line("node", "n"), token_line("writer", "w")].concat(),
        false,
    );
    let hub = TestHub::start_with(s.config.clone()).await;
    let ch = tls_channel(&hub, &s.ca.pem, None).await.unwrap();
    let (_t, mut node) = subscribe(ch.clone(), Some("n"), hello("n", &[], None))
        .await
        .unwrap();
    // The new certificate comes from a new CA, so a client that trusts only
    // that one shows which certificate a handshake got.
    let next = Ca::new("next ca");
    assert!(tls_channel(&hub, &next.pem, None).await.is_err());
    let leaf = next.leaf(None);
    write(s.dir.path(), "hub.key", &leaf.key);
    write(s.dir.path(), "hub.pem", &leaf.cert);
    let fresh = wait_for(|| async { tls_channel(&hub, &next.pem, None).await.ok() }).await;
    status(fresh, "n")
        .await
        .expect("status over the new certificate");
    // The connection made before the rotation still works, both ways.
    HubClient::new(ch.clone())
        .publish(with_token(publish_request(&[("user:1", 1)]), "w"))
        .await
        .expect("publish on the old connection");
    expect_event(&mut node, "user:1").await;
    assert!(s.path("hub.pem").exists());
    hub.stop().await;
}

#[tokio::test]
async fn regions_replicate_over_mtls_and_a_peer_without_replicate_is_refused() {
    // One CA for the deployment; each hub's certificate names its region.
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("deployment ca");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let policy = write(
        dir.path(),
        "policy.toml",
        "[principals]\n\"spiffe://test/us\" = [\"replicate\"]\nwriter = [\"publish:*\"]\nnode = [\"subscribe:*\"]\n",
    );
    let tokens = write(
        dir.path(),
        "tokens",
        &[token_line("writer", "w"), token_line("node", "n")].concat(),
    );
    let hub_config = |region: &str| {
        let leaf = ca.leaf(Some(&format!("spiffe://test/{region}")));
        let mut c = test_config();
        c.region = region.into();
        c.tls_cert = Some(write(dir.path(), &format!("{region}.pem"), &leaf.cert));
        c.tls_key = Some(write(dir.path(), &format!("{region}.key"), &leaf.key));
        c.tls_client_ca = Some(ca_file.clone());
        c.peer_ca = Some(ca_file.clone());
        c.auth_policy = Some(policy.clone());
        c.auth_tokens = Some(tokens.clone());
        c
    };
    let eu = TestHub::start_with(hub_config("eu")).await;
    let eu_url = format!("https://127.0.0.1:{}", eu.addr.port());
    let mut us_config = hub_config("us");
    us_config.peers.insert("eu".into(), eu_url.clone());
    let us = TestHub::start_with_listener(bind().await, us_config);
    let mut ap_config = hub_config("ap");
    ap_config.peers.insert("eu".into(), eu_url);
    let ap = TestHub::start_with_listener(bind().await, ap_config);

    // Clients of these hubs need a certificate (mTLS) and a token.
    let client_leaf = ca.leaf(Some("spiffe://test/client"));
    let us_ch = tls_channel(&us, &ca.pem, Some(&client_leaf)).await.unwrap();
    let (_t, mut us_node) = subscribe(us_ch.clone(), Some("n"), hello("n", &[], None))
        .await
        .unwrap();

    // A writer in eu, through the client crate with its credentials.
    let dir_path = dir.path();
    let creds = Credentials::from_files(
        Some(&dir_path.join("ca.pem")),
        Some(&write(dir_path, "client.pem", &client_leaf.cert)),
        Some(&write(dir_path, "client.key", &client_leaf.key)),
    )
    .unwrap()
    .domain("localhost")
    .bearer_token("w");
    let publisher = Publisher::builder(format!("https://127.0.0.1:{}", eu.addr.port()))
        .credentials(creds)
        .build()
        .unwrap();
    publisher
        .publish(
            "user:1".parse().unwrap(),
            freshness_client::Version::new(1).unwrap(),
        )
        .await
        .expect("publish in eu over mTLS with a token");
    expect_event(&mut us_node, "user:1").await;

    // ap's certificate is valid but not granted `replicate`: its link is
    // refused, and its status says why.
    let ap_ch = tls_channel(&ap, &ca.pem, Some(&client_leaf)).await.unwrap();
    let admin_policy =
        std::fs::read_to_string(&policy).unwrap() + "\"spiffe://test/client\" = [\"status\"]\n";
    write(dir.path(), "policy.toml", &admin_policy);
    let error = wait_for(|| {
        let ch = ap_ch.clone();
        async move {
            let s = HubClient::new(ch).status(pb::StatusRequest {}).await.ok()?;
            let peer = s
                .into_inner()
                .peers
                .into_iter()
                .find(|p| p.region == "eu")?;
            (!peer.connected && peer.last_error.contains("PermissionDenied"))
                .then_some(peer.last_error)
        }
    })
    .await;
    assert!(error.contains("may not replicate"), "{error}");
    drop(publisher);
    ap.stop().await;
    us.stop().await;
    eu.stop().await;
}

#[tokio::test]
async fn health_is_open_and_reflection_needs_a_principal() {
    let s = Setup::new("[principals]\n", &token_line("anyone", "t"), false);
    let hub = TestHub::start_with(s.config.clone()).await;
    let ch = tls_channel(&hub, &s.ca.pem, None).await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch);
    let list = || tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let e = reflection
        .server_reflection_info(futures::stream::iter([list()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let ok = reflection
        .server_reflection_info(with_token(futures::stream::iter([list()]), "t"))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    hub.stop().await;
}

#[tokio::test]
async fn the_metrics_listener_serves_tls_when_given_a_certificate() {
    let s = Setup::new(
        "[principals]\nops = [\"status\"]\n",
        &token_line("ops", "t"),
        false,
    );
    let mut config = s.config.clone();
    config.metrics_tls_cert = config.tls_cert.clone();
    config.metrics_tls_key = config.tls_key.clone();
    let hub = TestHub::start_with_http(config).await;
    let http = hub.http.unwrap();
    let request = b"GET /status.json HTTP/1.1\r\nhost: hub\r\nauthorization: Bearer t\r\nconnection: close\r\n\r\n";

    // Plain HTTP gets no answer.
    let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut plain = Vec::new();
    let _ = tokio::time::timeout(freshness_tests::WAIT, tcp.read_to_end(&mut plain)).await;
    assert!(!plain.starts_with(b"HTTP/1.1"), "plain HTTP was answered");

    // Over TLS, trusting the CA, the page's data.
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(s.ca.pem.as_bytes()).unwrap())
        .unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS to the metrics listener");
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(freshness_tests::WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("test-hub"), "{answer}");
    hub.stop().await;
}

/// One HTTP/1.1 request to the plain metrics listener; the status line and
/// the whole answer.
async fn http_get(addr: std::net::SocketAddr, path: &str, authorization: Option<&str>) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = authorization
        .map(|a| format!("authorization: {a}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nhost: hub\r\n{auth}connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(freshness_tests::WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn the_status_page_needs_the_status_permission() {
    let s = Setup::new(
        "[principals]\nops = [\"status\"]\nwriter = [\"publish:*\"]\n",
        &[token_line("ops", "ops-token"), token_line("writer", "w")].concat(),
        false,
    );
    let hub = TestHub::start_with_http(s.config.clone()).await;
    let http = hub.http.unwrap();
    let basic = |token: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("anyone:{token}"))
        )
    };
    for path in ["/", "/status.json", "/status.js"] {
        // No credentials: a 401 that makes a browser ask, nothing shown.
        let answer = http_get(http, path, None).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{path}: {answer}"
        );
        assert!(!answer.contains("test-hub"), "{path}: {answer}");
        // A known caller without `status`: forbidden, and told why.
        let answer = http_get(http, path, Some(&basic("w"))).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{path}: {answer}");
        assert!(
            answer.contains("writer may not read status"),
            "{path}: {answer}"
        );
        // An unknown token: unauthenticated.
        let answer = http_get(http, path, Some("Bearer nope")).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
    }
    // The token with `status`, as a browser sends it (Basic) or as a
    // script does (Bearer).
    for authorization in [basic("ops-token"), "Bearer ops-token".to_owned()] {
        let answer = http_get(http, "/status.json", Some(&authorization)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("test-hub"), "{answer}");
    }
    let answer = http_get(http, "/", Some(&basic("ops-token"))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Scrapers need no credentials: /metrics names no node and no entity.
    // (A hub in a test process has no recorder; it says so, unasked for a
    // token. The hub binary's page is checked in metrics_endpoint.rs.)
    let answer = http_get(http, "/metrics", None).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.contains("no metrics recorder"),
        "{answer}"
    );
    hub.stop().await;
}
