use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, TimeZone};

use super::*;
use crate::job::{FailurePolicy, JobSpec, Target};
use crate::schedule::Schedule;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().unwrap()
}

fn job(name: &str, due_s: i64) -> Job {
    Job {
        name: name.into(),
        target: Target::App {
            app_id: "app".into(),
            namespace: "ns".into(),
        },
        schedule: None,
        due_time: Some(t0() + TimeDelta::seconds(due_s)),
        created_at: t0(),
        repeats: None,
        expiry: None,
        data: br#"{"n":1}"#.to_vec(),
        failure_policy: FailurePolicy::default(),
        spec: JobSpec::default(),
    }
}

fn entries(s: &JobStore) -> Vec<(u64, String)> {
    s.due_entries()
        .map(|e| e.map(|(ms, k)| (ms, k.to_string())).unwrap())
        .collect()
}

#[test]
fn index_positions_round_up() {
    assert_eq!(index_ms(t0()), t0().timestamp_millis() as u64);
    let t = t0() + TimeDelta::nanoseconds(1);
    assert_eq!(index_ms(t), t0().timestamp_millis() as u64 + 1);
    assert!(index_time(index_ms(t)) >= t);
    assert_eq!(index_ms(DateTime::<Utc>::MIN_UTC), 0);
    assert_eq!(index_time(u64::MAX), DateTime::<Utc>::MAX_UTC);
}

