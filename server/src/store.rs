//! The durable log: the hub's epoch and every shard's events on disk, so
//! that a restart on the same `data_dir` keeps the epoch and continues
//! every shard's seqs (SPEC §6).
//!
//! ## Layout
//! ```text
//! data_dir/
//!   LOCK                  held (flock) while a hub uses the directory
//!   hub.meta              format, epoch, shard count (written once, atomically)
//!   RUNNING               while a hub runs: the machine's boot and the fsync policy
//!   peers/REGION.cursor   how far this hub appended each peer's events
//!   wal/
//!     00000000000000000000.wal   segment 0: a heads record, then records
//!     00000000000000000001.wal   segment 1, and so on
//!     next-segment.zeros         the next segment, written ahead as zeros
//! ```
//!
//! One write-ahead log for every shard, cut into segments. A record is
//! `len u32 | crc32 u32 | body`, little endian, the checksum over the body;
//! the body holds the shard, seq, flags, origin publish time, version,
//! entity and the event exactly as it goes on the wire (the bytes the
//! in-memory log keeps). Every segment starts with a heads record: each
//! shard's newest seq when the segment began, so a shard whose records all
//! left with older segments still knows where it stands. Within a shard,
//! seqs follow each other with no gap across the whole log.
//!
//! ## Writes: one writer, one flush per group
//! Shard actors hand their drain's records to the log's writer thread
//! ([`WalPort::send`]) and are answered in order ([`WalPort::next`]). The
//! thread, once woken, yields its core once (so the actors of one publish
//! have all handed theirs), takes everything waiting (every actor's drain,
//! each holding its shards' records), writes it at the end of the active
//! segment and, with `fsync = always`, flushes once: a publish touching 64
//! shards costs one flush, not 64. An actor may hand over its next drain
//! while the last is being flushed ([`PIPELINE`]), so the writer finds it
//! waiting the moment the flush returns. A failed write or flush leaves
//! nothing behind: the file is cut back to where the group began and every
//! drain of the group is refused, and so is every later drain of the same
//! actors (decided on top of a failed one) until each actor has undone
//! them ([`WalPort::recovered`]): a failure never leaves a bad record or a
//! gap in the middle of the log. Each group's answers go to the hub's
//! completion task ([`Wal::complete_on`]), which answers every drain's
//! actor on the actors' runtime: one wake across threads per group.
//!
//! ## What a machine crash may take
//! With `fsync = always` a drain is made visible to the sessions only once
//! it is flushed. With `interval` or `never` it is visible once written:
//! a process crash keeps it (the page cache outlives the process), a
//! machine crash may not, and nodes may then hold seqs that the log, cut
//! back to what reached the disk, would give to other events. So `RUNNING`
//! names the machine's boot and the policy while a hub runs, and a clean
//! stop (everything flushed) removes it. A start that finds it left behind
//! by a hub with another policy than `always`, on another boot, cannot
//! prove continuity: a new epoch begins, and nodes and peers are reset. On
//! the same boot (a process crash) the epoch is kept, and the log is
//! flushed before the new marker is written, so that a later machine crash
//! cannot take what the crashed hub left in the page cache. A marker that
//! is not valid text is read for the lines that still are; if those name
//! neither `fsync always` nor this boot, it vouches for nothing and is
//! treated as left on another boot by another policy.
//!
//! ## Segments written ahead
//! A flush of an append that grows its file also commits the new file size
//! (a filesystem journal commit, a second device write), where a write into
//! blocks that already hold data is flushed alone: on ext4 that makes the
//! flush about a third cheaper (`scripts/flush-probe.py`, BENCHMARKS.md).
//! So, as PostgreSQL does with its WAL segments (`wal_init_zero`), a
//! helper thread writes the next segment ahead as zeros, flushed, under a
//! name recovery ignores, and a roll renames it into place: `FIRST_AHEAD`
//! for the first after a start (a new log's first is written before the
//! hub serves), each next twice the last, up to `segment_bytes`. The log
//! then writes into zeros: the end of what is written is the first record
//! header of zeros followed by nothing but zeros, which recovery reads as
//! the clean end of the log. A closed segment is cut back to what it
//! holds, so only the active segment and the one prepared hold zeros: the
//! directory uses at most two `segment_bytes` more than the retained log.
//! When no segment is ready (a full disk, a failed helper, `fsync = never`,
//! which never flushes and prepares nothing), the log appends to a growing
//! file as before, and rolls to the next segment written ahead as soon as
//! there is one.
//!
//! ## Recovery
//! Every record is checked (length, checksum, the shard's next seq). A bad
//! record in the last segment after which nothing valid follows is a torn
//! tail (a write the crash cut short, never answered): it is truncated with
//! one log line. So is one followed by valid records across a page of
//! zeros (`unwritten_page_between`: a power loss let a later page of an
//! unflushed group reach the disk without an earlier one). Anything else —
//! a bad record with valid ones after it, a bad record in an older
//! segment, segments that do not follow each other —
//! is corruption: [`open`] refuses with the file and offset, unless `repair`
//! is set, which keeps the longest valid prefix and starts a new epoch
//! (continuity can no longer be proven, SPEC §6).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use bytes::Bytes;
use freshness::{Entity, Version};
use parking_lot::RwLock;

use crate::log::LogEntry;

/// Present while a hub runs on the directory (see [`open`]): the boot and
/// fsync policy that write the log. Left behind by an unclean stop.
const RUNNING: &str = "RUNNING";

/// The on-disk format this code writes and reads.
const FORMAT: u32 = 1;
/// Record header: length and checksum.
const HEADER: usize = 8;
/// Fixed part of an event record's body: shard, seq, flags, publish time,
/// version, entity length, event length.
const FIXED: usize = 4 + 8 + 1 + 8 + 8 + 2 + 4;
/// The shard field of a segment's heads record.
const HEADS: u32 = u32::MAX;
/// No record is larger (an event is at most a 64 KiB payload, a 512-byte
/// entity and its trace context; the limit leaves room for configured
/// payload limits up to 16 MiB, and for the heads of 65,536 shards).
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
        reason: Corruption,
    },
    /// The JetStream log (`log = "jetstream"`) cannot be reached or used.
    #[error("{0}")]
    JetStream(String),
}

/// What is wrong with a record, or with where it stands in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// Fewer bytes than a record header.
    #[error("a record header cut short")]
    HeaderCutShort,
    /// A length no record has.
    #[error("a record length of {0} bytes")]
    Length(usize),
    /// Fewer bytes than the header's length.
    #[error("a record cut short")]
    CutShort,
    /// The body's CRC-32 is not the header's.
    #[error("checksum mismatch")]
    Checksum,
    /// A heads record sized for another shard count.
    #[error("a heads record for {0} shards")]
    HeadsFor(usize),
    /// A shard this log does not have, or a record too short for one.
    #[error("a record of shard {0}")]
    Shard(u32),
    /// The entity's and event's lengths do not make the record's.
    #[error("record lengths do not add up")]
    Lengths,
    /// The entity's bytes are not UTF-8.
    #[error("an entity that is not UTF-8")]
    EntityNotUtf8,
    /// The entity is not one a publish could have carried.
    #[error("a bad entity: {0}")]
    Entity(freshness::EntityError),
    /// An event (not a gap marker) with version 0.
    #[error("version 0")]
    VersionZero,
    /// A heads record where only events belong (a JetStream message).
    #[error("a heads record among events")]
    HeadsAmongEvents,
    /// A heads record after a segment's first record.
    #[error("a heads record inside a segment")]
    HeadsInside,
    /// A segment that does not open with its heads record.
    #[error("no heads record first")]
    NoHeadsFirst,
    /// A segment's heads are not where the segment before it ended.
    #[error("its heads do not continue the segment before")]
    HeadsDoNotContinue,
    /// A seq that does not follow its shard's last one.
    #[error("shard {shard} seq {seq} where {due} was due")]
    SeqNotDue {
        /// The record's shard.
        shard: u32,
        /// Its seq.
        seq: u64,
        /// The seq that should have come.
        due: u64,
    },
    /// A segment number that does not follow the one before it.
    #[error("segment {number} follows segment {before}")]
    SegmentNumber {
        /// This segment's number.
        number: u64,
        /// The one before it.
        before: u64,
    },
    /// A JetStream message's record of another shard than its subject's.
    #[error("a record of shard {found} on the subject of shard {subject}")]
    OtherShard {
        /// The record's shard.
        found: u32,
        /// The subject's shard.
        subject: u32,
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
    /// After every group of drains, before their publishes are answered
    /// (group commit): an answered publish survives a machine crash.
    #[default]
    Always,
    /// At most `fsync_interval` after a write: a machine crash loses at
    /// most that much of what was answered.
    Interval,
    /// Never by the hub (the kernel writes back when it likes): survives a
    /// process crash, not a machine crash.
    Never,
}

impl FsyncPolicy {
    /// The policy's name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Interval => "interval",
            Self::Never => "never",
        }
    }
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

/// How the log is bounded and flushed.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Events kept (at least; whole segments are dropped).
    pub max_events: u64,
    /// Bytes kept (at least).
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// When writes are flushed.
    pub fsync: FsyncPolicy,
    /// The flush period of [`FsyncPolicy::Interval`].
    pub fsync_interval: Duration,
}

/// One record read back at start-up.
#[derive(Debug)]
pub struct Recovered {
    /// Its seq.
    pub seq: u64,
    /// The entry as the in-memory log keeps it.
    pub entry: LogEntry,
}

