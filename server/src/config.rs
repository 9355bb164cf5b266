//! The hub's configuration: one typed struct, layered defaults < TOML file <
//! environment (`FRESHNESS_*`) < flags, validated before any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use freshness::limits;
use serde::{Deserialize, Serialize};

pub use crate::store::FsyncPolicy;

/// Everything the hub can be told. Every field has a default (SPEC §5), so an
/// empty file and no flags give a working hub on loopback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (`/metrics`).
    pub metrics_listen: SocketAddr,
    /// This hub's region; the origin of every event published here.
    pub region: String,
    /// Name of this hub in welcomes and status; defaults to the host name.
    pub hub_id: String,
    /// Shard count `S`: fixed for a deployment, equal in every region.
    pub shards: u32,
    /// Longest a caught-up node waits for a watermark (SPEC G4).
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// Most events retained in the log, split evenly over the shards.
    pub log_max_events: u64,
    /// Most bytes retained in the log, split evenly over the shards.
    pub log_max_bytes: u64,
    /// In-flight events per node when the node does not ask for a number,
    /// and the most a node may ask for is 8 times this.
    pub max_in_flight: u32,
    /// Most events in one publish call.
    pub max_events_per_publish: usize,
    /// Largest payload of one event.
    pub max_payload_bytes: usize,
    /// Largest gRPC message the hub decodes. `Subscribe` streams get at
    /// most `256 KiB + 22 B × shards` (`server::subscribe_message_limit`),
    /// which fits any hello or ack, so that no open stream keeps a buffer of
    /// this size.
    pub max_message_bytes: usize,
    /// Most connected subscribe streams (nodes and replicating hubs).
    pub max_nodes: usize,
    /// Most publish calls waiting for REGION / GLOBAL acks at once.
    pub max_ack_waiters: usize,
    /// Commands queued per shard actor before publishes are refused.
    pub shard_queue: usize,
    /// How long a publish waits for room in a full shard queue before it is
    /// refused with `UNAVAILABLE`.
    #[serde(with = "humantime_serde")]
    pub admission_timeout: Duration,
    /// How long shutdown waits for streams and calls to end.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Peer regions to replicate from: region name → hub URL.
    pub peers: BTreeMap<String, String>,
    /// `text` or `json` logs on stderr.
    pub log_format: LogFormat,
    /// OTLP/gRPC collector to export traces to (`http://host:4317`); unset,
    /// the standard `OTEL_EXPORTER_OTLP_ENDPOINT` decides (see `telemetry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Where the durable log lives (epoch, every shard's events): a restart
    /// on the same directory keeps the epoch, so no node is reset.
    pub data_dir: PathBuf,
    /// Keep the log in memory only: every start is a new epoch and resets
    /// every node (tests and benchmarks).
    pub ephemeral: bool,
    /// With a durable log: most events of the log's newest part kept in
    /// memory too (split evenly over the shards), from which sessions read;
    /// a node further behind is replayed from disk. At most `log_max_events`.
    pub memory_max_events: u64,
    /// With a durable log: most bytes kept in memory (see
    /// `memory_max_events`). At most `log_max_bytes`.
    pub memory_max_bytes: u64,
    /// When appended events are flushed to the disk: `always` (before a
    /// publish is answered, one flush per shard-actor drain), `interval`
    /// (at most `fsync_interval` later) or `never` (survives a process
    /// crash, not a machine crash).
    pub fsync: FsyncPolicy,
    /// The flush period of `fsync = "interval"`.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Start on a damaged log: keep each shard's longest valid prefix and
    /// begin a new epoch. A flag only (`--repair`), never kept in a file.
    #[serde(skip)]
    pub repair: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            region: "local".into(),
            hub_id: default_hub_id(),
            shards: limits::DEFAULT_SHARDS,
            progress_interval: Duration::from_millis(limits::DEFAULT_PROGRESS_INTERVAL_MS),
            log_max_events: 1 << 20,
            log_max_bytes: 256 << 20,
            max_in_flight: limits::DEFAULT_MAX_IN_FLIGHT,
            max_events_per_publish: limits::MAX_EVENTS_PER_PUBLISH,
            max_payload_bytes: limits::MAX_PAYLOAD_BYTES,
            max_message_bytes: limits::DEFAULT_MAX_MESSAGE_BYTES,
            max_nodes: 65_536,
            max_ack_waiters: 16_384,
            shard_queue: 1_024,
            admission_timeout: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(10),
            peers: BTreeMap::new(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            data_dir: PathBuf::from("freshness-data"),
            ephemeral: false,
            memory_max_events: 1 << 18,
            memory_max_bytes: 64 << 20,
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(100),
            repair: false,
        }
    }
}

