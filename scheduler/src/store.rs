//! The durable job store on sled, with a due-time index.
//!
//! - Tree `jobs`: [`JobKey`] bytes -> record `[generation u64 BE][index ms u64 BE][format 1]
//!   [firing state, 53 bytes binary][JSON of the job]`. The header lets the opening scan run
//!   without decoding anything, and the trigger loop rewrites the firing state of a job by copying
//!   the job's JSON bytes behind a new header and state, without encoding JSON. (Records written
//!   before the binary state, `[header][JSON of the job and its state]`, are still read.)
//! - The due index: `(ms, key)` for every job's next attempt, in time order, kept in memory (a
//!   `BTreeSet`, about 100 bytes per job) and rebuilt from the records' headers when the store
//!   opens, so it is never written to disk and a crash cannot leave it out of step with the
//!   records. The milliseconds are the attempt's time rounded *up*, so an entry at or before
//!   "now" is never early. (Stores written before this kept the index in a sled tree `due`; it is
//!   dropped on opening.)
//! - Durability: a create or delete is acknowledged only after `flush` (fsync). Concurrent writers
//!   share flushes (group commit): a writer takes a ticket after its writes, and whoever holds the
//!   flush lock flushes everything written so far, so the writers queued behind it usually find
//!   their ticket already covered. State changes made by the trigger loop are not flushed: a crash
//!   can only make a tick fire again (at least once), never lose a job.
//! - No sled transactions or batches: they take sled's process-wide lock exclusively, which a
//!   flush in progress holds shared, so they would stall for the length of a flush. Each mutation
//!   is one sled write (the record) and the matching index change, under the store's own lock. A
//!   stale index entry would be harmless (the loop checks every entry against the record's header
//!   and drops it), and after a crash the index is rebuilt from the records.
//! - A record that cannot be decoded is moved to tree `quarantine` instead of stopping the loop.
//! - Replication support (for a replicated scheduler service): every key falls in one of
//!   [`PARTITIONS`] partitions ([`partition_of`]); [`JobStore::set_owned`] restricts the due index to
//!   the partitions this replica fires (records of the others are kept, unindexed), and re-indexes
//!   when that set changes. `put_as` / `delete_local` / `apply_progress` / `import` apply replicated
//!   commands without flushing (the Raft log is the durable record), with generations chosen by
//!   the log so that every replica agrees on them; the trigger loop's state changes can be
//!   collected ([`JobStore::take_progress`]) to be replicated in batches.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::job::{Job, JobKey};

const HEADER: usize = 16;

/// How many partitions the key space is cut into (the unit of firing ownership among replicas).
pub const PARTITIONS: u32 = 32;

/// The partition of a job key: FNV-1a over its bytes, stable across processes and builds.
pub fn partition_of(key: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(PARTITIONS)) as u32
}

/// A storage failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("job store: {0}")]
    Backend(String),
    #[error("job store: cannot encode job {key}: {reason}")]
    Encode { key: String, reason: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Where a job stands in its sequence of ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// The scheduled time of the tick to deliver next.
    pub tick: DateTime<Utc>,
    /// When to attempt it: `tick` at first, later for a retry. The due index points here.
    pub due_at: DateTime<Utc>,
    /// How many attempts of `tick` have failed.
    pub attempt: u32,
    /// How many ticks were accounted for (delivered or given up) before `tick`.
    pub count: u32,
    /// The scheduled time of the last tick accounted for.
    pub last: Option<DateTime<Utc>>,
    /// The newest fencing epoch an acknowledgement carried (a reminder's activation epoch); an
    /// acknowledgement with an older one is refused and the tick retried.
    #[serde(default)]
    pub epoch: u64,
}

impl JobState {
    /// The state of a job that has not fired yet; `None` if it never will.
    pub fn initial(job: &Job) -> Option<Self> {
        let tick = job.next_fire(None, 0)?;
        Some(JobState {
            tick,
            due_at: tick,
            attempt: 0,
            count: 0,
            last: None,
            epoch: 0,
        })
    }
}

