//! Runs a hub on a listener until shutdown: the tonic server, its layers,
//! health and reflection, and the orderly stop.

use freshness::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::codec::raw::hub_server::HubServer;

use std::sync::Arc;

use crate::auth::Auth;
use crate::auth::layer::AuthLayer;
use crate::config::Config;
use crate::grpc::HubService;
use crate::hub::Durable;
use crate::hub::Hub;
use crate::shard::ShardMemory;
use crate::tls::TlsServer;

/// How long the connections left at the end of the grace period get to
/// close once dropped (they end at their next poll).
const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a stopping hub waits for the durable log's writer to flush
/// what it wrote (with `fsync = never`, possibly much) and unmark the
/// data directory.
const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the hub stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Reflection could not load the protocol descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The durable log cannot be opened.
    #[error(transparent)]
    Log(#[from] crate::store::OpenError),
    /// Opening the log did not finish (its task failed).
    #[error("opening the log failed: {0}")]
    LogTask(#[from] tokio::task::JoinError),
    /// A TLS or auth file cannot be used.
    #[error("{0}")]
    Security(String),
    /// The stream lane's runtime cannot be started.
    #[error("cannot start the stream lane's threads: {0}")]
    Runtime(std::io::Error),
}

/// The stream lane (`lanes.rs`): a runtime of its own for the connections
/// that carry `Subscribe` streams, one worker thread per core the process
/// may use. Shut down without waiting when dropped, after the connections
/// it ran have ended (a runtime may not be dropped where it could block).
struct StreamLane(Option<tokio::runtime::Runtime>);

impl StreamLane {
    fn start() -> Result<Self, RunError> {
        let workers = std::thread::available_parallelism().map_or(1, usize::from);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("freshness-streams")
            .on_thread_start(crate::lanes::enter_stream_lane)
            .on_thread_unpark(crate::lanes::woke)
            .enable_all()
            .build()
            .map(|r| StreamLane(Some(r)))
            .map_err(RunError::Runtime)
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(r) => r.handle().clone(),
            None => unreachable!("the runtime is taken only when dropped"),
        }
    }
}

impl Drop for StreamLane {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The listeners' TLS and the auth state, loaded from the files a config
/// names.
#[derive(Debug)]
pub struct Security {
    /// The gRPC listener's TLS, when configured.
    pub tls: Option<Arc<TlsServer>>,
    /// The metrics listener's TLS, when configured.
    pub metrics_tls: Option<Arc<TlsServer>>,
    /// Who may do what.
    pub auth: Arc<Auth>,
}

/// Loads [`Security`] from the files `config` names. The binary calls it
/// before it binds a port, so that a missing or invalid file stops it first
/// (exit 64).
pub fn load_security(config: &Config) -> Result<Security, String> {
    let tls = config.tls_files().map(TlsServer::load).transpose()?;
    let metrics_tls = config
        .metrics_tls_files()
        .map(TlsServer::load_http1)
        .transpose()?;
    let sources = config.auth_sources();
    let auth = if sources.enabled() || sources.policy.is_some() {
        Auth::load(sources)?
    } else {
        Auth::disabled()
    };
    Ok(Security {
        tls,
        metrics_tls,
        auth,
    })
}

/// Opens the durable log `config` names and recovers it (blocking: it reads
/// every retained record, one segment at a time, into the shards' memory);
/// `None` for an ephemeral hub. The binary calls it before it binds a port,
/// so that a directory it cannot use or a damaged log stops it first.
pub fn open_log(config: &Config) -> Result<Option<Durable>, crate::store::OpenError> {
    if config.log == crate::config::LogBackend::JetStream {
        return Err(crate::store::OpenError::JetStream(
            "log = jetstream is opened with jetstream::open, not open_log".into(),
        ));
    }
    if config.ephemeral {
        return Ok(None);
    }
    struct Rebuild<'a> {
        config: &'a Config,
        /// Made at each shard's first record, which sets where its
        /// in-memory log starts.
        memories: Vec<Option<ShardMemory>>,
        records: u64,
    }
    impl crate::store::Restore for Rebuild<'_> {
        fn record(&mut self, shard: u32, r: crate::store::Recovered) {
            self.records += 1;
            let config = self.config;
            if let Some(slot) = self.memories.get_mut(shard as usize) {
                slot.get_or_insert_with(|| config.shard_memory(r.seq))
                    .restore(r.seq, r.entry);
            }
        }
    }
    let mut rebuild = Rebuild {
        config,
        memories: (0..config.shards).map(|_| None).collect(),
        records: 0,
    };
    let opened = crate::store::open(
        &config.data_dir,
        config.shards,
        config.retention(),
        config.repair,
        &mut rebuild,
    )?;
    // A shard with nothing on disk starts after its head.
    let memories = rebuild
        .memories
        .into_iter()
        .zip(&opened.heads)
        .map(|(m, head)| m.unwrap_or_else(|| config.shard_memory(head + 1)))
        .collect();
    tracing::info!(
        data_dir = %config.data_dir.display(),
        epoch = opened.epoch,
        new_epoch = opened.new_epoch,
        records = rebuild.records,
        fsync = config.fsync.as_str(),
        "durable log opened"
    );
    Ok(Some(Durable::Disk { opened, memories }))
}

