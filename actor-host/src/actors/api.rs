//! Dapr's actor HTTP API on the host: `/v1.0/actors/{type}/{id}/...` (method invocation, state,
//! timers, reminders).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use components::state::{Concurrency, DeleteOp, Op, SetOp};
use serde::Deserialize;
use serde_json::Value;

use super::activation::ActorKey;
use super::app_channel::forwardable;
use super::timers::TimerSpec;
use super::CallError;
use crate::body;
use crate::error::{ApiError, ApiPath};
use crate::Shared;

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        ApiError::new(e.status, e.code, e.message)
    }
}

/// Validates `{type}` and `{id}`: non-empty, no path tricks, no `||` (the state key separator).
pub fn actor_key(actor_type: String, actor_id: String) -> Result<ActorKey, ApiError> {
    for (what, v) in [("actor type", &actor_type), ("actor id", &actor_id)] {
        if v.is_empty() || v == "." || v == ".." || v.contains("||") || v.contains('/') {
            return Err(ApiError::bad_request(
                "ERR_BAD_REQUEST",
                format!(
                    "invalid {what} {v:?}: it must be non-empty and contain neither '/' nor '||'"
                ),
            ));
        }
    }
    Ok(ActorKey::new(actor_type, actor_id))
}

/// `GET|POST|PUT|DELETE /v1.0/actors/{type}/{id}/method/{method}`.
pub async fn invoke(
    State(shared): State<Arc<Shared>>,
    ApiPath((actor_type, actor_id, method)): ApiPath<(String, String, String)>,
    verb: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    invoke_call(&shared, actor_type, actor_id, &method, verb, headers, body).await
}

/// The invoke route without the router: `/v1.0/actors/{type}/{id}/method/{method}` with four
/// plain segments (no percent-encoding, none empty), which the router would hand to [`invoke`]
/// whatever the verb, so that the answer is exactly the routed handler's. Anything else is left
/// to the router.
pub fn fast_invoke_route(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/v1.0/actors/")?;
    if rest.contains('%') {
        return None;
    }
    let mut it = rest.split('/');
    let (t, id, kw, m) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if kw != "method" || it.next().is_some() || t.is_empty() || id.is_empty() || m.is_empty() {
        return None;
    }
    Some((t, id, m))
}

/// What [`invoke`] does once the path is taken apart.
pub async fn invoke_call(
    shared: &Arc<Shared>,
    actor_type: String,
    actor_id: String,
    method: &str,
    verb: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !matches!(
        verb,
        Method::GET | Method::POST | Method::PUT | Method::DELETE
    ) {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_BAD_REQUEST",
            format!("actor methods are invoked with GET, POST, PUT or DELETE, not {verb}"),
        ));
    }
    let key = actor_key(actor_type, actor_id)?;
    if method.is_empty() {
        return Err(ApiError::bad_request(
            "ERR_BAD_REQUEST",
            "the method name is required",
        ));
    }
    let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
    let r = shared
        .actors
        .call(&key, &method_path(method), headers, bytes)
        .await?;
    Ok(app_answer(&key, r))
}

/// `method/{method}`, the method percent-encoded: the path of a call under the actor's own.
pub(crate) fn method_path(method: &str) -> String {
    let mut path = String::with_capacity(7 + method.len());
    path.push_str("method/");
    super::encode_into(&mut path, method);
    path
}

/// `500 ERR_ACTOR_INVOKE_METHOD` quoting the app's answer.
pub(crate) fn app_error(key: &ActorKey, r: &super::app_channel::AppResponse) -> ApiError {
    let text = String::from_utf8_lossy(&r.body);
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "ERR_ACTOR_INVOKE_METHOD",
        format!(
            "error invoking actor {key}: error from actor service: ({}) {text}",
            r.status.as_u16()
        ),
    )
}

/// Dapr's rules for the app's answer: 200 passes through; an error with
/// `X-Daprerrorresponseheader` passes through verbatim; any other status is
/// `500 ERR_ACTOR_INVOKE_METHOD` quoting the app.
pub fn app_answer(key: &ActorKey, r: super::app_channel::AppResponse) -> Response {
    let passthrough =
        r.status == StatusCode::OK || r.headers.contains_key("x-daprerrorresponseheader");
    if !passthrough {
        return app_error(key, &r).into_response();
    }
    let mut resp = Response::new(Body::from(r.body));
    *resp.status_mut() = r.status;
    for (n, v) in r.headers.iter() {
        if forwardable(n.as_str()) {
            resp.headers_mut().append(n.clone(), v.clone());
        }
    }
    resp
}

/// `GET /v1.0/actors/{type}/{id}/state/{key}`: 200 with the stored JSON, 204 when absent.
pub async fn get_state(
    State(shared): State<Arc<Shared>>,
    ApiPath((actor_type, actor_id, name)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    let key = actor_key(actor_type, actor_id)?;
    check_state_key(&name)?;
    match shared.actors.get_state(&key, &name).await? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(item) => {
            let mut resp = Response::new(Body::from(item.value));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Ok(v) = HeaderValue::from_str(&item.etag) {
                resp.headers_mut().insert(header::ETAG, v);
            }
            Ok(resp)
        }
    }
}

