//! The replicated job data of a scheduler cluster: the Raft commands, the partition assignment and
//! the state machine openraft applies them to (storage-v2, on sled, beside the shared
//! [`placement::raft_log`] log store).
//!
//! - [`Command`]s: job creates and deletes (from hosts, through the leader), tick completions
//!   ([`Command::Progress`], from the replica that fired them) and partition assignments
//!   ([`Command::Assign`], from the leader).
//! - The state machine keeps the jobs in a [`JobStore`] (trees `jobs`/`due` of the replica's sled
//!   database; the Raft log is the durable record, so the store itself never flushes) and the
//!   [`Assignment`] of the [`PARTITIONS`] partitions in tree `sm`. A create's generation is its
//!   log index, the same on every replica.
//! - Fencing: every assignment of a partition gets the log index of its entry as its epoch.
//!   A progress batch names the epoch under which its sender fired the partition, and is applied
//!   only if the sender still owns the partition at that epoch; otherwise it is rejected and
//!   changes nothing ([`Assignment::admits`]).
//! - Snapshots carry the assignment and every job record.

// openraft's storage traits fix the error type (`StorageError`, ~200 bytes).
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership,
};
use placement::raft_log::{io_err, read_err, write_err, NodeId, SnapshotSlot};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::engine::SchedulerHandle;
use crate::job::{Job, JobKey};
use crate::store::{partition_of, JobStore, Progress, PutOutcome, Records, PARTITIONS};

openraft::declare_raft_types!(
    /// Raft types of the scheduler replicas.
    pub TypeConfig:
        D = Command,
        R = Applied,
        AsyncRuntime = placement::runtime::Runtime,
);

/// A scheduler replica's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// The Raft log of a scheduler replica.
pub type LogStore = placement::raft_log::LogStore<TypeConfig>;

/// Tick completions of one partition, fired under one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub partition: u32,
    pub epoch: u64,
    pub items: Vec<Progress>,
}

/// A change to the replicated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store a job (its generation is the entry's log index).
    Put {
        job: Box<Job>,
        overwrite: bool,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Firing state reached by replica `from` (fenced per partition by epoch).
    Progress {
        from: NodeId,
        parts: Vec<PartitionProgress>,
    },
    /// New owners of some partitions (`None`: revoked, waiting for its former owner to let go).
    Assign {
        changes: Vec<(u32, Option<NodeId>)>,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// A blank or membership entry.
    Nothing,
    Put(PutOutcome),
    Deleted(bool),
    /// Items applied, and items refused because their partition epoch was stale.
    Progress {
        accepted: usize,
        rejected: usize,
    },
    Assigned,
}

/// One partition's owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub owner: Option<NodeId>,
    /// The log index of the assignment that set `owner` (0: never assigned).
    pub epoch: u64,
    /// Who owned it before it was revoked (only while `owner` is `None`)...
    pub released_by: Option<NodeId>,
    /// ...and the epoch it owned it at: until the partition is reassigned, that replica may still
    /// commit the completions of the deliveries it had in flight.
    #[serde(default)]
    pub released_epoch: u64,
}

/// Who fires which partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub slots: Vec<Slot>,
}

impl Default for Assignment {
    fn default() -> Self {
        Assignment {
            slots: vec![Slot::default(); PARTITIONS as usize],
        }
    }
}

