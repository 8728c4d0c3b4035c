//! The scheduler service (`tessera scheduler`): the durable job store and trigger loop behind a
//! gRPC API for hosts, plus health and metrics.
//!
//! - One replica in `--initial-cluster`: the store is a local sled database (`<data dir>/jobs`)
//!   that fires every job. More than one: the jobs are replicated with Raft
//!   (`<data dir>/raft`) and each replica fires the partitions it holds a lease on
//!   ([`crate::replica`]); a host may call any replica and watches all of them.
//! - `ScheduleJob` / `GetJob` / `DeleteJob` carry the job as `scheduler::job::Job` JSON; the
//!   host has already validated the request with Dapr's rules, so the scheduler only decodes it.
//!   A create or delete is answered once durable (flushed alone, committed in a cluster).
//! - `WatchJobs`: a host opens it with its app id, namespace and actor types, then receives
//!   triggers and acknowledges each one ([`crate::hub`]).
//! - HTTP on the health port: `GET /healthz`, and `GET /metrics` in Prometheus text (fires, acks,
//!   failures, unroutable ticks, jobs stored, connected hosts).
//!
//! Entry points: [`Node::start`] then [`serve`], or [`run`] for both; [`Node::start_on`] and
//! [`serve_incoming`] take the store, clock and connections from the caller (the simulation).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::scheduler::scheduler_server::{Scheduler, SchedulerServer};
use proto::scheduler::{
    schedule_job_response, watch_jobs_request, DeleteJobRequest, DeleteJobResponse, GetJobRequest,
    GetJobResponse, RaftMessage, ScheduleJobRequest, ScheduleJobResponse, WatchJobsRequest,
    WatchJobsResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backend::Created;
use crate::engine::{Clock, Engine, EngineConfig, SchedulerHandle, Sink, SystemClock};
use crate::hub::{HostInfo, Hub};
use crate::job::{Job, JobKey};
use crate::raft::{Applied, Command};
use crate::replica::{Replica, ReplicaError, Timing};
use crate::store::JobStore;
use placement::network::Dial;

/// How a scheduler replica runs.
#[derive(Clone)]
pub struct Config {
    /// This replica's id in `peers`.
    pub id: u64,
    /// The initial cluster: replica id -> gRPC address.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    /// How long a host may take to acknowledge a trigger before the delivery counts as failed.
    pub ack_timeout: Duration,
    pub engine: EngineConfig,
    /// Partition leases and commit cadence of a replicated scheduler.
    pub timing: Timing,
    /// How replicas reach each other.
    pub dial: Dial,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("id", &self.id)
            .field("peers", &self.peers)
            .field("data_dir", &self.data_dir)
            .field("ack_timeout", &self.ack_timeout)
            .field("engine", &self.engine)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// A single replica with its data under `data_dir`.
    pub fn single(data_dir: impl Into<PathBuf>, addr: String) -> Self {
        Config {
            id: 1,
            peers: [(1, addr)].into(),
            data_dir: data_dir.into(),
            ack_timeout: Duration::from_secs(30),
            engine: EngineConfig::default(),
            timing: Timing::default(),
            dial: placement::network::tcp(),
        }
    }
}

/// Why a replica did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("scheduler storage: {0}")]
    Storage(#[from] crate::store::StoreError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// One scheduler replica.
pub struct Node {
    handle: SchedulerHandle,
    hub: Arc<Hub>,
    /// Set when the scheduler is replicated.
    replica: Option<Arc<Replica>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("hub", &self.hub).finish()
    }
}

impl Node {
    /// Starts the trigger loop on an open store and a given clock (call it inside a tokio
    /// runtime). Every tick goes to the sink `sink(hub)` returns, which is the hub itself in
    /// [`Node::start`]; the simulation (`sims/`) runs it on simulated time and wraps the hub to
    /// record each dispatch. Stop it with [`Node::shutdown`].
    pub fn start_on<C: Clock, S: Sink>(
        store: Arc<JobStore>,
        clock: Arc<C>,
        ack_timeout: Duration,
        engine: EngineConfig,
        sink: impl FnOnce(Arc<Hub>) -> S,
    ) -> Arc<Node> {
        let hub = Arc::new(Hub::new(ack_timeout));
        let engine = Engine::new(store, clock, Arc::new(sink(hub.clone())), engine);
        let handle = engine.handle();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(engine.run(async move { s.cancelled().await }));
        Arc::new(Node {
            handle,
            hub,
            replica: None,
            stop,
        })
    }

    /// Opens the store and starts the trigger loop. Stop it with [`Node::shutdown`].
    pub async fn start(cfg: Config) -> Result<Arc<Node>, Error> {
        if !cfg.peers.contains_key(&cfg.id) {
            return Err(Error::Config(format!(
                "--id {} is not in --initial-cluster",
                cfg.id
            )));
        }
        if cfg.peers.len() == 1 {
            let store = Arc::new(JobStore::open(&cfg.data_dir.join("jobs"))?);
            let node = Node::start_on(
                store,
                Arc::new(SystemClock),
                cfg.ack_timeout,
                cfg.engine,
                |hub| hub,
            );
            tracing::info!(
                id = cfg.id,
                jobs = node.handle.store().len(),
                "scheduler replica started"
            );
            return Ok(node);
        }
        let hub = Arc::new(Hub::new(cfg.ack_timeout));
        let stop = CancellationToken::new();
        if cfg.data_dir.join("jobs").exists() {
            tracing::warn!(
                dir = %cfg.data_dir.join("jobs").display(),
                "this data directory holds the jobs of a single-replica run; a cluster does not import them"
            );
        }
        let dir = cfg.data_dir.join("raft");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(64 << 20)
            .open()
            .map_err(|e| Error::Storage(e.into()))?;
        let (log, sm) = crate::raft::open(db, true)
            .map_err(|e| Error::Storage(crate::store::StoreError::Backend(e.to_string())))?;
        let engine = Engine::new(
            sm.store().clone(),
            Arc::new(SystemClock),
            Arc::new(hub.clone()),
            cfg.engine,
        );
        let handle = engine.handle();
        let s = stop.clone();
        tokio::spawn(engine.run(async move { s.cancelled().await }));
        let jobs = handle.store().len();
        let replica = Replica::start(
            cfg.id,
            &cfg.peers,
            cfg.timing,
            cfg.dial.clone(),
            log,
            sm,
            handle.clone(),
        )
        .await?;
        tracing::info!(
            id = cfg.id,
            replicas = cfg.peers.len(),
            jobs,
            "scheduler replica started"
        );
        Ok(Arc::new(Node {
            handle,
            hub,
            replica: Some(replica),
            stop,
        }))
    }

    /// The replica's Raft side, when the scheduler is replicated.
    pub fn replica(&self) -> Option<&Arc<Replica>> {
        self.replica.as_ref()
    }

    pub fn handle(&self) -> &SchedulerHandle {
        &self.handle
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Stops the trigger loop (deliveries in flight are abandoned and fire again later) and Raft.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        if let Some(r) = &self.replica {
            r.shutdown().await;
        }
    }

    /// Stores a job; answered once durable (committed, when replicated).
    pub async fn create(&self, job: Job, overwrite: bool) -> Result<Created, tonic::Status> {
        Ok(match &self.replica {
            None => self
                .handle
                .create(job, overwrite)
                .await
                .map_err(internal)?
                .into(),
            Some(r) => match r
                .write(Command::Put {
                    job: Box::new(job),
                    overwrite,
                })
                .await?
            {
                Applied::Put(out) => out.into(),
                other => return Err(internal(format!("unexpected outcome {other:?}"))),
            },
        })
    }

    /// Deletes a job; answered once durable (committed, when replicated).
    pub async fn delete(&self, key: &JobKey) -> Result<bool, tonic::Status> {
        Ok(match &self.replica {
            None => self.handle.delete(key).await.map_err(internal)?,
            Some(r) => match r
                .write(Command::Delete {
                    key: key.as_bytes().to_vec(),
                })
                .await?
            {
                Applied::Deleted(existed) => existed,
                other => return Err(internal(format!("unexpected outcome {other:?}"))),
            },
        })
    }

    /// Reads a job (as of the latest commit, when replicated).
    pub async fn get(&self, key: &JobKey) -> Result<Option<Job>, tonic::Status> {
        Ok(match &self.replica {
            None => self.handle.get(key).map_err(internal)?.map(|r| r.job),
            Some(r) => r.get(key).await?,
        })
    }

    /// Whether the replica can serve (a leader is known, when replicated).
    pub fn healthy(&self) -> bool {
        self.replica.as_ref().is_none_or(|r| r.has_leader())
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        let m = &self.hub.metrics;
        format!(
            "# TYPE tessera_scheduler_fires_total counter\ntessera_scheduler_fires_total {}\n\
             # TYPE tessera_scheduler_acks_total counter\ntessera_scheduler_acks_total {}\n\
             # TYPE tessera_scheduler_failures_total counter\ntessera_scheduler_failures_total {}\n\
             # TYPE tessera_scheduler_unroutable_total counter\ntessera_scheduler_unroutable_total {}\n\
             # TYPE tessera_scheduler_jobs gauge\ntessera_scheduler_jobs {}\n\
             # TYPE tessera_scheduler_connected_hosts gauge\ntessera_scheduler_connected_hosts {}\n",
            m.fires.load(Ordering::Relaxed),
            m.acks.load(Ordering::Relaxed),
            m.failures.load(Ordering::Relaxed),
            m.unroutable.load(Ordering::Relaxed),
            self.handle.store().len(),
            self.hub.connected(),
        ) + &self.replica.as_ref().map(|r| r.metrics_text()).unwrap_or_default()
    }
}

fn internal(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(e.to_string())
}

/// The gRPC service of a replica.
#[derive(Debug)]
pub struct Service(pub Arc<Node>);

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchJobsResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Scheduler for Service {
    async fn schedule_job(
        &self,
        request: tonic::Request<ScheduleJobRequest>,
    ) -> Result<tonic::Response<ScheduleJobResponse>, tonic::Status> {
        let req = request.into_inner();
        let job: Job = serde_json::from_slice(&req.job)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad job: {e}")))?;
        let created = self.0.create(job, req.overwrite).await?;
        use schedule_job_response::Outcome;
        let (outcome, replaced) = match created {
            Created::Stored { replaced } => (Outcome::Stored, replaced),
            Created::AlreadyExists => (Outcome::AlreadyExists, false),
            Created::NeverFires { replaced } => (Outcome::NeverFires, replaced),
        };
        Ok(tonic::Response::new(ScheduleJobResponse {
            outcome: outcome as i32,
            replaced,
        }))
    }

    async fn get_job(
        &self,
        request: tonic::Request<GetJobRequest>,
    ) -> Result<tonic::Response<GetJobResponse>, tonic::Status> {
        let key = JobKey::from_bytes(request.into_inner().key);
        let found = self.0.get(&key).await?;
        Ok(tonic::Response::new(match found {
            Some(job) => GetJobResponse {
                found: true,
                job: serde_json::to_vec(&job).map_err(internal)?,
            },
            None => GetJobResponse::default(),
        }))
    }

    async fn delete_job(
        &self,
        request: tonic::Request<DeleteJobRequest>,
    ) -> Result<tonic::Response<DeleteJobResponse>, tonic::Status> {
        let key = JobKey::from_bytes(request.into_inner().key);
        let existed = self.0.delete(&key).await?;
        Ok(tonic::Response::new(DeleteJobResponse { existed }))
    }

    type WatchJobsStream = WatchStream;

    async fn watch_jobs(
        &self,
        request: tonic::Request<tonic::Streaming<WatchJobsRequest>>,
    ) -> Result<tonic::Response<Self::WatchJobsStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?;
        let Some(WatchJobsRequest {
            request: Some(watch_jobs_request::Request::Initial(init)),
        }) = first
        else {
            return Err(tonic::Status::invalid_argument(
                "the first message of WatchJobs must be `initial`",
            ));
        };
        let (tx, rx) = mpsc::channel(4096);
        let hub = self.0.hub.clone();
        let id = hub.connect(
            HostInfo {
                name: init.host_name,
                app_id: init.app_id,
                namespace: init.namespace,
                actor_types: init.actor_types.into_iter().collect::<HashSet<_>>(),
            },
            tx,
        );
        let stop = self.0.stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = inbound.message() => m,
                };
                match msg {
                    Ok(Some(WatchJobsRequest {
                        request: Some(watch_jobs_request::Request::Ack(ack)),
                    })) => hub.ack(id, ack),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            hub.disconnect(id);
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn raft(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let Some(replica) = &self.0.replica else {
            return Err(tonic::Status::unimplemented(
                "this scheduler replica runs alone",
            ));
        };
        let msg = request.into_inner();
        let payload =
            match placement::network::handle(replica.raft(), &msg.kind, &msg.payload).await? {
                Some(p) => p,
                None => replica
                    .handle(&msg.kind, &msg.payload)
                    .await?
                    .ok_or_else(|| {
                        tonic::Status::invalid_argument(format!(
                            "unknown raft message kind {:?}",
                            msg.kind
                        ))
                    })?,
            };
        Ok(tonic::Response::new(RaftMessage {
            kind: msg.kind,
            payload,
        }))
    }
}

/// Starts a replica and serves it: gRPC on `grpc`, health and metrics on `http`, until
/// `shutdown` resolves.
pub async fn run(
    cfg: Config,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let node = Node::start(cfg).await?;
    serve(node, grpc, Some(http), shutdown).await
}

/// Serves a started replica until `shutdown`, then stops it.
pub async fn serve(
    node: Arc<Node>,
    grpc: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let stop = placement::raft_group::serve_http_until(http, health_router(node.clone()), shutdown);
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    serve_incoming(node, incoming, async move { stop.cancelled().await }).await
}

/// Serves the gRPC side of a started replica on any stream of connections (simulated ones in
/// `sims/`) until `shutdown`, then stops it.
pub async fn serve_incoming<I, IO, IE>(
    node: Arc<Node>,
    incoming: I,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(SchedulerServer::new(Service(node.clone())))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    node.shutdown().await;
    result.map_err(|e| Error::Serve(e.to_string()))
}

fn health_router(node: Arc<Node>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/healthz",
            get({
                let n = node.clone();
                move || async move {
                    if n.healthy() {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let n = node.clone();
                async move { n.metrics_text() }
            }),
        )
}

/// Parses `1=127.0.0.1:50006,2=127.0.0.1:51006`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, Error> {
    placement::raft_group::parse_initial_cluster(s).map_err(|e| Error::Config(e.0))
}
