//! Off-the-shelf gRPC tooling works against a hub: the standard health
//! service (what Kubernetes probes call) and server reflection (what
//! grpcurl uses to list and call services).

use freshness_tests::{TestHub, WAIT};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let hub = TestHub::start().await;
    let channel = hub.channel().await;
    let mut health = HealthClient::new(channel);
    for service in ["", "freshness.v1.Hub"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "freshness.v1.Hub".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let stopping = tokio::spawn(hub.stop());
    let next = tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("a status change in time")
        .expect("the watch stream carries it")
        .expect("before the stream ends");
    assert_eq!(next.status(), ServingStatus::NotServing);
    // A watcher that goes away lets the hub finish its shutdown.
    drop(watch);
    stopping.await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_hub_service_and_its_file() {
    let hub = TestHub::start().await;
    let channel = hub.channel().await;
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "freshness.v1.Hub".into(),
            )),
        },
    ]);
    let mut responses = reflection
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    match responses.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            assert!(names.contains(&"freshness.v1.Hub".to_owned()), "{names:?}");
            assert!(
                names.contains(&"grpc.health.v1.Health".to_owned()),
                "{names:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    match responses.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty());
        }
        other => panic!("{other:?}"),
    }
}
