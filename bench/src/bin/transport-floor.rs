//! What a fan-out frame costs a server on this machine without the hub:
//! the same fan-out (every event to every connection, one frame per
//! connection holding whatever events are new, one small ack back per
//! frame) over raw TCP and over the `h2` crate (the HTTP/2 stack under
//! tonic and hyper), so that the hub's CPU per delivery can be set against
//! the floor of its transport.
//!
//! ```sh
//! cargo build --release -p freshness-bench
//! chrt -f 10 taskset -c 1 target/release/transport-floor --proto raw --conns 256 --rate 100
//! chrt -f 10 taskset -c 1 target/release/transport-floor --proto h2 --conns 256 --rate 100
//! ```
//!
//! The driver starts the server as a child (this binary with `--serve`)
//! pinned with `taskset -c 0` (`--server-cpus`), opens the connections,
//! runs `--duration`, and prints one JSON object: server CPU per delivery
//! (`/proc/PID/task/*/schedstat`), deliveries, frames received, and the
//! completion latency (publish → the last connection received it).

#[path = "../procfs.rs"]
#[allow(dead_code)]
mod procfs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(about = "Fan-out cost of a bare transport (raw TCP or h2) on this machine")]
struct Args {
    /// The transport.
    #[arg(long, value_enum)]
    proto: Proto,
    /// Connections, one stream each.
    #[arg(long, default_value_t = 256)]
    conns: usize,
    /// Events per second, each to every connection.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Publishing time.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Pin the server to these CPUs (`taskset -c`).
    #[arg(long, default_value = "0")]
    server_cpus: String,
    /// Run as the server on this address (used by the driver).
    #[arg(long, hide = true)]
    serve: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Proto {
    Raw,
    H2,
}

/// One event on the wire: its index and the publish time (ns since the Unix
/// epoch, the one clock both processes share), padded to the size of a
/// small encoded hub event.
const RECORD: usize = 40;
/// What a node sends back per frame.
const ACK: usize = 8;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.serve {
        Some(addr) => rt.block_on(serve(args.proto, addr, args.rate)),
        None => rt.block_on(drive(args)),
    }
}

// ---- server ----

async fn serve(proto: Proto, addr: SocketAddr, rate: u64) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("{}", listener.local_addr()?.port());
    // The event count and publish times: events are published by a ticker
    // every millisecond (what the clock owes), as the bench's publisher does.
    let (tx, rx) = watch::channel(0u64);
    let times: Arc<Vec<AtomicU64>> = Arc::new((0..1 << 20).map(|_| AtomicU64::new(0)).collect());
    let start = Arc::new(tokio::sync::Notify::new());
    {
        let times = times.clone();
        let start = start.clone();
        tokio::spawn(async move {
            start.notified().await;
            let t0 = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut sent = 0u64;
            loop {
                tick.tick().await;
                let owed = (t0.elapsed().as_micros() as u64 * rate / 1_000_000).min(1 << 20);
                if owed > sent {
                    let now = now_ns();
                    for i in sent..owed {
                        times[i as usize].store(now, Ordering::Release);
                    }
                    sent = owed;
                    tx.send_replace(sent);
                }
            }
        });
    }
    // The driver's control connection: its first byte starts publishing,
    // and the server exits when it closes, so that a driver that died does
    // not leave a server behind.
    let (mut control, _) = listener.accept().await?;
    tokio::spawn(async move {
        let mut b = [0u8; 1];
        if control.read_exact(&mut b).await.is_ok() {
            start.notify_one();
            while matches!(control.read(&mut b).await, Ok(n) if n > 0) {}
        }
        std::process::exit(0);
    });
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let rx = rx.clone();
        let times = times.clone();
        tokio::spawn(async move {
            let r = match proto {
                Proto::Raw => serve_raw(tcp, rx, times).await,
                Proto::H2 => serve_h2(tcp, rx, times).await,
            };
            if let Err(e) = r {
                eprintln!("connection: {e:#}");
            }
        });
    }
}

/// The records of events `from..to`, one frame.
fn frame(from: u64, to: u64, times: &[AtomicU64]) -> Bytes {
    let mut buf = BytesMut::with_capacity(((to - from) as usize) * RECORD);
    for i in from..to {
        buf.put_u64(i);
        buf.put_u64(times[i as usize].load(Ordering::Acquire));
        buf.put_bytes(0, RECORD - 16);
    }
    buf.freeze()
}

async fn serve_raw(
    tcp: TcpStream,
    mut rx: watch::Receiver<u64>,
    times: Arc<Vec<AtomicU64>>,
) -> Result<()> {
    let (mut rd, mut wr) = tcp.into_split();
    let mut sent = *rx.borrow_and_update();
    let mut ack = [0u8; 4096];
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { return Ok(()); }
                let head = *rx.borrow_and_update();
                wr.write_all(&frame(sent, head, &times)).await?;
                sent = head;
            }
            n = rd.read(&mut ack) => {
                if n? == 0 { return Ok(()); }
            }
        }
    }
}

async fn serve_h2(
    tcp: TcpStream,
    mut rx: watch::Receiver<u64>,
    times: Arc<Vec<AtomicU64>>,
) -> Result<()> {
    let mut conn = h2::server::handshake(tcp).await?;
    let Some(accepted) = conn.accept().await else {
        return Ok(());
    };
    // The connection is driven by a task of its own, as hyper does.
    tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
    let (req, mut respond) = accepted?;
    let mut body = req.into_body();
    let mut out = respond.send_response(http::Response::new(()), false)?;
    let mut sent = *rx.borrow_and_update();
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { return Ok(()); }
                let head = *rx.borrow_and_update();
                out.send_data(frame(sent, head, &times), false)?;
                sent = head;
            }
            data = body.data() => match data {
                Some(d) => {
                    let d = d?;
                    body.flow_control().release_capacity(d.len())?;
                }
                None => return Ok(()),
            }
        }
    }
}

