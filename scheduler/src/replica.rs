//! One replica of a replicated scheduler (more than one replica in `--initial-cluster`): Raft
//! for the job data ([`crate::raft`]), and the partition leases that decide which replica fires
//! which jobs.
//!
//! - Writes (creates, deletes) go through Raft on the leader; a follower forwards them. They are
//!   answered once committed (the log is fsynced on a quorum); a delete also once the replica
//!   firing its partition has applied it (up to 2 s), so only a tick already sent can follow it.
//!   Reads go to the leader, which confirms its leadership first.
//! - Partition leases: every replica asks the leader to renew its lease every `renew_every`,
//!   telling it how far it has applied the log. The answer lists the partitions it owns with
//!   their epochs; the lease runs from when the request was *sent*, on the replica's own clock,
//!   for `lease` less the age of the leader's last quorum acknowledgement (so a deposed leader's
//!   grants end within `lease` of its last certain moment as leader). A replica fires a partition only while its lease runs and both the answer and
//!   its own applied assignment give it that partition at that epoch.
//! - Assignment (leader): every `renew_every / 2` the leader commits changes for partitions that
//!   are unowned, whose owner has not renewed for `lease + margin` (so its lease has certainly run
//!   out; a new leader first waits that long after its election), or that it revoked for
//!   balance once their former owner has applied the revocation and has no delivery of them in
//!   flight nor completion uncommitted (it may still commit those under its old epoch until
//!   the partition has a new owner). Partitions go to the live replica
//!   with the fewest; a replica with more than its share gives some up (revoke first, reassign
//!   once released), so a replica that comes back gets work again.
//! - Tick completions: the trigger loop's state changes are collected and committed every
//!   `progress_every` as [`Command::Progress`] under the epoch the replica fires each partition
//!   at; the state machine rejects them if that epoch is no longer current. A new owner loads the
//!   committed state of its partitions and fires what is due (coalesced, never early); a tick
//!   whose completion was not committed fires again (at least once).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use placement::network::{Dial, Network, RaftTransport};
use placement::raft_group;
use placement::raft_log::NodeId;
use proto::scheduler::scheduler_client::SchedulerClient;
use proto::scheduler::RaftMessage;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::engine::SchedulerHandle;
use crate::job::{Job, JobKey};
use crate::raft::{Applied, Assignment, Command, PartitionProgress, Raft, StateMachine};
use crate::store::partition_of;

/// Timing of a replicated scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a renewed partition lease lasts, from when the renewal was sent.
    pub lease: Duration,
    /// Added to the lease before the leader moves a silent replica's partitions (clock-rate drift).
    pub margin: Duration,
    pub renew_every: Duration,
    /// How often tick completions are committed.
    pub progress_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease: Duration::from_secs(2),
            margin: Duration::from_millis(500),
            renew_every: Duration::from_millis(400),
            progress_every: Duration::from_millis(200),
        }
    }
}

/// Why a replicated operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    /// No leader, or it could not be reached: worth trying again.
    #[error("no scheduler leader available: {0}")]
    Unavailable(String),
    #[error("scheduler replica: {0}")]
    Internal(String),
}

impl From<ReplicaError> for tonic::Status {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::Unavailable(m) => tonic::Status::unavailable(m),
            ReplicaError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

/// The scheduler service's client, as the transport of Raft and of the replicas' own requests.
#[derive(Clone)]
pub struct Transport(SchedulerClient<Channel>);

impl RaftTransport for Transport {
    fn connect(channel: Channel) -> Self {
        Transport(SchedulerClient::new(channel))
    }

    async fn call(
        &mut self,
        kind: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut request = tonic::Request::new(RaftMessage {
            kind: kind.to_string(),
            payload,
        });
        request.set_timeout(timeout);
        Ok(self.0.raft(request).await?.into_inner().payload)
    }
}

/// A lease renewal request.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Renew {
    from: NodeId,
    /// The sender fires exactly the partitions the assignment as of this log index gives it
    /// (under its lease).
    applied: u64,
    /// Partitions it stopped firing whose deliveries or completions are still pending.
    #[serde(default)]
    draining: Vec<u32>,
}

