//! One activation of one actor: its turn lock (with Dapr's reentrancy rules), its fencing epoch,
//! its timers and when it was last used. No task per actor: an idle activation is a small struct.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// `(actor type, actor id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorKey {
    pub actor_type: String,
    pub actor_id: String,
}

impl ActorKey {
    pub fn new(actor_type: impl Into<String>, actor_id: impl Into<String>) -> Self {
        ActorKey {
            actor_type: actor_type.into(),
            actor_id: actor_id.into(),
        }
    }
}

impl std::fmt::Display for ActorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.actor_type, self.actor_id)
    }
}

const ACTIVE: u8 = 0;
/// No new turns; the one in flight may finish, and its state writes still count.
const CLOSED: u8 = 1;
/// Let go (the drain timeout passed, or the fence found a newer activation): the turn that may
/// still be running has its state writes refused.
const RELEASED: u8 = 2;

/// The request chain holding the turn, for reentrancy.
struct Chain {
    id: String,
    depth: u32,
}

/// Why a turn was not granted.
#[derive(Debug, PartialEq, Eq)]
pub enum TurnError {
    /// The activation is closing (moved, idle, or the host lost its lease): route again.
    Closed,
    /// Reentrancy deeper than the type's maximum stack depth.
    StackDepth(u32),
}

pub struct Activation {
    pub key: ActorKey,
    /// The fencing epoch: the table version this activation was created under.
    pub epoch: u64,
    turn: Arc<Semaphore>,
    chain: Mutex<Option<Chain>>,
    status: AtomicU8,
    /// Milliseconds on the runtime's clock when the last turn ended (or the activation began).
    last_used_ms: AtomicU64,
    /// Turns running or waiting (a granted turn keeps its count until it ends).
    pending: AtomicU64,
    timers: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Set by the one task that retires the activation (see [`Activation::start_retiring`]).
    retiring: AtomicBool,
    /// Cancelled once the activation is gone: its last turn ended, the app was told, and the
    /// runtime forgot it. A new activation of the same actor on this host waits for that.
    retired: CancellationToken,
}

impl Drop for Activation {
    fn drop(&mut self) {
        self.abort_timers();
    }
}

