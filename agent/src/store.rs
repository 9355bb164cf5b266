//! The agent's side of Redis: one multiplexed connection, reopened by the
//! agent itself, and every call of the `freshness` function library.
//!
//! Each (re)connection is prepared before anything else is sent on it: the
//! library is loaded if it is missing or outdated (`FUNCTION LOAD REPLACE`),
//! and Redis' run id is compared with the one recorded in `freshness:config`.
//! A Redis that restarted (new run id) or lost its data (no config) is
//! treated as an empty cache: every key the agent manages is deleted, the
//! cursor is forgotten and fills are refused for the tombstone TTL (a fill in
//! flight may have read before an invalidation whose tombstone was lost).
//! That is why the agent does not use the `redis` crate's connection
//! manager: its reconnects are silent, and this check must come first.
//!
//! Keys it manages: those named by the templates and those registered by
//! `freshness_fill`; nothing else in the database is touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use freshness::{Cursor, Entity};
use freshness_client::{BackendFuture, CursorBackend, CursorStoreError, Invalidation};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::{Config, Template};
use crate::metrics;

/// The library's source, loaded with `FUNCTION LOAD REPLACE`.
pub const LIBRARY: &str = include_str!("../lua/freshness.lua");
/// Its version (`FCALL_RO freshness_version 0`); bump with any change.
pub const LIBRARY_VERSION: &str = "3";
/// The agent's cursor (JSON `{"epoch":…,"seqs":[…]}`).
pub const CURSOR_KEY: &str = "freshness:cursor";
/// The library's configuration hash.
pub const CONFIG_KEY: &str = "freshness:config";
/// Keys deleted per `DEL` and scanned per `SCAN` page.
const SCAN_COUNT: usize = 1000;

/// A Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or could not be reached.
    #[error("redis {target}: {source}")]
    Redis {
        /// The Redis (without credentials).
        target: String,
        /// What failed.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered something the library never returns.
    #[error("redis {target}: unexpected reply: {reply}")]
    Reply {
        /// The Redis (without credentials).
        target: String,
        /// The reply.
        reply: String,
    },
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Invalidations newer than the entity's tombstone.
    pub applied: u64,
    /// Older or equal versions, ignored.
    pub ignored: u64,
    /// Keys deleted.
    pub deleted: u64,
}

/// The agent's Redis.
pub struct Store {
    client: Client,
    target: String,
    shards: u32,
    tombstone_ms: u64,
    max_batch: usize,
    fail_closed: Vec<(String, u64)>,
    templates: BTreeMap<String, Vec<Template>>,
    conn: Mutex<Option<MultiplexedConnection>>,
    wipes: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("target", &self.target)
            .finish()
    }
}

impl Store {
    /// A store for a validated configuration; nothing connects yet.
    pub fn new(config: &Config) -> Result<Arc<Self>, StoreError> {
        let target = redact(&config.redis);
        let client = Client::open(config.redis.as_str()).map_err(|source| StoreError::Redis {
            target: target.clone(),
            source,
        })?;
        Ok(Arc::new(Self {
            client,
            target,
            shards: config.shards,
            tombstone_ms: millis(config.tombstone_ttl),
            max_batch: config.max_batch,
            fail_closed: config
                .fail_closed
                .iter()
                .map(|(ns, d)| (ns.clone(), millis(*d)))
                .collect(),
            templates: config.templates(),
            conn: Mutex::new(None),
            wipes: AtomicU64::new(0),
        }))
    }

    /// The Redis, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// How many times the agent found Redis restarted or emptied and
    /// started clean.
    pub fn wipes(&self) -> u64 {
        self.wipes.load(Ordering::Relaxed)
    }

