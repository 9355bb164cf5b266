//! The storage spike behind the durable log's design (ARCHITECTURE.md,
//! "One write-ahead log for every shard"): on this machine's disk, rounds
//! in which all 64 shards append at once (a publish spread over every
//! shard), through the hub's one log (one flush per round), through one
//! file per shard (64 flushes at once), and through `redb`, an embedded
//! B-tree store (one commit per round); then the time to open the hub's
//! log and redb with a full default log (256 MiB).
//!
//! ```sh
//! cargo run --release -p freshness-bench --bin log-spike -- --dir /var/tmp/spike
//! ```
//!
//! Prints one JSON object per measurement. Nothing here is asserted.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use freshness::Entity;
use freshness_hub::log::LogEntry;
use freshness_hub::store::{self, FsyncPolicy, Recovered, Restore, Retention, Run, encode_record};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::json;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

#[derive(Parser)]
#[command(about = "Segment files against redb for the hub's durable log, on this disk")]
struct Args {
    /// A directory on the disk to measure (emptied first).
    #[arg(long, default_value = "target/log-spike")]
    dir: PathBuf,
    /// Events in the full log for the open-time measurement.
    #[arg(long, default_value_t = 1 << 20)]
    full_events: u64,
    /// How long each append measurement runs.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    each: Duration,
    /// Instead of measuring: write a hub data directory of this many bytes
    /// of events into `--dir` (`--fill-payload` bytes each, 10,000 entities, 64
    /// shards, the hub's own format) and stop, for a hub to be started on it.
    #[arg(long)]
    fill_bytes: Option<u64>,
    /// Payload bytes of each event `--fill-bytes` writes: 4096 makes a log
    /// of few large events (the memory measurement), 200 one of about a
    /// million small ones (the restart-time measurement).
    #[arg(long, default_value_t = 4096)]
    fill_payload: usize,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn entry(i: u64) -> LogEntry {
    LogEntry {
        entity: Entity::parse(&format!("user:{}", i % 100_000)).expect("valid entity"),
        local: true,
        publish_time_us: i,
        gap: false,
        awaited: false,
        version: i + 1,
        // About what an event with a trace context takes on the wire.
        bytes: Bytes::from(vec![0x5a; 180]),
    }
}

fn report(what: &str, batch: usize, lat_us: &mut [u64], events: u64, elapsed: Duration) {
    lat_us.sort_unstable();
    println!(
        "{}",
        json!({
            "what": what,
            "batch_events": batch,
            "batches": lat_us.len(),
            "events_per_s": (events as f64 / elapsed.as_secs_f64()).round(),
            "flush_p50_us": percentile(lat_us, 0.5),
            "flush_p99_us": percentile(lat_us, 0.99),
        })
    );
}

fn fsync_probe(dir: &Path, each: Duration) -> anyhow::Result<()> {
    let path = dir.join("probe");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let buf = [0u8; 256];
    let mut lat = Vec::new();
    let mut at = 0;
    let start = Instant::now();
    while start.elapsed() < each {
        let t = Instant::now();
        f.write_all_at(&buf, at)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_micros() as u64);
        at += buf.len() as u64;
    }
    let n = lat.len() as u64;
    report("fsync_probe_256B", 1, &mut lat, n, start.elapsed());
    Ok(())
}

struct Nothing;
impl Restore for Nothing {
    fn record(&mut self, _: u32, _: Recovered) {}
}

struct Count(u64);
impl Restore for Count {
    fn record(&mut self, _: u32, _: Recovered) {
        self.0 += 1;
    }
}

const SHARDS: u32 = 64;

fn retention(fsync: FsyncPolicy) -> Retention {
    Retention {
        max_events: u64::MAX,
        max_bytes: u64::MAX,
        segment_bytes: 32 << 20,
        fsync,
        fsync_interval: Duration::from_millis(100),
    }
}

