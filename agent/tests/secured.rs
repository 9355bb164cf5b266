//! The agent against a hub serving TLS with authentication, over real
//! sockets (certificates made here): with a token or a client certificate
//! whose policy grants `subscribe` it keeps Redis fresh; without the right
//! it is refused and says so; bad credential settings exit 64.

mod common;

use std::path::Path;

use common::*;
use freshness_client::{Credentials, Publisher, Version};
use freshness_tests::pki::{Ca, secure_config, token_line, write};
use freshness_tests::{TestHub, WAIT, test_config};

const POLICY: &str = "[principals]\n\
    writer = [\"publish:*\"]\n\
    agent = [\"subscribe:*\"]\n\
    pricer = [\"subscribe:price\"]\n\
    \"spiffe://test/agent\" = [\"subscribe:*\"]\n";

/// A TLS hub with token auth (and client certificates from its CA when
/// `mtls`); its files (the CA: `ca.pem`) in `dir`.
async fn secured_hub(dir: &Path, mtls: bool) -> (TestHub, Ca) {
    let (hub, ca, _) = secured_hub_config(dir, mtls).await;
    (hub, ca)
}

/// As [`secured_hub`], with the hub's configuration, to start it again.
async fn secured_hub_config(dir: &Path, mtls: bool) -> (TestHub, Ca, freshness_hub::Config) {
    let mut config = test_config();
    let tokens = [
        token_line("writer", "writer-token"),
        token_line("agent", "agent-token"),
        token_line("pricer", "pricer-token"),
    ]
    .concat();
    let ca = secure_config(dir, &mut config, POLICY, &tokens);
    if mtls {
        config.tls_client_ca = Some(dir.join("ca.pem"));
    }
    (TestHub::start_with(config.clone()).await, ca, config)
}

fn https(hub: &TestHub) -> String {
    format!("https://127.0.0.1:{}", hub.addr.port())
}

/// Publishes `user:ID` at `version` as the writer.
async fn publish_as_writer(url: &str, credentials: Credentials, id: u32, version: u64) {
    let publisher = Publisher::builder(url)
        .credentials(credentials.bearer_token("writer-token"))
        .build()
        .unwrap();
    publisher
        .publish(
            format!("user:{id}").parse().unwrap(),
            Version::new(version).unwrap(),
        )
        .await
        .expect("publish as the writer");
}

#[tokio::test]
async fn an_agent_with_a_token_over_tls_keeps_redis_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _ca) = secured_hub(dir.path(), false).await;
    let url = https(&hub);
    let ca = dir.path().join("ca.pem");
    let token = write(dir.path(), "token", "agent-token\n");
    let redis = Redis::shared(10).await;
    let _agent = Agent::start(
        &url,
        &redis,
        "agent-tls-token",
        &[
            "--map",
            "user=cache:user:{id}",
            "--ca",
            ca.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
        ],
    )
    .await;
    redis.wait_ready().await;
    redis.set("cache:user:1", "ada").await;
    redis.set("cache:user:2", "bob").await;
    let creds = Credentials::from_files(Some(&ca), None, None).unwrap();
    publish_as_writer(&url, creds, 1, 1).await;
    redis.wait_gone("cache:user:1").await;
    assert!(redis.exists("cache:user:2").await);
    hub.stop().await;
}

