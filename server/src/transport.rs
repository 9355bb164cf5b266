//! The hub's HTTP/2 server: hyper's, under tonic's router.
//!
//! [`serve`] takes a stream of accepted connections ([`tcp_incoming`]),
//! puts each behind its TLS handshake when the hub serves TLS (in the
//! connection's own task; the verified client certificate's identity goes
//! into every request's extensions, for the authentication layer), and
//! serves it with hyper's HTTP/2 server over one tower stack (composed in
//! `server.rs`): every call, `Subscribe` included, goes through the same
//! layers. Every task it starts — each connection, and
//! each HTTP/2 stream hyper spawns — is tracked, so shutdown waits for all
//! of them.
//!
//! `Subscribe` is routed here ([`HubRoutes`]) rather than through tonic's
//! generated handler, for its response body only: the opening (hello,
//! validation, registration) is `grpc.rs`'s, and the body is the session
//! itself ([`SessionBody`]), which hands hyper each pre-encoded message as
//! one `Bytes` with its gRPC prefix already in place, then the status in
//! the trailers. Nothing is encoded or copied per stream.
//!
//! Bounds: at most [`Settings::max_streams`] streams per connection; h2
//! buffers at most a stream's receive window (1 MiB) of unread request
//! data; hyper asks a response body for its next frame only once the stream
//! has send capacity, and h2 grants capacity only while less than
//! [`MAX_SEND_BUFFER`] is queued, so a stream queues at most that plus one
//! message (a node that stopped reading is not polled: status shows it
//! `blocked`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body::{Body, Frame};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codec::Codec;
use tonic::server::NamedService;
use tonic::transport::server::Connected;
use tower::ServiceExt;

use crate::codec::raw::hub_server::{Hub, HubServer};
use freshness::wire;

use crate::grpc::HubService;
use crate::lanes::{Lane, Rewind};
use crate::session::Session;

/// Unsent response bytes h2 keeps per stream (hyper's default).
pub const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Receive windows, per stream and per connection (hyper's defaults).
const WINDOW: u32 = 1024 * 1024;
/// Request headers larger than this are refused (hyper's default).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// A connection that has sent nothing by then (not even the HTTP/2
/// preface) is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the accept loop waits after a failed accept (out of file
/// descriptors, say) before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

const SUBSCRIBE_PATH: &str = "/freshness.v1.Hub/Subscribe";

/// How every connection is served.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Streams one connection may have open at once.
    pub max_streams: u32,
    /// An HTTP/2 ping goes out after this long without a frame from the
    /// peer...
    pub keepalive_interval: Duration,
    /// ...and the connection is closed when its answer takes longer.
    pub keepalive_timeout: Duration,
}

/// Streams one connection may have open at once (hyper's default).
pub const MAX_STREAMS: u32 = 200;

/// What every call is handed to: the tower stack, shared by every
/// connection.
pub trait Stack:
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

impl<S> Stack for S where
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

/// The accepted TCP connections of `listener`, with `TCP_NODELAY` set. A
/// failed accept (out of file descriptors, say) is logged and retried after
/// a pause rather than ending the stream.
pub fn tcp_incoming(listener: TcpListener) -> impl Stream<Item = TcpStream> + Send + 'static {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY not set");
                    }
                    return Some((tcp, listener));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    })
}

/// Spawns hyper's tasks (one per HTTP/2 stream) on a tracker.
#[derive(Clone)]
struct Tracked(TaskTracker);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// When a running connection is told to stop.
#[derive(Debug, Clone, Default)]
pub struct Stopping {
    /// Start the graceful shutdown: GOAWAY, then the open streams finish.
    pub drain: CancellationToken,
    /// Drop the connection now (the grace period is over).
    pub abort: CancellationToken,
}

/// Serves every connection of `incoming` until `stop` fires, then drops
/// `incoming` (a listener inside it closes, so a client that connects
/// meanwhile is refused, not left waiting) and returns. Each connection is
/// one task on `tasks`, as is each of its streams; `stopping` ends them.
/// The caller waits for `tasks`.
///
/// With `streams` (the stream lane's runtime, see `lanes.rs`), each
/// connection is served on the lane of its first call: here, on the
/// runtime `serve` runs on, or on `streams`. Without, every connection is
/// served here.
#[allow(clippy::too_many_arguments)]
pub async fn serve<I, S>(
    incoming: I,
    tls: Option<Arc<crate::tls::TlsServer>>,
    stack: S,
    settings: Settings,
    stop: CancellationToken,
    stopping: Stopping,
    tasks: TaskTracker,
    streams: Option<Handle>,
) where
    I: Stream<Item = TcpStream>,
    S: Stack,
{
    let mut http2 = hyper::server::conn::http2::Builder::new(Tracked(tasks.clone()));
    http2
        .timer(TokioTimer::new())
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_concurrent_streams(settings.max_streams)
        .max_send_buf_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout);
    let serving = Serving {
        tls,
        stack,
        http2: Arc::new(http2),
        stopping,
        tasks: tasks.clone(),
        calls: Handle::current(),
        streams,
    };
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let tcp = tokio::select! {
            () = stop.cancelled() => break,
            tcp = incoming.next() => match tcp {
                Some(tcp) => tcp,
                None => break,
            },
        };
        tasks.spawn(serving.clone().route(tcp));
    }
}

