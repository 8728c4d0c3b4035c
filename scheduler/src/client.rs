//! What a host uses to talk to the scheduler service (`--scheduler-host-address`).
//!
//! - [`Client`] implements [`JobsBackend`] over the unary calls: it tries the replicas in turn,
//!   starting with the last one that answered, and keeps trying (with a pause between rounds) for
//!   up to `call_timeout` while none is reachable, so a scheduler restart costs a wait, not an
//!   error.
//! - [`Client::watch`] keeps one `WatchJobs` stream to every replica: each replica fires its own
//!   share of the jobs. Triggers are handed to a [`Sink`] (the host's delivery logic) in their own
//!   task and acknowledged on the stream with the outcome (and the activation epoch). A stream
//!   that breaks is reopened after a jittered backoff (100 ms doubling to 2 s), forever.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use proto::scheduler::scheduler_client::SchedulerClient;
use proto::scheduler::{
    schedule_job_response, watch_jobs_request, watch_jobs_response, DeleteJobRequest,
    GetJobRequest, ScheduleJobRequest, Trigger, WatchJobsAck, WatchJobsInitial, WatchJobsRequest,
};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::backend::{BackendError, Created, JobsBackend};
use crate::engine::{DeliveryError, Sink, Tick};
use crate::job::{Job, JobKey, JobSpec, Target};

/// Who a host is, for its watch streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub app_id: String,
    pub namespace: String,
    pub actor_types: Vec<String>,
    /// For the scheduler's logs: the host's name.
    pub host_name: String,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no scheduler address given")]
    NoAddress,
    #[error("invalid scheduler address {0:?}: {1}")]
    Address(String, String),
}

/// The remote scheduler.
#[derive(Debug)]
pub struct Client {
    replicas: Vec<(String, SchedulerClient<Channel>)>,
    preferred: AtomicUsize,
    call_timeout: Duration,
}

/// How a replica is dialed: connect timeout and HTTP/2 keepalive (a stream silently cut by a
/// partition is noticed within about 10 s). The simulation dials these over simulated TCP.
pub fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Address(addr.to_string(), e.to_string()))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

fn channel(addr: &str) -> Result<Channel, ClientError> {
    Ok(endpoint(addr)?.connect_lazy())
}

thread_local! {
    /// Set by [`seed_jitter`]; `None`: the jitter comes from the OS-seeded generator.
    static JITTER: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes this thread's reconnect and retry jitter a function of `seed` (a deterministic
/// simulation calls it before each run; its hosts all run on the calling thread).
pub fn seed_jitter(seed: u64) {
    JITTER.with(|j| *j.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

fn random_u64() -> u64 {
    JITTER.with(|j| match &mut *j.borrow_mut() {
        Some(rng) => rng.next_u64(),
        None => rand::random(),
    })
}

/// A random duration in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + Duration::from_millis(random_u64() % (half.as_millis() as u64 + 1))
}

/// Whether a call failed for lack of a reachable replica (worth trying another or again).
fn unavailable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::FailedPrecondition
    )
}

impl Client {
    /// A client for `addresses` (`host:port`); connects lazily.
    pub fn new(addresses: &[String], call_timeout: Duration) -> Result<Arc<Client>, ClientError> {
        if addresses.is_empty() {
            return Err(ClientError::NoAddress);
        }
        let replicas = addresses
            .iter()
            .map(|a| Ok((a.clone(), SchedulerClient::new(channel(a)?))))
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(Arc::new(Client {
            replicas,
            preferred: AtomicUsize::new(0),
            call_timeout,
        }))
    }

    /// A client over channels the caller built (`(address, channel)` per replica; the simulation
    /// dials over simulated TCP).
    pub fn with_channels(
        channels: Vec<(String, Channel)>,
        call_timeout: Duration,
    ) -> Result<Arc<Client>, ClientError> {
        if channels.is_empty() {
            return Err(ClientError::NoAddress);
        }
        Ok(Arc::new(Client {
            replicas: channels
                .into_iter()
                .map(|(a, c)| (a, SchedulerClient::new(c)))
                .collect(),
            preferred: AtomicUsize::new(0),
            call_timeout,
        }))
    }

