//! `freshness-bench`: load generator and measurements for the Freshness hub,
//! side by side with NATS core pub/sub and Redis pub/sub.
//!
//! ```text
//! freshness-bench --workload b1|b2|...|b7 [--nodes N] [--rate R] [--duration 10s]
//!                 [--target hub|nats|redis] [--hub URL] [--json]
//! ```
//!
//! By default every hub run starts a fresh `freshness-hub` child process
//! (next to this binary) on a free loopback port and measures it through
//! `/proc`; `--hub URL [--hub-pid PID]` uses a running hub instead. NATS and
//! Redis are always external (`scripts/bench-peers.sh` starts them). See
//! BENCHMARKS.md for what each workload measures.
#![forbid(unsafe_code)]

mod peers;
mod probe;
mod procfs;
mod run;
mod secure;
mod server;
mod stats;
mod target;
mod tracker;
mod workloads;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::run::{Env, RunResult};
use crate::server::{HubLauncher, default_hub_bin};
use crate::target::Kind;
use crate::workloads::{Opts, Sink};

/// Name of the runtime's threads, where every node runs: their CPU is the
/// subscribers'.
pub const WORKER_THREAD: &str = "bench-worker";

/// Workload names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    B1,
    B2,
    B3,
    B4,
    B5,
    B6,
    B7,
}

#[derive(Debug, Parser)]
#[command(
    name = "freshness-bench",
    version,
    about = "Load generator and measurements for the Freshness hub, NATS and Redis"
)]
struct Cli {
    /// Workloads to run, comma-separated (b1..b7).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "fsync_probe_child"
    )]
    workload: Vec<Workload>,
    /// Node counts, comma-separated [default: per workload].
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Events per second [default: per workload; for B3 and B5 the B2
    /// search at the same node count].
    #[arg(long)]
    rate: Option<u64>,
    /// Publishing time per run, e.g. 3s [default: per workload].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Systems under test, comma-separated, run interleaved.
    #[arg(long, value_delimiter = ',', default_value = "hub")]
    target: Vec<Kind>,
    /// A running hub to use instead of starting one per run; a
    /// comma-separated list for the replicas of one region (node `i` on the
    /// `i mod n`-th, the publisher on the first).
    #[arg(long)]
    hub: Option<String>,
    /// Pids of that hub or those replicas, to measure their CPU and memory
    /// (summed), comma-separated.
    #[arg(long, value_delimiter = ',')]
    hub_pid: Vec<u32>,
    /// The `freshness-hub` binary to start [default: next to this one].
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// Pin the started hubs to these CPUs (`taskset -c` list).
    #[arg(long)]
    hub_cpus: Option<String>,
    /// An extra flag for the started hubs (repeatable), e.g. --hub-arg=--shards=64.
    #[arg(long = "hub-arg", allow_hyphen_values = true)]
    hub_args: Vec<String>,
    /// NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:14222")]
    nats: String,
    /// Pid of the NATS server, to measure it.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// Redis server.
    #[arg(long, default_value = "redis://127.0.0.1:16379")]
    redis: String,
    /// Pid of the Redis server, to measure it.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Least time between two acks of a hub node: an ack goes out at once
    /// when the last is older, else when it is this old (0: after every
    /// message). The client library's default.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    ack_interval: Duration,
    /// Longest wait before a hub node acks a batch the hub did not ask to
    /// have acked at once (acks on request; 0: every batch promptly, as
    /// before them). The client library's default.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    lazy_ack_interval: Duration,
    /// Ack level of the hub's publishes: `accepted` (fire and forget: nodes
    /// ack lazily, so `ack_p99_us` is about the lazy-ack interval) or
    /// `region` (every publish waits for every node's ack, which the hub
    /// asks for promptly: `ack_p99_us` is what such a writer waits).
    #[arg(long, default_value = "accepted", value_parser = parse_ack_level)]
    ack_level: freshness::pb::AckLevel,
    /// Hub nodes sharing one HTTP/2 connection (1: each its own).
    #[arg(long, default_value_t = 1)]
    nodes_per_conn: usize,
    /// Repeat every configuration this many times.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Unmeasured start of every run.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of one step of the B2 rate search.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    step: Duration,
    /// B2 completion p99 objective in µs [default: 5000 up to 64 nodes, 25000 above].
    #[arg(long)]
    objective_us: Option<u64>,
    /// The B2 search stops when its lowest failing rate is within this
    /// fraction above its highest passing one; finer costs about one step
    /// more per halving (0.1: ~12 steps; 0.025: ~14).
    #[arg(long, default_value_t = 0.1, value_parser = parse_precision)]
    precision: f64,
    /// Entities the events are spread over [default: per workload].
    #[arg(long)]
    entities: Option<u32>,
    /// Label written into every result saying how server and generator
    /// were placed (e.g. "server pinned cpu0, generator cpu1").
    #[arg(long, default_value = "unpinned")]
    placement: String,
    /// Events per publish call, for every target alike: one `Publish`, one
    /// write of that many NATS `PUB`s, one pipeline of that many Redis
    /// `PUBLISH`es; calls go out when that many events are owed [default:
    /// every event owed at each 1 ms tick, in one call].
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Before every B1 run of a hub: measure the disk's own flush for this
    /// long per file, from the hub's CPUs (`--hub-cpus`), in the directory
    /// the started hubs keep their logs in, and report it beside the run
    /// (`fsync_p99_us`, and `call_p99_over_fsync_p99` for a durable hub).
    #[arg(long, value_parser = humantime::parse_duration)]
    fsync_probe: Option<Duration>,
    /// The probe's child process (see `--fsync-probe`).
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    fsync_probe_child: Option<Duration>,
    /// One JSON object per run on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints results as JSON lines or as a table.
struct Out {
    json: bool,
    header: bool,
}

fn mib(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| {
        format!("{:.1}", b as f64 / (1 << 20) as f64)
    })
}

