//! Encode once, send many.
//!
//! The hub encodes every event exactly once, when it is appended to the log,
//! as the bytes of one `EventBatch.events` element. A batch for a node is then
//! the concatenation of those bytes behind a small header: no per-stream
//! re-encoding, whatever the fan-out. [`Frame`] carries such pre-encoded bytes
//! through tonic in place of a `SubscribeResponse` (the wire format is the
//! same, so clients decode it as a normal `SubscribeResponse`).

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use crate::pb;

/// Field numbers this module writes by hand; pinned by the tests below
/// against the generated code.
const RESPONSE_EVENTS: u32 = 2;
const BATCH_EVENTS: u32 = 1;
const BATCH_WATERMARK: u32 = 2;
const BATCH_ACK_REQUESTED: u32 = 3;

/// The five bytes in front of every gRPC message on the wire: a
/// compression flag (0) and the message length, big-endian.
pub const GRPC_PREFIX: usize = 5;

/// An already encoded `SubscribeResponse`, behind its gRPC message prefix:
/// the bytes a stream sends as they are, one `Bytes` per message.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame(Bytes);

impl Default for Frame {
    fn default() -> Self {
        Self(Bytes::from_static(&[0; GRPC_PREFIX]))
    }
}

/// Writes the gRPC prefix of a message of `len` bytes.
fn put_grpc_prefix(prefix: &mut [u8], len: usize) {
    // Frames stay far below 4 GiB (the message limit is 4 MiB by default).
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    prefix[0] = 0;
    prefix[1..GRPC_PREFIX].copy_from_slice(&len.to_be_bytes());
}

impl Frame {
    /// Encodes a message built the ordinary way (welcome, progress, resets).
    pub fn from_message(msg: &pb::SubscribeResponse) -> Self {
        let len = msg.encoded_len();
        let mut buf = BytesMut::with_capacity(GRPC_PREFIX + len);
        buf.put_bytes(0, GRPC_PREFIX);
        msg.encode_raw(&mut buf);
        put_grpc_prefix(&mut buf[..GRPC_PREFIX], len);
        Self(buf.freeze())
    }

    /// Encoded size of the message, without its prefix.
    pub fn len(&self) -> usize {
        self.0.len() - GRPC_PREFIX
    }

    /// True for an empty message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoded message, without its prefix.
    pub fn message(&self) -> Bytes {
        self.0.slice(GRPC_PREFIX..)
    }

    /// The message behind its gRPC prefix, as it goes on the wire.
    pub fn into_grpc(self) -> Bytes {
        self.0
    }
}

impl Message for Frame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0[GRPC_PREFIX..]);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // The hub never decodes frames; skip whatever arrives.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A `SubscribeRequest` as the hub's streams decode it.
///
/// Nodes ack every frame they apply, so acks are the messages a hub decodes
/// most: a cumulative cursor of one varint per shard. prost's generic path
/// reads each varint through tonic's buffer and grows the `seqs` vector one
/// push at a time; this decoder reads the common shape (`ack { cursor {
/// epoch, packed seqs } [, applied { ... }] }`, contiguous in the buffer)
/// straight from the slice into a vector allocated once. Anything else —
/// hellos, unpacked or reordered fields, unknown fields, a message split
/// across buffers, malformed bytes — goes through the generated decoder, so
/// the result is always exactly what prost would have decoded.
#[derive(Clone, Default, Debug, PartialEq)]
pub struct Request(pub pb::SubscribeRequest);

const REQUEST_ACK: u32 = 2;
const ACK_CURSOR: u32 = 1;
const ACK_APPLIED: u32 = 2;
const CURSOR_EPOCH: u32 = 1;
const CURSOR_SEQS: u32 = 2;

/// Reads one varint from the front of `s`, at most 10 bytes.
fn take_varint(s: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &b) in s.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            if i == 9 && b > 1 {
                return None; // more than 64 bits
            }
            *s = &s[i + 1..];
            return Some(v);
        }
    }
    None
}

