//! `freshctl`: publish invalidations, watch a hub's feed, show a hub's status.
//!
//! A thin binary over the `freshness-client` library. Every failure is one
//! line on stderr and a non-zero exit status (1 for a failed operation, 2 for
//! a malformed command line).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use freshness_client::{
    AckLevel, Backoff, Credentials, Entity, EventBatch, FeedState, Handler, HandlerError,
    HubStatus, NodeState, NodeStatus, PublishOptions, Publisher, Reset, RetryPolicy, Subscriber,
    Version, publisher::Event, telemetry,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

#[derive(Debug, Parser)]
#[command(
    name = "freshctl",
    version,
    about = "Publish invalidations to a Freshness hub, watch its feed, show its status"
)]
struct Cli {
    /// The hub's gRPC address; the replicas of one region comma-separated
    /// (tried in turn, the one used is logged; `status` asks each).
    #[arg(
        long,
        global = true,
        env = "FRESHNESS_HUB",
        default_value = "http://127.0.0.1:50051"
    )]
    hub: String,
    /// CA (PEM) of a TLS hub (an https:// address).
    #[arg(long, global = true, env = "FRESHNESS_CA")]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a hub that requires one.
    #[arg(long, global = true, env = "FRESHNESS_CERT", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, global = true, env = "FRESHNESS_KEY", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Bearer token (a JWT or a static token) sent with every call.
    #[arg(long, global = true, env = "FRESHNESS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The TLS settings and token of this run, read once from the files the
/// flags name (every connection of the run uses them).
static CREDENTIALS: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();

