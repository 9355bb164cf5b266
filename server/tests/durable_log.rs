//! The durable log, tested on the hub binary with real files and real
//! crashes: SIGKILL at seeded random moments under publishes from several
//! writers, a torn tail, a damaged record in the middle (refused, then
//! `--repair`), and a data directory the hub cannot use.
//!
//! After every restart: the epoch is the one before, every publish that was
//! answered before the kill is still known (publishing it again is a
//! `DUPLICATE` or `SUPERSEDED`, never `APPLIED`), and a node that resumes
//! from its cursor is neither reset nor missing anything (the seqs it is
//! sent continue its cursor with no gap and no repeat).
//!
//! `FRESHNESS_CRASH_SEED` and `FRESHNESS_CRASH_KILLS` change the schedule
//! (a soak runs more kills).

#![cfg(target_os = "linux")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::pb::{self, hub_client::HubClient};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const SHARDS: u32 = 8;
const WRITERS: usize = 3;
const WAIT: Duration = Duration::from_secs(20);

/// A hub binary running on a data directory.
struct HubProcess {
    child: Child,
    url: String,
    stderr: PathBuf,
    data_dir: PathBuf,
}

use freshness_tests::free_port;

fn hub_command(data_dir: &Path, port: u16, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_freshness-hub"));
    let shards = SHARDS.to_string();
    let shards = if extra.contains(&"--shards") {
        &[][..]
    } else {
        &["--shards", shards.as_str()][..]
    };
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(shards)
        .args(["--hub-id", "crash-test"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

impl HubProcess {
    /// Starts the hub and waits until it answers Status.
    async fn start(data_dir: &Path, extra: &[&str]) -> (Self, HubClient<Channel>) {
        let port = free_port();
        Self::start_command(data_dir, port, hub_command(data_dir, port, extra)).await
    }

    /// Starts `cmd` (the hub on `port`, maybe wrapped) and waits until it
    /// answers Status.
    async fn start_command(
        data_dir: &Path,
        port: u16,
        mut cmd: Command,
    ) -> (Self, HubClient<Channel>) {
        let stderr = data_dir.with_extension(format!("stderr-{port}"));
        cmd.stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let child = cmd.spawn().expect("start freshness-hub");
        let mut hub = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stderr,
            data_dir: data_dir.to_owned(),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = hub.child.try_wait().expect("child status") {
                panic!("hub exited with {status}: {}", hub.stderr_text());
            }
            if let Ok(c) = HubClient::connect(hub.url.clone()).await {
                let mut c = c.max_decoding_message_size(64 << 20);
                if c.status(pb::StatusRequest {}).await.is_ok() {
                    return (hub, c);
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "hub did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no flush, nothing the process gets to do.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the hub");
        self.child.wait().expect("reap the hub");
        assert!(
            self.data_dir.join("RUNNING").exists(),
            "a hub that did not stop cleanly leaves its marker"
        );
    }

    /// SIGTERM, and wait for the graceful stop.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM")
            .success();
        assert!(ok);
        let status = self.child.wait().expect("reap the hub");
        assert!(status.success(), "hub stopped with {status}");
        assert!(
            !self.data_dir.join("RUNNING").exists(),
            "a clean stop flushes the log and unmarks it"
        );
    }
}

/// A test that fails leaves no hub running.
impl Drop for HubProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn event(entity: &str, version: u64) -> pb::Event {
    pb::Event {
        entity: entity.to_owned(),
        version,
        ..Default::default()
    }
}

fn outcome_name(o: i32) -> &'static str {
    match pb::PublishOutcome::try_from(o) {
        Ok(pb::PublishOutcome::Applied) => "APPLIED",
        Ok(pb::PublishOutcome::Duplicate) => "DUPLICATE",
        Ok(pb::PublishOutcome::Superseded) => "SUPERSEDED",
        _ => "unknown",
    }
}

/// Publishes every `(entity, version)` again: each must be known already.
async fn assert_known(client: &mut HubClient<Channel>, answered: &[(String, u64)], when: &str) {
    for chunk in answered.chunks(5_000) {
        let resp = client
            .publish(pb::PublishRequest {
                events: chunk.iter().map(|(e, v)| event(e, *v)).collect(),
                ..Default::default()
            })
            .await
            .expect("republish")
            .into_inner();
        for ((entity, version), r) in chunk.iter().zip(&resp.results) {
            let name = outcome_name(r.outcome);
            assert!(
                name == "DUPLICATE" || name == "SUPERSEDED",
                "{when}: {entity} v{version}, answered before the kill, came back {name}: the hub lost it"
            );
        }
    }
}

/// A node that resumes from `cursor` (or starts at the head) and reads
/// until it has every seq up to `heads`, acking as it goes. It must not be
/// reset, and every event must continue its shard's seq by exactly one.
async fn catch_up(url: &str, cursor: Option<pb::Cursor>, heads: &[u64], when: &str) -> pb::Cursor {
    let mut client = HubClient::connect(url.to_owned())
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    let resuming = cursor.is_some();
    tx.send(pb::SubscribeRequest {
        kind: Some(ReqKind::Hello(pb::Hello {
            node_id: "crash-node".into(),
            resume: cursor,
            ..Default::default()
        })),
    })
    .await
    .expect("send hello");
    let mut stream = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    let mut cursor = match next(&mut stream).await {
        RespKind::Welcome(w) => {
            assert_eq!(w.resumed, resuming, "{when}: welcome.resumed");
            w.cursor.expect("welcome cursor")
        }
        other => panic!("{when}: expected a welcome, got {other:?}"),
    };
    while cursor.seqs.iter().zip(heads).any(|(c, h)| c < h) {
        match next(&mut stream).await {
            RespKind::Events(batch) => {
                for e in &batch.events {
                    let at = &mut cursor.seqs[e.shard as usize];
                    assert_eq!(
                        e.seq,
                        *at + 1,
                        "{when}: shard {} sent seq {} after {}: a gap or a repeat",
                        e.shard,
                        e.seq,
                        at
                    );
                    *at = e.seq;
                }
                tx.send(pb::SubscribeRequest {
                    kind: Some(ReqKind::Ack(pb::Ack {
                        cursor: Some(cursor.clone()),
                        applied: None,
                    })),
                })
                .await
                .expect("ack");
            }
            RespKind::Progress(_) => {}
            RespKind::Reset(r) => panic!("{when}: the resuming node was reset: {r:?}"),
            other => panic!("{when}: unexpected {other:?}"),
        }
    }
    cursor
}

async fn next(stream: &mut tonic::Streaming<pb::SubscribeResponse>) -> RespKind {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message in time")
        .expect("stream error")
        .and_then(|m| m.kind)
        .expect("stream ended")
}

fn heads(status: &pb::StatusResponse) -> Vec<u64> {
    status.shards.iter().map(|s| s.head_seq).collect()
}

/// One writer: publishes batches of its own entities at rising versions
/// until a call fails (the hub was killed), recording what was answered.
async fn writer(
    url: String,
    id: usize,
    mut version: u64,
    seed: u64,
    answered: Arc<Mutex<Vec<(String, u64)>>>,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(client) = HubClient::connect(url).await else {
        return version;
    };
    let mut client = client;
    loop {
        let n = rng.random_range(1..=40);
        let events: Vec<(String, u64)> = (0..n)
            .map(|_| {
                version += 1;
                (format!("w{id}:{}", rng.random_range(0..64)), version)
            })
            .collect();
        let req = pb::PublishRequest {
            events: events.iter().map(|(e, v)| event(e, *v)).collect(),
            ..Default::default()
        };
        match client.publish(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                assert_eq!(resp.results.len(), events.len());
                answered.lock().extend(events);
            }
            Err(_) => return version,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_publishes_survive_sigkill_and_nodes_resume_without_reset() {
    let seed: u64 = std::env::var("FRESHNESS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1e55);
    let kills: usize = std::env::var("FRESHNESS_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let mut rng = StdRng::seed_from_u64(seed);
    let answered = Arc::new(Mutex::new(Vec::new()));
    let mut versions = [0u64; WRITERS];
    let mut node: Option<pb::Cursor> = None;
    let mut epoch = None;
    let mut checked = 0;
    for round in 0..=kills {
        let when = format!("seed {seed:#x}, after kill {round}");
        let (hub, mut client) = HubProcess::start(&data, &[]).await;
        let status = client
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert!(status.durable, "{when}: the hub runs durable");
        match epoch {
            None => epoch = Some(status.epoch),
            Some(e) => assert_eq!(status.epoch, e, "{when}: the epoch changed"),
        }
        let all = answered.lock().clone();
        assert_known(&mut client, &all[checked..], &when).await;
        checked = all.len();
        node = Some(catch_up(&hub.url, node, &heads(&status), &when).await);
        if round == kills {
            // The last restart: everything ever answered is still known.
            assert_known(&mut client, &all, &when).await;
            hub.stop();
            break;
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                tokio::spawn(writer(
                    hub.url.clone(),
                    w,
                    versions[w],
                    rng.random(),
                    answered.clone(),
                ))
            })
            .collect();
        // The fault schedule: a seeded random moment while writers publish.
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
        hub.kill();
        for (w, h) in writers.into_iter().enumerate() {
            versions[w] = h.await.expect("writer task");
        }
    }
    assert!(
        answered.lock().len() > kills,
        "the writers got answers between the kills"
    );
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    out.sort();
    out
}

async fn publish_some(client: &mut HubClient<Channel>, n: u64) -> Vec<(String, u64)> {
    let events: Vec<(String, u64)> = (1..=n).map(|i| (format!("user:{i}"), 7)).collect();
    client
        .publish(pb::PublishRequest {
            events: events.iter().map(|(e, v)| event(e, *v)).collect(),
            ..Default::default()
        })
        .await
        .expect("publish");
    events
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_the_epoch_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (hub, mut client) = HubProcess::start(&data, &[]).await;
    let epoch = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .epoch;
    let events = publish_some(&mut client, 50).await;
    hub.kill();
    // A write cut short by the crash: a record header announcing more
    // bytes than follow.
    let seg = segments(&data).pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let before = bytes.len();
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]);
    std::fs::write(&seg, &bytes).unwrap();

    let (hub, mut client) = HubProcess::start(&data, &[]).await;
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.epoch, epoch, "a torn tail keeps the epoch");
    assert_known(&mut client, &events, "after a torn tail").await;
    // Cut back to where the records end: the torn bytes are gone (and the
    // zeros of a segment written ahead with them).
    let after = std::fs::read(&seg).unwrap();
    assert!(after.len() <= before, "{} > {before}", after.len());
    assert!(!after.ends_with(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]));
    let log = hub.stderr_text();
    hub.stop();
    assert!(log.contains("truncating a torn tail"), "{log}");
}

#[tokio::test]
async fn a_damaged_record_refuses_the_start_until_repair_starts_a_new_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (hub, mut client) = HubProcess::start(&data, &[]).await;
    let epoch = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .epoch;
    publish_some(&mut client, 200).await;
    hub.stop();
    let seg = segments(&data)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside the first record's body: valid records follow it.
    bytes[20] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();

    let port = free_port();
    let out = hub_command(&data, port, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains(&seg.display().to_string()) && last.contains("offset 0"),
        "the line names the file and offset: {stderr}"
    );
    assert!(last.contains("--repair"), "{stderr}");
    TcpListener::bind(("127.0.0.1", port)).expect("nothing was bound");

    let (hub, mut client) = HubProcess::start(&data, &["--repair"]).await;
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_ne!(status.epoch, epoch, "a repaired log begins a new epoch");
    hub.stop();
    // The repair is done: a plain start keeps the new epoch.
    let (hub, mut client) = HubProcess::start(&data, &[]).await;
    let again = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.epoch, status.epoch);
    hub.stop();
}

