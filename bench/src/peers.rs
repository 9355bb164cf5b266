//! Lean clients for the peers: NATS core and Redis pub/sub spoken raw over
//! a `TcpStream`, so the peers' side of the load generator costs no more
//! than the hub's (whose nodes decode batches and ack them in bulk).
//!
//! - Publishers write one call's events in one write: N `PUB`s for NATS,
//!   N pipelined `PUBLISH`es for Redis (whose N integer replies answer the
//!   call, as a `Publish` answer does for the hub).
//! - Subscribers read with a large buffer and parse only what they need:
//!   the frame boundaries and the message body, whose `freshness.v1.Event`
//!   is read field by field without allocating (entity key and version).
//!   Every message of one read is handed to the recorder at once.
//!
//! The parsers ([`nats_frames`], [`resp_frames`]) are pure functions over a
//! byte buffer, tested on the byte shapes the servers send.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::BufMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, oneshot};
use tokio_util::sync::CancellationToken;

use crate::tracker::{Recorder, entity};

/// Read buffer of a subscriber: many messages per read.
const READ_BUF: usize = 256 << 10;
/// How long connecting and subscribing may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A frame the peer's byte stream could not be parsed as.
#[derive(Debug, thiserror::Error)]
#[error("{proto} protocol error: {what} (at {near:?})")]
pub struct ProtoError {
    proto: &'static str,
    what: &'static str,
    near: String,
}