// ---- driver ----

/// Per event: its publish time and the latest arrival over all
/// connections (ns since the epoch).
struct Arrivals {
    published: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
    deliveries: AtomicU64,
    frames: AtomicU64,
}

impl Arrivals {
    fn record(&self, bytes: &[u8]) {
        let now = now_ns();
        for r in bytes.chunks_exact(RECORD) {
            let i = u64::from_be_bytes(r[..8].try_into().unwrap_or_default()) as usize;
            let at = u64::from_be_bytes(r[8..16].try_into().unwrap_or_default());
            if let (Some(slot), Some(p)) = (self.last.get(i), self.published.get(i)) {
                slot.fetch_max(now, Ordering::Relaxed);
                p.store(at, Ordering::Relaxed);
            }
            self.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        self.frames.fetch_add(1, Ordering::Relaxed);
    }
}

async fn drive(args: Args) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new("taskset")
        .arg("-c")
        .arg(&args.server_cpus)
        .arg(&exe)
        .args([
            "--proto",
            if args.proto == Proto::Raw {
                "raw"
            } else {
                "h2"
            },
        ])
        .args(["--rate", &args.rate.to_string(), "--serve", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the server")?;
    let pid = child.id().context("server pid")?;
    let mut out = child.stdout.take().context("server stdout")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).await? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let port: u16 = String::from_utf8(line)?
        .trim()
        .parse()
        .context("server port")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut control = TcpStream::connect(addr).await?;

    let events = (args.rate as f64 * args.duration.as_secs_f64()) as usize;
    let slots = events.min(1 << 20) + args.rate as usize;
    let arrivals = Arc::new(Arrivals {
        published: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        last: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        deliveries: AtomicU64::new(0),
        frames: AtomicU64::new(0),
    });
    let mut nodes = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let arrivals = arrivals.clone();
        nodes.push(match args.proto {
            Proto::Raw => tokio::spawn(node_raw(tcp, arrivals)),
            Proto::H2 => tokio::spawn(node_h2(tcp, arrivals).await?),
        });
    }
    // Every connection is up (h2 nodes have their response headers); start.
    let cpu0 = procfs::cpu_ns(pid).context("server cpu")?;
    let t0 = tokio::time::Instant::now();
    control.write_all(&[1]).await?;
    tokio::time::sleep(args.duration).await;
    let want = (args.rate as u128 * t0.elapsed().as_micros() / 1_000_000) as u64;
    let cpu1 = procfs::cpu_ns(pid).context("server cpu")?;
    let elapsed = t0.elapsed();
    // Drain: up to 5 s for the events published so far to arrive everywhere.
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while arrivals.deliveries.load(Ordering::Relaxed)
        < want.saturating_sub(args.rate / 100) * args.conns as u64
        && tokio::time::Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deliveries = arrivals.deliveries.load(Ordering::Relaxed);
    let frames = arrivals.frames.load(Ordering::Relaxed);
    for n in nodes {
        n.abort();
    }
    child.kill().await.ok();

    // Completion per event: publish → the last connection received it.
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for (p, last) in arrivals.published.iter().zip(&arrivals.last) {
        let (p, last) = (p.load(Ordering::Relaxed), last.load(Ordering::Relaxed));
        if p != 0 && last >= p {
            hist.record((last - p) / 1000)?;
        }
    }
    // CPU over the publishing time, against what was published in it (the
    // drain can see a few events published after it).
    let cpu = cpu1.saturating_sub(cpu0);
    let per_delivery = cpu as f64 / (want * args.conns as u64).max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "proto": format!("{:?}", args.proto).to_lowercase(),
            "conns": args.conns,
            "rate": args.rate,
            "duration_s": elapsed.as_secs_f64(),
            "published": want,
            "deliveries": deliveries,
            "frames": frames,
            "events_per_frame": deliveries as f64 / frames.max(1) as f64,
            "server_cpu_cores": cpu as f64 / elapsed.as_nanos() as f64,
            "server_cpu_ns_per_delivery": per_delivery,
            "server_cpu_ns_per_frame": per_delivery * deliveries as f64 / frames.max(1) as f64,
            "completion_p50_us": hist.value_at_quantile(0.5),
            "completion_p99_us": hist.value_at_quantile(0.99),
        })
    );
    Ok(())
}

async fn node_raw(mut tcp: TcpStream, arrivals: Arc<Arrivals>) -> Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            bail!("server closed");
        }
        let whole = buf.len() / RECORD * RECORD;
        if whole > 0 {
            let records = buf.split_to(whole);
            arrivals.record(&records);
            tcp.write_all(&[0u8; ACK]).await?;
        }
    }
}

/// Opens the stream (waiting for the response headers) and returns the
/// node's loop.
async fn node_h2(
    tcp: TcpStream,
    arrivals: Arc<Arrivals>,
) -> Result<impl std::future::Future<Output = Result<()>>> {
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move { conn.await.ok() });
    let mut client = client.ready().await?;
    let req = http::Request::post("http://floor/stream").body(())?;
    let (response, mut acks) = client.send_request(req, false)?;
    let mut body = response.await?.into_body();
    Ok(async move {
        let mut pending = BytesMut::new();
        while let Some(data) = body.data().await {
            let data = data?;
            body.flow_control().release_capacity(data.len())?;
            pending.extend_from_slice(&data);
            let whole = pending.len() / RECORD * RECORD;
            if whole > 0 {
                let records = pending.split_to(whole);
                arrivals.record(&records);
                acks.send_data(Bytes::from_static(&[0u8; ACK]), false)?;
            }
        }
        bail!("server closed")
    })
}
