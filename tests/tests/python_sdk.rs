//! The official Dapr Python SDK against Tessera, unchanged: `tessera run` starts the SDK's actor
//! host (`tests/python/actor_app.py`, dapr-ext-fastapi) and a separate process calls it through
//! the SDK's `ActorProxy` (`tests/python/actor_client.py`), which checks every answer. The SDK's
//! `DaprClient`, which speaks gRPC, drives the state API (`tests/python/state_client.py`).
//!
//! The interpreter is `$TESSERA_PYTHON`, a venv made by `scripts/python-env.sh` with the pinned
//! SDK (`tests/python/requirements.txt`); `scripts/test` creates it and sets the variable. The
//! SDK's wire format is written down in `docs/python-sdk-wire.md`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{free_port, tessera_bin};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// The venv interpreter with the pinned Dapr SDK. Missing is a failure, never a skip.
fn python() -> PathBuf {
    let Some(p) = std::env::var_os("TESSERA_PYTHON").filter(|p| !p.is_empty()) else {
        panic!(
            "TESSERA_PYTHON is not set. Run `bash scripts/python-env.sh` (it creates target/pyenv \
             with the pinned Dapr Python SDK) and `export TESSERA_PYTHON=$PWD/target/pyenv/bin/python`; \
             `bash scripts/test` does both."
        );
    };
    let p = PathBuf::from(p);
    let p = if p.is_relative() {
        workspace_root().join(p)
    } else {
        p
    };
    assert!(
        p.exists(),
        "TESSERA_PYTHON={} does not exist: run `bash scripts/python-env.sh`",
        p.display()
    );
    p
}

