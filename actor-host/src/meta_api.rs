//! Metadata, health, shutdown, the API token check and the answers for unknown routes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::body;
use crate::error::{ApiError, ApiPath};
use crate::Shared;

/// What the metadata API reports, for both the HTTP and the gRPC API.
pub(crate) struct Snapshot {
    /// (name, type, version, capabilities) per loaded component, in load order.
    pub components: Vec<(String, String, String, Vec<&'static str>)>,
    pub extended: std::collections::BTreeMap<String, String>,
    /// Active actors per hosted type.
    pub actors: std::collections::BTreeMap<String, usize>,
    pub placement_connected: bool,
    pub host_ready: bool,
}

impl Snapshot {
    /// Dapr's `actorRuntime.placement` text.
    pub fn placement(&self) -> &'static str {
        if self.placement_connected {
            "placement: connected"
        } else {
            "placement: disconnected"
        }
    }
}

pub(crate) fn snapshot(shared: &Shared) -> Snapshot {
    let components = shared
        .component_order
        .iter()
        .filter_map(|name| shared.stores.get(name))
        .map(|e| {
            let mut caps: Vec<&'static str> = components::state::FEATURES.to_vec();
            if e.spec.is_actor_state_store() {
                caps.push("ACTOR");
            }
            (
                e.spec.name.clone(),
                e.spec.kind.clone(),
                e.spec.version.clone(),
                caps,
            )
        })
        .collect();
    let mut extended = shared.extended.read().expect("lock").clone();
    extended.insert(
        "daprRuntimeVersion".into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    let placement_connected = shared.actors.placement_connected();
    Snapshot {
        components,
        extended,
        actors: shared.actors.active_counts(),
        placement_connected,
        host_ready: placement_connected && shared.actors.hosting(),
    }
}

/// `GET /v1.0/metadata`.
pub async fn metadata(State(shared): State<Arc<Shared>>) -> axum::Json<Value> {
    let snap = snapshot(&shared);
    let components: Vec<Value> = snap
        .components
        .iter()
        .map(|(name, kind, version, caps)| {
            json!({ "name": name, "type": kind, "version": version, "capabilities": caps })
        })
        .collect();
    let cfg = &shared.config;
    let mut app = json!({ "protocol": "http", "channelAddress": cfg.app_channel_address, "maxConcurrency": 0 });
    if let Some(p) = cfg.app_port {
        app["port"] = json!(p);
    }
    let actors: Vec<Value> = snap
        .actors
        .iter()
        .map(|(t, n)| json!({ "type": t, "count": n }))
        .collect();
    let connected = snap.placement_connected;
    let actor_runtime = json!({
        "runtimeStatus": if connected { "RUNNING" } else { "INITIALIZING" },
        "activeActors": actors,
        "hostReady": snap.host_ready,
        "placement": snap.placement(),
    });
    axum::Json(json!({
        "id": cfg.app_id,
        "runtimeVersion": env!("CARGO_PKG_VERSION"),
        "enabledFeatures": [],
        "actors": actors,
        "components": components,
        "httpEndpoints": [],
        "subscriptions": [],
        "extended": snap.extended,
        "appConnectionProperties": app,
        "actorRuntime": actor_runtime,
    }))
}

/// `PUT /v1.0/metadata/{key}`: the body (text) becomes `extended[key]`.
pub async fn put_metadata(
    State(shared): State<Arc<Shared>>,
    ApiPath(key): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
    let value = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::malformed("metadata value must be UTF-8 text"))?;
    shared.extended.write().expect("lock").insert(key, value);
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1.0/healthz`: 204 once components are loaded and the app channel is up.
pub async fn healthz(
    State(shared): State<Arc<Shared>>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, ApiError> {
    let appid = q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("appid="));
    if let Some(id) = appid {
        if id != shared.config.app_id {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_HEALTH_APPID_NOT_MATCH",
                format!(
                    "app id {id} does not match this sidecar's {}",
                    shared.config.app_id
                ),
            ));
        }
    }
    if !shared.app_ready.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_HEALTH_NOT_READY",
            "dapr is not ready: waiting for the app to listen on its port",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1.0/healthz/outbound`: 204 once the API and components are up, app or not.
pub async fn healthz_outbound() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `POST /v1.0/shutdown`: answers 204, then stops the host gracefully.
pub async fn shutdown(State(shared): State<Arc<Shared>>) -> StatusCode {
    tracing::info!("shutdown requested through the API");
    shared.shutdown.cancel();
    StatusCode::NO_CONTENT
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ERR_NOT_FOUND",
        format!("no API route for {method} {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "ERR_BAD_REQUEST",
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// With `DAPR_API_TOKEN` set, every route but the two health checks needs `dapr-api-token`.
/// Dapr answers 401 with a plain-text body here, and so do we.
pub async fn api_token(
    State(shared): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &shared.config.api_token {
        let exempt = req.method() == Method::GET
            && matches!(req.uri().path(), "/v1.0/healthz" | "/v1.0/healthz/outbound");
        if !exempt {
            let ok = req
                .headers()
                .get("dapr-api-token")
                .is_some_and(|v| constant_time_eq(v.as_bytes(), token.as_bytes()));
            if !ok {
                return (StatusCode::UNAUTHORIZED, "invalid api token").into_response();
            }
        }
        req.headers_mut().remove("dapr-api-token");
    }
    next.run(req).await
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
