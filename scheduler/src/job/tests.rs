use super::*;
use chrono::TimeZone;
use proptest::prelude::*;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().unwrap()
}

fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

fn scope() -> AppScope {
    AppScope {
        app_id: "myapp".into(),
        namespace: "default".into(),
    }
}

fn job_req(name: &str, body: &str) -> Result<CreateRequest, RequestError> {
    parse_job_request(name, body.as_bytes(), &scope(), now())
}

fn job_ok(body: &str) -> CreateRequest {
    job_req("my-job", body).unwrap_or_else(|e| panic!("{body}: {e}"))
}

fn job_err(name: &str, body: &str) -> RequestError {
    job_req(name, body).expect_err(body)
}

fn reminder_req(body: &str) -> Result<CreateRequest, RequestError> {
    parse_reminder_request(
        ReminderRef {
            actor_type: "Device",
            actor_id: "d1",
            name: "tick",
        },
        body.as_bytes(),
        &ReminderScope {
            app_id: Some("myapp".into()),
            namespace: "default".into(),
        },
        now(),
    )
}

fn reminder_ok(body: &str) -> CreateRequest {
    reminder_req(body).unwrap_or_else(|e| panic!("{body}: {e}"))
}

fn reminder_err(body: &str) -> RequestError {
    reminder_req(body).expect_err(body)
}

fn assert_code(e: &RequestError, code: &str, status: u16) {
    assert_eq!((e.error_code(), e.http_status()), (code, status), "{e}");
}

// --- Jobs API: accepted requests ------------------------------------------------------------------

