//! Actor hosts under host crashes, pauses and partitions, with single-activation oracles.
//!
//! 3 placement replicas and [`HOSTS`] actor hosts. Each host is a real
//! [`actor_host::actors::ActorRuntime`] with its internal port on a simulated listener,
//! an in-process app (the `Counter` actor) and one shared in-memory state store standing for
//! an external Redis ([`crate::mem_store`]). Workers inside every host call random actors
//! (skewed towards a few hot ones) through their own runtime, which runs the turn locally or
//! forwards it to the owner.
//!
//! A turn of `Counter/{id}` (`PUT /actors/Counter/{id}/method/inc`) records its start, sleeps a
//! few simulated milliseconds, reads the counter through the runtime, writes `n + 1` (tagged with
//! the turn's id) through the runtime's fenced `save_state`, and records its end. Like a real app
//! it keeps running when the runtime stops waiting for it (the turn is its own task).
//!
//! Oracles (see [`check`]):
//! 1. no two turns of one actor whose writes the store accepted overlap; the stricter form (all
//!    turns, however they ended) is counted and reported, not failed, because a turn frozen by a
//!    pause and then refused by the fence is what the design allows;
//! 2. every actor's accepted writes are `1, 2, 3, ...` in commit order (no lost or doubled
//!    update), the stored counter equals their number, and every increment a client saw
//!    acknowledged is one of them;
//! 3. after the faults heal, every host reaches every actor.
//!
//! Time: every host runs on its own simulated tokio runtime, one tick at a time, all on one
//! thread. "At the same instant" is judged on the global order in which the simulation executed
//! the events (a sequence number), which is exact: the shared store is touched in that order and
//! messages between hosts take at least a tick. Simulated times are printed alongside.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use actor_host::actors::activation::ActorKey;
use actor_host::actors::app_channel::{AppChannel, AppRequest, AppResponse, ChannelError};
use actor_host::actors::config::{ActorSettings, TypeSettings};
use actor_host::actors::{ActorRuntime, ActorStore, RuntimeConfig};
use async_trait::async_trait;
use axum::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use components::state::{Concurrency, Op, SetOp};
use tokio::sync::watch;

use crate::mem_store::{HostStore, MemStore};
use crate::net;

pub const REPLICAS: usize = 3;
pub const HOSTS: usize = 4;
/// Actor ids `0..ACTORS`; workers pick low ids far more often.
pub const ACTORS: u64 = 12;
const WORKERS: usize = 3;
const PLACEMENT_PORT: u16 = 5000;
/// Host incarnation `n` listens on `BASE_PORT + n`: a restarted host has a new address.
const BASE_PORT: u16 = 7000;
const LEASE: Duration = Duration::from_secs(3);
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
const FAULTS_FROM: Duration = Duration::from_secs(4);
const FAULTS_UNTIL: Duration = Duration::from_secs(17);
/// Every fault is undone here.
const HEAL_AT: Duration = Duration::from_secs(19);
/// Workers stop the random load; each host then calls every actor until it succeeds.
const VERIFY_AT: Duration = Duration::from_secs(23);
const VERIFY_UNTIL: Duration = Duration::from_secs(30);
const RUN: Duration = Duration::from_secs(31);
const TYPE: &str = "Counter";
const APP_ID: &str = "sim";

fn replica(i: usize) -> String {
    format!("r{}", i + 1)
}

fn host(i: usize) -> String {
    format!("h{}", i + 1)
}

