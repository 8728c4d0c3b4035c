//! Dapr's state API: `/v1.0/state/{store}` save, get, delete, bulk get and transactions.
//!
//! Every request is validated in full before anything reaches a store, and a save of several
//! items goes to the store as one transaction, so a bad item or a failed ETag check writes
//! nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use components::resources::ComponentSpec;
use components::state::{Concurrency, DeleteOp, Op, SetOp, StateStore};
use serde::Deserialize;
use serde_json::Value;

use crate::body;
use crate::error::{ApiError, ApiPath};
use crate::Shared;

/// How keys are namespaced in a store (Dapr's `keyPrefix` component option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPrefix {
    AppId,
    Name,
    Namespace,
    None,
    Custom(String),
}

impl KeyPrefix {
    pub fn from_spec(spec: &ComponentSpec) -> Result<Self, components::resources::ComponentError> {
        Ok(match spec.optional("keyPrefix").unwrap_or("appid") {
            "" | "appid" => KeyPrefix::AppId,
            "name" => KeyPrefix::Name,
            "namespace" => KeyPrefix::Namespace,
            "none" => KeyPrefix::None,
            p if p.contains("||") => return Err(spec.invalid("keyPrefix", "may not contain '||'")),
            p => KeyPrefix::Custom(p.to_string()),
        })
    }
}

/// A loaded state store and how its keys are named.
pub struct StoreEntry {
    pub spec: ComponentSpec,
    pub store: Arc<dyn StateStore>,
    pub prefix: KeyPrefix,
}

impl StoreEntry {
    /// The key as stored: `<prefix>||<key>`, or the key itself with `keyPrefix: none`.
    pub fn store_key(&self, shared: &Shared, key: &str) -> Result<String, ApiError> {
        if key.is_empty() {
            return Err(ApiError::malformed(
                "a state key is required and may not be empty",
            ));
        }
        if key.contains("||") {
            return Err(ApiError::malformed(format!(
                "input key/keyPrefix '{key}' can't contain '||'"
            )));
        }
        Ok(match &self.prefix {
            KeyPrefix::AppId => format!("{}||{key}", shared.config.app_id),
            KeyPrefix::Name => format!("{}||{key}", self.spec.name),
            KeyPrefix::Namespace => format!(
                "{}.{}||{key}",
                shared.config.namespace, shared.config.app_id
            ),
            KeyPrefix::None => key.to_string(),
            KeyPrefix::Custom(p) => format!("{p}||{key}"),
        })
    }
}

pub(crate) fn lookup<'a>(shared: &'a Shared, name: &str) -> Result<&'a StoreEntry, ApiError> {
    if shared.stores.is_empty() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_STATE_STORE_NOT_CONFIGURED",
            "state store is not configured",
        ));
    }
    shared.stores.get(name).ok_or_else(|| {
        ApiError::bad_request(
            "ERR_STATE_STORE_NOT_FOUND",
            format!("state store {name} is not found"),
        )
    })
}

/// `metadata.<k>=<v>` query parameters, with the prefix stripped.
fn query_metadata(q: &Option<String>) -> HashMap<String, String> {
    let Some(q) = q else { return HashMap::new() };
    q.split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_decode(k)?;
            let name = k.strip_prefix("metadata.")?.to_string();
            Some((name, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ItemOptions {
    #[serde(default)]
    concurrency: Option<String>,
    #[serde(default)]
    consistency: Option<String>,
}

/// A state item of a save or of a transaction's `request`.
#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    etag: Option<Value>,
    #[serde(default)]
    metadata: Option<HashMap<String, Value>>,
    #[serde(default)]
    options: Option<ItemOptions>,
}

fn concurrency(v: Option<&str>) -> Result<Concurrency, ApiError> {
    match v.unwrap_or("") {
        "" | "last-write" => Ok(Concurrency::LastWrite),
        "first-write" => Ok(Concurrency::FirstWrite),
        other => Err(ApiError::malformed(format!(
            "invalid concurrency {other:?}: use \"first-write\" or \"last-write\""
        ))),
    }
}

fn consistency(v: Option<&str>) -> Result<(), ApiError> {
    match v.unwrap_or("") {
        "" | "strong" | "eventual" => Ok(()),
        other => Err(ApiError::malformed(format!(
            "invalid consistency {other:?}: use \"strong\" or \"eventual\""
        ))),
    }
}

fn etag_string(v: Option<Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ApiError::malformed("etag must be a string")),
    }
}

