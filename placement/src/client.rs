//! The host side of placement: keeps a session with the leader, heartbeats, and holds the latest
//! table and the lease.
//!
//! It tries the replicas in turn, follows `leader` redirects at once, asks again every ~75 ms while
//! an election runs, backs off with jitter (50 ms doubling to 2 s) only after every replica failed
//! in a row, and never gives up. Tables are accepted only
//! with a higher version than the one held, so versions seen by a host only grow. The lease is
//! measured on the host's own clock from when it sent the heartbeat the leader acknowledged.
//! A session starts with a full table; later versions arrive as deltas to the one before, applied
//! in place (see [`crate::publish`]).
//!
//! The host tells the client which table version it has applied ([`Client::set_applied`]); every
//! report carries it, and a new value is reported at once rather than at the next heartbeat. The
//! leader answers with the settled version ([`Client::settled`]): every host listed in that
//! version has applied it, so actors gained in it may be activated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::placement::placement_client::PlacementClient;
use proto::placement::placement_order::Order;
use proto::placement::{HostReport, PlacementDelta};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ring::Table;

/// What a host tells placement about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The address other hosts reach this host at; unique.
    pub name: String,
    pub app_id: String,
    /// Empty for a host that only reads tables.
    pub actor_types: Vec<String>,
    pub namespace: String,
}

/// Client settings.
#[derive(Clone)]
pub struct Options {
    pub heartbeat: Duration,
    /// How to reach the replicas.
    pub dial: crate::network::Dial,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat: Duration::from_secs(1),
            dial: crate::network::tcp(),
        }
    }
}

/// A running placement client. Dropping it stops the session.
pub struct Client {
    table: watch::Receiver<Table>,
    applied: Arc<watch::Sender<u64>>,
    settled: Arc<watch::Sender<u64>>,
    leaving: Arc<watch::Sender<bool>>,
    lease_until: Arc<Mutex<Option<Instant>>>,
    leader: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

enum Ended {
    Redirect(String),
    Failed,
}

impl Client {
    /// Starts the session task. `replicas` are gRPC addresses (`host:port`).
    pub fn spawn(replicas: Vec<String>, reg: Registration, opts: Options) -> Client {
        let (tx, rx) = watch::channel(Table::default());
        let lease_until = Arc::new(Mutex::new(None));
        let leader = Arc::new(Mutex::new(None));
        let applied = Arc::new(watch::Sender::new(0));
        let settled = Arc::new(watch::Sender::new(0));
        let leaving = Arc::new(watch::Sender::new(false));
        let stop = CancellationToken::new();
        let task = Session {
            replicas,
            reg,
            opts,
            tables: tx,
            applied: applied.clone(),
            settled: settled.clone(),
            leaving: leaving.clone(),
            lease_until: lease_until.clone(),
            leader: leader.clone(),
        };
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = task.run() => {}
            }
        });
        Client {
            table: rx,
            applied,
            settled,
            leaving,
            lease_until,
            leader,
            stop,
        }
    }

    /// The latest table (version 0 until the first arrives).
    pub fn table(&self) -> Table {
        self.table.borrow().clone()
    }

    /// A receiver that sees every newer table.
    pub fn subscribe(&self) -> watch::Receiver<Table> {
        self.table.clone()
    }

    /// Leaves the table at once (graceful shutdown): later reports carry no actor types, which
    /// makes the leader remove this host in its next version instead of after the lease. The
    /// session stays up, so the host still receives tables while it hands its actors off.
    pub fn leave(&self) {
        self.leaving.send_replace(true);
    }

    /// Records that this host has applied table `version` (stopped and drained every actor it lost
    /// in it). Every later report carries it; a higher value than before is reported at once,
    /// without waiting for the next heartbeat. Lower values than one already recorded are ignored.
    pub fn set_applied(&self, version: u64) {
        raise(&self.applied, version);
    }

    /// The highest settled version any leader reported (0 until one does): every host listed in
    /// that table version has applied it, or has been removed since.
    pub fn settled(&self) -> u64 {
        *self.settled.borrow()
    }

    /// A receiver that sees the settled version grow.
    pub fn subscribe_settled(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    /// Whether the lease from the last acknowledged heartbeat still runs.
    pub fn lease_valid(&self) -> bool {
        self.lease_until
            .lock()
            .expect("lock")
            .is_some_and(|t| Instant::now() < t)
    }

    /// The replica this client last had a session with.
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().expect("lock").clone()
    }

    /// Stops the session (the host will drop out of the table after its lease).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Session {
    replicas: Vec<String>,
    reg: Registration,
    opts: Options,
    tables: watch::Sender<Table>,
    applied: Arc<watch::Sender<u64>>,
    settled: Arc<watch::Sender<u64>>,
    leaving: Arc<watch::Sender<bool>>,
    lease_until: Arc<Mutex<Option<Instant>>>,
    leader: Arc<Mutex<Option<String>>>,
}

