//! `state.redis`: keys are Redis hashes with fields `data` and `version` (Dapr's layout), TTLs
//! are Redis expirations, and every write (one key or a transaction) is one Lua script, so the
//! ETag checks and the writes are atomic on the server. Durability is whatever the Redis server
//! is configured for (AOF / RDB).

use std::collections::HashMap;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{ConnectionAddr, ConnectionInfo, RedisConnectionInfo, Script};

use super::{fresh_etag, parse_etags, Concurrency, Op, StateError, StateItem, StateStore};
use crate::resources::{ComponentError, ComponentSpec};

/// Checks every condition against a running view of the keys (so later operations see earlier
/// ones), then applies all writes. ARGV holds five values per operation:
/// kind (`s`/`d`), expected etag (or empty), first-write (`1`/`0`), new etag, ttl in ms (0 = none);
/// values follow after all operations, one per `s`.
const TRANSACT_LUA: &str = r#"
local n = #KEYS
local seen = {}
for i = 1, n do
  local k = KEYS[i]
  local b = (i - 1) * 5
  local kind, want, fw, newv = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local have = seen[k]
  if have == nil then have = redis.call('HGET', k, 'version') end
  if want ~= '' then
    if (not have) or have ~= want then return redis.error_reply('TESSERA_ETAG ' .. i) end
  elseif kind == 's' and fw == '1' and have then
    return redis.error_reply('TESSERA_EXISTS ' .. i)
  end
  if kind == 's' then seen[k] = newv else seen[k] = false end
end
local v = n * 5
for i = 1, n do
  local k = KEYS[i]
  local b = (i - 1) * 5
  if ARGV[b + 1] == 's' then
    v = v + 1
    redis.call('HSET', k, 'data', ARGV[v], 'version', ARGV[b + 4])
    local ttl = tonumber(ARGV[b + 5])
    if ttl > 0 then redis.call('PEXPIRE', k, ttl) else redis.call('PERSIST', k) end
  else
    redis.call('DEL', k)
  end
end
return 'OK'
"#;

/// Reads data, version and absolute expiry (ms) in one round trip.
const GET_LUA: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'data', 'version')
if not r[1] then return false end
return {r[1], r[2], redis.call('PEXPIRETIME', KEYS[1])}
"#;

pub struct RedisStore {
    conn: ConnectionManager,
    transact: Script,
    get: Script,
}

impl RedisStore {
    /// Connects using Dapr's metadata names: `redisHost` (required, `host:port`),
    /// `redisPassword`, `redisUsername`, `redisDB`.
    pub async fn connect(spec: &ComponentSpec) -> Result<Self, ComponentError> {
        let host = spec.required("redisHost")?;
        let (h, p) = match host.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| spec.invalid("redisHost", "the port is not a number"))?,
            ),
            None => (host, 6379),
        };
        let mut redis = RedisConnectionInfo::default();
        if let Some(db) = spec.optional("redisDB") {
            redis = redis.set_db(
                db.parse()
                    .map_err(|_| spec.invalid("redisDB", "must be a number"))?,
            );
        }
        if let Some(pw) = spec.optional("redisPassword").filter(|s| !s.is_empty()) {
            redis = redis.set_password(pw);
        }
        if let Some(user) = spec.optional("redisUsername").filter(|s| !s.is_empty()) {
            redis = redis.set_username(user);
        }
        if spec.optional("enableTLS").is_some_and(|v| v == "true") {
            return Err(spec.invalid(
                "enableTLS",
                "TLS to Redis is not supported yet; use a local TLS proxy or a plain connection",
            ));
        }
        let info: ConnectionInfo = ConnectionAddr::Tcp(
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p,
        )
        .into_connection_info_with(redis);
        let client = redis::Client::open(info).map_err(|e| spec.failed(e))?;
        // Probe once so a wrong address fails now with the real reason; the manager then
        // reconnects on its own for the life of the store.
        let probe = async {
            let mut c = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut c).await?;
            ConnectionManager::new(client).await
        };
        let conn = tokio::time::timeout(std::time::Duration::from_secs(5), probe)
            .await
            .map_err(|_| spec.failed(format!("no answer from Redis at {host} within 5 s")))?
            .map_err(|e| spec.failed(format!("cannot connect to Redis at {host}: {e}")))?;
        Ok(RedisStore {
            conn,
            transact: Script::new(TRANSACT_LUA),
            get: Script::new(GET_LUA),
        })
    }
}

