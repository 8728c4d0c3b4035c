//! The scheduler service end to end (issue 5, line 1): one `tessera scheduler`, one host (with
//! its embedded placement) using it through `--scheduler-host-address`, and the `turn_app` test
//! app, which records every reminder delivery with its wall-clock time, missed count and tick
//! number.
//!
//! Workload: `TESSERA_SCHED_REMINDERS` reminders (default 2,000; the figure is 10,000)
//! over `TESSERA_SCHED_ACTORS` actors (default one per 10 reminders), periods 1 to 10 s, each
//! with an absolute due time so every tick's due time is known exactly, registered concurrently
//! through the host's reminder API. The run lasts `TESSERA_SCHED_SECS` (default 45; the issue's
//! figure is 120) from the end of registration, during which the host is killed with kill -9
//! twice and the scheduler twice (each restarted), and 10% of the reminders are deleted midway.
//!
//! Checked from the app's event file, per reminder (tick k is due at `due0 + (k-1) * period`; a
//! delivery of tick `seq` with `missed = m` covers ticks `seq..=seq+m`):
//! - covered: every tick due at t with both host and scheduler up (connected) during
//!   `[t, t + slack]` (slack `TESSERA_SCHED_SLACK_SECS`, default 5), at least `slack` before the
//!   reminder's delete and before the end, is covered by some delivery;
//! - never early: each delivery arrives no earlier than the due time of the last tick it covers
//!   (less 10 ms of clock slack);
//! - deletes: after the delete was acknowledged, no delivery of a tick that was not yet due at the
//!   acknowledgement, and at most one delivery at all (the tick in flight at the delete, which the
//!   scheduler had already sent);
//! - no flood: the ticks an outage made a reminder miss arrive in at most one coalesced delivery
//!   (`missed > 0` and its first tick due before the recovery); coalesced deliveries of ticks due
//!   outside an outage (the reminder ran a period late) are counted and printed.
//!
//! The figures (deliveries, lateness percentiles, duplicates, catch-ups) are printed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::reminders::{percentile, read_events, rfc3339, unix_ms, Delivery};
use e2e::{ActorHost, SchedulerReplica};

fn turn_app() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_turn_app"))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn connected_hosts(s: &SchedulerReplica, c: &reqwest::Client) -> u64 {
    s.metric(c, "tessera_scheduler_connected_hosts")
        .await
        .unwrap_or(0)
}

/// Waits until the scheduler reports a connected host; returns when (unix ms).
async fn wait_connected(s: &SchedulerReplica, c: &reqwest::Client) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected_hosts(s, c).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the host never connected to the scheduler"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    unix_ms()
}

struct Reminder {
    actor: String,
    name: String,
    due0: i64,
    period: i64,
    deleted_at: Option<i64>,
}

impl Reminder {
    fn due(&self, k: i64) -> i64 {
        self.due0 + (k - 1) * self.period
    }