/// Raises a watched value; never lowers it.
fn raise(w: &watch::Sender<u64>, v: u64) {
    w.send_if_modified(|cur| {
        let grew = v > *cur;
        if grew {
            *cur = v;
        }
        grew
    });
}

/// One session's table stream: a full table, then deltas that each apply to the version before.
///
/// The client's table only grows; a new session may start from an older version than the one
/// held (a new leader that has not applied everything yet). Its stream is then kept aside and
/// deltas apply to that copy until it passes the held version; in step, deltas apply in place.
#[derive(Default)]
struct Stream {
    /// The version of the last table (full or delta) this session received.
    version: Option<u64>,
    /// The session's table while it is older than the one held.
    behind: Option<Table>,
}

/// A delta that does not follow the session's table: the session must start over.
#[derive(Debug)]
struct BrokenStream;

impl Stream {
    fn full(&mut self, tables: &watch::Sender<Table>, t: Table) {
        self.version = Some(t.version);
        self.behind = accept(tables, t);
    }

    fn delta(
        &mut self,
        tables: &watch::Sender<Table>,
        d: PlacementDelta,
    ) -> Result<(), BrokenStream> {
        if self.version != Some(d.from_version) {
            return Err(BrokenStream);
        }
        self.version = Some(d.version);
        match self.behind.take() {
            Some(mut t) => {
                crate::publish::apply_delta(&mut t, d);
                self.behind = accept(tables, t);
                Ok(())
            }
            None => {
                let mut applied = false;
                tables.send_if_modified(|cur| {
                    applied = cur.version == d.from_version;
                    if applied {
                        crate::publish::apply_delta(cur, d);
                    }
                    applied
                });
                if applied {
                    Ok(())
                } else {
                    Err(BrokenStream)
                }
            }
        }
    }
}

/// Takes `t` as the table if it is newer than the one held; returns it if it is older (the
/// session's stream is behind), drops it if it is the same version (same content).
fn accept(tables: &watch::Sender<Table>, t: Table) -> Option<Table> {
    let mut offered = Some(t);
    tables.send_if_modified(|cur| match offered.take() {
        Some(t) if t.version > cur.version => {
            *cur = t;
            true
        }
        other => {
            offered = other;
            false
        }
    });
    let held = tables.borrow().version;
    offered.filter(|t| t.version < held)
}

