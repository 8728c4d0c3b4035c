//! `bench scheduler`: reminders fired per second and their lateness, durable registrations per
//! second, and memory, at 100,000 and 1,000,000 registered reminders.
//!
//! Two measurements:
//! - **engine**: the scheduler library alone (durable sled job store + the trigger loop) in this
//!   process, with a sink that only records when each tick arrived. N reminders with a period
//!   chosen so that they come due at `rate` per second, spread evenly; fires/s and lateness
//!   (arrival minus scheduled time) over the run, and this process's RSS growth per reminder.
//! - **host**: a release `tessera host` (standalone: embedded placement and scheduler) with a
//!   minimal in-process actor app. Reminders are registered through Dapr's HTTP reminder API
//!   at concurrency 64 (registrations/s and latency), then delivered as actor calls to the app
//!   (`PUT /actors/Remind/{id}/method/remind/r`); fires/s and lateness are measured at the app.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::routing::{delete, get, put};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use scheduler::engine::{Delivered, DeliveryError, Engine, EngineConfig, Sink, SystemClock, Tick};
use scheduler::job::{FailurePolicy, Job, JobSpec, Target};
use scheduler::schedule::Schedule;
use scheduler::store::JobStore;

use crate::{free_port, rss_kib, tessera_bin, Http};

/// Lateness samples in microseconds.
#[derive(Default)]
struct Lateness {
    us: Mutex<Vec<i64>>,
    fired: AtomicU64,
}

impl Lateness {
    fn record(&self, us: i64) {
        self.fired.fetch_add(1, Ordering::Relaxed);
        self.us.lock().expect("lock").push(us);
    }

    /// (count, p50 ms, p99 ms, max ms) of the samples taken so far, then clears them.
    fn take(&self) -> (usize, f64, f64, f64) {
        let mut v = std::mem::take(&mut *self.us.lock().expect("lock"));
        v.sort_unstable();
        let pct = |p: f64| {
            if v.is_empty() {
                f64::NAN
            } else {
                v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
            }
        };
        (
            v.len(),
            pct(0.5),
            pct(0.99),
            v.last().map_or(f64::NAN, |m| *m as f64 / 1e3),
        )
    }
}

struct RecordingSink(Arc<Lateness>);

impl Sink for RecordingSink {
    fn deliver(
        &self,
        tick: Tick,
    ) -> impl std::future::Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
        let late = Utc::now() - tick.scheduled;
        self.0.record(late.num_microseconds().unwrap_or(i64::MAX));
        async { Ok(Delivered::default()) }
    }
}

fn reminder(i: usize, first: DateTime<Utc>, every: Duration) -> Job {
    Job {
        name: "r".into(),
        target: Target::ActorReminder {
            app_id: Some("bench".into()),
            namespace: "default".into(),
            actor_type: "Remind".into(),
            actor_id: i.to_string(),
        },
        schedule: Some(Schedule::Every(every)),
        due_time: Some(first),
        created_at: Utc::now(),
        repeats: None,
        expiry: None,
        data: Vec::new(),
        failure_policy: FailurePolicy::default(),
        spec: JobSpec::default(),
    }
}

async fn engine_case(n: usize, rate: u64, secs: u64) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(JobStore::open(dir.path())?);
    let rss0 = rss_kib(std::process::id());
    let every = Duration::from_secs_f64(n as f64 / rate as f64);
    // Spread first ticks evenly over one period, starting after the load.
    let start_at = Utc::now() + chrono::Duration::seconds(5 + (n / 100_000) as i64 * 8);
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per = n.div_ceil(64);
    for w in 0..64 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (w * per)..((w + 1) * per).min(n) {
                let offset = every.mul_f64(i as f64 / n as f64);
                let first = start_at + chrono::Duration::from_std(offset).unwrap_or_default();
                store.put(reminder(i, first, every), true).await?;
            }
            Ok::<_, scheduler::store::StoreError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let load = t.elapsed();
    let rss1 = rss_kib(std::process::id());
    let late = Arc::new(Lateness::default());
    let engine = Engine::new(
        store.clone(),
        Arc::new(SystemClock),
        Arc::new(RecordingSink(late.clone())),
        EngineConfig::default(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let run = tokio::spawn(engine.run(async move { s.cancelled().await }));
    // Measure once the first ticks are due, for `secs`.
    let wait = (start_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(500)).await;
    late.take();
    let f0 = late.fired.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let fired = late.fired.load(Ordering::Relaxed) - f0;
    let elapsed = t.elapsed().as_secs_f64();
    let (_, p50, p99, max) = late.take();
    let rss2 = rss_kib(std::process::id());
    stop.cancel();
    let _ = run.await;
    Ok(format!(
        "| engine | {n} | {:.0} | {:.0} | {p50:.1} | {p99:.1} | {max:.1} | {:.0}/s registration (store.put, 64 tasks) | {} MiB ({:.0} B/reminder) |",
        rate,
        fired as f64 / elapsed,
        n as f64 / load.as_secs_f64(),
        rss2 / 1024,
        (rss1.saturating_sub(rss0)) as f64 * 1024.0 / n as f64
    ))
}

/// The actor app: hosts type `Remind`; records each reminder's lateness from the schedule the
/// bench registered (first tick `first_ms` + k * `every_ms`).
#[derive(Clone)]
struct App {
    late: Arc<Lateness>,
    first_ms: i64,
    every_ms: i64,
    n: usize,
}

async fn remind(
    State(app): State<App>,
    UrlPath((id, _name)): UrlPath<(usize, String)>,
) -> &'static str {
    let now_us = Utc::now().timestamp_micros();
    let first_us = (app.first_ms + (app.every_ms * id as i64) / app.n as i64) * 1000;
    let every_us = app.every_ms * 1000;
    let since = now_us - first_us;
    let late = if since < 0 { since } else { since % every_us };
    app.late.record(late);
    "{}"
}

