//! The job model, the parsing and validation of create requests as Dapr does them, and the
//! next-tick computation.
//!
//! A [`Job`] is an app job (Jobs API, delivered as `POST /job/{name}` to the app) or an actor
//! reminder (delivered as `PUT /actors/{type}/{id}/method/remind/{name}`). Times in a job are
//! absolute: due times and TTLs are resolved when the request is parsed, and the strings the
//! client sent are kept in [`JobSpec`] for reads.
//!
//! Requests are checked in Dapr's order and rejected with Dapr's error code and HTTP status
//! ([`RequestError::error_code`], [`RequestError::http_status`]):
//! - Jobs API (`POST /v1.0-alpha1/jobs/{name}`, body read with protobuf-JSON rules: both
//!   `dueTime` and `due_time` spellings, numbers for `repeats` as JSON numbers or strings, the
//!   failure policy interval as a protobuf duration such as `"5s"`): an unreadable body is
//!   400 `ERR_MALFORMED_REQUEST`; a name in the body 400 `DAPR_SCHEDULER_JOB_NAME`; an empty URL
//!   name or one containing `|` 400 `DAPR_SCHEDULER_JOB_NAME_EMPTY`; neither `schedule` nor
//!   `dueTime` 400 `DAPR_SCHEDULER_SCHEDULE_EMPTY`; what the scheduler itself rejects (name not a
//!   DNS-1123 subdomain once `_ : - space` are removed, repeats without a schedule or of 0, a TTL
//!   without a schedule, unparsable schedule, due time or TTL, TTL before the due time) is 500
//!   `DAPR_SCHEDULER_SCHEDULE_JOB`, as in Dapr. Unknown body fields are ignored.
//! - Actor reminders (`POST|PUT /v1.0/actors/{type}/{id}/reminders/{name}`, body read with Go
//!   `encoding/json` rules: field names match case-insensitively, a `null` body is an empty one):
//!   an unreadable body is 400 `ERR_MALFORMED_REQUEST`; an unparsable due time, period or TTL, or
//!   a TTL already past, is 500 `ERR_ACTOR_REMINDER_CREATE`. `overwrite` defaults to true. The
//!   failure policy is read from `failure_policy` (Dapr's field) or `failurePolicy` (what the
//!   Python SDK sends), its interval as a Go duration (the SDK's `0h0m5s0ms0μs`).
//! - Creating over an existing job or reminder with `overwrite: false` is 409 (the store decides;
//!   [`RequestError::already_exists`] builds the error).
//!
//! Defaults follow Dapr's scheduler: the failure policy is `constant` with a 1 s interval and 3
//! retries; a reminder without `dueTime` is due at once. A `constant` policy given without an
//! `interval` waits 1 s between attempts (rather than retrying at once).

use std::fmt;
use std::time::Duration;

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::schedule::{self, Schedule};

/// What happens when a delivery fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    /// The tick is given up at once.
    Drop,
    /// The tick is retried every `interval`, at most `max_retries` times (`None` = until it
    /// succeeds or the job is deleted).
    Constant {
        interval: Duration,
        max_retries: Option<u32>,
    },
}

impl Default for FailurePolicy {
    /// Dapr's scheduler default: constant, 1 s apart, 3 retries.
    fn default() -> Self {
        FailurePolicy::Constant {
            interval: Duration::from_secs(1),
            max_retries: Some(3),
        }
    }
}

/// Whom a job's ticks go to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// An app job: `POST /job/{name}` on one replica of the app.
    App { app_id: String, namespace: String },
    /// An actor reminder: `PUT /actors/{type}/{id}/method/remind/{name}` on the actor's owner.
    /// `app_id` is the app that registered it, when known (reminders are keyed without it).
    ActorReminder {
        app_id: Option<String>,
        namespace: String,
        actor_type: String,
        actor_id: String,
    },
}

/// The strings a client sent, kept for reads (`GET` returns them as given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub schedule: Option<String>,
    pub due_time: Option<String>,
    pub ttl: Option<String>,
    /// A reminder's period.
    pub period: Option<String>,
}

