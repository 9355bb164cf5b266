//! The hub's HTTP/2 serving at the transport level, over real sockets:
//! streams per connection, per-route message limits, keep-alive closing a
//! dead connection, `grpc-timeout` on Publish, a reset stream freeing its
//! session, graceful shutdown (goodbye, then GOAWAY), and every connection
//! closed by the time the hub has stopped.
//!
//! Some of these speak HTTP/2 with the `h2` crate directly, to see what a
//! tonic client would hide (its own deadline, the server's SETTINGS).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use freshness::pb::subscribe_request::Kind as ReqKind;
use freshness::pb::subscribe_response::Kind as RespKind;
use freshness::pb::{self, hub_client::HubClient};
use freshness_tests::proxy::FaultProxy;
use freshness_tests::*;
use prost::Message;
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

/// An HTTP/2 connection to `hub`, its connection task spawned.
async fn h2_connect(
    hub: &TestHub,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(hub.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

/// A gRPC request head for `method` of the hub.
fn grpc_head(method: &str, timeout: Option<&str>) -> http::Request<()> {
    let mut req = http::Request::post(format!("http://hub/freshness.v1.Hub/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        req = req.header("grpc-timeout", t);
    }
    req.body(()).unwrap()
}

/// One gRPC message: its five-byte prefix, then the bytes.
fn grpc_message(msg: &impl Message) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(0);
    buf.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut buf).unwrap();
    buf.freeze()
}

/// Reads the next gRPC message of `body`; `None` at its end.
async fn read_message(body: &mut h2::RecvStream, buf: &mut BytesMut) -> Option<Bytes> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() >= 5 + len {
                buf.advance(5);
                return Some(buf.split_to(len).freeze());
            }
        }
        let data = tokio::time::timeout(WAIT, body.data())
            .await
            .expect("data in time")?
            .unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        buf.extend_from_slice(&data);
    }
}

/// Opens a subscribe stream with `hello` on `channel` and reads its welcome.
async fn subscribe_on(
    channel: &Channel,
    hello: pb::Hello,
) -> (
    tokio::sync::mpsc::Sender<pb::SubscribeRequest>,
    tonic::Streaming<pb::SubscribeResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        kind: Some(ReqKind::Hello(hello)),
    })
    .await
    .unwrap();
    let mut stream = HubClient::new(channel.clone())
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("welcome in time")
        .unwrap()
        .and_then(|m| m.kind);
    assert!(matches!(first, Some(RespKind::Welcome(_))), "{first:?}");
    (tx, stream)
}

async fn node_ids(hub: &TestHub) -> Vec<String> {
    hub.status()
        .await
        .nodes
        .into_iter()
        .map(|n| n.node_id)
        .collect()
}

#[tokio::test]
async fn a_connection_is_held_to_two_hundred_streams() {
    let hub = TestHub::start().await;
    // The hub says so in its SETTINGS...
    let (send, _conn) = h2_connect(&hub).await;
    wait_for(|| async { (send.current_max_send_streams() == 200).then_some(()) }).await;

    // ...and one connection carries 200 streams, a 201st waiting for one
    // of them to end.
    let channel = hub.channel().await;
    let mut streams = Vec::new();
    for i in 0..200 {
        streams.push(subscribe_on(&channel, hello(&format!("n{i}"), &[], None)).await);
    }
    assert_eq!(node_ids(&hub).await.len(), 200);
    let late = {
        let channel = channel.clone();
        tokio::spawn(async move { subscribe_on(&channel, hello("late", &[], None)).await })
    };
    // It has not come in while 200 are open; it does once one is dropped.
    assert!(!node_ids(&hub).await.contains(&"late".to_owned()));
    streams.pop();
    let _late = tokio::time::timeout(WAIT, late)
        .await
        .expect("the 201st stream opens once one ended")
        .unwrap();
    wait_for(|| async {
        let ids = node_ids(&hub).await;
        (ids.len() == 200 && ids.contains(&"late".to_owned())).then_some(())
    })
    .await;
    drop(streams);
    hub.stop().await;
}

#[tokio::test]
async fn subscribe_streams_have_a_message_limit_of_their_own() {
    // Publish takes up to max_message_bytes (4 MiB); a stream's messages
    // are held to 256 KiB and a little per shard.
    let hub = TestHub::start().await;
    let mut big = hello("big", &[], None);
    big.node_id = "x".repeat(300 * 1024);
    let err = RawNode::connect(&hub.url(), big).await.err().unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let mut req = publish_request(&[
        ("user:1", 1),
        ("user:2", 1),
        ("user:3", 1),
        ("user:4", 1),
        ("user:5", 1),
    ]);
    for e in &mut req.events {
        e.payload = vec![1u8; 60 * 1024].into();
    }
    hub.client()
        .await
        .publish(req)
        .await
        .expect("a 300 KiB publish is within its limit");
    hub.stop().await;
}

#[tokio::test]
async fn keep_alive_closes_a_connection_whose_peer_went_silent() {
    let mut config = test_config();
    // Short, but with room for a busy machine to answer a ping before the
    // link is cut.
    config.keepalive_interval = Duration::from_millis(200);
    config.keepalive_timeout = Duration::from_secs(1);
    let hub = TestHub::start_with(config).await;
    let proxy = FaultProxy::start(hub.addr).await;
    let _node = RawNode::connect(&proxy.url(), hello("far", &[], None))
        .await
        .unwrap();
    assert_eq!(node_ids(&hub).await, vec!["far"]);
    // Nothing gets through any more, either way, but the hub's socket stays
    // open: only its pings can tell.
    proxy.set_delay(Duration::from_secs(3600));
    wait_for(|| async { node_ids(&hub).await.is_empty().then_some(()) }).await;
    hub.stop().await;
}

