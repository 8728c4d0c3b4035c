//! The scheduler service under scheduler crashes, host crashes, partitions, message loss and
//! latency, with oracles for its delivery guarantees.
//!
//! Nodes (each its own simulated process):
//! - `sched`: the real scheduler service ([`scheduler::server::Node`] with the real store,
//!   trigger loop and hub), served over simulated TCP. Its clock is the simulation's
//!   ([`SimClock`]), so every time below is simulated time. Its sled database outlives its
//!   crashes (a disk that keeps every write). Every tick the trigger loop dispatches passes
//!   through a recorder on its way to the hub; the recorder logs it and tags the tick's data
//!   with a dispatch number, so each delivery a host receives names the dispatch it came from.
//!   The loop's bound on deliveries in flight is 2, 8 or 1024, by seed (a small one makes jobs
//!   wait for each other's deliveries).
//! - `h1`..`h3`: hosts, each running the real [`scheduler::client::Client`] watch stream (app
//!   `app`; actor type `T` on all but `h3`) with a sink standing for the app: it logs every trigger as it
//!   arrives, answers after 1-40 ms, and fails 3% of first attempts.
//! - `app`: the clients: [`WORKERS`] tasks creating jobs and reminders (period 1-10 s or one
//!   shot, due 0-5 s after the request, some with a repeat count; half with Dapr's default
//!   failure policy, half retried until delivered), replacing and deleting them, through the
//!   real client's unary calls (a quarter of the creates without overwrite, so some find their
//!   key taken and must write nothing). Every create carries a fresh incarnation number in its data.
//!
//! Faults, from the seed, between [`FAULTS_FROM`] and [`FAULTS_UNTIL`] (at least one scheduler
//! crash per seed): scheduler crash and restart, host crash and restart, partition between a
//! host (or the clients) and the scheduler, message loss on a host's link (turmoil's random partitions: a lost TCP
//! segment freezes that connection for good, as a silently dead connection would), latency on a
//! host's or the clients' link. A crash is a power loss: the node's links are cut before
//! turmoil drops it. Everything is healed by [`HEAL_AT`]; the clients keep working until
//! [`WORK_UNTIL`].
//!
//! Oracles ([`check`]); "delivered" means a host received the trigger (acknowledged or not), and
//! a delivery stands for its tick and the `missed` ticks coalesced into it:
//! - (a) never early: no tick is dispatched, or received by a host, before its due time; every
//!   dispatched tick lies on its job's grid (due time + k * period, k below the repeat count)
//!   and carries the sequence number k + 1;
//! - (b) no fire after delete: no tick of an incarnation is dispatched after its delete (or its
//!   replacement by a newer create of that key) was acknowledged to the client. A trigger
//!   dispatched before the acknowledgement may still arrive after it (in flight); those are
//!   counted in the report;
//! - (c) no lost reminder, in three forms. Passed: once the trigger loop dispatches tick k of
//!   a job, every earlier tick was received by a host, unless (default policy only) the last
//!   attempt at it was made and failed; this needs no timing assumption, since the loop moves
//!   past a tick only on a host's acknowledgement or a give-up. Quiet: a tick due at a time when no fault had been in
//!   force for [`QUIET_GRACE`] (so stale sessions, black-holed connections and retries of earlier
//!   faults are over) and until [`QUIET_DEADLINE`] later, of a job whose create was acknowledged
//!   and that nobody started to delete or replace by then, is delivered within
//!   [`QUIET_DEADLINE`] ([`SLOW_QUIET_DEADLINE`] in the quarter of the seeds where 5% of the
//!   app's answers take 0.5-8 s, past the hub's ack timeout at times). Eventual: every tick of a job retried until delivered (no give-up
//!   policy) is delivered, whatever the faults when it fell due, if the job was acknowledged and
//!   still undeleted at the end of the first quiet stretch after it (ticks due in an outage are
//!   coalesced into the catch-up). Jobs with Dapr's default policy may give a tick up after four
//!   failed attempts during faults, by design; they are held to the quiet form only;
//! - (d) coalescing: a delivery covers every tick of its job due at its dispatch (nothing due is
//!   left for a second delivery), and after each scheduler restart each job gets at most one
//!   catch-up: the dispatches of the new process for ticks due before it started name at most
//!   one scheduled time per job (retries of that catch-up repeat it).
//!
//! A run is a function of its seed: turmoil's network and each node's tokio scheduler are seeded
//! (`--cfg tokio_unstable`), the clients' reconnect jitter too
//! ([`scheduler::client::seed_jitter`]), and the fault schedule and workload come from their own
//! generators. `SIM_SEED=<n>` reruns one seed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use hyper_util::rt::TokioIo;
use scheduler::backend::{Created, JobsBackend};
use scheduler::client::{Client, Registration};
use scheduler::engine::{Clock, Delivered, DeliveryError, EngineConfig, Sink, Tick};
use scheduler::hub::Hub;
use scheduler::job::{FailurePolicy, Job, JobKey, JobSpec, Target};
use scheduler::schedule::Schedule;
use scheduler::server::Node;
use scheduler::store::JobStore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::actor_sim::Xorshift;
use crate::net;