/// What every connection is served with.
#[derive(Clone)]
struct Serving<S> {
    tls: Option<Arc<crate::tls::TlsServer>>,
    stack: S,
    http2: Arc<hyper::server::conn::http2::Builder<Tracked>>,
    stopping: Stopping,
    tasks: TaskTracker,
    /// The call lane: the runtime the accept loop runs on.
    calls: Handle,
    /// The stream lane, when there are two.
    streams: Option<Handle>,
}

impl<S: Stack> Serving<S> {
    /// Puts a connection on its lane, behind its TLS handshake when the hub
    /// serves TLS. A handshake that fails (a plain-text client, a
    /// certificate the hub does not trust, garbage, a record cut short)
    /// ends this connection only.
    async fn route(self, tcp: TcpStream) {
        let info = tcp.connect_info();
        let Some(streams) = self.streams.clone() else {
            // One runtime: no lane to choose.
            return match self.tls.clone() {
                None => self.connection(tcp, info, None).await,
                Some(tls) => {
                    if let Some((tls, identity)) = self.handshake(&tls, tcp).await {
                        self.connection(tls, info, identity).await;
                    }
                }
            };
        };
        let Some(tls) = self.tls.clone() else {
            // Plain text: the first call is read here, and the connection
            // moves to the stream lane when it is a stream.
            let mut tcp = tcp;
            let Some((lane, read)) = self.first_call(&mut tcp).await else {
                return;
            };
            match lane {
                Lane::Calls => self.connection(Rewind::new(read, tcp), info, None).await,
                Lane::Streams => {
                    let tcp = match tcp.into_std() {
                        Ok(tcp) => tcp,
                        Err(e) => return tracing::debug!(error = %e, "moving a connection"),
                    };
                    let tasks = self.tasks.clone();
                    tasks.spawn_on(
                        async move {
                            match TcpStream::from_std(tcp) {
                                Ok(tcp) => {
                                    self.connection(Rewind::new(read, tcp), info, None).await
                                }
                                Err(e) => tracing::debug!(error = %e, "moving a connection"),
                            }
                        },
                        &streams,
                    );
                }
            }
            return;
        };
        // TLS: the handshake (public-key work) is done on the stream lane,
        // where the connection's socket then stays registered; a call
        // connection is served on the call lane, its socket's readiness
        // still noticed by the stream lane's I/O driver.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => return tracing::debug!(error = %e, "moving a connection"),
        };
        let tasks = self.tasks.clone();
        tasks.spawn_on(
            async move {
                let tcp = match TcpStream::from_std(tcp) {
                    Ok(tcp) => tcp,
                    Err(e) => return tracing::debug!(error = %e, "moving a connection"),
                };
                let Some((mut stream, identity)) = self.handshake(&tls, tcp).await else {
                    return;
                };
                let Some((lane, read)) = self.first_call(&mut stream).await else {
                    return;
                };
                let io = Rewind::new(read, stream);
                match lane {
                    Lane::Streams => self.connection(io, info, identity).await,
                    Lane::Calls => {
                        let (tasks, calls) = (self.tasks.clone(), self.calls.clone());
                        tasks.spawn_on(self.connection(io, info, identity), &calls);
                    }
                }
            },
            &streams,
        );
    }

    async fn handshake(
        &self,
        tls: &crate::tls::TlsServer,
        tcp: TcpStream,
    ) -> Option<(
        tokio_rustls::server::TlsStream<TcpStream>,
        Option<crate::auth::CertificateIdentity>,
    )> {
        let handshake = tokio::select! {
            h = tls.accept(tcp) => h,
            () = self.stopping.drain.cancelled() => return None,
        };
        match handshake {
            Ok(accepted) => Some(accepted),
            Err(e) => {
                metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES).increment(1);
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
        }
    }

    /// The connection's lane and what was read to learn it (`lanes.rs`),
    /// counted; `None` when the client closed it, sent nothing within
    /// [`HANDSHAKE_TIMEOUT`], or the hub is stopping.
    async fn first_call<IO: AsyncRead + Unpin>(
        &self,
        io: &mut IO,
    ) -> Option<(Lane, bytes::BytesMut)> {
        let first = tokio::select! {
            first = crate::lanes::first_call(io, HANDSHAKE_TIMEOUT) => first,
            () = self.stopping.drain.cancelled() => return None,
        };
        let Some((lane, read)) = first else {
            tracing::debug!(
                "nothing received within {HANDSHAKE_TIMEOUT:?}; closing the connection"
            );
            return None;
        };
        let label = match lane {
            Lane::Calls => "calls",
            Lane::Streams => "streams",
        };
        metrics::counter!(crate::metrics::CONNECTIONS, "lane" => label).increment(1);
        Some((lane, read))
    }

    /// One connection: hyper's HTTP/2 server over the stack, each call told
    /// the connection's peer (`tonic::Request::remote_addr`) and its client
    /// certificate's identity.
    async fn connection<IO, Info>(
        self,
        io: IO,
        info: Info,
        identity: Option<crate::auth::CertificateIdentity>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Info: Clone + Send + Sync + 'static,
    {
        connection(io, info, identity, self.stack, self.http2, self.stopping).await;
    }
}

