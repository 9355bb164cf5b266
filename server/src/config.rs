//! The hub's configuration: one typed struct, layered defaults < TOML file <
//! environment (`FRESHNESS_*`) < flags, validated before any port is bound.
//!
//! Every error names where the value came from ([`Origin`]: the file and
//! line, the environment variable or the flag), the key, the value and what
//! is expected, on one line (SPEC §4); an unknown key names the nearest known
//! one.

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
    /// How many actors own the shards (shard `s` belongs to actor
    /// `s % shard_actors`); `0`, the default, is one per core the process
    /// may use, at most `shards`. A publish is one command per actor its
    /// events reach, so fewer actors are fewer hand-offs (and, with a
    /// durable log, fewer drains for the log's writer); more spread the
    /// deciding over more cores. A JetStream replica runs one actor per
    /// shard whatever this says: each shard appends to its own subject.
    pub shard_actors: u32,
    /// How long a publish waits for room in a full shard queue before it is
    /// refused with `UNAVAILABLE`.
    #[serde(with = "humantime_serde")]
    pub admission_timeout: Duration,
    /// How long shutdown waits for streams and calls to end.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// HTTP/2 keep-alive: a connection the hub has heard nothing from for
    /// this long is pinged...
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// ...and closed (its streams freed) when the ping's answer takes
    /// longer than this.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Peer regions to replicate from: region name → hub URL, or the URLs
    /// of the region's hub replicas, comma-separated (the link tries them in
    /// turn; see [`Config::peer_urls`]).
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
    /// crash, not a machine crash; with these two, a start after a machine
    /// crash that followed an unclean stop begins a new epoch, see `store`).
    pub fsync: FsyncPolicy,
    /// The flush period of `fsync = "interval"`.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Start on a damaged log: keep each shard's longest valid prefix and
    /// begin a new epoch. A flag only (`--repair`), never kept in a file.
    #[serde(skip)]
    pub repair: bool,
    /// The listener's certificate chain (PEM): with `tls_key`, the hub
    /// serves gRPC over TLS only. Reloaded when the file changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to (mTLS): a client
    /// without one is refused at the handshake, and a certificate's URI
    /// (else DNS) SAN is its principal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// CA (PEM) of the `https://` peers; this hub's own certificate is its
    /// client certificate on those links.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_ca: Option<PathBuf>,
    /// JWKS file (RS256, ES256, EdDSA keys) that bearer JWTs must verify
    /// against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_jwks: Option<PathBuf>,
    /// What a JWT's `aud` must hold.
    pub auth_audience: String,
    /// Static token file: `NAME SHA256-HEX` per line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_tokens: Option<PathBuf>,
    /// Policy file (TOML, or YAML by its extension) granting principals
    /// `publish:<ns>`, `subscribe:<ns>`, `status`, `replicate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_policy: Option<PathBuf>,
    /// Serve on a non-loopback address without TLS or without an auth
    /// source. Without it such a hub refuses to start.
    pub insecure: bool,
    /// The metrics listener's certificate chain (PEM): with
    /// `metrics_tls_key`, `/metrics` and the status page are served over
    /// TLS. Reloaded when the file changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_tls_cert: Option<PathBuf>,
    /// The private key of `metrics_tls_cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_tls_key: Option<PathBuf>,
    /// Where the log lives: `embedded` (the write-ahead log in `data_dir`,
    /// or memory with `ephemeral`) or `jetstream` (a NATS JetStream stream
    /// that every hub replica of the region shares).
    pub log: LogBackend,
    /// NATS servers of the JetStream log, comma-separated
    /// (`nats://host:4222,nats://other:4222`; user and password may be
    /// given in the URL, `tls://` for TLS).
    pub nats_url: String,
    /// NATS credentials file (JWT and NKey seed) for the JetStream log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_creds: Option<PathBuf>,
    /// Copies JetStream keeps of the region's stream (R), 1 to 5.
    pub jetstream_replicas: usize,
}