/// The leader's answer: the sender's partitions and their epochs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Renewed {
    owned: Vec<(u32, u64)>,
    /// How long the lease runs from when the request was sent: `lease` less the age of the
    /// leader's last quorum acknowledgement, so no lease a leader grants outlasts `lease` after
    /// the last moment it was certainly leader (a successor's wait covers them all).
    lease_ms: u64,
}

/// What the leader knows of a replica from its renewals.
#[derive(Debug, Clone)]
struct Heard {
    at: Instant,
    applied: u64,
    draining: HashSet<u32>,
}

/// This replica's lease, from the leader's last answer.
#[derive(Debug, Clone)]
struct Lease {
    until: Instant,
    owned: HashMap<u32, u64>,
}

/// How much the leader knows, for [`plan`].
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub assignment: &'a Assignment,
    /// Every replica of the cluster.
    pub members: &'a BTreeSet<NodeId>,
    /// Replicas that renewed recently: they may be given partitions.
    pub live: &'a BTreeSet<NodeId>,
    /// Replicas whose lease has certainly run out (silent for lease + margin under this leader).
    pub gone: &'a BTreeSet<NodeId>,
    /// How far each replica has applied the log, as last reported.
    pub applied: &'a HashMap<NodeId, u64>,
    /// Partitions each replica still drains (deliveries or completions pending), as last reported.
    pub draining: &'a HashMap<NodeId, HashSet<u32>>,
    /// Whether never-assigned partitions may be handed out yet.
    pub assign_fresh: bool,
}

/// The assignment changes the leader commits next (empty: nothing to do). Pure, for tests.
pub fn plan(input: &PlanInput<'_>) -> Vec<(u32, Option<NodeId>)> {
    let slots = &input.assignment.slots;
    let mut counts: BTreeMap<NodeId, usize> = input.live.iter().map(|n| (*n, 0)).collect();
    let mut free = Vec::new();
    for (p, s) in slots.iter().enumerate() {
        let p = p as u32;
        match (s.owner, s.released_by) {
            (Some(o), _) => {
                if input.gone.contains(&o) || !input.members.contains(&o) {
                    free.push(p);
                } else if let Some(c) = counts.get_mut(&o) {
                    *c += 1;
                }
            }
            (None, None) => {
                if input.assign_fresh {
                    free.push(p);
                }
            }
            (None, Some(prev)) => {
                let released = input.gone.contains(&prev)
                    || !input.members.contains(&prev)
                    || (input.applied.get(&prev).is_some_and(|a| *a >= s.epoch)
                        && !input.draining.get(&prev).is_some_and(|d| d.contains(&p)));
                if released {
                    free.push(p);
                }
            }
        }
    }
    if counts.is_empty() {
        return Vec::new();
    }
    let mut changes = Vec::new();
    for p in free {
        let (least, _) = counts
            .iter()
            .min_by_key(|(n, c)| (**c, **n))
            .map(|(n, c)| (*n, *c))
            .unwrap_or_default();
        if let Some(c) = counts.get_mut(&least) {
            *c += 1;
        }
        changes.push((p, Some(least)));
    }
    if !changes.is_empty() {
        return changes;
    }
    // Balance: nothing pending, so revoke from the busiest live replica while it has at least two
    // more than the idlest. Revoked partitions are reassigned once their owner has let go.
    if slots.iter().any(|s| s.owner.is_none()) {
        return changes;
    }
    let mut owned: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
    for (p, s) in slots.iter().enumerate() {
        if let Some(o) = s.owner.filter(|o| counts.contains_key(o)) {
            owned.entry(o).or_default().push(p as u32);
        }
    }
    loop {
        let busiest = counts
            .iter()
            .max_by_key(|(n, c)| (**c, **n))
            .map(|(n, c)| (*n, *c));
        let idlest = counts
            .iter()
            .min_by_key(|(n, c)| (**c, **n))
            .map(|(n, c)| (*n, *c));
        let (Some((b, bc)), Some((i, ic))) = (busiest, idlest) else {
            break;
        };
        if bc < ic + 2 {
            break;
        }
        let Some(p) = owned.get_mut(&b).and_then(Vec::pop) else {
            break;
        };
        changes.push((p, None));
        counts.insert(b, bc - 1);
        counts.insert(i, ic + 1);
    }
    changes
}