/// Rewrites tonic's answer to a request over its decoding limit, given in
/// the headers (unary calls; streams map theirs where they read, with
/// [`crate::error::map_decode_status`]), to the code of SPEC §4, by code
/// alone: `OUT_OF_RANGE`, which no handler of the hub answers, becomes
/// `RESOURCE_EXHAUSTED`. (Bytes that are not a valid message are
/// `INVALID_ARGUMENT` at the decoder already, `codec::LeanDecoder`.)
fn decode_errors_to_spec_codes<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers_mut();
    if h.get("grpc-status").is_some_and(|v| v == "11") {
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    resp
}

/// Serves the hub on `listener` until `shutdown` is cancelled, then ends
/// every stream with a goodbye and drains within the grace period. Opens
/// the durable log first (see [`open_log`]).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with_http(config, listener, None, shutdown).await
}

/// [`run`], and the HTTP listener (`metrics_listen`: `/metrics`, the status
/// page at `/`, `/status.json`) on `http` when given.
pub async fn run_with_http(
    config: Config,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    let opened = if config.log == crate::config::LogBackend::JetStream {
        Some(Durable::JetStream(crate::jetstream::open(&config).await?))
    } else {
        let for_open = config.clone();
        tokio::task::spawn_blocking(move || open_log(&for_open)).await??
    };
    serve_with_http(config, opened, listener, http, shutdown).await
}

/// [`run`] on a log already opened with [`open_log`].
pub async fn serve(
    config: Config,
    opened: Option<Durable>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    serve_with_http(config, opened, listener, None, shutdown).await
}

