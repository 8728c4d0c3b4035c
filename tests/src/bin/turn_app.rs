//! A test actor app for the end-to-end actor tests. It hosts two types:
//!
//! - `Counter`, method `inc`: reads the actor state `count` through its sidecar, adds one, saves
//!   it, and answers the new value. Every turn is journaled as one line
//!   `<actor id> <start ns> <end ns> <ok 0|1> <pid>` (CLOCK_MONOTONIC, comparable across
//!   processes) to the file named by `JOURNAL`, so a test can check that no two turns of one
//!   actor ever overlapped, whichever host ran them.
//! - `Chain`, method `call`: the body is a JSON array of actor ids; the actor calls the first
//!   with the rest (through the sidecar, passing `Dapr-Reentrancy-Id` on), so `["a","b","a"]`
//!   is the chain a -> b -> a.
//!
//! - Jobs (`POST /job/{name}`) and reminders (`PUT /actors/Counter/{id}/method/remind/{name}`)
//!   are appended to the file named by `EVENTS` as `job <name> <unix ms> <missed> <seq>` and
//!   `remind <actor id> <name> <unix ms> <missed> <seq>` (`missed` from `Tessera-Missed-Ticks`,
//!   `seq` from `Tessera-Tick-Sequence`, 0 when absent).
//!
//! Environment: `APP_PORT`, `DAPR_HTTP_PORT`, `JOURNAL`, `EVENTS`, `REENTRANCY` (`true` to enable),
//! `SIDECAR_TIMEOUT_MS` (how long the app waits for its sidecar per request, default 1000),
//! `TURN_DELAY_MS` (a pause inside each `inc` turn, default 0).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, put};
use axum::Router;

struct App {
    sidecar: String,
    http: reqwest::Client,
    journal: Option<Mutex<std::fs::File>>,
    events: Option<Mutex<std::fs::File>>,
    reentrancy: bool,
    /// Pause between reading and writing the counter (`TURN_DELAY_MS`), so turns are in flight
    /// long enough to be caught by a fault.
    turn_delay: Duration,
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn header_u64(headers: &HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `<missed> <seq>` of a delivery.
fn tick_fields(headers: &HeaderMap) -> String {
    format!(
        "{} {}",
        header_u64(headers, "tessera-missed-ticks"),
        header_u64(headers, "tessera-tick-sequence")
    )
}

fn event(app: &App, line: String) {
    if let Some(e) = &app.events {
        let mut f = e.lock().expect("lock");
        let _ = f.write_all(line.as_bytes());
        let _ = f.flush();
    }
}

async fn job(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> StatusCode {
    event(
        &app,
        format!("job {name} {} {}\n", unix_ms(), tick_fields(&headers)),
    );
    StatusCode::OK
}

async fn remind(
    State(app): State<Arc<App>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> StatusCode {
    event(
        &app,
        format!(
            "remind {id} {name} {} {}\n",
            unix_ms(),
            tick_fields(&headers)
        ),
    );
    StatusCode::OK
}

fn now_ns() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128
}

async fn config(State(app): State<Arc<App>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "entities": ["Counter", "Chain"],
        "actorIdleTimeout": "1h",
        "drainOngoingCallTimeout": "5s",
        "drainRebalancedActors": true,
        "reentrancy": { "enabled": app.reentrancy, "maxStackDepth": 32 },
    }))
}

async fn increment(app: &App, id: &str) -> Result<u64, String> {
    let url = format!("{}/v1.0/actors/Counter/{id}/state/count", app.sidecar);
    let r = app.http.get(&url).send().await.map_err(|e| e.to_string())?;
    let count: u64 = match r.status().as_u16() {
        204 => 0,
        200 => r
            .text()
            .await
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e| format!("bad count: {e}"))?,
        s => return Err(format!("state get: {s}")),
    };
    if !app.turn_delay.is_zero() {
        tokio::time::sleep(app.turn_delay).await;
    }
    let next = count + 1;
    let tx = serde_json::json!([{ "operation": "upsert", "request": { "key": "count", "value": next } }]);
    let r = app
        .http
        .post(format!("{}/v1.0/actors/Counter/{id}/state", app.sidecar))
        .json(&tx)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().as_u16() != 204 {
        let s = r.status();
        return Err(format!(
            "state save: {s}: {}",
            r.text().await.unwrap_or_default()
        ));
    }
    Ok(next)
}

async fn inc(State(app): State<Arc<App>>, Path(id): Path<String>) -> (StatusCode, String) {
    let start = now_ns();
    let result = increment(&app, &id).await;
    let end = now_ns();
    if let Some(j) = &app.journal {
        let line = format!(
            "{id} {start} {end} {} {}\n",
            result.is_ok() as u8,
            std::process::id()
        );
        let _ = j.lock().expect("lock").write_all(line.as_bytes());
    }
    match result {
        Ok(n) => (StatusCode::OK, n.to_string()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Timer callbacks increment too.
async fn timer(
    state: State<Arc<App>>,
    Path((id, _name)): Path<(String, String)>,
) -> (StatusCode, String) {
    inc(state, Path(id)).await
}

async fn chain(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    // Errors pass through the sidecar verbatim (Dapr's X-Daprerrorresponseheader rule), so the
    // first caller sees the innermost errorCode.
    let (status, text) = chain_call(&app, &headers, &body).await;
    (status, [("x-daprerrorresponseheader", "true")], text)
}

async fn chain_call(app: &App, headers: &HeaderMap, body: &Bytes) -> (StatusCode, String) {
    let hops: Vec<String> = serde_json::from_slice(body).unwrap_or_default();
    let Some((next, rest)) = hops.split_first() else {
        return (StatusCode::OK, "\"done\"".into());
    };
    let mut req = app
        .http
        .post(format!(
            "{}/v1.0/actors/Chain/{next}/method/call",
            app.sidecar
        ))
        .json(&rest);
    if let Some(id) = headers.get("dapr-reentrancy-id") {
        req = req.header("dapr-reentrancy-id", id);
    }
    match req.send().await {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let text = r.text().await.unwrap_or_default();
            (status, text)
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("APP_PORT")
        .expect("APP_PORT")
        .parse()
        .expect("APP_PORT");
    let dapr: u16 = std::env::var("DAPR_HTTP_PORT")
        .expect("DAPR_HTTP_PORT")
        .parse()
        .expect("DAPR_HTTP_PORT");
    let timeout = std::env::var("SIDECAR_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let open = |p: String| {
        Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open events"),
        )
    };
    let events = std::env::var("EVENTS").ok().map(open);
    let journal = std::env::var("JOURNAL").ok().map(|p| {
        Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open journal"),
        )
    });
    let app = Arc::new(App {
        sidecar: format!("http://127.0.0.1:{dapr}"),
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout))
            .pool_max_idle_per_host(64)
            .build()
            .expect("client"),
        journal,
        events,
        turn_delay: Duration::from_millis(
            std::env::var("TURN_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
        reentrancy: std::env::var("REENTRANCY").is_ok_and(|v| v == "true"),
    });
    let router = Router::new()
        .route("/dapr/config", get(config))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/actors/Counter/{id}/method/inc", put(inc))
        .route("/actors/Counter/{id}/method/timer/{name}", put(timer))
        .route("/actors/Counter/{id}/method/remind/{name}", put(remind))
        .route("/job/{name}", axum::routing::post(job))
        .route("/actors/Chain/{id}/method/call", put(chain))
        .route("/actors/{t}/{id}", delete(|| async { StatusCode::OK }))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind APP_PORT");
    axum::serve(listener, router).await.expect("serve");
}
