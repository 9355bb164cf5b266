//! The hub binary's memory under a publish flood, with stalled nodes, read
//! from outside: its resident set (`/proc/<pid>/status`) and its own
//! metrics (`/metrics`). SPEC G5 and §4: memory stays bounded while
//! publishers are refused and slow nodes are parked.
//!
//! The bound is stated against the hub's own steady state: first the log is
//! filled to its byte limit (and the remembered versions to theirs), then
//! twelve times that volume is pushed through. A hub that kept what it was sent
//! would grow by the whole flood; this one must stay within
//! [`SLACK_MIB`] of where it stood with a full log.

#![cfg(target_os = "linux")]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use freshness::pb::{self, hub_client::HubClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const SHARDS: u64 = 4;
const LOG_BYTES: u64 = 8 << 20;
/// About what the byte limit holds, so that the remembered versions (up to
/// this many beyond the retained events) fill during the warm-up too.
const LOG_EVENTS: u64 = 8_192;
const PAYLOAD: usize = 1024;
const BATCH: usize = 256;
const WRITERS: usize = 8;
/// How much the flood pushes through, in multiples of the log's byte limit.
const FLOOD_LOGS: u64 = 12;
/// Growth allowed over the full-log steady state: request bodies in flight
/// (8 writers of 256 KiB), up to four 1 MiB frames queued per stalled
/// stream, HTTP/2 buffers, allocator slack. The flood itself is 96 MiB of
/// payload, three times this.
const SLACK_MIB: u64 = 32;
const WAIT: Duration = Duration::from_secs(60);