/// A job or reminder, with every time resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    pub target: Target,
    /// `None`: fires once, at `due_time`.
    pub schedule: Option<Schedule>,
    /// The first tick. Without it a scheduled job first fires on its schedule after
    /// `created_at`.
    pub due_time: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// How many ticks in all (`None` = unlimited).
    pub repeats: Option<u32>,
    /// No tick after this time.
    pub expiry: Option<DateTime<Utc>>,
    /// The payload as compact JSON text; empty when the request had none.
    #[serde(with = "json_text")]
    pub data: Vec<u8>,
    pub failure_policy: FailurePolicy,
    pub spec: JobSpec,
}

impl Job {
    /// The job's identity in the store.
    pub fn key(&self) -> JobKey {
        match &self.target {
            Target::App { app_id, namespace } => JobKey::app(namespace, app_id, &self.name),
            Target::ActorReminder {
                namespace,
                actor_type,
                actor_id,
                ..
            } => JobKey::reminder(namespace, actor_type, actor_id, &self.name),
        }
    }

    /// The tick after the last one accounted for. `last` is the scheduled time of the last tick
    /// delivered or given up (`None` before the first), `count_fired` how many ticks have been
    /// accounted for so far (a coalesced delivery accounts for several). `None` when the job is
    /// done: one-shot and fired, `repeats` reached, the next tick past the expiry, or the schedule
    /// has no next tick. The result is never before the due time.
    pub fn next_fire(
        &self,
        last: Option<DateTime<Utc>>,
        count_fired: u32,
    ) -> Option<DateTime<Utc>> {
        if self.repeats.is_some_and(|r| count_fired >= r) {
            return None;
        }
        let next = match (&self.schedule, last) {
            (None, None) => self.due_time.unwrap_or(self.created_at),
            (None, Some(_)) => return None,
            (Some(s), None) => match self.due_time {
                Some(due) => due,
                None => s.next_after(self.created_at)?,
            },
            (Some(s), Some(last)) => {
                let next = s.next_after(last)?;
                match self.due_time {
                    Some(due) if next < due => due,
                    _ => next,
                }
            }
        };
        if self.expiry.is_some_and(|e| next > e) {
            return None;
        }
        Some(next)
    }

    /// The ticks after `tick` that are also due at `now`, to be coalesced into `tick`'s
    /// delivery: how many and the last of them (`tick` itself when none). `count_before` is how
    /// many ticks were accounted for before `tick`. Fixed intervals are counted arithmetically;
    /// cron schedules are walked, at most `cap` ticks.
    pub fn coalesce(
        &self,
        tick: DateTime<Utc>,
        count_before: u32,
        now: DateTime<Utc>,
        cap: u32,
    ) -> (u32, DateTime<Utc>) {
        let remaining = self.repeats.map_or(u32::MAX, |r| {
            r.saturating_sub(count_before).saturating_sub(1)
        });
        if let Some(Schedule::Every(every)) = &self.schedule {
            // Arithmetic instead of a walk: a 1 ms interval after a day-long outage is 86 million
            // ticks.
            let every_ns = i64::try_from(every.as_nanos()).unwrap_or(i64::MAX);
            let horizon = self.expiry.map_or(now, |e| e.min(now));
            if every_ns <= 0 || horizon <= tick {
                return (0, tick);
            }
            let span = (horizon - tick).num_nanoseconds().unwrap_or(i64::MAX);
            let n = u32::try_from(span / every_ns)
                .unwrap_or(u32::MAX)
                .min(remaining);
            // n * every <= span, which fits.
            let offset = TimeDelta::nanoseconds(i64::from(n).saturating_mul(every_ns));
            return (n, tick.checked_add_signed(offset).unwrap_or(tick));
        }
        let cap = cap.min(remaining);
        let (mut missed, mut last) = (0, tick);
        while missed < cap {
            match self.next_fire(Some(last), count_before.saturating_add(1 + missed)) {
                Some(next) if next <= now => {
                    last = next;
                    missed += 1;
                }
                _ => break,
            }
        }
        (missed, last)
    }
}

/// Job data is JSON text: stored as a string, not a list of numbers.
mod json_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(data) {
            Ok(text) => s.serialize_str(text),
            Err(_) => Err(serde::ser::Error::custom("job data is not UTF-8 JSON text")),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(String::deserialize(d)?.into_bytes())
    }
}

// ---------------------------------------------------------------------------------------------
// Keys