    fn err(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            target: self.target.clone(),
            source,
        }
    }

    /// The connection, opened and prepared if there is none.
    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let mut c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.err(e))?;
        self.prepare(&mut c).await.map_err(|e| self.err(e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after a failure: the next call reconnects and
    /// prepares again (a restarted Redis, a missing library).
    async fn failed(&self, e: redis::RedisError) -> StoreError {
        *self.conn.lock().await = None;
        self.err(e)
    }

    /// Loads the library if needed, then checks the run id.
    async fn prepare(&self, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let version: redis::RedisResult<String> = redis::cmd("FCALL_RO")
            .arg("freshness_version")
            .arg(0)
            .query_async(c)
            .await;
        if version.as_deref().ok() != Some(LIBRARY_VERSION) {
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(LIBRARY)
                .query_async::<String>(c)
                .await?;
            info!(redis = %self.target, "loaded the freshness function library");
        }
        let server: String = redis::cmd("INFO").arg("server").query_async(c).await?;
        let run_id = server
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        // Evicting a tombstone or a dependency set would let a stale fill in
        // or leave a dependent key behind; managed services may refuse
        // CONFIG, which is no reason to stop.
        let policy: redis::RedisResult<(String, String)> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(c)
            .await;
        if let Ok((_, policy)) = policy
            && policy != "noeviction"
        {
            warn!(redis = %self.target, %policy, "Redis may evict the agent's tombstones and indexes: keys could be served stale after an eviction; use maxmemory-policy noeviction and TTLs on cached keys");
        }
        let (shards, recorded): (Option<u32>, Option<String>) = redis::cmd("HMGET")
            .arg(CONFIG_KEY)
            .arg("shards")
            .arg("run_id")
            .query_async(c)
            .await?;
        let same = shards == Some(self.shards) && recorded.as_deref() == Some(run_id.as_str());
        if !same {
            if recorded.is_some() {
                warn!(redis = %self.target, "Redis restarted or its shard count changed: starting clean");
            } else {
                info!(redis = %self.target, "no freshness state in this database: starting clean");
            }
            if shards.is_some() {
                self.reset_on(c, None).await?;
            } else {
                self.scan_templates(c, None, None).await?;
            }
            redis::cmd("DEL")
                .arg(CURSOR_KEY)
                .query_async::<()>(c)
                .await?;
            self.wipes.fetch_add(1, Ordering::Relaxed);
            ::metrics::counter!(metrics::WIPES).increment(1);
        }
        let mut init = redis::cmd("FCALL");
        init.arg("freshness_init")
            .arg(0)
            .arg(self.shards)
            .arg(self.tombstone_ms)
            .arg(&run_id)
            .arg(if same { 0 } else { 1 });
        for (ns, bound) in &self.fail_closed {
            init.arg(ns).arg(*bound);
        }
        init.query_async::<i64>(c).await?;
        Ok(())
    }

    /// Checks the connection now (a fresh one is prepared).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        match redis::cmd("PING").query_async::<String>(&mut c).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Applies invalidations in order: one `FCALL freshness_apply` per
    /// `max_batch` of them, all in one pipeline (one round trip).
    pub async fn apply(&self, events: &[Invalidation]) -> Result<Applied, StoreError> {
        if events.is_empty() {
            return Ok(Applied::default());
        }
        let mut pipe = redis::pipe();
        for chunk in events.chunks(self.max_batch) {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("freshness_apply").arg(0).arg(self.tombstone_ms);
            for e in chunk {
                cmd.arg(e.entity.as_str())
                    .arg(e.version.get())
                    .arg(e.shard.0);
                match self.templates.get(e.entity.namespace()) {
                    Some(ts) => {
                        cmd.arg(ts.len());
                        for t in ts {
                            cmd.arg(t.key(&e.entity));
                        }
                    }
                    None => {
                        cmd.arg(0);
                    }
                }
            }
            pipe.add_command(cmd);
        }
        let mut c = self.conn().await?;
        let replies: Vec<(u64, u64, u64)> = match pipe.query_async(&mut c).await {
            Ok(r) => r,
            Err(e) => return Err(self.failed(e).await),
        };
        let mut out = Applied::default();
        for (a, i, d) in replies {
            out.applied += a;
            out.ignored += i;
            out.deleted += d;
        }
        Ok(out)
    }

    /// Deletes every managed key of the shards (all of them for `None`) and
    /// refuses fills on them for the tombstone TTL. Returns keys deleted.
    pub async fn reset(&self, shards: Option<&BTreeSet<u32>>) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        match self.reset_on(&mut c, shards).await {
            Ok(n) => Ok(n),
            Err(e) => Err(self.failed(e).await),
        }
    }

    async fn reset_on(
        &self,
        c: &mut MultiplexedConnection,
        shards: Option<&BTreeSet<u32>>,
    ) -> redis::RedisResult<u64> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("freshness_reset").arg(0).arg(self.tombstone_ms);
        match shards {
            None => {
                cmd.arg("all");
            }
            Some(s) if s.is_empty() => return Ok(0),
            Some(s) => {
                for shard in s {
                    cmd.arg(*shard);
                }
            }
        }
        let indexed: u64 = cmd.query_async(c).await?;
        let templated = self.scan_templates(c, shards, None).await?;
        Ok(indexed + templated)
    }

    /// Fail closed: deletes the namespace's managed keys.
    pub async fn drop_namespace(&self, namespace: &str) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let r = async {
            let indexed: u64 = redis::cmd("FCALL")
                .arg("freshness_drop_namespace")
                .arg(0)
                .arg(namespace)
                .query_async(&mut c)
                .await?;
            let templated = self.scan_templates(&mut c, None, Some(namespace)).await?;
            Ok::<_, redis::RedisError>(indexed + templated)
        }
        .await;
        match r {
            Ok(n) => Ok(n),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Deletes the templated keys whose entity falls in `shards` (all for
    /// `None`), of `namespace` only when given: keys an app wrote with a plain
    /// `SET` are in no index, so they are found by `SCAN`.
    async fn scan_templates(
        &self,
        c: &mut MultiplexedConnection,
        shards: Option<&BTreeSet<u32>>,
        namespace: Option<&str>,
    ) -> redis::RedisResult<u64> {
        let mut deleted = 0;
        for (ns, templates) in &self.templates {
            if namespace.is_some_and(|n| n != ns) {
                continue;
            }
            for t in templates {
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(t.pattern())
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(c)
                        .await?;
                    let doomed: Vec<&String> = keys
                        .iter()
                        .filter(|k| {
                            let Some(id) = t.id_of(k) else {
                                return false;
                            };
                            let Some(shards) = shards else {
                                return true;
                            };
                            Entity::parse(&format!("{ns}:{id}"))
                                .is_ok_and(|e| shards.contains(&e.shard(self.shards).0))
                        })
                        .collect();
                    if !doomed.is_empty() {
                        deleted += redis::cmd("DEL").arg(&doomed).query_async::<u64>(c).await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(deleted)
    }

    /// Writes the feed state to `freshness:feed` (staleness `None` =
    /// unknown) and returns the count of refused fills so far.
    pub async fn write_feed(
        &self,
        state: &str,
        staleness: Option<Duration>,
    ) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let staleness_ms =
            staleness.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut pipe = redis::pipe();
        pipe.cmd("FCALL")
            .arg("freshness_feed")
            .arg(0)
            .arg(state)
            .arg(staleness_ms)
            .ignore()
            .cmd("HGET")
            .arg("freshness:stats")
            .arg("refused");
        match pipe.query_async::<(Option<u64>,)>(&mut c).await {
            Ok((refused,)) => Ok(refused.unwrap_or(0)),
            Err(e) => Err(self.failed(e).await),
        }
    }

    async fn get_cursor(&self) -> Result<Option<String>, StoreError> {
        let mut c = self.conn().await?;
        match redis::cmd("GET").arg(CURSOR_KEY).query_async(&mut c).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.failed(e).await),
        }
    }

    async fn set_cursor(&self, value: Option<String>) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let r = match value {
            Some(v) => {
                redis::cmd("SET")
                    .arg(CURSOR_KEY)
                    .arg(v)
                    .query_async::<()>(&mut c)
                    .await
            }
            None => {
                redis::cmd("DEL")
                    .arg(CURSOR_KEY)
                    .query_async::<()>(&mut c)
                    .await
            }
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }
}

/// The subscriber's cursor, kept in the same Redis as the cache: lost with
/// it, so a Redis that lost its data makes the agent start at the hub's
/// head with an empty cache.
#[derive(Debug, Clone)]
pub struct RedisCursor(pub Arc<Store>);

#[derive(Serialize, Deserialize)]
struct Saved {
    epoch: u64,
    seqs: Vec<u64>,
}

impl RedisCursor {
    fn error(&self, reason: impl ToString) -> CursorStoreError {
        CursorStoreError::Backend {
            store: self.0.target.clone(),
            reason: reason.to_string(),
        }
    }
}

impl CursorBackend for RedisCursor {
    fn name(&self) -> String {
        self.0.target.clone()
    }

    fn load(&self) -> BackendFuture<'_, Option<Cursor>> {
        Box::pin(async move {
            let Some(text) = self.0.get_cursor().await.map_err(|e| self.error(e))? else {
                return Ok(None);
            };
            let s: Saved = serde_json::from_str(&text)
                .map_err(|e| self.error(format!("{CURSOR_KEY} is not a cursor: {e}")))?;
            if s.epoch == 0 || s.seqs.is_empty() {
                return Err(self.error(format!("{CURSOR_KEY}: epoch 0 or no shards")));
            }
            Ok(Some(Cursor {
                epoch: s.epoch,
                seqs: s.seqs,
            }))
        })
    }

    fn save<'a>(&'a self, cursor: &'a Cursor) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            let text = serde_json::to_string(&Saved {
                epoch: cursor.epoch,
                seqs: cursor.seqs.clone(),
            })
            .map_err(|e| self.error(e))?;
            self.0
                .set_cursor(Some(text))
                .await
                .map_err(|e| self.error(e))
        })
    }

    fn clear(&self) -> BackendFuture<'_, ()> {
        Box::pin(async move { self.0.set_cursor(None).await.map_err(|e| self.error(e)) })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The URL without a password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_drops_credentials() {
        assert_eq!(super::redact("redis://:pw@h:1/2"), "redis://h:1/2");
        assert_eq!(super::redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn library_version_matches_the_lua_source() {
        assert!(super::LIBRARY.starts_with("#!lua name=freshness\n"));
        assert!(super::LIBRARY.contains(&format!(
            "local LIBRARY_VERSION = '{}'",
            super::LIBRARY_VERSION
        )));
    }
}
