//! The placement service as real processes on loopback: 3 replicas (`tessera placement`) and
//! simulated hosts that speak the host protocol through `placement::client` (in this process).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use e2e::Replica;
use placement::client::{Client, Options, Registration};

const LEASE: &str = "3s";

/// These tests run one at a time: each starts 3 replicas and up to 400 hosts on a 2-core machine,
/// and running them together would measure CPU starvation, not placement.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A simulated host: a placement client that applies every table as soon as it arrives (it runs
/// no actors, so there is nothing to drain). Dropping it is a crash: the session stops.
struct Host(Arc<Client>);

impl std::ops::Deref for Host {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.0
    }
}

fn host(i: usize, tag: &str, replicas: &[Replica]) -> Host {
    let client = Arc::new(Client::spawn(
        replicas.iter().map(Replica::addr).collect(),
        Registration {
            name: format!("127.0.0.{}:{}", 1 + i / 60000, 1000 + i % 60000) + tag,
            app_id: "app".into(),
            actor_types: vec!["Counter".into()],
            namespace: "default".into(),
        },
        Options::default(),
    ));
    let weak: Weak<Client> = Arc::downgrade(&client);
    let mut tables = client.subscribe();
    tokio::spawn(async move {
        while tables.changed().await.is_ok() {
            let v = tables.borrow_and_update().version;
            match weak.upgrade() {
                Some(c) => c.set_applied(v),
                None => return,
            }
        }
    });
    Host(client)
}