/// A job as stored: its definition, its generation and its firing state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJob {
    pub job: Job,
    /// Distinguishes successive jobs stored under one key (an overwrite gets a new one), so the
    /// outcome of a tick of a replaced or deleted job is never applied to its successor.
    #[serde(skip)]
    pub generation: u64,
    pub state: JobState,
}

/// What a create did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutOutcome {
    /// Stored (replacing an older job if `replaced`); its first attempt is at `first`.
    Stored {
        generation: u64,
        replaced: bool,
        first: DateTime<Utc>,
    },
    /// `overwrite` was false and a job with that key exists; nothing was written.
    AlreadyExists,
    /// The job has no tick to fire (its first tick is past its expiry); nothing was stored, and an
    /// older job of that key, if any, was removed.
    NeverFires { replaced: bool },
}

/// The index position of a time: milliseconds since the epoch, rounded up, clamped at 0.
pub fn index_ms(t: DateTime<Utc>) -> u64 {
    let ms = t.timestamp_millis();
    let ceil = if !t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        ms.saturating_add(1)
    } else {
        ms
    };
    u64::try_from(ceil).unwrap_or(0)
}

/// The time an index position stands for.
pub fn index_time(ms: u64) -> DateTime<Utc> {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `(generation, index ms)` of a record.
fn header(raw: &[u8]) -> Option<(u64, u64)> {
    let g = raw.get(0..8)?.try_into().ok()?;
    let ms = raw.get(8..16)?.try_into().ok()?;
    Some((u64::from_be_bytes(g), u64::from_be_bytes(ms)))
}

/// The format byte after the header of a record with a binary firing state.
const FORMAT_BINARY: u8 = 1;
/// The length of the binary firing state.
const STATE_LEN: usize = 53;
/// Where the job's JSON starts in a record with a binary firing state.
const JOB_AT: usize = HEADER + 1 + STATE_LEN;

fn put_time(out: &mut Vec<u8>, t: DateTime<Utc>) {
    out.extend_from_slice(&t.timestamp().to_be_bytes());
    out.extend_from_slice(&t.timestamp_subsec_nanos().to_be_bytes());
}

fn get_time(b: &[u8]) -> Option<DateTime<Utc>> {
    let secs = i64::from_be_bytes(b.get(0..8)?.try_into().ok()?);
    let nanos = u32::from_be_bytes(b.get(8..12)?.try_into().ok()?);
    DateTime::from_timestamp(secs, nanos)
}

/// `[tick 12][due_at 12][attempt u32][count u32][has last u8][last 12][epoch u64]`, times as
/// seconds (i64 BE) and nanoseconds (u32 BE).
fn encode_state(out: &mut Vec<u8>, st: &JobState) {
    put_time(out, st.tick);
    put_time(out, st.due_at);
    out.extend_from_slice(&st.attempt.to_be_bytes());
    out.extend_from_slice(&st.count.to_be_bytes());
    out.push(u8::from(st.last.is_some()));
    put_time(out, st.last.unwrap_or_default());
    out.extend_from_slice(&st.epoch.to_be_bytes());
}

fn decode_state(b: &[u8]) -> Option<JobState> {
    let b = b.get(..STATE_LEN)?;
    Some(JobState {
        tick: get_time(&b[0..12])?,
        due_at: get_time(&b[12..24])?,
        attempt: u32::from_be_bytes(b[24..28].try_into().ok()?),
        count: u32::from_be_bytes(b[28..32].try_into().ok()?),
        last: match b[32] {
            0 => None,
            1 => Some(get_time(&b[33..45])?),
            _ => return None,
        },
        epoch: u64::from_be_bytes(b[45..53].try_into().ok()?),
    })
}

/// The record of `rec`: header, binary state, then `job_json` (the job's JSON as encoded before).
fn encode_with(generation: u64, state: &JobState, job_json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(JOB_AT + job_json.len());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&index_ms(state.due_at).to_be_bytes());
    out.push(FORMAT_BINARY);
    encode_state(&mut out, state);
    out.extend_from_slice(job_json);
    out
}

