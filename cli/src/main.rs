//! The `tessera` binary: `run` (a sidecar plus your app, like `dapr run`), `host` (the sidecar
//! alone, like `daprd`), and the control plane: `placement` and `scheduler`. Flags and
//! environment variables follow Dapr's names.

mod app;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use actor_host::{Host, HostConfig};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: a distributed application runtime with Dapr's APIs",
    long_about = "Tessera: a distributed application runtime with Dapr's APIs.\n\n\
        Start a sidecar next to your app with `tessera run --app-id myapp -- python app.py`; \
        the app reaches it on http://localhost:3500 (DAPR_HTTP_PORT) exactly as it would reach Dapr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a sidecar and, if a command follows `--`, your app with it (like `dapr run`).
    ///
    /// The app gets DAPR_HTTP_PORT, DAPR_GRPC_PORT, APP_ID and APP_PORT in its environment and
    /// its output is prefixed with `== APP ==`. Ctrl-C stops both; when the app exits, the
    /// sidecar stops too and `tessera run` exits with the app's code.
    Run {
        #[command(flatten)]
        host: HostArgs,
        /// The app command and its arguments, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Start the sidecar alone (like `daprd`), for an app started some other way.
    ///
    /// The sidecar shares the machine with its app, so it runs half as many worker threads as
    /// there are cores (at least 1; also under `tessera run`). TOKIO_WORKER_THREADS=N sets
    /// another number.
    Host {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Run a placement replica: the Raft-replicated service that tells actor hosts which host
    /// owns which actor (like Dapr's `placement`).
    ///
    /// One replica alone by default; for a cluster start 3 (or 5) with the same
    /// --initial-cluster and their own --id.
    Placement(PlacementArgs),
    /// Run a scheduler replica: durable jobs and actor reminders, triggered to the hosts that
    /// watch them (like Dapr's `scheduler`). Hosts use it with --scheduler-host-address.
    Scheduler(SchedulerArgs),
}

#[derive(Args, Clone)]
struct SchedulerArgs {
    /// This replica's id in --initial-cluster.
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// Every replica as id=host:port, comma-separated [default: <id>=127.0.0.1:<port>]. With
    /// more than one, the jobs are replicated with Raft and the replicas share the firing
    /// (hosts list every replica in --scheduler-host-address).
    #[arg(long, value_name = "ID=ADDR,...")]
    initial_cluster: Option<String>,
    /// gRPC port for hosts (and for Raft between replicas).
    #[arg(long, default_value_t = 50006)]
    port: u16,
    /// Address the ports listen on.
    #[arg(long, default_value = "127.0.0.1")]
    listen_address: std::net::IpAddr,
    /// Port of GET /healthz and GET /metrics.
    #[arg(long, default_value_t = 8082)]
    healthz_port: u16,
    /// Where jobs live [default: ~/.tessera/scheduler/<id>].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// How long a host may take to acknowledge a trigger before the delivery counts as failed.
    #[arg(long, default_value = "30s")]
    ack_timeout: String,
    /// Log level: debug, info, warn or error (RUST_LOG overrides it).
    #[arg(long, env = "DAPR_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// `~/.tessera/<service>/<id>`: where a replica keeps its data without --data-dir.
fn default_service_dir(service: &str, id: u64) -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".tessera").join(service).join(id.to_string())
}

/// Binds a replica's listener, saying which flag to change when the port is taken.
async fn bind(
    ip: IpAddr,
    port: u16,
    flag: &str,
) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let addr = SocketAddr::new(ip, port);
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: pick another {flag}"))?;
    Ok((l, addr))
}

async fn run_scheduler(args: SchedulerArgs) -> anyhow::Result<u8> {
    let cluster = args
        .initial_cluster
        .clone()
        .unwrap_or_else(|| format!("{}=127.0.0.1:{}", args.id, args.port));
    let peers = scheduler::server::parse_initial_cluster(&cluster).context("--initial-cluster")?;
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| default_service_dir("scheduler", args.id));
    let (grpc, grpc_addr) = bind(args.listen_address, args.port, "--port").await?;
    let (http, http_addr) = bind(args.listen_address, args.healthz_port, "--healthz-port").await?;
    let cfg = scheduler::server::Config {
        id: args.id,
        peers,
        data_dir,
        ack_timeout: parse_duration(&args.ack_timeout).context("--ack-timeout")?,
        engine: Default::default(),
        timing: Default::default(),
        dial: placement::network::tcp(),
    };
    tracing::info!(id = args.id, %grpc_addr, %http_addr, "starting scheduler replica");
    scheduler::server::run(cfg, grpc, http, signal()).await?;
    tracing::info!("scheduler replica stopped");
    Ok(0)
}