impl Assignment {
    pub fn slot(&self, partition: u32) -> Slot {
        self.slots
            .get(partition as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Whether `from` owns `partition` at `epoch`, or owned it at `epoch` until a revocation
    /// that has not been followed by a new owner yet: the fence progress must pass.
    pub fn admits(&self, partition: u32, from: NodeId, epoch: u64) -> bool {
        let s = self.slot(partition);
        (s.owner == Some(from) && s.epoch == epoch)
            || (s.owner.is_none() && s.released_by == Some(from) && s.released_epoch == epoch)
    }

    /// The partitions `node` owns, with their epochs.
    pub fn owned_by(&self, node: NodeId) -> Vec<(u32, u64)> {
        (0..PARTITIONS)
            .filter_map(|p| {
                let s = self.slot(p);
                (s.owner == Some(node)).then_some((p, s.epoch))
            })
            .collect()
    }

    /// Applies one change of an `Assign` entry at log index `epoch`.
    pub fn assign(&mut self, partition: u32, owner: Option<NodeId>, epoch: u64) {
        if let Some(s) = self.slots.get_mut(partition as usize) {
            let (released_by, released_epoch) = match (owner, s.owner) {
                (Some(_), _) => (None, 0),
                (None, Some(prev)) => (Some(prev), s.epoch),
                (None, None) => (s.released_by, s.released_epoch),
            };
            *s = Slot {
                owner,
                epoch,
                released_by,
                released_epoch,
            };
        }
    }
}

/// What is kept beside the jobs, in tree `sm`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
    assignment: Assignment,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotData {
    assignment: Assignment,
    records: Records,
}

/// The scheduler state machine: jobs and partition assignment.
#[derive(Clone)]
pub struct StateMachine {
    meta: Arc<Mutex<Meta>>,
    store: Arc<JobStore>,
    /// Wakes the trigger loop after the jobs changed.
    engine: Arc<Mutex<Option<SchedulerHandle>>>,
    snapshot: SnapshotSlot,
    assignment: Arc<watch::Sender<Assignment>>,
    applied: Arc<watch::Sender<u64>>,
    trees: sled::Tree,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("applied", &*self.applied.borrow())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the data consistent: recover from a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn store_err(e: crate::store::StoreError) -> StorageError<NodeId> {
    write_err(std::io::Error::other(e.to_string()))
}

/// Opens a replica's Raft log and state machine in `db`. `durable: false` never flushes (tests).
pub fn open(db: sled::Db, durable: bool) -> Result<(LogStore, StateMachine), StorageError<NodeId>> {
    let log = LogStore::open(&db, durable)?;
    let store = Arc::new(
        JobStore::replicated(db.clone())
            .map_err(|e| read_err(std::io::Error::other(e.to_string())))?,
    );
    let trees = db.open_tree("sm").map_err(read_err)?;
    let meta: Meta = match trees.get("meta").map_err(read_err)? {
        Some(raw) => serde_json::from_slice(&raw).map_err(read_err)?,
        None => Meta::default(),
    };
    let snapshot = SnapshotSlot::open(&db, trees.clone(), "snapshot", durable)?;
    let applied = meta.last_applied.map_or(0, |l| l.index);
    let sm = StateMachine {
        assignment: Arc::new(watch::Sender::new(meta.assignment.clone())),
        applied: Arc::new(watch::Sender::new(applied)),
        meta: Arc::new(Mutex::new(meta)),
        store,
        engine: Arc::new(Mutex::new(None)),
        snapshot,
        trees,
    };
    Ok((log, sm))
}

impl StateMachine {
    /// The job store the state machine writes (and the trigger loop fires from).
    pub fn store(&self) -> &Arc<JobStore> {
        &self.store
    }

    /// Lets applied changes wake the trigger loop.
    pub fn set_engine(&self, handle: SchedulerHandle) {
        *lock(&self.engine) = Some(handle);
    }

    /// The assignment as last applied, and its changes.
    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.assignment.subscribe()
    }

    /// The index of the last applied entry.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the entry at `index` is applied here; false if it was not within `timeout`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }

    /// Applies one command at log index `index` (the whole effect of a normal entry).
    pub fn apply_command(
        &self,
        index: u64,
        cmd: &Command,
    ) -> Result<Applied, crate::store::StoreError> {
        Ok(match cmd {
            Command::Put { job, overwrite } => {
                Applied::Put(self.store.put_as((**job).clone(), *overwrite, index)?)
            }
            Command::Delete { key } => {
                Applied::Deleted(self.store.delete_local(&JobKey::from_bytes(key.clone()))?)
            }
            Command::Progress { from, parts } => {
                let (mut accepted, mut rejected) = (0, 0);
                let assignment = lock(&self.meta).assignment.clone();
                for part in parts {
                    let fenced_ok = assignment.admits(part.partition, *from, part.epoch);
                    for item in &part.items {
                        // An item is only ever sent under its own partition.
                        if fenced_ok && partition_of(&item.key) == part.partition {
                            self.store.apply_progress(item)?;
                            accepted += 1;
                        } else {
                            rejected += 1;
                        }
                    }
                }
                if rejected > 0 {
                    tracing::info!(
                        from,
                        rejected,
                        "tick completions from a stale partition owner rejected"
                    );
                }
                Applied::Progress { accepted, rejected }
            }
            Command::Assign { changes } => {
                let mut meta = lock(&self.meta);
                for (p, owner) in changes {
                    meta.assignment.assign(*p, *owner, index);
                }
                Applied::Assigned
            }
        })
    }

    fn save_meta(&self) -> Result<(), StorageError<NodeId>> {
        let raw = serde_json::to_vec(&*lock(&self.meta)).map_err(write_err)?;
        self.trees.insert("meta", raw).map_err(write_err)?;
        Ok(())
    }

    fn publish(&self) {
        let (assignment, applied) = {
            let m = lock(&self.meta);
            (m.assignment.clone(), m.last_applied.map_or(0, |l| l.index))
        };
        self.assignment.send_if_modified(|a| {
            let changed = *a != assignment;
            if changed {
                *a = assignment;
            }
            changed
        });
        self.applied.send_replace(applied);
        if let Some(h) = &*lock(&self.engine) {
            h.wake();
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (assignment, last_applied, last_membership) = {
            let m = lock(&self.meta);
            (
                m.assignment.clone(),
                m.last_applied,
                m.last_membership.clone(),
            )
        };
        let records = self.store.export().map_err(store_err)?;
        let data = serde_json::to_vec(&SnapshotData {
            assignment,
            records,
        })
        .map_err(write_err)?;
        self.snapshot
            .build(last_applied, last_membership, data)
            .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let m = lock(&self.meta);
        Ok((m.last_applied, m.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            let applied = match &e.payload {
                EntryPayload::Blank => Applied::Nothing,
                EntryPayload::Normal(cmd) => {
                    self.apply_command(e.log_id.index, cmd).map_err(store_err)?
                }
                EntryPayload::Membership(m) => {
                    lock(&self.meta).last_membership =
                        StoredMembership::new(Some(e.log_id), m.clone());
                    Applied::Nothing
                }
            };
            lock(&self.meta).last_applied = Some(e.log_id);
            out.push(applied);
        }
        // Written after the data it covers; not flushed (the log is): a crash replays from an
        // older index, and every command applies idempotently.
        self.save_meta()?;
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let state: SnapshotData = serde_json::from_slice(&data).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        self.store.import(state.records).map_err(store_err)?;
        {
            let mut m = lock(&self.meta);
            *m = Meta {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                assignment: state.assignment,
            };
        }
        self.save_meta()?;
        self.snapshot.keep(meta.clone(), data).await?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.snapshot.current())
    }
}

#[cfg(test)]
mod tests;
