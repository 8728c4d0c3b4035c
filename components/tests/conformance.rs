//! One conformance suite for every state store, run against sled (a temp dir), the machine's
//! Redis and its PostgreSQL. A backend that cannot be reached fails its tests: nothing is skipped.
//!
//! Endpoints: `TESSERA_TEST_REDIS` (default `127.0.0.1:6379`) and `TESSERA_TEST_POSTGRES`
//! (default `host=127.0.0.1 user=postgres dbname=test`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use components::resources::{open_state_store, ComponentSpec};
use components::state::{Concurrency, DeleteOp, Op, SetOp, StateError, StateStore};

struct Backend {
    store: Arc<dyn StateStore>,
    prefix: String,
    _dir: Option<tempfile::TempDir>,
}

fn spec(kind: &str, meta: &[(&str, String)]) -> ComponentSpec {
    ComponentSpec {
        name: "conformance".into(),
        kind: kind.into(),
        version: "v1".into(),
        metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        ignore_errors: false,
        file: None,
    }
}

fn unique() -> String {
    format!("conf-{}-{}||", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (std::thread::current().id().as_u64_hash())
}

trait ThreadIdHash {
    fn as_u64_hash(&self) -> u64;
}

impl ThreadIdHash for std::thread::ThreadId {
    fn as_u64_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

impl Backend {
    async fn sled() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = spec("state.sled", &[("path", dir.path().display().to_string())]);
        let store = open_state_store(&s, dir.path()).await.expect("open sled");
        Backend {
            store,
            prefix: unique(),
            _dir: Some(dir),
        }
    }

    async fn redis() -> Self {
        let host = std::env::var("TESSERA_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
        let s = spec("state.redis", &[("redisHost", host.clone())]);
        let store = open_state_store(&s, std::path::Path::new("/nonexistent"))
            .await
            .unwrap_or_else(|e| {
                panic!("Redis at {host} is required for this test (start it; see README): {e}")
            });
        Backend {
            store,
            prefix: unique(),
            _dir: None,
        }
    }

    async fn postgres() -> Self {
        let conn = std::env::var("TESSERA_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
        let s = spec(
            "state.postgresql",
            &[
                ("connectionString", conn.clone()),
                ("tableName", "tessera_conformance".into()),
            ],
        );
        let store = open_state_store(&s, std::path::Path::new("/nonexistent"))
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL ({conn}) is required for this test (start it; see README): {e}")
            });
        Backend {
            store,
            prefix: unique(),
            _dir: None,
        }
    }
}

fn set(key: &str, value: &str) -> SetOp {
    SetOp {
        key: key.into(),
        value: Bytes::from(value.to_string()),
        etag: None,
        concurrency: Concurrency::LastWrite,
        ttl: None,
    }
}

fn with_etag(mut s: SetOp, etag: &str) -> SetOp {
    s.etag = Some(etag.into());
    s
}

fn first_write(mut s: SetOp) -> SetOp {
    s.concurrency = Concurrency::FirstWrite;
    s
}

async fn put(store: &dyn StateStore, s: SetOp) -> Result<(), StateError> {
    store.transact(vec![Op::Set(s)]).await
}

async fn del(store: &dyn StateStore, key: &str, etag: Option<&str>) -> Result<(), StateError> {
    store
        .transact(vec![Op::Delete(DeleteOp {
            key: key.into(),
            etag: etag.map(str::to_string),
        })])
        .await
}

async fn value(store: &dyn StateStore, key: &str) -> Option<String> {
    store
        .get(key)
        .await
        .unwrap()
        .map(|i| String::from_utf8(i.value.to_vec()).unwrap())
}

async fn etag(store: &dyn StateStore, key: &str) -> String {
    store.get(key).await.unwrap().expect("key present").etag
}

fn is_mismatch(r: Result<(), StateError>) -> bool {
    matches!(r, Err(StateError::EtagMismatch { .. }))
}

async fn round_trip(store: &dyn StateStore, p: &str) {
    let k = format!("{p}a");
    assert_eq!(value(store, &k).await, None);
    put(store, set(&k, r#"{"x":1}"#)).await.unwrap();
    let item = store.get(&k).await.unwrap().unwrap();
    assert_eq!(item.value, Bytes::from_static(br#"{"x":1}"#));
    assert!(item.etag.parse::<u64>().is_ok(), "etag {:?}", item.etag);
    assert_eq!(item.expires_at_ms, None);
    del(store, &k, None).await.unwrap();
    assert_eq!(value(store, &k).await, None);
    del(store, &k, None)
        .await
        .expect("deleting an absent key succeeds");
}

async fn etag_mismatch_on_save(store: &dyn StateStore, p: &str) {
    let k = format!("{p}k");
    put(store, set(&k, "1")).await.unwrap();
    let e1 = etag(store, &k).await;
    put(store, with_etag(set(&k, "2"), &e1)).await.unwrap();
    let e2 = etag(store, &k).await;
    assert_ne!(e1, e2, "every write gives a fresh etag");
    assert!(
        is_mismatch(put(store, with_etag(set(&k, "3"), &e1)).await),
        "stale etag must fail"
    );
    assert_eq!(
        value(store, &k).await.as_deref(),
        Some("2"),
        "a failed save changes nothing"
    );
    assert!(is_mismatch(
        put(store, with_etag(set(&format!("{p}absent"), "x"), &e2)).await
    ));
    assert_eq!(value(store, &format!("{p}absent")).await, None);
    assert!(matches!(
        put(store, with_etag(set(&k, "4"), "not-a-number")).await,
        Err(StateError::InvalidEtag { .. })
    ));
    assert!(
        matches!(
            put(store, with_etag(set(&k, "4"), "")).await,
            Err(StateError::InvalidEtag { .. })
        ),
        "a blank etag is rejected, never read as none"
    );
    assert_eq!(value(store, &k).await.as_deref(), Some("2"));
}

async fn etag_mismatch_on_delete(store: &dyn StateStore, p: &str) {
    let k = format!("{p}d");
    put(store, set(&k, "1")).await.unwrap();
    let e1 = etag(store, &k).await;
    put(store, set(&k, "2")).await.unwrap();
    assert!(is_mismatch(del(store, &k, Some(&e1)).await));
    assert_eq!(value(store, &k).await.as_deref(), Some("2"));
    let e2 = etag(store, &k).await;
    del(store, &k, Some(&e2)).await.unwrap();
    assert_eq!(value(store, &k).await, None);
    assert!(
        is_mismatch(del(store, &k, Some(&e2)).await),
        "etag delete of an absent key fails"
    );
}

async fn recreate_never_reuses_an_etag(store: &dyn StateStore, p: &str) {
    let k = format!("{p}r");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        put(store, set(&k, "v")).await.unwrap();
        let e = etag(store, &k).await;
        assert!(seen.insert(e.clone()), "etag {e} reused");
        del(store, &k, None).await.unwrap();
        assert!(is_mismatch(put(store, with_etag(set(&k, "w"), &e)).await));
    }
}

async fn first_write_semantics(store: &dyn StateStore, p: &str) {
    let k = format!("{p}fw");
    put(store, first_write(set(&k, "1"))).await.unwrap();
    assert!(
        is_mismatch(put(store, first_write(set(&k, "2"))).await),
        "first-write without etag on an existing key fails"
    );
    assert_eq!(value(store, &k).await.as_deref(), Some("1"));
    let e = etag(store, &k).await;
    put(store, first_write(with_etag(set(&k, "3"), &e)))
        .await
        .unwrap();
    assert_eq!(value(store, &k).await.as_deref(), Some("3"));
    assert!(is_mismatch(
        put(store, first_write(with_etag(set(&k, "4"), &e))).await
    ));
}

async fn concurrent_first_write_creates(store: Arc<dyn StateStore>, p: &str) {
    for round in 0..20 {
        let k = format!("{p}race{round}");
        let mut tasks = Vec::new();
        for writer in 0..16 {
            let store = store.clone();
            let k = k.clone();
            tasks.push(tokio::spawn(async move {
                (
                    writer,
                    put(&*store, first_write(set(&k, &writer.to_string()))).await,
                )
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (writer, r) = t.await.unwrap();
            match r {
                Ok(()) => winners.push(writer),
                Err(StateError::EtagMismatch { .. }) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "exactly one concurrent create wins, got {winners:?}"
        );
        assert_eq!(value(&*store, &k).await, Some(winners[0].to_string()));
    }
}

async fn concurrent_etag_updates_lose_nothing(store: Arc<dyn StateStore>, p: &str) {
    // 8 writers each add 1 to a counter 10 times with read-modify-write under etags.
    let k = format!("{p}counter");
    put(&*store, set(&k, "0")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < 10 {
                let item = store.get(&k).await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&item.value).unwrap().parse().unwrap();
                match put(
                    &*store,
                    with_etag(set(&k, &(n + 1).to_string()), &item.etag),
                )
                .await
                {
                    Ok(()) => done += 1,
                    Err(StateError::EtagMismatch { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(value(&*store, &k).await.as_deref(), Some("80"));
}

async fn transactions_are_atomic(store: &dyn StateStore, p: &str) {
    let (a, b, c) = (format!("{p}ta"), format!("{p}tb"), format!("{p}tc"));
    put(store, set(&a, "a1")).await.unwrap();
    put(store, set(&b, "b1")).await.unwrap();
    let eb = etag(store, &b).await;
    put(store, set(&b, "b2")).await.unwrap();
    let r = store
        .transact(vec![
            Op::Set(set(&a, "a2")),
            Op::Set(set(&c, "c1")),
            Op::Delete(DeleteOp {
                key: b.clone(),
                etag: Some(eb.clone()),
            }),
        ])
        .await;
    assert!(
        is_mismatch(r),
        "the stale delete fails the whole transaction"
    );
    assert_eq!(value(store, &a).await.as_deref(), Some("a1"));
    assert_eq!(value(store, &b).await.as_deref(), Some("b2"));
    assert_eq!(value(store, &c).await, None);
    // A failing first-write in the middle also rolls back what came before it.
    let r = store
        .transact(vec![
            Op::Set(set(&c, "c1")),
            Op::Set(first_write(set(&a, "a3"))),
            Op::Set(set(&b, "b3")),
        ])
        .await;
    assert!(is_mismatch(r));
    assert_eq!(value(store, &c).await, None);
    assert_eq!(value(store, &b).await.as_deref(), Some("b2"));
    // A good transaction applies in order: later operations see earlier ones.
    let ea = etag(store, &a).await;
    store
        .transact(vec![
            Op::Set(with_etag(set(&a, "a4"), &ea)),
            Op::Set(set(&c, "c2")),
            Op::Delete(DeleteOp {
                key: c.clone(),
                etag: None,
            }),
            Op::Set(first_write(set(&c, "c3"))),
            Op::Delete(DeleteOp {
                key: b.clone(),
                etag: None,
            }),
        ])
        .await
        .unwrap();
    assert_eq!(value(store, &a).await.as_deref(), Some("a4"));
    assert_eq!(value(store, &b).await, None);
    assert_eq!(value(store, &c).await.as_deref(), Some("c3"));
}

async fn ttl_expiry(store: &dyn StateStore, p: &str) {
    let k = format!("{p}ttl");
    let keep = format!("{p}keep");
    let mut s = set(&k, "short");
    s.ttl = Some(Duration::from_secs(1));
    put(store, s).await.unwrap();
    put(store, set(&keep, "long")).await.unwrap();
    let item = store.get(&k).await.unwrap().unwrap();
    let exp = item.expires_at_ms.expect("expiry reported");
    let now = components::state::now_ms();
    assert!(exp > now && exp <= now + 1_500, "expiry {exp} vs now {now}");
    let stale = item.etag;
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(value(store, &k).await, None, "expired key reads as absent");
    assert_eq!(
        store.bulk_get(std::slice::from_ref(&k)).await.unwrap(),
        vec![None]
    );
    assert!(is_mismatch(
        put(store, with_etag(set(&k, "x"), &stale)).await
    ));
    put(store, first_write(set(&k, "again")))
        .await
        .expect("first-write create over an expired key");
    let item = store.get(&k).await.unwrap().unwrap();
    assert_eq!(
        item.expires_at_ms, None,
        "a write without ttl clears the old expiry"
    );
    assert_eq!(value(store, &keep).await.as_deref(), Some("long"));
}

async fn bulk_get_with_missing_keys(store: &dyn StateStore, p: &str) {
    let keys: Vec<String> = ["x", "missing", "y"]
        .iter()
        .map(|k| format!("{p}{k}"))
        .collect();
    put(store, set(&keys[0], "1")).await.unwrap();
    put(store, set(&keys[2], "3")).await.unwrap();
    let got = store.bulk_get(&keys).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].as_ref().unwrap().value, Bytes::from_static(b"1"));
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap().value, Bytes::from_static(b"3"));
    assert_eq!(got[0].as_ref().unwrap().etag, etag(store, &keys[0]).await);
    assert!(store.bulk_get(&[]).await.unwrap().is_empty());
}

async fn large_values(store: &dyn StateStore, p: &str) {
    let k = format!("{p}big");
    let big: String = (0..1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    put(store, set(&k, &big)).await.unwrap();
    assert_eq!(value(store, &k).await.map(|v| v.len()), Some(big.len()));
    assert_eq!(value(store, &k).await.as_deref(), Some(big.as_str()));
}

async fn binary_and_odd_keys(store: &dyn StateStore, p: &str) {
    for k in [
        "with space",
        "slash/inside",
        "ünïcödé",
        "quote\"'",
        "%2F",
        "a||b",
    ] {
        let key = format!("{p}{k}");
        let v = SetOp {
            value: Bytes::from_static(&[0, 159, 146, 150, 255]),
            ..set(&key, "")
        };
        put(store, v).await.unwrap();
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().value,
            Bytes::from_static(&[0, 159, 146, 150, 255])
        );
    }
}

async fn fencing_rejects_older_epochs(store: Arc<dyn StateStore>, p: &str) {
    use components::state::fence::{fenced_transact, FenceError};
    let fence = format!("{p}__fence");
    let k = format!("{p}fenced");
    // Epoch 5 claims, writes; epoch 7 claims; epoch 5 is then refused and writes nothing.
    fenced_transact(&*store, &fence, 5, vec![]).await.unwrap();
    fenced_transact(&*store, &fence, 5, vec![Op::Set(set(&k, "five"))])
        .await
        .unwrap();
    fenced_transact(&*store, &fence, 7, vec![]).await.unwrap();
    // Claiming again under the epoch the fence holds writes nothing (the etag stays).
    let held = store.get(&fence).await.unwrap().unwrap().etag;
    fenced_transact(&*store, &fence, 7, vec![]).await.unwrap();
    assert_eq!(store.get(&fence).await.unwrap().unwrap().etag, held);
    match fenced_transact(&*store, &fence, 5, vec![Op::Set(set(&k, "stale"))]).await {
        Err(FenceError::Stale { ours: 5, stored: 7 }) => {}
        other => panic!("expected a stale rejection, got {other:?}"),
    }
    assert_eq!(value(&*store, &k).await.as_deref(), Some("five"));
    fenced_transact(&*store, &fence, 7, vec![Op::Set(set(&k, "seven"))])
        .await
        .unwrap();
    assert_eq!(value(&*store, &k).await.as_deref(), Some("seven"));
    // A failing user condition writes nothing, fence included.
    let r = fenced_transact(
        &*store,
        &fence,
        9,
        vec![Op::Set(with_etag(set(&k, "nine"), "12345"))],
    )
    .await;
    assert!(
        matches!(r, Err(FenceError::State(StateError::EtagMismatch { .. }))),
        "{r:?}"
    );
    fenced_transact(&*store, &fence, 8, vec![]).await.unwrap();

    // Racing epochs: once a write of epoch e has been acknowledged, no write of a lower epoch
    // that starts afterwards is accepted.
    let fence2 = format!("{p}__fence2");
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for epoch in 1..=8u64 {
        let (store, fence2, done) = (store.clone(), fence2.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let key = format!("{fence2}-w{epoch}-{i}");
                let before = done.load(std::sync::atomic::Ordering::SeqCst);
                match fenced_transact(&*store, &fence2, epoch, vec![Op::Set(set(&key, "x"))]).await
                {
                    Ok(()) => {
                        assert!(
                            before <= epoch,
                            "epoch {epoch} accepted after epoch {before}"
                        );
                        done.fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(FenceError::Stale { .. }) => break,
                    Err(FenceError::State(StateError::EtagMismatch { .. })) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stored = value(&*store, &fence2).await.unwrap();
    let max = done.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        stored,
        max.to_string(),
        "the fence holds the highest accepted epoch"
    );
}

macro_rules! suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            async fn backend() -> Backend {
                Backend::$backend().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trip() {
                let b = backend().await;
                super::round_trip(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etag_mismatch_on_save() {
                let b = backend().await;
                super::etag_mismatch_on_save(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etag_mismatch_on_delete() {
                let b = backend().await;
                super::etag_mismatch_on_delete(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn recreate_never_reuses_an_etag() {
                let b = backend().await;
                super::recreate_never_reuses_an_etag(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn first_write_semantics() {
                let b = backend().await;
                super::first_write_semantics(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_first_write_creates() {
                let b = backend().await;
                super::concurrent_first_write_creates(b.store.clone(), &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_etag_updates_lose_nothing() {
                let b = backend().await;
                super::concurrent_etag_updates_lose_nothing(b.store.clone(), &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn transactions_are_atomic() {
                let b = backend().await;
                super::transactions_are_atomic(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ttl_expiry() {
                let b = backend().await;
                super::ttl_expiry(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bulk_get_with_missing_keys() {
                let b = backend().await;
                super::bulk_get_with_missing_keys(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_values() {
                let b = backend().await;
                super::large_values(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn binary_and_odd_keys() {
                let b = backend().await;
                super::binary_and_odd_keys(&*b.store, &b.prefix).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn fencing_rejects_older_epochs() {
                let b = backend().await;
                super::fencing_rejects_older_epochs(b.store.clone(), &b.prefix).await;
            }
        }
    };
}

suite!(sled);
suite!(redis);
suite!(postgres);