impl Session {
    async fn run(self) {
        let n = self.replicas.len().max(1);
        let mut next = 0usize;
        let mut hint: Option<String> = None;
        let mut backoff = Duration::from_millis(50);
        let mut failures_in_a_row = 0usize;
        loop {
            let addr = match hint.take() {
                Some(a) => a,
                None => {
                    next += 1;
                    self.replicas[(next - 1) % n].clone()
                }
            };
            let started = Instant::now();
            let ended = self.session(&addr).await;
            if started.elapsed() > Duration::from_secs(5) {
                // The session worked for a while: start over with quick retries.
                backoff = Duration::from_millis(50);
                failures_in_a_row = 0;
            }
            if matches!(ended, Ended::Redirect(_)) {
                // A replica answered: the cluster is up, so no reason to slow down.
                backoff = Duration::from_millis(50);
                failures_in_a_row = 0;
            }
            match ended {
                Ended::Redirect(leader) if !leader.is_empty() && leader != addr => {
                    hint = Some(leader);
                    continue;
                }
                // An election is under way: ask again shortly, without growing the backoff.
                Ended::Redirect(_) => {
                    tokio::time::sleep(Duration::from_millis(
                        50 + crate::runtime::random_u64() % 50,
                    ))
                    .await;
                    continue;
                }
                Ended::Failed => failures_in_a_row += 1,
            }
            // Try every replica once before backing off: a dead one fails fast.
            if !failures_in_a_row.is_multiple_of(n) {
                continue;
            }
            let jitter = crate::runtime::random_u64() % (backoff.as_millis() as u64 / 2 + 1);
            tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn session(&self, addr: &str) -> Ended {
        // The channel is lazy: an unreachable replica fails the `report_host` call below.
        let channel = match (self.opts.dial)(addr) {
            Ok(c) => c,
            Err(_) => return Ended::Failed,
        };
        let mut client = PlacementClient::new(channel);
        let (tx, rx) = mpsc::channel::<HostReport>(4);
        let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let beat = {
            let (reg, sent, every) = (self.reg.clone(), sent.clone(), self.opts.heartbeat);
            let mut applied = self.applied.subscribe();
            let mut leaving = self.leaving.subscribe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for seq in 1u64.. {
                    // A heartbeat each interval, and one more as soon as the applied version
                    // grows, so the leader can settle it within milliseconds.
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = applied.changed() => if r.is_err() { return },
                        r = leaving.changed() => if r.is_err() { return },
                    }
                    let applied_version = *applied.borrow_and_update();
                    {
                        let mut s = sent.lock().expect("lock");
                        s.insert(seq, Instant::now());
                        s.retain(|k, _| *k + 64 > seq);
                    }
                    let report = HostReport {
                        name: reg.name.clone(),
                        app_id: reg.app_id.clone(),
                        actor_types: if *leaving.borrow_and_update() {
                            Vec::new()
                        } else {
                            reg.actor_types.clone()
                        },
                        namespace: reg.namespace.clone(),
                        seq,
                        applied_version,
                    };
                    if tx.send(report).await.is_err() {
                        return;
                    }
                }
            })
        };
        // Aborted however this future ends, including when the client is dropped mid-session:
        // a dropped client must stop heartbeating, like a crashed host.
        let _beat = AbortOnDrop(beat);
        self.read_orders(addr, &mut client, rx, &sent).await
    }

    async fn read_orders(
        &self,
        addr: &str,
        client: &mut PlacementClient<tonic::transport::Channel>,
        rx: mpsc::Receiver<HostReport>,
        sent: &Mutex<HashMap<u64, Instant>>,
    ) -> Ended {
        let mut inbound = match client
            .report_host(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(_) => return Ended::Failed,
        };
        let mut stream = Stream::default();
        loop {
            // Heartbeats are acknowledged every interval: two and a half intervals of silence
            // (a partition, a paused or crashed leader) end the session, well inside the lease a
            // new leader grants before it removes anyone.
            let msg =
                match tokio::time::timeout(self.opts.heartbeat * 5 / 2, inbound.message()).await {
                    Ok(Ok(Some(m))) => m,
                    _ => return Ended::Failed,
                };
            match msg.order {
                Some(Order::Table(t)) => {
                    stream.full(&self.tables, crate::publish::table_from(t));
                }
                Some(Order::Delta(d)) => {
                    // Each delta applies to the version this session received before; anything
                    // else is a broken stream: start a new session (it begins with a full table).
                    let from = d.from_version;
                    if stream.delta(&self.tables, d).is_err() {
                        tracing::warn!(
                            from,
                            held = ?stream.version,
                            "placement delta does not follow the session's table; reconnecting"
                        );
                        return Ended::Failed;
                    }
                }
                Some(Order::Ack(ack)) => {
                    raise(&self.settled, ack.settled_version);
                    *self.leader.lock().expect("lock") = Some(addr.to_string());
                    if let Some(at) = sent.lock().expect("lock").get(&ack.seq).copied() {
                        let until = at + Duration::from_millis(ack.lease_ms);
                        let mut l = self.lease_until.lock().expect("lock");
                        if l.is_none_or(|cur| until > cur) {
                            *l = Some(until);
                        }
                    }
                }
                Some(Order::SettledVersion(v)) => raise(&self.settled, v),
                Some(Order::Leader(leader)) => return Ended::Redirect(leader),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::HostEntry;
    use proto::placement::HostInfo;

    fn host(name: &str) -> HostEntry {
        HostEntry {
            name: name.into(),
            app_id: "app".into(),
            actor_types: vec!["T".into()],
            namespace: "default".into(),
        }
    }

    fn table(version: u64, names: &[&str]) -> Table {
        Table {
            version,
            hosts: names.iter().map(|n| host(n)).collect(),
        }
    }

    fn delta(from: u64, to: u64, add: &[&str], remove: &[&str]) -> PlacementDelta {
        PlacementDelta {
            from_version: from,
            version: to,
            upsert: add
                .iter()
                .map(|n| HostInfo {
                    name: n.to_string(),
                    app_id: "app".into(),
                    actor_types: vec!["T".into()],
                    namespace: "default".into(),
                })
                .collect(),
            remove: remove.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn deltas_apply_in_place_when_in_step() {
        let tables = watch::Sender::new(Table::default());
        let mut s = Stream::default();
        s.full(&tables, table(3, &["a", "c"]));
        s.delta(&tables, delta(3, 4, &["b"], &["c"])).unwrap();
        assert_eq!(*tables.borrow(), table(4, &["a", "b"]));
        assert!(s.delta(&tables, delta(7, 8, &["x"], &[])).is_err());
    }

    #[test]
    fn a_session_behind_the_held_table_catches_up_before_it_counts() {
        // An earlier session got to version 5; the new one starts at 3.
        let tables = watch::Sender::new(table(5, &["a", "b", "d"]));
        let mut s = Stream::default();
        s.full(&tables, table(3, &["a"]));
        s.delta(&tables, delta(3, 4, &["b"], &[])).unwrap();
        assert_eq!(tables.borrow().version, 5, "never goes back");
        s.delta(&tables, delta(4, 5, &["d"], &[])).unwrap();
        assert!(s.behind.is_none(), "in step again at the held version");
        s.delta(&tables, delta(5, 6, &["e"], &["a"])).unwrap();
        assert_eq!(*tables.borrow(), table(6, &["b", "d", "e"]));
    }

    #[test]
    fn a_session_behind_passes_the_held_version_with_its_own_table() {
        let tables = watch::Sender::new(table(5, &["a", "b"]));
        let mut s = Stream::default();
        s.full(&tables, table(4, &["a"]));
        s.delta(&tables, delta(4, 6, &["c"], &[])).unwrap();
        assert_eq!(*tables.borrow(), table(6, &["a", "c"]));
    }
}
