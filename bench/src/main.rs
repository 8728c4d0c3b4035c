//! Load generators for Tessera. `cargo run --release -p bench -- state` measures state save and
//! get through the sidecar (sled store and Redis store) and the same operations straight against
//! Redis, in one run, at concurrency 1 and 64; plus the idle sidecar's RSS and its time to ready.
//! `placement` times table dissemination; `actors` compares a no-op actor method through the
//! sidecar with a minimal reverse proxy and measures activations (see `actors.rs`);
//! `placement` measures dissemination and commit rates (see `placement.rs`); `scheduler`
//! measures reminder fires, lateness, registrations and memory (see `scheduler.rs`).

mod actors;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

mod placement;
mod scheduler;

#[derive(Parser)]
#[command(about = "Tessera load generators; results go to docs/BENCHMARKS.md")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Actors: a no-op actor method through `tessera host` (local and remote owner) vs a minimal
    /// reverse proxy in front of the same app, first call vs warm call, and 100,000 activations.
    Actors {
        /// Measured seconds per case and round.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Unrecorded seconds before each measurement.
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
        /// Rounds over all cases (interleaved, merged per case).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Concurrency levels to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        concurrency: Vec<usize>,
        /// First calls to distinct new actors, each followed by a call to a warm one.
        #[arg(long, default_value_t = 2000)]
        first_calls: usize,
        /// Distinct actors activated per host.
        #[arg(long, default_value_t = 100_000)]
        activations: usize,
        #[arg(long, default_value_t = 64)]
        activation_concurrency: usize,
        /// Skip activating the same number on cluster host A (Redis store).
        #[arg(long)]
        no_cluster_activations: bool,
        #[arg(long, default_value = "127.0.0.1:6379")]
        redis: String,
    },
    /// The no-op actor app `bench actors` starts (internal).
    #[command(hide = true)]
    NoopApp {
        #[arg(long)]
        port: u16,
    },
    /// The minimal reverse proxy `bench actors` starts (internal).
    #[command(hide = true)]
    Proxy {
        #[arg(long)]
        port: u16,
        /// host:port
        #[arg(long)]
        upstream: String,
    },
    /// Placement: time from a membership change to the last of N hosts holding the new table
    /// (3 replica processes, N simulated hosts in this process), and joins committed per second
    /// (see `placement.rs`).
    Placement {
        /// Host counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        hosts: Vec<usize>,
        /// Membership changes timed per host count.
        #[arg(long, default_value_t = 30)]
        changes: usize,
        /// Hosts joining at once for the commit-rate measurements.
        #[arg(long, default_value_t = 2000)]
        burst: usize,
        /// Host streams per HTTP/2 connection in the host-stream commit-rate measurement.
        #[arg(long, default_value_t = 125)]
        streams_per_connection: usize,
    },
    /// Scheduler: reminders fired per second and their lateness at 100,000 and 1,000,000
    /// registered reminders (the library alone), and through a standalone host to an app, with
    /// durable registrations per second over HTTP at concurrency 64.
    Scheduler {
        /// Seconds of firing measured per case.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Reminders registered through the host.
        #[arg(long, default_value_t = 100_000)]
        host_reminders: usize,
        /// Offered fire rates for the host case.
        #[arg(long, value_delimiter = ',', default_value = "10000,20000")]
        host_rates: Vec<u64>,
        /// Engine cases as `reminders:rate` (run one alone to see its memory without what the
        /// earlier cases left in this process).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "100000:10000,100000:20000,1000000:20000"
        )]
        engine_cases: Vec<String>,
    },
    /// State save/get through the sidecar vs straight against Redis.
    State {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrency levels to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        concurrency: Vec<usize>,
        #[arg(long, default_value = "127.0.0.1:6379")]
        redis: String,
        /// Distinct keys written and read.
        #[arg(long, default_value_t = 10_000)]
        keys: usize,
    },
}

/// Latencies in microseconds, and the wall time they were collected over.
struct Sample {
    lat_us: Vec<u32>,
    errors: usize,
    elapsed: Duration,
}

