//! The relay loop: claim committed outbox rows, publish them, delete them
//! once the hub answered for every one.
//!
//! One claim is one transaction:
//!
//! 1. `SELECT … ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED`: the oldest
//!    committed rows no other relay holds. Rows of transactions still open
//!    are invisible, not skipped for good: the next claim sees them once
//!    they commit, whatever their id (there is no high-water mark that could
//!    pass them).
//! 2. Rows that can never be accepted (the hub's own validation, run here)
//!    are set aside for the dead-letter table.
//! 3. The rest are published, in calls of at most 10,000 events and a few
//!    MiB, each retried until the hub answers `APPLIED`, `DUPLICATE` or
//!    `SUPERSEDED` for every event: with the hub's `retry-after-ms` when it
//!    gives one, else with jittered exponential backoff. A call the hub
//!    rejects naming one event (`event N: field …`) moves that row to the
//!    dead-letter set and is sent again without it.
//! 4. Dead rows are copied to `freshness_outbox_dead`, every claimed row is
//!    deleted, and the transaction commits.
//!
//! A relay that dies anywhere before the commit leaves its rows in place
//! (the row locks go with its connection): they are claimed again and
//! published again, which the hub answers `DUPLICATE`. A row is deleted only
//! in the transaction that follows the hub's answer for it.
//!
//! Between claims the relay waits for a notification (`LISTEN
//! freshness_outbox`, sent by the table's trigger at commit) or the poll
//! interval, whichever comes first; a claim that filled its batch is
//! followed by the next at once.

use std::sync::Arc;
use std::time::Duration;

use freshness::pb::{self, hub_client::HubClient};
use freshness::validate::PublishLimits;
use futures::StreamExt;
use metrics::{counter, gauge, histogram};
use rand::Rng;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::Instrument;

use crate::config::{AckLevel, Config};
use crate::metrics as m;
use crate::schema::CHANNEL;

/// Bytes of entities, payloads and trace contexts in one publish call: well
/// under the hub's default 4 MiB message limit.
const MAX_CALL_BYTES: usize = 3 << 20;
/// What one event costs in a call besides its variable fields.
const EVENT_OVERHEAD: usize = 32;
/// First retry delay; doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

const CLAIM: &str = "SELECT id, entity, version, payload, traceparent, tracestate, \
     EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 \
     FROM freshness_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";
const BURY: &str = "INSERT INTO freshness_outbox_dead \
     (id, entity, version, payload, traceparent, tracestate, created_at, error) \
     SELECT o.id, o.entity, o.version, o.payload, o.traceparent, o.tracestate, o.created_at, d.error \
     FROM freshness_outbox o JOIN unnest($1::bigint[], $2::text[]) AS d(id, error) ON o.id = d.id \
     ON CONFLICT (id) DO NOTHING";
const DELETE: &str = "DELETE FROM freshness_outbox WHERE id = ANY($1)";
const DEPTH: &str = "SELECT count(*), \
     COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)::float8 \
     FROM freshness_outbox";

/// Why the relay could not run at all. Everything after start-up (the hub
/// or the database unreachable, a refused publish) is retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The hub address does not parse.
    #[error("invalid hub address {0:?}")]
    InvalidHub(String),
    /// The database URL does not parse.
    #[error("invalid database url: {0}")]
    InvalidDatabaseUrl(tokio_postgres::Error),
    /// A CA, certificate or key file cannot be used.
    #[error("invalid TLS setting: {0}")]
    Tls(String),
}

/// TLS towards an `https://` hub: the system's roots, or the CA given, and
/// the client certificate when given (the files were checked by
/// [`Config::validate`]; read again here, they name the setting if gone).
fn tls_config(config: &Config) -> Result<ClientTlsConfig, RunError> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| RunError::Tls(format!("`{key}` {}: {e}", path.display())))
    };
    // tonic's TLS uses the process's default provider: X25519 first.
    freshness_telemetry::install_crypto_provider();
    let mut tls = ClientTlsConfig::new().with_enabled_roots();
    if let Some(ca) = &config.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read("ca", ca)?));
    }
    if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
        tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
    }
    Ok(tls)
}

