//! Dapr's gRPC API on `--dapr-grpc-port` (service `dapr.proto.runtime.v1.Dapr`), as far as the
//! sidecar serves it: the state building block, actors (invocation, state, timers, reminders),
//! metadata and shutdown. It is what the official SDKs' gRPC clients speak (the Rust `dapr`
//! crate's `Client`, the Python `DaprClient`); any other method of Dapr's service answers
//! `UNIMPLEMENTED`.
//!
//! Each method validates, stores and answers through the same functions as the HTTP API
//! (`state_api`, `actors::api`, `jobs`, `meta_api`), so the two agree on keys, ETags, TTLs,
//! fencing, reminder validation and errors. A reminder request is turned into the HTTP API's JSON
//! body and parsed by the same parser; timer and reminder data reach the app as Dapr hands gRPC
//! data on, a base64 JSON string. Errors carry the HTTP API's message, with the gRPC code for its
//! HTTP status (400 is `INVALID_ARGUMENT`, an ETag mismatch `ABORTED`, ...). Values travel as
//! bytes and are stored as they come, as Dapr stores them.

use std::collections::HashMap;
use std::future::Future;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use components::state::{Concurrency, DeleteOp, Op, StateItem as Stored};
use proto::dapr::dapr_server::{Dapr, DaprServer};
use proto::dapr::job_failure_policy::Policy;
use proto::dapr::state_options::{StateConcurrency, StateConsistency};
use proto::dapr::{
    actor_runtime::ActorRuntimeStatus, ActiveActorsCount, ActorRuntime, AppConnectionProperties,
    GetMetadataRequest, GetMetadataResponse, RegisteredComponents, SetMetadataRequest,
};
use proto::dapr::{
    BulkStateItem, DeleteBulkStateRequest, DeleteStateRequest, Empty,
    ExecuteActorStateTransactionRequest, ExecuteStateTransactionRequest, GetActorStateRequest,
    GetActorStateResponse, GetBulkStateRequest, GetBulkStateResponse, GetStateRequest,
    GetStateResponse, InvokeActorRequest, InvokeActorResponse, JobFailurePolicy,
    RegisterActorReminderRequest, RegisterActorTimerRequest, SaveStateRequest, ShutdownRequest,
    StateItem, StateOptions, UnregisterActorReminderRequest, UnregisterActorTimerRequest,
};
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

use crate::actors::api as actor_api;
use crate::actors::timers::TimerSpec;
use crate::error::ApiError;
use crate::state_api::{self, StoreEntry};
use crate::{jobs, Host, Shared};

/// Serves the gRPC API on `listener` until `shutdown` resolves or the host is told to stop; then
/// it keeps answering until the host has handed its actors off (their apps may still save state
/// through it, as the Rust SDK's actor context does), as the HTTP API does.
pub async fn run(
    listener: tokio::net::TcpListener,
    host: Host,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let shared = host.shared().clone();
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, app_id = shared.config.app_id, "gRPC API listening");
    let stop = host.shutdown_token();
    let limit = shared.config.max_body_bytes;
    let token = shared.config.api_token.clone();
    let service = DaprServer::new(GrpcApi { shared })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let service = tonic::service::interceptor::InterceptedService::new(service, move |req| {
        check_token(token.as_deref(), req)
    });
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                () = shutdown => {}
                () = stop.cancelled() => {}
            }
            host.stop().await;
        })
        .await
}

/// With `DAPR_API_TOKEN` set, every call must carry it as `dapr-api-token` metadata.
#[allow(clippy::result_large_err)]
fn check_token(token: Option<&str>, req: Request<()>) -> Result<Request<()>, Status> {
    let Some(token) = token else { return Ok(req) };
    let given = req
        .metadata()
        .get("dapr-api-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if crate::meta_api::constant_time_eq(given, token.as_bytes()) {
        Ok(req)
    } else {
        Err(Status::unauthenticated(
            "authentication error: api token mismatch",
        ))
    }
}

