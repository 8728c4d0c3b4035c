//! `state.sled`: the embedded default store.
//!
//! Layout: tree `state` maps a key to `[etag u64 BE][expires_at_ms i64 BE, 0 = never][value]`;
//! tree `ttl` maps `[expires_at_ms i64 BE][key]` to nothing, so expired keys can be swept in
//! order without scanning the data. Every write is a sled transaction over both trees.
//!
//! Durability: sled only fsyncs every 500 ms by itself, so a write is acknowledged only after a
//! flush that started after it. [`GroupCommit`] lets all writers that arrive while one flush runs
//! share the next one, so 64 concurrent writers cost about one fsync per batch instead of 64.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use tokio::sync::{watch, Notify};

use super::{expiry_ms, now_ms, parse_etags, Concurrency, Op, StateError, StateItem, StateStore};

const HEADER: usize = 16;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The embedded state store.
pub struct SledStore {
    db: sled::Db,
    data: sled::Tree,
    ttl: sled::Tree,
    commit: Arc<GroupCommit>,
    _sweeper: Arc<()>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. Must be called inside a tokio runtime.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StateError::Backend(format!("cannot create data directory {}: {e}", dir.display()))
        })?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(32 * 1024 * 1024)
            .open()
            .map_err(|e| StateError::Backend(format!("cannot open sled store in {}: {e}", dir.display())))?;
        let data = db.open_tree("state").map_err(StateError::backend)?;
        let ttl = db.open_tree("ttl").map_err(StateError::backend)?;
        let commit = GroupCommit::start(db.clone());
        let sweeper = Arc::new(());
        spawn_sweeper(Arc::downgrade(&sweeper), data.clone(), ttl.clone(), commit.clone());
        Ok(SledStore { db, data, ttl, commit, _sweeper: sweeper })
    }

    /// Number of live and not-yet-swept keys (for tests and metrics).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Size of the database on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.commit.close();
    }
}

struct Stored<'a> {
    etag: u64,
    expires_at_ms: i64,
    value: &'a [u8],
}

fn decode(raw: &[u8]) -> Result<Stored<'_>, StateError> {
    if raw.len() < HEADER {
        return Err(StateError::Backend("corrupt record in sled store".into()));
    }
    let etag = u64::from_be_bytes(raw[0..8].try_into().expect("8 bytes"));
    let expires_at_ms = i64::from_be_bytes(raw[8..16].try_into().expect("8 bytes"));
    Ok(Stored { etag, expires_at_ms, value: &raw[HEADER..] })
}

fn encode(etag: u64, expires_at_ms: i64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + value.len());
    v.extend_from_slice(&etag.to_be_bytes());
    v.extend_from_slice(&expires_at_ms.to_be_bytes());
    v.extend_from_slice(value);
    v
}