/// A small generator for the schedule and the hosts' draws.
#[derive(Debug, Clone)]
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Self {
        Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// Freezes a host's app and store client while it is paused (the runtime's own tasks keep
/// running: turmoil cannot stop one host's clock, see the module notes in `lib.rs`).
#[derive(Clone)]
pub struct Gate {
    paused: Arc<watch::Sender<bool>>,
    /// Draws how late each frozen piece of work resumes.
    rng: Arc<Mutex<Xorshift>>,
}

impl Gate {
    fn new(seed: u64) -> Self {
        Gate {
            paused: Arc::new(watch::Sender::new(false)),
            rng: Arc::new(Mutex::new(Xorshift::new(seed))),
        }
    }

    /// Returns at once unless paused; else once the pause has ended, plus 0-40 ms: after
    /// SIGCONT a process's threads and tasks resume in no particular order, so the runtime may
    /// act (renew its lease, start turns) before a frozen turn takes its next step.
    pub async fn pass(&self) {
        if !*self.paused.borrow() {
            return;
        }
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|paused| !*paused).await;
        let late = self.rng.lock().expect("lock").range(0, 40);
        tokio::time::sleep(Duration::from_millis(late)).await;
    }

    fn set(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Its write was accepted.
    Accepted,
    /// The runtime refused its write (fence, no activation, lapsed lease).
    Refused(String),
    /// Its host crashed during the turn.
    Crashed,
}

#[derive(Debug, Clone)]
struct TurnRec {
    actor: u64,
    /// The turmoil host and the host address (incarnation) it ran on.
    node: String,
    addr: String,
    start: (u64, Duration),
    /// When the store committed its write.
    commit: Option<(u64, Duration)>,
    end: Option<(u64, Duration, Outcome)>,
}

#[derive(Debug, Clone)]
struct Commit {
    n: u64,
    turn: u64,
    seq: u64,
    writer: String,
    epoch: Option<u64>,
}

/// Everything the oracles look at, in the order the simulation executed it.
#[derive(Default)]
struct Obs {
    seq: u64,
    turns: Vec<TurnRec>,
    /// Open turns per actor, for the live overlap check.
    open: BTreeMap<u64, BTreeSet<usize>>,
    /// Overlaps seen as they happened: (turn that started, turns already running).
    live_overlaps: Vec<(usize, Vec<usize>)>,
    commits: BTreeMap<u64, Vec<Commit>>,
    /// Increments clients saw acknowledged: (actor, turn, n).
    acked: Vec<(u64, u64, u64)>,
    calls_ok: u64,
    calls_failed: u64,
    /// Error kinds seen by clients (code and the first words of the message).
    errors: BTreeMap<String, u64>,
    refused: u64,
    /// Why writes were refused.
    refusals: BTreeMap<String, u64>,
    /// (node, actor) -> reached after healing.
    verified: BTreeMap<(String, u64), Result<(), String>>,
    /// Per actor: what happened to it (turns, commits, fence claims, deactivations).
    actor_trace: BTreeMap<u64, Vec<String>>,
    /// Faults, restarts, table versions and leases.
    trace: Vec<String>,
}

impl Obs {
    fn stamp(&mut self) -> (u64, Duration) {
        self.seq += 1;
        (self.seq, turmoil::sim_elapsed().unwrap_or_default())
    }

    fn note(&mut self, actor: u64, what: String) {
        let (seq, t) = (self.seq, turmoil::sim_elapsed().unwrap_or_default());
        self.actor_trace
            .entry(actor)
            .or_default()
            .push(format!("#{seq} {:.3}s {what}", t.as_secs_f64()));
    }

    fn turn_start(&mut self, actor: u64, node: &str, addr: &str) -> usize {
        let start = self.stamp();
        let id = self.turns.len();
        let open = self.open.entry(actor).or_default();
        if !open.is_empty() {
            let others: Vec<usize> = open.iter().copied().collect();
            self.live_overlaps.push((id, others));
        }
        open.insert(id);
        self.turns.push(TurnRec {
            actor,
            node: node.to_string(),
            addr: addr.to_string(),
            start,
            commit: None,
            end: None,
        });
        self.note(actor, format!("turn {id} starts on {addr}"));
        id
    }

    fn turn_end(&mut self, id: usize, outcome: Outcome) {
        let (seq, t) = self.stamp();
        let actor = self.turns[id].actor;
        if let Some(open) = self.open.get_mut(&actor) {
            open.remove(&id);
        }
        if let Outcome::Refused(why) = &outcome {
            self.refused += 1;
            *self.refusals.entry(short(why)).or_default() += 1;
        }
        self.note(actor, format!("turn {id} ends: {outcome:?}"));
        self.turns[id].end = Some((seq, t, outcome));
    }

    /// A host crashed: its open turns end now.
    fn crashed(&mut self, node: &str) {
        let ids: Vec<usize> = self
            .open
            .values()
            .flatten()
            .copied()
            .filter(|id| self.turns[*id].node == node)
            .collect();
        for id in ids {
            self.turn_end(id, Outcome::Crashed);
        }
    }

    /// A transaction the store committed.
    fn committed(&mut self, writer: &str, ops: &[Op]) {
        let (seq, t) = self.stamp();
        let mut epoch = None;
        for op in ops {
            let Op::Set(s) = op else { continue };
            let Some(actor) = actor_of(&s.key) else {
                continue;
            };
            if s.key.ends_with("||__fence") {
                epoch = std::str::from_utf8(&s.value)
                    .ok()
                    .and_then(|v| v.parse().ok());
                if ops.len() == 1 {
                    self.note(
                        actor,
                        format!("{writer} claims the fence at epoch {epoch:?}"),
                    );
                }
            } else if s.key.ends_with("||count") {
                let Some((n, turn)) = parse_count(&s.value) else {
                    continue;
                };
                if let Some(rec) = self.turns.get_mut(turn as usize) {
                    rec.commit = Some((seq, t));
                }
                self.commits.entry(actor).or_default().push(Commit {
                    n,
                    turn,
                    seq,
                    writer: writer.to_string(),
                    epoch,
                });
                self.note(
                    actor,
                    format!("store commits n={n} from turn {turn} ({writer}, epoch {epoch:?})"),
                );
            }
        }
    }
}

/// `sim||Counter||<id>||<name>` -> id.
fn actor_of(key: &str) -> Option<u64> {
    let mut parts = key.split("||");
    let (app, ty, id) = (parts.next()?, parts.next()?, parts.next()?);
    (app == APP_ID && ty == TYPE).then_some(())?;
    id.parse().ok()
}

fn count_value(n: u64, turn: usize) -> Bytes {
    Bytes::from(format!("{{\"n\":{n},\"turn\":{turn}}}"))
}

/// `{"n":N,"turn":T}` -> (N, T).
fn parse_count(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let s = s.strip_prefix("{\"n\":")?.strip_suffix('}')?;
    let (n, turn) = s.split_once(",\"turn\":")?;
    Some((n.parse().ok()?, turn.parse().ok()?))
}

type Shared = Arc<Mutex<Obs>>;

fn lock(obs: &Shared) -> std::sync::MutexGuard<'_, Obs> {
    obs.lock().unwrap_or_else(|e| e.into_inner())
}

