//! Running the app next to the sidecar for `tessera run`: environment, prefixed output, readiness
//! wait, and a clean stop of both on Ctrl-C, on app exit or on `POST /v1.0/shutdown`.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actor_host::Host;
use anyhow::Context;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::HostArgs;

const PREFIX: &str = "== APP == ";
const STOP_GRACE: Duration = Duration::from_secs(5);

fn forward<R: AsyncRead + Unpin + Send + 'static>(from: R, to_stderr: bool) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(from).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if to_stderr {
                eprintln!("{PREFIX}{line}");
            } else {
                println!("{PREFIX}{line}");
            }
        }
    });
}

/// Sends `sig` to the app's whole process group (the app and anything it started).
fn signal_group(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        if let Err(e) = killpg(Pid::from_raw(pid as i32), sig) {
            tracing::debug!(pid, ?sig, error = %e, "signal to the app's process group failed");
        }
    }
}

/// Starts the app, waits for it or for a stop, and returns the exit code for `tessera run`.
pub async fn run_app(
    args: &HostArgs,
    command: &[String],
    host: &Host,
    stop: CancellationToken,
) -> anyhow::Result<u8> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("APP_ID", &args.app_id)
        .env("DAPR_HTTP_PORT", args.dapr_http_port.to_string())
        .env("DAPR_GRPC_PORT", args.dapr_grpc_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(p) = args.app_port {
        cmd.env("APP_PORT", p.to_string());
    }
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start the app command {:?}: is it installed and on PATH?",
            command[0]
        )
    })?;
    tracing::info!(pid = child.id(), "app started: {}", command.join(" "));
    host.shared().extended.write().expect("lock").insert(
        "appPID".into(),
        child.id().map(|p| p.to_string()).unwrap_or_default(),
    );
    forward(child.stdout.take().expect("piped"), false);
    forward(child.stderr.take().expect("piped"), true);

    let shared = host.shared().clone();
    let ready_log = tokio::spawn(async move {
        while !shared.app_ready.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("You're up and running! Both the app and the sidecar are running.");
    });

    let outcome = tokio::select! {
        status = child.wait() => Some(status.context("waiting for the app")?),
        _ = crate::signal() => { tracing::info!("signal received, stopping the app and the sidecar"); None }
        _ = stop.cancelled() => { tracing::info!("sidecar shutting down, stopping the app"); None }
    };
    ready_log.abort();
    let code = match outcome {
        Some(status) => {
            tracing::info!(%status, "app exited; stopping the sidecar");
            status.code().unwrap_or(1)
        }
        None => {
            signal_group(&child, Signal::SIGTERM);
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(Ok(status)) => {
                    tracing::info!(%status, "app stopped");
                    0
                }
                _ => {
                    tracing::warn!("app did not stop within {STOP_GRACE:?}; killing it");
                    signal_group(&child, Signal::SIGKILL);
                    let _ = child.wait().await;
                    0
                }
            }
        }
    };
    Ok(code.clamp(0, 255) as u8)
}