fn default_hub_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "freshness-hub".into())
}

/// A configuration the hub refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct (unknown key, bad value).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words, on one line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().replace('\n', " "),
        })
    }

    /// Checks every value; the hub binds nothing before this passed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards == 0 || self.shards > 65_536 {
            return Err(invalid(
                "shards",
                format!("{} is not in 1..=65536", self.shards),
            ));
        }
        freshness::validate_namespace(&self.region).map_err(|_| {
            invalid(
                "region",
                format!("{:?} must match [a-z0-9][a-z0-9_.-]{{0,62}}", self.region),
            )
        })?;
        freshness::validate::node_id(&self.hub_id).map_err(|e| invalid("hub_id", e.to_string()))?;
        if self.progress_interval < Duration::from_millis(1)
            || self.progress_interval > Duration::from_secs(60)
        {
            return Err(invalid("progress_interval", "must be between 1ms and 60s"));
        }
        let s = u64::from(self.shards);
        if self.log_max_events < s {
            return Err(invalid(
                "log_max_events",
                format!(
                    "{} is fewer than one event per shard ({s} shards)",
                    self.log_max_events
                ),
            ));
        }
        if self.log_max_bytes / s < 64 * 1024 + 1024 {
            return Err(invalid(
                "log_max_bytes",
                format!(
                    "{} leaves less than one maximal event (65 KiB) per shard",
                    self.log_max_bytes
                ),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("max_in_flight", "must be at least 1"));
        }
        if self.max_events_per_publish == 0 || self.max_events_per_publish > 1_000_000 {
            return Err(invalid("max_events_per_publish", "must be in 1..=1000000"));
        }
        if self.max_payload_bytes > 16 << 20 {
            return Err(invalid("max_payload_bytes", "must be at most 16 MiB"));
        }
        if self.max_message_bytes < 64 * 1024 {
            return Err(invalid("max_message_bytes", "must be at least 64 KiB"));
        }
        for (key, v) in [
            ("max_nodes", self.max_nodes),
            ("max_ack_waiters", self.max_ack_waiters),
            ("shard_queue", self.shard_queue),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (region, url) in &self.peers {
            freshness::validate_namespace(region).map_err(|_| {
                invalid(
                    "peers",
                    format!("peer region {region:?} is not a valid name"),
                )
            })?;
            if region == &self.region {
                return Err(invalid(
                    "peers",
                    format!("peer {region:?} is this hub's own region"),
                ));
            }
            validate_url(url)
                .map_err(|reason| invalid("peers", format!("peer {region}: {reason}")))?;
        }
        if let Some(url) = &self.otlp_endpoint {
            validate_url(url).map_err(|reason| invalid("otlp_endpoint", reason))?;
        }
        if !self.ephemeral && self.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                "is empty; give a directory, or --ephemeral for a log in memory only",
            ));
        }
        if self.memory_max_events < s {
            return Err(invalid(
                "memory_max_events",
                format!(
                    "{} is fewer than one event per shard ({s} shards)",
                    self.memory_max_events
                ),
            ));
        }
        if self.memory_max_bytes / s < 64 * 1024 + 1024 {
            return Err(invalid(
                "memory_max_bytes",
                format!(
                    "{} leaves less than one maximal event (65 KiB) per shard",
                    self.memory_max_bytes
                ),
            ));
        }
        if self.fsync_interval < Duration::from_millis(1)
            || self.fsync_interval > Duration::from_secs(60)
        {
            return Err(invalid("fsync_interval", "must be between 1ms and 60s"));
        }
        Ok(())
    }

    /// How each shard's log on disk is bounded: the same share of
    /// `log_max_events` and `log_max_bytes` as in memory, in segments of a
    /// quarter of that (at least 64 KiB), so that retention drops a
    /// quarter at a time.
    pub fn retention(&self) -> crate::store::Retention {
        let max_bytes = self.log_bytes_per_shard() as u64;
        crate::store::Retention {
            max_events: self.log_events_per_shard() as u64,
            max_bytes,
            segment_bytes: (max_bytes / 4).max(64 * 1024),
        }
    }

    /// Retained events per shard.
    pub fn log_events_per_shard(&self) -> usize {
        usize::try_from(self.log_max_events / u64::from(self.shards)).unwrap_or(usize::MAX)
    }

    /// Retained bytes per shard.
    pub fn log_bytes_per_shard(&self) -> usize {
        usize::try_from(self.log_max_bytes / u64::from(self.shards)).unwrap_or(usize::MAX)
    }

    /// An empty shard's memory whose next seq is `first_seq`: its in-memory
    /// log bounded as configured, and its newest-version memory covering
    /// the retained log (in memory, or on disk) plus as many entities again
    /// (see `shard`).
    pub fn shard_memory(&self, first_seq: u64) -> crate::shard::ShardMemory {
        crate::shard::ShardMemory::new(
            first_seq,
            self.memory_events_per_shard(),
            self.memory_bytes_per_shard(),
            self.log_events_per_shard(),
        )
    }

    /// Events per shard kept in memory: the whole retained log when
    /// ephemeral, its newest part when durable.
    pub fn memory_events_per_shard(&self) -> usize {
        let events = if self.ephemeral {
            self.log_max_events
        } else {
            self.memory_max_events.min(self.log_max_events)
        };
        usize::try_from(events / u64::from(self.shards)).unwrap_or(usize::MAX)
    }

    /// Bytes per shard kept in memory (see [`Self::memory_events_per_shard`]).
    pub fn memory_bytes_per_shard(&self) -> usize {
        let bytes = if self.ephemeral {
            self.log_max_bytes
        } else {
            self.memory_max_bytes.min(self.log_max_bytes)
        };
        usize::try_from(bytes / u64::from(self.shards)).unwrap_or(usize::MAX)
    }
}