/// The app of one host incarnation: the `Counter` actor.
struct CounterApp {
    node: String,
    addr: String,
    runtime: OnceLock<Weak<ActorRuntime>>,
    obs: Shared,
    gate: Gate,
    rng: Mutex<Xorshift>,
}

impl CounterApp {
    fn draw(&self, lo: u64, hi: u64) -> u64 {
        self.rng.lock().expect("lock").range(lo, hi)
    }

    async fn turn(self: Arc<Self>, actor: u64) -> AppResponse {
        self.gate.pass().await;
        let id = lock(&self.obs).turn_start(actor, &self.node, &self.addr);
        tokio::time::sleep(Duration::from_millis(self.draw(2, 20))).await;
        self.gate.pass().await;
        let Some(rt) = self.runtime.get().and_then(Weak::upgrade) else {
            lock(&self.obs).turn_end(id, Outcome::Refused("runtime gone".into()));
            return answer(StatusCode::INTERNAL_SERVER_ERROR, "runtime gone");
        };
        let key = ActorKey::new(TYPE, actor.to_string());
        let n = match rt.get_state(&key, "count").await {
            Ok(Some(item)) => parse_count(&item.value).map_or(0, |(n, _)| n),
            Ok(None) => 0,
            Err(e) => {
                lock(&self.obs).turn_end(id, Outcome::Refused(format!("read: {}", e.message)));
                return answer(e.status, &e.message);
            }
        };
        self.gate.pass().await;
        let op = Op::Set(SetOp {
            key: rt.state_key(&key, "count"),
            value: count_value(n + 1, id),
            etag: None,
            concurrency: Concurrency::LastWrite,
            ttl: None,
        });
        let saved = rt.save_state(&key, vec![op]).await;
        self.gate.pass().await;
        match saved {
            Ok(()) => {
                lock(&self.obs).turn_end(id, Outcome::Accepted);
                AppResponse {
                    status: StatusCode::OK,
                    headers: HeaderMap::new(),
                    body: count_value(n + 1, id),
                }
            }
            Err(e) => {
                lock(&self.obs).turn_end(id, Outcome::Refused(e.message.clone()));
                answer(e.status, &e.message)
            }
        }
    }
}

fn answer(status: StatusCode, msg: &str) -> AppResponse {
    AppResponse {
        status,
        headers: HeaderMap::new(),
        body: Bytes::from(msg.to_string()),
    }
}

/// The app channel the runtime calls.
struct App(Arc<CounterApp>);

#[async_trait]
impl AppChannel for App {
    async fn call(&self, req: AppRequest) -> Result<AppResponse, ChannelError> {
        let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        match (req.method.clone(), parts.as_slice()) {
            (Method::PUT, ["actors", TYPE, id, "method", "inc"]) => {
                let actor: u64 = id
                    .parse()
                    .map_err(|_| ChannelError::Unreachable(format!("bad actor id {id}")))?;
                // The turn is its own task: like an app behind HTTP, it runs to its end even if
                // the runtime stops waiting for it.
                let turn = tokio::spawn(self.0.clone().turn(actor));
                turn.await
                    .map_err(|e| ChannelError::Unreachable(format!("turn task: {e}")))
            }
            (Method::DELETE, ["actors", TYPE, id]) => {
                if let Ok(actor) = id.parse::<u64>() {
                    let mut o = lock(&self.0.obs);
                    o.stamp();
                    o.note(actor, format!("{} deactivates it", self.0.addr));
                }
                Ok(answer(StatusCode::OK, ""))
            }
            _ => Ok(answer(StatusCode::NOT_FOUND, "no such method")),
        }
    }
}

/// What a run saw.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub faults: Vec<String>,
    pub turns: usize,
    pub accepted: usize,
    pub refused: u64,
    pub calls_ok: u64,
    pub calls_failed: u64,
    /// Pairs of turns of one actor that overlapped (any outcome).
    pub strict_overlaps: usize,
    /// Of those, pairs where at least one write was refused or the host crashed.
    pub strict_overlaps_refused: usize,
    /// A few of those pairs, described.
    pub overlap_samples: Vec<String>,
    pub errors: BTreeMap<String, u64>,
    pub refusals: BTreeMap<String, u64>,
    /// Faults, restarts, table versions and leases with their times: two runs of one seed
    /// should give the same.
    pub trace: Vec<String>,
    /// A hash of everything observed (every actor's history and the cluster trace), to check
    /// that a seed replays exactly.
    pub fingerprint: u64,
}

#[derive(Debug, Clone)]
enum Fault {
    Crash {
        host: usize,
        down: Duration,
    },
    Pause {
        host: usize,
        for_: Duration,
    },
    Isolate {
        host: usize,
        for_: Duration,
    },
    Split {
        a: usize,
        b: usize,
        for_: Duration,
    },
    /// A placement replica crashes (its disk survives) and restarts.
    ReplicaCrash {
        replica: usize,
        down: Duration,
    },
}

