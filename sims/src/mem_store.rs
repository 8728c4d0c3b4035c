//! An in-memory [`StateStore`] that every simulated host shares: it stands for an external Redis
//! that all hosts reach. It keeps the contract of `components/src/state/mod.rs` (fresh ETags on
//! every write, ETag conditions, first-write create-if-absent, ordered all-or-nothing
//! transactions, TTL on the simulated clock) and tells an observer about every committed
//! transaction, in commit order, so the actor simulation's oracles see exactly what the store
//! accepted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use components::state::{parse_etags, Concurrency, Op, StateError, StateItem, StateStore};

/// Sees each committed transaction: the writer's name and the operations, in order.
pub type Observer = Arc<dyn Fn(&str, &[Op]) + Send + Sync>;

#[derive(Clone)]
struct Entry {
    value: bytes::Bytes,
    etag: u64,
    /// Milliseconds of simulated time.
    expires_at_ms: Option<i64>,
}

#[derive(Default)]
struct Data {
    items: BTreeMap<String, Entry>,
    /// ETags grow strictly, so a re-created key never gets an old ETag back.
    next_etag: u64,
}

/// The shared store.
pub struct MemStore {
    data: Mutex<Data>,
    observer: Option<Observer>,
}

/// Simulated milliseconds since the simulation's epoch (0 outside a simulated host).
fn now_ms() -> i64 {
    turmoil::since_epoch().map_or(0, |d| d.as_millis() as i64)
}

fn alive(e: &Entry, now: i64) -> bool {
    e.expires_at_ms.is_none_or(|t| t > now)
}

impl MemStore {
    pub fn new(observer: Option<Observer>) -> Arc<Self> {
        Arc::new(MemStore {
            data: Mutex::new(Data::default()),
            observer,
        })
    }

    /// Reads one key, as [`StateStore::get`].
    pub fn get_now(&self, key: &str) -> Option<StateItem> {
        let now = now_ms();
        let data = self.data.lock().expect("lock");
        data.items
            .get(key)
            .filter(|e| alive(e, now))
            .map(|e| StateItem {
                value: e.value.clone(),
                etag: e.etag.to_string(),
                expires_at_ms: e.expires_at_ms,
            })
    }

    /// Applies `ops` atomically and in order for `writer`, as [`StateStore::transact`].
    pub fn transact_now(&self, writer: &str, ops: &[Op]) -> Result<(), StateError> {
        let etags = parse_etags(ops)?;
        let now = now_ms();
        let mut data = self.data.lock().expect("lock");
        // Decide every operation against a staged view (later operations see earlier ones),
        // then commit the view only if all conditions held.
        let mut staged: BTreeMap<String, Option<Entry>> = BTreeMap::new();
        let mut next_etag = data.next_etag;
        for (op, etag) in ops.iter().zip(etags) {
            let key = op.key().to_string();
            let current: Option<Entry> = match staged.get(&key) {
                Some(e) => e.clone(),
                None => data.items.get(&key).filter(|e| alive(e, now)).cloned(),
            };
            match op {
                Op::Set(s) => {
                    match (etag, &current) {
                        (Some(want), Some(e)) if e.etag == want => {}
                        (Some(_), Some(_)) => {
                            return Err(StateError::EtagMismatch {
                                key,
                                reason: "the etag does not match",
                            })
                        }
                        (Some(_), None) => {
                            return Err(StateError::EtagMismatch {
                                key,
                                reason: "the key does not exist",
                            })
                        }
                        (None, Some(_)) if s.concurrency == Concurrency::FirstWrite => {
                            return Err(StateError::EtagMismatch {
                                key,
                                reason: "first-write: the key already exists",
                            })
                        }
                        (None, _) => {}
                    }
                    next_etag += 1;
                    let expires_at_ms = s.ttl.map(|d: Duration| {
                        now.saturating_add(d.as_millis().min(i64::MAX as u128) as i64)
                    });
                    staged.insert(
                        key,
                        Some(Entry {
                            value: s.value.clone(),
                            etag: next_etag,
                            expires_at_ms,
                        }),
                    );
                }
                Op::Delete(_) => {
                    match (etag, &current) {
                        (Some(want), Some(e)) if e.etag == want => {}
                        (Some(_), Some(_)) => {
                            return Err(StateError::EtagMismatch {
                                key,
                                reason: "the etag does not match",
                            })
                        }
                        (Some(_), None) => {
                            return Err(StateError::EtagMismatch {
                                key,
                                reason: "the key does not exist",
                            })
                        }
                        (None, _) => {}
                    }
                    staged.insert(key, None);
                }
            }
        }
        data.next_etag = next_etag;
        for (key, entry) in staged {
            match entry {
                Some(e) => {
                    data.items.insert(key, e);
                }
                None => {
                    data.items.remove(&key);
                }
            }
        }
        // Still under the lock: the observer sees commits in the order they happened.
        if let Some(o) = &self.observer {
            o(writer, ops);
        }
        Ok(())
    }
}