/// Reads a length-delimited field's body: its length, then that many bytes.
fn take_delimited<'a>(s: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(take_varint(s)?).ok()?;
    if len > s.len() {
        return None;
    }
    let (body, rest) = s.split_at(len);
    *s = rest;
    Some(body)
}

/// `Cursor { epoch = 1; packed seqs = 2 }` in that order, or `None`.
fn fast_cursor(mut s: &[u8]) -> Option<pb::Cursor> {
    let mut c = pb::Cursor::default();
    if s.first() == Some(&((CURSOR_EPOCH << 3) as u8)) {
        s = &s[1..];
        c.epoch = take_varint(&mut s)?;
    }
    if s.first() == Some(&((CURSOR_SEQS << 3 | 2) as u8)) {
        s = &s[1..];
        let mut packed = take_delimited(&mut s)?;
        // Every varint ends in exactly one byte below 0x80.
        c.seqs = Vec::with_capacity(packed.iter().filter(|b| **b < 0x80).count());
        while let Some((&b, rest)) = packed.split_first() {
            if b < 0x80 {
                c.seqs.push(u64::from(b));
                packed = rest;
            } else {
                c.seqs.push(take_varint(&mut packed)?);
            }
        }
    }
    s.is_empty().then_some(c)
}

/// `Ack { cursor = 1; applied = 2 }` in that order, or `None`.
fn fast_ack(mut s: &[u8]) -> Option<pb::Ack> {
    let mut ack = pb::Ack::default();
    if s.first() == Some(&((ACK_CURSOR << 3 | 2) as u8)) {
        s = &s[1..];
        ack.cursor = Some(fast_cursor(take_delimited(&mut s)?)?);
    }
    if s.first() == Some(&((ACK_APPLIED << 3 | 2) as u8)) {
        s = &s[1..];
        ack.applied = Some(fast_cursor(take_delimited(&mut s)?)?);
    }
    s.is_empty().then_some(ack)
}

impl Message for Request {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.0.encode_raw(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        use pb::subscribe_request::Kind;
        if tag == REQUEST_ACK && wire_type == WireType::LengthDelimited && self.0.kind.is_none() {
            let mut s = buf.chunk();
            let before = s.len();
            if let Some(ack) = take_delimited(&mut s).and_then(fast_ack) {
                let used = before - s.len();
                buf.advance(used);
                self.0.kind = Some(Kind::Ack(ack));
                return Ok(());
            }
        }
        match tag {
            1 | REQUEST_ACK => Kind::merge(&mut self.0.kind, tag, wire_type, buf, ctx),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.0.encoded_len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The fields of an `Event`, borrowed: what the hub encodes at append time
/// without building (and cloning) a `pb::Event` of its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventFields<'a> {
    /// `Event.entity`.
    pub entity: &'a str,
    /// `Event.version`.
    pub version: u64,
    /// `Event.origin`.
    pub origin: &'a str,
    /// `Event.publish_time_us`.
    pub publish_time_us: u64,
    /// `Event.payload`.
    pub payload: &'a [u8],
    /// `Event.traceparent`.
    pub traceparent: &'a str,
    /// `Event.tracestate`.
    pub tracestate: &'a str,
}

impl<'a> From<&'a pb::Event> for EventFields<'a> {
    fn from(e: &'a pb::Event) -> Self {
        Self {
            entity: &e.entity,
            version: e.version,
            origin: &e.origin,
            publish_time_us: e.publish_time_us,
            payload: &e.payload,
            traceparent: &e.traceparent,
            tracestate: &e.tracestate,
        }
    }
}

/// `Event` and `DeliveredEvent` field numbers, in the order prost writes
/// them; pinned by the tests below against the generated code.
const EVENT_ENTITY: u32 = 1;
const EVENT_VERSION: u32 = 2;
const EVENT_ORIGIN: u32 = 3;
const EVENT_PUBLISH_TIME: u32 = 4;
const EVENT_PAYLOAD: u32 = 5;
const EVENT_TRACEPARENT: u32 = 6;
const EVENT_TRACESTATE: u32 = 7;
const DELIVERED_SHARD: u32 = 1;
const DELIVERED_SEQ: u32 = 2;
const DELIVERED_EVENT: u32 = 3;

/// Encoded size of a proto3 scalar varint field (absent when zero); every
/// field number here is below 16, so its key is one byte.
fn varint_field_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + encoded_len_varint(v) }
}