pub const HOSTS: usize = 3;
/// Client tasks creating and deleting jobs.
pub const WORKERS: usize = 6;
const SCHED: &str = "sched";
const APP: &str = "app";
const PORT: u16 = 50006;
const APP_ID: &str = "app";
const NAMESPACE: &str = "default";
const ACTOR_TYPE: &str = "T";
/// How long the hub waits for a host's acknowledgement (the service's default is 30 s).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client call keeps trying while the scheduler is unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
pub const FAULTS_FROM: Duration = Duration::from_secs(4);
pub const FAULTS_UNTIL: Duration = Duration::from_secs(32);
/// Every fault is undone by now.
pub const HEAL_AT: Duration = Duration::from_secs(38);
/// The clients stop creating and deleting.
pub const WORK_UNTIL: Duration = Duration::from_secs(58);
/// The end of the simulation.
pub const RUN: Duration = Duration::from_secs(62);
/// How long after a fault ends the system may still be recovering from it: black-holed
/// connections are noticed by HTTP/2 keepalive (5 s + 5 s), an unacknowledged delivery fails
/// after [`ACK_TIMEOUT`] and is retried a second later, hosts reconnect within 2 s.
pub const QUIET_GRACE: Duration = Duration::from_secs(14);
/// In quiet times a due tick is delivered within this (a first attempt the app fails is
/// retried after 1 s).
pub const QUIET_DEADLINE: Duration = Duration::from_millis(2500);
/// The same with a slow app: a tick waits for the job's previous delivery, which the hub may
/// give up on only after [`ACK_TIMEOUT`], and retries a second later.
pub const SLOW_QUIET_DEADLINE: Duration = Duration::from_millis(7000);
/// Ticks are checked up to here (later ones may not have had their time).
const CHECK_UNTIL: Duration = Duration::from_millis(61_000);
/// The trigger loop's in-flight bound, one per seed.
const IN_FLIGHT: [usize; 3] = [2, 8, 1024];
/// The start of the system is not a fault, but hosts need a moment to connect.
const STARTUP: Duration = Duration::from_secs(1);

/// The wall-clock time the simulation starts at.
fn base() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).unwrap_or_default()
}

fn at(d: Duration) -> DateTime<Utc> {
    base() + TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

fn since_start(t: DateTime<Utc>) -> Duration {
    (t - base()).to_std().unwrap_or_default()
}

/// Simulated time since the simulation started, on the calling node.
fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn host(i: usize) -> String {
    format!("h{}", i + 1)
}

/// The engine's clock: the simulation's time from a fixed start date.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimClock;

impl Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        at(turmoil::sim_elapsed().expect("the scheduler's clock is read inside the simulation"))
    }

    async fn sleep_until(&self, deadline: DateTime<Utc>) {
        let left = deadline - self.now();
        if left > TimeDelta::zero() {
            tokio::time::sleep(left.to_std().unwrap_or_default()).await;
        }
    }
}

/// One create request and what became of that job.
#[derive(Debug, Clone)]
struct Inc {
    key: JobKey,
    due: DateTime<Utc>,
    /// `None`: one shot.
    period: Option<Duration>,
    repeats: Option<u32>,
    /// Retried until delivered (no give-up policy).
    forever: bool,
    /// When the create was acknowledged (`None`: it failed, so it may or may not exist).
    created: Option<Duration>,
    /// When a delete or a replacement of it was first sent.
    end_sent: Option<Duration>,
    /// When a delete or a replacement of it was acknowledged.
    ended: Option<Duration>,
}

impl Inc {
    /// The scheduled time of tick `k`, if the job has one.
    fn tick(&self, k: u64) -> Option<DateTime<Utc>> {
        if self.repeats.is_some_and(|r| k >= u64::from(r)) {
            return None;
        }
        match self.period {
            None if k == 0 => Some(self.due),
            None => None,
            Some(p) => Some(self.due + TimeDelta::from_std(p * u32::try_from(k).ok()?).ok()?),
        }
    }

    /// Which tick `t` is.
    fn index(&self, t: DateTime<Utc>) -> Option<u64> {
        let off = (t - self.due).to_std().ok()?;
        let k = match self.period {
            None => (off.is_zero()).then_some(0)?,
            Some(p) => {
                let (off, p) = (off.as_nanos(), p.as_nanos());
                (off % p == 0).then_some(u64::try_from(off / p).ok()?)?
            }
        };
        self.tick(k).map(|_| k)
    }
}

/// A tick the trigger loop handed to the hub.
#[derive(Debug, Clone)]
struct Dispatch {
    inc: usize,
    /// The scheduler process (1, 2, ...) that dispatched it.
    life: u32,
    at: Duration,
    scheduled: DateTime<Utc>,
    missed: u32,
    attempt: u32,
    sequence: u32,
}

/// A trigger a host received.
#[derive(Debug, Clone)]
struct Receipt {
    dispatch: usize,
    host: usize,
    at: Duration,
    scheduled_ms: i64,
    missed: u32,
    attempt: u32,
    sequence: u32,
}

/// Everything the oracles look at.
#[derive(Default)]
struct Obs {
    incs: Vec<Inc>,
    dispatches: Vec<Dispatch>,
    receipts: Vec<Receipt>,
    /// Ticks whose data did not name an incarnation or a dispatch (never expected).
    garbled: Vec<String>,
    /// Client calls that failed, by kind.
    errors: BTreeMap<String, u64>,
    creates: u64,
    deletes: u64,
    /// Creates without overwrite that found the key taken.
    already_exists: u64,
    /// The clients' calls and their outcomes, for failure reports.
    ops: Vec<(Duration, JobKey, String)>,
}

impl Obs {
    /// What the clients did with `key`, one line per call.
    fn history(&self, key: &JobKey) -> String {
        self.ops
            .iter()
            .filter(|(_, k, _)| k == key)
            .map(|(t, _, what)| format!("\n    {} {what}", secs(*t)))
            .collect()
    }
}

