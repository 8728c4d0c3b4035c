//! `bench actors`: a no-op actor method through real `tessera host` processes, and in the same
//! run the same load through a minimal reverse proxy in front of the same app (the floor for one
//! sidecar hop), plus first-call vs warm-call latency and the cost of 100,000 activations.
//!
//! Processes (all on loopback): the no-op app (`bench noop-app`), one proxy (`bench proxy`), the
//! same proxy on one worker thread (the floor is the better of the two, per measure), a second
//! proxy chained in front of the first (the floor for two hops), a standalone host (embedded
//! placement, sled actor store), and a cluster of a `tessera placement` replica, host A (with the
//! app, Redis actor store) and host B (no app, so it hosts no actor type and every call through
//! it goes to A over the internal host-to-host port). The load generator runs in this process: one
//! HTTP/1.1 keep-alive connection per worker, fixed concurrency.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{free_port, rss_kib, tessera_bin};

/// What `bench actors` measures, from its flags.
pub struct Options {
    pub seconds: f64,
    pub warmup: f64,
    pub rounds: usize,
    pub concurrency: Vec<usize>,
    pub first_calls: usize,
    pub activations: usize,
    pub activation_concurrency: usize,
    pub redis: String,
    /// Also activate `activations` actors on cluster host A (Redis store), to separate the
    /// runtime's memory from sled's cache.
    pub cluster_activations: bool,
}

// ---------------------------------------------------------------------------------------------
// The no-op app and the proxy (run as child processes: `bench noop-app`, `bench proxy`).

