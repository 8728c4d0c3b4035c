//! The trigger loop: one task that reads the due-time index and hands due ticks to a delivery
//! sink.
//!
//! - One loop for all jobs (no task or timer per job): it sleeps until the first index entry, or
//!   until a create, a delete or a finished delivery wakes it. Time comes from a [`Clock`]
//!   ([`SystemClock`], or [`ManualClock`] in tests), so every semantic below is tested without
//!   real waiting.
//! - Never early: an entry is dispatched only once the clock has reached it, and entries are the
//!   attempt time rounded up to the millisecond.
//! - One tick in flight per job: a job with a delivery in flight is skipped until it completes
//!   (its index entry is taken out meanwhile, so scans do not walk over the deliveries in flight);
//!   the in-flight table is bounded (`max_in_flight`), so memory does not grow with the job count.
//!   Completions that arrive together are applied in one pass.
//! - Coalescing: when a tick is dispatched, the later ticks that are also due already are folded
//!   into it ([`Tick::missed`]), so an outage ends in one delivery per job, not a flood.
//! - Failures: a failed delivery is retried per the job's [`FailurePolicy`] (`constant`: after
//!   `interval`, up to `max_retries` times; `drop`: not at all). A tick given up counts as done.
//!   A delivery that found nobody to deliver to ([`DeliveryError::Unroutable`]: no host of that
//!   app or actor type connected) does not use up the policy: the tick is tried again after
//!   `unroutable_backoff`, folding in the ticks that fell due meanwhile.
//! - Fencing: a delivery may report the epoch of the activation that ran it; the job keeps the
//!   newest, and an acknowledgement with an older epoch counts as a failed delivery.
//! - Deletes: a delete removes the job and its pending attempt (a scheduled retry included), and
//!   the outcome of a delivery in flight for a deleted or replaced job is discarded, so nothing
//!   re-creates it. Only a tick already handed to the sink when the delete was acknowledged can
//!   still arrive.
//! - Storage errors never stop the loop: it logs them and tries again shortly.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::job::{FailurePolicy, Job, JobKey, JobSpec, Target};
use crate::store::{
    index_time, partition_of, JobState, JobStore, PutOutcome, StoreError, StoredJob,
};

/// Where the loop gets the time from.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Completes once `now()` has reached `deadline` (it may complete early; the loop checks).
    fn sleep_until(&self, deadline: DateTime<Utc>) -> impl Future<Output = ()> + Send;
}

/// The wall clock, slept on with tokio timers in steps of at most a second, so that a wall-clock
/// jump delays nothing by more than a second.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn sleep_until(&self, deadline: DateTime<Utc>) {
        loop {
            let left = deadline - Utc::now();
            if left <= TimeDelta::zero() {
                return;
            }
            let step = left
                .to_std()
                .unwrap_or_default()
                .min(Duration::from_secs(1));
            tokio::time::sleep(step).await;
        }
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: watch::Sender<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: watch::Sender::new(start),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let d = TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        self.now
            .send_modify(|t| *t = t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC));
    }

    /// Moves the clock to `t` (never backwards).
    pub fn set(&self, t: DateTime<Utc>) {
        self.now.send_modify(|now| *now = (*now).max(t));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> impl Future<Output = ()> + Send {
        let mut rx = self.now.subscribe();
        async move {
            let _ = rx.wait_for(|now| *now >= deadline).await;
        }
    }
}

/// One delivery handed to the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub key: JobKey,
    pub name: String,
    pub target: Target,
    /// The job's data (compact JSON text, empty if none).
    pub data: Arc<[u8]>,
    /// Which job of that key this is (see [`StoredJob::generation`]).
    pub generation: u64,
    /// When this tick was due.
    pub scheduled: DateTime<Utc>,
    /// How many later ticks, also due already, this delivery stands for.
    pub missed: u32,
    /// 0 for the first attempt, n for the nth retry.
    pub attempt: u32,
    /// The 1-based number of this tick among the job's ticks.
    pub sequence: u32,
    /// The due time and period as the client sent them (a reminder's delivery echoes them).
    pub spec: Arc<JobSpec>,
}

/// A successful delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The fencing epoch of the activation that ran it, when an actor did.
    pub epoch: Option<u64>,
}

/// A delivery that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// It was attempted and failed (or was not acknowledged in time): the failure policy applies.
    #[error("delivery failed: {0}")]
    Failed(String),
    /// Nobody could take it (no receiver connected): tried again without using up the policy.
    #[error("no receiver: {0}")]
    Unroutable(String),
}