/// A scheduler replica in a cluster.
pub struct Replica {
    id: NodeId,
    timing: Timing,
    members: BTreeSet<NodeId>,
    /// Every replica's address.
    addrs: BTreeMap<NodeId, String>,
    raft: Raft,
    sm: StateMachine,
    handle: SchedulerHandle,
    dial: Dial,
    peers: Mutex<HashMap<String, Transport>>,
    heard: Mutex<HashMap<NodeId, Heard>>,
    leader_since: Mutex<Option<Instant>>,
    lease: Mutex<Option<Lease>>,
    /// The partitions the trigger loop fires, with the epoch it fires them under.
    firing: Mutex<BTreeMap<u32, u64>>,
    /// The applied index the fired partitions were computed at (reported in renewals).
    fired_as_of: Mutex<u64>,
    /// Partitions no longer fired, with the epoch they were fired at, while their deliveries
    /// or completions are pending.
    draining: Mutex<BTreeMap<u32, u64>>,
    /// Partitions whose completions are being committed.
    in_transit: Mutex<HashSet<u32>>,
    renew_now: Notify,
    stop: CancellationToken,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("id", &self.id).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the data consistent: recover from a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How recently a quorum must have acknowledged the leader for it to answer as one.
const QUORUM_FRESH: Duration = Duration::from_millis(1000);
const ELECTION_TIMEOUT_MAX_MS: u64 = 800;

fn raft_config() -> Result<Arc<openraft::Config>, ReplicaError> {
    let cfg = openraft::Config {
        cluster_name: "tessera-scheduler".into(),
        heartbeat_interval: 80,
        election_timeout_min: 400,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        install_snapshot_timeout: 2_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5_000),
        max_in_snapshot_log_to_keep: 1_000,
        ..Default::default()
    };
    cfg.validate()
        .map(Arc::new)
        .map_err(|e| ReplicaError::Internal(e.to_string()))
}