fn credentials() -> Credentials {
    CREDENTIALS.get().cloned().unwrap_or_default()
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish that ENTITY committed VERSION (run it after the commit).
    Publish {
        /// `namespace:id`, e.g. `user:42`.
        entity: String,
        /// The committed version, at least 1.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        version: u64,
        /// What to wait for: the hub appended it (accepted), every node of
        /// the region acked it (region), every region did (global).
        #[arg(long, value_enum, default_value = "accepted")]
        ack: Ack,
        /// How long region/global wait for acks.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The new value, for nodes that refresh in place.
        #[arg(long)]
        payload: Option<String>,
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
    },
    /// Print the hub's feed (from its current head) until interrupted.
    Watch {
        /// Only these namespaces (repeatable); all by default.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// The node id to subscribe as (default: freshctl-watch-PID-RANDOM).
        #[arg(long)]
        node_id: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show the hub's region, epoch, shards, nodes and peers.
    Status {
        /// One JSON object (with --watch, one per line and refresh).
        #[arg(long)]
        json: bool,
        /// Refresh in place until interrupted (Ctrl-C), like `top`; the
        /// nodes are shown laggards first.
        #[arg(long)]
        watch: bool,
        /// How often --watch refreshes.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
        /// The most nodes --watch shows (the worst); the rest are counted.
        #[arg(long, default_value_t = 20)]
        nodes: usize,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Ack {
    Accepted,
    Region,
    Global,
}

impl From<Ack> for AckLevel {
    fn from(a: Ack) -> Self {
        match a {
            Ack::Accepted => AckLevel::Accepted,
            Ack::Region => AckLevel::Region,
            Ack::Global => AckLevel::Global,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("freshctl: {}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("freshctl: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Logs (FRESHNESS_LOG, off by default) and, when OTEL_* asks for it,
    // span export; dropped after `block_on`, it flushes the last spans.
    let _telemetry = match runtime.block_on(async { telemetry::init("freshctl", "off") }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("freshctl: error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("freshctl: error: {}", one_line(&chain.join(": ")));
            ExitCode::FAILURE
        }
    }
}

/// Folds a multi-line message (clap's) into one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut creds =
        Credentials::from_files(cli.ca.as_deref(), cli.cert.as_deref(), cli.key.as_deref())
            .context("TLS files")?;
    if let Some(token) = cli.token.filter(|t| !t.is_empty()) {
        creds = creds.bearer_token(token);
    }
    let _ = CREDENTIALS.set(creds);
    match cli.command {
        Command::Publish {
            entity,
            version,
            ack,
            timeout,
            payload,
            json,
        } => publish(&cli.hub, &entity, version, ack, timeout, payload, json).await,
        Command::Watch {
            namespaces,
            node_id,
            json,
        } => watch(&cli.hub, namespaces, node_id, json).await,
        Command::Status {
            json, watch: false, ..
        } => status(&cli.hub, json).await,
        Command::Status {
            json,
            watch: true,
            interval,
            nodes,
        } => status_watch(&cli.hub, json, interval, nodes).await,
    }
}

fn publisher(hub: &str) -> anyhow::Result<Publisher> {
    Ok(Publisher::builder(hub)
        .credentials(credentials())
        .linger(Duration::ZERO)
        .retry(RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_millis(500)),
            give_up_after: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(5),
        })
        .build()?)
}

async fn publish(
    hub: &str,
    entity: &str,
    version: u64,
    ack: Ack,
    timeout: Duration,
    payload: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let entity = Entity::parse(entity).with_context(|| format!("invalid entity {entity:?}"))?;
    let version = Version::new(version).ok_or_else(|| anyhow!("version must be at least 1"))?;
    let mut event = Event::new(entity, version);
    if let Some(p) = payload {
        event = event.with_payload(p.into_bytes());
    }
    let opts = PublishOptions::ack(ack.into()).with_timeout(timeout);
    let span = info_span!("freshctl.publish", entity = %event.entity, version = telemetry::num(event.version.get()));
    let receipt = publisher(hub)?
        .publish_events(vec![event], opts)
        .instrument(span)
        .await?;
    let waited = !matches!(ack, Ack::Accepted);
    let mut out = std::io::stdout().lock();
    for r in &receipt.results {
        if json {
            let mut obj = json!({
                "entity": r.entity.as_str(),
                "version": r.version.get(),
                "result": r.outcome.as_str(),
                "shard": r.shard.0,
                "seq": r.seq,
                "current_version": r.current_version,
                "epoch": receipt.epoch,
            });
            if waited {
                obj["complete"] = json!(receipt.complete);
                obj["pending"] = json!(receipt.pending_nodes);
                obj["pending_regions"] = json!(receipt.pending_regions);
            }
            writeln!(out, "{obj}")?;
        } else {
            write!(
                out,
                "{} v{}: {} (shard {}, seq {}, current version {})",
                r.entity,
                r.version,
                r.outcome.as_str(),
                r.shard,
                r.seq,
                r.current_version
            )?;
            if waited {
                if receipt.complete {
                    write!(out, "; every node acked")?;
                } else {
                    let pending: Vec<&str> = receipt
                        .pending_nodes
                        .iter()
                        .chain(&receipt.pending_regions)
                        .map(String::as_str)
                        .collect();
                    write!(out, "; not acked by: {}", pending.join(", "))?;
                }
            }
            writeln!(out)?;
        }
    }
    if !receipt.note.is_empty() && !json {
        writeln!(out, "note: {}", receipt.note)?;
    }
    Ok(())
}

/// Prints what the subscriber delivers. Stops the watch when stdout is gone
/// (`freshctl watch | head`).
struct Printer {
    json: bool,
    stop: CancellationToken,
}

impl Printer {
    fn emit(&self, lines: &[String]) -> Result<(), HandlerError> {
        let mut out = std::io::stdout().lock();
        let written = lines
            .iter()
            .try_for_each(|l| writeln!(out, "{l}"))
            .and_then(|()| out.flush());
        if written.is_err() {
            self.stop.cancel();
        }
        Ok(())
    }
}

impl Handler for Printer {
    async fn on_events(&self, batch: &EventBatch) -> Result<(), HandlerError> {
        let lines: Vec<String> = batch
            .events
            .iter()
            .map(|e| {
                if self.json {
                    let mut line = json!({
                        "entity": e.entity.as_str(),
                        "version": e.version.get(),
                        "shard": e.shard.0,
                        "seq": e.seq,
                        "origin": e.origin,
                    });
                    if let Some(tp) = &e.traceparent {
                        line["traceparent"] = json!(tp);
                    }
                    line.to_string()
                } else {
                    format!(
                        "{} v{}  shard={} seq={} origin={}",
                        e.entity, e.version, e.shard, e.seq, e.origin
                    )
                }
            })
            .collect();
        self.emit(&lines)
    }

    async fn on_reset(&self, reset: &Reset) -> Result<(), HandlerError> {
        let shards: Vec<u32> = reset.shard_list().iter().map(|s| s.0).collect();
        let line = if self.json {
            json!({
                "reset": true,
                "all": reset.is_all(),
                "shards": shards,
                "reason": reset.reason.as_str(),
            })
            .to_string()
        } else if reset.is_all() {
            format!("reset: all shards ({})", reset.reason)
        } else {
            format!("reset: shards {shards:?} ({})", reset.reason)
        };
        self.emit(&[line])
    }
}

async fn watch(
    hub: &str,
    namespaces: Vec<String>,
    node_id: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let node_id = node_id.unwrap_or_else(|| {
        format!(
            "freshctl-watch-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        )
    });
    let stop = CancellationToken::new();
    let subscriber = Subscriber::builder(hub, node_id)
        .credentials(credentials())
        .namespaces(namespaces)
        .reconnect_backoff(Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        ))
        .build(Printer {
            json,
            stop: stop.clone(),
        })?;
    let mut states = subscriber.feed().watch();
    let handle = subscriber.spawn_with(stop.clone());
    // Feed changes go to stderr so that stdout stays one event per line.
    let report = tokio::spawn(async move {
        let mut last = String::new();
        while states.changed().await.is_ok() {
            let line = match &*states.borrow_and_update() {
                FeedState::Connecting => "connecting".to_owned(),
                FeedState::Live { .. } => "live".to_owned(),
                FeedState::Stale { staleness } => {
                    format!("stale ({staleness:?} without a watermark)")
                }
                FeedState::Down { error } => format!("down: {error}"),
            };
            if line != last {
                eprintln!("freshctl: feed {line}");
                last = line;
            }
        }
    });
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            r.context("cannot listen for ctrl-c")?;
            stop.cancel();
        }
        () = stop.cancelled() => {}
    }
    let result = handle.shutdown().await;
    report.abort();
    Ok(result?)
}

async fn status(hub: &str, json: bool) -> anyhow::Result<()> {
    // Each replica speaks for its own nodes: with several hubs, each is
    // asked and shown in turn (one JSON object per line).
    let hubs: Vec<&str> = hub
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    anyhow::ensure!(!hubs.is_empty(), "--hub {hub:?} names no hub");
    for (i, h) in hubs.iter().enumerate() {
        let s = publisher(h)?.status().await?;
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", status_json(&s))?;
            continue;
        }
        if hubs.len() > 1 {
            if i > 0 {
                writeln!(out)?;
            }
            writeln!(out, "== {h}")?;
        }
        status_tables(&mut out, &s)?;
    }
    Ok(())
}