/// Where [`open`] hands the records it reads back, in log order (each
/// shard's in seq order), one segment at a time, so that recovery holds one
/// segment, not the log.
pub trait Restore {
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
    /// Every shard's newest seq on disk.
    pub heads: Vec<u64>,
    /// Where the shard actors' appends go.
    pub wal: Wal,
    /// Every shard's reader, by index: how sessions replay what left memory.
    pub readers: Vec<DiskReader>,
    /// The directory, held until the hub stops.
    pub dir: Arc<DataDir>,
}

/// A data directory held by this hub (its `LOCK` is released on drop).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Disconnected when the log's writer has stopped.
    writer_gone: parking_lot::Mutex<Receiver<()>>,
    _lock: File,
}

impl DataDir {
    /// Waits up to `limit` for the log's writer to stop (it stops once
    /// every shard actor has); true when it has. A writer that stops
    /// cleanly has flushed what it wrote and removed the `RUNNING` marker,
    /// so that the next start keeps the epoch on any boot.
    pub fn writer_stopped(&self, limit: Duration) -> bool {
        matches!(
            self.writer_gone.lock().recv_timeout(limit),
            Err(RecvTimeoutError::Disconnected)
        )
    }

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

/// Opens (creating if needed) the data directory, checks and recovers the
/// log, starts its writer thread, and returns what the hub starts from.
/// Blocking: call it before the runtime serves anything, or from a blocking
/// task.
pub fn open(
    path: &Path,
    shards: u32,
    retention: Retention,
    repair: bool,
    restore: &mut dyn Restore,
) -> Result<Opened, OpenError> {
    open_on_boot(
        path,
        shards,
        retention,
        repair,
        restore,
        boot_id().as_deref(),
    )
}

/// The machine's boot: it changes when the machine restarts, and with it
/// what the page cache held.
fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Why records a node may have received can be missing from the log after
/// the stop that left `marker` behind (a `RUNNING` file: that hub did not
/// stop cleanly), starting on `boot`: `None` when they cannot. With
/// `fsync = always` a record is visible only once flushed; with another
/// policy it is visible once written, which a process crash keeps (the
/// page cache outlives the process) and a machine crash may not.
fn unflushed_lost(marker: &str, boot: Option<&str>) -> Option<String> {
    let field = |key| marker_field(marker, key);
    if field("fsync") == Some("always") {
        return None;
    }
    let then = field("boot");
    if then.is_some() && then == boot {
        return None;
    }
    Some(format!(
        "the last hub did not stop cleanly (fsync = {}) and the machine has restarted since \
         (boot {} then, {} now): records nodes may have received need not be on disk",
        field("fsync").unwrap_or("unknown"),
        then.unwrap_or("unknown"),
        boot.unwrap_or("unknown"),
    ))
}

/// The value of `key` in a `RUNNING` marker (`key value` lines).
fn marker_field<'a>(marker: &'a str, key: &str) -> Option<&'a str> {
    marker
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(str::trim)
}

/// Flushes every segment of `segments` and the directory `dir` that names
/// them; on error, the file that failed.
fn flush_files<'a>(
    dir: &Path,
    segments: impl IntoIterator<Item = &'a SegmentMeta>,
) -> Result<(), (PathBuf, io::Error)> {
    for s in segments {
        File::open(&s.path)
            .and_then(|f| f.sync_data())
            .map_err(|e| (s.path.clone(), e))?;
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| (dir.to_owned(), e))
}

fn open_on_boot(
    path: &Path,
    shards: u32,
    retention: Retention,
    repair: bool,
    restore: &mut dyn Restore,
    boot: Option<&str>,
) -> Result<Opened, OpenError> {
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
    let running = path.join(RUNNING);
    // A marker that is not text (a disk that garbled it) vouches for
    // nothing: read as one naming no boot and no policy, so the epoch is
    // kept only if nothing could have been lost on any boot.
    let left = match fs::read(&running) {
        Ok(marker) => Some(String::from_utf8_lossy(&marker).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(unusable(&running)(e)),
    };
    let lost = left.as_deref().and_then(|m| unflushed_lost(m, boot));
    let wal_dir = path.join("wal");
    fs::create_dir_all(&wal_dir).map_err(unusable(&wal_dir))?;
    let recovered = recover(&wal_dir, shards, repair || meta.is_none(), restore)?;
    let (epoch, new_epoch) = match meta {
        Some((epoch, _)) if !recovered.repaired && lost.is_none() => (epoch, false),
        _ => {
            let epoch = new_epoch_value();
            let text = format!("format {FORMAT}\nepoch {epoch}\nshards {shards}\n");
            write_atomically(&meta_path, text.as_bytes(), true).map_err(unusable(&meta_path))?;
            if recovered.repaired {
                tracing::warn!(data_dir = %path.display(), epoch, "log repaired: a new epoch begins, nodes and peers are reset");
            } else if let Some(reason) = lost.filter(|_| meta.is_some()) {
                tracing::warn!(data_dir = %path.display(), epoch, "{reason}: a new epoch begins, nodes and peers are reset");
            }
            (epoch, true)
        }
    };
    // A process crash under `interval` or `never` on this boot: what that
    // hub wrote may still be only in the page cache. Flushed now, before
    // the new marker vouches for it with this hub's policy.
    if left
        .as_deref()
        .is_some_and(|m| marker_field(m, "fsync") != Some("always"))
    {
        flush_files(&wal_dir, recovered.segments.iter().map(|s| &s.meta))
            .map_err(|(p, e)| unusable(&p)(e))?;
    }
    // Until the writer stops cleanly: which boot and policy wrote the log.
    let marker = format!(
        "boot {}\nfsync {}\n",
        boot.unwrap_or("unknown"),
        retention.fsync.as_str()
    );
    write_atomically(&running, marker.as_bytes(), true).map_err(unusable(&running))?;
    let heads = recovered.heads.clone();
    let index = Arc::new(RwLock::new(Index {
        segments: recovered.segments.iter().map(|s| s.meta.clone()).collect(),
        heads: heads.clone(),
    }));
    let readers = (0..shards)
        .map(|shard| DiskReader {
            shard,
            index: index.clone(),
        })
        .collect();
    let (stopped, writer_gone) = std::sync::mpsc::sync_channel(0);
    let held = Held {
        _lock: lock.try_clone().map_err(unusable(&lock_path))?,
        _stopped: stopped,
    };
    let wal =
        Wal::start(wal_dir, recovered, index, retention, running, held).map_err(unusable(path))?;
    Ok(Opened {
        epoch,
        new_epoch,
        heads,
        wal,
        readers,
        dir: Arc::new(DataDir {
            path: path.to_owned(),
            writer_gone: parking_lot::Mutex::new(writer_gone),
            _lock: lock,
        }),
    })
}

fn unusable(p: &Path) -> impl FnOnce(io::Error) -> OpenError + use<> {
    let p = p.to_owned();
    move |source| OpenError::Unusable { path: p, source }
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

/// What readers know of one segment.
#[derive(Debug, Clone)]
struct SegmentMeta {
    path: PathBuf,
    /// Per shard: the first and last seq the segment holds (0, 0: none).
    first: Vec<u64>,
    last: Vec<u64>,
    /// Where a reader may start, about every [`MARK_EVERY`] bytes, oldest
    /// first; the first is right after the heads record.
    marks: Vec<Mark>,
    /// Bytes written: a reader reads no further (zeros, or a group being
    /// written, may follow).
    end: u64,
}

/// A place in a segment a reader may start from: the record at `offset`
/// and every later one have, for each shard, a seq above `heads[shard]`.
/// About 512 bytes per MiB of log (64 shards), so a 4 GiB log keeps
/// about 2 MiB of marks in memory.
#[derive(Debug, Clone)]
struct Mark {
    offset: u64,
    heads: Box<[u64]>,
}

/// Bytes of log between two marks: what a disk read may scan, at most,
/// before it reaches the records it wants.
const MARK_EVERY: u64 = 1 << 20;
/// Bytes a disk read takes from the file at once.
const READ_CHUNK: usize = 256 << 10;

/// The segments as the readers see them, and every shard's head on disk.
#[derive(Debug)]
struct Index {
    segments: VecDeque<SegmentMeta>,
    heads: Vec<u64>,
}

/// A segment as the writer keeps it.
#[derive(Debug)]
struct Segment {
    /// Its bytes written are `meta.end`.
    meta: SegmentMeta,
    number: u64,
    events: u64,
    /// Size of the file: above `meta.end` when it was written ahead
    /// (zeros follow what is written).
    capacity: u64,
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.wal"))
}

/// Test support: takes the name of the log's next segment in `data_dir`
/// with a directory, so that the next roll fails (as on a full or failing
/// disk) until the returned directory is removed.
#[cfg(test)]
pub(crate) fn block_next_segment(data_dir: &Path) -> PathBuf {
    let wal_dir = data_dir.join("wal");
    let next = fs::read_dir(&wal_dir)
        .expect("the log's directory")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".wal")?.parse::<u64>().ok()
        })
        .max()
        .map_or(0, |n| n + 1);
    let blocker = segment_path(&wal_dir, next);
    fs::create_dir(&blocker).expect("a directory in the next segment's place");
    blocker
}

/// The next segment, written ahead as zeros (see the module docs). Each
/// helper writes a file of its own (this name, `.` and a number) and
/// renames it to this name once it is whole and flushed, so no helper ever
/// writes into a file a roll has made a segment.
const PREPARED: &str = "next-segment.zeros";
/// The first segment written ahead after a start; each next one is twice
/// as large, up to `segment_bytes`: a hub that writes little (a test, an
/// idle region) does not write tens of MiB of zeros.
const FIRST_AHEAD: u64 = 1 << 20;

/// Removes what helpers left: a segment written ahead, or one cut short.
fn remove_prepared(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PREPARED))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// What recovery found.
struct Recovery {
    segments: VecDeque<Segment>,
    heads: Vec<u64>,
    repaired: bool,
}

