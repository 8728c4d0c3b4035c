//! A placement replica: Raft, host sessions, batched membership changes, lease expiry, and the
//! health / metrics / state endpoints.
//!
//! - Hosts connect to any replica; a follower answers with the leader's address and ends the
//!   stream. On the leader, every heartbeat renews the host's liveness and is acknowledged with
//!   the lease; the first one also asks for the host to be added if the table lacks it.
//! - Changes are coalesced for a short window and committed as one Raft entry, so a rollout of
//!   many hosts makes a few versions, not hundreds.
//! - The leader removes a host (through Raft) once it has not heard from it for a lease. A new
//!   leader first waits one full lease, so every live host has had time to reconnect.
//! - Every replica publishes each committed table to its sessions; versions only grow.
//! - The leader tracks the version each host has applied and the settled version (see
//!   [`crate::settle`]); it sends it in every acknowledgement and pushes it when it grows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use prost::Message;
use proto::placement::placement_order::Order;
use proto::placement::placement_server::Placement;
use proto::placement::{HeartbeatAck, HostReport, PlacementOrder, RaftMessage};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::network::{self, Network};
use crate::publish::{encode, Published};
use crate::raft_group;
use crate::ring::{HostEntry, Table};
use crate::settle::Tracker;
use crate::store::{self, NodeId, Request, StateMachine};
use crate::Raft;

/// How a replica runs.
#[derive(Clone)]
pub struct Config {
    pub id: NodeId,
    /// The initial cluster: replica id -> gRPC address. One entry for a single-node placement.
    pub peers: BTreeMap<NodeId, String>,
    pub data_dir: PathBuf,
    /// How long a host may go without a heartbeat before it is removed.
    pub lease: Duration,
    /// How long changes are collected before one Raft write.
    pub coalesce: Duration,
    /// Serve `GET /placement/state`.
    pub metadata_enabled: bool,
    /// How to reach the other replicas.
    pub dial: network::Dial,
}

impl Config {
    pub fn single(data_dir: impl Into<PathBuf>, addr: String) -> Self {
        Config {
            id: 1,
            peers: [(1, addr)].into(),
            data_dir: data_dir.into(),
            lease: Duration::from_secs(5),
            coalesce: Duration::from_millis(20),
            metadata_enabled: false,
            dial: network::tcp(),
        }
    }
}

/// Why a replica did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("placement storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

enum Change {
    Upsert(HostEntry),
    Remove(String),
}

/// One placement replica.
pub struct Node {
    pub raft: Raft,
    sm: StateMachine,
    table: watch::Receiver<Table>,
    cfg: Config,
    /// Last heartbeat of each host, as seen by this replica while it leads.
    live: Mutex<HashMap<String, Instant>>,
    /// [`Node::is_leader`], as a watch for host sessions.
    leading: watch::Sender<bool>,
    /// When this replica became leader; `None` while it is not.
    leader_since: Mutex<Option<Instant>>,
    changes: mpsc::UnboundedSender<Change>,
    /// The latest committed table, built once for every session (full and as a delta).
    published: watch::Sender<Arc<Published>>,
    /// Applied versions and the settled version, while this replica leads.
    settle: Mutex<Tracker>,
    /// [`Tracker::settled`], as a watch for host sessions.
    settled: watch::Sender<u64>,
    shutdown: CancellationToken,
}

/// How recently a quorum must have acknowledged the leader. A leader cut off for longer stops
/// serving hosts, well inside the lease a new leader grants them before removing anyone.
const QUORUM_FRESH_MS: u64 = 1000;

const ELECTION_TIMEOUT_MAX_MS: u64 = 800;

fn raft_config(lease: Duration) -> Result<Arc<openraft::Config>, Error> {
    let cfg = openraft::Config {
        cluster_name: "tessera-placement".into(),
        heartbeat_interval: 80,
        election_timeout_min: 400,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        install_snapshot_timeout: 2_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(2_000),
        max_in_snapshot_log_to_keep: 500,
        ..Default::default()
    };
    // The lease must outlast an election, or hosts would be dropped during every failover.
    if lease < Duration::from_millis(cfg.election_timeout_max * 2) {
        return Err(Error::Config(format!(
            "the host lease ({lease:?}) must be at least 2 s"
        )));
    }
    cfg.validate()
        .map(Arc::new)
        .map_err(|e| Error::Config(e.to_string()))
}

