//! The durable log: the hub's epoch and every shard's events on disk, so
//! that a restart on the same `data_dir` keeps the epoch and continues
//! every shard's seqs (SPEC §6).
//!
//! ## Layout
//! ```text
//! data_dir/
//!   LOCK                  held (flock) while a hub uses the directory
//!   hub.meta              format, epoch, shard count (written once, atomically)
//!   peers/REGION.cursor   how far this hub appended each peer's events
//!   shard-00000/
//!     00000000000000000001.seg   records with seqs 1, 2, ... (name = first seq)
//!     00000000000000004711.seg
//! ```
//!
//! A segment is a run of records, each `len u32 | crc32 u32 | body`, little
//! endian, the checksum over the body; the body holds the seq, flags, origin
//! publish time, version, entity and the event exactly as it goes on the
//! wire (the same bytes the in-memory log keeps). Seqs run without a gap
//! from the segment's name, and each segment starts where the one before it
//! ended. The shape is Kafka's and the NATS file store's: appends only, one
//! file per shard and retention by whole segments.
//!
//! ## Recovery
//! Every record is checked (length, checksum, seq). A bad record in the last
//! segment of a shard after which nothing valid follows is a torn tail (a
//! write the crash cut short, never answered): it is truncated with one log
//! line. Anything else — a bad record with valid ones after it, a bad record
//! in an older segment, segments that do not follow each other — is
//! corruption: [`open`] refuses with the file and offset, unless `repair` is
//! set, which keeps the longest valid prefix of each shard and starts a new
//! epoch (continuity can no longer be proven, SPEC §6).
//!
//! ## Writes
//! The shard actor encodes the records of one drain into one buffer and
//! writes it at the end of its active segment ([`ShardStore::append`]). A
//! failed write leaves nothing behind: the file is cut back to its previous
//! length and the next write goes to the same offset, so a failure never
//! leaves a bad record in the middle of the log.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use freshness::{Entity, Version};

use crate::log::LogEntry;

/// The on-disk format this code writes and reads.
const FORMAT: u32 = 1;
/// Record header: length and checksum.
const HEADER: usize = 8;
/// Fixed part of a record body: seq, flags, publish time, version, entity
/// length, event length.
const FIXED: usize = 8 + 1 + 8 + 8 + 2 + 4;
/// No record is larger (an event is at most a 64 KiB payload, a 512-byte
/// entity and its trace context; the limit leaves room for configured
/// payload limits up to 16 MiB).
const MAX_RECORD: usize = 17 << 20;
const FLAG_LOCAL: u8 = 1;
const FLAG_GAP: u8 = 2;

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory (or a file in it) cannot be created, read or written.
    #[error("data_dir {path}: {source}")]
    Unusable {
        /// The path concerned.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another hub holds the directory.
    #[error("data_dir {path} is in use by another hub (its LOCK file is held)")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// The directory holds a log of another shape.
    #[error(
        "data_dir {path} holds a log of {found} shards; this hub has shards = {configured} (use a new data_dir)"
    )]
    ShardMismatch {
        /// The directory.
        path: PathBuf,
        /// Shards on disk.
        found: u32,
        /// Shards configured.
        configured: u32,
    },
    /// `hub.meta` is not a meta file this hub writes.
    #[error("data_dir {path}: hub.meta is not valid: {reason}")]
    BadMeta {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A record before the tail is damaged.
    #[error(
        "corrupt log: {file} at offset {offset}: {reason}; start with --repair to keep the valid prefix and begin a new epoch"
    )]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

impl OpenError {
    /// The process exit status for this error: 65 (EX_DATAERR) for a
    /// damaged log, 64 (EX_USAGE) for a directory that cannot be used as
    /// configured.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Corrupt { .. } => 65,
            _ => 64,
        }
    }
}

/// A write to the log failed; nothing of the drain was applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the log cannot be written: {0}")]
pub struct WriteFailed(pub Arc<io::Error>);

