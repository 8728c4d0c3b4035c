//! Fenced writes: a transaction that carries an activation epoch and is refused when the store
//! has already accepted a write from a newer epoch of the same actor.
//!
//! The fence is one record per actor (`<prefix>||__fence`) holding the highest epoch accepted so
//! far. A fenced transaction reads it, refuses if it is newer than ours, and otherwise commits the
//! caller's operations together with a conditional write of our epoch to the fence (ETag or
//! create-if-absent), all in one atomic [`StateStore::transact`]. If another writer changed the
//! fence in between, the condition fails, nothing is written, and we read again. So on every
//! backend that honours the [`StateStore`] contract, once a write of epoch `e` is accepted no
//! write of an epoch below `e` is.

use bytes::Bytes;

use super::{Concurrency, Op, SetOp, StateError, StateStore};

/// Why a fenced write failed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// A newer activation of this actor has written: this one is stale. Nothing was written.
    #[error(
        "stale activation: epoch {ours} is older than the epoch {stored} the store has accepted"
    )]
    Stale { ours: u64, stored: u64 },
    #[error(transparent)]
    State(#[from] StateError),
}

/// How many times a write retries when the fence moved under it without going past our epoch.
const ATTEMPTS: usize = 8;

fn parse_epoch(key: &str, value: &Bytes) -> Result<u64, StateError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| StateError::Backend(format!("fence record {key:?} is not an epoch")))
}

/// Commits `ops` atomically if no epoch newer than `epoch` has written under `fence_key`.
/// With no `ops` it only claims the fence (an activation does this before its first read), and
/// writes nothing if the fence already holds `epoch`.
pub async fn fenced_transact(
    store: &dyn StateStore,
    fence_key: &str,
    epoch: u64,
    ops: Vec<Op>,
) -> Result<(), FenceError> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let current = store.get(fence_key).await?;
        let etag = match &current {
            Some(item) => {
                let stored = parse_epoch(fence_key, &item.value)?;
                if stored > epoch {
                    return Err(FenceError::Stale {
                        ours: epoch,
                        stored,
                    });
                }
                // A claim the store already holds (an actor activated again under the same
                // epoch) has nothing to write: skip the durable write it would cost.
                if stored == epoch && ops.is_empty() {
                    return Ok(());
                }
                Some(item.etag.clone())
            }
            None => None,
        };
        let mut all = Vec::with_capacity(ops.len() + 1);
        all.push(Op::Set(SetOp {
            key: fence_key.to_string(),
            value: Bytes::from(epoch.to_string()),
            etag,
            concurrency: Concurrency::FirstWrite,
            ttl: None,
        }));
        all.extend(ops.iter().cloned());
        match store.transact(all).await {
            Ok(()) => return Ok(()),
            Err(StateError::EtagMismatch { key, reason }) if key == fence_key => {
                last = Some(StateError::EtagMismatch { key, reason });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last
        .unwrap_or_else(|| StateError::Backend("fence contention".into()))
        .into())
}