/// Delivers ticks (to an app, or to an actor's host).
pub trait Sink: Send + Sync + 'static {
    /// Called from the trigger loop when a tick is dispatched; the returned future then runs in
    /// its own task, and its result decides between done and retry. Work done before returning
    /// the future happens at dispatch, so keep it short.
    fn deliver(
        &self,
        tick: Tick,
    ) -> impl Future<Output = Result<Delivered, DeliveryError>> + Send + 'static;
}

/// Tuning of the loop.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Deliveries in flight at most (one per job).
    pub max_in_flight: usize,
    /// Ticks folded into one delivery at most, for cron schedules (fixed intervals are counted
    /// arithmetically); past it the rest follow in further deliveries.
    pub coalesce_cap: u32,
    /// Pause after a storage error.
    pub error_backoff: Duration,
    /// Pause before trying again a tick nobody could take.
    pub unroutable_backoff: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_in_flight: 1024,
            coalesce_cap: 100_000,
            error_backoff: Duration::from_millis(200),
            unroutable_backoff: Duration::from_millis(500),
        }
    }
}

/// What the loop is doing, published whenever it parks (for tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStatus {
    /// Waiting for time, a wake-up or a delivery.
    pub parked: bool,
    /// The clock reading the loop last acted on.
    pub now: DateTime<Utc>,
    /// The time it sleeps until (`None`: only a wake-up or a delivery will move it).
    pub sleeping_until: Option<DateTime<Utc>>,
    /// The last mutation it has seen (see [`SchedulerHandle::epoch`]).
    pub seen_epoch: u64,
    pub in_flight: usize,
    /// Deliveries whose outcome it has applied.
    pub completed: u64,
}

/// A delivery in flight.
#[derive(Debug, Clone)]
struct InFlight {
    /// The job as claimed; its state is replaced by the outcome.
    rec: StoredJob,
    generation: u64,
    attempt: u32,
    count_before: u32,
    missed: u32,
    last_covered: DateTime<Utc>,
}

/// Deliveries in flight per partition.
type Busy = Arc<Mutex<HashMap<u32, usize>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The counts stay consistent whatever panicked: recover from a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes one delivery of a partition off [`Busy`] when dropped.
struct BusyGuard<'a> {
    busy: &'a Busy,
    partition: u32,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut b = lock(self.busy);
        if let Some(n) = b.get_mut(&self.partition) {
            *n -= 1;
            if *n == 0 {
                b.remove(&self.partition);
            }
        }
    }
}

/// The API side of the scheduler: creates, deletes and reads jobs and wakes the loop.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    store: Arc<JobStore>,
    wake: Arc<Notify>,
    epoch: Arc<AtomicU64>,
    busy: Busy,
    status: watch::Receiver<EngineStatus>,
}

impl SchedulerHandle {
    /// Stores a job durably (see [`JobStore::put`]) and wakes the loop.
    pub async fn create(&self, job: Job, overwrite: bool) -> Result<PutOutcome, StoreError> {
        let out = self.store.put(job, overwrite).await;
        self.poke();
        out
    }

    /// Deletes a job durably; afterwards only a tick already handed to the sink can arrive.
    pub async fn delete(&self, key: &JobKey) -> Result<bool, StoreError> {
        let out = self.store.delete(key).await;
        self.poke();
        out
    }

    /// Deletes every job under a key prefix (all reminders of an actor, all jobs of an app).
    pub async fn delete_prefix(&self, prefix: &[u8]) -> Result<usize, StoreError> {
        let out = self.store.delete_prefix(prefix).await;
        self.poke();
        out
    }

    pub fn get(&self, key: &JobKey) -> Result<Option<StoredJob>, StoreError> {
        self.store.get(key)
    }

    /// The store, for reads. Writes made directly through it do not wake the loop until something
    /// else does; use [`Self::create`] and [`Self::delete`].
    pub fn store(&self) -> &Arc<JobStore> {
        &self.store
    }

    /// Counts mutations; the loop reports the last one it has seen in [`EngineStatus`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.status.clone()
    }

    /// Wakes the loop after the store changed behind its back (replicated writes, a new set of
    /// owned partitions).
    pub fn wake(&self) {
        self.poke();
    }

    /// The partitions (see [`crate::store::partition_of`]) with a delivery in flight whose
    /// outcome is not yet recorded.
    pub fn busy_partitions(&self) -> HashSet<u32> {
        lock(&self.busy).keys().copied().collect()
    }

    fn poke(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }
}

