//! 3 placement replicas and 10 hosts under leader crashes, replica partitions and lossy links.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use placement::client::{Client, Options, Registration};
use placement::server::{Config, Node};

use crate::net;

const REPLICAS: usize = 3;
const HOSTS: usize = 10;
const PORT: u16 = 5000;
/// Faults happen between these times; then everything heals and the cluster must settle.
const FAULTS_FROM: Duration = Duration::from_secs(5);
const FAULTS_UNTIL: Duration = Duration::from_secs(35);
const HEAL_AT: Duration = Duration::from_secs(38);
/// How long hosts run (the end of the simulation).
const RUN: Duration = Duration::from_secs(55);
const LEASE: Duration = Duration::from_secs(3);

/// What the oracles look at.
#[derive(Default, Debug)]
struct Observed {
    /// term -> replicas that were leader in it.
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// The replica that leads now, as its own tracking reports.
    leader: Option<u64>,
    /// Every table each host accepted: (version, host names).
    tables: Vec<Vec<(u64, BTreeSet<String>)>>,
    /// Each host's table at the end.
    last: Vec<Option<(u64, BTreeSet<String>)>>,
    /// Each host's settled version at the end.
    last_settled: Vec<u64>,
    /// Applied and settled versions in the order they happened (the simulation runs on one
    /// thread, so this order is the causal one).
    events: Vec<Event>,
    /// A short trace for the determinism check.
    trace: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    /// Host `i` applied this version (logged before the client can report it).
    Applied(usize, u64),
    /// Host `i` learned this settled version.
    Settled(usize, u64),
}

/// What a run saw, for reporting and for checking that a seed replays exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    pub terms: usize,
    pub max_version: u64,
    pub faults: Vec<String>,
    pub trace: Vec<String>,
}

/// Simulated time, in microseconds since the simulation started, for the trace.
fn now() -> u128 {
    turmoil::sim_elapsed().unwrap_or_default().as_micros()
}

fn replica(i: usize) -> String {
    format!("r{}", i + 1)
}

fn host_name(i: usize) -> String {
    format!("h{}:{}", i + 1, 7000)
}

/// A small generator for the fault schedule, independent of the one the cluster draws from.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Reverts a fault at its due time.
enum Undo {
    /// Power the replica back on (its disk kept every write).
    Restart(usize),
    /// End one partition between two replicas.
    Uncut(usize, usize),
    /// Stop losing messages between two replicas.
    Lossless(usize, usize),
}

/// Which links are cut, by partitions between replicas and by replicas that are down.
///
/// A crashed replica is cut off from every node before turmoil drops its runtime, and stays cut
/// until it restarts: a power loss, not a process exit. That matters for replay: dropping a
/// runtime drops its tasks in an order that depends on tokio's process-wide task ids (tasks are
/// kept in lists sharded by id), and each dropped socket would send a FIN or RST whose latency is
/// drawn from the simulation's random source. With the links cut, those segments are discarded
/// (turmoil draws nothing for them), so the order of the drops cannot change what happens next.
#[derive(Default)]
struct Links {
    /// Replica pair (low, high) -> partitions in force.
    cuts: BTreeMap<(usize, usize), usize>,
    /// Replicas that are down.
    down: BTreeSet<usize>,
}

impl Links {
    fn pair(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    /// Sets every link of replica `r` to what the faults in force say.
    fn sync(&self, sim: &mut turmoil::Sim<'_>, r: usize) {
        for o in (0..REPLICAS).filter(|o| *o != r) {
            let cut = self.down.contains(&r)
                || self.down.contains(&o)
                || self.cuts.get(&Self::pair(r, o)).is_some_and(|n| *n > 0);
            if cut {
                sim.partition(replica(r), replica(o));
            } else {
                sim.repair(replica(r), replica(o));
            }
        }
        for h in 0..HOSTS {
            let name = format!("h{}", h + 1);
            if self.down.contains(&r) {
                sim.partition(replica(r), name);
            } else {
                sim.repair(replica(r), name);
            }
        }
    }

    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, r: usize) {
        self.down.insert(r);
        self.sync(sim, r);
        sim.crash(replica(r));
    }

    fn cut(&mut self, sim: &mut turmoil::Sim<'_>, a: usize, b: usize) {
        *self.cuts.entry(Self::pair(a, b)).or_default() += 1;
        self.sync(sim, a);
    }