#[tokio::test]
async fn the_token_file_is_read_again_for_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _ca, config) = secured_hub_config(dir.path(), false).await;
    let addr = hub.addr;
    let url = https(&hub);
    let ca = dir.path().join("ca.pem");
    let token = write(dir.path(), "token", "agent-token\n");
    let redis = Redis::shared(13).await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_freshness-agent"))
        .args(["--hub", &url, "--redis", &redis.url, "--no-metrics"])
        .args([
            "--node-id",
            "agent-rotated",
            "--map",
            "user=cache:user:{id}",
        ])
        .args(["--feed-interval", "50ms", "--tombstone-ttl", "300ms"])
        .args(["--ca", ca.to_str().unwrap()])
        .args(["--token-file", token.to_str().unwrap()])
        .env("FRESHNESS_LOG", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    redis.wait_live().await;
    // The Secret now holds a token the hub does not know; the hub restarts,
    // and the agent's next connection sends the new token, which is refused.
    write(dir.path(), "token", "unknown-token\n");
    hub.stop().await;
    let hub = TestHub::start_on(addr, config).await;
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the agent stops once its new token is refused")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_with_a_client_certificate_keeps_redis_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, ca) = secured_hub(dir.path(), true).await;
    let url = https(&hub);
    let leaf = ca.leaf(Some("spiffe://test/agent"));
    let cert = write(dir.path(), "agent.pem", &leaf.cert);
    let key = write(dir.path(), "agent.key", &leaf.key);
    let ca_file = dir.path().join("ca.pem");
    let redis = Redis::shared(11).await;
    // Through the environment, as a Deployment passes them.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_freshness-agent"))
        .args(["--map", "user=cache:user:{id}", "--no-metrics"])
        .args(["--persist-interval", "20ms", "--feed-interval", "50ms"])
        .args(["--tombstone-ttl", "300ms"])
        .env("FRESHNESS_AGENT_HUB", &url)
        .env("FRESHNESS_AGENT_REDIS", &redis.url)
        .env("FRESHNESS_AGENT_NODE_ID", "agent-mtls")
        .env("FRESHNESS_AGENT_CA", &ca_file)
        .env("FRESHNESS_AGENT_CERT", &cert)
        .env("FRESHNESS_AGENT_KEY", &key)
        .env("FRESHNESS_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    redis.wait_ready().await;
    redis.set("cache:user:7", "eve").await;
    // The writer needs a client certificate too under mTLS.
    let writer = ca.leaf(Some("spiffe://test/writer"));
    let creds = Credentials::from_files(Some(&ca_file), None, None)
        .unwrap()
        .client_identity_pem(writer.cert, writer.key);
    publish_as_writer(&url, creds, 7, 1).await;
    redis.wait_gone("cache:user:7").await;
    child.kill().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_without_the_right_is_refused_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _ca) = secured_hub(dir.path(), false).await;
    let url = https(&hub);
    let ca = dir.path().join("ca.pem");
    let redis = Redis::shared(12).await;
    // `pricer` may subscribe to `price` only; the agent asks for every
    // namespace.
    for (token, code) in [
        ("pricer-token", "PermissionDenied"),
        ("nobody", "Unauthenticated"),
    ] {
        let out = tokio::time::timeout(
            WAIT,
            tokio::process::Command::new(env!("CARGO_BIN_EXE_freshness-agent"))
                .args(["--hub", &url, "--redis", &redis.url, "--no-metrics"])
                .args(["--node-id", "agent-denied", "--map", "user=cache:user:{id}"])
                .args(["--ca", ca.to_str().unwrap(), "--token", token])
                .env("FRESHNESS_LOG", "off")
                .output(),
        )
        .await
        .expect("a refused agent stops")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert_ne!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("refused") && stderr.contains(code),
            "{token}: {stderr}"
        );
    }
    hub.stop().await;
}

#[tokio::test]
async fn bad_credential_settings_exit_64_naming_the_setting_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let leaf = ca.leaf(None);
    let cert = write(dir.path(), "client.pem", &leaf.cert);
    let junk = write(dir.path(), "junk.key", "not a key\n");
    let missing = dir.path().join("missing.pem");
    let (cert, junk, missing) = (
        cert.to_str().unwrap(),
        junk.to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    let hub = "https://127.0.0.1:1";
    for (args, words) in [
        (vec!["--hub", hub, "--ca", missing], vec!["`ca`", missing]),
        (vec!["--hub", hub, "--cert", cert], vec!["`key`", cert]),
        (
            vec!["--hub", hub, "--cert", cert, "--key", junk],
            vec!["`key`", junk],
        ),
        (
            vec!["--hub", hub, "--token-file", missing],
            vec!["`token_file`", missing],
        ),
        (
            vec!["--hub", "http://127.0.0.1:1", "--ca", cert],
            vec!["`ca`", "https://"],
        ),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_freshness-agent"))
            .args(["--map", "user=cache:user:{id}", "--no-metrics"])
            .args(&args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        for w in words {
            assert!(stderr.contains(w), "{args:?}: {w:?} not in {stderr}");
        }
    }
}