/// Reads and checks every segment, handing the records to `restore`.
fn recover(
    dir: &Path,
    shards: u32,
    repair: bool,
    restore: &mut dyn Restore,
) -> Result<Recovery, OpenError> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(unusable(dir))? {
        let path = entry.map_err(unusable(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(n) = name
            .strip_suffix(".wal")
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((n, path));
        }
    }
    found.sort();
    let n = shards as usize;
    let mut heads: Vec<u64> = vec![0; n];
    let mut segments = VecDeque::new();
    let mut repaired = false;
    let mut cut_from: Option<usize> = None;
    let count = found.len();
    for (i, (number, path)) in found.iter().enumerate() {
        let last_segment = i + 1 == count;
        let corrupt = |offset: u64, reason: Corruption| OpenError::Corrupt {
            file: path.clone(),
            offset,
            reason,
        };
        if i > 0 && *number != found[i - 1].0 + 1 {
            let err = corrupt(
                0,
                Corruption::SegmentNumber {
                    number: *number,
                    before: found[i - 1].0,
                },
            );
            if !repair {
                return Err(err);
            }
            tracing::warn!(error = %err, "repair: dropping this segment and every later one");
            repaired = true;
            cut_from = Some(i);
            break;
        }
        let data = read_file(path).map_err(unusable(path))?;
        let mut meta = SegmentMeta {
            path: path.clone(),
            first: vec![0; n],
            last: vec![0; n],
            marks: Vec::new(),
            end: 0,
        };
        let mut at = 0usize;
        let mut events = 0u64;
        let mut bad: Option<(u64, Corruption)> = None;
        // The heads record opens every segment.
        match read_any(&data, 0, n) {
            Ok((Record::Heads(h), next)) => {
                if i == 0 {
                    heads = h;
                } else if h != heads {
                    bad = Some((0, Corruption::HeadsDoNotContinue));
                }
                at = next;
                meta.marks.push(Mark {
                    offset: at as u64,
                    heads: heads.clone().into(),
                });
            }
            Ok(_) => bad = Some((0, Corruption::NoHeadsFirst)),
            Err(reason) => bad = Some((0, reason)),
        }
        while bad.is_none() && at < data.len() {
            if data[at..].iter().all(|b| *b == 0) {
                // The segment was written ahead: what follows was never
                // written.
                break;
            }
            if meta
                .marks
                .last()
                .is_some_and(|m| at as u64 >= m.offset + MARK_EVERY)
            {
                meta.marks.push(Mark {
                    offset: at as u64,
                    heads: heads.clone().into(),
                });
            }
            match read_any(&data, at, n) {
                Ok((Record::Event(shard, rec), next)) => {
                    let s = shard as usize;
                    if rec.seq != heads[s] + 1 {
                        bad = Some((
                            at as u64,
                            Corruption::SeqNotDue {
                                shard,
                                seq: rec.seq,
                                due: heads[s] + 1,
                            },
                        ));
                        break;
                    }
                    heads[s] = rec.seq;
                    if meta.first[s] == 0 {
                        meta.first[s] = rec.seq;
                    }
                    meta.last[s] = rec.seq;
                    events += 1;
                    restore.record(shard, rec);
                    at = next;
                }
                Ok((Record::Heads(_), _)) => {
                    bad = Some((at as u64, Corruption::HeadsInside));
                }
                Err(reason) => bad = Some((at as u64, reason)),
            }
        }
        let mut valid_len = at as u64;
        let mut capacity = data.len() as u64;
        if let Some((offset, reason)) = bad {
            // A crash can cut the last segment anywhere, its heads record
            // (a roll that did not finish) included.
            let torn = last_segment
                && next_valid_record(&data, offset, n)
                    .is_none_or(|next| unwritten_page_between(&data, offset as usize, next));
            if torn {
                tracing::warn!(
                    file = %path.display(),
                    offset,
                    // Not the zeros of a segment written ahead.
                    bytes = data.iter().rposition(|b| *b != 0).map_or(0, |last| last as u64 + 1).saturating_sub(offset),
                    reason = %reason,
                    "truncating a torn tail left by a crash"
                );
            } else if repair {
                tracing::warn!(
                    file = %path.display(),
                    offset,
                    reason = %reason,
                    "repair: keeping the valid prefix, dropping the rest of the log"
                );
                repaired = true;
                cut_from = Some(i + 1);
            } else {
                return Err(corrupt(offset, reason));
            }
            if offset == 0 {
                // Not even its heads record is valid: the segment goes.
                fs::remove_file(path).map_err(unusable(path))?;
                cut_from = Some(i + 1);
                break;
            }
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(unusable(path))?;
            f.set_len(offset).map_err(unusable(path))?;
            f.sync_all().map_err(unusable(path))?;
            valid_len = offset;
            capacity = offset;
        }
        meta.end = valid_len;
        segments.push_back(Segment {
            meta,
            number: *number,
            events,
            capacity,
        });
        if cut_from.is_some() {
            break;
        }
    }
    if let Some(from) = cut_from {
        for (_, path) in found.iter().skip(from) {
            if path.exists() {
                fs::remove_file(path).map_err(unusable(path))?;
            }
        }
    }
    Ok(Recovery {
        segments,
        heads,
        repaired,
    })
}

fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut data = Vec::with_capacity(f.metadata().map_or(0, |m| m.len() as usize));
    f.read_to_end(&mut data)?;
    Ok(data)
}

/// Where the first valid event record after `offset` starts, if one does:
/// then a bad record is damage in the middle, not a torn tail (unless
/// [`unwritten_page_between`] says otherwise).
fn next_valid_record(data: &[u8], offset: u64, shards: usize) -> Option<usize> {
    let start = offset as usize + 1;
    (start..data.len().saturating_sub(HEADER + FIXED)).find(|&at| {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        (FIXED..=MAX_RECORD).contains(&len)
            && at + HEADER + len <= data.len()
            && matches!(read_any(data, at, shards), Ok((Record::Event(..), _)))
    })
}

/// The page size the kernel writes files back in (at least).
const PAGE: usize = 4096;

/// True when, between a bad record at `from` and the next valid one at
/// `to`, a page of the file ends in zeros from within the bad record on
/// (at least 64 bytes of them): a page of a group the writer wrote into a
/// segment written ahead but had not flushed when the machine lost power,
/// which never reached the disk while a later page did. That group was
/// never answered under `fsync = always`; it is a torn tail, not damage.
fn unwritten_page_between(data: &[u8], from: usize, to: usize) -> bool {
    const LEAST: usize = 64;
    let mut end = (from / PAGE + 1) * PAGE;
    while end <= to {
        let lo = from.max(end - PAGE);
        if end - lo >= LEAST && data[lo..end].iter().all(|b| *b == 0) {
            return true;
        }
        end += PAGE;
    }
    false
}

/// A decoded record.
enum Record {
    Heads(Vec<u64>),
    Event(u32, Recovered),
}

/// Decodes a buffer of event records (one shard actor's drain, as the
/// JetStream backend stores it in one message), with their shards.
pub fn decode_records(data: &[u8], shards: u32) -> Result<Vec<(u32, Recovered)>, Corruption> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        match read_any(data, at, shards as usize)? {
            (Record::Event(shard, r), next) => {
                out.push((shard, r));
                at = next;
            }
            (Record::Heads(_), _) => return Err(Corruption::HeadsAmongEvents),
        }
    }
    Ok(out)
}

/// Decodes the record at `at`; returns it and where the next one starts.
fn read_any(data: &[u8], at: usize, shards: usize) -> Result<(Record, usize), Corruption> {
    let header = data
        .get(at..at + HEADER)
        .ok_or(Corruption::HeaderCutShort)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(4..=MAX_RECORD).contains(&len) {
        return Err(Corruption::Length(len));
    }
    let body = data
        .get(at + HEADER..at + HEADER + len)
        .ok_or(Corruption::CutShort)?;
    if crc32fast::hash(body) != crc {
        return Err(Corruption::Checksum);
    }
    let next = at + HEADER + len;
    let shard = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[o..o + 8]);
        u64::from_le_bytes(b)
    };
    if shard == HEADS {
        if len != 4 + 8 * shards {
            return Err(Corruption::HeadsFor((len - 4) / 8));
        }
        return Ok((
            Record::Heads((0..shards).map(|s| u64_at(4 + 8 * s)).collect()),
            next,
        ));
    }
    if shard as usize >= shards || len < FIXED {
        return Err(Corruption::Shard(shard));
    }
    let seq = u64_at(4);
    let flags = body[12];
    let publish_time_us = u64_at(13);
    let version = u64_at(21);
    let entity_len = u16::from_le_bytes([body[29], body[30]]) as usize;
    let event_len = u32::from_le_bytes([body[31], body[32], body[33], body[34]]) as usize;
    if FIXED + entity_len + event_len != len {
        return Err(Corruption::Lengths);
    }
    let entity = std::str::from_utf8(&body[FIXED..FIXED + entity_len])
        .map_err(|_| Corruption::EntityNotUtf8)?;
    let entity = Entity::parse(entity).map_err(Corruption::Entity)?;
    let gap = flags & FLAG_GAP != 0;
    if !gap && Version::new(version).is_none() {
        return Err(Corruption::VersionZero);
    }
    let bytes = Bytes::copy_from_slice(&body[FIXED + entity_len..]);
    Ok((
        Record::Event(
            shard,
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
        ),
        next,
    ))
}

