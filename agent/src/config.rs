//! The agent's configuration: one typed struct, layered defaults < TOML file
//! < environment (`FRESHNESS_AGENT_*`) < flags, validated before anything
//! connects.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use freshness::Entity;
use serde::{Deserialize, Serialize};

/// Everything the agent can be told. Every field but the key templates has a
/// default, so `--map user=cache:user:{id}` alone gives a working agent
/// beside a hub and a Redis on loopback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The hub's URL.
    pub hub: String,
    /// The Redis to keep fresh, `redis://HOST:PORT[/DB]`; the agent uses
    /// only that database.
    pub redis: String,
    /// The agent's node id at the hub: stable across restarts, one per
    /// Redis database.
    pub node_id: String,
    /// Key templates per namespace: `{id}` stands for the entity's id, so
    /// `user = ["cache:user:{id}"]` deletes `cache:user:42` when `user:42`
    /// changes. Keys that depend on several entities register them at fill
    /// time instead (`freshness_fill`).
    pub map: BTreeMap<String, Vec<String>>,
    /// Namespaces to subscribe to; empty (the default) means all, which a
    /// fill may name as a dependency of any key.
    pub namespaces: Vec<String>,
    /// Per namespace, the staleness past which its keys are deleted and its
    /// fills refused, until the feed is fresh again.
    #[serde(with = "humantime_map")]
    pub fail_closed: BTreeMap<String, Duration>,
    /// The hub's shard count `S` (the agent refuses a hub with another).
    pub shards: u32,
    /// How long an invalidation's tombstone refuses late fills, and how long
    /// fills are refused after a reset. A fill that takes longer than this
    /// between its read and its `FCALL` is not caught.
    #[serde(with = "humantime_serde")]
    pub tombstone_ttl: Duration,
    /// How often the feed state (`freshness:feed`) is written and
    /// fail-closed bounds are checked.
    #[serde(with = "humantime_serde")]
    pub feed_interval: Duration,
    /// Least time between two writes of the cursor to Redis.
    #[serde(with = "humantime_serde")]
    pub persist_interval: Duration,
    /// Most invalidations in one `FCALL freshness_apply` (one Lua call
    /// blocks Redis while it runs).
    pub max_batch: usize,
    /// Prometheus metrics listen address (`/metrics`); none serves nothing.
    pub metrics_listen: Option<SocketAddr>,
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
    /// A bearer token (a JWT or a static token) sent with the subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the bearer token (a mounted Secret), read again for
    /// every connection to the hub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hub: "http://127.0.0.1:50051".into(),
            redis: "redis://127.0.0.1:6379".into(),
            node_id: default_node_id(),
            map: BTreeMap::new(),
            namespaces: Vec::new(),
            fail_closed: BTreeMap::new(),
            shards: 64,
            tombstone_ttl: Duration::from_secs(10),
            feed_interval: Duration::from_millis(250),
            persist_interval: Duration::from_secs(1),
            max_batch: 512,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9465))),
            ca: None,
            cert: None,
            key: None,
            token: None,
            token_file: None,
        }
    }
}

fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("redis-agent-{host}")
}

/// A configuration the agent refuses to start with.
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
        /// The value and what is expected.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// A key template: the text around one `{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    prefix: String,
    suffix: String,
}