#[tokio::test]
async fn publish_honours_the_callers_grpc_timeout() {
    let mut config = test_config();
    config.max_ack_waiters = 1;
    let hub = TestHub::start_with(config).await;
    // A node that never acks: a REGION publish waits for it.
    let _silent = RawNode::connect(&hub.url(), hello("silent", &[], None))
        .await
        .unwrap();
    let mut req = publish_request(&[("user:1", 1)]);
    req.ack = pb::AckLevel::Region as i32;
    req.timeout_ms = 60_000;

    // Straight over HTTP/2, so that no client-side deadline answers first.
    let (send, _conn) = h2_connect(&hub).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut body) = send
        .send_request(grpc_head("Publish", Some("200m")), false)
        .unwrap();
    body.send_data(grpc_message(&req), true).unwrap();
    let response = tokio::time::timeout(WAIT, response)
        .await
        .expect("an answer in time")
        .unwrap();
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        status.as_deref(),
        Some("4"),
        "DEADLINE_EXCEEDED: {response:?}"
    );

    // The call was dropped with its deadline: its ack waiter is free again
    // (the hub allows one), so the next REGION publish waits and is answered.
    let mut next = publish_request(&[("user:2", 1)]);
    next.ack = pb::AckLevel::Region as i32;
    next.timeout_ms = 100;
    let resp = hub.client().await.publish(next).await.unwrap().into_inner();
    assert!(!resp.complete);
    assert_eq!(resp.pending_nodes, vec!["silent"]);
    hub.stop().await;
}

#[tokio::test]
async fn a_stream_reset_by_its_client_frees_its_session_and_keeps_the_connection() {
    let hub = TestHub::start().await;
    let channel = hub.channel().await;
    let (tx, stream) = subscribe_on(&channel, hello("quitter", &[], None)).await;
    assert_eq!(node_ids(&hub).await, vec!["quitter"]);
    // Dropping the response resets the stream; the connection stays.
    drop(stream);
    drop(tx);
    let mut client = HubClient::new(channel.clone());
    wait_for(|| {
        let mut client = client.clone();
        async move {
            let status = client.status(pb::StatusRequest {}).await.ok()?.into_inner();
            status.nodes.is_empty().then_some(())
        }
    })
    .await;
    client
        .publish(publish_request(&[("user:1", 1)]))
        .await
        .expect("the same connection still serves");
    hub.stop().await;
}

#[tokio::test]
async fn shutdown_says_goodbye_then_goes_away_within_the_grace_period() {
    let hub = TestHub::start().await;
    let (send, conn) = h2_connect(&hub).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut requests) = send
        .send_request(grpc_head("Subscribe", None), false)
        .unwrap();
    requests
        .send_data(
            grpc_message(&pb::SubscribeRequest {
                kind: Some(ReqKind::Hello(hello("n1", &[], None))),
            }),
            false,
        )
        .unwrap();
    let mut body = response.await.unwrap().into_body();
    let mut buf = BytesMut::new();
    let welcome = pb::SubscribeResponse::decode(read_message(&mut body, &mut buf).await.unwrap())
        .unwrap()
        .kind;
    assert!(matches!(welcome, Some(RespKind::Welcome(_))), "{welcome:?}");

    let stopping = tokio::spawn(hub.stop());
    // The goodbye, on the stream...
    loop {
        let msg = read_message(&mut body, &mut buf)
            .await
            .expect("a goodbye before the stream ends");
        match pb::SubscribeResponse::decode(msg).unwrap().kind {
            Some(RespKind::Progress(_)) => {}
            Some(RespKind::Goodbye(g)) => {
                assert_eq!(g.reason, pb::GoodbyeReason::Shutdown as i32);
                break;
            }
            other => panic!("expected a goodbye, got {other:?}"),
        }
    }
    // ...then the stream ends OK...
    assert!(read_message(&mut body, &mut buf).await.is_none());
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    // ...and the connection closes gracefully (GOAWAY, no error) while the
    // client still holds its side of it.
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("the connection closes")
        .unwrap()
        .expect("a graceful close");
    drop(requests);
    // Well within the grace period (5 s in tests): the hub's stop returns Ok.
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the hub stops")
        .unwrap();
}

#[tokio::test]
async fn every_connection_is_closed_once_the_hub_has_stopped() {
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(1);
    let hub = TestHub::start_with_http(config).await;
    // An HTTP/2 connection with a stream open, and a kept-alive HTTP/1
    // connection to the status listener.
    let channel = hub.channel().await;
    let _node = subscribe_on(&channel, hello("n1", &[], None)).await;
    let mut page = TcpStream::connect(hub.http.unwrap()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut page,
        b"GET /status.json HTTP/1.1\r\nhost: hub\r\n\r\n",
    )
    .await
    .unwrap();
    let mut grpc = TcpStream::connect(hub.addr).await.unwrap();
    // The client preface and an empty SETTINGS frame: a connection past
    // its handshake with no stream, whose peer then answers nothing (not
    // the ping of a graceful close either: it is dropped at the end of the
    // grace period).
    tokio::io::AsyncWriteExt::write_all(
        &mut grpc,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    )
    .await
    .unwrap();
    page.readable().await.unwrap();
    hub.stop().await;
    // Each connection's task ended before `stop` returned, so each socket
    // was closed already: what is left to read ends in EOF (or a reset, when
    // the hub closed with bytes of ours unread), not a wait.
    for socket in [&mut page, &mut grpc] {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket.try_read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the hub left a connection open: {e}"),
            }
        }
    }
}
