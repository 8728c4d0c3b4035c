//! The scheduler side of the hosts' watch streams: who is connected, and the [`Sink`] that hands
//! ticks to them and completes each delivery on its acknowledgement.
//!
//! - An app job goes to one connected host of its app id and namespace; a reminder to one
//!   connected host that registered its actor type (the host's actor runtime routes it to the
//!   actor's owner). Hosts are taken in turn.
//! - Nobody connected for a target: the delivery is [`DeliveryError::Unroutable`], so the engine
//!   keeps the tick and tries again (coalescing what falls due meanwhile); it is never dropped.
//! - A delivery completes when the host acknowledges it (ok, or failed with a reason, plus the
//!   fencing epoch of the activation that ran a reminder). A host whose stream ends fails all its
//!   deliveries at once; one that does not answer within the ack timeout fails that delivery. Both
//!   follow the job's failure policy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::scheduler::{watch_jobs_response, Trigger, WatchJobsAck, WatchJobsResponse};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Delivered, DeliveryError, Sink, Tick};
use crate::job::Target;

/// What a host said about itself when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub name: String,
    pub app_id: String,
    pub namespace: String,
    pub actor_types: HashSet<String>,
}

/// The outbound half of a host's stream.
pub type Outbound = mpsc::Sender<Result<WatchJobsResponse, tonic::Status>>;

struct Conn {
    id: u64,
    info: HostInfo,
    tx: Outbound,
}

struct Pending {
    host: u64,
    done: oneshot::Sender<Result<Delivered, DeliveryError>>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct HubMetrics {
    /// Triggers sent to a host.
    pub fires: AtomicU64,
    /// Deliveries a host acknowledged as done.
    pub acks: AtomicU64,
    /// Deliveries that failed: a host answered failed, did not answer in time, or went away.
    pub failures: AtomicU64,
    /// Ticks that found no connected host.
    pub unroutable: AtomicU64,
}

/// Connected hosts and deliveries awaiting their acknowledgement.
pub struct Hub {
    hosts: Mutex<Vec<Arc<Conn>>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    turn: AtomicUsize,
    ack_timeout: Duration,
    pub metrics: HubMetrics,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("hosts", &self.connected())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent: recover from a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(ack_timeout: Duration) -> Self {
        Hub {
            hosts: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            turn: AtomicUsize::new(0),
            ack_timeout,
            metrics: HubMetrics::default(),
        }
    }

    /// Adds a connected host; returns its session id for [`Hub::ack`] and [`Hub::disconnect`].
    pub fn connect(&self, info: HostInfo, tx: Outbound) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(host = %info.name, app_id = %info.app_id, types = ?info.actor_types, "host connected");
        lock(&self.hosts).push(Arc::new(Conn { id, info, tx }));
        id
    }

    /// Removes a host and fails every delivery it had not acknowledged.
    pub fn disconnect(&self, id: u64) {
        let mut name = None;
        lock(&self.hosts).retain(|c| {
            if c.id == id {
                name = Some(c.info.name.clone());
            }
            c.id != id
        });
        let failed: Vec<Pending> = {
            let mut p = lock(&self.pending);
            let ids: Vec<u64> = p
                .iter()
                .filter(|(_, v)| v.host == id)
                .map(|(k, _)| *k)
                .collect();
            ids.into_iter().filter_map(|k| p.remove(&k)).collect()
        };
        tracing::info!(host = ?name, unacknowledged = failed.len(), "host disconnected");
        for f in failed {
            self.metrics.failures.fetch_add(1, Ordering::Relaxed);
            let _ = f.done.send(Err(DeliveryError::Failed(
                "the host's stream ended before it acknowledged".into(),
            )));
        }
    }

    /// A host's acknowledgement. Ignored unless that host was sent that delivery.
    pub fn ack(&self, host: u64, ack: WatchJobsAck) {
        let p = {
            let mut pending = lock(&self.pending);
            match pending.get(&ack.delivery_id) {
                Some(p) if p.host == host => pending.remove(&ack.delivery_id),
                _ => None,
            }
        };
        let Some(p) = p else { return };
        let result = if ack.ok {
            self.metrics.acks.fetch_add(1, Ordering::Relaxed);
            Ok(Delivered {
                epoch: (ack.epoch > 0).then_some(ack.epoch),
            })
        } else {
            self.metrics.failures.fetch_add(1, Ordering::Relaxed);
            Err(DeliveryError::Failed(ack.reason))
        };
        let _ = p.done.send(result);
    }

    pub fn connected(&self) -> usize {
        lock(&self.hosts).len()
    }

    /// One connected host that takes `target`, in turn.
    fn pick(&self, target: &Target) -> Option<Arc<Conn>> {
        let hosts = lock(&self.hosts);
        let fits: Vec<&Arc<Conn>> = hosts
            .iter()
            .filter(|c| match target {
                Target::App { app_id, namespace } => {
                    c.info.app_id == *app_id && c.info.namespace == *namespace
                }
                Target::ActorReminder {
                    namespace,
                    actor_type,
                    ..
                } => c.info.namespace == *namespace && c.info.actor_types.contains(actor_type),
            })
            .collect();
        if fits.is_empty() {
            return None;
        }
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % fits.len();
        Some(fits[i].clone())
    }
}

/// The wire form of a tick.
pub fn trigger(tick: &Tick, delivery_id: u64) -> Trigger {
    Trigger {
        delivery_id,
        key: tick.key.as_bytes().to_vec(),
        name: tick.name.clone(),
        target: serde_json::to_vec(&tick.target).unwrap_or_default(),
        data: tick.data.to_vec(),
        scheduled_ms: tick.scheduled.timestamp_millis(),
        missed: tick.missed,
        attempt: tick.attempt,
        sequence: tick.sequence,
        due_time: tick.spec.due_time.clone().unwrap_or_default(),
        period: tick.spec.period.clone().unwrap_or_default(),
    }
}

impl Sink for Arc<Hub> {
    fn deliver(
        &self,
        tick: Tick,
    ) -> impl std::future::Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
        let hub = self.clone();
        let picked = self.pick(&tick.target);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        if let Some(c) = &picked {
            lock(&self.pending).insert(id, Pending { host: c.id, done });
        }
        async move {
            let Some(conn) = picked else {
                hub.metrics.unroutable.fetch_add(1, Ordering::Relaxed);
                return Err(DeliveryError::Unroutable(format!(
                    "no connected host takes {}",
                    match &tick.target {
                        Target::App { app_id, .. } => format!("jobs of app {app_id:?}"),
                        Target::ActorReminder { actor_type, .. } =>
                            format!("reminders of actor type {actor_type:?}"),
                    }
                )));
            };
            let msg = WatchJobsResponse {
                response: Some(watch_jobs_response::Response::Trigger(trigger(&tick, id))),
            };
            let sent = tokio::time::timeout(hub.ack_timeout, conn.tx.send(Ok(msg))).await;
            if !matches!(sent, Ok(Ok(()))) {
                lock(&hub.pending).remove(&id);
                hub.metrics.failures.fetch_add(1, Ordering::Relaxed);
                return Err(DeliveryError::Failed(format!(
                    "could not send the trigger to host {}",
                    conn.info.name
                )));
            }
            hub.metrics.fires.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(hub.ack_timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(DeliveryError::Failed("delivery abandoned".into())),
                Err(_) => {
                    lock(&hub.pending).remove(&id);
                    hub.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    Err(DeliveryError::Failed(format!(
                        "host {} did not acknowledge within {:?}",
                        conn.info.name, hub.ack_timeout
                    )))
                }
            }
        }
    }
}