#[tokio::test]
async fn put_get_delete() {
    let s = JobStore::temporary().unwrap();
    let j = job("a", 5);
    let out = s.put(j.clone(), false).await.unwrap();
    let PutOutcome::Stored {
        generation,
        replaced: false,
        first,
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(first, t0() + TimeDelta::seconds(5));
    let rec = s.get(&j.key()).unwrap().unwrap();
    assert_eq!(rec.job, j);
    assert_eq!(rec.generation, generation);
    assert_eq!(rec.state, JobState::initial(&j).unwrap());
    assert_eq!(s.len(), 1);
    let other = Job {
        created_at: t0() + TimeDelta::nanoseconds(1),
        ..j.clone()
    };
    assert_eq!(
        s.put(other, false).await.unwrap(),
        PutOutcome::AlreadyExists
    );
    let out = s.put(j.clone(), true).await.unwrap();
    assert!(
        matches!(out, PutOutcome::Stored { generation: g, replaced: true, .. } if g > generation)
    );
    assert_eq!(entries(&s).len(), 1, "an overwrite leaves one index entry");
    assert!(s.delete(&j.key()).await.unwrap());
    assert!(!s.delete(&j.key()).await.unwrap());
    assert_eq!(s.get(&j.key()).unwrap(), None);
    assert!(entries(&s).is_empty());
    assert!(s.is_empty());
}

/// Found by the scheduler simulation (`sims/src/sched_sim.rs`, seed 642): a create without
/// overwrite stored its job, its answer was lost when the scheduler crashed, the client tried
/// again and was told "already exists" about its own job, so the app believed nothing was
/// scheduled while the job fired. A create of the very job stored (same definition, same
/// parse time) is a retry: it succeeds, and the job's ticks are left alone.
#[tokio::test]
async fn a_retried_create_without_overwrite_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let s = JobStore::open(dir.path()).unwrap();
    let mut j = job("a", 5);
    j.schedule = Some(Schedule::Every(Duration::from_secs(1)));
    let PutOutcome::Stored { generation, .. } = s.put(j.clone(), false).await.unwrap() else {
        panic!("not stored")
    };
    // It fired twice meanwhile.
    let fired = JobState {
        tick: t0() + TimeDelta::seconds(7),
        due_at: t0() + TimeDelta::seconds(7),
        attempt: 0,
        count: 2,
        last: Some(t0() + TimeDelta::seconds(6)),
        epoch: 0,
    };
    assert!(s.update_state(&j.key(), generation, fired).unwrap());
    let commits = s.stats().commits;
    assert_eq!(
        s.put(j.clone(), false).await.unwrap(),
        PutOutcome::Stored {
            generation,
            replaced: false,
            first: fired.due_at,
        }
    );
    assert!(
        s.stats().commits > commits,
        "the answer waits until the stored job is durable"
    );
    let rec = s.get(&j.key()).unwrap().unwrap();
    assert_eq!((rec.generation, rec.state), (generation, fired));
    assert_eq!(entries(&s).len(), 1);
    // Another create of that key (a different request, even with the same body) is refused.
    let other = Job {
        created_at: j.created_at + TimeDelta::milliseconds(3),
        ..j.clone()
    };
    assert_eq!(
        s.put(other, false).await.unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(s.get(&j.key()).unwrap().unwrap().state, fired);
}

#[tokio::test]
async fn jobs_that_never_fire_are_not_stored() {
    let s = JobStore::temporary().unwrap();
    let mut j = job("a", 5);
    s.put(j.clone(), false).await.unwrap();
    j.schedule = Some(Schedule::Every(Duration::from_secs(10)));
    j.due_time = None;
    j.expiry = Some(t0() + TimeDelta::seconds(1));
    assert_eq!(
        s.put(j.clone(), true).await.unwrap(),
        PutOutcome::NeverFires { replaced: true }
    );
    assert_eq!(s.get(&j.key()).unwrap(), None);
    assert!(entries(&s).is_empty());
}

#[tokio::test]
async fn the_index_is_in_time_order() {
    let s = JobStore::temporary().unwrap();
    for (name, due) in [("c", 30), ("a", 10), ("b", 20), ("d", -5)] {
        s.put(job(name, due), false).await.unwrap();
    }
    let names: Vec<String> = entries(&s).into_iter().map(|(_, k)| k).collect();
    assert_eq!(
        names,
        [
            "app||ns||app||d",
            "app||ns||app||a",
            "app||ns||app||b",
            "app||ns||app||c"
        ]
    );
}

#[tokio::test]
async fn claims_and_updates_follow_the_generation() {
    let s = JobStore::temporary().unwrap();
    let j = job("a", 5);
    let PutOutcome::Stored { generation, .. } = s.put(j.clone(), false).await.unwrap() else {
        panic!()
    };
    let (ms, key) = s.due_entries().next().unwrap().unwrap();
    assert_eq!(s.claim(ms, &key).unwrap().unwrap().generation, generation);
    // A stale entry is dropped.
    assert_eq!(s.claim(ms + 1, &key).unwrap(), None);
    let mut st = JobState::initial(&j).unwrap();
    st.due_at += TimeDelta::seconds(60);
    st.attempt = 1;
    assert!(s.update_state(&key, generation, st).unwrap());
    assert_eq!(s.get(&key).unwrap().unwrap().state, st);
    assert_eq!(entries(&s), vec![(index_ms(st.due_at), key.to_string())]);
    assert_eq!(
        s.claim(ms, &key).unwrap(),
        None,
        "the old position is stale now"
    );
    assert!(!s.update_state(&key, generation + 1, st).unwrap());
    assert!(!s.finish(&key, generation + 1).unwrap());
    assert!(s.finish(&key, generation).unwrap());
    assert_eq!(s.get(&key).unwrap(), None);
    assert!(entries(&s).is_empty());
    assert!(
        !s.update_state(&key, generation, st).unwrap(),
        "no resurrection after delete"
    );
    assert_eq!(s.get(&key).unwrap(), None);
}

#[tokio::test]
async fn prefixes_select_one_actor() {
    let s = JobStore::temporary().unwrap();
    let mk = |actor: &str, name: &str| {
        let mut j = job(name, 1);
        j.target = Target::ActorReminder {
            app_id: None,
            namespace: "ns".into(),
            actor_type: "T".into(),
            actor_id: actor.into(),
        };
        j
    };
    for (a, n) in [("1", "x"), ("1", "y"), ("11", "x"), ("2", "x")] {
        s.put(mk(a, n), false).await.unwrap();
    }
    let prefix = JobKey::actor_prefix("ns", "T", "1");
    assert_eq!(s.list_prefix(&prefix).unwrap().len(), 2);
    assert_eq!(s.delete_prefix(&prefix).await.unwrap(), 2);
    assert_eq!(s.len(), 2);
    assert_eq!(entries(&s).len(), 2);
}

#[tokio::test]
async fn reopening_reindexes_and_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let key = {
        let s = JobStore::open(dir.path()).unwrap();
        s.put(job("a", 5), false).await.unwrap();
        s.put(job("b", 6), false).await.unwrap();
        job("a", 5).key()
    };
    {
        // Garbage, and the on-disk index of stores written before the index was kept in memory.
        let db = sled::open(dir.path()).unwrap();
        let due = db.open_tree("due").unwrap();
        due.insert(b"stale", &[][..]).unwrap();
        db.open_tree("jobs")
            .unwrap()
            .insert(b"junk", &b"x"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let s = JobStore::open(dir.path()).unwrap();
    assert_eq!(
        entries(&s).len(),
        2,
        "the index is rebuilt from the records"
    );
    assert!(
        !s.db.tree_names().iter().any(|n| n.as_ref() == b"due"),
        "the old index tree is dropped"
    );
    assert!(s.get(&key).unwrap().is_some());
    assert_eq!(s.len(), 2, "the unreadable record was moved aside");
    let PutOutcome::Stored { generation, .. } = s.put(job("c", 1), false).await.unwrap() else {
        panic!()
    };
    assert!(generation > 2, "generations keep growing across restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(JobStore::open(dir.path()).unwrap());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.put(job(&format!("j{i}"), i), false).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(
            t.await.unwrap().unwrap(),
            PutOutcome::Stored { .. }
        ));
    }
    let stats = s.stats();
    assert_eq!(stats.commits, 64);
    assert!(
        stats.flushes >= 1 && stats.flushes < stats.commits,
        "64 concurrent creates should share flushes: {stats:?}"
    );
    eprintln!("64 concurrent creates: {} flushes", stats.flushes);
}