/// The bearer token a publish carries: none, the configured one, or the
/// token file's content read now (a rotated Secret is used at once).
#[derive(Clone)]
enum Token {
    None,
    Fixed(MetadataValue<Ascii>),
    File(std::path::PathBuf),
}

impl Token {
    fn from_config(config: &Config) -> Self {
        match (&config.token, &config.token_file) {
            (Some(t), _) => format!("Bearer {}", t.trim())
                .parse()
                .map_or(Self::None, Self::Fixed),
            (None, Some(p)) => Self::File(p.clone()),
            (None, None) => Self::None,
        }
    }

    /// The header value, or why the token file cannot give one.
    fn header(&self) -> Result<Option<MetadataValue<Ascii>>, String> {
        match self {
            Self::None => Ok(None),
            Self::Fixed(v) => Ok(Some(v.clone())),
            Self::File(p) => crate::config::read_token(p)
                .map(Some)
                .map_err(|e| format!("token file {}: {e}", p.display())),
        }
    }
}

/// What went wrong in one connection's life; the relay reconnects.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database connection closed")]
    Closed,
}

/// One outbox row as claimed.
#[derive(Debug)]
struct Row {
    id: i64,
    event: pb::Event,
    /// Seconds since the insert, at the claim.
    age: f64,
}

/// Runs the relay until `shutdown`: claims, publishes, deletes; reconnects to
/// the database with backoff whenever the connection fails.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let db: tokio_postgres::Config = config
        .database_url
        .parse()
        .map_err(RunError::InvalidDatabaseUrl)?;
    let mut endpoint = Endpoint::from_shared(config.hub.clone())
        .map_err(|_| RunError::InvalidHub(config.hub.clone()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if config.hub.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls_config(&config)?)
            .map_err(|e| RunError::Tls(e.to_string()))?;
    }
    let channel = endpoint.connect_lazy();
    let hub = HubClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let relay = Relay {
        token: Token::from_config(&config),
        config,
        db,
        hub,
        shutdown,
    };
    let sampler = tokio::spawn(relay.clone_for_sampler().sample());
    let mut backoff = Backoff::new(relay.config.max_backoff);
    loop {
        match relay.serve_connection(&mut backoff).await {
            Ok(()) => break,
            Err(e) => {
                gauge!(m::DATABASE_CONNECTED).set(0.0);
                tracing::warn!(error = %e, "outbox connection lost; reconnecting");
                if !relay.pause(backoff.next()).await {
                    break;
                }
            }
        }
    }
    sampler.abort();
    Ok(())
}

struct Relay {
    config: Config,
    db: tokio_postgres::Config,
    hub: HubClient<Channel>,
    token: Token,
    shutdown: CancellationToken,
}