impl Template {
    /// Parses `cache:user:{id}`: exactly one `{id}`, no other braces.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (prefix, suffix) = text
            .split_once("{id}")
            .ok_or_else(|| format!("template {text:?} has no {{id}}"))?;
        if suffix.contains("{id}") {
            return Err(format!("template {text:?} has {{id}} more than once"));
        }
        if prefix.contains(['{', '}']) || suffix.contains(['{', '}']) {
            return Err(format!(
                "template {text:?} has braces besides {{id}} (only {{id}} is replaced)"
            ));
        }
        Ok(Self {
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    /// The key of `entity` (its id in place of `{id}`).
    pub fn key(&self, entity: &Entity) -> String {
        let id = entity.id();
        let mut k = String::with_capacity(self.prefix.len() + id.len() + self.suffix.len());
        k.push_str(&self.prefix);
        k.push_str(id);
        k.push_str(&self.suffix);
        k
    }

    /// A `SCAN MATCH` pattern for every key of this template.
    pub fn pattern(&self) -> String {
        format!(
            "{}*{}",
            glob_escape(&self.prefix),
            glob_escape(&self.suffix)
        )
    }

    /// The id in `key`, if `key` is one of this template's keys.
    pub fn id_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())
            .filter(|id| !id.is_empty())
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
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

    /// Checks every value; the agent connects to nothing before this passed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.hub.starts_with("http://") && !self.hub.starts_with("https://") {
            return Err(invalid(
                "hub",
                format!("{:?} is not an http:// or https:// URL", self.hub),
            ));
        }
        redis::Client::open(self.redis.as_str()).map_err(|e| {
            invalid(
                "redis",
                format!("{:?} is not a redis://HOST:PORT[/DB] URL: {e}", self.redis),
            )
        })?;
        if self.node_id.is_empty() || self.node_id.len() > 256 {
            return Err(invalid("node_id", "must be 1 to 256 bytes"));
        }
        for (ns, templates) in &self.map {
            check_namespace("map", ns)?;
            if templates.is_empty() {
                return Err(invalid("map", format!("namespace {ns:?} has no template")));
            }
            for t in templates {
                Template::parse(t).map_err(|e| invalid("map", e))?;
            }
        }
        for ns in &self.namespaces {
            check_namespace("namespaces", ns)?;
        }
        for (ns, bound) in &self.fail_closed {
            check_namespace("fail_closed", ns)?;
            if *bound < self.feed_interval {
                return Err(invalid(
                    "fail_closed",
                    format!(
                        "{ns}={} is shorter than feed_interval ({}): the feed state is written that often",
                        humantime::format_duration(*bound),
                        humantime::format_duration(self.feed_interval)
                    ),
                ));
            }
        }
        if self.shards == 0 || self.shards > 65_536 {
            return Err(invalid(
                "shards",
                format!("{} is not in 1..=65536", self.shards),
            ));
        }
        if self.tombstone_ttl < Duration::from_millis(1) {
            return Err(invalid("tombstone_ttl", "must be at least 1ms"));
        }
        if self.feed_interval.is_zero() {
            return Err(invalid("feed_interval", "must be more than 0"));
        }
        if self.max_batch == 0 || self.max_batch > 100_000 {
            return Err(invalid(
                "max_batch",
                format!("{} is not in 1..=100000", self.max_batch),
            ));
        }
        self.credentials().map(drop)
    }

    /// The credentials for the hub, read from the files given; the error
    /// names the setting and the file.
    pub fn credentials(&self) -> Result<freshness_client::Credentials, ConfigError> {
        let https = self.hub.starts_with("https://");
        let read = |key: &'static str, path: &Path| -> Result<Vec<u8>, ConfigError> {
            if !https {
                return Err(invalid(
                    key,
                    format!(
                        "{}: TLS settings need an https:// hub, not {}",
                        path.display(),
                        self.hub
                    ),
                ));
            }
            let bytes = std::fs::read(path)
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
            if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
                return Err(invalid(
                    key,
                    format!("{} holds no PEM block", path.display()),
                ));
            }
            Ok(bytes)
        };
        let mut c = freshness_client::Credentials::new();
        if let Some(ca) = &self.ca {
            c = c.ca_pem(read("ca", ca)?);
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                c = c.client_identity_pem(read("cert", cert)?, read("key", key)?);
            }
            (Some(cert), None) => {
                return Err(invalid(
                    "key",
                    format!("the client certificate {} needs its key", cert.display()),
                ));
            }
            (None, Some(key)) => {
                return Err(invalid(
                    "cert",
                    format!("the key {} needs its certificate", key.display()),
                ));
            }
            (None, None) => {}
        }
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(path)) => {
                return Err(invalid(
                    "token_file",
                    format!("{}: give `token` or `token_file`, not both", path.display()),
                ));
            }
            (Some(t), None) => Some(check_token("token", t.trim().to_owned(), "the token")?),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid("token_file", format!("cannot read {}: {e}", path.display()))
                })?;
                check_token(
                    "token_file",
                    text.trim().to_owned(),
                    &path.display().to_string(),
                )?;
                // Read again for every connection: a rotated Secret is used
                // from the next reconnect on.
                c = c.bearer_token_file(path);
                None
            }
            (None, None) => None,
        };
        if let Some(t) = token {
            c = c.bearer_token(t);
        }
        Ok(c)
    }

    /// The parsed templates per namespace (call after [`validate`](Self::validate)).
    pub fn templates(&self) -> BTreeMap<String, Vec<Template>> {
        self.map
            .iter()
            .map(|(ns, ts)| {
                (
                    ns.clone(),
                    ts.iter().filter_map(|t| Template::parse(t).ok()).collect(),
                )
            })
            .collect()
    }
}