/// A --watch interval: at least 100 ms.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s} is shorter than 100ms"));
    }
    Ok(d)
}

/// Clears a terminal line from the cursor to its end.
const CLEAR_LINE: &str = "\x1b[K";

/// `status --watch`: the status redrawn every `interval` until Ctrl-C. On a
/// terminal it draws on the alternate screen (the shell's screen comes back
/// at the end) from the top left, clearing what the last frame left;
/// elsewhere (a pipe) it prints one snapshot after another. A hub that does
/// not answer is shown as such and asked again at the next refresh.
async fn status_watch(hub: &str, json: bool, interval: Duration, top: usize) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let publisher = publisher(hub)?;
    let tty = !json && std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    if tty {
        // Alternate screen, cursor hidden.
        print!("\x1b[?1049h\x1b[?25l");
    }
    let result = async {
        loop {
            tokio::select! {
                r = &mut ctrl_c => {
                    r.context("cannot listen for ctrl-c")?;
                    return Ok(());
                }
                _ = tick.tick() => {}
            }
            let answer = tokio::select! {
                r = &mut ctrl_c => {
                    r.context("cannot listen for ctrl-c")?;
                    return Ok(());
                }
                a = publisher.status() => a,
            };
            let mut frame: Vec<u8> = Vec::new();
            match (&answer, json) {
                (Ok(s), true) => writeln!(frame, "{}", status_json(s))?,
                (Err(e), true) => writeln!(
                    frame,
                    "{}",
                    json!({ "error": format!("hub {hub} does not answer: {e}") })
                )?,
                (Ok(s), false) => {
                    writeln!(
                        frame,
                        "freshctl status --watch  {hub}  every {}  {} UTC  (Ctrl-C to quit)",
                        humantime::format_duration(interval),
                        clock(s.now_us)
                    )?;
                    writeln!(frame)?;
                    let mut worst = s.clone();
                    worst.nodes.sort_by(|a, b| {
                        (
                            node_state(a) == "live",
                            std::cmp::Reverse(a.lag_events),
                            std::cmp::Reverse(a.staleness_ms),
                            &a.node_id,
                        )
                            .cmp(&(
                                node_state(b) == "live",
                                std::cmp::Reverse(b.lag_events),
                                std::cmp::Reverse(b.staleness_ms),
                                &b.node_id,
                            ))
                    });
                    let hidden = worst.nodes.len().saturating_sub(top);
                    worst.nodes.truncate(top);
                    status_tables(&mut frame, &worst)?;
                    if hidden > 0 {
                        writeln!(frame, "... and {hidden} more nodes (--nodes shows more)")?;
                    }
                }
                (Err(e), false) => {
                    writeln!(frame, "freshctl status --watch  {hub}  (Ctrl-C to quit)")?;
                    writeln!(frame)?;
                    writeln!(
                        frame,
                        "hub does not answer: {e}; asking again in {}",
                        humantime::format_duration(interval)
                    )?;
                }
            }
            let text = String::from_utf8_lossy(&frame);
            let mut out = std::io::stdout().lock();
            if tty {
                // Home, each line cleared past its end, the rest below cleared.
                write!(out, "\x1b[H")?;
                for line in text.lines() {
                    write!(out, "{line}{CLEAR_LINE}\r\n")?;
                }
                write!(out, "\x1b[J")?;
            } else {
                write!(out, "{text}")?;
                if !json {
                    writeln!(out)?;
                }
            }
            out.flush()?;
        }
    }
    .await;
    if tty {
        // Cursor back, the shell's screen back.
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
    }
    result
}