/// A job's identity: its target's scope and its name. The byte form is injective (each part is
/// length-prefixed) and all reminders of one actor, or all jobs of one app, share a prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobKey(Vec<u8>);

const KEY_APP: u8 = b'a';
const KEY_REMINDER: u8 = b'r';

fn push_part(out: &mut Vec<u8>, part: &str) {
    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&part.as_bytes()[..len as usize]);
}

fn key_of(tag: u8, parts: &[&str]) -> Vec<u8> {
    let mut out = vec![tag];
    for p in parts {
        push_part(&mut out, p);
    }
    out
}

impl JobKey {
    pub fn app(namespace: &str, app_id: &str, name: &str) -> Self {
        JobKey(key_of(KEY_APP, &[namespace, app_id, name]))
    }

    pub fn reminder(namespace: &str, actor_type: &str, actor_id: &str, name: &str) -> Self {
        JobKey(key_of(
            KEY_REMINDER,
            &[namespace, actor_type, actor_id, name],
        ))
    }

    /// The prefix of every job of one app.
    pub fn app_prefix(namespace: &str, app_id: &str) -> Vec<u8> {
        key_of(KEY_APP, &[namespace, app_id])
    }

    /// The prefix of every reminder of one actor.
    pub fn actor_prefix(namespace: &str, actor_type: &str, actor_id: &str) -> Vec<u8> {
        key_of(KEY_REMINDER, &[namespace, actor_type, actor_id])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn from_bytes(b: Vec<u8>) -> Self {
        JobKey(b)
    }

    /// The parts after the tag, if the bytes are well formed.
    fn parts(&self) -> Option<(u8, Vec<String>)> {
        let (&tag, mut rest) = self.0.split_first()?;
        let mut parts = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest.split_at_checked(4)?;
            let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
            let (part, tail) = tail.split_at_checked(len)?;
            parts.push(String::from_utf8_lossy(part).into_owned());
            rest = tail;
        }
        Some((tag, parts))
    }
}

/// Dapr's key spelling (`app||ns||app-id||name`, `actorreminder||ns||type||id||name`), for logs.
impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            Some((KEY_APP, p)) => write!(f, "app||{}", p.join("||")),
            Some((KEY_REMINDER, p)) => write!(f, "actorreminder||{}", p.join("||")),
            _ => write!(f, "<key {:?}>", self.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request errors

/// Why a create request was refused, with Dapr's error code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The body is not the JSON the endpoint takes.
    #[error("failed deserializing HTTP body: {0}")]
    Malformed(String),
    /// A path parameter is unusable (an empty actor type, id or reminder name).
    #[error("{0}")]
    BadRequest(String),
    /// A Jobs API body carried a `name`.
    #[error("Set the job name in the url only")]
    JobNameInBody,
    /// The URL's job name is empty or contains `|` (Dapr reports both as empty).
    #[error("Name is empty")]
    JobNameEmpty,
    /// Neither `schedule` nor `dueTime`.
    #[error("Schedule is empty")]
    ScheduleEmpty,
    /// The scheduler refused the job.
    #[error("failed to schedule job due to: {0}")]
    ScheduleJob(String),
    /// `overwrite: false` and the job exists.
    #[error("failed to schedule job due to: job {0} already exists")]
    JobAlreadyExists(String),
    /// The reminder could not be created.
    #[error("error creating actor reminder: {0}")]
    ReminderCreate(String),
    /// `overwrite: false` and the reminder exists.
    #[error("reminder {0} already exists")]
    ReminderAlreadyExists(String),
}

