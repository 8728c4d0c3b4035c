//! `state.postgresql`: one table `(key TEXT PRIMARY KEY, value BYTEA, etag BIGINT,
//! expires_at BIGINT)`. Every write runs in a SQL transaction whose statements carry their own
//! conditions (`WHERE etag = $n`, `ON CONFLICT DO NOTHING`), so concurrent writers are decided by
//! row locks and nothing is written unless every condition holds. Expiry uses the database's
//! clock. Durability is PostgreSQL's commit.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{fresh_etag, parse_etags, Concurrency, Op, StateError, StateItem, StateStore};
use crate::resources::{ComponentError, ComponentSpec};

const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";
const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub struct PostgresStore {
    pool: Pool,
    sql: Sql,
}

struct Sql {
    get: String,
    bulk_get: String,
    update_if: String,
    insert_if_absent: String,
    upsert: String,
    delete_if: String,
    delete: String,
    sweep: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        let live = format!("(expires_at IS NULL OR expires_at > {NOW_MS})");
        let exp = format!("CASE WHEN $4::BIGINT > 0 THEN {NOW_MS} + $4::BIGINT END");
        Sql {
            get: format!("SELECT value, etag, expires_at FROM {t} WHERE key = $1 AND {live}"),
            bulk_get: format!(
                "SELECT key, value, etag, expires_at FROM {t} WHERE key = ANY($1) AND {live}"
            ),
            update_if: format!(
                "UPDATE {t} SET value = $2, etag = $3, expires_at = {exp} \
                 WHERE key = $1 AND etag = $5 AND {live}"
            ),
            insert_if_absent: format!(
                "INSERT INTO {t} (key, value, etag, expires_at) VALUES ($1, $2, $3, {exp}) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, etag = EXCLUDED.etag, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE {t}.expires_at IS NOT NULL AND {t}.expires_at <= {NOW_MS}"
            ),
            upsert: format!(
                "INSERT INTO {t} (key, value, etag, expires_at) VALUES ($1, $2, $3, {exp}) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, etag = EXCLUDED.etag, \
                 expires_at = EXCLUDED.expires_at"
            ),
            delete_if: format!("DELETE FROM {t} WHERE key = $1 AND etag = $2 AND {live}"),
            delete: format!("DELETE FROM {t} WHERE key = $1"),
            sweep: format!("DELETE FROM {t} WHERE expires_at <= {NOW_MS}"),
        }
    }
}

/// A table name we can put into SQL safely: `name` or `schema.name`, ASCII identifiers.
fn valid_table(name: &str) -> bool {
    let ident = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|p| ident(p))
}

impl PostgresStore {
    /// Connects with Dapr's metadata names: `connectionString` (required; libpq key=value or
    /// URL form), `tableName` (default `tessera_state`), `maxConns` (default 16).
    pub async fn connect(spec: &ComponentSpec) -> Result<Self, ComponentError> {
        let conn_str = spec.required("connectionString")?;
        let cfg: tokio_postgres::Config = conn_str
            .parse()
            .map_err(|e| spec.invalid("connectionString", &format!("does not parse: {e}")))?;
        let table = spec
            .optional("tableName")
            .unwrap_or("tessera_state")
            .to_string();
        if !valid_table(&table) {
            return Err(spec.invalid(
                "tableName",
                "must be an identifier like `state` or `schema.state`",
            ));
        }
        let max: usize = match spec.optional("maxConns") {
            Some(v) => v
                .parse()
                .map_err(|_| spec.invalid("maxConns", "must be a number"))?,
            None => 16,
        };
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(max.max(1))
            .build()
            .map_err(|e| spec.failed(e))?;
        let client = tokio::time::timeout(Duration::from_secs(5), pool.get())
            .await
            .map_err(|_| spec.failed("no answer from PostgreSQL within 5 s"))?
            .map_err(|e| spec.failed(format!("cannot connect to PostgreSQL: {e}")))?;
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(7260551); \
                 CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value BYTEA NOT NULL, \
                 etag BIGINT NOT NULL, expires_at BIGINT); \
                 CREATE INDEX IF NOT EXISTS {}_expires ON {table} (expires_at) WHERE expires_at IS NOT NULL; COMMIT",
                table.replace('.', "_")
            ))
            .await
            .map_err(|e| spec.failed(format!("cannot create table {table}: {e}")))?;
        drop(client);
        let store = PostgresStore {
            pool,
            sql: Sql::new(&table),
        };
        store.spawn_sweeper();
        Ok(store)
    }

    fn spawn_sweeper(&self) {
        let pool = self.pool.clone();
        let sql = self.sql.sweep.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                if pool.is_closed() {
                    return;
                }
                if let Ok(c) = pool.get().await {
                    if let Err(e) = c.execute(&sql, &[]).await {
                        tracing::warn!(error = %e, "expired-row sweep failed");
                    }
                }
            }
        });
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StateError> {
        self.pool
            .get()
            .await
            .map_err(|e| StateError::Backend(format!("postgresql: {e}")))
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.pool.close();
    }
}