type Shared = Arc<Mutex<Obs>>;

fn lock(obs: &Shared) -> std::sync::MutexGuard<'_, Obs> {
    obs.lock().unwrap_or_else(|e| e.into_inner())
}

/// `"i<inc>"` or `"i<inc>/d<dispatch>"` (JSON strings).
fn parse_data(data: &[u8]) -> Option<(usize, Option<usize>)> {
    let s = std::str::from_utf8(data).ok()?;
    let s = s.strip_prefix("\"i")?.strip_suffix('"')?;
    match s.split_once("/d") {
        Some((i, d)) => Some((i.parse().ok()?, Some(d.parse().ok()?))),
        None => Some((s.parse().ok()?, None)),
    }
}

/// Between the trigger loop and the hub: logs each dispatch and tags the tick with its number.
struct Recorder {
    hub: Arc<Hub>,
    obs: Shared,
    life: u32,
}

impl Sink for Recorder {
    fn deliver(
        &self,
        mut tick: Tick,
    ) -> impl Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
        let mut o = lock(&self.obs);
        match parse_data(&tick.data) {
            Some((inc, None)) if inc < o.incs.len() => {
                let n = o.dispatches.len();
                o.dispatches.push(Dispatch {
                    inc,
                    life: self.life,
                    at: now(),
                    scheduled: tick.scheduled,
                    missed: tick.missed,
                    attempt: tick.attempt,
                    sequence: tick.sequence,
                });
                tick.data = Arc::from(format!("\"i{inc}/d{n}\"").into_bytes());
            }
            _ => {
                let what = format!(
                    "dispatched {} with data {:?}",
                    tick.key,
                    String::from_utf8_lossy(&tick.data)
                );
                o.garbled.push(what);
            }
        }
        drop(o);
        self.hub.deliver(tick)
    }
}

/// The app behind a host: logs each trigger on arrival, answers a little later.
struct AppSink {
    host: usize,
    /// 5% of the answers take 0.5-8 s (past the hub's ack timeout, at times).
    slow: bool,
    obs: Shared,
    rng: Mutex<Xorshift>,
}

impl Sink for AppSink {
    fn deliver(
        &self,
        tick: Tick,
    ) -> impl Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
        let mut o = lock(&self.obs);
        match parse_data(&tick.data) {
            Some((_, Some(d))) if d < o.dispatches.len() => o.receipts.push(Receipt {
                dispatch: d,
                host: self.host,
                at: now(),
                scheduled_ms: tick.scheduled.timestamp_millis(),
                missed: tick.missed,
                attempt: tick.attempt,
                sequence: tick.sequence,
            }),
            _ => {
                let what = format!(
                    "h{} received {} with data {:?}",
                    self.host + 1,
                    tick.key,
                    String::from_utf8_lossy(&tick.data)
                );
                o.garbled.push(what);
            }
        }
        drop(o);
        let (delay, fail) = {
            let mut r = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            let delay = if self.slow && r.range(0, 100) < 5 {
                r.range(500, 8000)
            } else {
                r.range(1, 40)
            };
            (delay, tick.attempt == 0 && r.range(0, 100) < 3)
        };
        async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            if fail {
                Err(DeliveryError::Failed("the app answered 500".into()))
            } else {
                Ok(Delivered::default())
            }
        }
    }
}

/// A lazily connected channel to the scheduler over simulated TCP, dialed with the client's own
/// settings (keepalive included).
fn channel(addr: &str) -> Result<Channel, Box<dyn std::error::Error>> {
    let target = addr.to_string();
    Ok(
        scheduler::client::endpoint(addr)?.connect_with_connector_lazy(tower::service_fn(
            move |_uri| {
                let target = target.clone();
                async move {
                    turmoil::net::TcpStream::connect(target)
                        .await
                        .map(TokioIo::new)
                }
            },
        )),
    )
}

fn sched_addr() -> String {
    format!("{SCHED}:{PORT}")
}

fn client() -> Result<Arc<Client>, Box<dyn std::error::Error>> {
    let addr = sched_addr();
    let ch = channel(&addr)?;
    Ok(Client::with_channels(vec![(addr, ch)], CALL_TIMEOUT)?)
}

#[derive(Debug, Clone)]
enum Fault {
    SchedCrash {
        down: Duration,
    },
    HostCrash {
        host: usize,
        down: Duration,
    },
    /// Between a host, or the clients (`host: None`), and the scheduler.
    Partition {
        host: Option<usize>,
        for_: Duration,
    },
    Lossy {
        host: usize,
        per_mille: u64,
        for_: Duration,
    },
    /// On a host's link, or the clients' (`host: None`).
    Latency {
        host: Option<usize>,
        ms: u64,
        for_: Duration,
    },
}

/// Link state: partitions and crashed nodes cut links (counted, so faults compose).
#[derive(Default)]
struct Links {
    cuts: BTreeMap<String, u32>,
    down: BTreeSet<String>,
}

impl Links {
    /// Sets the link between `node` and the scheduler to what the faults in force say.
    fn sync(&self, sim: &mut turmoil::Sim<'_>, node: &str) {
        let cut = self.down.contains(node)
            || self.down.contains(SCHED)
            || self.cuts.get(node).is_some_and(|n| *n > 0);
        if cut {
            sim.partition(node, SCHED);
        } else {
            sim.repair(node, SCHED);
        }
    }

