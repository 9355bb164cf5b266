//! Hub replicas on NATS JetStream (`--log jetstream`), tested on the hub
//! binary and a real `nats-server` that each test starts on a free port
//! with its own store directory (never the shared one on 4222).
//!
//! - Three replicas of one region, a node and a writer on each, the same
//!   entities: each replica is SIGKILLed in turn and started again while
//!   the writers publish. No node is ever reset, its seqs never skip or
//!   repeat, no entity's version ever goes back at any node, and every node
//!   ends on the newest version of every entity.
//! - Concurrent publishes of the same `(entity, version)` at two replicas:
//!   exactly one `APPLIED`.
//! - JetStream unreachable at start: exit 64 with one line; a server whose
//!   JetStream does not answer yet: the replica waits and then serves;
//!   unreachable later: publishes refused `UNAVAILABLE` with a retry hint,
//!   and nothing lost when it is back.

#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::pb::{self, hub_client::HubClient};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SHARDS: u32 = 8;
const WAIT: Duration = Duration::from_secs(30);

/// Ports below the kernel's ephemeral range: a server restarted on its
/// port finds it free (see `freshness_tests::free_port`).
use freshness_tests::free_port;

/// A `nats-server` with JetStream of this test's own, alone or one of a
/// cluster.
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// `--cluster`/`--routes` arguments and the monitoring port, in a cluster.
    cluster: Option<(Vec<String>, u16)>,
    /// Whether the server runs JetStream (`-js`).
    jetstream: bool,
}

impl Nats {
    fn start(dir: &Path) -> Self {
        Self::alone(dir, true)
    }

    /// A plain NATS server: JetStream requests find no responder, as while
    /// JetStream is not ready yet.
    fn start_without_jetstream(dir: &Path) -> Self {
        Self::alone(dir, false)
    }

    fn alone(dir: &Path, jetstream: bool) -> Self {
        let mut nats = Self {
            child: None,
            port: free_port(),
            dir: dir.to_owned(),
            cluster: None,
            jetstream,
        };
        nats.restart();
        nats
    }

    /// Three servers routed to each other as one JetStream cluster; returns
    /// when its meta group has a leader (every server's `/healthz` is OK).
    fn cluster(dir: &Path) -> Vec<Self> {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers: Vec<Self> = (0..3)
            .map(|i| {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                    .collect();
                let args = vec![
                    "--cluster_name".into(),
                    "fresh".into(),
                    "-n".into(),
                    format!("n{i}"),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", routes[i]),
                    "--routes".into(),
                    others.join(","),
                ];
                Self {
                    child: None,
                    port: free_port(),
                    dir: dir.join(format!("n{i}")),
                    cluster: Some((args, free_port())),
                    jetstream: true,
                }
            })
            .collect();
        for s in &mut servers {
            s.restart();
        }
        for s in &servers {
            s.wait_healthy();
        }
        servers
    }

