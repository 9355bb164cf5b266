//! The relay against a hub serving TLS with token authentication, over real
//! sockets (certificates made here): a token whose policy grants
//! `publish:user` delivers the rows; one without that right leaves them in
//! the outbox, neither deleted nor dead-lettered, and counts why; bad
//! credential settings stop the relay at start with exit 64.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::*;
use freshness_client::Credentials;
use freshness_tests::pki::{secure_config, token_line, write};
use freshness_tests::test_config;

const POLICY: &str = "[principals]\n\
    writer = [\"publish:user\"]\n\
    pricer = [\"publish:price\"]\n\
    node = [\"subscribe:*\"]\n";

/// A TLS hub with token auth; its files (and the CA, `ca.pem`) in `dir`.
async fn secured_hub(dir: &Path) -> TestHub {
    let mut config = test_config();
    let tokens = [
        token_line("writer", "writer-token"),
        token_line("pricer", "pricer-token"),
        token_line("node", "node-token"),
    ]
    .concat();
    secure_config(dir, &mut config, POLICY, &tokens);
    TestHub::start_with(config).await
}

fn https(hub: &TestHub) -> String {
    format!("https://127.0.0.1:{}", hub.addr.port())
}

async fn dead_rows(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM freshness_outbox_dead", &[])
        .await
        .expect("count the dead letters")
        .get(0)
}

#[tokio::test]
async fn a_relay_with_publish_rights_delivers_and_one_without_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let hub = secured_hub(dir.path()).await;
    let url = https(&hub);
    let ca = dir.path().join("ca.pem");
    let node = Node::start_with(
        &url,
        Credentials::from_files(Some(&ca), None, None)
            .unwrap()
            .bearer_token("node-token"),
    )
    .await;
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let rows: Vec<(String, i64)> = (0..20).map(|i| (format!("user:{i}"), 1)).collect();
    commit(&mut client, &rows).await;

    // A token that may publish `price` only: every call is refused, the
    // rows stay, nothing is dead-lettered, and the refusal is counted.
    let token = write(dir.path(), "token", "pricer-token\n");
    let ca_arg = ca.to_str().unwrap();
    let token_arg = token.to_str().unwrap();
    let relay = RelayProcess::start(
        &db.url(),
        &url,
        &["--ca", ca_arg, "--token-file", token_arg],
    );
    let denied = wait_for(|| async {
        relay
            .metric_with(
                "freshness_relay_publish_errors_total",
                "code=\"permission_denied\"",
            )
            .await
            .filter(|n| *n >= 2.0)
    })
    .await;
    assert!(denied >= 2.0);
    assert_eq!(db.depth().await, 20, "refused rows stay in the outbox");
    assert_eq!(dead_rows(&db).await, 0, "refused rows are not dead letters");
    assert_eq!(
        relay.metric("freshness_relay_rows_published_total").await,
        None,
        "nothing was published"
    );
    assert!(!node.has("user:0", 1));

    // The Secret is rotated to a token with the right: the relay reads the
    // file again for its next call and delivers every row.
    write(dir.path(), "token", "writer-token\n");
    let expected: HashSet<(String, u64)> =
        rows.iter().map(|(e, v)| (e.clone(), *v as u64)).collect();
    node.wait_all(&expected).await;
    wait_for(|| async { (db.depth().await == 0).then_some(()) }).await;
    assert_eq!(dead_rows(&db).await, 0);
    relay.kill().await;

    // A token given inline works the same, for new rows.
    let more: Vec<(String, i64)> = (20..30).map(|i| (format!("user:{i}"), 1)).collect();
    commit(&mut client, &more).await;
    let relay = RelayProcess::start(
        &db.url(),
        &url,
        &["--ca", ca_arg, "--token", "writer-token"],
    );
    let expected: HashSet<(String, u64)> =
        more.iter().map(|(e, v)| (e.clone(), *v as u64)).collect();
    node.wait_all(&expected).await;
    relay.kill().await;
    node.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_relay_without_a_token_or_the_ca_is_refused_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = secured_hub(dir.path()).await;
    let url = https(&hub);
    let db = TestDb::create().await;
    let mut client = db.client().await;
    commit(&mut client, &[("user:1".into(), 1)]).await;
    let ca = dir.path().join("ca.pem");
    // The CA but no token: UNAUTHENTICATED, counted.
    let relay = RelayProcess::start(&db.url(), &url, &["--ca", ca.to_str().unwrap()]);
    wait_for(|| async {
        relay
            .metric_with(
                "freshness_relay_publish_errors_total",
                "code=\"unauthenticated\"",
            )
            .await
    })
    .await;
    relay.kill().await;
    // A token but not the CA: the handshake fails, counted as unavailable.
    let relay = RelayProcess::start(&db.url(), &url, &["--token", "writer-token"]);
    wait_for(|| async {
        relay
            .metric_with(
                "freshness_relay_publish_errors_total",
                "code=\"unavailable\"",
            )
            .await
    })
    .await;
    relay.kill().await;
    assert_eq!(db.depth().await, 1);
    assert_eq!(dead_rows(&db).await, 0);
    hub.stop().await;
}