impl RequestError {
    /// Dapr's `errorCode`.
    pub fn error_code(&self) -> &'static str {
        match self {
            RequestError::Malformed(_) => "ERR_MALFORMED_REQUEST",
            RequestError::BadRequest(_) => "ERR_BAD_REQUEST",
            RequestError::JobNameInBody => "DAPR_SCHEDULER_JOB_NAME",
            RequestError::JobNameEmpty => "DAPR_SCHEDULER_JOB_NAME_EMPTY",
            RequestError::ScheduleEmpty => "DAPR_SCHEDULER_SCHEDULE_EMPTY",
            RequestError::ScheduleJob(_) | RequestError::JobAlreadyExists(_) => {
                "DAPR_SCHEDULER_SCHEDULE_JOB"
            }
            RequestError::ReminderCreate(_) => "ERR_ACTOR_REMINDER_CREATE",
            RequestError::ReminderAlreadyExists(_) => "ERR_ACTOR_REMINDER_ALREADY_EXISTS",
        }
    }

    /// The HTTP status Dapr answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            RequestError::Malformed(_)
            | RequestError::BadRequest(_)
            | RequestError::JobNameInBody
            | RequestError::JobNameEmpty
            | RequestError::ScheduleEmpty
            // Dapr answers 500 for a schedule, due time, TTL or period it cannot parse; that is
            // the client's input, so we answer 400 (reliability.md: bad input gets a 4xx).
            | RequestError::ScheduleJob(_)
            | RequestError::ReminderCreate(_) => 400,
            RequestError::JobAlreadyExists(_) | RequestError::ReminderAlreadyExists(_) => 409,
        }
    }

    /// The conflict error for creating `job` over an existing one with `overwrite: false`.
    pub fn already_exists(job: &Job) -> Self {
        match job.target {
            Target::App { .. } => RequestError::JobAlreadyExists(job.name.clone()),
            Target::ActorReminder { .. } => {
                RequestError::ReminderAlreadyExists(job.key().to_string())
            }
        }
    }
}

/// A parsed create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub job: Job,
    /// Whether an existing job of that key may be replaced.
    pub overwrite: bool,
}

// ---------------------------------------------------------------------------------------------
// JSON helpers

/// Compacts valid JSON text: drops whitespace outside strings.
fn compact_json(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
            in_string = b == b'"';
        }
    }
    out
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A body's top-level fields, each kept as its raw JSON text.
type Fields = BTreeMap<String, Box<RawValue>>;

/// Parses a body into its fields. A `null` body has none; an empty body stands for `{}` when
/// `empty_is_object`, else it is malformed (Go's decoder fails on it).
fn body_fields(body: &[u8], empty_is_object: bool) -> Result<Fields, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if empty_is_object {
            Ok(Fields::new())
        } else {
            Err(RequestError::Malformed("the body is empty".into()))
        };
    }
    serde_json::from_slice::<Option<Fields>>(body)
        .map(Option::unwrap_or_default)
        .map_err(|e| RequestError::Malformed(e.to_string()))
}

/// A field's value; `None` when it is JSON `null`.
fn value_of(raw: &RawValue) -> Option<Value> {
    // The text was parsed once already, so this cannot fail; a failure reads as null.
    serde_json::from_str::<Value>(raw.get())
        .ok()
        .filter(|v| !v.is_null())
}