#[derive(Args, Clone)]
struct PlacementArgs {
    /// This replica's id in --initial-cluster.
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// Every replica as id=host:port, comma-separated [default: <id>=127.0.0.1:<port>].
    #[arg(long, value_name = "ID=ADDR,...")]
    initial_cluster: Option<String>,
    /// gRPC port for hosts and for Raft between replicas.
    #[arg(long, default_value_t = 50005)]
    port: u16,
    /// Address the gRPC port listens on.
    #[arg(long, default_value = "127.0.0.1")]
    listen_address: std::net::IpAddr,
    /// Port of GET /healthz, GET /metrics and (with --metadata-enabled) GET /placement/state.
    #[arg(long, default_value_t = 8081)]
    healthz_port: u16,
    /// Where the Raft log and snapshots live [default: ~/.tessera/placement/<id>].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Serve GET /placement/state on the health port.
    #[arg(long)]
    metadata_enabled: bool,
    /// How long a host may go without a heartbeat before it leaves the table (e.g. 5s, 2500ms).
    #[arg(long, default_value = "5s")]
    lease: String,
    /// Log level: debug, info, warn or error (RUST_LOG overrides it).
    #[arg(long, env = "DAPR_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// Parses `5s`, `2500ms`, `1m`.
fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?}: expected e.g. 5s or 2500ms"))?;
    Ok(match unit {
        "ms" => std::time::Duration::from_millis(n),
        "h" => std::time::Duration::from_secs(n * 3600),
        "s" | "" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n * 60),
        other => bail!("invalid duration unit {other:?} in {s:?}: use ms, s, m or h"),
    })
}

async fn run_placement(args: PlacementArgs) -> anyhow::Result<u8> {
    let cluster = args
        .initial_cluster
        .clone()
        .unwrap_or_else(|| format!("{}=127.0.0.1:{}", args.id, args.port));
    let peers = placement::server::parse_initial_cluster(&cluster).context("--initial-cluster")?;
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| default_service_dir("placement", args.id));
    let (grpc, grpc_addr) = bind(args.listen_address, args.port, "--port").await?;
    let (http, http_addr) = bind(args.listen_address, args.healthz_port, "--healthz-port").await?;
    let cfg = placement::server::Config {
        id: args.id,
        peers,
        data_dir,
        lease: parse_duration(&args.lease).context("--lease")?,
        coalesce: std::time::Duration::from_millis(20),
        metadata_enabled: args.metadata_enabled,
        dial: placement::network::tcp(),
    };
    let node = placement::server::Node::start(cfg).await?;
    tracing::info!(id = args.id, %grpc_addr, %http_addr, "placement replica started");
    placement::server::run(node, grpc, Some(http), signal()).await?;
    tracing::info!("placement replica stopped");
    Ok(0)
}

