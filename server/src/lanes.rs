//! Two lanes: the writers' calls, and the nodes' streams.
//!
//! Nearly all of a hub's work is the fan-out: every accepted event wakes
//! the session of every node that takes it, and each writes a frame. On a
//! runtime shared by everything, a `Publish` that arrives while the hub
//! fans out the previous event queues behind every session that event
//! woke, and its answer queues again behind the sessions its own append
//! woke: at 1,000 nodes the call of a writer waited milliseconds for an
//! append that takes microseconds. `ACCEPTED` promises the append, so a
//! writer should wait for the append only.
//!
//! So the hub serves its connections on two runtimes. The *call lane* is
//! the runtime the hub was started on: the accept loop, the shard actors,
//! the writers' connections (`Publish`, `Status`, health, reflection), the
//! replication links and the timers of the core. The *stream lane* is a
//! runtime of its own (`freshness-streams` threads, as many as the
//! process may use cores) for the connections that carry `Subscribe`
//! streams: the nodes', and peer hubs'. A shard actor wakes a session
//! across the lanes; the operating system, not a task queue, then shares
//! the cores between a writer's call and the fan-out. The kernel does not
//! always run a woken thread at once (it may let the running one finish
//! its slice, milliseconds), so a stream-lane thread also offers its core
//! after every [`YIELD_AFTER`] of sending since it woke or last offered it
//! ([`delivered`], [`woke`]): a writer's call
//! then waits about that long for each turn it needs on a busy core.
//!
//! A connection's lane is chosen once, by its first call: the hub reads the
//! client's preface and frames up to the first `HEADERS` frame, reads its
//! `:path` (HPACK, see [`path`]), and serves the connection on the
//! stream lane when that call is `Subscribe`, on the call lane otherwise.
//! The bytes read are handed to the HTTP/2 server first ([`Rewind`]), so
//! nothing is lost. A client that multiplexes both kinds of call on one
//! connection is served correctly on the lane of its first call; only its
//! later calls of the other kind lose the separation. A connection that
//! sends something the first call cannot be read from (a `PING`, a
//! `HEADERS` continued in `CONTINUATION` frames, a malformed preface), or
//! no call within [`FIRST_CALL_WAIT`] of its first bytes, is served on the stream lane, where
//! every connection was before the lanes.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a stream-lane thread works before it offers its core (see
/// [`delivered`]).
const YIELD_AFTER: Duration = Duration::from_micros(50);

thread_local! {
    /// On a stream-lane thread: when it last offered its core. `None`
    /// elsewhere.
    static LAST_YIELD: std::cell::Cell<Option<tokio::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Marks the calling thread as one of the stream lane's (its runtime's
/// `on_thread_start`).
pub fn enter_stream_lane() {
    LAST_YIELD.with(|c| c.set(Some(tokio::time::Instant::now())));
}

/// Restarts a stream-lane thread's clock of sending when it wakes (its
/// runtime's `on_thread_unpark`): a thread that slept has kept no core from
/// anyone, so it offers its core only after [`YIELD_AFTER`] of sending
/// from now, not at its first message.
pub fn woke() {
    LAST_YIELD.with(|c| {
        if c.get().is_some() {
            c.set(Some(tokio::time::Instant::now()));
        }
    });
}

/// Called by a session for each message it hands to HTTP/2. A stream-lane
/// thread that has sent for [`YIELD_AFTER`] since it last did offers its
/// core (`sched_yield`): a call-lane thread woken meanwhile (a writer's
/// request) runs now rather than when the scheduler next preempts, which
/// may be milliseconds on; with nothing else to run, the thread goes on at
/// once, having spent a system call.
pub fn delivered() {
    LAST_YIELD.with(|c| {
        let Some(last) = c.get() else {
            return;
        };
        let now = tokio::time::Instant::now();
        if now.duration_since(last) >= YIELD_AFTER {
            std::thread::yield_now();
            c.set(Some(now));
        }
    });
}

/// The lane a connection is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Unary calls: `Publish`, `Status`, health, reflection.
    Calls,
    /// `Subscribe` streams, and any connection whose first call is unknown.
    Streams,
}

/// How long after its first bytes the hub waits for a connection's first
/// call before it serves the connection on the stream lane anyway (a
/// client that connects ahead of its first call; a client that waits for
/// the server's SETTINGS before it calls, as grpc-go does). The HTTP/2
/// server does not answer the connection until its lane is chosen, so
/// this is short: a client that calls at once (tonic's `connect_lazy`,
/// the client crate) sends its preface and first call together.
pub const FIRST_CALL_WAIT: Duration = Duration::from_millis(200);