/// Encoded size of a proto3 string or bytes field (absent when empty).
fn bytes_field_len(b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        1 + encoded_len_varint(b.len() as u64) + b.len()
    }
}

fn put_varint_field(tag: u32, v: u64, buf: &mut impl BufMut) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

fn put_bytes_field(tag: u32, b: &[u8], buf: &mut impl BufMut) {
    if !b.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(b.len() as u64, buf);
        buf.put_slice(b);
    }
}

impl EventFields<'_> {
    fn encoded_len(&self) -> usize {
        bytes_field_len(self.entity.as_bytes())
            + varint_field_len(self.version)
            + bytes_field_len(self.origin.as_bytes())
            + varint_field_len(self.publish_time_us)
            + bytes_field_len(self.payload)
            + bytes_field_len(self.traceparent.as_bytes())
            + bytes_field_len(self.tracestate.as_bytes())
    }

    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_bytes_field(EVENT_ENTITY, self.entity.as_bytes(), buf);
        put_varint_field(EVENT_VERSION, self.version, buf);
        put_bytes_field(EVENT_ORIGIN, self.origin.as_bytes(), buf);
        put_varint_field(EVENT_PUBLISH_TIME, self.publish_time_us, buf);
        put_bytes_field(EVENT_PAYLOAD, self.payload, buf);
        put_bytes_field(EVENT_TRACEPARENT, self.traceparent.as_bytes(), buf);
        put_bytes_field(EVENT_TRACESTATE, self.tracestate.as_bytes(), buf);
    }
}

/// Encodes one delivered event as an element of `EventBatch.events`: key,
/// length and message, byte for byte what prost writes for a
/// `DeliveredEvent`. Done once per event, at append time, straight from the
/// borrowed fields: one allocation, the result.
pub fn encode_event_entry<'a>(shard: u32, seq: u64, event: impl Into<EventFields<'a>>) -> Bytes {
    let event = event.into();
    let event_len = event.encoded_len();
    let len = varint_field_len(u64::from(shard))
        + varint_field_len(seq)
        + 1
        + encoded_len_varint(event_len as u64)
        + event_len;
    let total = 1 + encoded_len_varint(len as u64) + len;
    let mut buf = BytesMut::with_capacity(total);
    encode_key(BATCH_EVENTS, WireType::LengthDelimited, &mut buf);
    encode_varint(len as u64, &mut buf);
    put_varint_field(DELIVERED_SHARD, u64::from(shard), &mut buf);
    put_varint_field(DELIVERED_SEQ, seq, &mut buf);
    encode_key(DELIVERED_EVENT, WireType::LengthDelimited, &mut buf);
    encode_varint(event_len as u64, &mut buf);
    event.encode_raw(&mut buf);
    debug_assert_eq!(buf.len(), total);
    buf.freeze()
}

/// Room kept in front of a batch for its headers: the gRPC prefix, then
/// the `SubscribeResponse` key and a length varint of up to five bytes
/// (frames stay far below 4 GiB: the message limit is 4 MiB by default).
const HEADER_ROOM: usize = GRPC_PREFIX + 6;