fn meta_string(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// `ttlInSeconds`: a whole number of seconds, or -1 for no expiry.
pub(crate) fn ttl(meta: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = meta.get("ttlInSeconds") else {
        return Ok(None);
    };
    match raw.trim().parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(n) if n > 0 => Ok(Some(Duration::from_secs(n as u64))),
        _ => Err(ApiError::malformed(format!(
            "invalid ttlInSeconds {raw:?}: use a positive number of seconds, or -1 for no expiry"
        ))),
    }
}

/// The stored form of a value: its compact JSON encoding, object keys sorted (as Dapr stores it).
fn encode_value(v: Option<&Value>) -> bytes::Bytes {
    match v {
        None => bytes::Bytes::from_static(b"null"),
        Some(v) => bytes::Bytes::from(serde_json::to_vec(v).expect("a Value always serializes")),
    }
}

fn set_op(
    shared: &Shared,
    entry: &StoreEntry,
    item: Item,
    query_meta: &HashMap<String, String>,
) -> Result<SetOp, ApiError> {
    let key = item
        .key
        .ok_or_else(|| ApiError::malformed("\"key\" is a required field"))?;
    let mut meta = query_meta.clone();
    for (k, v) in item.metadata.unwrap_or_default() {
        meta.insert(k, meta_string(v));
    }
    let opts = item.options.unwrap_or_default();
    consistency(opts.consistency.as_deref())?;
    new_set_op(
        shared,
        entry,
        &key,
        encode_value(item.value.as_ref()),
        etag_string(item.etag)?,
        concurrency(opts.concurrency.as_deref())?,
        &meta,
    )
}

/// A save of `key` as the store names it, its `ttlInSeconds` taken from `meta` (both APIs).
pub(crate) fn new_set_op(
    shared: &Shared,
    entry: &StoreEntry,
    key: &str,
    value: bytes::Bytes,
    etag: Option<String>,
    concurrency: Concurrency,
    meta: &HashMap<String, String>,
) -> Result<SetOp, ApiError> {
    Ok(SetOp {
        key: entry.store_key(shared, key)?,
        value,
        etag,
        concurrency,
        ttl: ttl(meta)?,
    })
}

/// Runs `ops` as one transaction; a failure is `code` ("ERR_STATE_SAVE", ...) with `what`.
pub(crate) async fn transact(
    entry: &StoreEntry,
    ops: Vec<Op>,
    code: &'static str,
    what: &str,
) -> Result<(), ApiError> {
    entry
        .store
        .transact(ops)
        .await
        .map_err(|e| ApiError::state(code, what, e))
}

/// The item stored under `key`, if any.
pub(crate) async fn get_item(
    shared: &Shared,
    entry: &StoreEntry,
    store: &str,
    key: &str,
) -> Result<Option<components::state::StateItem>, ApiError> {
    let k = entry.store_key(shared, key)?;
    entry.store.get(&k).await.map_err(|e| {
        ApiError::state(
            "ERR_STATE_GET",
            &format!("fail to get {key} from state store {store}"),
            e,
        )
    })
}

/// The items stored under `keys`, in order (`None` for a missing key).
pub(crate) async fn bulk_items(
    shared: &Shared,
    entry: &StoreEntry,
    store: &str,
    keys: &[String],
) -> Result<Vec<Option<components::state::StateItem>>, ApiError> {
    let keys = keys
        .iter()
        .map(|k| entry.store_key(shared, k))
        .collect::<Result<Vec<_>, _>>()?;
    entry.store.bulk_get(&keys).await.map_err(|e| {
        ApiError::state(
            "ERR_STATE_BULK_GET",
            &format!("failed getting bulk state from state store {store}"),
            e,
        )
    })
}

