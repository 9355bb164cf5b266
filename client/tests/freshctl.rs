//! `freshctl` as an operator runs it: the real binary against a real hub on
//! loopback.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Hub {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), freshness_hub::RunError>>,
}

impl Hub {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = freshness_hub::Config {
            listen: addr,
            hub_id: "cli-test".into(),
            region: "eu".into(),
            shutdown_grace: Duration::from_secs(2),
            ephemeral: true,
            ..freshness_hub::Config::default()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(freshness_hub::run(config, listener, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn freshctl(hub: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freshctl"));
    c.env("FRESHNESS_HUB", hub).env_remove("FRESHNESS_LOG");
    c
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(hub: &str, args: &[&str]) -> Run {
    let out = tokio::time::timeout(WAIT, freshctl(hub).args(args).output())
        .await
        .expect("freshctl finished in time")
        .expect("freshctl ran");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn publish_reports_each_event_and_is_idempotent() {
    let hub = Hub::start().await;
    let first = run(&hub.url(), &["publish", "user:42", "7", "--json"]).await;
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let obj = &json_lines(&first.stdout)[0];
    assert_eq!(obj["entity"], "user:42");
    assert_eq!(obj["version"], 7);
    assert_eq!(obj["result"], "applied");
    assert!(obj.get("complete").is_none(), "only region/global wait");

    let again = run(&hub.url(), &["publish", "user:42", "7", "--json"]).await;
    assert_eq!(json_lines(&again.stdout)[0]["result"], "duplicate");
    let older = run(&hub.url(), &["publish", "user:42", "6", "--json"]).await;
    assert_eq!(json_lines(&older.stdout)[0]["result"], "superseded");

    let region = run(
        &hub.url(),
        &[
            "publish",
            "user:43",
            "1",
            "--ack",
            "region",
            "--timeout",
            "1s",
            "--json",
        ],
    )
    .await;
    let obj = &json_lines(&region.stdout)[0];
    assert_eq!(obj["result"], "applied");
    assert_eq!(obj["complete"], true, "no node to wait for");
    assert_eq!(obj["pending"], serde_json::json!([]));

    let human = run(&hub.url(), &["publish", "user:44", "2"]).await;
    assert!(
        human.stdout.starts_with("user:44 v2: applied"),
        "{}",
        human.stdout
    );
    hub.stop().await;
}

#[tokio::test]
async fn watch_prints_one_json_object_per_event_of_its_namespaces() {
    let hub = Hub::start().await;
    let mut child = freshctl(&hub.url())
        .args([
            "watch",
            "--namespace",
            "user",
            "--node-id",
            "cli-watch",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    // The watch reports its feed on stderr; publish once it is live.
    tokio::time::timeout(WAIT, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("feed live") {
                return;
            }
        }
        panic!("watch ended before its feed was live");
    })
    .await
    .expect("live in time");
    for (e, v) in [("post:1", "1"), ("user:1", "5")] {
        assert_eq!(run(&hub.url(), &["publish", e, v]).await.code, Some(0));
    }
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("an event in time")
        .unwrap()
        .unwrap();
    let obj: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(obj["entity"], "user:1", "post is filtered out: {line}");
    assert_eq!(obj["version"], 5);
    assert_eq!(obj["origin"], "eu");
    assert!(obj["seq"].as_u64().unwrap() >= 1);
    assert!(obj["shard"].as_u64().unwrap() < 64);

    let status = run(&hub.url(), &["status", "--json"]).await;
    let s: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["region"], "eu");
    assert_eq!(s["shards"], 64);
    assert!(s["epoch"].as_u64().unwrap() > 0);
    assert_eq!(s["peers"], serde_json::json!([]));
    let node = &s["nodes"][0];
    assert_eq!(node["node_id"], "cli-watch");
    assert_eq!(node["namespaces"], serde_json::json!(["user"]));
    assert!(node["lag_events"].is_u64() && node["staleness_ms"].is_u64());
    // A watching node reads its stream: live (or parked for a moment).
    assert!(
        ["live", "parked"].contains(&node["state"].as_str().unwrap()),
        "{node}"
    );
    assert!(node["state_since_us"].as_u64().unwrap() > 0);
    assert!(node["state_for_ms"].is_u64());

    let table = run(&hub.url(), &["status"]).await;
    assert_eq!(table.code, Some(0));
    assert!(table.stdout.contains("region eu"), "{}", table.stdout);
    assert!(table.stdout.contains("cli-watch"), "{}", table.stdout);
    assert!(table.stdout.contains("STALENESS"), "{}", table.stdout);
    assert!(table.stdout.contains("STATE (for)"), "{}", table.stdout);

    child.kill().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn errors_are_one_line_and_a_failure_status() {
    let hub = Hub::start().await;
    let bad = run(&hub.url(), &["publish", "User:1", "1"]).await;
    assert_eq!(bad.code, Some(1));
    assert_eq!(bad.stderr.lines().count(), 1, "{}", bad.stderr);
    assert!(
        bad.stderr.starts_with("freshctl: error: invalid entity"),
        "{}",
        bad.stderr
    );

    let zero = run(&hub.url(), &["publish", "user:1", "0"]).await;
    assert_eq!(zero.code, Some(2));
    assert_eq!(zero.stderr.lines().count(), 1, "{}", zero.stderr);

    let addr = hub.addr;
    hub.stop().await;
    let down = run(&format!("http://{addr}"), &["status"]).await;
    assert_eq!(down.code, Some(1));
    assert_eq!(down.stderr.lines().count(), 1, "{}", down.stderr);
    let down = run(&format!("http://{addr}"), &["publish", "user:1", "1"]).await;
    assert_eq!(down.code, Some(1));
    assert_eq!(down.stderr.lines().count(), 1, "{}", down.stderr);
    assert!(!down.stderr.contains("panicked"));
}

#[tokio::test]
async fn status_watch_refreshes_until_interrupted_then_exits_cleanly() {
    let hub = Hub::start().await;
    let mut child = freshctl(&hub.url())
        .args(["status", "--watch", "--interval", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A pipe gets one snapshot after another: wait for a second one.
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut frames = 0;
    tokio::time::timeout(WAIT, async {
        while frames < 2 {
            let line = stdout
                .next_line()
                .await
                .unwrap()
                .expect("watch still running");
            if line.starts_with("freshctl status --watch") {
                assert!(line.contains("Ctrl-C to quit"), "{line}");
            }
            if line.contains("region eu") {
                frames += 1;
            }
        }
    })
    .await
    .expect("two refreshes in time");

    // Ctrl-C: SIGINT to the process (a positive pid: this one only).
    let pid = child.id().expect("running").to_string();
    let sent = Command::new("kill")
        .args(["-s", "INT", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert_eq!(status.code(), Some(0), "a clean exit on Ctrl-C");
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert_eq!(stderr, "", "nothing on stderr");

    // A hub that goes away is shown as such, and the watch keeps going.
    let addr = hub.addr;
    hub.stop().await;
    let mut child = freshctl(&format!("http://{addr}"))
        .args(["status", "--watch", "--interval", "200ms", "--json"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = tokio::time::timeout(WAIT, stdout.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .unwrap();
        let obj: Value = serde_json::from_str(&line).unwrap();
        assert!(
            obj["error"].as_str().unwrap().contains("does not answer"),
            "{line}"
        );
    }
    assert_eq!(child.try_wait().unwrap(), None, "still watching");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_tls_hub_serves_freshctl_with_a_ca_and_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // A CA and the hub's certificate for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_file = write("ca.pem", &ca_pem);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = freshness_hub::Config {
        listen: addr,
        hub_id: "cli-tls".into(),
        shutdown_grace: Duration::from_secs(2),
        ephemeral: true,
        tls_cert: Some(write("hub.pem", &cert.pem())),
        tls_key: Some(write("hub.key", &key.serialize_pem())),
        auth_tokens: Some(write(
            "tokens",
            &format!("ops {}\n", freshness_hub::auth::token_hash("ops-token")),
        )),
        auth_policy: Some(write(
            "policy.toml",
            "[principals]\nops = [\"publish:user\", \"status\"]\n",
        )),
        ..freshness_hub::Config::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(freshness_hub::run(config, listener, shutdown.clone()));
    let url = format!("https://{addr}");
    let ca = ca_file.to_str().unwrap();

    // As the README says: the CA and the token from the environment.
    let mut ok = None;
    for _ in 0..200 {
        let out = freshctl(&url)
            .env("FRESHNESS_CA", ca)
            .env("FRESHNESS_TOKEN", "ops-token")
            .args(["publish", "user:1", "1"])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            ok = Some(String::from_utf8(out.stdout).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = ok.expect("freshctl publish over TLS with a token");
    assert!(ok.starts_with("user:1 v1: applied"), "{ok}");
    let status = run(
        &url,
        &["--ca", ca, "--token", "ops-token", "status", "--json"],
    )
    .await;
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&status.stdout).unwrap()["hub_id"],
        "cli-tls"
    );
    // Refused: no token, a token without the right, no CA.
    let no_token = run(&url, &["--ca", ca, "status"]).await;
    assert_eq!(no_token.code, Some(1));
    assert!(
        no_token.stderr.contains("Unauthenticated"),
        "{}",
        no_token.stderr
    );
    let wrong_ns = run(
        &url,
        &[
            "--ca",
            ca,
            "--token",
            "ops-token",
            "publish",
            "price:1",
            "1",
        ],
    )
    .await;
    assert_eq!(wrong_ns.code, Some(1));
    assert!(
        wrong_ns.stderr.contains("PermissionDenied"),
        "{}",
        wrong_ns.stderr
    );
    assert_eq!(wrong_ns.stderr.lines().count(), 1, "{}", wrong_ns.stderr);
    let no_ca = run(&url, &["--token", "ops-token", "status"]).await;
    assert_eq!(no_ca.code, Some(1), "{}", no_ca.stderr);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