fn encode(rec: &StoredJob) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(&rec.job).map_err(|e| StoreError::Encode {
        key: rec.job.key().to_string(),
        reason: e.to_string(),
    })?;
    Ok(encode_with(rec.generation, &rec.state, &json))
}

/// The job's JSON in a record with a binary state (`None` for the older all-JSON format).
fn job_json(raw: &[u8]) -> Option<&[u8]> {
    match raw.get(HEADER) {
        Some(&FORMAT_BINARY) => raw.get(JOB_AT..),
        _ => None,
    }
}

fn decode(raw: &[u8]) -> Option<StoredJob> {
    let (generation, _) = header(raw)?;
    let mut rec: StoredJob = match raw.get(HEADER)? {
        &FORMAT_BINARY => StoredJob {
            state: decode_state(raw.get(HEADER + 1..)?)?,
            job: serde_json::from_slice(raw.get(JOB_AT..)?).ok()?,
            generation,
        },
        // Written before the binary state: the whole record is JSON.
        _ => serde_json::from_slice(raw.get(HEADER..)?).ok()?,
    };
    rec.generation = generation;
    Some(rec)
}

/// The due index: `(index ms, key)` of every indexed job's next attempt.
#[derive(Debug, Default)]
struct DueIndex {
    entries: BTreeSet<(u64, JobKey)>,
}

impl DueIndex {
    fn insert(&mut self, ms: u64, key: &[u8]) {
        self.entries.insert((ms, JobKey::from_bytes(key.to_vec())));
    }

    fn remove(&mut self, ms: u64, key: &[u8]) {
        // `BTreeSet::remove` needs an owned tuple; building the key costs one allocation.
        self.entries.remove(&(ms, JobKey::from_bytes(key.to_vec())));
    }

    #[cfg(test)]
    fn contains(&self, ms: u64, key: &JobKey) -> bool {
        self.entries.contains(&(ms, key.clone()))
    }
}

/// A change of firing state to replicate: the job's new state, or `None` once it is finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub key: Vec<u8>,
    pub generation: u64,
    pub state: Option<JobState>,
}

/// Whether `new` is later in a job's life than `old` (states only move forward).
fn is_later(new: &JobState, old: &JobState) -> bool {
    (new.count, new.attempt, new.due_at) > (old.count, old.attempt, old.due_at)
}

/// Raw records `(key, record)`, as [`JobStore::export`] gives them.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Acknowledged writes that asked for durability.
    pub commits: u64,
    /// fsyncs those writes caused.
    pub flushes: u64,
}

/// The job store. Cheap to share behind an `Arc`.
pub struct JobStore {
    db: sled::Db,
    jobs: sled::Tree,
    /// The due index (see the module doc); locked after `write` when both are held.
    due: Mutex<DueIndex>,
    quarantine: sled::Tree,
    /// Whether acknowledged writes are flushed (false only for in-memory test stores).
    durable: bool,
    /// Serializes mutations (short: sled writes only, never a flush).
    write: Mutex<()>,
    next_generation: AtomicU64,
    /// Group commit: tickets taken after writes, and the highest ticket known to be on disk.
    requested: AtomicU64,
    flushed: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    flushes: AtomicU64,
    /// Partitions whose jobs are in the due index (`None`: all).
    owned: RwLock<Option<HashSet<u32>>>,
    /// Record the trigger loop's state changes for [`JobStore::take_progress`].
    track: AtomicBool,
    progress: Mutex<HashMap<Vec<u8>, Progress>>,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore")
            .field("jobs", &self.jobs.len())
            .field("durable", &self.durable)
            .finish()
    }
}