/// One host's connection to the shared store. A paused host's requests wait (before they reach
/// the store, and for their answer), like a frozen process's; each request takes a little
/// simulated time, so a pause can fall between a read and the write that follows it.
pub struct HostStore {
    pub shared: Arc<MemStore>,
    /// The writer name given to the observer.
    pub writer: String,
    pub gate: crate::actor_sim::Gate,
    /// Round-trip latency of one request.
    pub latency: Duration,
}

#[async_trait]
impl StateStore for HostStore {
    async fn get(&self, key: &str) -> Result<Option<StateItem>, StateError> {
        self.gate.pass().await;
        tokio::time::sleep(self.latency / 2).await;
        let r = self.shared.get_now(key);
        tokio::time::sleep(self.latency / 2).await;
        self.gate.pass().await;
        Ok(r)
    }

    async fn transact(&self, ops: Vec<Op>) -> Result<(), StateError> {
        self.gate.pass().await;
        tokio::time::sleep(self.latency / 2).await;
        let r = self.shared.transact_now(&self.writer, &ops);
        tokio::time::sleep(self.latency / 2).await;
        self.gate.pass().await;
        r
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.gate.pass().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use components::state::{DeleteOp, SetOp};

    fn set(key: &str, v: &str, etag: Option<String>, c: Concurrency) -> Op {
        Op::Set(SetOp {
            key: key.into(),
            value: Bytes::from(v.to_string()),
            etag,
            concurrency: c,
            ttl: None,
        })
    }

    #[test]
    fn etags_first_write_and_atomic_transactions() {
        let s = MemStore::new(None);
        s.transact_now("t", &[set("a", "1", None, Concurrency::FirstWrite)])
            .unwrap();
        let a = s.get_now("a").unwrap();
        assert!(matches!(
            s.transact_now("t", &[set("a", "2", None, Concurrency::FirstWrite)]),
            Err(StateError::EtagMismatch { .. })
        ));
        s.transact_now(
            "t",
            &[set("a", "2", Some(a.etag.clone()), Concurrency::LastWrite)],
        )
        .unwrap();
        let a2 = s.get_now("a").unwrap();
        assert_ne!(a.etag, a2.etag, "every write gets a fresh etag");
        // The second operation fails: nothing of the transaction is written.
        let r = s.transact_now(
            "t",
            &[
                set("b", "x", None, Concurrency::LastWrite),
                set("a", "3", Some(a.etag), Concurrency::LastWrite),
            ],
        );
        assert!(matches!(r, Err(StateError::EtagMismatch { .. })));
        assert!(s.get_now("b").is_none());
        assert_eq!(s.get_now("a").unwrap().value, Bytes::from("2"));
        // Later operations see earlier ones.
        s.transact_now(
            "t",
            &[
                set("c", "1", None, Concurrency::FirstWrite),
                Op::Delete(DeleteOp {
                    key: "c".into(),
                    etag: None,
                }),
                set("c", "2", None, Concurrency::FirstWrite),
            ],
        )
        .unwrap();
        assert_eq!(s.get_now("c").unwrap().value, Bytes::from("2"));
        assert!(matches!(
            s.transact_now(
                "t",
                &[Op::Delete(DeleteOp {
                    key: "zz".into(),
                    etag: Some("7".into())
                })]
            ),
            Err(StateError::EtagMismatch { .. })
        ));
        assert!(matches!(
            s.transact_now(
                "t",
                &[set("a", "1", Some("x".into()), Concurrency::LastWrite)]
            ),
            Err(StateError::InvalidEtag { .. })
        ));
    }
}