/// At most this much is read to find the first call; a connection whose
/// first `HEADERS` frame ends later goes to the stream lane.
const MAX_PEEK: usize = 16 * 1024;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const SUBSCRIBE_PATH: &[u8] = b"/freshness.v1.Hub/Subscribe";

/// What the bytes a client sent so far say about its connection's lane.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// The lane is known.
    Lane(Lane),
    /// The first `HEADERS` frame has not fully arrived.
    More,
}

/// The lane of a connection whose client sent `bytes` first.
pub fn lane_of(bytes: &[u8]) -> Peek {
    let preface = PREFACE.len().min(bytes.len());
    if bytes[..preface] != PREFACE[..preface] {
        return Peek::Lane(Lane::Streams);
    }
    let mut rest = &bytes[preface..];
    if preface < PREFACE.len() {
        return Peek::More;
    }
    loop {
        if rest.len() < FRAME_HEADER {
            return more_unless_full(bytes);
        }
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        if rest.len() < FRAME_HEADER + len {
            return more_unless_full(bytes);
        }
        let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
        rest = &rest[FRAME_HEADER + len..];
        match kind {
            SETTINGS | WINDOW_UPDATE | PRIORITY => continue,
            HEADERS if flags & END_HEADERS != 0 => {
                return Peek::Lane(match path(payload, flags) {
                    Some(p) if p != SUBSCRIBE_PATH => Lane::Calls,
                    _ => Lane::Streams,
                });
            }
            // CONTINUATION, PING, DATA before headers, anything else.
            _ => return Peek::Lane(Lane::Streams),
        }
    }
}

fn more_unless_full(bytes: &[u8]) -> Peek {
    if bytes.len() >= MAX_PEEK {
        Peek::Lane(Lane::Streams)
    } else {
        Peek::More
    }
}

