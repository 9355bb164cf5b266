//! The hub's HTTP/2 serving layer, on the `h2` crate directly.
//!
//! Every call but `Subscribe` is handed to tonic's services (hub, health,
//! reflection) as an `http::Request`, and their response is written back
//! with HTTP/2 flow control, as hyper would. `Subscribe` streams, which
//! carry all of the fan-out, skip hyper and tonic's response path: the
//! session's frames go straight to h2 behind their five-byte gRPC prefix,
//! and the status goes out in the trailers. The same fan-out on bare h2
//! (`transport-floor`) cost two-thirds of the hub's CPU per frame; going
//! around hyper and tonic took 5.5 % of the hub's instructions per delivery
//! at light load and 9–16 % of its CPU where frames are large
//! (BENCHMARKS.md).
//!
//! Bounds: at most [`MAX_STREAMS`] streams per connection; h2 buffers at
//! most a stream's receive window (1 MiB) of unread request data; a
//! response (or a session) is asked for its next frame only once the stream
//! has send capacity, and h2 grants capacity only while less than
//! [`MAX_SEND_BUFFER`] is queued, so a stream queues at most that plus one
//! frame (a node that stopped reading is not polled).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codec::Codec;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

use freshness::pb::raw::hub_server::Hub;
use freshness::wire;

use crate::grpc::HubService;

/// Streams one connection may have open at once (hyper's default).
pub const MAX_STREAMS: u32 = 200;
/// Unsent response bytes h2 keeps per stream (hyper's default).
pub const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Receive windows, per stream and per connection (hyper's defaults).
const WINDOW: u32 = 1024 * 1024;
/// Request headers larger than this are refused (hyper's default).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 keep-alive: a ping this often, and the connection is closed
/// when its answer takes longer than [`KEEPALIVE_TIMEOUT`]. Busy
/// connections are pinged too (hyper pinged only idle ones): 10,000
/// connections cost 500 pings a second.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that has not sent its preface by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the accept loop waits after a failed accept (out of file
/// descriptors, say) before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

const SUBSCRIBE_PATH: &str = "/freshness.v1.Hub/Subscribe";

/// What every call but `Subscribe` is handed to: tonic's routes with their
/// layers, shared by every connection.
pub trait Routes:
    tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Routes for S where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// The services behind the listener.
pub struct Services<S> {
    /// TLS on every connection, when configured.
    pub tls: Option<Arc<crate::tls::TlsServer>>,
    /// Authenticates `Subscribe` streams (the routes have their own layer).
    pub auth: Arc<crate::auth::Auth>,
    /// The hub, whose `Subscribe` is served here.
    pub hub: HubService,
    /// The largest `SubscribeRequest` a stream may send.
    pub subscribe_limit: usize,
    /// Everything else (tonic's routes with their layers).
    pub routes: S,
    /// Applied to the headers of a `Subscribe` answered with an error.
    pub map_status: fn(http::Response<()>) -> http::Response<()>,
}

/// Accepts connections until `shutdown`; each is one task, which starts its
/// graceful shutdown (GOAWAY, then the open streams finish) when `drain`
/// fires. Returns the tracker of those tasks; the listener is closed on
/// return, so a client that connects meanwhile is refused, not left
/// waiting.
pub async fn accept<S>(
    listener: TcpListener,
    services: Arc<Services<S>>,
    shutdown: CancellationToken,
    drain: CancellationToken,
) -> TaskTracker
where
    S: Routes,
{
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        connections.spawn(secure(tcp, info, services.clone(), drain.clone()));
    }
    connections
}

/// The connection, behind its TLS handshake when the hub serves TLS. A
/// handshake that fails (a plain-text client, a certificate the hub does
/// not trust, garbage) ends this connection only.
async fn secure<S>(
    tcp: TcpStream,
    info: TcpConnectInfo,
    services: Arc<Services<S>>,
    drain: CancellationToken,
) where
    S: Routes,
{
    let Some(tls) = services.tls.clone() else {
        return connection(tcp, info, None, services, drain).await;
    };
    match tls.accept(tcp).await {
        Ok((stream, identity)) => connection(stream, info, identity, services, drain).await,
        Err(e) => {
            metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES).increment(1);
            tracing::debug!(peer = ?info.remote_addr, error = %e, "TLS handshake failed");
        }
    }
}