    /// How many ticks are due at `t`.
    fn due_by(&self, t: i64) -> i64 {
        if t < self.due0 {
            0
        } else {
            (t - self.due0) / self.period + 1
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_survive_host_and_scheduler_kill9() {
    let n = env_u64("TESSERA_SCHED_REMINDERS", 2_000);
    let actors = env_u64("TESSERA_SCHED_ACTORS", (n / 10).max(1));
    let run_ms = env_u64("TESSERA_SCHED_SECS", 45) as i64 * 1000;
    let slack = env_u64("TESSERA_SCHED_SLACK_SECS", 5) as i64 * 1000;
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();

    let mut sched = SchedulerReplica::scheduler_cluster(1, dir.path())
        .pop()
        .unwrap();
    sched.start();
    sched.wait_healthy(&c).await;
    let extra = vec!["--scheduler-host-address".to_string(), sched.addr()];
    let mut h = ActorHost::start(turn_app(), dir.path(), "host", "rem", &extra, &[]).await;
    h.wait_hosting().await;
    wait_connected(&sched, &c).await;

    // Register the reminders concurrently, each with an absolute due time 2-3 s ahead.
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let actor = format!("a{}", i % actors);
        let name = format!("r{i}");
        let period = 1000 * (1 + (i % 10) as i64);
        let url = h.url(&format!("/v1.0/actors/Counter/{actor}/reminders/{name}"));
        let (c, sem) = (c.clone(), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let due0 = unix_ms() + 2000 + (i % 1000) as i64;
            let body = serde_json::json!({
                "dueTime": rfc3339(due0),
                "period": format!("{}s", period / 1000),
                "data": {"i": i},
            });
            for _ in 0..50 {
                if let Ok(r) = c.put(&url).json(&body).send().await {
                    if r.status() == 204 {
                        return Reminder {
                            actor,
                            name,
                            due0,
                            period,
                            deleted_at: None,
                        };
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("could not register {name}");
        });
    }
    let mut reminders: BTreeMap<String, Reminder> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        reminders.insert(r.name.clone(), r);
    }
    let registered_in = started.elapsed();
    let t0 = unix_ms();
    eprintln!("registered {n} reminders on {actors} actors in {registered_in:?}");

    // Faults: (fraction of the run, what). Down intervals are [kill, both up and connected].
    let mut down: Vec<(i64, i64)> = Vec::new();
    let mut faults: Vec<i64> = Vec::new();
    let at = |f: f64| t0 + (run_ms as f64 * f) as i64;
    let sleep_until = |t: i64| async move {
        let left = t - unix_ms();
        if left > 0 {
            tokio::time::sleep(Duration::from_millis(left as u64)).await;
        }
    };
    let mut deleted = 0usize;
    for (f, what) in [
        (0.15, "host"),
        (0.35, "scheduler"),
        (0.5, "delete"),
        (0.6, "host"),
        (0.8, "scheduler"),
    ] {
        sleep_until(at(f)).await;
        match what {
            "host" => {
                let k = unix_ms();
                h.sidecar.as_mut().unwrap().kill9();
                faults.push(k);
                tokio::time::sleep(Duration::from_secs(2)).await;
                h.restart().await;
                h.wait_hosting().await;
                let up = wait_connected(&sched, &c).await;
                eprintln!("host killed at +{} ms, back at +{} ms", k - t0, up - t0);
                down.push((k, up));
            }
            "scheduler" => {
                let k = unix_ms();
                sched.kill9();
                faults.push(k);
                tokio::time::sleep(Duration::from_secs(3)).await;
                sched.start();
                sched.wait_healthy(&c).await;
                let up = wait_connected(&sched, &c).await;
                eprintln!(
                    "scheduler killed at +{} ms, back at +{} ms",
                    k - t0,
                    up - t0
                );
                down.push((k, up));
            }
            _ => {
                // Delete every 10th reminder, concurrently; the time of each acknowledgement is
                // what the check uses.
                let mut tasks = tokio::task::JoinSet::new();
                for r in reminders
                    .values()
                    .filter(|r| r.name[1..].parse::<u64>().unwrap().is_multiple_of(10))
                {
                    let url = h.url(&format!(
                        "/v1.0/actors/Counter/{}/reminders/{}",
                        r.actor, r.name
                    ));
                    let (c, sem, name) = (c.clone(), sem.clone(), r.name.clone());
                    tasks.spawn(async move {
                        let _p = sem.acquire().await.unwrap();
                        for _ in 0..100 {
                            if let Ok(resp) = c.delete(&url).send().await {
                                if resp.status() == 204 {
                                    return (name, unix_ms());
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        panic!("could not delete {name}");
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    let (name, t) = r.unwrap();
                    reminders.get_mut(&name).unwrap().deleted_at = Some(t);
                    deleted += 1;
                }
                eprintln!("deleted {deleted} reminders by +{} ms", unix_ms() - t0);
            }
        }
    }
    sleep_until(t0 + run_ms).await;
    let end = unix_ms();
    // Let deliveries in flight land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = read_events(&h.events);
    let m = |name: &'static str| {
        let (s, c) = (&sched, &c);
        async move { s.metric(c, name).await.unwrap_or(0) }
    };
    let (acks, failures, unroutable) = (
        m("tessera_scheduler_acks_total").await,
        m("tessera_scheduler_failures_total").await,
        m("tessera_scheduler_unroutable_total").await,
    );

    let up = |t: i64, until: i64| !down.iter().any(|(a, b)| *a <= until && t <= *b);
    let mut problems: Vec<String> = Vec::new();
    let (mut total, mut checked_ticks, mut catchups, mut dups, mut after_delete) =
        (0usize, 0u64, 0usize, 0usize, 0usize);
    let mut lateness: Vec<i64> = Vec::new();
    let (mut uncovered_any, mut lagged) = (0u64, 0usize);
    for r in reminders.values() {
        let ds = events.get(&r.name).map(Vec::as_slice).unwrap_or(&[]);
        total += ds.len();
        let mut covered: std::collections::BTreeSet<i64> = Default::default();
        for d in ds {
            let last = d.seq + d.missed;
            if d.seq == 0 {
                problems.push(format!("{}: delivery without a tick number", r.name));
                continue;
            }
            if d.at + 10 < r.due(last) {
                problems.push(format!(
                    "{}: early: ticks {}..={} (due {}) delivered at {}",
                    r.name,
                    d.seq,
                    last,
                    r.due(last),
                    d.at
                ));
            }
            if (d.seq..=last).any(|k| covered.contains(&k)) {
                dups += 1;
            }
            covered.extend(d.seq..=last);
            if d.missed > 0 {
                catchups += 1;
            } else if up(r.due(d.seq) - slack, r.due(d.seq) + slack) {
                // Steady state: no fault within `slack` of the due time.
                lateness.push(d.at - r.due(d.seq));
            }
        }
        // Deletes.
        if let Some(del) = r.deleted_at {
            let late: Vec<&Delivery> = ds.iter().filter(|d| d.at > del).collect();
            after_delete += late.len();
            let due_at_delete = r.due_by(del);
            if late.len() > 1 || late.iter().any(|d| d.seq + d.missed > due_at_delete) {
                problems.push(format!(
                    "{}: delivered after its delete was acknowledged at {del}: {late:?}",
                    r.name
                ));
            }
        }
        // Coverage.
        // The reminder must exist during [t, t + slack] too.
        let horizon = r.deleted_at.unwrap_or(i64::MAX).min(end) - slack;
        let mut k = 1;
        while r.due(k) <= horizon {
            let t = r.due(k);
            if !covered.contains(&k) {
                uncovered_any += 1;
                if up(t, t + slack) {
                    problems.push(format!(
                        "{}: tick {k} due at +{} ms (both up) never delivered",
                        r.name,
                        t - t0
                    ));
                }
            }
            if up(t, t + slack) {
                checked_ticks += 1;
            }
            k += 1;
        }
        // No flood: the ticks an outage made a reminder miss arrive in at most one coalesced
        // delivery (one whose first tick was due before the recovery). Coalescing of ticks due
        // after the recovery means the reminder ran late by a period; that is counted apart.
        for (i, (kill, back)) in down.iter().enumerate() {
            let next = down.get(i + 1).map_or(i64::MAX, |d| d.0);
            let n = ds
                .iter()
                .filter(|d| d.missed > 0 && d.at >= *kill && d.at < next && r.due(d.seq) <= *back)
                .count();
            if n > 1 {
                problems.push(format!(
                    "{}: {n} coalesced deliveries of ticks missed in the outage [{}, {}] ms",
                    r.name,
                    kill - t0,
                    back - t0
                ));
            }
        }
        lagged += ds
            .iter()
            .filter(|d| {
                d.missed > 0
                    && !down
                        .iter()
                        .any(|(kill, back)| r.due(d.seq) >= *kill && r.due(d.seq) <= *back)
            })
            .count();
    }
    let summary = format!(
        "reminders {n} on {actors} actors, run {} s, registered in {registered_in:?}; deliveries {total}, \
         ticks checked (both up) {checked_ticks}, uncovered ticks in total (incl. downtime) {uncovered_any}, \
         coalesced deliveries {catchups} (of which {lagged} for ticks due outside an outage: the reminder ran a period late), duplicate deliveries {dups}, deliveries after an acknowledged delete {after_delete} \
         (deleted {deleted}); steady-state lateness (no fault within slack) p50 {} ms p99 {} ms max {} ms; scheduler since last restart: acks {acks} \
         failures {failures} unroutable {unroutable}; down intervals {:?}",
        run_ms / 1000,
        percentile(&mut lateness, 0.5),
        percentile(&mut lateness, 0.99),
        percentile(&mut lateness, 1.0),
        down.iter().map(|(a, b)| (a - t0, b - t0)).collect::<Vec<_>>(),
    );
    eprintln!("{summary}");
    assert!(total > 0, "no deliveries at all");
    assert!(
        problems.is_empty(),
        "{} problems, first 20:\n{}\n{summary}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );
}