/// The no-op actor app: `GET /dapr/config`, `PUT /actors/Noop/{id}/method/{m}` -> 200 `{}`,
/// `DELETE /actors/Noop/{id}` -> 200.
pub async fn noop_app(port: u16) -> anyhow::Result<()> {
    use axum::routing::{delete, get, put};
    const JSON: [(&str, &str); 1] = [("content-type", "application/json")];
    let app = axum::Router::new()
        .route(
            "/dapr/config",
            get(|| async { (JSON, r#"{"entities":["Noop"]}"#) }),
        )
        .route(
            "/actors/Noop/{id}/method/{m}",
            put(|| async { (JSON, "{}") }),
        )
        .route("/actors/Noop/{id}", delete(|| async { StatusCode::OK }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A minimal reverse proxy: one hop, pooled keep-alive connections to `upstream`, bodies
/// streamed both ways. `POST /v1.0/actors/{rest}` becomes `PUT /actors/{rest}` (what a sidecar
/// sends the app); anything else is forwarded as it is (so two proxies can be chained).
pub async fn proxy(port: u16, upstream: String) -> anyhow::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let upstream = Arc::new(upstream);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move { Ok::<_, Infallible>(forward(&client, &upstream, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &str,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let (put, uri) = match pq.strip_prefix("/v1.0/actors/") {
        Some(rest) => (true, format!("http://{upstream}/actors/{rest}")),
        None => (false, format!("http://{upstream}{pq}")),
    };
    if put {
        *req.method_mut() = Method::PUT;
    }
    match uri.parse() {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => return error(StatusCode::BAD_REQUEST),
    }
    match client.request(req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(_) => error(StatusCode::BAD_GATEWAY),
    }
}

fn error(status: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

// ---------------------------------------------------------------------------------------------
// Child processes.

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_port(port: u16, p: &Proc) -> anyhow::Result<()> {
    let t = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("{} never listened on {port}\n{}", p.name, p.tail());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A `tessera host`: its HTTP API port and the process.
struct HostProc {
    port: u16,
    proc: Proc,
}

fn host_cmd(app_id: &str, http: u16, data: &Path, extra: &[String]) -> anyhow::Result<Command> {
    let mut cmd = Command::new(tessera_bin()?);
    cmd.args(["host", "--app-id", app_id, "--log-level", "warn"])
        .args(["--dapr-http-port", &http.to_string()])
        .args(["--metrics-port", &free_port().to_string()])
        .args(["--dapr-grpc-port", &free_port().to_string()])
        .arg("--data-dir")
        .arg(data)
        .args(extra);
    Ok(cmd)
}

/// Starts a host and waits until a call on actor `ready` through it answers 200 (for a host
/// with the app: the runtime is registered and in the table; for host B: the table lists A).
async fn start_host(
    name: &str,
    app_id: &str,
    dir: &Path,
    extra: &[String],
) -> anyhow::Result<HostProc> {
    let port = free_port();
    let proc = Proc::spawn(name, host_cmd(app_id, port, &dir.join(name), extra)?, dir)?;
    wait_port(port, &proc).await?;
    let mut conn = Conn::new(port);
    let t = Instant::now();
    loop {
        match conn.call(&call_path("ready")).await {
            Ok(()) => break,
            Err(e) if t.elapsed() > Duration::from_secs(30) => {
                bail!("{name} never served actor calls: {e}\n{}", proc.tail())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    Ok(HostProc { port, proc })
}

// ---------------------------------------------------------------------------------------------
// The load generator.

fn call_path(id: &str) -> String {
    format!("/v1.0/actors/Noop/{id}/method/ping")
}

/// One HTTP/1.1 keep-alive connection, redialed after an error.
struct Conn {
    port: u16,
    host: String,
    tx: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    fn new(port: u16) -> Conn {
        Conn {
            port,
            host: format!("127.0.0.1:{port}"),
            tx: None,
        }
    }

    async fn dial(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.tx.as_ref().is_none_or(|t| t.is_closed()) {
            let s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = s.set_nodelay(true);
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            self.tx = Some(tx);
        }
        Ok(self.tx.as_mut().expect("dialed"))
    }

    /// `POST path` with an empty body; Ok on 200.
    async fn call(&mut self, path: &str) -> Result<(), String> {
        let host = self.host.clone();
        let tx = self.dial().await?;
        if tx.ready().await.is_err() {
            self.tx = None;
            return Err("connection closed".into());
        }
        let req = Request::post(path)
            .header(hyper::header::HOST, host)
            .body(Full::new(Bytes::new()))
            .expect("request");
        match tx.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                match body {
                    Ok(_) if status == StatusCode::OK => Ok(()),
                    Ok(b) => Err(format!("{status}: {}", String::from_utf8_lossy(&b))),
                    Err(e) => {
                        self.tx = None;
                        Err(format!("body: {e}"))
                    }
                }
            }
            Err(e) => {
                self.tx = None;
                Err(format!("send: {e}"))
            }
        }
    }
}

/// Latencies (ns, sorted) of successful calls, over `secs` of measured time.
#[derive(Default)]
struct Sample {
    lat_ns: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
    /// Calls made, warmup included (what the CPU times below were spent on).
    all_calls: u64,
    /// CPU seconds (user + system) of the hop's processes, the app, and this load generator.
    cpu: Cpu,
}

#[derive(Default, Clone, Copy)]
struct Cpu {
    hop: f64,
    /// The part of `hop` spent in the kernel.
    hop_sys: f64,
    app: f64,
    gen: f64,
}

impl Cpu {
    fn add(&mut self, o: Cpu) {
        self.hop += o.hop;
        self.hop_sys += o.hop_sys;
        self.app += o.app;
        self.gen += o.gen;
    }
    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            hop: self.hop - before.hop,
            hop_sys: self.hop_sys - before.hop_sys,
            app: self.app - before.app,
            gen: self.gen - before.gen,
        }
    }
}

/// Process CPU time (user + system, all threads, live and exited) in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let (user, sys) = cpu_split(pid);
    user + sys
}

/// Process CPU time in seconds: (user, system).
fn cpu_split(pid: u32) -> (f64, f64) {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return (0.0, 0.0);
    };
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / clock_ticks(), ticks(12) / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of the hop's processes, the app and this process, now.
fn cpu_now(hop: &[u32], app: u32) -> Cpu {
    let split: Vec<(f64, f64)> = hop.iter().map(|&p| cpu_split(p)).collect();
    Cpu {
        hop: split.iter().map(|(u, s)| u + s).sum(),
        hop_sys: split.iter().map(|(_, s)| s).sum(),
        app: cpu_secs(app),
        gen: cpu_secs(0),
    }
}

impl Sample {
    fn merge(&mut self, other: Sample) {
        self.lat_ns.extend(other.lat_ns);
        self.lat_ns.sort_unstable();
        self.errors += other.errors;
        self.secs += other.secs;
        self.all_calls += other.all_calls;
        self.cpu.add(other.cpu);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
    fn pct_us(&self, p: f64) -> f64 {
        if self.lat_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_ns.len() as f64 - 1.0) * p).round() as usize;
        self.lat_ns[i] as f64 / 1e3
    }
    fn rate(&self) -> f64 {
        self.lat_ns.len() as f64 / self.secs
    }
    /// CPU µs per call: (hop, hop in the kernel, app, load generator).
    fn cpu_per_call(&self) -> (f64, f64, f64, f64) {
        let n = self.all_calls.max(1) as f64 / 1e6;
        let c = &self.cpu;
        (c.hop / n, c.hop_sys / n, c.app / n, c.gen / n)
    }
}

struct WorkerOut {
    lat: Vec<u64>,
    calls: u64,
    errors: usize,
    first_error: Option<String>,
    done: Instant,
}

/// `conc` workers, each on its own connection calling its own actor (`{prefix}{worker}`) in a
/// loop: `warmup` unrecorded, then `secs` recorded.
async fn steady(port: u16, conc: usize, prefix: &str, warmup: f64, secs: f64) -> Sample {
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(warmup);
    let end = warm_end + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let path = call_path(&format!("{prefix}{w}"));
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(port);
            let mut out = WorkerOut {
                lat: Vec::with_capacity(65_536),
                calls: 0,
                errors: 0,
                first_error: None,
                done: Instant::now(),
            };
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let r = conn.call(&path).await;
                let d = t.elapsed().as_nanos() as u64;
                out.calls += 1;
                if t < warm_end {
                    continue;
                }
                match r {
                    Ok(()) => out.lat.push(d),
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                    }
                }
            }
            out.done = Instant::now();
            out
        }));
    }
    collect(tasks, warm_end).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<WorkerOut>>, from: Instant) -> Sample {
    let mut s = Sample::default();
    let mut last = from;
    for t in tasks {
        let o = t.await.expect("worker");
        s.lat_ns.extend(o.lat);
        s.errors += o.errors;
        s.all_calls += o.calls;
        if s.first_error.is_none() {
            s.first_error = o.first_error;
        }
        last = last.max(o.done);
    }
    s.lat_ns.sort_unstable();
    s.secs = (last - from).as_secs_f64();
    s
}

/// `n` calls, each to a distinct new actor `{prefix}{i}`, from `conc` workers.
async fn activate(port: u16, conc: usize, n: usize, prefix: &str) -> Sample {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (next, prefix) = (next.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(port);
            let mut out = WorkerOut {
                lat: Vec::with_capacity(n / conc + 1),
                calls: 0,
                errors: 0,
                first_error: None,
                done: Instant::now(),
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                out.calls += 1;
                match conn.call(&call_path(&format!("{prefix}{i}"))).await {
                    Ok(()) => out.lat.push(t.elapsed().as_nanos() as u64),
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                    }
                }
            }
            out.done = Instant::now();
            out
        }));
    }
    collect(tasks, start).await
}

