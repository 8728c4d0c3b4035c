//! Dapr's gRPC API (`--dapr-grpc-port`) driven by the official Rust SDK (crate `dapr`): its
//! high-level `Client` for what it wraps, and the SDK's generated `DaprClient` where a test needs
//! the gRPC status code or a method the `Client` does not wrap.

use std::collections::HashMap;

use dapr::client::TonicClientWithAuth;
use dapr::dapr::proto::common::v1::{state_options, Etag, StateItem, StateOptions};
use dapr::dapr::proto::runtime::v1;
use e2e::{free_port, Sidecar};
use tonic::transport::Channel;
use tonic::Code;

async fn clients(
    s: &Sidecar,
) -> (
    dapr::Client<TonicClientWithAuth>,
    v1::dapr_client::DaprClient<Channel>,
) {
    let addr = format!("http://127.0.0.1:{}", s.grpc_port);
    let sdk = dapr::Client::<TonicClientWithAuth>::connect_with_address(addr.clone())
        .await
        .expect("the SDK connects to the gRPC port");
    let raw = v1::dapr_client::DaprClient::connect(addr).await.unwrap();
    (sdk, raw)
}

fn item(key: &str, value: &[u8]) -> StateItem {
    StateItem {
        key: key.into(),
        value: value.to_vec(),
        ..Default::default()
    }
}