impl Relay {
    fn clone_for_sampler(&self) -> Self {
        Self {
            config: self.config.clone(),
            db: self.db.clone(),
            hub: self.hub.clone(),
            token: self.token.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Sleeps `d`; `false` if shutdown came first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Connects, and forwards notifications to the returned `Notify`. The
    /// token is cancelled when the connection ends.
    async fn connect(&self) -> Result<(Client, Arc<Notify>, CancellationToken), ConnectionError> {
        let (client, mut connection) = self.db.connect(NoTls).await?;
        let notify = Arc::new(Notify::new());
        let closed = CancellationToken::new();
        let (n, c) = (notify.clone(), closed.clone());
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => n.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox connection ended");
                        break;
                    }
                }
            }
            c.cancel();
        });
        Ok((client, notify, closed))
    }

    /// One connection's life: `LISTEN`, then claim until shutdown (`Ok`) or
    /// a database error.
    async fn serve_connection(&self, backoff: &mut Backoff) -> Result<(), ConnectionError> {
        let (mut client, notify, closed) = tokio::select! {
            r = self.connect() => r?,
            () = self.shutdown.cancelled() => return Ok(()),
        };
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        *backoff = Backoff::new(self.config.max_backoff);
        gauge!(m::DATABASE_CONNECTED).set(1.0);
        tracing::info!("listening for outbox rows");
        loop {
            let claimed = tokio::select! {
                r = self.claim(&mut client) => r?,
                () = closed.cancelled() => return Err(ConnectionError::Closed),
            };
            let Some(claimed) = claimed else {
                return Ok(()); // shutdown mid-claim: the rows stay for the next relay
            };
            if claimed >= self.config.batch {
                continue;
            }
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep(self.config.poll_interval) => {}
                () = closed.cancelled() => return Err(ConnectionError::Closed),
                () = self.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// One claim: rows claimed, or `None` on shutdown (nothing deleted).
    async fn claim(&self, client: &mut Client) -> Result<Option<usize>, ConnectionError> {
        let tx = client.transaction().await?;
        let limit = i64::try_from(self.config.batch).unwrap_or(i64::MAX);
        let found = tx.query(CLAIM, &[&limit]).await?;
        if found.is_empty() {
            tx.commit().await?;
            return Ok(Some(0));
        }
        let claimed = found.len();
        let mut ids = Vec::with_capacity(claimed);
        let mut dead: Vec<(i64, String)> = Vec::new();
        let mut rows = Vec::with_capacity(claimed);
        let mut oldest = 0f64;
        for r in found {
            let row = Row {
                id: r.try_get(0)?,
                event: pb::Event {
                    entity: r.try_get(1)?,
                    version: 0,
                    payload: r
                        .try_get::<_, Option<Vec<u8>>>(3)?
                        .unwrap_or_default()
                        .into(),
                    traceparent: r.try_get::<_, Option<String>>(4)?.unwrap_or_default(),
                    tracestate: r.try_get::<_, Option<String>>(5)?.unwrap_or_default(),
                    ..Default::default()
                },
                age: r.try_get(6)?,
            };
            ids.push(row.id);
            oldest = oldest.max(row.age);
            let version: i64 = r.try_get(2)?;
            let mut row = row;
            match u64::try_from(version) {
                Ok(v) => row.event.version = v,
                Err(_) => {
                    dead.push((row.id, format!("field `version`: {version} is negative")));
                    continue;
                }
            }
            match check(&row.event) {
                Ok(()) => rows.push(row),
                Err(e) => dead.push((row.id, e)),
            }
        }
        let span = tracing::info_span!(
            "relay.publish",
            rows = freshness_telemetry::num(claimed),
            dead = tracing::field::Empty,
        );
        {
            let mut adopt = freshness_telemetry::Adopt::new(&span);
            for r in &rows {
                if !adopt.wire(&r.event.traceparent, &r.event.tracestate) {
                    break;
                }
            }
            adopt.root_unless_joined();
        }
        let Some(rejected) = self.publish_all(rows).instrument(span.clone()).await else {
            return Ok(None);
        };
        dead.extend(rejected);
        if !dead.is_empty() {
            span.record("dead", freshness_telemetry::num(dead.len()));
            for (id, error) in &dead {
                tracing::error!(id, error = %error, "outbox row the hub can never accept: moved to freshness_outbox_dead");
            }
            let (dead_ids, errors): (Vec<i64>, Vec<String>) = dead.iter().cloned().unzip();
            tx.execute(BURY, &[&dead_ids, &errors]).await?;
        }
        tx.execute(DELETE, &[&ids]).await?;
        tx.commit().await?;
        counter!(m::ROWS_DEAD).increment(dead.len() as u64);
        histogram!(m::ROW_AGE).record(oldest);
        Ok(Some(claimed))
    }

    /// Publishes every row until the hub answered for each; returns the rows
    /// it rejected by index, with its words, or `None` on shutdown.
    async fn publish_all(&self, rows: Vec<Row>) -> Option<Vec<(i64, String)>> {
        let mut rejected = Vec::new();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut call = Vec::new();
            let mut bytes = 0;
            while let Some(r) = rows.peek() {
                let size = EVENT_OVERHEAD
                    + r.event.entity.len()
                    + r.event.payload.len()
                    + r.event.traceparent.len()
                    + r.event.tracestate.len();
                if !call.is_empty()
                    && (bytes + size > MAX_CALL_BYTES
                        || call.len() >= freshness::limits::MAX_EVENTS_PER_PUBLISH)
                {
                    break;
                }
                bytes += size;
                call.extend(rows.next());
            }
            rejected.extend(self.publish_call(call).await?);
        }
        Some(rejected)
    }

    /// One call's rows, retried until answered; rows rejected by index are
    /// taken out and returned.
    async fn publish_call(&self, mut call: Vec<Row>) -> Option<Vec<(i64, String)>> {
        let mut rejected = Vec::new();
        let mut backoff = Backoff::new(self.config.max_backoff);
        while !call.is_empty() {
            let request = pb::PublishRequest {
                events: call.iter().map(|r| r.event.clone()).collect(),
                ack: match self.config.ack_level {
                    AckLevel::Accepted => pb::AckLevel::Accepted,
                    AckLevel::Region => pb::AckLevel::Region,
                    AckLevel::Global => pb::AckLevel::Global,
                } as i32,
                timeout_ms: 0,
            };
            let mut request = tonic::Request::new(request);
            match self.token.header() {
                Ok(Some(v)) => {
                    request.metadata_mut().insert("authorization", v);
                }
                Ok(None) => {}
                Err(e) => {
                    counter!(m::PUBLISH_ERRORS, "code" => "token").increment(1);
                    let wait = backoff.next();
                    tracing::warn!(
                        error = %e,
                        rows = call.len(),
                        retry_in_ms = wait.as_millis() as u64,
                        "no token to publish with; the rows stay in the outbox and are retried",
                    );
                    if !self.pause(wait).await {
                        return None;
                    }
                    continue;
                }
            }
            let started = tokio::time::Instant::now();
            let mut hub = self.hub.clone();
            let answer = tokio::select! {
                r = tokio::time::timeout(self.config.publish_timeout, hub.publish(request)) => r,
                () = self.shutdown.cancelled() => return None,
            };
            let status = match answer {
                Ok(Ok(response)) => match tally(&response.into_inner(), call.len()) {
                    Ok(()) => {
                        histogram!(m::PUBLISH_SECONDS).record(started.elapsed().as_secs_f64());
                        return Some(rejected);
                    }
                    Err(e) => tonic::Status::internal(e),
                },
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(format!(
                    "no answer within {}",
                    humantime::format_duration(self.config.publish_timeout)
                )),
            };
            if status.code() == tonic::Code::InvalidArgument
                && let Some(index) = rejected_index(status.message())
                && index < call.len()
            {
                let row = call.remove(index);
                rejected.push((row.id, status.message().to_owned()));
                continue;
            }
            counter!(m::PUBLISH_ERRORS, "code" => code_label(status.code())).increment(1);
            let wait = retry_after(&status).unwrap_or_else(|| backoff.next());
            tracing::warn!(
                code = ?status.code(),
                error = status.message(),
                rows = call.len(),
                retry_in_ms = wait.as_millis() as u64,
                "publish failed; the rows stay in the outbox and are retried",
            );
            if !self.pause(wait).await {
                return None;
            }
        }
        Some(rejected)
    }

    /// Samples the outbox depth and its oldest row's age every second, on
    /// a connection of its own, until shutdown.
    async fn sample(self) {
        let mut backoff = Backoff::new(self.config.max_backoff.max(Duration::from_secs(1)));
        loop {
            let client = match self.connect().await {
                Ok((client, _, _)) => client,
                Err(e) => {
                    tracing::debug!(error = %e, "depth sampler cannot connect");
                    if !self.pause(backoff.next()).await {
                        return;
                    }
                    continue;
                }
            };
            let mut tick = tokio::time::interval(m::SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = self.shutdown.cancelled() => return,
                }
                match client.query_one(DEPTH, &[]).await {
                    Ok(row) => {
                        let depth: i64 = row.get(0);
                        let oldest: f64 = row.get(1);
                        gauge!(m::OUTBOX_ROWS).set(depth as f64);
                        gauge!(m::OUTBOX_OLDEST).set(oldest);
                        backoff = Backoff::new(self.config.max_backoff);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "depth sampler lost its connection");
                        break;
                    }
                }
            }
        }
    }
}