/// Builds one `SubscribeResponse { events: EventBatch }` frame out of
/// pre-encoded entries, copied into the frame's own buffer as they come
/// (one copy per entry, no reference count per entry); the header is
/// written into the room left in front when the frame is finished.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    buf: BytesMut,
    len: usize,
    /// The last frame's size: the next frame starts with a quarter more
    /// room than that, so a stream whose frames are large does not grow each
    /// one from scratch (see [`SHRINK_ABOVE`] for the other way).
    hint: usize,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one entry made by [`encode_event_entry`].
    pub fn push(&mut self, entry: &[u8]) {
        if self.buf.is_empty() {
            self.buf.reserve(
                (self.hint + self.hint / 4).max(HEADER_ROOM + entry.len() + MAX_TRAILER_FIELDS),
            );
            self.buf.put_bytes(0, HEADER_ROOM);
        }
        self.buf.put_slice(entry);
        self.len += 1;
    }

    /// Events added so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the frame will have, without the watermark and ack request.
    pub fn encoded_len(&self) -> usize {
        self.buf.len().saturating_sub(HEADER_ROOM)
    }

    /// Writes the frame and empties the builder for reuse. `ack_requested`
    /// asks the node to ack this batch at once (`EventBatch.ack_requested`).
    pub fn finish(&mut self, watermark_us: u64, ack_requested: bool) -> Frame {
        if self.buf.is_empty() {
            self.buf.reserve(HEADER_ROOM + MAX_TRAILER_FIELDS);
            self.buf.put_bytes(0, HEADER_ROOM);
        }
        put_varint_field(BATCH_WATERMARK, watermark_us, &mut self.buf);
        put_varint_field(BATCH_ACK_REQUESTED, u64::from(ack_requested), &mut self.buf);
        let inner = self.buf.len() - HEADER_ROOM;
        let start = HEADER_ROOM - 1 - encoded_len_varint(inner as u64);
        let mut header = &mut self.buf[start..HEADER_ROOM];
        encode_key(RESPONSE_EVENTS, WireType::LengthDelimited, &mut header);
        encode_varint(inner as u64, &mut header);
        // The gRPC prefix goes right in front of the message.
        let start = start - GRPC_PREFIX;
        let message = self.buf.len() - start - GRPC_PREFIX;
        put_grpc_prefix(&mut self.buf[start..start + GRPC_PREFIX], message);
        self.hint = self.buf.len();
        self.len = 0;
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() > SHRINK_ABOVE && buf.capacity() > 4 * buf.len() {
            // A small frame after large ones: do not let it pin their room.
            return Frame(Bytes::copy_from_slice(&buf[start..]));
        }
        let mut frame = buf.freeze();
        bytes::Buf::advance(&mut frame, start);
        Frame(frame)
    }
}

/// The fields after the events at their largest: the watermark (a key and a
/// ten-byte varint) and `ack_requested` (a key and a byte).
const MAX_TRAILER_FIELDS: usize = 11 + 2;