    fn sync_all(&self, sim: &mut turmoil::Sim<'_>) {
        for n in (0..HOSTS).map(host).chain([APP.to_string()]) {
            self.sync(sim, &n);
        }
    }
}

/// What a run saw.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    /// The trigger loop's bound on deliveries in flight.
    pub max_in_flight: usize,
    /// Whether the app answered slowly at times.
    pub slow_app: bool,
    pub faults: Vec<String>,
    pub creates: u64,
    pub deletes: u64,
    pub already_exists: u64,
    pub dispatches: usize,
    pub receipts: usize,
    /// Ticks held to the quiet form of oracle (c), and to the eventual form.
    pub quiet_ticks: usize,
    pub eventual_ticks: usize,
    /// Ticks the trigger loop moved past, each of which must have been received (or given up
    /// after its last attempt, default policy).
    pub passed_ticks: usize,
    pub sched_restarts: usize,
    /// Catch-up dispatches after scheduler restarts (jobs with ticks due while it was down).
    pub catch_ups: usize,
    /// Largest `missed` count a delivery carried.
    pub max_missed: u32,
    /// Triggers that arrived after their job's delete was acknowledged, dispatched before it.
    pub in_flight_after_delete: usize,
    pub errors: BTreeMap<String, u64>,
    /// A hash of every dispatch and receipt, to check that a seed replays exactly.
    pub fingerprint: u64,
}