async fn connection<IO, S>(
    tcp: IO,
    info: TcpConnectInfo,
    identity: Option<crate::auth::CertificateIdentity>,
    services: Arc<Services<S>>,
    drain: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    S: Routes,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(tcp);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("no HTTP/2 preface within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let dead = CancellationToken::new();
    if let Some(ping) = conn.ping_pong() {
        tokio::spawn(keepalive(ping, dead.clone()));
    }
    let _stop_keepalive = dead.clone().drop_guard();
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    // Each kind of stream is its own task, sized for itself:
                    // a subscribe stream lives for hours, a call for
                    // milliseconds.
                    let (mut parts, body) = req.into_parts();
                    parts.extensions.insert(info.clone());
                    if let Some(identity) = &identity {
                        parts.extensions.insert(identity.clone());
                    }
                    let req = http::Request::from_parts(parts, body);
                    if req.uri().path() == SUBSCRIBE_PATH {
                        tokio::spawn(subscribe(req, respond, services.clone()));
                    } else {
                        tokio::spawn(call(req, respond, services.routes.clone()));
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection ended with an error");
                    break;
                }
                None => break,
            },
            () = drain.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            () = dead.cancelled() => {
                tracing::debug!("no answer to a keep-alive ping; closing the connection");
                break;
            }
        }
    }
}

/// Pings every [`KEEPALIVE_INTERVAL`]; cancels `dead` when a pong does not
/// come within [`KEEPALIVE_TIMEOUT`], and ends when `dead` is cancelled
/// (the connection ended).
async fn keepalive(mut ping: h2::PingPong, dead: CancellationToken) {
    loop {
        tokio::select! {
            () = dead.cancelled() => return,
            () = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
        }
        let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque()));
        tokio::select! {
            () = dead.cancelled() => return,
            answered = pong => {
                if !matches!(answered, Ok(Ok(_))) {
                    dead.cancel();
                    return;
                }
            }
        }
    }
}

/// A request body read from h2, releasing receive capacity as it goes.
struct RecvBody {
    inner: RecvStream,
    data_done: bool,
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.inner.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.inner.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.inner.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// Any call but `Subscribe`: through tonic's services, the response written
/// back with flow control.
async fn call<S>(req: http::Request<RecvStream>, mut respond: SendResponse<Bytes>, routes: S)
where
    S: Routes,
{
    let (parts, body) = req.into_parts();
    let deadline = grpc_timeout(&parts.headers);
    let body = tonic::body::Body::new(RecvBody {
        inner: body,
        data_done: false,
    });
    let call = routes.oneshot(http::Request::from_parts(parts, body));
    // The call ends early when the client resets the stream (its future is
    // dropped, as hyper drops it) or when the client's deadline passes.
    let resp = tokio::select! {
        Ok(resp) = call => resp,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
        () = sleep_opt(deadline) => tonic::Status::deadline_exceeded("Timeout expired").into_http(),
    };
    if let Err(e) = respond_with(respond, resp).await {
        tracing::debug!(error = %e, "response not written");
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The client's deadline (`grpc-timeout`: at most eight digits and a unit),
/// which tonic's own server enforced on the call; a malformed value is
/// ignored, as tonic does.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

async fn respond_with(
    mut respond: SendResponse<Bytes>,
    resp: http::Response<tonic::body::Body>,
) -> Result<(), h2::Error> {
    let (parts, mut body) = resp.into_parts();
    let end = body.is_end_stream();
    let mut send = respond.send_response(http::Response::from_parts(parts, ()), end)?;
    if end {
        return Ok(());
    }
    loop {
        ready_to_send(&mut send).await?;
        let frame = tokio::select! {
            frame = body.frame() => frame,
            reset = std::future::poll_fn(|cx| send.poll_reset(cx)) => {
                // The client gave up on the call; drop its body.
                return reset.map(|_| ());
            }
        };
        match frame {
            None => return send.send_data(Bytes::new(), true),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return Ok(());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => send.send_data(data, false)?,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return send.send_trailers(trailers);
                    }
                }
            },
        }
    }
}

