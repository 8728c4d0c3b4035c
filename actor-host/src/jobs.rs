//! Durable jobs and actor reminders on the host: Dapr's Jobs API (`/v1.0-alpha1/jobs/{name}`,
//! also under `/v1.0/jobs`), the actor reminder routes, and the delivery of their ticks.
//!
//! Jobs live in a [`JobsBackend`]: by default the embedded scheduler (`scheduler::engine`: a
//! durable job store under the data directory and one trigger loop, standalone mode); with
//! `--scheduler-host-address` the scheduler service, reached through `scheduler::client`, which
//! also keeps the host's watch streams open once the actor runtime knows its types. Either way the
//! same [`HostSink`] delivers the ticks: to the app (`POST /job/{name}`) or, for a reminder,
//! through the actor runtime to the actor's owner (`PUT /actors/{type}/{id}/method/remind/{name}`),
//! activating it if needed. The result is the acknowledgement (a reminder's carries the fencing
//! epoch of the activation that ran it), and a failed tick is retried per the job's failure
//! policy. A delivery that stands for several missed ticks says so in the `Tessera-Missed-Ticks`
//! header, and every delivery carries its tick's number in `Tessera-Tick-Sequence`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::Utc;
use scheduler::backend::{BackendError, Created, JobsBackend};
use scheduler::engine::{Delivered, DeliveryError, Engine, EngineConfig, Sink, SystemClock, Tick};
use scheduler::job::{
    parse_job_request, parse_reminder_request, AppScope, JobKey, JobSpec, ReminderRef,
    ReminderScope, RequestError, Target,
};
use scheduler::store::{JobStore, StoreError};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::actors::activation::ActorKey;
use crate::actors::app_channel::{AppChannel, AppRequest};
use crate::actors::{encode, ActorRuntime, EPOCH_HEADER};
use crate::body;
use crate::error::{ApiError, ApiPath};
use crate::Shared;

/// The header that tells the app how many further ticks a delivery stands for.
pub const MISSED_HEADER: &str = "tessera-missed-ticks";

/// The header that tells the app which tick (1-based) a delivery is, so it can deduplicate.
pub const SEQUENCE_HEADER: &str = "tessera-tick-sequence";

/// Delivers ticks for this host, from the embedded engine or from the scheduler service.
pub struct HostSink {
    runtime: Arc<ActorRuntime>,
    app: Option<Arc<dyn AppChannel>>,
}

impl Sink for HostSink {
    fn deliver(
        &self,
        tick: Tick,
    ) -> impl std::future::Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
        let runtime = self.runtime.clone();
        let app = self.app.clone();
        async move {
            let failed = |m: String| DeliveryError::Failed(m);
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            if tick.missed > 0 {
                headers.insert(MISSED_HEADER, HeaderValue::from(tick.missed));
            }
            headers.insert(SEQUENCE_HEADER, HeaderValue::from(tick.sequence));
            let data: Option<Value> = if tick.data.is_empty() {
                None
            } else {
                serde_json::from_slice(&tick.data).ok()
            };
            match &tick.target {
                Target::App { .. } => {
                    let Some(app) = app else {
                        return Err(failed("this host has no app to deliver jobs to".into()));
                    };
                    let body = serde_json::to_vec(&data.unwrap_or(Value::Null)).unwrap_or_default();
                    let req = AppRequest {
                        method: Method::POST,
                        path: format!("/job/{}", encode(&tick.name)),
                        headers,
                        body: Bytes::from(body),
                    };
                    match app.call(req).await {
                        // 404: the app has no handler; Dapr counts it as delivered.
                        Ok(r) if r.status.is_success() || r.status == StatusCode::NOT_FOUND => {
                            Ok(Delivered::default())
                        }
                        Ok(r) => Err(failed(format!("the app answered {}", r.status))),
                        Err(e) => Err(failed(e.to_string())),
                    }
                }
                Target::ActorReminder {
                    actor_type,
                    actor_id,
                    ..
                } => {
                    let key = ActorKey::new(actor_type.clone(), actor_id.clone());
                    let path = format!("method/remind/{}", encode(&tick.name));
                    let body = Bytes::from(reminder_body(&tick.spec, data.as_ref()));
                    match runtime.call(&key, &path, headers, body).await {
                        Ok(r) if r.status == StatusCode::OK => Ok(Delivered {
                            epoch: r
                                .headers
                                .get(EPOCH_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok()),
                        }),
                        Ok(r) => Err(failed(format!("the actor answered {}", r.status))),
                        Err(e) => Err(failed(e.message)),
                    }
                }
            }
        }
    }
}

