//! The state-store contract every backend implements, and the helpers they share.
//!
//! # Semantics (the same on every backend; `tests/conformance.rs` checks them)
//! - A successful write gives the key a fresh ETag, so a delete followed by a re-create does not
//!   bring an old ETag back (no ABA): sled issues strictly growing ones, Redis and PostgreSQL
//!   random 53-bit ones (a repeat is a 1-in-2^53 chance).
//! - `Set` with an ETag succeeds only if the key exists (and has not expired) with that ETag.
//! - `Set` without an ETag under [`Concurrency::FirstWrite`] is an atomic create-if-absent: of two
//!   concurrent creates of one key exactly one wins. Under `LastWrite` it is unconditional.
//! - `Delete` with an ETag succeeds only if the key exists with that ETag; without one it is
//!   unconditional and deleting an absent key succeeds.
//! - [`StateStore::transact`] applies its operations in order, all or nothing: if one condition
//!   fails, nothing is written.
//! - Expired keys are absent for every purpose (reads, ETag checks, first-write creates).
//! - When a write returns `Ok`, it is durable as far as the backend offers durability.

pub mod fence;
pub mod postgres;
pub mod redis;
pub mod sled;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

/// A stored value with its concurrency token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateItem {
    /// The stored bytes (the sidecar stores the JSON encoding of the value).
    pub value: Bytes,
    /// Opaque concurrency token; every backend uses the decimal form of a `u64`.
    pub etag: String,
    /// When the item expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<i64>,
}

/// Dapr's `options.concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    /// A write without an ETag creates the key only if it is absent.
    FirstWrite,
    /// A write without an ETag overwrites whatever is there.
    #[default]
    LastWrite,
}

/// Upsert one key.
#[derive(Debug, Clone)]
pub struct SetOp {
    pub key: String,
    pub value: Bytes,
    pub etag: Option<String>,
    pub concurrency: Concurrency,
    /// Time to live; `None` keeps the item until it is deleted.
    pub ttl: Option<Duration>,
}

/// Delete one key.
#[derive(Debug, Clone)]
pub struct DeleteOp {
    pub key: String,
    pub etag: Option<String>,
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Set(SetOp),
    Delete(DeleteOp),
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Set(s) => &s.key,
            Op::Delete(d) => &d.key,
        }
    }
}

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ETag condition (or a first-write create) did not hold. Nothing was written.
    #[error("possible etag mismatch for key {key:?}: {reason}")]
    EtagMismatch { key: String, reason: &'static str },
    /// The ETag is not one this store could have issued.
    #[error(
        "invalid etag {etag:?} for key {key:?}: etags are decimal numbers issued by the store"
    )]
    InvalidEtag { key: String, etag: String },
    /// The backend failed (connection, I/O, corruption). The write may or may not have happened
    /// only where the backend itself cannot tell (e.g. a lost connection during commit).
    #[error("{0}")]
    Backend(String),
}

impl StateError {
    pub fn backend(e: impl std::fmt::Display) -> Self {
        StateError::Backend(e.to_string())
    }
}

/// Capabilities reported by `GET /v1.0/metadata`, named as Dapr names them.
pub const FEATURES: &[&str] = &["ETAG", "TRANSACTIONAL", "TTL"];

/// A key-value state store with ETags, TTLs and atomic multi-key transactions.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Reads one key; `None` when absent or expired.
    async fn get(&self, key: &str) -> Result<Option<StateItem>, StateError>;

    /// Reads many keys; the answer has one entry per key, in order.
    async fn bulk_get(&self, keys: &[String]) -> Result<Vec<Option<StateItem>>, StateError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k).await?);
        }
        Ok(out)
    }

    /// Applies all operations atomically and in order, or none of them.
    async fn transact(&self, ops: Vec<Op>) -> Result<(), StateError>;

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), StateError>;
}

/// Parses an ETag issued by one of our stores.
pub fn parse_etag(key: &str, etag: &str) -> Result<u64, StateError> {
    etag.parse::<u64>().map_err(|_| StateError::InvalidEtag {
        key: key.to_string(),
        etag: etag.to_string(),
    })
}

/// Validates every ETag of a batch before anything is sent to a backend.
pub fn parse_etags(ops: &[Op]) -> Result<Vec<Option<u64>>, StateError> {
    ops.iter()
        .map(|op| {
            let etag = match op {
                Op::Set(s) => s.etag.as_deref(),
                Op::Delete(d) => d.etag.as_deref(),
            };
            etag.map(|e| parse_etag(op.key(), e)).transpose()
        })
        .collect()
}

/// A fresh ETag: random, non-zero and below 2^53 so that JavaScript clients keep it exact.
pub fn fresh_etag() -> u64 {
    rand::random_range(1..(1u64 << 53))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Absolute expiry for a TTL starting now.
pub fn expiry_ms(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|d| now_ms().saturating_add(d.as_millis().min(i64::MAX as u128) as i64))
}
