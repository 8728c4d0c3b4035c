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

    // Metadata, as the HTTP API reports it.
    sdk.set_metadata("owner", "grpc-test").await.unwrap();
    let meta = sdk.get_metadata().await.unwrap();
    assert_eq!(meta.id, "grpcapp");
    assert_eq!(meta.extended_metadata["owner"], "grpc-test");
    assert!(!meta.runtime_version.is_empty());
    let store = meta
        .registered_components
        .iter()
        .find(|c| c.name == "statestore")
        .expect("the default store is listed");
    assert_eq!(store.r#type, "state.sled");
    assert!(store.capabilities.iter().any(|c| c == "ETAG"), "{store:?}");

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

    // Shutdown answers, then the sidecar stops gracefully.
    let mut req = tonic::Request::new(v1::ShutdownRequest {});
    req.metadata_mut()
        .insert("dapr-api-token", "s3cret".parse().unwrap());
    raw.shutdown(req).await.unwrap();
    let mut s = s;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after Shutdown:\n{}",
            s.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", s.logs());
}

/// What the echo app's actors were called back with: (kind, actor id, name, body).
type Callbacks = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, serde_json::Value)>>>;

/// An app with one actor type, `Echo`: a method answers `{id}:{method}:{body}`; timer and
/// reminder callbacks are recorded.
async fn echo_app() -> (u16, Callbacks) {
    use axum::extract::{Path, State};
    use axum::routing::{delete, get, put};
    let seen = Callbacks::default();
    let record = |kind: &'static str| {
        move |State(seen): State<Callbacks>,
              Path((id, name)): Path<(String, String)>,
              body: String| async move {
            let body = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
            seen.lock()
                .unwrap()
                .push((kind.to_string(), id, name, body));
            ""
        }
    };
    let app = axum::Router::new()
        .route(
            "/dapr/config",
            get(|| async { axum::Json(serde_json::json!({"entities": ["Echo"]})) }),
        )
        .route(
            "/actors/Echo/{id}/method/{m}",
            put(
                |Path((id, m)): Path<(String, String)>, body: String| async move {
                    if m == "late" {
                        return (axum::http::StatusCode::OK, late_save(&id, &body).await);
                    }
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
        .route(
            "/actors/Echo/{id}/method/timer/{name}",
            put(record("timer")),
        )
        .route(
            "/actors/Echo/{id}/method/remind/{name}",
            put(record("remind")),
        )
        .route("/actors/Echo/{id}", delete(|| async { "" }))
        .with_state(seen.clone());
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

/// Method `late` of the echo app: 300 ms into its turn, saves actor state through the gRPC port
/// given as the body (as the Rust SDK's actor context does); answers how that went.
async fn late_save(id: &str, grpc_port: &str) -> String {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let saved = async {
        let mut c = v1::dapr_client::DaprClient::connect(format!("http://127.0.0.1:{grpc_port}"))
            .await
            .map_err(|e| e.to_string())?;
        c.execute_actor_state_transaction(v1::ExecuteActorStateTransactionRequest {
            actor_type: "Echo".into(),
            actor_id: id.into(),
            operations: vec![v1::TransactionalActorStateOperation {
                operation_type: "upsert".into(),
                key: "late".into(),
                value: Some(prost_types_any(b"1")),
                metadata: HashMap::new(),
            }],
        })
        .await
        .map_err(|e| e.to_string())
    };
    match saved.await {
        Ok(_) => "\"saved\"".to_string(),
        Err(e) => serde_json::Value::String(format!("failed: {e}")).to_string(),
    }
}

type Seen = [(String, String, String, serde_json::Value)];

/// Waits up to 10 s for `cond` over the recorded callbacks.
async fn until(seen: &Callbacks, what: &str, cond: impl Fn(&Seen) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond(&seen.lock().unwrap()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The echo app and a sidecar for it, once an `Echo` actor answers through the sidecar (it
/// learns the app's actor types when the app answers `/dapr/config`).
async fn echo_host(app_id: &str) -> (tempfile::TempDir, Sidecar, Callbacks) {
    let (app_port, seen) = echo_app().await;
    let dir = tempfile::tempdir().unwrap();
    let port = app_port.to_string();
    let s = Sidecar::start(app_id, &dir.path().join("data"), &["--app-port", &port]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = s
            .client
            .post(s.url("/v1.0/actors/Echo/ready/method/ping"))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            return (dir, s, seen);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Echo actor never became callable:\n{}",
            s.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn actors_through_the_rust_sdk() {
    let (_dir, s, seen) = echo_host("grpcactors").await;
    let (mut sdk, mut raw) = clients(&s).await;

    // The SDK sends JSON and reads JSON back.
    let answer: String = sdk
        .invoke_actor("Echo", "e1", "hello", "there", None)
        .await
        .unwrap();
    assert_eq!(answer, "e1:hello:'there'");

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

    // The metadata counts the active actor.
    let runtime = sdk.get_metadata().await.unwrap().actor_runtime.unwrap();
    assert!(runtime.host_ready, "{runtime:?}");
    assert!(
        runtime
            .active_actors
            .iter()
            .any(|a| a.r#type == "Echo" && a.count >= 1),
        "{runtime:?}"
    );

    // A timer fires with its callback and its data (bytes, handed on as a base64 string, as
    // Dapr does), until it is unregistered.
    raw.register_actor_timer(v1::RegisterActorTimerRequest {
        actor_type: "Echo".into(),
        actor_id: "e1".into(),
        name: "tick".into(),
        due_time: "0s".into(),
        period: "50ms".into(),
        callback: "onTick".into(),
        data: b"td".to_vec(),
        ttl: String::new(),
    })
    .await
    .unwrap();
    let ticks = |c: &Seen| {
        c.iter()
            .filter(|(k, id, n, _)| k == "timer" && id == "e1" && n == "tick")
            .count()
    };
    until(&seen, "two timer ticks", |c| ticks(c) >= 2).await;
    let body = seen
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.0 == "timer")
        .unwrap()
        .3
        .clone();
    assert_eq!(body["callback"], "onTick", "{body}");
    assert_eq!(body["data"], "dGQ=", "{body}");
    raw.unregister_actor_timer(v1::UnregisterActorTimerRequest {
        actor_type: "Echo".into(),
        actor_id: "e1".into(),
        name: "tick".into(),
    })
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let after = ticks(&seen.lock().unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(ticks(&seen.lock().unwrap()), after, "the timer stopped");

    // A reminder goes through the scheduler and reaches the actor; a bad one is refused; one on
    // a type this host does not host is PERMISSION_DENIED (Dapr's 403).
    let reminder = |name: &str, due: &str| v1::RegisterActorReminderRequest {
        actor_type: "Echo".into(),
        actor_id: "e2".into(),
        name: name.into(),
        due_time: due.into(),
        data: b"rd".to_vec(),
        ..Default::default()
    };
    raw.register_actor_reminder(reminder("once", "0s"))
        .await
        .unwrap();
    until(&seen, "the reminder fired", |c| {
        c.iter()
            .any(|(k, id, n, b)| k == "remind" && id == "e2" && n == "once" && b["data"] == "cmQ=")
    })
    .await;
    let err = raw
        .register_actor_reminder(reminder("bad", "not a time"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = raw
        .register_actor_reminder(v1::RegisterActorReminderRequest {
            actor_type: "Elsewhere".into(),
            ..reminder("r", "1s")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    raw.register_actor_reminder(reminder("later", "1h"))
        .await
        .unwrap();
    raw.unregister_actor_reminder(v1::UnregisterActorReminderRequest {
        actor_type: "Echo".into(),
        actor_id: "e2".into(),
        name: "later".into(),
    })
    .await
    .unwrap();
    let http = s
        .client
        .get(s.url("/v1.0/actors/Echo/e2/reminders/later"))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status(), 404, "the unregistered reminder is gone");
}

/// A value as the SDK's actor context wraps it.
fn prost_types_any(v: &[u8]) -> prost_types::Any {
    prost_types::Any {
        type_url: String::new(),
        value: v.to_vec(),
    }
}

/// Passes request and answer bytes through untouched, to send what no client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Random and mutated messages on every method the sidecar serves (but `Shutdown`): each gets an
/// answer, and the sidecar stays up and keeps its data.
#[tokio::test]
async fn garbage_on_every_method_never_takes_the_sidecar_down() {
    use prost::Message;
    use rand::{Rng, SeedableRng};
    let (_dir, s, _seen) = echo_host("grpcfuzz").await;
    let (mut sdk, _) = clients(&s).await;
    sdk.save_state("statestore", "sentinel", b"kept".to_vec(), None, None, None)
        .await
        .unwrap();

    // A valid request per method, to mutate (so that many mutants still decode).
    let valid: Vec<(&'static str, Vec<u8>)> = vec![
        ("GetState", get("statestore", "k").encode_to_vec()),
        (
            "GetBulkState",
            v1::GetBulkStateRequest {
                store_name: "statestore".into(),
                keys: vec!["a".into(), "b".into()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "SaveState",
            v1::SaveStateRequest {
                store_name: "statestore".into(),
                states: vec![item("f", b"v")],
            }
            .encode_to_vec(),
        ),
        (
            "DeleteState",
            v1::DeleteStateRequest {
                store_name: "statestore".into(),
                key: "f".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "DeleteBulkState",
            v1::DeleteBulkStateRequest {
                store_name: "statestore".into(),
                states: vec![item("f", b"")],
            }
            .encode_to_vec(),
        ),
        (
            "ExecuteStateTransaction",
            v1::ExecuteStateTransactionRequest {
                store_name: "statestore".into(),
                operations: vec![v1::TransactionalStateOperation {
                    operation_type: "upsert".into(),
                    request: Some(item("f", b"v")),
                }],
                metadata: HashMap::new(),
            }
            .encode_to_vec(),
        ),
        (
            "InvokeActor",
            v1::InvokeActorRequest {
                actor_type: "Echo".into(),
                actor_id: "f".into(),
                method: "m".into(),
                data: b"{}".to_vec(),
                metadata: HashMap::new(),
            }
            .encode_to_vec(),
        ),
        (
            "GetActorState",
            v1::GetActorStateRequest {
                actor_type: "Echo".into(),
                actor_id: "f".into(),
                key: "k".into(),
            }
            .encode_to_vec(),
        ),
        (
            "ExecuteActorStateTransaction",
            v1::ExecuteActorStateTransactionRequest {
                actor_type: "Echo".into(),
                actor_id: "f".into(),
                operations: vec![v1::TransactionalActorStateOperation {
                    operation_type: "upsert".into(),
                    key: "k".into(),
                    value: Some(prost_types_any(b"1")),
                    metadata: HashMap::new(),
                }],
            }
            .encode_to_vec(),
        ),
        (
            "RegisterActorTimer",
            v1::RegisterActorTimerRequest {
                actor_type: "Echo".into(),
                actor_id: "f".into(),
                name: "t".into(),
                due_time: "1h".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "UnregisterActorTimer",
            v1::UnregisterActorTimerRequest {
                actor_type: "Echo".into(),
                actor_id: "f".into(),
                name: "t".into(),
            }
            .encode_to_vec(),
        ),
        (
            "RegisterActorReminder",
            v1::RegisterActorReminderRequest {
                actor_type: "Echo".into(),
                actor_id: "f".into(),
                name: "r".into(),
                due_time: "1h".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "UnregisterActorReminder",
            v1::UnregisterActorReminderRequest {
                actor_type: "Echo".into(),
                actor_id: "f".into(),
                name: "r".into(),
            }
            .encode_to_vec(),
        ),
        ("GetMetadata", Vec::new()),
        (
            "SetMetadata",
            v1::SetMetadataRequest {
                key: "k".into(),
                value: "v".into(),
            }
            .encode_to_vec(),
        ),
    ];
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", s.grpc_port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e55e7a);
    let (mut answered, mut refused) = (0, 0);
    for round in 0..600 {
        let (method, seed) = &valid[round % valid.len()];
        let payload: Vec<u8> = match round % 3 {
            // Random bytes.
            0 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
            // The valid message with a few bytes changed.
            1 => {
                let mut m = seed.clone();
                for _ in 0..rng.random_range(1..4) {
                    if !m.is_empty() {
                        let i = rng.random_range(0..m.len());
                        m[i] = rng.random();
                    }
                }
                m
            }
            // The valid message cut short.
            _ => seed[..rng.random_range(0..=seed.len())].to_vec(),
        };
        grpc.ready().await.expect("the sidecar still accepts calls");
        let path = format!("/dapr.proto.runtime.v1.Dapr/{method}")
            .parse()
            .unwrap();
        let call = grpc.unary(tonic::Request::new(payload.clone()), path, RawCodec);
        match tokio::time::timeout(std::time::Duration::from_secs(10), call).await {
            Ok(Ok(_)) => answered += 1,
            Ok(Err(status)) => {
                assert_ne!(
                    status.code(),
                    Code::Unknown,
                    "{method} {payload:?}: {status:?}"
                );
                refused += 1;
            }
            Err(_) => panic!(
                "{method} did not answer {payload:?} within 10 s:\n{}",
                s.logs()
            ),
        }
    }
    assert!(
        answered > 0 && refused > 0,
        "answered {answered}, refused {refused}"
    );
    let mut s = s;
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the sidecar died:\n{}",
        s.logs()
    );
    let kept = sdk.get_state("statestore", "sentinel", None).await.unwrap();
    assert_eq!(kept.data, b"kept");
}

/// A graceful stop waits for the turn in flight, and the gRPC API keeps answering until the
/// actors are handed off: the turn can still save its state through it.
#[tokio::test]
async fn grpc_api_answers_until_the_actors_are_handed_off() {
    let (_dir, s, _seen) = echo_host("grpcdrain").await;
    let call = {
        let (client, url, body) = (
            s.client.clone(),
            s.url("/v1.0/actors/Echo/h1/method/late"),
            s.grpc_port.to_string(),
        );
        tokio::spawn(async move { client.post(url).body(body).send().await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = s.client.post(s.url("/v1.0/shutdown")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let answer = call.await.unwrap().expect("the turn in flight is answered");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "\"saved\"", "{}", s.logs());
    let mut s = s;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while s.child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running:\n{}",
            s.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