/// Link faults, counted per pair of nodes so that overlapping faults compose: a partition wins
/// over a hold (a pause), and a link heals only when no fault holds it.
#[derive(Default)]
struct Links {
    partitions: BTreeMap<(String, String), u32>,
    holds: BTreeMap<(String, String), u32>,
    state: BTreeMap<(String, String), LinkState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LinkState {
    #[default]
    Healthy,
    Held,
    Cut,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a < b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Links {
    fn change(&mut self, sim: &mut turmoil::Sim<'_>, a: &str, b: &str, cut: i32, hold: i32) {
        let p = pair(a, b);
        let bump = |m: &mut BTreeMap<(String, String), u32>, d: i32| {
            let v = m.entry(p.clone()).or_default();
            *v = v.saturating_add_signed(d);
        };
        bump(&mut self.partitions, cut);
        bump(&mut self.holds, hold);
        let want = if self.partitions[&p] > 0 {
            LinkState::Cut
        } else if self.holds[&p] > 0 {
            LinkState::Held
        } else {
            LinkState::Healthy
        };
        let was = self.state.get(&p).copied().unwrap_or_default();
        if want == was {
            return;
        }
        match want {
            LinkState::Cut => sim.partition(p.0.as_str(), p.1.as_str()),
            LinkState::Held => {
                if was == LinkState::Cut {
                    sim.repair(p.0.as_str(), p.1.as_str());
                }
                sim.hold(p.0.as_str(), p.1.as_str());
            }
            LinkState::Healthy => match was {
                LinkState::Held => sim.release(p.0.as_str(), p.1.as_str()),
                _ => sim.repair(p.0.as_str(), p.1.as_str()),
            },
        }
        self.state.insert(p, want);
    }

    fn heal_all(&mut self, sim: &mut turmoil::Sim<'_>) {
        let pairs: Vec<(String, String)> = self.state.keys().cloned().collect();
        for p in pairs {
            self.partitions.insert(p.clone(), 0);
            self.holds.insert(p.clone(), 0);
            self.change(sim, &p.0, &p.1, 0, 0);
        }
    }
}

fn others(node: &str) -> Vec<String> {
    (0..REPLICAS)
        .map(replica)
        .chain((0..HOSTS).map(host))
        .filter(|n| n != node)
        .collect()
}

/// Reverts a fault at its due time.
type Undo = Box<dyn FnOnce(&mut turmoil::Sim<'_>, &mut Links, &mut HostStates)>;

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Up {
    #[default]
    Running,
    Down,
    Paused,
}

struct HostStates {
    up: Vec<Up>,
    gates: Vec<Gate>,
    /// At most one replica is down at a time, so placement keeps a quorum.
    replicas_down: BTreeSet<usize>,
}

/// Runs one seed. `Err` names the violated invariant with the trace that shows it.
pub fn run(seed: u64) -> Result<Report, String> {
    placement::runtime::seed(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(RUN + Duration::from_secs(10))
        .tick_duration(Duration::from_millis(2))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(4))
        .build();
    let obs: Shared = Arc::new(Mutex::new(Obs::default()));
    let store = {
        let obs = obs.clone();
        MemStore::new(Some(Arc::new(move |writer: &str, ops: &[Op]| {
            lock(&obs).committed(writer, ops)
        })))
    };
    let peers: BTreeMap<u64, String> = (0..REPLICAS)
        .map(|i| (i as u64 + 1, format!("{}:{PLACEMENT_PORT}", replica(i))))
        .collect();
    for i in 0..REPLICAS {
        let db = sled::Config::new()
            .temporary(true)
            .flush_every_ms(None)
            .open()
            .map_err(|e| e.to_string())?;
        let peers = peers.clone();
        sim.host(replica(i), move || {
            let (db, peers) = (db.clone(), peers.clone());
            async move {
                let cfg = placement::server::Config {
                    id: i as u64 + 1,
                    peers,
                    data_dir: std::path::PathBuf::from("/unused"),
                    lease: LEASE,
                    coalesce: Duration::from_millis(20),
                    metadata_enabled: false,
                    dial: net::dial(),
                };
                let node = placement::server::Node::start_with_db(cfg, db, false).await?;
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PLACEMENT_PORT)).await?;
                placement::server::serve(
                    node,
                    net::Incoming::new(listener),
                    std::future::pending(),
                )
                .await?;
                Ok(())
            }
        });
    }

    let mut rng = Xorshift::new(seed);
    let settings = TypeSettings {
        idle_timeout: Duration::from_millis(rng.range(1000, 8000)),
        drain_timeout: Duration::from_millis(rng.range(300, 2000)),
        ..TypeSettings::default()
    };
    let gates: Vec<Gate> = (0..HOSTS)
        .map(|i| Gate::new(seed ^ ((i as u64 + 1) << 40)))
        .collect();
    let replicas: Vec<String> = peers.values().cloned().collect();
    for (i, gate) in gates.iter().enumerate() {
        let incarnation = Arc::new(AtomicU32::new(0));
        let (obs, store, gate, replicas, settings) = (
            obs.clone(),
            store.clone(),
            gate.clone(),
            replicas.clone(),
            settings.clone(),
        );
        sim.host(host(i), move || {
            let n = incarnation.fetch_add(1, Ordering::Relaxed) + 1;
            start_host(
                HostSpec {
                    node: host(i),
                    port: BASE_PORT + n as u16,
                    seed: seed ^ ((i as u64 + 1) << 32) ^ u64::from(n),
                    replicas: replicas.clone(),
                    settings: settings.clone(),
                },
                obs.clone(),
                store.clone(),
                gate.clone(),
            )
        });
    }
    // The simulation ends when this client does.
    sim.client("clock", async {
        tokio::time::sleep(RUN).await;
        Ok(())
    });

    // The fault schedule.
    let mut schedule: Vec<(Duration, Fault)> = Vec::new();
    let mut t = FAULTS_FROM;
    while t < FAULTS_UNTIL {
        let h = rng.range(0, HOSTS as u64) as usize;
        let fault = match rng.range(0, 9) / 2 {
            0 => Fault::Crash {
                host: h,
                down: Duration::from_millis(rng.range(300, 4000)),
            },
            // Half the pauses end near the lease, where the host's lease has lapsed but placement
            // may not have removed it yet.
            1 => Fault::Pause {
                host: h,
                for_: Duration::from_millis(if rng.range(0, 2) == 0 {
                    rng.range(500, 7000)
                } else {
                    LEASE.as_millis() as u64 + rng.range(0, 1500) - 500
                }),
            },
            2 => Fault::Isolate {
                host: h,
                for_: Duration::from_millis(rng.range(500, 6000)),
            },
            3 => Fault::Split {
                a: h,
                b: (h + 1 + rng.range(0, HOSTS as u64 - 1) as usize) % HOSTS,
                for_: Duration::from_millis(rng.range(500, 5000)),
            },
            _ => Fault::ReplicaCrash {
                replica: rng.range(0, REPLICAS as u64) as usize,
                down: Duration::from_millis(rng.range(500, 4000)),
            },
        };
        schedule.push((t, fault));
        t += Duration::from_millis(rng.range(500, 2500));
    }
    let faults: Vec<String> = schedule
        .iter()
        .map(|(t, f)| format!("{:.1}s {f:?}", t.as_secs_f64()))
        .collect();

    let mut links = Links::default();
    let mut hosts = HostStates {
        up: vec![Up::Running; HOSTS],
        gates,
        replicas_down: BTreeSet::new(),
    };
    let mut undo: Vec<(Duration, Undo)> = Vec::new();
    let mut next = 0;
    let mut healed = false;
    loop {
        let now = sim.elapsed();
        while next < schedule.len() && schedule[next].0 <= now {
            let fault = schedule[next].1.clone();
            next += 1;
            let applied = apply_fault(&mut sim, &mut links, &mut hosts, &obs, now, &fault);
            match applied {
                Some(u) => {
                    lock(&obs)
                        .trace
                        .push(format!("{:.3}s fault {fault:?}", now.as_secs_f64()));
                    undo.push(u);
                }
                None => lock(&obs).trace.push(format!(
                    "{:.3}s skipped {fault:?} (host not running, or a replica already down)",
                    now.as_secs_f64()
                )),
            }
        }
        let (due, rest): (Vec<_>, Vec<_>) = undo.into_iter().partition(|(at, _)| *at <= now);
        undo = rest;
        for (_, f) in due {
            f(&mut sim, &mut links, &mut hosts);
        }
        if !healed && now >= HEAL_AT {
            healed = true;
            for (_, f) in std::mem::take(&mut undo) {
                f(&mut sim, &mut links, &mut hosts);
            }
            links.heal_all(&mut sim);
            lock(&obs)
                .trace
                .push(format!("{:.3}s healed", now.as_secs_f64()));
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("seed {seed}: simulation error: {e}")),
        }
    }