#[test]
fn replicated_puts_are_idempotent_and_progress_only_moves_forward() {
    let s = JobStore::temporary().unwrap();
    let j = job("a", 5);
    let key = j.key();
    assert!(matches!(
        s.put_as(j.clone(), false, 7).unwrap(),
        PutOutcome::Stored { generation: 7, .. }
    ));
    // A replay of the same entry changes nothing; another create without overwrite is refused.
    assert!(matches!(
        s.put_as(j.clone(), false, 7).unwrap(),
        PutOutcome::Stored {
            generation: 7,
            replaced: false,
            ..
        }
    ));
    assert_eq!(
        s.put_as(j.clone(), false, 9).unwrap(),
        PutOutcome::AlreadyExists
    );
    let st0 = s.get(&key).unwrap().unwrap().state;
    let later = JobState {
        count: 3,
        due_at: st0.due_at + TimeDelta::seconds(3),
        tick: st0.tick + TimeDelta::seconds(3),
        ..st0
    };
    let p = |generation, state| Progress {
        key: key.as_bytes().to_vec(),
        generation,
        state,
    };
    assert!(s.apply_progress(&p(7, Some(later))).unwrap());
    assert!(
        !s.apply_progress(&p(7, Some(st0))).unwrap(),
        "never backwards"
    );
    assert!(
        !s.apply_progress(&p(8, Some(later))).unwrap(),
        "other generation"
    );
    assert_eq!(entries(&s), vec![(index_ms(later.due_at), key.to_string())]);
    // Export / import round trip.
    let records = s.export().unwrap();
    let t = JobStore::temporary().unwrap();
    t.import(records).unwrap();
    assert_eq!(t.get(&key).unwrap(), s.get(&key).unwrap());
    assert_eq!(entries(&t), entries(&s));
    // A finished job goes away.
    assert!(s.apply_progress(&p(7, None)).unwrap());
    assert_eq!(s.get(&key).unwrap(), None);
    assert!(entries(&s).is_empty());
}

