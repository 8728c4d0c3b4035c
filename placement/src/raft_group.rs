//! What every Tessera Raft group (the placement replicas, the scheduler replicas) does the same
//! way around openraft: parsing `--initial-cluster`, starting Raft and initializing the cluster
//! on first start, the "leader with a fresh quorum" test, the tie-break campaign that ends
//! split votes, and serving a replica's health/metrics HTTP side next to its gRPC side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics, RaftTypeConfig, ServerState};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::raft_log::NodeId;

/// Why `--initial-cluster` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ClusterError(pub String);

/// Parses `1=127.0.0.1:50005,2=127.0.0.1:51005`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<NodeId, String>, ClusterError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| ClusterError(format!("{part:?} is not id=host:port")))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| ClusterError(format!("{id:?} is not a replica id")))?;
        addr.trim()
            .parse::<SocketAddr>()
            .map_err(|_| ClusterError(format!("{addr:?} is not host:port")))?;
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(ClusterError(format!("replica id {id} appears twice")));
        }
    }
    if out.is_empty() {
        return Err(ClusterError("the initial cluster is empty".into()));
    }
    Ok(out)
}

/// Initializes the cluster with every replica of `peers` as a voter, unless this replica's
/// storage says it already is. Every replica proposes the same membership; openraft accepts that.
pub async fn initialize<C>(
    raft: &openraft::Raft<C>,
    peers: &BTreeMap<NodeId, String>,
) -> Result<(), String>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
{
    if raft.is_initialized().await.map_err(|e| e.to_string())? {
        return Ok(());
    }
    let members: BTreeMap<NodeId, BasicNode> = peers
        .iter()
        .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
        .collect();
    if let Err(e) = raft.initialize(members).await {
        tracing::debug!(error = %e, "initialize skipped");
    }
    Ok(())
}

/// Leader with a quorum that acknowledged it within `fresh`: a leader cut off from its followers
/// stops counting as one well before they can elect another.
pub fn leads_with_fresh_quorum(m: &RaftMetrics<NodeId, BasicNode>, fresh: Duration) -> bool {
    let alone = m.membership_config.membership().voter_ids().count() <= 1;
    m.state == ServerState::Leader
        && (alone
            || m.millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) < fresh.as_millis()))
}

/// The leader's address, if one is known.
pub fn leader_addr(m: &RaftMetrics<NodeId, BasicNode>) -> Option<String> {
    let leader = m.current_leader?;
    m.membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.addr.clone())
}

/// Ends split votes. openraft draws each replica's election timeout once and checks it on a
/// coarse tick, so replicas that start together can time out on the same tick forever, each
/// voting for itself. If no leader appears for `stall` (one full election timeout), this
/// campaigns once at a random instant within the next 200 ms: that breaks the tie (a vote round
/// trip takes milliseconds). Runs until `stop`.
pub async fn break_split_votes<C>(
    raft: openraft::Raft<C>,
    id: NodeId,
    stall: Duration,
    stop: CancellationToken,
) where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
{
    let mut metrics = raft.metrics();
    let mut leaderless_since: Option<Instant> = None;
    loop {
        let has_leader = metrics.borrow_and_update().current_leader.is_some();
        match (has_leader, leaderless_since) {
            (true, _) => leaderless_since = None,
            (false, None) => leaderless_since = Some(Instant::now()),
            (false, Some(t)) if t.elapsed() > stall => {
                let delay = Duration::from_millis(crate::runtime::random_u64() % 200);
                tokio::time::sleep(delay).await;
                if raft.metrics().borrow().current_leader.is_none() {
                    tracing::info!(id, "no leader for a while; starting an election");
                    let _ = raft.trigger().elect().await;
                }
                leaderless_since = Some(Instant::now());
            }
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = metrics.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Starts the replica's stop token: cancelled when `shutdown` resolves. With `http`, also serves
/// `health` (health, metrics, state) there until then. The caller serves gRPC until the token
/// is cancelled.
pub fn serve_http_until(
    http: Option<tokio::net::TcpListener>,
    health: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        s.cancel();
    });
    if let Some(http) = http {
        let st = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(http, health)
                .with_graceful_shutdown(async move { st.cancelled().await })
                .await;
        });
    }
    stop
}
