//! `bench placement`: 3 `tessera placement` replica processes (sled, every Raft write flushed)
//! and simulated hosts in this process.
//!
//! - **Dissemination**: N hosts (real `placement::client` sessions, one connection each) hold
//!   the table; one more host joins; the figure is the time from starting that host's client until
//!   the last of the N hosts holds the version that adds it. Each host's table task records when
//!   its table reaches the target version (no polling of N tables).
//! - **Commit rate, connecting clients**: B real clients (one connection each) start at once;
//!   timed until a read-only observer's table lists all of them.
//! - **Commit rate, host streams**: B host sessions (the host protocol, one stream per host,
//!   many streams per HTTP/2 connection) send their registration at once, keep heartbeating and
//!   report each version they receive as applied, like real hosts; they decode only the version
//!   of what they receive. Timed the same way. This measures what the replicas commit (batched)
//!   rather than how fast one process can open B connections and decode B tables.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use placement::client::{Client, Options, Registration};
use proto::placement::HostReport;
use tokio::sync::{mpsc, Notify};

struct Replicas(Vec<Child>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts 3 replicas; returns them and their gRPC addresses.
fn start_replicas(bin: &Path, dir: &Path) -> anyhow::Result<(Replicas, Vec<String>)> {
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| (super::free_port(), super::free_port()))
        .collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (p, _))| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Replicas(Vec::new());
    for (i, (p, h)) in ports.iter().enumerate() {
        children.0.push(
            Command::new(bin)
                .args([
                    "placement",
                    "--id",
                    &(i + 1).to_string(),
                    "--initial-cluster",
                    &cluster,
                    "--log-level",
                    "warn",
                ])
                .args([
                    "--port",
                    &p.to_string(),
                    "--healthz-port",
                    &h.to_string(),
                    "--data-dir",
                ])
                .arg(dir.join(format!("r{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let addrs = ports
        .iter()
        .map(|(p, _)| format!("127.0.0.1:{p}"))
        .collect();
    Ok((children, addrs))
}

fn registration(i: usize, tag: &str) -> Registration {
    Registration {
        name: format!("10.0.{}.{}:{}", i / 250, i % 250, 5000) + tag,
        app_id: "bench".into(),
        actor_types: vec!["Device".into()],
        namespace: "default".into(),
    }
}

/// One timed change: how many hosts still lack the target version, and when the last got it.
#[derive(Default)]
struct Round {
    target: AtomicU64,
    remaining: AtomicUsize,
    done_at: Mutex<Option<Instant>>,
    done: Notify,
}

impl Round {
    fn arm(&self, target: u64, hosts: usize) {
        *self.done_at.lock().expect("lock") = None;
        self.remaining.store(hosts, Ordering::SeqCst);
        self.target.store(target, Ordering::SeqCst);
    }

    /// A host's table went from `from` to `to`.
    fn saw(&self, from: u64, to: u64) {
        let t = self.target.load(Ordering::SeqCst);
        if t > 0 && from < t && to >= t && self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.done_at.lock().expect("lock") = Some(Instant::now());
            self.done.notify_one();
        }
    }

    async fn wait(&self, within: Duration) -> anyhow::Result<Instant> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(t) = *self.done_at.lock().expect("lock") {
                return Ok(t);
            }
            if tokio::time::timeout_at(deadline, self.done.notified())
                .await
                .is_err()
            {
                bail!(
                    "{} hosts did not reach version {} within {within:?}",
                    self.remaining.load(Ordering::SeqCst),
                    self.target.load(Ordering::SeqCst)
                );
            }
        }
    }
}

/// A simulated host: a placement client that applies every table as it arrives (it runs no
/// actors, so there is nothing to drain) and tells `round` when its version moves. Dropping the
/// last `Arc` stops it, like a crash.
fn spawn_host(addrs: &[String], reg: Registration, round: Option<Arc<Round>>) -> Arc<Client> {
    let client = Arc::new(Client::spawn(addrs.to_vec(), reg, Options::default()));
    let weak = Arc::downgrade(&client);
    let mut tables = client.subscribe();
    tokio::spawn(async move {
        let mut last = 0;
        while tables.changed().await.is_ok() {
            let v = tables.borrow_and_update().version;
            if let Some(r) = &round {
                r.saw(last, v);
            }
            last = v;
            match weak.upgrade() {
                Some(c) => c.set_applied(v),
                None => return,
            }
        }
    });
    client
}

fn version(c: &Client) -> u64 {
    c.subscribe().borrow().version
}

fn count_hosts(c: &Client, suffix: &str) -> usize {
    c.subscribe()
        .borrow()
        .hosts
        .iter()
        .filter(|h| h.name.ends_with(suffix))
        .count()
}

async fn wait_until(mut cond: impl FnMut() -> bool, deadline: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > deadline {
            bail!("condition not met within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Waits until `observer`'s table lists `count` hosts named `*suffix`; returns when it did.
async fn observe(
    observer: &Client,
    suffix: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<Instant> {
    let mut rx = observer.subscribe();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let have = rx
            .borrow_and_update()
            .hosts
            .iter()
            .filter(|h| h.name.ends_with(suffix))
            .count();
        if have >= count {
            return Ok(Instant::now());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => bail!("only {have} of {count} hosts committed within {within:?}"),
        }
    }
}

pub async fn run(
    host_counts: Vec<usize>,
    changes: usize,
    burst: usize,
    streams_per_connection: usize,
) -> anyhow::Result<()> {
    let bin = super::tessera_bin()?;
    let dir = tempfile::tempdir()?;
    let (_replicas, addrs) = start_replicas(&bin, dir.path())?;
    // A read-only host (no actor types): never in the table, sees every version.
    let observer = Client::spawn(
        addrs.clone(),
        Registration {
            name: "observer".into(),
            app_id: "bench".into(),
            actor_types: vec![],
            namespace: "default".into(),
        },
        Options::default(),
    );
    wait_until(|| observer.leader().is_some(), Duration::from_secs(20)).await?;

    println!("| hosts | changes | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    for (round_no, &n) in host_counts.iter().enumerate() {
        let tag = format!("-{round_no}");
        let round = Arc::new(Round::default());
        let t = Instant::now();
        let clients: Vec<Arc<Client>> = (0..n)
            .map(|i| spawn_host(&addrs, registration(i, &tag), Some(round.clone())))
            .collect();
        wait_until(
            || clients.iter().all(|c| count_hosts(c, &tag) >= n),
            Duration::from_secs(120),
        )
        .await?;
        let joined = t.elapsed();
        let mut lat = Vec::new();
        let mut extras = Vec::new();
        for k in 0..changes {
            // Nothing else changes the membership meanwhile (earlier hosts left before this size
            // started, and the joiners stay until it ends), so version + 1 is this join.
            let before = clients.iter().map(|c| version(c)).max().unwrap_or(0);
            round.arm(before + 1, n);
            let start = Instant::now();
            let name = registration(900_000 + k, &format!("-x{round_no}")).name;
            extras.push(spawn_host(
                &addrs,
                registration(900_000 + k, &format!("-x{round_no}")),
                None,
            ));
            let done = round.wait(Duration::from_secs(30)).await?;
            lat.push(done - start);
            let listed = clients[n - 1]
                .subscribe()
                .borrow()
                .hosts
                .iter()
                .any(|h| h.name == name);
            if !listed {
                bail!("version {} does not list the host that joined", before + 1);
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        lat.sort();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
        println!(
            "| {n} | {changes} | {:.1} | {:.1} | {:.1} |",
            pct(0.5),
            pct(0.99),
            lat.last().map_or(f64::NAN, |l| l.as_secs_f64() * 1e3)
        );
        eprintln!("{n} hosts joined (first table with all of them everywhere) in {joined:?}");
        drop(clients);
        drop(extras);
        // Let the lease (5 s) remove them before the next size.
        tokio::time::sleep(Duration::from_secs(7)).await;
    }

    // Commit rate with B connecting clients, one connection each.
    let t = Instant::now();
    let clients: Vec<Arc<Client>> = (0..burst)
        .map(|i| spawn_host(&addrs, registration(i, "-burst"), None))
        .collect();
    let done = observe(&observer, "-burst", burst, Duration::from_secs(120)).await?;
    let took = done - t;
    let versions = version(&observer);
    println!(
        "\n{burst} connecting clients: all joins committed in {took:?}: {:.0} membership changes/s (table version now {versions})",
        burst as f64 / took.as_secs_f64()
    );
    drop(clients);
    tokio::time::sleep(Duration::from_secs(7)).await;

    // Commit rate with B host streams sharing HTTP/2 connections to the leader.
    let leader = observer.leader().context("no leader")?;
    let connections = burst.div_ceil(streams_per_connection.max(1));
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{leader}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let v0 = version(&observer);
    let stop = tokio_util::sync::CancellationToken::new();
    let errors = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    for i in 0..burst {
        let channel = channels[i % connections].clone();
        tokio::spawn(stream_host(
            channel,
            registration(i, "-streams"),
            stop.clone(),
            errors.clone(),
        ));
    }
    let done = observe(&observer, "-streams", burst, Duration::from_secs(120)).await;
    stop.cancel();
    let took = done? - t;
    let versions = version(&observer) - v0;
    println!(
        "{burst} host streams over {connections} connections: all joins committed in {took:?}: {:.0} membership changes/s, in {versions} table versions; {} stream errors",
        burst as f64 / took.as_secs_f64(),
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

/// What a stream host reads of an order: only versions (everything else is skipped undecoded).
#[derive(Clone, PartialEq, prost::Message)]
struct OrderVersion {
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5")]
    order: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(message, tag = "1")]
    Table(TableVersion),
    #[prost(message, tag = "2")]
    Ack(Skip),
    #[prost(string, tag = "3")]
    Leader(String),
    #[prost(uint64, tag = "4")]
    Settled(u64),
    #[prost(message, tag = "5")]
    Delta(DeltaVersion),
}

#[derive(Clone, PartialEq, prost::Message)]
struct TableVersion {
    #[prost(uint64, tag = "1")]
    version: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeltaVersion {
    #[prost(uint64, tag = "2")]
    version: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Skip {}

/// One host on the host protocol: registers, heartbeats every second, reports every version it
/// receives as applied at once (like `Client::set_applied`).
async fn stream_host(
    channel: tonic::transport::Channel,
    reg: Registration,
    stop: tokio_util::sync::CancellationToken,
    errors: Arc<AtomicUsize>,
) {
    let (tx, rx) = mpsc::channel::<HostReport>(8);
    let report = |seq: u64, applied_version: u64| HostReport {
        name: reg.name.clone(),
        app_id: reg.app_id.clone(),
        actor_types: reg.actor_types.clone(),
        namespace: reg.namespace.clone(),
        seq,
        applied_version,
    };
    let _ = tx.send(report(1, 0)).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    let fail = || {
        errors.fetch_add(1, Ordering::Relaxed);
    };
    if grpc.ready().await.is_err() {
        return fail();
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/tessera.placement.v1.Placement/ReportHost",
    );
    let codec = tonic_prost::ProstCodec::<HostReport, OrderVersion>::default();
    let mut inbound = match grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            codec,
        )
        .await
    {
        Ok(r) => r.into_inner(),
        Err(_) => return fail(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut seq, mut applied) = (1u64, 0u64);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                seq += 1;
                if tx.send(report(seq, applied)).await.is_err() {
                    return fail();
                }
            }
            m = inbound.message() => match m {
                Ok(Some(o)) => {
                    let v = match o.order {
                        Some(Kind::Table(t)) => t.version,
                        Some(Kind::Delta(d)) => d.version,
                        Some(Kind::Leader(_)) => return fail(),
                        _ => continue,
                    };
                    if v > applied {
                        applied = v;
                        seq += 1;
                        if tx.send(report(seq, applied)).await.is_err() {
                            return fail();
                        }
                    }
                }
                _ => return fail(),
            }
        }
    }
}
