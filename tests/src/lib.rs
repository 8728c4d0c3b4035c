//! Helpers for end-to-end tests: start real `tessera` processes on random loopback ports, wait
//! for them, kill them (including `kill -9`), and talk to them over HTTP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `tessera` binary built by this workspace (the test binary lives in `target/<profile>/deps`).
pub fn tessera_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("tessera");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p cli`",
        bin.display()
    );
    bin
}

/// A free port on 127.0.0.1 (bound then released; the race with other processes is harmless in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `tessera host` process.
pub struct Sidecar {
    pub child: Child,
    pub port: u16,
    /// Dapr's gRPC API (`--dapr-grpc-port`).
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub client: reqwest::Client,
}

impl Sidecar {
    /// Starts `tessera host --app-id <app_id>` with `extra` flags on a fresh port and waits until
    /// it answers `/v1.0/healthz/outbound`.
    pub async fn start(app_id: &str, data_dir: &Path, extra: &[&str]) -> Sidecar {
        Self::start_with_env(app_id, data_dir, extra, &[]).await
    }

    pub async fn start_with_env(
        app_id: &str,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Sidecar {
        Self::start_on(free_port(), app_id, data_dir, extra, env).await
    }

    /// Like [`Sidecar::start_with_env`] on a given HTTP port (to restart a host where its app
    /// expects it).
    pub async fn start_on(
        port: u16,
        app_id: &str,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Sidecar {
        let metrics_port = free_port();
        let grpc_port = free_port();
        let log = data_dir.with_extension(format!("{port}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(tessera_bin());
        cmd.args([
            "host",
            "--app-id",
            app_id,
            "--dapr-http-port",
            &port.to_string(),
            "--metrics-port",
            &metrics_port.to_string(),
            "--dapr-grpc-port",
            &grpc_port.to_string(),
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .envs(env.iter().copied())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn tessera");
        let mut s = Sidecar {
            child,
            port,
            grpc_port,
            metrics_port,
            data_dir: data_dir.to_path_buf(),
            log,
            client: reqwest::Client::new(),
        };
        s.wait_ready().await;
        s
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tessera exited early with {status}:\n{}", self.logs());
            }
            if let Ok(r) = self
                .client
                .get(self.url("/v1.0/healthz/outbound"))
                .send()
                .await
            {
                if r.status() == 204 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "tessera not ready in 20 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of a Prometheus counter or gauge on `GET /metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self
            .client
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().unwrap()
    }

    pub async fn save(&self, store: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1.0/state/{store}")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, store: &str, key: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/v1.0/state/{store}/{key}")))
            .send()
            .await
            .unwrap()
    }

    /// The value of a key as JSON, `None` on 204.
    pub async fn value(&self, store: &str, key: &str) -> Option<serde_json::Value> {
        let r = self.get(store, key).await;
        match r.status().as_u16() {
            204 => None,
            200 => Some(r.json().await.unwrap()),
            s => panic!("GET {key}: {s} {}", r.text().await.unwrap()),
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `files` (name, contents) into a fresh resources directory under `dir`.
pub fn resources(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let res = dir.join(format!("resources-{}", free_port()));
    std::fs::create_dir_all(&res).unwrap();
    for (name, text) in files {
        std::fs::write(res.join(name), text).unwrap();
    }
    res
}

/// A unique suffix for keys and table names, so runs never see each other's data.
pub fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A `tessera placement` or `tessera scheduler` replica process.
pub struct Replica {
    /// `placement` or `scheduler`: the `tessera` subcommand.
    pub service: &'static str,
    pub id: u64,
    pub port: u16,
    pub http_port: u16,
    pub data_dir: PathBuf,
    pub cluster: String,
    /// Flags after the common ones.
    pub extra: Vec<String>,
    pub child: Option<Child>,
}

/// Scheduler replicas are [`Replica`]s of the `scheduler` service.
pub type SchedulerReplica = Replica;

impl Replica {
    /// Ports and directories for a placement cluster of `n` replicas with host lease `lease`
    /// (not started).
    pub fn cluster(n: u64, dir: &Path, lease: &str) -> Vec<Replica> {
        Self::replicas(
            "placement",
            n,
            dir,
            &["--lease", lease, "--metadata-enabled"],
        )
    }

    /// Ports and directories for a scheduler cluster of `n` replicas (not started).
    pub fn scheduler_cluster(n: u64, dir: &Path) -> Vec<Replica> {
        Self::replicas("scheduler", n, dir, &[])
    }

    fn replicas(service: &'static str, n: u64, dir: &Path, extra: &[&str]) -> Vec<Replica> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (p, _))| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        ports
            .into_iter()
            .enumerate()
            .map(|(i, (port, http_port))| Replica {
                service,
                id: i as u64 + 1,
                port,
                http_port,
                data_dir: dir.join(format!("{service}-{}", i + 1)),
                cluster: cluster.clone(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            })
            .collect()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process (its log goes to `<data dir>.log`).
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .unwrap();
        let child = Command::new(tessera_bin())
            .args([
                self.service,
                "--id",
                &self.id.to_string(),
                "--initial-cluster",
                &self.cluster,
            ])
            .args([
                "--port",
                &self.port.to_string(),
                "--healthz-port",
                &self.http_port.to_string(),
            ])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `GET /placement/state`, or `None` if the replica does not answer.
    pub async fn state(&self, client: &reqwest::Client) -> Option<serde_json::Value> {
        self.child.as_ref()?;
        let r = client
            .get(format!(
                "http://127.0.0.1:{}/placement/state",
                self.http_port
            ))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Waits until `GET /healthz` answers 200.
    pub async fn wait_healthy(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{}/healthz", self.http_port))
                .timeout(Duration::from_millis(500))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} replica {} not healthy in 20 s:\n{}",
                self.service,
                self.id,
                std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a counter or gauge on `GET /metrics` (`None` if the replica does not answer).
    pub async fn metric(&self, client: &reqwest::Client, name: &str) -> Option<u64> {
        self.child.as_ref()?;
        let text = client
            .get(format!("http://127.0.0.1:{}/metrics", self.http_port))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One actor host: a `tessera host` and its app, started separately so that the host can be
/// killed, paused or restarted while the app keeps running.
pub struct ActorHost {
    pub sidecar: Option<Sidecar>,
    app: Child,
    pub http_port: u16,
    data_dir: PathBuf,
    pub journal: PathBuf,
    /// Jobs and reminders the app received.
    pub events: PathBuf,
    app_id: String,
    extra: Vec<String>,
}

impl ActorHost {
    /// Starts `app_bin` (the `turn_app` test app) on a free port, then a host for it.
    pub async fn start(
        app_bin: &Path,
        dir: &Path,
        name: &str,
        app_id: &str,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> ActorHost {
        let app_port = free_port();
        let http_port = free_port();
        let data_dir = dir.join(name);
        let journal = dir.join(format!("{name}.journal"));
        let app_log = std::fs::File::create(dir.join(format!("{name}.app.log"))).unwrap();
        let events = dir.join(format!("{name}.events"));
        let app = Command::new(app_bin)
            .env("APP_PORT", app_port.to_string())
            .env("DAPR_HTTP_PORT", http_port.to_string())
            .env("JOURNAL", &journal)
            .env("EVENTS", &events)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(app_log.try_clone().unwrap())
            .stderr(app_log)
            .spawn()
            .unwrap();
        let mut extra = extra.to_vec();
        extra.extend(["--app-port".to_string(), app_port.to_string()]);
        let mut h = ActorHost {
            sidecar: None,
            app,
            http_port,
            data_dir,
            journal,
            events,
            app_id: app_id.to_string(),
            extra,
        };
        h.restart().await;
        h
    }

    pub async fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let s = Sidecar::start_on(self.http_port, &self.app_id, &self.data_dir, &extra, &[]).await;
        self.sidecar = Some(s);
    }

    pub fn sidecar(&self) -> &Sidecar {
        self.sidecar.as_ref().expect("sidecar running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.sidecar().child.id() as i32)
    }

    /// Waits until the host reports its actor types registered and a placement lease.
    pub async fn wait_hosting(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self
                .sidecar()
                .client
                .get(self.url("/v1.0/metadata"))
                .send()
                .await
            {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    if v["actorRuntime"]["hostReady"] == true {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "host never became ready:\n{}",
                self.sidecar().logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ActorHost {
    fn drop(&mut self) {
        let _ = self.app.kill();
        let _ = self.app.wait();
    }
}

/// Reminder deliveries as the test app (`turn_app`) records them, for the scheduler tests.
pub mod reminders {
    use std::collections::HashMap;
    use std::path::Path;

    /// Milliseconds since the Unix epoch, now.
    pub fn unix_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as i64
    }

    /// `ms` as an RFC 3339 time with milliseconds (a reminder's `dueTime`).
    pub fn rfc3339(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .expect("a time in range")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// One delivery: when it arrived, its tick number and how many ticks before it it covers.
    #[derive(Debug, Clone, Copy)]
    pub struct Delivery {
        pub at: i64,
        pub missed: i64,
        pub seq: i64,
    }

    /// Deliveries per reminder name, in file order, from the app's `EVENTS` file.
    pub fn read_events(path: &Path) -> HashMap<String, Vec<Delivery>> {
        let mut out: HashMap<String, Vec<Delivery>> = HashMap::new();
        for l in std::fs::read_to_string(path).unwrap_or_default().lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if let ["remind", _id, name, ms, missed, seq] = f.as_slice() {
                if let (Ok(at), Ok(missed), Ok(seq)) = (ms.parse(), missed.parse(), seq.parse()) {
                    out.entry(name.to_string())
                        .or_default()
                        .push(Delivery { at, missed, seq });
                }
            }
        }
        out
    }

    /// The `p` quantile (0 to 1) of `v`, 0 when empty.
    pub fn percentile(v: &mut [i64], p: f64) -> i64 {
        if v.is_empty() {
            return 0;
        }
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}
