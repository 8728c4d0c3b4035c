//! The state and metadata HTTP API of a real `tessera host` process, as a Dapr user drives it.

use std::time::Duration;

use e2e::{resources, unique, Sidecar};
use serde_json::{json, Value};

async fn sidecar() -> (tempfile::TempDir, Sidecar) {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecar::start("myapp", &dir.path().join("data"), &[]).await;
    (dir, s)
}

#[tokio::test]
async fn seed_card_commands_answer_as_dapr_does() {
    let (_d, s) = sidecar().await;
    // curl -X POST .../v1.0/state/statestore -d '[{"key": "user-123-cart", ...}]'
    let r = s
        .client
        .post(s.url("/v1.0/state/statestore"))
        .header("Content-Type", "application/json")
        .body(r#"[{"key": "user-123-cart", "value": {"items": ["product-1", "product-2"]}}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.bytes().await.unwrap().len(), 0);
    // curl .../v1.0/state/statestore/user-123-cart
    let r = s.get("statestore", "user-123-cart").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(!etag.is_empty());
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"items":["product-1","product-2"]}"#
    );
    // curl -X DELETE .../user-123-cart
    let r = s
        .client
        .delete(s.url("/v1.0/state/statestore/user-123-cart"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s.get("statestore", "user-123-cart").await;
    assert_eq!(r.status(), 204, "a missing key answers 204");
    assert_eq!(r.bytes().await.unwrap().len(), 0);
    // The seed's two-key transaction.
    let r = s
        .client
        .post(s.url("/v1.0/state/statestore/transaction"))
        .header("Content-Type", "application/json")
        .body(
            r#"{
"operations": [
{"operation": "upsert", "request": {"key": "order-1", "value": {"status": "paid"}}},
{"operation": "upsert", "request": {"key": "inventory-1", "value": {"stock": 99}}}
]
}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        s.get("statestore", "order-1").await.text().await.unwrap(),
        r#"{"status":"paid"}"#
    );
    assert_eq!(
        s.get("statestore", "inventory-1")
            .await
            .text()
            .await
            .unwrap(),
        r#"{"stock":99}"#
    );
    // Bulk get keeps request order, and a missing key comes back with its key only.
    let r = s
        .client
        .post(s.url("/v1.0/state/statestore/bulk"))
        .json(&json!({"keys": ["inventory-1", "nope", "order-1"], "parallelism": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with(r#"[{"key":"inventory-1","data":{"stock":99},"etag":""#),
        "{text}"
    );
    let items: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(items[1], json!({"key": "nope"}));
    assert_eq!(items[2]["data"], json!({"status": "paid"}));
}

#[tokio::test]
async fn etags_guard_saves_and_deletes() {
    let (_d, s) = sidecar().await;
    assert_eq!(
        s.save("statestore", json!([{"key": "k", "value": 1}]))
            .await
            .status(),
        204
    );
    let e1 = s.get("statestore", "k").await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s.save("statestore", json!([{"key": "k", "value": 2, "etag": e1}]))
            .await
            .status(),
        204
    );
    let r = s
        .save("statestore", json!([{"key": "k", "value": 3, "etag": e1}]))
        .await;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], "ERR_STATE_SAVE");
    assert!(body["message"].as_str().unwrap().contains("etag mismatch"));
    assert_eq!(
        s.value("statestore", "k").await,
        Some(json!(2)),
        "a stale save changes nothing"
    );
    let r = s
        .save(
            "statestore",
            json!([{"key": "k", "value": 3, "etag": "not-a-number"}]),
        )
        .await;
    assert_eq!(r.status(), 400);
    // first-write without an etag on an existing key.
    let r = s
        .save(
            "statestore",
            json!([{"key": "k", "value": 4, "options": {"concurrency": "first-write"}}]),
        )
        .await;
    assert_eq!(r.status(), 409);
    // Delete with a stale If-Match.
    let r = s
        .client
        .delete(s.url("/v1.0/state/statestore/k"))
        .header("If-Match", &e1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_STATE_DELETE"
    );
    assert_eq!(s.value("statestore", "k").await, Some(json!(2)));
    let e2 = s.get("statestore", "k").await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    let r = s
        .client
        .delete(s.url("/v1.0/state/statestore/k"))
        .header("If-Match", &e2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.value("statestore", "k").await, None);
    // Transaction with a stale etag: 409, nothing written.
    s.save("statestore", json!([{"key": "a", "value": "a1"}]))
        .await;
    let r = s
        .client
        .post(s.url("/v1.0/state/statestore/transaction"))
        .json(&json!({"operations": [
            {"operation": "upsert", "request": {"key": "b", "value": "b1"}},
            {"operation": "delete", "request": {"key": "a", "etag": e1}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_STATE_TRANSACTION"
    );
    assert_eq!(s.value("statestore", "b").await, None);
    assert_eq!(s.value("statestore", "a").await, Some(json!("a1")));
}

async fn expect_error(r: reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], code, "{body}");
    assert!(!body["message"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn bad_input_gets_dapr_errors_and_writes_nothing() {
    let (_d, s) = sidecar().await;
    let post = |path: &str, body: Vec<u8>| s.client.post(s.url(path)).body(body).send();
    expect_error(
        post("/v1.0/state/statestore", b"[{\"key\":".to_vec())
            .await
            .unwrap(),
        400,
        "ERR_MALFORMED_REQUEST",
    )
    .await;
    expect_error(
        post("/v1.0/state/statestore", b"{\"key\":\"x\"}".to_vec())
            .await
            .unwrap(),
        400,
        "ERR_MALFORMED_REQUEST",
    )
    .await;
    expect_error(
        post("/v1.0/state/nostore", b"[]".to_vec()).await.unwrap(),
        400,
        "ERR_STATE_STORE_NOT_FOUND",
    )
    .await;
    expect_error(
        s.get("nostore", "k").await,
        400,
        "ERR_STATE_STORE_NOT_FOUND",
    )
    .await;
    // One good item and one with `||`: nothing is written.
    let body =
        serde_json::to_vec(&json!([{"key": "good", "value": 1}, {"key": "a||b", "value": 2}]))
            .unwrap();
    expect_error(
        post("/v1.0/state/statestore", body).await.unwrap(),
        400,
        "ERR_MALFORMED_REQUEST",
    )
    .await;
    assert_eq!(s.value("statestore", "good").await, None);
    expect_error(
        s.get("statestore", "a||b").await,
        400,
        "ERR_MALFORMED_REQUEST",
    )
    .await;
    // Missing key, bad ttl, bad concurrency: rejected before anything is written.
    for bad in [
        json!([{"key": "good", "value": 1}, {"value": 2}]),
        json!([{"key": "good", "value": 1, "metadata": {"ttlInSeconds": "soon"}}]),
        json!([{"key": "good", "value": 1, "options": {"concurrency": "whenever"}}]),
        json!([{"key": "good", "value": 1}, {"key": "", "value": 2}]),
    ] {
        expect_error(
            post("/v1.0/state/statestore", serde_json::to_vec(&bad).unwrap())
                .await
                .unwrap(),
            400,
            "ERR_MALFORMED_REQUEST",
        )
        .await;
    }
    assert_eq!(s.value("statestore", "good").await, None);
    // A body over 4 MiB.
    let big = serde_json::to_vec(&json!([{"key": "big", "value": "x".repeat(4 << 20)}])).unwrap();
    expect_error(
        post("/v1.0/state/statestore", big).await.unwrap(),
        413,
        "ERR_BODY_READ",
    )
    .await;
    assert_eq!(s.value("statestore", "big").await, None);
    // A value just under the limit is fine.
    let fits = serde_json::to_vec(&json!([{"key": "fits", "value": "x".repeat(3 << 20)}])).unwrap();
    assert_eq!(
        post("/v1.0/state/statestore", fits).await.unwrap().status(),
        204
    );
    // Unknown transaction operation.
    let tx = serde_json::to_vec(&json!({"operations": [
        {"operation": "upsert", "request": {"key": "good", "value": 1}},
        {"operation": "merge", "request": {"key": "x"}},
    ]}))
    .unwrap();
    expect_error(
        post("/v1.0/state/statestore/transaction", tx)
            .await
            .unwrap(),
        400,
        "ERR_NOT_SUPPORTED_STATE_OPERATION",
    )
    .await;
    assert_eq!(s.value("statestore", "good").await, None);
    // Unknown routes.
    expect_error(
        s.client.get(s.url("/v1.0/nothing")).send().await.unwrap(),
        404,
        "ERR_NOT_FOUND",
    )
    .await;
    expect_error(
        s.client
            .patch(s.url("/v1.0/state/statestore/k"))
            .send()
            .await
            .unwrap(),
        405,
        "ERR_BAD_REQUEST",
    )
    .await;
}

#[tokio::test]
async fn ttl_from_query_and_item_metadata() {
    let (_d, s) = sidecar().await;
    let r = s
        .client
        .post(s.url("/v1.0/state/statestore?metadata.ttlInSeconds=1"))
        .json(&json!([{"key": "q", "value": 1}, {"key": "i", "value": 2, "metadata": {"ttlInSeconds": "-1"}}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s.get("statestore", "q").await;
    assert!(r.headers().contains_key("metadata.ttlExpireTime"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(s.value("statestore", "q").await, None);
    assert_eq!(
        s.value("statestore", "i").await,
        Some(json!(2)),
        "item metadata overrides the query"
    );
}

#[tokio::test]
async fn metadata_health_and_shutdown() {
    let (_d, mut s) = sidecar().await;
    let r = s
        .client
        .put(s.url("/v1.0/metadata/appCommand"))
        .body("python app.py")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let m: Value = s
        .client
        .get(s.url("/v1.0/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["id"], "myapp");
    assert_eq!(m["extended"]["appCommand"], "python app.py");
    assert_eq!(
        m["components"],
        json!([{"name": "statestore", "type": "state.sled", "version": "v1", "capabilities": ["ETAG", "TRANSACTIONAL", "TTL", "ACTOR"]}])
    );
    assert_eq!(
        s.client
            .get(s.url("/v1.0/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let r = s
        .client
        .get(s.url("/v1.0/healthz?appid=other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_HEALTH_APPID_NOT_MATCH"
    );
    assert_eq!(
        s.client
            .post(s.url("/v1.0/shutdown"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let status = tokio::task::spawn_blocking(move || {
        let st = s.child.wait().unwrap();
        (st, s)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn healthz_waits_for_the_app_port() {
    let dir = tempfile::tempdir().unwrap();
    let app_port = e2e::free_port();
    let s = Sidecar::start(
        "waiting",
        &dir.path().join("d"),
        &["--app-port", &app_port.to_string()],
    )
    .await;
    let r = s.client.get(s.url("/v1.0/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_HEALTH_NOT_READY"
    );
    let _app = tokio::net::TcpListener::bind(("127.0.0.1", app_port))
        .await
        .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if s.client
            .get(s.url("/v1.0/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            == 204
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "healthz turns 204 once the app listens");
}

#[tokio::test]
async fn api_token_guards_everything_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecar::start_with_env(
        "tok",
        &dir.path().join("d"),
        &[],
        &[("DAPR_API_TOKEN", "s3cret")],
    )
    .await;
    let r = s.get("statestore", "k").await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), "invalid api token");
    let r = s
        .client
        .get(s.url("/v1.0/state/statestore/k"))
        .header("dapr-api-token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(s.url("/v1.0/state/statestore/k"))
        .header("dapr-api-token", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        s.client
            .get(s.url("/v1.0/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        s.client
            .post(s.url("/v1.0/shutdown"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn redis_and_postgres_stores_from_component_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let id = unique().replace('-', "_");
    let res = resources(
        dir.path(),
        &[
            (
                "redis.yaml",
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: cache\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:6379\n  - name: redisPassword\n    value: \"\"\n  - name: keyPrefix\n    value: name\n",
            ),
            (
                "pg.yaml",
                &format!("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: db\nspec:\n  type: state.postgresql\n  version: v1\n  metadata:\n  - name: connectionString\n    value: host=127.0.0.1 user=postgres dbname=test\n  - name: tableName\n    value: e2e_{id}\n  - name: actorStateStore\n    value: \"true\"\n"),
            ),
        ],
    );
    let s = Sidecar::start(
        "yamlapp",
        &dir.path().join("d"),
        &["--resources-path", res.to_str().unwrap()],
    )
    .await;
    let key = format!("k-{id}");
    for store in ["cache", "db"] {
        assert_eq!(
            s.save(store, json!([{"key": key, "value": {"store": store}}]))
                .await
                .status(),
            204
        );
        assert_eq!(s.value(store, &key).await, Some(json!({"store": store})));
        let r = s
            .save(
                store,
                json!([{"key": "ok", "value": 1}, {"key": "x||y", "value": 2}]),
            )
            .await;
        assert_eq!(r.status(), 400, "{store}: keys with || are rejected");
        assert_eq!(s.value(store, "ok").await, None, "{store}: nothing written");
    }
    // keyPrefix: name stores the key as `<store name>||<key>`.
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let raw: Option<String> = redis::cmd("HGET")
        .arg(format!("cache||{key}"))
        .arg("data")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw.as_deref(), Some(r#"{"store":"cache"}"#));
    let m: Value = s
        .client
        .get(s.url("/v1.0/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = m["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["db", "cache"],
        "components in file-name order (pg.yaml, redis.yaml)"
    );
    assert!(m["components"][0]["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("ACTOR")));
}

#[tokio::test]
async fn no_statestore_when_yaml_does_not_define_it() {
    let dir = tempfile::tempdir().unwrap();
    let res = resources(
        dir.path(),
        &[(
            "s.yaml",
            "kind: Component\nmetadata:\n  name: other\nspec:\n  type: state.sled\n  version: v1\n",
        )],
    );
    let s = Sidecar::start(
        "noss",
        &dir.path().join("d"),
        &["--resources-path", res.to_str().unwrap()],
    )
    .await;
    let r = s.get("statestore", "k").await;
    assert_eq!(r.status(), 400);
}