#[derive(Args, Clone)]
struct HostArgs {
    /// The app's id: it names the app to other apps and prefixes its state keys.
    #[arg(long, env = "APP_ID")]
    app_id: String,
    /// The port the app listens on; the sidecar reports healthy once the app accepts connections.
    #[arg(long, env = "APP_PORT")]
    app_port: Option<u16>,
    /// The address the app listens on.
    #[arg(long, env = "DAPR_APP_CHANNEL_ADDRESS", default_value = "127.0.0.1")]
    app_channel_address: String,
    /// Port of the Dapr HTTP API.
    #[arg(long, env = "DAPR_HTTP_PORT", default_value_t = 3500)]
    dapr_http_port: u16,
    /// Port of the Dapr gRPC API (state, actors, metadata, shutdown; others answer UNIMPLEMENTED),
    /// passed to the app as DAPR_GRPC_PORT.
    #[arg(long, env = "DAPR_GRPC_PORT", default_value_t = 50001)]
    dapr_grpc_port: u16,
    /// Port other hosts forward actor calls to (Dapr's name for it; the calls travel as
    /// framed protobuf messages on one connection per pair of hosts) [default: a free port].
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    dapr_internal_grpc_port: u16,
    /// Placement replicas as host:port, comma-separated. Without it the host embeds a
    /// single-node placement (standalone mode).
    #[arg(
        long,
        env = "DAPR_PLACEMENT_HOST_ADDRESS",
        value_delimiter = ',',
        value_name = "ADDR,..."
    )]
    placement_host_address: Vec<String>,
    /// Scheduler replicas as host:port, comma-separated. Without it the host embeds the
    /// scheduler (jobs and reminders under its data directory).
    #[arg(
        long,
        env = "DAPR_SCHEDULER_HOST_ADDRESS",
        value_delimiter = ',',
        value_name = "ADDR,..."
    )]
    scheduler_host_address: Vec<String>,
    /// Port of GET /metrics (Prometheus). If it is taken, the host starts without it.
    #[arg(long, env = "DAPR_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// The longest an actor call may take in all (routing, waiting for the actor's turn, the
    /// app), e.g. 60s or 500ms. A call chain that comes back to a busy actor without
    /// reentrancy fails after this long.
    #[arg(long, default_value = "60s")]
    actor_call_timeout: String,
    /// Addresses the API listens on, comma-separated.
    #[arg(
        long,
        env = "DAPR_LISTEN_ADDRESSES",
        default_value = "127.0.0.1",
        value_delimiter = ','
    )]
    dapr_listen_addresses: Vec<IpAddr>,
    /// A directory of component YAML files; repeat for more. Without one, Tessera uses its
    /// embedded default `statestore` (state.sled) under the data directory.
    #[arg(
        long = "resources-path",
        visible_alias = "components-path",
        value_name = "DIR"
    )]
    resources_paths: Vec<PathBuf>,
    /// A Dapr Configuration file (kind: Configuration). It is checked at start.
    #[arg(long, env = "DAPR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where embedded stores keep their data [default: ~/.tessera/data/<app-id>].
    #[arg(long, env = "TESSERA_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log level: debug, info, warn or error (RUST_LOG overrides it).
    #[arg(long, env = "DAPR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Largest request body, as bytes or a quantity like 4Mi or 16M.
    #[arg(long, default_value = "4Mi")]
    max_body_size: String,
}

/// Parses `4Mi`, `16M`, `512Ki`, `1048576`.
fn parse_quantity(s: &str) -> anyhow::Result<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .with_context(|| format!("invalid size {s:?}: expected a number like 4Mi"))?;
    let mul: usize = match unit {
        "" => 1,
        "K" | "k" | "KB" => 1_000,
        "Ki" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" => 1 << 30,
        other => bail!("invalid size unit {other:?} in {s:?}: use Ki, Mi, Gi, K, M or G"),
    };
    n.checked_mul(mul).context("size too large")
}

