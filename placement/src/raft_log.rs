//! The Raft log on sled, shared by every Raft group in Tessera (the placement replicas and the
//! scheduler replicas): openraft's storage-v2 [`RaftLogStorage`], generic over the type
//! configuration, plus what their state machines share: the storage-error helpers and the
//! [`SnapshotSlot`] that keeps a state machine's latest snapshot.
//!
//! - Tree `log`: entry index (u64 BE) -> JSON entry. Tree `meta`: the vote, the last purged log
//!   id and the committed log id. Every change (but the committed id) is flushed before openraft
//!   is told it is done; with `durable: false` (simulations on an in-memory database) nothing is.
//! - One insert per entry, never a sled batch (a batch takes a process-wide lock that sled's flush
//!   holds), so a crash leaves a prefix of an append, never a hole.

// openraft's storage traits fix the error type (`StorageError`, ~200 bytes); our helpers return
// the same type so `?` carries it through unchanged.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, RaftTypeConfig,
    StorageError, StorageIOError, Vote,
};
use serde::{Deserialize, Serialize};

/// Replica ids in every Tessera Raft group.
pub type NodeId = u64;

/// A storage error about `subject`.
pub fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// A failed read of the store.
pub fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Read, e)
}

/// A failed write to the store.
pub fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Write, e)
}

/// The metadata of a snapshot of a state machine that has applied up to `last_applied`, with an
/// id unique to this build of it.
pub fn snapshot_meta(
    last_applied: Option<LogId<NodeId>>,
    last_membership: openraft::StoredMembership<NodeId, openraft::BasicNode>,
) -> openraft::SnapshotMeta<NodeId, openraft::BasicNode> {
    let nonce = crate::runtime::random_u64() as u32;
    let snapshot_id = match last_applied {
        Some(l) => format!("{}-{}-{nonce}", l.leader_id, l.index),
        None => format!("empty-{nonce}"),
    };
    openraft::SnapshotMeta {
        last_log_id: last_applied,
        last_membership,
        snapshot_id,
    }
}

/// A state machine's latest snapshot as it is persisted: its metadata and the serialized state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: openraft::SnapshotMeta<NodeId, openraft::BasicNode>,
    pub data: Vec<u8>,
}

/// Where a state machine keeps its latest snapshot: one key of a sled tree (flushed when
/// `durable`), and a copy in memory for `get_current_snapshot`.
#[derive(Clone)]
pub struct SnapshotSlot {
    db: sled::Db,
    tree: sled::Tree,
    key: &'static str,
    durable: bool,
    current: std::sync::Arc<std::sync::Mutex<Option<StoredSnapshot>>>,
}

impl SnapshotSlot {
    /// Opens the slot at `key` of `tree`, reading the snapshot stored there, if any.
    pub fn open(
        db: &sled::Db,
        tree: sled::Tree,
        key: &'static str,
        durable: bool,
    ) -> Result<Self, StorageError<NodeId>> {
        let current = match tree.get(key).map_err(read_err)? {
            Some(raw) => Some(serde_json::from_slice(&raw).map_err(read_err)?),
            None => None,
        };
        Ok(SnapshotSlot {
            db: db.clone(),
            tree,
            key,
            durable,
            current: std::sync::Arc::new(std::sync::Mutex::new(current)),
        })
    }

    /// The snapshot read at open or kept since.
    pub fn stored(&self) -> Option<StoredSnapshot> {
        self.current.lock().expect("snapshot lock").clone()
    }

    /// Persists a snapshot (built here or installed from the leader) and makes it the current one.
    pub async fn keep(
        &self,
        meta: openraft::SnapshotMeta<NodeId, openraft::BasicNode>,
        data: Vec<u8>,
    ) -> Result<(), StorageError<NodeId>> {
        let stored = StoredSnapshot { meta, data };
        let raw = serde_json::to_vec(&stored).map_err(write_err)?;
        self.tree.insert(self.key, raw).map_err(write_err)?;
        flush(&self.db, self.durable).await?;
        *self.current.lock().expect("snapshot lock") = Some(stored);
        Ok(())
    }