impl Sample {
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us[i] as f64
    }
    fn rate(&self) -> f64 {
        self.lat_us.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `op(worker, i)` from `conc` workers for `secs` seconds.
async fn drive<F, Fut>(conc: usize, secs: u64, op: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if op(w, i).await {
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    errors += 1;
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    Sample {
        lat_us: all,
        errors,
        elapsed,
    }
}

fn tessera_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("tessera");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release -p cli` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Sidecar {
    child: Child,
    port: u16,
    grpc_port: u16,
    ready_after: Duration,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a sidecar and measures spawn-to-first-answer on `/v1.0/healthz/outbound`.
async fn start_sidecar(
    app: &str,
    data: &Path,
    resources: Option<&Path>,
) -> anyhow::Result<Sidecar> {
    let port = free_port();
    let grpc_port = free_port();
    let mut cmd = Command::new(tessera_bin()?);
    cmd.args([
        "host",
        "--app-id",
        app,
        "--log-level",
        "warn",
        "--dapr-http-port",
        &port.to_string(),
        "--dapr-grpc-port",
        &grpc_port.to_string(),
        "--data-dir",
    ])
    .arg(data)
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(r) = resources {
        cmd.arg("--resources-path").arg(r);
    }
    let t = Instant::now();
    let child = cmd.spawn()?;
    let addr = format!("127.0.0.1:{port}");
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(
                b"GET /v1.0/healthz/outbound HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            if buf.starts_with(b"HTTP/1.1 204") {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("sidecar did not become ready");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    Ok(Sidecar {
        child,
        port,
        grpc_port,
        ready_after: t.elapsed(),
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn http_ok(client: &Http, req: hyper::Request<Full<Bytes>>, want: u16) -> bool {
    match client.request(req).await {
        Ok(resp) => {
            let ok = resp.status().as_u16() == want;
            ok && resp.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

const VALUE: &str = r#"{"items":["product-1","product-2"],"total":42}"#;

async fn bench_sidecar(
    label: &str,
    port: u16,
    conc: usize,
    secs: u64,
    keys: usize,
    rows: &mut Vec<String>,
) {
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let base = format!("http://127.0.0.1:{port}/v1.0/state/statestore");
    let (c, b) = (client.clone(), base.clone());
    let save = drive(conc, secs, move |w, i| {
        let (c, b) = (c.clone(), b.clone());
        async move {
            let key = (w as u64 * 7919 + i) % keys as u64;
            let body = format!(r#"[{{"key":"k{key}","value":{VALUE}}}]"#);
            let req = hyper::Request::post(b)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            http_ok(&c, req, 204).await
        }
    })
    .await;
    report(rows, label, "save", conc, &save);
    let (c, b) = (client.clone(), base.clone());
    let get = drive(conc, secs, move |w, i| {
        let (c, b) = (c.clone(), b.clone());
        async move {
            let key = (w as u64 * 7919 + i) % keys.min(1000) as u64;
            let req = hyper::Request::get(format!("{b}/k{key}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            http_ok(&c, req, 200).await
        }
    })
    .await;
    report(rows, label, "get", conc, &get);
}

/// The same saves and gets through Dapr's gRPC API, on one HTTP/2 connection (tonic's
/// `Channel`, as SDK clients hold it). With `own_thread` the load runs on a current-thread
/// runtime of its own: HTTP/2 clients hand every request between tasks (the caller's and the
/// connection's), and on the shared multi-thread runtime those hand-offs cross threads.
async fn bench_sidecar_grpc(
    label: &str,
    port: u16,
    own_thread: bool,
    conc: usize,
    secs: u64,
    keys: usize,
    rows: &mut Vec<String>,
) -> anyhow::Result<()> {
    let origin = format!("http://127.0.0.1:{port}");
    let label = label.to_string();
    let load = async move {
        let client = proto::dapr::dapr_client::DaprClient::connect(origin).await?;
        let mut out = Vec::new();
        grpc_load(client, &label, conc, secs, keys, &mut out).await;
        anyhow::Ok(out)
    };
    let out = if own_thread {
        tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(load)
        })
        .await??
    } else {
        load.await?
    };
    rows.extend(out);
    Ok(())
}

async fn grpc_load(
    client: proto::dapr::dapr_client::DaprClient<tonic::transport::Channel>,
    label: &str,
    conc: usize,
    secs: u64,
    keys: usize,
    rows: &mut Vec<String>,
) {
    use proto::dapr::{GetStateRequest, SaveStateRequest, StateItem};
    let c = client.clone();
    let save = drive(conc, secs, move |w, i| {
        let mut c = c.clone();
        async move {
            let key = (w as u64 * 7919 + i) % keys as u64;
            let req = SaveStateRequest {
                store_name: "statestore".into(),
                states: vec![StateItem {
                    key: format!("k{key}"),
                    value: VALUE.as_bytes().to_vec(),
                    ..Default::default()
                }],
            };
            c.save_state(req).await.is_ok()
        }
    })
    .await;
    report(rows, label, "save", conc, &save);
    let c = client.clone();
    let get = drive(conc, secs, move |w, i| {
        let mut c = c.clone();
        async move {
            let key = (w as u64 * 7919 + i) % keys.min(1000) as u64;
            let req = GetStateRequest {
                store_name: "statestore".into(),
                key: format!("k{key}"),
                ..Default::default()
            };
            c.get_state(req)
                .await
                .is_ok_and(|r| !r.into_inner().data.is_empty())
        }
    })
    .await;
    report(rows, label, "get", conc, &get);
}

async fn bench_redis(
    addr: &str,
    conc: usize,
    secs: u64,
    keys: usize,
    rows: &mut Vec<String>,
) -> anyhow::Result<()> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let conn = client.get_multiplexed_async_connection().await?;
    let c = conn.clone();
    let save = drive(conc, secs, move |w, i| {
        let mut c = c.clone();
        async move {
            let key = (w as u64 * 7919 + i) % keys as u64;
            redis::cmd("HSET")
                .arg(format!("bench-direct||k{key}"))
                .arg("data")
                .arg(VALUE)
                .arg("version")
                .arg(i)
                .query_async::<i64>(&mut c)
                .await
                .is_ok()
        }
    })
    .await;
    report(rows, "direct Redis (HSET)", "save", conc, &save);
    let c = conn.clone();
    let get = drive(conc, secs, move |w, i| {
        let mut c = c.clone();
        async move {
            let key = (w as u64 * 7919 + i) % keys.min(1000) as u64;
            redis::cmd("HMGET")
                .arg(format!("bench-direct||k{key}"))
                .arg("data")
                .arg("version")
                .query_async::<Vec<Option<String>>>(&mut c)
                .await
                .is_ok()
        }
    })
    .await;
    report(rows, "direct Redis (HMGET)", "get", conc, &get);
    Ok(())
}

fn report(rows: &mut Vec<String>, target: &str, op: &str, conc: usize, s: &Sample) {
    let row = format!(
        "| {target} | {op} | {conc} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
        s.rate(),
        s.pct(0.5),
        s.pct(0.99),
        s.pct(0.999),
        s.errors
    );
    eprintln!("{row}");
    rows.push(row);
}

async fn state(
    seconds: u64,
    concurrency: Vec<usize>,
    redis: String,
    keys: usize,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let res = dir.path().join("redis-resources");
    std::fs::create_dir_all(&res)?;
    std::fs::write(
        res.join("statestore.yaml"),
        format!("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: statestore\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: {redis}\n"),
    )?;
    let sled = start_sidecar("bench-sled", &dir.path().join("sled"), None).await?;
    let idle_rss = rss_kib(sled.child.id());
    let rds = start_sidecar("bench-redis", &dir.path().join("redis"), Some(&res)).await?;
    let mut rows = vec![
        "| target | op | concurrency | ops/s | p50 µs | p99 µs | p99.9 µs | errors |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for &c in &concurrency {
        bench_redis(&redis, c, seconds, keys, &mut rows).await?;
        bench_sidecar(
            "sidecar, state.redis",
            rds.port,
            c,
            seconds,
            keys,
            &mut rows,
        )
        .await;
        bench_sidecar_grpc(
            "sidecar gRPC, state.redis",
            rds.grpc_port,
            false,
            c,
            seconds,
            keys,
            &mut rows,
        )
        .await?;
        bench_sidecar_grpc(
            "sidecar gRPC (client on its own thread), state.redis",
            rds.grpc_port,
            true,
            c,
            seconds,
            keys,
            &mut rows,
        )
        .await?;
        bench_sidecar(
            "sidecar, state.sled (fsync)",
            sled.port,
            c,
            seconds,
            keys,
            &mut rows,
        )
        .await;
    }
    let loaded_rss = rss_kib(sled.child.id());
    println!("\n{}", rows.join("\n"));
    println!(
        "\nidle sidecar RSS: {:.1} MiB (sled store, before load); after load: {:.1} MiB",
        idle_rss as f64 / 1024.0,
        loaded_rss as f64 / 1024.0
    );
    println!(
        "spawn to first answer: sled {:.1} ms, redis {:.1} ms",
        sled.ready_after.as_secs_f64() * 1e3,
        rds.ready_after.as_secs_f64() * 1e3
    );
    Ok(())
}

// The same allocator as `tessera`, so the proxy, the app and the load generator are compared on
// equal terms.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match Cli::parse().cmd {
        Cmd::State {
            seconds,
            concurrency,
            redis,
            keys,
        } => state(seconds, concurrency, redis, keys).await,
        Cmd::Scheduler {
            seconds,
            host_reminders,
            host_rates,
            engine_cases,
        } => scheduler::run(seconds, host_reminders, host_rates, engine_cases).await,
        Cmd::Actors {
            seconds,
            warmup,
            rounds,
            concurrency,
            first_calls,
            activations,
            activation_concurrency,
            no_cluster_activations,
            redis,
        } => {
            actors::run(actors::Options {
                seconds,
                warmup,
                rounds,
                concurrency,
                first_calls,
                activations,
                activation_concurrency,
                redis,
                cluster_activations: !no_cluster_activations,
            })
            .await
        }
        Cmd::NoopApp { port } => actors::noop_app(port).await,
        Cmd::Proxy { port, upstream } => actors::proxy(port, upstream).await,
        Cmd::Placement {
            hosts,
            changes,
            burst,
            streams_per_connection,
        } => placement::run(hosts, changes, burst, streams_per_connection).await,
    }
}