/// One round: every one of the 64 shards appends `batch` events at once
/// (a publish spread over every shard), through the hub's log.
fn wal_rounds(dir: &Path, batch: u64, each: Duration) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    let opened = store::open(
        &dir.join(format!("wal-{batch}")),
        SHARDS,
        retention(FsyncPolicy::Always),
        false,
        &mut Nothing,
    )?;
    let wal = opened.wal.clone();
    let mut lat = Vec::new();
    let mut seq = 1;
    let start = Instant::now();
    while start.elapsed() < each {
        let t = Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for shard in 0..SHARDS {
                let wal = wal.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for i in 0..batch {
                        encode_record(&mut buf, shard, seq + i, &entry(seq + i));
                    }
                    let run = Run {
                        shard,
                        first_seq: seq,
                        count: batch,
                    };
                    wal.port().append(vec![run], buf).await.1
                }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })?;
        lat.push(t.elapsed().as_micros() as u64);
        seq += batch;
    }
    let events = (seq - 1) * u64::from(SHARDS);
    report(
        "one_log_64_shards_round",
        batch as usize,
        &mut lat,
        events,
        start.elapsed(),
    );
    drop(opened);
    Ok(())
}

/// The same rounds with one file per shard, each written and flushed by
/// its own thread at once (the design the log replaced).
fn files_rounds(dir: &Path, batch: u64, each: Duration) -> anyhow::Result<()> {
    use std::sync::{Arc, Barrier};
    let d = dir.join(format!("files-{batch}"));
    std::fs::create_dir_all(&d)?;
    let start_round = Arc::new(Barrier::new(SHARDS as usize + 1));
    let end_round = Arc::new(Barrier::new(SHARDS as usize + 1));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for shard in 0..SHARDS {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(d.join(format!("{shard}.seg")))?;
        let (s, e, stop) = (start_round.clone(), end_round.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut at = 0u64;
            let mut seq = 1;
            loop {
                s.wait();
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let mut buf = Vec::new();
                for i in 0..batch {
                    encode_record(&mut buf, shard, seq + i, &entry(seq + i));
                }
                f.write_all_at(&buf, at).expect("write");
                f.sync_data().expect("sync");
                at += buf.len() as u64;
                seq += batch;
                e.wait();
            }
        }));
    }
    let mut lat = Vec::new();
    let mut rounds = 0u64;
    let start = Instant::now();
    while start.elapsed() < each {
        let t = Instant::now();
        start_round.wait();
        end_round.wait();
        lat.push(t.elapsed().as_micros() as u64);
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    start_round.wait();
    for t in threads {
        let _ = t.join();
    }
    let events = rounds * batch * u64::from(SHARDS);
    report(
        "files_per_shard_64_round",
        batch as usize,
        &mut lat,
        events,
        start.elapsed(),
    );
    Ok(())
}

fn redb_rounds(dir: &Path, batch: u64, each: Duration) -> anyhow::Result<()> {
    let db = Database::create(dir.join(format!("redb-{batch}.db")))?;
    let mut seq = 1u64;
    let mut buf = Vec::new();
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < each {
        let t = Instant::now();
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut table = tx.open_table(EVENTS)?;
            for shard in 0..SHARDS {
                for i in 0..batch {
                    buf.clear();
                    encode_record(&mut buf, shard, seq + i, &entry(seq + i));
                    table.insert((u64::from(shard) << 48) | (seq + i), buf.as_slice())?;
                }
            }
        }
        tx.commit()?;
        lat.push(t.elapsed().as_micros() as u64);
        seq += batch;
    }
    let events = (seq - 1) * u64::from(SHARDS);
    report(
        "redb_64_shards_round",
        batch as usize,
        &mut lat,
        events,
        start.elapsed(),
    );
    Ok(())
}

