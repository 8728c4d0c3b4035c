//! The actor runtime: turn-based single activation of every actor across hosts.
//!
//! - **Ownership** comes from placement: the host keeps the latest table, builds one ring per
//!   actor type ([`placement::ring::Rings`]) and calls locally or forwards to the owner over the
//!   internal port (one multiplexed connection per pair of hosts), carrying its table version
//!   (`remote`).
//! - **Version barrier**: when a table arrives, the host closes the activations it lost, waits
//!   for their turn in flight (up to `drainOngoingCallTimeout`), deactivates them in the app, and
//!   only then reports the version as applied. It creates a *new* activation only once placement
//!   reports its current version as settled (every host of it has applied it), so the previous
//!   owner has let go. Activations that did not move never pause.
//! - **Leases**: no turn starts while the placement lease has lapsed, and a lapse closes every
//!   activation (the actors may move while this host is cut off).
//! - **Fencing**: an activation's epoch is the table version it was created under. It claims the
//!   actor's fence in the actor state store before its first turn, and every state write carries
//!   it ([`components::state::fence`]); a write from an older epoch is refused and counted.
//! - **Turns** ([`activation`]): one at a time per actor, Dapr's reentrancy rules, idle
//!   deactivation by a periodic scan (no task per actor). A turn lasts until the app answers,
//!   whoever stops waiting for it (`run_turn`), and a closed activation is
//!   forgotten only once its last turn has ended (`retire`), so a new activation
//!   on the same host never runs beside a turn the app is still executing.

pub mod activation;
pub mod api;
pub mod app_channel;
pub mod config;
pub mod remote;
pub(crate) mod timers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use components::state::fence::{fenced_transact, FenceError};
use components::state::{Op, StateStore};
use placement::client::{Client as PlacementClient, Registration};
use placement::ring::{Rings, Table};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use activation::{Activation, ActorKey, Turn, TurnError};
use app_channel::{AppChannel, AppRequest, AppResponse};
use config::ActorSettings;

/// Dapr's reentrancy header.
pub const REENTRANCY_HEADER: &str = "dapr-reentrancy-id";

/// On the answer to a reminder delivery: the fencing epoch of the activation that ran it.
pub const EPOCH_HEADER: &str = "tessera-activation-epoch";

/// What the runtime needs to start.
#[derive(Clone)]
pub struct RuntimeConfig {
    pub app_id: String,
    pub namespace: String,
    /// This host's name in placement tables: the address of its internal port.
    pub host_address: String,
    /// Placement replicas (gRPC `host:port`).
    pub placement: Vec<String>,
    pub placement_options: placement::client::Options,
    /// How to reach other hosts' internal port.
    pub connect: remote::Connect,
    /// The longest a call waits in all (routing, the actor's turn, the app).
    pub call_timeout: Duration,
}

/// The actor state store and how its keys are named (`<appId>||<type>||<id>||<key>`).
#[derive(Clone)]
pub struct ActorStore {
    pub name: String,
    pub store: Arc<dyn StateStore>,
}

/// Why an actor call failed, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl CallError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        CallError {
            status,
            code,
            message: message.into(),
        }
    }

    fn invoke(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_ACTOR_INVOKE_METHOD",
            message,
        )
    }
}

/// The outcome of a local attempt: an answer, or "route again".
enum Local {
    Done(Result<AppResponse, CallError>),
    /// Not ours under our table, or not yet (barrier), or closing: retry after this table
    /// version (0: just retry shortly).
    Retry(u64),
}

/// Counters exported on `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub stale_writes_rejected: AtomicU64,
    pub activations: AtomicU64,
    pub deactivations: AtomicU64,
    pub local_calls: AtomicU64,
    pub remote_calls: AtomicU64,
    pub reroutes: AtomicU64,
}

#[derive(Clone)]
struct View {
    rings: Arc<Rings>,
    /// This host is in the table.
    listed: bool,
}

pub struct ActorRuntime {
    cfg: RuntimeConfig,
    app: Option<Arc<dyn AppChannel>>,
    settings: RwLock<Arc<ActorSettings>>,
    store: Option<ActorStore>,
    placement: OnceLock<PlacementClient>,
    view: watch::Sender<View>,
    settled: watch::Sender<u64>,
    actors: Mutex<HashMap<ActorKey, Arc<Activation>>>,
    remote: remote::Peers,
    pub metrics: Metrics,
    /// The host has been told to stop: no new activations.
    closing: AtomicBool,
    epoch0: Instant,
    stop: CancellationToken,
}