/// Waits until the stream may send at least one byte, as hyper does before
/// it asks a body for its next frame: a whole frame is then handed to h2,
/// which buffers it (at most [`MAX_SEND_BUFFER`] more is given capacity)
/// until the peer's window takes it.
async fn ready_to_send(send: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
    loop {
        send.reserve_capacity(1);
        if send.capacity() > 0 {
            return Ok(());
        }
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        }
    }
}

/// A `Subscribe` stream: the hub's handler reads the hello and opens the
/// session; its frames go to h2 behind their gRPC prefix, the status in
/// the trailers.
///
/// The opening runs in its own boxed future, freed once the stream is open,
/// so the task a stream lives in for hours holds the session and its pump
/// and not the request it started from (about a kilobyte less per node).
fn subscribe<S>(
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    services: Arc<Services<S>>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: Routes,
{
    let opening = Box::pin(open_subscribe(req, respond, services));
    async move {
        let Some((session, mut send)) = opening.await else {
            return;
        };
        if let Err(e) = pump(session, &mut send).await {
            tracing::debug!(error = %e, "subscribe stream ended by HTTP/2");
        }
    }
}

/// Reads the hello and opens the session, then sends the response head.
/// `None` when the stream was answered with an error (or went away).
async fn open_subscribe<S>(
    mut req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    services: Arc<Services<S>>,
) -> Option<(crate::session::Session, SendStream<Bytes>)>
where
    S: Routes,
{
    // The same authentication as the routes' layer.
    if let Err(status) = crate::auth::layer::authenticate_request(&services.auth, &mut req) {
        let _ = respond.send_response((services.map_status)(status.into_http()), true);
        return None;
    }
    let (parts, body) = req.into_parts();
    if parts
        .headers
        .get("grpc-encoding")
        .is_some_and(|e| e != "identity")
    {
        let status = tonic::Status::unimplemented("compressed requests are not supported");
        let _ = respond.send_response(status.into_http(), true);
        return None;
    }
    let decoder = wire::LeanCodec::<wire::Frame, wire::Request>::default().decoder();
    let inbound = tonic::Streaming::new_request(
        decoder,
        RecvBody {
            inner: body,
            data_done: false,
        },
        None,
        Some(services.subscribe_limit),
    );
    let request = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(parts.headers),
        parts.extensions,
        inbound,
    );
    let session = match services.hub.subscribe(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let _ = respond.send_response((services.map_status)(status.into_http()), true);
            return None;
        }
    };
    let mut head = http::Response::new(());
    head.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let send = respond.send_response(head, false).ok()?;
    Some((session, send))
}

/// Frames smaller than this go out with their prefix in one buffer (h2
/// copies small frames into its write buffer anyway); larger ones as two
/// DATA frames, so their bytes are not copied.
const COPY_BELOW: usize = 1024;

async fn pump(
    mut session: crate::session::Session,
    send: &mut SendStream<Bytes>,
) -> Result<(), h2::Error> {
    loop {
        // A stream without room is not polled: status shows it `blocked`
        // (its node does not read) until room comes.
        send.reserve_capacity(1);
        if send.capacity() == 0 {
            session.set_blocked(true);
            let ready = ready_to_send(send).await;
            session.set_blocked(false);
            ready?;
        }
        let item = tokio::select! {
            item = session.next() => item,
            reset = std::future::poll_fn(|cx| send.poll_reset(cx)) => {
                return reset.map(|_| ());
            }
        };
        match item {
            Some(Ok(wire::Frame(frame))) => {
                let mut prefix = BytesMut::with_capacity(5 + frame.len().min(COPY_BELOW));
                prefix.put_u8(0);
                prefix.put_u32(frame.len() as u32);
                if frame.len() < COPY_BELOW {
                    prefix.put_slice(&frame);
                    send.send_data(prefix.freeze(), false)?;
                } else {
                    send.send_data(prefix.freeze(), false)?;
                    send.send_data(frame, false)?;
                }
            }
            Some(Err(status)) => return send.send_trailers(trailers(&status)),
            None => return send.send_trailers(trailers(&tonic::Status::ok(""))),
        }
    }
}

fn trailers(status: &tonic::Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(v: &str) -> Option<Duration> {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", http::HeaderValue::from_str(v).unwrap());
        grpc_timeout(&h)
    }

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_says() {
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
