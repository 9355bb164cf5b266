//! The hub's side of the gRPC wire: its server generated once more from the
//! protocol (`build.rs`), with `SubscribeResponse` replaced by
//! [`wire::Frame`](freshness::wire::Frame) (event batches encoded once and
//! shared between streams), `SubscribeRequest` by
//! [`wire::Request`](freshness::wire::Request) (acks decoded straight from
//! the buffer) and tonic's codec by [`LeanCodec`] (small per-stream
//! buffers). Every other type refers to the protocol's own (`freshness::pb`).

use prost::Message;
use tonic::codec;

/// The hub service, generated on [`Frame`](freshness::wire::Frame),
/// [`Request`](freshness::wire::Request) and [`LeanCodec`].
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod raw {
    include!(concat!(env!("OUT_DIR"), "/raw/freshness.v1.rs"));
}

/// The hub's gRPC codec: prost's, with 1 KiB starting buffers per stream
/// instead of 8 KiB for each direction. Acks and progress messages are a few
/// hundred bytes and event frames arrive already encoded, so the larger
/// buffers mostly sat idle in every one of thousands of streams; a larger
/// message grows the buffer as before.
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(std::marker::PhantomData<(T, U)>);

/// Starting size of a stream's encode and decode buffers.
pub const STREAM_BUFFER_BYTES: usize = 1024;
/// Bytes encoded before a stream yields to others (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> codec::Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = LeanDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(codec::BufferSettings::new(
            STREAM_BUFFER_BYTES,
            YIELD_THRESHOLD,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        LeanDecoder(std::marker::PhantomData)
    }
}

/// [`LeanCodec`]'s decoder: prost's, with its starting buffers, and bytes
/// that are not a valid message answered `INVALID_ARGUMENT` (the sender's
/// fault, SPEC §4) where prost's says `INTERNAL`.
#[derive(Debug, Clone, Copy)]
pub struct LeanDecoder<U>(std::marker::PhantomData<U>);

impl<U: Message + Default> codec::Decoder for LeanDecoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut codec::DecodeBuf<'_>) -> Result<Option<U>, tonic::Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))
    }

    fn buffer_settings(&self) -> codec::BufferSettings {
        codec::BufferSettings::new(STREAM_BUFFER_BYTES, YIELD_THRESHOLD)
    }
}
