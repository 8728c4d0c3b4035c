//! The Tessera actor host: the sidecar an application talks to on Dapr's HTTP and gRPC APIs.
//!
//! It owns the host's loaded components, the HTTP API on `--dapr-http-port` and the host's
//! lifecycle (readiness, graceful shutdown), and the actor runtime ([`actors`]).
//!
//! # Layout
//! - [`HostConfig`] / [`Host::start`]: load components from the resources paths (or the embedded
//!   default `statestore`), refusing to start on any error.
//! - [`run`]: serve the API on a listener until the shutdown future or `POST /v1.0/shutdown`.
//! - `state_api`: `/v1.0/state/...`; `meta_api`: metadata, health, shutdown, API token.
//! - [`grpc_api`]: Dapr's gRPC API on `--dapr-grpc-port` (state and actors), on the same
//!   functions as the HTTP API.
//! - [`actors`]: the actor runtime (placement client, activations, turns, fencing, timers), its
//!   HTTP API (`/v1.0/actors/...`) and the internal port other hosts forward actor calls to.
//! - Without `--placement-host-address` the host embeds a single-node placement (standalone), and
//!   without `--scheduler-host-address` the scheduler ([`jobs`]).
//! - [`error::ApiError`]: Dapr's `{"errorCode","message"}` errors, mapped in one place.

pub mod actors;
pub mod body;
pub mod error;
pub mod grpc_api;
pub mod jobs;
pub(crate) mod meta_api;
pub mod state_api;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actors::app_channel::{AppChannel, HttpChannel};
use actors::{ActorRuntime, ActorStore, RuntimeConfig};
use axum::routing::{any, get, post, put};
use axum::Router;
use components::resources::{self, ComponentError, ComponentSpec, LoadContext};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use state_api::{KeyPrefix, StoreEntry};

/// Dapr's default `--max-body-size`: 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Everything the host needs to start.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub app_id: String,
    /// The app's port; `None` runs the host without an app channel.
    pub app_port: Option<u16>,
    pub app_channel_address: String,
    /// `--resources-path` directories; empty means the embedded default components.
    pub resources_paths: Vec<PathBuf>,
    /// Where embedded stores keep their files.
    pub data_dir: PathBuf,
    pub namespace: String,
    pub max_body_bytes: usize,
    /// `DAPR_API_TOKEN`: when set, every API call but the health checks must carry it.
    pub api_token: Option<String>,
    /// Initial `extended` metadata (`appCommand`, `cliPID`, ...).
    pub extended: BTreeMap<String, String>,
    /// Placement replicas (`--placement-host-address`); empty embeds a single-node placement.
    pub placement_addresses: Vec<String>,
    /// Scheduler replicas (`--scheduler-host-address`); empty embeds the scheduler.
    pub scheduler_addresses: Vec<String>,
    /// Where the internal (host-to-host) port listens (`--dapr-internal-grpc-port`).
    pub internal_listen: SocketAddr,
    /// The longest an actor call may take in all: routing, waiting for the turn, the app.
    pub actor_call_timeout: Duration,
    /// `APP_API_TOKEN`: sent to the app as `dapr-api-token`.
    pub app_api_token: Option<String>,
    /// How often this host heartbeats to placement.
    pub placement_heartbeat: Duration,
}