/// Where the hub keeps its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// The write-ahead log in `data_dir` (or memory with `ephemeral`).
    #[default]
    Embedded,
    /// A NATS JetStream stream shared by the region's hub replicas.
    #[value(name = "jetstream")]
    #[serde(rename = "jetstream")]
    JetStream,
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
            shard_actors: 0,
            admission_timeout: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
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
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            peer_ca: None,
            auth_jwks: None,
            auth_audience: "freshness".into(),
            auth_tokens: None,
            auth_policy: None,
            insecure: false,
            metrics_tls_cert: None,
            metrics_tls_key: None,
            log: LogBackend::Embedded,
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_creds: None,
            jetstream_replicas: 1,
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

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A line of the TOML file.
    File {
        /// The file.
        path: PathBuf,
        /// Its line, from 1.
        line: usize,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default setting"),
            Self::File { path, line } => write!(f, "config file {}, line {line}", path.display()),
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
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
    /// The file is not TOML at all (no key to name).
    #[error("config file {path}, line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// The parser's words, on one line.
        message: String,
    },
    /// A key the hub does not know.
    #[error("{origin}: {key} = {value}: unknown key{}", nearest.map(|n| format!(" (did you mean {n}?)")).unwrap_or_default())]
    Unknown {
        /// Where it was given.
        origin: Origin,
        /// The key.
        key: String,
        /// Its value as given.
        value: String,
        /// The known key nearest to it, if any is near.
        nearest: Option<&'static str>,
    },
    /// A value of the wrong type or out of range.
    #[error("{}{key} = {value}: expected {expected}", origin.as_ref().map(|o| format!("{o}: ")).unwrap_or_else(|| "invalid setting ".into()))]
    Invalid {
        /// Where it came from (`None` for a config built in code).
        origin: Option<Origin>,
        /// The setting.
        key: String,
        /// Its value, as TOML.
        value: String,
        /// What is expected.
        expected: String,
    },
    /// Command-line arguments that name no setting (an unknown flag).
    #[error("{0}")]
    Args(String),
    /// A non-loopback listener without TLS or without an auth source.
    #[error(
        "listen = {listen} is not a loopback address and the hub has {missing}: set them, or --insecure to serve anyway"
    )]
    Insecure {
        /// The listen address.
        listen: SocketAddr,
        /// What is missing, in words.
        missing: &'static str,
    },
}

/// A value that fails validation; the value and its origin are filled in
/// by [`Config::validate`] and [`Args::into_config`].
fn invalid(key: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: None,
        key: key.to_owned(),
        value: String::new(),
        expected: expected.into(),
    }
}

/// Every key of the file, with what its value must be (also the words of
/// a type error from any source).
const KEYS: &[(&str, &str)] = &[
    ("listen", "an address like 127.0.0.1:50051"),
    ("metrics_listen", "an address like 127.0.0.1:9464"),
    (
        "region",
        "a region name like eu-west: [a-z0-9][a-z0-9_.-]{0,62}",
    ),
    (
        "hub_id",
        "a name of 1 to 256 bytes without control characters",
    ),
    ("shards", "a whole number from 1 to 65536"),
    (
        "progress_interval",
        "a duration from 1ms to 60s, like 250ms",
    ),
    (
        "log_max_events",
        "a whole number of events, at least one per shard",
    ),
    (
        "log_max_bytes",
        "a number of bytes, at least 65 KiB per shard",
    ),
    (
        "memory_max_events",
        "a whole number of events, at least one per shard",
    ),
    (
        "memory_max_bytes",
        "a number of bytes, at least 65 KiB per shard",
    ),
    ("max_in_flight", "a whole number of events, at least 1"),
    ("max_events_per_publish", "a whole number from 1 to 1000000"),
    ("max_payload_bytes", "a number of bytes, at most 16 MiB"),
    ("max_message_bytes", "a number of bytes, at least 64 KiB"),
    ("max_nodes", "a whole number, at least 1"),
    ("max_ack_waiters", "a whole number, at least 1"),
    ("shard_queue", "a whole number, at least 1"),
    (
        "shard_actors",
        "0 (one per core) or a whole number up to shards",
    ),
    ("admission_timeout", "a duration like 250ms"),
    ("shutdown_grace", "a duration like 10s"),
    ("keepalive_interval", "a duration from 10ms to 1h, like 20s"),
    ("keepalive_timeout", "a duration from 10ms to 1h, like 10s"),
    (
        "peers",
        "a table of region = \"http://host:port\" entries (several URLs, comma-separated, for a region of hub replicas)",
    ),
    ("log_format", "text or json"),
    ("otlp_endpoint", "a URL like http://localhost:4317"),
    ("data_dir", "a directory path"),
    ("ephemeral", "true or false"),
    ("fsync", "always, interval or never"),
    ("fsync_interval", "a duration from 1ms to 60s, like 100ms"),
    (
        "tls_cert",
        "a PEM certificate file, set together with tls_key",
    ),
    (
        "tls_key",
        "a PEM private key file, set together with tls_cert",
    ),
    (
        "tls_client_ca",
        "a PEM CA file (needs tls_cert and tls_key)",
    ),
    ("peer_ca", "a PEM CA file for the https:// peers"),
    ("auth_jwks", "a JWKS file (JSON)"),
    ("auth_audience", "a non-empty audience name"),
    ("auth_tokens", "a token file (NAME SHA256-HEX per line)"),
    (
        "auth_policy",
        "a policy file (TOML, or YAML ending in .yaml)",
    ),
    ("insecure", "true or false"),
    (
        "metrics_tls_cert",
        "a PEM certificate file, set together with metrics_tls_key",
    ),
    (
        "metrics_tls_key",
        "a PEM private key file, set together with metrics_tls_cert",
    ),
    ("log", "embedded or jetstream"),
    (
        "nats_url",
        "NATS URLs like nats://127.0.0.1:4222, comma-separated",
    ),
    ("nats_creds", "a NATS credentials file path"),
    ("jetstream_replicas", "a whole number from 1 to 5"),
];