fn ttl_key(expires_at_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&expires_at_ms.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn live(s: &Stored<'_>, now: i64) -> bool {
    s.expires_at_ms == 0 || s.expires_at_ms > now
}

type TxResult<T> = Result<T, ConflictableTransactionError<StateError>>;

fn abort<T>(e: StateError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// Applies one operation inside a transaction.
fn apply(
    data: &TransactionalTree,
    ttl: &TransactionalTree,
    op: &Op,
    etag: Option<u64>,
    expires_at_ms: i64,
    now: i64,
) -> TxResult<()> {
    let key = op.key().as_bytes();
    let raw = data.get(key)?;
    let current = match raw.as_deref().map(decode).transpose() {
        Ok(c) => c,
        Err(e) => return abort(e),
    };
    let live_etag = current.as_ref().filter(|c| live(c, now)).map(|c| c.etag);
    let mismatch = |reason| StateError::EtagMismatch { key: op.key().to_string(), reason };
    match (etag, live_etag) {
        (Some(want), Some(have)) if want == have => {}
        (Some(_), Some(_)) => return abort(mismatch("the etag does not match the stored one")),
        (Some(_), None) => return abort(mismatch("the key does not exist")),
        (None, Some(_)) if matches!(op, Op::Set(s) if s.concurrency == Concurrency::FirstWrite) => {
            return abort(mismatch("first-write: the key already exists"))
        }
        (None, _) => {}
    }
    if let Some(c) = current.as_ref().filter(|c| c.expires_at_ms != 0) {
        ttl.remove(ttl_key(c.expires_at_ms, key))?;
    }
    match op {
        Op::Set(s) => {
            // Strictly newer than anything this key had, so an old etag can never match again.
            let fresh = current.as_ref().map_or(0, |c| c.etag).max(data.generate_id()?) + 1;
            data.insert(key, encode(fresh, expires_at_ms, &s.value))?;
            if expires_at_ms != 0 {
                ttl.insert(ttl_key(expires_at_ms, key), &[][..])?;
            }
        }
        Op::Delete(_) => {
            data.remove(key)?;
        }
    }
    Ok(())
}

#[async_trait]
impl StateStore for SledStore {
    async fn get(&self, key: &str) -> Result<Option<StateItem>, StateError> {
        let Some(raw) = self.data.get(key.as_bytes()).map_err(StateError::backend)? else {
            return Ok(None);
        };
        let s = decode(&raw)?;
        if !live(&s, now_ms()) {
            return Ok(None);
        }
        Ok(Some(StateItem {
            value: Bytes::copy_from_slice(s.value),
            etag: s.etag.to_string(),
            expires_at_ms: (s.expires_at_ms != 0).then_some(s.expires_at_ms),
        }))
    }

    async fn transact(&self, ops: Vec<Op>) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        let etags = parse_etags(&ops)?;
        let expiries: Vec<i64> = ops
            .iter()
            .map(|op| match op {
                Op::Set(s) => expiry_ms(s.ttl).unwrap_or(0),
                Op::Delete(_) => 0,
            })
            .collect();
        let now = now_ms();
        let result = (&self.data, &self.ttl).transaction(|(data, ttl)| {
            for ((op, etag), exp) in ops.iter().zip(&etags).zip(&expiries) {
                apply(data, ttl, op, *etag, *exp, now)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => self.commit.durable().await,
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StateError::backend(e)),
        }
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

/// Removes expired keys in expiry order, once a second, until the store is dropped.
fn spawn_sweeper(alive: Weak<()>, data: sled::Tree, ttl: sled::Tree, commit: Arc<GroupCommit>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.upgrade().is_none() {
                return;
            }
            let now = now_ms();
            let mut swept = 0usize;
            for entry in ttl.range(..ttl_key(now + 1, b"")) {
                let Ok((tk, _)) = entry else { break };
                let key = &tk[8..];
                let res = (&data, &ttl).transaction(|(d, t)| {
                    if let Some(raw) = d.get(key)? {
                        if let Ok(s) = decode(&raw) {
                            if s.expires_at_ms != 0 && s.expires_at_ms <= now {
                                d.remove(key)?;
                            }
                        }
                    }
                    t.remove(&tk)?;
                    Ok::<_, ConflictableTransactionError<()>>(())
                });
                if res.is_ok() {
                    swept += 1;
                }
            }
            if swept > 0 {
                // Not needed for correctness (expired keys read as absent), but keeps the
                // on-disk view in step with what readers see.
                let _ = commit.durable().await;
                tracing::debug!(swept, "swept expired keys");
            }
        }
    });
}

/// Batches flushes: a writer asks for durability and waits until a flush that began after its
/// write has finished. One background task runs the flushes back to back.
pub struct GroupCommit {
    requested: AtomicU64,
    done: watch::Sender<(u64, Option<Arc<str>>)>,
    wake: Notify,
    closed: AtomicBool,
}

impl GroupCommit {
    fn start(db: sled::Db) -> Arc<Self> {
        let gc = Arc::new(GroupCommit {
            requested: AtomicU64::new(0),
            done: watch::Sender::new((0, None)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let me = gc.clone();
        tokio::spawn(async move {
            loop {
                me.wake.notified().await;
                if me.closed.load(Ordering::Acquire) {
                    // Last flush so that nothing acknowledged depends on the 500 ms window.
                    let _ = tokio::task::spawn_blocking(move || db.flush()).await;
                    return;
                }
                let upto = me.requested.load(Ordering::Acquire);
                if upto <= me.done.borrow().0 {
                    continue;
                }
                let db2 = db.clone();
                let res = tokio::task::spawn_blocking(move || db2.flush()).await;
                let err = match res {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(Arc::from(format!("fsync failed: {e}"))),
                    Err(e) => Some(Arc::from(format!("fsync task failed: {e}"))),
                };
                if let Some(e) = &err {
                    tracing::error!(error = %e, "sled flush failed");
                }
                me.done.send_replace((upto, err));
            }
        });
        gc
    }

    /// Returns once everything written before this call is on disk.
    pub async fn durable(&self) -> Result<(), StateError> {
        let seq = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let mut rx = self.done.subscribe();
        self.wake.notify_one();
        let state = rx
            .wait_for(|(done, _)| *done >= seq)
            .await
            .map_err(|_| StateError::Backend("store closed before the write was flushed".into()))?;
        match &state.1 {
            None => Ok(()),
            Some(e) => Err(StateError::Backend(e.to_string())),
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}