/// The trigger loop. Build it with [`Engine::new`], keep its [`Engine::handle`], then `run` it.
pub struct Engine<C: Clock, S: Sink> {
    store: Arc<JobStore>,
    clock: Arc<C>,
    sink: Arc<S>,
    config: EngineConfig,
    wake: Arc<Notify>,
    epoch: Arc<AtomicU64>,
    status: watch::Sender<EngineStatus>,
    in_flight: HashMap<JobKey, InFlight>,
    busy: Busy,
    tasks: JoinSet<Result<Delivered, DeliveryError>>,
    task_keys: HashMap<tokio::task::Id, JobKey>,
    completed: u64,
}

impl<C: Clock, S: Sink> std::fmt::Debug for Engine<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("in_flight", &self.in_flight.len())
            .field("completed", &self.completed)
            .finish()
    }
}

impl<C: Clock, S: Sink> Engine<C, S> {
    pub fn new(store: Arc<JobStore>, clock: Arc<C>, sink: Arc<S>, config: EngineConfig) -> Self {
        let now = clock.now();
        Engine {
            store,
            clock,
            sink,
            config,
            wake: Arc::new(Notify::new()),
            epoch: Arc::new(AtomicU64::new(0)),
            status: watch::Sender::new(EngineStatus {
                parked: false,
                now,
                sleeping_until: None,
                seen_epoch: 0,
                in_flight: 0,
                completed: 0,
            }),
            in_flight: HashMap::new(),
            busy: Busy::default(),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            completed: 0,
        }
    }

    pub fn handle(&self) -> SchedulerHandle {
        SchedulerHandle {
            store: self.store.clone(),
            wake: self.wake.clone(),
            epoch: self.epoch.clone(),
            busy: self.busy.clone(),
            status: self.status.subscribe(),
        }
    }

    /// Runs until `shutdown` completes. Deliveries still in flight are then abandoned; their ticks
    /// fire again after a restart (at least once).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let epoch = self.epoch.load(Ordering::Acquire);
            let now = self.clock.now();
            let (wake_at, backoff) = match self.dispatch_due(now).and_then(|()| self.next_wake()) {
                Ok(wake_at) => (wake_at, false),
                Err(e) => {
                    tracing::error!(error = %e, "scheduler loop: storage error; retrying shortly");
                    (None, true)
                }
            };
            self.publish(true, now, wake_at, epoch);
            let clock = self.clock.clone();
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(done);
                    // Take every other finished delivery too before scanning the index again:
                    // one scan per batch, not one per completion, keeps fast sinks fast.
                    while let Some(done) = self.tasks.try_join_next_with_id() {
                        self.finished(done);
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.config.error_backoff), if backoff => {}
                _ = async move {
                    match wake_at {
                        Some(t) => clock.sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            self.publish(false, now, wake_at, epoch);
        }
        self.tasks.abort_all();
        // Their ticks fire again (the index entries were taken while in flight).
        for key in self.in_flight.keys() {
            if let Err(e) = self.store.reindex(key) {
                tracing::warn!(job = %key, error = %e, "cannot re-index a job in flight at shutdown");
            }
        }
    }