#[test]
fn the_index_holds_only_owned_partitions_and_follows_changes() {
    let s = JobStore::temporary().unwrap();
    let keys: Vec<JobKey> = (0..64)
        .map(|i| {
            let j = job(&format!("j{i}"), i);
            s.put_as(j.clone(), true, i as u64 + 1).unwrap();
            j.key()
        })
        .collect();
    assert_eq!(entries(&s).len(), 64);
    let mine: std::collections::HashSet<u32> = [0, 1, 2, 3].into();
    s.set_owned(Some(mine.clone())).unwrap();
    let expect = keys
        .iter()
        .filter(|k| mine.contains(&partition_of(k.as_bytes())))
        .count();
    assert_eq!(entries(&s).len(), expect);
    // Writes to a partition not owned keep the record but add no entry.
    let other = keys
        .iter()
        .find(|k| !mine.contains(&partition_of(k.as_bytes())))
        .unwrap();
    let rec = s.get(other).unwrap().unwrap();
    let st = JobState {
        attempt: 1,
        ..rec.state
    };
    assert!(s.update_state(other, rec.generation, st).unwrap());
    assert_eq!(entries(&s).len(), expect);
    s.set_owned(None).unwrap();
    assert_eq!(entries(&s).len(), 64);
    // Progress is recorded only once tracking is on.
    assert!(s.take_progress().is_empty());
    s.track_progress();
    assert!(s.update_state(other, rec.generation, rec.state).unwrap());
    let p = s.take_progress();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, other.as_bytes());
    s.restore_progress(p);
    assert_eq!(s.take_progress().len(), 1);
}

#[test]
fn binary_states_round_trip() {
    let j = job("a", 5);
    let base = JobState::initial(&j).unwrap();
    let states = [
        base,
        JobState {
            tick: t0() + TimeDelta::nanoseconds(123_456_789),
            due_at: t0() + TimeDelta::milliseconds(1_500),
            attempt: 7,
            count: u32::MAX,
            last: Some(t0() - TimeDelta::nanoseconds(1)),
            epoch: u64::MAX,
        },
        JobState {
            tick: DateTime::<Utc>::MIN_UTC,
            due_at: DateTime::<Utc>::MAX_UTC,
            last: Some(DateTime::<Utc>::UNIX_EPOCH),
            ..base
        },
    ];
    for (i, st) in states.into_iter().enumerate() {
        let rec = StoredJob {
            job: j.clone(),
            generation: 40 + i as u64,
            state: st,
        };
        let raw = encode(&rec).unwrap();
        assert_eq!(header(&raw), Some((rec.generation, index_ms(st.due_at))));
        assert_eq!(raw.len(), JOB_AT + serde_json::to_vec(&j).unwrap().len());
        assert_eq!(decode(&raw), Some(rec));
    }
    // Damaged records do not decode (and so are quarantined, not misread).
    let raw = encode(&StoredJob {
        job: j.clone(),
        generation: 1,
        state: base,
    })
    .unwrap();
    let mut bad_flag = raw.clone();
    bad_flag[HEADER + 1 + 32] = 2;
    assert_eq!(decode(&bad_flag), None);
    assert_eq!(decode(&raw[..JOB_AT - 1]), None);
    assert_eq!(decode(&raw[..raw.len() - 1]), None);
}

/// A record as stored before the binary state: the header, then all of it as JSON.
fn legacy_record(rec: &StoredJob) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&rec.generation.to_be_bytes());
    out.extend_from_slice(&index_ms(rec.state.due_at).to_be_bytes());
    serde_json::to_writer(&mut out, rec).unwrap();
    out
}