/// At concurrency 1, alternately: a call to a fresh actor `{prefix}{i}` and a call to one
/// warm actor. Returns (first calls, warm calls).
async fn first_vs_warm(port: u16, n: usize, prefix: &str) -> (Sample, Sample) {
    let mut conn = Conn::new(port);
    let warm = call_path(&format!("{prefix}warm"));
    for _ in 0..200 {
        let _ = conn.call(&warm).await;
    }
    let (mut fresh, mut hot) = (Sample::default(), Sample::default());
    let start = Instant::now();
    for i in 0..n {
        for (s, path) in [
            (&mut fresh, call_path(&format!("{prefix}{i}"))),
            (&mut hot, warm.clone()),
        ] {
            let t = Instant::now();
            match conn.call(&path).await {
                Ok(()) => s.lat_ns.push(t.elapsed().as_nanos() as u64),
                Err(e) => {
                    s.errors += 1;
                    s.first_error.get_or_insert(e);
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for s in [&mut fresh, &mut hot] {
        s.lat_ns.sort_unstable();
        s.secs = secs;
    }
    (fresh, hot)
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Target {
    label: &'static str,
    port: u16,
    /// The processes between the load generator and the app (for CPU per call).
    pids: Vec<u32>,
    /// Compared against the one-hop proxy.
    tessera: bool,
}

async fn metadata_active(port: u16) -> Option<u64> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://127.0.0.1:{port}/v1.0/metadata")
        .parse()
        .ok()?;
    let resp = client.get(uri).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["actors"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == "Noop")
        .and_then(|a| a["count"].as_u64())
        .or(Some(0))
}

fn fmt_err(s: &Sample) -> String {
    match &s.first_error {
        Some(e) => format!("{} ({})", s.errors, e.chars().take(120).collect::<String>()),
        None => s.errors.to_string(),
    }
}

struct Verdict {
    rows: Vec<String>,
}

impl Verdict {
    fn add(&mut self, target: &str, measured: String, met: bool) {
        self.rows.push(format!(
            "| {target} | {measured} | {} |",
            if met { "met" } else { "**missed**" }
        ));
    }
}

async fn redis_cleanup(addr: &str, app_id: &str) -> anyhow::Result<usize> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut removed = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{app_id}||*"))
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut c)
            .await?;
        if !keys.is_empty() {
            removed += keys.len();
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<i64>(&mut c)
                .await?;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(removed);
        }
    }
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let me = std::env::current_exe()?;
    // A fresh app id per run: fences of earlier runs in Redis carry epochs from another
    // placement's versions and would refuse this run's activations.
    let run_id = format!(
        "bench-actors-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );

    let app_port = free_port();
    let mut cmd = Command::new(&me);
    cmd.args(["noop-app", "--port", &app_port.to_string()]);
    let app = Proc::spawn("noop-app", cmd, d)?;
    wait_port(app_port, &app).await?;

    let proxy_port = free_port();
    let mut cmd = Command::new(&me);
    cmd.args(["proxy", "--port", &proxy_port.to_string()])
        .args(["--upstream", &format!("127.0.0.1:{app_port}")]);
    let proxy = Proc::spawn("proxy", cmd, d)?;
    wait_port(proxy_port, &proxy).await?;
    // The same proxy on one worker thread: on two cores shared with the app and the load
    // generator it is often the faster configuration, and the floor is the cheapest hop.
    let proxy1_port = free_port();
    let mut cmd = Command::new(&me);
    cmd.args(["proxy", "--port", &proxy1_port.to_string()])
        .args(["--upstream", &format!("127.0.0.1:{app_port}")])
        .env("TOKIO_WORKER_THREADS", "1");
    let proxy1 = Proc::spawn("proxy-1-thread", cmd, d)?;
    wait_port(proxy1_port, &proxy1).await?;
    let chain_port = free_port();
    let mut cmd = Command::new(&me);
    cmd.args(["proxy", "--port", &chain_port.to_string()])
        .args(["--upstream", &format!("127.0.0.1:{proxy_port}")]);
    let chain = Proc::spawn("proxy-chain", cmd, d)?;
    wait_port(chain_port, &chain).await?;

    let with_app = vec!["--app-port".to_string(), app_port.to_string()];
    let standalone = start_host("standalone", &format!("{run_id}-s"), d, &with_app).await?;

    let res = d.join("resources");
    std::fs::create_dir_all(&res)?;
    std::fs::write(
        res.join("actorstore.yaml"),
        format!("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: actorstore\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: {}\n  - name: actorStateStore\n    value: \"true\"\n", o.redis),
    )?;
    let (pp, ph) = (free_port(), free_port());
    let mut cmd = Command::new(tessera_bin()?);
    cmd.args(["placement", "--log-level", "warn"])
        .args(["--port", &pp.to_string(), "--healthz-port", &ph.to_string()])
        .arg("--data-dir")
        .arg(d.join("placement"));
    let placement = Proc::spawn("placement", cmd, d)?;
    wait_port(pp, &placement).await?;
    let cluster_app = format!("{run_id}-c");
    let mut cluster_args = vec![
        "--placement-host-address".to_string(),
        format!("127.0.0.1:{pp}"),
        "--resources-path".to_string(),
        res.display().to_string(),
    ];
    let host_b_args = cluster_args.clone();
    cluster_args.extend(with_app.clone());
    let host_a = start_host("host-a", &cluster_app, d, &cluster_args).await?;
    let host_b = start_host("host-b", &cluster_app, d, &host_b_args).await?;
    eprintln!(
        "processes up: app {app_port}, proxy {proxy_port}, proxy chain {chain_port}, standalone {}, placement {pp}, host A {}, host B {} (logs in {})",
        standalone.port,
        host_a.port,
        host_b.port,
        d.display()
    );

    let targets = [
        Target {
            label: "proxy, 1 hop",
            port: proxy_port,
            pids: vec![proxy.pid()],
            tessera: false,
        },
        Target {
            label: "proxy, 1 hop, 1 worker thread",
            port: proxy1_port,
            pids: vec![proxy1.pid()],
            tessera: false,
        },
        Target {
            label: "proxy chain, 2 hops",
            port: chain_port,
            pids: vec![chain.pid(), proxy.pid()],
            tessera: false,
        },
        Target {
            label: "tessera standalone, local owner",
            port: standalone.port,
            pids: vec![standalone.proc.pid()],
            tessera: true,
        },
        Target {
            label: "tessera cluster host A, local owner",
            port: host_a.port,
            pids: vec![host_a.proc.pid()],
            tessera: true,
        },
        Target {
            label: "tessera cluster host B -> A, remote owner",
            port: host_b.port,
            pids: vec![host_b.proc.pid(), host_a.proc.pid()],
            tessera: true,
        },
    ];

    // Steady load: rounds interleave the targets so that load from elsewhere on the machine
    // falls on all of them alike.
    let mut samples: Vec<Vec<Sample>> = o
        .concurrency
        .iter()
        .map(|_| targets.iter().map(|_| Sample::default()).collect())
        .collect();
    for round in 0..o.rounds {
        for (ci, &c) in o.concurrency.iter().enumerate() {
            for (ti, t) in targets.iter().enumerate() {
                let before = cpu_now(&t.pids, app.pid());
                let mut s = steady(t.port, c, "w", o.warmup, o.seconds).await;
                let after = cpu_now(&t.pids, app.pid());
                s.cpu = after.since(before);
                eprintln!(
                    "round {} c={c} {}: {:.0} calls/s p50 {:.0} µs",
                    round + 1,
                    t.label,
                    s.rate(),
                    s.pct_us(0.5)
                );
                samples[ci][ti].merge(s);
            }
        }
    }
    let mut out = vec![
        "| path | concurrency | calls/s | p50 µs | p99 µs | calls/s vs proxy | p50 vs proxy | CPU µs/call: hop (kernel part) | app | load gen | errors |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut verdict = Verdict { rows: vec![] };
    let mut two_hops = vec![];
    for (ci, &c) in o.concurrency.iter().enumerate() {
        // The floor: the better of the two proxy configurations, per measure.
        let floor_rate = samples[ci][0].rate().max(samples[ci][1].rate());
        let floor_p50 = samples[ci][0].pct_us(0.5).min(samples[ci][1].pct_us(0.5));
        // A remote call crosses two sidecars: the two-proxy chain is its floor (reported beside
        // the issue's targets, which compare every path with one proxy hop).
        let (chain, remote) = (&samples[ci][2], &samples[ci][5]);
        two_hops.push(format!(
            "| remote owner vs proxy chain (both two hops), c={c} | {:.2}x calls/s, p50 {:.2}x |",
            remote.rate() / chain.rate(),
            remote.pct_us(0.5) / chain.pct_us(0.5)
        ));
        for (ti, t) in targets.iter().enumerate() {
            let s = &samples[ci][ti];
            let (rr, pr) = (s.rate() / floor_rate, s.pct_us(0.5) / floor_p50);
            let (hop, sys, appc, gen) = s.cpu_per_call();
            out.push(format!(
                "| {} | {c} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {hop:.1} ({sys:.1}) | {appc:.1} | {gen:.1} | {} |",
                t.label,
                s.rate(),
                s.pct_us(0.5),
                s.pct_us(0.99),
                rr,
                pr,
                fmt_err(s)
            ));
            if t.tessera {
                verdict.add(
                    &format!("≥ 0.8x proxy calls/s: {}, c={c}", t.label),
                    format!("{:.2}x ({:.0} vs {:.0}/s)", rr, s.rate(), floor_rate),
                    rr >= 0.8,
                );
                if c == 1 {
                    verdict.add(
                        &format!("p50 ≤ 1.3x proxy at c=1: {}", t.label),
                        format!("{:.2}x ({:.0} vs {:.0} µs)", pr, s.pct_us(0.5), floor_p50),
                        pr <= 1.3,
                    );
                }
            }
        }
    }
    let (a_active, b_active) = (
        metadata_active(host_a.port).await,
        metadata_active(host_b.port).await,
    );
    eprintln!("active Noop actors after the steady load: host A {a_active:?}, host B {b_active:?} (B must have none: its calls ran on A)");

    // First call to a new actor vs a warm one. The standalone host's first call waits for a
    // durable sled write (the fence claim: one WAL append and its fdatasync).
    let mut first = vec![
        "| host | first calls | first p50 µs | first p99 µs | warm p50 µs | warm p99 µs | first - warm (p50) µs | errors |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for (label, port, prefix) in [
        ("standalone (sled fence, fsync)", standalone.port, "f"),
        ("cluster host A (Redis fence)", host_a.port, "fa"),
        ("cluster host B -> A (remote)", host_b.port, "fb"),
    ] {
        let (fresh, warm) = first_vs_warm(port, o.first_calls, prefix).await;
        let diff = fresh.pct_us(0.5) - warm.pct_us(0.5);
        first.push(format!(
            "| {label} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.0} | {} |",
            fresh.lat_ns.len(),
            fresh.pct_us(0.5),
            fresh.pct_us(0.99),
            warm.pct_us(0.5),
            warm.pct_us(0.99),
            diff,
            fmt_err(&fresh)
        ));
        verdict.add(
            &format!("first call ≤ warm + 300 µs (p50): {label}"),
            format!("{diff:+.0} µs"),
            diff <= 300.0,
        );
    }

    // Activations: `n` distinct actors at concurrency 64, host RSS before and after.
    let n = o.activations;
    let mut act = vec![
        "| host | actors | activations/s | p50 µs | p99 µs | host CPU µs/activation | RSS before MiB | RSS after MiB | bytes per idle actor | active (metadata) | errors |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut act_targets = vec![("standalone (sled fence, fsync)", &standalone, "act")];
    if o.cluster_activations {
        act_targets.push(("cluster host A (Redis fence)", &host_a, "acta"));
    }
    for (i, (label, host, prefix)) in act_targets.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(host.proc.pid());
        let cpu0 = cpu_secs(host.proc.pid());
        let s = activate(host.port, o.activation_concurrency, n, prefix).await;
        let cpu_us = (cpu_secs(host.proc.pid()) - cpu0) * 1e6 / n as f64;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let after = rss_kib(host.proc.pid());
        let active = metadata_active(host.port).await;
        let per = (after as f64 - before as f64) * 1024.0 / n as f64;
        let rate = n as f64 / s.secs;
        act.push(format!(
            "| {label} | {n} | {rate:.0} | {:.0} | {:.0} | {cpu_us:.1} | {:.1} | {:.1} | {per:.0} | {} | {} |",
            s.pct_us(0.5),
            s.pct_us(0.99),
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            active.map(|a| a.to_string()).unwrap_or("?".into()),
            fmt_err(&s)
        ));
        if i == 0 {
            verdict.add(
                &format!("≥ 5,000 activations/s: {label}"),
                format!("{rate:.0}/s"),
                rate >= 5000.0,
            );
            verdict.add(
                &format!("< 2 KiB host RSS per idle actor: {label}"),
                format!("{per:.0} B"),
                per < 2048.0,
            );
        }
    }

    println!("\n{}", out.join("\n"));
    println!("\n{}", first.join("\n"));
    println!("\n{}", act.join("\n"));
    println!(
        "\n| target | measured | |\n|---|---|---|\n{}",
        verdict.rows.join("\n")
    );
    println!(
        "\n| for reference | measured |\n|---|---|\n{}",
        two_hops.join("\n")
    );
    println!(
        "\nidle RSS at the end: standalone {:.1} MiB, host A {:.1} MiB, host B {:.1} MiB, proxy {:.1} MiB",
        rss_kib(standalone.proc.pid()) as f64 / 1024.0,
        rss_kib(host_a.proc.pid()) as f64 / 1024.0,
        rss_kib(host_b.proc.pid()) as f64 / 1024.0,
        rss_kib(proxy.pid()) as f64 / 1024.0,
    );
    drop((host_b, host_a, placement));
    match redis_cleanup(&o.redis, &cluster_app).await {
        Ok(k) => eprintln!("removed {k} fence keys of this run from Redis"),
        Err(e) => eprintln!("could not remove this run's keys from Redis: {e}"),
    }
    Ok(())
}
