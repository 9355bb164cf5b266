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

/// An already encoded `SubscribeResponse`.
#[derive(Clone, Default, Debug, PartialEq)]
pub struct Frame(pub Bytes);

impl Frame {
    /// Encodes a message built the ordinary way (welcome, progress, resets).
    pub fn from_message(msg: &pb::SubscribeResponse) -> Self {
        Self(msg.encode_to_vec().into())
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty frame.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Message for Frame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
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
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Encodes one delivered event as an element of `EventBatch.events`: key,
/// length and message. Done once per event, at append time.
pub fn encode_event_entry(shard: u32, seq: u64, event: &pb::Event) -> Bytes {
    let delivered = pb::DeliveredEvent {
        shard,
        seq,
        event: Some(event.clone()),
    };
    let len = delivered.encoded_len();
    let mut buf = BytesMut::with_capacity(1 + encoded_len_varint(len as u64) + len);
    encode_key(BATCH_EVENTS, WireType::LengthDelimited, &mut buf);
    encode_varint(len as u64, &mut buf);
    delivered.encode_raw(&mut buf);
    buf.freeze()
}

/// Builds one `SubscribeResponse { events: EventBatch }` frame out of
/// pre-encoded entries.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    entries: Vec<Bytes>,
    inner_len: usize,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one entry made by [`encode_event_entry`] (a reference-count bump).
    pub fn push(&mut self, entry: &Bytes) {
        self.inner_len += entry.len();
        self.entries.push(entry.clone());
    }

    /// Events added so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the frame will have, without the watermark.
    pub fn encoded_len(&self) -> usize {
        self.inner_len
    }

    /// Writes the frame and empties the builder for reuse.
    pub fn finish(&mut self, watermark_us: u64) -> Frame {
        let mut inner = self.inner_len;
        if watermark_us != 0 {
            inner += 1 + encoded_len_varint(watermark_us);
        }
        let mut buf = BytesMut::with_capacity(1 + encoded_len_varint(inner as u64) + inner);
        encode_key(RESPONSE_EVENTS, WireType::LengthDelimited, &mut buf);
        encode_varint(inner as u64, &mut buf);
        for e in self.entries.drain(..) {
            buf.put_slice(&e);
        }
        if watermark_us != 0 {
            encode_key(BATCH_WATERMARK, WireType::Varint, &mut buf);
            encode_varint(watermark_us, &mut buf);
        }
        self.inner_len = 0;
        Frame(buf.freeze())
    }
}

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
        let frame = b.finish(999);
        let decoded = pb::SubscribeResponse::decode(frame.0.clone()).unwrap();
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
            })),
        };
        assert_eq!(decoded, want);
        // Byte-identical to what prost would have encoded.
        assert_eq!(frame.0, want.encode_to_vec());
        assert!(b.is_empty());
        let empty = b.finish(0);
        assert_eq!(
            pb::SubscribeResponse::decode(empty.0).unwrap().kind,
            Some(pb::subscribe_response::Kind::Events(
                pb::EventBatch::default()
            ))
        );
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
}
