//! Runs a hub on a listener until shutdown: the tonic server, its layers,
//! health and reflection, and the orderly stop.

use freshness::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use freshness::pb::raw::hub_server::HubServer;

use crate::config::Config;
use crate::grpc::HubService;
use crate::hub::Durable;
use crate::hub::Hub;
use crate::shard::ShardMemory;

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
        fsync = ?config.fsync,
        "durable log opened"
    );
    Ok(Some(Durable::Disk { opened, memories }))
}

/// Rewrites tonic's answers to a request that does not decode into the codes
/// of SPEC §4 (see [`crate::error::map_decode_status`]), for answers given
/// in the headers (unary calls; streams map them where they read): an
/// oversized request is `RESOURCE_EXHAUSTED`, not `OUT_OF_RANGE`, and bytes
/// that are not a valid message are `INVALID_ARGUMENT`, not `INTERNAL`.
fn decode_errors_to_spec_codes<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers_mut();
    let message = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    let oversize = message.contains("too%20large") || message.contains("too large");
    // `grpc-message` is percent-encoded on the wire.
    let undecodable = message.starts_with("failed%20to%20decode%20Protobuf%20message")
        || message.starts_with(crate::error::DECODE_ERROR_PREFIX);
    let code = match h.get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some("11") if oversize => Some("8"),
        Some("13") if undecodable => Some("3"),
        _ => None,
    };
    if let Some(code) = code {
        h.insert("grpc-status", http::HeaderValue::from_static(code));
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
    let tracker = TaskTracker::new();
    let grace = config.shutdown_grace;
    let max_message = config.max_message_bytes;
    let hub = Hub::new(config, opened, shutdown.clone(), &tracker);
    tracing::info!(
        region = %hub.config.region,
        hub_id = %hub.config.hub_id,
        epoch = hub.epoch,
        shards = hub.shard_count(),
        addr = ?listener.local_addr().ok(),
        "hub serving"
    );

    crate::replication::spawn_links(&hub, &tracker);
    tracker.spawn(crate::metrics::sample(hub.clone()));
    tracker.spawn(crate::stats::sample_every_second(hub.clone()));
    if let Some(http) = http {
        tracker.spawn(crate::web::serve(http, hub.clone()));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::raw::hub_server::HubServer<HubService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = HubService::new(hub.clone());
    let subscribe_limit = subscribe_message_limit(hub.shard_count()).min(max_message);
    let hub_service = HubServer::new(service.clone())
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    // Layers, outermost first: SPEC §4 status mapping. Limits live in the
    // core as bounded queues, where a full one is an answer. `Subscribe`
    // is served by the transport itself (see `transport.rs`).
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(hub_service)
        .prepare();
    let routes = tower::ServiceBuilder::new()
        .layer(tower::util::MapResponseLayer::new(
            decode_errors_to_spec_codes,
        ))
        .service(routes);
    let services = std::sync::Arc::new(crate::transport::Services {
        hub: service,
        subscribe_limit,
        routes,
        map_status: decode_errors_to_spec_codes::<()>,
    });
    let drain = CancellationToken::new();
    let accepting = crate::transport::accept(listener, services, shutdown.clone(), drain.clone());
    let server = async move {
        let connections = accepting.await;
        health
            .set_not_serving::<pb::raw::hub_server::HubServer<HubService>>()
            .await;
        tracing::info!("shutting down: refusing new calls, ending streams");
        drain.cancel();
        connections.close();
        connections.wait().await;
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
        Err(_) => tracing::warn!(
            ?grace,
            "shutdown grace period expired; dropping what is left"
        ),
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