/// The gRPC code for an HTTP API error's status; the message is the HTTP API's.
fn status(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
        StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
        StatusCode::NOT_FOUND => tonic::Code::NotFound,
        StatusCode::CONFLICT => tonic::Code::Aborted,
        StatusCode::PRECONDITION_FAILED => tonic::Code::FailedPrecondition,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => {
            tonic::Code::ResourceExhausted
        }
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => tonic::Code::DeadlineExceeded,
        StatusCode::NOT_IMPLEMENTED | StatusCode::METHOD_NOT_ALLOWED => tonic::Code::Unimplemented,
        StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
        s if s.is_server_error() => tonic::Code::Internal,
        _ => tonic::Code::Unknown,
    };
    Status::new(code, e.message)
}

fn concurrency(options: Option<&StateOptions>) -> Result<Concurrency, ApiError> {
    let raw = options.map_or(0, |o| o.concurrency);
    match StateConcurrency::try_from(raw) {
        Ok(StateConcurrency::ConcurrencyFirstWrite) => Ok(Concurrency::FirstWrite),
        Ok(_) => Ok(Concurrency::LastWrite),
        Err(_) => Err(ApiError::malformed(format!(
            "invalid concurrency {raw}: use CONCURRENCY_FIRST_WRITE or CONCURRENCY_LAST_WRITE"
        ))),
    }
}

fn consistency(raw: i32) -> Result<(), ApiError> {
    StateConsistency::try_from(raw).map(|_| ()).map_err(|_| {
        ApiError::malformed(format!(
            "invalid consistency {raw}: use CONSISTENCY_EVENTUAL or CONSISTENCY_STRONG"
        ))
    })
}

/// An ETag as the wire has it: an absent or empty one is none.
fn etag(e: Option<proto::dapr::Etag>) -> Option<String> {
    e.map(|e| e.value).filter(|v| !v.is_empty())
}

/// Request-level metadata, with the item's own on top (as Dapr merges them).
fn merged(
    base: &HashMap<String, String>,
    item: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut m = base.clone();
    m.extend(item.iter().map(|(k, v)| (k.clone(), v.clone())));
    m
}

fn set_op(
    shared: &Shared,
    entry: &StoreEntry,
    item: StateItem,
    meta: &HashMap<String, String>,
) -> Result<Op, ApiError> {
    if let Some(o) = &item.options {
        consistency(o.consistency)?;
    }
    state_api::new_set_op(
        shared,
        entry,
        &item.key,
        Bytes::from(item.value),
        etag(item.etag),
        concurrency(item.options.as_ref())?,
        &merged(meta, &item.metadata),
    )
    .map(Op::Set)
}

fn delete_op(shared: &Shared, entry: &StoreEntry, item: StateItem) -> Result<Op, ApiError> {
    if let Some(o) = &item.options {
        consistency(o.consistency)?;
        concurrency(Some(o))?;
    }
    Ok(Op::Delete(DeleteOp {
        key: entry.store_key(shared, &item.key)?,
        etag: etag(item.etag),
    }))
}

fn ttl_metadata(item: &Stored) -> HashMap<String, String> {
    state_api::expire_time(item)
        .map(|t| HashMap::from([("ttlExpireTime".to_string(), t)]))
        .unwrap_or_default()
}

/// Timer and reminder data as Dapr hands it on: the bytes as a base64 JSON string (what Go's
/// `json.Marshal` makes of a byte slice); none when empty.
fn data_json(data: &[u8]) -> Option<Value> {
    use base64::Engine;
    (!data.is_empty())
        .then(|| Value::String(base64::engine::general_purpose::STANDARD.encode(data)))
}