/// What `key`'s value must be.
fn expected(key: &str) -> &'static str {
    let top = key.split('.').next().unwrap_or(key);
    KEYS.iter()
        .find(|(k, _)| *k == top)
        .map_or("a valid value", |(_, e)| e)
}

/// The known key nearest to `key` (edit distance at most a third of its
/// length, at least 2), for a misspelt key.
fn nearest_key(key: &str) -> Option<&'static str> {
    let limit = (key.len() / 3).max(2);
    KEYS.iter()
        .map(|(k, _)| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Where each top-level key of a TOML file is given: its line (a table's
/// header line for the table). A line scan, enough for a flat config file.
fn key_lines(text: &str) -> BTreeMap<String, usize> {
    let mut lines = BTreeMap::new();
    let mut in_table = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let key = if let Some(header) = line.strip_prefix('[') {
            in_table = true;
            header.trim_start_matches('[').split([']', '.']).next()
        } else if in_table {
            None
        } else {
            line.split(['=', '.']).next()
        };
        if let Some(key) = key {
            let key = key.trim().trim_matches(['"', '\'']).to_owned();
            lines.entry(key).or_insert(i + 1);
        }
    }
    lines
}

/// The line (from 1) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The key a TOML parse error is about: from an `unknown field` message,
/// else the `key =` in front of the value the error points at (under the
/// table whose header is above it).
fn key_at(text: &str, message: &str, span: &std::ops::Range<usize>) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let before = &text[line_start..start];
    let key = before.split('=').next()?.trim().trim_matches(['"', '\'']);
    if key.is_empty() || !before.contains('=') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find_map(|l| l.strip_prefix('[').map(|h| h.trim_end_matches(']').trim()));
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// The text of the value a TOML parse error points at, on one line.
fn value_at(text: &str, span: &std::ops::Range<usize>) -> String {
    let v = text.get(span.clone()).unwrap_or_default().trim();
    let v = v.lines().next().unwrap_or_default();
    if v.is_empty() {
        "?".into()
    } else {
        v.to_owned()
    }
}

impl ConfigError {
    /// Fills in the value of an [`Invalid`](Self::Invalid) error from the
    /// configuration that failed.
    fn with_value(mut self, config: &Config) -> Self {
        if let Self::Invalid { key, value, .. } = &mut self
            && value.is_empty()
        {
            *value = config.value_of(key);
        }
        self
    }

    /// Names where the offending value came from.
    fn with_origin(mut self, origins: &BTreeMap<String, Origin>) -> Self {
        if let Self::Invalid { origin, key, .. } = &mut self
            && origin.is_none()
        {
            let top = key.split('.').next().unwrap_or(key);
            *origin = Some(origins.get(top).cloned().unwrap_or(Origin::Default));
        }
        self
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file_with_lines(path).map(|(c, _)| c)
    }

    /// Reads a TOML file over the defaults; also where each key is given.
    fn from_file_with_lines(path: &Path) -> Result<(Self, BTreeMap<String, usize>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path).map(|c| (c, key_lines(&text)))
    }

    /// Parses TOML text (read from `path`) over the defaults.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        // Syntax first: a file that is not TOML has no key to name.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::Syntax {
                path: path.to_owned(),
                line: e.span().map_or(1, |s| line_of(text, s.start)),
                message: e.message().trim().replace('\n', " "),
            });
        }
        toml::from_str(text).map_err(|e| {
            let message = e.message().replace('\n', " ");
            let Some(span) = e.span() else {
                return ConfigError::Syntax {
                    path: path.to_owned(),
                    line: 1,
                    message,
                };
            };
            let origin = Origin::File {
                path: path.to_owned(),
                line: line_of(text, span.start),
            };
            let Some(key) = key_at(text, &message, &span) else {
                return ConfigError::Syntax {
                    path: path.to_owned(),
                    line: line_of(text, span.start),
                    message,
                };
            };
            if message.starts_with("unknown field") {
                // The error points at the key; its value follows the `=`.
                let line_end = text[span.end..]
                    .find('\n')
                    .map_or(text.len(), |i| span.end + i);
                let value = text[span.end..line_end]
                    .split_once('=')
                    .map_or("?", |(_, v)| v.trim())
                    .to_owned();
                return ConfigError::Unknown {
                    origin,
                    nearest: nearest_key(&key),
                    key,
                    value,
                };
            }
            ConfigError::Invalid {
                origin: Some(origin),
                value: value_at(text, &span),
                expected: expected(&key).to_owned(),
                key,
            }
        })
    }

    /// `key`'s value as TOML (`peers.eu` for one peer), for error messages.
    fn value_of(&self, key: &str) -> String {
        let Ok(toml::Value::Table(table)) = toml::Value::try_from(self) else {
            return "?".into();
        };
        let mut parts = key.split('.');
        let mut value = parts.next().and_then(|k| table.get(k));
        for p in parts {
            value = value.and_then(|v| v.get(p));
        }
        match value {
            Some(toml::Value::Table(t)) => toml::to_string(t)
                .map(|s| format!("{{ {} }}", s.trim().replace('\n', ", ")))
                .unwrap_or_else(|_| "?".into()),
            Some(v) => v.to_string(),
            None => "(unset)".into(),
        }
    }

    /// Checks every value; the hub binds nothing before this passed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|e| e.with_value(self))
    }

    fn check(&self) -> Result<(), ConfigError> {
        let s = u64::from(self.shards);
        if s == 0 || s > 65_536 {
            return Err(invalid("shards", expected("shards")));
        }
        freshness::validate_namespace(&self.region)
            .map_err(|_| invalid("region", expected("region")))?;
        freshness::validate::node_id(&self.hub_id)
            .map_err(|_| invalid("hub_id", expected("hub_id")))?;
        if self.progress_interval < Duration::from_millis(1)
            || self.progress_interval > Duration::from_secs(60)
        {
            return Err(invalid("progress_interval", expected("progress_interval")));
        }
        if self.log_max_events < s {
            return Err(invalid(
                "log_max_events",
                format!("at least one event per shard: {s} or more"),
            ));
        }
        if self.log_max_bytes / s < 64 * 1024 + 1024 {
            return Err(invalid(
                "log_max_bytes",
                format!(
                    "room for one maximal event (65 KiB) per shard: {} or more",
                    (64 * 1024 + 1024) * s
                ),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("max_in_flight", expected("max_in_flight")));
        }
        if self.shard_actors > self.shards {
            return Err(invalid(
                "shard_actors",
                format!(
                    "0 (one per core) or at most one per shard: {} or fewer, not {}",
                    self.shards, self.shard_actors
                ),
            ));
        }
        if self.max_events_per_publish == 0 || self.max_events_per_publish > 1_000_000 {
            return Err(invalid(
                "max_events_per_publish",
                expected("max_events_per_publish"),
            ));
        }
        if self.max_payload_bytes > 16 << 20 {
            return Err(invalid("max_payload_bytes", expected("max_payload_bytes")));
        }
        if self.max_message_bytes < 64 * 1024 {
            return Err(invalid("max_message_bytes", expected("max_message_bytes")));
        }
        for (key, v) in [
            ("max_nodes", self.max_nodes),
            ("max_ack_waiters", self.max_ack_waiters),
            ("shard_queue", self.shard_queue),
        ] {
            if v == 0 {
                return Err(invalid(key, expected(key)));
            }
        }
        for (region, urls) in &self.peers {
            let key = format!("peers.{region}");
            freshness::validate_namespace(region).map_err(|_| {
                invalid(
                    &key,
                    format!("a peer region name like eu-west, not {region:?}"),
                )
            })?;
            if region == &self.region {
                return Err(invalid(
                    &key,
                    format!("a region other than this hub's own ({region})"),
                ));
            }
            let urls = url_list(urls);
            if urls.is_empty() {
                return Err(invalid(&key, "at least one URL like http://host:port"));
            }
            for url in urls {
                validate_url(&url).map_err(|reason| invalid(&key, reason))?;
            }
        }
        if let Some(url) = &self.otlp_endpoint {
            validate_url(url).map_err(|reason| invalid("otlp_endpoint", reason))?;
        }
        if !self.ephemeral && self.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                "a directory (or --ephemeral for a log in memory only)",
            ));
        }
        if self.memory_max_events < s {
            return Err(invalid(
                "memory_max_events",
                format!("at least one event per shard: {s} or more"),
            ));
        }
        if self.memory_max_bytes / s < 64 * 1024 + 1024 {
            return Err(invalid(
                "memory_max_bytes",
                format!(
                    "room for one maximal event (65 KiB) per shard: {} or more",
                    (64 * 1024 + 1024) * s
                ),
            ));
        }
        if self.fsync_interval < Duration::from_millis(1)
            || self.fsync_interval > Duration::from_secs(60)
        {
            return Err(invalid("fsync_interval", expected("fsync_interval")));
        }
        if !(1..=5).contains(&self.jetstream_replicas) {
            return Err(invalid(
                "jetstream_replicas",
                expected("jetstream_replicas"),
            ));
        }
        if self.log == LogBackend::JetStream {
            let urls = self.nats_urls();
            if urls.is_empty() {
                return Err(invalid("nats_url", expected("nats_url")));
            }
            for url in &urls {
                url.parse::<async_nats::ServerAddr>().map_err(|e| {
                    invalid("nats_url", format!("{} ({url}: {e})", expected("nats_url")))
                })?;
            }
            if self.ephemeral {
                return Err(invalid(
                    "ephemeral",
                    "false with log = jetstream (the log is the region's stream)",
                ));
            }
        }
        for (key, d) in [
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                return Err(invalid(key, expected(key)));
            }
        }
        self.check_security()
    }

    /// TLS and auth settings that go together, and secure by default.
    fn check_security(&self) -> Result<(), ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(invalid("tls_key", expected("tls_key"))),
            (None, Some(_)) => return Err(invalid("tls_cert", expected("tls_cert"))),
            _ => {}
        }
        match (&self.metrics_tls_cert, &self.metrics_tls_key) {
            (Some(_), None) => {
                return Err(invalid("metrics_tls_key", expected("metrics_tls_key")));
            }
            (None, Some(_)) => {
                return Err(invalid("metrics_tls_cert", expected("metrics_tls_cert")));
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(invalid("tls_client_ca", expected("tls_client_ca")));
        }
        if self.auth_audience.trim().is_empty() {
            return Err(invalid("auth_audience", expected("auth_audience")));
        }
        if self.peer_ca.is_none()
            && let Some((region, _)) = self
                .peers
                .iter()
                .find(|(_, u)| url_list(u).iter().any(|u| u.starts_with("https://")))
        {
            return Err(invalid(
                "peer_ca",
                format!("a PEM CA file for the https:// peer {region}"),
            ));
        }
        if !self.insecure && !self.listen.ip().is_loopback() {
            let tls = self.tls_cert.is_some();
            let auth = self.auth_sources().enabled();
            let missing = match (tls, auth) {
                (true, true) => None,
                (false, true) => Some("no TLS (tls_cert, tls_key)"),
                (true, false) => Some("no auth source (auth_jwks, auth_tokens or tls_client_ca)"),
                (false, false) => Some(
                    "no TLS (tls_cert, tls_key) and no auth source (auth_jwks, auth_tokens or tls_client_ca)",
                ),
            };
            if let Some(missing) = missing {
                return Err(ConfigError::Insecure {
                    listen: self.listen,
                    missing,
                });
            }
        }
        Ok(())
    }

    /// Where the hub's credentials and policy come from.
    pub fn auth_sources(&self) -> crate::auth::Sources {
        crate::auth::Sources {
            jwks: self.auth_jwks.clone(),
            tokens: self.auth_tokens.clone(),
            policy: self.auth_policy.clone(),
            audience: vec![self.auth_audience.clone()],
            client_certificates: self.tls_client_ca.is_some(),
        }
    }

    /// The metrics listener's TLS files, when it serves TLS.
    pub fn metrics_tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.metrics_tls_cert.clone()?,
            key: self.metrics_tls_key.clone()?,
            client_ca: None,
        })
    }

    /// The listener's TLS files, when it serves TLS.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// How the log on disk is bounded and flushed: `log_max_events` and
    /// `log_max_bytes` in all, in segments of an eighth of the bytes (at
    /// least 256 KiB, at most 64 MiB), so that retention drops an eighth at
    /// a time and a start holds one segment in memory at a time.
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            max_events: self.log_max_events,
            max_bytes: self.log_max_bytes,
            segment_bytes: (self.log_max_bytes / 8).clamp(256 * 1024, 64 << 20),
            fsync: self.fsync,
            fsync_interval: self.fsync_interval,
        }
    }

    /// The NATS URLs of `nats_url`, trimmed, empty entries dropped.
    pub fn nats_urls(&self) -> Vec<String> {
        url_list(&self.nats_url)
    }

    /// The URLs of peer `region`'s hubs (one, or its replicas), in the order
    /// its link tries them.
    pub fn peer_urls(&self, region: &str) -> Vec<String> {
        self.peers
            .get(region)
            .map_or_else(Vec::new, |u| url_list(u))
    }

    /// How many shard actors to run: `shard_actors`, or one per core the
    /// process may use when it is 0 (`ShardActors::spawn` runs at most
    /// one per shard).
    pub fn actors(&self) -> usize {
        match self.shard_actors {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n as usize,
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

/// Checks a URL; the error says what is expected.
/// A comma-separated list of URLs, trimmed, empty entries dropped.
fn url_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

fn validate_url(url: &str) -> Result<(), String> {
    const WANT: &str =
        "a URL like http://host:port (starting with http:// or https://, with a host and a port)";
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or(WANT)?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').ok_or(WANT)?;
    if host.is_empty() {
        return Err(WANT.into());
    }
    port.parse::<u16>().map_err(|_| WANT)?;
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
    /// Actors that own the shards; 0 for one per core [default: 0].
    #[arg(long, env = "FRESHNESS_SHARD_ACTORS")]
    pub shard_actors: Option<u32>,
    /// Shutdown grace period, e.g. 10s [default: 10s].
    #[arg(long, env = "FRESHNESS_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// A peer region, REGION=URL; repeatable, and repeated with one region
    /// for each of its hub replicas. Env: comma-separated list.
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
    /// Serve gRPC over TLS with this certificate chain (PEM).
    #[arg(long, env = "FRESHNESS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FRESHNESS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mTLS.
    #[arg(long, env = "FRESHNESS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// CA (PEM) of the https:// peers.
    #[arg(long, env = "FRESHNESS_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// JWKS file that bearer JWTs must verify against.
    #[arg(long, env = "FRESHNESS_AUTH_JWKS")]
    pub auth_jwks: Option<PathBuf>,
    /// What a JWT's aud must hold [default: freshness].
    #[arg(long, env = "FRESHNESS_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// Static token file (NAME SHA256-HEX per line).
    #[arg(long, env = "FRESHNESS_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// Policy file (TOML or YAML) granting principals their permissions.
    #[arg(long, env = "FRESHNESS_AUTH_POLICY")]
    pub auth_policy: Option<PathBuf>,
    /// Serve on a non-loopback address without TLS or an auth source.
    #[arg(long, env = "FRESHNESS_INSECURE")]
    pub insecure: bool,
    /// Serve the metrics listener over TLS with this certificate (PEM).
    #[arg(long, env = "FRESHNESS_METRICS_TLS_CERT")]
    pub metrics_tls_cert: Option<PathBuf>,
    /// The private key of --metrics-tls-cert (PEM).
    #[arg(long, env = "FRESHNESS_METRICS_TLS_KEY")]
    pub metrics_tls_key: Option<PathBuf>,
    /// Where the log lives: embedded, jetstream [default: embedded]
    /// (`FRESHNESS_LOG` is the log filter, hence `FRESHNESS_LOG_BACKEND`).
    #[arg(long, env = "FRESHNESS_LOG_BACKEND")]
    pub log: Option<LogBackend>,
    /// NATS servers of the JetStream log, comma-separated [default:
    /// nats://127.0.0.1:4222].
    #[arg(long, env = "FRESHNESS_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS credentials file for the JetStream log.
    #[arg(long, env = "FRESHNESS_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// Copies JetStream keeps of the region's stream [default: 1].
    #[arg(long, env = "FRESHNESS_JETSTREAM_REPLICAS")]
    pub jetstream_replicas: Option<usize>,
}

fn parse_peer(s: &str) -> Result<(String, String), String> {
    let (region, url) = s
        .split_once('=')
        .ok_or_else(|| format!("peer {s:?} must be REGION=URL"))?;
    Ok((region.trim().to_owned(), url.trim().to_owned()))
}

impl Args {
    /// Parses `argv` (the program name first) and the environment, then
    /// layers and validates as [`into_config`](Self::into_config), naming
    /// each bad value's flag or variable. `Ok(Err(..))` is `--help` or
    /// `--version`: print it and exit 0.
    pub fn load<I, T>(argv: I) -> Result<Result<Config, clap::Error>, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
        let command = <Self as clap::CommandFactory>::command();
        let matches = match command.clone().try_get_matches_from(&argv) {
            Ok(m) => m,
            Err(e) if !e.use_stderr() => return Ok(Err(e)),
            Err(e) => return Err(clap_error(&command, &e, &argv)),
        };
        let args = <Self as clap::FromArgMatches>::from_arg_matches(&matches)
            .map_err(|e| clap_error(&command, &e, &argv))?;
        let mut origins = BTreeMap::new();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            let origin = match matches.value_source(id) {
                Some(clap::parser::ValueSource::CommandLine) => {
                    arg.get_long().map(|l| Origin::Flag(format!("--{l}")))
                }
                Some(clap::parser::ValueSource::EnvVariable) => arg
                    .get_env()
                    .map(|v| Origin::Env(v.to_string_lossy().into_owned())),
                _ => None,
            };
            if let Some(origin) = origin {
                origins.insert(id.to_owned(), origin);
            }
        }
        args.layer(origins).map(Ok)
    }

    /// Layers defaults < file < environment and flags, then validates. An
    /// invalid value set here is said to come from its flag.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        self.layer(BTreeMap::new())
    }

    /// [`into_config`](Self::into_config), with where each flag's value
    /// came from (flag or environment variable), by setting.
    fn layer(self, mut origins: BTreeMap<String, Origin>) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => {
                let (c, lines) = Config::from_file_with_lines(path)?;
                for (key, line) in lines {
                    origins.entry(key).or_insert(Origin::File {
                        path: path.clone(),
                        line,
                    });
                }
                c
            }
            None => Config::default(),
        };
        // A value given here came from its flag or its variable (`load`
        // knows which; without it, the flag is named).
        let mut given = |key: &str, flag: &str| {
            if !matches!(origins.get(key), Some(Origin::Flag(_) | Origin::Env(_))) {
                origins.insert(key.to_owned(), Origin::Flag(flag.to_owned()));
            }
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = self.$f {
                given(stringify!($f), &format!("--{}", stringify!($f).replace('_', "-")));
                c.$f = v;
            } )* };
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
            shard_actors,
            shutdown_grace,
            log_format,
            data_dir,
            fsync,
            fsync_interval,
            memory_max_events,
            memory_max_bytes,
            log,
            nats_url,
            jetstream_replicas
        );
        if self.nats_creds.is_some() {
            given("nats_creds", "--nats-creds");
            c.nats_creds = self.nats_creds;
        }
        if !self.peers.is_empty() {
            given("peers", "--peer");
        }
        if self.otlp_endpoint.is_some() {
            given("otlp_endpoint", "--otlp-endpoint");
        }
        if self.ephemeral {
            given("ephemeral", "--ephemeral");
        }
        macro_rules! over_opt {
            ($($f:ident),*) => { $( if let Some(v) = self.$f {
                given(stringify!($f), &format!("--{}", stringify!($f).replace('_', "-")));
                c.$f = Some(v);
            } )* };
        }
        over_opt!(
            tls_cert,
            tls_key,
            tls_client_ca,
            peer_ca,
            auth_jwks,
            auth_tokens,
            auth_policy,
            metrics_tls_cert,
            metrics_tls_key
        );
        if let Some(a) = self.auth_audience {
            given("auth_audience", "--auth-audience");
            c.auth_audience = a;
        }
        if self.insecure {
            given("insecure", "--insecure");
        }
        c.insecure |= self.insecure;
        c.ephemeral |= self.ephemeral;
        c.repair = self.repair;
        if !self.peers.is_empty() {
            // A region given more than once is a region of hub replicas.
            let mut peers: BTreeMap<String, String> = BTreeMap::new();
            for (region, url) in self.peers {
                let urls = peers.entry(region).or_default();
                if !urls.is_empty() {
                    urls.push(',');
                }
                urls.push_str(&url);
            }
            c.peers = peers;
        }
        if let Some(e) = self.otlp_endpoint.filter(|e| !e.trim().is_empty()) {
            c.otlp_endpoint = Some(e);
        }
        c.validate().map_err(|e| e.with_origin(&origins))?;
        Ok(c)
    }
}