/// The hub's own validation of one event, with the words it would answer.
fn check(event: &pb::Event) -> Result<(), String> {
    let request = pb::PublishRequest {
        events: vec![event.clone()],
        ..Default::default()
    };
    match freshness::validate::publish(request, PublishLimits::default()) {
        Ok(_) => Ok(()),
        // "event 0: field `entity`: ..." names the call's only event.
        Err(e) => Err(e.to_string().trim_start_matches("event 0: ").to_owned()),
    }
}

/// Counts the hub's answer per event; an answer that does not cover every
/// event with a success is an error (the call is retried).
fn tally(response: &pb::PublishResponse, sent: usize) -> Result<(), String> {
    if response.results.len() != sent {
        return Err(format!(
            "the hub answered {} results for {sent} events",
            response.results.len()
        ));
    }
    let (mut applied, mut duplicate, mut superseded) = (0u64, 0u64, 0u64);
    for r in &response.results {
        match pb::PublishOutcome::try_from(r.outcome) {
            Ok(pb::PublishOutcome::Applied) => applied += 1,
            Ok(pb::PublishOutcome::Duplicate) => duplicate += 1,
            Ok(pb::PublishOutcome::Superseded) => superseded += 1,
            _ => return Err(format!("the hub answered outcome {}", r.outcome)),
        }
    }
    counter!(m::ROWS_PUBLISHED, "result" => "applied").increment(applied);
    counter!(m::ROWS_PUBLISHED, "result" => "duplicate").increment(duplicate);
    counter!(m::ROWS_PUBLISHED, "result" => "superseded").increment(superseded);
    Ok(())
}

