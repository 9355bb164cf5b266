//! Metric names, and the Prometheus recorder with its `/metrics` endpoint
//! (installed by `main` only; a relay run without one records into the
//! no-op recorder). Names follow Prometheus conventions; labels come from
//! closed sets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Rows in the outbox (committed, not yet deleted), sampled every second.
pub const OUTBOX_ROWS: &str = "freshness_relay_outbox_rows";
/// Age of the oldest row in the outbox, sampled every second (0 when empty).
pub const OUTBOX_OLDEST: &str = "freshness_relay_outbox_oldest_seconds";
/// Rows the hub answered, by `result` (applied, duplicate, superseded).
pub const ROWS_PUBLISHED: &str = "freshness_relay_rows_published_total";
/// Rows moved to `freshness_outbox_dead` (the hub can never accept them).
pub const ROWS_DEAD: &str = "freshness_relay_rows_dead_total";
/// Publish calls that failed and will be retried, by `code`.
pub const PUBLISH_ERRORS: &str = "freshness_relay_publish_errors_total";
/// Seconds one publish call took, to the hub's answer.
pub const PUBLISH_SECONDS: &str = "freshness_relay_publish_seconds";
/// Seconds from a row's insert to the hub's answer for it (one sample per
/// claim: its oldest row).
pub const ROW_AGE: &str = "freshness_relay_row_age_seconds";
/// 1 while the relay holds a database connection.
pub const DATABASE_CONNECTED: &str = "freshness_relay_database_connected";

/// How often the depth gauges are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

const SECONDS_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];
/// Scrapes served at once; a further connection is closed at once.
const MAX_SCRAPES: usize = 16;
/// How long one scrape connection may stay open.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the recorder's histograms are drained.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder and serves `/metrics` on `addr`. Must be
/// called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    tokio::spawn(upkeep(handle.clone()));
    tokio::spawn(serve(listener, handle));
    Ok(())
}

async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Serves `GET /metrics` over HTTP/1.1.
async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let response = scrape(&req, &handle);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await;
        });
    }
}

fn scrape<B>(req: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, body) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "metrics are served at /metrics\n".to_owned(),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned())
    } else {
        (StatusCode::OK, handle.render())
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
