//! Actor timers: in-memory, tied to one activation, gone when it is deactivated. One task per
//! registered timer (timers are few; idle actors have none).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use chrono::Utc;
use tokio::time::Instant;

use super::activation::{Activation, ActorKey};
use super::app_channel::AppRequest;
use super::{encode, ActorRuntime, CallError, Local};

/// A timer as registered (`POST /v1.0/actors/{type}/{id}/timers/{name}`).
#[derive(Debug, Clone)]
pub struct TimerSpec {
    pub callback: String,
    pub due_time: String,
    pub period: String,
    pub ttl: String,
    /// Raw JSON, echoed to the app.
    pub data: Option<serde_json::Value>,
}

fn bad(message: String) -> CallError {
    CallError::new(StatusCode::BAD_REQUEST, "ERR_ACTOR_TIMER_CREATE", message)
}

/// When and how often a timer fires.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    first: Duration,
    every: Option<Duration>,
    repeats: Option<u32>,
    until: Option<Duration>,
}

fn plan(spec: &TimerSpec) -> Result<Plan, CallError> {
    use scheduler::schedule::{parse_due_time, parse_reminder_period, parse_ttl};
    let now = Utc::now();
    let due = parse_due_time(&spec.due_time, now)
        .map_err(|e| bad(format!("invalid dueTime {:?}: {e}", spec.due_time)))?;
    let period = parse_reminder_period(&spec.period)
        .map_err(|e| bad(format!("invalid period {:?}: {e}", spec.period)))?;
    let until = if spec.ttl.trim().is_empty() {
        None
    } else {
        let end = parse_ttl(&spec.ttl, due)
            .map_err(|e| bad(format!("invalid ttl {:?}: {e}", spec.ttl)))?;
        Some((end - now).to_std().unwrap_or(Duration::ZERO))
    };
    Ok(Plan {
        first: (due - now).to_std().unwrap_or(Duration::ZERO),
        every: period.as_ref().map(|p| p.every),
        repeats: period.and_then(|p| p.repeats),
        until,
    })
}

impl ActorRuntime {
    /// Registers (or replaces) a timer on the actor's activation here.
    pub async fn create_timer(
        self: &Arc<Self>,
        key: &ActorKey,
        name: &str,
        spec: TimerSpec,
    ) -> Result<(), CallError> {
        if !self.settings().types.contains_key(&key.actor_type) {
            return Err(CallError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_ACTOR_TIMER_CREATE",
                format!(
                    "actor type {:?} is not registered on this host",
                    key.actor_type
                ),
            ));
        }
        let plan = plan(&spec)?;
        let deadline = Instant::now() + self.cfg.call_timeout;
        let act = match self.activation(key, None, deadline).await {
            Ok(a) => a,
            Err(Local::Done(Err(e))) => return Err(e),
            Err(_) => {
                return Err(CallError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_ACTOR_TIMER_CREATE",
                    format!(
                    "actor {key} is not hosted here; register timers from the actor's own calls"
                ),
                ))
            }
        };
        let body = serde_json::json!({
            "callback": spec.callback,
            "dueTime": spec.due_time,
            "period": spec.period,
            "data": spec.data,
        });
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let task = tokio::spawn(run_timer(
            Arc::downgrade(self),
            Arc::downgrade(&act),
            name.to_string(),
            plan,
            body,
        ));
        act.add_timer(name, task.abort_handle());
        Ok(())
    }

    /// Removes a timer; absent timers are fine (Dapr answers 204 either way).
    pub fn delete_timer(&self, key: &ActorKey, name: &str) {
        if let Some(a) = self.local(key) {
            a.remove_timer(name);
        }
    }

    /// One timer tick: a turn on this very activation.
    async fn fire_timer(self: &Arc<Self>, act: &Arc<Activation>, name: &str, body: Bytes) -> bool {
        let Some(app) = self.app.clone() else {
            return false;
        };
        let reentrancy = self
            .settings()
            .get(&act.key.actor_type)
            .and_then(|t| t.reentrancy);
        let chain = uuid::Uuid::new_v4().to_string();
        let deadline = Instant::now() + self.cfg.call_timeout;
        if !self.placement_connected() {
            return true; // skip this tick; the lease watch will close the activation
        }
        let Ok(Ok(turn)) = tokio::time::timeout_at(deadline, act.enter(&chain, reentrancy)).await
        else {
            return act.is_active();
        };
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        if reentrancy.is_some() {
            if let Ok(v) = HeaderValue::from_str(&chain) {
                headers.insert(super::REENTRANCY_HEADER, v);
            }
        }
        let req = AppRequest {
            method: Method::PUT,
            path: format!(
                "/actors/{}/{}/method/timer/{}",
                encode(&act.key.actor_type),
                encode(&act.key.actor_id),
                encode(name)
            ),
            headers,
            body,
        };
        // The turn lasts until the app answers, even if this timer is cancelled meanwhile.
        match tokio::time::timeout_at(deadline, self.run_turn(turn, app, req)).await {
            Ok(Ok(r)) if r.status.is_success() => {}
            Ok(Ok(r)) => {
                tracing::warn!(actor = %act.key, timer = name, status = %r.status, "timer callback failed")
            }
            Ok(Err(e)) => {
                tracing::warn!(actor = %act.key, timer = name, error = %e, "timer callback failed")
            }
            Err(_) => tracing::warn!(actor = %act.key, timer = name, "timer callback timed out"),
        }
        true
    }
}

async fn run_timer(
    runtime: std::sync::Weak<ActorRuntime>,
    act: std::sync::Weak<Activation>,
    name: String,
    plan: Plan,
    body: Bytes,
) {
    let start = Instant::now();
    let end = plan.until.map(|d| start + d);
    let mut next = start + plan.first;
    let mut fired = 0u32;
    loop {
        if end.is_some_and(|e| next > e) {
            break;
        }
        tokio::time::sleep_until(next).await;
        let (Some(rt), Some(a)) = (runtime.upgrade(), act.upgrade()) else {
            return;
        };
        if !a.is_active() || !rt.fire_timer(&a, &name, body.clone()).await {
            return;
        }
        fired += 1;
        let Some(every) = plan.every else { break };
        if plan.repeats.is_some_and(|r| fired >= r) {
            break;
        }
        // Never early; a slow callback delays the next tick rather than bunching them.
        next = (next + every).max(Instant::now());
    }
    if let Some(a) = act.upgrade() {
        a.timer_finished(&name);
    }
}