/// A token a header can carry: printable ASCII, not empty.
fn check_token(key: &'static str, token: String, what: &str) -> Result<String, ConfigError> {
    if token.is_empty() || !token.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid(
            key,
            format!("{what} must hold a token of printable ASCII characters"),
        ));
    }
    Ok(token)
}

fn check_namespace(key: &'static str, ns: &str) -> Result<(), ConfigError> {
    freshness::validate_namespace(ns).map_err(|e| invalid(key, format!("namespace {ns:?}: {e}")))
}

/// `NAMESPACE = "2s"` tables.
mod humantime_map {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(
            map.iter()
                .map(|(k, v)| (k, humantime::format_duration(*v).to_string())),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|d| (k, d))
                    .map_err(|e| serde::de::Error::custom(format!("{v:?}: {e}")))
            })
            .collect()
    }
}

/// Command-line flags; each also reads a `FRESHNESS_AGENT_*` variable.
/// Anything not given falls back to the file, then the defaults.
#[derive(Debug, Parser)]
#[command(
    name = "freshness-agent",
    version,
    about = "Keeps a Redis cache tier fresh: applies a Freshness hub's invalidations to Redis"
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "FRESHNESS_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The hub's URL [default: http://127.0.0.1:50051].
    #[arg(long, env = "FRESHNESS_AGENT_HUB")]
    pub hub: Option<String>,
    /// The Redis to keep fresh [default: redis://127.0.0.1:6379].
    #[arg(long, env = "FRESHNESS_AGENT_REDIS")]
    pub redis: Option<String>,
    /// Node id at the hub, stable across restarts [default: redis-agent-HOSTNAME].
    #[arg(long, env = "FRESHNESS_AGENT_NODE_ID")]
    pub node_id: Option<String>,
    /// A key template, NAMESPACE=TEMPLATE with `{id}`; repeatable. Env:
    /// comma-separated list.
    #[arg(long = "map", env = "FRESHNESS_AGENT_MAP", value_delimiter = ',', value_parser = parse_pair)]
    pub map: Vec<(String, String)>,
    /// A namespace to subscribe to; repeatable [default: all].
    #[arg(
        long = "namespace",
        env = "FRESHNESS_AGENT_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// NAMESPACE=DURATION: fail closed past that staleness; repeatable.
    #[arg(long = "fail-closed", env = "FRESHNESS_AGENT_FAIL_CLOSED", value_delimiter = ',', value_parser = parse_bound)]
    pub fail_closed: Vec<(String, Duration)>,
    /// The hub's shard count [default: 64].
    #[arg(long, env = "FRESHNESS_AGENT_SHARDS")]
    pub shards: Option<u32>,
    /// How long tombstones refuse late fills [default: 10s].
    #[arg(long, env = "FRESHNESS_AGENT_TOMBSTONE_TTL", value_parser = humantime::parse_duration)]
    pub tombstone_ttl: Option<Duration>,
    /// How often freshness:feed is written [default: 250ms].
    #[arg(long, env = "FRESHNESS_AGENT_FEED_INTERVAL", value_parser = humantime::parse_duration)]
    pub feed_interval: Option<Duration>,
    /// Least time between two cursor writes [default: 1s].
    #[arg(long, env = "FRESHNESS_AGENT_PERSIST_INTERVAL", value_parser = humantime::parse_duration)]
    pub persist_interval: Option<Duration>,
    /// Most invalidations per Lua call [default: 512].
    #[arg(long, env = "FRESHNESS_AGENT_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Metrics listen address [default: 127.0.0.1:9465].
    #[arg(long, env = "FRESHNESS_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve no metrics.
    #[arg(long, env = "FRESHNESS_AGENT_NO_METRICS")]
    pub no_metrics: bool,
    /// CA (PEM) the hub's certificate must chain to (https:// hub).
    #[arg(long, env = "FRESHNESS_AGENT_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for a hub that requires one; with --key.
    #[arg(long, env = "FRESHNESS_AGENT_CERT")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "FRESHNESS_AGENT_KEY")]
    pub key: Option<PathBuf>,
    /// Bearer token sent with the subscription.
    #[arg(
        long,
        env = "FRESHNESS_AGENT_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token, read again for every connection.
    #[arg(long, env = "FRESHNESS_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (ns, t) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} must be NAMESPACE=TEMPLATE"))?;
    Ok((ns.trim().to_owned(), t.trim().to_owned()))
}

