use chrono::{DateTime, TimeDelta, TimeZone, Utc};

use super::*;
use crate::job::{FailurePolicy, JobSpec, Target};
use crate::store::JobState;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().unwrap()
}

fn job(name: &str) -> Job {
    Job {
        name: name.into(),
        target: Target::App {
            app_id: "app".into(),
            namespace: "ns".into(),
        },
        schedule: Some(crate::schedule::parse_job_schedule("@every 1s").unwrap()),
        due_time: None,
        created_at: t0(),
        repeats: None,
        expiry: None,
        data: Vec::new(),
        failure_policy: FailurePolicy::default(),
        spec: JobSpec::default(),
    }
}

fn machine() -> StateMachine {
    let db = sled::Config::new().temporary(true).open().unwrap();
    open(db, false).unwrap().1
}

fn progress(key: &JobKey, generation: u64, state: JobState, epoch: u64) -> Vec<PartitionProgress> {
    vec![PartitionProgress {
        partition: partition_of(key.as_bytes()),
        epoch,
        items: vec![Progress {
            key: key.as_bytes().to_vec(),
            generation,
            state: Some(state),
        }],
    }]
}

/// The fence: once a partition moved, a tick completion from its former owner (stale epoch) is
/// rejected and changes nothing; the new owner's is applied.
#[test]
fn stale_epoch_completion_is_rejected() {
    let sm = machine();
    let j = job("a");
    let key = j.key();
    let p = partition_of(key.as_bytes());
    let out = sm
        .apply_command(
            1,
            &Command::Put {
                job: Box::new(j),
                overwrite: true,
            },
        )
        .unwrap();
    assert!(matches!(
        out,
        Applied::Put(PutOutcome::Stored { generation: 1, .. })
    ));
    let before = sm.store().get(&key).unwrap().unwrap();

    // Replica 1 owns the partition at epoch 2, then it moves to replica 2 at epoch 3.
    sm.apply_command(
        2,
        &Command::Assign {
            changes: vec![(p, Some(1))],
        },
    )
    .unwrap();
    sm.apply_command(
        3,
        &Command::Assign {
            changes: vec![(p, Some(2))],
        },
    )
    .unwrap();
    let slot = lock(&sm.meta).assignment.slot(p);
    assert_eq!((slot.owner, slot.epoch), (Some(2), 3));

    let later = JobState {
        count: 1,
        tick: before.state.tick + TimeDelta::seconds(1),
        due_at: before.state.tick + TimeDelta::seconds(1),
        last: Some(before.state.tick),
        ..before.state
    };
    // The former owner, at its old epoch: rejected.
    let out = sm
        .apply_command(
            4,
            &Command::Progress {
                from: 1,
                parts: progress(&key, 1, later, 2),
            },
        )
        .unwrap();
    assert_eq!(
        out,
        Applied::Progress {
            accepted: 0,
            rejected: 1
        }
    );
    assert_eq!(sm.store().get(&key).unwrap().unwrap().state, before.state);
    // The new owner at the old epoch, or the old owner at the new one: rejected too.
    for (from, epoch) in [(2, 2), (1, 3)] {
        let out = sm
            .apply_command(
                5,
                &Command::Progress {
                    from,
                    parts: progress(&key, 1, later, epoch),
                },
            )
            .unwrap();
        assert_eq!(
            out,
            Applied::Progress {
                accepted: 0,
                rejected: 1
            }
        );
    }
    assert_eq!(sm.store().get(&key).unwrap().unwrap().state, before.state);
    // The new owner at the current epoch: applied.
    let out = sm
        .apply_command(
            6,
            &Command::Progress {
                from: 2,
                parts: progress(&key, 1, later, 3),
            },
        )
        .unwrap();
    assert_eq!(
        out,
        Applied::Progress {
            accepted: 1,
            rejected: 0
        }
    );
    assert_eq!(sm.store().get(&key).unwrap().unwrap().state, later);

    // A revocation is a new epoch, but until the partition has a new owner its former owner may
    // still commit the completions of what it had in flight, under its old epoch.
    sm.apply_command(
        7,
        &Command::Assign {
            changes: vec![(p, None)],
        },
    )
    .unwrap();
    let slot = lock(&sm.meta).assignment.slot(p);
    assert_eq!(
        (
            slot.owner,
            slot.epoch,
            slot.released_by,
            slot.released_epoch
        ),
        (None, 7, Some(2), 3)
    );
    let later2 = JobState { count: 2, ..later };
    let out = sm
        .apply_command(
            8,
            &Command::Progress {
                from: 2,
                parts: progress(&key, 1, later2, 3),
            },
        )
        .unwrap();
    assert_eq!(
        out,
        Applied::Progress {
            accepted: 1,
            rejected: 0
        }
    );
    // Once reassigned, no longer.
    sm.apply_command(
        9,
        &Command::Assign {
            changes: vec![(p, Some(1))],
        },
    )
    .unwrap();
    let out = sm
        .apply_command(
            10,
            &Command::Progress {
                from: 2,
                parts: progress(&key, 1, later2, 3),
            },
        )
        .unwrap();
    assert_eq!(
        out,
        Applied::Progress {
            accepted: 0,
            rejected: 1
        }
    );
}

/// Creates take the log index as generation, so every replica agrees; a replay changes nothing.
#[test]
fn creates_are_idempotent_by_log_index() {
    let sm = machine();
    let cmd = Command::Put {
        job: Box::new(job("b")),
        overwrite: false,
    };
    sm.apply_command(7, &cmd).unwrap();
    let out = sm.apply_command(7, &cmd).unwrap();
    assert!(matches!(
        out,
        Applied::Put(PutOutcome::Stored { generation: 7, .. })
    ));
    let out = sm.apply_command(9, &cmd).unwrap();
    assert_eq!(out, Applied::Put(PutOutcome::AlreadyExists));
    let key = job("b").key();
    assert_eq!(
        sm.apply_command(
            10,
            &Command::Delete {
                key: key.as_bytes().to_vec()
            }
        )
        .unwrap(),
        Applied::Deleted(true)
    );
    assert!(sm.store().get(&key).unwrap().is_none());
}