/// When appended records are flushed to the disk (`fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// After every drain of a shard actor, before its publishes are
    /// answered (group commit): an answered publish survives a machine
    /// crash.
    #[default]
    Always,
    /// At most `fsync_interval` after a write: a machine crash loses at
    /// most that much of what was answered.
    Interval,
    /// Never by the hub (the kernel writes back when it likes): survives a
    /// process crash, not a machine crash.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "interval" => Ok(Self::Interval),
            "never" => Ok(Self::Never),
            _ => Err(format!("{s:?} is not one of always, interval, never")),
        }
    }
}

/// How one shard's store is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Events kept per shard (at least; whole segments are dropped).
    pub max_events: u64,
    /// Bytes kept per shard (at least).
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
}

/// One record read back at start-up.
#[derive(Debug)]
pub struct Recovered {
    /// Its seq.
    pub seq: u64,
    /// The entry as the in-memory log keeps it.
    pub entry: LogEntry,
}

/// Where [`open`] hands the records it reads back, shard by shard, in seq
/// order, so that recovery holds one segment at a time, not the log.
pub trait Restore {
    /// Shard `shard` starts at `first_seq` (its oldest record on disk, or
    /// the seq its next record gets when it has none).
    fn begin(&mut self, shard: u32, first_seq: u64);
    /// The next valid record of `shard`.
    fn record(&mut self, shard: u32, record: Recovered);
}

/// An opened data directory.
#[derive(Debug)]
pub struct Opened {
    /// The epoch of the log: kept from the last run, or new.
    pub epoch: u64,
    /// True when the epoch is new (empty directory or `--repair`).
    pub new_epoch: bool,
    /// Every shard's store, by index: where its appends go.
    pub stores: Vec<ShardStore>,
    /// Every shard's reader, by index: how sessions replay what left memory.
    pub readers: Vec<DiskReader>,
    /// The directory, held until the hub stops.
    pub dir: Arc<DataDir>,
}

/// A data directory held by this hub (its `LOCK` is released on drop).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the cursor persisted for a peer region's link.
    pub fn peer_cursor(&self, region: &str) -> Option<(u64, Vec<u64>)> {
        let text =
            fs::read_to_string(self.path.join("peers").join(format!("{region}.cursor"))).ok()?;
        let mut words = text.split_whitespace();
        let epoch = words.next()?.parse().ok()?;
        let seqs = words
            .map(str::parse)
            .collect::<Result<Vec<u64>, _>>()
            .ok()?;
        Some((epoch, seqs))
    }

    /// Persists a peer region's link cursor (atomically: a crash leaves the
    /// old one or the new one). Only ever called with a cursor whose events
    /// are already in the log, so a restart resumes at or before it and the
    /// shard actors answer what comes again as duplicates.
    pub fn save_peer_cursor(&self, region: &str, epoch: u64, seqs: &[u64]) -> io::Result<()> {
        let dir = self.path.join("peers");
        fs::create_dir_all(&dir)?;
        let mut text = epoch.to_string();
        for s in seqs {
            text.push(' ');
            text.push_str(&s.to_string());
        }
        text.push('\n');
        write_atomically(
            &dir.join(format!("{region}.cursor")),
            text.as_bytes(),
            false,
        )
    }
}