fn check_config_file(path: &PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --config {}", path.display()))?;
    let kinds: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("kind:"))
        .map(|k| k.trim().to_string())
        .collect();
    if !kinds.iter().any(|k| k == "Configuration") {
        bail!(
            "{}: not a Dapr Configuration (expected `kind: Configuration`)",
            path.display()
        );
    }
    Ok(())
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) => tracing_subscriber::EnvFilter::new(f),
        Err(_) => {
            if !matches!(level, "debug" | "info" | "warn" | "error" | "trace") {
                bail!("invalid --log-level {level:?}: use debug, info, warn or error");
            }
            tracing_subscriber::EnvFilter::new(format!(
                "warn,actor_host={level},components={level},scheduler={level},tessera={level}"
            ))
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn host_config(args: &HostArgs, extended: BTreeMap<String, String>) -> anyhow::Result<HostConfig> {
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            home.join(".tessera").join("data").join(&args.app_id)
        }
    };
    if let Some(c) = &args.config {
        check_config_file(c)?;
    }
    let mut cfg = HostConfig::new(args.app_id.clone(), data_dir);
    cfg.app_port = args.app_port;
    cfg.app_channel_address = args.app_channel_address.clone();
    cfg.resources_paths = args.resources_paths.clone();
    cfg.namespace = std::env::var("NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    cfg.max_body_bytes = parse_quantity(&args.max_body_size).context("--max-body-size")?;
    cfg.api_token = std::env::var("DAPR_API_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    cfg.extended = extended;
    cfg.placement_addresses = args
        .placement_host_address
        .iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    cfg.scheduler_addresses = args
        .scheduler_host_address
        .iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    let internal_ip = args
        .dapr_listen_addresses
        .first()
        .copied()
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    cfg.internal_listen = SocketAddr::new(internal_ip, args.dapr_internal_grpc_port);
    cfg.actor_call_timeout =
        parse_duration(&args.actor_call_timeout).context("--actor-call-timeout")?;
    cfg.app_api_token = std::env::var("APP_API_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    Ok(cfg)
}

/// Binds the API listeners first, then loads components: a port clash is reported before any
/// store is opened.
async fn start_host(
    args: &HostArgs,
    extended: BTreeMap<String, String>,
) -> anyhow::Result<(Host, Vec<tokio::net::TcpListener>)> {
    let started = Instant::now();
    let mut listeners = Vec::new();
    for ip in &args.dapr_listen_addresses {
        let addr = SocketAddr::new(*ip, args.dapr_http_port);
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr}: is another sidecar using it? pick another --dapr-http-port")
        })?;
        listeners.push(l);
    }
    let host = Host::start(host_config(args, extended)?).await?;
    serve_grpc(&host, args).await;
    serve_metrics(&host, args).await;
    tracing::info!(
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "sidecar ready"
    );
    Ok((host, listeners))
}

/// Dapr's gRPC API on --dapr-grpc-port (every listen address), stopped with the host. A port
/// in use is a warning, not a failed start: the HTTP API is the sidecar's main door.
async fn serve_grpc(host: &Host, args: &HostArgs) {
    for ip in &args.dapr_listen_addresses {
        let addr = SocketAddr::new(*ip, args.dapr_grpc_port);
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let host = host.clone();
                tokio::spawn(async move {
                    // `run` already stops with the host (after its actors are handed off).
                    let never = std::future::pending();
                    if let Err(e) = actor_host::grpc_api::run(l, host, never).await {
                        tracing::error!(%addr, error = %e, "gRPC API stopped");
                    }
                });
            }
            Err(e) => tracing::warn!(
                %addr, error = %e,
                "gRPC port unavailable: running without the gRPC API (set --dapr-grpc-port)"
            ),
        }
    }
}

/// `GET /metrics` on --metrics-port, stopped with the host.
async fn serve_metrics(host: &Host, args: &HostArgs) {
    let ip = args
        .dapr_listen_addresses
        .first()
        .copied()
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let addr = SocketAddr::new(ip, args.metrics_port);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics port unavailable: running without GET /metrics (set --metrics-port)");
            return;
        }
    };
    let runtime = host.shared().actors.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let runtime = runtime.clone();
            async move { runtime.metrics_text() }
        }),
    );
    let stop = host.shutdown_token();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
}

/// Serves every listener until the token is cancelled.
async fn serve(
    host: Host,
    listeners: Vec<tokio::net::TcpListener>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for l in listeners {
        let stop = stop.clone();
        tasks.push(tokio::spawn(actor_host::run(l, host.clone(), async move {
            stop.cancelled().await
        })));
    }
    for t in tasks {
        t.await.context("server task")?.context("HTTP server")?;
    }
    Ok(())
}

/// Cancelled on the first SIGINT or SIGTERM. The handlers are installed first thing in `main`,
/// so a Ctrl-C that arrives while the sidecar is still starting is not lost (without a handler
/// it would kill the process outright, leaving the app behind).
static SIGNALLED: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();

fn install_signal_handlers() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let token = SIGNALLED.get_or_init(CancellationToken::new).clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        token.cancel();
    });
    Ok(())
}

async fn signal() {
    SIGNALLED
        .get_or_init(CancellationToken::new)
        .clone()
        .cancelled_owned()
        .await
}

