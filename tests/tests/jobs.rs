//! Jobs API and actor reminders end to end, on a standalone host (embedded scheduler) with the
//! `turn_app` test app, which records every job and reminder delivery it receives.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::ActorHost;
use serde_json::{json, Value};

fn turn_app() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_turn_app"))
}

/// (kind, key, unix ms, missed) of every delivery the app recorded.
fn events(h: &ActorHost) -> Vec<(String, String, u128, u64)> {
    std::fs::read_to_string(&h.events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["job", name, ms, missed, _seq] => Some((
                    "job".into(),
                    name.to_string(),
                    ms.parse().ok()?,
                    missed.parse().ok()?,
                )),
                ["remind", id, name, ms, missed, _seq] => Some((
                    "remind".into(),
                    format!("{id}/{name}"),
                    ms.parse().ok()?,
                    missed.parse().ok()?,
                )),
                _ => None,
            }
        })
        .collect()
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_api_fires_repeats_rejects_bad_schedules_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = ActorHost::start(turn_app(), dir.path(), "jobs", "jobs", &[], &[]).await;
    h.wait_hosting().await;
    let c = reqwest::Client::new();

    // @every 1s with repeats 3 fires exactly 3 times.
    let created = unix_ms();
    let r = c
        .post(h.url("/v1.0-alpha1/jobs/three"))
        .json(&json!({"schedule": "@every 1s", "repeats": 3, "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let got: Value = c
        .get(h.url("/v1.0-alpha1/jobs/three"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["schedule"], "@every 1s");
    assert_eq!(got["repeats"], 3);
    assert_eq!(got["data"], json!({"n": 1}));
    wait_for("3 deliveries", Duration::from_secs(10), || {
        events(&h).iter().filter(|e| e.1 == "three").count() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fired: Vec<_> = events(&h).into_iter().filter(|e| e.1 == "three").collect();
    assert_eq!(fired.len(), 3, "{fired:?}");
    for (i, e) in fired.iter().enumerate() {
        assert!(
            e.2 + 50 >= created + 1000 * (i as u128 + 1),
            "tick {i} early: {fired:?}"
        );
    }

    // A bad schedule: 400 with Dapr's error code, nothing stored.
    for bad in [
        json!({"schedule": "every second"}),
        json!({"schedule": "@every 1s", "repeats": 0}),
        json!({"dueTime": "soon"}),
    ] {
        let r = c
            .post(h.url("/v1.0/jobs/bad"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errorCode"], "DAPR_SCHEDULER_SCHEDULE_JOB", "{bad}: {v}");
    }
    let r = c
        .post(h.url("/v1.0/jobs/bad"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "DAPR_SCHEDULER_SCHEDULE_EMPTY"
    );
    let r = c.get(h.url("/v1.0/jobs/bad")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // overwrite: false on an existing job is a conflict; delete works.
    // A job that has fired its last tick is gone.
    assert_eq!(
        c.get(h.url("/v1.0/jobs/three"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let r = c
        .post(h.url("/v1.0/jobs/keep"))
        .json(&json!({"dueTime": "1h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .post(h.url("/v1.0/jobs/keep"))
        .json(&json!({"dueTime": "1h", "overwrite": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = c.delete(h.url("/v1.0/jobs/keep")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        c.get(h.url("/v1.0/jobs/keep"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // A job created before a full restart fires after it.
    let r = c
        .post(h.url("/v1.0-alpha1/jobs/later"))
        .json(&json!({"dueTime": "3s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let due = unix_ms() + 3000;
    let status = h.sidecar.as_mut().unwrap().stop();
    assert!(status.success());
    h.restart().await;
    wait_for("the job after the restart", Duration::from_secs(15), || {
        events(&h).iter().any(|e| e.1 == "later")
    })
    .await;
    let fired: Vec<_> = events(&h).into_iter().filter(|e| e.1 == "later").collect();
    assert_eq!(fired.len(), 1);
    assert!(fired[0].2 + 50 >= due, "fired early: {fired:?} due {due}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_fire_until_deleted_and_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = ActorHost::start(turn_app(), dir.path(), "rem", "rem", &[], &[]).await;
    h.wait_hosting().await;
    let c = reqwest::Client::new();
    let url = h.url("/v1.0/actors/Counter/r1/reminders/tick");
    let r = c
        .put(&url)
        .json(&json!({"dueTime": "500ms", "period": "1s", "data": "aGk="}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let got: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["actorID"], "r1");
    assert_eq!(got["period"], "1s");
    assert_eq!(got["data"], "aGk=");
    wait_for("3 reminder fires", Duration::from_secs(10), || {
        events(&h).iter().filter(|e| e.1 == "r1/tick").count() >= 3
    })
    .await;

    // kill -9 the host for ~3 s: after the restart the reminder catches up with one coalesced
    // delivery that says how many ticks it stands for, then runs on.
    h.sidecar.as_mut().unwrap().kill9();
    let before = events(&h).iter().filter(|e| e.1 == "r1/tick").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.restart().await;
    wait_for("fires after the restart", Duration::from_secs(10), || {
        events(&h).iter().filter(|e| e.1 == "r1/tick").count() >= before + 2
    })
    .await;
    let after: Vec<_> = events(&h)
        .into_iter()
        .filter(|e| e.1 == "r1/tick")
        .skip(before)
        .collect();
    assert!(
        after[0].3 >= 1,
        "the catch-up delivery reports missed ticks: {after:?}"
    );
    assert!(
        after[1..].iter().all(|e| e.3 == 0),
        "one catch-up only: {after:?}"
    );

    // Delete: no fire after the acknowledged delete.
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let deleted_at = unix_ms();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late: Vec<_> = events(&h)
        .into_iter()
        .filter(|e| e.1 == "r1/tick" && e.2 > deleted_at + 20)
        .collect();
    assert!(late.is_empty(), "fired after delete: {late:?}");
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_ACTOR_REMINDER_NOT_FOUND"
    );

    // Bad input and non-hosted types.
    let r = c
        .put(&url)
        .json(&json!({"period": "P1D"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_ACTOR_REMINDER_CREATE"
    );
    let r = c
        .put(h.url("/v1.0/actors/Other/x/reminders/r"))
        .json(&json!({"period": "1s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_ACTOR_REMINDER_NON_HOSTED"
    );
}