/// Opens (creating if needed) the data directory, checks and recovers every
/// shard, and returns what the hub starts from. Blocking: call it before
/// the runtime serves anything, or from a blocking task.
pub fn open(
    path: &Path,
    shards: u32,
    retention: Retention,
    repair: bool,
    restore: &mut dyn Restore,
) -> Result<Opened, OpenError> {
    let unusable = |p: &Path| {
        let p = p.to_owned();
        move |source| OpenError::Unusable { path: p, source }
    };
    fs::create_dir_all(path).map_err(unusable(path))?;
    let lock_path = path.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(unusable(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(OpenError::Locked {
                path: path.to_owned(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(unusable(&lock_path)(e)),
    }
    let meta_path = path.join("hub.meta");
    let meta = match fs::read_to_string(&meta_path) {
        Ok(text) => Some(parse_meta(&text).map_err(|reason| OpenError::BadMeta {
            path: path.to_owned(),
            reason,
        })?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(unusable(&meta_path)(e)),
    };
    if let Some((_, found)) = meta
        && found != shards
    {
        return Err(OpenError::ShardMismatch {
            path: path.to_owned(),
            found,
            configured: shards,
        });
    }
    let mut repaired = false;
    let mut stores = Vec::with_capacity(shards as usize);
    let mut readers = Vec::with_capacity(shards as usize);
    for s in 0..shards {
        let dir = path.join(format!("shard-{s:05}"));
        let (store, fixed) = recover_shard(s, &dir, retention, repair || meta.is_none(), restore)?;
        repaired |= fixed;
        readers.push(store.reader());
        stores.push(store);
    }
    let (epoch, new_epoch) = match meta {
        Some((epoch, _)) if !repaired => (epoch, false),
        _ => {
            let epoch = new_epoch_value();
            let text = format!("format {FORMAT}\nepoch {epoch}\nshards {shards}\n");
            write_atomically(&meta_path, text.as_bytes(), true).map_err(unusable(&meta_path))?;
            if repaired {
                tracing::warn!(data_dir = %path.display(), epoch, "log repaired: a new epoch begins, nodes and peers are reset");
            }
            (epoch, true)
        }
    };
    Ok(Opened {
        epoch,
        new_epoch,
        stores,
        readers,
        dir: Arc::new(DataDir {
            path: path.to_owned(),
            _lock: lock,
        }),
    })
}

fn parse_meta(text: &str) -> Result<(u64, u32), String> {
    let mut fields = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {line:?} is not `key value`"))?;
        fields.insert(k.trim(), v.trim());
    }
    let get = |k: &str| {
        fields
            .get(k)
            .ok_or_else(|| format!("no `{k}`"))
            .and_then(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("`{k}` is not a number"))
            })
    };
    let format = get("format")?;
    if format != u64::from(FORMAT) {
        return Err(format!("format {format}; this hub reads format {FORMAT}"));
    }
    let epoch = get("epoch")?;
    let shards = u32::try_from(get("shards")?).map_err(|_| "`shards` is out of range")?;
    if epoch == 0 || shards == 0 {
        return Err("epoch and shards must not be 0".into());
    }
    Ok((epoch, shards))
}

/// A random, non-zero epoch.
pub fn new_epoch_value() -> u64 {
    loop {
        let e: u64 = rand::random();
        if e != 0 {
            return e;
        }
    }
}

/// Writes a small file so that a crash leaves either the old or the new
/// content: a temporary file, renamed over the target.
fn write_atomically(path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if sync && let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// One segment's place in a shard.
#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    events: u64,
    bytes: u64,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

/// Reads and checks one shard's segments. Returns the shard and whether
/// anything beyond a torn tail was cut (which needs a new epoch).
fn recover_shard(
    shard: u32,
    dir: &Path,
    retention: Retention,
    repair: bool,
    restore: &mut dyn Restore,
) -> Result<(ShardStore, bool), OpenError> {
    let unusable = |p: &Path| {
        let p = p.to_owned();
        move |source| OpenError::Unusable { path: p, source }
    };
    fs::create_dir_all(dir).map_err(unusable(dir))?;
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(unusable(dir))? {
        let entry = entry.map_err(unusable(dir))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(first) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((first, path));
        }
    }
    found.sort();
    restore.begin(shard, found.first().map_or(1, |(first, _)| *first));
    let mut segments: VecDeque<Segment> = VecDeque::new();
    let mut repaired = false;
    let mut next_seq: Option<u64> = None;
    let count = found.len();
    let mut cut_from: Option<usize> = None;
    for (i, (first, path)) in found.iter().enumerate() {
        let last_segment = i + 1 == count;
        if let Some(expected) = next_seq
            && *first != expected
        {
            let err = OpenError::Corrupt {
                file: path.clone(),
                offset: 0,
                reason: format!(
                    "segment starts at seq {first}, the one before ended at {}",
                    expected - 1
                ),
            };
            if !repair {
                return Err(err);
            }
            tracing::warn!(error = %err, "repair: dropping this segment and every later one");
            repaired = true;
            cut_from = Some(i);
            break;
        }
        let data = read_file(path).map_err(unusable(path))?;
        let scan = scan_segment(&data, *first);
        let mut events = scan.records.len() as u64;
        if let Some(bad) = &scan.bad {
            let torn = last_segment && !valid_record_after(&data, bad.offset, *first + events);
            if torn {
                tracing::warn!(
                    file = %path.display(),
                    offset = bad.offset,
                    bytes = data.len() as u64 - bad.offset,
                    reason = %bad.reason,
                    "truncating a torn tail left by a crash"
                );
            } else if repair {
                tracing::warn!(
                    file = %path.display(),
                    offset = bad.offset,
                    reason = %bad.reason,
                    "repair: keeping the valid prefix, dropping the rest of the shard"
                );
                repaired = true;
                cut_from = Some(i + 1);
            } else {
                return Err(OpenError::Corrupt {
                    file: path.clone(),
                    offset: bad.offset,
                    reason: bad.reason.clone(),
                });
            }
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(unusable(path))?;
            f.set_len(bad.offset).map_err(unusable(path))?;
            f.sync_all().map_err(unusable(path))?;
        }
        let valid_len = scan.bad.as_ref().map_or(data.len() as u64, |b| b.offset);
        events = events.min(scan.records.len() as u64);
        next_seq = Some(first + events);
        segments.push_back(Segment {
            path: path.clone(),
            first_seq: *first,
            events,
            bytes: valid_len,
        });
        for r in scan.records {
            restore.record(shard, r);
        }
        if cut_from.is_some() {
            break;
        }
    }
    if let Some(from) = cut_from {
        for (_, path) in &found[from..] {
            fs::remove_file(path).map_err(unusable(path))?;
        }
    }
    let head = next_seq.map_or(0, |n| n - 1);
    let store =
        ShardStore::open(dir.to_owned(), segments, head, retention).map_err(unusable(dir))?;
    Ok((store, repaired))
}

fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut data = Vec::with_capacity(f.metadata().map_or(0, |m| m.len() as usize));
    f.read_to_end(&mut data)?;
    Ok(data)
}

struct Bad {
    offset: u64,
    reason: String,
}

struct Scan {
    records: Vec<Recovered>,
    bad: Option<Bad>,
}

/// Reads records from the start of a segment until the end or the first
/// bad one.
fn scan_segment(data: &[u8], first_seq: u64) -> Scan {
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut expected = first_seq;
    while at < data.len() {
        match read_record(data, at, expected) {
            Ok((rec, next)) => {
                records.push(rec);
                expected += 1;
                at = next;
            }
            Err(reason) => {
                return Scan {
                    records,
                    bad: Some(Bad {
                        offset: at as u64,
                        reason,
                    }),
                };
            }
        }
    }
    Scan { records, bad: None }
}

/// True when a valid record with a seq at or past `seq` starts anywhere
/// after `offset`: then a bad record is not a torn tail but damage in the
/// middle.
fn valid_record_after(data: &[u8], offset: u64, seq: u64) -> bool {
    let start = offset as usize + 1;
    (start..data.len().saturating_sub(HEADER + FIXED)).any(|at| {
        let Some(len) = data
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        else {
            return false;
        };
        if !(FIXED..=MAX_RECORD).contains(&len) || at + HEADER + len > data.len() {
            return false;
        }
        read_record(data, at, 0).is_ok_and(|(r, _)| r.seq >= seq)
    })
}

/// Decodes the record at `at`; with `expected` non-zero, its seq must be
/// that. Returns it and where the next one starts.
fn read_record(data: &[u8], at: usize, expected: u64) -> Result<(Recovered, usize), String> {
    let header = data
        .get(at..at + HEADER)
        .ok_or("a record header cut short")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(FIXED..=MAX_RECORD).contains(&len) {
        return Err(format!("a record length of {len} bytes"));
    }
    let body = data
        .get(at + HEADER..at + HEADER + len)
        .ok_or("a record cut short")?;
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let seq = u64_at(0);
    if expected != 0 && seq != expected {
        return Err(format!("seq {seq} where {expected} was due"));
    }
    let flags = body[8];
    let publish_time_us = u64_at(9);
    let version = u64_at(17);
    let entity_len = u16::from_le_bytes([body[25], body[26]]) as usize;
    let event_len = u32::from_le_bytes([body[27], body[28], body[29], body[30]]) as usize;
    if FIXED + entity_len + event_len != len {
        return Err("record lengths do not add up".into());
    }
    let entity = std::str::from_utf8(&body[FIXED..FIXED + entity_len])
        .map_err(|_| "an entity that is not UTF-8")?;
    let entity = Entity::parse(entity).map_err(|e| format!("a bad entity: {e}"))?;
    let gap = flags & FLAG_GAP != 0;
    if !gap && Version::new(version).is_none() {
        return Err("version 0".into());
    }
    let bytes = Bytes::copy_from_slice(&body[FIXED + entity_len..]);
    Ok((
        Recovered {
            seq,
            entry: LogEntry {
                entity,
                local: flags & FLAG_LOCAL != 0,
                publish_time_us,
                gap,
                awaited: false,
                version,
                bytes,
            },
        },
        at + HEADER + len,
    ))
}

/// Appends the record of one entry with its seq to `buf`.
pub fn encode_record(buf: &mut Vec<u8>, seq: u64, e: &LogEntry) {
    let entity = e.entity.as_str().as_bytes();
    let len = FIXED + entity.len() + e.bytes.len();
    let start = buf.len();
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    let flags = if e.local { FLAG_LOCAL } else { 0 } | if e.gap { FLAG_GAP } else { 0 };
    buf.push(flags);
    buf.extend_from_slice(&e.publish_time_us.to_le_bytes());
    buf.extend_from_slice(&e.version.to_le_bytes());
    buf.extend_from_slice(&(entity.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(e.bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(entity);
    buf.extend_from_slice(&e.bytes);
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Which segments a shard has, shared by its store (which changes it when
/// it starts or drops a segment) and its readers.
#[derive(Debug, Default)]
struct SegmentIndex {
    /// `(first seq, path)`, oldest first.
    segments: parking_lot::RwLock<VecDeque<(u64, PathBuf)>>,
    /// Seq of the oldest record on disk (head + 1 when there is none).
    first_seq: AtomicU64,
}

/// Reads one shard's records back from disk, for sessions whose cursor is
/// older than the in-memory tail but still retained on disk.
#[derive(Debug, Clone)]
pub struct DiskReader {
    index: Arc<SegmentIndex>,
}

impl DiskReader {
    /// Seq of the oldest record on disk.
    pub fn first_seq(&self) -> u64 {
        self.index.first_seq.load(Ordering::Acquire)
    }

    /// The records with seqs after `after` and before `before`, from the
    /// one segment that holds `after + 1`, oldest first: at most `max`
    /// records and about `max_bytes` of events. Fewer (or none) when the
    /// segment ends first; the caller asks again from where it got to.
    /// `Ok(None)` when the segment is gone (retention dropped it).
    pub fn read(
        &self,
        after: u64,
        before: u64,
        max: usize,
        max_bytes: usize,
    ) -> io::Result<Option<Vec<(u64, LogEntry)>>> {
        let want = after + 1;
        let path = {
            let segments = self.index.segments.read();
            match segments.iter().rev().find(|(first, _)| *first <= want) {
                Some((_, p)) => p.clone(),
                None => return Ok(None),
            }
        };
        let data = match read_file(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut at = 0;
        while at < data.len() && out.len() < max && bytes < max_bytes {
            // Only seqs below the in-memory head are read, which were fully
            // written long before: a bad record here is real damage.
            let (rec, next) = read_record(&data, at, 0).map_err(|reason| {
                io::Error::other(format!("{}: offset {at}: {reason}", path.display()))
            })?;
            at = next;
            if rec.seq >= before {
                break;
            }
            if rec.seq > after {
                bytes += rec.entry.bytes.len();
                out.push((rec.seq, rec.entry));
            }
        }
        Ok(Some(out))
    }
}

/// One shard's segments on disk: where its appends go.
#[derive(Debug)]
pub struct ShardStore {
    dir: PathBuf,
    index: Arc<SegmentIndex>,
    /// Oldest first; the last is the active one.
    segments: VecDeque<Segment>,
    active: Option<File>,
    /// Seq of the newest record written.
    head: u64,
    retention: Retention,
    events: u64,
    bytes: u64,
}

impl ShardStore {
    fn open(
        dir: PathBuf,
        segments: VecDeque<Segment>,
        head: u64,
        retention: Retention,
    ) -> io::Result<Self> {
        let active = match segments.back() {
            Some(s) => Some(OpenOptions::new().write(true).open(&s.path)?),
            None => None,
        };
        let events = segments.iter().map(|s| s.events).sum();
        let bytes = segments.iter().map(|s| s.bytes).sum();
        let index = Arc::new(SegmentIndex::default());
        let store = Self {
            dir,
            index,
            segments,
            active,
            head,
            retention,
            events,
            bytes,
        };
        store.publish_index();
        Ok(store)
    }

    /// A reader of this shard for sessions.
    pub fn reader(&self) -> DiskReader {
        DiskReader {
            index: self.index.clone(),
        }
    }

    /// Hands the segment list to the readers.
    fn publish_index(&self) {
        *self.index.segments.write() = self
            .segments
            .iter()
            .map(|s| (s.first_seq, s.path.clone()))
            .collect();
        self.index
            .first_seq
            .store(self.first_seq(), Ordering::Release);
    }

    /// Writes the records of `count` entries (seqs `head + 1 ..= head +
    /// count`, already encoded in `buf`) and, with `sync`, flushes them to
    /// the disk. On error nothing of `buf` is kept.
    pub fn append(&mut self, buf: &[u8], count: u64, sync: bool) -> io::Result<()> {
        let needs_new = match self.segments.back() {
            None => true,
            Some(s) => s.bytes > 0 && s.bytes + buf.len() as u64 > self.retention.segment_bytes,
        };
        if needs_new {
            self.roll(sync)?;
        }
        let (Some(file), Some(seg)) = (self.active.as_ref(), self.segments.back_mut()) else {
            return Err(io::Error::other("no active segment"));
        };
        let at = seg.bytes;
        let written = file
            .write_all_at(buf, at)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            // Cut back whatever part of the buffer reached the file; the
            // next write goes to the same offset anyway.
            let _ = file.set_len(at);
            return Err(e);
        }
        seg.bytes += buf.len() as u64;
        seg.events += count;
        self.head += count;
        self.events += count;
        self.bytes += buf.len() as u64;
        self.trim();
        Ok(())
    }

    /// Flushes the active segment (for `fsync = interval`).
    pub fn sync(&self) -> io::Result<()> {
        match &self.active {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Closes the active segment and starts one at `head + 1`.
    fn roll(&mut self, sync: bool) -> io::Result<()> {
        if let Some(f) = &self.active
            && sync
        {
            f.sync_data()?;
        }
        let first_seq = self.head + 1;
        let path = segment_path(&self.dir, first_seq);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        if sync {
            File::open(&self.dir)?.sync_all()?;
        }
        self.segments.push_back(Segment {
            path,
            first_seq,
            events: 0,
            bytes: 0,
        });
        self.active = Some(file);
        self.publish_index();
        Ok(())
    }

    /// Drops the oldest segments while the others still hold the bounds.
    /// Readers learn first, so none opens a segment that is going.
    fn trim(&mut self) {
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.front() else {
                break;
            };
            let over = self.events - oldest.events >= self.retention.max_events
                || self.bytes - oldest.bytes >= self.retention.max_bytes;
            if !over {
                break;
            }
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            self.events -= oldest.events;
            self.bytes -= oldest.bytes;
            self.publish_index();
            if let Err(e) = fs::remove_file(&oldest.path) {
                tracing::warn!(file = %oldest.path.display(), error = %e, "cannot remove an expired segment");
            }
        }
    }

    /// Seq of the oldest record on disk.
    pub fn first_seq(&self) -> u64 {
        match self.segments.front() {
            Some(s) if s.events > 0 || self.segments.len() > 1 => s.first_seq,
            _ => self.head + 1,
        }
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention() -> Retention {
        Retention {
            max_events: 1_000,
            max_bytes: 1 << 20,
            segment_bytes: 4096,
        }
    }

    /// Collects what recovery hands back.
    #[derive(Default)]
    struct Collect {
        first: BTreeMap<u32, u64>,
        records: BTreeMap<u32, Vec<Recovered>>,
    }

    impl Restore for Collect {
        fn begin(&mut self, shard: u32, first_seq: u64) {
            self.first.insert(shard, first_seq);
        }
        fn record(&mut self, shard: u32, record: Recovered) {
            self.records.entry(shard).or_default().push(record);
        }
    }

    fn open_collect(
        path: &Path,
        shards: u32,
        r: Retention,
    ) -> (Result<Opened, OpenError>, Collect) {
        let mut c = Collect::default();
        (open(path, shards, r, false, &mut c), c)
    }

    fn entry(entity: &str, version: u64) -> LogEntry {
        LogEntry {
            entity: Entity::parse(entity).unwrap(),
            local: true,
            publish_time_us: 42,
            gap: false,
            awaited: false,
            version,
            bytes: Bytes::from(vec![7u8; 100]),
        }
    }

    fn write(store: &mut ShardStore, from: u64, n: u64) {
        let mut buf = Vec::new();
        for i in 0..n {
            encode_record(
                &mut buf,
                from + i,
                &entry(&format!("user:{}", from + i), from + i),
            );
        }
        store.append(&buf, n, true).unwrap();
    }

    #[test]
    fn records_survive_a_reopen_across_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, _) = open_collect(tmp.path(), 2, retention());
        let mut opened = opened.unwrap();
        assert!(opened.new_epoch);
        let epoch = opened.epoch;
        write(&mut opened.stores[1], 1, 30);
        write(&mut opened.stores[1], 31, 30);
        drop(opened);
        let (again, got) = open_collect(tmp.path(), 2, retention());
        let again = again.unwrap();
        assert_eq!((again.epoch, again.new_epoch), (epoch, false));
        let s = &got.records[&1];
        assert_eq!(s.len(), 60);
        assert!(s.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
        assert_eq!(s[59].entry.version, 60);
        assert!(!got.records.contains_key(&0));
        assert_eq!((got.first[&0], got.first[&1]), (1, 1));
        assert!(
            fs::read_dir(tmp.path().join("shard-00001"))
                .unwrap()
                .count()
                > 1
        );
    }

    #[test]
    fn a_reader_replays_a_range_segment_by_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, _) = open_collect(tmp.path(), 1, retention());
        let mut opened = opened.unwrap();
        for i in 0..10 {
            write(&mut opened.stores[0], 1 + i * 10, 10);
        }
        let reader = opened.readers[0].clone();
        assert_eq!(reader.first_seq(), 1);
        let mut after = 4;
        let mut seen = Vec::new();
        while after < 89 {
            let chunk = reader.read(after, 90, 7, usize::MAX).unwrap().unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= 7);
            for (seq, e) in chunk {
                assert_eq!(e.version, seq);
                seen.push(seq);
                after = seq;
            }
        }
        assert_eq!(seen, (5..90).collect::<Vec<_>>());
    }

    #[test]
    fn a_second_hub_cannot_take_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (_held, _) = open_collect(tmp.path(), 1, retention());
        let _held = _held.unwrap();
        assert!(matches!(
            open_collect(tmp.path(), 1, retention()).0,
            Err(OpenError::Locked { .. })
        ));
    }

    #[test]
    fn another_shard_count_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(open_collect(tmp.path(), 4, retention()).0.unwrap());
        let err = open_collect(tmp.path(), 8, retention()).0.unwrap_err();
        assert!(matches!(
            err,
            OpenError::ShardMismatch {
                found: 4,
                configured: 8,
                ..
            }
        ));
        assert_eq!(err.exit_code(), 64);
    }

    #[test]
    fn retention_drops_whole_old_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Retention {
            max_events: 50,
            ..retention()
        };
        let (opened, _) = open_collect(tmp.path(), 1, r);
        let mut opened = opened.unwrap();
        for i in 0..20 {
            write(&mut opened.stores[0], 1 + i * 10, 10);
        }
        let store = &opened.stores[0];
        assert!(
            store.events >= 50 && store.events < 50 + 40,
            "{}",
            store.events
        );
        assert!(store.first_seq() > 1);
        assert_eq!(opened.readers[0].first_seq(), store.first_seq());
        // What retention dropped cannot be read back.
        assert!(
            opened.readers[0]
                .read(0, 1000, 10, usize::MAX)
                .unwrap()
                .is_none()
        );
    }
}