    let o = lock(&obs);
    if let Ok(dir) = std::env::var("SIM_DUMP") {
        // Everything observed, for comparing two runs of one seed.
        let mut text = o.trace.join("\n");
        for (a, lines) in &o.actor_trace {
            text.push_str(&format!("\nactor {a}\n{}", lines.join("\n")));
        }
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let _ = std::fs::write(format!("{dir}/seed-{seed}-run-{run}.txt"), text);
    }
    let report = check(seed, &o, &faults, &store)?;
    Ok(report)
}

fn apply_fault(
    sim: &mut turmoil::Sim<'_>,
    links: &mut Links,
    hosts: &mut HostStates,
    obs: &Shared,
    now: Duration,
    fault: &Fault,
) -> Option<(Duration, Undo)> {
    match *fault {
        Fault::Crash { host: h, down } => {
            if hosts.up[h] != Up::Running {
                return None;
            }
            sim.crash(host(h));
            lock(obs).crashed(&host(h));
            hosts.up[h] = Up::Down;
            Some((
                now + down,
                Box::new(move |sim, _, hosts| {
                    sim.bounce(host(h));
                    hosts.up[h] = Up::Running;
                }),
            ))
        }
        Fault::Pause { host: h, for_ } => {
            if hosts.up[h] != Up::Running {
                return None;
            }
            hosts.gates[h].set(true);
            hosts.up[h] = Up::Paused;
            for o in others(&host(h)) {
                links.change(sim, &host(h), &o, 0, 1);
            }
            Some((
                now + for_,
                Box::new(move |sim, links, hosts| {
                    for o in others(&host(h)) {
                        links.change(sim, &host(h), &o, 0, -1);
                    }
                    hosts.gates[h].set(false);
                    hosts.up[h] = Up::Running;
                }),
            ))
        }
        Fault::Isolate { host: h, for_ } => {
            for r in (0..REPLICAS).map(replica) {
                links.change(sim, &host(h), &r, 1, 0);
            }
            Some((
                now + for_,
                Box::new(move |sim, links, _| {
                    for r in (0..REPLICAS).map(replica) {
                        links.change(sim, &host(h), &r, -1, 0);
                    }
                }),
            ))
        }
        Fault::Split { a, b, for_ } => {
            links.change(sim, &host(a), &host(b), 1, 0);
            Some((
                now + for_,
                Box::new(move |sim, links, _| links.change(sim, &host(a), &host(b), -1, 0)),
            ))
        }
        Fault::ReplicaCrash { replica: r, down } => {
            if !hosts.replicas_down.is_empty() {
                return None;
            }
            sim.crash(replica(r));
            hosts.replicas_down.insert(r);
            Some((
                now + down,
                Box::new(move |sim, _, hosts| {
                    sim.bounce(replica(r));
                    hosts.replicas_down.remove(&r);
                }),
            ))
        }
    }
}