/// Runs one seed. `Err` names the violated invariant.
pub fn run(seed: u64) -> Result<Report, String> {
    scheduler::client::seed_jitter(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(RUN + Duration::from_secs(5))
        .tick_duration(Duration::from_millis(2))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(4))
        .build();
    let obs: Shared = Arc::new(Mutex::new(Obs::default()));
    // A small in-flight table makes jobs wait for each other's deliveries.
    // A quarter of the seeds have a slow app (see `AppSink`), with an unbounded table: slow
    // answers would hold a small one for seconds at a time.
    let slow = seed % 4 == 3;
    let max_in_flight = if slow {
        IN_FLIGHT[2]
    } else {
        IN_FLIGHT[(Xorshift::new(seed ^ 0x1F11).next_u64() % 3) as usize]
    };
    let deadline = if slow {
        SLOW_QUIET_DEADLINE
    } else {
        QUIET_DEADLINE
    };

    // The scheduler: its database is its disk and outlives its crashes.
    let db = sled::Config::new()
        .temporary(true)
        .flush_every_ms(None)
        .open()
        .map_err(|e| e.to_string())?;
    {
        let obs = obs.clone();
        let lives = Arc::new(AtomicU32::new(0));
        sim.host(SCHED, move || {
            let life = lives.fetch_add(1, Ordering::Relaxed) + 1;
            let (db, obs) = (db.clone(), obs.clone());
            async move {
                let store = Arc::new(JobStore::on_db(db, false)?);
                let node = Node::start_on(
                    store,
                    Arc::new(SimClock),
                    ACK_TIMEOUT,
                    EngineConfig {
                        max_in_flight,
                        ..EngineConfig::default()
                    },
                    |hub| Recorder { hub, obs, life },
                );
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
                scheduler::server::serve_incoming(
                    node,
                    net::Incoming::new(listener),
                    std::future::pending(),
                )
                .await?;
                Ok(())
            }
        });
    }

    for i in 0..HOSTS {
        let obs = obs.clone();
        let lives = Arc::new(AtomicU32::new(0));
        sim.host(host(i), move || {
            let life = lives.fetch_add(1, Ordering::Relaxed) + 1;
            let obs = obs.clone();
            async move {
                let client = client()?;
                let sink = Arc::new(AppSink {
                    host: i,
                    slow,
                    obs,
                    rng: Mutex::new(Xorshift::new(
                        seed ^ ((i as u64 + 1) << 40) ^ u64::from(life),
                    )),
                });
                client.watch(
                    Registration {
                        app_id: APP_ID.into(),
                        namespace: NAMESPACE.into(),
                        // The last host takes app jobs only.
                        actor_types: if i + 1 < HOSTS {
                            vec![ACTOR_TYPE.into()]
                        } else {
                            Vec::new()
                        },
                        host_name: format!("{}#{life}", host(i)),
                    },
                    sink,
                    CancellationToken::new(),
                );
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }

    // The clients; the simulation ends when they do.
    {
        let obs = obs.clone();
        sim.client(APP, async move {
            let client = client()?;
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..WORKERS {
                tasks.spawn(worker(
                    w,
                    client.clone(),
                    obs.clone(),
                    Xorshift::new(seed ^ ((w as u64 + 1) << 48)),
                ));
            }
            tokio::time::sleep(RUN).await;
            tasks.abort_all();
            Ok(())
        });
    }

    // The fault schedule, with at least one scheduler crash.
    let mut rng = Xorshift::new(seed ^ 0x5EED_FA17);
    let mut schedule: Vec<(Duration, Fault)> = Vec::new();
    let mut t = FAULTS_FROM;
    while t < FAULTS_UNTIL {
        let h = rng.range(0, HOSTS as u64) as usize;
        let fault = match rng.range(0, 10) {
            0 | 1 => Fault::SchedCrash {
                down: Duration::from_millis(rng.range(300, 6000)),
            },
            2 | 3 => Fault::HostCrash {
                host: h,
                down: Duration::from_millis(rng.range(300, 8000)),
            },
            4 | 5 => Fault::Partition {
                host: (rng.range(0, 5) > 0).then_some(h),
                for_: Duration::from_millis(rng.range(500, 8000)),
            },
            6 | 7 => Fault::Lossy {
                host: h,
                per_mille: rng.range(2, 30),
                for_: Duration::from_millis(rng.range(500, 6000)),
            },
            _ => Fault::Latency {
                host: (rng.range(0, 4) > 0).then_some(h),
                ms: rng.range(20, 400),
                for_: Duration::from_millis(rng.range(1000, 8000)),
            },
        };
        schedule.push((t, fault));
        t += Duration::from_millis(rng.range(1000, 4000));
    }
    if !schedule
        .iter()
        .any(|(_, f)| matches!(f, Fault::SchedCrash { .. }))
    {
        let i = rng.range(0, schedule.len() as u64) as usize;
        schedule[i].1 = Fault::SchedCrash {
            down: Duration::from_millis(rng.range(300, 6000)),
        };
    }
    let faults: Vec<String> = schedule
        .iter()
        .map(|(t, f)| format!("{} {f:?}", secs(*t)))
        .collect();

    // Undo actions by due time, and when each fault was in force.
    type Undo = Box<dyn FnOnce(&mut turmoil::Sim<'_>, &mut Links)>;
    let mut undo: Vec<(Duration, usize, Undo)> = Vec::new();
    let mut active: Vec<(Duration, Option<Duration>)> = Vec::new();
    let mut restarts: Vec<(Duration, u32)> = Vec::new();
    let mut sched_life = 1u32;
    let mut links = Links::default();
    let mut next = 0;
    loop {
        let now = sim.elapsed();
        while next < schedule.len() && schedule[next].0 <= now {
            let fault = schedule[next].1.clone();
            next += 1;
            let u: Option<(Duration, Undo)> = match fault {
                Fault::SchedCrash { down } if !links.down.contains(SCHED) => {
                    links.down.insert(SCHED.into());
                    links.sync_all(&mut sim);
                    sim.crash(SCHED);
                    Some((
                        now + down,
                        Box::new(|sim, links| {
                            links.down.remove(SCHED);
                            links.sync_all(sim);
                            sim.bounce(SCHED);
                        }),
                    ))
                }
                Fault::HostCrash { host: h, down } if !links.down.contains(&host(h)) => {
                    links.down.insert(host(h));
                    links.sync(&mut sim, &host(h));
                    sim.crash(host(h));
                    Some((
                        now + down,
                        Box::new(move |sim, links| {
                            links.down.remove(&host(h));
                            links.sync(sim, &host(h));
                            sim.bounce(host(h));
                        }),
                    ))
                }
                Fault::Partition { host: h, for_ } => {
                    let node = h.map_or(APP.to_string(), host);
                    *links.cuts.entry(node.clone()).or_default() += 1;
                    links.sync(&mut sim, &node);
                    Some((
                        now + for_,
                        Box::new(move |sim, links| {
                            if let Some(n) = links.cuts.get_mut(&node) {
                                *n = n.saturating_sub(1);
                            }
                            links.sync(sim, &node);
                        }),
                    ))
                }
                Fault::Lossy {
                    host: h,
                    per_mille,
                    for_,
                } => {
                    sim.set_link_fail_rate(host(h), SCHED, per_mille as f64 / 1000.0);
                    Some((
                        now + for_,
                        Box::new(move |sim, links| {
                            sim.set_link_fail_rate(host(h), SCHED, 0.0);
                            // A random partition may still be in force: end it.
                            links.sync(sim, &host(h));
                        }),
                    ))
                }
                Fault::Latency { host: h, ms, for_ } => {
                    let node = h.map_or(APP.to_string(), host);
                    sim.set_link_latency(node.as_str(), SCHED, Duration::from_millis(ms));
                    Some((
                        now + for_,
                        Box::new(move |sim, _| {
                            sim.set_link_latency(node.as_str(), SCHED, Duration::from_millis(1));
                            sim.set_link_max_message_latency(
                                node.as_str(),
                                SCHED,
                                Duration::from_millis(4),
                            );
                        }),
                    ))
                }
                _ => None,
            };
            if let Some((when, f)) = u {
                active.push((now, None));
                undo.push((when.min(HEAL_AT), active.len() - 1, f));
            }
        }
        let (due, rest): (Vec<_>, Vec<_>) = undo.into_iter().partition(|(t, _, _)| *t <= now);
        undo = rest;
        for (_, i, f) in due {
            let bounced = links.down.contains(SCHED);
            f(&mut sim, &mut links);
            if bounced && !links.down.contains(SCHED) {
                sched_life += 1;
                restarts.push((now, sched_life));
            }
            active[i].1 = Some(now);
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("seed {seed}: simulation error: {e}")),
        }
    }

    let o = lock(&obs);
    let mut report =
        check(seed, &o, &active, &restarts, deadline, faults.clone()).map_err(|e| {
            format!(
                "{e}\n  faults: {faults:?}\n  scheduler restarts at: {:?}",
                restarts.iter().map(|(t, _)| secs(*t)).collect::<Vec<_>>()
            )
        })?;
    report.max_in_flight = max_in_flight;
    report.slow_app = slow;
    Ok(report)
}

/// One client task: creates, replaces and deletes jobs of its own keys, one call at a time.
async fn worker(w: usize, client: Arc<Client>, obs: Shared, mut rng: Xorshift) {
    // Key name -> (target, incarnations that may exist).
    let mut keys: BTreeMap<String, (Target, Vec<usize>)> = BTreeMap::new();
    let mut n = 0;
    while now() < WORK_UNTIL {
        tokio::time::sleep(Duration::from_millis(rng.range(100, 1200))).await;
        let roll = rng.range(0, 10);
        if keys.len() < 4 || roll < 6 {
            // Create: a new key, or a replacement of an existing one.
            let name = if keys.is_empty() || roll < 4 {
                n += 1;
                format!("w{w}-k{n}")
            } else {
                let i = rng.range(0, keys.len() as u64) as usize;
                keys.keys().nth(i).cloned().unwrap_or_default()
            };
            let target = match keys.get(&name) {
                Some((t, _)) => t.clone(),
                None if rng.range(0, 2) == 0 => Target::ActorReminder {
                    app_id: Some(APP_ID.into()),
                    namespace: NAMESPACE.into(),
                    actor_type: ACTOR_TYPE.into(),
                    actor_id: rng.range(0, 8).to_string(),
                },
                None => Target::App {
                    app_id: APP_ID.into(),
                    namespace: NAMESPACE.into(),
                },
            };
            let start = now();
            // Whole milliseconds: triggers carry the scheduled time in milliseconds.
            let due_ms = start.as_millis() as u64 + 1 + rng.range(0, 5000);
            let due = at(Duration::from_millis(due_ms));
            let period =
                (rng.range(0, 10) < 8).then(|| Duration::from_millis(rng.range(10, 101) * 100));
            let repeats = period
                .filter(|_| rng.range(0, 4) == 0)
                .map(|_| rng.range(2, 8) as u32);
            let forever = rng.range(0, 2) == 0;
            // Reminders always overwrite; a Jobs API create may not.
            let overwrite = rng.range(0, 4) > 0;
            let job = Job {
                name: name.clone(),
                target: target.clone(),
                schedule: period.map(Schedule::Every),
                due_time: Some(due),
                created_at: at(start),
                repeats,
                expiry: None,
                data: Vec::new(),
                failure_policy: if forever {
                    FailurePolicy::Constant {
                        interval: Duration::from_secs(1),
                        max_retries: None,
                    }
                } else {
                    FailurePolicy::default()
                },
                spec: JobSpec {
                    due_time: Some(due.to_rfc3339()),
                    period: period.map(|p| format!("{}ms", p.as_millis())),
                    ..JobSpec::default()
                },
            };
            let (inc, older) = {
                let mut o = lock(&obs);
                o.creates += 1;
                let inc = o.incs.len();
                o.incs.push(Inc {
                    key: job.key(),
                    due,
                    period,
                    repeats,
                    forever,
                    created: None,
                    end_sent: None,
                    ended: None,
                });
                let older = keys.get(&name).map(|(_, v)| v.clone()).unwrap_or_default();
                if overwrite {
                    for i in &older {
                        o.incs[*i].end_sent.get_or_insert(start);
                    }
                }
                (inc, older)
            };
            let job = Job {
                data: format!("\"i{inc}\"").into_bytes(),
                ..job
            };
            let key = job.key();
            let r = client.create(job, overwrite).await;
            let t = now();
            let mut o = lock(&obs);
            o.ops.push((
                t,
                key,
                format!(
                    "create of incarnation {inc} (overwrite {overwrite}, sent at {}): {r:?}",
                    secs(start)
                ),
            ));
            let entry = keys.entry(name).or_insert((target, Vec::new()));
            match r {
                Ok(Created::Stored { .. }) => {
                    o.incs[inc].created = Some(t);
                    // Replaced, or (without overwrite) gone already.
                    for i in older {
                        o.incs[i].ended.get_or_insert(t);
                    }
                    entry.1 = vec![inc];
                }
                Ok(Created::AlreadyExists) if !overwrite => {
                    // Nothing was written: this incarnation must never fire.
                    o.incs[inc].end_sent = Some(start);
                    o.incs[inc].ended = Some(start);
                    o.already_exists += 1;
                }
                Ok(other) => {
                    *o.errors.entry(format!("create: {other:?}")).or_default() += 1;
                    entry.1.push(inc);
                }
                Err(e) => {
                    *o.errors
                        .entry(format!("create: {}", short(&e.to_string())))
                        .or_default() += 1;
                    entry.1.push(inc);
                }
            }
        } else {
            let i = rng.range(0, keys.len() as u64) as usize;
            let Some(name) = keys.keys().nth(i).cloned() else {
                continue;
            };
            let (target, incs) = keys[&name].clone();
            let key = match &target {
                Target::App { app_id, namespace } => JobKey::app(namespace, app_id, &name),
                Target::ActorReminder {
                    namespace,
                    actor_type,
                    actor_id,
                    ..
                } => JobKey::reminder(namespace, actor_type, actor_id, &name),
            };
            let start = now();
            {
                let mut o = lock(&obs);
                o.deletes += 1;
                for i in &incs {
                    o.incs[*i].end_sent.get_or_insert(start);
                }
            }
            let r = client.delete(&key).await;
            let t = now();
            let mut o = lock(&obs);
            o.ops.push((
                t,
                key.clone(),
                format!(
                    "delete of incarnations {incs:?} (sent at {}): {r:?}",
                    secs(start)
                ),
            ));
            match r {
                Ok(_) => {
                    for i in incs {
                        o.incs[i].ended.get_or_insert(t);
                    }
                    keys.remove(&name);
                }
                Err(e) => {
                    *o.errors
                        .entry(format!("delete: {}", short(&e.to_string())))
                        .or_default() += 1;
                }
            }
        }
    }
}

/// The first words of an error, to count errors by kind.
fn short(s: &str) -> String {
    s.split_whitespace().take(6).collect::<Vec<_>>().join(" ")
}

/// Whether no fault was in force during `[from, to]` (nor, for the grace, shortly before).
fn quiet(active: &[(Duration, Option<Duration>)], from: Duration, to: Duration) -> bool {
    if from < STARTUP {
        return false;
    }
    let from = from.saturating_sub(QUIET_GRACE);
    active
        .iter()
        .all(|(s, e)| *s > to || e.is_some_and(|e| e < from))
}

/// The end of the first quiet stretch of `deadline` at or after `t`.
fn next_quiet(
    active: &[(Duration, Option<Duration>)],
    t: Duration,
    deadline: Duration,
) -> Duration {
    let mut x = t.max(STARTUP);
    loop {
        if quiet(active, x, x + deadline) {
            return x + deadline;
        }
        // The latest end of a fault in force around x, plus the grace.
        let blocking = active
            .iter()
            .filter(|(s, e)| *s <= x + deadline && e.is_none_or(|e| e + QUIET_GRACE >= x))
            .map(|(_, e)| e.unwrap_or(RUN) + QUIET_GRACE + Duration::from_millis(1))
            .max()
            .unwrap_or(x + Duration::from_millis(1));
        x = blocking.max(x + Duration::from_millis(1));
    }
}

fn check(
    seed: u64,
    o: &Obs,
    active: &[(Duration, Option<Duration>)],
    restarts: &[(Duration, u32)],
    deadline: Duration,
    faults: Vec<String>,
) -> Result<Report, String> {
    if let Some(g) = o.garbled.first() {
        return Err(format!("seed {seed}: a tick with foreign data: {g}"));
    }
    let ms = |t: DateTime<Utc>| secs(since_start(t));
    let mut max_missed = 0;
    // (a) never early, on the grid, numbered; (b) nothing after an acknowledged delete; (d)
    // every due tick folded in.
    for (n, d) in o.dispatches.iter().enumerate() {
        let inc = &o.incs[d.inc];
        let Some(k) = inc.index(d.scheduled) else {
            return Err(format!(
                "seed {seed}: dispatch {n} of incarnation {} ({}) at {} is for {}, not one of its ticks (due {}, period {:?}, repeats {:?})",
                d.inc, inc.key, secs(d.at), ms(d.scheduled), ms(inc.due), inc.period, inc.repeats
            ));
        };
        if u64::from(d.sequence) != k + 1 {
            return Err(format!(
                "seed {seed}: dispatch {n} of incarnation {} ({}) for tick {k} at {} carries sequence {}",
                d.inc, inc.key, ms(d.scheduled), d.sequence
            ));
        }
        let last_k = k + u64::from(d.missed);
        let Some(last) = inc.tick(last_k) else {
            return Err(format!(
                "seed {seed}: dispatch {n} of incarnation {} ({}) folds {} ticks after tick {k}, past its {:?} repeats",
                d.inc, inc.key, d.missed, inc.repeats
            ));
        };
        if at(d.at) < last {
            return Err(format!(
                "seed {seed}: EARLY: dispatch {n} of incarnation {} ({}) at {} stands for ticks {k}..={last_k}, the last due at {}",
                d.inc, inc.key, secs(d.at), ms(last)
            ));
        }
        if let Some(next) = inc.tick(last_k + 1) {
            if next <= at(d.at) {
                return Err(format!(
                    "seed {seed}: NOT COALESCED: dispatch {n} of incarnation {} ({}) at {} stands for ticks {k}..={last_k}, but tick {} was due already at {}",
                    d.inc, inc.key, secs(d.at), last_k + 1, ms(next)
                ));
            }
        }
        if let Some(e) = inc.ended {
            if d.at > e {
                return Err(format!(
                    "seed {seed}: FIRED AFTER DELETE: dispatch {n} of incarnation {} ({}) at {} (tick {k}, attempt {}, scheduler process {}), but its delete or replacement was acknowledged at {}",
                    d.inc, inc.key, secs(d.at), d.attempt, d.life, secs(e)
                ) + &o.history(&inc.key));
            }
        }
    }
    // Receipts: what the host got is what was dispatched, and not early either.
    let mut covered: Vec<BTreeMap<u64, Duration>> = vec![BTreeMap::new(); o.incs.len()];
    let mut in_flight_after_delete = 0;
    for r in &o.receipts {
        let d = &o.dispatches[r.dispatch];
        let inc = &o.incs[d.inc];
        if (r.scheduled_ms, r.missed, r.attempt, r.sequence)
            != (
                d.scheduled.timestamp_millis(),
                d.missed,
                d.attempt,
                d.sequence,
            )
        {
            return Err(format!(
                "seed {seed}: h{} received {r:?}, which differs from dispatch {d:?}",
                r.host + 1
            ));
        }
        let k = inc.index(d.scheduled).unwrap_or_default();
        let last_k = k + u64::from(d.missed);
        let last = inc.tick(last_k).unwrap_or(d.scheduled);
        if at(r.at) < last {
            return Err(format!(
                "seed {seed}: EARLY: h{} received incarnation {} ({}) at {}, standing for ticks {k}..={last_k}, the last due at {}",
                r.host + 1, d.inc, inc.key, secs(r.at), ms(last)
            ));
        }
        if inc.ended.is_some_and(|e| r.at > e) {
            in_flight_after_delete += 1;
        }
        max_missed = max_missed.max(d.missed);
        for j in k..=last_k {
            let e = covered[d.inc].entry(j).or_insert(r.at);
            *e = (*e).min(r.at);
        }
    }
    // (c) no lost tick, first form: the trigger loop moves past a tick only once a host
    // acknowledged it, or (default policy) after its last attempt failed.
    let mut passed_ticks = 0;
    // The attempt after which the default policy gives a tick up.
    let last_attempt = match FailurePolicy::default() {
        FailurePolicy::Constant {
            max_retries: Some(m),
            ..
        } => m,
        _ => 0,
    };
    let mut furthest: Vec<Option<(u64, usize)>> = vec![None; o.incs.len()];
    let mut given_up: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); o.incs.len()];
    for (n, d) in o.dispatches.iter().enumerate() {
        let inc = &o.incs[d.inc];
        let k = inc.index(d.scheduled).unwrap_or_default();
        if furthest[d.inc].is_none_or(|(f, _)| k > f) {
            furthest[d.inc] = Some((k, n));
        }
        if !inc.forever && d.attempt >= last_attempt {
            given_up[d.inc].extend(k..=k + u64::from(d.missed));
        }
    }
    for (i, inc) in o.incs.iter().enumerate() {
        let Some((f, n)) = furthest[i] else { continue };
        for j in 0..f {
            passed_ticks += 1;
            if !covered[i].contains_key(&j) && !given_up[i].contains(&j) {
                let d = &o.dispatches[n];
                return Err(format!(
                    "seed {seed}: LOST: tick {j} of incarnation {i} ({}, due {}, period {:?}, {}) was never received by a host, but the scheduler moved on to tick {f} (dispatch {n} at {}, scheduler process {})",
                    inc.key, ms(inc.due), inc.period,
                    if inc.forever { "retried forever" } else { "default policy" },
                    secs(d.at), d.life
                ));
            }
        }
    }
    // (c), second form: due ticks are delivered, on time when nothing is wrong.
    let (mut quiet_ticks, mut eventual_ticks) = (0, 0);
    for (i, inc) in o.incs.iter().enumerate() {
        let Some(created) = inc.created else { continue };
        for k in 0.. {
            let Some(tk) = inc.tick(k) else { break };
            let s = since_start(tk).max(created);
            if s + deadline > CHECK_UNTIL {
                break;
            }
            let alive_until = inc.end_sent.unwrap_or(Duration::MAX);
            let got = covered[i].get(&k).copied();
            if quiet(active, s, s + deadline) && alive_until > s + deadline {
                quiet_ticks += 1;
                if got.is_none_or(|g| g > s + deadline) {
                    return Err(format!(
                        "seed {seed}: LOST (quiet): tick {k} of incarnation {i} ({}, due {}, period {:?}, {}), due at {} in quiet times, {}",
                        inc.key, ms(inc.due), inc.period,
                        if inc.forever { "retried forever" } else { "default policy" },
                        ms(tk),
                        got.map_or("never delivered".to_string(), |g| format!("delivered only at {}", secs(g)))
                    ));
                }
                continue;
            }
            if inc.forever {
                let q = next_quiet(active, s, deadline);
                if q <= CHECK_UNTIL && alive_until > q {
                    eventual_ticks += 1;
                    if got.is_none_or(|g| g > q) {
                        return Err(format!(
                            "seed {seed}: LOST: tick {k} of incarnation {i} ({}, due {}, period {:?}, retried forever), due at {}, created at {}, {} (quiet again by {})",
                            inc.key, ms(inc.due), inc.period, ms(tk), secs(created),
                            got.map_or("never delivered".to_string(), |g| format!("delivered only at {}", secs(g))),
                            secs(q)
                        ));
                    }
                }
            }
        }
    }
    // (d) one catch-up per job after each scheduler restart.
    let mut catch_ups = 0;
    for (r, life) in restarts {
        let mut per_inc: BTreeMap<usize, BTreeSet<DateTime<Utc>>> = BTreeMap::new();
        for d in o.dispatches.iter().filter(|d| d.life == *life) {
            if d.scheduled < at(*r) {
                per_inc.entry(d.inc).or_default().insert(d.scheduled);
            }
        }
        for (inc, ticks) in &per_inc {
            if ticks.len() > 1 {
                return Err(format!(
                    "seed {seed}: after the scheduler restart at {}, incarnation {inc} ({}) got {} catch-ups, for ticks {:?}",
                    secs(*r),
                    o.incs[*inc].key,
                    ticks.len(),
                    ticks.iter().map(|t| ms(*t)).collect::<Vec<_>>()
                ));
            }
        }
        catch_ups += per_inc.len();
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for d in &o.dispatches {
        (d.inc, d.life, d.at, d.scheduled, d.missed, d.attempt).hash(&mut h);
    }
    for r in &o.receipts {
        (r.dispatch, r.host, r.at).hash(&mut h);
    }
    Ok(Report {
        seed,
        max_in_flight: 0,
        slow_app: false,
        faults,
        creates: o.creates,
        deletes: o.deletes,
        already_exists: o.already_exists,
        dispatches: o.dispatches.len(),
        receipts: o.receipts.len(),
        quiet_ticks,
        eventual_ticks,
        passed_ticks,
        sched_restarts: restarts.len(),
        catch_ups,
        max_missed,
        in_flight_after_delete,
        errors: o.errors.clone(),
        fingerprint: h.finish(),
    })
}