// mimalloc: the sidecar allocates per request (headers, bodies, futures); glibc's malloc took
// ~8% of a host's CPU under load (docs/BENCHMARKS.md, actors).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = sidecar_workers(&cli.command, std::env::var_os("TOKIO_WORKER_THREADS")) {
        runtime.worker_threads(n);
    }
    match runtime.build() {
        Ok(rt) => rt.block_on(async_main(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Worker threads for a sidecar (`run`, `host`) unless `TOKIO_WORKER_THREADS` says otherwise:
/// half the cores, at least 1. A sidecar shares its machine with the app it serves, and on two
/// cores a second worker mostly adds cross-thread wake-ups (docs/BENCHMARKS.md, actors: 21 µs of
/// host CPU per call with one worker against 27 µs with two). The embedded scheduler's trigger
/// loop has a thread of its own besides (`actor_host::jobs::start`). Placement and the scheduler
/// service keep tokio's default of one per core.
fn sidecar_workers(command: &Command, env: Option<std::ffi::OsString>) -> Option<usize> {
    if env.is_some() || !matches!(command, Command::Run { .. } | Command::Host { .. }) {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / 2).max(1))
}

async fn async_main(cli: Cli) -> std::process::ExitCode {
    if let Err(e) = install_signal_handlers() {
        eprintln!("error: cannot install signal handlers: {e}");
        return std::process::ExitCode::from(1);
    }
    let level = match &cli.command {
        Command::Run { host, .. } | Command::Host { host } => host.log_level.clone(),
        Command::Placement(p) => p.log_level.clone(),
        Command::Scheduler(s) => s.log_level.clone(),
    };
    if let Err(e) = init_logging(&level) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    match real_main(cli).await {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Placement(args) => run_placement(args).await,
        Command::Scheduler(args) => run_scheduler(args).await,
        Command::Host { host: args } => {
            let (host, listeners) = start_host(&args, BTreeMap::new()).await?;
            let stop = host.shutdown_token();
            let s = stop.clone();
            tokio::spawn(async move {
                signal().await;
                tracing::info!("signal received, shutting down");
                s.cancel();
            });
            serve(host, listeners, stop).await?;
            tracing::info!("sidecar stopped");
            Ok(0)
        }
        Command::Run {
            host: args,
            command,
        } => {
            let mut extended = BTreeMap::new();
            extended.insert("cliPID".to_string(), std::process::id().to_string());
            if !command.is_empty() {
                extended.insert("appCommand".to_string(), command.join(" "));
            }
            let (host, listeners) = start_host(&args, extended).await?;
            let stop = host.shutdown_token();
            let server = tokio::spawn(serve(host.clone(), listeners, stop.clone()));
            let code = if command.is_empty() {
                tracing::info!(
                    "You're up and running! Sidecar on port {} (no app command given)",
                    args.dapr_http_port
                );
                tokio::select! {
                    _ = signal() => tracing::info!("signal received, shutting down"),
                    _ = stop.cancelled() => {}
                }
                0
            } else {
                app::run_app(&args, &command, &host, stop.clone()).await?
            };
            stop.cancel();
            server.await.context("server task")??;
            tracing::info!("sidecar stopped");
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("4Mi").unwrap(), 4 << 20);
        assert_eq!(parse_quantity("16M").unwrap(), 16_000_000);
        assert_eq!(parse_quantity("1024").unwrap(), 1024);
        assert!(parse_quantity("4Xi").is_err());
        assert!(parse_quantity("Mi").is_err());
    }

    #[test]
    fn sidecars_take_half_the_cores_unless_told() {
        let host = Cli::try_parse_from(["tessera", "host", "--app-id", "a"]).unwrap();
        let placement = Cli::try_parse_from(["tessera", "placement"]).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(
            sidecar_workers(&host.command, None),
            Some((cores / 2).max(1))
        );
        assert_eq!(sidecar_workers(&host.command, Some("3".into())), None);
        assert_eq!(sidecar_workers(&placement.command, None), None);
    }

    #[test]
    fn flags_follow_dapr() {
        let cli = Cli::try_parse_from([
            "tessera",
            "run",
            "--app-id",
            "a",
            "--app-port",
            "8080",
            "--dapr-http-port",
            "3501",
            "--components-path",
            "x",
            "--resources-path",
            "y",
            "--",
            "python",
            "app.py",
        ])
        .unwrap();
        let Command::Run { host, command } = cli.command else {
            panic!()
        };
        assert_eq!(
            host.resources_paths,
            [PathBuf::from("x"), PathBuf::from("y")]
        );
        assert_eq!(host.dapr_http_port, 3501);
        assert_eq!(command, ["python", "app.py"]);
    }
}