impl ActorRuntime {
    pub fn new(
        cfg: RuntimeConfig,
        app: Option<Arc<dyn AppChannel>>,
        store: Option<ActorStore>,
    ) -> Arc<Self> {
        let connect = cfg.connect.clone();
        Arc::new(ActorRuntime {
            cfg,
            app,
            settings: RwLock::new(Arc::new(ActorSettings::default())),
            store,
            placement: OnceLock::new(),
            view: watch::Sender::new(View {
                rings: Arc::new(Rings::build(&Table::default())),
                listed: false,
            }),
            settled: watch::Sender::new(0),
            actors: Mutex::new(HashMap::new()),
            remote: remote::Peers::new(connect),
            metrics: Metrics::default(),
            closing: AtomicBool::new(false),
            epoch0: Instant::now(),
            stop: CancellationToken::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch0.elapsed().as_millis() as u64
    }

    pub fn host_address(&self) -> &str {
        &self.cfg.host_address
    }

    pub fn settings(&self) -> Arc<ActorSettings> {
        self.settings.read().expect("lock").clone()
    }

    pub fn store(&self) -> Option<&ActorStore> {
        self.store.as_ref()
    }

    /// The table version this host routes by.
    pub fn table_version(&self) -> u64 {
        self.view.borrow().rings.version()
    }

    /// Whether the host is registered with placement and holds a lease.
    pub fn placement_connected(&self) -> bool {
        self.placement.get().is_some_and(|c| c.lease_valid())
    }

    pub fn placement_leader(&self) -> Option<String> {
        self.placement.get().and_then(|c| c.leader())
    }

    /// Whether [`ActorRuntime::start`] has run (the app's actor types are known).
    pub fn started(&self) -> bool {
        self.placement.get().is_some()
    }

    /// Whether this host hosts actor types and the current table lists it.
    pub fn hosting(&self) -> bool {
        self.view.borrow().listed && self.placement_connected()
    }

    /// Active actors per type, for the metadata API.
    pub fn active_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for t in self.settings().types.keys() {
            out.insert(t.clone(), 0);
        }
        for k in self.actors.lock().expect("lock").keys() {
            *out.entry(k.actor_type.clone()).or_default() += 1;
        }
        out
    }

    pub fn active_total(&self) -> usize {
        self.actors.lock().expect("lock").len()
    }

    /// Registers with placement (with the types the app serves) and starts the background
    /// work: applying tables, the idle scan and the lease watch. Call once.
    pub fn start(self: &Arc<Self>, settings: ActorSettings) {
        if self.placement.get().is_some() {
            return;
        }
        let types: Vec<String> = settings.types.keys().cloned().collect();
        *self.settings.write().expect("lock") = Arc::new(settings);
        if self.store.is_none() && !types.is_empty() {
            tracing::warn!("the app hosts actors but no state store has actorStateStore: \"true\"; actor state calls will fail");
        }
        let client = PlacementClient::spawn(
            self.cfg.placement.clone(),
            Registration {
                name: self.cfg.host_address.clone(),
                app_id: self.cfg.app_id.clone(),
                actor_types: types.clone(),
                namespace: self.cfg.namespace.clone(),
            },
            self.cfg.placement_options.clone(),
        );
        let tables = client.subscribe();
        let settled = client.subscribe_settled();
        if self.placement.set(client).is_err() {
            return;
        }
        tracing::info!(types = ?types, host = self.cfg.host_address, "actor runtime started");
        let me = self.clone();
        tokio::spawn(async move { me.apply_tables(tables).await });
        let me = self.clone();
        tokio::spawn(async move { me.follow_settled(settled).await });
        let me = self.clone();
        tokio::spawn(async move { me.scan_idle().await });
        let me = self.clone();
        tokio::spawn(async move { me.watch_lease().await });
    }

    async fn follow_settled(self: Arc<Self>, mut rx: watch::Receiver<u64>) {
        loop {
            let v = *rx.borrow_and_update();
            self.settled.send_if_modified(|cur| {
                let grew = v > *cur;
                if grew {
                    *cur = v;
                }
                grew
            });
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    /// Applies each new table: close and drain the activations this host lost, then report the
    /// version as applied.
    async fn apply_tables(self: Arc<Self>, mut rx: watch::Receiver<Table>) {
        loop {
            let table = rx.borrow_and_update().clone();
            if table.version > self.table_version() {
                let rings = Arc::new(Rings::build(&table));
                let listed = table.hosts.iter().any(|h| h.name == self.cfg.host_address);
                // Publish the new view first, then collect what was lost: an activation created
                // (or a turn admitted) under the old view is then either in the map by now, and
                // drained below, or sees the new view and routes again.
                self.view.send_replace(View {
                    rings: rings.clone(),
                    listed,
                });
                let lost: Vec<Arc<Activation>> = {
                    let actors = self.actors.lock().expect("lock");
                    actors
                        .values()
                        .filter(|a| !self.owns(&rings, &a.key))
                        .cloned()
                        .collect()
                };
                if !lost.is_empty() {
                    tracing::debug!(
                        count = lost.len(),
                        version = table.version,
                        "handing off actors"
                    );
                }
                self.deactivate_all(lost, true).await;
                if let Some(c) = self.placement.get() {
                    c.set_applied(table.version);
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    fn owns(&self, rings: &Rings, key: &ActorKey) -> bool {
        rings
            .owner(&key.actor_type, &key.actor_id)
            .is_some_and(|h| h.name == self.cfg.host_address)
    }

    /// [`ActorRuntime::owns`], without hashing the key again when the caller already found
    /// this host to be the owner under the same table version (`owned_at`).
    fn owns_at(&self, rings: &Rings, key: &ActorKey, owned_at: Option<u64>) -> bool {
        owned_at == Some(rings.version()) || self.owns(rings, key)
    }

    /// Drops every activation when the lease lapses: their actors may be given to other hosts.
    async fn watch_lease(self: Arc<Self>) {
        let mut had = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let valid = self.placement_connected();
            if had && !valid {
                let all: Vec<_> = self
                    .actors
                    .lock()
                    .expect("lock")
                    .values()
                    .cloned()
                    .collect();
                tracing::warn!(
                    actors = all.len(),
                    "placement lease lapsed: stopping every actor until the lease is renewed"
                );
                self.deactivate_all(all, false).await;
            }
            had = valid;
        }
    }

    async fn scan_idle(self: Arc<Self>) {
        loop {
            let every = self.settings().scan_interval();
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.now_ms();
            let settings = self.settings();
            let idle: Vec<Arc<Activation>> = self
                .actors
                .lock()
                .expect("lock")
                .values()
                .filter(|a| {
                    let timeout = settings
                        .get(&a.key.actor_type)
                        .map(|t| t.idle_timeout)
                        .unwrap_or(config::DEFAULT_IDLE_TIMEOUT);
                    a.is_idle()
                        && now.saturating_sub(a.last_used_ms()) >= timeout.as_millis() as u64
                })
                .cloned()
                .collect();
            if !idle.is_empty() {
                tracing::debug!(count = idle.len(), "deactivating idle actors");
                self.deactivate_all(idle, true).await;
            }
        }
    }

    /// Closes the activations (no new turns) and retires each once its turn in flight has
    /// ended ([`ActorRuntime::retire`]). With `drain`, waits for that up to the type's drain
    /// timeout, and the turn's state writes still count meanwhile; past it, or without `drain`,
    /// the activation is released (its writes refused) and the retirement finishes in the
    /// background.
    async fn deactivate_all(self: &Arc<Self>, mut acts: Vec<Arc<Activation>>, drain: bool) {
        // In key order, not the map's random order, so that a simulation seed replays exactly.
        acts.sort_by(|a, b| a.key.cmp(&b.key));
        for a in &acts {
            a.close();
        }
        let settings = self.settings();
        let jobs = acts.into_iter().map(|a| {
            let t = settings.get(&a.key.actor_type).cloned().unwrap_or_default();
            let retired = self.retire(&a);
            async move {
                // Always wait for the turn in flight (Dapr skips this with
                // drainRebalancedActors: false; single activation does not allow it).
                if !drain {
                    a.release();
                } else if tokio::time::timeout(t.drain_timeout, retired).await.is_err() {
                    a.release();
                    tracing::warn!(actor = %a.key, "turn still running after drainOngoingCallTimeout: releasing the actor anyway (its state writes are refused from now on)");
                }
            }
        });
        futures::future::join_all(jobs).await;
    }

    /// Retires a closed activation: waits until its turn in flight has ended (the app answered),
    /// tells the app (`DELETE`), then forgets it. Until then no new activation of the actor
    /// starts on this host ([`ActorRuntime::activation`] waits), so a turn the runtime stopped
    /// waiting for never runs beside a new one here. Runs once per activation, in a task of its
    /// own, so that no caller giving up can leave it half done; the returned future ends when
    /// the activation is gone.
    fn retire(
        self: &Arc<Self>,
        a: &Arc<Activation>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        if a.start_retiring() {
            let (me, act) = (self.clone(), a.clone());
            tokio::spawn(async move {
                act.drained().await;
                me.app_deactivate(&act.key).await;
                me.forget(&act);
            });
        }
        let a = a.clone();
        async move { a.retired().await }
    }

    fn forget(&self, a: &Arc<Activation>) {
        {
            let mut actors = self.actors.lock().expect("lock");
            if actors.get(&a.key).is_some_and(|cur| Arc::ptr_eq(cur, a)) {
                actors.remove(&a.key);
                self.metrics.deactivations.fetch_add(1, Ordering::Relaxed);
            }
        }
        a.set_retired();
    }

    async fn app_deactivate(&self, key: &ActorKey) {
        let Some(app) = &self.app else { return };
        let req = AppRequest {
            method: Method::DELETE,
            path: format!(
                "/actors/{}/{}",
                encode(&key.actor_type),
                encode(&key.actor_id)
            ),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        match app.call(req).await {
            Ok(r) if r.status.is_success() => {}
            Ok(r) => {
                tracing::debug!(actor = %key, status = %r.status, "app answered deactivation with an error")
            }
            Err(e) => tracing::debug!(actor = %key, error = %e, "deactivation not delivered"),
        }
    }

    /// Hands every actor off and leaves placement: used on graceful shutdown. The actors are
    /// drained and deactivated *before* the host leaves the table, because placement removes a
    /// leaving host at once and does not wait for it to settle the next version; from the moment
    /// `closing` is set no activation is created here, so nothing runs once it has left.
    pub async fn shutdown(self: &Arc<Self>) {
        let all: Vec<_> = {
            let actors = self.actors.lock().expect("lock");
            self.closing.store(true, Ordering::Release);
            actors.values().cloned().collect()
        };
        self.deactivate_all(all, true).await;
        if let Some(c) = self.placement.get() {
            c.leave();
            // Wait (briefly) for a table without this host, so callers stop routing here.
            let mut rx = c.subscribe();
            let me = self.cfg.host_address.clone();
            let gone = async {
                loop {
                    if !rx.borrow_and_update().hosts.iter().any(|h| h.name == me) {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(3), gone)
                .await
                .is_err()
            {
                tracing::warn!("placement did not confirm that this host left; stopping anyway");
            }
        }
        self.stop.cancel();
        if let Some(c) = self.placement.get() {
            c.stop();
        }
    }

    /// Waits until the view reaches `version` (or a short pause when it already has), bounded
    /// by `deadline`.
    async fn wait_version(&self, version: u64, deadline: Instant) {
        let mut rx = self.view.subscribe();
        if rx.borrow().rings.version() >= version {
            tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(20)))
                .await;
            return;
        }
        let _ =
            tokio::time::timeout_at(deadline, rx.wait_for(|v| v.rings.version() >= version)).await;
    }

    /// Calls an actor wherever it lives. `path` is what follows `/actors/{type}/{id}/` on the
    /// app channel (`method/Foo`, `method/timer/t`, `method/remind/r`).
    pub async fn call(
        self: &Arc<Self>,
        key: &ActorKey,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<AppResponse, CallError> {
        let deadline = Instant::now() + self.cfg.call_timeout;
        let waited_until = Instant::now() + Duration::from_secs(5);
        loop {
            if Instant::now() >= deadline {
                return Err(CallError::invoke(format!(
                    "timed out after {:?} routing the call to actor {key}",
                    self.cfg.call_timeout
                )));
            }
            let rings = self.view.borrow().rings.clone();
            // Version 0 with a lease is placement's answer "no hosts yet"; without one, wait a
            // little for the first table.
            if rings.version() == 0 && !self.placement_connected() {
                self.wait_version(1, deadline.min(Instant::now() + Duration::from_secs(5)))
                    .await;
                if self.table_version() == 0 && !self.placement_connected() {
                    return Err(CallError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "ERR_ACTOR_NO_PLACEMENT",
                        "no placement table yet: is the placement service reachable?",
                    ));
                }
                continue;
            }
            let Some(owner) = rings.owner(&key.actor_type, &key.actor_id) else {
                // This host serves the type but is not in the table yet (it just registered):
                // wait for the table that lists it.
                if self.settings().types.contains_key(&key.actor_type)
                    && !self.closing.load(Ordering::Acquire)
                    && Instant::now() < waited_until
                {
                    self.wait_version(rings.version() + 1, deadline.min(waited_until))
                        .await;
                    continue;
                }
                return Err(CallError::new(
                    StatusCode::NOT_FOUND,
                    "ERR_ACTOR_NO_ADDRESS",
                    format!(
                        "did not find address for actor {key}: no host serves actor type {:?} (table version {})",
                        key.actor_type,
                        rings.version()
                    ),
                ));
            };
            let outcome = if owner.name == self.cfg.host_address {
                self.metrics.local_calls.fetch_add(1, Ordering::Relaxed);
                self.call_local(
                    key,
                    path,
                    &headers,
                    body.clone(),
                    rings.version(),
                    Some(rings.version()),
                    deadline,
                )
                .await
            } else {
                self.metrics.remote_calls.fetch_add(1, Ordering::Relaxed);
                self.remote
                    .call(
                        &owner.name,
                        key,
                        path,
                        &headers,
                        body.clone(),
                        rings.version(),
                        deadline,
                    )
                    .await
            };
            match outcome {
                Local::Done(r) => return r,
                Local::Retry(v) => {
                    self.metrics.reroutes.fetch_add(1, Ordering::Relaxed);
                    self.wait_version(
                        v.max(rings.version() + 1),
                        deadline.min(Instant::now() + Duration::from_millis(500)),
                    )
                    .await;
                }
            }
        }
    }

    /// Runs the call here if this host owns the actor under `version` (which is at least the
    /// caller's), else asks the caller to route again. `owned_at`: the table version under
    /// which the caller already found this host to be the owner, if it did.
    #[allow(clippy::too_many_arguments)]
    async fn call_local(
        self: &Arc<Self>,
        key: &ActorKey,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        caller_version: u64,
        owned_at: Option<u64>,
        deadline: Instant,
    ) -> Local {
        if self.table_version() < caller_version {
            self.wait_version(
                caller_version,
                deadline.min(Instant::now() + Duration::from_secs(1)),
            )
            .await;
        }
        let Some(app) = self.app.clone() else {
            return Local::Done(Err(CallError::new(
                StatusCode::BAD_REQUEST,
                "ERR_ACTOR_NO_APP_CHANNEL",
                "this host has no app (--app-port) to run actors",
            )));
        };
        let settings = self.settings();
        let Some(type_settings) = settings.get(&key.actor_type).cloned() else {
            return Local::Retry(self.table_version());
        };
        // The chain id matters only with reentrancy: no id (and no random draw) without it.
        let chain = if type_settings.reentrancy.is_some() {
            turn_chain(headers)
        } else {
            String::new()
        };
        let turn = match self
            .turn(key, &chain, type_settings.reentrancy, owned_at, deadline)
            .await
        {
            Ok(t) => t,
            Err(l) => return l,
        };
        let mut headers = headers.clone();
        if type_settings.reentrancy.is_some() {
            if let Ok(v) = HeaderValue::from_str(&chain) {
                headers.insert(REENTRANCY_HEADER, v);
            }
        } else {
            headers.remove(REENTRANCY_HEADER);
        }
        let mut app_path =
            String::with_capacity(10 + key.actor_type.len() + key.actor_id.len() + path.len());
        app_path.push_str("/actors/");
        encode_into(&mut app_path, &key.actor_type);
        app_path.push('/');
        encode_into(&mut app_path, &key.actor_id);
        app_path.push('/');
        app_path.push_str(path);
        let req = AppRequest {
            method: Method::PUT,
            path: app_path,
            headers,
            body,
        };
        let epoch = turn.activation().epoch;
        let result = tokio::time::timeout_at(deadline, self.run_turn(turn, app, req)).await;
        let timed_out = || {
            CallError::invoke(format!(
                "timed out: actor {key} did not answer within {:?} (its turn lasts until the app answers)",
                self.cfg.call_timeout
            ))
        };
        Local::Done(match result {
            // The HTTP channel's own timeout is the call timeout too: whichever fires first,
            // the caller hears the same.
            Err(_) | Ok(Err(app_channel::ChannelError::Timeout(_))) => Err(timed_out()),
            Ok(Err(e)) => Err(CallError::invoke(format!(
                "error invoking actor {key}: {e}"
            ))),
            Ok(Ok(mut r)) => {
                // A reminder's acknowledgement carries the fence of the activation that ran it.
                if path.starts_with("method/remind/") {
                    r.headers.insert(EPOCH_HEADER, HeaderValue::from(epoch));
                }
                Ok(r)
            }
        })
    }

    /// Runs the app's side of a turn, holding the turn until the app answers. Nobody who stops
    /// waiting (a caller that went away, a deadline, a cancelled timer) ends the turn early: the
    /// app may still be running it, so the actor's next turn must wait. The call runs in the
    /// caller's task; only if the caller drops it unfinished does the rest move to a task of its
    /// own ([`TurnCall`]). How long the app may take is the app channel's business (the HTTP
    /// channel has a timeout).
    fn run_turn(
        self: &Arc<Self>,
        turn: Turn,
        app: Arc<dyn AppChannel>,
        req: AppRequest,
    ) -> TurnCall {
        TurnCall {
            call: Some(Box::pin(async move { app.call(req).await })),
            turn: Some(turn),
            runtime: self.clone(),
        }
    }

    /// Finds or creates the activation and takes its turn.
    async fn turn(
        self: &Arc<Self>,
        key: &ActorKey,
        chain: &str,
        reentrancy: Option<u32>,
        owned_at: Option<u64>,
        deadline: Instant,
    ) -> Result<Turn, Local> {
        loop {
            if !self.placement_connected() {
                // No lease: this host may not start turns (its actors may be elsewhere by now).
                return Err(Local::Retry(self.table_version() + 1));
            }
            let act = self.activation(key, owned_at, deadline).await?;
            let entered = tokio::time::timeout_at(deadline, act.enter(chain, reentrancy)).await;
            match entered {
                Err(_) => {
                    return Err(Local::Done(Err(CallError::invoke(format!(
                        "timed out after {:?} waiting for the turn of actor {key} (a call chain that comes back to a busy actor needs reentrancy enabled)",
                        self.cfg.call_timeout
                    )))))
                }
                Ok(Err(TurnError::StackDepth(max))) => {
                    return Err(Local::Done(Err(CallError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "ERR_ACTOR_STACK_DEPTH",
                        format!("maximum stack depth of {max} exceeded for actor {key}"),
                    ))))
                }
                // Closed while we waited (moved, idle, lease): look again.
                Ok(Err(TurnError::Closed)) => continue,
                Ok(Ok(turn)) => {
                    if !self.placement_connected()
                        || !self.owns_at(&self.view.borrow().rings, key, owned_at)
                    {
                        drop(turn);
                        return Err(Local::Retry(self.table_version() + 1));
                    }
                    return Ok(turn);
                }
            }
        }
    }

    /// The live activation of `key`, creating it if this host owns the actor and the barrier
    /// allows.
    async fn activation(
        self: &Arc<Self>,
        key: &ActorKey,
        owned_at: Option<u64>,
        deadline: Instant,
    ) -> Result<Arc<Activation>, Local> {
        loop {
            let rings = self.view.borrow().rings.clone();
            if !self.owns_at(&rings, key, owned_at) {
                return Err(Local::Retry(rings.version() + 1));
            }
            let existing = self.actors.lock().expect("lock").get(key).cloned();
            if let Some(a) = existing {
                if a.is_active() {
                    return Ok(a);
                }
                // The previous activation here is closing, and the app may still be running its
                // last turn: wait until it is retired before starting another.
                let retired = self.retire(&a);
                let wait = tokio::time::timeout_at(
                    deadline.min(Instant::now() + Duration::from_secs(2)),
                    retired,
                )
                .await;
                if wait.is_err() {
                    return Err(Local::Retry(rings.version() + 1));
                }
                continue;
            }
            if self.closing.load(Ordering::Acquire) {
                return Err(Local::Retry(rings.version() + 1));
            }
            // The barrier: the previous owner has applied this version (let the actor go).
            let version = rings.version();
            if *self.settled.borrow() < version {
                let mut rx = self.settled.subscribe();
                let wait = tokio::time::timeout_at(
                    deadline.min(Instant::now() + Duration::from_secs(2)),
                    rx.wait_for(|s| *s >= version),
                )
                .await;
                if wait.is_err() {
                    return Err(Local::Retry(version + 1));
                }
                continue;
            }
            let act = {
                let mut actors = self.actors.lock().expect("lock");
                if self.closing.load(Ordering::Acquire) {
                    return Err(Local::Retry(version + 1));
                }
                // Re-check under the lock: the table may have moved on while we waited.
                if self.view.borrow().rings.version() != version {
                    continue;
                }
                match actors.get(key) {
                    Some(a) if a.is_active() => return Ok(a.clone()),
                    // Closed meanwhile: wait for it to be retired (above).
                    Some(_) => continue,
                    None => {}
                }
                let act = Arc::new(Activation::new(key.clone(), version, self.now_ms()));
                actors.insert(key.clone(), act.clone());
                act
            };
            self.metrics.activations.fetch_add(1, Ordering::Relaxed);
            // Claim the fence before the first turn reads any state.
            if let Some(store) = &self.store {
                match fenced_transact(&*store.store, &self.fence_key(key), version, vec![]).await {
                    Ok(()) => {}
                    Err(FenceError::Stale { ours, stored }) => {
                        tracing::warn!(actor = %key, ours, stored, "a newer activation exists elsewhere: routing again");
                        act.close();
                        self.forget(&act);
                        return Err(Local::Retry(stored));
                    }
                    Err(FenceError::State(e)) => {
                        act.close();
                        self.forget(&act);
                        return Err(Local::Done(Err(CallError::invoke(format!(
                            "cannot activate actor {key}: the actor state store failed: {e}"
                        )))));
                    }
                }
            }
            return Ok(act);
        }
    }

    /// `<appId>||<type>||<id>||<key>`: Dapr's actor state key scheme.
    pub fn state_key(&self, key: &ActorKey, name: &str) -> String {
        format!(
            "{}||{}||{}||{}",
            self.cfg.app_id, key.actor_type, key.actor_id, name
        )
    }

    fn fence_key(&self, key: &ActorKey) -> String {
        format!(
            "{}||{}||{}||__fence",
            self.cfg.app_id, key.actor_type, key.actor_id
        )
    }

    /// The local activation, if this host runs the actor now.
    pub fn local(&self, key: &ActorKey) -> Option<Arc<Activation>> {
        self.actors
            .lock()
            .expect("lock")
            .get(key)
            .filter(|a| a.is_active())
            .cloned()
    }

    /// A transactional write of actor state, fenced by the activation's epoch. Refused (and
    /// counted) when the actor is not active here, the lease has lapsed, or a newer activation
    /// has written.
    pub async fn save_state(&self, key: &ActorKey, ops: Vec<Op>) -> Result<(), CallError> {
        let Some(store) = &self.store else {
            return Err(no_store());
        };
        let stale = |msg: String| {
            self.metrics
                .stale_writes_rejected
                .fetch_add(1, Ordering::Relaxed);
            CallError::new(
                StatusCode::CONFLICT,
                "ERR_ACTOR_STATE_TRANSACTION_SAVE",
                msg,
            )
        };
        // A closed activation still draining its turn in flight may write; a released one may not.
        let act = self
            .actors
            .lock()
            .expect("lock")
            .get(key)
            .filter(|a| a.accepts_writes())
            .cloned();
        let Some(act) = act else {
            return Err(stale(format!(
                "actor {key} is not active on this host (it moved, went idle, or this host lost its placement lease): write refused"
            )));
        };
        if !self.placement_connected() {
            return Err(stale(format!(
                "this host's placement lease has lapsed: write to actor {key} refused"
            )));
        }
        match fenced_transact(&*store.store, &self.fence_key(key), act.epoch, ops).await {
            Ok(()) => Ok(()),
            Err(FenceError::Stale { ours, stored }) => {
                act.release();
                Err(stale(format!(
                    "actor {key} has a newer activation (epoch {stored} > {ours}): write refused"
                )))
            }
            Err(FenceError::State(e)) => Err(CallError::new(
                if matches!(e, components::state::StateError::EtagMismatch { .. }) {
                    StatusCode::CONFLICT
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                },
                "ERR_ACTOR_STATE_TRANSACTION_SAVE",
                format!("error saving actor state: {e}"),
            )),
        }
    }

    /// Reads one actor state key.
    pub async fn get_state(
        &self,
        key: &ActorKey,
        name: &str,
    ) -> Result<Option<components::state::StateItem>, CallError> {
        let Some(store) = &self.store else {
            return Err(no_store());
        };
        store
            .store
            .get(&self.state_key(key, name))
            .await
            .map_err(|e| {
                CallError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ERR_ACTOR_STATE_GET",
                    format!("error getting actor state: {e}"),
                )
            })
    }

    /// Prometheus lines for the actor runtime.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let mut s = String::new();
        let mut line = |name: &str, help: &str, kind: &str, v: u64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        };
        line(
            "tessera_actor_stale_writes_rejected_total",
            "Actor state writes refused because they came from a stale activation.",
            "counter",
            m.stale_writes_rejected.load(Ordering::Relaxed),
        );
        line(
            "tessera_actor_activations_total",
            "Actor activations created on this host.",
            "counter",
            m.activations.load(Ordering::Relaxed),
        );
        line(
            "tessera_actor_deactivations_total",
            "Actor activations ended on this host.",
            "counter",
            m.deactivations.load(Ordering::Relaxed),
        );
        line(
            "tessera_actor_active",
            "Actor activations alive on this host.",
            "gauge",
            self.active_total() as u64,
        );
        line(
            "tessera_actor_reroutes_total",
            "Actor calls routed again after a table change or a wrong owner.",
            "counter",
            m.reroutes.load(Ordering::Relaxed),
        );
        line(
            "tessera_actor_table_version",
            "The placement table version this host routes by.",
            "gauge",
            self.table_version(),
        );
        s
    }

    pub fn app(&self) -> Option<&Arc<dyn AppChannel>> {
        self.app.as_ref()
    }
}

fn no_store() -> CallError {
    CallError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "ERR_ACTOR_RUNTIME_NOT_FOUND",
        "actors need a state store with actorStateStore: \"true\" in its metadata",
    )
}

type AppCall = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<AppResponse, app_channel::ChannelError>> + Send>,
>;

/// The app's side of one turn ([`ActorRuntime::run_turn`]): ends the turn when the app answers;
/// dropped before that, it hands the unfinished call and the turn to a task that ends the turn
/// when the app does answer.
pub(crate) struct TurnCall {
    call: Option<AppCall>,
    turn: Option<Turn>,
    runtime: Arc<ActorRuntime>,
}

impl TurnCall {
    fn finish(runtime: &ActorRuntime, turn: Turn) {
        turn.activation().touch(runtime.now_ms());
        drop(turn);
    }
}

impl std::future::Future for TurnCall {
    type Output = Result<AppResponse, app_channel::ChannelError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(call) = self.call.as_mut() else {
            return std::task::Poll::Ready(Err(app_channel::ChannelError::Unreachable(
                "the turn's call was already answered".into(),
            )));
        };
        let out = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        if let Some(turn) = self.turn.take() {
            TurnCall::finish(&self.runtime, turn);
        }
        std::task::Poll::Ready(out)
    }
}

impl Drop for TurnCall {
    fn drop(&mut self) {
        let (Some(call), Some(turn)) = (self.call.take(), self.turn.take()) else {
            return;
        };
        let runtime = self.runtime.clone();
        // Without a runtime (the process is shutting down) nothing runs turns any more.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = call.await;
                TurnCall::finish(&runtime, turn);
            });
        }
    }
}

/// The reentrancy id of the call chain: the caller's, or a fresh one.
fn turn_chain(headers: &HeaderMap) -> String {
    headers
        .get(REENTRANCY_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Percent-encodes a path segment for the app channel.
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    encode_into(&mut out, segment);
    out
}

/// [`encode`], appending to `out`.
pub fn encode_into(out: &mut String, segment: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_unreserved_bytes_and_escapes_the_rest() {
        assert_eq!(encode("Abc-1_2.3~"), "Abc-1_2.3~");
        assert_eq!(encode("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(encode("é"), "%C3%A9");
        let mut s = String::from("x/");
        encode_into(&mut s, "?");
        assert_eq!(s, "x/%3F");
    }
}