fn get(store: &str, key: &str) -> v1::GetStateRequest {
    v1::GetStateRequest {
        store_name: store.into(),
        key: key.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn state_through_the_rust_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecar::start("grpcapp", &dir.path().join("data"), &[]).await;
    let (mut sdk, mut raw) = clients(&s).await;

    // Save and read back; the value is stored as sent, so the HTTP API returns the same bytes.
    sdk.save_state(
        "statestore",
        "greeting",
        b"hello".to_vec(),
        None,
        None,
        None,
    )
    .await
    .unwrap();
    let got = sdk.get_state("statestore", "greeting", None).await.unwrap();
    assert_eq!(got.data, b"hello");
    assert!(!got.etag.is_empty());
    let http = s
        .client
        .get(s.url("/v1.0/state/statestore/greeting"))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status(), 200);
    assert_eq!(http.bytes().await.unwrap().as_ref(), b"hello");

    // First-write with a stale ETag is refused with ABORTED and changes nothing; the right one wins.
    let first_write = Some(StateOptions {
        concurrency: state_options::StateConcurrency::ConcurrencyFirstWrite as i32,
        consistency: 0,
    });
    let stale = StateItem {
        etag: Some(Etag {
            value: "999999".into(),
        }),
        options: first_write,
        ..item("greeting", b"stale")
    };
    let err = raw
        .save_state(v1::SaveStateRequest {
            store_name: "statestore".into(),
            states: vec![stale],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let fresh = StateItem {
        etag: Some(Etag {
            value: got.etag.clone(),
        }),
        options: first_write,
        ..item("greeting", b"hi")
    };
    sdk.save_bulk_states("statestore", vec![fresh])
        .await
        .unwrap();
    let now = raw
        .get_state(get("statestore", "greeting"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.data, b"hi");
    assert_ne!(now.etag, got.etag);

    // Bulk get answers in the order asked; a missing key comes back with its key only.
    sdk.save_bulk_states("statestore", vec![item("a", b"1"), item("b", b"2")])
        .await
        .unwrap();
    let bulk = raw
        .get_bulk_state(v1::GetBulkStateRequest {
            store_name: "statestore".into(),
            keys: vec!["b".into(), "nope".into(), "a".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    let seen: Vec<(&str, &[u8], bool)> = bulk
        .iter()
        .map(|i| (i.key.as_str(), i.data.as_slice(), i.etag.is_empty()))
        .collect();
    assert_eq!(
        seen,
        [
            ("b", &b"2"[..], false),
            ("nope", &b""[..], true),
            ("a", &b"1"[..], false)
        ]
    );

    // A transaction with an unknown operation writes nothing; a good one applies in full.
    let op = |t: &str, i: StateItem| v1::TransactionalStateOperation {
        operation_type: t.into(),
        request: Some(i),
    };
    let tx = |ops| v1::ExecuteStateTransactionRequest {
        store_name: "statestore".into(),
        operations: ops,
        metadata: HashMap::new(),
    };
    let err = raw
        .execute_state_transaction(tx(vec![
            op("upsert", item("c", b"3")),
            op("merge", item("a", b"")),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(raw
        .get_state(get("statestore", "c"))
        .await
        .unwrap()
        .into_inner()
        .data
        .is_empty());
    raw.execute_state_transaction(tx(vec![
        op("upsert", item("c", b"3")),
        op("delete", item("a", b"")),
    ]))
    .await
    .unwrap();
    assert_eq!(
        raw.get_state(get("statestore", "c"))
            .await
            .unwrap()
            .into_inner()
            .data,
        b"3"
    );
    assert!(raw
        .get_state(get("statestore", "a"))
        .await
        .unwrap()
        .into_inner()
        .etag
        .is_empty());

    // A TTL is reported back as ttlExpireTime.
    let ttl = HashMap::from([("ttlInSeconds".to_string(), "60".to_string())]);
    sdk.save_state("statestore", "brief", b"x".to_vec(), None, Some(ttl), None)
        .await
        .unwrap();
    let brief = raw
        .get_state(get("statestore", "brief"))
        .await
        .unwrap()
        .into_inner();
    assert!(brief.metadata.contains_key("ttlExpireTime"), "{brief:?}");

    // Deletes, one and bulk.
    sdk.delete_state("statestore", "greeting", None)
        .await
        .unwrap();
    assert!(sdk
        .get_state("statestore", "greeting", None)
        .await
        .unwrap()
        .data
        .is_empty());
    sdk.delete_bulk_state("statestore", vec![("b", Vec::new()), ("c", Vec::new())])
        .await
        .unwrap();
    assert!(raw
        .get_state(get("statestore", "b"))
        .await
        .unwrap()
        .into_inner()
        .data
        .is_empty());

    // Bad input: an unknown store, an empty key, an option outside its enum.
    for req in [get("nostore", "k"), get("statestore", "")] {
        let err = raw.get_state(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(!err.message().is_empty());
    }
    let odd = StateItem {
        options: Some(StateOptions {
            concurrency: 9,
            consistency: 0,
        }),
        ..item("odd", b"x")
    };
    let err = sdk
        .save_bulk_states("statestore", vec![odd])
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("InvalidArgument"), "{err:?}");

    // What the sidecar does not serve over gRPC says so.
    let err = sdk
        .publish_event("pubsub", "topic", "application/json", b"{}".to_vec(), None)
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("Unimplemented"), "{err:?}");
}

#[tokio::test]
async fn the_api_token_guards_the_grpc_api() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecar::start_with_env(
        "grpctoken",
        &dir.path().join("data"),
        &[],
        &[("DAPR_API_TOKEN", "s3cret")],
    )
    .await;
    let (_, mut raw) = clients(&s).await;
    let err = raw.get_state(get("statestore", "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut req = tonic::Request::new(get("statestore", "k"));
    req.metadata_mut()
        .insert("dapr-api-token", "s3cret".parse().unwrap());
    raw.get_state(req).await.unwrap();
}

/// An app with one actor type, `Echo`: a method answers `{id}:{method}:{body}`.
async fn echo_app() -> u16 {
    use axum::extract::Path;
    use axum::routing::{delete, get, put};
    let app = axum::Router::new()
        .route(
            "/dapr/config",
            get(|| async { axum::Json(serde_json::json!({"entities": ["Echo"]})) }),
        )
        .route(
            "/actors/Echo/{id}/method/{m}",
            put(
                |Path((id, m)): Path<(String, String)>, body: String| async move {
                    if m == "fail" {
                        return (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "it failed".to_string(),
                        );
                    }
                    (
                        axum::http::StatusCode::OK,
                        format!("\"{id}:{m}:{}\"", body.replace('"', "'")),
                    )
                },
            ),
        )
        .route("/actors/Echo/{id}", delete(|| async { "" }));
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test]
async fn actors_through_the_rust_sdk() {
    let app_port = echo_app().await;
    let dir = tempfile::tempdir().unwrap();
    let port = app_port.to_string();
    let s = Sidecar::start(
        "grpcactors",
        &dir.path().join("data"),
        &["--app-port", &port],
    )
    .await;
    let (mut sdk, mut raw) = clients(&s).await;

    // The SDK sends JSON and reads JSON back.
    let mut answer: Option<String> = None;
    for _ in 0..100 {
        // The sidecar learns the app's actor types once the app answers /dapr/config.
        match sdk.invoke_actor("Echo", "e1", "hello", "there", None).await {
            Ok(a) => {
                answer = Some(a);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert_eq!(answer.as_deref(), Some("e1:hello:'there'"));

    // An app error is INTERNAL, quoting the app.
    let err = raw
        .invoke_actor(v1::InvokeActorRequest {
            actor_type: "Echo".into(),
            actor_id: "e1".into(),
            method: "fail".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("it failed"), "{err:?}");
    let err = raw
        .invoke_actor(v1::InvokeActorRequest {
            actor_type: "Echo".into(),
            actor_id: "a/b".into(),
            method: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Actor state: a transaction (as the SDK's actor context sends it), read back over gRPC and
    // over HTTP.
    let any = |v: &[u8]| prost_types_any(v);
    raw.execute_actor_state_transaction(v1::ExecuteActorStateTransactionRequest {
        actor_type: "Echo".into(),
        actor_id: "e1".into(),
        operations: vec![
            v1::TransactionalActorStateOperation {
                operation_type: "upsert".into(),
                key: "count".into(),
                value: Some(any(b"41")),
                metadata: HashMap::new(),
            },
            v1::TransactionalActorStateOperation {
                operation_type: "upsert".into(),
                key: "gone".into(),
                value: Some(any(b"1")),
                metadata: HashMap::new(),
            },
        ],
    })
    .await
    .unwrap();
    let state = |key: &str| v1::GetActorStateRequest {
        actor_type: "Echo".into(),
        actor_id: "e1".into(),
        key: key.into(),
    };
    assert_eq!(
        raw.get_actor_state(state("count"))
            .await
            .unwrap()
            .into_inner()
            .data,
        b"41"
    );
    let http = s
        .client
        .get(s.url("/v1.0/actors/Echo/e1/state/count"))
        .send()
        .await
        .unwrap();
    assert_eq!(http.bytes().await.unwrap().as_ref(), b"41");
    let err = raw
        .execute_actor_state_transaction(v1::ExecuteActorStateTransactionRequest {
            actor_type: "Echo".into(),
            actor_id: "e1".into(),
            operations: vec![
                v1::TransactionalActorStateOperation {
                    operation_type: "delete".into(),
                    key: "gone".into(),
                    value: None,
                    metadata: HashMap::new(),
                },
                v1::TransactionalActorStateOperation {
                    operation_type: "rename".into(),
                    key: "count".into(),
                    value: None,
                    metadata: HashMap::new(),
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        raw.get_actor_state(state("gone"))
            .await
            .unwrap()
            .into_inner()
            .data,
        b"1"
    );
}

/// A value as the SDK's actor context wraps it.
fn prost_types_any(v: &[u8]) -> prost_types::Any {
    prost_types::Any {
        type_url: String::new(),
        value: v.to_vec(),
    }
}
