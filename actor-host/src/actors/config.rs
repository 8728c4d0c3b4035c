//! The app's actor configuration, from `GET /dapr/config` (Dapr's discovery document).
//!
//! Every field is optional. Durations are Go duration strings; a value that does not parse is
//! logged and replaced by the default, as Dapr does. `entitiesConfig` entries override the root
//! settings for the types they list.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Dapr's default `actorIdleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Dapr's default `drainOngoingCallTimeout` (since 1.17).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Dapr's default maximum reentrancy stack depth.
pub const DEFAULT_MAX_STACK_DEPTH: u32 = 32;

/// How one actor type behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSettings {
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub drain_rebalanced: bool,
    /// `Some(max stack depth)` when reentrancy is enabled.
    pub reentrancy: Option<u32>,
}

impl Default for TypeSettings {
    fn default() -> Self {
        TypeSettings {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            drain_rebalanced: true,
            reentrancy: None,
        }
    }
}

/// The actor types this host's app serves, with their settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActorSettings {
    pub types: BTreeMap<String, TypeSettings>,
}

impl ActorSettings {
    pub fn get(&self, actor_type: &str) -> Option<&TypeSettings> {
        self.types.get(actor_type)
    }

    /// The shortest idle timeout: how often idle actors are looked for.
    pub fn scan_interval(&self) -> Duration {
        let shortest = self
            .types
            .values()
            .map(|t| t.idle_timeout)
            .min()
            .unwrap_or(DEFAULT_IDLE_TIMEOUT);
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(30))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Overrides {
    #[serde(default)]
    entities: Vec<String>,
    actor_idle_timeout: Option<Value>,
    drain_ongoing_call_timeout: Option<Value>,
    drain_rebalanced_actors: Option<Value>,
    reentrancy: Option<Value>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(flatten)]
    root: Overrides,
    #[serde(default)]
    entities_config: Vec<Overrides>,
}

fn duration(field: &str, v: &Option<Value>, default: Duration) -> Duration {
    let Some(v) = v else { return default };
    let parsed = v.as_str().and_then(|s| {
        scheduler::schedule::parse_go_duration(s)
            .ok()
            .and_then(|d| d.as_std())
    });
    match parsed {
        Some(d) if !d.is_zero() => d,
        _ => {
            tracing::warn!(field, value = %v, "invalid duration in the app's /dapr/config: using the default");
            default
        }
    }
}

fn apply(o: &Overrides, base: &TypeSettings) -> TypeSettings {
    let mut t = base.clone();
    t.idle_timeout = duration("actorIdleTimeout", &o.actor_idle_timeout, base.idle_timeout);
    t.drain_timeout = duration(
        "drainOngoingCallTimeout",
        &o.drain_ongoing_call_timeout,
        base.drain_timeout,
    );
    if let Some(v) = &o.drain_rebalanced_actors {
        match v.as_bool() {
            Some(b) => t.drain_rebalanced = b,
            None => tracing::warn!(value = %v, "drainRebalancedActors is not a boolean: ignored"),
        }
    }
    if let Some(r) = &o.reentrancy {
        let enabled = r.get("enabled").and_then(Value::as_bool).unwrap_or(false);
        let depth = r
            .get("maxStackDepth")
            .and_then(Value::as_u64)
            .filter(|d| *d > 0)
            .map(|d| d.min(u32::MAX as u64) as u32)
            .unwrap_or(DEFAULT_MAX_STACK_DEPTH);
        t.reentrancy = enabled.then_some(depth);
    }
    t
}

/// Parses the discovery document. Only a body that is not JSON at all is an error.
pub fn parse(body: &[u8]) -> Result<ActorSettings, serde_json::Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ActorSettings::default());
    }
    let doc: Document = serde_json::from_slice(body)?;
    let root = apply(&doc.root, &TypeSettings::default());
    let mut types: BTreeMap<String, TypeSettings> = doc
        .root
        .entities
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| (t.clone(), root.clone()))
        .collect();
    for o in &doc.entities_config {
        for t in &o.entities {
            match types.get(t) {
                Some(_) => {
                    let s = apply(o, &root);
                    types.insert(t.clone(), s);
                }
                None => tracing::warn!(
                    actor_type = t,
                    "entitiesConfig names a type missing from `entities`: ignored"
                ),
            }
        }
    }
    Ok(ActorSettings { types })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_document() {
        let s = parse(
            br#"{"entities":["A","B"],"actorIdleTimeout":"1h30m","actorScanInterval":"30s",
                "drainOngoingCallTimeout":"10s","drainRebalancedActors":false,
                "reentrancy":{"enabled":true,"maxStackDepth":5},
                "remindersStoragePartitions":0,
                "entitiesConfig":[{"entities":["B"],"actorIdleTimeout":"1m","reentrancy":{"enabled":false}},
                                  {"entities":["Z"],"actorIdleTimeout":"1m"}]}"#,
        )
        .unwrap();
        let a = s.get("A").unwrap();
        assert_eq!(a.idle_timeout, Duration::from_secs(5400));
        assert_eq!(a.drain_timeout, Duration::from_secs(10));
        assert!(!a.drain_rebalanced);
        assert_eq!(a.reentrancy, Some(5));
        let b = s.get("B").unwrap();
        assert_eq!(b.idle_timeout, Duration::from_secs(60));
        assert_eq!(b.reentrancy, None);
        assert_eq!(
            b.drain_timeout,
            Duration::from_secs(10),
            "inherits the root"
        );
        assert!(s.get("Z").is_none(), "types must be listed in entities");
    }

    #[test]
    fn python_sdk_durations_and_bad_values() {
        let s = parse(
            r#"{"entities":["A"],"actorIdleTimeout":"1h0m0s0ms0μs","drainOngoingCallTimeout":"soon",
                "reentrancy":{"enabled":true}}"#
                .as_bytes(),
        )
        .unwrap();
        let a = s.get("A").unwrap();
        assert_eq!(a.idle_timeout, Duration::from_secs(3600));
        assert_eq!(a.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(a.reentrancy, Some(DEFAULT_MAX_STACK_DEPTH));
    }

    #[test]
    fn empty_and_invalid() {
        assert!(parse(b"").unwrap().types.is_empty());
        assert!(parse(b"{}").unwrap().types.is_empty());
        assert!(parse(b"not json").is_err());
    }
}