/// The body of a reminder delivery: `{"data":…,"dueTime":"…","period":"…"}` (`data` only when
/// the reminder has some), the same bytes `serde_json` gives for that object, written directly
/// instead of building a `Value` map per fire.
fn reminder_body(spec: &JobSpec, data: Option<&Value>) -> Vec<u8> {
    let due_time = spec.due_time.as_deref().unwrap_or_default();
    let period = spec.period.as_deref().unwrap_or_default();
    let mut out = Vec::with_capacity(32 + due_time.len() + period.len());
    out.push(b'{');
    if let Some(d) = data {
        out.extend_from_slice(b"\"data\":");
        // Writing a `Value` or a `&str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut out, d);
        out.push(b',');
    }
    out.extend_from_slice(b"\"dueTime\":");
    let _ = serde_json::to_writer(&mut out, due_time);
    out.extend_from_slice(b",\"period\":");
    let _ = serde_json::to_writer(&mut out, period);
    out.push(b'}');
    out
}

/// Starts the jobs backend until `stop`: the scheduler service at `scheduler_addresses` if any
/// (watch streams open once the actor runtime has started, and for a host of actor types once
/// placement lists it), else the embedded store under `dir` and its trigger loop.
pub fn start(
    dir: &std::path::Path,
    scheduler_addresses: &[String],
    scope: AppScope,
    runtime: Arc<ActorRuntime>,
    stop: CancellationToken,
) -> Result<Arc<dyn JobsBackend>, StartError> {
    let sink = Arc::new(HostSink {
        app: runtime.app().cloned(),
        runtime: runtime.clone(),
    });
    if !scheduler_addresses.is_empty() {
        let client = scheduler::client::Client::new(scheduler_addresses, Duration::from_secs(10))
            .map_err(|e| StartError::Remote(e.to_string()))?;
        let c = client.clone();
        tokio::spawn(async move {
            loop {
                let ready =
                    runtime.started() && (runtime.settings().types.is_empty() || runtime.hosting());
                if ready {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            let reg = scheduler::client::Registration {
                app_id: scope.app_id,
                namespace: scope.namespace,
                actor_types: runtime.settings().types.keys().cloned().collect(),
                host_name: runtime.host_address().to_string(),
            };
            c.watch(reg, sink, stop);
        });
        return Ok(client);
    }
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(e.to_string()))?;
    let store = Arc::new(JobStore::open(dir)?);
    let sink = Arc::new(OnRuntime {
        sink,
        runtime: tokio::runtime::Handle::current(),
    });
    let engine = Engine::new(store, Arc::new(SystemClock), sink, EngineConfig::default());
    let handle = engine.handle();
    // The trigger loop and its store work run on a thread of their own, beside the host's
    // workers; the deliveries run on the host's runtime (`OnRuntime`).
    let engine_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Thread)?;
    std::thread::Builder::new()
        .name("tessera-jobs".into())
        .spawn(move || engine_runtime.block_on(engine.run(async move { stop.cancelled().await })))
        .map_err(StartError::Thread)?;
    Ok(Arc::new(handle))
}

/// Runs each delivery of the embedded engine on the host's runtime, where the app channel and
/// the actors live, so the engine's own thread only walks the due index and writes the store.
/// A delivery the engine abandons (at shutdown) is aborted, as it would be on the engine's side.
struct OnRuntime<S> {
    sink: Arc<S>,
    runtime: tokio::runtime::Handle,
}

impl<S: Sink> Sink for OnRuntime<S> {
    fn deliver(
        &self,
        tick: Tick,
    ) -> impl std::future::Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
        let task = AbortOnDropHandle::new(self.runtime.spawn(self.sink.deliver(tick)));
        async move {
            task.await.unwrap_or_else(|e| {
                Err(DeliveryError::Failed(format!(
                    "the delivery task ended: {e}"
                )))
            })
        }
    }
}

/// Why the jobs backend did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("scheduler client: {0}")]
    Remote(String),
    #[error("cannot start the jobs thread: {0}")]
    Thread(std::io::Error),
}

fn backend_error(code: &'static str, e: BackendError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        code,
        format!("scheduler: {e}"),
    )
}

fn request_error(e: RequestError) -> ApiError {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    ApiError::new(status, e.error_code(), e.to_string())
}

fn scope(shared: &Shared) -> AppScope {
    AppScope {
        app_id: shared.config.app_id.clone(),
        namespace: shared.config.namespace.clone(),
    }
}