    /// Waits until the server's `/healthz` says JetStream is ready.
    fn wait_healthy(&self) {
        let Some((_, monitor)) = &self.cluster else {
            return;
        };
        for _ in 0..3_000 {
            use std::io::{Read, Write};
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", *monitor)) {
                let _ = c.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = c.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("nats-server on {} did not become healthy", self.port);
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and store) and waits
    /// until it accepts connections.
    fn restart(&mut self) {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(&self.dir);
        }
        if let Some((args, monitor)) = &self.cluster {
            cmd.args(args).args(["-m", &monitor.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed");
        self.child = Some(child);
        let mut tries = 0;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            tries += 1;
            assert!(tries < 3_000, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A hub replica process.
struct Replica {
    child: Child,
    url: String,
    stderr: PathBuf,
}

impl Replica {
    async fn start(dir: &Path, name: &str, nats: &str) -> Self {
        Self::start_with(dir, name, nats, &[]).await
    }

    async fn start_with(dir: &Path, name: &str, nats: &str, extra: &[&str]) -> Self {
        Self::launch(dir, name, "js-test", free_port(), nats, extra).await
    }

    /// A replica `name` of `region` on `port`, once its Status answers.
    async fn launch(
        dir: &Path,
        name: &str,
        region: &str,
        port: u16,
        nats: &str,
        extra: &[&str],
    ) -> Self {
        let stderr = dir.join(format!("{name}-{port}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_freshness-hub"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--shards", &SHARDS.to_string()])
            .args(["--hub-id", name, "--region", region])
            .args(["--log", "jetstream", "--nats-url", nats])
            .args(["--progress-interval", "50ms"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Appended: a replica started again on its port keeps one file.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr)
                    .expect("stderr file"),
            )
            .spawn()
            .expect("start freshness-hub");
        let mut r = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stderr,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = r.child.try_wait().expect("child status") {
                panic!("{name} exited with {status}: {}", r.stderr_text());
            }
            if let Ok(mut c) = HubClient::connect(r.url.clone()).await
                && c.status(pb::StatusRequest {}).await.is_ok()
            {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the hub");
        self.child.wait().expect("reap the hub");
    }

    async fn status(&self) -> pb::StatusResponse {
        HubClient::connect(self.url.clone())
            .await
            .expect("connect")
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn status(url: &str) -> pb::StatusResponse {
    HubClient::connect(url.to_owned())
        .await
        .expect("connect")
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

fn event(entity: &str, version: u64) -> pb::Event {
    pb::Event {
        entity: entity.to_owned(),
        version,
        ..Default::default()
    }
}

/// What a node saw: the newest version of each entity, and its cursor.
#[derive(Default)]
struct Seen {
    versions: HashMap<String, u64>,
    cursor: Option<pb::Cursor>,
    resets: usize,
    reconnects: usize,
}

/// A node that follows the replicas in `urls`, starting at `first`, and
/// moves to the next one whenever its stream breaks, resuming from its
/// cursor. Panics on a reset, a gap or repeat of seqs, or a version that
/// goes back.
async fn node(
    name: String,
    urls: Arc<Mutex<Vec<String>>>,
    first: usize,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let mut at = first;
    while !stop.load(Ordering::Relaxed) {
        let url = {
            let urls = urls.lock();
            urls[at % urls.len()].clone()
        };
        at += 1;
        let Ok(client) = HubClient::connect(url.clone()).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut client = client.max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        let resume = seen.lock().cursor.clone();
        let resuming = resume.is_some();
        let _ = tx
            .send(pb::SubscribeRequest {
                kind: Some(ReqKind::Hello(pb::Hello {
                    node_id: name.clone(),
                    resume,
                    ..Default::default()
                })),
            })
            .await;
        let Ok(resp) = client.subscribe(ReceiverStream::new(rx)).await else {
            continue;
        };
        let mut stream = resp.into_inner();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                () = async {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                } => return,
            };
            let Ok(Some(msg)) = msg else { break };
            let ack = {
                let mut s = seen.lock();
                match msg.kind {
                    Some(RespKind::Welcome(w)) => {
                        assert_eq!(w.resumed, resuming, "{name} at {url}: welcome.resumed");
                        let c = w.cursor.expect("welcome cursor");
                        if let Some(old) = &s.cursor {
                            assert_eq!(old.epoch, c.epoch, "{name} at {url}: the epoch changed");
                            assert_eq!(old.seqs, c.seqs, "{name} at {url}: resumed elsewhere");
                            s.reconnects += 1;
                        }
                        s.cursor = Some(c);
                        None
                    }
                    Some(RespKind::Events(batch)) => {
                        let cursor = s.cursor.as_mut().expect("a cursor");
                        let mut versions = Vec::new();
                        for e in &batch.events {
                            let head = &mut cursor.seqs[e.shard as usize];
                            assert_eq!(
                                e.seq,
                                *head + 1,
                                "{name} at {url}: shard {} sent seq {} after {}",
                                e.shard,
                                e.seq,
                                head
                            );
                            *head = e.seq;
                            // Gap markers carry no event.
                            if let Some(ev) = &e.event {
                                versions.push((ev.entity.clone(), ev.version));
                            }
                        }
                        let ack = cursor.clone();
                        for (entity, version) in versions {
                            let prev = s.versions.entry(entity.clone()).or_default();
                            assert!(
                                version > *prev,
                                "{name} at {url}: {entity} went from v{prev} to v{version}"
                            );
                            *prev = version;
                        }
                        Some(ack)
                    }
                    Some(RespKind::Reset(r)) => {
                        s.resets += 1;
                        panic!("{name} at {url}: reset {r:?}");
                    }
                    _ => None,
                }
            };
            if let Some(ack) = ack {
                let _ = tx
                    .send(pb::SubscribeRequest {
                        kind: Some(ReqKind::Ack(pb::Ack {
                            cursor: Some(ack),
                            applied: None,
                        })),
                    })
                    .await;
            }
        }
    }
}

/// Waits until every node has seen the newest version of every entity in
/// `newest`; fails after [`WAIT`] naming the nodes behind.
async fn converge(seens: &[Arc<Mutex<Seen>>], newest: &HashMap<String, u64>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let behind: Vec<String> = seens
            .iter()
            .enumerate()
            .flat_map(|(n, s)| {
                let s = s.lock();
                newest
                    .iter()
                    .filter(|(e, v)| s.versions.get(*e) != Some(v))
                    .map(|(e, v)| format!("node {n} {e}: {:?} of v{v}", s.versions.get(e)))
                    .collect::<Vec<_>>()
            })
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nodes behind: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writer `id` of `writers`, at replica `id` first: publishes batches of
/// the shared entities with versions only it uses (`k * writers + id + 1`),
/// and retries a call that fails at the next replica until it is answered.
/// Records the newest version it sent per entity.
async fn writer(
    id: u64,
    writers: u64,
    urls: Arc<Mutex<Vec<String>>>,
    newest: Arc<Mutex<HashMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut k = 0u64;
    let mut at = id as usize;
    let mut calls = 0;
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<(String, u64)> = (0..rng.random_range(1..=8))
            .map(|_| {
                k += 1;
                (
                    format!("item:{}", rng.random_range(0..24)),
                    k * writers + id + 1,
                )
            })
            .collect();
        {
            let mut n = newest.lock();
            for (e, v) in &events {
                let x = n.entry(e.clone()).or_default();
                *x = (*x).max(*v);
            }
        }
        let req = pb::PublishRequest {
            events: events.iter().map(|(e, v)| event(e, *v)).collect(),
            ..Default::default()
        };
        loop {
            let url = {
                let urls = urls.lock();
                urls[at % urls.len()].clone()
            };
            let answer = match HubClient::connect(url).await {
                Ok(mut c) => c.publish(req.clone()).await.map(|r| r.into_inner()),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match answer {
                Ok(resp) => {
                    assert_eq!(resp.results.len(), events.len());
                    calls += 1;
                    break;
                }
                Err(_) => {
                    at += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_one_by_one_cause_no_reset_no_regression_and_no_loss() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(&tmp.path().join("nats"));
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Some(
            Replica::start(tmp.path(), &format!("replica-{i}"), &nats.url()).await,
        ));
    }
    let replica = |r: &Option<Replica>| r.as_ref().map(|r| r.url.clone()).expect("running");
    let first: Vec<String> = replicas.iter().map(replica).collect();
    let urls = Arc::new(Mutex::new(first.clone()));
    let epoch = status(&first[0]).await.epoch;
    for u in first {
        assert_eq!(
            status(&u).await.epoch,
            epoch,
            "every replica has the region's epoch"
        );
    }
    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_nodes = Arc::new(AtomicBool::new(false));
    let newest = Arc::new(Mutex::new(HashMap::new()));
    let seens: Vec<Arc<Mutex<Seen>>> = (0..3).map(|_| Arc::default()).collect();
    let nodes: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(node(
                format!("node-{i}"),
                urls.clone(),
                i,
                seens[i].clone(),
                stop_nodes.clone(),
            ))
        })
        .collect();
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            tokio::spawn(writer(
                w,
                3,
                urls.clone(),
                newest.clone(),
                stop_writers.clone(),
                0x5eed + w,
            ))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0x0019_0019);
    for (i, slot) in replicas.iter_mut().enumerate() {
        // A seeded moment under load, then SIGKILL and a start again.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        slot.take().expect("running").kill();
        // Down for a while: its node and writer move to the others.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        let back = Replica::start(tmp.path(), &format!("replica-{i}-again"), &nats.url()).await;
        assert_eq!(
            back.status().await.epoch,
            epoch,
            "a replica started again keeps the region's epoch"
        );
        urls.lock()[i] = back.url.clone();
        *slot = Some(back);
    }
    stop_writers.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for w in writers {
        calls += w.await.expect("writer");
    }
    assert!(
        calls > 30,
        "the writers published under the kills ({calls} calls)"
    );
    // Every node ends on the newest version of every entity.
    let newest = newest.lock().clone();
    converge(&seens, &newest).await;
    stop_nodes.store(true, Ordering::Relaxed);
    for n in nodes {
        n.await
            .expect("node (a panic is a reset, a gap or a regression)");
    }
    let heads: Vec<Vec<u64>> = {
        let mut h = Vec::new();
        for r in replicas.iter().flatten() {
            let s = r.status().await;
            assert_eq!(s.epoch, epoch);
            h.push(s.shards.iter().map(|s| s.head_seq).collect());
        }
        h
    };
    assert!(
        heads.iter().all(|h| h == &heads[0]),
        "replicas agree: {heads:?}"
    );
    for (i, s) in seens.iter().enumerate() {
        let s = s.lock();
        assert_eq!(s.resets, 0, "node-{i} was reset");
        assert!(
            s.reconnects >= 1,
            "node-{i} moved to another replica at least once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_one_version_at_two_replicas_apply_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(&tmp.path().join("nats"));
    let a = Replica::start(tmp.path(), "a", &nats.url()).await;
    let b = Replica::start(tmp.path(), "b", &nats.url()).await;
    let mut ca = HubClient::connect(a.url.clone()).await.expect("connect a");
    let mut cb = HubClient::connect(b.url.clone()).await.expect("connect b");
    let mut applied = 0;
    for v in 1..=60u64 {
        // Four entities, the same versions at both replicas at once.
        let req = pb::PublishRequest {
            events: (0..4).map(|e| event(&format!("race:{e}"), v)).collect(),
            ..Default::default()
        };
        let (ra, rb) = tokio::join!(ca.publish(req.clone()), cb.publish(req));
        let (ra, rb) = (
            ra.expect("a answers").into_inner(),
            rb.expect("b answers").into_inner(),
        );
        for (x, y) in ra.results.iter().zip(&rb.results) {
            let outcomes = [x.outcome, y.outcome];
            let n = outcomes
                .iter()
                .filter(|o| **o == pb::PublishOutcome::Applied as i32)
                .count();
            assert_eq!(n, 1, "v{v}: outcomes {outcomes:?}: exactly one APPLIED");
            assert!(
                outcomes.contains(&(pb::PublishOutcome::Duplicate as i32)),
                "v{v}: the other is DUPLICATE: {outcomes:?}"
            );
            assert_eq!(x.seq, y.seq, "v{v}: both name the same seq");
            applied += n;
        }
    }
    assert_eq!(applied, 240);
    // Both replicas hold the same log.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (sa, sb) = (a.status().await, b.status().await);
        let ha: Vec<u64> = sa.shards.iter().map(|s| s.head_seq).collect();
        let hb: Vec<u64> = sb.shards.iter().map(|s| s.head_seq).collect();
        assert_eq!(sa.epoch, sb.epoch);
        if ha == hb {
            assert_eq!(ha.iter().sum::<u64>(), 240, "one event per applied version");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "heads differ: {ha:?} {hb:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_down_refuses_publishes_with_a_retry_hint_and_loses_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut nats = Nats::start(&tmp.path().join("nats"));
    let hub = Replica::start(tmp.path(), "solo", &nats.url()).await;
    let mut c = HubClient::connect(hub.url.clone()).await.expect("connect");
    let one = |v| pb::PublishRequest {
        events: vec![event("down:1", v)],
        ..Default::default()
    };
    let r = c.publish(one(1)).await.expect("publish").into_inner();
    assert_eq!(r.results[0].outcome, pb::PublishOutcome::Applied as i32);
    nats.kill();
    let err = c
        .publish(one(2))
        .await
        .expect_err("refused while JetStream is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.metadata().get("retry-after-ms").is_some(),
        "a retry hint: {err:?}"
    );
    let status = hub.status().await;
    assert!(!status.log_error.is_empty(), "status names the log error");
    nats.restart();
    // The hub reconnects by itself; the publisher retries on the hint.
    let deadline = tokio::time::Instant::now() + WAIT;
    let answer = loop {
        match c.publish(one(2)).await {
            Ok(r) => break r.into_inner(),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "JetStream did not come back: {e:?}\n{}",
                    hub.stderr_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let o = answer.results[0].outcome;
    assert!(
        o == pb::PublishOutcome::Applied as i32 || o == pb::PublishOutcome::Duplicate as i32,
        "v2 applied once: {o}"
    );
    // v1 survived the outage.
    let r = c.publish(one(1)).await.expect("publish").into_inner();
    assert_eq!(r.results[0].outcome, pb::PublishOutcome::Superseded as i32);
    assert!(hub.status().await.log_error.is_empty(), "the error cleared");
}

/// A replica started while its NATS server answers no JetStream request
/// (JetStream not ready yet, as while a cluster elects its leaders) keeps
/// trying, says so, and serves once JetStream answers instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_jetstream_answers_waits_for_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nats = Nats::start_without_jetstream(&dir.path().join("nats"));
    let port = free_port();
    let starting = {
        let (dir, url) = (dir.path().to_owned(), nats.url());
        tokio::spawn(async move { Replica::launch(&dir, "r1", "js-test", port, &url, &[]).await })
    };
    let stderr = dir.path().join(format!("r1-{port}.stderr"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&stderr)
        .unwrap_or_default()
        .contains("JetStream log not opened yet; retrying")
    {
        assert!(
            !starting.is_finished(),
            "the replica gave up or served without JetStream"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry logged: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nats.kill();
    nats.jetstream = true;
    nats.restart();
    let replica = starting
        .await
        .expect("the replica starts once JetStream answers");
    let (outcome, _) = publish_until_answered(&replica.url, "user:1", 1).await;
    assert_eq!(outcome, pb::PublishOutcome::Applied as i32);
    let log = replica.stderr_text();
    assert!(
        log.contains("no responders") || log.contains("unavailable"),
        "the retry names why: {log}"
    );
    replica.kill();
}

#[test]
fn unreachable_jetstream_refuses_the_start_with_exit_64() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_freshness-hub"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--log", "jetstream", "--nats-url"])
        .arg(format!("nats://127.0.0.1:{port}"))
        .env("NO_COLOR", "1")
        .env("FRESHNESS_LOG", "error")
        .output()
        .expect("run freshness-hub");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("cannot reach NATS") && lines[0].contains(&port.to_string()),
        "{stderr}"
    );
}

/// Publishes `(entity, version)` at `url` until it is answered, riding out
/// refusals (a JetStream leader being elected); returns the outcome and how
/// many refusals it took.
async fn publish_until_answered(url: &str, entity: &str, version: u64) -> (i32, usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut refused = 0;
    loop {
        let answer = match HubClient::connect(url.to_owned()).await {
            Ok(mut c) => c
                .publish(pb::PublishRequest {
                    events: vec![event(entity, version)],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        match answer {
            Ok(r) => return (r.results[0].outcome, refused),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                refused += 1;
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{entity} v{version} at {url} not answered: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_cluster_goes_on_without_one_server_and_refuses_without_quorum() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut servers = Nats::cluster(&tmp.path().join("nats"));
    let nats: Vec<String> = servers.iter().map(Nats::url).collect();
    let nats = nats.join(",");
    let r3 = ["--jetstream-replicas", "3"];
    let a = Replica::start_with(tmp.path(), "a", &nats, &r3).await;
    let b = Replica::start_with(tmp.path(), "b", &nats, &r3).await;
    let hubs = [a.url.clone(), b.url.clone()];
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let follower = tokio::spawn(node(
        "cluster-node".into(),
        Arc::new(Mutex::new(vec![
            b.url.clone(),
            a.url.clone(),
            b.url.clone(),
        ])),
        0,
        seen.clone(),
        stop.clone(),
    ));
    let mut newest: HashMap<String, u64> = HashMap::new();
    let mut answered = Vec::new();
    let mut version = 0u64;
    let publish_round = |n: usize, version: &mut u64| {
        (0..n)
            .map(|i| {
                *version += 1;
                (
                    hubs[i % 2].clone(),
                    format!("cl:{}", *version % 8),
                    *version,
                )
            })
            .collect::<Vec<_>>()
    };
    for (url, e, v) in publish_round(20, &mut version) {
        let (o, _) = publish_until_answered(&url, &e, v).await;
        assert_eq!(o, pb::PublishOutcome::Applied as i32);
        newest.insert(e.clone(), v);
        answered.push((e, v));
    }
    // One server of three lost: the stream keeps a quorum, the hubs go on.
    servers[0].kill();
    for (url, e, v) in publish_round(20, &mut version) {
        let (o, _) = publish_until_answered(&url, &e, v).await;
        assert_eq!(o, pb::PublishOutcome::Applied as i32, "{e} v{v}");
        newest.insert(e.clone(), v);
        answered.push((e, v));
    }
    // Two lost: no quorum, publishes are refused with a retry hint.
    servers[1].kill();
    let deadline = tokio::time::Instant::now() + WAIT;
    let refusal = loop {
        version += 1;
        let e = format!("cl:{}", version % 8);
        let mut c = HubClient::connect(hubs[(version % 2) as usize].clone())
            .await
            .expect("the hub is up");
        match c
            .publish(pb::PublishRequest {
                events: vec![event(&e, version)],
                ..Default::default()
            })
            .await
        {
            // Not yet noticed: it was stored with the quorum still there.
            Ok(_) => {
                newest.insert(e.clone(), version);
                answered.push((e, version));
            }
            Err(err) => {
                // Refused, but it may still be stored later: the version
                // may land, so it counts for the newest.
                let x = newest.entry(e).or_default();
                *x = (*x).max(version);
                break err;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never refused");
    };
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.metadata().get("retry-after-ms").is_some(),
        "a retry hint: {refusal:?}"
    );
    servers[1].restart();
    servers[0].restart();
    for s in &servers {
        s.wait_healthy();
    }
    // Back: publishes go through again, and nothing answered is lost.
    for (url, e, v) in publish_round(10, &mut version) {
        let (o, _) = publish_until_answered(&url, &e, v).await;
        assert_eq!(o, pb::PublishOutcome::Applied as i32, "{e} v{v}");
        newest.insert(e.clone(), v);
        answered.push((e, v));
    }
    for (i, (e, v)) in answered.iter().enumerate() {
        let (o, _) = publish_until_answered(&hubs[i % 2], e, *v).await;
        assert!(
            o == pb::PublishOutcome::Duplicate as i32 || o == pb::PublishOutcome::Superseded as i32,
            "{e} v{v} answered before the outage came back {o}: lost"
        );
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let behind: Vec<String> = {
            let s = seen.lock();
            newest
                .iter()
                .filter(|(e, v)| s.versions.get(*e) != Some(v))
                .map(|(e, v)| format!("{e}: {:?} of v{v}", s.versions.get(e)))
                .collect()
        };
        if behind.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node behind: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    follower
        .await
        .expect("node (a panic is a reset, a gap or a regression)");
    assert_eq!(seen.lock().resets, 0);
}

/// Opens a stream for `node_id` at `url` that reads and never acks; the
/// stream lives as long as the returned sender.
async fn silent_node(url: &str, node_id: &str) -> mpsc::Sender<pb::SubscribeRequest> {
    let mut client = HubClient::connect(url.to_owned()).await.expect("connect");
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        kind: Some(ReqKind::Hello(pb::Hello {
            node_id: node_id.into(),
            ..Default::default()
        })),
    })
    .await
    .expect("hello");
    let mut stream = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_acks_cover_the_nodes_of_every_replica() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(&tmp.path().join("nats"));
    let a = Replica::start(tmp.path(), "a", &nats.url()).await;
    let b = Replica::start(tmp.path(), "b", &nats.url()).await;
    // A node at b that acks everything.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acking = tokio::spawn(node(
        "acking-at-b".into(),
        Arc::new(Mutex::new(vec![b.url.clone(); 3])),
        0,
        seen.clone(),
        stop.clone(),
    ));
    let region = |entity: &str, v: u64, timeout: Duration| pb::PublishRequest {
        events: vec![event(entity, v)],
        ack: pb::AckLevel::Region as i32,
        timeout_ms: timeout.as_millis() as u32,
    };
    // Until a knows of b's node, a REGION publish at a has no node to wait
    // for; once it does, the answer waits for that node's ack.
    let mut ca = HubClient::connect(a.url.clone()).await.expect("connect a");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut v = 0;
    loop {
        v += 1;
        let r = ca
            .publish(region("reg:1", v, WAIT))
            .await
            .expect("publish")
            .into_inner();
        assert!(r.complete, "the acking node at b acked v{v}: {r:?}");
        if seen.lock().versions.get("reg:1") == Some(&v) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never waited for b's node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A node at b that never acks: the REGION publish at a names it.
    let _silent = silent_node(&b.url, "silent-at-b").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        v += 1;
        // Short: a publish that names the silent node waits this long.
        let r = ca
            .publish(region("reg:1", v, Duration::from_secs(3)))
            .await
            .expect("publish")
            .into_inner();
        // The acking node, on a slow machine, may still be pending too:
        // asked again until only the silent one is.
        if r.pending_nodes == ["silent-at-b"] {
            assert!(!r.complete, "{r:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never waited for b's silent node"
        );
    }
    stop.store(true, Ordering::Relaxed);
    acking.await.expect("node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_shard_count_is_refused_with_exit_64() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(&tmp.path().join("nats"));
    let first = Replica::start(tmp.path(), "a", &nats.url()).await;
    let out = Command::new(env!("CARGO_BIN_EXE_freshness-hub"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--region", "js-test", "--shards", "16"])
        .args(["--log", "jetstream", "--nats-url", &nats.url()])
        .env("NO_COLOR", "1")
        .env("FRESHNESS_LOG", "error")
        .output()
        .expect("run freshness-hub");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("shards = 16") && stderr.contains(&format!("{SHARDS} shards")),
        "{stderr}"
    );
    // The first replica is untouched.
    assert_eq!(first.status().await.shard_count, SHARDS);
}

/// One replica of a region in [`two_regions_of_replicas_converge_across_kills`]:
/// `--peer` once for each replica of every other region.
async fn linked_replica(
    dir: &Path,
    nats: &str,
    regions: &[(&str, [u16; 2])],
    r: usize,
    i: usize,
) -> Replica {
    let (region, ports) = regions[r];
    let peers: Vec<String> = regions
        .iter()
        .filter(|(peer, _)| *peer != region)
        .flat_map(|(peer, ports)| {
            ports
                .iter()
                .flat_map(move |p| ["--peer".to_owned(), format!("{peer}=http://127.0.0.1:{p}")])
        })
        .collect();
    let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
    Replica::launch(
        dir,
        &format!("{region}-{i}"),
        region,
        ports[i],
        nats,
        &peers,
    )
    .await
}

/// Waits until the replica at `url` holds its region's link lease and
/// every link of it is up; returns its hub id.
async fn wait_for_links(url: &str) -> String {
    wait_for_lease(url, true).await
}

/// Waits until the replica at `url` holds its region's link lease, with
/// every link up when `connected`; returns its hub id.
async fn wait_for_lease(url: &str, connected: bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut c) = HubClient::connect(url.to_owned()).await
            && let Ok(s) = c.status(pb::StatusRequest {}).await
        {
            let s = s.into_inner();
            if !s.peers.is_empty()
                && s.peers
                    .iter()
                    .all(|p| (p.connected || !connected) && p.linked_by == s.hub_id)
            {
                return s.hub_id;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} did not take the region's links"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Of a region's replicas, the one holding the link lease (the others
/// name it in their status).
async fn link_holder(urls: &[String]) -> usize {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut holders = Vec::new();
        let mut named = Vec::new();
        for (i, u) in urls.iter().enumerate() {
            let s = status(u).await;
            let p = &s.peers[0];
            if p.linked_by == s.hub_id && p.connected {
                holders.push(i);
            }
            named.push(p.linked_by.clone());
        }
        if holders.len() == 1 && named.iter().all(|n| *n == named[0]) {
            return holders[0];
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no single link holder among {urls:?}: {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Of a region's replicas, the one serving the link of the peer replica
/// `peer_hub` (its replication stream is among that replica's nodes).
async fn link_server(urls: &[String], peer_region: &str, peer_hub: &str) -> usize {
    let node = format!("hub/{peer_region}/{peer_hub}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for (i, u) in urls.iter().enumerate() {
            if status(u).await.nodes.iter().any(|n| n.node_id == node) {
                return i;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica of {urls:?} serves {node}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two regions, each two hub replicas with its own stream on one
/// JetStream, replicating both ways with one link per region (the link
/// lease). Nodes and writers at every replica, on the same entities. Under
/// load, SIGKILL in turn: west's link holder (the other west replica takes
/// the lease over and resumes from its cursors), the east replica that
/// serves west's link (the link moves to the other east replica), and
/// east's link holder; each comes back. No node is ever reset (no
/// `REPLICATION_GAP`, no `EPOCH_CHANGED`), no version goes back, and every
/// node ends on the newest version of every entity from both regions. A
/// `GLOBAL` publish at the east replica that does not serve west's link is
/// confirmed by west (the replicas share the link's reports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_of_replicas_converge_across_kills() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(&tmp.path().join("nats"));
    let regions = [
        ("east", [free_port(), free_port()]),
        ("west", [free_port(), free_port()]),
    ];
    let mut replicas: Vec<Vec<Option<Replica>>> = Vec::new();
    for r in 0..2 {
        let mut set = Vec::new();
        for i in 0..2 {
            set.push(Some(
                linked_replica(tmp.path(), &nats.url(), &regions, r, i).await,
            ));
        }
        replicas.push(set);
    }
    let urls: Vec<Vec<String>> = regions
        .iter()
        .map(|(_, ports)| {
            ports
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect()
        })
        .collect();
    // Links up first: a link's first contact marks a gap on every shard,
    // which would reset nodes already connected.
    let mut holder = [link_holder(&urls[0]).await, link_holder(&urls[1]).await];
    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_nodes = Arc::new(AtomicBool::new(false));
    let newest = Arc::new(Mutex::new(HashMap::new()));
    let seens: Vec<Arc<Mutex<Seen>>> = (0..4).map(|_| Arc::default()).collect();
    let shared: Vec<Arc<Mutex<Vec<String>>>> = urls
        .iter()
        .map(|u| Arc::new(Mutex::new(u.clone())))
        .collect();
    let nodes: Vec<_> = (0..4)
        .map(|n| {
            tokio::spawn(node(
                format!("{}-node-{}", regions[n / 2].0, n % 2),
                shared[n / 2].clone(),
                n % 2,
                seens[n].clone(),
                stop_nodes.clone(),
            ))
        })
        .collect();
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            tokio::spawn(writer(
                w,
                4,
                shared[(w / 2) as usize].clone(),
                newest.clone(),
                stop_writers.clone(),
                0x7e57 + w,
            ))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0x0019_0002);
    let mut pause = || Duration::from_millis(rng.random_range(200..500));

    // West's link holder dies: the other west replica takes the lease over.
    tokio::time::sleep(pause()).await;
    let w = holder[1];
    let killed = tokio::time::Instant::now();
    replicas[1][w].take().expect("running").kill();
    let west_hub = wait_for_links(&urls[1][1 - w]).await;
    // Shown with --nocapture: how long each region was without its link.
    eprintln!(
        "west's links taken over {} ms after the SIGKILL of their holder",
        killed.elapsed().as_millis()
    );
    replicas[1][w] = Some(linked_replica(tmp.path(), &nats.url(), &regions, 1, w).await);
    holder[1] = link_holder(&urls[1]).await;
    assert_eq!(
        holder[1],
        1 - w,
        "the lease stays with the replica that took it"
    );

    // The east replica serving west's link dies: the link moves to the other.
    tokio::time::sleep(pause()).await;
    let e = link_server(&urls[0], "west", &west_hub).await;
    let killed = tokio::time::Instant::now();
    replicas[0][e].take().expect("running").kill();
    assert_eq!(
        link_server(&urls[0][1 - e..2 - e], "west", &west_hub).await,
        0,
        "west's link reached the other east replica"
    );
    eprintln!(
        "west's link at the other east replica {} ms after the SIGKILL of the one it used",
        killed.elapsed().as_millis()
    );
    wait_for_links(&urls[1][holder[1]]).await;
    replicas[0][e] = Some(linked_replica(tmp.path(), &nats.url(), &regions, 0, e).await);

    // East's link holder dies.
    tokio::time::sleep(pause()).await;
    let h = link_holder(&urls[0]).await;
    let killed = tokio::time::Instant::now();
    replicas[0][h].take().expect("running").kill();
    wait_for_links(&urls[0][1 - h]).await;
    eprintln!(
        "east's links taken over {} ms after the SIGKILL of their holder",
        killed.elapsed().as_millis()
    );
    replicas[0][h] = Some(linked_replica(tmp.path(), &nats.url(), &regions, 0, h).await);
    holder[0] = link_holder(&urls[0]).await;

    tokio::time::sleep(pause()).await;
    stop_writers.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for w in writers {
        calls += w.await.expect("writer");
    }
    assert!(
        calls > 30,
        "the writers published under the kills ({calls} calls)"
    );
    let newest = newest.lock().clone();
    converge(&seens, &newest).await;

    // GLOBAL at the east replica that west's link does not reach.
    let west_hub = status(&urls[1][holder[1]]).await.hub_id;
    let serving = link_server(&urls[0], "west", &west_hub).await;
    let mut east = HubClient::connect(urls[0][1 - serving].clone())
        .await
        .expect("connect");
    let answer = east
        .publish(pb::PublishRequest {
            events: vec![event("item:global", 1)],
            ack: pb::AckLevel::Global as i32,
            timeout_ms: 10_000,
        })
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(answer.applied_ack, pb::AckLevel::Global as i32);
    assert!(
        answer.complete,
        "GLOBAL confirmed through the other replica: pending nodes {:?}, regions {:?}",
        answer.pending_nodes, answer.pending_regions
    );

    stop_nodes.store(true, Ordering::Relaxed);
    for n in nodes {
        n.await
            .expect("node (a panic is a reset, a gap or a regression)");
    }
    for (n, s) in seens.iter().enumerate() {
        assert_eq!(s.lock().resets, 0, "node {n} was reset");
    }
    for (r, set) in replicas.iter().enumerate() {
        for replica in set.iter().flatten() {
            let s = replica.status().await;
            assert!(
                s.peers.iter().all(|p| !p.linked_by.is_empty()),
                "{} names its region's link holder: {:?}",
                regions[r].0,
                s.peers
            );
        }
    }
}

/// Two replicas of a region given the same hub id (a misconfiguration: the
/// lease and the shared acks tell replicas apart by it): the one that does
/// not hold the link lease says so in one error line, rather than taking
/// the lease from its twin every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_one_hub_id_are_reported() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(&tmp.path().join("nats"));
    // The peer need not exist: the lease is taken whether its link is up.
    let peer = format!("west=http://127.0.0.1:{}", free_port());
    let args = ["--peer", peer.as_str()];
    let first = Replica::launch(tmp.path(), "twin", "east", free_port(), &nats.url(), &args).await;
    wait_for_lease(&first.url, false).await;
    let second = Replica::launch(tmp.path(), "twin", "east", free_port(), &nats.url(), &args).await;
    let said = "another process holds the region's link lease under this replica's hub id";
    let deadline = tokio::time::Instant::now() + WAIT;
    while !second.stderr_text().contains(said) && !first.stderr_text().contains(said) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica reported the shared hub id: {}",
            second.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A link-lease holder that reaches NATS but no replica of its peer region
/// (here: a wrong address for it) hands the lease over once its links have
/// been down for a while, and the replica that can reach the peer runs the
/// links from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_reach_the_peer_hands_the_links_over() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let nats = Nats::start(&tmp.path().join("nats"));
    let west = Replica::launch(tmp.path(), "west-0", "west", free_port(), &nats.url(), &[]).await;
    let nowhere = format!("west=http://127.0.0.1:{}", free_port());
    let blind = Replica::launch(
        tmp.path(),
        "east-0",
        "east",
        free_port(),
        &nats.url(),
        &["--peer", &nowhere],
    )
    .await;
    wait_for_lease(&blind.url, false).await;
    let right = format!("west={}", west.url);
    let sighted = Replica::launch(
        tmp.path(),
        "east-1",
        "east",
        free_port(),
        &nats.url(),
        &["--peer", &right],
    )
    .await;
    assert_eq!(wait_for_lease(&sighted.url, true).await, "east-1");
    assert!(
        blind
            .stderr_text()
            .contains("handing the region's link lease to another replica"),
        "{}",
        blind.stderr_text()
    );
    // The link runs: west serves east-1's replication stream.
    assert_eq!(
        link_server(std::slice::from_ref(&west.url), "east", "east-1").await,
        0
    );
}
