//! Raw bytes as gRPC message bodies: what a broken or hostile client can put
//! on the wire, below any protobuf encoder. Shared by the bad-input tests.

#![allow(dead_code)]

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The method paths of the hub service.
pub const PUBLISH: &str = "/freshness.v1.Hub/Publish";
/// See [`PUBLISH`].
pub const SUBSCRIBE: &str = "/freshness.v1.Hub/Subscribe";
/// See [`PUBLISH`].
pub const STATUS: &str = "/freshness.v1.Hub/Status";

/// A codec that sends and receives message bodies as they are.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

/// See [`RawCodec`].
#[derive(Debug, Clone, Default)]
pub struct RawEncoder;

/// See [`RawCodec`].
#[derive(Debug, Clone, Default)]
pub struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// A gRPC client that sends raw bodies, with no size limit of its own.
pub fn client(channel: Channel) -> tonic::client::Grpc<Channel> {
    tonic::client::Grpc::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

/// One unary call with `body` as its request message.
pub async fn unary(
    channel: &Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = client(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Opens a Subscribe stream whose request messages are the raw bodies sent
/// on the returned sender. `first` is queued before the call is made, since
/// the hub answers the call only once it has read the first message.
pub async fn subscribe(
    channel: &Channel,
    first: Option<Vec<u8>>,
) -> (
    mpsc::Sender<Vec<u8>>,
    Result<tonic::Streaming<Vec<u8>>, tonic::Status>,
) {
    let (tx, rx) = mpsc::channel(64);
    let closed = first.is_none();
    if let Some(first) = first {
        tx.send(first).await.expect("fresh channel");
    }
    let mut grpc = client(channel.clone());
    if let Err(e) = grpc.ready().await {
        return (tx, Err(tonic::Status::unavailable(e.to_string())));
    }
    // Without a first message the request stream ends at once: the hub must
    // answer a stream that closed before its hello.
    let (tx, stream) = if closed {
        drop(tx);
        let (keep, _) = mpsc::channel(1);
        (keep, ReceiverStream::new(rx))
    } else {
        (tx, ReceiverStream::new(rx))
    };
    let opened = grpc
        .streaming(
            tonic::Request::new(stream),
            PathAndQuery::from_static(SUBSCRIBE),
            RawCodec,
        )
        .await
        .map(tonic::Response::into_inner);
    (tx, opened)
}