fn proto_err(proto: &'static str, what: &'static str, at: &[u8]) -> ProtoError {
    ProtoError {
        proto,
        what,
        near: String::from_utf8_lossy(&at[..at.len().min(40)]).into_owned(),
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn parse_usize(b: &[u8]) -> Option<usize> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// One frame a NATS server sends a client.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsFrame<'a> {
    /// `MSG subject sid [reply] size`: its payload.
    Msg(&'a [u8]),
    /// `PING`: the client must answer `PONG`.
    Ping,
    /// `PONG`: the answer to our `PING` (everything before it was processed).
    Pong,
    /// `+OK` (verbose mode only).
    Ok,
    /// `-ERR 'text'`.
    Err(&'a [u8]),
    /// `INFO {...}`.
    Info,
}

/// Parses the whole frames at the start of `buf`, handing each to `on`;
/// returns how many bytes they took (a partial frame is left for the next
/// read).
pub fn nats_frames<'a>(
    buf: &'a [u8],
    mut on: impl FnMut(NatsFrame<'a>),
) -> Result<usize, ProtoError> {
    let mut pos = 0;
    while let Some(end) = find_crlf(&buf[pos..]) {
        let line = &buf[pos..pos + end];
        let next = pos + end + 2;
        if let Some(args) = line.strip_prefix(b"MSG ") {
            let size = args
                .rsplit(|b| *b == b' ')
                .next()
                .and_then(parse_usize)
                .ok_or_else(|| proto_err("NATS", "MSG without a size", line))?;
            if buf.len() < next + size + 2 {
                break;
            }
            if &buf[next + size..next + size + 2] != b"\r\n" {
                return Err(proto_err("NATS", "payload not ended by CRLF", line));
            }
            on(NatsFrame::Msg(&buf[next..next + size]));
            pos = next + size + 2;
            continue;
        }
        on(match line {
            b"PING" => NatsFrame::Ping,
            b"PONG" => NatsFrame::Pong,
            b"+OK" => NatsFrame::Ok,
            _ if line.starts_with(b"-ERR") => NatsFrame::Err(line[4..].trim_ascii()),
            _ if line.starts_with(b"INFO ") => NatsFrame::Info,
            _ => return Err(proto_err("NATS", "unknown frame", line)),
        });
        pos = next;
    }
    Ok(pos)
}

/// One RESP2 frame a Redis server sends.
#[derive(Debug, PartialEq, Eq)]
pub enum RespFrame<'a> {
    /// `:n` (a `PUBLISH` reply: how many subscribers got it).
    Int(i64),
    /// `+text`.
    Simple(&'a [u8]),
    /// `-ERR text`.
    Error(&'a [u8]),
    /// `*3 $message $channel $payload`: the payload.
    Message(&'a [u8]),
    /// `*3 $subscribe $channel :count`: the subscription holds.
    Subscribed,
    /// Any other array (`unsubscribe`, ...).
    OtherArray,
}

/// One scalar item of a RESP2 array.
#[derive(Clone, Copy)]
enum Item<'a> {
    Bulk(&'a [u8]),
    Int,
}

/// Parses one scalar at `buf[pos..]`; `None` if incomplete.
fn resp_item(buf: &[u8], pos: usize) -> Result<Option<(Item<'_>, usize)>, ProtoError> {
    let Some(end) = find_crlf(&buf[pos..]) else {
        return Ok(None);
    };
    let line = &buf[pos..pos + end];
    let next = pos + end + 2;
    match line.first() {
        Some(b'$') => {
            let len = parse_usize(&line[1..])
                .ok_or_else(|| proto_err("RESP", "bad bulk length", line))?;
            if buf.len() < next + len + 2 {
                return Ok(None);
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err(proto_err("RESP", "bulk not ended by CRLF", line));
            }
            Ok(Some((Item::Bulk(&buf[next..next + len]), next + len + 2)))
        }
        Some(b':') => Ok(Some((Item::Int, next))),
        _ => Err(proto_err("RESP", "unexpected array item", line)),
    }
}

/// Parses the whole frames at the start of `buf` (see [`nats_frames`]).
/// Arrays are the pub/sub pushes of three scalars; anything nested is an
/// error.
pub fn resp_frames<'a>(
    buf: &'a [u8],
    mut on: impl FnMut(RespFrame<'a>),
) -> Result<usize, ProtoError> {
    let mut pos = 0;
    'frames: while let Some(end) = find_crlf(&buf[pos..]) {
        let line = &buf[pos..pos + end];
        let next = pos + end + 2;
        let frame = match line.first() {
            Some(b':') => RespFrame::Int(
                std::str::from_utf8(&line[1..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| proto_err("RESP", "bad integer", line))?,
            ),
            Some(b'+') => RespFrame::Simple(&line[1..]),
            Some(b'-') => RespFrame::Error(&line[1..]),
            Some(b'*') => {
                let n = parse_usize(&line[1..])
                    .ok_or_else(|| proto_err("RESP", "bad array length", line))?;
                let mut items = [Item::Int; 3];
                let mut at = next;
                for i in 0..n {
                    let Some((item, after)) = resp_item(buf, at)? else {
                        break 'frames;
                    };
                    if let Some(slot) = items.get_mut(i) {
                        *slot = item;
                    }
                    at = after;
                }
                pos = at;
                on(match (n, items[0], items[2]) {
                    (3, Item::Bulk(b"message"), Item::Bulk(payload)) => RespFrame::Message(payload),
                    (3, Item::Bulk(b"subscribe"), _) => RespFrame::Subscribed,
                    _ => RespFrame::OtherArray,
                });
                continue;
            }
            _ => return Err(proto_err("RESP", "unknown frame", line)),
        };
        on(frame);
        pos = next;
    }
    Ok(pos)
}

/// Reads a protobuf varint at `b[*at..]`.
fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The (entity key, version) of an encoded `freshness.v1.Event`, read
/// field by field without allocating; `None` if it is not one.
pub fn decode_event(b: &[u8]) -> Option<(Option<u32>, u64)> {
    let mut at = 0;
    let mut key = None;
    let mut version = 0;
    while at < b.len() {
        let tag = varint(b, &mut at)?;
        match (tag >> 3, tag & 7) {
            (2, 0) => version = varint(b, &mut at)?,
            (_, 0) => {
                varint(b, &mut at)?;
            }
            (field, 2) => {
                let len = usize::try_from(varint(b, &mut at)?).ok()?;
                let bytes = b.get(at..at.checked_add(len)?)?;
                at += len;
                if field == 1 {
                    key = std::str::from_utf8(bytes)
                        .ok()
                        .and_then(crate::tracker::key_of);
                }
            }
            _ => return None,
        }
    }
    Some((key, version))
}

/// Appends the encoded bench event `(key, version)` to `out` (what
/// [`crate::target::encode_event`] returns, written in place).
fn put_event(out: &mut Vec<u8>, key: u32, version: u64) {
    let e = freshness::pb::Event {
        entity: entity(key),
        version,
        ..Default::default()
    };
    // A Vec grows as needed: encoding cannot fail.
    let _ = prost::Message::encode(&e, out);
}

/// Splits `host:port` out of `nats://host:port` or `redis://host:port`.
fn addr_of(url: &str) -> Result<&str> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .trim_end_matches('/');
    if rest.contains('@') || rest.contains('/') {
        bail!("{url}: only scheme://host:port is supported by the lean peer clients");
    }
    Ok(rest)
}

async fn connect(url: &str) -> Result<TcpStream> {
    let addr = addr_of(url)?;
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A socket's read side with its buffer: read, parse, keep the partial
/// tail.
struct Reader {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
    len: usize,
}

impl Reader {
    fn new(rd: OwnedReadHalf) -> Self {
        Self {
            rd,
            buf: vec![0; READ_BUF],
            len: 0,
        }
    }

    /// Reads more; fails at end of stream.
    async fn fill(&mut self) -> Result<()> {
        if self.len == self.buf.len() {
            // One frame larger than the buffer.
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.rd.read(&mut self.buf[self.len..]).await?;
        if n == 0 {
            bail!("connection closed by the server");
        }
        self.len += n;
        Ok(())
    }

    /// Drops the first `used` bytes (parsed frames).
    fn consume(&mut self, used: usize) {
        self.buf.copy_within(used..self.len, 0);
        self.len -= used;
    }
}

/// `CONNECT` without `+OK`s and without our own messages echoed.
const NATS_CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"lang\":\"freshness-bench\",\"version\":\"1\",\"protocol\":1}\r\n";

/// Opens a NATS connection, sends `CONNECT` and `extra`, then `PING`, and
/// waits for the `PONG`: the server has processed everything before it.
async fn nats_open(url: &str, extra: &[u8]) -> Result<(Reader, OwnedWriteHalf)> {
    let (rd, mut wr) = connect(url).await?.into_split();
    let mut msg = NATS_CONNECT.to_vec();
    msg.extend_from_slice(extra);
    msg.extend_from_slice(b"PING\r\n");
    wr.write_all(&msg).await?;
    let mut r = Reader::new(rd);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            r.fill().await?;
            let mut done = false;
            let mut err = None;
            let used = nats_frames(&r.buf[..r.len], |f| match f {
                NatsFrame::Pong => done = true,
                NatsFrame::Err(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                _ => {}
            })?;
            r.consume(used);
            if let Some(e) = err {
                bail!("nats refused the handshake: {e}");
            }
            if done {
                return Ok(());
            }
        }
    })
    .await
    .context("nats handshake timed out")??;
    Ok((r, wr))
}

/// One NATS subscriber until `stop`: every message of a read goes to the
/// recorder at once. A stalled node subscribes and never reads.
pub async fn nats_node(
    url: &str,
    subject: &str,
    rec: &mut Recorder,
    stalled: bool,
    stop: &CancellationToken,
) -> Result<()> {
    let sub = format!("SUB {subject} 1\r\n");
    let (mut r, mut wr) = nats_open(url, sub.as_bytes()).await?;
    let _live = crate::target::LiveGuard::enter(rec.tracker());
    if stalled {
        stop.cancelled().await;
        return Ok(());
    }
    let mut events = Vec::with_capacity(1024);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            f = r.fill() => f?,
        }
        events.clear();
        let (mut pings, mut foreign) = (0, 0);
        let mut err = None;
        let used = nats_frames(&r.buf[..r.len], |f| match f {
            NatsFrame::Msg(p) => match decode_event(p) {
                Some(e) => events.push(e),
                None => foreign += 1,
            },
            NatsFrame::Ping => pings += 1,
            NatsFrame::Err(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
            _ => {}
        })?;
        rec.on_events(&events);
        rec.no_acks();
        rec.foreign += foreign;
        r.consume(used);
        if let Some(e) = err {
            bail!("nats: {e}");
        }
        for _ in 0..pings {
            wr.write_all(b"PONG\r\n").await?;
        }
    }
}

/// One Redis subscriber until `stop` (see [`nats_node`]).
pub async fn redis_node(
    url: &str,
    channel: &str,
    rec: &mut Recorder,
    stalled: bool,
    stop: &CancellationToken,
) -> Result<()> {
    let (rd, mut wr) = connect(url).await?.into_split();
    let mut cmd = Vec::new();
    resp_command(&mut cmd, &[b"SUBSCRIBE", channel.as_bytes()]);
    wr.write_all(&cmd).await?;
    let mut r = Reader::new(rd);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            r.fill().await?;
            let (mut done, mut err) = (false, None);
            let used = resp_frames(&r.buf[..r.len], |f| match f {
                RespFrame::Subscribed => done = true,
                RespFrame::Error(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                _ => {}
            })?;
            r.consume(used);
            if let Some(e) = err {
                bail!("redis refused SUBSCRIBE: {e}");
            }
            if done {
                return Ok(());
            }
        }
    })
    .await
    .context("redis subscribe timed out")??;
    let _live = crate::target::LiveGuard::enter(rec.tracker());
    if stalled {
        stop.cancelled().await;
        return Ok(());
    }
    let mut events = Vec::with_capacity(1024);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            f = r.fill() => f?,
        }
        events.clear();
        let mut foreign = 0;
        let used = resp_frames(&r.buf[..r.len], |f| {
            if let RespFrame::Message(p) = f {
                match decode_event(p) {
                    Some(e) => events.push(e),
                    None => foreign += 1,
                }
            }
        })?;
        rec.on_events(&events);
        rec.no_acks();
        rec.foreign += foreign;
        r.consume(used);
    }
}