/// The hub as a child process, killed when dropped.
struct Hub {
    child: std::process::Child,
    dir: PathBuf,
    grpc: String,
    metrics: std::net::SocketAddr,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port free right now (the hub binds it a moment later; if
/// another process takes it in between, the hub exits and the test says so).
impl Hub {
    fn start() -> Self {
        let (listen, metrics) = (freshness_tests::free_addr(), freshness_tests::free_addr());
        let dir = std::env::temp_dir().join(format!("freshness-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hub.toml");
        std::fs::write(
            &file,
            format!(
                "listen = \"{listen}\"\nmetrics_listen = \"{metrics}\"\nhub_id = \"flood\"\n\
                 shards = {SHARDS}\nshard_queue = 1\nadmission_timeout = \"1ms\"\n\
                 log_max_events = {LOG_EVENTS}\nlog_max_bytes = {LOG_BYTES}\nmax_in_flight = 1024\n\
                 ephemeral = true\n"
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_freshness-hub"))
            .arg("--config")
            .arg(&file)
            .env("FRESHNESS_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run freshness-hub");
        Self {
            child,
            dir,
            grpc: format!("http://{listen}"),
            metrics,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `VmRSS` or `VmHWM` (the peak) of the hub, in KiB.
    fn memory_kib(&self, key: &str) -> u64 {
        freshness_tests::memory_kib(self.pid(), key)
    }

    async fn client(&mut self) -> HubClient<Channel> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the hub exited before serving: {status}");
            }
            if let Ok(c) = HubClient::connect(self.grpc.clone()).await {
                return c;
            }
            assert!(tokio::time::Instant::now() < deadline, "hub never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The hub's Prometheus text.
    async fn scrape(&self) -> String {
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    }
}

/// The value of one sample line (`name{labels} value`) of a scrape.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn batch(tag: &str, call: u64) -> pb::PublishRequest {
    pb::PublishRequest {
        events: (0..BATCH)
            .map(|i| pb::Event {
                entity: format!("flood:{tag}-{call}-{i}"),
                version: 1,
                payload: vec![0xab; PAYLOAD].into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Publishes fresh batches from `WRITERS` writers until `events` were
/// accepted; returns (accepted calls, refused calls). Refusals must be
/// `UNAVAILABLE` with a retry hint.
async fn flood(hub: &mut Hub, tag: &str, events: u64) -> (u64, u64) {
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let calls = events.div_ceil(BATCH as u64);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut client = hub.client().await;
        let (accepted, refused) = (accepted.clone(), refused.clone());
        let tag = format!("{tag}{w}");
        tasks.push(tokio::spawn(async move {
            let mut call = 0;
            while accepted.load(Ordering::Relaxed) < calls {
                match client.publish(batch(&tag, call)).await {
                    Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                        assert!(e.metadata().get("retry-after-ms").is_some(), "{e:?}");
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                };
                call += 1;
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(WAIT, t)
            .await
            .expect("the flood ends")
            .unwrap();
    }
    (
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    )
}

/// A stream that says hello and then never reads nor acks: hold both halves
/// and never poll the response stream.
async fn stalled_node(
    client: &HubClient<Channel>,
    id: &str,
) -> (
    mpsc::Sender<pb::SubscribeRequest>,
    tonic::Streaming<pb::SubscribeResponse>,
) {
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Hello(pb::Hello {
            node_id: id.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let stream = client
        .clone()
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_through_a_flood_with_stalled_nodes() {
    let mut hub = Hub::start();
    let mut client = hub.client().await;
    let idle = hub.memory_kib("VmRSS");

    // Steady state: the log at its byte limit, and the remembered versions
    // (up to twice the log's events) filled, by twice the log's volume.
    let log_calls = LOG_BYTES / (BATCH * PAYLOAD) as u64;
    flood(&mut hub, "warm", 2 * log_calls * BATCH as u64).await;
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.retained_bytes <= LOG_BYTES);
    let full = hub.memory_kib("VmRSS");

    // Stalled nodes, then the flood.
    let never_read = [
        stalled_node(&client, "stalled-1").await,
        stalled_node(&client, "stalled-2").await,
    ];
    let flooding = Arc::new(AtomicBool::new(true));
    let sampled = {
        let flooding = flooding.clone();
        let pid = hub.pid();
        tokio::spawn(async move {
            let mut max = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while flooding.load(Ordering::Relaxed) {
                tick.tick().await;
                max = max.max(freshness_tests::memory_kib(pid, "VmRSS"));
            }
            max
        })
    };
    let before = hub.scrape().await;
    let refused_before = metric(
        &before,
        "freshness_publish_refused_total{code=\"unavailable\"}",
    )
    .unwrap_or(0.0);
    let (accepted, refused) = flood(&mut hub, "flood", FLOOD_LOGS * log_calls * BATCH as u64).await;
    flooding.store(false, Ordering::Relaxed);
    let sampled_max = sampled.await.unwrap();
    // The kernel's counters are approximate: take the larger of the peak it
    // kept and the samples.
    let peak = hub.memory_kib("VmHWM").max(sampled_max);
    let after = hub.memory_kib("VmRSS");
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "hub RSS: idle {:.1} MiB, full log {:.1} MiB, flood peak {:.1} MiB (sampled {:.1}), \
         after {:.1} MiB; flood: {accepted} calls of {BATCH} x {PAYLOAD} B accepted \
         ({:.0} MiB), {refused} refused; retained {} events, {:.1} MiB",
        mib(idle),
        mib(full),
        mib(peak),
        mib(sampled_max),
        mib(after),
        (accepted * (BATCH * PAYLOAD) as u64) as f64 / f64::from(1 << 20),
        status.retained_events,
        status.retained_bytes as f64 / f64::from(1 << 20),
    );
    assert!(status.retained_bytes <= LOG_BYTES && status.retained_events <= LOG_EVENTS);
    assert!(
        peak <= full + SLACK_MIB * 1024,
        "peak RSS {:.1} MiB is more than {SLACK_MIB} MiB over the full-log {:.1} MiB",
        mib(peak),
        mib(full)
    );
    for n in status
        .nodes
        .iter()
        .filter(|n| n.node_id.starts_with("stalled"))
    {
        assert!(n.parked && n.in_flight <= n.max_in_flight, "{n:?}");
    }

    // The hub's own view agrees: every refusal was counted, its log gauge is
    // within the limit, its queues never exceeded their one slot.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        // Gauges are sampled once a second.
        let text = hub.scrape().await;
        if metric(&text, "freshness_log_retained_events").is_some()
            && metric(&text, "freshness_shard_queue_depth_max").is_some()
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no gauges in {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refused_counted = metric(
        &text,
        "freshness_publish_refused_total{code=\"unavailable\"}",
    )
    .unwrap_or(0.0)
        - refused_before;
    assert_eq!(refused_counted as u64, refused, "{text}");
    assert!(metric(&text, "freshness_log_retained_events").unwrap() <= LOG_EVENTS as f64);
    assert!(metric(&text, "freshness_shard_queue_depth_max").unwrap() <= 1.0);
    assert_eq!(metric(&text, "freshness_nodes_connected"), Some(2.0));

    // Once the stalled nodes go, the registry is empty again.
    drop(never_read);
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&hub.scrape().await, "freshness_nodes_connected") != Some(0.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled streams never left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