/// Runs `freshness-relay run` with `args` and expects exit 64 and one line
/// on stderr holding every one of `words`.
async fn refused(args: &[&str], words: &[&str]) {
    let out = tokio::process::Command::new(RELAY)
        .arg("run")
        .args(["--database-url", "postgres://postgres@127.0.0.1/test"])
        .args(args)
        .env("FRESHNESS_LOG", "off")
        .output()
        .await
        .expect("run freshness-relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    for w in words {
        assert!(stderr.contains(w), "{args:?}: {w:?} not in {stderr}");
    }
}

#[tokio::test]
async fn bad_credential_settings_stop_the_relay_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = freshness_tests::pki::Ca::new("ca");
    let leaf = ca.leaf(None);
    let cert = write(dir.path(), "client.pem", &leaf.cert);
    let key = write(dir.path(), "client.key", &leaf.key);
    let junk = write(dir.path(), "junk.key", "not a key\n");
    let empty = write(dir.path(), "empty-token", "\n");
    let missing = dir.path().join("missing.pem");
    let (cert, key, junk, empty, missing) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        junk.to_str().unwrap(),
        empty.to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    let hub = ["--hub", "https://127.0.0.1:1"];
    refused(&[&hub[..], &["--ca", missing]].concat(), &["`ca`", missing]).await;
    refused(
        &[&hub[..], &["--cert", cert]].concat(),
        &["`cert`", cert, "set `key` too"],
    )
    .await;
    refused(
        &[&hub[..], &["--cert", cert, "--key", junk]].concat(),
        &["`key`", junk],
    )
    .await;
    refused(
        &[&hub[..], &["--cert", cert, "--key", missing]].concat(),
        &["`key`", missing],
    )
    .await;
    refused(
        &[&hub[..], &["--token-file", missing]].concat(),
        &["`token_file`", missing],
    )
    .await;
    refused(
        &[&hub[..], &["--token-file", empty]].concat(),
        &["`token_file`", empty],
    )
    .await;
    refused(
        &[
            "--hub",
            "http://127.0.0.1:1",
            "--ca",
            cert,
            "--cert",
            cert,
            "--key",
            key,
        ],
        &["`ca`", "https://"],
    )
    .await;
    // The same through the environment and the file.
    let toml = write(
        dir.path(),
        "relay.toml",
        &format!("hub = \"https://127.0.0.1:1\"\ntoken_file = \"{missing}\"\n"),
    );
    refused(
        &["--config", toml.to_str().unwrap()],
        &["`token_file`", missing],
    )
    .await;
    let out = tokio::process::Command::new(RELAY)
        .args([
            "run",
            "--database-url",
            "postgres://postgres@127.0.0.1/test",
        ])
        .env("FRESHNESS_RELAY_HUB", "https://127.0.0.1:1")
        .env("FRESHNESS_RELAY_CA", missing)
        .env("FRESHNESS_LOG", "off")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("`ca`") && stderr.contains(missing),
        "{stderr}"
    );
}
