//! The hub's HTTP listener (`metrics_listen`): Prometheus text at
//! `/metrics`, the live status page at `/` with its stylesheet and script,
//! and the page's data at `/status.json` (`status_json.rs`).
//!
//! The page is three files embedded in the binary (`server/assets/status/`):
//! no CDN, no build step. It polls `/status.json?worst=100` once a second
//! and redraws in place, so it stays small with 10,000 nodes.
//!
//! On a hub with authentication, the page and `/status.json` need the
//! `status` permission, as the Status RPC does: a bearer token in
//! `Authorization`, the token as the password of HTTP Basic (what a browser
//! asks for after a 401, and then sends with the page's own requests), or
//! the client certificate of a TLS listener. `/metrics` stays open to
//! scrapers: it names no node and no entity.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, CertificateIdentity};
use crate::hub::Hub;

const INDEX_HTML: &str = include_str!("../assets/status/index.html");
const STATUS_CSS: &str = include_str!("../assets/status/status.css");
const STATUS_JS: &str = include_str!("../assets/status/status.js");

/// Connections served at once; a further one is closed at once.
const MAX_CONNECTIONS: usize = 16;
/// How long one connection may stay open; then it finishes the request in
/// progress and closes (a browser opens a new one).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// How long a closing connection may take to finish its request.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves the listener until the hub shuts down, over TLS when `tls` is
/// given (`metrics_tls_cert`). Each connection is a task on `tasks` and
/// ends with the hub too, so an open browser tab never holds the hub up.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::TlsServer>>,
    auth: Arc<Auth>,
    hub: Arc<Hub>,
    tasks: TaskTracker,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let shutdown = hub.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "http listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let hub = hub.clone();
        let auth = auth.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let _slot = slot;
            let Some(tls) = tls else {
                let caller = Caller {
                    auth,
                    certificate: None,
                };
                return connection(stream, hub, caller, shutdown).await;
            };
            let handshake = tokio::select! {
                h = tls.accept(stream) => h,
                () = shutdown.cancelled() => return,
            };
            match handshake {
                Ok((stream, certificate)) => {
                    let caller = Caller { auth, certificate };
                    connection(stream, hub, caller, shutdown).await
                }
                Err(e) => tracing::debug!(error = %e, "http listener: TLS handshake failed"),
            }
        });
    }
}

/// Who a connection's requests come from: the hub's credentials and the
/// client certificate of its TLS handshake, if any.
struct Caller {
    auth: Arc<Auth>,
    certificate: Option<CertificateIdentity>,
}

impl Caller {
    /// The answer to a request that may not see the page and its data;
    /// `None` when it may.
    fn denial<B>(&self, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
        if !self.auth.enabled() {
            return None;
        }
        let mut headers = req.headers().clone();
        // HTTP Basic carries the token as its password (the user name is
        // not checked): a browser asks for it once and sends it on.
        if let Some(token) = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(basic_password)
        {
            match HeaderValue::from_str(&format!("Bearer {token}")) {
                Ok(v) => drop(headers.insert(AUTHORIZATION, v)),
                Err(_) => drop(headers.remove(AUTHORIZATION)),
            }
        }
        let denied = |status: tonic::Status, code: StatusCode| {
            let mut r = text(code, format!("{}\n", status.message()));
            if code == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Basic realm=\"Freshness hub status: a token with the status permission as the password\", charset=\"UTF-8\"",
                    ),
                );
            }
            r
        };
        let principal = match self.auth.authenticate(&headers, self.certificate.as_ref()) {
            Ok(p) => p,
            Err(s) => return Some(denied(s, StatusCode::UNAUTHORIZED)),
        };
        self.auth
            .check_status(&principal)
            .err()
            .map(|s| denied(s, StatusCode::FORBIDDEN))
    }
}

/// The password of an HTTP Basic `Authorization` value.
fn basic_password(value: &str) -> Option<String> {
    use base64::Engine as _;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_owned())
}

/// One HTTP/1.1 connection, for at most [`CONNECTION_LIFETIME`].
async fn connection<IO>(
    stream: IO,
    hub: Arc<Hub>,
    caller: Caller,
    shutdown: tokio_util::sync::CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let response = respond(&req, &hub, &caller);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
        () = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// The answer to one request.
fn respond<B>(req: &Request<B>, hub: &Hub, caller: &Caller) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    let path = req.uri().path();
    if path != "/metrics"
        && let Some(denied) = caller.denial(req)
    {
        return denied;
    }
    match path {
        "/metrics" => match crate::metrics::render() {
            Some(body) => with_type(
                Response::new(Full::new(Bytes::from(body))),
                "text/plain; version=0.0.4",
            ),
            None => text(
                StatusCode::NOT_FOUND,
                "this process has no metrics recorder\n".into(),
            ),
        },
        "/" | "/index.html" => page(INDEX_HTML, "text/html; charset=utf-8"),
        "/status.css" => page(STATUS_CSS, "text/css; charset=utf-8"),
        "/status.js" => page(STATUS_JS, "text/javascript; charset=utf-8"),
        "/status.json" => status_json(req.uri().query(), hub),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: the hub serves / (status page), /status.json and /metrics\n".into(),
        ),
    }
}

fn status_json(query: Option<&str>, hub: &Hub) -> Response<Full<Bytes>> {
    let query = match crate::status_json::Query::parse(query) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let status = freshness::pb::StatusResponse::from(hub.status());
    let stats = hub.stats.view(status.now_us);
    let doc = crate::status_json::build(status, &stats, &query);
    match serde_json::to_vec(&doc) {
        Ok(body) => {
            let mut r = with_type(
                Response::new(Full::new(Bytes::from(body))),
                "application/json",
            );
            r.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the status: {e}\n"),
        ),
    }
}

fn page(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = with_type(
        Response::new(Full::new(Bytes::from_static(body.as_bytes()))),
        content_type,
    );
    let h = r.headers_mut();
    // Everything the page loads comes from the hub itself.
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = with_type(
        Response::new(Full::new(Bytes::from(body))),
        "text/plain; charset=utf-8",
    );
    *r.status_mut() = status;
    r
}

fn with_type(mut r: Response<Full<Bytes>>, content_type: &'static str) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