impl Node {
    /// Opens storage, starts Raft (initializing the cluster on first start) and the background
    /// tasks. Stop them with [`Node::shutdown`].
    pub async fn start(cfg: Config) -> Result<Arc<Node>, Error> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| Error::Storage(e.to_string()))?;
        let opened = store::open(&cfg.data_dir.join("raft"));
        Self::start_on(cfg, opened).await
    }

    /// [`Node::start`] on storage opened by the caller (a simulation's in-memory database).
    pub async fn start_with_db(
        cfg: Config,
        db: sled::Db,
        durable: bool,
    ) -> Result<Arc<Node>, Error> {
        Self::start_on(cfg, store::open_db(db, durable)).await
    }

    async fn start_on(
        cfg: Config,
        opened: Result<
            (store::LogStore, StateMachine, watch::Receiver<Table>),
            openraft::StorageError<NodeId>,
        >,
    ) -> Result<Arc<Node>, Error> {
        if !cfg.peers.contains_key(&cfg.id) {
            return Err(Error::Config(format!(
                "--id {} is not in --initial-cluster",
                cfg.id
            )));
        }
        let (log, sm, table) = opened.map_err(|e| Error::Storage(e.to_string()))?;
        let network: Network<crate::TypeConfig> = Network::new(cfg.dial.clone());
        let raft = Raft::new(cfg.id, raft_config(cfg.lease)?, network, log, sm.clone())
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        raft_group::initialize(&raft, &cfg.peers)
            .await
            .map_err(Error::Raft)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let first = Published::first(table.borrow().clone());
        let node = Arc::new(Node {
            published: watch::Sender::new(Arc::new(first)),
            leading: watch::Sender::new(false),
            raft,
            sm,
            table,
            cfg,
            live: Mutex::new(HashMap::new()),
            leader_since: Mutex::new(None),
            changes: tx,
            settle: Mutex::new(Tracker::default()),
            settled: watch::Sender::new(0),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(node.clone().track_leadership());
        tokio::spawn(node.clone().publish_tables());
        tokio::spawn(node.clone().batch_changes(rx));
        tokio::spawn(node.clone().expire_leases());
        Ok(node)
    }

    /// Leader with a quorum that acknowledged it recently. A leader cut off from its followers
    /// stops counting as one well before they can elect another, so hosts move on in time.
    pub fn is_leader(&self) -> bool {
        raft_group::leads_with_fresh_quorum(
            &self.raft.metrics().borrow(),
            Duration::from_millis(QUORUM_FRESH_MS),
        )
    }

    /// The leader's address, if one is known.
    pub fn leader_addr(&self) -> Option<String> {
        raft_group::leader_addr(&self.raft.metrics().borrow())
    }

    /// The latest committed table on this replica.
    pub fn table(&self) -> Table {
        self.table.borrow().clone()
    }

    /// For an embedded single-node placement, whose only host lives in the same process: once
    /// this replica leads, removes every host but `keep` (hosts of earlier runs of that process,
    /// certainly gone) instead of waiting out their leases.
    pub async fn forget_hosts_except(&self, keep: &str) {
        let mut leading = self.leading.subscribe();
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        for name in self.table().hosts.into_iter().map(|h| h.name) {
            if name != keep {
                let _ = self.changes.send(Change::Remove(name));
            }
        }
    }

    /// Stops the background tasks and Raft.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// Keeps `leading` and `leader_since` in step with [`Node::is_leader`]; checked on every metrics
    /// change and at least every 50 ms (an isolated leader's metrics may go quiet).
    async fn track_leadership(self: Arc<Self>) {
        let mut metrics = self.raft.metrics();
        tokio::spawn(raft_group::break_split_votes(
            self.raft.clone(),
            self.cfg.id,
            Duration::from_millis(ELECTION_TIMEOUT_MAX_MS),
            self.shutdown.clone(),
        ));
        loop {
            let leading = self.is_leader();
            self.leading
                .send_if_modified(|l| std::mem::replace(l, leading) != leading);
            {
                let mut since = self.leader_since.lock().expect("lock");
                match (leading, since.is_some()) {
                    (true, false) => {
                        tracing::info!(
                            id = self.cfg.id,
                            "became leader; waiting one lease before expiring hosts"
                        );
                        *since = Some(Instant::now());
                        self.live.lock().expect("lock").clear();
                        // A new leader learns applied versions afresh and starts from 0.
                        self.settle.lock().expect("lock").reset(&self.table());
                        self.settled.send_replace(0);
                    }
                    (false, true) => {
                        tracing::info!(id = self.cfg.id, "no longer leader");
                        *since = None;
                        self.live.lock().expect("lock").clear();
                        *self.settle.lock().expect("lock") = Tracker::default();
                        self.settled.send_replace(0);
                    }
                    _ => {}
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = metrics.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            metrics.borrow_and_update();
        }
    }

    /// The settled version this replica computed while leading; 0 on a follower, and where a new
    /// leader starts.
    pub fn settled(&self) -> u64 {
        *self.settled.borrow()
    }

    /// Publishes a settled version that grew.
    fn publish_settled(&self, grown: Option<u64>) {
        if let Some(v) = grown {
            self.settled.send_if_modified(|s| {
                let grew = v > *s;
                if grew {
                    *s = v;
                }
                grew
            });
        }
    }

    /// Builds each committed table once for the sessions (full and as a delta from the one before),
    /// and feeds it to the settle tracker while this replica leads.
    async fn publish_tables(self: Arc<Self>) {
        let mut tables = self.table.clone();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = tables.changed() => if r.is_err() { return },
            }
            let t = tables.borrow_and_update().clone();
            let prev = self.published.borrow().clone();
            if t.version > prev.version {
                self.published.send_replace(Arc::new(prev.next(t.clone())));
            }
            if self.leader_since.lock().expect("lock").is_some() {
                let grown = self.settle.lock().expect("lock").on_table(&t);
                self.publish_settled(grown);
            }
        }
    }

    /// Collects changes for the coalescing window and commits each batch as one entry.
    async fn batch_changes(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Change>) {
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                c = rx.recv() => match c { Some(c) => c, None => return },
            };
            let mut pending: BTreeMap<String, Option<HostEntry>> = BTreeMap::new();
            let add = |c: Change, p: &mut BTreeMap<String, Option<HostEntry>>| match c {
                Change::Upsert(h) => {
                    p.insert(h.name.clone(), Some(h));
                }
                Change::Remove(n) => {
                    p.insert(n, None);
                }
            };
            add(first, &mut pending);
            let deadline = tokio::time::Instant::now() + self.cfg.coalesce;
            while let Ok(Some(c)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                add(c, &mut pending);
            }
            while let Ok(c) = rx.try_recv() {
                add(c, &mut pending);
            }
            if !self.is_leader() {
                continue;
            }
            let current = self.sm.membership();
            let mut upsert = Vec::new();
            let mut remove = Vec::new();
            for (name, change) in pending {
                match change {
                    Some(h) if current.hosts.get(&name) != Some(&h) => upsert.push(h),
                    None if current.hosts.contains_key(&name) => remove.push(name),
                    _ => {}
                }
            }
            if upsert.is_empty() && remove.is_empty() {
                continue;
            }
            let (added, removed) = (upsert.len(), remove.len());
            match self
                .raft
                .client_write(Request::Change { upsert, remove })
                .await
            {
                Ok(r) => tracing::info!(
                    version = r.data.version,
                    added,
                    removed,
                    "placement table changed"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "membership change not committed; hosts will retry")
                }
            }
        }
    }

    /// Removes hosts whose lease ran out, once this replica has led for a full lease.
    async fn expire_leases(self: Arc<Self>) {
        let every = (self.cfg.lease / 10).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let since = *self.leader_since.lock().expect("lock");
            let Some(since) = since else { continue };
            if since.elapsed() < self.cfg.lease {
                continue;
            }
            let live = self.live.lock().expect("lock").clone();
            for name in self.sm.membership().hosts.keys() {
                let expired = live.get(name).is_none_or(|t| t.elapsed() > self.cfg.lease);
                if expired {
                    tracing::info!(host = name, "host lease expired; removing it");
                    let _ = self.changes.send(Change::Remove(name.clone()));
                }
            }
        }
    }

    /// Opens a host's session: the leader runs it; a follower answers with the leader's address
    /// and ends the stream.
    pub(crate) fn open_session(
        self: Arc<Self>,
        inbound: tonic::Streaming<HostReport>,
    ) -> crate::wire::Orders {
        let (tx, rx) = mpsc::channel(64);
        if !self.is_leader() {
            let leader = PlacementOrder {
                order: Some(Order::Leader(self.leader_addr().unwrap_or_default())),
            };
            let _ = tx.try_send(Ok(encode(&leader)));
        } else {
            tokio::spawn(self.session(inbound, tx));
        }
        ReceiverStream::new(rx)
    }

    /// One host's session on this replica.
    async fn session(
        self: Arc<Self>,
        mut inbound: tonic::Streaming<HostReport>,
        tx: mpsc::Sender<Result<Bytes, tonic::Status>>,
    ) {
        let mut tables = self.published.subscribe();
        let mut leading = self.leading.subscribe();
        let mut settled = self.settled.subscribe();
        let mut sent_version = None;
        let mut sent_settled = 0u64;
        let lease_ms = self.cfg.lease.as_millis() as u64;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                msg = inbound.message() => {
                    let report = match msg {
                        Ok(Some(r)) => r,
                        _ => return,
                    };
                    if !self.is_leader() {
                        let _ = tx.send(Ok(encode(&PlacementOrder { order: Some(Order::Leader(self.leader_addr().unwrap_or_default())) }))).await;
                        return;
                    }
                    self.live.lock().expect("lock").insert(report.name.clone(), Instant::now());
                    let grown = self.settle.lock().expect("lock").on_report(&report.name, report.applied_version);
                    self.publish_settled(grown);
                    let settled_version = *settled.borrow_and_update();
                    sent_settled = sent_settled.max(settled_version);
                    let ack = PlacementOrder { order: Some(Order::Ack(HeartbeatAck { seq: report.seq, lease_ms, settled_version })) };
                    if tx.send(Ok(encode(&ack))).await.is_err() {
                        return;
                    }
                    if sent_version.is_none() {
                        let p = tables.borrow_and_update().clone();
                        for o in p.orders_since(None) {
                            if tx.send(Ok(o)).await.is_err() {
                                return;
                            }
                        }
                        sent_version = Some(p.version);
                    }
                    // Hosts without actor types read tables but never change them.
                    if !report.actor_types.is_empty() {
                        let mut types: Vec<String> = report.actor_types.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
                        types.sort();
                        let entry = HostEntry { name: report.name, app_id: report.app_id, actor_types: types, namespace: report.namespace };
                        if self.sm.host(&entry.name).as_ref() != Some(&entry) {
                            let _ = self.changes.send(Change::Upsert(entry));
                        }
                    } else if self.sm.host(&report.name).is_some() {
                        // A listed host that reports no actor types is leaving gracefully:
                        // remove it now rather than after its lease.
                        let _ = self.changes.send(Change::Remove(report.name));
                    }
                }
                r = tables.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let p = tables.borrow_and_update().clone();
                    if sent_version.is_some_and(|v| p.version > v) {
                        // Deltas from what this session sent, or the whole table if it fell
                        // further behind than the deltas kept.
                        for o in p.orders_since(sent_version) {
                            if tx.send(Ok(o)).await.is_err() {
                                return;
                            }
                        }
                        sent_version = Some(p.version);
                    }
                }
                r = settled.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let v = *settled.borrow_and_update();
                    if v > sent_settled {
                        sent_settled = v;
                        if tx.send(Ok(encode(&PlacementOrder { order: Some(Order::SettledVersion(v)) }))).await.is_err() {
                            return;
                        }
                    }
                }
                r = leading.changed() => {
                    if r.is_err() || !*leading.borrow_and_update() {
                        let _ = tx.send(Ok(encode(&PlacementOrder { order: Some(Order::Leader(self.leader_addr().unwrap_or_default())) }))).await;
                        return;
                    }
                }
            }
        }
    }

    /// `GET /placement/state`, as Dapr's placement reports it.
    pub fn state_json(&self) -> serde_json::Value {
        let m = self.raft.metrics().borrow().clone();
        let t = self.table();
        serde_json::json!({
            "leader": self.is_leader(),
            "term": m.current_term,
            "tableVersion": t.version,
            "settledVersion": self.settled(),
            "lastApplied": m.last_applied.map_or(0, |l| l.index),
            "quorumAckMs": m.millis_since_quorum_ack,
            "hostList": t.hosts.iter().map(|h| serde_json::json!({
                "name": h.name, "appId": h.app_id, "actorTypes": h.actor_types, "namespace": h.namespace,
            })).collect::<Vec<_>>(),
        })
    }

    /// Prometheus text metrics.
    pub fn metrics_text(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        let t = self.table();
        let connected = self.live.lock().expect("lock").len();
        format!(
            "# TYPE tessera_placement_leader gauge\ntessera_placement_leader {}\n\
             # TYPE tessera_placement_term gauge\ntessera_placement_term {}\n\
             # TYPE tessera_placement_table_version gauge\ntessera_placement_table_version {}\n\
             # TYPE tessera_placement_settled_version gauge\ntessera_placement_settled_version {}\n\
             # TYPE tessera_placement_members gauge\ntessera_placement_members {}\n\
             # TYPE tessera_placement_live_hosts gauge\ntessera_placement_live_hosts {}\n\
             # TYPE tessera_placement_last_applied_index gauge\ntessera_placement_last_applied_index {}\n",
            u8::from(m.current_leader == Some(self.cfg.id)),
            m.current_term,
            t.version,
            self.settled(),
            t.hosts.len(),
            connected,
            m.last_applied.map_or(0, |l| l.index),
        )
    }
}

