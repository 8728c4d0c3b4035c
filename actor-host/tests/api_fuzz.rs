//! Property tests over the router and the JSON parsers: arbitrary paths, methods, headers and
//! bodies never panic, never answer 5xx, and a rejected request never writes anything.

use std::sync::Arc;

use actor_host::{Host, HostConfig};
use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1.0".to_string()),
        Just("state".to_string()),
        Just("statestore".to_string()),
        Just("bulk".to_string()),
        Just("transaction".to_string()),
        Just("metadata".to_string()),
        Just("healthz".to_string()),
        Just("%2F".to_string()),
        Just("%2E%2E".to_string()),
        Just("..".to_string()),
        Just("".to_string()),
        Just("%00".to_string()),
        Just("%1F".to_string()),
        Just("%FF%FE".to_string()),
        Just("a||b".to_string()),
        Just("a%7C%7Cb".to_string()),
        "[a-zA-Z0-9._~-]{1,12}",
        "[ -~]{0,8}".prop_map(|s| s.chars().filter(|c| !"?# ".contains(*c)).collect()),
    ]
}

fn actor_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Counter".to_string()),
        Just("method".to_string()),
        Just("state".to_string()),
        Just("timers".to_string()),
        Just("reminders".to_string()),
        Just("inc".to_string()),
        segment(),
    ]
}

fn json_body() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z|]{0,6}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("key".to_string()),
                    Just("value".to_string()),
                    Just("etag".to_string()),
                    Just("metadata".to_string()),
                    Just("options".to_string()),
                    Just("operations".to_string()),
                    Just("operation".to_string()),
                    Just("request".to_string()),
                    Just("keys".to_string()),
                    Just("ttlInSeconds".to_string()),
                    Just("concurrency".to_string()),
                    "[a-z]{1,4}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        value.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
        Just(Method::HEAD),
        Just(Method::OPTIONS),
    ]
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    host: Host,
    _dir: tempfile::TempDir,
}

fn fixture() -> Arc<Fixture> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = rt
        .block_on(async {
            let host = Host::start(HostConfig::new("fuzz", dir.path())).await?;
            // The actor runtime registers with the embedded placement (no app: no types).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !host.shared().actors.placement_connected()
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Ok::<_, actor_host::HostError>(host)
        })
        .unwrap();
    Arc::new(Fixture {
        rt,
        host,
        _dir: dir,
    })
}

fn send(f: &Fixture, req: Request<Body>) -> (u16, Vec<u8>) {
    f.rt.block_on(async {
        let resp = f.host.service().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    })
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

thread_local!(static FIXTURE: Arc<Fixture> = fixture());

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn any_request_gets_an_answer_below_500(
        prefix in prop_oneof![Just(""), Just("/v1.0/state/statestore"), Just("/v1.0/state"), Just("/v1.0/metadata"), Just("/v1.0")],
        segs in prop::collection::vec(segment(), 0..6),
        m in method(),
        body in json_body(),
        if_match in prop::option::of("[ -~]{0,12}"),
        query in prop::option::of("(metadata\\.ttlInSeconds|consistency|concurrency|appid|x)=[a-z0-9%-]{0,5}"),
    ) {
        let f = FIXTURE.with(|f| f.clone());
        let mut uri = format!("{prefix}/{}", segs.join("/"));
        if let Some(q) = query {
            uri.push('?');
            uri.push_str(&q);
        }
        let Ok(mut req) = Request::builder().method(m).uri(&uri).header("content-type", "application/json").body(Body::from(body)) else {
            return Ok(());
        };
        if let Some(v) = if_match {
            if let Ok(h) = axum::http::HeaderValue::from_str(&v) {
                req.headers_mut().insert("if-match", h);
            }
        }
        let (status, body) = send(&f, req);
        let health = uri.starts_with("/v1.0/healthz");
        prop_assert!(status < 500 || (health && status == 500), "{uri}: {status} {}", String::from_utf8_lossy(&body));
        if status >= 400 && !body.is_empty() {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{uri}: error body is not JSON: {e}")))?;
            prop_assert!(v["errorCode"].is_string() && v["message"].is_string(), "{uri}: {v}");
        }
    }

    #[test]
    fn actor_routes_answer_with_dapr_errors(
        segs in prop::collection::vec(actor_segment(), 0..6),
        m in method(),
        body in json_body(),
        reentrancy in prop::option::of("[ -~]{0,12}"),
    ) {
        let f = FIXTURE.with(|f| f.clone());
        let uri = format!("/v1.0/actors/{}", segs.join("/"));
        let Ok(mut req) = Request::builder().method(m).uri(&uri).header("content-type", "application/json").body(Body::from(body)) else {
            return Ok(());
        };
        if let Some(v) = reentrancy {
            if let Ok(h) = axum::http::HeaderValue::from_str(&v) {
                req.headers_mut().insert("dapr-reentrancy-id", h);
            }
        }
        let (status, body) = send(&f, req);
        if status >= 400 && !body.is_empty() {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{uri}: error body is not JSON: {e}")))?;
            let code = v["errorCode"].as_str().unwrap_or_default().to_string();
            prop_assert!(v["message"].is_string(), "{uri}: {v}");
            // Dapr's own codes for these are 5xx: a timer for a type this host does not run, and
            // reminders (no scheduler yet). Nothing else may be a server error.
            prop_assert!(status < 500 || code == "ERR_ACTOR_TIMER_CREATE" || code == "ERR_API_UNIMPLEMENTED", "{uri}: {status} {v}");
        }
    }

    #[test]
    fn rejected_saves_write_nothing(items in prop::collection::vec(json_body(), 1..4)) {
        let f = FIXTURE.with(|f| f.clone());
        // Each save carries a fresh sentinel item first, then arbitrary items.
        let sentinel = format!("sentinel-{}", next_id());
        let mut body = format!(r#"[{{"key":"{sentinel}","value":1}}"#).into_bytes();
        for it in &items {
            body.push(b',');
            body.extend_from_slice(it);
        }
        body.push(b']');
        let req = Request::builder().method(Method::POST).uri("/v1.0/state/statestore").body(Body::from(body)).unwrap();
        let (status, text) = send(&f, req);
        prop_assert!(status == 204 || status == 400 || status == 409, "{status} {}", String::from_utf8_lossy(&text));
        let get = Request::builder().uri(format!("/v1.0/state/statestore/{sentinel}")).body(Body::empty()).unwrap();
        let (got, _) = send(&f, get);
        prop_assert_eq!(got == 200, status == 204, "sentinel written iff the save succeeded");
    }
}

/// The invoke route answers a verb other than GET, POST, PUT and DELETE with 405, whether the
/// path takes the shortcut in front of the router or goes through it (percent-encoded).
#[test]
fn invoke_with_another_verb_is_405() {
    FIXTURE.with(|f| {
        for path in ["/v1.0/actors/T/i/method/m", "/v1.0/actors/T/i%20j/method/m"] {
            for verb in [Method::PATCH, Method::HEAD, Method::OPTIONS] {
                let req = Request::builder()
                    .method(verb.clone())
                    .uri(path)
                    .body(Body::empty())
                    .unwrap();
                let (status, body) = send(f, req);
                assert_eq!(status, 405, "{verb} {path}");
                if verb != Method::HEAD {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(v["errorCode"], "ERR_BAD_REQUEST", "{verb} {path}");
                }
            }
        }
    });
}
