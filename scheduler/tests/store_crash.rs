//! An acknowledged create or delete survives `kill -9`.
//!
//! The test re-runs its own binary as a child (`crash_child`, which only acts when started this
//! way): 16 writers create jobs and delete some of them through the durable store, printing each
//! write once the store has acknowledged it. The parent kills the child with SIGKILL while writes
//! are in flight, reopens the store, and checks every acknowledged write: created jobs are there,
//! deleted ones are gone. Writes in flight at the kill may have landed or not. Three rounds share
//! one data directory, so recovery of recovered data is exercised too.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use scheduler::job::{FailurePolicy, Job, JobKey, JobSpec, Target};
use scheduler::store::{JobStore, PutOutcome};

const CHILD_DIR: &str = "TESSERA_SCHEDULER_CRASH_CHILD_DIR";
const CHILD_ROUND: &str = "TESSERA_SCHEDULER_CRASH_CHILD_ROUND";
const WRITERS: usize = 16;
/// Acknowledged writes to wait for before the kill.
const ACKS_BEFORE_KILL: usize = 400;

fn job(name: &str) -> Job {
    let now = Utc::now();
    Job {
        name: name.into(),
        target: Target::App {
            app_id: "crash".into(),
            namespace: "default".into(),
        },
        schedule: None,
        due_time: Some(now + TimeDelta::days(1)),
        created_at: now,
        repeats: None,
        expiry: None,
        data: format!("\"{name}\"").into_bytes(),
        failure_policy: FailurePolicy::default(),
        spec: JobSpec::default(),
    }
}

fn key(name: &str) -> JobKey {
    JobKey::app("default", "crash", name)
}

#[test]
#[ignore = "child side of kill9_keeps_acknowledged_writes, which starts it"]
fn crash_child() {
    let (Ok(dir), Ok(round)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ROUND)) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Arc::new(JobStore::open(Path::new(&dir)).unwrap());
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, round) = (store.clone(), round.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let name = format!("r{round}-w{w}-{i}");
                        let out = store.put(job(&name), false).await.unwrap();
                        assert!(matches!(out, PutOutcome::Stored { .. }));
                        println!("@ACK-PUT {name}");
                        if i % 3 == 2 {
                            let victim = format!("r{round}-w{w}-{}", i - 1);
                            println!("@DEL-START {victim}");
                            assert!(store.delete(&key(&victim)).await.unwrap());
                            println!("@ACK-DEL {victim}");
                        }
                    }
                })
            })
            .collect();
        // Never reached in the test: the parent kills this process.
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(writers);
    });
}

/// What the parent learned from the child's output.
#[derive(Default)]
struct Acks {
    puts: HashSet<String>,
    deletes_started: HashSet<String>,
    deletes: HashSet<String>,
}

impl Acks {
    fn read(&mut self, line: &str) {
        // The test harness may print "test crash_child ... " on the same line as the first ack.
        for (marker, set) in [
            ("@ACK-PUT ", &mut self.puts),
            ("@DEL-START ", &mut self.deletes_started),
            ("@ACK-DEL ", &mut self.deletes),
        ] {
            if let Some(at) = line.find(marker) {
                set.insert(line[at + marker.len()..].trim().to_string());
            }
        }
    }

    fn count(&self) -> usize {
        self.puts.len() + self.deletes.len()
    }
}

#[test]
fn kill9_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    // Name -> must it exist? (`None`: a delete was in flight at the kill, either is fine.)
    let mut expected: HashMap<String, Option<bool>> = HashMap::new();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acks = Acks::default();
        let deadline = Instant::now() + Duration::from_secs(120);
        while acks.count() < ACKS_BEFORE_KILL && Instant::now() < deadline {
            match lines.next() {
                Some(Ok(line)) => acks.read(&line),
                _ => break,
            }
        }
        // SIGKILL, with the writers still going.
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever the child printed before dying was acknowledged before it was printed.
        for line in lines.map_while(Result::ok) {
            acks.read(&line);
        }
        assert!(
            acks.count() >= ACKS_BEFORE_KILL,
            "round {round}: the child acknowledged only {} writes",
            acks.count()
        );
        for name in &acks.puts {
            expected.insert(name.clone(), Some(true));
        }
        for name in &acks.deletes_started {
            expected.insert(name.clone(), None);
        }
        for name in &acks.deletes {
            expected.insert(name.clone(), Some(false));
        }

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let store = JobStore::open(dir.path()).unwrap();
        let mut lost = Vec::new();
        for (name, want) in &expected {
            let found = store.get(&key(name)).unwrap();
            if let Some(rec) = &found {
                assert_eq!(rec.job.data, format!("\"{name}\"").into_bytes());
            }
            if let Some(want) = want {
                if found.is_some() != *want {
                    lost.push((name.clone(), *want));
                }
            }
        }
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged writes lost after kill -9 (name, should exist): {lost:?}"
        );
        eprintln!(
            "round {round}: {} acknowledged creates and {} acknowledged deletes survived kill -9 \
             ({} jobs stored)",
            acks.puts.len(),
            acks.deletes.len(),
            store.len()
        );
    }
}