    /// `build_snapshot`'s end: keeps the snapshot of `data` taken at `last_applied` and returns it.
    pub async fn build<C>(
        &self,
        last_applied: Option<LogId<NodeId>>,
        last_membership: openraft::StoredMembership<NodeId, openraft::BasicNode>,
        data: Vec<u8>,
    ) -> Result<openraft::Snapshot<C>, StorageError<NodeId>>
    where
        C: RaftTypeConfig<
            NodeId = NodeId,
            Node = openraft::BasicNode,
            SnapshotData = std::io::Cursor<Vec<u8>>,
        >,
    {
        let meta = snapshot_meta(last_applied, last_membership);
        self.keep(meta.clone(), data.clone()).await?;
        Ok(openraft::Snapshot {
            meta,
            snapshot: Box::new(std::io::Cursor::new(data)),
        })
    }

    /// `get_current_snapshot`.
    pub fn current<C>(&self) -> Option<openraft::Snapshot<C>>
    where
        C: RaftTypeConfig<
            NodeId = NodeId,
            Node = openraft::BasicNode,
            SnapshotData = std::io::Cursor<Vec<u8>>,
        >,
    {
        self.stored().map(|s| openraft::Snapshot {
            meta: s.meta,
            snapshot: Box::new(std::io::Cursor::new(s.data)),
        })
    }
}

/// Flushes `db` when `durable`.
pub async fn flush(db: &sled::Db, durable: bool) -> Result<(), StorageError<NodeId>> {
    if durable {
        db.flush_async().await.map_err(write_err)?;
    }
    Ok(())
}

/// The Raft log of one replica, in trees `log` and `meta` of its sled database.
pub struct LogStore<C> {
    durable: bool,
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    _types: PhantomData<fn() -> C>,
}

impl<C> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            durable: self.durable,
            db: self.db.clone(),
            log: self.log.clone(),
            meta: self.meta.clone(),
            _types: PhantomData,
        }
    }
}

impl<C> LogStore<C> {
    /// The log in `db`. `durable: false` skips flushes: for an in-memory database in a
    /// simulation, where the database outlives a simulated crash and so models a disk that never
    /// loses a write.
    pub fn open(db: &sled::Db, durable: bool) -> Result<Self, StorageError<NodeId>> {
        Ok(LogStore {
            durable,
            db: db.clone(),
            log: db.open_tree("log").map_err(read_err)?,
            meta: db.open_tree("meta").map_err(read_err)?,
            _types: PhantomData,
        })
    }

    fn meta_get<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(read_err)?)),
        }
    }

    async fn meta_put<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StorageError<NodeId>> {
        self.meta
            .insert(key, serde_json::to_vec(v).map_err(write_err)?)
            .map_err(write_err)?;
        flush(&self.db, self.durable).await?;
        Ok(())
    }

    /// Removes the log entries whose keys fall in `range`, then flushes.
    async fn remove_entries(
        &self,
        range: impl RangeBounds<[u8; 8]>,
    ) -> Result<(), StorageError<NodeId>> {
        let keys: Vec<_> = self
            .log
            .range(range)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(write_err)?;
        for k in keys {
            self.log.remove(k).map_err(write_err)?;
        }
        flush(&self.db, self.durable).await
    }
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = NodeId, Entry = Entry<C>>,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, StorageError<NodeId>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.log.range(start.to_be_bytes()..) {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| read_err(std::io::Error::other("bad log key")))?,
            );
            if !range.contains(&idx) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = NodeId, Entry = Entry<C>>,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.meta_get("last_purged")?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, v)) => Some(
                serde_json::from_slice::<Entry<C>>(&v)
                    .map_err(read_err)?
                    .log_id,
            ),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.meta_put("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta_get("vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not flushed: losing it only means re-applying a little more after a crash.
        self.meta
            .insert(
                "committed",
                serde_json::to_vec(&committed).map_err(write_err)?,
            )
            .map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .meta_get::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        for e in entries {
            self.log
                .insert(
                    e.log_id.index.to_be_bytes(),
                    serde_json::to_vec(&e).map_err(write_err)?,
                )
                .map_err(write_err)?;
        }
        // Not awaited at all when not durable: in a simulation, waiting on sled's IO threads would
        // let real time decide where in simulated time the write completes.
        let res = if self.durable {
            self.db
                .flush_async()
                .await
                .map(drop)
                .map_err(std::io::Error::other)
        } else {
            Ok(())
        };
        let failed = res.is_err();
        callback.log_io_completed(res);
        if failed {
            return Err(write_err(std::io::Error::other("log flush failed")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.remove_entries(log_id.index.to_be_bytes()..).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.meta_put("last_purged", &log_id).await?;
        self.remove_entries(..=log_id.index.to_be_bytes()).await
    }
}