async fn host_case(n: usize, rate: u64, secs: u64) -> anyhow::Result<Vec<String>> {
    let every_ms = (n as f64 * 1000.0 / rate as f64) as i64;
    let late = Arc::new(Lateness::default());
    // The first ticks start well after registration ends (at >= 4,000/s).
    let first_ms = Utc::now().timestamp_millis() + 10_000 + (n as i64 / 3);
    let app = App {
        late: late.clone(),
        first_ms,
        every_ms,
        n,
    };
    let app_port = free_port();
    let router = axum::Router::new()
        .route(
            "/dapr/config",
            get(|| async { axum::Json(serde_json::json!({"entities": ["Remind"]})) }),
        )
        .route("/actors/Remind/{id}/method/remind/{name}", put(remind))
        .route("/actors/{t}/{id}", delete(|| async { "" }))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", app_port)).await?;
    tokio::spawn(async move { axum::serve(listener, router).await });

    let dir = tempfile::tempdir()?;
    let port = free_port();
    let mut child = std::process::Command::new(tessera_bin()?)
        .args(["host", "--app-id", "bench", "--log-level", "warn"])
        .args([
            "--dapr-http-port",
            &port.to_string(),
            "--app-port",
            &app_port.to_string(),
        ])
        .args(["--dapr-grpc-port", &free_port().to_string()])
        .args(["--metrics-port", &free_port().to_string(), "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    // Wait until the host hosts the type (a reminder for it is accepted).
    let base = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    loop {
        let r = client
            .request(
                hyper::Request::get(format!("{base}/v1.0/metadata"))
                    .body(Full::new(Bytes::new()))?,
            )
            .await;
        if let Ok(r) = r {
            use http_body_util::BodyExt;
            let body = r.into_body().collect().await?.to_bytes();
            if serde_json::from_slice::<serde_json::Value>(&body)
                .is_ok_and(|v| v["actorRuntime"]["hostReady"] == true)
            {
                break;
            }
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(20), "host not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_before = rss_kib(child.id());
    // Registrations: 64 workers until all n are in.
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (c, b, nx) = (client.clone(), base.clone(), next.clone());
        workers.spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            loop {
                let i = nx.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return (lat, errors);
                }
                let due_ms = first_ms + (every_ms * i as i64) / n as i64;
                let due = DateTime::<Utc>::from_timestamp_millis(due_ms).unwrap_or_default();
                let body = serde_json::json!({
                    "dueTime": due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "period": format!("{every_ms}ms"),
                });
                let req = hyper::Request::put(format!("{b}/v1.0/actors/Remind/{i}/reminders/r"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("request");
                let t = Instant::now();
                if crate::http_ok(&c, req, 204).await {
                    lat.push(t.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
                }
            }
        });
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    while let Some(r) = workers.join_next().await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    lat.sort_unstable();
    let reg = crate::Sample {
        lat_us: lat,
        errors,
        elapsed: t.elapsed(),
    };
    let registered = reg.lat_us.len();
    let rss_after = rss_kib(child.id());
    let mut rows = vec![format!(
        "| host: reminder registrations (HTTP, concurrency 64) | {n} | {:.0}/s | p50 {:.2} ms | p99 {:.2} ms | {} errors | RSS {} -> {} MiB |",
        registered as f64 / reg.elapsed.as_secs_f64(),
        reg.pct(0.5) / 1e3,
        reg.pct(0.99) / 1e3,
        reg.errors,
        rss_before / 1024,
        rss_after / 1024
    )];
    // Fires: the first period activates every actor (a fenced claim per actor), so it is
    // measured on its own; then `secs` of steady firing to warm actors.
    let wait = first_ms - Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    for (phase, length) in [
        (
            "first period, each fire activates its actor",
            Duration::from_millis(every_ms as u64),
        ),
        ("warm actors", Duration::from_secs(secs)),
    ] {
        late.take();
        let f0 = late.fired.load(Ordering::Relaxed);
        let t = Instant::now();
        tokio::time::sleep(length).await;
        let fired = late.fired.load(Ordering::Relaxed) - f0;
        let (_, p50, p99, max) = late.take();
        rows.push(format!(
            "| host: fires delivered to the app ({phase}) | {n} | offered {rate}/s | {:.0}/s | lateness p50 {p50:.1} ms | p99 {p99:.1} ms | max {max:.1} ms | RSS {} MiB |",
            fired as f64 / t.elapsed().as_secs_f64(),
            rss_kib(child.id()) / 1024
        ));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(rows)
}

pub async fn run(
    secs: u64,
    host_reminders: usize,
    host_rates: Vec<u64>,
    engine_cases: Vec<String>,
) -> anyhow::Result<()> {
    let cases = engine_cases
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| {
            let (n, rate) = c
                .split_once(':')
                .with_context(|| format!("engine case {c:?}: expected reminders:rate"))?;
            Ok((n.parse::<usize>()?, rate.parse::<u64>()?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("| case | reminders | offered fires/s | delivered fires/s | lateness p50 ms | p99 ms | max ms | registration | memory |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (n, rate) in cases {
        println!(
            "{}",
            engine_case(n, rate, secs).await.context("engine case")?
        );
    }
    for rate in host_rates {
        for row in host_case(host_reminders, rate, secs)
            .await
            .context("host case")?
        {
            println!("{row}");
        }
    }
    Ok(())
}