/// A reminder's failure policy as the JSON the HTTP API reads (`{"drop": {}}` or
/// `{"constant": {"interval": <Go duration>, "maxRetries": n}}`).
fn failure_policy_json(p: JobFailurePolicy) -> Result<Value, Status> {
    match p.policy {
        None => Ok(json!({})),
        Some(Policy::Drop(_)) => Ok(json!({"drop": {}})),
        Some(Policy::Constant(c)) => {
            let mut constant = serde_json::Map::new();
            if let Some(d) = c.interval {
                if d.seconds < 0 || d.nanos < 0 {
                    return Err(Status::invalid_argument(
                        "failure policy: the interval must not be negative",
                    ));
                }
                let interval = if d.nanos == 0 {
                    format!("{}s", d.seconds)
                } else {
                    format!("{}s{}ns", d.seconds, d.nanos)
                };
                constant.insert("interval".into(), json!(interval));
            }
            if let Some(n) = c.max_retries {
                constant.insert("maxRetries".into(), json!(n));
            }
            Ok(json!({ "constant": constant }))
        }
    }
}

/// The JSON body of the HTTP API's reminder request, from the gRPC one.
fn reminder_body(req: &RegisterActorReminderRequest) -> Result<Vec<u8>, Status> {
    let mut body = json!({"dueTime": req.due_time, "period": req.period, "ttl": req.ttl});
    if let Some(d) = data_json(&req.data) {
        body["data"] = d;
    }
    if let Some(o) = req.overwrite {
        body["overwrite"] = json!(o);
    }
    if let Some(p) = req.failure_policy {
        body["failurePolicy"] = failure_policy_json(p)?;
    }
    Ok(body.to_string().into_bytes())
}

struct GrpcApi {
    shared: std::sync::Arc<Shared>,
}