/// The event index of an `INVALID_ARGUMENT` that names one
/// (`event 3: field ...`, the hub's words for a malformed event).
fn rejected_index(message: &str) -> Option<usize> {
    let rest = message.strip_prefix("event ")?;
    let (index, tail) = rest.split_once(':')?;
    tail.trim_start().starts_with("field").then_some(())?;
    index.parse().ok()
}

/// The hub's `retry-after-ms` hint.
fn retry_after(status: &tonic::Status) -> Option<Duration> {
    status
        .metadata()
        .get("retry-after-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

fn code_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Internal => "internal",
        _ => "other",
    }
}

/// Jittered exponential backoff: each wait drawn from `[d/2, d]`, `d`
/// doubling from 50 ms up to the cap.
struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(cap: Duration) -> Self {
        Self {
            next: FIRST_BACKOFF.min(cap),
            cap,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.cap);
        let half = d / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_index_the_hub_names() {
        assert_eq!(
            rejected_index("event 3: field `entity`: bad namespace"),
            Some(3)
        );
        assert_eq!(rejected_index("publish carries 20000 events"), None);
        assert_eq!(rejected_index("event 1: nothing"), None);
    }

    #[test]
    fn checks_with_the_hubs_words() {
        let ok = pb::Event {
            entity: "user:1".into(),
            version: 1,
            ..Default::default()
        };
        assert_eq!(check(&ok), Ok(()));
        let zero = pb::Event {
            version: 0,
            ..ok.clone()
        };
        assert!(check(&zero).unwrap_err().starts_with("field `version`"));
        let bad = pb::Event {
            entity: "no colon".into(),
            ..ok
        };
        assert!(check(&bad).unwrap_err().starts_with("field `entity`"));
    }
}
