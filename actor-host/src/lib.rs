//! The Tessera actor host: the sidecar an application talks to on Dapr's HTTP API.
//!
//! It owns the host's loaded components, the HTTP API on `--dapr-http-port` and the host's
//! lifecycle (readiness, graceful shutdown). The actor runtime joins it with the actor issue.
//!
//! # Layout
//! - [`HostConfig`] / [`Host::start`]: load components from the resources paths (or the embedded
//!   default `statestore`), refusing to start on any error.
//! - [`run`]: serve the API on a listener until the shutdown future or `POST /v1.0/shutdown`.
//! - `state_api`: `/v1.0/state/...`; `meta_api`: metadata, health, shutdown, API token.
//! - [`error::ApiError`]: Dapr's `{"errorCode","message"}` errors, mapped in one place.

pub mod body;
pub mod error;
mod meta_api;
pub mod state_api;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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
        let app_ready = AtomicBool::new(config.app_port.is_none());
        let extended = RwLock::new(config.extended.clone());
        Ok(Host {
            shared: Arc::new(Shared {
                config,
                stores,
                component_order: order,
                extended,
                app_ready,
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/v1.0/state/{store}",
                post(state_api::save).put(state_api::save),
            )
            .route("/v1.0/state/{store}/{key}", any(state_api::keyed))
            .route("/v1.0/metadata", get(meta_api::metadata))
            .route("/v1.0/metadata/{key}", put(meta_api::put_metadata))
            .route("/v1.0/healthz", get(meta_api::healthz))
            .route("/v1.0/healthz/outbound", get(meta_api::healthz_outbound))
            .route("/v1.0/shutdown", post(meta_api::shutdown))
            .fallback(meta_api::not_found)
            .method_not_allowed_fallback(meta_api::method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                self.shared.clone(),
                meta_api::api_token,
            ))
            .with_state(self.shared.clone())
    }

    /// Cancelled by `POST /v1.0/shutdown`; cancel it to stop [`run`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Marks the app channel ready once the app accepts TCP connections on its port.
    fn spawn_app_probe(&self) {
        let Some(port) = self.shared.config.app_port else {
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

/// Serves the HTTP API on `listener` until `shutdown` resolves or `POST /v1.0/shutdown`,
/// then finishes in-flight requests and returns.
pub async fn run(
    listener: TcpListener,
    host: Host,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    host.spawn_app_probe();
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
    axum::serve(listener, host.router())
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await
}