/// The gRPC service of a replica.
pub struct Service(pub Arc<Node>);

#[tonic::async_trait]
impl Placement for Service {
    type ReportHostStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<PlacementOrder, tonic::Status>> + Send>,
    >;

    /// The generated route, for callers that mount the generated `PlacementServer` directly: the same
    /// session, decoded again. Replicas serve [`crate::wire::PlacementService`], which sends the
    /// encoded orders as they are.
    async fn report_host(
        &self,
        request: tonic::Request<tonic::Streaming<HostReport>>,
    ) -> Result<tonic::Response<Self::ReportHostStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        let orders = self.0.clone().open_session(request.into_inner()).map(|o| {
            o.and_then(|b| {
                PlacementOrder::decode(b).map_err(|e| tonic::Status::internal(e.to_string()))
            })
        });
        Ok(tonic::Response::new(Box::pin(orders)))
    }

    async fn raft(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let msg = request.into_inner();
        match network::handle(&self.0.raft, &msg.kind, &msg.payload).await? {
            Some(payload) => Ok(tonic::Response::new(RaftMessage {
                kind: msg.kind,
                payload,
            })),
            None => Err(tonic::Status::invalid_argument(format!(
                "unknown raft message kind {:?}",
                msg.kind
            ))),
        }
    }
}