fn open_full(dir: &Path, events: u64) -> anyhow::Result<()> {
    // The hub's log, written without flushes (this measures reading back).
    let path = dir.join("full-log");
    {
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let opened = store::open(
            &path,
            SHARDS,
            retention(FsyncPolicy::Never),
            false,
            &mut Nothing,
        )?;
        let per_shard = events / u64::from(SHARDS);
        let mut seq = 1;
        while seq <= per_shard {
            let n = 256.min(per_shard - seq + 1);
            for shard in 0..SHARDS {
                let mut buf = Vec::new();
                for i in 0..n {
                    encode_record(&mut buf, shard, seq + i, &entry(seq + i + u64::from(shard)));
                }
                let run = Run {
                    shard,
                    first_seq: seq,
                    count: n,
                };
                rt.block_on(opened.wal.port().append(vec![run], buf)).1?;
            }
            seq += n;
        }
    }
    let bytes: u64 = walk_bytes(&path)?;
    let t = Instant::now();
    let mut count = Count(0);
    drop(store::open(
        &path,
        SHARDS,
        retention(FsyncPolicy::Never),
        false,
        &mut count,
    )?);
    let scan = t.elapsed();
    let mut config = freshness_hub::Config {
        data_dir: path.clone(),
        shards: SHARDS,
        ..freshness_hub::Config::default()
    };
    config.log_max_bytes = 1 << 40;
    config.log_max_events = 1 << 40;
    let t = Instant::now();
    let durable = freshness_hub::open_log(&config)?.context("a durable log")?;
    let rebuild = t.elapsed();
    drop(durable);
    println!(
        "{}",
        json!({
            "what": "one_log_open_full",
            "events": count.0,
            "bytes": bytes,
            "check_only_ms": scan.as_millis() as u64,
            "open_and_rebuild_memory_ms": rebuild.as_millis() as u64,
        })
    );

    let db_path = dir.join("full.db");
    {
        let db = Database::create(&db_path)?;
        let mut seq = 1u64;
        let mut buf = Vec::new();
        while seq <= events {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::None)?;
            {
                let mut table = tx.open_table(EVENTS)?;
                for i in 0..10_000.min(events - seq + 1) {
                    buf.clear();
                    encode_record(&mut buf, 0, seq + i, &entry(seq + i));
                    table.insert(seq + i, buf.as_slice())?;
                }
            }
            tx.commit()?;
            seq += 10_000;
        }
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
    }
    let db_bytes = std::fs::metadata(&db_path)?.len();
    let t = Instant::now();
    let db = Database::create(&db_path)?;
    let read = db.begin_read()?;
    let table = read.open_table(EVENTS)?;
    let mut n = 0u64;
    for row in table.iter()? {
        let (_, v) = row?;
        n += u64::from(!v.value().is_empty());
    }
    println!(
        "{}",
        json!({
            "what": "redb_open_full",
            "events": n,
            "bytes": db_bytes,
            "open_and_scan_ms": t.elapsed().as_millis() as u64,
        })
    );
    Ok(())
}

/// A hub data directory holding `bytes` of events: what a hub that kept a
/// large log on disk starts from.
fn fill(dir: &Path, bytes: u64, payload: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut r = retention(FsyncPolicy::Never);
    r.segment_bytes = 64 << 20;
    let opened = store::open(dir, SHARDS, r, false, &mut Nothing)?;
    let payload = Bytes::from(vec![0x5a; payload]);
    let mut seqs = vec![0u64; SHARDS as usize];
    let mut written = 0u64;
    let mut i = 0u64;
    while written < bytes {
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); SHARDS as usize];
        let mut counts = vec![0u64; SHARDS as usize];
        for _ in 0..4096 {
            i += 1;
            let entity = format!("user:{}", i % 10_000);
            let shard = freshness::shard(&entity, SHARDS).0;
            let s = shard as usize;
            let e = LogEntry {
                entity: Entity::parse(&entity).expect("valid entity"),
                local: true,
                publish_time_us: i,
                gap: false,
                awaited: false,
                version: i,
                bytes: payload.clone(),
            };
            encode_record(&mut bufs[s], shard, seqs[s] + counts[s] + 1, &e);
            counts[s] += 1;
        }
        for s in 0..SHARDS as usize {
            if counts[s] == 0 {
                continue;
            }
            written += bufs[s].len() as u64;
            let buf = std::mem::take(&mut bufs[s]);
            let run = Run {
                shard: s as u32,
                first_seq: seqs[s] + 1,
                count: counts[s],
            };
            rt.block_on(opened.wal.port().append(vec![run], buf)).1?;
            seqs[s] += counts[s];
        }
    }
    drop(opened);
    println!(
        "{}",
        json!({"what": "fill", "events": i, "bytes": walk_bytes(dir)?})
    );
    Ok(())
}

fn walk_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            walk_bytes(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    if let Some(bytes) = args.fill_bytes {
        return fill(&args.dir, bytes, args.fill_payload);
    }
    fsync_probe(&args.dir, args.each)?;
    for batch in [1, 4, 32] {
        wal_rounds(&args.dir, batch, args.each)?;
        files_rounds(&args.dir, batch, args.each)?;
        redb_rounds(&args.dir, batch, args.each)?;
    }
    open_full(&args.dir, args.full_events)?;
    std::io::stdout().flush()?;
    std::fs::remove_dir_all(&args.dir)?;
    Ok(())
}