/// Appends a RESP2 command (an array of bulk strings) to `out`.
pub fn resp_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.put_slice(format!("${}\r\n", a.len()).as_bytes());
        out.put_slice(a);
        out.put_slice(b"\r\n");
    }
}

/// A NATS publisher: one write of N `PUB`s per call. A reader task answers
/// the server's `PING`s and keeps its first `-ERR`.
#[derive(Clone)]
pub struct NatsPublisher {
    wr: Arc<Mutex<OwnedWriteHalf>>,
    subject: String,
    error: Arc<parking_lot::Mutex<Option<String>>>,
}

impl NatsPublisher {
    /// Connects to `url`.
    pub async fn connect(url: &str, subject: &str) -> Result<Self> {
        let (mut r, wr) = nats_open(url, b"").await?;
        let p = Self {
            wr: Arc::new(Mutex::new(wr)),
            subject: subject.to_owned(),
            error: Arc::default(),
        };
        let (wr, error) = (Arc::downgrade(&p.wr), p.error.clone());
        tokio::spawn(async move {
            let outcome: Result<()> = async {
                loop {
                    r.fill().await?;
                    let (mut pings, mut err) = (0, None);
                    let used = nats_frames(&r.buf[..r.len], |f| match f {
                        NatsFrame::Ping => pings += 1,
                        NatsFrame::Err(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                        _ => {}
                    })?;
                    r.consume(used);
                    if let Some(e) = err {
                        bail!("nats: {e}");
                    }
                    let Some(wr) = wr.upgrade() else {
                        return Ok(());
                    };
                    for _ in 0..pings {
                        wr.lock().await.write_all(b"PONG\r\n").await?;
                    }
                }
            }
            .await;
            if let Err(e) = outcome {
                error.lock().get_or_insert(format!("{e:#}"));
            }
        });
        Ok(p)
    }

    /// Writes one `PUB` per event, in one write.
    pub async fn send(&self, events: &[(u32, u64)]) -> Result<()> {
        if let Some(e) = self.error.lock().clone() {
            bail!(e);
        }
        let mut buf = Vec::with_capacity(events.len() * (self.subject.len() + 48));
        let mut body = Vec::with_capacity(32);
        for &(k, v) in events {
            body.clear();
            put_event(&mut body, k, v);
            buf.put_slice(format!("PUB {} {}\r\n", self.subject, body.len()).as_bytes());
            buf.put_slice(&body);
            buf.put_slice(b"\r\n");
        }
        self.wr.lock().await.write_all(&buf).await?;
        Ok(())
    }
}

/// Calls waiting for their replies: (replies still owed, first error, who
/// to tell).
type Waiters = VecDeque<(usize, Option<String>, oneshot::Sender<Result<(), String>>)>;

/// A Redis publisher: one write of N pipelined `PUBLISH`es per call; the
/// call ends when its N replies are in.
#[derive(Clone)]
pub struct RedisPublisher {
    wr: Arc<Mutex<OwnedWriteHalf>>,
    waiters: Arc<parking_lot::Mutex<Waiters>>,
    channel: String,
}

impl RedisPublisher {
    /// Connects to `url`.
    pub async fn connect(url: &str, channel: &str) -> Result<Self> {
        let (rd, wr) = connect(url).await?.into_split();
        let p = Self {
            wr: Arc::new(Mutex::new(wr)),
            waiters: Arc::default(),
            channel: channel.to_owned(),
        };
        let waiters = p.waiters.clone();
        let mut r = Reader::new(rd);
        tokio::spawn(async move {
            loop {
                if r.fill().await.is_err() {
                    break;
                }
                let mut w = waiters.lock();
                let used = resp_frames(&r.buf[..r.len], |f| {
                    let err = match f {
                        RespFrame::Error(e) => Some(String::from_utf8_lossy(e).into_owned()),
                        _ => None,
                    };
                    let Some(head) = w.front_mut() else {
                        return;
                    };
                    head.0 -= 1;
                    if head.1.is_none() {
                        head.1 = err;
                    }
                    if head.0 == 0
                        && let Some((_, err, tx)) = w.pop_front()
                    {
                        let _ = tx.send(err.map_or(Ok(()), Err));
                    }
                });
                match used {
                    Ok(used) => r.consume(used),
                    Err(_) => break,
                }
            }
            // Closing: every waiting call fails (its sender is dropped).
            waiters.lock().clear();
        });
        Ok(p)
    }