#[test]
fn a_data_dir_the_hub_cannot_use_exits_64_before_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let data = file.join("data");
    let port = free_port();
    let out = hub_command(&data, port, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("data_dir") && lines[0].contains(&data.display().to_string()));
    TcpListener::bind(("127.0.0.1", port)).expect("nothing was bound");
}

#[tokio::test]
async fn a_second_hub_on_the_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (hub, _client) = HubProcess::start(&data, &[]).await;
    let out = hub_command(&data, free_port(), &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("in use by another hub"), "{stderr}");
    hub.stop();
}

/// A hub whose files may not grow past 64 KiB (`RLIMIT_FSIZE`, with
/// `SIGXFSZ` ignored: writes fail with `EFBIG`, as on a full disk), under
/// four writers at once: a publish whose write fails is refused
/// `UNAVAILABLE` with a retry hint and applies nothing; once the limit is
/// lifted, the same publishes succeed with no restart, and the log is whole
/// after a crash. One actor owns all eight shards, so a failed drain is
/// undone across every shard its publishes reached, and the writers keep
/// two of its drains with the log's writer at once: the drain after a
/// failed one, decided on top of it, is undone too.
#[tokio::test]
async fn a_failed_write_refuses_the_publish_and_the_hub_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let shape = ["--shards", "8", "--shard-actors", "1"];
    let hub = hub_command(&data, port, &shape);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("trap '' XFSZ; exec prlimit --fsize=65536:unlimited -- \"$0\" \"$@\"")
        .arg(hub.get_program())
        .args(hub.get_args())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (proc, mut client) = HubProcess::start_command(&data, port, cmd).await;
    let batch = |round: u64| pb::PublishRequest {
        events: (0..100)
            .map(|i| event(&format!("user:{round}-{i}"), 1))
            .collect(),
        ..Default::default()
    };
    // Four writers, each until its first refusal.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut answered = Vec::new();
                for round in (w * 1000)..(w * 1000 + 100) {
                    match client.publish(batch(round)).await {
                        Ok(_) => answered.push(round),
                        Err(status) => return (answered, Some((round, status))),
                    }
                }
                (answered, None)
            })
        })
        .collect();
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    for w in writers {
        let (ok, failed) = w.await.unwrap();
        answered.extend(ok);
        let (round, status) = failed.expect("a write past the file size limit fails");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.metadata().get("retry-after-ms").is_some(),
            "{status:?}"
        );
        assert!(status.message().contains("log"), "{status:?}");
        refused.push(round);
    }
    let s = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!s.log_error.is_empty(), "status shows the failing log");
    let head: u64 = s.shards.iter().map(|s| s.head_seq).sum();
    assert_eq!(
        head,
        answered.len() as u64 * 100,
        "the refused publishes applied nothing"
    );

    let pid = proc.child.id().to_string();
    let lifted = Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
        .status()
        .unwrap();
    assert!(lifted.success());
    for &round in &refused {
        let resp = client
            .publish(batch(round))
            .await
            .expect("writes succeed again");
        assert!(
            resp.into_inner()
                .results
                .iter()
                .all(|r| outcome_name(r.outcome) == "APPLIED"),
            "nothing of the refused publish {round} had been applied"
        );
    }
    let s = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(s.log_error.is_empty(), "recovered: {}", s.log_error);
    proc.kill();

    let (proc, mut client) = HubProcess::start(&data, &shape).await;
    let all: Vec<(String, u64)> = answered
        .iter()
        .chain(&refused)
        .flat_map(|r| (0..100).map(move |i| (format!("user:{r}-{i}"), 1)))
        .collect();
    assert_known(&mut client, &all, "after the write failures and a crash").await;
    proc.stop();
}
