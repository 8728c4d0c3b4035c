//! The settled version on a real (single-replica, in-process) placement over loopback TCP: it
//! advances only once every listed host has applied a version, it is reported at once (not at the
//! next heartbeat), and a host that heartbeats but never applies holds it back until it is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use placement::client::{Client, Options, Registration};
use placement::server::{Config, Node};
use tokio::time::Instant;

/// What every host applied, and when settled versions were seen: to check that no host ever saw
/// a settled version that some listed host had not applied yet.
#[derive(Default)]
struct Log {
    /// Host -> highest version it applied so far.
    applied: BTreeMap<String, u64>,
    /// Version -> names listed in that table (as some host received it).
    tables: BTreeMap<u64, BTreeSet<String>>,
    /// Violations found.
    bad: Vec<String>,
    /// Every settled value seen, by any host.
    settled_seen: BTreeSet<u64>,
}

type Shared = Arc<Mutex<Log>>;

fn reg(name: &str) -> Registration {
    Registration {
        name: name.into(),
        app_id: "app".into(),
        actor_types: vec!["T".into()],
        namespace: "default".into(),
    }
}

/// A host: applies every table it receives at once when `auto`, logs settled versions it sees.
fn host(addr: &str, name: &str, auto: bool, log: &Shared) -> Arc<Client> {
    let client = Arc::new(Client::spawn(
        vec![addr.to_string()],
        reg(name),
        Options::default(),
    ));
    let weak: Weak<Client> = Arc::downgrade(&client);
    let mut tables = client.subscribe();
    let (log2, name2) = (log.clone(), name.to_string());
    tokio::spawn(async move {
        while tables.changed().await.is_ok() {
            let t = tables.borrow_and_update().clone();
            let mut l = log2.lock().unwrap();
            l.tables
                .entry(t.version)
                .or_insert_with(|| t.hosts.iter().map(|h| h.name.clone()).collect());
            if auto {
                let Some(c) = weak.upgrade() else { return };
                // Logged before the client can report it.
                let a = l.applied.entry(name2.clone()).or_default();
                *a = (*a).max(t.version);
                c.set_applied(t.version);
            }
        }
    });
    let mut settled = client.subscribe_settled();
    let log3 = log.clone();
    tokio::spawn(async move {
        while settled.changed().await.is_ok() {
            let s = *settled.borrow_and_update();
            let mut l = log3.lock().unwrap();
            l.settled_seen.insert(s);
            // The oracle: every host listed in table s has applied s.
            let listed = l
                .tables
                .range(..=s)
                .next_back()
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            for h in listed {
                let a = l.applied.get(&h).copied().unwrap_or(0);
                if a < s {
                    l.bad
                        .push(format!("settled {s} seen while {h} had applied {a}"));
                }
            }
        }
    });
    client
}

/// Applies `v` on a manually driven host, logging it first.
fn apply(c: &Client, name: &str, v: u64, log: &Shared) {
    let mut l = log.lock().unwrap();
    let a = l.applied.entry(name.to_string()).or_default();
    *a = (*a).max(v);
    c.set_applied(v);
}

async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_waits_for_every_listed_host_and_for_removal_of_a_stuck_one() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut cfg = Config::single(dir.path(), addr.clone());
    cfg.lease = Duration::from_secs(2);
    let node = Node::start(cfg).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(placement::server::run(
        node.clone(),
        listener,
        None,
        stop.clone().cancelled_owned(),
    ));
    let log: Shared = Arc::default();

    // Two hosts that apply at once and one ("manual") that applies only when told.
    let a = host(&addr, "a:1", true, &log);
    let b = host(&addr, "b:1", true, &log);
    let manual = host(&addr, "m:1", false, &log);
    let all3 = |c: &Client| c.table().hosts.len() == 3;
    wait_for("three hosts listed", Duration::from_secs(10), || {
        all3(&a) && all3(&b) && all3(&manual)
    })
    .await;
    let v3 = manual.table().version;
    wait_for("a and b on one version", Duration::from_secs(5), || {
        a.table().version == v3 && b.table().version == v3
    })
    .await;
    // Several heartbeats: the version listing "manual" stays unsettled while it has not applied.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for c in [&a, &b, &manual] {
        assert!(
            c.settled() < v3,
            "settled {} before m:1 applied {v3}",
            c.settled()
        );
    }
    assert!(node.settled() < v3);
    assert!(node.state_json()["settledVersion"].as_u64().unwrap() < v3);

    // Now it applies: the others learn within a fraction of the 1 s heartbeat.
    apply(&manual, "m:1", v3, &log);
    let took = wait_for(
        "settled after the last apply",
        Duration::from_secs(5),
        || [&a, &b, &manual].iter().all(|c| c.settled() == v3),
    )
    .await;
    assert!(
        took < Duration::from_millis(250),
        "settling took {took:?}: the applied version was not reported at once"
    );
    assert_eq!(node.state_json()["settledVersion"].as_u64(), Some(v3));
    assert!(node
        .metrics_text()
        .contains(&format!("tessera_placement_settled_version {v3}\n")));

    // A host that heartbeats but never applies: every version listing it stays unsettled.
    let stuck = host(&addr, "stuck:1", false, &log);
    wait_for("stuck listed", Duration::from_secs(10), || {
        a.table().hosts.len() == 4
    })
    .await;
    let v4 = a.table().version;
    wait_for("all on v4", Duration::from_secs(5), || {
        [&b, &manual, &stuck]
            .iter()
            .all(|c| c.table().version == v4)
    })
    .await;
    apply(&manual, "m:1", v4, &log);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(stuck.lease_valid(), "the stuck host still heartbeats");
    for c in [&a, &b, &manual, &stuck] {
        assert_eq!(
            c.settled(),
            v3,
            "settled moved past {v3} while stuck:1 had not applied"
        );
    }

    // It goes away: after its lease it is removed, and the version without it settles.
    drop(stuck);
    wait_for("stuck removed", Duration::from_secs(10), || {
        a.table().hosts.len() == 3
    })
    .await;
    let v5 = a.table().version;
    wait_for("manual on v5", Duration::from_secs(5), || {
        manual.table().version == v5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.settled() < v5, "manual has not applied v5 yet");
    apply(&manual, "m:1", v5, &log);
    wait_for("v5 settled", Duration::from_secs(5), || {
        [&a, &b, &manual].iter().all(|c| c.settled() == v5)
    })
    .await;

    {
        let l = log.lock().unwrap();
        assert!(l.bad.is_empty(), "{:?}", l.bad);
        assert!(
            !l.settled_seen.iter().any(|s| (v4..v5).contains(s)),
            "a version listing the stuck host settled: {:?}",
            l.settled_seen
        );
    }
    // The server drains open sessions before it returns: end them first.
    drop((a, b, manual));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}