/// Serves a replica: gRPC (hosts and Raft) on `grpc`, health / metrics / state on `http`, until
/// `shutdown` resolves.
pub async fn run(
    node: Arc<Node>,
    grpc: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let stop = crate::raft_group::serve_http_until(http, health_router(node.clone()), shutdown);
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    serve(node, incoming, async move { stop.cancelled().await }).await
}

/// Serves the gRPC side of a replica on any stream of connections (simulated ones in `sims/`)
/// until `shutdown`, then stops the replica.
pub async fn serve<I, IO, IE>(
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
        .add_service(crate::wire::PlacementService::new(node.clone()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    node.shutdown().await;
    result.map_err(|e| Error::Raft(format!("gRPC server: {e}")))
}

fn health_router(node: Arc<Node>) -> axum::Router {
    use axum::routing::get;
    let metadata = node.cfg.metadata_enabled;
    let mut r = axum::Router::new()
        .route(
            "/healthz",
            get({
                let n = node.clone();
                move || async move {
                    if n.raft.metrics().borrow().current_leader.is_some() {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get({
                let n = node.clone();
                move || async move { n.metrics_text() }
            }),
        );
    if metadata {
        r = r.route(
            "/placement/state",
            get(move || async move { axum::Json(node.state_json()) }),
        );
    }
    r
}

/// Parses `1=127.0.0.1:50005,2=127.0.0.1:51005`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<NodeId, String>, Error> {
    raft_group::parse_initial_cluster(s).map_err(|e| Error::Config(e.0))
}