fn validate_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("address {url:?} must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("address {url:?} has no port"))?;
    if host.is_empty() {
        return Err(format!("address {url:?} has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("address {url:?} has an invalid port"))?;
    Ok(())
}

/// Command-line flags; each also reads a `FRESHNESS_*` variable. Anything not
/// given falls back to the file, then the defaults.
#[derive(Debug, Parser)]
#[command(name = "freshness-hub", version, about = "The Freshness regional hub")]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "FRESHNESS_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "FRESHNESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Metrics listen address [default: 127.0.0.1:9464].
    #[arg(long, env = "FRESHNESS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// This hub's region [default: local].
    #[arg(long, env = "FRESHNESS_REGION")]
    pub region: Option<String>,
    /// Name of this hub [default: the host name].
    #[arg(long, env = "FRESHNESS_HUB_ID")]
    pub hub_id: Option<String>,
    /// Shard count, equal in every region [default: 64].
    #[arg(long, env = "FRESHNESS_SHARDS")]
    pub shards: Option<u32>,
    /// Progress interval, e.g. 250ms [default: 250ms].
    #[arg(long, env = "FRESHNESS_PROGRESS_INTERVAL", value_parser = humantime::parse_duration)]
    pub progress_interval: Option<Duration>,
    /// Most events retained in the log [default: 1048576].
    #[arg(long, env = "FRESHNESS_LOG_MAX_EVENTS")]
    pub log_max_events: Option<u64>,
    /// Most bytes retained in the log [default: 268435456].
    #[arg(long, env = "FRESHNESS_LOG_MAX_BYTES")]
    pub log_max_bytes: Option<u64>,
    /// Default in-flight events per node [default: 8192].
    #[arg(long, env = "FRESHNESS_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<u32>,
    /// Most events per publish call [default: 10000].
    #[arg(long, env = "FRESHNESS_MAX_EVENTS_PER_PUBLISH")]
    pub max_events_per_publish: Option<usize>,
    /// Largest event payload in bytes [default: 65536].
    #[arg(long, env = "FRESHNESS_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Largest gRPC message in bytes [default: 4194304].
    #[arg(long, env = "FRESHNESS_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Most connected subscribe streams [default: 65536].
    #[arg(long, env = "FRESHNESS_MAX_NODES")]
    pub max_nodes: Option<usize>,
    /// Shutdown grace period, e.g. 10s [default: 10s].
    #[arg(long, env = "FRESHNESS_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// A peer region, REGION=URL; repeatable. Env: comma-separated list.
    #[arg(long = "peer", env = "FRESHNESS_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    pub peers: Vec<(String, String)>,
    /// Log format [default: text].
    #[arg(long, env = "FRESHNESS_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC collector for traces, e.g. http://localhost:4317 [default:
    /// OTEL_EXPORTER_OTLP_ENDPOINT, else no export].
    #[arg(long, env = "FRESHNESS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Directory of the durable log [default: freshness-data].
    #[arg(long, env = "FRESHNESS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep the log in memory only (every start is a new epoch).
    #[arg(long, env = "FRESHNESS_EPHEMERAL")]
    pub ephemeral: bool,
    /// Events of a durable log also kept in memory [default: 262144].
    #[arg(long, env = "FRESHNESS_MEMORY_MAX_EVENTS")]
    pub memory_max_events: Option<u64>,
    /// Bytes of a durable log also kept in memory [default: 67108864].
    #[arg(long, env = "FRESHNESS_MEMORY_MAX_BYTES")]
    pub memory_max_bytes: Option<u64>,
    /// When appends are flushed to disk: always, interval, never [default: always].
    #[arg(long, env = "FRESHNESS_FSYNC")]
    pub fsync: Option<FsyncPolicy>,
    /// Flush period with --fsync interval, e.g. 100ms [default: 100ms].
    #[arg(long, env = "FRESHNESS_FSYNC_INTERVAL", value_parser = humantime::parse_duration)]
    pub fsync_interval: Option<Duration>,
    /// Start on a damaged log: keep the valid prefix, begin a new epoch.
    #[arg(long)]
    pub repair: bool,
}

fn parse_peer(s: &str) -> Result<(String, String), String> {
    let (region, url) = s
        .split_once('=')
        .ok_or_else(|| format!("peer {s:?} must be REGION=URL"))?;
    Ok((region.trim().to_owned(), url.trim().to_owned()))
}

impl Args {
    /// Layers defaults < file < environment and flags, then validates.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        over!(
            listen,
            metrics_listen,
            region,
            hub_id,
            shards,
            progress_interval,
            log_max_events,
            log_max_bytes,
            max_in_flight,
            max_events_per_publish,
            max_payload_bytes,
            max_message_bytes,
            max_nodes,
            shutdown_grace,
            log_format,
            data_dir,
            fsync,
            fsync_interval,
            memory_max_events,
            memory_max_bytes
        );
        c.ephemeral |= self.ephemeral;
        c.repair = self.repair;
        if !self.peers.is_empty() {
            c.peers = self.peers.into_iter().collect();
        }
        if let Some(e) = self.otlp_endpoint.filter(|e| !e.trim().is_empty()) {
            c.otlp_endpoint = Some(e);
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_spec() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.shards, 64);
        assert_eq!(c.progress_interval, Duration::from_millis(250));
        assert_eq!(
            (c.log_max_events, c.log_max_bytes),
            (1_048_576, 268_435_456)
        );
        assert_eq!(c.max_in_flight, 8_192);
        assert_eq!(c.log_events_per_shard(), 16_384);
    }

    #[test]
    fn file_rejects_unknown_keys_and_parses_durations() {
        let c: Config = toml::from_str(
            "shards = 8\nprogress_interval = \"100ms\"\n[peers]\neu = \"http://h:1\"\n",
        )
        .unwrap();
        assert_eq!(
            (c.shards, c.progress_interval),
            (8, Duration::from_millis(100))
        );
        assert_eq!(c.peers["eu"], "http://h:1");
        assert!(toml::from_str::<Config>("shard = 8").is_err());
    }

    #[test]
    fn invalid_values_name_the_key() {
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.shards = 0).starts_with("invalid setting `shards`"));
        assert!(bad(|c| c.region = "EU".into()).starts_with("invalid setting `region`"));
        assert!(
            bad(|c| {
                c.peers.insert("eu".into(), "localhost:1".into());
            })
            .contains("must start with http://")
        );
        assert!(bad(|c| c.log_max_events = 1).starts_with("invalid setting `log_max_events`"));
        assert!(
            bad(|c| c.otlp_endpoint = Some("collector:4317".into()))
                .starts_with("invalid setting `otlp_endpoint`")
        );
    }

    #[test]
    fn flags_override_file_and_defaults() {
        let args =
            Args::try_parse_from(["freshness-hub", "--shards", "16", "--peer", "eu=http://a:1"])
                .unwrap();
        let c = args.into_config().unwrap();
        assert_eq!(c.shards, 16);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.otlp_endpoint, None);
        let args =
            Args::try_parse_from(["freshness-hub", "--otlp-endpoint", "http://collector:4317"])
                .unwrap();
        assert_eq!(
            args.into_config().unwrap().otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
    }
}