    /// Pipelines one `PUBLISH` per event and waits for their replies.
    pub async fn send(&self, events: &[(u32, u64)]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(events.len() * (self.channel.len() + 64));
        let mut body = Vec::with_capacity(32);
        for &(k, v) in events {
            body.clear();
            put_event(&mut body, k, v);
            resp_command(&mut buf, &[b"PUBLISH", self.channel.as_bytes(), &body]);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut wr = self.wr.lock().await;
            // Queued before the write, under the write lock: replies come
            // back in the order of the writes.
            self.waiters.lock().push_back((events.len(), None, tx));
            wr.write_all(&buf).await?;
        }
        rx.await
            .map_err(|_| anyhow!("redis connection closed"))?
            .map_err(|e| anyhow!("redis: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::encode_event;

    #[test]
    fn nats_frames_as_the_server_sends_them() {
        // As captured from nats-server 2.9.10 on this machine: INFO on
        // connect (cut short here), MSGs (one with a reply subject), PONG,
        // -ERR; plus a PING, a +OK and a MSG cut in its payload.
        let body = encode_event(7, 42);
        let mut wire = b"INFO {\"server_id\":\"NDCK3LWFJX5HZQQQN6BWIE7J4AVW5FB2IYKM6L46IBAKEHGDDQIHCFAN\",\"version\":\"2.9.10\",\"proto\":1,\"headers\":true,\"max_payload\":1048576}\r\n+OK\r\n".to_vec();
        wire.extend_from_slice(format!("MSG fresh.bench.1.0 1 {}\r\n", body.len()).as_bytes());
        wire.extend_from_slice(&body);
        wire.extend_from_slice(b"\r\nMSG fresh.bench.1.0 1 _INBOX.x 3\r\nabc\r\nPING\r\nPONG\r\n-ERR 'Unknown Protocol Operation'\r\nMSG a 1 5\r\nhel");
        let mut got = Vec::new();
        let used = nats_frames(&wire, |f| got.push(format!("{f:?}"))).unwrap();
        assert_eq!(
            got,
            [
                "Info".to_string(),
                "Ok".into(),
                format!("Msg({:?})", &body[..]),
                format!("Msg({:?})", b"abc"),
                "Ping".into(),
                "Pong".into(),
                format!("Err({:?})", b"'Unknown Protocol Operation'"),
            ]
        );
        // The partial MSG is left for the next read.
        assert_eq!(&wire[used..], b"MSG a 1 5\r\nhel");
        let mut more = wire[used..].to_vec();
        more.extend_from_slice(b"lo\r\n");
        let mut last = None;
        assert_eq!(
            nats_frames(&more, |f| last = Some(format!("{f:?}"))).unwrap(),
            more.len()
        );
        assert_eq!(last.unwrap(), format!("Msg({:?})", b"hello"));
        assert!(nats_frames(b"BOGUS\r\n", |_| {}).is_err());
        assert!(nats_frames(b"MSG a 1 3\r\nabcXY", |_| {}).is_err());
        // A line without its CRLF yet is not a frame.
        assert_eq!(nats_frames(b"PIN", |_| {}).unwrap(), 0);
    }

    #[test]
    fn resp_frames_as_the_server_sends_them() {
        // As captured from redis-server on this machine: the SUBSCRIBE
        // confirmation, a message push, PUBLISH replies, an error; plus an
        // unsubscribe push and a message push cut short.
        let body = encode_event(3, 9);
        let mut wire = b"*3\r\n$9\r\nsubscribe\r\n$14\r\nfresh.bench.77\r\n:1\r\n".to_vec();
        wire.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$14\r\nfresh.bench.77\r\n");
        wire.extend_from_slice(format!("${}\r\n", body.len()).as_bytes());
        wire.extend_from_slice(&body);
        wire.extend_from_slice(
            b"\r\n:16\r\n:0\r\n+OK\r\n-ERR Protocol error: expected '$', got '1'\r\n",
        );
        wire.extend_from_slice(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n");
        let cut = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhel";
        wire.extend_from_slice(cut);
        let mut got = Vec::new();
        let used = resp_frames(&wire, |f| got.push(format!("{f:?}"))).unwrap();
        assert_eq!(
            got,
            [
                "Subscribed".to_string(),
                format!("Message({:?})", &body[..]),
                "Int(16)".into(),
                "Int(0)".into(),
                format!("Simple({:?})", b"OK"),
                format!("Error({:?})", b"ERR Protocol error: expected '$', got '1'"),
                "OtherArray".into(),
            ]
        );
        assert_eq!(&wire[used..], cut);
        assert!(resp_frames(b"?\r\n", |_| {}).is_err());
        assert!(resp_frames(b"*1\r\n*1\r\n", |_| {}).is_err());
    }

    #[test]
    fn events_decode_without_prost_as_prost_encodes_them() {
        for (k, v) in [(0, 1), (7, 42), (9_999, u64::from(u32::MAX) + 5)] {
            assert_eq!(decode_event(&encode_event(k, v)), Some((Some(k), v)));
            let mut out = Vec::new();
            put_event(&mut out, k, v);
            assert_eq!(out, encode_event(k, v).as_ref());
        }
        // Other fields are skipped; a foreign entity has no key.
        let e = freshness::pb::Event {
            entity: "user:7".into(),
            version: 3,
            origin: "eu".into(),
            publish_time_us: 5,
            payload: vec![1, 2].into(),
            ..Default::default()
        };
        assert_eq!(
            decode_event(&prost::Message::encode_to_vec(&e)),
            Some((None, 3))
        );
        assert_eq!(decode_event(&[0x0a, 0x05, b'b']), None);
    }

    #[test]
    fn resp_commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        resp_command(&mut out, &[b"PUBLISH", b"ch", b"\x00\r\n"]);
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$3\r\n\x00\r\n\r\n".as_ref()
        );
        assert_eq!(
            addr_of("nats://127.0.0.1:14222").unwrap(),
            "127.0.0.1:14222"
        );
        assert_eq!(
            addr_of("redis://127.0.0.1:16379/").unwrap(),
            "127.0.0.1:16379"
        );
        assert!(addr_of("redis://:pw@host:1").is_err());
    }
}