/// `tessera run ... -- python actor_app.py`, stopped (app included) on drop.
struct PythonActorApp {
    child: Child,
    http_port: u16,
    grpc_port: u16,
    log: PathBuf,
    app_pid: Option<i32>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl PythonActorApp {
    async fn start(app_id: &str, env: &[(&str, &str)]) -> PythonActorApp {
        let python = python();
        let dir = tempfile::tempdir().unwrap();
        let (app_port, http_port, grpc_port) = (free_port(), free_port(), free_port());
        let log = dir.path().join("tessera-run.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(tessera_bin())
            .args(["run", "--app-id", app_id])
            .args(["--app-port", &app_port.to_string()])
            .args(["--dapr-http-port", &http_port.to_string()])
            .args(["--dapr-grpc-port", &grpc_port.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--")
            .arg(&python)
            .arg(script("actor_app.py"))
            .env("PYTHONUNBUFFERED", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn tessera run");
        let mut app = PythonActorApp {
            child,
            http_port,
            grpc_port,
            log,
            app_pid: None,
            client: reqwest::Client::new(),
            _dir: dir,
        };
        app.wait_healthy().await;
        app
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `GET /v1.0/healthz` = 204 (sidecar up and the app accepting connections), then
    /// notes the app's pid from the metadata API so that drop can stop it even if tessera hangs.
    async fn wait_healthy(&mut self) {
        // Python imports the SDK (grpc, pydantic, ...) before it listens: seconds on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tessera run exited early with {status}:\n{}", self.logs());
            }
            if let Ok(r) = self.client.get(self.url("/v1.0/healthz")).send().await {
                if r.status() == 204 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "tessera run + actor_app.py not healthy (GET /v1.0/healthz = 204) in 60 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Ok(r) = self.client.get(self.url("/v1.0/metadata")).send().await {
            if let Ok(m) = r.json::<serde_json::Value>().await {
                self.app_pid = m["extended"]["appPID"]
                    .as_str()
                    .and_then(|p| p.parse().ok());
            }
        }
    }

    /// Runs `actor_client.py <args>` against this sidecar; returns (exit code, stdout, stderr).
    async fn client(&self, args: &[&str]) -> (Option<i32>, String, String) {
        self.run_script("actor_client.py", args).await
    }

    /// Runs `tests/python/<name> <args>` with the sidecar's ports in its environment.
    async fn run_script(&self, name: &str, args: &[&str]) -> (Option<i32>, String, String) {
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(script(name))
            .args(args)
            .env("DAPR_HTTP_PORT", self.http_port.to_string())
            .env("DAPR_GRPC_PORT", self.grpc_port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name} {args:?} did not finish in 120 s; tessera run log:\n{}",
                    self.logs()
                )
            })
            .expect("run the Python client");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for PythonActorApp {
    fn drop(&mut self) {
        // SIGTERM: tessera stops the app's process group (5 s grace), then itself.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stopped = false;
        while !stopped && Instant::now() < deadline {
            stopped = matches!(self.child.try_wait(), Ok(Some(_)));
            std::thread::sleep(Duration::from_millis(20));
        }
        if !stopped {
            let _ = self.child.kill();
            // tessera did not stop its app: the app leads its own process group (tessera starts
            // it so), kill that group too. (actor_app.py also exits when its parent dies.)
            if let Some(app) = self.app_pid {
                let _ = killpg(Pid::from_raw(app), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

/// Increment/Get with state through the sidecar, 20 concurrent calls to one actor (turn-based
/// concurrency: no lost update), independent actor ids, and an actor timer that keeps firing.
#[tokio::test]
async fn python_sdk_counter_actor_state_concurrency_and_timer() {
    let app = PythonActorApp::start("counters", &[]).await;
    let (code, stdout, stderr) = app.client(&["counter"]).await;
    assert_eq!(
        code,
        Some(0),
        "actor_client.py counter failed\n--- client stderr:\n{stderr}\n--- client stdout:\n{stdout}\n\
         --- tessera run log (sidecar and == APP == lines):\n{}",
        app.logs()
    );
    let summary: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .last()
            .expect("actor_client.py printed a summary"),
    )
    .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{stdout}"));
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["concurrent"], 26, "{summary}");
    let ticks = summary["ticks"].as_array().expect("ticks");
    assert!(
        ticks[1].as_u64() > ticks[0].as_u64(),
        "the timer kept firing: {summary}"
    );
}

/// Scenario `scenario` of actor_client.py against a fresh app; returns its JSON summary.
async fn scenario(app_id: &str, env: &[(&str, &str)], scenario: &str) -> serde_json::Value {
    let app = PythonActorApp::start(app_id, env).await;
    let (code, stdout, stderr) = app.client(&[scenario]).await;
    assert_eq!(
        code,
        Some(0),
        "actor_client.py {scenario} failed\n--- client stderr:\n{stderr}\n--- client stdout:\n{stdout}\n\
         --- tessera run log (sidecar and == APP == lines):\n{}",
        app.logs()
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{stdout}"));
    assert_eq!(summary["ok"], true, "{summary}");
    summary
}

/// The SDK registers a one-shot and a periodic reminder (`register_reminder`, base64 data,
/// `XhYmZsWmsVμs` durations); the scheduler delivers both to the actor.
#[tokio::test]
async fn python_sdk_reminders() {
    scenario("reminders", &[], "reminder").await;
}

/// A -> B -> A through the sidecar with reentrancy enabled in the SDK's config.
#[tokio::test]
async fn python_sdk_reentrant_chain() {
    scenario("chains", &[("REENTRANCY", "all")], "chain").await;
}

/// The SDK's `DaprClient`, which speaks gRPC, against the state API (`tests/python/state_client.py`).
#[tokio::test]
async fn python_sdk_state_over_grpc() {
    let app = PythonActorApp::start("pystate", &[]).await;
    let (code, stdout, stderr) = app.run_script("state_client.py", &[]).await;
    assert_eq!(
        code,
        Some(0),
        "state_client.py failed\n--- client stderr:\n{stderr}\n--- client stdout:\n{stdout}\n\
         --- tessera run log:\n{}",
        app.logs()
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{stdout}"));
    assert_eq!(summary["checks"], 10, "{summary}");
}