    /// Runs `call` on the replicas in turn until one answers, for up to `call_timeout`.
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T, BackendError>
    where
        F: Fn(SchedulerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let n = self.replicas.len();
        let mut pause = Duration::from_millis(50);
        loop {
            let start = self.preferred.load(Ordering::Relaxed);
            let mut last = String::new();
            for i in 0..n {
                let idx = (start + i) % n;
                let (addr, client) = &self.replicas[idx];
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match tokio::time::timeout(
                    left.max(Duration::from_millis(100)),
                    call(client.clone()),
                )
                .await
                {
                    Ok(Ok(v)) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Ok(Err(s)) if unavailable(&s) => last = format!("{addr}: {}", s.message()),
                    Ok(Err(s)) => return Err(BackendError::Remote(s.message().to_string())),
                    Err(_) => last = format!("{addr}: timed out"),
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(BackendError::Unavailable(format!("{what}: {last}")));
            }
            tokio::time::sleep(jitter(pause)).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Keeps a watch stream to every replica until `stop`, handing triggers to `sink`.
    pub fn watch<S: Sink>(
        self: &Arc<Self>,
        reg: Registration,
        sink: Arc<S>,
        stop: CancellationToken,
    ) {
        for (addr, client) in &self.replicas {
            tokio::spawn(session_loop(
                addr.clone(),
                client.clone(),
                reg.clone(),
                sink.clone(),
                stop.clone(),
            ));
        }
    }
}

#[async_trait]
impl JobsBackend for Client {
    async fn create(&self, job: Job, overwrite: bool) -> Result<Created, BackendError> {
        let raw = serde_json::to_vec(&job).map_err(|e| BackendError::Remote(e.to_string()))?;
        let r = self
            .call("ScheduleJob", |mut c| {
                let job = raw.clone();
                async move {
                    c.schedule_job(ScheduleJobRequest { job, overwrite })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        use schedule_job_response::Outcome;
        Ok(
            match Outcome::try_from(r.outcome).unwrap_or(Outcome::Stored) {
                Outcome::Stored => Created::Stored {
                    replaced: r.replaced,
                },
                Outcome::AlreadyExists => Created::AlreadyExists,
                Outcome::NeverFires => Created::NeverFires {
                    replaced: r.replaced,
                },
            },
        )
    }

    async fn get(&self, key: &JobKey) -> Result<Option<Job>, BackendError> {
        let key = key.as_bytes().to_vec();
        let r = self
            .call("GetJob", |mut c| {
                let key = key.clone();
                async move {
                    c.get_job(GetJobRequest { key })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        if !r.found {
            return Ok(None);
        }
        serde_json::from_slice(&r.job)
            .map(Some)
            .map_err(|e| BackendError::Remote(format!("unreadable job from the scheduler: {e}")))
    }

    async fn delete(&self, key: &JobKey) -> Result<bool, BackendError> {
        let key = key.as_bytes().to_vec();
        let r = self
            .call("DeleteJob", |mut c| {
                let key = key.clone();
                async move {
                    c.delete_job(DeleteJobRequest { key })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(r.existed)
    }
}

/// The tick a trigger stands for.
pub fn tick_of(t: &Trigger) -> Result<Tick, String> {
    let target: Target =
        serde_json::from_slice(&t.target).map_err(|e| format!("unreadable target: {e}"))?;
    let scheduled =
        DateTime::from_timestamp_millis(t.scheduled_ms).ok_or("scheduled time out of range")?;
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(Tick {
        key: JobKey::from_bytes(t.key.clone()),
        name: t.name.clone(),
        target,
        data: Arc::from(t.data.as_slice()),
        generation: 0,
        scheduled,
        missed: t.missed,
        attempt: t.attempt,
        sequence: t.sequence,
        spec: Arc::new(JobSpec {
            due_time: some(&t.due_time),
            period: some(&t.period),
            ..JobSpec::default()
        }),
    })
}

/// One replica's watch stream, reopened forever.
async fn session_loop<S: Sink>(
    addr: String,
    client: SchedulerClient<Channel>,
    reg: Registration,
    sink: Arc<S>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = session(&addr, client.clone(), &reg, &sink, &stop) => r,
        };
        match opened {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!(scheduler = addr, error = %e, "watch stream failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(jitter(backoff)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Runs one stream until it ends. `Ok` if it was established (so the backoff starts over).
async fn session<S: Sink>(
    addr: &str,
    mut client: SchedulerClient<Channel>,
    reg: &Registration,
    sink: &Arc<S>,
    stop: &CancellationToken,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<WatchJobsRequest>(4096);
    let _ = tx
        .send(WatchJobsRequest {
            request: Some(watch_jobs_request::Request::Initial(WatchJobsInitial {
                app_id: reg.app_id.clone(),
                namespace: reg.namespace.clone(),
                actor_types: reg.actor_types.clone(),
                host_name: reg.host_name.clone(),
            })),
        })
        .await;
    let mut inbound = client
        .watch_jobs(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(scheduler = addr, "watching jobs");
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = inbound.message() => m,
        };
        let trigger = match msg {
            Ok(Some(m)) => match m.response {
                Some(watch_jobs_response::Response::Trigger(t)) => t,
                None => continue,
            },
            Ok(None) => {
                tracing::info!(scheduler = addr, "watch stream closed by the scheduler");
                return Ok(());
            }
            Err(e) => {
                tracing::info!(scheduler = addr, error = %e, "watch stream broke");
                return Ok(());
            }
        };
        let id = trigger.delivery_id;
        let tx = tx.clone();
        let delivery = tick_of(&trigger).map(|t| sink.deliver(t));
        tokio::spawn(async move {
            let ack = match delivery {
                Err(reason) => WatchJobsAck {
                    delivery_id: id,
                    ok: false,
                    reason,
                    epoch: 0,
                },
                Ok(f) => match f.await {
                    Ok(d) => WatchJobsAck {
                        delivery_id: id,
                        ok: true,
                        reason: String::new(),
                        epoch: d.epoch.unwrap_or(0),
                    },
                    Err(DeliveryError::Failed(reason) | DeliveryError::Unroutable(reason)) => {
                        WatchJobsAck {
                            delivery_id: id,
                            ok: false,
                            reason,
                            epoch: 0,
                        }
                    }
                },
            };
            // A stream that ended meanwhile has already failed this delivery on the scheduler.
            let _ = tx
                .send(WatchJobsRequest {
                    request: Some(watch_jobs_request::Request::Ack(ack)),
                })
                .await;
        });
    }
}