/// A frame holds its whole buffer until HTTP/2 has written it, so a frame
/// that fills less than a quarter of a buffer larger than this (a small one
/// right after large ones) is copied into one of its own size.
const SHRINK_ABOVE: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn event(entity: &str, version: u64) -> pb::Event {
        pb::Event {
            entity: entity.into(),
            version,
            origin: "eu".into(),
            publish_time_us: 123,
            payload: Bytes::from_static(b"p"),
            ..Default::default()
        }
    }

    #[test]
    fn batch_decodes_as_subscribe_response() {
        let mut b = BatchBuilder::new();
        b.push(&encode_event_entry(3, 10, &event("user:1", 5)));
        b.push(&encode_event_entry(4, 11, &event("post:2", 6)));
        let frame = b.finish(999, true);
        let decoded = pb::SubscribeResponse::decode(frame.message()).unwrap();
        let want = pb::SubscribeResponse {
            kind: Some(pb::subscribe_response::Kind::Events(pb::EventBatch {
                events: vec![
                    pb::DeliveredEvent {
                        shard: 3,
                        seq: 10,
                        event: Some(event("user:1", 5)),
                    },
                    pb::DeliveredEvent {
                        shard: 4,
                        seq: 11,
                        event: Some(event("post:2", 6)),
                    },
                ],
                watermark_us: 999,
                ack_requested: true,
            })),
        };
        assert_eq!(decoded, want);
        // Byte-identical to what prost would have encoded.
        assert_eq!(frame.message(), want.encode_to_vec());
        assert!(b.is_empty());
        let empty = b.finish(0, false);
        assert_eq!(
            pb::SubscribeResponse::decode(empty.message()).unwrap().kind,
            Some(pb::subscribe_response::Kind::Events(
                pb::EventBatch::default()
            ))
        );
    }

    #[test]
    fn reused_builder_writes_headers_of_every_length() {
        // Inner lengths with one-, two- and three-byte varints, a large frame
        // followed by small ones (the size hint), and empty frames between.
        let mut b = BatchBuilder::new();
        for (count, payload) in [
            (1, 0),
            (3, 200),
            (2, 20_000),
            (1, 0),
            (0, 0),
            (400, 100),
            (1, 1),
        ] {
            let events: Vec<pb::DeliveredEvent> = (0..count)
                .map(|i| pb::DeliveredEvent {
                    shard: i % 3,
                    seq: u64::from(i),
                    event: Some(pb::Event {
                        payload: Bytes::from(vec![7u8; payload]),
                        ..event("user:1", u64::from(i) + 1)
                    }),
                })
                .collect();
            for d in &events {
                b.push(&encode_event_entry(
                    d.shard,
                    d.seq,
                    d.event.as_ref().unwrap(),
                ));
            }
            assert_eq!(b.len(), count as usize);
            let frame = b.finish(u64::from(count) * 1_000_000, count % 2 == 1);
            let want = pb::SubscribeResponse {
                kind: Some(pb::subscribe_response::Kind::Events(pb::EventBatch {
                    events,
                    watermark_us: u64::from(count) * 1_000_000,
                    ack_requested: count % 2 == 1,
                })),
            };
            assert_eq!(
                frame.message(),
                want.encode_to_vec(),
                "{count} events of {payload} bytes"
            );
            let wire = frame.clone().into_grpc();
            assert_eq!(wire[0], 0, "uncompressed");
            assert_eq!(
                u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize,
                frame.len(),
                "the gRPC prefix holds the message length"
            );
            assert_eq!(wire.len(), GRPC_PREFIX + frame.len());
            assert!(b.is_empty());
            assert_eq!(b.encoded_len(), 0);
        }
    }

    /// Every field set, so that every hand-written key is compared with
    /// prost's (which writes the fields in tag order).
    #[test]
    fn hand_written_field_numbers_match_the_generated_code() {
        let d = pb::DeliveredEvent {
            shard: 1,
            seq: 1,
            event: Some(pb::Event {
                entity: "a".into(),
                version: 1,
                origin: "b".into(),
                publish_time_us: 1,
                payload: Bytes::from_static(b"c"),
                traceparent: "d".into(),
                tracestate: "e".into(),
            }),
        };
        let mut want = Vec::new();
        d.encode_length_delimited(&mut want).unwrap();
        let got = encode_event_entry(1, 1, d.event.as_ref().unwrap());
        assert_eq!(got[0], (BATCH_EVENTS << 3 | 2) as u8);
        assert_eq!(&got[1..], &want[..]);
    }

    #[test]
    fn frame_encodes_verbatim() {
        let msg = pb::SubscribeResponse {
            kind: Some(pb::subscribe_response::Kind::Progress(pb::Progress {
                cursor: None,
                watermark_us: 5,
            })),
        };
        let f = Frame::from_message(&msg);
        assert_eq!(f.encode_to_vec(), msg.encode_to_vec());
    }

    /// Decodes with prost's generated code and with [`Request`], asserting
    /// both agree (the same message, or both an error).
    fn same_as_prost(bytes: &[u8]) -> Option<pb::SubscribeRequest> {
        let generic = pb::SubscribeRequest::decode(bytes);
        let fast = Request::decode(bytes).map(|r| r.0);
        match (&generic, &fast) {
            (Ok(g), Ok(f)) => assert_eq!(g, f, "bytes {bytes:02x?}"),
            (Err(_), Err(_)) => {}
            _ => panic!("prost {generic:?} but fast {fast:?} for {bytes:02x?}"),
        }
        fast.ok()
    }

    fn ack(epoch: u64, seqs: Vec<u64>, applied: Option<pb::Cursor>) -> pb::SubscribeRequest {
        pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Ack(pb::Ack {
                cursor: Some(pb::Cursor { epoch, seqs }),
                applied,
            })),
        }
    }

    #[test]
    fn acks_decode_as_prost_decodes_them() {
        let seqs: Vec<u64> = (0..64).map(|i| i * 1_000_003).collect();
        let cases = [
            ack(7, seqs.clone(), None),
            ack(
                u64::MAX,
                vec![0, u64::MAX, 1 << 63],
                Some(pb::Cursor {
                    epoch: u64::MAX,
                    seqs: vec![5, 6],
                }),
            ),
            ack(0, vec![], None),
            pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Ack(pb::Ack::default())),
            },
            pb::SubscribeRequest::default(),
            pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Hello(pb::Hello {
                    node_id: "n".into(),
                    ..Default::default()
                })),
            },
        ];
        for msg in cases {
            assert_eq!(same_as_prost(&msg.encode_to_vec()), Some(msg));
        }
    }

    #[test]
    fn unusual_encodings_fall_back_to_prost() {
        // seqs unpacked (field 2, varint, twice), then the epoch after them.
        let cursor = [0x10, 0x05, 0x10, 0x06, 0x08, 0x07];
        let mut ack = vec![0x0a, cursor.len() as u8];
        ack.extend_from_slice(&cursor);
        let mut req = vec![0x12, ack.len() as u8];
        req.extend_from_slice(&ack);
        let got = same_as_prost(&req).unwrap();
        assert_eq!(got, self::ack(7, vec![5, 6], None));
        // An unknown field inside the ack, and two acks merged into one.
        same_as_prost(&[0x12, 0x02, 0x18, 0x01]).unwrap();
        let mut twice = req.clone();
        twice.extend_from_slice(&req);
        same_as_prost(&twice).unwrap();
        // Truncated, overlong varints and lengths past the end are errors.
        assert!(same_as_prost(&req[..req.len() - 1]).is_none());
        assert!(same_as_prost(&[0x12, 0x04, 0x0a, 0x02, 0x08, 0xff]).is_none());
        let overlong = [
            0x12, 0x0d, 0x0a, 0x0b, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x02,
        ];
        assert!(same_as_prost(&overlong).is_none());
    }

    proptest::proptest! {
        #[test]
        fn any_ack_decodes_as_prost_decodes_it(
            epoch in proptest::prelude::any::<u64>(),
            seqs in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..80),
            applied in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u64>(), 0..80)),
        ) {
            let msg = ack(epoch, seqs, applied.map(|seqs| pb::Cursor { epoch, seqs }));
            proptest::prop_assert_eq!(same_as_prost(&msg.encode_to_vec()), Some(msg));
        }

        #[test]
        fn any_bytes_decode_as_prost_decodes_them(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
        ) {
            same_as_prost(&bytes);
        }

        #[test]
        fn mangled_acks_decode_as_prost_decodes_them(
            seqs in proptest::collection::vec(proptest::prelude::any::<u64>(), 1..40),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..4),
        ) {
            let mut bytes = ack(9, seqs, None).encode_to_vec();
            for (at, b) in flips {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            same_as_prost(&bytes);
        }
    }
}