/// Appends the record of one entry of `shard` with its seq to `buf`.
pub fn encode_record(buf: &mut Vec<u8>, shard: u32, seq: u64, e: &LogEntry) {
    let entity = e.entity.as_str().as_bytes();
    let len = FIXED + entity.len() + e.bytes.len();
    let start = buf.len();
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&shard.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    let flags = if e.local { FLAG_LOCAL } else { 0 } | if e.gap { FLAG_GAP } else { 0 };
    buf.push(flags);
    buf.extend_from_slice(&e.publish_time_us.to_le_bytes());
    buf.extend_from_slice(&e.version.to_le_bytes());
    buf.extend_from_slice(&(entity.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(e.bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(entity);
    buf.extend_from_slice(&e.bytes);
    seal(buf, start);
}

fn encode_heads(buf: &mut Vec<u8>, heads: &[u64]) {
    let start = buf.len();
    buf.extend_from_slice(&((4 + 8 * heads.len()) as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&HEADS.to_le_bytes());
    for h in heads {
        buf.extend_from_slice(&h.to_le_bytes());
    }
    seal(buf, start);
}

fn seal(buf: &mut [u8], start: usize) {
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads one shard's records back from disk, for sessions whose cursor is
/// older than the in-memory tail but still retained on disk.
#[derive(Debug, Clone)]
pub struct DiskReader {
    shard: u32,
    index: Arc<RwLock<Index>>,
}

impl DiskReader {
    /// Seq of the shard's oldest record on disk (its head + 1 when none).
    pub fn first_seq(&self) -> u64 {
        let index = self.index.read();
        let s = self.shard as usize;
        index
            .segments
            .iter()
            .map(|m| m.first[s])
            .find(|f| *f != 0)
            .unwrap_or(index.heads[s] + 1)
    }

    /// The shard's records with seqs after `after` and before `before`,
    /// oldest first, from the one segment that holds `after + 1`: at most
    /// `max` records and about `max_bytes` of events. Fewer when the segment
    /// ends first; the caller asks again from where it got to. `Ok(None)`
    /// when no segment holds it any more (retention dropped it).
    ///
    /// The read starts at the segment's last mark before `after + 1` and
    /// takes the file `READ_CHUNK` at a time: it scans at most
    /// `MARK_EVERY` bytes of other records before the wanted ones and
    /// holds at most a chunk (or one record, if larger) in memory, however
    /// large the segment.
    pub fn read(
        &self,
        after: u64,
        before: u64,
        max: usize,
        max_bytes: usize,
    ) -> io::Result<Option<Vec<(u64, LogEntry)>>> {
        let s = self.shard as usize;
        let (path, shards, start, end) = {
            let index = self.index.read();
            let found = index
                .segments
                .iter()
                .find(|m| m.last[s] > after && m.first[s] != 0);
            match found {
                Some(m) => {
                    let i = m.marks.partition_point(|k| k.heads[s] <= after);
                    let start = i.checked_sub(1).map_or(0, |i| m.marks[i].offset);
                    (m.path.clone(), m.first.len(), start, m.end)
                }
                None => return Ok(None),
            }
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut chunk = Chunk::new(file, start, end);
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max && bytes < max_bytes {
            let offset = chunk.offset();
            let bad = |reason: Corruption| {
                io::Error::other(format!("{}: offset {offset}: {reason}", path.display()))
            };
            // The end of what is written: only seqs below the in-memory
            // head are asked for, and those were written before it.
            let Some((len, shard)) = chunk.next_record()? else {
                break;
            };
            if !(4..=MAX_RECORD).contains(&len) {
                return Err(bad(Corruption::Length(len)));
            }
            if shard != self.shard {
                chunk.skip(HEADER + len);
                continue;
            }
            let (rec, next) = read_any(chunk.data(), 0, shards).map_err(bad)?;
            chunk.skip(next);
            if let Record::Event(_, rec) = rec {
                if rec.seq >= before {
                    break;
                }
                if rec.seq > after {
                    bytes += rec.entry.bytes.len();
                    out.push((rec.seq, rec.entry));
                }
            }
        }
        Ok(Some(out))
    }
}

/// A window on a segment file, read forward a chunk at a time.
struct Chunk {
    file: File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    base: u64,
    /// Position in `buf` of the next record.
    at: usize,
    /// File offset where what is written ends.
    end: u64,
}

impl Chunk {
    fn new(file: File, start: u64, end: u64) -> Self {
        Self {
            file,
            buf: Vec::new(),
            base: start,
            at: 0,
            end,
        }
    }

    /// File offset of the next record.
    fn offset(&self) -> u64 {
        self.base + self.at as u64
    }

    /// The bytes from the next record on.
    fn data(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    fn skip(&mut self, n: usize) {
        self.at += n;
    }

    /// Length of the next record's body and its shard field, with the whole
    /// record in the window; `None` at the end of what is written.
    fn next_record(&mut self) -> io::Result<Option<(usize, u32)>> {
        if !self.fill(HEADER + 4)? {
            return Ok(None);
        }
        let d = self.data();
        let len = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as usize;
        let shard = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
        if len > MAX_RECORD {
            // Not a record: the caller says so.
            return Ok(Some((len, shard)));
        }
        Ok(self.fill(HEADER + len)?.then_some((len, shard)))
    }

    /// Makes sure `n` bytes from the next record are in the window; false
    /// when the file ends first.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        if self.buf.len() - self.at >= n {
            return Ok(true);
        }
        self.buf.drain(..self.at);
        self.base += self.at as u64;
        self.at = 0;
        let have = self.buf.len();
        let written = usize::try_from(self.end.saturating_sub(self.base)).unwrap_or(usize::MAX);
        if written < n {
            return Ok(false);
        }
        self.buf.resize(n.max(READ_CHUNK).min(written), 0);
        let mut got = have;
        while got < self.buf.len() {
            match self
                .file
                .read_at(&mut self.buf[got..], self.base + got as u64)
            {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.truncate(got);
        Ok(got >= n)
    }
}

/// The next segment, written ahead as zeros by a helper thread.
enum Ahead {
    /// Nothing prepared or running.
    Idle,
    /// The helper, writing this many bytes; it answers when done.
    Running(Receiver<io::Result<()>>, u64),
    /// `PREPARED` holds this many zeros, flushed.
    Ready(u64),
}

/// Writes the next segment ahead: `size` zeros in a file of its own,
/// flushed, then renamed to [`PREPARED`]. On error the file goes (a full
/// disk gets its space back) and one line says why.
fn write_ahead(dir: &Path, size: u64) -> io::Result<()> {
    static HELPERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = HELPERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let own = dir.join(format!("{PREPARED}.{n}"));
    let written = write_zeros(&own, size).and_then(|()| fs::rename(&own, dir.join(PREPARED)));
    if let Err(e) = &written {
        let _ = fs::remove_file(&own);
        tracing::warn!(file = %own.display(), error = %e, "cannot write the next log segment ahead; the log appends to a growing file until it can");
    }
    written
}

/// Writes `size` zero bytes to a new file at `path` and flushes it with
/// its size: a segment written ahead.
fn write_zeros(path: &Path, size: u64) -> io::Result<()> {
    /// Written and flushed a step at a time: a device flush of the log
    /// then waits for at most one step of zeros, not for megabytes of them
    /// (larger steps showed in the log's own flush times under load:
    /// BENCHMARKS.md, "The log writes into zeros").
    const STEP: u64 = 256 << 10;
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; STEP as usize];
    let mut at = 0;
    while at < size {
        let n = STEP.min(size - at);
        file.write_all_at(&zeros[..n as usize], at)?;
        file.sync_data()?;
        at += n;
    }
    file.sync_all()
}

/// One shard's records within a drain: `count` records with seqs from
/// `first_seq` on, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The shard.
    pub shard: u32,
    /// Seq of its first record.
    pub first_seq: u64,
    /// How many records.
    pub count: u64,
}

/// One drain handed to the writer.
struct Request {
    /// Its records, encoded; handed back for reuse.
    buf: Vec<u8>,
    /// Which shards' records `buf` holds.
    runs: Vec<Run>,
    owed: Owed,
}

impl Request {
    /// Whether its port refuses it (an earlier drain of the port failed).
    fn refusing(&self) -> bool {
        self.owed
            .0
            .as_ref()
            .is_some_and(|(a, _)| a.refusing.load(Ordering::Acquire))
    }

    /// Has its port refuse every later drain until the actor recovers.
    fn refuse_later(&self) {
        if let Some((a, _)) = &self.owed.0 {
            a.refusing.store(true, Ordering::Release);
        }
    }
}

/// A written drain's answer to its actor: the buffer back, and whether the
/// records are in the log.
pub struct Completion {
    owed: Owed,
    buf: Vec<u8>,
    result: io::Result<()>,
}

impl Completion {
    /// Answers the drain's actor (which may have stopped meanwhile).
    pub fn complete(self) {
        self.owed.pay(self.buf, self.result);
    }
}

/// A drain's answer: its record buffer back for reuse, and whether its
/// records are in the log.
pub type Answered = (Vec<u8>, io::Result<()>);

/// Where one actor's drains are answered, in the order they were handed
/// over: an actor has at most [`PIPELINE`] drains with the writer, so a
/// queue that small serves them all and a drain allocates nothing to be
/// answered.
#[derive(Debug, Default)]
struct Answer {
    slot: parking_lot::Mutex<Slot>,
    ready: tokio::sync::Notify,
    /// Set by the writer when one of this port's drains was not stored:
    /// the drains the actor handed over after it were decided on top of
    /// it, so the writer refuses them unwritten (their seqs would leave a
    /// gap) until the actor, having had every answer, clears it.
    refusing: AtomicBool,
}

/// A port's answers, each under the number of its drain (the order the
/// actor handed them over in). Answers are paid in that order while the
/// completion task runs; while it stops, the writer pays later groups on
/// its own thread, possibly before the task has paid the earlier ones, so
/// the number, not the order of payment, decides which answer is whose.
#[derive(Debug, Default)]
struct Slot {
    /// Number of the next answer to take.
    taken: u64,
    /// Paid and not taken, by number (at most [`PIPELINE`]).
    paid: VecDeque<(u64, Answered)>,
}

impl Answer {
    fn put(&self, n: u64, buf: Vec<u8>, result: io::Result<()>) {
        {
            let mut slot = self.slot.lock();
            let at = slot.paid.partition_point(|(m, _)| *m < n);
            slot.paid.insert(at, (n, (buf, result)));
        }
        self.ready.notify_one();
    }

    /// The answer to the oldest drain not yet answered, once paid.
    async fn wait(&self) -> Answered {
        loop {
            {
                let mut slot = self.slot.lock();
                if slot.paid.front().is_some_and(|(n, _)| *n == slot.taken) {
                    slot.taken += 1;
                    if let Some((_, answer)) = slot.paid.pop_front() {
                        return answer;
                    }
                }
            }
            // A payment between the look and here leaves a permit: no
            // wake is lost (and a stale permit costs one more look).
            self.ready.notified().await;
        }
    }
}

/// The answer owed to a drain's actor: paid once by its completion or,
/// when the request or its completion is dropped unanswered (the writer or
/// the completion task stopped), as an error, so no actor waits forever.
struct Owed(Option<(Arc<Answer>, u64)>);

impl Owed {
    fn pay(mut self, buf: Vec<u8>, result: io::Result<()>) {
        if let Some((a, n)) = self.0.take() {
            a.put(n, buf, result);
        }
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        if let Some((a, n)) = self.0.take() {
            a.put(
                n,
                Vec::new(),
                Err(io::Error::other("the log writer stopped")),
            );
        }
    }
}

/// How many drains one actor may have with the writer at once: one being
/// flushed and the next, already written or waiting to be, so that the
/// writer starts the next write the moment a flush returns, without
/// waiting for the actor to be woken, finish the last drain and decide
/// the next.
pub const PIPELINE: usize = 2;

/// One shard actor's way into the log (see [`Wal::port`]).
#[derive(Debug)]
pub struct WalPort {
    wal: Wal,
    answer: Arc<Answer>,
    /// Number of the next drain handed over (see [`Slot`]).
    sent: u64,
}

impl WalPort {
    /// Hands the records in `buf` (the `runs` of one or more shards, in
    /// that order) to the writer, which writes them under the fsync policy
    /// after every drain this port handed over before. [`WalPort::next`]
    /// answers them, in order, when they are written (and flushed, with
    /// `always`). When the writer is not running nothing is handed over:
    /// the buffer comes back at once, with the error.
    ///
    /// A port has at most [`PIPELINE`] drains unanswered. Once one of them
    /// fails, the writer refuses every later one unwritten until
    /// [`WalPort::recovered`]: on error nothing of that `buf` is in the
    /// log.
    pub fn send(&mut self, runs: Vec<Run>, buf: Vec<u8>) -> Result<(), (Vec<u8>, io::Error)> {
        let req = Request {
            buf,
            runs,
            owed: Owed(Some((self.answer.clone(), self.sent))),
        };
        match self.wal.tx.try_send(req) {
            Ok(()) => {
                self.sent += 1;
                Ok(())
            }
            Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) => {
                let Request { buf, mut owed, .. } = r;
                // Not handed over: nothing is owed.
                owed.0 = None;
                Err((buf, io::Error::other("the log writer is not running")))
            }
        }
    }

    /// The answer to the oldest drain handed over and not yet answered:
    /// its buffer back for reuse, and whether its records are in the log.
    /// Cancel-safe: an answer not taken stays for the next call.
    pub fn next(&self) -> impl Future<Output = Answered> + Send + use<> {
        let answer = self.answer.clone();
        async move { answer.wait().await }
    }

    /// Told by the actor once it has had the answer of every drain it
    /// handed over after a failure (and undone them): the writer takes
    /// this port's drains again.
    pub fn recovered(&self) {
        self.answer.refusing.store(false, Ordering::Release);
    }

    /// Hands one drain over and waits for its answer.
    pub async fn append(&mut self, runs: Vec<Run>, buf: Vec<u8>) -> Answered {
        if let Err((buf, e)) = self.send(runs, buf) {
            return (buf, Err(e));
        }
        self.next().await
    }
}

/// Where the writer hands each group's completions (see
/// [`Wal::complete_on`]).
pub type Completer = tokio::sync::mpsc::Sender<Vec<Completion>>;

/// The log's writer: shard actors hand it their drains
/// ([`Wal::append`]); its thread writes and flushes them in groups.
#[derive(Debug, Clone)]
pub struct Wal {
    tx: SyncSender<Request>,
    completer: Arc<std::sync::OnceLock<Completer>>,
}

impl Wal {
    fn start(
        dir: PathBuf,
        recovered: Recovery,
        index: Arc<RwLock<Index>>,
        retention: Retention,
        running: PathBuf,
        held: Held,
    ) -> io::Result<Self> {
        let shards = recovered.heads.len();
        // Each actor (at most one per shard) has at most `PIPELINE` drains
        // outstanding.
        let (tx, rx) = std::sync::mpsc::sync_channel(PIPELINE * shards + 1);
        let completer = Arc::new(std::sync::OnceLock::new());
        let mut writer = Writer {
            running,
            _held: held,
            completer: completer.clone(),
            active: None,
            dir,
            segments: recovered.segments,
            heads: recovered.heads,
            index,
            retention,
            events: 0,
            bytes: 0,
            buf: Vec::new(),
            flush_failed: false,
            ahead: Ahead::Idle,
            ahead_bytes: FIRST_AHEAD.min(retention.segment_bytes),
        };
        writer.events = writer.segments.iter().map(|s| s.events).sum();
        writer.bytes = writer.segments.iter().map(|s| s.meta.end).sum();
        if let Some(last) = writer.segments.back() {
            writer.active = Some(OpenOptions::new().write(true).open(&last.meta.path)?);
        }
        remove_prepared(&writer.dir);
        if writer.segments.is_empty() && retention.fsync != FsyncPolicy::Never {
            // A new log's first segment is written ahead before it serves
            // (a few milliseconds for its MiB), so that from the first
            // publish on, no flush commits a file size.
            if write_ahead(&writer.dir, writer.ahead_bytes).is_ok() {
                writer.ahead = Ahead::Ready(writer.ahead_bytes);
            }
        }
        std::thread::Builder::new()
            .name("freshness-wal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self { tx, completer })
    }

    /// Has the writer hand every group's completions to `completer` (one
    /// wake of its receiver per group, which then answers the group's
    /// actors on its own runtime) instead of answering each drain from its
    /// own thread (one wake across threads per drain). Where the receiver
    /// is gone, the writer answers them itself. Set once; later calls are
    /// ignored.
    pub fn complete_on(&self, completer: Completer) {
        let _ = self.completer.set(completer);
    }

    /// A way into the log for one shard actor, which hands it its drains
    /// in order, at most [`PIPELINE`] of them unanswered
    /// ([`WalPort::send`]).
    pub fn port(&self) -> WalPort {
        WalPort {
            wal: self.clone(),
            answer: Arc::default(),
            sent: 0,
        }
    }
}

/// What the log's writer holds until its thread ends.
struct Held {
    /// A second handle on the directory's `LOCK` (one lock, held until
    /// every handle is closed): a hub that gives up waiting for its writer
    /// and drops its [`DataDir`] leaves the directory locked while the
    /// writer may still write, so no other hub (in this process or another)
    /// opens it meanwhile.
    _lock: File,
    /// Dropped with the writer, after the lock (fields drop in order):
    /// tells [`DataDir::writer_stopped`].
    _stopped: SyncSender<()>,
}

struct Writer {
    /// The data directory's `RUNNING` marker, removed on a clean stop.
    running: PathBuf,
    _held: Held,
    completer: Arc<std::sync::OnceLock<Completer>>,
    dir: PathBuf,
    /// The next segment, written ahead.
    ahead: Ahead,
    /// Size of the next segment to write ahead.
    ahead_bytes: u64,
    segments: VecDeque<Segment>,
    active: Option<File>,
    heads: Vec<u64>,
    index: Arc<RwLock<Index>>,
    retention: Retention,
    events: u64,
    bytes: u64,
    buf: Vec<u8>,
    /// A flush of records already answered failed (`interval`): what the
    /// run wrote cannot be vouched for after a machine crash, so a clean
    /// stop leaves the marker.
    flush_failed: bool,
}

impl Drop for Writer {
    /// A helper still writing the next segment ahead finishes before the
    /// writer lets go of the directory ([`Held`]): no thread of this hub
    /// writes into it once another may hold it.
    fn drop(&mut self) {
        if let Ahead::Running(answer, _) = &self.ahead {
            let _ = answer.recv();
        }
    }
}

impl Writer {
    fn run(mut self, rx: Receiver<Request>) {
        self.prepare();
        let mut group: Vec<Request> = Vec::new();
        let mut unsynced = false;
        loop {
            let first = if unsynced {
                match rx.recv_timeout(self.retention.fsync_interval) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => {
                        let flushed = self.sync();
                        if let Err(e) = &flushed
                            && !std::mem::replace(&mut self.flush_failed, true)
                        {
                            tracing::warn!(error = %e, "a periodic flush of the log failed; retrying, and a start after a machine restart will begin a new epoch");
                        }
                        unsynced = flushed.is_err();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            group.push(first);
            // The actors of one publish hand their drains one after the
            // other: let the thread that runs them go on before the group
            // is taken (at once when it has nothing left to run).
            std::thread::yield_now();
            while let Ok(r) = rx.try_recv() {
                group.push(r);
            }
            // A drain handed over after one of its port's failed was
            // decided on top of it: refused unwritten (see
            // `Answer::refusing`). A port's drains in one group are all
            // refused or none (the actor clears the refusal only once it
            // has every answer), so each port's answers stay in order.
            let refused: Vec<Request> = group.extract_if(.., |r| r.refusing()).collect();
            let result = if group.is_empty() {
                Ok(())
            } else {
                let started = tokio::time::Instant::now();
                let result = self.write_group(&group);
                crate::metrics::record_log_flush(started.elapsed().as_secs_f64());
                result
            };
            if self.retention.fsync == FsyncPolicy::Interval && !group.is_empty() && result.is_ok()
            {
                unsynced = true;
            }
            let mut done: Vec<Completion> = Vec::with_capacity(refused.len() + group.len());
            done.extend(refused.into_iter().map(|req| Completion {
                owed: req.owed,
                buf: req.buf,
                result: Err(io::Error::other(
                    "an earlier drain of this shard actor was not stored",
                )),
            }));
            done.extend(group.drain(..).map(|req| {
                if result.is_err() {
                    req.refuse_later();
                }
                Completion {
                    owed: req.owed,
                    buf: req.buf,
                    result: match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    },
                }
            }));
            let inline = match self.completer.get() {
                Some(c) => c.blocking_send(done).err().map(|e| e.0),
                None => Some(done),
            };
            for c in inline.into_iter().flatten() {
                c.complete();
            }
        }
        if let Ahead::Running(answer, _) = &self.ahead {
            // No helper outlives its writer.
            let _ = answer.recv();
        }
        // A clean stop: everything written is flushed, whatever the
        // policy, and then the marker goes, so that the next start keeps
        // the epoch even on another boot; unless a flush of answered
        // records failed during the run (a flush that then succeeds may
        // not have written what the failed one dropped).
        let flushed = self.flush_everything().and_then(|()| {
            if self.flush_failed {
                Err(io::Error::other("a flush failed during the run"))
            } else {
                Ok(())
            }
        });
        let unmarked = flushed.and_then(|()| {
            fs::remove_file(&self.running)?;
            match self.running.parent() {
                Some(dir) => File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        });
        match unmarked {
            Ok(()) => tracing::debug!("log writer stopped cleanly"),
            Err(e) => {
                tracing::warn!(error = %e, "the log writer stopped without flushing or unmarking the log; a start after a machine restart begins a new epoch")
            }
        }
    }

    fn sync(&self) -> io::Result<()> {
        match &self.active {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Everything this run wrote, flushed: with `always` and `interval`
    /// every roll flushed the segment it closed and the directory, so the
    /// active segment holds all that may not be; with `never` no roll
    /// flushed anything, so every segment and the directory are.
    fn flush_everything(&self) -> io::Result<()> {
        if self.retention.fsync != FsyncPolicy::Never {
            return self.sync();
        }
        flush_files(&self.dir, self.segments.iter().map(|s| &s.meta)).map_err(|(_, e)| e)
    }

    /// Starts writing the next segment ahead, unless that runs already or
    /// its file waits for a roll. With `fsync = never` nothing is flushed,
    /// so nothing is prepared either.
    fn prepare(&mut self) {
        if matches!(self.ahead, Ahead::Running(..) | Ahead::Ready(_))
            || self.retention.fsync == FsyncPolicy::Never
        {
            return;
        }
        let dir = self.dir.clone();
        let size = self.ahead_bytes;
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("freshness-wal-ahead".into())
            .spawn(move || {
                let _ = done.send(write_ahead(&dir, size));
            });
        self.ahead = match spawned {
            Ok(_) => Ahead::Running(answer, size),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the thread that writes log segments ahead");
                Ahead::Idle
            }
        };
    }

    /// The size of the segment written ahead, when it is ready for a roll.
    /// A failed preparation (logged by the helper) leaves nothing ready;
    /// the next roll starts another, not before.
    fn ahead_ready(&mut self) -> Option<u64> {
        if let Ahead::Running(answer, size) = &self.ahead {
            match answer.try_recv() {
                Ok(Ok(())) => self.ahead = Ahead::Ready(*size),
                Ok(Err(_)) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    self.ahead = Ahead::Idle;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
        }
        match self.ahead {
            Ahead::Ready(size) => Some(size),
            _ => None,
        }
    }

    /// Writes every drain of the group in one write and, with `always`,
    /// one flush. On error the file is cut back to where the group began.
    fn write_group(&mut self, group: &[Request]) -> io::Result<()> {
        let size: u64 = group.iter().map(|r| r.buf.len() as u64).sum();
        let back = self
            .segments
            .back()
            .map(|s| (s.events, s.meta.end, s.capacity));
        let needs_new = match back {
            None => true,
            Some((0, _, _)) => false,
            Some((_, bytes, _)) if bytes + size > self.retention.segment_bytes => true,
            // The group would grow the file and a segment written ahead is
            // ready: move to it now.
            Some((_, bytes, capacity)) => bytes + size > capacity && self.ahead_ready().is_some(),
        };
        if needs_new {
            self.roll()?;
        }
        let sync = self.retention.fsync == FsyncPolicy::Always;
        self.buf.clear();
        for r in group {
            self.buf.extend_from_slice(&r.buf);
        }
        let (Some(file), Some(seg)) = (self.active.as_ref(), self.segments.back_mut()) else {
            return Err(io::Error::other("no active segment"));
        };
        let at = seg.meta.end;
        let mark = seg
            .meta
            .marks
            .last()
            .is_none_or(|m| at >= m.offset + MARK_EVERY)
            .then(|| Mark {
                offset: at,
                heads: self.heads.clone().into(),
            });
        let written = file
            .write_all_at(&self.buf, at)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            if file.set_len(at).is_ok() {
                seg.capacity = at;
            }
            return Err(e);
        }
        seg.meta.end += size;
        self.bytes += size;
        if let Some(mark) = &mark {
            seg.meta.marks.push(mark.clone());
        }
        for r in group.iter().flat_map(|r| &r.runs) {
            let s = r.shard as usize;
            let last = r.first_seq + r.count - 1;
            if seg.meta.first[s] == 0 {
                seg.meta.first[s] = r.first_seq;
            }
            seg.meta.last[s] = last;
            self.heads[s] = last;
            seg.events += r.count;
            self.events += r.count;
        }
        {
            let mut index = self.index.write();
            if let Some(m) = index.segments.back_mut() {
                m.end = seg.meta.end;
                m.first.clone_from(&seg.meta.first);
                m.last.clone_from(&seg.meta.last);
                if let Some(mark) = mark {
                    m.marks.push(mark);
                }
            }
            index.heads.clone_from(&self.heads);
        }
        self.trim();
        Ok(())
    }

    /// Closes the active segment (cut back to what it holds) and starts the
    /// next, in the segment written ahead when one is ready, with the heads
    /// record.
    fn roll(&mut self) -> io::Result<()> {
        let sync = self.retention.fsync != FsyncPolicy::Never;
        if let (Some(f), Some(old)) = (&self.active, self.segments.back_mut()) {
            if old.capacity > old.meta.end {
                // Zeros read as the clean end too, so this only gives the
                // space back; a failure costs nothing else.
                match f.set_len(old.meta.end) {
                    Ok(()) => old.capacity = old.meta.end,
                    Err(e) => {
                        tracing::warn!(file = %old.meta.path.display(), error = %e, "cannot cut a closed segment back to what it holds")
                    }
                }
            }
            if sync {
                f.sync_data()?;
            }
        }
        let number = self.segments.back().map_or(0, |s| s.number + 1);
        let path = segment_path(&self.dir, number);
        let ahead = self.ahead_ready().and_then(|size| {
            self.ahead = Ahead::Idle;
            self.ahead_bytes = (size * 2).min(self.retention.segment_bytes);
            let taken = fs::rename(self.dir.join(PREPARED), &path)
                .and_then(|()| OpenOptions::new().write(true).open(&path));
            match taken {
                Ok(file) => Some((file, size)),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot take the segment written ahead; starting a growing one");
                    None
                }
            }
        });
        let (file, capacity) = if let Some(ahead) = ahead {
            ahead
        } else {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)?;
            (file, 0)
        };
        let mut heads = Vec::new();
        encode_heads(&mut heads, &self.heads);
        file.write_all_at(&heads, 0)?;
        if sync {
            file.sync_data()?;
            File::open(&self.dir)?.sync_all()?;
        }
        let n = self.heads.len();
        let meta = SegmentMeta {
            path,
            first: vec![0; n],
            last: vec![0; n],
            marks: vec![Mark {
                offset: heads.len() as u64,
                heads: self.heads.clone().into(),
            }],
            end: heads.len() as u64,
        };
        self.index.write().segments.push_back(meta.clone());
        self.segments.push_back(Segment {
            meta,
            number,
            events: 0,
            capacity: capacity.max(heads.len() as u64),
        });
        self.bytes += heads.len() as u64;
        self.active = Some(file);
        self.prepare();
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
                || self.bytes - oldest.meta.end >= self.retention.max_bytes;
            if !over {
                break;
            }
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            self.events -= oldest.events;
            self.bytes -= oldest.meta.end;
            self.index.write().segments.pop_front();
            if let Err(e) = fs::remove_file(&oldest.meta.path) {
                tracing::warn!(file = %oldest.meta.path.display(), error = %e, "cannot remove an expired segment");
            }
        }
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
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(10),
        }
    }

    /// Collects what recovery hands back.
    #[derive(Default)]
    struct Collect {
        records: BTreeMap<u32, Vec<Recovered>>,
    }

    impl Restore for Collect {
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

    /// A runtime to wait for a port's answers on.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    /// One drain of `shard`: `n` records with seqs from `from` on, each of
    /// its own entity.
    fn drain(shard: u32, from: u64, n: u64) -> (Vec<Run>, Vec<u8>) {
        let mut buf = Vec::new();
        for seq in from..from + n {
            encode_record(&mut buf, shard, seq, &entry(&format!("user:{seq}"), seq));
        }
        let run = Run {
            shard,
            first_seq: from,
            count: n,
        };
        (vec![run], buf)
    }

    fn write(wal: &Wal, shard: u32, from: u64, n: u64) {
        let rt = runtime();
        let (runs, buf) = drain(shard, from, n);
        let (_, r) = rt.block_on(wal.port().append(runs, buf));
        r.unwrap();
    }

    /// Stops the writer of `opened` and waits for it, as a hub does when it
    /// stops: the directory is locked until the writer has stopped.
    fn close(opened: Opened) {
        let Opened { wal, dir, .. } = opened;
        drop(wal);
        assert!(dir.writer_stopped(Duration::from_secs(5)));
    }

    /// Stops the writer of `opened` and waits for it, then puts back the
    /// `RUNNING` marker its start wrote, as a hub that did not stop cleanly
    /// leaves it.
    fn stop_uncleanly(path: &Path, opened: Opened) {
        let marker = fs::read(path.join(RUNNING)).unwrap();
        let Opened { wal, dir, .. } = opened;
        drop(wal);
        assert!(dir.writer_stopped(Duration::from_secs(5)));
        assert!(!path.join(RUNNING).exists(), "a clean stop unmarks the log");
        fs::write(path.join(RUNNING), marker).unwrap();
    }

    /// With `fsync = never` (or `interval`) records are visible before they
    /// are flushed: an unclean stop keeps the epoch on the same boot (the
    /// page cache outlived the process) and not on another (a machine crash
    /// may have taken records nodes received). With `always`, and after a
    /// clean stop, the epoch is kept on any boot.
    #[test]
    fn an_unclean_stop_keeps_the_epoch_unless_the_machine_restarted_with_records_unflushed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path();
        let never = Retention {
            fsync: FsyncPolicy::Never,
            ..retention()
        };
        let start = |r: Retention, boot: &str| {
            let mut c = Collect::default();
            let opened = open_on_boot(path, 1, r, false, &mut c, Some(boot)).unwrap();
            (opened.epoch, opened.new_epoch, opened)
        };
        let (epoch, new, opened) = start(never, "boot-a");
        assert!(new);
        write(&opened.wal, 0, 1, 5);
        stop_uncleanly(path, opened);

        let (same_boot, new, opened) = start(never, "boot-a");
        assert_eq!((same_boot, new), (epoch, false), "a process crash");
        write(&opened.wal, 0, 6, 5);
        stop_uncleanly(path, opened);

        let (other_boot, new, opened) = start(never, "boot-b");
        assert!(
            new && other_boot != epoch,
            "a machine crash with fsync = never"
        );
        assert_eq!(opened.heads, vec![10], "the log itself is kept");
        // A clean stop, then another boot: kept.
        let Opened { wal, dir, .. } = opened;
        drop(wal);
        assert!(dir.writer_stopped(Duration::from_secs(5)));
        drop(dir);
        let (after_clean, new, opened) = start(retention(), "boot-c");
        assert_eq!((after_clean, new), (other_boot, false), "a clean stop");
        stop_uncleanly(path, opened);

        let (always, new, _opened) = start(never, "boot-d");
        assert_eq!(
            (always, new),
            (other_boot, false),
            "every record was flushed before it was visible"
        );
    }

    /// A `RUNNING` marker that is not text names no policy: the epoch is not
    /// kept across it, and the log itself is.
    #[test]
    fn a_garbled_marker_begins_a_new_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path();
        let start = || {
            let mut c = Collect::default();
            open_on_boot(path, 1, retention(), false, &mut c, Some("boot-a")).unwrap()
        };
        let opened = start();
        let epoch = opened.epoch;
        write(&opened.wal, 0, 1, 5);
        stop_uncleanly(path, opened);
        fs::write(path.join(RUNNING), [0xff, 0xfe, 0x00, 0x80]).unwrap();
        let opened = start();
        assert!(opened.new_epoch && opened.epoch != epoch);
        assert_eq!(opened.heads, vec![5], "the log itself is kept");
    }

    /// A port hands the writer its next drain before the last is answered;
    /// once one fails, the drains after it (decided on top of it) are
    /// refused unwritten, and so is every drain handed over before the
    /// actor says it has undone them; then the port writes again, from the
    /// failed drain's seqs on, and the log has no gap.
    /// While the hub stops, the writer pays a later group's answers on its
    /// own thread, possibly before the completion task has paid an earlier
    /// group's: the actor still takes each answer as its own drain's.
    #[test]
    fn a_port_takes_its_answers_in_the_order_it_handed_its_drains_over() {
        use futures::FutureExt;
        let answer = Arc::new(Answer::default());
        let first = Owed(Some((answer.clone(), 0)));
        let second = Owed(Some((answer.clone(), 1)));
        second.pay(vec![2], Err(io::Error::other("not stored")));
        assert!(
            answer.wait().now_or_never().is_none(),
            "the second drain's answer is not the first's"
        );
        first.pay(vec![1], Ok(()));
        let (buf, r) = answer.wait().now_or_never().expect("the first is paid");
        assert_eq!((buf, r.is_ok()), (vec![1], true));
        let (buf, r) = answer.wait().now_or_never().expect("the second is paid");
        assert_eq!((buf, r.is_ok()), (vec![2], false));
    }

    #[test]
    fn a_port_pipelines_its_drains_and_refuses_those_after_a_failed_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, _) = open_collect(tmp.path(), 1, retention());
        let opened = opened.unwrap();
        let rt = runtime();
        let mut port = opened.wal.port();
        // Drains of 30 records, more than a 4 KiB segment holds: each
        // starts a segment. Two handed over before either is answered:
        // both stored, answered in order.
        for from in [1, 31] {
            let (runs, buf) = drain(0, from, 30);
            port.send(runs, buf).unwrap();
        }
        for _ in 0..2 {
            rt.block_on(port.next()).1.unwrap();
        }
        let blocker = block_next_segment(tmp.path());
        for from in [61, 91] {
            let (runs, buf) = drain(0, from, 30);
            port.send(runs, buf).unwrap();
        }
        let (_, failed) = rt.block_on(port.next());
        assert!(failed.is_err(), "the roll into a directory fails");
        let (_, after) = rt.block_on(port.next());
        assert!(after.is_err(), "a drain after a failed one is not stored");
        // Handed over before the actor has undone them: refused unwritten,
        // even though the disk could take it now.
        fs::remove_dir(&blocker).unwrap();
        let (runs, buf) = drain(0, 61, 30);
        port.send(runs, buf).unwrap();
        let (_, early) = rt.block_on(port.next());
        assert!(
            early
                .unwrap_err()
                .to_string()
                .contains("an earlier drain of this shard actor was not stored")
        );
        port.recovered();
        let (runs, buf) = drain(0, 61, 30);
        port.send(runs, buf).unwrap();
        rt.block_on(port.next()).1.unwrap();
        drop(port);
        close(opened);
        let (_, got) = open_collect(tmp.path(), 1, retention());
        let seqs: Vec<u64> = got.records[&0].iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=90).collect::<Vec<_>>());
    }

    /// An actor that owns several shards hands them to the writer in one
    /// drain: each shard keeps its own seqs, across a reopen.
    #[test]
    fn one_drain_holds_the_runs_of_several_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, _) = open_collect(tmp.path(), 3, retention());
        let opened = opened.unwrap();
        let mut buf = Vec::new();
        let mut runs = Vec::new();
        for (shard, n) in [(0u32, 3u64), (2, 5)] {
            for seq in 1..=n {
                let e = entry(&format!("user:{shard}-{seq}"), seq);
                encode_record(&mut buf, shard, seq, &e);
            }
            runs.push(Run {
                shard,
                first_seq: 1,
                count: n,
            });
        }
        let rt = runtime();
        let (_, r) = rt.block_on(opened.wal.port().append(runs, buf));
        r.unwrap();
        write(&opened.wal, 2, 6, 2);
        close(opened);
        let (again, got) = open_collect(tmp.path(), 3, retention());
        assert_eq!(again.unwrap().heads, vec![3, 0, 7]);
        assert_eq!(got.records[&0].len(), 3);
        assert!(!got.records.contains_key(&1));
        let s = &got.records[&2];
        assert!(s.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
        assert_eq!(s.len(), 7);
    }

    #[test]
    fn records_survive_a_reopen_across_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, _) = open_collect(tmp.path(), 2, retention());
        let opened = opened.unwrap();
        assert!(opened.new_epoch);
        let epoch = opened.epoch;
        write(&opened.wal, 1, 1, 30);
        write(&opened.wal, 0, 1, 5);
        write(&opened.wal, 1, 31, 30);
        close(opened);
        let (again, got) = open_collect(tmp.path(), 2, retention());
        let again = again.unwrap();
        assert_eq!((again.epoch, again.new_epoch), (epoch, false));
        assert_eq!(again.heads, vec![5, 60]);
        let s = &got.records[&1];
        assert_eq!(s.len(), 60);
        assert!(s.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
        assert_eq!(s[59].entry.version, 60);
        assert_eq!(got.records[&0].len(), 5);
        assert!(fs::read_dir(tmp.path().join("wal")).unwrap().count() > 1);
    }

    #[test]
    fn one_port_answers_drain_after_drain_and_a_dropped_request_answers_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, _) = open_collect(tmp.path(), 1, retention());
        let opened = opened.unwrap();
        let rt = runtime();
        let mut port = opened.wal.port();
        for from in [1, 11, 21] {
            let (runs, buf) = drain(0, from, 10);
            let (back, r) = rt.block_on(port.append(runs, buf));
            r.unwrap();
            assert!(back.capacity() > 0, "the buffer comes back for reuse");
        }
        // An answer owed and never paid (its request or completion dropped
        // when the writer or the completion task stops) is an error, not a
        // wait forever.
        drop(Owed(Some((port.answer.clone(), port.sent))));
        let (_, r) = rt.block_on(port.answer.wait());
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("the log writer stopped")
        );
        drop(port);
        close(opened);
        let (_, got) = open_collect(tmp.path(), 1, retention());
        assert_eq!(got.records[&0].len(), 30);
    }

    #[test]
    fn a_reader_replays_a_range_segment_by_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, _) = open_collect(tmp.path(), 2, retention());
        let opened = opened.unwrap();
        for i in 0..10 {
            write(&opened.wal, 0, 1 + i * 10, 10);
            write(&opened.wal, 1, 1 + i * 3, 3);
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

    /// Reads that start from marks find exactly the records a full scan
    /// would, in a segment of several marks, both as written and as
    /// recovered after a reopen.
    #[test]
    fn a_reader_starts_from_marks_and_misses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Retention {
            max_events: 1 << 20,
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            fsync: FsyncPolicy::Never,
            fsync_interval: Duration::from_millis(10),
        };
        let (opened, _) = open_collect(tmp.path(), 3, r);
        let opened = opened.unwrap();
        // About 3.6 MiB: shard 2 writes rarely, so its records sit far
        // apart, across marks.
        let mut heads = [0u64; 3];
        for round in 0..300u64 {
            for (shard, n) in [(0u32, 40u64), (1, 25), (2, (round % 7 == 0) as u64)] {
                if n > 0 {
                    write(&opened.wal, shard, heads[shard as usize] + 1, n);
                    heads[shard as usize] += n;
                }
            }
        }
        let check = |readers: &[DiskReader]| {
            let marks = readers[0].index.read().segments[0].marks.len();
            assert!(marks >= 3, "{marks} marks");
            for (shard, head) in heads.iter().enumerate() {
                for after in [0, 1, head / 3, head / 2, head - 2] {
                    let mut got = Vec::new();
                    let mut from = after;
                    while from < *head {
                        let chunk = readers[shard]
                            .read(from, head + 1, 100, usize::MAX)
                            .unwrap()
                            .unwrap();
                        assert!(!chunk.is_empty(), "shard {shard} after {from}");
                        from = chunk.last().unwrap().0;
                        got.extend(chunk.into_iter().map(|(seq, e)| {
                            assert_eq!(e.version, seq);
                            seq
                        }));
                    }
                    assert_eq!(got, (after + 1..=*head).collect::<Vec<_>>());
                }
            }
        };
        check(&opened.readers);
        close(opened);
        let (again, _) = open_collect(tmp.path(), 3, r);
        check(&again.unwrap().readers);
    }

    #[test]
    fn a_second_hub_cannot_take_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (held, _) = open_collect(tmp.path(), 1, retention());
        let _held = held.unwrap();
        assert!(matches!(
            open_collect(tmp.path(), 1, retention()).0,
            Err(OpenError::Locked { .. })
        ));
    }

    #[test]
    fn the_directory_stays_locked_while_its_writer_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let Opened { wal, dir, .. } = open_collect(tmp.path(), 1, retention()).0.unwrap();
        // The hub let go of the directory; its writer has not stopped.
        drop(dir);
        assert!(matches!(
            open_collect(tmp.path(), 1, retention()).0,
            Err(OpenError::Locked { .. })
        ));
        // Once the writer has stopped, the directory is free.
        drop(wal);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match open_collect(tmp.path(), 1, retention()).0 {
                Ok(_) => break,
                Err(OpenError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn another_shard_count_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        close(open_collect(tmp.path(), 4, retention()).0.unwrap());
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
    fn retention_drops_whole_old_segments_and_heads_survive_it() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Retention {
            max_events: 50,
            ..retention()
        };
        let (opened, _) = open_collect(tmp.path(), 2, r);
        let opened = opened.unwrap();
        // Shard 1's only records go out with the oldest segments.
        write(&opened.wal, 1, 1, 3);
        for i in 0..20 {
            write(&opened.wal, 0, 1 + i * 10, 10);
        }
        assert!(opened.readers[0].first_seq() > 1);
        assert_eq!(opened.readers[1].first_seq(), 4, "nothing left: head + 1");
        // What retention dropped cannot be read back.
        assert!(
            opened.readers[1]
                .read(0, 1000, 10, usize::MAX)
                .unwrap()
                .is_none()
        );
        close(opened);
        let (again, got) = open_collect(tmp.path(), 2, r);
        assert_eq!(
            again.unwrap().heads,
            vec![200, 3],
            "heads come from the heads record"
        );
        assert!(!got.records.contains_key(&1));
    }

    /// A new log of 2 shards whose segments are written ahead with 64 KiB,
    /// and its epoch.
    fn open_ahead(dir: &Path) -> (Opened, u64, Retention) {
        let r = Retention {
            segment_bytes: 64 << 10,
            ..retention()
        };
        let opened = open_collect(dir, 2, r).0.unwrap();
        let epoch = opened.epoch;
        (opened, epoch, r)
    }

    /// Bytes of records at the start of a segment file, up to its zeros.
    fn written(data: &[u8]) -> usize {
        let mut at = 0;
        while at < data.len() && !data[at..].iter().all(|b| *b == 0) {
            at = read_any(data, at, 2).unwrap().1;
        }
        at
    }

    #[test]
    fn the_log_writes_into_segments_written_ahead_and_reads_their_zeros_as_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, epoch, r) = open_ahead(tmp.path());
        write(&opened.wal, 1, 1, 10);
        close(opened);
        let seg = segment_path(&tmp.path().join("wal"), 0);
        let data = fs::read(&seg).unwrap();
        // A new log's first segment is written ahead before it serves.
        assert_eq!(data.len(), 64 << 10, "the segment is the one written ahead");
        let end = written(&data);
        assert!(end > 0 && end < data.len(), "records, then zeros");

        let (again, got) = open_collect(tmp.path(), 2, r);
        let again = again.unwrap();
        assert_eq!((again.epoch, again.new_epoch), (epoch, false));
        assert_eq!(again.heads, vec![0, 10]);
        assert_eq!(got.records[&1].len(), 10);
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            64 << 10,
            "zeros are not a torn tail: nothing is cut"
        );
        // Appends go on into the zeros, and a reader stops where they end.
        write(&again.wal, 1, 11, 10);
        write(&again.wal, 0, 1, 3);
        let read = again.readers[1].read(0, u64::MAX, 100, 1 << 20).unwrap();
        assert_eq!(read.map(|r| r.len()), Some(20));
        close(again);
        assert!(written(&fs::read(&seg).unwrap()) > end);
        let (third, got) = open_collect(tmp.path(), 2, r);
        assert_eq!(third.unwrap().heads, vec![3, 20]);
        let seqs: Vec<u64> = got.records[&1].iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_record_before_the_zeros_is_cut_off_and_the_epoch_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, epoch, r) = open_ahead(tmp.path());
        write(&opened.wal, 0, 1, 5);
        close(opened);
        let seg = segment_path(&tmp.path().join("wal"), 0);
        let mut data = fs::read(&seg).unwrap();
        let end = written(&data);
        // A write the crash cut short: a header announcing 200 bytes, a
        // few of them, then the zeros written ahead.
        data[end..end + 7].copy_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
        fs::write(&seg, &data).unwrap();

        let (again, got) = open_collect(tmp.path(), 2, r);
        let again = again.unwrap();
        assert_eq!((again.epoch, again.new_epoch), (epoch, false));
        assert_eq!(again.heads, vec![5, 0]);
        assert_eq!(got.records[&0].len(), 5);
        assert_eq!(fs::metadata(&seg).unwrap().len() as usize, end);
        // The log goes on where the torn record began.
        write(&again.wal, 0, 6, 1);
        close(again);
        let (third, _) = open_collect(tmp.path(), 2, r);
        assert_eq!(third.unwrap().heads, vec![6, 0]);
    }

    /// Power lost while a group written into a segment written ahead was
    /// not flushed: a later page of it reached the disk, an earlier one did
    /// not (zeros). The unanswered group is a torn tail, not corruption.
    #[test]
    fn a_group_torn_by_an_unwritten_page_is_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let (opened, epoch, r) = open_ahead(tmp.path());
        write(&opened.wal, 0, 1, 5);
        write(&opened.wal, 1, 1, 300);
        close(opened);
        let seg = segment_path(&tmp.path().join("wal"), 0);
        let mut data = fs::read(&seg).unwrap();
        let end = written(&data);
        assert!(end > 3 * PAGE, "the second group spans pages: {end}");
        data[PAGE..2 * PAGE].fill(0);
        fs::write(&seg, &data).unwrap();

        let (again, got) = open_collect(tmp.path(), 2, r);
        let again = again.unwrap();
        assert_eq!((again.epoch, again.new_epoch), (epoch, false));
        let kept = again.heads[1];
        assert_eq!(again.heads[0], 5);
        assert!(kept > 0 && kept < 300, "{kept}");
        let seqs: Vec<u64> = got.records[&1].iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=kept).collect::<Vec<_>>());
        assert!(fs::metadata(&seg).unwrap().len() < PAGE as u64);
        close(again);

        // Damage without such a page is still refused.
        let mut data = fs::read(&seg).unwrap();
        data[40] ^= 0xff;
        fs::write(&seg, &data).unwrap();
        let (refused, _) = open_collect(tmp.path(), 2, r);
        assert!(
            matches!(
                refused,
                Err(OpenError::Corrupt {
                    reason: Corruption::Checksum,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
}