    /// Records the outcome of one delivery task.
    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Result<Delivered, DeliveryError>), tokio::task::JoinError>,
    ) {
        let (id, result) = match done {
            Ok((id, r)) => (id, r),
            Err(e) => (
                e.id(),
                Err(DeliveryError::Failed(format!("delivery task failed: {e}"))),
            ),
        };
        if let Some(key) = self.task_keys.remove(&id) {
            self.complete(key, result);
        }
    }

    fn publish(
        &self,
        parked: bool,
        now: DateTime<Utc>,
        sleeping_until: Option<DateTime<Utc>>,
        epoch: u64,
    ) {
        self.status.send_replace(EngineStatus {
            parked,
            now,
            sleeping_until,
            seen_epoch: epoch,
            in_flight: self.in_flight.len(),
            completed: self.completed,
        });
    }

    /// When the first entry not in flight is due; `None` if there is none or the in-flight table
    /// is full (then only a finished delivery can make room).
    fn next_wake(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        if self.in_flight.len() >= self.config.max_in_flight {
            return Ok(None);
        }
        Ok(self
            .store
            .first_due(|key| self.in_flight.contains_key(key))
            .map(index_time))
    }

    /// Hands every entry due at `now` to the sink, while there is room in flight.
    fn dispatch_due(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        // Entries at or before this millisecond are due: they were rounded up.
        let now_ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        let room = self
            .config
            .max_in_flight
            .saturating_sub(self.in_flight.len());
        let due = self
            .store
            .due_until(now_ms, room, |key| self.in_flight.contains_key(key));
        for (ms, key) in due {
            let Some(rec) = self.store.claim(ms, &key)? else {
                continue;
            };
            self.dispatch(key, rec, now);
        }
        Ok(())
    }

    fn dispatch(&mut self, key: JobKey, rec: StoredJob, now: DateTime<Utc>) {
        let st = rec.state;
        // A retry also folds in the ticks that fell due while it waited.
        let (missed, last_covered) =
            rec.job
                .coalesce(st.tick, st.count, now, self.config.coalesce_cap);
        let tick = Tick {
            key: key.clone(),
            name: rec.job.name.clone(),
            target: rec.job.target.clone(),
            data: Arc::from(rec.job.data.as_slice()),
            generation: rec.generation,
            scheduled: st.tick,
            missed,
            attempt: st.attempt,
            sequence: st.count.saturating_add(1),
            spec: Arc::new(rec.job.spec.clone()),
        };
        *lock(&self.busy)
            .entry(partition_of(key.as_bytes()))
            .or_default() += 1;
        self.in_flight.insert(
            key.clone(),
            InFlight {
                generation: rec.generation,
                rec,
                attempt: st.attempt,
                count_before: st.count,
                missed,
                last_covered,
            },
        );
        let id = self.tasks.spawn(self.sink.deliver(tick)).id();
        self.task_keys.insert(id, key);
    }

    /// Applies a delivery's outcome to its job, unless the job was deleted or replaced meanwhile.
    fn complete(&mut self, key: JobKey, result: Result<Delivered, DeliveryError>) {
        self.completed += 1;
        let Some(f) = self.in_flight.remove(&key) else {
            return;
        };
        // Released once the outcome is recorded (a replica waits for it before letting a
        // partition go).
        let _busy = BusyGuard {
            busy: &self.busy,
            partition: partition_of(key.as_bytes()),
        };
        if let Err(e) = self.apply_outcome(&key, &f, result) {
            // The job keeps its current state: its index entry goes back and the tick is tried
            // again.
            tracing::error!(job = %key, error = %e, "cannot record a delivery outcome; the tick will repeat");
            if let Err(e) = self.store.reindex(&key) {
                tracing::error!(job = %key, error = %e, "cannot re-index a job; it fires again after a restart");
            }
        }
    }

    fn apply_outcome(
        &self,
        key: &JobKey,
        f: &InFlight,
        result: Result<Delivered, DeliveryError>,
    ) -> Result<(), StoreError> {
        // Deleted or replaced meanwhile, the outcome belongs to nobody: `set_state` and `finish`
        // check the generation and then write nothing.
        let rec = &f.rec;
        let now = self.clock.now();
        let mut epoch = rec.state.epoch;
        let result = match result {
            Ok(Delivered { epoch: Some(e) }) if e < rec.state.epoch => {
                Err(DeliveryError::Failed(format!(
                    "acknowledged by a stale activation (epoch {e}, newest seen {})",
                    rec.state.epoch
                )))
            }
            Ok(d) => {
                epoch = epoch.max(d.epoch.unwrap_or(0));
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(DeliveryError::Unroutable(why)) = &result {
            tracing::debug!(job = %key, reason = %why, "nobody to deliver to; trying again shortly");
            let retry_at = now
                .checked_add_signed(
                    TimeDelta::from_std(self.config.unroutable_backoff).unwrap_or(TimeDelta::MAX),
                )
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            let state = JobState {
                due_at: retry_at,
                ..rec.state
            };
            self.store.set_state(key, &f.rec, state)?;
            return Ok(());
        }
        if let Err(e) = &result {
            if let FailurePolicy::Constant {
                interval,
                max_retries,
            } = rec.job.failure_policy
            {
                if max_retries.is_none_or(|m| f.attempt < m) {
                    tracing::debug!(job = %key, attempt = f.attempt, error = %e, "delivery failed; retrying");
                    let retry_at = now
                        .checked_add_signed(TimeDelta::from_std(interval).unwrap_or(TimeDelta::MAX))
                        .unwrap_or(DateTime::<Utc>::MAX_UTC);
                    let state = JobState {
                        due_at: retry_at,
                        attempt: f.attempt + 1,
                        ..rec.state
                    };
                    self.store.set_state(key, &f.rec, state)?;
                    return Ok(());
                }
            }
            tracing::warn!(job = %key, attempts = f.attempt + 1, error = %e, "delivery failed; tick given up");
        }
        // Done (delivered or given up): account for the tick and the ones coalesced into it.
        let count = f.count_before.saturating_add(1).saturating_add(f.missed);
        match rec.job.next_fire(Some(f.last_covered), count) {
            None => {
                self.store.finish(key, f.generation)?;
            }
            Some(next) => {
                let state = JobState {
                    tick: next,
                    due_at: next,
                    attempt: 0,
                    count,
                    last: Some(f.last_covered),
                    epoch,
                };
                self.store.set_state(key, &f.rec, state)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