/// `POST|GET|DELETE /v1.0-alpha1/jobs/{name}` (and `/v1.0/jobs/{name}`).
pub async fn job(
    State(shared): State<Arc<Shared>>,
    ApiPath(name): ApiPath<String>,
    verb: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let jobs = &shared.jobs;
    let s = scope(&shared);
    let key = JobKey::app(&s.namespace, &s.app_id, &name);
    match verb {
        Method::POST | Method::PUT => {
            let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
            let req = parse_job_request(&name, &bytes, &s, Utc::now()).map_err(request_error)?;
            match jobs
                .create(req.job.clone(), req.overwrite)
                .await
                .map_err(|e| backend_error("DAPR_SCHEDULER_SCHEDULE_JOB", e))?
            {
                Created::AlreadyExists => {
                    Err(request_error(RequestError::already_exists(&req.job)))
                }
                _ => Ok(StatusCode::NO_CONTENT.into_response()),
            }
        }
        Method::GET => {
            let Some(j) = jobs
                .get(&key)
                .await
                .map_err(|e| backend_error("DAPR_SCHEDULER_GET_JOB", e))?
            else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "DAPR_SCHEDULER_JOB_NOT_FOUND",
                    format!("job {name:?} not found"),
                ));
            };
            let mut out = json!({ "name": name });
            let spec = &j.spec;
            if let Some(v) = &spec.schedule {
                out["schedule"] = json!(v);
            }
            if let Some(v) = &spec.due_time {
                out["dueTime"] = json!(v);
            }
            if let Some(v) = &spec.ttl {
                out["ttl"] = json!(v);
            }
            if let Some(r) = j.repeats {
                out["repeats"] = json!(r);
            }
            if !j.data.is_empty() {
                if let Ok(d) = serde_json::from_slice::<Value>(&j.data) {
                    out["data"] = d;
                }
            }
            Ok(axum::Json(out).into_response())
        }
        Method::DELETE => {
            jobs.delete(&key)
                .await
                .map_err(|e| backend_error("DAPR_SCHEDULER_DELETE_JOB", e))?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        other => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_BAD_REQUEST",
            format!("jobs take POST, GET or DELETE, not {other}"),
        )),
    }
}

/// `POST|PUT|GET|DELETE /v1.0/actors/{type}/{id}/reminders/{name}`.
pub async fn reminder(
    State(shared): State<Arc<Shared>>,
    ApiPath((actor_type, actor_id, name)): ApiPath<(String, String, String)>,
    verb: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = hosted_actor(&shared, actor_type, actor_id)?;
    let job_key = JobKey::reminder(
        &shared.config.namespace,
        &key.actor_type,
        &key.actor_id,
        &name,
    );
    let jobs = &shared.jobs;
    match verb {
        Method::POST | Method::PUT => {
            let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
            create_reminder(&shared, &key, &name, &bytes).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Method::GET => {
            let Some(j) = jobs
                .get(&job_key)
                .await
                .map_err(|e| backend_error("ERR_ACTOR_REMINDER_GET", e))?
            else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "ERR_ACTOR_REMINDER_NOT_FOUND",
                    format!("reminder {name:?} not found for actor {key}"),
                ));
            };
            let mut out = json!({ "actorID": key.actor_id, "actorType": key.actor_type });
            let spec = &j.spec;
            if let Some(v) = spec.due_time.as_ref().filter(|v| !v.is_empty()) {
                out["dueTime"] = json!(v);
            }
            if let Some(v) = spec.period.as_ref().filter(|v| !v.is_empty()) {
                out["period"] = json!(v);
            }
            if let Some(v) = spec.ttl.as_ref().filter(|v| !v.is_empty()) {
                out["ttl"] = json!(v);
            }
            if !j.data.is_empty() {
                if let Ok(d) = serde_json::from_slice::<Value>(&j.data) {
                    out["data"] = d;
                }
            }
            Ok(axum::Json(out).into_response())
        }
        Method::DELETE => {
            delete_reminder(&shared, &key, &name).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        other => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_BAD_REQUEST",
            format!("reminders take POST, PUT, GET or DELETE, not {other}"),
        )),
    }
}

/// The actor, if this host hosts its type: reminders are only handled where the type lives.
pub(crate) fn hosted_actor(
    shared: &Shared,
    actor_type: String,
    actor_id: String,
) -> Result<ActorKey, ApiError> {
    let key = crate::actors::api::actor_key(actor_type, actor_id)?;
    if !shared.actors.settings().types.contains_key(&key.actor_type) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ERR_ACTOR_REMINDER_NON_HOSTED",
            format!(
                "operations on actor reminders are only possible on hosts that host the actor type {:?}",
                key.actor_type
            ),
        ));
    }
    Ok(key)
}