/// Waits until every client knows `version` as settled; returns how long that took.
async fn settle(clients: &[Host], version: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if clients.iter().all(|c| c.settled() >= version) {
            return start.elapsed();
        }
        if start.elapsed() > within {
            let seen: BTreeSet<u64> = clients.iter().map(|c| c.settled()).collect();
            panic!("version {version} not settled within {within:?}: hosts saw {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts 3 replicas (not waiting for a leader). The temp dir must live as long as they do.
fn start_cluster() -> (tempfile::TempDir, reqwest::Client, Vec<Replica>) {
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Replica::cluster(3, dir.path(), LEASE);
    for r in &mut replicas {
        r.start();
    }
    (dir, reqwest::Client::new(), replicas)
}

/// The replica that claims leadership, with its term.
async fn leader(replicas: &[Replica], http: &reqwest::Client) -> Option<(usize, u64)> {
    let mut found = None;
    for (i, r) in replicas.iter().enumerate() {
        if let Some(s) = r.state(http).await {
            if s["leader"] == true {
                let term = s["term"].as_u64().unwrap();
                if found.is_none_or(|(_, t)| term > t) {
                    found = Some((i, term));
                }
            }
        }
    }
    found
}

async fn wait_leader(
    replicas: &[Replica],
    http: &reqwest::Client,
    within: Duration,
) -> (usize, u64) {
    let start = Instant::now();
    loop {
        if let Some(l) = leader(replicas, http).await {
            return l;
        }
        if start.elapsed() > within {
            for r in replicas {
                let log =
                    std::fs::read_to_string(r.data_dir.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!(
                    "--- replica {} (running: {}):\n{}",
                    r.id,
                    r.child.is_some(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            panic!("no leader within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until every client holds the same version with exactly `names`; returns the version.
async fn converge(clients: &[Host], names: &BTreeSet<String>, within: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let tables: Vec<_> = clients.iter().map(|c| c.table()).collect();
        let v = tables[0].version;
        let same = tables.iter().all(|t| t.version == v);
        let hosts: BTreeSet<String> = tables[0].hosts.iter().map(|h| h.name.clone()).collect();
        if same && &hosts == names {
            return v;
        }
        if start.elapsed() > within {
            let versions: BTreeSet<u64> = tables.iter().map(|t| t.version).collect();
            panic!("no convergence within {within:?}: versions {versions:?}, {} of {} hosts in the first table", hosts.len(), names.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names(clients: &[(String, Host)]) -> BTreeSet<String> {
    clients.iter().map(|(n, _)| n.clone()).collect()
}

fn spawn_hosts(
    range: std::ops::Range<usize>,
    tag: &str,
    replicas: &[Replica],
) -> Vec<(String, Host)> {
    range
        .map(|i| {
            let c = host(i, tag, replicas);
            (
                format!("127.0.0.{}:{}", 1 + i / 60000, 1000 + i % 60000) + tag,
                c,
            )
        })
        .collect()
}

/// Counts tables seen by a watcher that miss any of `expected` (a host removed while alive).
fn watch_for_removals(client: &Host, expected: BTreeSet<String>) -> Arc<AtomicUsize> {
    let bad = Arc::new(AtomicUsize::new(0));
    let mut rx = client.subscribe();
    let b = bad.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let t = rx.borrow_and_update().clone();
            let have: BTreeSet<String> = t.hosts.iter().map(|h| h.name.clone()).collect();
            if !expected.is_subset(&have) {
                b.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "table version {} lost live hosts: {:?}",
                    t.version,
                    expected.difference(&have).collect::<Vec<_>>()
                );
            }
        }
    });
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_keep_every_heartbeating_host() {
    let _serial = SERIAL.lock().await;
    let (_dir, http, mut replicas) = start_cluster();
    wait_leader(&replicas, &http, Duration::from_secs(10)).await;
    let hosts = spawn_hosts(0..20, "", &replicas);
    let expected = names(&hosts);
    let clients: Vec<Host> = hosts.into_iter().map(|(_, c)| c).collect();
    let v0 = converge(&clients, &expected, Duration::from_secs(10)).await;
    let removals = watch_for_removals(&clients[0], expected.clone());
    let mut worst_election = Duration::ZERO;
    let mut worst_convergence = Duration::ZERO;
    for round in 0..10 {
        let (old, old_term) = wait_leader(&replicas, &http, Duration::from_secs(5)).await;
        replicas[old].kill9();
        let killed = Instant::now();
        let (new, term) = wait_leader(&replicas, &http, Duration::from_secs(3)).await;
        let elected = killed.elapsed();
        assert_ne!(new, old);
        assert!(
            term > old_term,
            "round {round}: term {term} after {old_term}"
        );
        // Every host has a session with the new leader (its heartbeats acknowledged there) and
        // holds the leader's table.
        let new_addr = replicas[new].addr();
        let v = loop {
            let v = converge(&clients, &expected, Duration::from_secs(5)).await;
            let with_leader = clients
                .iter()
                .filter(|c| c.leader() == Some(new_addr.clone()))
                .count();
            if with_leader == clients.len() {
                break v;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(5),
                "round {round}: only {with_leader} of 20 hosts reached the new leader in 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let converged = killed.elapsed();
        // The new leader starts its settled version from 0 and learns from the hosts' reports
        // that every one of them applied v.
        settle(&clients, v, Duration::from_secs(5)).await;
        loop {
            let s = replicas[new].state(&http).await.unwrap();
            if s["settledVersion"].as_u64() == Some(v) {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(6),
                "round {round}: the new leader did not settle version {v}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let settled = killed.elapsed();
        assert!(v >= v0);
        let state = replicas[new].state(&http).await.unwrap();
        assert_eq!(
            state["tableVersion"].as_u64(),
            Some(v),
            "hosts hold the leader's version"
        );
        assert!(
            clients.iter().all(|c| c.lease_valid()),
            "every host holds a lease from the new leader"
        );
        eprintln!("round {round}: new leader in {elected:?}, all 20 hosts on version {v} after {converged:?}, settled after {settled:?}");
        worst_election = worst_election.max(elected);
        worst_convergence = worst_convergence.max(converged);
        replicas[old].start();
        // The restarted replica must catch up before the next kill, or two of three could be down.
        let start = Instant::now();
        loop {
            let want = replicas[new]
                .state(&http)
                .await
                .and_then(|s| s["lastApplied"].as_u64());
            let have = replicas[old]
                .state(&http)
                .await
                .and_then(|s| s["lastApplied"].as_u64());
            if want.is_some() && have == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "restarted replica did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the host lease pass once per round, so an expiry would have had its chance.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    converge(&clients, &expected, Duration::from_secs(5)).await;
    assert_eq!(
        removals.load(Ordering::Relaxed),
        0,
        "a heartbeating host was removed"
    );
    eprintln!("worst election {worst_election:?}, worst convergence {worst_convergence:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashed_hosts_leave_after_their_lease_and_the_rest_converge() {
    let _serial = SERIAL.lock().await;
    let (_dir, http, replicas) = start_cluster();
    wait_leader(&replicas, &http, Duration::from_secs(10)).await;
    let mut hosts = spawn_hosts(0..20, "", &replicas);
    let all = names(&hosts);
    let v1 = {
        let clients: Vec<&Host> = hosts.iter().map(|(_, c)| c).collect();
        let start = Instant::now();
        loop {
            let t = clients[0].table();
            if clients.iter().all(|c| c.table().version == t.version) && t.hosts.len() == 20 {
                break t.version;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "initial convergence"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(all.len() == 20);
    // "kill -9" five hosts: their sessions vanish without a goodbye.
    let crashed: Vec<(String, Host)> = hosts.drain(..5).collect();
    let crashed_at = Instant::now();
    drop(crashed);
    let remaining = names(&hosts);
    let clients: Vec<Host> = hosts.into_iter().map(|(_, c)| c).collect();
    let v2 = converge(&clients, &remaining, Duration::from_secs(10)).await;
    let gone_after = crashed_at.elapsed();
    // Versions listing the crashed hosts could not settle (they never applied them); the one
    // without them does.
    settle(&clients, v2, Duration::from_secs(5)).await;
    assert!(v2 > v1);
    assert!(
        gone_after >= Duration::from_millis(2900),
        "removed before the 3 s lease ran out ({gone_after:?})"
    );
    eprintln!("5 crashed hosts removed after {gone_after:?}; 15 hosts on version {v2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_restart_of_all_replicas_recovers_membership_from_disk() {
    let _serial = SERIAL.lock().await;
    let (_dir, http, mut replicas) = start_cluster();
    wait_leader(&replicas, &http, Duration::from_secs(10)).await;
    let hosts = spawn_hosts(0..20, "", &replicas);
    let expected = names(&hosts);
    let clients: Vec<Host> = hosts.into_iter().map(|(_, c)| c).collect();
    let v1 = converge(&clients, &expected, Duration::from_secs(10)).await;
    for r in &mut replicas {
        r.kill9();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in &mut replicas {
        r.start();
    }
    let (l, _) = wait_leader(&replicas, &http, Duration::from_secs(10)).await;
    let state = replicas[l].state(&http).await.unwrap();
    assert!(
        state["tableVersion"].as_u64().unwrap() >= v1,
        "the table version came back from disk: {state}"
    );
    assert_eq!(
        state["hostList"].as_array().unwrap().len(),
        20,
        "membership came back from disk: {state}"
    );
    let v2 = converge(&clients, &expected, Duration::from_secs(10)).await;
    assert!(v2 >= v1);
    // And it stays: after a lease every host is still there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        converge(&clients, &expected, Duration::from_secs(5)).await,
        v2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_of_200_hosts_keeps_one_leader_and_settles() {
    let _serial = SERIAL.lock().await;
    let (_dir, http, replicas) = start_cluster();
    let (_, term0) = wait_leader(&replicas, &http, Duration::from_secs(10)).await;
    let mut old = spawn_hosts(0..200, "-old", &replicas);
    let old_names = names(&old);
    let start = Instant::now();
    loop {
        let t = old[0].1.table();
        if t.hosts.len() == 200 && old.iter().all(|(_, c)| c.table().version == t.version) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "200 hosts did not converge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v_before = old[0].1.table().version;
    // Watch leadership throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let leaderless = Arc::new(AtomicUsize::new(0));
    let terms = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let ports: Vec<u16> = replicas.iter().map(|r| r.http_port).collect();
    let watcher = {
        let (stop, leaderless, terms, http) = (
            stop.clone(),
            leaderless.clone(),
            terms.clone(),
            http.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut leaders = 0;
                let mut seen = Vec::new();
                for p in &ports {
                    let state = match http
                        .get(format!("http://127.0.0.1:{p}/placement/state"))
                        .send()
                        .await
                    {
                        Ok(r) => r
                            .json::<serde_json::Value>()
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Ok(s) = &state {
                        if s["leader"] == true {
                            leaders += 1;
                            terms.lock().unwrap().insert(s["term"].as_u64().unwrap());
                        }
                    }
                    seen.push(state.map(|s| {
                        format!(
                            "leader={} term={} quorumAckMs={}",
                            s["leader"], s["term"], s["quorumAckMs"]
                        )
                    }));
                }
                if leaders != 1 {
                    eprintln!("poll without exactly one leader: {seen:?}");
                    leaderless.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The rollout: in 10 waves over ~20 s, 20 old hosts stop and 20 new ones start.
    let mut new: Vec<(String, Host)> = Vec::new();
    for wave in 0..10 {
        let leaving: Vec<(String, Host)> = old.drain(..20).collect();
        drop(leaving);
        new.extend(spawn_hosts(wave * 20..wave * 20 + 20, "-new", &replicas));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(old.is_empty());
    let new_names = names(&new);
    let clients: Vec<Host> = new.into_iter().map(|(_, c)| c).collect();
    let v_after = converge(&clients, &new_names, Duration::from_secs(15)).await;
    settle(&clients, v_after, Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let terms = terms.lock().unwrap().clone();
    assert_eq!(
        terms,
        BTreeSet::from([term0]),
        "leadership never changed during the rollout"
    );
    assert_eq!(
        leaderless.load(Ordering::Relaxed),
        0,
        "always exactly one leader"
    );
    assert!(new_names.is_disjoint(&old_names));
    eprintln!(
        "rollout: versions {v_before} -> {v_after} ({} versions for 400 joins and leaves)",
        v_after - v_before
    );
}