fn cores(c: Option<f64>) -> String {
    c.map_or("-".into(), |c| format!("{c:.2}"))
}

impl Sink for Out {
    fn emit(&mut self, r: &RunResult) {
        let mut out = std::io::stdout().lock();
        if self.json {
            if let Ok(line) = serde_json::to_string(r) {
                let _ = writeln!(out, "{line}");
            }
            let _ = out.flush();
            return;
        }
        if !self.header {
            self.header = true;
            let _ = writeln!(
                out,
                "{:<4} {:<5} {:>6} {:>7} {:>9} {:>10} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}",
                "wl",
                "tgt",
                "nodes",
                "rate",
                "published",
                "delivered",
                "lost",
                "p50_us",
                "p99_us",
                "p999_us",
                "ack99_us",
                "call50us",
                "call99us",
                "deliv/s",
                "cpu_ns/d",
                "rss_MiB",
                "srv_cpu",
                "gen_cpu",
                "sub_cpu",
                "pub_cpu"
            );
        }
        let _ = writeln!(
            out,
            "{:<4} {:<5} {:>6} {:>7} {:>9} {:>10} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11.0} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}{}",
            r.workload,
            r.target,
            r.nodes,
            r.rate,
            r.published,
            r.delivered,
            r.lost,
            r.completion_p50_us,
            r.completion_p99_us,
            r.completion_p999_us,
            r.ack_p99_us.map_or("-".into(), |v| v.to_string()),
            r.publish_call_p50_us.map_or("-".into(), |v| v.to_string()),
            r.publish_call_p99_us.map_or("-".into(), |v| v.to_string()),
            r.deliveries_per_s,
            r.hub_cpu_ns_per_delivery
                .map_or("-".into(), |v| format!("{v:.0}")),
            mib(r.hub_peak_rss_bytes),
            cores(r.server_cpu_cores),
            cores(r.loadgen_cpu_cores),
            cores(r.subscriber_cpu_cores),
            cores(r.publisher_cpu_cores),
            // The client, not the server, may have been the bound.
            if r.generator_bound {
                " client-bound"
            } else {
                ""
            }
        );
        if !r.extra.is_empty() {
            let extra: Vec<String> = r
                .extra
                .iter()
                .filter(|(k, _)| k.as_str() != "search_steps")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "     {}", extra.join(" "));
        }
        let _ = out.flush();
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    let env = Env {
        launcher: HubLauncher {
            bin: cli.hub_bin.clone().unwrap_or_else(default_hub_bin),
            cpus: cli.hub_cpus.clone(),
            args: cli.hub_args.clone(),
        },
        hub_url: cli.hub.clone(),
        hub_pids: cli.hub_pid.clone(),
        nats_url: cli.nats.clone(),
        nats_pid: cli.nats_pid,
        redis_url: cli.redis.clone(),
        redis_pid: cli.redis_pid,
        nodes_per_conn: cli.nodes_per_conn.max(1),
        ack_interval: cli.ack_interval,
        lazy_ack_interval: cli.lazy_ack_interval,
        ack_level: cli.ack_level,
        placement: cli.placement.clone(),
    };
    let opts = Opts {
        nodes: cli.nodes.clone(),
        rate: cli.rate,
        duration: cli.duration,
        targets: cli.target.clone(),
        repeat: cli.repeat.max(1),
        warmup: cli.warmup,
        step: cli.step,
        objective_us: cli.objective_us,
        precision: cli.precision,
        entities: cli.entities,
        batch: cli.batch.min(run::MAX_BATCH),
        fsync_probe: cli.fsync_probe,
    };
    let mut out = Out {
        json: cli.json,
        header: false,
    };
    for w in &cli.workload {
        match w {
            Workload::B1 => workloads::b1(&env, &opts, &mut out).await?,
            Workload::B2 => workloads::b2(&env, &opts, &mut out).await?,
            Workload::B3 => workloads::b3(&env, &opts, &mut out).await?,
            Workload::B4 => workloads::b4(&env, &opts, &mut out).await?,
            Workload::B5 => workloads::b5(&env, &opts, &mut out).await?,
            Workload::B6 => workloads::b6(&env, &opts, &mut out).await?,
            Workload::B7 => workloads::b7(&env, &opts, &mut out).await?,
        }
    }
    secure::cleanup();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(each) = cli.fsync_probe_child {
        return match probe::child(each) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("freshness-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // Worker threads follow the CPUs this process may use, so a generator
    // pinned to one core runs one worker.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(WORKER_THREAD)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("freshness-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freshness-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `accepted`, `region` or `global` (case-insensitive).
fn parse_ack_level(s: &str) -> Result<freshness::pb::AckLevel, String> {
    match s.to_ascii_lowercase().as_str() {
        "accepted" => Ok(freshness::pb::AckLevel::Accepted),
        "region" => Ok(freshness::pb::AckLevel::Region),
        "global" => Ok(freshness::pb::AckLevel::Global),
        other => Err(format!(
            "unknown ack level `{other}`: expected accepted, region or global"
        )),
    }
}

/// A B2 search precision: a fraction in [0.005, 0.5].
fn parse_precision(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if (0.005..=0.5).contains(&p) {
        Ok(p)
    } else {
        Err(format!("precision {p} is outside 0.005..=0.5"))
    }
}