/// A granted turn; dropping it ends the turn.
pub struct Turn {
    act: Arc<Activation>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Turn {
    pub fn activation(&self) -> &Arc<Activation> {
        &self.act
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut chain = self.act.chain.lock().expect("lock");
        if self.permit.is_some() {
            *chain = None;
        } else if let Some(c) = chain.as_mut() {
            c.depth = c.depth.saturating_sub(1);
        }
        drop(chain);
        if self.permit.take().is_some() {
            // The count `enter` took for this turn.
            self.act.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Decrements `pending` however the wait for a turn ends.
struct Pending<'a>(&'a AtomicU64);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activation {
    pub fn new(key: ActorKey, epoch: u64, now_ms: u64) -> Self {
        Activation {
            key,
            epoch,
            turn: Arc::new(Semaphore::new(1)),
            chain: Mutex::new(None),
            status: AtomicU8::new(ACTIVE),
            last_used_ms: AtomicU64::new(now_ms),
            pending: AtomicU64::new(0),
            timers: Mutex::new(HashMap::new()),
            retiring: AtomicBool::new(false),
            retired: CancellationToken::new(),
        }
    }

    /// Whether the caller is the first to retire this (closed) activation.
    pub fn start_retiring(&self) -> bool {
        !self.retiring.swap(true, Ordering::AcqRel)
    }

    /// Marks the activation as gone.
    pub fn set_retired(&self) {
        self.retired.cancel();
    }

    /// Waits until the activation is gone.
    pub async fn retired(&self) {
        self.retired.cancelled().await;
    }

    pub fn is_active(&self) -> bool {
        self.status.load(Ordering::Acquire) == ACTIVE
    }

    /// Stops admitting turns. Returns whether this call closed it.
    pub fn close(&self) -> bool {
        let first = self
            .status
            .compare_exchange(ACTIVE, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.abort_timers();
        }
        first
    }

    /// Closes it if it was not, and refuses the state writes of a turn still in flight.
    pub fn release(&self) {
        if self.status.swap(RELEASED, Ordering::AcqRel) == ACTIVE {
            self.abort_timers();
        }
    }

    /// Whether its turns may still write state: active, or closed with the turn in flight
    /// draining.
    pub fn accepts_writes(&self) -> bool {
        self.status.load(Ordering::Acquire) != RELEASED
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Acquire)
    }

    pub fn touch(&self, now_ms: u64) {
        self.last_used_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// No turn running or waiting.
    pub fn is_idle(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Waits for the turn. A call carrying the reentrancy id of the chain that holds the turn
    /// is admitted at once (one level deeper) when `max_depth` is set (reentrancy enabled).
    pub async fn enter(
        self: &Arc<Self>,
        chain_id: &str,
        max_depth: Option<u32>,
    ) -> Result<Turn, TurnError> {
        if !self.is_active() {
            return Err(TurnError::Closed);
        }
        if let Some(max) = max_depth {
            let mut chain = self.chain.lock().expect("lock");
            if let Some(c) = chain.as_mut().filter(|c| c.id == chain_id) {
                if c.depth >= max {
                    return Err(TurnError::StackDepth(max));
                }
                c.depth += 1;
                return Ok(Turn {
                    act: self.clone(),
                    permit: None,
                });
            }
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        let pending = Pending(&self.pending);
        let permit = self
            .turn
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TurnError::Closed)?;
        if !self.is_active() {
            return Err(TurnError::Closed);
        }
        *self.chain.lock().expect("lock") = Some(Chain {
            id: chain_id.to_string(),
            depth: 1,
        });
        // The turn now holds the count until it ends (see `Drop for Turn`), so an activation
        // whose turn runs is never idle.
        std::mem::forget(pending);
        Ok(Turn {
            act: self.clone(),
            permit: Some(permit),
        })
    }

    /// Waits until no turn runs (after [`Activation::close`], none will start).
    pub async fn drained(&self) {
        // Taking the only permit proves the turn in flight (if any) has ended.
        if let Ok(p) = self.turn.acquire().await {
            drop(p);
        }
    }

    pub fn add_timer(&self, name: &str, handle: tokio::task::AbortHandle) {
        if !self.is_active() {
            handle.abort();
            return;
        }
        if let Some(old) = self
            .timers
            .lock()
            .expect("lock")
            .insert(name.to_string(), handle)
        {
            old.abort();
        }
    }

    pub fn remove_timer(&self, name: &str) {
        if let Some(h) = self.timers.lock().expect("lock").remove(name) {
            h.abort();
        }
    }

    /// Forgets a finished timer without aborting the caller (the timer task itself).
    pub fn timer_finished(&self, name: &str) {
        self.timers.lock().expect("lock").remove(name);
    }

    fn abort_timers(&self) {
        for (_, h) in self.timers.lock().expect("lock").drain() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn turns_exclude_each_other() {
        let a = Arc::new(Activation::new(ActorKey::new("T", "1"), 1, 0));
        let t1 = a.enter("c1", None).await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.enter("c2", None).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a second turn waits for the first");
        assert!(!a.is_idle());
        drop(t1);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_running_turn_is_not_idle() {
        let a = Arc::new(Activation::new(ActorKey::new("T", "1"), 1, 0));
        assert!(a.is_idle());
        let t = a.enter("c1", None).await.unwrap();
        assert!(
            !a.is_idle(),
            "the idle scan must not take an actor whose turn runs"
        );
        drop(t);
        assert!(a.is_idle());
        // A reentrant entry neither counts twice nor ends the outer turn's count.
        let a = Arc::new(Activation::new(ActorKey::new("T", "2"), 1, 0));
        let outer = a.enter("c", Some(3)).await.unwrap();
        let inner = a.enter("c", Some(3)).await.unwrap();
        drop(inner);
        assert!(!a.is_idle());
        drop(outer);
        assert!(a.is_idle());
    }

    #[tokio::test]
    async fn reentrancy_admits_the_same_chain_up_to_the_depth() {
        let a = Arc::new(Activation::new(ActorKey::new("T", "1"), 1, 0));
        let outer = a.enter("chain", Some(3)).await.unwrap();
        let d2 = a.enter("chain", Some(3)).await.unwrap();
        let d3 = a.enter("chain", Some(3)).await.unwrap();
        assert_eq!(
            a.enter("chain", Some(3)).await.err(),
            Some(TurnError::StackDepth(3))
        );
        drop(d3);
        let again = a.enter("chain", Some(3)).await.unwrap();
        drop(again);
        drop(d2);
        // Another chain waits; without reentrancy the same chain waits too.
        let other =
            tokio::time::timeout(Duration::from_millis(20), a.enter("other", Some(3))).await;
        assert!(other.is_err());
        let same_off =
            tokio::time::timeout(Duration::from_millis(20), a.enter("chain", None)).await;
        assert!(same_off.is_err());
        drop(outer);
        a.enter("other", Some(3)).await.unwrap();
    }

    #[tokio::test]
    async fn closing_refuses_new_turns_and_drains() {
        let a = Arc::new(Activation::new(ActorKey::new("T", "1"), 1, 0));
        let t = a.enter("c", None).await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.enter("c2", None).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(a.close());
        assert!(!a.close());
        let a3 = a.clone();
        let drained = tokio::spawn(async move { a3.drained().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!drained.is_finished());
        drop(t);
        drained.await.unwrap();
        assert_eq!(waiter.await.unwrap(), Err(TurnError::Closed));
        assert_eq!(a.enter("c3", None).await.err(), Some(TurnError::Closed));
    }

    #[test]
    fn a_draining_turn_may_write_until_released() {
        let a = Activation::new(ActorKey::new("T", "1"), 1, 0);
        assert!(a.accepts_writes());
        assert!(a.close());
        assert!(!a.is_active());
        assert!(
            a.accepts_writes(),
            "closed: the turn in flight still writes"
        );
        a.release();
        assert!(!a.accepts_writes());
        assert!(!a.close(), "closing does not undo a release");
        assert!(!a.accepts_writes());
        let b = Activation::new(ActorKey::new("T", "2"), 1, 0);
        b.release();
        assert!(!b.is_active() && !b.accepts_writes());
    }
}
