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
        let port = free_port();
        let log = data_dir.with_extension(format!("{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(tessera_bin());
        cmd.args([
            "host",
            "--app-id",
            app_id,
            "--dapr-http-port",
            &port.to_string(),
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

/// A `tessera placement` replica process.
pub struct Replica {
    pub id: u64,
    pub port: u16,
    pub http_port: u16,
    pub data_dir: PathBuf,
    pub cluster: String,
    pub lease: String,
    pub child: Option<Child>,
}

impl Replica {
    /// Ports and directories for a cluster of `n` replicas (not started).
    pub fn cluster(n: u64, dir: &Path, lease: &str) -> Vec<Replica> {
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
                id: i as u64 + 1,
                port,
                http_port,
                data_dir: dir.join(format!("replica-{}", i + 1)),
                cluster: cluster.clone(),
                lease: lease.to_string(),
                child: None,
            })
            .collect()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .unwrap();
        let child = Command::new(tessera_bin())
            .args([
                "placement",
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
            .args(["--lease", &self.lease, "--metadata-enabled", "--data-dir"])
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
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}