trait WithRedis {
    fn into_connection_info_with(self, redis: RedisConnectionInfo) -> ConnectionInfo;
}

impl WithRedis for ConnectionAddr {
    fn into_connection_info_with(self, redis: RedisConnectionInfo) -> ConnectionInfo {
        use redis::IntoConnectionInfo;
        self.into_connection_info()
            .expect("an address is always valid")
            .set_redis_settings(redis)
    }
}

fn map_err(e: redis::RedisError, ops: &[Op]) -> StateError {
    let text = e.to_string();
    let index = |tag: &str| {
        text.split(tag)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|i| ops.get(i.wrapping_sub(1)))
            .map(|op| op.key().to_string())
            .unwrap_or_default()
    };
    if text.contains("TESSERA_ETAG") {
        StateError::EtagMismatch {
            key: index("TESSERA_ETAG "),
            reason: "the etag does not match the stored one",
        }
    } else if text.contains("TESSERA_EXISTS") {
        StateError::EtagMismatch {
            key: index("TESSERA_EXISTS "),
            reason: "first-write: the key already exists",
        }
    } else {
        StateError::Backend(format!("redis: {text}"))
    }
}

#[async_trait]
impl StateStore for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<StateItem>, StateError> {
        let mut conn = self.conn.clone();
        let r: Option<(Vec<u8>, String, i64)> = self
            .get
            .key(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| map_err(e, &[]))?;
        Ok(r.map(|(data, etag, exp)| StateItem {
            value: Bytes::from(data),
            etag,
            expires_at_ms: (exp > 0).then_some(exp),
        }))
    }

    async fn bulk_get(&self, keys: &[String]) -> Result<Vec<Option<StateItem>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HMGET").arg(k).arg("data").arg("version");
            pipe.cmd("PEXPIRETIME").arg(k);
        }
        let mut conn = self.conn.clone();
        let raw: Vec<redis::Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| map_err(e, &[]))?;
        let mut out = Vec::with_capacity(keys.len());
        for pair in raw.chunks(2) {
            let (fields, exp): (Vec<Option<Vec<u8>>>, i64) = (
                redis::from_redis_value(pair[0].clone()).map_err(StateError::backend)?,
                redis::from_redis_value(pair[1].clone()).map_err(StateError::backend)?,
            );
            out.push(match fields.as_slice() {
                [Some(data), Some(version)] => Some(StateItem {
                    value: Bytes::from(data.clone()),
                    etag: String::from_utf8_lossy(version).into_owned(),
                    expires_at_ms: (exp > 0).then_some(exp),
                }),
                _ => None,
            });
        }
        Ok(out)
    }

    async fn transact(&self, ops: Vec<Op>) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        let etags = parse_etags(&ops)?;
        let mut inv = self.transact.prepare_invoke();
        let mut last_new: HashMap<&str, u64> = HashMap::new();
        for (op, etag) in ops.iter().zip(&etags) {
            inv.key(op.key());
            let want = etag.map(|e| e.to_string()).unwrap_or_default();
            match op {
                Op::Set(s) => {
                    let mut new = fresh_etag();
                    while Some(new) == *etag || last_new.get(s.key.as_str()) == Some(&new) {
                        new = fresh_etag();
                    }
                    last_new.insert(&s.key, new);
                    let ttl = s.ttl.map_or(0, |d| d.as_millis().max(1) as u64);
                    let fw = if s.concurrency == Concurrency::FirstWrite {
                        "1"
                    } else {
                        "0"
                    };
                    inv.arg("s").arg(want).arg(fw).arg(new.to_string()).arg(ttl);
                }
                Op::Delete(_) => {
                    inv.arg("d").arg(want).arg("0").arg("").arg(0);
                }
            }
        }
        for op in &ops {
            if let Op::Set(s) = op {
                inv.arg(s.value.as_ref());
            }
        }
        let mut conn = self.conn.clone();
        let _: String = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| map_err(e, &ops))?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(StateError::backend)?;
        Ok(())
    }
}