    fn undo(&mut self, sim: &mut turmoil::Sim<'_>, u: Undo) {
        match u {
            Undo::Restart(r) => {
                self.down.remove(&r);
                self.sync(sim, r);
                sim.bounce(replica(r));
            }
            Undo::Uncut(a, b) => {
                if let Some(n) = self.cuts.get_mut(&Self::pair(a, b)) {
                    *n = n.saturating_sub(1);
                }
                self.sync(sim, a);
            }
            Undo::Lossless(a, b) => sim.set_link_fail_rate(replica(a), replica(b), 0.0),
        }
    }
}

#[derive(Debug, Clone)]
enum Fault {
    KillLeader {
        down: Duration,
    },
    Partition {
        replica: usize,
        for_: Duration,
    },
    Lossy {
        a: usize,
        b: usize,
        rate_pct: u64,
        for_: Duration,
    },
}

/// Runs one seed. `Err` names the violated invariant.
pub fn run(seed: u64) -> Result<Report, String> {
    placement::runtime::seed(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(RUN + Duration::from_secs(10))
        .tick_duration(Duration::from_millis(2))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(4))
        .build();
    let obs = Arc::new(Mutex::new(Observed {
        tables: vec![Vec::new(); HOSTS],
        last: vec![None; HOSTS],
        last_settled: vec![0; HOSTS],
        ..Default::default()
    }));
    let peers: BTreeMap<u64, String> = (0..REPLICAS)
        .map(|i| (i as u64 + 1, format!("{}:{PORT}", replica(i))))
        .collect();
    for i in 0..REPLICAS {
        // The database outlives crashes of its replica: a disk that keeps every write.
        let db = sled::Config::new()
            .temporary(true)
            .flush_every_ms(None)
            .open()
            .map_err(|e| e.to_string())?;
        let (peers, obs) = (peers.clone(), obs.clone());
        sim.host(replica(i), move || {
            let (db, peers, obs) = (db.clone(), peers.clone(), obs.clone());
            async move {
                let cfg = Config {
                    id: i as u64 + 1,
                    peers,
                    data_dir: std::path::PathBuf::from("/unused"),
                    lease: LEASE,
                    coalesce: Duration::from_millis(20),
                    metadata_enabled: false,
                    dial: net::dial(),
                };
                let node = Node::start_with_db(cfg, db, false).await?;
                tokio::spawn(watch_leadership(node.clone(), obs));
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
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
    for i in 0..HOSTS {
        let obs = obs.clone();
        let replicas: Vec<String> = peers.values().cloned().collect();
        sim.client(format!("h{}", i + 1), async move {
            let client = Client::spawn(
                replicas,
                Registration {
                    name: host_name(i),
                    app_id: "sim".into(),
                    actor_types: vec!["Twin".into()],
                    namespace: "default".into(),
                },
                Options { heartbeat: Duration::from_secs(1), dial: net::dial() },
            );
            let mut rx = client.subscribe();
            let mut settled = client.subscribe_settled();
            let end = tokio::time::sleep(RUN);
            tokio::pin!(end);
            loop {
                tokio::select! {
                    _ = &mut end => break,
                    r = rx.changed() => {
                        if r.is_err() {
                            break;
                        }
                        let t = rx.borrow_and_update().clone();
                        let names: BTreeSet<String> = t.hosts.iter().map(|h| h.name.clone()).collect();
                        let mut o = obs.lock().expect("lock");
                        o.trace.push(format!("{} h{} v{} n{}", now(), i + 1, t.version, names.len()));
                        o.tables[i].push((t.version, names));
                        // This host applies every table at once (it runs no actors to drain).
                        o.events.push(Event::Applied(i, t.version));
                        client.set_applied(t.version);
                    }
                    r = settled.changed() => {
                        if r.is_err() {
                            break;
                        }
                        let s = *settled.borrow_and_update();
                        let mut o = obs.lock().expect("lock");
                        o.trace.push(format!("{} h{} s{s}", now(), i + 1));
                        o.events.push(Event::Settled(i, s));
                    }
                }
            }
            let t = client.table();
            let mut o = obs.lock().expect("lock");
            o.last[i] = Some((t.version, t.hosts.iter().map(|h| h.name.clone()).collect()));
            o.last_settled[i] = client.settled();
            Ok(())
        });
    }

    // The fault schedule.
    let mut rng = Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut schedule: Vec<(Duration, Fault)> = Vec::new();
    let mut t = FAULTS_FROM;
    while t < FAULTS_UNTIL {
        let fault = match rng.range(0, 3) {
            0 => Fault::KillLeader {
                down: Duration::from_millis(rng.range(500, 4000)),
            },
            1 => Fault::Partition {
                replica: rng.range(0, REPLICAS as u64) as usize,
                for_: Duration::from_millis(rng.range(1000, 5000)),
            },
            _ => {
                let a = rng.range(0, REPLICAS as u64) as usize;
                let b = (a + 1 + rng.range(0, REPLICAS as u64 - 1) as usize) % REPLICAS;
                Fault::Lossy {
                    a,
                    b,
                    rate_pct: rng.range(10, 60),
                    for_: Duration::from_millis(rng.range(1000, 4000)),
                }
            }
        };
        schedule.push((t, fault));
        t += Duration::from_millis(rng.range(1500, 5000));
    }
    let faults: Vec<String> = schedule
        .iter()
        .map(|(t, f)| format!("{:.1}s {f:?}", t.as_secs_f64()))
        .collect();

    // Undo actions: (time, what).
    let mut undo: Vec<(Duration, Undo)> = Vec::new();
    let mut links = Links::default();
    let mut healed = false;
    let mut next = 0;
    loop {
        let now = sim.elapsed();
        while next < schedule.len() && schedule[next].0 <= now {
            match schedule[next].1.clone() {
                Fault::KillLeader { down: d } => {
                    let leader = obs.lock().expect("lock").leader;
                    if let Some(l) = leader
                        .map(|l| l as usize - 1)
                        .filter(|_| links.down.is_empty())
                    {
                        links.crash(&mut sim, l);
                        obs.lock().expect("lock").leader = None;
                        undo.push((now + d, Undo::Restart(l)));
                    }
                }
                Fault::Partition { replica: r, for_ } => {
                    for o in (0..REPLICAS).filter(|o| *o != r) {
                        links.cut(&mut sim, r, o);
                        undo.push((now + for_, Undo::Uncut(r, o)));
                    }
                }
                Fault::Lossy {
                    a,
                    b,
                    rate_pct,
                    for_,
                } => {
                    sim.set_link_fail_rate(replica(a), replica(b), rate_pct as f64 / 100.0);
                    undo.push((now + for_, Undo::Lossless(a, b)));
                }
            }
            next += 1;
        }
        let (due, rest): (Vec<_>, Vec<_>) = undo.into_iter().partition(|(at, _)| *at <= now);
        undo = rest;
        for (_, u) in due {
            links.undo(&mut sim, u);
        }
        if !healed && now >= HEAL_AT {
            healed = true;
            for (_, u) in std::mem::take(&mut undo) {
                links.undo(&mut sim, u);
            }
            for a in 0..REPLICAS {
                for b in (a + 1)..REPLICAS {
                    sim.repair(replica(a), replica(b));
                    sim.set_link_fail_rate(replica(a), replica(b), 0.0);
                }
            }
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("seed {seed}: simulation error: {e}")),
        }
    }

    let o = obs.lock().expect("lock");
    check(seed, &o).map_err(|e| {
        format!(
            "{e}\n  faults: {faults:?}\n  leaders by term: {:?}",
            o.leaders
        )
    })?;
    Ok(Report {
        seed,
        terms: o.leaders.len(),
        max_version: o.last[0].as_ref().map_or(0, |(v, _)| *v),
        faults,
        trace: o.trace.clone(),
    })
}

fn check(seed: u64, o: &Observed) -> Result<(), String> {
    // Oracle 1: at most one leader per term.
    for (term, ids) in &o.leaders {
        if ids.len() > 1 {
            return Err(format!("seed {seed}: term {term} had leaders {ids:?}"));
        }
    }
    let everyone: BTreeSet<String> = (0..HOSTS).map(host_name).collect();
    for (i, seen) in o.tables.iter().enumerate() {
        // Oracle 2: versions only grow on every host.
        for w in seen.windows(2) {
            if w[1].0 <= w[0].0 {
                return Err(format!(
                    "seed {seed}: host h{} saw version {} after {}",
                    i + 1,
                    w[1].0,
                    w[0].0
                ));
            }
        }
        // Oracle 4: once every host is in, no live host goes missing.
        if let Some(first_full) = seen.iter().position(|(_, names)| names == &everyone) {
            if let Some((v, names)) = seen[first_full..]
                .iter()
                .find(|(_, names)| !everyone.is_subset(names))
            {
                let missing: Vec<&String> = everyone.difference(names).collect();
                return Err(format!(
                    "seed {seed}: host h{} saw version {v} without live hosts {missing:?}",
                    i + 1
                ));
            }
        }
    }
    // Oracle 3: after healing, every host holds the same table with every host in it.
    let finals: BTreeSet<&Option<(u64, BTreeSet<String>)>> = o.last.iter().collect();
    if finals.len() != 1 {
        let versions: Vec<Option<u64>> =
            o.last.iter().map(|l| l.as_ref().map(|(v, _)| *v)).collect();
        return Err(format!(
            "seed {seed}: hosts disagree after healing: versions {versions:?}"
        ));
    }
    let final_version = match o.last[0].as_ref() {
        Some((v, names)) if names == &everyone => *v,
        other => {
            return Err(format!(
                "seed {seed}: final table is not every host: {other:?}"
            ))
        }
    };
    check_settled(seed, o)?;
    // Oracle 6: after healing, every host knows the final version as settled.
    if o.last_settled.iter().any(|s| *s != final_version) {
        return Err(format!(
            "seed {seed}: settled versions after healing {:?}, final table version {final_version}",
            o.last_settled
        ));
    }
    Ok(())
}

/// Oracle 5: no host ever learns a settled version `s` while a host listed in table `s` has not
/// applied `s` yet.
///
/// The hosts are the only ones who can say what they applied, so the check replays the events in
/// the order they happened. The listing of table `s` is taken from the hosts' own copies of it;
/// if no host received `s` itself (each skipped straight to a later one), from the latest earlier
/// table any host received. That is still sound here: hosts are never removed in this simulation
/// (oracle 4), so a table lists every host that an earlier one listed, and the check covers a
/// subset of the hosts of `s`; it is exact whenever any host received `s`, which is nearly always.
fn check_settled(seed: u64, o: &Observed) -> Result<(), String> {
    let mut listed: BTreeMap<u64, &BTreeSet<String>> = BTreeMap::new();
    for seen in &o.tables {
        for (v, names) in seen {
            listed.entry(*v).or_insert(names);
        }
    }
    let index: BTreeMap<String, usize> = (0..HOSTS).map(|i| (host_name(i), i)).collect();
    let mut applied = [0u64; HOSTS];
    let mut settled = [0u64; HOSTS];
    for e in &o.events {
        match *e {
            Event::Applied(i, v) => applied[i] = applied[i].max(v),
            Event::Settled(i, s) => {
                if s < settled[i] {
                    return Err(format!(
                        "seed {seed}: host h{} saw settled {s} after {}",
                        i + 1,
                        settled[i]
                    ));
                }
                settled[i] = s;
                let Some((_, names)) = listed.range(..=s).next_back() else {
                    return Err(format!("seed {seed}: settled {s} before any table"));
                };
                for name in names.iter() {
                    let j = index[name];
                    if applied[j] < s {
                        return Err(format!(
                            "seed {seed}: host h{} learned settled {s} while h{} had applied only {}",
                            i + 1,
                            j + 1,
                            applied[j]
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

async fn watch_leadership(node: Arc<Node>, obs: Arc<Mutex<Observed>>) {
    let mut metrics = node.raft.metrics();
    let debug = std::env::var_os("SIM_DEBUG").is_some();
    let mut last_line: Option<String> = None;
    loop {
        {
            let m = metrics.borrow_and_update().clone();
            let mut o = obs.lock().expect("lock");
            // Every change of this replica's Raft state goes into the trace (and, with
            // SIM_DEBUG, to stderr): the finest record of a run that stays cheap.
            let line = format!(
                "r{} t{} {:?} vote={} last_log={:?} applied={:?}",
                m.id,
                m.current_term,
                m.state,
                m.vote,
                m.last_log_index,
                m.last_applied.map(|l| l.index)
            );
            if last_line.as_ref() != Some(&line) {
                if debug {
                    eprintln!("{} {line}", now());
                }
                o.trace.push(format!("{} {line}", now()));
                last_line = Some(line);
            }
            if m.state == openraft::ServerState::Leader {
                o.leaders.entry(m.current_term).or_default().insert(m.id);
            }
            if node.is_leader() {
                if o.leader != Some(m.id) {
                    o.trace
                        .push(format!("{} r{} leads t{}", now(), m.id, m.current_term));
                }
                o.leader = Some(m.id);
            } else if o.leader == Some(m.id) {
                o.trace.push(format!("{} r{} stops", now(), m.id));
                o.leader = None;
            }
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}