/// An object's fields as values, `null`s left out.
fn object_of(v: &Value) -> Option<Map<String, Value>> {
    match v {
        Value::Object(m) => Some(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Jobs API

/// Who is creating an app job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppScope {
    pub app_id: String,
    pub namespace: String,
}

/// A field of a protobuf-JSON body: the JSON name or the proto name, not both.
fn proto_field<'a>(
    m: &'a Map<String, Value>,
    json_name: &str,
    proto_name: &str,
) -> Result<Option<&'a Value>, RequestError> {
    let (a, b) = (m.get(json_name), m.get(proto_name));
    match (a, b) {
        (Some(_), Some(_)) if json_name != proto_name => Err(RequestError::Malformed(format!(
            "field {json_name} is given twice (as {json_name} and {proto_name})"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

fn proto_string(
    m: &Map<String, Value>,
    json: &str,
    proto: &str,
) -> Result<Option<String>, RequestError> {
    match proto_field(m, json, proto)? {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(RequestError::Malformed(format!(
            "field {json} must be a string, found {}",
            type_name(v)
        ))),
    }
}

/// A `uint32` in protobuf JSON: a number or a decimal string.
fn proto_u32(m: &Map<String, Value>, json: &str, proto: &str) -> Result<Option<u32>, RequestError> {
    let bad = |what: &str| {
        RequestError::Malformed(format!(
            "field {json} must be a whole number from 0 to 4294967295, found {what}"
        ))
    };
    match proto_field(m, json, proto)? {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| bad(&n.to_string())),
        Some(Value::String(s)) => s
            .parse::<u32>()
            .map(Some)
            .map_err(|_| bad(&format!("{s:?}"))),
        Some(v) => Err(bad(type_name(v))),
    }
}

fn proto_bool(m: &Map<String, Value>, json: &str) -> Result<Option<bool>, RequestError> {
    match proto_field(m, json, json)? {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(RequestError::Malformed(format!(
            "field {json} must be true or false, found {}",
            type_name(v)
        ))),
    }
}

/// A `google.protobuf.Duration` in JSON: seconds with up to 9 decimals and an `s`, as `"1.5s"`.
fn proto_duration(s: &str) -> Option<TimeDelta> {
    let body = s.strip_suffix('s')?;
    let (neg, body) = match body.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, body),
    };
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || body.ends_with('.')
    {
        return None;
    }
    let secs: i64 = secs.parse().ok().filter(|s| *s <= 315_576_000_000)?;
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    let d = TimeDelta::try_seconds(secs)? + TimeDelta::nanoseconds(nanos);
    Some(if neg { -d } else { d })
}

/// How a body is read: with protobuf-JSON rules (the Jobs API) or Go `encoding/json` rules
/// (reminders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Proto,
    Go,
}

/// A failure policy: `{"drop": {}}` or `{"constant": {"interval": ..., "maxRetries": n}}`, an
/// empty object meaning the default. The interval is a protobuf duration (`"5s"`) for the Jobs
/// API and a Go duration (the Python SDK's `"0h0m5s0ms0μs"`) for reminders; a missing interval is
/// 1 s (absent, retries would follow each other at once); `max_retries` is accepted too.
fn failure_policy(v: &Value, dialect: Dialect) -> Result<FailurePolicy, RequestError> {
    let bad = |why: String| RequestError::Malformed(format!("failure policy: {why}"));
    let field = |m: &Map<String, Value>, json: &str, proto: &str| match dialect {
        Dialect::Proto => proto_field(m, json, proto).map(|v| v.cloned()),
        Dialect::Go => Ok(go_field(m, json).or_else(|| go_field(m, proto)).cloned()),
    };
    let Some(m) = object_of(v) else {
        return Err(bad(format!("expected an object, found {}", type_name(v))));
    };
    match (
        field(&m, "drop", "drop")?,
        field(&m, "constant", "constant")?,
    ) {
        (Some(_), Some(_)) => Err(bad("give either drop or constant, not both".into())),
        (Some(Value::Object(_)), None) => Ok(FailurePolicy::Drop),
        (Some(d), None) => Err(bad(format!(
            "drop must be an object, found {}",
            type_name(&d)
        ))),
        (None, Some(c @ Value::Object(_))) => {
            let c = object_of(&c).unwrap_or_default();
            let interval = match field(&c, "interval", "interval")? {
                None => Duration::from_secs(1),
                Some(Value::String(s)) => match dialect {
                    Dialect::Proto => proto_duration(&s)
                        .ok_or_else(|| {
                            bad(format!(
                                "interval {s:?} is not a protobuf duration such as \"5s\" or \"0.5s\""
                            ))
                        })?
                        .to_std()
                        .map_err(|_| bad(format!("interval {s:?} must not be negative")))?,
                    Dialect::Go => schedule::parse_go_duration(&s)
                        .map_err(|e| bad(e.to_string()))?
                        .as_std()
                        .ok_or_else(|| bad(format!("interval {s:?} must not be negative")))?,
                },
                Some(v) => {
                    return Err(bad(format!("interval must be a string, found {}", type_name(&v))))
                }
            };
            let max_retries = match (field(&c, "maxRetries", "max_retries")?, dialect) {
                (None, _) => None,
                (Some(Value::Number(n)), _) => Some(
                    n.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| {
                            bad(format!(
                                "maxRetries {n} is not a whole number from 0 to 4294967295"
                            ))
                        })?,
                ),
                // Protobuf JSON also writes integers as strings.
                (Some(Value::String(s)), Dialect::Proto) => {
                    Some(s.parse::<u32>().map_err(|_| {
                        bad(format!(
                            "maxRetries {s:?} is not a whole number from 0 to 4294967295"
                        ))
                    })?)
                }
                (Some(v), _) => {
                    return Err(bad(format!(
                        "maxRetries must be a number, found {}",
                        type_name(&v)
                    )))
                }
            };
            Ok(FailurePolicy::Constant {
                interval,
                max_retries,
            })
        }
        (None, Some(c)) => Err(bad(format!(
            "constant must be an object, found {}",
            type_name(&c)
        ))),
        (None, None) => Ok(FailurePolicy::default()),
    }
}