impl HostConfig {
    pub fn new(app_id: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        HostConfig {
            app_id: app_id.into(),
            app_port: None,
            app_channel_address: "127.0.0.1".into(),
            resources_paths: Vec::new(),
            data_dir: data_dir.into(),
            namespace: "default".into(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            api_token: None,
            extended: BTreeMap::new(),
            placement_addresses: Vec::new(),
            scheduler_addresses: Vec::new(),
            internal_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            actor_call_timeout: Duration::from_secs(60),
            app_api_token: None,
            placement_heartbeat: Duration::from_secs(1),
        }
    }
}

/// Why the host did not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr} for the internal host-to-host port: {source}; pick another --dapr-internal-grpc-port")]
    Internal {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded placement: {0}")]
    Placement(#[from] placement::server::Error),
    #[error("jobs backend: {0}")]
    Scheduler(#[from] jobs::StartError),
}

/// State shared by every request handler.
pub struct Shared {
    pub config: HostConfig,
    pub stores: HashMap<String, StoreEntry>,
    /// Component order as loaded, for the metadata API.
    pub component_order: Vec<String>,
    pub extended: RwLock<BTreeMap<String, String>>,
    /// The app answers on its port (or there is no app).
    pub app_ready: AtomicBool,
    pub shutdown: CancellationToken,
    pub actors: Arc<ActorRuntime>,
    /// App jobs and actor reminders: the embedded scheduler, or the scheduler service.
    pub jobs: Arc<dyn scheduler::backend::JobsBackend>,
    /// Stops the internal service and the embedded placement, after the actors are handed off.
    background: CancellationToken,
    stopped: tokio::sync::OnceCell<()>,
}

/// A started host: components loaded and opened, ready to serve.
#[derive(Clone)]
pub struct Host {
    shared: Arc<Shared>,
}

impl Host {
    /// Loads and opens every component. Any failure stops the start (a component with
    /// `ignoreErrors: true` is skipped with a warning instead).
    pub async fn start(config: HostConfig) -> Result<Host, HostError> {
        if config.app_id.is_empty() || config.app_id.contains("||") {
            return Err(HostError::Config(
                "--app-id is required and may not contain '||'".into(),
            ));
        }
        let specs = if config.resources_paths.is_empty() {
            tracing::info!("no --resources-path given: using the embedded default state store `statestore` (state.sled)");
            vec![resources::default_state_store()]
        } else {
            let ctx = LoadContext {
                app_id: config.app_id.clone(),
                namespace: config.namespace.clone(),
            };
            resources::load_dirs(&config.resources_paths, &ctx)?
        };
        let actor_stores: Vec<&ComponentSpec> =
            specs.iter().filter(|s| s.is_actor_state_store()).collect();
        if actor_stores.len() > 1 {
            let names: Vec<&str> = actor_stores.iter().map(|s| s.name.as_str()).collect();
            return Err(HostError::Config(format!(
                "more than one state store has actorStateStore: \"true\" ({}); mark exactly one",
                names.join(", ")
            )));
        }
        let mut stores = HashMap::new();
        let mut order = Vec::new();
        for spec in specs {
            let opened = async {
                let prefix = KeyPrefix::from_spec(&spec)?;
                let store = resources::open_state_store(&spec, &config.data_dir).await?;
                Ok::<_, ComponentError>((prefix, store))
            }
            .await;
            match opened {
                Ok((prefix, store)) => {
                    tracing::info!(component = spec.name, kind = spec.kind, "component loaded");
                    order.push(spec.name.clone());
                    stores.insert(
                        spec.name.clone(),
                        StoreEntry {
                            spec,
                            store,
                            prefix,
                        },
                    );
                }
                Err(e) if spec.ignore_errors => {
                    tracing::warn!(error = %e, "component skipped (ignoreErrors: true)")
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !config.placement_addresses.is_empty() {
            if let Some(e) = stores
                .values()
                .find(|e| e.spec.is_actor_state_store() && e.spec.kind == "state.sled")
            {
                return Err(HostError::Config(format!(
                    "the actor state store {:?} is state.sled, which lives on this host's disk only: with --placement-host-address actors move between hosts, so use a store every host reaches (state.redis, state.postgresql) and mark it actorStateStore: \"true\"",
                    e.spec.name
                )));
            }
        }
        let actor_store = stores
            .values()
            .find(|e| e.spec.is_actor_state_store())
            .map(|e| ActorStore {
                name: e.spec.name.clone(),
                store: e.store.clone(),
            });
        let background = CancellationToken::new();
        let internal = TcpListener::bind(config.internal_listen)
            .await
            .map_err(|source| HostError::Internal {
                addr: config.internal_listen,
                source,
            })?;
        let internal_addr = internal
            .local_addr()
            .map_err(|source| HostError::Internal {
                addr: config.internal_listen,
                source,
            })?;
        let host_address = format!("{}:{}", advertised_ip(internal_addr), internal_addr.port());
        let placement = if config.placement_addresses.is_empty() {
            vec![embedded_placement(&config, &host_address, background.clone()).await?]
        } else {
            config.placement_addresses.clone()
        };
        let app: Option<Arc<dyn AppChannel>> = config.app_port.map(|port| {
            Arc::new(HttpChannel::new(
                &config.app_channel_address,
                port,
                config.actor_call_timeout,
                config.app_api_token.clone(),
            )) as Arc<dyn AppChannel>
        });
        let runtime = ActorRuntime::new(
            RuntimeConfig {
                app_id: config.app_id.clone(),
                namespace: config.namespace.clone(),
                host_address,
                placement,
                placement_options: placement::client::Options {
                    heartbeat: config.placement_heartbeat,
                    dial: placement::network::tcp(),
                },
                connect: actors::remote::tcp(),
                call_timeout: config.actor_call_timeout,
            },
            app,
            actor_store,
        );
        tokio::spawn(actors::remote::serve_tcp(
            internal,
            runtime.clone(),
            background.clone(),
        ));
        tracing::info!(
            address = runtime.host_address(),
            "internal port listening for other hosts"
        );
        let jobs = jobs::start(
            &config.data_dir.join("scheduler"),
            &config.scheduler_addresses,
            scheduler::job::AppScope {
                app_id: config.app_id.clone(),
                namespace: config.namespace.clone(),
            },
            runtime.clone(),
            background.clone(),
        )?;
        let app_ready = AtomicBool::new(config.app_port.is_none());
        let extended = RwLock::new(config.extended.clone());
        let host = Host {
            shared: Arc::new(Shared {
                config,
                stores,
                component_order: order,
                extended,
                app_ready,
                shutdown: CancellationToken::new(),
                actors: runtime,
                jobs,
                background,
                stopped: tokio::sync::OnceCell::new(),
            }),
        };
        host.spawn_app_probe();
        Ok(host)
    }

    /// Hands the actors off, leaves placement, then stops the internal service (and the
    /// embedded placement). Idempotent.
    pub async fn stop(&self) {
        let shared = self.shared.clone();
        self.shared
            .stopped
            .get_or_init(|| async move {
                shared.actors.shutdown().await;
                shared.background.cancel();
            })
            .await;
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        let router = Router::new()
            .route(
                "/v1.0/state/{store}",
                post(state_api::save).put(state_api::save),
            )
            .route("/v1.0/state/{store}/{key}", any(state_api::keyed))
            .route(
                "/v1.0/actors/{type}/{id}/method/{method}",
                any(actors::api::invoke),
            )
            .route(
                "/v1.0/actors/{type}/{id}/state",
                post(actors::api::save_state).put(actors::api::save_state),
            )
            .route(
                "/v1.0/actors/{type}/{id}/state/{key}",
                get(actors::api::get_state),
            )
            .route(
                "/v1.0/actors/{type}/{id}/timers/{name}",
                any(actors::api::timer),
            )
            .route(
                "/v1.0/actors/{type}/{id}/reminders/{name}",
                any(jobs::reminder),
            )
            .route("/v1.0-alpha1/jobs/{name}", any(jobs::job))
            .route("/v1.0/jobs/{name}", any(jobs::job))
            .route("/v1.0/metadata", get(meta_api::metadata))
            .route("/v1.0/metadata/{key}", put(meta_api::put_metadata))
            .route("/v1.0/healthz", get(meta_api::healthz))
            .route("/v1.0/healthz/outbound", get(meta_api::healthz_outbound))
            .route("/v1.0/shutdown", post(meta_api::shutdown))
            .fallback(meta_api::not_found)
            .method_not_allowed_fallback(meta_api::method_not_allowed);
        // The token check costs a middleware hop per request: only when a token is set.
        let router = if self.shared.config.api_token.is_some() {
            router.layer(axum::middleware::from_fn_with_state(
                self.shared.clone(),
                meta_api::api_token,
            ))
        } else {
            router
        };
        router.with_state(self.shared.clone())
    }

    /// The HTTP API as [`run`] serves it: the router, with the actor invoke route (the one hot
    /// path) answered before routing when no API token is set.
    pub fn service(&self) -> ApiService {
        ApiService {
            router: self.router(),
            shared: self.shared.clone(),
        }
    }

    /// Cancelled by `POST /v1.0/shutdown`; cancel it to stop [`run`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Marks the app channel ready once the app accepts TCP connections on its port, then asks
    /// the app which actor types it hosts and starts the actor runtime with them.
    fn spawn_app_probe(&self) {
        let Some(port) = self.shared.config.app_port else {
            self.shared
                .actors
                .start(actors::config::ActorSettings::default());
            return;
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let addr = format!("{}:{port}", shared.config.app_channel_address);
            let mut logged = false;
            loop {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    r = tokio::net::TcpStream::connect(&addr) => {
                        if r.is_ok() {
                            shared.app_ready.store(true, Ordering::Release);
                            tracing::info!(%addr, "app channel is ready");
                            let settings = discover(&shared).await;
                            shared.actors.start(settings);
                            return;
                        }
                    }
                }
                if !logged {
                    tracing::info!(%addr, "waiting for the app to listen");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

/// `GET /dapr/config` on the app: 3 tries, 500 ms apart doubling. No answer, 404 or a
/// document that does not parse means the app hosts no actors (it can still call them).
async fn discover(shared: &Shared) -> actors::config::ActorSettings {
    let Some(app) = shared.actors.app().cloned() else {
        return Default::default();
    };
    let mut wait = Duration::from_millis(500);
    for attempt in 1..=3 {
        let req = actors::app_channel::AppRequest {
            method: axum::http::Method::GET,
            path: "/dapr/config".into(),
            headers: Default::default(),
            body: Default::default(),
        };
        match app.call(req).await {
            Ok(r) if r.status.is_success() => {
                return match actors::config::parse(&r.body) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "the app's /dapr/config is not JSON: hosting no actors");
                        Default::default()
                    }
                }
            }
            Ok(r) if r.status == axum::http::StatusCode::NOT_FOUND => return Default::default(),
            Ok(r) => tracing::warn!(status = %r.status, attempt, "GET /dapr/config failed"),
            Err(e) => tracing::warn!(error = %e, attempt, "GET /dapr/config failed"),
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    tracing::warn!("the app did not answer GET /dapr/config: hosting no actors");
    Default::default()
}

/// The IP other hosts use to reach this one: the listen address, or loopback for a wildcard.
fn advertised_ip(addr: SocketAddr) -> std::net::IpAddr {
    if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    }
}

/// Standalone mode: a single-node placement in this process, on a loopback port, with its Raft
/// state under the data directory (so table versions, and with them fencing epochs, keep growing
/// across restarts).
async fn embedded_placement(
    config: &HostConfig,
    host_address: &str,
    stop: CancellationToken,
) -> Result<String, HostError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| HostError::Config(format!("cannot start the embedded placement: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| HostError::Config(format!("cannot start the embedded placement: {e}")))?
        .to_string();
    let node = placement::server::Node::start(placement::server::Config::single(
        config.data_dir.join("placement"),
        addr.clone(),
    ))
    .await?;
    {
        let (node, keep) = (node.clone(), host_address.to_string());
        tokio::spawn(async move { node.forget_hosts_except(&keep).await });
    }
    tokio::spawn(async move {
        if let Err(e) =
            placement::server::run(node, listener, None, async move { stop.cancelled().await })
                .await
        {
            tracing::error!(error = %e, "embedded placement stopped");
        }
    });
    tracing::info!(%addr, "embedded single-node placement started");
    Ok(addr)
}

/// Serves the HTTP API on `listener` until `shutdown` resolves or `POST /v1.0/shutdown`,
/// then finishes in-flight requests and returns.
pub async fn run(
    listener: TcpListener,
    host: Host,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = host.shutdown_token();
    let stop = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => stop.cancel(),
            _ = stop.cancelled() => {}
        }
    });
    let addr = listener.local_addr()?;
    tracing::info!(%addr, app_id = host.shared.config.app_id, "HTTP API listening");
    let stopping = host.clone();
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    use axum::ServiceExt;
    axum::serve(listener, host.service().into_make_service())
        .with_graceful_shutdown(async move {
            token.cancelled().await;
            // Hand the actors off while the API still answers (their apps may call back).
            stopping.stop().await;
        })
        .await
}

/// [`Host::service`]: the router, with `/v1.0/actors/{type}/{id}/method/{method}` answered
/// without routing and extraction (it is where the calls are). The answer is the routed
/// handler's: the same function serves both ([`actors::api::invoke_call`]).
#[derive(Clone)]
pub struct ApiService {
    router: Router,
    shared: Arc<Shared>,
}

type ApiFuture = futures::future::Either<
    <Router as tower::Service<axum::extract::Request>>::Future,
    futures::future::BoxFuture<'static, Result<axum::response::Response, std::convert::Infallible>>,
>;

impl tower::Service<axum::extract::Request> for ApiService {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = ApiFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        use axum::response::IntoResponse;
        if self.shared.config.api_token.is_none() {
            if let Some((t, id, m)) = actors::api::fast_invoke_route(req.uri().path()) {
                let (t, id, m) = (t.to_string(), id.to_string(), m.to_string());
                let shared = self.shared.clone();
                let (parts, body) = req.into_parts();
                return futures::future::Either::Right(Box::pin(async move {
                    let r = actors::api::invoke_call(
                        &shared,
                        t,
                        id,
                        &m,
                        parts.method,
                        parts.headers,
                        body,
                    )
                    .await;
                    Ok(r.into_response())
                }));
            }
        }
        futures::future::Either::Left(tower::Service::call(&mut self.router, req))
    }
}
