//! A subscribe stream's decode buffer grows to its largest message and keeps
//! that size while the stream lives. With the publish limit (4 MiB) on
//! subscribe streams, 16 streams that opened with a 4 MiB hello (a resume
//! cursor of another epoch, of which the hub keeps nothing) took a hub from
//! 16 to 86 MiB. Subscribe messages have their own limit, sized for a hello
//! or an ack of the hub's shard count: such hellos are refused
//! `RESOURCE_EXHAUSTED` and the hub's memory stays put, while a cursor of
//! another epoch with many more shards than this hub is still reset.

#![cfg(target_os = "linux")]

use std::process::{Command, Stdio};
use std::time::Duration;

use freshness::pb::{self, hub_client::HubClient};
use freshness_tests::{free_addr, memory_kib};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_messages_have_their_own_limit_so_no_stream_pins_megabytes() {
    let (listen, metrics) = (free_addr(), free_addr());
    let mut child = Command::new(env!("CARGO_BIN_EXE_freshness-hub"))
        .args([
            "--listen",
            &listen.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            // No `freshness-data` in the working directory, which another
            // test's hub of another shard count may hold.
            "--ephemeral",
        ])
        .env("FRESHNESS_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{listen}");
    let deadline = tokio::time::Instant::now() + freshness_tests::WAIT;
    let client = loop {
        if let Ok(c) = HubClient::connect(url.clone()).await {
            break c.max_encoding_message_size(8 << 20);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the hub exited with {status} before serving");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub did not serve"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pid = child.id();
    let before = memory_kib(pid, "VmRSS");
    let mut open = Vec::new();
    for i in 0..16 {
        let (tx, rx) = mpsc::channel(1);
        let hello = pb::Hello {
            node_id: format!("big-{i}"),
            // 400,000 ten-byte seqs: a valid message just under 4 MiB.
            resume: Some(pb::Cursor {
                epoch: 1,
                seqs: vec![u64::MAX; 400_000],
            }),
            ..Default::default()
        };
        tx.send(pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let err = match client.clone().subscribe(ReceiverStream::new(rx)).await {
            Err(s) => s,
            Ok(resp) => resp
                .into_inner()
                .message()
                .await
                .expect_err("a 4 MiB hello is refused"),
        };
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        open.push(tx);
    }
    let with_streams = memory_kib(pid, "VmRSS");

    // A cursor of another epoch with 10,000 shards (this hub has 64): a
    // node of another deployment, reset as SPEC 3.2.3 says.
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Hello(pb::Hello {
            node_id: "wide".into(),
            resume: Some(pb::Cursor {
                epoch: 1,
                seqs: vec![u64::MAX; 10_000],
            }),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut wide = client
        .clone()
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = wide.message().await.unwrap().and_then(|m| m.kind);
    assert!(
        matches!(welcome, Some(pb::subscribe_response::Kind::Welcome(_))),
        "{welcome:?}"
    );
    let reset = wide.message().await.unwrap().and_then(|m| m.kind);
    match reset {
        Some(pb::subscribe_response::Kind::Reset(r)) => {
            assert!(r.all);
            assert_eq!(r.reason, pb::ResetReason::EpochChanged as i32);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    drop((open, tx, wide));
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "RSS: before {} MiB, after 16 refused 4 MiB hellos {} MiB",
        before / 1024,
        with_streams / 1024,
    );
    assert!(
        with_streams <= before + 16 * 1024,
        "16 refused hellos left {} MiB behind",
        (with_streams - before) / 1024
    );
}