fn parse_bound(s: &str) -> Result<(String, Duration), String> {
    let (ns, d) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} must be NAMESPACE=DURATION"))?;
    let d = humantime::parse_duration(d.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((ns.trim().to_owned(), d))
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
            hub,
            redis,
            node_id,
            shards,
            tombstone_ttl,
            feed_interval,
            persist_interval,
            max_batch
        );
        if let Some(m) = self.metrics_listen {
            c.metrics_listen = Some(m);
        }
        if self.no_metrics {
            c.metrics_listen = None;
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
        if !self.map.is_empty() {
            c.map.clear();
            for (ns, t) in self.map {
                c.map.entry(ns).or_default().push(t);
            }
        }
        if !self.namespaces.is_empty() {
            c.namespaces = self.namespaces;
        }
        if !self.fail_closed.is_empty() {
            c.fail_closed = self.fail_closed.into_iter().collect();
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_make_keys_patterns_and_ids() {
        let t = Template::parse("cache:user:{id}:v2").unwrap();
        let e = Entity::parse("user:42").unwrap();
        assert_eq!(t.key(&e), "cache:user:42:v2");
        assert_eq!(t.id_of("cache:user:42:v2"), Some("42"));
        assert_eq!(t.id_of("cache:user::v2"), None);
        assert_eq!(t.id_of("other:42:v2"), None);
        assert_eq!(t.pattern(), "cache:user:*:v2");
        assert_eq!(
            Template::parse("a[*]{id}").unwrap().pattern(),
            "a\\[\\*\\]*"
        );
        assert!(Template::parse("cache:user").is_err());
        assert!(Template::parse("{id}:{id}").is_err());
        assert!(Template::parse("{x}:{id}").is_err());
    }

    #[test]
    fn file_and_flags_layer_and_invalid_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "redis = \"redis://127.0.0.1:7000/3\"\n[map]\nuser = [\"cache:user:{id}\"]\n[fail_closed]\nprice = \"2s\"\n",
        )
        .unwrap();
        let args = Args::parse_from([
            "freshness-agent",
            "--config",
            path.to_str().unwrap(),
            "--shards",
            "8",
        ]);
        let c = args.into_config().unwrap();
        assert_eq!(c.redis, "redis://127.0.0.1:7000/3");
        assert_eq!(c.shards, 8);
        assert_eq!(c.fail_closed["price"], Duration::from_secs(2));
        assert_eq!(c.map["user"], vec!["cache:user:{id}".to_owned()]);

        std::fs::write(&path, "bogus = 1\n").unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");

        let e = Args::parse_from(["freshness-agent", "--map", "user=cache:user"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`map`") && e.contains("cache:user"), "{e}");
        let e = Args::parse_from(["freshness-agent", "--redis", "http://x"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`redis`"), "{e}");
        let e = Args::parse_from(["freshness-agent", "--map", "User=x:{id}"])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`map`") && e.contains("User"), "{e}");
    }

    #[test]
    fn credentials_come_from_the_file_and_name_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("agent-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "t0ken\n").unwrap();
        let c: Config = toml::from_str(&format!(
            "hub = \"https://hub:50051\"\nca = {:?}\ntoken_file = {:?}",
            ca.display().to_string(),
            token.display().to_string()
        ))
        .unwrap();
        c.validate().unwrap();
        let missing = Config {
            cert: Some(dir.join("nope.pem")),
            key: Some(ca.clone()),
            ..c.clone()
        };
        let e = missing.validate().unwrap_err().to_string();
        assert!(e.contains("`cert`") && e.contains("nope.pem"), "{e}");
        let plain = Config {
            hub: "http://hub:50051".into(),
            ..c
        };
        let e = plain.validate().unwrap_err().to_string();
        assert!(e.contains("`ca`") && e.contains("https://"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