/// `HH:MM:SS` of a hub timestamp (microseconds since the Unix epoch), UTC.
fn clock(now_us: u64) -> String {
    let s = now_us / 1_000_000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The human status: a summary line, then the nodes' and the peers' tables.
fn status_tables(out: &mut impl Write, s: &HubStatus) -> anyhow::Result<()> {
    let heads: u64 = s.shards.iter().map(|x| x.head_seq).sum();
    writeln!(
        out,
        "hub {}  region {}  epoch {}  shards {}  events appended {}  in memory {} ({} bytes)  log {}",
        s.hub_id,
        s.region,
        s.epoch,
        s.shard_count,
        heads,
        s.retained_events,
        s.retained_bytes,
        if s.durable {
            "on disk"
        } else {
            "in memory only"
        }
    )?;
    if let Some(e) = &s.log_error {
        writeln!(
            out,
            "LOG WRITES FAILING (publishes refused until they succeed): {e}"
        )?;
    }
    writeln!(out)?;
    let rows: Vec<[String; 6]> = s
        .nodes
        .iter()
        .map(|n| {
            [
                n.node_id.clone(),
                format!(
                    "{} {:.1}s",
                    node_state(n),
                    state_for_ms(s, n) as f64 / 1000.0
                ),
                if n.namespaces.is_empty() {
                    "*".into()
                } else {
                    n.namespaces.join(",")
                },
                n.lag_events.to_string(),
                format!("{}ms", n.staleness_ms),
                format!(
                    "{}/{}{}",
                    n.in_flight,
                    n.max_in_flight,
                    if n.parked { " parked" } else { "" }
                ),
            ]
        })
        .collect();
    table(
        out,
        [
            "NODE",
            "STATE (for)",
            "NAMESPACES",
            "LAG (events)",
            "STALENESS",
            "IN FLIGHT",
        ],
        &rows,
        "no nodes connected",
    )?;
    writeln!(out)?;
    let rows: Vec<[String; 5]> = s
        .peers
        .iter()
        .map(|p| {
            [
                p.region.clone(),
                p.address.clone(),
                // With replicas, one of them runs the region's links.
                match &p.linked_by {
                    Some(by) if *by != s.hub_id => format!("via {by}"),
                    _ if p.connected => "yes".into(),
                    _ => "no".into(),
                },
                format!("{} events, {}ms", p.lag_events, p.lag_ms),
                p.last_error.clone(),
            ]
        })
        .collect();
    table(
        out,
        ["PEER", "ADDRESS", "CONNECTED", "LAG", "LAST ERROR"],
        &rows,
        "no peers",
    )?;
    Ok(())
}

/// A node's state as status shows it: `live`, `parked`, `blocked`,
/// `resetting` (`unknown` from a hub that does not report it).
fn node_state(n: &NodeStatus) -> &'static str {
    n.state.map_or("unknown", NodeState::as_str)
}

/// How long the node has been in its state, on the hub's clock.
fn state_for_ms(s: &HubStatus, n: &NodeStatus) -> u64 {
    s.now_us.saturating_sub(n.state_since_us) / 1000
}

fn status_json(s: &HubStatus) -> serde_json::Value {
    json!({
        "hub_id": s.hub_id,
        "region": s.region,
        "epoch": s.epoch,
        "shards": s.shard_count,
        "head_seqs": s.shards.iter().map(|x| x.head_seq).collect::<Vec<_>>(),
        "retained_events": s.retained_events,
        "retained_bytes": s.retained_bytes,
        "durable": s.durable,
        "log_error": s.log_error.clone().unwrap_or_default(),
        "nodes": s.nodes.iter().map(|n| json!({
            "node_id": n.node_id,
            "namespaces": n.namespaces,
            "lag_events": n.lag_events,
            "staleness_ms": n.staleness_ms,
            "in_flight": n.in_flight,
            "parked": n.parked,
            "state": node_state(n),
            "state_since_us": n.state_since_us,
            "state_for_ms": state_for_ms(s, n),
            "replication": n.replication,
        })).collect::<Vec<_>>(),
        "peers": s.peers.iter().map(|p| json!({
            "region": p.region,
            "address": p.address,
            "connected": p.connected,
            "lag_events": p.lag_events,
            "lag_ms": p.lag_ms,
            "last_error": p.last_error,
            "linked_by": p.linked_by,
        })).collect::<Vec<_>>(),
    })
}

fn table<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
    empty: &str,
) -> anyhow::Result<()> {
    if rows.is_empty() {
        writeln!(out, "{}: {empty}", header[0].to_lowercase())?;
        return Ok(());
    }
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
