//! Raft storage for the placement service, on sled: the log store ([`LogStore`], the shared
//! [`crate::raft_log`]) and the membership state machine ([`StateMachine`]) that openraft drives
//! (storage-v2 traits).
//!
//! - The state machine lives in memory (a few hundred bytes per host) and is snapshotted as JSON
//!   into tree `snapshot`; on start it is restored from the snapshot and openraft re-applies the
//!   log after it.
//! - Every applied change that alters the membership bumps the table version and publishes the
//!   new table on a watch channel, on every replica.

// openraft's storage traits fix the error type (`StorageError`, ~200 bytes); our helpers return
// the same type so `?` carries it through unchanged.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use crate::raft_log::NodeId;
use crate::raft_log::{io_err, read_err, write_err, SnapshotSlot};
use crate::ring::{HostEntry, Table};
use crate::TypeConfig;

/// A change to the membership, as committed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Add or update hosts and remove others, in one version.
    Change {
        upsert: Vec<HostEntry>,
        remove: Vec<String>,
    },
}

/// What applying a request produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The table version after the request.
    pub version: u64,
}

/// The replicated membership: hosts by name and the table version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub version: u64,
    pub hosts: BTreeMap<String, HostEntry>,
}

impl Membership {
    /// Applies a request; bumps the version only if something changed.
    pub fn apply(&mut self, req: &Request) -> bool {
        let Request::Change { upsert, remove } = req;
        let mut changed = false;
        for name in remove {
            changed |= self.hosts.remove(name).is_some();
        }
        for h in upsert {
            if self.hosts.get(&h.name) != Some(h) {
                self.hosts.insert(h.name.clone(), h.clone());
                changed = true;
            }
        }
        if changed {
            self.version += 1;
        }
        changed
    }

    pub fn table(&self) -> Table {
        Table {
            version: self.version,
            hosts: self.hosts.values().cloned().collect(),
        }
    }
}

/// Opens the trees of one replica's storage.
pub fn open(
    dir: &std::path::Path,
) -> Result<(LogStore, StateMachine, watch::Receiver<Table>), StorageError<NodeId>> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(16 << 20)
        .open()
        .map_err(read_err)?;
    open_db(db, true)
}

/// Opens the trees in an already open database. `durable: false` skips flushes: for an in-memory
/// database in a simulation, where the database outlives a simulated crash and so models a disk
/// that never loses a write.
pub fn open_db(
    db: sled::Db,
    durable: bool,
) -> Result<(LogStore, StateMachine, watch::Receiver<Table>), StorageError<NodeId>> {
    let log = LogStore::open(&db, durable)?;
    let snapshot = SnapshotSlot::open(
        &db,
        db.open_tree("snapshot").map_err(read_err)?,
        "current",
        durable,
    )?;
    let sm: SmState = match snapshot.stored() {
        Some(stored) => serde_json::from_slice(&stored.data).map_err(read_err)?,
        None => SmState::default(),
    };
    let (tx, rx) = watch::channel(sm.membership.table());
    let machine = StateMachine {
        inner: Arc::new(Mutex::new(sm)),
        snapshot,
        table: Arc::new(tx),
    };
    Ok((log, machine, rx))
}

/// The Raft log of a placement replica.
pub type LogStore = crate::raft_log::LogStore<TypeConfig>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmState {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, openraft::BasicNode>,
    membership: Membership,
}

/// The membership state machine.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<SmState>>,
    snapshot: SnapshotSlot,
    table: Arc<watch::Sender<Table>>,
}

impl StateMachine {
    /// The current membership (for metrics and `/placement/state`).
    pub fn membership(&self) -> Membership {
        self.inner.lock().expect("sm lock").membership.clone()
    }

    /// One host's entry, without copying the whole membership.
    pub fn host(&self, name: &str) -> Option<HostEntry> {
        self.inner
            .lock()
            .expect("sm lock")
            .membership
            .hosts
            .get(name)
            .cloned()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (data, last_applied, last_membership) = {
            let sm = self.inner.lock().expect("sm lock");
            (
                serde_json::to_vec(&*sm).map_err(write_err)?,
                sm.last_applied,
                sm.last_membership.clone(),
            )
        };
        self.snapshot
            .build(last_applied, last_membership, data)
            .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        StorageError<NodeId>,
    > {
        let sm = self.inner.lock().expect("sm lock");
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut changed = false;
        let table = {
            let mut sm = self.inner.lock().expect("sm lock");
            for e in entries {
                sm.last_applied = Some(e.log_id);
                match &e.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(req) => changed |= sm.membership.apply(req),
                    EntryPayload::Membership(m) => {
                        sm.last_membership = StoredMembership::new(Some(e.log_id), m.clone())
                    }
                }
                out.push(Response {
                    version: sm.membership.version,
                });
            }
            changed.then(|| sm.membership.table())
        };
        if let Some(t) = table {
            self.table.send_replace(t);
        }
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
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let state: SmState = serde_json::from_slice(&data).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        let table = state.membership.table();
        {
            let mut sm = self.inner.lock().expect("sm lock");
            *sm = SmState {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                membership: state.membership,
            };
        }
        self.snapshot.keep(meta.clone(), data).await?;
        // Versions only grow: a snapshot never carries an older table than one already applied.
        self.table.send_if_modified(|t| {
            if table.version > t.version {
                *t = table;
                true
            } else {
                false
            }
        });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.snapshot.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, types: &[&str]) -> HostEntry {
        HostEntry {
            name: name.into(),
            app_id: "app".into(),
            actor_types: types.iter().map(|s| s.to_string()).collect(),
            namespace: "default".into(),
        }
    }

    #[test]
    fn versions_bump_only_on_change() {
        let mut m = Membership::default();
        assert!(m.apply(&Request::Change {
            upsert: vec![host("a", &["t"])],
            remove: vec![]
        }));
        assert_eq!(m.version, 1);
        assert!(!m.apply(&Request::Change {
            upsert: vec![host("a", &["t"])],
            remove: vec!["zz".into()]
        }));
        assert_eq!(m.version, 1);
        assert!(m.apply(&Request::Change {
            upsert: vec![host("b", &[])],
            remove: vec!["a".into()]
        }));
        assert_eq!(m.version, 2);
        assert_eq!(m.table().hosts.len(), 1);
    }
}