#[tokio::test]
async fn records_of_the_older_format_are_read_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let j = job("a", 5);
    let key = j.key();
    let rec = StoredJob {
        job: j.clone(),
        generation: 9,
        state: JobState::initial(&j).unwrap(),
    };
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("jobs")
            .unwrap()
            .insert(key.as_bytes(), legacy_record(&rec))
            .unwrap();
        db.flush().unwrap();
    }
    let s = JobStore::open(dir.path()).unwrap();
    assert_eq!(s.get(&key).unwrap(), Some(rec.clone()));
    assert_eq!(
        entries(&s),
        vec![(index_ms(rec.state.due_at), key.to_string())]
    );
    let claimed = s.claim(index_ms(rec.state.due_at), &key).unwrap().unwrap();
    assert_eq!(claimed, rec);
    let next = JobState {
        tick: rec.state.tick + TimeDelta::seconds(1),
        due_at: rec.state.due_at + TimeDelta::seconds(1),
        count: 1,
        last: Some(rec.state.tick),
        ..rec.state
    };
    assert!(s.set_state(&key, &claimed, next).unwrap());
    let raw = s.jobs.get(key.as_bytes()).unwrap().unwrap();
    assert_eq!(
        raw.get(HEADER),
        Some(&FORMAT_BINARY),
        "rewritten in the new format"
    );
    assert_eq!(s.get(&key).unwrap(), Some(StoredJob { state: next, ..rec }));
}

#[tokio::test]
async fn state_updates_keep_the_job_and_move_the_index_entry() {
    let s = JobStore::temporary().unwrap();
    let j = job("a", 5);
    let key = j.key();
    let PutOutcome::Stored { generation, .. } = s.put(j.clone(), false).await.unwrap() else {
        panic!()
    };
    let json_before = job_json(&s.jobs.get(key.as_bytes()).unwrap().unwrap())
        .unwrap()
        .to_vec();
    let (ms, _) = s.due_entries().next().unwrap().unwrap();
    let rec = s.claim(ms, &key).unwrap().unwrap();
    assert!(entries(&s).is_empty(), "a claimed entry leaves the index");
    assert_eq!(s.first_due(|_| false), None);
    let mut st = rec.state;
    for i in 1..=3u32 {
        st = JobState {
            tick: st.tick + TimeDelta::seconds(1),
            due_at: st.due_at + TimeDelta::seconds(1),
            count: i,
            last: Some(st.tick),
            epoch: u64::from(i),
            attempt: 0,
        };
        assert!(s.set_state(&key, &rec, st).unwrap());
        let raw = s.jobs.get(key.as_bytes()).unwrap().unwrap();
        assert_eq!(
            job_json(&raw).unwrap(),
            &json_before[..],
            "the job's bytes are kept"
        );
        assert_eq!(s.get(&key).unwrap().unwrap().state, st);
        assert_eq!(entries(&s), vec![(index_ms(st.due_at), key.to_string())]);
        assert!(s.is_indexed_at(index_ms(st.due_at), &key));
    }
    assert_eq!(s.get(&key).unwrap().unwrap().generation, generation);
    // Queries over the index: bounded by time and count, skipping what the loop names.
    let due = index_ms(st.due_at);
    assert_eq!(s.due_until(due - 1, 10, |_| false), vec![]);
    assert_eq!(s.due_until(due, 10, |_| false), vec![(due, key.clone())]);
    assert_eq!(s.due_until(due, 0, |_| false), vec![]);
    assert_eq!(s.due_until(due, 10, |k| *k == key), vec![]);
    assert_eq!(s.first_due(|_| false), Some(due));
    assert_eq!(s.first_due(|k| *k == key), None);
    // A delete takes the entry with it; a later outcome of the deleted job writes nothing.
    assert!(s.delete(&key).await.unwrap());
    assert!(entries(&s).is_empty());
    assert!(!s.set_state(&key, &rec, st).unwrap());
    assert!(entries(&s).is_empty());
    assert_eq!(s.get(&key).unwrap(), None);
}
