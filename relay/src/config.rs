//! The relay's configuration: one typed struct, layered defaults < TOML file
//! (`--config`) < environment (`FRESHNESS_RELAY_*`) < flags, validated before
//! anything connects or binds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use freshness::limits::MAX_EVENTS_PER_PUBLISH;
use serde::{Deserialize, Serialize};

/// What the hub must have done before the relay deletes a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AckLevel {
    /// The hub ordered and appended the events (durably, with a durable log).
    Accepted,
    /// And every node of the region whose filter matches acked them.
    Region,
    /// And the same in every peer region.
    Global,
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

/// Everything `freshness-relay run` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL connection string (`postgres://user@host/db`, or
    /// `host=... dbname=...`); holds the outbox table.
    pub database_url: String,
    /// The hub the rows are published to.
    pub hub: String,
    /// Most rows claimed (and published) at once: up to 10,000, the most
    /// one publish call may carry.
    pub batch: usize,
    /// What the hub must have done before a row is deleted.
    pub ack_level: AckLevel,
    /// How often the relay looks at the table without a notification: the
    /// most a lost notification can delay a row.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest one publish call may take before it is retried.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Longest wait between two attempts while the hub or the database is
    /// unreachable (the hub's `retry-after-ms` hint is honoured as given).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Prometheus metrics listen address (`/metrics`).
    pub metrics_listen: SocketAddr,
    /// `text` or `json` logs on stderr.
    pub log_format: LogFormat,
    /// OTLP/gRPC collector for traces; unset, `OTEL_*` decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// The CA (PEM) the hub's certificate must chain to (an `https://` hub).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM) for a hub that requires one (mTLS); goes
    /// with `key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A bearer token (a JWT or a static token) sent with every publish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the bearer token (a mounted Secret); read again
    /// before every publish call, so a rotated token is used at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: String::new(),
            hub: "http://127.0.0.1:50051".into(),
            batch: 1_000,
            ack_level: AckLevel::Accepted,
            poll_interval: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9465)),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            ca: None,
            cert: None,
            key: None,
            token: None,
            token_file: None,
        }
    }
}

/// A configuration the relay refuses to start with.
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
    #[error("invalid setting `{key}` = {value:?}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is expected.
        reason: String,
    },
}

fn invalid(key: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
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
            message: e.to_string().replace('\n', " "),
        })
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database_url.trim().is_empty() {
            return Err(invalid(
                "database_url",
                "",
                "is required (--database-url, FRESHNESS_RELAY_DATABASE_URL or the file)",
            ));
        }
        self.database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| invalid("database_url", "(hidden)", e.to_string()))?;
        if !(self.hub.starts_with("http://") || self.hub.starts_with("https://")) {
            return Err(invalid(
                "hub",
                &self.hub,
                "must start with http:// or https://",
            ));
        }
        if self.batch == 0 || self.batch > MAX_EVENTS_PER_PUBLISH {
            return Err(invalid(
                "batch",
                self.batch,
                format!("must be in 1..={MAX_EVENTS_PER_PUBLISH}"),
            ));
        }
        for (key, d) in [
            ("poll_interval", self.poll_interval),
            ("publish_timeout", self.publish_timeout),
            ("max_backoff", self.max_backoff),
        ] {
            if d < Duration::from_millis(1) || d > Duration::from_secs(3600) {
                return Err(invalid(
                    key,
                    humantime::format_duration(d),
                    "must be between 1ms and 1h",
                ));
            }
        }
        self.check_credentials()
    }

    /// Checks the credential files can be read and hold what they should,
    /// so that a typo stops the relay at start rather than at every publish.
    fn check_credentials(&self) -> Result<(), ConfigError> {
        let https = self.hub.starts_with("https://");
        for (key, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            let Some(path) = path else { continue };
            if !https {
                return Err(invalid(
                    key,
                    path.display(),
                    format!("TLS settings need an https:// hub, not {}", self.hub),
                ));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(key, path.display(), format!("cannot read it: {e}")))?;
            if !text.contains("-----BEGIN ") {
                return Err(invalid(key, path.display(), "holds no PEM block"));
            }
        }
        match (&self.cert, &self.key) {
            (Some(c), None) => {
                return Err(invalid(
                    "cert",
                    c.display(),
                    "a client certificate needs its key: set `key` too",
                ));
            }
            (None, Some(k)) => {
                return Err(invalid(
                    "key",
                    k.display(),
                    "a key needs its client certificate: set `cert` too",
                ));
            }
            _ => {}
        }
        if let Some(t) = &self.token
            && (t.trim().is_empty()
                || format!("Bearer {}", t.trim())
                    .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
                    .is_err())
        {
            return Err(invalid(
                "token",
                "(hidden)",
                "must be printable ASCII, not empty",
            ));
        }
        if let Some(path) = &self.token_file {
            if self.token.is_some() {
                return Err(invalid(
                    "token_file",
                    path.display(),
                    "give `token` or `token_file`, not both",
                ));
            }
            read_token(path).map_err(|e| invalid("token_file", path.display(), e))?;
        }
        Ok(())
    }
}