/// [`serve`], and the HTTP listener (`metrics_listen`: `/metrics`, the
/// status page at `/`, `/status.json`) on `http` when given.
pub async fn serve_with_http(
    config: Config,
    opened: Option<Durable>,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    let Security {
        tls,
        metrics_tls,
        auth,
    } = load_security(&config).map_err(RunError::Security)?;
    let tracker = TaskTracker::new();
    // Two lanes (`lanes.rs`): the writers' calls here, with the shard
    // actors; the nodes' streams on threads of their own, beside the work
    // that walks every node (the metrics sampler, the status page), which
    // would otherwise hold up a writer's call for as long.
    let lane = StreamLane::start()?;
    let streams = lane.handle();
    let grace = config.shutdown_grace;
    let max_message = config.max_message_bytes;
    let keepalive = (config.keepalive_interval, config.keepalive_timeout);
    let hub = Hub::new(config, opened, shutdown.clone(), &tracker);
    let data_dir = hub.data_dir.clone();
    tracing::info!(
        region = %hub.config.region,
        hub_id = %hub.config.hub_id,
        epoch = hub.epoch,
        shards = hub.shard_count(),
        shard_actors = hub.actors.count(),
        addr = ?listener.local_addr().ok(),
        tls = tls.is_some(),
        auth = auth.enabled(),
        "hub serving"
    );
    {
        let mut watched = Vec::new();
        for tls in [&tls, &metrics_tls].into_iter().flatten() {
            let t = tls.clone();
            watched.push(crate::reload::Watched {
                files: tls.files(),
                reload: Arc::new(move || t.reload()),
            });
        }
        let a = auth.clone();
        watched.push(crate::reload::Watched {
            files: auth.files(),
            reload: Arc::new(move || a.reload()),
        });
        tracker.spawn(crate::reload::watch(watched, shutdown.clone()));
    }

    crate::replication::spawn_links(&hub, &tracker);
    {
        let hub = hub.clone();
        let sampler = crate::metrics::sample(
            hub.config.peers.keys().cloned().collect(),
            move || crate::metrics::Snapshot {
                queue_depths: hub.queue_depths(),
                status: hub.status(),
            },
            shutdown.clone(),
        );
        tracker.spawn_on(sampler, &streams);
    }
    tracker.spawn(crate::stats::sample_every_second(hub.clone()));
    if let Some(http) = http {
        tracker.spawn_on(
            crate::web::serve(
                http,
                metrics_tls,
                auth.clone(),
                hub.clone(),
                tracker.clone(),
            ),
            &streams,
        );
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<crate::codec::raw::hub_server::HubServer<HubService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = HubService::with_auth(hub.clone(), auth.clone());
    let hub_routes = crate::transport::HubRoutes {
        server: HubServer::new(service.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        hub: service,
        subscribe_limit: subscribe_message_limit(hub.shard_count()).min(max_message),
    };
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(hub_routes)
        .prepare();

    // The one tower stack. Every call — Publish, Subscribe, Status, health,
    // reflection — passes every layer, outermost first:
    //
    //   0. authentication (`auth::layer::AuthLayer`): the caller's
    //      principal (bearer token, or the client certificate the TLS
    //      acceptor verified) into the request's extensions, or
    //      UNAUTHENTICATED before any handler runs; health is open. The
    //      handlers check what the principal may do (PERMISSION_DENIED);
    //   1. SPEC §4 status mapping of undecodable and oversized requests
    //      (answers in the headers; streams map theirs where they read);
    //   2. the client's deadline (`grpc-timeout`) on the call's answer;
    //   3. the routes: health, reflection, and the hub (`Subscribe` opened
    //      by `grpc.rs` and streamed by `transport::SessionBody`, the other
    //      methods through tonic's generated server).
    //
    // Limits live in the core as bounded queues, where a full one is an
    // answer; message limits in the codecs (`max_message_bytes`, and
    // `subscribe_message_limit` for streams).
    let stack = tower::ServiceBuilder::new()
        .layer(AuthLayer::new(auth.clone()))
        .layer(tower::util::MapResponseLayer::new(
            decode_errors_to_spec_codes,
        ))
        .layer(crate::transport::DeadlineLayer)
        .service(routes);

    // The connections: accepted TCP, each behind its TLS handshake when the
    // hub serves TLS (`tls.rs`; done in the connection's own task, so a slow
    // or hostile handshake holds up no other), the verified client
    // certificate's identity then in every request's extensions.
    let incoming = crate::transport::tcp_incoming(listener);
    let settings = crate::transport::Settings {
        max_streams: crate::transport::MAX_STREAMS,
        keepalive_interval: keepalive.0,
        keepalive_timeout: keepalive.1,
    };
    // Connections and their streams; shutdown waits for every one, and
    // drops what is left when the grace period is over.
    let connections = TaskTracker::new();
    let stopping = crate::transport::Stopping::default();
    let abort = stopping.abort.clone();
    let server = {
        let shutdown = shutdown.clone();
        let connections = connections.clone();
        let hub = hub.clone();
        async move {
            crate::transport::serve(
                incoming,
                tls,
                stack,
                settings,
                shutdown,
                stopping.clone(),
                connections.clone(),
                Some(streams),
            )
            .await;
            health
                .set_not_serving::<crate::codec::raw::hub_server::HubServer<HubService>>()
                .await;
            tracing::info!("shutting down: refusing new calls, ending streams");
            // Goodbye first: every session was cancelled with the hub and
            // sends its goodbye when its stream next has room. Then GOAWAY,
            // once they all have, or half the grace period on (a node that
            // does not read never gets its goodbye).
            let _ = tokio::time::timeout(grace / 2, hub.sessions_ended()).await;
            drop(hub);
            stopping.drain.cancel();
            connections.close();
            connections.wait().await;
        }
    };
    let server = tokio::spawn(server);
    shutdown.cancelled().await;
    drop(hub);
    let drained = async {
        let served = server.await;
        tracker.close();
        tracker.wait().await;
        served
    };
    match tokio::time::timeout(grace, drained).await {
        Ok(Ok(())) => {}
        Ok(Err(join)) => tracing::error!(error = %join, "grpc server task failed"),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "shutdown grace period expired; dropping what is left"
            );
            abort.cancel();
            connections.close();
            if tokio::time::timeout(ABORT_WAIT, connections.wait())
                .await
                .is_err()
            {
                tracing::warn!("connections still open after they were dropped");
            }
        }
    }
    drop(lane);
    // The log's writer stops once the shard actors have: it flushes what
    // it wrote and unmarks the directory (`store`, "What a machine crash
    // may take").
    if let Some(dir) = data_dir {
        let stopped = tokio::task::spawn_blocking(move || dir.writer_stopped(WRITER_WAIT)).await;
        if !matches!(stopped, Ok(true)) {
            tracing::warn!(
                wait = ?WRITER_WAIT,
                "the log writer is still running; the hub stops without it"
            );
        }
    }
    tracing::info!("hub stopped");
    Ok(())
}

/// The largest `SubscribeRequest` a stream may send (unless the configured
/// message limit is lower): room for a hello with the most namespaces and
/// for a resume cursor (or an ack with `applied`) of this hub's shard count,
/// and then some.
///
/// A stream's decode buffer grows to its largest message and keeps that
/// size while the stream lives, so with the publish limit (4 MiB) every
/// stream could hold 4 MiB for its lifetime: 16 streams that opened with a
/// 4 MiB hello took a hub from 16 to 86 MiB.
pub fn subscribe_message_limit(shards: u32) -> usize {
    256 * 1024 + 2 * 11 * shards as usize
}