/// When an item expires, as Dapr reports it (`ttlExpireTime`).
pub(crate) fn expire_time(item: &components::state::StateItem) -> Option<String> {
    item.expires_at_ms.and_then(rfc3339)
}

/// `POST|PUT /v1.0/state/{store}`.
pub async fn save(
    State(shared): State<Arc<Shared>>,
    ApiPath(store): ApiPath<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let entry = lookup(&shared, &store)?;
    let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
    let items: Vec<Item> = body::json(&bytes)?;
    let query_meta = query_metadata(&q);
    let ops = items
        .into_iter()
        .map(|item| set_op(&shared, entry, item, &query_meta).map(Op::Set))
        .collect::<Result<Vec<_>, _>>()?;
    transact(
        entry,
        ops,
        "ERR_STATE_SAVE",
        &format!("failed saving state in state store {store}"),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Everything under `/v1.0/state/{store}/{key}`: get and delete of a key, and the two
/// POST/PUT operations Dapr names with a fixed segment (`bulk`, `transaction`).
pub async fn keyed(
    State(shared): State<Arc<Shared>>,
    ApiPath((store, key)): ApiPath<(String, String)>,
    method: Method,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let entry = lookup(&shared, &store)?;
    match (method, key.as_str()) {
        (Method::GET, _) => get(&shared, entry, &store, &key, &q).await,
        (Method::DELETE, _) => delete(&shared, entry, &store, &key, &q, &headers).await,
        (Method::POST | Method::PUT, "bulk") => {
            let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
            bulk_get(&shared, entry, &store, &bytes).await
        }
        (Method::POST | Method::PUT, "transaction") => {
            let bytes = body::read(&headers, body, shared.config.max_body_bytes).await?;
            transaction(&shared, entry, &store, &bytes, &q).await
        }
        (m, _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_BAD_REQUEST",
            format!("{m} is not supported on /v1.0/state/{{store}}/{{key}}: use GET or DELETE, or POST to .../bulk or .../transaction"),
        )),
    }
}

/// The query parameters of a get or a delete (`metadata.*` ones are read separately).
#[derive(Deserialize)]
struct KeyQuery {
    concurrency: Option<String>,
    consistency: Option<String>,
}

fn key_query(q: &Option<String>) -> Result<KeyQuery, ApiError> {
    let uri: axum::http::Uri = format!("/?{}", q.as_deref().unwrap_or(""))
        .parse()
        .map_err(|e| ApiError::malformed(format!("invalid query: {e}")))?;
    Query::try_from_uri(&uri)
        .map(|Query(k)| k)
        .map_err(|e| ApiError::malformed(format!("invalid query: {e}")))
}

async fn get(
    shared: &Shared,
    entry: &StoreEntry,
    store: &str,
    key: &str,
    q: &Option<String>,
) -> Result<Response, ApiError> {
    let query = key_query(q)?;
    consistency(query.consistency.as_deref())?;
    let Some(item) = get_item(shared, entry, store, key).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let expires = expire_time(&item);
    let mut resp = (StatusCode::OK, item.value).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&item.etag) {
        h.insert(header::ETAG, v);
    }
    if let Some(exp) = expires {
        if let Ok(v) = HeaderValue::from_str(&exp) {
            h.insert("metadata.ttlExpireTime", v);
        }
    }
    Ok(resp)
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

async fn delete(
    shared: &Shared,
    entry: &StoreEntry,
    store: &str,
    key: &str,
    q: &Option<String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let query = key_query(q)?;
    concurrency(query.concurrency.as_deref())?;
    consistency(query.consistency.as_deref())?;
    let etag = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::malformed("If-Match must be text"))?
                .trim_matches('"')
                .to_string(),
        ),
    };
    let op = DeleteOp {
        key: entry.store_key(shared, key)?,
        etag,
    };
    transact(
        entry,
        vec![Op::Delete(op)],
        "ERR_STATE_DELETE",
        &format!("failed deleting state with key {key} from state store {store}"),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One answer of a bulk get, fields in Dapr's order; a missing key has only `key`.
#[derive(serde::Serialize)]
struct BulkItem {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<HashMap<String, String>>,
}

/// `{"keys": [...]}`; Dapr's `parallelism` and `metadata` are accepted and have nothing to tune here.
#[derive(Deserialize)]
struct BulkRequest {
    keys: Vec<String>,
}

async fn bulk_get(
    shared: &Shared,
    entry: &StoreEntry,
    store: &str,
    bytes: &[u8],
) -> Result<Response, ApiError> {
    let req: BulkRequest = body::json(bytes)?;
    let items = bulk_items(shared, entry, store, &req.keys).await?;
    let out: Vec<BulkItem> = req
        .keys
        .into_iter()
        .zip(items)
        .map(|(key, item)| match item {
            None => BulkItem {
                key,
                data: None,
                etag: None,
                metadata: None,
            },
            Some(item) => BulkItem {
                key,
                data: Some(serde_json::from_slice(&item.value).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&item.value).into_owned())
                })),
                metadata: expire_time(&item)
                    .map(|exp| HashMap::from([("ttlExpireTime".to_string(), exp)])),
                etag: Some(item.etag),
            },
        })
        .collect();
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize)]
struct TxRequest {
    #[serde(default)]
    operations: Vec<TxOperation>,
    #[serde(default)]
    metadata: Option<HashMap<String, Value>>,
}