impl GrpcApi {
    fn store(&self, name: &str) -> Result<&StoreEntry, Status> {
        state_api::lookup(&self.shared, name).map_err(status)
    }
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Dapr for GrpcApi {
    async fn get_state(&self, req: Request<GetStateRequest>) -> Answer<GetStateResponse> {
        let req = req.into_inner();
        let entry = self.store(&req.store_name)?;
        consistency(req.consistency).map_err(status)?;
        let item = state_api::get_item(&self.shared, entry, &req.store_name, &req.key)
            .await
            .map_err(status)?;
        Ok(Response::new(match item {
            None => GetStateResponse::default(),
            Some(item) => GetStateResponse {
                metadata: ttl_metadata(&item),
                data: item.value.to_vec(),
                etag: item.etag,
            },
        }))
    }

    async fn get_bulk_state(
        &self,
        req: Request<GetBulkStateRequest>,
    ) -> Answer<GetBulkStateResponse> {
        let req = req.into_inner();
        let entry = self.store(&req.store_name)?;
        let items = state_api::bulk_items(&self.shared, entry, &req.store_name, &req.keys)
            .await
            .map_err(status)?;
        let items = req
            .keys
            .into_iter()
            .zip(items)
            .map(|(key, item)| match item {
                None => BulkStateItem {
                    key,
                    ..Default::default()
                },
                Some(item) => BulkStateItem {
                    key,
                    metadata: ttl_metadata(&item),
                    data: item.value.to_vec(),
                    etag: item.etag,
                    error: String::new(),
                },
            })
            .collect();
        Ok(Response::new(GetBulkStateResponse { items }))
    }

    async fn save_state(&self, req: Request<SaveStateRequest>) -> Answer<Empty> {
        let req = req.into_inner();
        let entry = self.store(&req.store_name)?;
        let ops = req
            .states
            .into_iter()
            .map(|item| set_op(&self.shared, entry, item, &HashMap::new()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(status)?;
        let what = format!("failed saving state in state store {}", req.store_name);
        state_api::transact(entry, ops, "ERR_STATE_SAVE", &what)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn delete_state(&self, req: Request<DeleteStateRequest>) -> Answer<Empty> {
        let req = req.into_inner();
        let entry = self.store(&req.store_name)?;
        let what = format!(
            "failed deleting state with key {} from state store {}",
            req.key, req.store_name
        );
        let item = StateItem {
            key: req.key,
            etag: req.etag,
            options: req.options,
            ..Default::default()
        };
        let op = delete_op(&self.shared, entry, item).map_err(status)?;
        state_api::transact(entry, vec![op], "ERR_STATE_DELETE", &what)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn delete_bulk_state(&self, req: Request<DeleteBulkStateRequest>) -> Answer<Empty> {
        let req = req.into_inner();
        let entry = self.store(&req.store_name)?;
        let ops = req
            .states
            .into_iter()
            .map(|item| delete_op(&self.shared, entry, item))
            .collect::<Result<Vec<_>, _>>()
            .map_err(status)?;
        let what = format!("failed deleting state from state store {}", req.store_name);
        state_api::transact(entry, ops, "ERR_STATE_DELETE", &what)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn execute_state_transaction(
        &self,
        req: Request<ExecuteStateTransactionRequest>,
    ) -> Answer<Empty> {
        let req = req.into_inner();
        let entry = self.store(&req.store_name)?;
        let mut ops = Vec::with_capacity(req.operations.len());
        for op in req.operations {
            let item = op.request.ok_or_else(|| {
                Status::invalid_argument("a transaction operation needs its request (the item)")
            })?;
            let op = match op.operation_type.as_str() {
                "upsert" => set_op(&self.shared, entry, item, &req.metadata),
                "delete" => delete_op(&self.shared, entry, item),
                other => Err(ApiError::bad_request(
                    "ERR_NOT_SUPPORTED_STATE_OPERATION",
                    format!("operation type {other} not supported: use \"upsert\" or \"delete\""),
                )),
            };
            ops.push(op.map_err(status)?);
        }
        let what = format!(
            "error while executing state transaction on state store {}",
            req.store_name
        );
        state_api::transact(entry, ops, "ERR_STATE_TRANSACTION", &what)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn invoke_actor(&self, req: Request<InvokeActorRequest>) -> Answer<InvokeActorResponse> {
        let req = req.into_inner();
        let key = actor_api::actor_key(req.actor_type, req.actor_id).map_err(status)?;
        if req.method.is_empty() {
            return Err(Status::invalid_argument("the method name is required"));
        }
        // Metadata reaches the app as headers, as Dapr passes it.
        let mut headers = HeaderMap::new();
        for (k, v) in &req.metadata {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
                headers.append(n, v);
            }
        }
        let r = self
            .shared
            .actors
            .call(
                &key,
                &actor_api::method_path(&req.method),
                headers,
                Bytes::from(req.data),
            )
            .await
            .map_err(|e| status(e.into()))?;
        if r.status != StatusCode::OK {
            return Err(status(actor_api::app_error(&key, &r)));
        }
        Ok(Response::new(InvokeActorResponse {
            data: r.body.to_vec(),
        }))
    }

    async fn get_actor_state(
        &self,
        req: Request<GetActorStateRequest>,
    ) -> Answer<GetActorStateResponse> {
        let req = req.into_inner();
        let key = actor_api::actor_key(req.actor_type, req.actor_id).map_err(status)?;
        actor_api::check_state_key(&req.key).map_err(status)?;
        let item = self
            .shared
            .actors
            .get_state(&key, &req.key)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(match item {
            None => GetActorStateResponse::default(),
            Some(item) => GetActorStateResponse {
                metadata: ttl_metadata(&item),
                data: item.value.to_vec(),
            },
        }))
    }

    async fn execute_actor_state_transaction(
        &self,
        req: Request<ExecuteActorStateTransactionRequest>,
    ) -> Answer<Empty> {
        let req = req.into_inner();
        let key = actor_api::actor_key(req.actor_type, req.actor_id).map_err(status)?;
        let ops = req
            .operations
            .into_iter()
            .map(|op| {
                actor_api::actor_state_op(
                    &self.shared,
                    &key,
                    &op.operation_type,
                    &op.key,
                    Bytes::from(op.value.map(|v| v.value).unwrap_or_default()),
                    None,
                    &op.metadata,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(status)?;
        actor_api::run_actor_transaction(&self.shared, &key, ops)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn register_actor_timer(&self, req: Request<RegisterActorTimerRequest>) -> Answer<Empty> {
        let req = req.into_inner();
        let key = actor_api::actor_key(req.actor_type, req.actor_id).map_err(status)?;
        if req.name.is_empty() {
            return Err(Status::invalid_argument("a timer name is required"));
        }
        let spec = TimerSpec {
            callback: req.callback,
            due_time: req.due_time,
            period: req.period,
            ttl: req.ttl,
            data: data_json(&req.data),
        };
        self.shared
            .actors
            .create_timer(&key, &req.name, spec)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(Empty {}))
    }

    async fn unregister_actor_timer(
        &self,
        req: Request<UnregisterActorTimerRequest>,
    ) -> Answer<Empty> {
        let req = req.into_inner();
        let key = actor_api::actor_key(req.actor_type, req.actor_id).map_err(status)?;
        self.shared.actors.delete_timer(&key, &req.name);
        Ok(Response::new(Empty {}))
    }

    async fn register_actor_reminder(
        &self,
        req: Request<RegisterActorReminderRequest>,
    ) -> Answer<Empty> {
        let req = req.into_inner();
        let body = reminder_body(&req)?;
        let key = jobs::hosted_actor(&self.shared, req.actor_type, req.actor_id).map_err(status)?;
        jobs::create_reminder(&self.shared, &key, &req.name, &body)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn unregister_actor_reminder(
        &self,
        req: Request<UnregisterActorReminderRequest>,
    ) -> Answer<Empty> {
        let req = req.into_inner();
        let key = jobs::hosted_actor(&self.shared, req.actor_type, req.actor_id).map_err(status)?;
        jobs::delete_reminder(&self.shared, &key, &req.name)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    /// What `GET /v1.0/metadata` reports, in Dapr's gRPC shape.
    async fn get_metadata(&self, _req: Request<GetMetadataRequest>) -> Answer<GetMetadataResponse> {
        let snap = crate::meta_api::snapshot(&self.shared);
        let placement = snap.placement().to_string();
        let cfg = &self.shared.config;
        let actors: Vec<ActiveActorsCount> = snap
            .actors
            .into_iter()
            .map(|(t, n)| ActiveActorsCount {
                r#type: t,
                count: i32::try_from(n).unwrap_or(i32::MAX),
            })
            .collect();
        let connected = snap.placement_connected;
        Ok(Response::new(GetMetadataResponse {
            id: cfg.app_id.clone(),
            active_actors_count: actors.clone(),
            registered_components: snap
                .components
                .into_iter()
                .map(|(name, kind, version, caps)| RegisteredComponents {
                    name,
                    r#type: kind,
                    version,
                    capabilities: caps.into_iter().map(String::from).collect(),
                })
                .collect(),
            extended_metadata: snap.extended.into_iter().collect(),
            app_connection_properties: Some(AppConnectionProperties {
                port: cfg.app_port.map_or(0, i32::from),
                protocol: "http".into(),
                channel_address: cfg.app_channel_address.clone(),
                max_concurrency: 0,
            }),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            enabled_features: Vec::new(),
            actor_runtime: Some(ActorRuntime {
                runtime_status: if connected {
                    ActorRuntimeStatus::Running
                } else {
                    ActorRuntimeStatus::Initializing
                } as i32,
                active_actors: actors,
                host_ready: snap.host_ready,
                placement,
            }),
        }))
    }

    /// Sets `extended[key]` (as `PUT /v1.0/metadata/{key}`).
    async fn set_metadata(&self, req: Request<SetMetadataRequest>) -> Answer<Empty> {
        let req = req.into_inner();
        self.shared
            .extended
            .write()
            .expect("lock")
            .insert(req.key, req.value);
        Ok(Response::new(Empty {}))
    }

    /// Answers, then stops the host gracefully (as `POST /v1.0/shutdown`).
    async fn shutdown(&self, _req: Request<ShutdownRequest>) -> Answer<Empty> {
        tracing::info!("shutdown requested through the gRPC API");
        self.shared.shutdown.cancel();
        Ok(Response::new(Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_grpc_codes() {
        let code = |s: StatusCode| status(ApiError::new(s, "ERR_X", "m")).code();
        assert_eq!(code(StatusCode::BAD_REQUEST), tonic::Code::InvalidArgument);
        assert_eq!(code(StatusCode::CONFLICT), tonic::Code::Aborted);
        assert_eq!(
            code(StatusCode::INTERNAL_SERVER_ERROR),
            tonic::Code::Internal
        );
        assert_eq!(
            code(StatusCode::NOT_IMPLEMENTED),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            code(StatusCode::GATEWAY_TIMEOUT),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(code(StatusCode::BAD_GATEWAY), tonic::Code::Internal);
    }

    #[test]
    fn options_outside_the_enums_are_rejected() {
        let opts = |c: i32| StateOptions {
            concurrency: c,
            consistency: 0,
        };
        assert!(matches!(concurrency(None), Ok(Concurrency::LastWrite)));
        assert!(matches!(
            concurrency(Some(&opts(1))),
            Ok(Concurrency::FirstWrite)
        ));
        assert!(matches!(
            concurrency(Some(&opts(2))),
            Ok(Concurrency::LastWrite)
        ));
        assert!(concurrency(Some(&opts(7))).is_err());
        assert!(consistency(2).is_ok());
        assert!(consistency(-1).is_err());
    }

    #[test]
    fn item_metadata_overrides_the_request_s() {
        let base = HashMap::from([("ttlInSeconds".to_string(), "5".to_string())]);
        let item = HashMap::from([("ttlInSeconds".to_string(), "9".to_string())]);
        assert_eq!(merged(&base, &item)["ttlInSeconds"], "9");
        assert_eq!(merged(&base, &HashMap::new())["ttlInSeconds"], "5");
    }

    #[test]
    fn reminder_requests_become_the_http_api_s_json() {
        use proto::dapr::{Duration, JobFailurePolicyConstant, JobFailurePolicyDrop};
        let mut req = RegisterActorReminderRequest {
            due_time: "1s".into(),
            period: "R2/PT1S".into(),
            data: b"hi".to_vec(),
            overwrite: Some(false),
            ..Default::default()
        };
        let body = |r: &RegisterActorReminderRequest| -> Value {
            serde_json::from_slice(&reminder_body(r).unwrap()).unwrap()
        };
        let b = body(&req);
        assert_eq!(b["dueTime"], "1s");
        assert_eq!(b["period"], "R2/PT1S");
        assert_eq!(b["data"], "aGk=");
        assert_eq!(b["overwrite"], false);
        assert!(b.get("failurePolicy").is_none());
        req.failure_policy = Some(JobFailurePolicy {
            policy: Some(Policy::Constant(JobFailurePolicyConstant {
                interval: Some(Duration {
                    seconds: 2,
                    nanos: 500,
                }),
                max_retries: Some(4),
            })),
        });
        assert_eq!(
            body(&req)["failurePolicy"],
            json!({"constant": {"interval": "2s500ns", "maxRetries": 4}})
        );
        req.failure_policy = Some(JobFailurePolicy {
            policy: Some(Policy::Drop(JobFailurePolicyDrop {})),
        });
        assert_eq!(body(&req)["failurePolicy"], json!({"drop": {}}));
        req.failure_policy = Some(JobFailurePolicy {
            policy: Some(Policy::Constant(JobFailurePolicyConstant {
                interval: Some(Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                max_retries: None,
            })),
        });
        assert_eq!(
            reminder_body(&req).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(data_json(b""), None);
    }

    #[test]
    fn the_token_is_checked_only_when_set() {
        assert!(check_token(None, Request::new(())).is_ok());
        assert_eq!(
            check_token(Some("s3cret"), Request::new(()))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("dapr-api-token", "s3cret".parse().unwrap());
        assert!(check_token(Some("s3cret"), req).is_ok());
    }
}
