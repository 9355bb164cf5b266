//! The agent's metric names and its `/metrics` endpoint (Prometheus text),
//! installed by `main` only: without a recorder the counters are no-ops.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Invalidations applied to Redis (newer than the entity's tombstone).
pub const APPLIED: &str = "freshness_agent_applied_total";
/// Invalidations ignored: a version older than or equal to one applied.
pub const IGNORED: &str = "freshness_agent_ignored_total";
/// Keys deleted by invalidations, resets and fail-closed drops.
pub const DELETED: &str = "freshness_agent_deleted_keys_total";
/// Resets applied, by reason.
pub const RESETS: &str = "freshness_agent_resets_total";
/// Fills refused by `freshness_fill` (read from Redis, all apps together).
pub const REFUSED_FILLS: &str = "freshness_agent_refused_fills";
/// Seconds per Redis round trip of a batch of invalidations.
pub const REDIS_SECONDS: &str = "freshness_agent_redis_seconds";
/// The feed's staleness in seconds (-1 when unknown).
pub const STALENESS: &str = "freshness_agent_staleness_seconds";
/// 1 while a namespace fails closed, by namespace.
pub const FAIL_CLOSED: &str = "freshness_agent_fail_closed";
/// Times Redis was found restarted or emptied, and the agent started clean.
pub const WIPES: &str = "freshness_agent_redis_wipes_total";
/// Redis calls that failed.
pub const REDIS_ERRORS: &str = "freshness_agent_redis_errors_total";

const LATENCY_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0,
];

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr`.
/// Must be called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REDIS_SECONDS.into()), &LATENCY_BUCKETS)
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    tokio::spawn(serve(listener, handle));
    Ok(())
}

/// One scrape at a time is plenty for a sidecar; each has 10 s.
async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        handle.run_upkeep();
        let body = handle.render();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 2048];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            let response = if head.starts_with("GET /metrics") {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                let msg = "metrics are served at /metrics\n";
                format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{msg}",
                    msg.len()
                )
            };
            let _ = stream.write_all(response.as_bytes()).await;
        })
        .await;
    }
}