#[derive(Deserialize)]
struct TxOperation {
    operation: String,
    request: Item,
}

async fn transaction(
    shared: &Shared,
    entry: &StoreEntry,
    store: &str,
    bytes: &[u8],
    q: &Option<String>,
) -> Result<Response, ApiError> {
    let req: TxRequest = body::json(bytes)?;
    let mut meta = query_metadata(q);
    for (k, v) in req.metadata.unwrap_or_default() {
        meta.insert(k, meta_string(v));
    }
    let mut ops = Vec::with_capacity(req.operations.len());
    for op in req.operations {
        match op.operation.as_str() {
            "upsert" => ops.push(Op::Set(set_op(shared, entry, op.request, &meta)?)),
            "delete" => {
                let key = op
                    .request
                    .key
                    .ok_or_else(|| ApiError::malformed("\"key\" is a required field"))?;
                ops.push(Op::Delete(DeleteOp {
                    key: entry.store_key(shared, &key)?,
                    etag: etag_string(op.request.etag)?,
                }));
            }
            other => {
                return Err(ApiError::bad_request(
                    "ERR_NOT_SUPPORTED_STATE_OPERATION",
                    format!("operation type {other} not supported: use \"upsert\" or \"delete\""),
                ))
            }
        }
    }
    transact(
        entry,
        ops,
        "ERR_STATE_TRANSACTION",
        &format!("error while executing state transaction on state store {store}"),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_metadata_strips_the_prefix_and_decodes() {
        let m = query_metadata(&Some(
            "metadata.ttlInSeconds=60&x=1&metadata.a%20b=c%2Fd".into(),
        ));
        assert_eq!(m.get("ttlInSeconds").map(String::as_str), Some("60"));
        assert_eq!(m.get("a b").map(String::as_str), Some("c/d"));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn values_are_stored_compact_with_sorted_keys() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2], "a": "x"}"#).unwrap();
        assert_eq!(&encode_value(Some(&v))[..], br#"{"a":"x","b":[1,2]}"#);
        assert_eq!(&encode_value(None)[..], b"null");
    }

    #[test]
    fn ttl_accepts_positive_and_minus_one_only() {
        let m = |v: &str| HashMap::from([("ttlInSeconds".to_string(), v.to_string())]);
        assert_eq!(ttl(&m("60")).unwrap(), Some(Duration::from_secs(60)));
        assert_eq!(ttl(&m("-1")).unwrap(), None);
        assert!(ttl(&m("0")).is_err());
        assert!(ttl(&m("abc")).is_err());
        assert!(ttl(&m("-5")).is_err());
    }
}
