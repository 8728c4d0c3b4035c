//! The host side of placement: keeps a session with the leader, heartbeats, and holds the latest
//! table and the lease.
//!
//! It tries the replicas in turn, follows `leader` redirects at once, asks again every ~75 ms while
//! an election runs, backs off with jitter (50 ms doubling to 2 s) only after every replica failed
//! in a row, and never gives up. Tables are accepted only
//! with a higher version than the one held, so versions seen by a host only grow. The lease is
//! measured on the host's own clock from when it sent the heartbeat the leader acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::placement::placement_client::PlacementClient;
use proto::placement::placement_order::Order;
use proto::placement::HostReport;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ring::{HostEntry, Table};

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
        let stop = CancellationToken::new();
        let task = Session {
            replicas,
            reg,
            opts,
            tables: tx,
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
    lease_until: Arc<Mutex<Option<Instant>>>,
    leader: Arc<Mutex<Option<String>>>,
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
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for seq in 1u64.. {
                    tick.tick().await;
                    {
                        let mut s = sent.lock().expect("lock");
                        s.insert(seq, Instant::now());
                        s.retain(|k, _| *k + 64 > seq);
                    }
                    let report = HostReport {
                        name: reg.name.clone(),
                        app_id: reg.app_id.clone(),
                        actor_types: reg.actor_types.clone(),
                        namespace: reg.namespace.clone(),
                        seq,
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
                    let table = Table {
                        version: t.version,
                        hosts: t
                            .hosts
                            .into_iter()
                            .map(|h| HostEntry {
                                name: h.name,
                                app_id: h.app_id,
                                actor_types: h.actor_types,
                                namespace: h.namespace,
                            })
                            .collect(),
                    };
                    self.tables.send_if_modified(|cur| {
                        if table.version > cur.version {
                            *cur = table;
                            true
                        } else {
                            false
                        }
                    });
                }
                Some(Order::Ack(ack)) => {
                    *self.leader.lock().expect("lock") = Some(addr.to_string());
                    if let Some(at) = sent.lock().expect("lock").get(&ack.seq).copied() {
                        let until = at + Duration::from_millis(ack.lease_ms);
                        let mut l = self.lease_until.lock().expect("lock");
                        if l.is_none_or(|cur| until > cur) {
                            *l = Some(until);
                        }
                    }
                }
                Some(Order::Leader(leader)) => return Ended::Redirect(leader),
                None => {}
            }
        }
    }
}
