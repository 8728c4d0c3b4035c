//! `state.sled`: the embedded default store.
//!
//! Layout: tree `state` maps a key to `[etag u64 BE][expires_at_ms i64 BE, 0 = never][value]`;
//! tree `ttl` maps `[expires_at_ms i64 BE][key]` to nothing, so expired keys can be swept in
//! order without scanning the data.
//!
//! Durability and atomicity come from the write-ahead log in [`wal`]: a transaction is decided
//! under the log's lock, logged, synced together with its concurrent neighbours (group commit),
//! applied to sled in log order, and only then acknowledged. Opening the store replays whatever
//! log a crash left behind.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{expiry_ms, now_ms, parse_etags, Concurrency, Op, StateError, StateItem, StateStore};

mod wal;

const HEADER: usize = 16;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The embedded state store.
pub struct SledStore {
    target: Arc<SledTarget>,
    wal: Arc<wal::Wal<SledTarget>>,
    _alive: Arc<()>,
}

/// The sled trees the log writes through to.
struct SledTarget {
    db: sled::Db,
    data: sled::Tree,
    ttl: sled::Tree,
}

impl wal::Target for SledTarget {
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .data
            .get(key)
            .map_err(StateError::backend)?
            .map(|v| v.to_vec()))
    }

    fn apply(&self, key: &[u8], post: Option<&[u8]>) -> Result<(), StateError> {
        let old = match post {
            Some(raw) => self.data.insert(key, raw),
            None => self.data.remove(key),
        }
        .map_err(StateError::backend)?;
        // The expiry index only steers the sweeper, which re-checks the record itself.
        if let Some(exp) = old
            .as_deref()
            .and_then(|o| decode(o).ok())
            .map(|o| o.expires_at_ms)
            .filter(|e| *e != 0)
        {
            self.ttl
                .remove(ttl_key(exp, key))
                .map_err(StateError::backend)?;
        }
        if let Some(exp) = post
            .and_then(|p| decode(p).ok())
            .map(|p| p.expires_at_ms)
            .filter(|e| *e != 0)
        {
            self.ttl
                .insert(ttl_key(exp, key), &[][..])
                .map_err(StateError::backend)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StateError> {
        self.db.flush().map(drop).map_err(StateError::backend)
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, replaying any log a crash left. Must be called
    /// inside a tokio runtime.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StateError::Backend(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(32 * 1024 * 1024)
            .open()
            .map_err(|e| {
                StateError::Backend(format!("cannot open sled store in {}: {e}", dir.display()))
            })?;
        let data = db.open_tree("state").map_err(StateError::backend)?;
        let ttl = db.open_tree("ttl").map_err(StateError::backend)?;
        let target = Arc::new(SledTarget { db, data, ttl });
        let (wal, replayed) = wal::Wal::open(&dir.join("wal"), target.clone())?;
        if replayed > 0 {
            tracing::info!(records = replayed, dir = %dir.display(), "replayed the write-ahead log");
        }
        let alive = Arc::new(());
        spawn_sweeper(
            Arc::downgrade(&alive),
            target.data.clone(),
            target.ttl.clone(),
        );
        wal::spawn_checkpointer(Arc::downgrade(&alive), wal.clone());
        Ok(SledStore {
            target,
            wal,
            _alive: alive,
        })
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.wal.close();
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
    Ok(Stored {
        etag,
        expires_at_ms,
        value: &raw[HEADER..],
    })
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

/// Checks one operation against the key's current raw record and returns its post-image.
fn decide(
    op: &Op,
    current: Option<&[u8]>,
    etag: Option<u64>,
    expires_at_ms: i64,
    now: i64,
    next_id: u64,
) -> Result<Option<Vec<u8>>, StateError> {
    let current = current.map(decode).transpose()?;
    let live_etag = current.as_ref().filter(|c| live(c, now)).map(|c| c.etag);
    let mismatch = |reason| StateError::EtagMismatch {
        key: op.key().to_string(),
        reason,
    };
    match (etag, live_etag) {
        (Some(want), Some(have)) if want == have => {}
        (Some(_), Some(_)) => return Err(mismatch("the etag does not match the stored one")),
        (Some(_), None) => return Err(mismatch("the key does not exist")),
        (None, Some(_)) if matches!(op, Op::Set(s) if s.concurrency == Concurrency::FirstWrite) => {
            return Err(mismatch("first-write: the key already exists"))
        }
        (None, _) => {}
    }
    Ok(match op {
        // Strictly newer than anything this key had, so an old etag can never match again.
        Op::Set(s) => Some(encode(
            current.as_ref().map_or(0, |c| c.etag).max(next_id) + 1,
            expires_at_ms,
            &s.value,
        )),
        Op::Delete(_) => None,
    })
}

#[async_trait]
impl StateStore for SledStore {
    async fn get(&self, key: &str) -> Result<Option<StateItem>, StateError> {
        // Reads and rejected writes finish without awaiting anything; the budget makes a caller
        // that loops on them yield, so the syncer that applies pending writes always gets to run.
        tokio::task::consume_budget().await;
        let Some(raw) = self
            .target
            .data
            .get(key.as_bytes())
            .map_err(StateError::backend)?
        else {
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
        tokio::task::consume_budget().await;
        if ops.is_empty() {
            return Ok(());
        }
        let etags = parse_etags(&ops)?;
        let now = now_ms();
        let seq = self.wal.submit(|view| {
            // Later operations of the transaction see the earlier ones.
            let mut mine: HashMap<&str, Option<Vec<u8>>> = HashMap::new();
            let mut posts = Vec::with_capacity(ops.len());
            for (op, etag) in ops.iter().zip(&etags) {
                let current = match mine.get(op.key()) {
                    Some(c) => c.clone(),
                    None => view(op.key().as_bytes())?,
                };
                let exp = match op {
                    Op::Set(s) => expiry_ms(s.ttl).unwrap_or(0),
                    Op::Delete(_) => 0,
                };
                let next_id = self.target.db.generate_id().map_err(StateError::backend)?;
                let post = decide(op, current.as_deref(), *etag, exp, now, next_id)?;
                mine.insert(op.key(), post.clone());
                posts.push((op.key().as_bytes().to_vec(), post));
            }
            Ok(posts)
        })?;
        self.wal.durable(seq).await
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

/// Removes expired keys in expiry order, once a second, until the store is dropped. Sweeps are
/// not logged: a swept key that comes back after a crash is still expired and reads as absent.
fn spawn_sweeper(alive: Weak<()>, data: sled::Tree, ttl: sled::Tree) {
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
                if let Ok(Some(raw)) = data.get(key) {
                    if decode(&raw).is_ok_and(|s| s.expires_at_ms != 0 && s.expires_at_ms <= now) {
                        // Only if nobody rewrote the key meanwhile.
                        if let Ok(Ok(())) = data.compare_and_swap(key, Some(&raw), None::<&[u8]>) {
                            swept += 1;
                        }
                    }
                }
                let _ = ttl.remove(&tk);
            }
            if swept > 0 {
                tracing::debug!(swept, "swept expired keys");
            }
        }
    });
}