impl Replica {
    /// Starts Raft on `log` and `sm` (initializing the cluster on first start) and the lease,
    /// assignment and progress tasks. `handle` is the trigger loop firing from `sm`'s store.
    pub async fn start(
        id: NodeId,
        peers: &BTreeMap<NodeId, String>,
        timing: Timing,
        dial: Dial,
        log: crate::raft::LogStore,
        sm: StateMachine,
        handle: SchedulerHandle,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let network: Network<crate::raft::TypeConfig, Transport> = Network::new(dial.clone());
        let raft = Raft::new(id, raft_config()?, network, log, sm.clone())
            .await
            .map_err(|e| ReplicaError::Internal(e.to_string()))?;
        raft_group::initialize(&raft, peers)
            .await
            .map_err(ReplicaError::Internal)?;
        sm.set_engine(handle.clone());
        let replica = Arc::new(Replica {
            id,
            timing,
            members: peers.keys().copied().collect(),
            addrs: peers.clone(),
            raft,
            sm,
            handle,
            dial,
            peers: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            leader_since: Mutex::new(None),
            lease: Mutex::new(None),
            firing: Mutex::new(BTreeMap::new()),
            fired_as_of: Mutex::new(0),
            draining: Mutex::new(BTreeMap::new()),
            in_transit: Mutex::new(HashSet::new()),
            renew_now: Notify::new(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(raft_group::break_split_votes(
            replica.raft.clone(),
            id,
            Duration::from_millis(ELECTION_TIMEOUT_MAX_MS),
            replica.stop.clone(),
        ));
        tokio::spawn(replica.clone().renew_loop());
        tokio::spawn(replica.clone().fire_loop());
        tokio::spawn(replica.clone().assign_loop());
        tokio::spawn(replica.clone().progress_loop());
        Ok(replica)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Stops the background tasks and Raft.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// Leader with a fresh quorum.
    pub fn is_leader(&self) -> bool {
        raft_group::leads_with_fresh_quorum(&self.raft.metrics().borrow(), QUORUM_FRESH)
    }

    /// Whether some leader is known (for `/healthz`).
    pub fn has_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader.is_some()
    }

    /// The partitions this replica fires now.
    pub fn firing(&self) -> Vec<u32> {
        lock(&self.firing).keys().copied().collect()
    }

    /// The current assignment as applied here.
    pub fn assignment(&self) -> Assignment {
        self.sm.assignment().borrow().clone()
    }

    fn peer(&self, addr: &str) -> Result<Transport, ReplicaError> {
        let mut peers = lock(&self.peers);
        if let Some(t) = peers.get(addr) {
            return Ok(t.clone());
        }
        let ch = (self.dial)(addr).map_err(|e| ReplicaError::Unavailable(e.to_string()))?;
        let t = Transport::connect(ch);
        peers.insert(addr.to_string(), t.clone());
        Ok(t)
    }

    /// Sends one of the replicas' own requests to the leader.
    async fn to_leader<Req: Serialize, Resp: for<'de> Deserialize<'de>>(
        &self,
        kind: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ReplicaError> {
        let addr = raft_group::leader_addr(&self.raft.metrics().borrow())
            .ok_or_else(|| ReplicaError::Unavailable("no leader known".into()))?;
        let payload = serde_json::to_vec(req).map_err(|e| ReplicaError::Internal(e.to_string()))?;
        let mut t = self.peer(&addr)?;
        let reply = t.call(kind, payload, timeout).await.map_err(|s| {
            lock(&self.peers).remove(&addr);
            ReplicaError::Unavailable(format!("leader {addr}: {}", s.message()))
        })?;
        serde_json::from_slice(&reply).map_err(|e| ReplicaError::Internal(e.to_string()))
    }

    /// Commits `cmd` (here if this replica leads, else on the leader) and returns its effect.
    pub async fn write(&self, cmd: Command) -> Result<Applied, ReplicaError> {
        match self.raft.client_write(cmd.clone()).await {
            Ok(r) => Ok(self.settle_delete(&cmd, r.log_id.index, r.data).await),
            Err(e) => match e.forward_to_leader() {
                Some(f) if f.leader_id.is_some_and(|l| l != self.id) => {
                    self.to_leader("write", &cmd, Duration::from_secs(5)).await
                }
                _ => Err(ReplicaError::Unavailable(e.to_string())),
            },
        }
    }

    /// Commits `cmd` only if this replica leads (a forwarded write is not forwarded again).
    async fn write_here(&self, cmd: Command) -> Result<Applied, ReplicaError> {
        let r = self
            .raft
            .client_write(cmd.clone())
            .await
            .map_err(|e| ReplicaError::Unavailable(e.to_string()))?;
        Ok(self.settle_delete(&cmd, r.log_id.index, r.data).await)
    }

    /// After a delete committed at `index` (on the leader, which has applied it): waits until the
    /// replica firing the job's partition has applied it too, so that, as with a single replica,
    /// the only tick of the job that can still arrive is one already sent. If that replica does
    /// not answer within `ACK_WAIT` (down, cut off), the delete is answered anyway: a tick it
    /// sends before its lease runs out is then possible.
    async fn settle_delete(&self, cmd: &Command, index: u64, applied: Applied) -> Applied {
        const ACK_WAIT: Duration = Duration::from_secs(2);
        let Command::Delete { key } = cmd else {
            return applied;
        };
        let slot = self.sm.assignment().borrow().slot(partition_of(key));
        let Some(owner) = slot.owner.or(slot.released_by).filter(|o| *o != self.id) else {
            return applied;
        };
        let Some(addr) = self.addrs.get(&owner) else {
            return applied;
        };
        let asked = async {
            let payload = serde_json::to_vec(&index).map_err(|e| e.to_string())?;
            let mut t = self.peer(addr).map_err(|e| e.to_string())?;
            t.call("applied", payload, ACK_WAIT)
                .await
                .map_err(|s| s.message().to_string())
        };
        if let Err(e) = asked.await {
            tracing::debug!(owner, error = %e, "the partition owner did not confirm a delete");
        }
        applied
    }

    /// Reads a job as of the latest commit (on the leader).
    pub async fn get(&self, key: &JobKey) -> Result<Option<Job>, ReplicaError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => self.read_local(key),
            Err(e) => match e.forward_to_leader() {
                Some(f) if f.leader_id.is_some_and(|l| l != self.id) => {
                    self.to_leader("get", &key.as_bytes(), Duration::from_secs(5))
                        .await
                }
                _ => Err(ReplicaError::Unavailable(e.to_string())),
            },
        }
    }

    fn read_local(&self, key: &JobKey) -> Result<Option<Job>, ReplicaError> {
        self.sm
            .store()
            .get(key)
            .map(|r| r.map(|r| r.job))
            .map_err(|e| ReplicaError::Internal(e.to_string()))
    }

    /// Serves the replicas' own requests on the `Raft` method (`None`: unknown kind).
    pub async fn handle(
        &self,
        kind: &str,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, ReplicaError> {
        fn decode<T: for<'de> Deserialize<'de>>(p: &[u8]) -> Result<T, ReplicaError> {
            serde_json::from_slice(p).map_err(|e| ReplicaError::Internal(e.to_string()))
        }
        fn encode<T: Serialize>(v: &T) -> Result<Option<Vec<u8>>, ReplicaError> {
            serde_json::to_vec(v)
                .map(Some)
                .map_err(|e| ReplicaError::Internal(e.to_string()))
        }
        match kind {
            "renew" => encode(&self.renewed(decode(payload)?)?),
            "write" => encode(&self.write_here(decode(payload)?).await?),
            "applied" => {
                let index: u64 = decode(payload)?;
                if !self.sm.wait_applied(index, Duration::from_secs(2)).await {
                    return Err(ReplicaError::Unavailable(format!(
                        "index {index} not applied yet"
                    )));
                }
                encode(&index)
            }
            "get" => {
                let key: Vec<u8> = decode(payload)?;
                self.raft
                    .ensure_linearizable()
                    .await
                    .map_err(|e| ReplicaError::Unavailable(e.to_string()))?;
                encode(&self.read_local(&JobKey::from_bytes(key))?)
            }
            _ => Ok(None),
        }
    }

    /// The leader's side of a renewal.
    fn renewed(&self, req: Renew) -> Result<Renewed, ReplicaError> {
        if !self.is_leader() {
            return Err(ReplicaError::Unavailable("not the leader".into()));
        }
        let since_ack = self
            .raft
            .metrics()
            .borrow()
            .millis_since_quorum_ack
            .unwrap_or(0);
        lock(&self.heard).insert(
            req.from,
            Heard {
                at: Instant::now(),
                applied: req.applied,
                draining: req.draining.into_iter().collect(),
            },
        );
        Ok(Renewed {
            owned: self.sm.assignment().borrow().owned_by(req.from),
            lease_ms: (self.timing.lease.as_millis() as u64).saturating_sub(since_ack),
        })
    }

    /// Renews this replica's lease every `renew_every` (sooner when its assignment changes).
    async fn renew_loop(self: Arc<Self>) {
        loop {
            let sent = Instant::now();
            let req = Renew {
                from: self.id,
                applied: *lock(&self.fired_as_of),
                draining: self.still_draining(),
            };
            let answer = if self.raft.metrics().borrow().current_leader == Some(self.id) {
                self.renewed(req)
            } else {
                self.to_leader("renew", &req, self.timing.renew_every).await
            };
            match answer {
                Ok(r) => {
                    *lock(&self.lease) = Some(Lease {
                        until: sent + Duration::from_millis(r.lease_ms).min(self.timing.lease),
                        owned: r.owned.into_iter().collect(),
                    });
                    self.refresh_firing();
                }
                Err(e) => tracing::debug!(error = %e, "partition lease not renewed"),
            }
            let next = sent + self.timing.renew_every;
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                _ = self.renew_now.notified() => {}
            }
        }
    }

    /// Keeps the fired partitions in step with the lease and the applied assignment.
    async fn fire_loop(self: Arc<Self>) {
        let mut assignment = self.sm.assignment();
        loop {
            let gained = {
                let a = assignment.borrow_and_update().clone();
                let lease = lock(&self.lease).clone();
                a.owned_by(self.id)
                    .into_iter()
                    .any(|(p, e)| lease.as_ref().is_none_or(|l| l.owned.get(&p) != Some(&e)))
            };
            if gained {
                // Ask for a lease on it now rather than at the next renewal.
                self.renew_now.notify_one();
            }
            let until = self.refresh_firing();
            let wake = until.map_or(Duration::from_millis(100), |u| {
                u.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100))
            });
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = assignment.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    /// The partitions this replica stopped firing whose deliveries are in flight or whose
    /// completions are not committed yet; forgets the others.
    fn still_draining(&self) -> Vec<u32> {
        let mut draining = lock(&self.draining);
        if draining.is_empty() {
            return Vec::new();
        }
        let mut pending = self.handle.busy_partitions();
        pending.extend(self.sm.store().progress_partitions());
        pending.extend(lock(&self.in_transit).iter().copied());
        draining.retain(|p, _| pending.contains(p));
        draining.keys().copied().collect()
    }

    /// Recomputes the fired partitions; returns when the lease runs out.
    fn refresh_firing(&self) -> Option<Instant> {
        let now = Instant::now();
        let lease = lock(&self.lease).clone();
        // Read before the assignment, which the state machine publishes first: the assignment
        // used below is at least as new as this index.
        let applied = self.sm.applied();
        let assignment = self.sm.assignment().borrow().clone();
        let want: BTreeMap<u32, u64> = match &lease {
            Some(l) if now < l.until => assignment
                .owned_by(self.id)
                .into_iter()
                .filter(|(p, e)| l.owned.get(p) == Some(e))
                .collect(),
            _ => BTreeMap::new(),
        };
        let mut firing = lock(&self.firing);
        if *firing != want {
            let set: HashSet<u32> = want.keys().copied().collect();
            if let Err(e) = self.sm.store().set_owned(Some(set)) {
                tracing::error!(error = %e, "cannot re-index the job store");
                return lease.map(|l| l.until).filter(|u| *u > now);
            }
            let gained: Vec<u32> = want
                .keys()
                .filter(|p| !firing.contains_key(p))
                .copied()
                .collect();
            let lost: Vec<u32> = firing
                .keys()
                .filter(|p| !want.contains_key(p))
                .copied()
                .collect();
            tracing::info!(
                id = self.id,
                ?gained,
                ?lost,
                firing = want.len(),
                "partitions changed"
            );
            {
                let mut draining = lock(&self.draining);
                for p in &lost {
                    if let Some(e) = firing.get(p) {
                        draining.insert(*p, *e);
                    }
                }
                for p in &gained {
                    draining.remove(p);
                }
            }
            *firing = want;
            self.handle.wake();
        }
        let mut as_of = lock(&self.fired_as_of);
        *as_of = (*as_of).max(applied);
        lease.map(|l| l.until).filter(|u| *u > now)
    }

    /// On the leader: commits assignment changes.
    async fn assign_loop(self: Arc<Self>) {
        let every = self.timing.renew_every / 2;
        let silent = self.timing.lease + self.timing.margin;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let leading = self.is_leader();
            let since = {
                let mut s = lock(&self.leader_since);
                match (leading, *s) {
                    (true, None) => {
                        tracing::info!(id = self.id, "became scheduler leader");
                        lock(&self.heard).clear();
                        *s = Some(Instant::now());
                    }
                    (false, Some(_)) => {
                        tracing::info!(id = self.id, "no longer scheduler leader");
                        *s = None;
                    }
                    _ => {}
                }
                *s
            };
            let Some(since) = since else { continue };
            let now = Instant::now();
            let heard = lock(&self.heard).clone();
            let live: BTreeSet<NodeId> = heard
                .iter()
                .filter(|(_, h)| now.duration_since(h.at) < self.timing.renew_every * 3)
                .map(|(n, _)| *n)
                .collect();
            let gone: BTreeSet<NodeId> = if now.duration_since(since) >= silent {
                self.members
                    .iter()
                    .filter(|n| {
                        heard
                            .get(n)
                            .is_none_or(|h| now.duration_since(h.at) >= silent)
                    })
                    .copied()
                    .collect()
            } else {
                BTreeSet::new()
            };
            let applied: HashMap<NodeId, u64> =
                heard.iter().map(|(n, h)| (*n, h.applied)).collect();
            let draining: HashMap<NodeId, HashSet<u32>> = heard
                .iter()
                .map(|(n, h)| (*n, h.draining.clone()))
                .collect();
            let assignment = self.sm.assignment().borrow().clone();
            let changes = plan(&PlanInput {
                assignment: &assignment,
                members: &self.members,
                live: &live,
                gone: &gone,
                applied: &applied,
                draining: &draining,
                assign_fresh: now.duration_since(since) >= self.timing.renew_every * 2,
            });
            if changes.is_empty() {
                continue;
            }
            tracing::info!(id = self.id, ?changes, ?gone, "assigning partitions");
            if let Err(e) = self.write_here(Command::Assign { changes }).await {
                tracing::warn!(error = %e, "partition assignment not committed");
            }
        }
    }

    /// Commits the trigger loop's state changes under the epochs their partitions are fired at.
    async fn progress_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(self.timing.progress_every) => {}
            }
            let items = self.sm.store().take_progress();
            if items.is_empty() {
                continue;
            }
            let mut epochs = lock(&self.draining).clone();
            epochs.extend(lock(&self.firing).iter().map(|(p, e)| (*p, *e)));
            let mut parts: BTreeMap<u32, PartitionProgress> = BTreeMap::new();
            let mut dropped = 0usize;
            for item in items {
                let p = partition_of(&item.key);
                match epochs.get(&p) {
                    Some(epoch) => parts
                        .entry(p)
                        .or_insert_with(|| PartitionProgress {
                            partition: p,
                            epoch: *epoch,
                            items: Vec::new(),
                        })
                        .items
                        .push(item),
                    // No longer ours: the new owner fires from the last committed state.
                    None => dropped += 1,
                }
            }
            if dropped > 0 {
                tracing::debug!(
                    dropped,
                    "completions of partitions no longer fired here dropped"
                );
            }
            if parts.is_empty() {
                continue;
            }
            let parts: Vec<PartitionProgress> = parts.into_values().collect();
            let transit: Vec<u32> = parts.iter().map(|p| p.partition).collect();
            lock(&self.in_transit).extend(transit.iter().copied());
            let cmd = Command::Progress {
                from: self.id,
                parts: parts.clone(),
            };
            match self.write(cmd).await {
                Ok(Applied::Progress { rejected, .. }) if rejected > 0 => {
                    tracing::info!(rejected, "tick completions rejected: partition moved");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "tick completions not committed; retrying");
                    self.sm
                        .store()
                        .restore_progress(parts.into_iter().flat_map(|p| p.items).collect());
                }
            }
            // After a failure the items are back in the store's record, so still pending.
            let mut in_transit = lock(&self.in_transit);
            for p in transit {
                in_transit.remove(&p);
            }
        }
    }

    /// `/metrics` lines of the replica.
    pub fn metrics_text(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        format!(
            "# TYPE tessera_scheduler_leader gauge\ntessera_scheduler_leader {}\n\
             # TYPE tessera_scheduler_term gauge\ntessera_scheduler_term {}\n\
             # TYPE tessera_scheduler_partitions_fired gauge\ntessera_scheduler_partitions_fired {}\n\
             # TYPE tessera_scheduler_last_applied_index gauge\ntessera_scheduler_last_applied_index {}\n",
            u8::from(self.is_leader()),
            m.current_term,
            lock(&self.firing).len(),
            self.sm.applied(),
        )
    }
}

#[cfg(test)]
mod tests;