fn pg(e: tokio_postgres::Error) -> StateError {
    StateError::Backend(format!("postgresql: {e}"))
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn get(&self, key: &str) -> Result<Option<StateItem>, StateError> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(&self.sql.get).await.map_err(pg)?;
        let row = c.query_opt(&stmt, &[&key]).await.map_err(pg)?;
        Ok(row.map(|r| StateItem {
            value: Bytes::from(r.get::<_, Vec<u8>>(0)),
            etag: r.get::<_, i64>(1).to_string(),
            expires_at_ms: r.get(2),
        }))
    }

    async fn bulk_get(&self, keys: &[String]) -> Result<Vec<Option<StateItem>>, StateError> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(&self.sql.bulk_get).await.map_err(pg)?;
        let rows = c.query(&stmt, &[&keys]).await.map_err(pg)?;
        let found: std::collections::HashMap<String, StateItem> = rows
            .into_iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    StateItem {
                        value: Bytes::from(r.get::<_, Vec<u8>>(1)),
                        etag: r.get::<_, i64>(2).to_string(),
                        expires_at_ms: r.get(3),
                    },
                )
            })
            .collect();
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn transact(&self, ops: Vec<Op>) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        let etags = parse_etags(&ops)?;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        for (op, etag) in ops.iter().zip(&etags) {
            let etag = etag.map(|e| e as i64);
            let (changed, reason) = match op {
                Op::Set(s) => {
                    let new = fresh_etag() as i64;
                    let ttl = s.ttl.map_or(0i64, |d| d.as_millis().max(1) as i64);
                    let value: &[u8] = &s.value;
                    match (etag, s.concurrency) {
                        (Some(want), _) => {
                            let st = tx.prepare_cached(&self.sql.update_if).await.map_err(pg)?;
                            let n = tx
                                .execute(&st, &[&s.key, &value, &new, &ttl, &want])
                                .await
                                .map_err(pg)?;
                            (
                                n,
                                "the etag does not match the stored one, or the key does not exist",
                            )
                        }
                        (None, Concurrency::FirstWrite) => {
                            let st = tx
                                .prepare_cached(&self.sql.insert_if_absent)
                                .await
                                .map_err(pg)?;
                            let n = tx
                                .execute(&st, &[&s.key, &value, &new, &ttl])
                                .await
                                .map_err(pg)?;
                            (n, "first-write: the key already exists")
                        }
                        (None, Concurrency::LastWrite) => {
                            let st = tx.prepare_cached(&self.sql.upsert).await.map_err(pg)?;
                            tx.execute(&st, &[&s.key, &value, &new, &ttl])
                                .await
                                .map_err(pg)?;
                            (1, "")
                        }
                    }
                }
                Op::Delete(d) => match etag {
                    Some(want) => {
                        let st = tx.prepare_cached(&self.sql.delete_if).await.map_err(pg)?;
                        let n = tx.execute(&st, &[&d.key, &want]).await.map_err(pg)?;
                        (
                            n,
                            "the etag does not match the stored one, or the key does not exist",
                        )
                    }
                    None => {
                        let st = tx.prepare_cached(&self.sql.delete).await.map_err(pg)?;
                        tx.execute(&st, &[&d.key]).await.map_err(pg)?;
                        (1, "")
                    }
                },
            };
            if changed == 0 {
                // Dropping `tx` rolls back everything this transaction did.
                return Err(StateError::EtagMismatch {
                    key: op.key().to_string(),
                    reason,
                });
            }
        }
        tx.commit().await.map_err(pg)
    }

    async fn ping(&self) -> Result<(), StateError> {
        let c = self.client().await?;
        c.simple_query("SELECT 1").await.map_err(pg)?;
        Ok(())
    }
}
