//! The write-ahead log that makes `state.sled` writes durable and atomic.
//!
//! - A writer, under the log's lock, checks its conditions against the current state (pending
//!   logged writes first, then sled), appends the post-images of the keys it changes as one
//!   record, and registers them as pending. The lock keeps the log in decision order.
//! - One syncer task runs `fdatasync`s back to back, so concurrent writers share each one. After a
//!   sync it applies the synced records to sled in log order and only then releases their
//!   writers. So a reader never sees a write that is not yet durable, and whatever a crash leaves
//!   in sled is completed from the log on the next open (no half transaction survives).
//! - Sled transactions are never used: they take a process-wide lock that sled's flush holds for
//!   seconds. The log's own lock and in-order application give the same atomicity.
//! - Once a second, if anything was logged, the checkpoint starts a new file, waits until
//!   everything in the old one is applied, flushes sled and deletes the old file.
//! - Recovery replays every remaining file in order, stopping at a torn tail (a record whose length
//!   or checksum does not hold was never acknowledged).
//!
//! File format: records `[len u32 LE][crc32 u32 LE][payload]`; a payload is a sequence of
//! `[key len u32 LE][key][0 = delete | 1 = put][value len u32 LE][value]` (the value only for
//! puts): the raw records the transaction leaves behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::state::StateError;

const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// What the log writes through to.
pub trait Target: Send + Sync + 'static {
    /// The current raw record of a key.
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Sets (or removes) the raw record of a key.
    fn apply(&self, key: &[u8], post: Option<&[u8]>) -> Result<(), StateError>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), StateError>;
}

/// Post-images of one transaction: key and new raw record (`None` = deleted).
pub type Posts = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn io(what: &str, e: std::io::Error) -> StateError {
    StateError::Backend(format!("write-ahead log: {what}: {e}"))
}

fn file_name(gen: u64) -> String {
    format!("wal-{gen:020}.log")
}

/// The log files in `dir`, oldest first.
fn files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StateError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("cannot list the log directory", e)),
    };
    for e in entries {
        let path = e
            .map_err(|e| io("cannot list the log directory", e))?
            .path();
        let gen = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("wal-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(gen) = gen {
            out.push((gen, path));
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("cannot sync the log directory", e))
}

/// Encodes one transaction's post-images as a record.
pub fn encode_record<'a>(entries: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> Vec<u8> {
    let mut payload = Vec::new();
    for (key, post) in entries {
        payload.extend_from_slice(&(key.len() as u32).to_le_bytes());
        payload.extend_from_slice(key);
        match post {
            Some(v) => {
                payload.push(1);
                payload.extend_from_slice(&(v.len() as u32).to_le_bytes());
                payload.extend_from_slice(v);
            }
            None => payload.push(0),
        }
    }
    let mut rec = Vec::with_capacity(8 + payload.len());
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    rec.extend_from_slice(&payload);
    rec
}

type Entry<'a> = (&'a [u8], Option<&'a [u8]>);

/// Decodes the complete records of a file; stops at the first torn or corrupt one.
fn decode_records(buf: &[u8]) -> (Vec<Vec<Entry<'_>>>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 8 {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().expect("4 bytes"));
        let Some(payload) = buf.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(entries) = decode_payload(payload) else {
            break;
        };
        out.push(entries);
        at += 8 + len;
    }
    (out, at)
}