#[test]
fn job_with_a_schedule() {
    let r = job_ok(r#"{"schedule": "@every 1m", "data": {"b": 1, "a": [1, 2]}}"#);
    assert!(!r.overwrite, "Jobs API overwrite defaults to false");
    let j = r.job;
    assert_eq!(j.name, "my-job");
    assert_eq!(
        j.target,
        Target::App {
            app_id: "myapp".into(),
            namespace: "default".into()
        }
    );
    assert_eq!(j.schedule, Some(Schedule::Every(Duration::from_secs(60))));
    assert_eq!(j.due_time, None);
    assert_eq!(j.created_at, now());
    assert_eq!(
        j.data, br#"{"b":1,"a":[1,2]}"#,
        "data kept as sent, compacted"
    );
    assert_eq!(j.failure_policy, FailurePolicy::default());
    assert_eq!(j.spec.schedule.as_deref(), Some("@every 1m"));
    assert_eq!(j.next_fire(None, 0), Some(now() + secs(60)));
}

#[test]
fn job_with_every_field() {
    let r = job_ok(
        r#"{"schedule": "0 30 * * * *", "dueTime": "30s", "repeats": 5, "ttl": "1h",
            "data": "text", "overwrite": true,
            "failurePolicy": {"constant": {"interval": "2.5s", "maxRetries": 7}}}"#,
    );
    assert!(r.overwrite);
    let j = r.job;
    assert_eq!(j.due_time, Some(now() + secs(30)));
    assert_eq!(j.repeats, Some(5));
    assert_eq!(
        j.expiry,
        Some(now() + secs(30 + 3600)),
        "ttl counts from the due time"
    );
    assert_eq!(j.data, br#""text""#);
    assert_eq!(
        j.failure_policy,
        FailurePolicy::Constant {
            interval: Duration::from_millis(2500),
            max_retries: Some(7)
        }
    );
}

#[test]
fn job_fields_in_proto_spelling() {
    let j = job_ok(
        r#"{"due_time": "2026-03-01T13:00:00Z", "repeats": "1",
            "failure_policy": {"constant": {"interval": "1s", "max_retries": "2"}}}"#,
    )
    .job;
    assert_eq!(j.due_time, Some(now() + secs(3600)));
    assert_eq!(j.repeats, Some(1));
    assert_eq!(
        j.failure_policy,
        FailurePolicy::Constant {
            interval: Duration::from_secs(1),
            max_retries: Some(2)
        }
    );
    let j = job_ok(r#"{"dueTime": "1s", "failurePolicy": {"constant": {"maxRetries": 2}}}"#).job;
    assert_eq!(
        j.failure_policy,
        FailurePolicy::Constant {
            interval: Duration::from_secs(1),
            max_retries: Some(2)
        },
        "a missing interval is 1 s"
    );
    let j = job_ok(r#"{"dueTime": "PT1M", "failurePolicy": {"drop": {}}, "unknown": 1}"#).job;
    assert_eq!(j.failure_policy, FailurePolicy::Drop);
    assert_eq!(j.schedule, None);
    // An empty name in the body and null fields count as absent.
    let j = job_ok(r#"{"name": "", "dueTime": "1s", "ttl": null, "repeats": null}"#).job;
    assert_eq!((j.expiry, j.repeats), (None, None));
    // A TTL equal to the due time is allowed.
    assert!(job_req(
        "j",
        r#"{"schedule": "@daily", "dueTime": "1h", "ttl": "0s"}"#
    )
    .is_ok());
    // Names are trimmed and may use _ : - and spaces.
    assert_eq!(job_ok(r#"{"dueTime": "1s"}"#).job.name, "my-job");
    assert_eq!(
        job_req("  backup_db:nightly run ", r#"{"dueTime": "1s"}"#)
            .unwrap()
            .job
            .name,
        "backup_db:nightly run"
    );
}

// --- Jobs API: rejected requests -----------------------------------------------------------------

#[test]
fn job_malformed_bodies() {
    for body in [
        "not json",
        "[1, 2]",
        "\"text\"",
        r#"{"schedule": 5}"#,
        r#"{"dueTime": true}"#,
        r#"{"repeats": -1}"#,
        r#"{"repeats": 1.5}"#,
        r#"{"repeats": 4294967296}"#,
        r#"{"repeats": "five"}"#,
        r#"{"overwrite": "yes"}"#,
        r#"{"dueTime": "1s", "due_time": "2s"}"#,
        r#"{"failurePolicy": "drop"}"#,
        r#"{"failurePolicy": {"drop": {}, "constant": {}}}"#,
        r#"{"failurePolicy": {"drop": true}}"#,
        r#"{"failurePolicy": {"constant": {"interval": "1m"}}}"#,
        r#"{"failurePolicy": {"constant": {"interval": "-1s"}}}"#,
        r#"{"failurePolicy": {"constant": {"interval": "1.s"}}}"#,
        r#"{"failurePolicy": {"constant": {"interval": "1.0000000001s"}}}"#,
        r#"{"failurePolicy": {"constant": {"maxRetries": -3}}}"#,
        r#"{"name": "x""#,
    ] {
        assert_code(&job_err("j", body), "ERR_MALFORMED_REQUEST", 400);
    }
}

#[test]
fn job_name_rules() {
    let e = job_err("j", r#"{"name": "other", "schedule": "@daily"}"#);
    assert_code(&e, "DAPR_SCHEDULER_JOB_NAME", 400);
    assert_eq!(e.to_string(), "Set the job name in the url only");
    for name in ["", "   ", "a|b", "a||b"] {
        let e = job_err(name, r#"{"schedule": "@daily"}"#);
        assert_code(&e, "DAPR_SCHEDULER_JOB_NAME_EMPTY", 400);
    }
    for name in [
        "Bad/Name",
        "naïve",
        "a..b",
        ".a",
        "a.",
        "___",
        &"a".repeat(254),
    ] {
        let e = job_err(name, r#"{"schedule": "@daily"}"#);
        assert_code(&e, "DAPR_SCHEDULER_SCHEDULE_JOB", 400);
        assert!(e.to_string().contains("job name is invalid"), "{e}");
    }
    for name in ["Job1", "job.v2", "a-b_c:d e"] {
        assert!(job_req(name, r#"{"schedule": "@daily"}"#).is_ok(), "{name}");
    }
}

#[test]
fn job_needs_a_schedule_or_due_time() {
    for body in ["", "{}", "null", r#"{"repeats": 3, "ttl": "1h"}"#] {
        let e = job_err("j", body);
        assert_code(&e, "DAPR_SCHEDULER_SCHEDULE_EMPTY", 400);
        assert_eq!(e.to_string(), "Schedule is empty");
    }
}

#[test]
fn job_scheduler_rejections() {
    for (body, why) in [
        (
            r#"{"dueTime": "1s", "repeats": 2}"#,
            "must have a schedule to repeat",
        ),
        (
            r#"{"schedule": "@daily", "repeats": 0}"#,
            "repeats must be greater than 0",
        ),
        (
            r#"{"dueTime": "1s", "repeats": 0}"#,
            "repeats must be greater than 0",
        ),
        (
            r#"{"dueTime": "1s", "ttl": "1h"}"#,
            "must have a schedule to have a ttl",
        ),
        (r#"{"schedule": "* * * * *"}"#, "add a seconds field"),
        (r#"{"schedule": ""}"#, "invalid schedule"),
        (r#"{"schedule": "@every 0s"}"#, "longer than zero"),
        (r#"{"dueTime": "tomorrow"}"#, "invalid due time"),
        (r#"{"dueTime": ""}"#, "due time is empty"),
        (r#"{"dueTime": "R2/PT1S"}"#, "only allowed in a period"),
        (r#"{"schedule": "@daily", "ttl": "soon"}"#, "invalid ttl"),
        (
            r#"{"schedule": "@daily", "dueTime": "2h", "ttl": "2026-03-01T13:00:00Z"}"#,
            "ttl must be greater than due time",
        ),
    ] {
        let e = job_err("j", body);
        assert_code(&e, "DAPR_SCHEDULER_SCHEDULE_JOB", 400);
        assert!(
            e.to_string().starts_with("failed to schedule job due to: "),
            "{e}"
        );
        assert!(e.to_string().contains(why), "{body}: {e}");
    }
    // A single repeat without a schedule is allowed.
    assert!(job_req("j", r#"{"dueTime": "1s", "repeats": 1}"#).is_ok());
}

#[test]
fn job_checks_come_in_dapr_order() {
    // Unreadable body before anything else.
    assert_code(&job_err("", "nope"), "ERR_MALFORMED_REQUEST", 400);
    // Name in body before the URL name and the schedule.
    assert_code(
        &job_err("", r#"{"name": "x"}"#),
        "DAPR_SCHEDULER_JOB_NAME",
        400,
    );
    // URL name before the schedule.
    assert_code(&job_err("", "{}"), "DAPR_SCHEDULER_JOB_NAME_EMPTY", 400);
    // Missing schedule before scheduler-side checks (an invalid name here).
    assert_code(
        &job_err("Bad/Name", "{}"),
        "DAPR_SCHEDULER_SCHEDULE_EMPTY",
        400,
    );
}

#[test]
fn conflicts() {
    let job = job_ok(r#"{"dueTime": "1s"}"#).job;
    assert_code(
        &RequestError::already_exists(&job),
        "DAPR_SCHEDULER_SCHEDULE_JOB",
        409,
    );
    let rem = reminder_ok("{}").job;
    let e = RequestError::already_exists(&rem);
    assert_code(&e, "ERR_ACTOR_REMINDER_ALREADY_EXISTS", 409);
    assert!(e.to_string().contains("Device||d1||tick"), "{e}");
}

// --- actor reminders -----------------------------------------------------------------------------

#[test]
fn reminder_as_the_python_sdk_sends_it() {
    let r = reminder_ok(
        r#"{"reminderName": "tick", "dueTime": "0h0m3s0ms0μs", "period": "0h0m10s0ms0μs",
            "ttl": "1h0m0s0ms0μs", "data": "aGVsbG8=",
            "failurePolicy": {"constant": {"interval": "0h0m5s0ms0μs", "maxRetries": 3}}}"#,
    );
    assert!(r.overwrite, "reminder overwrite defaults to true");
    let j = r.job;
    assert_eq!(j.name, "tick");
    assert_eq!(
        j.target,
        Target::ActorReminder {
            app_id: Some("myapp".into()),
            namespace: "default".into(),
            actor_type: "Device".into(),
            actor_id: "d1".into(),
        }
    );
    assert_eq!(j.due_time, Some(now() + secs(3)));
    assert_eq!(j.schedule, Some(Schedule::Every(Duration::from_secs(10))));
    assert_eq!(j.repeats, None);
    assert_eq!(j.expiry, Some(now() + secs(3 + 3600)));
    assert_eq!(j.data, br#""aGVsbG8=""#);
    assert_eq!(
        j.failure_policy,
        FailurePolicy::Constant {
            interval: Duration::from_secs(5),
            max_retries: Some(3)
        }
    );
    assert_eq!(j.spec.period.as_deref(), Some("0h0m10s0ms0μs"));
    assert_eq!(j.spec.due_time.as_deref(), Some("0h0m3s0ms0μs"));
    assert_eq!(j.spec.schedule, None);
}

#[test]
fn reminder_defaults_and_go_json_rules() {
    for body in ["{}", "null", r#"{"dueTime": null, "period": null}"#] {
        let j = reminder_ok(body).job;
        assert_eq!(j.due_time, Some(now()), "no due time fires at once");
        assert_eq!(j.schedule, None);
        assert_eq!(j.next_fire(None, 0), Some(now()));
        assert_eq!(j.next_fire(Some(now()), 1), None);
        assert!(j.data.is_empty());
        assert_eq!(j.spec, JobSpec::default());
    }
    // Field names match case-insensitively, as Go's decoder does.
    let j = reminder_ok(r#"{"DueTime": "5s", "PERIOD": "R5/PT1S", "Data": {"z": 1,  "a": 2}}"#).job;
    assert_eq!(j.due_time, Some(now() + secs(5)));
    assert_eq!(j.repeats, Some(5));
    assert_eq!(j.schedule, Some(Schedule::Every(Duration::from_secs(1))));
    assert_eq!(j.data, br#"{"z":1,"a":2}"#);
    // JSON null data is kept as null.
    assert_eq!(reminder_ok(r#"{"data": null}"#).job.data, b"null");
    // Dapr's own field name, and the drop policy.
    let j = reminder_ok(r#"{"failure_policy": {"drop": {}}, "overwrite": false}"#);
    assert_eq!(j.job.failure_policy, FailurePolicy::Drop);
    assert!(!j.overwrite);
    // A constant policy without an interval retries after 1 s; without maxRetries, forever.
    assert_eq!(
        reminder_ok(r#"{"failurePolicy": {"constant": {}}}"#)
            .job
            .failure_policy,
        FailurePolicy::Constant {
            interval: Duration::from_secs(1),
            max_retries: None
        }
    );
    // An RFC 3339 due time in the past is accepted (it fires at once).
    assert!(reminder_req(r#"{"dueTime": "2020-01-01T00:00:00Z"}"#).is_ok());
}

#[test]
fn reminder_malformed_bodies() {
    for body in [
        "",
        "  ",
        "nope",
        "[]",
        r#"{"dueTime": 5}"#,
        r#"{"period": {"every": "1s"}}"#,
        r#"{"overwrite": "no"}"#,
        r#"{"failurePolicy": "drop"}"#,
        r#"{"failurePolicy": {"drop": {}, "constant": {}}}"#,
        r#"{"failurePolicy": {"constant": {"interval": "soon"}}}"#,
        r#"{"failurePolicy": {"constant": {"interval": "-1s"}}}"#,
        r#"{"failurePolicy": {"constant": {"interval": 5}}}"#,
        r#"{"failurePolicy": {"constant": {"maxRetries": -1}}}"#,
        r#"{"failurePolicy": {"constant": {"maxRetries": "3"}}}"#,
    ] {
        let e = reminder_err(body);
        assert_code(&e, "ERR_MALFORMED_REQUEST", 400);
        assert!(
            e.to_string()
                .starts_with("failed deserializing HTTP body: "),
            "{e}"
        );
    }
}

#[test]
fn reminder_create_rejections() {
    for (body, why) in [
        (r#"{"dueTime": "soon"}"#, "error parsing reminder due time"),
        (r#"{"dueTime": "R3/PT1S"}"#, "only allowed in a period"),
        (r#"{"period": "P1D"}"#, "unsupported period format"),
        (r#"{"period": "R0/PT1S"}"#, "has zero repetitions"),
        (r#"{"period": "0s"}"#, "longer than zero"),
        (r#"{"period": "-5s"}"#, "must not be negative"),
        (r#"{"period": "@every 5s"}"#, "invalid reminder period"),
        (r#"{"ttl": "forever"}"#, "error parsing reminder TTL"),
        (r#"{"ttl": "-1s"}"#, "has already expired"),
        (r#"{"ttl": "2020-01-01T00:00:00Z"}"#, "has already expired"),
        (
            r#"{"dueTime": "2h", "ttl": "2026-03-01T13:00:00Z"}"#,
            "has already expired",
        ),
    ] {
        let e = reminder_err(body);
        assert_code(&e, "ERR_ACTOR_REMINDER_CREATE", 400);
        assert!(
            e.to_string().starts_with("error creating actor reminder: "),
            "{e}"
        );
        assert!(e.to_string().contains(why), "{body}: {e}");
    }
}

#[test]
fn reminder_path_parameters_must_not_be_empty() {
    let e = parse_reminder_request(
        ReminderRef {
            actor_type: "",
            actor_id: "1",
            name: "r",
        },
        b"{}",
        &ReminderScope {
            app_id: None,
            namespace: "default".into(),
        },
        now(),
    )
    .unwrap_err();
    assert_code(&e, "ERR_BAD_REQUEST", 400);
}

// --- next fire -----------------------------------------------------------------------------------

fn job(schedule: Option<&str>, due: Option<i64>, repeats: Option<u32>, expiry: Option<i64>) -> Job {
    Job {
        name: "j".into(),
        target: Target::App {
            app_id: "a".into(),
            namespace: "n".into(),
        },
        schedule: schedule.map(|s| schedule::parse_job_schedule(s).unwrap()),
        due_time: due.map(|d| now() + secs(d)),
        created_at: now(),
        repeats,
        expiry: expiry.map(|e| now() + secs(e)),
        data: Vec::new(),
        failure_policy: FailurePolicy::default(),
        spec: JobSpec::default(),
    }
}

#[test]
fn one_shot_fires_once_at_its_due_time() {
    let j = job(None, Some(10), None, None);
    assert_eq!(j.next_fire(None, 0), Some(now() + secs(10)));
    assert_eq!(j.next_fire(Some(now() + secs(10)), 1), None);
    // A one-shot without a due time (not produced by the parsers) fires at creation.
    assert_eq!(job(None, None, None, None).next_fire(None, 0), Some(now()));
}

#[test]
fn scheduled_job_starts_at_its_due_time_then_follows_the_schedule() {
    let j = job(Some("@every 10s"), Some(3), None, None);
    assert_eq!(j.next_fire(None, 0), Some(now() + secs(3)));
    assert_eq!(
        j.next_fire(Some(now() + secs(3)), 1),
        Some(now() + secs(13))
    );
    // Without a due time the first tick is one schedule step after creation.
    let j = job(Some("@every 10s"), None, None, None);
    assert_eq!(j.next_fire(None, 0), Some(now() + secs(10)));
    // A cron job with a due time: first at the due time, then on the cron ticks after it.
    let j = job(Some("0 * * * * *"), Some(90), None, None);
    assert_eq!(j.next_fire(None, 0), Some(now() + secs(90)));
    assert_eq!(
        j.next_fire(Some(now() + secs(90)), 1),
        Some(now() + secs(120))
    );
}

#[test]
fn repeats_and_expiry_end_a_job() {
    let j = job(Some("@every 10s"), Some(0), Some(3), None);
    assert_eq!(
        j.next_fire(Some(now() + secs(10)), 2),
        Some(now() + secs(20))
    );
    assert_eq!(j.next_fire(Some(now() + secs(20)), 3), None);
    let j = job(Some("@every 10s"), Some(0), None, Some(20));
    assert_eq!(
        j.next_fire(Some(now() + secs(10)), 2),
        Some(now() + secs(20)),
        "a tick at the expiry fires"
    );
    assert_eq!(j.next_fire(Some(now() + secs(20)), 3), None);
    // A first tick after the expiry never fires.
    let j = job(Some("@every 10s"), None, None, Some(5));
    assert_eq!(j.next_fire(None, 0), None);
}

#[test]
fn next_fire_is_never_before_the_due_time() {
    // A schedule whose steps from `last` would land before the due time (an inconsistent
    // record) still never fires early.
    let j = job(Some("@every 1s"), Some(100), None, None);
    assert_eq!(j.next_fire(Some(now()), 1), Some(now() + secs(100)));
}

#[test]
fn coalescing_counts_the_ticks_due_by_now() {
    let j = job(Some("@every 10s"), Some(0), None, None);
    let t0 = now();
    assert_eq!(j.coalesce(t0, 0, t0, 100), (0, t0));
    assert_eq!(j.coalesce(t0, 0, t0 + secs(35), 100), (3, t0 + secs(30)));
    assert_eq!(
        j.coalesce(t0, 0, t0 + secs(35), 2),
        (3, t0 + secs(30)),
        "intervals are counted, not walked, so not capped"
    );
    // Repeats bound the coalesced ticks.
    let j = job(Some("@every 10s"), Some(0), Some(3), None);
    assert_eq!(j.coalesce(t0, 0, t0 + secs(100), 100), (2, t0 + secs(20)));
    assert_eq!(
        j.coalesce(t0 + secs(10), 1, t0 + secs(100), 100),
        (1, t0 + secs(20))
    );
    // So does the expiry.
    let j = job(Some("@every 10s"), Some(0), None, Some(25));
    assert_eq!(j.coalesce(t0, 0, t0 + secs(100), 100), (2, t0 + secs(20)));
    // Cron schedules walk.
    let j = job(Some("*/10 * * * * *"), Some(0), None, None);
    assert_eq!(j.coalesce(t0, 0, t0 + secs(35), 100), (3, t0 + secs(30)));
    assert_eq!(
        j.coalesce(t0, 0, t0 + secs(35), 2),
        (2, t0 + secs(20)),
        "walks are capped"
    );
    let j = job(Some("*/10 * * * * *"), Some(0), Some(2), None);
    assert_eq!(j.coalesce(t0, 0, t0 + secs(35), 100), (1, t0 + secs(10)));
    // A one-shot has nothing to coalesce.
    let j = job(None, Some(0), None, None);
    assert_eq!(j.coalesce(t0, 0, t0 + secs(100), 100), (0, t0));
}

// --- keys and storage form -----------------------------------------------------------------------

#[test]
fn keys_read_like_dapr_and_share_prefixes() {
    let k = JobKey::reminder("default", "Device", "d1", "tick");
    assert_eq!(k.to_string(), "actorreminder||default||Device||d1||tick");
    assert!(k
        .as_bytes()
        .starts_with(&JobKey::actor_prefix("default", "Device", "d1")));
    assert!(!k
        .as_bytes()
        .starts_with(&JobKey::actor_prefix("default", "Device", "d")));
    let k = JobKey::app("default", "myapp", "j");
    assert_eq!(k.to_string(), "app||default||myapp||j");
    assert!(k
        .as_bytes()
        .starts_with(&JobKey::app_prefix("default", "myapp")));
    assert_eq!(JobKey::from_bytes(k.as_bytes().to_vec()), k);
    assert_eq!(
        reminder_ok("{}").job.key(),
        JobKey::reminder("default", "Device", "d1", "tick")
    );
}

#[test]
fn jobs_serialize_and_come_back_equal() {
    for j in [
        job_ok(r#"{"schedule": "0 30 * * * *", "dueTime": "30s", "repeats": 5, "ttl": "1h", "data": {"x": "ü"}}"#).job,
        reminder_ok(r#"{"period": "R3/PT2S", "data": null, "failure_policy": {"drop": {}}}"#).job,
    ] {
        let text = serde_json::to_vec(&j).unwrap();
        assert_eq!(serde_json::from_slice::<Job>(&text).unwrap(), j);
    }
}

proptest! {
    #[test]
    fn keys_are_injective(
        a in prop::collection::vec(".{0,6}", 4),
        b in prop::collection::vec(".{0,6}", 4),
        app_a in any::<bool>(),
        app_b in any::<bool>(),
    ) {
        let key = |p: &[String], app: bool| if app {
            JobKey::app(&p[0], &p[1], &p[2])
        } else {
            JobKey::reminder(&p[0], &p[1], &p[2], &p[3])
        };
        let same = app_a == app_b && if app_a { a[..3] == b[..3] } else { a == b };
        prop_assert_eq!(key(&a, app_a) == key(&b, app_b), same);
    }

    #[test]
    fn request_parsers_never_panic(body in any::<Vec<u8>>(), name in ".{0,10}") {
        let _ = parse_job_request(&name, &body, &scope(), now());
        let _ = parse_reminder_request(
            ReminderRef { actor_type: "T", actor_id: "1", name: &name },
            &body,
            &ReminderScope { app_id: None, namespace: "ns".into() },
            now(),
        );
    }

    #[test]
    fn compaction_keeps_the_value(v in json_value()) {
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        let compact = compact_json(&pretty);
        prop_assert_eq!(serde_json::from_slice::<Value>(&compact).unwrap(), v);
        prop_assert!(!compact.contains(&b'\n'));
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[ \t\n\"\\\\a-zé]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[ a-z\"]{0,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