/// The token in `path`, trimmed, as the header value it is sent in.
pub(crate) fn read_token(
    path: &Path,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err("is empty".into());
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| "holds characters a header cannot carry".into())
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "freshness-relay",
    version,
    about = "Publishes the Freshness outbox (a PostgreSQL table) to a hub"
)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
pub enum Command {
    /// Create the outbox table, its index and its trigger (idempotent).
    Migrate {
        /// PostgreSQL connection string.
        #[arg(long, env = "FRESHNESS_RELAY_DATABASE_URL")]
        database_url: String,
    },
    /// Publish committed outbox rows until stopped (SIGTERM, Ctrl-C).
    Run(RunArgs),
}

/// Flags of `run`; each also reads a `FRESHNESS_RELAY_*` variable. Anything
/// not given falls back to the file, then the defaults.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "FRESHNESS_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL connection string.
    #[arg(long, env = "FRESHNESS_RELAY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The hub [default: http://127.0.0.1:50051].
    #[arg(long, env = "FRESHNESS_RELAY_HUB")]
    pub hub: Option<String>,
    /// Most rows per claim and publish, 1 to 10000 [default: 1000].
    #[arg(long, env = "FRESHNESS_RELAY_BATCH")]
    pub batch: Option<usize>,
    /// accepted, region or global [default: accepted].
    #[arg(long, env = "FRESHNESS_RELAY_ACK_LEVEL")]
    pub ack_level: Option<AckLevel>,
    /// Look at the table this often without a notification [default: 1s].
    #[arg(long, env = "FRESHNESS_RELAY_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    pub poll_interval: Option<Duration>,
    /// Longest one publish call may take [default: 10s].
    #[arg(long, env = "FRESHNESS_RELAY_PUBLISH_TIMEOUT", value_parser = humantime::parse_duration)]
    pub publish_timeout: Option<Duration>,
    /// Longest wait between retries [default: 2s].
    #[arg(long, env = "FRESHNESS_RELAY_MAX_BACKOFF", value_parser = humantime::parse_duration)]
    pub max_backoff: Option<Duration>,
    /// Metrics listen address [default: 127.0.0.1:9465].
    #[arg(long, env = "FRESHNESS_RELAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format [default: text].
    #[arg(long, env = "FRESHNESS_RELAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC collector for traces, e.g. http://localhost:4317.
    #[arg(long, env = "FRESHNESS_RELAY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// CA (PEM) the hub's certificate must chain to (https:// hub).
    #[arg(long, env = "FRESHNESS_RELAY_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for a hub that requires one; with --key.
    #[arg(long, env = "FRESHNESS_RELAY_CERT")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "FRESHNESS_RELAY_KEY")]
    pub key: Option<PathBuf>,
    /// Bearer token sent with every publish.
    #[arg(
        long,
        env = "FRESHNESS_RELAY_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token, read again before every publish.
    #[arg(long, env = "FRESHNESS_RELAY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl RunArgs {
    /// Layers the file (if any) and these flags over the defaults, and
    /// validates the result.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.database_url {
            c.database_url = v;
        }
        if let Some(v) = self.hub {
            c.hub = v;
        }
        if let Some(v) = self.batch {
            c.batch = v;
        }
        if let Some(v) = self.ack_level {
            c.ack_level = v;
        }
        if let Some(v) = self.poll_interval {
            c.poll_interval = v;
        }
        if let Some(v) = self.publish_timeout {
            c.publish_timeout = v;
        }
        if let Some(v) = self.max_backoff {
            c.max_backoff = v;
        }
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = v;
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if self.otlp_endpoint.is_some() {
            c.otlp_endpoint = self.otlp_endpoint;
        }
        for (from, to) in [
            (self.ca, &mut c.ca),
            (self.cert, &mut c.cert),
            (self.key, &mut c.key),
        ] {
            if from.is_some() {
                *to = from;
            }
        }
        // A token given here replaces either form of the file's.
        if self.token.is_some() {
            c.token = self.token;
            c.token_file = None;
        }
        if self.token_file.is_some() {
            c.token_file = self.token_file;
            c.token = None;
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_only_a_database() {
        let c = Config {
            database_url: "postgres://postgres@127.0.0.1/test".into(),
            ..Config::default()
        };
        c.validate().unwrap();
        assert!(Config::default().validate().is_err());
    }

    #[test]
    fn bad_values_name_the_key_and_value() {
        let c = Config {
            database_url: "postgres://postgres@127.0.0.1/test".into(),
            batch: 20_000,
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`batch` = \"20000\""), "{e}");
        let e = toml::from_str::<Config>("batch = 10\nbogus = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