fn decode_payload(mut p: &[u8]) -> Option<Vec<Entry<'_>>> {
    let mut out = Vec::new();
    let take_u32 = |p: &mut &[u8]| -> Option<usize> {
        let (n, rest) = p.split_at_checked(4)?;
        *p = rest;
        Some(u32::from_le_bytes(n.try_into().ok()?) as usize)
    };
    while !p.is_empty() {
        let klen = take_u32(&mut p)?;
        let (key, rest) = p.split_at_checked(klen)?;
        let (tag, rest) = rest.split_first()?;
        p = rest;
        match tag {
            0 => out.push((key, None)),
            1 => {
                let vlen = take_u32(&mut p)?;
                let (v, rest) = p.split_at_checked(vlen)?;
                p = rest;
                out.push((key, Some(v)));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Replays every log file in `dir` into `target`, flushes it, then deletes the files.
fn recover(dir: &Path, target: &dyn Target) -> Result<usize, StateError> {
    let found = files(dir)?;
    let mut records = 0;
    for (_, path) in &found {
        let buf = std::fs::read(path).map_err(|e| io("cannot read a log file", e))?;
        let (recs, used) = decode_records(&buf);
        if used < buf.len() {
            tracing::warn!(file = %path.display(), torn_bytes = buf.len() - used, "ignoring a torn tail of the write-ahead log (never acknowledged)");
        }
        for rec in recs {
            for (key, post) in rec {
                target.apply(key, post)?;
            }
            records += 1;
        }
    }
    if !found.is_empty() {
        target.flush()?;
        for (_, path) in &found {
            std::fs::remove_file(path).map_err(|e| io("cannot remove a replayed log file", e))?;
        }
    }
    Ok(records)
}

struct Current {
    gen: u64,
    file: Arc<File>,
    bytes: u64,
    /// Logged, not yet synced and applied, in log order.
    pending: Vec<(u64, Posts)>,
    /// The newest pending post-image of each key, with its sequence number.
    overlay: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
}

/// The open log: appends, group-committed syncs, in-order application and checkpoints.
pub struct Wal<T: Target> {
    dir: PathBuf,
    target: Arc<T>,
    current: Mutex<Current>,
    requested: AtomicU64,
    done: watch::Sender<(u64, Option<Arc<str>>)>,
    wake: Notify,
    closed: AtomicBool,
    /// Set when a sync or an apply failed: the on-disk outcome of pending writes is unknown, so
    /// the store refuses further writes instead of guessing.
    failed: Mutex<Option<Arc<str>>>,
}

fn create(dir: &Path, gen: u64) -> Result<Arc<File>, StateError> {
    let f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(dir.join(file_name(gen)))
        .map_err(|e| io("cannot create a log file", e))?;
    sync_dir(dir)?;
    Ok(Arc::new(f))
}

impl<T: Target> Wal<T> {
    /// Replays what a crash left in `dir`, starts a fresh log file and the sync task. Returns the
    /// log and the number of records replayed.
    pub fn open(dir: &Path, target: Arc<T>) -> Result<(Arc<Self>, usize), StateError> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create the log directory", e))?;
        let replayed = recover(dir, &*target)?;
        let gen = files(dir)?.last().map_or(1, |(g, _)| g + 1);
        let file = create(dir, gen)?;
        let wal = Arc::new(Wal {
            dir: dir.to_path_buf(),
            target,
            current: Mutex::new(Current {
                gen,
                file,
                bytes: 0,
                pending: Vec::new(),
                overlay: HashMap::new(),
            }),
            requested: AtomicU64::new(0),
            done: watch::Sender::new((0, None)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            failed: Mutex::new(None),
        });
        spawn_syncer(wal.clone());
        Ok((wal, replayed))
    }

    /// Under the log's lock: `decide` reads keys through the view it is given (pending writes
    /// first, then the target) and returns the post-images to write, or an error that writes
    /// nothing. The record is appended and registered. Returns the sequence number to pass to
    /// [`Wal::durable`].
    pub fn submit(
        &self,
        decide: impl FnOnce(
            &dyn Fn(&[u8]) -> Result<Option<Vec<u8>>, StateError>,
        ) -> Result<Posts, StateError>,
    ) -> Result<u64, StateError> {
        if let Some(e) = self.failed.lock().expect("lock").clone() {
            return Err(StateError::Backend(format!(
                "store is read-only after a failed sync: {e}"
            )));
        }
        let mut cur = self.current.lock().expect("wal lock");
        let posts = {
            let overlay = &cur.overlay;
            let view = |key: &[u8]| match overlay.get(key) {
                Some((_, post)) => Ok(post.clone()),
                None => self.target.read(key),
            };
            decide(&view)?
        };
        let rec = encode_record(posts.iter().map(|(k, p)| (k.as_slice(), p.as_deref())));
        (&*cur.file)
            .write_all(&rec)
            .map_err(|e| io("append failed", e))?;
        cur.bytes += rec.len() as u64;
        let seq = self.requested.load(Ordering::Acquire) + 1;
        for (k, p) in &posts {
            cur.overlay.insert(k.clone(), (seq, p.clone()));
        }
        cur.pending.push((seq, posts));
        self.requested.store(seq, Ordering::Release);
        Ok(seq)
    }

    /// Returns once the write numbered `seq` is on disk and applied.
    pub async fn durable(&self, seq: u64) -> Result<(), StateError> {
        let mut rx = self.done.subscribe();
        self.wake.notify_one();
        let state = rx
            .wait_for(|(done, err)| *done >= seq || err.is_some())
            .await
            .map_err(|_| StateError::Backend("store closed before the write was synced".into()))?;
        match &state.1 {
            None => Ok(()),
            Some(e) => Err(StateError::Backend(e.to_string())),
        }
    }

    /// Syncs the current file, then applies everything it synced.
    fn sync_and_apply(&self) -> Result<Option<u64>, StateError> {
        let (upto, file, batch) = {
            let mut cur = self.current.lock().expect("wal lock");
            let upto = self.requested.load(Ordering::Acquire);
            if cur.pending.is_empty() {
                return Ok(None);
            }
            (upto, cur.file.clone(), std::mem::take(&mut cur.pending))
        };
        file.sync_data().map_err(|e| io("fdatasync failed", e))?;
        for (_, posts) in &batch {
            for (k, p) in posts {
                self.target.apply(k, p.as_deref())?;
            }
        }
        let mut cur = self.current.lock().expect("wal lock");
        for (seq, posts) in &batch {
            for (k, _) in posts {
                if cur.overlay.get(k).is_some_and(|(s, _)| s == seq) {
                    cur.overlay.remove(k);
                }
            }
        }
        Ok(Some(upto))
    }

    /// Starts a new file, waits until the old one is applied, flushes the target and deletes
    /// the old file.
    async fn checkpoint(self: &Arc<Self>) -> Result<(), StateError> {
        let me = self.clone();
        let rotated = tokio::task::spawn_blocking(move || {
            let mut cur = me.current.lock().expect("wal lock");
            if cur.bytes == 0 {
                return Ok(None);
            }
            // Writers moving to the new file must not leave unsynced records behind: the syncer
            // only syncs the current file.
            cur.file.sync_data().map_err(|e| io("sync failed", e))?;
            let next = cur.gen + 1;
            let file = create(&me.dir, next)?;
            let old = cur.gen;
            cur.gen = next;
            cur.file = file;
            cur.bytes = 0;
            Ok::<_, StateError>(Some((old, me.requested.load(Ordering::Acquire))))
        })
        .await
        .map_err(StateError::backend)??;
        let Some((old_gen, last_seq)) = rotated else {
            return Ok(());
        };
        self.wake.notify_one();
        let mut rx = self.done.subscribe();
        rx.wait_for(|(done, err)| *done >= last_seq || err.is_some())
            .await
            .map_err(|_| StateError::Backend("store closed".into()))?;
        if let Some(e) = rx.borrow().1.clone() {
            return Err(StateError::Backend(e.to_string()));
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.target.flush()?;
            std::fs::remove_file(me.dir.join(file_name(old_gen)))
                .map_err(|e| io("cannot remove a checkpointed log file", e))
        })
        .await
        .map_err(StateError::backend)?
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

fn spawn_syncer<T: Target>(wal: Arc<Wal<T>>) {
    tokio::spawn(async move {
        loop {
            wal.wake.notified().await;
            if wal.closed.load(Ordering::Acquire) {
                return;
            }
            let w = wal.clone();
            let res = tokio::task::spawn_blocking(move || w.sync_and_apply()).await;
            match res {
                Ok(Ok(Some(upto))) => {
                    wal.done.send_replace((upto, None));
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => fail(&wal, e.to_string()),
                Err(e) => fail(&wal, format!("sync task failed: {e}")),
            }
        }
    });
}

fn fail<T: Target>(wal: &Wal<T>, e: String) {
    tracing::error!(error = %e, "state store sync failed; refusing further writes");
    let e: Arc<str> = Arc::from(e);
    *wal.failed.lock().expect("lock") = Some(e.clone());
    let done = wal.done.borrow().0;
    wal.done.send_replace((done, Some(e)));
}

/// Checkpoints once a second until the store is dropped.
pub fn spawn_checkpointer<T: Target>(alive: Weak<()>, wal: Arc<Wal<T>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.upgrade().is_none() {
                return;
            }
            if let Err(e) = wal.checkpoint().await {
                tracing::error!(error = %e, "checkpoint failed; the log keeps growing until one succeeds");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(r: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<Entry<'_>> {
        r.iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
            .collect()
    }

    proptest! {
        #[test]
        fn records_round_trip_and_torn_tails_are_cut(
            recs in prop::collection::vec(prop::collection::vec((prop::collection::vec(any::<u8>(), 0..20), prop::option::of(prop::collection::vec(any::<u8>(), 0..40))), 1..5), 1..6),
            cut in 0usize..200,
        ) {
            let mut buf = Vec::new();
            for r in &recs {
                buf.extend(encode_record(r.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))));
            }
            let (decoded, used) = decode_records(&buf);
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(decoded.len(), recs.len());
            for (d, r) in decoded.iter().zip(&recs) {
                prop_assert_eq!(d, &entries(r));
            }
            // Any truncation decodes to a prefix of the records, never to garbage.
            let torn = &buf[..buf.len().saturating_sub(cut % buf.len().max(1))];
            let (prefix, _) = decode_records(torn);
            prop_assert!(prefix.len() <= recs.len());
            for (d, r) in prefix.iter().zip(&recs) {
                prop_assert_eq!(d, &entries(r));
            }
        }
    }
}