/// Creates reminder `name` from its JSON request body (Dapr's `dueTime`, `period`, `ttl`,
/// `data`, `overwrite`, `failurePolicy`).
pub(crate) async fn create_reminder(
    shared: &Shared,
    key: &ActorKey,
    name: &str,
    body: &[u8],
) -> Result<(), ApiError> {
    let r = ReminderRef {
        actor_type: &key.actor_type,
        actor_id: &key.actor_id,
        name,
    };
    let scope = ReminderScope {
        app_id: Some(shared.config.app_id.clone()),
        namespace: shared.config.namespace.clone(),
    };
    let req = parse_reminder_request(r, body, &scope, Utc::now()).map_err(request_error)?;
    match shared
        .jobs
        .create(req.job, req.overwrite)
        .await
        .map_err(|e| backend_error("ERR_ACTOR_REMINDER_CREATE", e))?
    {
        Created::AlreadyExists => Err(request_error(RequestError::ReminderAlreadyExists(
            name.to_string(),
        ))),
        _ => Ok(()),
    }
}

pub(crate) async fn delete_reminder(
    shared: &Shared,
    key: &ActorKey,
    name: &str,
) -> Result<(), ApiError> {
    let job_key = JobKey::reminder(
        &shared.config.namespace,
        &key.actor_type,
        &key.actor_id,
        name,
    );
    shared
        .jobs
        .delete(&job_key)
        .await
        .map(|_| ())
        .map_err(|e| backend_error("ERR_ACTOR_REMINDER_DELETE", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports the thread each delivery runs on, then waits for `release` (never, if dropped).
    struct ThreadSink {
        ran_on: tokio::sync::mpsc::UnboundedSender<Option<String>>,
        release: Arc<tokio::sync::Notify>,
    }

    impl Sink for ThreadSink {
        fn deliver(
            &self,
            _tick: Tick,
        ) -> impl std::future::Future<Output = Result<Delivered, DeliveryError>> + Send + 'static
        {
            let ran_on = self.ran_on.clone();
            let release = self.release.clone();
            async move {
                let _ = ran_on.send(std::thread::current().name().map(str::to_owned));
                release.notified().await;
                Ok(Delivered { epoch: Some(7) })
            }
        }
    }

    fn tick() -> Tick {
        Tick {
            key: JobKey::app("default", "a", "j"),
            name: "j".into(),
            target: Target::App {
                app_id: "a".into(),
                namespace: "default".into(),
            },
            data: Arc::from(&b""[..]),
            generation: 1,
            scheduled: Utc::now(),
            missed: 0,
            attempt: 0,
            sequence: 1,
            spec: Arc::new(JobSpec::default()),
        }
    }

    #[tokio::test]
    async fn deliveries_run_on_the_given_runtime_and_die_with_their_future() {
        let host = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("host-runtime")
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut ran_on) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let sink = OnRuntime {
            sink: Arc::new(ThreadSink {
                ran_on: tx,
                release: release.clone(),
            }),
            runtime: host.handle().clone(),
        };

        // A delivery runs on the host's runtime, and its result comes back to the caller.
        let delivery = tokio::spawn(sink.deliver(tick()));
        assert_eq!(
            ran_on.recv().await.unwrap().as_deref(),
            Some("host-runtime")
        );
        release.notify_one();
        assert_eq!(delivery.await.unwrap(), Ok(Delivered { epoch: Some(7) }));

        // A delivery whose future is dropped (the engine abandoning it) stops on the host too:
        // its task is gone, so `release` finds nobody waiting and keeps its permit.
        let abandoned = tokio::spawn(sink.deliver(tick()));
        assert_eq!(
            ran_on.recv().await.unwrap().as_deref(),
            Some("host-runtime")
        );
        abandoned.abort();
        let _ = abandoned.await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while host.metrics().num_alive_tasks() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the abandoned delivery was aborted on the host runtime");
        host.shutdown_background();
    }

    #[test]
    fn reminder_bodies_match_the_json_object() {
        let spec = JobSpec {
            due_time: Some("2026-01-02T03:04:05.678Z".into()),
            period: Some("1h\"0m".into()),
            ..JobSpec::default()
        };
        let data = json!({"b": [1, 2.5, "x\u{e9}\n"], "a": null});
        for (spec, data) in [
            (&spec, None),
            (&spec, Some(&data)),
            (&JobSpec::default(), Some(&Value::Null)),
            (&JobSpec::default(), None),
        ] {
            let mut want = json!({
                "dueTime": spec.due_time.clone().unwrap_or_default(),
                "period": spec.period.clone().unwrap_or_default(),
            });
            if let Some(d) = data {
                want["data"] = d.clone();
            }
            assert_eq!(
                String::from_utf8(reminder_body(spec, data)).unwrap(),
                serde_json::to_string(&want).unwrap()
            );
        }
    }
}