/// The `:path` of a `HEADERS` frame's payload (its own header block, with
/// an empty dynamic table: it is the connection's first).
///
/// Walks the block's representations (RFC 7541 §6) up to the first field
/// that is not a pseudo-header (pseudo-headers come first, RFC 9113
/// §8.3), decoding no string but the names of literal pseudo-headers and
/// `:path`'s value. A Huffman-coded one is decoded by one decoder built
/// once for the process: `loona_hpack`'s `Decoder` builds its Huffman
/// code table anew for every string it decodes, which made reading a
/// client's first header block cost more than a million instructions.
fn path(payload: &[u8], flags: u8) -> Option<Vec<u8>> {
    let mut block = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*block.first()?);
        block = &block[1..];
    }
    if flags & PRIORITY_FLAG != 0 {
        block = block.get(5..)?;
    }
    block = &block[..block.len().checked_sub(pad)?];
    /// Static table entries (RFC 7541 Appendix A): `:path` and the last
    /// pseudo-header.
    const PATH: usize = 4;
    const PATH_INDEX_HTML: usize = 5;
    const LAST_PSEUDO: usize = 14;
    while let Some(&first) = block.first() {
        if first & 0x80 != 0 {
            // An indexed field.
            let (index, n) = hpack_int(block, 7)?;
            block = &block[n..];
            match index {
                PATH => return Some(b"/".to_vec()),
                PATH_INDEX_HTML => return Some(b"/index.html".to_vec()),
                1..=LAST_PSEUDO => continue,
                _ => return None,
            }
        }
        if first & 0xe0 == 0x20 {
            // A dynamic table size update.
            let (_, n) = hpack_int(block, 5)?;
            block = &block[n..];
            continue;
        }
        // A literal: with incremental indexing (6-bit index prefix),
        // without indexing or never indexed (4-bit).
        let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
        let (index, n) = hpack_int(block, prefix)?;
        block = &block[n..];
        let is_path = match index {
            0 => {
                let (name, huffman, n) = hpack_str(block)?;
                block = &block[n..];
                let name = if huffman {
                    huffman_decode(name)?
                } else {
                    name.to_vec()
                };
                if !name.starts_with(b":") {
                    return None;
                }
                name == b":path"
            }
            PATH | PATH_INDEX_HTML => true,
            1..=LAST_PSEUDO => false,
            _ => return None,
        };
        let (value, huffman, n) = hpack_str(block)?;
        block = &block[n..];
        if is_path {
            return if huffman {
                huffman_decode(value)
            } else {
                Some(value.to_vec())
            };
        }
    }
    None
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1): its
/// value and the bytes it took. `None` when cut short or absurdly large.
fn hpack_int(buf: &[u8], prefix: u32) -> Option<(usize, usize)> {
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(*buf.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    // Four continuation bytes hold 28 bits: more than any header block.
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// An HPACK string literal (RFC 7541 §5.2): its bytes as sent, whether
/// they are Huffman-coded, and the bytes it took in all.
fn hpack_str(buf: &[u8]) -> Option<(&[u8], bool, usize)> {
    let huffman = *buf.first()? & 0x80 != 0;
    let (len, n) = hpack_int(buf, 7)?;
    let bytes = buf.get(n..n.checked_add(len)?)?;
    Some((bytes, huffman, n + len))
}

/// Decodes a Huffman-coded string with one decoder for the process.
fn huffman_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    static DECODER: std::sync::LazyLock<parking_lot::Mutex<loona_hpack::huffman::HuffmanDecoder>> =
        std::sync::LazyLock::new(|| {
            parking_lot::Mutex::new(loona_hpack::huffman::HuffmanDecoder::new())
        });
    DECODER.lock().decode(bytes).ok()
}

/// Reads from `io` until the lane of its connection is known: the lane,
/// and every byte read (to be read again, through [`Rewind`]). A client
/// that sends its first bytes within `silence` gets [`FIRST_CALL_WAIT`]
/// more to send its first call, and is then served on the stream lane
/// without it. `None` when the client closed the connection, or sent
/// nothing within `silence`.
pub async fn first_call<IO: AsyncRead + Unpin>(
    io: &mut IO,
    silence: Duration,
) -> Option<(Lane, BytesMut)> {
    let mut read = BytesMut::with_capacity(1024);
    let mut deadline = tokio::time::Instant::now() + silence;
    loop {
        let got = match tokio::time::timeout_at(deadline, io.read_buf(&mut read)).await {
            Ok(Ok(0) | Err(_)) => return None,
            Ok(Ok(n)) => n,
            Err(_) if read.is_empty() => return None,
            // A client that sent part of its preface, or connected ahead
            // of its first call: served, on the stream lane.
            Err(_) => return Some((Lane::Streams, read)),
        };
        if let Peek::Lane(lane) = lane_of(&read) {
            return Some((lane, read));
        }
        if got == read.len() {
            // The first bytes: the first call follows them closely.
            deadline = tokio::time::Instant::now() + FIRST_CALL_WAIT;
        }
        if read.len() == read.capacity() {
            read.reserve(read.len());
        }
    }
}

/// A connection's I/O that first yields what was read from it to choose
/// its lane.
pub struct Rewind<IO> {
    read: BytesMut,
    io: IO,
}

impl<IO> Rewind<IO> {
    /// `io`, from which `read` was already read.
    pub fn new(read: BytesMut, io: IO) -> Self {
        Rewind { read, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            if self.read.is_empty() {
                // The connection lives for days: it keeps no peek buffer.
                self.read = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    /// A first `HEADERS` block as a client encodes it (Huffman-coded path).
    fn headers(path: &str) -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (&b":scheme"[..], &b"http"[..]),
            (&b":path"[..], path.as_bytes()),
            (&b"content-type"[..], &b"application/grpc"[..]),
        ])
    }

    fn connection(first: &[u8]) -> Vec<u8> {
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, &[0, 4, 0, 0x10, 0, 0]));
        c.extend(frame(WINDOW_UPDATE, 0, &[0, 0x0f, 0, 1]));
        c.extend_from_slice(first);
        c
    }

    #[test]
    fn the_path_is_read_from_each_form_a_client_may_send_it_in() {
        // Indexed (RFC 7541 static table 4): `:path /`.
        assert_eq!(path(&[0x82, 0x84], 0).as_deref(), Some(&b"/"[..]));
        // A literal with the static name, its value Huffman-coded ("/a":
        // '/' 011000, 'a' 00011, then the EOS padding), as h2 sends it.
        assert_eq!(
            path(&[0x82, 0x86, 0x04, 0x82, 0x60, 0x7f], 0).as_deref(),
            Some(&b"/a"[..])
        );
        // With incremental indexing, a plain value.
        assert_eq!(
            path(&[0x44, 0x02, b'/', b'b'], 0).as_deref(),
            Some(&b"/b"[..])
        );
        // A literal name, plain.
        let mut block = vec![0x00, 0x05];
        block.extend_from_slice(b":path");
        block.extend_from_slice(&[0x02, b'/', b'c']);
        assert_eq!(path(&block, 0).as_deref(), Some(&b"/c"[..]));
        // A regular header first: pseudo-headers come first, so no path.
        let mut block = vec![0x00, 0x02];
        block.extend_from_slice(b"te");
        block.extend_from_slice(&[0x02, b'/', b'd', 0x84]);
        assert_eq!(path(&block, 0), None);
        // Cut short, a bad Huffman code, an integer that never ends.
        assert_eq!(path(&[0x04, 0x85, 0x60], 0), None);
        assert_eq!(path(&[0x04, 0x81, 0xff], 0), None);
        assert_eq!(path(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff], 0), None);
    }

    #[test]
    fn the_first_call_chooses_the_lane() {
        let subscribe = connection(&frame(
            HEADERS,
            END_HEADERS,
            &headers("/freshness.v1.Hub/Subscribe"),
        ));
        let publish = connection(&frame(
            HEADERS,
            END_HEADERS,
            &headers("/freshness.v1.Hub/Publish"),
        ));
        let health = connection(&frame(
            HEADERS,
            END_HEADERS,
            &headers("/grpc.health.v1.Health/Check"),
        ));
        assert_eq!(lane_of(&subscribe), Peek::Lane(Lane::Streams));
        assert_eq!(lane_of(&publish), Peek::Lane(Lane::Calls));
        assert_eq!(lane_of(&health), Peek::Lane(Lane::Calls));
        // Every shorter prefix asks for more.
        for n in 0..publish.len() {
            assert_eq!(lane_of(&publish[..n]), Peek::More, "{n} bytes");
        }
    }

    #[test]
    fn padding_and_priority_are_skipped() {
        let mut payload = vec![3];
        payload.extend([0, 0, 0, 0, 16]);
        payload.extend(headers("/freshness.v1.Hub/Publish"));
        payload.extend([0, 0, 0]);
        let c = connection(&frame(
            HEADERS,
            END_HEADERS | PADDED | PRIORITY_FLAG,
            &payload,
        ));
        assert_eq!(lane_of(&c), Peek::Lane(Lane::Calls));
    }

    #[test]
    fn what_cannot_be_read_goes_to_the_stream_lane() {
        let continued = connection(&frame(HEADERS, 0, &headers("/freshness.v1.Hub/Publish")));
        let ping = connection(&frame(0x6, 0, &[0; 8]));
        let garbage = connection(&frame(HEADERS, END_HEADERS, &[0xff, 0xff, 0xff, 0xff]));
        for c in [continued, ping, garbage] {
            assert_eq!(lane_of(&c), Peek::Lane(Lane::Streams));
        }
        assert_eq!(lane_of(b"GET / HTTP/1.1\r\n"), Peek::Lane(Lane::Streams));
        // A frame longer than the hub reads to decide.
        let mut huge = connection(&[]);
        huge.extend(frame(HEADERS, END_HEADERS, &vec![0; MAX_PEEK])[..FRAME_HEADER + 100].iter());
        assert_eq!(lane_of(&huge), Peek::More);
        huge.resize(MAX_PEEK, 0);
        assert_eq!(lane_of(&huge), Peek::Lane(Lane::Streams));
    }

    /// What a real HTTP/2 client (h2, under tonic and hyper: Huffman-coded
    /// strings) sends first, read as the hub reads a connection.
    #[tokio::test]
    async fn a_real_client_s_first_call_is_read() {
        for (path, lane) in [
            ("/freshness.v1.Hub/Subscribe", Lane::Streams),
            ("/freshness.v1.Hub/Publish", Lane::Calls),
            ("/freshness.v1.Hub/Status", Lane::Calls),
            ("/grpc.health.v1.Health/Check", Lane::Calls),
        ] {
            let (client, mut server) = tokio::io::duplex(64 * 1024);
            let (mut send, conn) = h2::client::handshake(client).await.unwrap();
            let driving = tokio::spawn(conn);
            let request = http::Request::post(format!("http://hub.example{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let _call = send.send_request(request, false).unwrap();
            let (got, read) = first_call(&mut server, Duration::from_secs(10))
                .await
                .expect("a first call");
            assert_eq!(got, lane, "{path}");
            assert!(read.starts_with(PREFACE));
            driving.abort();
        }
    }

    #[tokio::test]
    async fn a_silent_connection_is_dropped_and_a_slow_first_call_streams() {
        let (_client, mut server) = tokio::io::duplex(1024);
        assert!(
            first_call(&mut server, Duration::from_millis(20))
                .await
                .is_none()
        );
        let (mut client, mut server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, PREFACE)
            .await
            .unwrap();
        let (lane, read) = first_call(&mut server, Duration::from_millis(20))
            .await
            .expect("served");
        assert_eq!((lane, &read[..]), (Lane::Streams, PREFACE));
    }

    #[tokio::test]
    async fn rewind_yields_what_was_read_then_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = server;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"hello world")
            .await
            .unwrap();
        let mut first = BytesMut::new();
        while first.len() < 5 {
            server.read_buf(&mut first).await.unwrap();
        }
        let mut again = Rewind::new(first, server);
        drop(client);
        let mut all = Vec::new();
        again.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"hello world");
        assert_eq!(again.read.capacity(), 0, "the peek buffer is given back");
    }
}