/// One connection: hyper's HTTP/2 server over the stack, each call told
/// the connection's peer (`tonic::Request::remote_addr`) and its client
/// certificate's identity.
async fn connection<IO, Info, S>(
    io: IO,
    info: Info,
    identity: Option<crate::auth::CertificateIdentity>,
    stack: S,
    http2: Arc<hyper::server::conn::http2::Builder<Tracked>>,
    stopping: Stopping,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Info: Clone + Send + Sync + 'static,
    S: Stack,
{
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let mut req = req.map(tonic::body::Body::new);
        req.extensions_mut().insert(info.clone());
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
        stack.clone().oneshot(req)
    });
    let heard = Arc::new(AtomicBool::new(false));
    let io = Heard {
        io,
        heard: heard.clone(),
    };
    let conn = http2.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let silent = async {
        tokio::time::sleep(HANDSHAKE_TIMEOUT).await;
        if heard.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        ended = conn.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        () = silent => {
            tracing::debug!("nothing received within {HANDSHAKE_TIMEOUT:?}; closing the connection");
            return;
        }
        () = stopping.drain.cancelled() => {
            if !heard.load(Ordering::Relaxed) {
                // Not even a preface: nothing to finish.
                return;
            }
        }
    }
    // GOAWAY, and a ping: h2 closes once the peer answered it and the open
    // streams are done. A peer that answers nothing is dropped at the end
    // of the grace period.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        ended = conn => {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error while draining");
            }
        }
        () = stopping.abort.cancelled() => {
            tracing::debug!("connection still open at the end of the grace period; dropped");
        }
    }
}

/// A connection's I/O, noting that the peer sent something (for
/// [`HANDSHAKE_TIMEOUT`]).
struct Heard<IO> {
    io: IO,
    heard: Arc<AtomicBool>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Heard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before && !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Heard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The `freshness.v1.Hub` service as the router sees it: `Subscribe` opened
/// by the hub's handler and answered with a [`SessionBody`], every other
/// method by tonic's generated server.
#[derive(Clone)]
pub struct HubRoutes {
    /// The handlers.
    pub hub: HubService,
    /// The generated server over them (its message limits set).
    pub server: HubServer<HubService>,
    /// The largest `SubscribeRequest` a stream may send.
    pub subscribe_limit: usize,
}

impl NamedService for HubRoutes {
    const NAME: &'static str = <HubServer<HubService> as NamedService>::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<tonic::body::Body>> for HubRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.server, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() == SUBSCRIBE_PATH {
            Box::pin(subscribe(req, self.hub.clone(), self.subscribe_limit))
        } else {
            Box::pin(self.server.call(req))
        }
    }
}

/// A `Subscribe` call: the hub's handler reads the hello and opens the
/// session, whose messages are then the response body.
async fn subscribe(
    req: http::Request<tonic::body::Body>,
    hub: HubService,
    limit: usize,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let (parts, body) = req.into_parts();
    if parts
        .headers
        .get("grpc-encoding")
        .is_some_and(|e| e != "identity")
    {
        let status = tonic::Status::unimplemented("compressed requests are not supported");
        return Ok(status.into_http());
    }
    let decoder = crate::codec::LeanCodec::<wire::Frame, wire::Request>::default().decoder();
    let inbound = tonic::Streaming::new_request(decoder, body, None, Some(limit));
    let request = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(parts.headers),
        parts.extensions,
        inbound,
    );
    let session = match hub.subscribe(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(status.into_http()),
    };
    let mut head = http::Response::new(tonic::body::Body::new(SessionBody {
        session,
        done: false,
    }));
    head.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(head)
}

/// The body of a `Subscribe` response: the session's messages, each one
/// `Bytes` with its gRPC prefix, then its status in the trailers. hyper
/// polls it only when the stream has send capacity.
pub struct SessionBody {
    session: Session,
    done: bool,
}

impl Body for SessionBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match ready!(self.session.poll_next_unpin(cx)) {
            Some(Ok(message)) => {
                crate::lanes::delivered();
                return Poll::Ready(Some(Ok(Frame::data(message.into_grpc()))));
            }
            Some(Err(status)) => status,
            None => tonic::Status::ok(""),
        };
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

fn trailers(status: &tonic::Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    map
}

/// The client's deadline (`grpc-timeout`: at most eight digits and a unit);
/// a malformed value is ignored, as tonic does.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
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

/// The tower layer that honours `grpc-timeout`: a call whose answer has not
/// begun by the client's deadline is answered `DEADLINE_EXCEEDED` (and its
/// handler dropped). A stream's deadline covers its opening only, as in
/// tonic's own server.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = grpc_timeout(req.headers());
        let call = self.inner.call(req);
        let Some(deadline) = deadline else {
            return Box::pin(call);
        };
        Box::pin(async move {
            match tokio::time::timeout(deadline, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded("Timeout expired").into_http()),
            }
        })
    }
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