struct HostSpec {
    node: String,
    port: u16,
    seed: u64,
    replicas: Vec<String>,
    settings: TypeSettings,
}

/// One incarnation of a host: runtime, internal service, app, workers.
async fn start_host(
    spec: HostSpec,
    obs: Shared,
    store: Arc<MemStore>,
    gate: Gate,
) -> turmoil::Result {
    let addr = format!("{}:{}", spec.node, spec.port);
    let mut rng = Xorshift::new(spec.seed);
    lock(&obs).trace.push(format!(
        "{:.3}s {addr} starts",
        turmoil::sim_elapsed().unwrap_or_default().as_secs_f64()
    ));
    let app = Arc::new(CounterApp {
        node: spec.node.clone(),
        addr: addr.clone(),
        runtime: OnceLock::new(),
        obs: obs.clone(),
        gate: gate.clone(),
        rng: Mutex::new(Xorshift::new(rng.next_u64())),
    });
    let state = HostStore {
        shared: store,
        writer: addr.clone(),
        gate: gate.clone(),
        latency: Duration::from_millis(rng.range(1, 4)),
    };
    let runtime = ActorRuntime::new(
        RuntimeConfig {
            app_id: APP_ID.into(),
            namespace: "default".into(),
            host_address: addr.clone(),
            placement: spec.replicas.clone(),
            placement_options: placement::client::Options {
                heartbeat: Duration::from_secs(1),
                dial: net::dial(),
            },
            connect: net::connect(),
            call_timeout: CALL_TIMEOUT,
        },
        Some(Arc::new(App(app.clone())) as Arc<dyn AppChannel>),
        Some(ActorStore {
            name: "statestore".into(),
            store: Arc::new(state),
        }),
    );
    let _ = app.runtime.set(Arc::downgrade(&runtime));
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", spec.port)).await?;
    runtime.start(ActorSettings {
        types: [(TYPE.to_string(), spec.settings.clone())].into(),
    });
    tokio::spawn(watch_runtime(runtime.clone(), obs.clone(), addr.clone()));
    for _ in 0..WORKERS {
        tokio::spawn(worker(
            runtime.clone(),
            obs.clone(),
            gate.clone(),
            Xorshift::new(rng.next_u64()),
        ));
    }
    tokio::spawn(verify(
        runtime.clone(),
        obs.clone(),
        gate.clone(),
        spec.node.clone(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(actor_host::actors::remote::serve_connection(
            stream,
            runtime.clone(),
            stop.clone(),
        ));
    }
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Records the host's table version and lease as they change (for traces).
async fn watch_runtime(rt: Arc<ActorRuntime>, obs: Shared, addr: String) {
    let mut last = (0, false);
    loop {
        let cur = (rt.table_version(), rt.placement_connected());
        if cur != last {
            lock(&obs).trace.push(format!(
                "{:.3}s {addr} table v{} lease {}",
                now().as_secs_f64(),
                cur.0,
                if cur.1 { "valid" } else { "lapsed" }
            ));
            last = cur;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Skewed: actor `k` with probability falling roughly as `1/(k+1)`.
fn pick(rng: &mut Xorshift) -> u64 {
    let u = rng.range(0, 1_000_000) as f64 / 1_000_000.0;
    ((ACTORS as f64 + 1.0).powf(u) - 1.0)
        .floor()
        .min(ACTORS as f64 - 1.0) as u64
}

/// Calls random actors through this host's runtime; a failed call is retried a few times.
async fn worker(rt: Arc<ActorRuntime>, obs: Shared, gate: Gate, mut rng: Xorshift) {
    while now() < VERIFY_AT {
        let actor = pick(&mut rng);
        let key = ActorKey::new(TYPE, actor.to_string());
        for attempt in 0..4 {
            gate.pass().await;
            let r = rt
                .call(&key, "method/inc", HeaderMap::new(), Bytes::new())
                .await;
            gate.pass().await;
            if record_call(&obs, actor, r).is_ok() || now() >= VERIFY_AT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.range(20, 100) << attempt)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(5, 40))).await;
    }
}

fn record_call(
    obs: &Shared,
    actor: u64,
    r: Result<AppResponse, actor_host::actors::CallError>,
) -> Result<(), String> {
    let mut o = lock(obs);
    match r {
        Ok(resp) if resp.status == StatusCode::OK => {
            o.calls_ok += 1;
            if let Some((n, turn)) = parse_count(&resp.body) {
                o.acked.push((actor, turn, n));
            }
            Ok(())
        }
        Ok(resp) => {
            o.calls_failed += 1;
            let msg = String::from_utf8_lossy(&resp.body).to_string();
            let kind = format!("app {}: {}", resp.status.as_u16(), short(&msg));
            *o.errors.entry(kind).or_default() += 1;
            Err(msg)
        }
        Err(e) => {
            o.calls_failed += 1;
            let kind = format!("{}: {}", e.code, short(&e.message));
            *o.errors.entry(kind).or_default() += 1;
            Err(e.message)
        }
    }
}

/// The first words of an error, without the parts that vary (actor ids, addresses, numbers).
fn short(msg: &str) -> String {
    msg.split_whitespace()
        .take(6)
        .map(|w| {
            if w.chars().any(|c| c.is_ascii_digit()) {
                "_"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// After healing, calls every actor from this host until each call succeeds.
async fn verify(rt: Arc<ActorRuntime>, obs: Shared, gate: Gate, node: String) {
    let wait = VERIFY_AT.saturating_sub(now());
    tokio::time::sleep(wait).await;
    for actor in 0..ACTORS {
        let key = ActorKey::new(TYPE, actor.to_string());
        let mut last = Err("not tried".to_string());
        while now() < VERIFY_UNTIL {
            gate.pass().await;
            let r = rt
                .call(&key, "method/inc", HeaderMap::new(), Bytes::new())
                .await;
            last = record_call(&obs, actor, r);
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lock(&obs).verified.insert((node.clone(), actor), last);
    }
}

/// Overlapping pairs of intervals `[from, to]` (in execution order), as indexes into `spans`.
fn overlaps(spans: &[(u64, u64, usize)]) -> Vec<(usize, usize)> {
    let mut sorted: Vec<&(u64, u64, usize)> = spans.iter().collect();
    sorted.sort();
    let mut active: Vec<&(u64, u64, usize)> = Vec::new();
    let mut out = Vec::new();
    for s in sorted {
        active.retain(|a| a.1 > s.0);
        for a in &active {
            out.push((a.2, s.2));
        }
        active.push(s);
    }
    out
}

fn check(seed: u64, o: &Obs, faults: &[String], store: &MemStore) -> Result<Report, String> {
    let fail = |what: String, actor: Option<u64>| -> String {
        let mut s = format!(
            "seed {seed}: {what}\n  calls: {} ok, {} failed; turns: {}; errors:\n",
            o.calls_ok,
            o.calls_failed,
            o.turns.len()
        );
        for (k, v) in &o.errors {
            s.push_str(&format!("    {v:5} {k}\n"));
        }
        let mut per_actor = vec![0usize; ACTORS as usize];
        for t in &o.turns {
            per_actor[t.actor as usize] += 1;
        }
        s.push_str(&format!("  turns per actor: {per_actor:?}\n  faults:\n"));
        for f in faults {
            s.push_str(&format!("    {f}\n"));
        }
        s.push_str("  cluster trace:\n");
        for l in &o.trace {
            s.push_str(&format!("    {l}\n"));
        }
        if let Some(a) = actor {
            s.push_str(&format!("  actor {a} trace:\n"));
            for l in o.actor_trace.get(&a).into_iter().flatten() {
                s.push_str(&format!("    {l}\n"));
            }
        }
        s
    };
    let describe = |id: usize| -> String {
        let t = &o.turns[id];
        format!(
            "turn {id} on {} [#{} {:.3}s .. {}] commit {}",
            t.addr,
            t.start.0,
            t.start.1.as_secs_f64(),
            t.end
                .as_ref()
                .map_or("running".to_string(), |(s, at, out)| format!(
                    "#{s} {:.3}s {out:?}",
                    at.as_secs_f64()
                )),
            t.commit.map_or("none".to_string(), |(s, at)| format!(
                "#{s} {:.3}s",
                at.as_secs_f64()
            ))
        )
    };

    // Oracle 1: turns whose write was accepted never overlap (from their start to their commit).
    let mut strict = 0;
    let mut strict_refused = 0;
    let mut samples = Vec::new();
    for actor in 0..ACTORS {
        let ids: Vec<usize> = (0..o.turns.len())
            .filter(|i| o.turns[*i].actor == actor)
            .collect();
        let accepted: Vec<(u64, u64, usize)> = ids
            .iter()
            .filter_map(|i| {
                o.turns[*i]
                    .commit
                    .map(|(c, _)| (o.turns[*i].start.0, c, *i))
            })
            .collect();
        if let Some((a, b)) = overlaps(&accepted).first() {
            return Err(fail(
                format!(
                    "two accepted turns of actor {actor} overlapped:\n  {}\n  {}",
                    describe(*a),
                    describe(*b)
                ),
                Some(actor),
            ));
        }
        // The strict form: every turn, from its start to its end (or the crash of its host).
        let all: Vec<(u64, u64, usize)> = ids
            .iter()
            .map(|i| {
                let t = &o.turns[*i];
                (t.start.0, t.end.as_ref().map_or(u64::MAX, |e| e.0), *i)
            })
            .collect();
        for (a, b) in overlaps(&all) {
            strict += 1;
            let clean = |i: usize| matches!(o.turns[i].end, Some((_, _, Outcome::Accepted)));
            let refused = !clean(a) || !clean(b);
            if refused {
                strict_refused += 1;
            }
            // A few of each kind.
            let kind = if refused { "refused" } else { "both accepted" };
            if samples
                .iter()
                .filter(|s: &&String| s.starts_with(kind))
                .count()
                < 2
            {
                samples.push(format!("{kind}: {}\n      {}", describe(a), describe(b)));
            }
        }
    }

    // Oracle 2: accepted writes count up by one, the store holds their number, acks are real.
    for actor in 0..ACTORS {
        let commits = o.commits.get(&actor).map_or(&[][..], |c| &c[..]);
        for (k, c) in commits.iter().enumerate() {
            if c.n != k as u64 + 1 {
                let prev = k.checked_sub(1).map(|p| &commits[p]);
                return Err(fail(
                    format!(
                        "actor {actor}: accepted write #{} wrote n={} (lost or doubled update): turn {} by {} epoch {:?} at #{}; previous write {:?}\n  {}\n  {}",
                        k + 1,
                        c.n,
                        c.turn,
                        c.writer,
                        c.epoch,
                        c.seq,
                        prev,
                        describe(c.turn as usize),
                        prev.map_or(String::new(), |p| describe(p.turn as usize)),
                    ),
                    Some(actor),
                ));
            }
        }
        let stored = store
            .get_now(&format!("{APP_ID}||{TYPE}||{actor}||count"))
            .and_then(|i| parse_count(&i.value))
            .map_or(0, |(n, _)| n);
        if stored != commits.len() as u64 {
            return Err(fail(
                format!(
                    "actor {actor}: the store holds {stored} but {} writes were accepted",
                    commits.len()
                ),
                Some(actor),
            ));
        }
    }
    for (actor, turn, n) in &o.acked {
        let found = o
            .commits
            .get(actor)
            .is_some_and(|cs| cs.iter().any(|c| c.turn == *turn && c.n == *n));
        if !found {
            return Err(fail(
                format!("actor {actor}: a client saw n={n} from turn {turn}, which the store never accepted"),
                Some(*actor),
            ));
        }
    }

    // Oracle 3: after healing, every host reaches every actor.
    for i in 0..HOSTS {
        for actor in 0..ACTORS {
            match o.verified.get(&(host(i), actor)) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    return Err(fail(
                        format!(
                            "after healing, {} could not call actor {actor}: {e}",
                            host(i)
                        ),
                        Some(actor),
                    ))
                }
                None => {
                    return Err(fail(
                        format!(
                            "after healing, {} never finished calling actor {actor}",
                            host(i)
                        ),
                        Some(actor),
                    ))
                }
            }
        }
    }

    let accepted: usize = o.commits.values().map(Vec::len).sum();
    // Not a trivial pass: the cluster did work.
    if accepted < 100 {
        return Err(fail(
            format!("only {accepted} writes were accepted: the cluster hardly worked"),
            None,
        ));
    }
    Ok(Report {
        seed,
        faults: faults.to_vec(),
        turns: o.turns.len(),
        accepted,
        refused: o.refused,
        calls_ok: o.calls_ok,
        calls_failed: o.calls_failed,
        strict_overlaps: strict,
        strict_overlaps_refused: strict_refused,
        overlap_samples: samples,
        errors: o.errors.clone(),
        refusals: o.refusals.clone(),
        trace: o.trace.clone(),
        fingerprint: {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            o.trace.hash(&mut h);
            o.actor_trace.hash(&mut h);
            h.finish()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_spans() {
        assert!(overlaps(&[(1, 3, 0), (3, 5, 1), (6, 9, 2)]).is_empty());
        assert_eq!(
            overlaps(&[(1, 5, 0), (2, 3, 1), (4, 9, 2)]),
            vec![(0, 1), (0, 2)]
        );
    }

    #[test]
    fn count_values_round_trip() {
        assert_eq!(parse_count(&count_value(41, 7)), Some((41, 7)));
        assert_eq!(actor_of("sim||Counter||11||count"), Some(11));
        assert_eq!(actor_of("other||Counter||11||count"), None);
    }

    #[test]
    fn skewed_picks_stay_in_range() {
        let mut rng = Xorshift::new(3);
        let mut hits = [0u32; ACTORS as usize];
        for _ in 0..10_000 {
            hits[pick(&mut rng) as usize] += 1;
        }
        assert!(hits.iter().all(|h| *h > 0));
        assert!(hits[0] > hits[ACTORS as usize - 1] * 3);
    }
}
