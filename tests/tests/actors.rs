//! The actor runtime end to end: real `tessera` hosts and placement on loopback, each host with
//! its own test app (`turn_app`), which journals every turn so that overlapping turns of one
//! actor are caught whichever hosts ran them.
//!
//! `TESSERA_ACTOR_CALLS` sets the increments per load run (default 10,000; the acceptance run
//! uses 100,000).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use e2e::{resources, unique, ActorHost, Replica};
use serde_json::Value;

fn turn_app() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_turn_app"))
}

async fn invoke(
    client: &reqwest::Client,
    base: &str,
    actor: &str,
    id: &str,
    method: &str,
    body: Value,
) -> (u16, Value) {
    let r = client
        .post(format!("{base}/v1.0/actors/{actor}/{id}/method/{method}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Every journaled turn of every app: per actor, no two turns may overlap in time. With
/// `committed_only`, turns that failed (their state write was refused or never answered) are
/// left out: a turn frozen mid-way by SIGSTOP physically outlasts its host's lease, and what
/// the runtime guarantees then is that its write is refused. Returns (turns checked, turns
/// left out that overlapped a committed one).
fn check_overlap(journals: &[PathBuf], committed_only: bool) -> (usize, usize) {
    let mut turns: HashMap<String, Vec<(u128, u128, bool, String)>> = HashMap::new();
    for j in journals {
        let text = std::fs::read_to_string(j).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() != 5 {
                continue;
            }
            turns.entry(f[0].to_string()).or_default().push((
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3] == "1",
                format!("{} (pid {})", j.display(), f[4]),
            ));
        }
    }
    let (mut total, mut excused) = (0, 0);
    for (actor, all) in turns {
        let (mut ts, failed): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|t| t.2 || !committed_only);
        ts.sort();
        total += ts.len();
        for w in ts.windows(2) {
            assert!(
                w[1].0 >= w[0].1,
                "two turns of actor {actor} overlapped: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
        excused += failed
            .iter()
            .filter(|f| ts.iter().any(|t| t.0 < f.1 && f.0 < t.1))
            .count();
    }
    (total, excused)
}

fn assert_no_overlap(journals: &[PathBuf]) -> usize {
    check_overlap(journals, false).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_calls_state_timers_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let h = ActorHost::start(turn_app(), dir.path(), "solo", "solo", &[], &[]).await;
    h.wait_hosting().await;
    let c = reqwest::Client::new();
    let base = h.url("");
    for want in 1..=5 {
        let (s, v) = invoke(&c, &base, "Counter", "a", "inc", Value::Null).await;
        assert_eq!((s, v), (200, Value::from(want)));
    }
    // The state the app saved, read back through the actor state API.
    let r = c
        .get(h.url("/v1.0/actors/Counter/a/state/count"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "5");
    let r = c
        .get(h.url("/v1.0/actors/Counter/a/state/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // Metadata reports the types and the active actor.
    let m: Value = c
        .get(h.url("/v1.0/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["actorRuntime"]["runtimeStatus"], "RUNNING");
    let counter = m["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["type"] == "Counter")
        .unwrap();
    assert_eq!(counter["count"], 1);

    // A timer fires turns on the actor until deleted.
    let r = c
        .post(h.url("/v1.0/actors/Counter/t/timers/tick"))
        .json(&serde_json::json!({"dueTime": "0s", "period": "200ms", "callback": "inc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = c
        .delete(h.url("/v1.0/actors/Counter/t/timers/tick"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let ticks: u64 = c
        .get(h.url("/v1.0/actors/Counter/t/state/count"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (4..=7).contains(&ticks),
        "5 or so ticks in 1.1 s at 200 ms, got {ticks}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after: u64 = c
        .get(h.url("/v1.0/actors/Counter/t/state/count"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(after, ticks, "no tick after the delete");
    let r = c
        .post(h.url("/v1.0/actors/Counter/t/timers/bad"))
        .json(&serde_json::json!({"dueTime": "soon", "period": "1s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "ERR_ACTOR_TIMER_CREATE"
    );

    // Bad input gets Dapr errors.
    let (s, v) = invoke(&c, &base, "Counter", "a||b", "inc", Value::Null).await;
    assert_eq!((s, v["errorCode"].as_str()), (400, Some("ERR_BAD_REQUEST")));
    let (s, v) = invoke(&c, &base, "Nobody", "x", "inc", Value::Null).await;
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (404, Some("ERR_ACTOR_NO_ADDRESS"))
    );
    let (s, v) = invoke(&c, &base, "Counter", "a", "missing", Value::Null).await;
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (500, Some("ERR_ACTOR_INVOKE_METHOD"))
    );
    assert!(v["message"].as_str().unwrap().contains("(404)"), "{v}");
    let r = c
        .put(h.url("/v1.0/actors/Counter/a/state"))
        .body("[{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .put(h.url("/v1.0/actors/Counter/a/state"))
        .json(&serde_json::json!([{"operation": "merge", "request": {"key": "k"}}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A write for an actor that is not active here is refused and counted.
    let r = c
        .put(h.url("/v1.0/actors/Counter/never/state"))
        .json(&serde_json::json!([{"operation": "upsert", "request": {"key": "k", "value": 1}}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(
        h.sidecar()
            .metric("tessera_actor_stale_writes_rejected_total")
            .await
            >= 1
    );
    assert!(assert_no_overlap(std::slice::from_ref(&h.journal)) >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reentrancy_chains_depth_and_deadlock_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = ["--actor-call-timeout".to_string(), "2s".to_string()];
    let re = ActorHost::start(
        turn_app(),
        dir.path(),
        "re",
        "re",
        &timeout,
        &[("REENTRANCY", "true")],
    )
    .await;
    let plain = ActorHost::start(
        turn_app(),
        dir.path(),
        "plain",
        "plain",
        &timeout,
        &[("SIDECAR_TIMEOUT_MS", "10000")],
    )
    .await;
    re.wait_hosting().await;
    plain.wait_hosting().await;
    let c = reqwest::Client::new();

    // A -> B -> A with reentrancy: fine.
    let (s, v) = invoke(
        &c,
        &re.url(""),
        "Chain",
        "a",
        "call",
        serde_json::json!(["b", "a"]),
    )
    .await;
    assert_eq!((s, v.clone()), (200, Value::from("done")), "{v}");
    // 32 nested entries into one actor are allowed, the 33rd is not.
    let hops = |n: usize| Value::from(vec!["a"; n]);
    let (s, v) = invoke(&c, &re.url(""), "Chain", "a", "call", hops(31)).await;
    assert_eq!(s, 200, "depth 32 is within the limit: {v}");
    let (s, v) = invoke(&c, &re.url(""), "Chain", "a", "call", hops(32)).await;
    assert_eq!(s, 500, "{v}");
    assert_eq!(v["errorCode"], "ERR_ACTOR_STACK_DEPTH", "{v}");

    // Without reentrancy the chain cannot re-enter A: a clear timeout, not a hang.
    let started = Instant::now();
    let (s, v) = invoke(
        &c,
        &plain.url(""),
        "Chain",
        "a",
        "call",
        serde_json::json!(["b", "a"]),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(s, 500, "{v}");
    assert_eq!(v["errorCode"], "ERR_ACTOR_INVOKE_METHOD", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("timed out")
            || v.to_string().contains("timed out"),
        "{v}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // And the actors are usable again afterwards.
    let (s, _) = invoke(
        &c,
        &plain.url(""),
        "Chain",
        "a",
        "call",
        serde_json::json!(["b"]),
    )
    .await;
    assert_eq!(s, 200);
}

/// Zipf(1) over `n` actor ids.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Zipf {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for k in 1..=n {
            acc += 1.0 / k as f64;
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self) -> usize {
        let u: f64 = rand::random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

#[derive(Default)]
struct LoadStats {
    ok: Vec<AtomicU64>,
    /// Attempts that failed after they may have run (the counter may include them).
    indeterminate: Vec<AtomicU64>,
    /// Calls that failed even after retries.
    failed: AtomicU64,
    retried: AtomicU64,
}

/// 64 clients make `total` increments over `actors` Zipf-skewed actors, each call sent to a
/// random host from `targets` and retried (up to `retries` times) on any error.
async fn run_load(
    targets: Arc<RwLock<Vec<String>>>,
    actors: usize,
    total: u64,
    retries: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Arc<LoadStats> {
    let stats = Arc::new(LoadStats {
        ok: (0..actors).map(|_| AtomicU64::new(0)).collect(),
        indeterminate: (0..actors).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    let zipf = Arc::new(Zipf::new(actors));
    let next = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (stats, zipf, next, client, targets, stop) = (
            stats.clone(),
            zipf.clone(),
            next.clone(),
            client.clone(),
            targets.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && next.fetch_add(1, Ordering::Relaxed) < total {
                let actor = zipf.sample();
                let mut attempt = 0;
                loop {
                    let base = {
                        let t = targets.read().unwrap();
                        t[rand::random_range(0..t.len())].clone()
                    };
                    let r = client
                        .post(format!("{base}/v1.0/actors/Counter/{actor}/method/inc"))
                        .send()
                        .await;
                    let ok = match r {
                        Ok(r) if r.status() == 200 => true,
                        Ok(_) => {
                            stats.indeterminate[actor].fetch_add(1, Ordering::Relaxed);
                            false
                        }
                        // Not connected: the request never left, so it cannot have run.
                        Err(e) if e.is_connect() => false,
                        Err(_) => {
                            stats.indeterminate[actor].fetch_add(1, Ordering::Relaxed);
                            false
                        }
                    };
                    if ok {
                        stats.ok[actor].fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    attempt += 1;
                    if attempt > retries {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stats
}

/// Reads every counter and checks it against the calls: equal to the successes, or above by
/// at most the indeterminate failures. Returns (sum of counters, successes, indeterminate).
async fn check_counters(base: &str, app_id: &str, stats: &LoadStats) -> (u64, u64, u64) {
    let c = reqwest::Client::new();
    let (mut sum, mut oks, mut ind) = (0, 0, 0);
    for (actor, ok) in stats.ok.iter().enumerate() {
        let ok = ok.load(Ordering::Relaxed);
        let indeterminate = stats.indeterminate[actor].load(Ordering::Relaxed);
        let r = c
            .get(format!("{base}/v1.0/actors/Counter/{actor}/state/count"))
            .send()
            .await
            .unwrap();
        let n: u64 = match r.status().as_u16() {
            204 => 0,
            200 => r.text().await.unwrap().parse().unwrap(),
            s => panic!("{app_id}: reading counter {actor}: {s}"),
        };
        assert!(
            n >= ok && n <= ok + indeterminate,
            "actor {actor}: counter {n}, successful increments {ok}, indeterminate failures {indeterminate}"
        );
        sum += n;
        oks += ok;
        ind += indeterminate;
    }
    (sum, oks, ind)
}

fn redis_actor_store(dir: &Path) -> PathBuf {
    resources(
        dir,
        &[(
            "actorstore.yaml",
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: actorstore\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:6379\n  - name: actorStateStore\n    value: \"true\"\n",
        )],
    )
}

fn calls() -> u64 {
    std::env::var("TESSERA_ACTOR_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

struct Cluster {
    _placement: Replica,
    hosts: Vec<ActorHost>,
    app_id: String,
    dir: tempfile::TempDir,
    /// Last, so the processes are gone before the next cluster test starts.
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// The cluster tests each load both cores; they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn cluster(lease: &str, env: &[&[(&str, &str)]; 3]) -> Cluster {
    let serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Replica::cluster(1, dir.path(), lease);
    let mut placement = replicas.remove(0);
    placement.start();
    let res = redis_actor_store(dir.path());
    let app_id = format!("turns-{}", unique());
    let extra = vec![
        "--placement-host-address".to_string(),
        placement.addr(),
        "--resources-path".to_string(),
        res.display().to_string(),
        "--actor-call-timeout".to_string(),
        "10s".to_string(),
    ];
    let mut hosts = Vec::new();
    for (i, env) in env.iter().enumerate() {
        hosts.push(
            ActorHost::start(
                turn_app(),
                dir.path(),
                &format!("host{i}"),
                &app_id,
                &extra,
                env,
            )
            .await,
        );
    }
    for h in &hosts {
        h.wait_hosting().await;
    }
    Cluster {
        _placement: placement,
        hosts,
        app_id,
        dir,
        _serial: serial,
    }
}

impl Cluster {
    fn targets(&self) -> Arc<RwLock<Vec<String>>> {
        Arc::new(RwLock::new(self.hosts.iter().map(|h| h.url("")).collect()))
    }

    fn journals(&self) -> Vec<PathBuf> {
        self.hosts.iter().map(|h| h.journal.clone()).collect()
    }
}

/// Acceptance 2: 3 hosts, 64 clients, Zipf-skewed increments over 1,000 actors: the counters
/// add up exactly and no two turns of one actor overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_activation_under_contention() {
    let c = cluster("2s", &[&[], &[], &[]]).await;
    let started = Instant::now();
    let stats = run_load(c.targets(), 1000, calls(), 0, Default::default()).await;
    let took = started.elapsed();
    let (sum, ok, ind) = check_counters(&c.hosts[0].url(""), &c.app_id, &stats).await;
    let turns = assert_no_overlap(&c.journals());
    eprintln!(
        "{} calls in {took:?}: {ok} ok, {ind} indeterminate, {} failed; counters sum {sum}; {turns} turns journaled",
        calls(),
        stats.failed.load(Ordering::Relaxed)
    );
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "no call may fail without faults"
    );
    assert_eq!(sum, ok);
    assert_eq!(ok, calls());
    let _ = &c.dir;
}

/// Acceptance 3: the same load while one host is killed with kill -9 and another is stopped
/// with SIGSTOP past its lease, then resumed. Committed turns never overlap, counters stay within
/// their indeterminate failures, the stale host's writes are refused and counted, and it rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_activation_through_kill_and_pause() {
    // Host 1's app waits for its sidecar longer than the pause, and its turns take 20 ms, so
    // turns are in flight when the host freezes and send their writes after it resumes, stale.
    let mut c = cluster(
        "2s",
        &[
            &[],
            &[("SIDECAR_TIMEOUT_MS", "20000"), ("TURN_DELAY_MS", "20")],
            &[],
        ],
    )
    .await;
    let targets = c.targets();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(run_load(targets.clone(), 1000, u64::MAX, 50, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // kill -9 host 2; its actors move once placement drops it (lease 2 s + grace).
    let dead = c.hosts[2].url("");
    targets.write().unwrap().retain(|u| *u != dead);
    c.hosts[2].sidecar.as_mut().unwrap().kill9();
    tokio::time::sleep(Duration::from_secs(6)).await;
    // SIGSTOP host 1 well past its lease, with traffic flowing through it, then resume it.
    let stale = c.hosts[1].url("");
    let pid = c.hosts[1].pid();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    targets.write().unwrap().retain(|u| *u != stale);
    tokio::time::sleep(Duration::from_secs(6)).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // It rejoins: hosting again, and serving calls.
    c.hosts[1].wait_hosting().await;
    targets.write().unwrap().push(stale);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let stats = load.await.unwrap();
    let rejected = c.hosts[1]
        .sidecar()
        .metric("tessera_actor_stale_writes_rejected_total")
        .await;
    let (sum, ok, ind) = check_counters(&c.hosts[0].url(""), &c.app_id, &stats).await;
    let (turns, frozen) = check_overlap(&c.journals(), true);
    eprintln!(
        "{ok} calls ok, {ind} indeterminate attempts, {} failed after retries, {} retries; counters sum {sum}; {turns} committed turns, none overlapping; {frozen} refused turns frozen across the pause; stale writes rejected on the paused host: {rejected}",
        stats.failed.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed)
    );
    assert!(
        rejected > 0,
        "the paused host's in-flight writes must be refused and counted\n--- host 0:\n{}\n--- host 1:\n{}",
        c.hosts[0].sidecar().logs(),
        c.hosts[1].sidecar().logs()
    );
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    // After rejoining, the paused host serves its share again.
    let (s, v) = invoke(
        &reqwest::Client::new(),
        &c.hosts[1].url(""),
        "Counter",
        "after",
        "inc",
        Value::Null,
    )
    .await;
    assert_eq!(s, 200, "{v}\n{}", c.hosts[1].sidecar().logs());
}

/// Acceptance 4: a graceful rolling restart of all 3 hosts under load: no call fails after
/// client retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_rolling_restart() {
    let mut c = cluster("2s", &[&[], &[], &[]]).await;
    let targets = c.targets();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(run_load(targets.clone(), 1000, u64::MAX, 20, stop.clone()));
    for i in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let url = c.hosts[i].url("");
        targets.write().unwrap().retain(|u| *u != url);
        let status = c.hosts[i].sidecar.as_mut().unwrap().stop();
        assert!(status.success(), "graceful stop exit status {status}");
        c.hosts[i].restart().await;
        c.hosts[i].wait_hosting().await;
        targets.write().unwrap().push(url);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let stats = load.await.unwrap();
    let (sum, ok, ind) = check_counters(&c.hosts[0].url(""), &c.app_id, &stats).await;
    let turns = assert_no_overlap(&c.journals());
    eprintln!(
        "{ok} calls ok, {ind} indeterminate attempts, {} failed, {} retries; counters sum {sum}; {turns} turns",
        stats.failed.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed)
    );
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "zero failed calls after retries"
    );
}