/// Whether a job name passes Dapr's scheduler check: once `_`, `:`, `-` and spaces are removed
/// and it is lower-cased, each `||`-separated part is a DNS-1123 subdomain.
fn job_name_problem(name: &str) -> Option<String> {
    let cleaned: String = name
        .chars()
        .filter(|c| !matches!(c, '_' | ':' | '-' | ' '))
        .collect::<String>()
        .to_lowercase();
    for part in cleaned.split("||") {
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        };
        if part.len() > 253 || !part.split('.').all(label_ok) {
            return Some(format!(
                "job name is invalid {name:?}: after removing '_', ':', '-' and spaces it must be \
                 lower-case letters, digits and dots (a DNS-1123 subdomain, at most 253 characters)"
            ));
        }
    }
    None
}

/// Parses and validates a Jobs API create request (`POST /v1.0-alpha1/jobs/{name}`) the way Dapr
/// does, resolving due time and TTL against `now`.
pub fn parse_job_request(
    url_name: &str,
    body: &[u8],
    scope: &AppScope,
    now: DateTime<Utc>,
) -> Result<CreateRequest, RequestError> {
    let fields = body_fields(body, true)?;
    let m: Map<String, Value> = fields
        .iter()
        .filter_map(|(k, raw)| value_of(raw).map(|v| (k.clone(), v)))
        .collect();
    let body_name = proto_string(&m, "name", "name")?;
    let schedule_text = proto_string(&m, "schedule", "schedule")?;
    let due_text = proto_string(&m, "dueTime", "due_time")?;
    let ttl_text = proto_string(&m, "ttl", "ttl")?;
    let repeats = proto_u32(&m, "repeats", "repeats")?;
    let overwrite = proto_bool(&m, "overwrite")?.unwrap_or(false);
    let data = fields
        .get("data")
        .map_or_else(Vec::new, |raw| compact_json(raw.get().as_bytes()));
    let failure_policy = match proto_field(&m, "failurePolicy", "failure_policy")? {
        None => FailurePolicy::default(),
        Some(v) => failure_policy(v, Dialect::Proto)?,
    };

    if body_name.is_some_and(|n| !n.is_empty()) {
        return Err(RequestError::JobNameInBody);
    }
    let name = url_name.trim();
    if name.is_empty() || name.contains('|') {
        return Err(RequestError::JobNameEmpty);
    }
    if schedule_text.is_none() && due_text.is_none() {
        return Err(RequestError::ScheduleEmpty);
    }

    let refuse = |why: String| RequestError::ScheduleJob(why);
    if let Some(why) = job_name_problem(name) {
        return Err(refuse(why));
    }
    if schedule_text.is_none() && repeats.is_some_and(|r| r > 1) {
        return Err(refuse("job must have a schedule to repeat".into()));
    }
    if repeats == Some(0) {
        return Err(refuse("defined repeats must be greater than 0".into()));
    }
    if schedule_text.is_none() && ttl_text.is_some() {
        return Err(refuse("job must have a schedule to have a ttl".into()));
    }
    let schedule = match &schedule_text {
        None => None,
        Some(s) => Some(schedule::parse_job_schedule(s).map_err(|e| refuse(e.to_string()))?),
    };
    let due_time = match &due_text {
        None => None,
        Some(s) if s.is_empty() => return Err(refuse("due time is empty".into())),
        Some(s) => Some(schedule::parse_due_time(s, now).map_err(|e| refuse(e.to_string()))?),
    };
    let expiry = match &ttl_text {
        None => None,
        Some(s) => {
            let base = due_time.unwrap_or(now);
            let exp = schedule::parse_ttl(s, base).map_err(|e| refuse(e.to_string()))?;
            if due_time.is_some_and(|d| d > exp) {
                return Err(refuse("ttl must be greater than due time".into()));
            }
            Some(exp)
        }
    };
    Ok(CreateRequest {
        job: Job {
            name: name.to_string(),
            target: Target::App {
                app_id: scope.app_id.clone(),
                namespace: scope.namespace.clone(),
            },
            schedule,
            due_time,
            created_at: now,
            repeats,
            expiry,
            data,
            failure_policy,
            spec: JobSpec {
                schedule: schedule_text,
                due_time: due_text,
                ttl: ttl_text,
                period: None,
            },
        },
        overwrite,
    })
}