impl JobStore {
    /// Opens (or creates) the store in `dir`, re-indexing any record a crash left unindexed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 << 20)
            .open()?;
        Self::with_db(db, true)
    }

    /// An in-memory store that never flushes, for tests and simulations.
    pub fn temporary() -> Result<Self, StoreError> {
        Self::with_db(sled::Config::new().temporary(true).open()?, false)
    }

    /// The store of a scheduler replica, on the database it shares with its Raft log: it never
    /// flushes (the log is the durable record), indexes no partition until
    /// [`JobStore::set_owned`] gives it some, and records the trigger loop's state changes.
    pub fn replicated(db: sled::Db) -> Result<Self, StoreError> {
        let store = Self::open_with(db, false, Some(HashSet::new()))?;
        // Drop the index entries of the partitions it fired before a restart.
        store.set_owned(Some(HashSet::new()))?;
        store.track_progress();
        Ok(store)
    }

    /// The store of a single scheduler on an open database. `durable: false` makes creates and
    /// deletes skip the flush (the simulation keeps its databases across simulated crashes).
    pub fn on_db(db: sled::Db, durable: bool) -> Result<Self, StoreError> {
        Self::with_db(db, durable)
    }

    fn with_db(db: sled::Db, durable: bool) -> Result<Self, StoreError> {
        Self::open_with(db, durable, None)
    }

    fn open_with(
        db: sled::Db,
        durable: bool,
        owned: Option<HashSet<u32>>,
    ) -> Result<Self, StoreError> {
        let store = JobStore {
            jobs: db.open_tree("jobs")?,
            due: Mutex::new(DueIndex::default()),
            quarantine: db.open_tree("quarantine")?,
            db,
            durable,
            write: Mutex::new(()),
            next_generation: AtomicU64::new(1),
            requested: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            flushes: AtomicU64::new(0),
            owned: RwLock::new(owned),
            track: AtomicBool::new(false),
            progress: Mutex::new(HashMap::new()),
        };
        store.recover()?;
        Ok(store)
    }

    /// Builds the due index from the records' headers and sets the generation counter past every
    /// stored one.
    fn recover(&self) -> Result<(), StoreError> {
        // The index of stores written before it was kept in memory.
        if self.db.tree_names().iter().any(|n| n.as_ref() == b"due") {
            self.db.drop_tree("due")?;
        }
        let mut max_gen = 0;
        let mut due = self.due_index();
        for item in self.jobs.iter() {
            let (key, raw) = item?;
            let Some((generation, ms)) = header(&raw) else {
                self.quarantine_record(&key, &raw)?;
                continue;
            };
            max_gen = max_gen.max(generation);
            if self.indexed(&key) {
                due.insert(ms, &key);
            }
        }
        self.next_generation.store(max_gen + 1, Ordering::Release);
        Ok(())
    }

    fn due_index(&self) -> std::sync::MutexGuard<'_, DueIndex> {
        // Every change to the index is a single insert or remove: a panic cannot leave it torn.
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn quarantine_record(&self, key: &[u8], raw: &[u8]) -> Result<(), StoreError> {
        tracing::error!(key = %JobKey::from_bytes(key.to_vec()), "unreadable job record moved to quarantine");
        self.quarantine.insert(key, raw)?;
        self.jobs.remove(key)?;
        Ok(())
    }

    fn indexed(&self, key: &[u8]) -> bool {
        match &*self.owned.read().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(set) => set.contains(&partition_of(key)),
        }
    }

    /// Restricts the due index to `owned` partitions (`None`: all) and re-indexes accordingly:
    /// entries of partitions no longer owned are removed, records of newly owned ones indexed.
    pub fn set_owned(&self, owned: Option<HashSet<u32>>) -> Result<(), StoreError> {
        let _w = self.lock();
        *self.owned.write().unwrap_or_else(|p| p.into_inner()) = owned;
        let mut due = self.due_index();
        due.entries.retain(|(_, key)| self.indexed(key.as_bytes()));
        for item in self.jobs.iter() {
            let (key, raw) = item?;
            if let Some((_, ms)) = header(&raw) {
                if self.indexed(&key) {
                    due.insert(ms, &key);
                }
            }
        }
        Ok(())
    }

    /// Starts recording the trigger loop's state changes (see [`JobStore::take_progress`]).
    pub fn track_progress(&self) {
        self.track.store(true, Ordering::Release);
    }

    /// The state changes recorded since the last call, one per job (the latest).
    pub fn take_progress(&self) -> Vec<Progress> {
        let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *p).into_values().collect()
    }

    /// The partitions with recorded changes not yet taken.
    pub fn progress_partitions(&self) -> HashSet<u32> {
        let p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        p.keys().map(|k| partition_of(k)).collect()
    }

    /// Puts back changes that could not be replicated, unless newer ones were recorded since.
    pub fn restore_progress(&self, items: Vec<Progress>) {
        let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        for item in items {
            p.entry(item.key.clone()).or_insert(item);
        }
    }

    fn record_progress(&self, key: &[u8], generation: u64, state: Option<JobState>) {
        if self.track.load(Ordering::Acquire) {
            self.progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    key.to_vec(),
                    Progress {
                        key: key.to_vec(),
                        generation,
                        state,
                    },
                );
        }
    }

    /// Stores a job under a generation chosen by the caller (a Raft log index, the same on every
    /// replica), without flushing. Applying the same command twice changes nothing.
    pub fn put_as(
        &self,
        job: Job,
        overwrite: bool,
        generation: u64,
    ) -> Result<PutOutcome, StoreError> {
        let key = job.key();
        let _w = self.lock();
        let old = self.jobs.get(key.as_bytes())?;
        let old_header = old.as_deref().and_then(header);
        if let Some((g, _)) = old_header {
            if g == generation {
                // Already applied (a replay after a restart).
                return Ok(PutOutcome::Stored {
                    generation,
                    replaced: false,
                    first: index_time(old_header.map_or(0, |h| h.1)),
                });
            }
            if !overwrite {
                return Ok(PutOutcome::AlreadyExists);
            }
        }
        self.next_generation
            .fetch_max(generation.saturating_add(1), Ordering::AcqRel);
        let old_ms = old_header.map(|(_, ms)| ms);
        Ok(match JobState::initial(&job) {
            None => {
                if let Some(ms) = old_ms {
                    self.jobs.remove(key.as_bytes())?;
                    self.due_index().remove(ms, key.as_bytes());
                }
                PutOutcome::NeverFires {
                    replaced: old.is_some(),
                }
            }
            Some(state) => {
                let rec = StoredJob {
                    job,
                    generation,
                    state,
                };
                self.write_record(&key, &rec, old_ms)?;
                PutOutcome::Stored {
                    generation,
                    replaced: old.is_some(),
                    first: state.due_at,
                }
            }
        })
    }

    /// Deletes a job without flushing.
    pub fn delete_local(&self, key: &JobKey) -> Result<bool, StoreError> {
        let _w = self.lock();
        self.remove_locked(key.as_bytes())
    }

    /// Applies replicated firing state: only to the same generation, and only if it is later than
    /// what this replica has (the replica that fired the job is usually ahead of its own batch).
    pub fn apply_progress(&self, p: &Progress) -> Result<bool, StoreError> {
        let _w = self.lock();
        let Some(raw) = self.jobs.get(&p.key)? else {
            return Ok(false);
        };
        let Some(mut rec) = decode(&raw).filter(|r| r.generation == p.generation) else {
            return Ok(false);
        };
        match p.state {
            None => self.remove_locked(&p.key),
            Some(state) if is_later(&state, &rec.state) => {
                let old_ms = header(&raw).map(|(_, ms)| ms);
                rec.state = state;
                let key = JobKey::from_bytes(p.key.clone());
                self.write_record(&key, &rec, old_ms)?;
                Ok(true)
            }
            Some(_) => Ok(false),
        }
    }

    /// Every record, raw (for a snapshot).
    pub fn export(&self) -> Result<Records, StoreError> {
        let _w = self.lock();
        self.jobs
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    /// Replaces every record with `records` (from [`JobStore::export`]) and re-indexes.
    pub fn import(&self, records: Records) -> Result<(), StoreError> {
        let _w = self.lock();
        self.jobs.clear()?;
        let mut due = self.due_index();
        due.entries.clear();
        let mut max_gen = 0;
        for (k, v) in records {
            if let Some((g, ms)) = header(&v) {
                max_gen = max_gen.max(g);
                if self.indexed(&k) {
                    due.insert(ms, &k);
                }
                self.jobs.insert(k, v)?;
            }
        }
        self.next_generation
            .fetch_max(max_gen.saturating_add(1), Ordering::AcqRel);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic elsewhere cannot leave it inconsistent.
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every write made before this call durable, sharing the fsync with concurrent callers.
    pub async fn commit(&self) -> Result<(), StoreError> {
        if !self.durable {
            return Ok(());
        }
        let ticket = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let _turn = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // Every ticket up to here was taken after its writes, so this flush covers them all.
        let upto = self.requested.load(Ordering::Acquire);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Backend(format!("flush task failed: {e}")))??;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flushed.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.requested.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }

    /// Stores a job (with a new generation and its initial state) and returns once that is
    /// durable. With `overwrite: false` an existing job of that key is left alone: the answer is
    /// [`PutOutcome::AlreadyExists`], unless the stored job is this very one (a retry of a create
    /// whose answer was lost), which is answered as stored.
    pub async fn put(&self, job: Job, overwrite: bool) -> Result<PutOutcome, StoreError> {
        let key = job.key();
        let outcome = {
            let _w = self.lock();
            let old = self.jobs.get(key.as_bytes())?;
            match old.as_deref() {
                Some(raw) if !overwrite => match decode(raw).filter(|rec| rec.job == job) {
                    // The very job this request asks for (its definition includes the time the
                    // request was parsed): a retry of a create whose answer was lost, e.g. when
                    // the connection or the scheduler went down. It succeeded; answer so, and
                    // leave its ticks alone.
                    Some(rec) => PutOutcome::Stored {
                        generation: rec.generation,
                        replaced: false,
                        first: rec.state.due_at,
                    },
                    None => return Ok(PutOutcome::AlreadyExists),
                },
                _ => self.store_locked(&key, job, old)?,
            }
        };
        self.commit().await?;
        Ok(outcome)
    }

    /// The write side of [`JobStore::put`], under the write lock: stores `job` over `old`.
    fn store_locked(
        &self,
        key: &JobKey,
        job: Job,
        old: Option<sled::IVec>,
    ) -> Result<PutOutcome, StoreError> {
        let old_ms = old.as_deref().and_then(header).map(|(_, ms)| ms);
        Ok(match JobState::initial(&job) {
            None => {
                if let Some(ms) = old_ms {
                    self.jobs.remove(key.as_bytes())?;
                    self.due_index().remove(ms, key.as_bytes());
                }
                PutOutcome::NeverFires {
                    replaced: old.is_some(),
                }
            }
            Some(state) => {
                let generation = self.next_generation.fetch_add(1, Ordering::AcqRel);
                let rec = StoredJob {
                    job,
                    generation,
                    state,
                };
                self.write_record(key, &rec, old_ms)?;
                PutOutcome::Stored {
                    generation,
                    replaced: old.is_some(),
                    first: state.due_at,
                }
            }
        })
    }

    /// Writes `rec` over the record whose index position was `old_ms`, and moves its index entry.
    fn write_record(
        &self,
        key: &JobKey,
        rec: &StoredJob,
        old_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        self.write_raw(key, encode(rec)?, index_ms(rec.state.due_at), old_ms)
    }

    /// Writes an encoded record (index position `ms`) under the write lock.
    fn write_raw(
        &self,
        key: &JobKey,
        raw: Vec<u8>,
        ms: u64,
        old_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        self.jobs.insert(key.as_bytes(), raw)?;
        let mut due = self.due_index();
        if let Some(old) = old_ms {
            due.remove(old, key.as_bytes());
        }
        if self.indexed(key.as_bytes()) {
            due.insert(ms, key.as_bytes());
        }
        Ok(())
    }

    fn remove_locked(&self, key: &[u8]) -> Result<bool, StoreError> {
        let Some(old) = self.jobs.remove(key)? else {
            return Ok(false);
        };
        if let Some((_, ms)) = header(&old) {
            self.due_index().remove(ms, key);
        }
        Ok(true)
    }

    /// Deletes a job and returns once that is durable. After it returns, the job's only tick that
    /// can still reach the sink is one already handed to it.
    pub async fn delete(&self, key: &JobKey) -> Result<bool, StoreError> {
        let existed = {
            let _w = self.lock();
            self.remove_locked(key.as_bytes())?
        };
        if existed {
            self.commit().await?;
        }
        Ok(existed)
    }

    /// Deletes every job whose key starts with `prefix` (see [`JobKey::actor_prefix`]) and returns
    /// how many once that is durable.
    pub async fn delete_prefix(&self, prefix: &[u8]) -> Result<usize, StoreError> {
        let keys: Vec<_> = self
            .jobs
            .scan_prefix(prefix)
            .keys()
            .collect::<Result<_, _>>()?;
        let mut n = 0;
        {
            let _w = self.lock();
            for k in keys {
                n += usize::from(self.remove_locked(&k)?);
            }
        }
        if n > 0 {
            self.commit().await?;
        }
        Ok(n)
    }

    pub fn get(&self, key: &JobKey) -> Result<Option<StoredJob>, StoreError> {
        let Some(raw) = self.jobs.get(key.as_bytes())? else {
            return Ok(None);
        };
        match decode(&raw) {
            Some(rec) => Ok(Some(rec)),
            None => {
                let _w = self.lock();
                self.quarantine_record(key.as_bytes(), &raw)?;
                Ok(None)
            }
        }
    }

    /// Every readable job whose key starts with `prefix`, in key order.
    pub fn list_prefix(&self, prefix: &[u8]) -> Result<Vec<StoredJob>, StoreError> {
        let mut out = Vec::new();
        for item in self.jobs.scan_prefix(prefix) {
            let (_, raw) = item?;
            out.extend(decode(&raw));
        }
        Ok(out)
    }

    /// How many jobs are stored.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    // --- used by the trigger loop (no flush: losing one of these repeats a tick) ---------------

    /// Index entries in time order, from the first; `(ms, key)` (a copy, for tests).
    #[cfg(test)]
    pub(crate) fn due_entries(&self) -> impl Iterator<Item = Result<(u64, JobKey), StoreError>> {
        let all: Vec<_> = self.due_index().entries.iter().cloned().map(Ok).collect();
        all.into_iter()
    }

    /// Up to `limit` index entries at or before `until_ms`, in time order, leaving out those
    /// `skip` names (the jobs in flight).
    pub(crate) fn due_until(
        &self,
        until_ms: u64,
        limit: usize,
        skip: impl Fn(&JobKey) -> bool,
    ) -> Vec<(u64, JobKey)> {
        let due = self.due_index();
        let mut out = Vec::new();
        for (ms, key) in &due.entries {
            if *ms > until_ms || out.len() >= limit {
                break;
            }
            if !skip(key) {
                out.push((*ms, key.clone()));
            }
        }
        out
    }

    /// The index position of the first entry `skip` does not name.
    pub(crate) fn first_due(&self, skip: impl Fn(&JobKey) -> bool) -> Option<u64> {
        self.due_index()
            .entries
            .iter()
            .find(|(_, key)| !skip(key))
            .map(|(ms, _)| *ms)
    }

    /// Takes an index entry for the trigger loop: the entry is removed (the job's tick is in
    /// flight, so scans skip it; the outcome writes the next one), and the job it points at is
    /// returned if the entry is current. An unreadable record is quarantined.
    pub(crate) fn claim(&self, ms: u64, key: &JobKey) -> Result<Option<StoredJob>, StoreError> {
        let _w = self.lock();
        self.due_index().remove(ms, key.as_bytes());
        let raw = self.jobs.get(key.as_bytes())?;
        // Not current either if its partition stopped being fired since the entry was read.
        let current = self.indexed(key.as_bytes())
            && raw
                .as_deref()
                .and_then(header)
                .is_some_and(|(_, m)| m == ms);
        if !current {
            return Ok(None);
        }
        let raw = raw.unwrap_or_default();
        match decode(&raw) {
            Some(rec) => Ok(Some(rec)),
            None => {
                self.quarantine_record(key.as_bytes(), &raw)?;
                Ok(None)
            }
        }
    }

    /// Puts back the index entry of `key`'s current record (if its partition is indexed).
    pub(crate) fn reindex(&self, key: &JobKey) -> Result<(), StoreError> {
        let _w = self.lock();
        if let Some((_, ms)) = self.jobs.get(key.as_bytes())?.as_deref().and_then(header) {
            if self.indexed(key.as_bytes()) {
                self.due_index().insert(ms, key.as_bytes());
            }
        }
        Ok(())
    }

    /// Whether the index holds `(ms, key)` (for tests).
    #[cfg(test)]
    pub(crate) fn is_indexed_at(&self, ms: u64, key: &JobKey) -> bool {
        self.due_index().contains(ms, key)
    }

    /// Sets the state of the job `key` if it is still generation `generation`; false if it was
    /// deleted or replaced meanwhile (the tests' form of [`JobStore::set_state`]).
    #[cfg(test)]
    pub(crate) fn update_state(
        &self,
        key: &JobKey,
        generation: u64,
        state: JobState,
    ) -> Result<bool, StoreError> {
        match self.get(key)? {
            Some(rec) if rec.generation == generation => self.set_state(key, &rec, state),
            _ => Ok(false),
        }
    }

    /// Sets the state of `base`'s job (as the trigger loop read it when it claimed the tick) if
    /// the stored record is still `base`'s generation; false if it was deleted or replaced
    /// meanwhile. The generation is checked on the record's header, without decoding it.
    pub(crate) fn set_state(
        &self,
        key: &JobKey,
        base: &StoredJob,
        state: JobState,
    ) -> Result<bool, StoreError> {
        let _w = self.lock();
        let Some(raw) = self.jobs.get(key.as_bytes())? else {
            return Ok(false);
        };
        let Some((generation, old_ms)) = header(&raw) else {
            return Ok(false);
        };
        if generation != base.generation {
            return Ok(false);
        }
        // The job's JSON is copied as it is stored: only the header and the state change.
        let new = match job_json(&raw) {
            Some(json) => encode_with(generation, &state, json),
            None => encode(&StoredJob {
                state,
                ..base.clone()
            })?,
        };
        self.write_raw(key, new, index_ms(state.due_at), Some(old_ms))?;
        self.record_progress(key.as_bytes(), generation, Some(state));
        Ok(true)
    }

    /// Removes the job `key` (it has no tick left) if it is still generation `generation`.
    pub(crate) fn finish(&self, key: &JobKey, generation: u64) -> Result<bool, StoreError> {
        let _w = self.lock();
        let current = self
            .jobs
            .get(key.as_bytes())?
            .as_deref()
            .and_then(header)
            .is_some_and(|(g, _)| g == generation);
        if !current {
            return Ok(false);
        }
        self.record_progress(key.as_bytes(), generation, None);
        self.remove_locked(key.as_bytes())
    }
}

#[cfg(test)]
mod tests;