/// A command-line or environment value clap refused, as one line naming
/// its flag or variable, the setting, the value and what is expected.
fn clap_error(
    command: &clap::Command,
    e: &clap::Error,
    argv: &[std::ffi::OsString],
) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let first_line = || {
        let text = e.to_string();
        let line = text
            .lines()
            .next()
            .unwrap_or("invalid arguments")
            .to_owned();
        ConfigError::Args(line.trim_start_matches("error: ").to_owned())
    };
    let (Some(flag), Some(value)) = (
        context(ContextKind::InvalidArg),
        context(ContextKind::InvalidValue),
    ) else {
        return first_line();
    };
    let long = flag
        .split([' ', '='])
        .next()
        .unwrap_or_default()
        .trim_start_matches('-')
        .to_owned();
    let Some(arg) = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
    else {
        return first_line();
    };
    let key = arg.get_id().as_str().to_owned();
    let on_command_line = argv.iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")))
    });
    let origin = match arg.get_env() {
        Some(var) if !on_command_line => Origin::Env(var.to_string_lossy().into_owned()),
        _ => Origin::Flag(format!("--{long}")),
    };
    ConfigError::Invalid {
        origin: Some(origin),
        value: format!("{value:?}"),
        expected: expected(&key).to_owned(),
        key,
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
    fn invalid_values_name_the_key_the_value_and_what_is_expected() {
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert_eq!(
            bad(|c| c.shards = 0),
            "invalid setting shards = 0: expected a whole number from 1 to 65536"
        );
        assert!(bad(|c| c.region = "EU".into()).starts_with("invalid setting region = \"EU\""));
        assert!(
            bad(|c| {
                c.peers.insert("eu".into(), "localhost:1".into());
            })
            .starts_with("invalid setting peers.eu = \"localhost:1\": expected a URL")
        );
        assert!(bad(|c| c.log_max_events = 1).starts_with("invalid setting log_max_events = 1"));
        assert_eq!(
            bad(|c| c.shard_actors = 65),
            "invalid setting shard_actors = 65: expected 0 (one per core) or at most one per shard: 64 or fewer, not 65"
        );
        assert!(
            bad(|c| c.otlp_endpoint = Some("collector:4317".into()))
                .starts_with("invalid setting otlp_endpoint = \"collector:4317\"")
        );
    }

    #[test]
    fn file_errors_name_the_line_the_key_and_the_nearest_known_key() {
        let err = |text: &str| {
            Config::from_toml(text, Path::new("hub.toml"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("shards = 8\n\nmetrics_listen = \"nowhere\"\n"),
            "config file hub.toml, line 3: metrics_listen = \"nowhere\": expected an address like 127.0.0.1:9464"
        );
        assert_eq!(
            err("shards = \"x\""),
            "config file hub.toml, line 1: shards = \"x\": expected a whole number from 1 to 65536"
        );
        assert_eq!(
            err("# hub\nmax_in_flite = 10\n"),
            "config file hub.toml, line 2: max_in_flite = 10: unknown key (did you mean max_in_flight?)"
        );
        assert_eq!(
            err("zzz = 1"),
            "config file hub.toml, line 1: zzz = 1: unknown key"
        );
        assert!(err("shards = [\n").starts_with("config file hub.toml, line 1: "));
        assert_eq!(
            err("[peers]\neu = 5\n"),
            "config file hub.toml, line 2: peers.eu = 5: expected a table of region = \"http://host:port\" entries (several URLs, comma-separated, for a region of hub replicas)"
        );
    }

    #[test]
    fn layered_values_name_their_flag_or_file_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hub.toml");
        std::fs::write(&file, "region = \"eu\"\nshards = 0\n").unwrap();
        let path = file.to_str().unwrap();
        let e = Args::load(["freshness-hub", "--config", path, "--ephemeral"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "config file {path}, line 2: shards = 0: expected a whole number from 1 to 65536"
            )
        );
        let e = Args::load(["freshness-hub", "--config", path, "--shards", "70000"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("flag --shards: shards = 70000: expected"),
            "{e}"
        );
        let e = Args::load(["freshness-hub", "--max-in-flight", "lots"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "flag --max-in-flight: max_in_flight = \"lots\": expected a whole number of events, at least 1"
        );
        assert!(matches!(
            Args::load(["freshness-hub", "--version"]),
            Ok(Err(_))
        ));
    }

    #[test]
    fn a_public_listener_needs_tls_and_an_auth_source_or_insecure() {
        let e = Args::load(["freshness-hub", "--listen", "0.0.0.0:50051"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "listen = 0.0.0.0:50051 is not a loopback address and the hub has no TLS (tls_cert, tls_key) and no auth source (auth_jwks, auth_tokens or tls_client_ca): set them, or --insecure to serve anyway"
        );
        let e = Args::load([
            "freshness-hub",
            "--listen",
            "0.0.0.0:50051",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("has no auth source"), "{e}");
        let ok = |args: &[&str]| Args::load(args.iter().copied()).unwrap().unwrap();
        let c = ok(&["freshness-hub", "--listen", "0.0.0.0:1", "--insecure"]);
        assert!(c.insecure);
        ok(&[
            "freshness-hub",
            "--listen",
            "0.0.0.0:1",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--auth-tokens",
            "t",
        ]);
        let e = Args::load(["freshness-hub", "--tls-cert", "c.pem"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "default setting: tls_key = (unset): expected a PEM private key file, set together with tls_cert"
        );
        let e = Args::load(["freshness-hub", "--peer", "eu=https://eu:1"]).unwrap_err();
        assert!(
            e.to_string().starts_with("default setting: peer_ca = (unset): expected a PEM CA file for the https:// peer eu"),
            "{e}"
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
        // A region of hub replicas: the region repeated, or a list in TOML.
        let args = Args::try_parse_from([
            "freshness-hub",
            "--peer",
            "eu=http://a:1",
            "--peer",
            "us=http://u:1",
            "--peer",
            "eu=http://b:1",
        ])
        .unwrap();
        let c = args.into_config().unwrap();
        assert_eq!(c.peer_urls("eu"), ["http://a:1", "http://b:1"]);
        assert_eq!(c.peer_urls("us"), ["http://u:1"]);
        let c: Config = toml::from_str("[peers]\neu = \"http://a:1, http://b:1\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.peer_urls("eu"), ["http://a:1", "http://b:1"]);
        let mut c = Config::default();
        c.peers.insert("eu".into(), "http://a:1, b:1".into());
        assert!(c.validate().unwrap_err().to_string().contains("peers.eu"));
        c.peers.insert("eu".into(), " , ".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("at least one URL")
        );
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