// ---------------------------------------------------------------------------------------------
// Actor reminders

/// Who is creating a reminder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReminderScope {
    /// The registering app, when known.
    pub app_id: Option<String>,
    pub namespace: String,
}

/// The path parameters of a reminder request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReminderRef<'a> {
    pub actor_type: &'a str,
    pub actor_id: &'a str,
    pub name: &'a str,
}

/// A field of a Go `encoding/json` body: an exact match, else the first case-insensitive one.
fn go_field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn go_string(m: &Map<String, Value>, name: &str) -> Result<String, RequestError> {
    match go_field(m, name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(RequestError::Malformed(format!(
            "field {name} must be a string, found {}",
            type_name(v)
        ))),
    }
}

/// Parses and validates an actor reminder create request
/// (`POST|PUT /v1.0/actors/{type}/{id}/reminders/{name}`) the way Dapr's scheduler-backed
/// reminders do, resolving due time and TTL against `now`.
pub fn parse_reminder_request(
    r: ReminderRef<'_>,
    body: &[u8],
    scope: &ReminderScope,
    now: DateTime<Utc>,
) -> Result<CreateRequest, RequestError> {
    for (what, v) in [
        ("actor type", r.actor_type),
        ("actor id", r.actor_id),
        ("reminder name", r.name),
    ] {
        if v.is_empty() {
            return Err(RequestError::BadRequest(format!("the {what} is empty")));
        }
    }
    let fields = body_fields(body, false)?;
    let m: Map<String, Value> = fields
        .iter()
        .filter_map(|(k, raw)| value_of(raw).map(|v| (k.clone(), v)))
        .collect();
    let due_text = go_string(&m, "dueTime")?;
    let period_text = go_string(&m, "period")?;
    let ttl_text = go_string(&m, "ttl")?;
    let overwrite = match go_field(&m, "overwrite") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(RequestError::Malformed(format!(
                "field overwrite must be true or false, found {}",
                type_name(v)
            )))
        }
    };
    // Dapr keeps the raw text of `data`, compacted; `null` stays "null".
    let data = fields
        .get("data")
        .or_else(|| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("data"))
                .map(|(_, v)| v)
        })
        .map_or_else(Vec::new, |raw| compact_json(raw.get().as_bytes()));
    let policy = go_field(&m, "failure_policy").or_else(|| go_field(&m, "failurePolicy"));
    let failure_policy = match policy {
        None => FailurePolicy::default(),
        Some(v) => failure_policy(v, Dialect::Go)?,
    };

    let refuse = |why: String| RequestError::ReminderCreate(why);
    let due = schedule::parse_due_time(&due_text, now)
        .map_err(|e| refuse(format!("error parsing reminder due time: {e}")))?;
    let period = schedule::parse_reminder_period(&period_text)
        .map_err(|e| refuse(format!("invalid reminder period: {e}")))?;
    let key = JobKey::reminder(&scope.namespace, r.actor_type, r.actor_id, r.name);
    let expiry = if ttl_text.is_empty() {
        None
    } else {
        let exp = schedule::parse_ttl(&ttl_text, due)
            .map_err(|e| refuse(format!("error parsing reminder TTL: {e}")))?;
        if now > exp || due > exp {
            return Err(refuse(format!(
                "reminder {key} has already expired: dueTime: {} TTL: {ttl_text}",
                due.to_rfc3339()
            )));
        }
        Some(exp)
    };
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(CreateRequest {
        job: Job {
            name: r.name.to_string(),
            target: Target::ActorReminder {
                app_id: scope.app_id.clone(),
                namespace: scope.namespace.clone(),
                actor_type: r.actor_type.to_string(),
                actor_id: r.actor_id.to_string(),
            },
            schedule: period.map(|p| p.schedule()),
            due_time: Some(due),
            created_at: now,
            repeats: period.and_then(|p| p.repeats),
            expiry,
            data,
            failure_policy,
            spec: JobSpec {
                schedule: None,
                due_time: non_empty(due_text),
                ttl: non_empty(ttl_text),
                period: non_empty(period_text),
            },
        },
        overwrite,
    })
}

#[cfg(test)]
mod tests;