pub(crate) fn check_state_key(k: &str) -> Result<(), ApiError> {
    if k.is_empty() || k.contains("||") {
        return Err(ApiError::malformed(format!(
            "invalid actor state key {k:?}: it must be non-empty and may not contain '||'"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxOp {
    operation: String,
    request: TxRequest,
}

#[derive(Deserialize)]
struct TxRequest {
    key: String,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
}

/// `POST|PUT /v1.0/actors/{type}/{id}/state`: a transaction, fenced by the activation.
pub async fn save_state(
    State(shared): State<Arc<Shared>>,
    ApiPath((actor_type, actor_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = actor_key(actor_type, actor_id)?;
    let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
    let tx: Vec<TxOp> = body::json(&bytes)?;
    let ops = tx
        .into_iter()
        .map(|op| {
            let value = op.request.value.unwrap_or(Value::Null);
            actor_state_op(
                &shared,
                &key,
                &op.operation,
                &op.request.key,
                Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
                op.request.etag,
                &op.request.metadata,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    run_actor_transaction(&shared, &key, ops).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One operation of an actor state transaction (`upsert` of `value`, or `delete`), on the
/// actor's key in the actor state store (the HTTP and gRPC APIs).
pub(crate) fn actor_state_op(
    shared: &Shared,
    key: &ActorKey,
    operation: &str,
    state_key: &str,
    value: Bytes,
    etag: Option<String>,
    metadata: &std::collections::HashMap<String, String>,
) -> Result<Op, ApiError> {
    check_state_key(state_key)?;
    let store_key = shared.actors.state_key(key, state_key);
    let etag = etag.filter(|e| !e.is_empty());
    match operation {
        "upsert" => {
            let ttl = match metadata.get("ttlInSeconds") {
                None => None,
                Some(s) => match s.parse::<i64>() {
                    Ok(n) if n > 0 => Some(Duration::from_secs(n as u64)),
                    Ok(_) => None,
                    Err(_) => {
                        return Err(ApiError::malformed(format!(
                            "invalid ttlInSeconds {s:?}: expected an integer"
                        )))
                    }
                },
            };
            Ok(Op::Set(SetOp {
                key: store_key,
                value,
                etag,
                concurrency: Concurrency::LastWrite,
                ttl,
            }))
        }
        "delete" => Ok(Op::Delete(DeleteOp {
            key: store_key,
            etag,
        })),
        other => Err(ApiError::bad_request(
            "ERR_NOT_SUPPORTED_STATE_OPERATION",
            format!("operation type {other:?} not supported: use upsert or delete"),
        )),
    }
}

/// Checks the ETags, then saves `ops` fenced by the actor's activation.
pub(crate) async fn run_actor_transaction(
    shared: &Shared,
    key: &ActorKey,
    ops: Vec<Op>,
) -> Result<(), ApiError> {
    components::state::parse_etags(&ops)
        .map_err(|e| ApiError::state("ERR_ACTOR_STATE_TRANSACTION_SAVE", "invalid etag", e))?;
    shared.actors.save_state(key, ops).await?;
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TimerBody {
    #[serde(default)]
    callback: String,
    #[serde(default)]
    due_time: String,
    #[serde(default)]
    period: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    data: Option<Value>,
}

/// `POST|PUT|DELETE /v1.0/actors/{type}/{id}/timers/{name}`.
pub async fn timer(
    State(shared): State<Arc<Shared>>,
    ApiPath((actor_type, actor_id, name)): ApiPath<(String, String, String)>,
    verb: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = actor_key(actor_type, actor_id)?;
    if name.is_empty() {
        return Err(ApiError::bad_request(
            "ERR_BAD_REQUEST",
            "a timer name is required",
        ));
    }
    match verb {
        Method::DELETE => {
            shared.actors.delete_timer(&key, &name);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Method::POST | Method::PUT => {
            let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
            let b: TimerBody = if bytes.is_empty() {
                TimerBody::default()
            } else {
                body::json(&bytes)?
            };
            let spec = TimerSpec {
                callback: b.callback,
                due_time: b.due_time,
                period: b.period,
                ttl: b.ttl,
                data: b.data,
            };
            shared.actors.create_timer(&key, &name, spec).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        other => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_BAD_REQUEST",
            format!("timers take POST, PUT or DELETE, not {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_route_takes_only_plain_invoke_paths() {
        assert_eq!(
            fast_invoke_route("/v1.0/actors/Counter/7/method/Add"),
            Some(("Counter", "7", "Add"))
        );
        assert_eq!(
            fast_invoke_route("/v1.0/actors/T/i/method/m"),
            Some(("T", "i", "m"))
        );
        // Left to the router (which answers them exactly as before).
        for path in [
            "/v1.0/actors/Counter/7/method/Add/",
            "/v1.0/actors/Counter/7/method/",
            "/v1.0/actors//7/method/Add",
            "/v1.0/actors/Counter//method/Add",
            "/v1.0/actors/Counter/7/state/k",
            "/v1.0/actors/Counter/7/method",
            "/v1.0/actors/Co%20unter/7/method/Add",
            "/v1.0/actors/Counter/7/method/A/b",
            "/v1.0/state/store/k",
            "/v1.0/actors/Counter/7/methods/Add",
        ] {
            assert_eq!(fast_invoke_route(path), None, "{path}");
        }
    }
}
